//! What the webhook sends, and in which shape (`--webhook-format`): egress's own alert JSON
//! (`generic`, the shape it always had), Alertmanager's v2 API (`POST /api/v2/alerts`: an array
//! of alerts with `labels`, `annotations`, `startsAt` and `endsAt`), or a Slack incoming webhook
//! (`{"text": ...}`).
//!
//! The spool holds [`Outgoing`] records, rendered when they are delivered: a spooled alert is
//! sent in the format of the controller that delivers it. (A spool file of an earlier version
//! holds a bare alert and is read as one.)

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{alerts::AlertEvent, events::JsonEvent, policy::alert::AlertAction};

/// The shape of the requests (`--webhook-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// egress's alert JSON, one alert per request (as the event stream writes it); deny batches
    /// as `{"event": "denies", "events": [...], "dropped": N}`. Resolutions are not sent.
    #[default]
    Generic,
    /// Alertmanager's v2 API: point --webhook at http://alertmanager:9093/api/v2/alerts. An
    /// alert is resolved (posted again with `endsAt`) when its block is lifted or its cooldown
    /// ends.
    Alertmanager,
    /// A Slack (or Mattermost, Rocket.Chat) incoming webhook: one `text` message per alert,
    /// resolution and deny batch.
    Slack,
}

/// One thing to deliver, as it is spooled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Outgoing {
    /// An alert fired.
    Alert(FiredAlert),
    /// An alert ended: its block was lifted, or its cooldown ended.
    Resolved(Resolution),
    /// Deny and audit events, batched.
    Denies(DenyBatch),
    /// A break-glass exception granted, revoked or expired (`egress allow`).
    Exception(Box<crate::events::ExceptionEvent>),
}

/// An alert and until when it stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FiredAlert {
    pub alert: Box<AlertEvent>,
    /// RFC 3339: the end of its block, else of its cooldown (no repeat before then).
    #[serde(default)]
    pub ends_at: Option<String>,
}

/// The end of an alert, named as it was when it fired (Alertmanager matches the two by their
/// labels).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resolution {
    /// RFC 3339: when it ended.
    pub ts: String,
    pub alert_rule: String,
    pub key: String,
    pub hostname: String,
    /// `cooldown ended`, `egress unblock`, `process exited`.
    pub reason: String,
    /// When it fired, if this controller knows (not for a block adopted from the pins).
    #[serde(default)]
    pub started_at: Option<String>,
}

/// Deny and audit events gathered over a few seconds, and how many were left out since the
/// previous batch (over the rate limit or the batch size).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DenyBatch {
    pub ts: String,
    pub hostname: String,
    pub events: Vec<JsonEvent>,
    pub dropped: u64,
}

impl Outgoing {
    /// A spool file's record: an [`Outgoing`], or the bare alert an earlier version spooled.
    pub fn from_spool(body: &[u8]) -> Option<Outgoing> {
        serde_json::from_slice(body).ok().or_else(|| {
            serde_json::from_slice::<AlertEvent>(body)
                .ok()
                .map(|alert| {
                    Outgoing::Alert(FiredAlert {
                        alert: Box::new(alert),
                        ends_at: None,
                    })
                })
        })
    }

    /// The request body in `format`; None when the format does not send this (a resolution in
    /// the generic format).
    pub fn render(&self, format: Format) -> Option<Vec<u8>> {
        let json = match (format, self) {
            (Format::Generic, Outgoing::Alert(a)) => serde_json::to_vec(&a.alert),
            (Format::Generic, Outgoing::Resolved(_)) => return None,
            (Format::Generic, Outgoing::Denies(b)) => serde_json::to_vec(&GenericDenies {
                event: "denies",
                ts: &b.ts,
                hostname: &b.hostname,
                schema_version: crate::events::SCHEMA_VERSION,
                events: &b.events,
                dropped: b.dropped,
            }),
            (Format::Generic, Outgoing::Exception(e)) => serde_json::to_vec(e),
            (Format::Alertmanager, o) => serde_json::to_vec(&alertmanager(o)),
            (Format::Slack, o) => serde_json::to_vec(&SlackMessage { text: slack(o) }),
        };
        Some(json.expect("serializing to memory cannot fail"))
    }
}

#[derive(Serialize)]
struct GenericDenies<'a> {
    event: &'static str,
    ts: &'a str,
    hostname: &'a str,
    schema_version: u32,
    events: &'a [JsonEvent],
    dropped: u64,
}

/// One alert of Alertmanager's `postableAlerts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AmAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
}

/// How long a deny batch stays active in Alertmanager (it is resolved by time).
const DENY_ALERT_FOR: Duration = Duration::from_secs(5 * 60);

/// The labels that name an alert: the same when it fires and when it is resolved.
fn am_labels(alertname: &str, key: &str, hostname: &str) -> BTreeMap<String, String> {
    // A record spooled before events carried the host name is about this host.
    let hostname = if hostname.is_empty() {
        crate::events::hostname()
    } else {
        hostname
    };
    BTreeMap::from([
        ("alertname".into(), alertname.into()),
        ("key".into(), key.into()),
        ("hostname".into(), hostname.into()),
        ("source".into(), "egress".into()),
    ])
}

fn plus(ts: &str, d: Duration) -> String {
    humantime::parse_rfc3339_weak(ts)
        .map(|t| humantime::format_rfc3339_seconds(t + d).to_string())
        .unwrap_or_else(|_| ts.to_string())
}

/// The one-line summary of an exception event.
fn exception_summary(e: &crate::events::ExceptionEvent) -> String {
    format!(
        "break-glass exception {} {}: {}{}{} for {} until {} (by uid {}{}): {}",
        e.id,
        e.action,
        crate::exceptions::what(&e.dest, e.host.as_deref(), &e.addresses),
        e.port
            .as_ref()
            .map(|p| format!(" port {p}"))
            .unwrap_or_default(),
        e.protocol
            .as_ref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default(),
        e.scope,
        e.until,
        e.by_uid,
        e.by_user
            .as_ref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default(),
        e.reason
    )
}

fn alertmanager(o: &Outgoing) -> Vec<AmAlert> {
    match o {
        // Active while the exception lasts: granted, it ends at `until`; revoked or expired,
        // it is resolved now.
        Outgoing::Exception(e) => {
            let mut ann = BTreeMap::from([
                ("summary".into(), exception_summary(e)),
                ("reason".into(), e.reason.clone()),
                ("scope".into(), e.scope.clone()),
                (
                    "dest".into(),
                    crate::exceptions::what(&e.dest, e.host.as_deref(), &e.addresses),
                ),
                ("by_uid".into(), e.by_uid.to_string()),
                ("action".into(), e.action.clone()),
            ]);
            if let Some(u) = &e.by_user {
                ann.insert("by_user".into(), u.clone());
            }
            vec![AmAlert {
                labels: am_labels(
                    "EgressException",
                    &format!("exception:{}", e.id),
                    &e.meta.hostname,
                ),
                annotations: ann,
                starts_at: e.ts.clone(),
                ends_at: Some(if e.action == "granted" {
                    e.until.clone()
                } else {
                    e.ts.clone()
                }),
            }]
        }
        Outgoing::Alert(f) => {
            let a = &f.alert;
            let mut ann = BTreeMap::new();
            ann.insert("summary".into(), alert_summary(a));
            ann.insert("description".into(), alert_description(a));
            let mut put = |k: &str, v: String| {
                if !v.is_empty() {
                    ann.insert(k.to_string(), v);
                }
            };
            put("action", a.action.as_str().into());
            put("bytes_in_window", a.bytes_in_window.to_string());
            put("threshold", a.threshold.to_string());
            put("window", a.window.clone());
            put("per", a.per.clone());
            put("pid", a.pid.map(|p| p.to_string()).unwrap_or_default());
            put("comm", a.comm.clone());
            put("exe", a.exe.clone());
            put("cmdline", a.cmdline.clone());
            put("uid", a.uid.map(|u| u.to_string()).unwrap_or_default());
            put("user", a.user.clone().unwrap_or_default());
            put("cgroup_path", a.cgroup_path.clone());
            put("blocked_until", a.blocked_until.clone().unwrap_or_default());
            put(
                "top_destinations",
                a.top_destinations
                    .iter()
                    .map(|d| format!("{}:{}/{} {} B", d.dst, d.port, d.protocol, d.bytes))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            put("namespace", a.pod.namespace.clone().unwrap_or_default());
            put("pod", a.pod.pod.clone().unwrap_or_default());
            if let Some(d) = &a.dns {
                put("domain", d.domain.clone());
                put("unique_subdomains", d.unique_subdomains.to_string());
                put("dns_bytes", d.dns_bytes.to_string());
                put("entropy", format!("{:.3}", d.entropy));
                put("sample_names", d.sample_names.join(", "));
            }
            vec![AmAlert {
                labels: am_labels(&a.alert_rule_name(), &a.key, &a.meta.hostname),
                annotations: ann,
                starts_at: a.ts.clone(),
                ends_at: f.ends_at.clone(),
            }]
        }
        Outgoing::Resolved(r) => vec![AmAlert {
            labels: am_labels(&r.alert_rule, &r.key, &r.hostname),
            annotations: BTreeMap::from([(
                "summary".into(),
                format!("{} on {}: resolved ({})", r.alert_rule, r.key, r.reason),
            )]),
            starts_at: r.started_at.clone().unwrap_or_else(|| r.ts.clone()),
            ends_at: Some(r.ts.clone()),
        }],
        Outgoing::Denies(b) => {
            // One alert per sender and destination: a flood of one connect retried is one alert
            // with a count, not hundreds.
            let mut groups: BTreeMap<(String, String, String, String), (u64, &JsonEvent)> =
                BTreeMap::new();
            for e in &b.events {
                let who = e.exe.clone().unwrap_or_else(|| e.comm.clone());
                let dst = format!("{}:{}/{}", e.dst, e.port, e.protocol);
                groups
                    .entry((e.event.clone(), e.rule.clone(), who, dst))
                    .or_insert((0, e))
                    .0 += 1;
            }
            groups
                .into_iter()
                .map(|((event, rule, who, dst), (n, e))| {
                    let mut labels = am_labels(
                        if event == "audit" {
                            "EgressAudit"
                        } else {
                            "EgressDenied"
                        },
                        &format!("{who}->{dst}"),
                        &b.hostname,
                    );
                    labels.insert("rule".into(), rule.clone());
                    let mut ann = BTreeMap::from([
                        (
                            "summary".into(),
                            format!("{event}: {who} to {dst} by rule {rule} ({n} times)"),
                        ),
                        ("count".into(), n.to_string()),
                        ("pid".into(), e.pid.to_string()),
                        ("comm".into(), e.comm.clone()),
                        ("uid".into(), e.uid.to_string()),
                        ("hook".into(), e.hook.clone()),
                    ]);
                    if let Some(h) = &e.host {
                        ann.insert("host".into(), h.clone());
                    }
                    if b.dropped > 0 {
                        ann.insert("dropped_since_last_batch".into(), b.dropped.to_string());
                    }
                    AmAlert {
                        labels,
                        annotations: ann,
                        starts_at: e.ts.clone(),
                        ends_at: Some(plus(&b.ts, DENY_ALERT_FOR)),
                    }
                })
                .collect()
        }
    }
}

impl AlertEvent {
    /// The alert rule's name (`rule` in events written before `alert_rule` existed).
    pub fn alert_rule_name(&self) -> String {
        if self.alert_rule.is_empty() {
            self.rule.clone()
        } else {
            self.alert_rule.clone()
        }
    }
}

fn alert_summary(a: &AlertEvent) -> String {
    if let Some(d) = &a.dns {
        return format!(
            "{}: {} asked {} distinct names ({} bytes, entropy {:.2}) under {} in {}{}",
            a.alert_rule_name(),
            a.key,
            d.unique_subdomains,
            d.dns_bytes,
            d.entropy,
            d.domain,
            a.window,
            if a.action == AlertAction::Block {
                ", blocked"
            } else {
                ""
            }
        );
    }
    format!(
        "{}: {} sent {} bytes in {} (threshold {}){}",
        a.alert_rule_name(),
        a.key,
        a.bytes_in_window,
        a.window,
        a.threshold,
        if a.action == AlertAction::Block {
            ", blocked"
        } else {
            ""
        }
    )
}

fn alert_description(a: &AlertEvent) -> String {
    let mut s = String::new();
    if let Some(pid) = a.pid {
        let _ = write!(s, "process {} (pid {pid}", a.comm);
        if !a.exe.is_empty() {
            let _ = write!(s, ", {}", a.exe);
        }
        if let Some(u) = &a.user {
            let _ = write!(s, ", user {u}");
        } else if let Some(uid) = a.uid {
            let _ = write!(s, ", uid {uid}");
        }
        s.push(')');
    }
    if let Some(d) = a.top_destinations.first() {
        let _ = write!(s, "; most to {}:{}/{}", d.dst, d.port, d.protocol);
    }
    if let Some(until) = &a.blocked_until {
        let _ = write!(s, "; blocked until {until}");
    }
    s
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlackMessage {
    pub text: String,
}

/// Slack's mrkdwn escapes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Deny lines a Slack message lists before "and N more".
const SLACK_DENY_LINES: usize = 20;

fn slack(o: &Outgoing) -> String {
    match o {
        Outgoing::Exception(e) => format!(
            ":unlock: *egress* on `{}`: {}",
            esc(&e.meta.hostname),
            esc(&exception_summary(e))
        ),
        Outgoing::Alert(f) => {
            let a = &f.alert;
            let mut t = format!(
                ":rotating_light: *egress alert `{}`* on `{}`: {}",
                esc(&a.alert_rule_name()),
                esc(&a.meta.hostname),
                esc(&alert_summary(a))
            );
            let d = alert_description(a);
            if !d.is_empty() {
                let _ = write!(t, "\n{}", esc(&d));
            }
            t
        }
        Outgoing::Resolved(r) => format!(
            ":white_check_mark: *egress alert `{}` resolved* on `{}`: {} ({})",
            esc(&r.alert_rule),
            esc(&r.hostname),
            esc(&r.key),
            esc(&r.reason)
        ),
        Outgoing::Denies(b) => {
            let denied = b.events.iter().filter(|e| e.event != "audit").count();
            let audited = b.events.len() - denied;
            let mut t = format!(
                ":no_entry: *egress* on `{}`: {denied} connection{} denied",
                esc(&b.hostname),
                if denied == 1 { "" } else { "s" }
            );
            if audited > 0 {
                let _ = write!(t, ", {audited} audited (would be denied)");
            }
            if b.dropped > 0 {
                let _ = write!(t, ", {} more not listed (rate limit)", b.dropped);
            }
            for e in b.events.iter().take(SLACK_DENY_LINES) {
                let who = e.exe.as_deref().unwrap_or(&e.comm);
                let _ = write!(
                    t,
                    "\n• {} `{}` (pid {}) → {}:{}/{}{} by rule `{}`",
                    e.event,
                    esc(who),
                    e.pid,
                    esc(&e.dst),
                    e.port,
                    e.protocol,
                    e.host
                        .as_deref()
                        .map(|h| format!(" ({})", esc(h)))
                        .unwrap_or_default(),
                    esc(&e.rule)
                );
            }
            if b.events.len() > SLACK_DENY_LINES {
                let _ = write!(t, "\n… and {} more", b.events.len() - SLACK_DENY_LINES);
            }
            t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{alerts::TopDestination, events::EventMeta};

    pub(crate) fn alert() -> AlertEvent {
        AlertEvent {
            ts: "2026-11-26T12:00:01.5Z".into(),
            event: "alert".into(),
            meta: EventMeta {
                schema_version: 1,
                hostname: "node-1".into(),
            },
            rule: "bulk-upload".into(),
            alert_rule: "bulk-upload".into(),
            key: "process:4242".into(),
            per: "process".into(),
            bytes_in_window: 5 << 20,
            threshold: 4 << 20,
            window: "5m".into(),
            window_secs: 300.0,
            rate: 1e6,
            pid: Some(4242),
            ppid: Some(1),
            comm: "curl".into(),
            exe: "/usr/bin/curl".into(),
            cmdline: "curl -T big https://x<y>".into(),
            uid: Some(1000),
            user: Some("alice".into()),
            gid: Some(1000),
            cgroup_id: 7,
            cgroup_path: "/sys/fs/cgroup/user.slice".into(),
            pod: Default::default(),
            top_destinations: vec![TopDestination {
                dst: "203.0.113.9".into(),
                port: 443,
                protocol: "tcp".into(),
                bytes: 5 << 20,
            }],
            first_seen: "2026-11-26T12:00:00Z".into(),
            last_seen: "2026-11-26T12:00:01Z".into(),
            action: AlertAction::Block,
            blocked_until: Some("2026-11-26T12:10:01Z".into()),
            blocked_pids: vec![],
            dns: None,
        }
    }

    fn fired() -> Outgoing {
        Outgoing::Alert(FiredAlert {
            alert: Box::new(alert()),
            ends_at: Some("2026-11-26T12:10:01Z".into()),
        })
    }

    fn resolved() -> Outgoing {
        Outgoing::Resolved(Resolution {
            ts: "2026-11-26T12:04:00Z".into(),
            alert_rule: "bulk-upload".into(),
            key: "process:4242".into(),
            hostname: "node-1".into(),
            reason: "egress unblock".into(),
            started_at: Some("2026-11-26T12:00:01.5Z".into()),
        })
    }

    fn deny(pid: u32, port: u16) -> JsonEvent {
        let line = format!(
            r#"{{"ts":"2026-11-26T12:00:02Z","event":"deny","pid":{pid},"tid":{pid},"comm":"nc","exe":"/usr/bin/nc","uid":0,"gid":0,"cgroup_id":1,"hook":"connect4","family":"ipv4","protocol":"tcp","dst":"198.51.100.7","port":{port},"v4_mapped":false,"rule":"default","generation":1,"policy_hash":"ab"}}"#
        );
        serde_json::from_str(&line).unwrap()
    }

    fn denies() -> Outgoing {
        Outgoing::Denies(DenyBatch {
            ts: "2026-11-26T12:00:03Z".into(),
            hostname: "node-1".into(),
            events: vec![deny(9, 25), deny(9, 25), deny(9, 26)],
            dropped: 4,
        })
    }

    #[test]
    fn generic_is_the_alert_as_it_always_was_and_sends_no_resolutions() {
        let body = fired().render(Format::Generic).unwrap();
        let back: AlertEvent = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, alert());
        assert_eq!(resolved().render(Format::Generic), None);
        let v: serde_json::Value =
            serde_json::from_slice(&denies().render(Format::Generic).unwrap()).unwrap();
        assert_eq!(v["event"], "denies");
        assert_eq!(v["events"].as_array().unwrap().len(), 3);
        assert_eq!(v["dropped"], 4);
    }

    #[test]
    fn alertmanager_gets_string_labels_and_a_resolution_with_the_same_labels() {
        let fire: Vec<AmAlert> =
            serde_json::from_slice(&fired().render(Format::Alertmanager).unwrap()).unwrap();
        let end: Vec<AmAlert> =
            serde_json::from_slice(&resolved().render(Format::Alertmanager).unwrap()).unwrap();
        assert_eq!(fire.len(), 1);
        assert_eq!(fire[0].labels["alertname"], "bulk-upload");
        assert_eq!(fire[0].labels, end[0].labels);
        assert_eq!(fire[0].annotations["exe"], "/usr/bin/curl");
        assert_eq!(fire[0].ends_at.as_deref(), Some("2026-11-26T12:10:01Z"));
        for t in [&fire[0].starts_at, &end[0].starts_at] {
            humantime::parse_rfc3339(t).unwrap();
        }
        assert_eq!(end[0].ends_at.as_deref(), Some("2026-11-26T12:04:00Z"));
        assert_eq!(end[0].starts_at, fire[0].starts_at);
    }

    #[test]
    fn a_dns_alert_says_its_domain_and_counts_in_every_format() {
        let mut a = alert();
        a.key = "dns:process:4242:tunnel.test".into();
        a.dns = Some(crate::alerts::DnsEvidence {
            kind: "dns".into(),
            domain: "tunnel.test".into(),
            unique_subdomains: 300,
            dns_bytes: 19_000,
            dns_queries: 310,
            entropy: 4.4,
            window_s: 60.0,
            reasons: vec!["dns_unique_subdomains".into()],
            threshold_unique_subdomains: Some(300),
            threshold_entropy: None,
            sample_names: vec!["mfrg.1.tunnel.test".into()],
        });
        let fired = Outgoing::Alert(FiredAlert {
            alert: Box::new(a.clone()),
            ends_at: None,
        });
        let back: AlertEvent =
            serde_json::from_slice(&fired.render(Format::Generic).unwrap()).unwrap();
        assert_eq!(back, a);
        let am: Vec<AmAlert> =
            serde_json::from_slice(&fired.render(Format::Alertmanager).unwrap()).unwrap();
        assert_eq!(am[0].annotations["domain"], "tunnel.test");
        assert_eq!(am[0].annotations["unique_subdomains"], "300");
        assert!(am[0].annotations["summary"].contains("300 distinct names"));
        let m: SlackMessage =
            serde_json::from_slice(&fired.render(Format::Slack).unwrap()).unwrap();
        assert!(m.text.contains("under tunnel.test"), "{}", m.text);
    }

    #[test]
    fn alertmanager_gets_one_alert_per_sender_and_destination_of_a_deny_batch() {
        let am: Vec<AmAlert> =
            serde_json::from_slice(&denies().render(Format::Alertmanager).unwrap()).unwrap();
        assert_eq!(am.len(), 2);
        assert_eq!(am[0].labels["alertname"], "EgressDenied");
        assert_eq!(am[0].annotations["count"], "2");
        assert_eq!(am[0].ends_at.as_deref(), Some("2026-11-26T12:05:03Z"));
    }

    #[test]
    fn slack_gets_escaped_text() {
        let m: SlackMessage =
            serde_json::from_slice(&fired().render(Format::Slack).unwrap()).unwrap();
        assert!(m.text.contains("bulk-upload") && m.text.contains("node-1"));
        assert!(m.text.contains("blocked"), "{}", m.text);
        let m: SlackMessage =
            serde_json::from_slice(&resolved().render(Format::Slack).unwrap()).unwrap();
        assert!(m.text.contains("resolved"));
        let m: SlackMessage =
            serde_json::from_slice(&denies().render(Format::Slack).unwrap()).unwrap();
        assert!(m.text.contains("3 connections denied") && m.text.contains("4 more"));
        assert!(esc("a<b>&").eq("a&lt;b&gt;&amp;"));
    }

    #[test]
    fn the_spool_reads_records_and_the_bare_alerts_of_earlier_versions() {
        let rec = serde_json::to_vec(&resolved()).unwrap();
        assert_eq!(Outgoing::from_spool(&rec), Some(resolved()));
        let legacy = serde_json::to_vec(&alert()).unwrap();
        match Outgoing::from_spool(&legacy) {
            Some(Outgoing::Alert(f)) => assert_eq!(*f.alert, alert()),
            other => panic!("{other:?}"),
        }
        assert_eq!(Outgoing::from_spool(b"garbage"), None);
    }

    fn exception_event(action: &str) -> crate::events::ExceptionEvent {
        crate::events::ExceptionEvent {
            ts: "2026-11-27T12:00:00Z".into(),
            event: "exception".into(),
            meta: EventMeta {
                schema_version: 1,
                hostname: "node-1".into(),
            },
            action: action.into(),
            id: 3,
            dest: "203.0.113.7/32".into(),
            host: None,
            addresses: Vec::new(),
            port: Some("443".into()),
            protocol: Some("tcp".into()),
            scope: "cgroup:/sys/fs/cgroup/app".into(),
            reason: "INC-1 <vendor>".into(),
            until: "2026-11-27T12:15:00Z".into(),
            by_uid: 1000,
            by_user: Some("alice".into()),
            revoked_by_uid: None,
            ended: None,
        }
    }

    /// An exception reaches every format: the event itself (generic), an alert active until
    /// the exception ends and resolved when it is revoked (Alertmanager), a line (Slack).
    #[test]
    fn exceptions_render_in_every_format() {
        let granted = Outgoing::Exception(Box::new(exception_event("granted")));
        let generic: serde_json::Value =
            serde_json::from_slice(&granted.render(Format::Generic).unwrap()).unwrap();
        assert_eq!(generic["event"], "exception");
        assert_eq!(generic["by_uid"], 1000);
        assert_eq!(generic["reason"], "INC-1 <vendor>");
        let am: Vec<AmAlert> =
            serde_json::from_slice(&granted.render(Format::Alertmanager).unwrap()).unwrap();
        assert_eq!(am[0].labels["alertname"], "EgressException");
        assert_eq!(am[0].labels["key"], "exception:3");
        assert_eq!(am[0].ends_at.as_deref(), Some("2026-11-27T12:15:00Z"));
        assert_eq!(am[0].annotations["by_user"], "alice");
        let revoked = Outgoing::Exception(Box::new(exception_event("revoked")));
        let am: Vec<AmAlert> =
            serde_json::from_slice(&revoked.render(Format::Alertmanager).unwrap()).unwrap();
        assert_eq!(
            am[0].ends_at.as_deref(),
            Some("2026-11-27T12:00:00Z"),
            "resolved now"
        );
        let slack: serde_json::Value =
            serde_json::from_slice(&granted.render(Format::Slack).unwrap()).unwrap();
        let text = slack["text"].as_str().unwrap();
        assert!(
            text.contains("exception 3 granted") && text.contains("&lt;vendor&gt;"),
            "{text}"
        );
        // Spooled and read back as it was.
        let spooled = serde_json::to_vec(&granted).unwrap();
        assert_eq!(Outgoing::from_spool(&spooled), Some(granted));
    }
}
