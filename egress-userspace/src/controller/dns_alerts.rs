//! The DNS alerts (tunnel and covert-channel detection) in the controller: the DNS proxy counts
//! and blocks by itself (`dns::tunnel`), at once; here their firings and the ends of their blocks
//! go through the alert pipeline every tick, as the byte alerts' do: the `"alert"` event (with
//! the DNS evidence), the `"block"` and `"unblock"` events, the webhook and its resolutions, the
//! alert counts of the metrics and `egress status`; and `egress unblock dns:...` lifts a block.

use std::time::{Instant, SystemTime};

use tracing::warn;

use super::Controller;
use crate::{
    alerts::{AlertEvent, DnsEvidence},
    api::Response,
    dns::tunnel::{DnsBlockKey, DnsFiring, LiftedBlock, Subject},
    events::{BlockEvent, timestamp},
    policy::alert::{AlertAction, HumanDuration},
    report::BlockInfo,
    sys::{
        nss,
        proc::{self, ProcInfo, ProcSource as _, Procfs},
    },
    webhook::format::{FiredAlert, Outgoing},
};

/// The `"alert"` event of a DNS alert; `info` describes the process that asked.
fn alert_event(f: &DnsFiring, wall: SystemTime, info: ProcInfo) -> AlertEvent {
    let pid = (f.asker.tgid != 0).then_some(f.asker.tgid);
    AlertEvent {
        ts: timestamp(wall),
        event: "alert".into(),
        meta: crate::events::EventMeta::current(),
        rule: f.alert_rule.clone(),
        alert_rule: f.alert_rule.clone(),
        key: f.key.text(),
        per: f.per.as_str().into(),
        bytes_in_window: f.dns_bytes,
        threshold: f.thresholds.bytes.unwrap_or(0),
        window: HumanDuration(f.window).to_string(),
        window_secs: f.window.as_secs_f64(),
        rate: f.dns_bytes as f64 / f.window.as_secs_f64(),
        pid,
        ppid: info.ppid,
        comm: info.comm,
        exe: info.exe.unwrap_or_default(),
        cmdline: info.cmdline,
        uid: info.uid,
        user: None,
        gid: info.gid,
        cgroup_id: f.asker.cgroup_id,
        cgroup_path: String::new(),
        pod: crate::kube::PodMeta::default(),
        top_destinations: Vec::new(),
        first_seen: timestamp(f.first_seen),
        last_seen: timestamp(f.last_seen),
        action: f.action,
        blocked_until: f.block_for.map(|d| timestamp(wall + d)),
        blocked_pids: Vec::new(),
        dns: Some(DnsEvidence {
            kind: "dns".into(),
            domain: f.key.domain.clone(),
            unique_subdomains: f.unique_subdomains,
            dns_bytes: f.dns_bytes,
            dns_queries: f.queries,
            entropy: f.entropy,
            window_s: f.window.as_secs_f64(),
            reasons: f.reasons.iter().map(|r| r.to_string()).collect(),
            threshold_unique_subdomains: f.thresholds.unique_subdomains,
            threshold_entropy: f.thresholds.entropy(),
            sample_names: f.samples.clone(),
        }),
    }
}

/// The `"block"`/`"unblock"` event of a DNS alert's block.
fn block_event(
    event: &str,
    key: &DnsBlockKey,
    rule: &str,
    reason: &str,
    until: Option<String>,
    exe: Option<String>,
) -> BlockEvent {
    BlockEvent {
        ts: timestamp(SystemTime::now()),
        event: event.into(),
        meta: crate::events::EventMeta::current(),
        key: key.text(),
        rule: rule.into(),
        alert_rule: rule.into(),
        reason: reason.into(),
        until,
        pid: match key.subject {
            Subject::Process(p) => Some(p),
            Subject::Cgroup(_) => None,
        },
        exe,
    }
}

impl Controller {
    /// Delivers one DNS alert (its block, if any, is already in force in the proxy).
    pub(super) async fn fire_dns(&mut self, f: DnsFiring) {
        let wall = SystemTime::now();
        let info = if f.asker.tgid == 0 {
            ProcInfo::default()
        } else {
            Procfs.info(f.asker.tgid).unwrap_or_default()
        };
        let mut event = alert_event(&f, wall, info);
        event.cgroup_path = self.cgroup_path_of(event.pid);
        if let Some(pods) = &self.pods {
            event.pod = pods.meta(event.cgroup_id).unwrap_or_default();
        }
        event.user = event.uid.and_then(nss::user_name);
        *self.alerts_by_rule.entry(event.rule.clone()).or_default() += 1;
        warn!(rule = %event.rule, key = %event.key, unique_subdomains = f.unique_subdomains,
            dns_bytes = f.dns_bytes, entropy = f.entropy, action = ?event.action, "DNS tunnel alert");
        self.emit(&event).await;
        if let Some(w) = &self.webhook {
            let ends_at = event
                .blocked_until
                .clone()
                .or_else(|| Some(timestamp(wall + self.cooldown_of(f.alert_index)?)));
            w.send(&Outgoing::Alert(FiredAlert {
                alert: Box::new(event.clone()),
                ends_at,
            }));
            if event.action == AlertAction::Alert
                && w.sends_resolutions()
                && let Some(c) = self.cooldown_of(f.alert_index)
            {
                self.open_alerts.insert(
                    (event.alert_rule.clone(), event.key.clone()),
                    (event.ts.clone(), Instant::now() + c),
                );
            }
        }
        if event.action == AlertAction::Block {
            let exe = (!event.exe.is_empty()).then(|| event.exe.clone());
            let ev = block_event(
                "block",
                &f.key,
                &f.alert_rule,
                "DNS tunnel suspected",
                event.blocked_until.clone(),
                exe,
            );
            self.emit(&ev).await;
        }
    }

    fn cooldown_of(&self, alert_index: usize) -> Option<std::time::Duration> {
        self.policy
            .policy
            .alerts
            .get(alert_index)
            .map(|a| a.cooldown)
    }

    /// Reports a DNS alert's block that ended, and resolves its alert for the webhook.
    pub(super) async fn report_dns_unblock(&mut self, l: LiftedBlock) {
        let exe = match l.key.subject {
            Subject::Process(p) => proc::exe_of(p),
            Subject::Cgroup(_) => None,
        };
        let ev = block_event("unblock", &l.key, &l.alert_rule, l.reason, None, exe);
        self.emit(&ev).await;
        self.resolve_alert(
            &l.alert_rule,
            &l.key.text(),
            l.reason,
            Some(timestamp(l.fired_at)),
        );
    }

    /// `egress unblock dns:...`: lifts a DNS alert's block; its event is written at once.
    pub(super) async fn unblock_dns(&mut self, key: DnsBlockKey) -> Response {
        let Some(n) = &self.names else {
            return Response::Refused(format!(
                "no DNS alert block on {}: the DNS proxy is not running",
                key.text()
            ));
        };
        if !n.lift_dns_block(&key) {
            return Response::Refused(format!("no DNS alert block on {}", key.text()));
        }
        self.deliver_names().await;
        Response::Done(format!("unblocked {}", key.text()))
    }

    /// The DNS alerts' blocks in force, as `egress status` lists blocks.
    pub(super) fn dns_block_report(&self) -> Vec<BlockInfo> {
        self.names.as_ref().map_or_else(Vec::new, |n| {
            n.dns_blocks()
                .into_iter()
                .map(|b| BlockInfo {
                    key: b.key.text(),
                    rule: b.alert_rule,
                    until: humantime::format_rfc3339_seconds(b.until).to_string(),
                    descendants: 0,
                    process_exited: false,
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        dns::tunnel::Asker,
        policy::alert::{AlertPer, DnsThresholds},
    };

    #[test]
    fn a_dns_alert_event_has_the_documented_fields() {
        let f = DnsFiring {
            alert_index: 0,
            alert_rule: "dns-tunnel".into(),
            key: DnsBlockKey {
                subject: Subject::Process(4242),
                domain: "example.test".into(),
            },
            per: AlertPer::Process,
            asker: Asker {
                tgid: 4242,
                cgroup_id: 77,
            },
            unique_subdomains: 301,
            dns_bytes: 20_000,
            queries: 320,
            entropy: 4.3,
            window: Duration::from_secs(60),
            samples: vec!["mfrgg.1.t.example.test".into()],
            reasons: vec!["dns_unique_subdomains"],
            thresholds: DnsThresholds {
                unique_subdomains: Some(300),
                bytes: Some(65536),
                entropy_millibits: None,
                min_queries: 20,
            },
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            action: AlertAction::Block,
            block_for: Some(Duration::from_secs(600)),
        };
        let ev = alert_event(&f, SystemTime::UNIX_EPOCH, ProcInfo::default());
        let json = serde_json::to_value(&ev).unwrap();
        for (k, v) in [
            ("event", serde_json::json!("alert")),
            ("alert_rule", serde_json::json!("dns-tunnel")),
            ("key", serde_json::json!("dns:process:4242:example.test")),
            ("kind", serde_json::json!("dns")),
            ("domain", serde_json::json!("example.test")),
            ("unique_subdomains", serde_json::json!(301)),
            ("dns_bytes", serde_json::json!(20_000)),
            ("entropy", serde_json::json!(4.3)),
            ("window_s", serde_json::json!(60.0)),
            ("pid", serde_json::json!(4242)),
            ("action", serde_json::json!("block")),
            ("threshold", serde_json::json!(65536)),
            (
                "sample_names",
                serde_json::json!(["mfrgg.1.t.example.test"]),
            ),
            ("reasons", serde_json::json!(["dns_unique_subdomains"])),
        ] {
            assert_eq!(json[k], v, "{k} in {json}");
        }
        assert!(json["blocked_until"].is_string());
        // ECS: the domain as the destination, DNS as the protocol, the last name asked.
        let ecs = serde_json::to_value(crate::events::EventLine::ecs(&ev)).unwrap();
        assert_eq!(ecs["event"]["kind"], "alert");
        assert_eq!(ecs["destination"]["domain"], "example.test");
        assert_eq!(ecs["network"]["protocol"], "dns");
        assert_eq!(ecs["network"]["bytes"], 20_000);
        assert_eq!(ecs["dns"]["question"]["name"], "mfrgg.1.t.example.test");
        assert!(ecs["dns"]["question"].get("type").is_none());
        assert_eq!(ecs["rule"]["name"], "dns-tunnel");
        assert!(
            ecs["message"]
                .as_str()
                .unwrap()
                .contains("301 distinct names"),
            "{ecs}"
        );
        // Read back as the CLI and the tests read events.
        let back: AlertEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back.dns.unwrap().domain, "example.test");
        // A byte alert carries none of it.
        let mut byte = ev.clone();
        byte.dns = None;
        let json = serde_json::to_value(&byte).unwrap();
        assert!(
            json.get("domain").is_none() && json.get("kind").is_none(),
            "{json}"
        );
    }
}
