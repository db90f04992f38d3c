//! One tick (every 250 ms): the kernel's flow counters become per-process totals, the alert
//! rules see the new bytes (firing alerts and setting blocks), blocks expire, and a fresh report
//! is published for the control socket and the metrics.

use std::{
    cell::OnceCell,
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime},
};

use egress_common::{FlowKey, FlowValue};
use tracing::{error, info, warn};

use super::Controller;
use crate::{
    alerts::{AlertKey, Firing, FlowVerdict},
    events::timestamp,
    policy::{RuleKind, alert::AlertAction},
    report::StatsReport,
    sys::{
        iface, nss,
        proc::{self, ProcSource as _, Procfs},
    },
    webhook::format::{FiredAlert, Outgoing, Resolution},
};

/// Ticks (of 250 ms) between two looks at the interfaces.
const IFACE_POLL_TICKS: u32 = 4;

/// Ticks between two counts of the bounded maps' entries for the metrics (a walk of each map's
/// keys, up to a few hundred thousand system calls when they are full).
const MAP_FILL_TICKS: u32 = 20;

/// Ticks between two prunings of the event stream's executables (of processes that exited).
const EXE_PRUNE_TICKS: u32 = 4;

impl Controller {
    /// A tick whose failure is logged: accounting and alerting must never take enforcement down.
    pub(super) async fn tick(&mut self) {
        if let Err(e) = self.try_tick().await {
            error!(error = %format!("{e:#}"), "accounting tick failed");
        }
        self.expire_exceptions().await;
    }

    async fn try_tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let deltas = self.account(now)?;
        if !deltas.is_empty() {
            for firing in self.observe(&deltas, now, wall) {
                self.fire(firing).await?;
            }
        }
        self.expire_blocks(now).await?;
        self.expire_open_alerts(now);
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(EXE_PRUNE_TICKS) {
            self.events.prune_exes();
        }
        self.names_tick(self.ticks).await;
        self.follow_interfaces();
        self.publish(wall)
    }

    /// Folds the flow counters into the per-process totals, deletes the counters that are fully
    /// counted, and returns what changed since the last tick.
    fn account(&mut self, now: Instant) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let flows = self.dp.flows()?;
        let dp = &self.dp;
        // One walk of the process-name map (`PROC_COMMS`) per tick at most, and only when needed.
        let owners: OnceCell<HashMap<u32, String>> = OnceCell::new();
        let owner_comm = |tgid: u32| owners.get_or_init(|| dp.owner_comms()).get(&tgid).cloned();
        let outcome = self.acct.tick(&flows, now, &Procfs, &owner_comm);
        self.dp.remove_flows(&outcome.prune);
        self.events.learn_exes(self.acct.identities());
        if let Some(pods) = &self.pods {
            self.pod_acct.add(&pods.read(), &outcome.deltas);
        }
        Ok(outcome.deltas)
    }

    /// Runs the alert rules over new bytes.
    fn observe(
        &mut self,
        deltas: &[(FlowKey, FlowValue)],
        now: Instant,
        wall: SystemTime,
    ) -> Vec<Firing> {
        if self.alerts.is_empty() {
            return Vec::new();
        }
        let compiled = &self.policy.compiled;
        let acct = &self.acct;
        let verdict = |k: &FlowKey| {
            let e = compiled.evaluate(k.dst(), k.port, k.protocol);
            let kind = compiled
                .rule_kinds
                .get(e.rule_id as usize)
                .copied()
                .flatten();
            FlowVerdict {
                rule: compiled.rule_name(e.rule_id).to_string(),
                approved_by_service: e.allow && kind == Some(RuleKind::Service),
            }
        };
        let info = |tgid: u32| {
            let i = acct.info(tgid);
            if i.comm.is_empty() {
                Procfs.info(tgid).unwrap_or_default()
            } else {
                i
            }
        };
        self.alerts.observe(deltas, now, wall, &verdict, &info)
    }

    /// Delivers one alert: sets its block (if it has one), writes the event, sends the webhook.
    async fn fire(&mut self, mut f: Firing) -> anyhow::Result<()> {
        f.event.cgroup_path = self.cgroup_path_of(f.event.pid);
        if let Some(pods) = &self.pods {
            f.event.pod = pods.meta(f.event.cgroup_id).unwrap_or_default();
        }
        f.event.user = f.event.uid.and_then(nss::user_name);
        *self.alerts_by_rule.entry(f.event.rule.clone()).or_default() += 1;
        let mut blocked = Vec::new();
        if let Some(dur) = f.block_for {
            blocked = self.set_block(&f.key, &f.event.rule, f.alert_index, dur, &f.event.ts);
            if matches!(f.key, AlertKey::Executable(_)) {
                f.event.blocked_pids = blocked.iter().filter_map(AlertKey::tgid).collect();
            }
            if blocked.is_empty() {
                // The alert still goes out, saying what happened; enforcement of everything
                // else goes on.
                warn!(key = %f.event.key, "byte budget exceeded but not blocked: alerting only");
                f.event.action = AlertAction::Alert;
                f.event.blocked_until = None;
            }
        }
        warn!(rule = %f.event.rule, key = %f.event.key, bytes = f.event.bytes_in_window, action = ?f.event.action, "high-volume transfer alert");
        self.emit(&f.event).await;
        if let Some(w) = &self.webhook {
            let cooldown = self
                .policy
                .policy
                .alerts
                .get(f.alert_index)
                .map(|a| a.cooldown);
            let ends_at = f
                .event
                .blocked_until
                .clone()
                .or_else(|| cooldown.map(|c| timestamp(SystemTime::now() + c)));
            w.send(&Outgoing::Alert(FiredAlert {
                alert: Box::new(f.event.clone()),
                ends_at,
            }));
            // A block resolves when it is lifted; an alert alone when its cooldown ends.
            if f.event.action == AlertAction::Alert
                && w.sends_resolutions()
                && let Some(c) = cooldown
            {
                self.open_alerts.insert(
                    (f.event.alert_rule.clone(), f.event.key.clone()),
                    (f.event.ts.clone(), Instant::now() + c),
                );
            }
        }
        if f.event.action == AlertAction::Block {
            let exe = (!f.event.exe.is_empty()).then(|| f.event.exe.clone());
            for key in &blocked {
                // The alert's process is known; the others of an executable run the same file.
                let exe = match (&f.key, key.tgid() == f.event.pid) {
                    (AlertKey::Executable(name), _) => name.path().map(str::to_string),
                    (_, true) => exe.clone(),
                    _ => None,
                };
                self.report_block(key, &f.event.rule, f.event.blocked_until.clone(), exe)
                    .await;
            }
        }
        Ok(())
    }

    /// Resolves the alerts whose cooldown ended (for the webhook).
    fn expire_open_alerts(&mut self, now: Instant) {
        let ended: Vec<(String, String)> = self
            .open_alerts
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            if let Some((fired_at, _)) = self.open_alerts.remove(&k) {
                self.resolve_alert(&k.0, &k.1, "cooldown ended", Some(fired_at));
            }
        }
    }

    /// Tells the webhook that the alert `rule` on `key` ended (its block lifted, or its
    /// cooldown over).
    pub(super) fn resolve_alert(
        &self,
        rule: &str,
        key: &str,
        reason: &str,
        fired_at: Option<String>,
    ) {
        if let Some(w) = &self.webhook
            && w.sends_resolutions()
        {
            w.send(&Outgoing::Resolved(Resolution {
                ts: timestamp(SystemTime::now()),
                alert_rule: rule.to_string(),
                key: key.to_string(),
                hostname: crate::events::hostname().to_string(),
                reason: reason.to_string(),
                started_at: fired_at,
            }));
        }
    }

    /// The cgroup2 path of a process (alert evidence), under the root found at start.
    pub(super) fn cgroup_path_of(&self, pid: Option<u32>) -> String {
        pid.and_then(proc::cgroup_of)
            .map(|rel| format!("{}{rel}", self.target.root.display()))
            .unwrap_or_default()
    }

    /// Without `--iface`, TC goes on every interface that is up (but loopback and stacked
    /// devices) as it appears: a VPN, tun or veth made after the start is counted and
    /// second-lined too. Looked at once a second; an interface that went away is forgotten (the
    /// kernel detached its program), so that it is attached again if it comes back.
    fn follow_interfaces(&mut self) {
        self.ticks_since_ifaces += 1;
        if !self.follow_ifaces || self.ticks_since_ifaces < IFACE_POLL_TICKS {
            return;
        }
        self.ticks_since_ifaces = 0;
        let Ok(now) = iface::default_ifaces() else {
            return;
        };
        self.ifaces.retain(|i| now.contains(i));
        let new: Vec<String> = now
            .into_iter()
            .filter(|i| !self.ifaces.contains(i))
            .collect();
        if new.is_empty() {
            return;
        }
        for i in new {
            match self.dp.attach_tc(std::slice::from_ref(&i)) {
                Ok(()) => {
                    info!(iface = %i, "TC egress accounting attached to a new interface");
                    self.ifaces.push(i);
                }
                // Retried at the next look: it may be going away again, or not up yet.
                Err(e) => warn!(iface = %i, error = %e, "could not attach TC to a new interface"),
            }
        }
        self.ifaces.sort();
        self.write_state();
    }

    /// The metrics' view of the controller: policy, last reload, map fill (recounted every
    /// [`MAP_FILL_TICKS`]), links.
    fn controller_metrics(&mut self) -> crate::metrics::ControllerMetrics {
        if self.map_fill.is_empty() || self.ticks.is_multiple_of(MAP_FILL_TICKS) {
            self.map_fill = self.dp.map_fill();
        }
        let links = match &self.target.pins {
            Some(p) => p
                .link_statuses()
                .into_iter()
                .map(|l| (l.name, l.attached))
                .collect(),
            // Not pinned: what this controller attached (dropped only with it).
            None => {
                let a = self.attachment();
                a.hooks
                    .into_iter()
                    .chain(a.tc.ifaces.iter().map(|i| format!("{}-{i}", a.tc.program)))
                    .map(|l| (l, true))
                    .collect()
            }
        };
        let p = &self.policy.policy;
        crate::metrics::ControllerMetrics {
            generation: self.dp.generation(),
            policy_hash: p.hash.clone(),
            mode: p.mode.to_string(),
            last_reload_successful: self.last_reload.successful,
            last_reload_success_secs: self
                .last_reload
                .success_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            maps: self.map_fill.clone(),
            links,
        }
    }

    /// Publishes a fresh report to the control socket and the metrics.
    fn publish(&mut self, wall: SystemTime) -> anyhow::Result<()> {
        let counters = self.dp.stats()?;
        let mut processes = self.acct.snapshot();
        let mut pods = Vec::new();
        if let Some(p) = &self.pods {
            let index = p.read();
            for proc in &mut processes {
                if proc.cgroup_id != 0 {
                    proc.pod = crate::kube::PodMeta::of(&index, proc.cgroup_id).unwrap_or_default();
                }
            }
            pods = self.pod_acct.snapshot(&index);
        }
        let report = StatsReport {
            generated_at: timestamp(wall),
            policy: self.policy.policy.source.clone(),
            mode: self.policy.policy.mode.to_string(),
            processes,
            pods,
            counters,
            denies_by_rule: self.events.by_rule().clone(),
            alerts_by_rule: self.alerts_by_rule.clone(),
            blocks: {
                let mut b = self.blocks.report();
                b.extend(self.dns_block_report());
                b
            },
            dns: self
                .names
                .as_ref()
                .map(|n| n.status(counters.dns_steered, false)),
        };
        if self.metrics.is_some() {
            let ctl = self.controller_metrics();
            if let Some(m) = &mut self.metrics {
                m.publish(&report, &ctl);
            }
        }
        self.stats.send_replace(Arc::new(report));
        Ok(())
    }
}
