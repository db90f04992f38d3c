//! The policy in force and how it changes: atomic reloads (`egress reload`, SIGHUP, `--watch`),
//! and the state recorded beside the pins for restarts and `egress status`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime},
};

use tracing::{info, warn};

use super::{
    Controller,
    adopt::{self, Adopted, Loaded, Origin},
};
use crate::{
    alerts::AlertEngine,
    api::{PolicyText, Response},
    datapath::State,
    events::{ReloadEvent, RuleNames, timestamp},
    policy::{Policy, alert::alerts_differ, compile::CompiledPolicy, diff},
    report::ReloadReport,
};

/// A reload that went (or with `dry_run` would go) through.
pub(super) struct Outcome {
    /// Whether enforcement changes (a new hash alone is no change).
    pub changed: bool,
    /// For people: what was applied, and what changes.
    pub message: String,
}

/// The policy a controller enforces.
pub(super) struct PolicyInForce {
    /// Where it comes from: what a reload without `--policy` re-reads.
    pub origin: Origin,
    pub policy: Policy,
    pub compiled: Arc<CompiledPolicy>,
    pub applied_at: SystemTime,
    /// Why its rules are not known (None: they are). Set when the controller adopted pinned
    /// enforcement whose policy it could not read back: `policy` is then a stand-in with the
    /// kernel's mode and default and no rules (see `adopt.rs`).
    pub unknown: Option<String>,
    /// Hash of a watched file that failed to load (reported once, not at every poll).
    bad_watch_hash: Option<String>,
}

impl PolicyInForce {
    /// A policy loaded from its source, applied now.
    pub fn new(loaded: Loaded) -> Self {
        PolicyInForce {
            origin: loaded.origin,
            policy: loaded.policy,
            compiled: Arc::new(loaded.compiled),
            applied_at: SystemTime::now(),
            unknown: None,
            bad_watch_hash: None,
        }
    }

    /// The policy of adopted pinned enforcement, applied when the record says.
    pub fn adopted(a: Adopted) -> Self {
        let applied_at = a
            .applied_at
            .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
            .unwrap_or_else(SystemTime::now);
        PolicyInForce {
            origin: a.origin,
            policy: a.policy,
            compiled: Arc::new(a.compiled),
            applied_at,
            unknown: a.unknown,
            bad_watch_hash: None,
        }
    }

    /// How the events of its generation name their rules.
    pub fn rule_names(&self) -> RuleNames {
        match self.unknown {
            None => RuleNames::Policy(self.compiled.clone()),
            Some(_) => RuleNames::Ids,
        }
    }
}

impl Controller {
    /// Re-reads the policy (or switches to `path`) and applies it atomically, or with `dry_run`
    /// only describes the change. A policy that does not load is refused with its error and the
    /// policy in force stays untouched. The service manager hears RELOADING=1 before and READY=1
    /// (with the new STATUS=) after, whichever way it went (SIGHUP, `egress reload`, `--watch`).
    ///
    /// With `detail`, a reload that went (or would go) through is answered with
    /// [`Response::Reload`], which says whether enforcement changes; else with `Done`.
    pub(super) async fn reload(
        &mut self,
        path: Option<PathBuf>,
        dry_run: bool,
        detail: bool,
    ) -> Response {
        let answer = |r: Result<Outcome, String>| match r {
            Ok(o) if detail => Response::Reload(ReloadReport {
                dry_run,
                changed: Some(o.changed),
                message: o.message,
            }),
            Ok(o) => Response::Done(o.message),
            Err(why) => Response::Refused(why),
        };
        if dry_run {
            return answer(self.load_and_apply(path, true).await);
        }
        self.notifier.reloading();
        let response = answer(self.load_and_apply(path, false).await);
        match &response {
            Response::Done(_) | Response::Reload(_) => {
                self.last_reload = super::LastReload {
                    successful: true,
                    success_at: SystemTime::now(),
                };
            }
            _ => self.last_reload.successful = false,
        }
        self.notifier.ready(&self.status_line());
        response
    }

    async fn load_and_apply(
        &mut self,
        path: Option<PathBuf>,
        dry_run: bool,
    ) -> Result<Outcome, String> {
        let path = match (path, &self.policy.origin) {
            (Some(p), _) => Some(p),
            (None, Origin::File(p)) => Some(p.clone()),
            (None, Origin::Embedded) => None,
            // "The policy" would then be the embedded default: never implicitly.
            (None, Origin::Unrecorded) => {
                let why = "the policy in force was adopted with no record of its file: name one with --policy";
                warn!("reload refused: {why}");
                return Err(why.into());
            }
        };
        match Loaded::load(path.as_deref()) {
            Ok(loaded) => self.apply(loaded, dry_run).await,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reload refused; the policy in force is unchanged");
                Err(format!("{e:#}"))
            }
        }
    }

    /// Applies `new` atomically (or with `dry_run` only describes the change). A switch to
    /// another file, or to a weaker mode or default, is logged at WARN naming both policies.
    pub(super) async fn apply(&mut self, new: Loaded, dry_run: bool) -> Result<Outcome, String> {
        let Loaded {
            origin,
            policy,
            compiled,
        } = new;
        let old = &self.policy;
        let mut change = diff::describe(&old.policy, &old.compiled, &policy, &compiled);
        let changed = old.unknown.is_some() || change != diff::NO_CHANGE;
        if let Some(why) = &old.unknown {
            change = format!(
                "the rules in force are not known to this controller ({why}); compared with none:\n{change}"
            );
        }
        if dry_run {
            return Ok(Outcome {
                changed,
                message: change,
            });
        }
        // The pods of the moment join the tables written (pod selectors); the policy in force
        // keeps the tables as compiled.
        let mut compiled = compiled;
        let with_pods = self.with_pods(&compiled.scopes);
        let written_pods = (!compiled.scopes.pod_scopes.is_empty()).then(|| with_pods.clone());
        let as_compiled = std::mem::replace(&mut compiled.scopes, with_pods);
        let reloaded = self.dp.reload(&compiled);
        compiled.scopes = as_compiled;
        let applied = match reloaded {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "reload failed before the switch; the policy in force is unchanged");
                return Err(format!("applying {}: {e}", policy.source));
            }
        };
        adopt::warn_switch(&(&self.policy.policy).into(), &(&policy).into());
        self.pod_scopes_applied = written_pods;
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
        let mut message = format!(
            "applied generation {} (hash {}) from {} in {elapsed_ms:.1} ms\n{change}",
            applied.generation, policy.hash, policy.source,
        );
        // Rejected feed lines and feeds kept at their last good copy: said to whoever reloaded.
        for w in policy
            .warnings
            .iter()
            .filter(|w| w.contains(": blocklist "))
        {
            message.push_str(&format!("\nwarning: {w}"));
        }
        if let crate::datapath::V4Lookup::Trie { why } = &applied.v4_lookup {
            warn!(policy = %policy.source, "IPv4 destinations are looked up in the LPM trie: {why}");
            message.push_str(&format!(
                "\nwarning: IPv4 destinations are looked up in the LPM trie (slower at large sizes): {why}"
            ));
        }
        let event = ReloadEvent {
            ts: timestamp(SystemTime::now()),
            event: "reload".into(),
            meta: crate::events::EventMeta::current(),
            generation: applied.generation,
            policy_hash: policy.hash.clone(),
            policy: policy.source.clone(),
            elapsed_ms,
        };
        self.policy = PolicyInForce {
            origin,
            policy,
            compiled,
            applied_at: SystemTime::now(),
            unknown: None,
            bad_watch_hash: None,
        };
        if let Err(e) = self.follow_names().await {
            warn!(error = %format!("{e:#}"), "the DNS proxy could not follow the new policy");
        }
        self.follow_feeds();
        self.write_state();
        self.emit(&event).await;
        Ok(Outcome { changed, message })
    }

    /// The text of the policy in force, for `egress explain` without `--policy`: its files as
    /// they read now, refused when they no longer hash to the policy in force (edited since it
    /// was applied) or when its rules are not known.
    pub(super) fn policy_text(&self) -> Response {
        let p = &self.policy;
        if let Some(why) = &p.unknown {
            return Response::Refused(format!(
                "the rules in force are not known to this controller ({why}): give --policy"
            ));
        }
        let files = match &p.origin {
            Origin::Embedded => vec![crate::policy::Fragment {
                file: crate::policy::DEFAULT_POLICY_NAME.into(),
                text: crate::policy::DEFAULT_POLICY.into(),
            }],
            Origin::File(path) => match crate::policy::fragments::read(path) {
                Ok(files) => files,
                Err(e) => {
                    return Response::Refused(format!(
                        "the policy in force cannot be read back: {e}"
                    ));
                }
            },
            Origin::Unrecorded => {
                return Response::Refused(
                    "the policy in force was adopted with no record of its file: give --policy"
                        .into(),
                );
            }
        };
        match crate::policy::fragments_hash(&files) {
            Ok(hash) if hash == p.policy.hash => Response::Policy(PolicyText {
                source: p.policy.source.clone(),
                hash,
                files,
                feed_cache: super::feeds::store().cache,
            }),
            Ok(hash) => Response::Refused(format!(
                "{} changed since it was applied (hash {} in force, {hash} now): `egress reload` applies it, or give --policy",
                p.policy.source, p.policy.hash
            )),
            Err(e) => Response::Refused(format!(
                "{} changed since it was applied and no longer loads ({e}): give --policy",
                p.policy.source
            )),
        }
    }

    /// `--watch`: reloads when the policy file's content changes (edits, renames, and the
    /// atomic symlink swap Kubernetes does for ConfigMaps all change what the path reads).
    pub(super) async fn watch_tick(&mut self) {
        let Some(path) = self.policy.origin.file().map(Path::to_path_buf) else {
            return;
        };
        // A file, or a policy directory's fragments (one added, removed or edited).
        let Ok(hash) = crate::policy::fragments::read(&path)
            .map_err(|_| ())
            .and_then(|files| crate::policy::fragments_hash(&files).map_err(|_| ()))
        else {
            return;
        };
        if hash == self.policy.policy.hash || self.policy.bad_watch_hash.as_ref() == Some(&hash) {
            return;
        }
        if let Response::Refused(_) = self.reload(Some(path), false, false).await {
            self.policy.bad_watch_hash = Some(hash);
        }
    }

    /// After adopting pinned enforcement: switches to `requested` (the `--policy` given) unless
    /// it is the policy in force (same file, same hash).
    pub(super) async fn apply_over_adopted(&mut self, requested: Loaded) -> anyhow::Result<()> {
        let p = &self.policy;
        if p.unknown.is_none()
            && p.origin == requested.origin
            && p.policy.hash == requested.policy.hash
            && p.policy.feeds_hash == requested.policy.feeds_hash
        {
            return Ok(());
        }
        match self.apply(requested, false).await {
            Err(why) => anyhow::bail!("applying the policy over the adopted state: {why}"),
            Ok(_) => Ok(()),
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
            policy_path: self.policy.origin.file().map(Path::to_path_buf),
            policy_hash: policy.hash.clone(),
            feeds_hash: policy.feeds_hash.clone(),
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
