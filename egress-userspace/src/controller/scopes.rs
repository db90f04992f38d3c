//! Following what scoped entries name on the host: an executable replaced on disk (a package
//! upgrade renames a new file, a new inode, over the path) and a cgroup recreated (systemd
//! recreates a unit's cgroup, with a new inode, when the unit restarts). Either changes the
//! identity the kernel matches, so the policy in force is compiled again (not re-read: an edit
//! of the file waits for `reload` or `--watch`) and applied atomically.
//!
//! Checked every second by re-stating the paths (like `--watch` polls the policy file): no
//! inotify descriptors to keep, and a rename over the path, a new cgroup directory or a
//! ConfigMap-style symlink swap all show as a new inode. Cgroups are followed always (a
//! restarted unit would otherwise silently leave its scope); executables only with `--watch`
//! (an upgrade changes what is approved; without `--watch` the operator reloads).

use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, time::Duration};

use tracing::{info, warn};

use super::{Controller, adopt::Loaded};
use crate::policy::{
    compile::CompiledPolicy,
    resolve::{self, HostResolver, Resolver as _},
    scopes::CompiledScopes,
};

/// How often, and how long apart, a missing executable is looked for again before the policy
/// in force is kept (the window of a rename in an upgrade).
const MISSING_RETRIES: u32 = 3;
const RETRY_EVERY: Duration = Duration::from_millis(330);
/// How long a change is let settle before the policy is compiled again.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What the host shows for the named paths, against what the policy in force was compiled
/// with.
#[derive(Debug, PartialEq, Eq)]
enum Drift {
    /// Nothing changed.
    None,
    /// Something named now has another identity.
    Changed(String),
    /// Something named is missing (mid-rename, or a stopped unit).
    Missing(String),
}

fn drift(compiled: &CompiledPolicy, executables: bool) -> Drift {
    let mut missing = None;
    if executables {
        for (path, key) in &compiled.scopes.exe_paths {
            match resolve::exe_key(path) {
                Ok(now) if now != *key => {
                    return Drift::Changed(format!("executable {} was replaced", path.display()));
                }
                Ok(_) => {}
                Err(e) => {
                    missing.get_or_insert(format!("executable {}: {e}", path.display()));
                }
            }
        }
    }
    let host = HostResolver::default();
    for (rel, id) in &compiled.scopes.cgroup_paths {
        match host.cgroup(rel) {
            Ok(now) if now != *id => {
                return Drift::Changed(format!("cgroup {rel} was recreated"));
            }
            Ok(_) => {}
            Err(e) => {
                missing.get_or_insert(format!("cgroup {rel}: {e}"));
            }
        }
    }
    missing.map_or(Drift::None, Drift::Missing)
}

impl Controller {
    /// Every second: compiles the policy in force again when an executable it names (with
    /// `executables`, i.e. `--watch`) or a cgroup it names has another identity on the host.
    /// A missing executable is looked for a few times over about a second; still missing, or a
    /// cgroup missing, the policy in force is kept and that is logged once.
    pub(super) async fn scope_tick(&mut self, executables: bool) {
        let scopes = &self.policy.compiled.scopes;
        if scopes.exe_paths.is_empty() && scopes.cgroup_paths.is_empty() {
            return;
        }
        let mut seen = drift(&self.policy.compiled, executables);
        let mut tries = 0;
        while matches!(seen, Drift::Missing(_)) && tries < MISSING_RETRIES {
            tokio::time::sleep(RETRY_EVERY).await;
            seen = drift(&self.policy.compiled, executables);
            tries += 1;
        }
        let why = match seen {
            Drift::None => {
                self.scope_warned = None;
                return;
            }
            Drift::Missing(what) => {
                if self.scope_warned.as_deref() != Some(what.as_str()) {
                    warn!(%what, "a scope names something missing on the host; the policy in force is kept");
                    self.scope_warned = Some(what);
                }
                return;
            }
            Drift::Changed(why) => why,
        };
        tokio::time::sleep(DEBOUNCE).await;
        let policy = self.policy.policy.clone();
        let compiled = match CompiledPolicy::compile(&policy) {
            Ok(c) => c,
            Err(e) => {
                let what = e.to_string();
                if self.scope_warned.as_deref() != Some(what.as_str()) {
                    warn!(error = %what, %why, "the scopes cannot be resolved again; the policy in force is kept");
                    self.scope_warned = Some(what);
                }
                return;
            }
        };
        let loaded = Loaded {
            origin: self.policy.origin.clone(),
            policy,
            compiled,
        };
        match self.apply(loaded, false).await {
            Err(m) => warn!(%why, error = %m, "re-resolving the scopes failed"),
            Ok(_) => {
                self.scope_warned = None;
                info!(%why, "scopes resolved again and applied");
            }
        }
    }
}

impl Controller {
    /// `scopes` with the entries of this node's pods: each pod whose pod-level cgroup exists
    /// now, matched against the policy's pod selectors (`CompiledScopes::pod_entries`). The
    /// tables as compiled when the policy selects no pods or pod awareness is off.
    pub(super) fn with_pods(&self, scopes: &CompiledScopes) -> CompiledScopes {
        let Some(pods) = self.pods.as_ref().filter(|_| !scopes.pod_scopes.is_empty()) else {
            return scopes.clone();
        };
        let index = pods.read();
        let known: Vec<(String, BTreeMap<String, String>, u64, u32)> = index
            .pods()
            .filter_map(|p| {
                let dir = index.pod_cgroup(&p.uid)?;
                let id = std::fs::metadata(&dir).ok()?.ino();
                let level = dir
                    .strip_prefix(&self.target.root)
                    .ok()?
                    .components()
                    .count() as u32;
                Some((p.namespace.clone(), p.labels.clone(), id, level))
            })
            .collect();
        drop(index);
        let (entries, levels) = scopes.pod_entries(
            known
                .iter()
                .map(|(ns, labels, id, level)| (ns.as_str(), labels, *id, *level)),
        );
        scopes.with_pods(&entries, levels)
    }

    /// Brings the scope tables in force up to date with this node's pods (their cgroups and
    /// labels), without a reload: run when the pod watch changes something and every
    /// `POD_TICK`, which catches a pod's cgroup that kubelet creates after the pod arrived.
    pub(super) fn pods_tick(&mut self) {
        if self.policy.compiled.scopes.pod_scopes.is_empty() {
            return;
        }
        // Until the first list of this node's pods arrived, what is in force stays (after a
        // restart, the pinned tables hold the previous controller's pods): writing an empty
        // pod set would take every pod out of its scopes for that time.
        if !self.pods.as_ref().is_some_and(|p| p.read().synced()) {
            return;
        }
        let want = self.with_pods(&self.policy.compiled.scopes);
        if self.pod_scopes_applied.as_ref() == Some(&want) {
            return;
        }
        match self.dp.set_cgroup_scopes(&want) {
            Ok(()) => {
                tracing::debug!(cgroups = want.cgroup.len(), "pod scopes brought up to date");
                self.pod_scopes_applied = Some(want);
            }
            Err(e) => warn!(error = %e, "updating the pod scopes failed; retried on the next tick"),
        }
    }
}

/// How often the pods' cgroups are looked for while the policy selects pods: the window in
/// which a new pod's containers run out of its pod scopes (after kubelet made its cgroup).
pub(super) const POD_TICK: Duration = Duration::from_millis(100);
