//! The policy in force and how it changes: atomic reloads (`egress reload`, SIGHUP, `--watch`),
//! and the state recorded beside the pins for restarts and `egress status`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime},
};

use tracing::{info, warn};

use super::Controller;
use crate::{
    alerts::AlertEngine,
    api::Response,
    datapath::State,
    events::{ReloadEvent, timestamp},
    policy::{Policy, alert::alerts_differ, compile::CompiledPolicy, content_hash, diff},
};

/// The policy a controller enforces.
pub(super) struct PolicyInForce {
    /// The policy file (None: the embedded default).
    pub path: Option<PathBuf>,
    pub policy: Policy,
    pub compiled: Arc<CompiledPolicy>,
    pub applied_at: SystemTime,
    /// Hash of a watched file that failed to load (reported once, not at every poll).
    bad_watch_hash: Option<String>,
}

impl PolicyInForce {
    pub fn new(path: Option<&Path>, policy: Policy, compiled: Arc<CompiledPolicy>) -> Self {
        PolicyInForce {
            path: path.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
            policy,
            compiled,
            applied_at: SystemTime::now(),
            bad_watch_hash: None,
        }
    }
}

impl Controller {
    /// Re-reads the policy (or switches to `path`) and applies it atomically, or with `dry_run`
    /// only describes the change. A policy that does not load is refused with its error and the
    /// policy in force stays untouched.
    pub(super) async fn reload(&mut self, path: Option<PathBuf>, dry_run: bool) -> Response {
        let path = path.or_else(|| self.policy.path.clone());
        let (policy, compiled) = match crate::policy::load(path.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reload refused; the policy in force is unchanged");
                return Response::Refused(format!("{e:#}"));
            }
        };
        let old = &self.policy;
        let change = diff::describe(&old.policy, &old.compiled, &policy, &compiled);
        if dry_run {
            return Response::Done(change);
        }
        let applied = match self.dp.reload(&compiled) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "reload failed before the switch; the policy in force is unchanged");
                return Response::Refused(format!("applying {}: {e}", policy.source));
            }
        };
        let compiled = Arc::new(compiled);
        self.events
            .set_policy(applied.generation, compiled.clone(), policy.hash.clone());
        // Sliding windows and cooldowns survive a reload unless the alert rules changed (where
        // they sit in the file does not count).
        if alerts_differ(&self.policy.policy.alerts, &policy.alerts) {
            self.alerts = AlertEngine::new(policy.alerts.clone(), Instant::now());
        }
        let elapsed_ms = applied.elapsed.as_secs_f64() * 1000.0;
        info!(policy = %policy.source, generation = applied.generation, hash = %policy.hash, elapsed_ms, "policy applied");
        let message = format!(
            "applied generation {} (hash {}) from {} in {elapsed_ms:.1} ms\n{change}",
            applied.generation, policy.hash, policy.source,
        );
        let event = ReloadEvent {
            ts: timestamp(SystemTime::now()),
            event: "reload".into(),
            generation: applied.generation,
            policy_hash: policy.hash.clone(),
            policy: policy.source.clone(),
            elapsed_ms,
        };
        self.policy = PolicyInForce {
            path,
            policy,
            compiled,
            applied_at: SystemTime::now(),
            bad_watch_hash: None,
        };
        self.write_state();
        self.emit(&event).await;
        Response::Done(message)
    }

    /// `--watch`: reloads when the policy file's content changes (edits, renames, and the
    /// atomic symlink swap Kubernetes does for ConfigMaps all change what the path reads).
    pub(super) async fn watch_tick(&mut self) {
        let Some(path) = self.policy.path.clone() else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let hash = content_hash(&text);
        if hash == self.policy.policy.hash || self.policy.bad_watch_hash.as_ref() == Some(&hash) {
            return;
        }
        if let Response::Refused(_) = self.reload(Some(path), false).await {
            self.policy.bad_watch_hash = Some(hash);
        }
    }

    /// After adopting pinned enforcement: if the policy in force there is not ours, switch to
    /// ours atomically, as a reload does.
    pub(super) async fn apply_over_adopted(&mut self) -> anyhow::Result<()> {
        let pinned_hash = self
            .target
            .pins
            .as_ref()
            .and_then(|p| p.read_state())
            .map(|s| s.policy_hash);
        if pinned_hash.as_deref() == Some(self.policy.policy.hash.as_str()) {
            return Ok(());
        }
        match self.reload(None, false).await {
            Response::Refused(why) => {
                anyhow::bail!("applying the policy over the adopted state: {why}")
            }
            _ => Ok(()),
        }
    }

    /// Records what is applied beside the pins (for restarts and `egress status`).
    pub(super) fn write_state(&self) {
        let Some(p) = &self.target.pins else { return };
        let policy = &self.policy.policy;
        let state = State {
            pin_dir: p.dir.display().to_string(),
            cgroup: self.target.cgroup.display().to_string(),
            ifaces: self.ifaces.clone(),
            policy: policy.source.clone(),
            policy_hash: policy.hash.clone(),
            generation: self.dp.generation(),
            applied_at: humantime::format_rfc3339_seconds(self.policy.applied_at).to_string(),
            mode: policy.mode.to_string(),
            default: policy.default.to_string(),
            controller_pid: std::process::id(),
            socket: self
                .target
                .socket
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
        };
        if let Err(e) = p.write_state(&state) {
            warn!(error = %format!("{e:#}"), "could not write the state file");
        }
    }
}
