//! Elastic Common Schema documents (`--events-format ecs`): each event kind mapped to the ECS
//! fields a SIEM indexes (`@timestamp`, `event.*`, `process.*`, `user.*`, `destination.*`,
//! `network.*`, `rule.*`, `host.hostname`), with the event as egress writes it under `egress`, so
//! nothing is lost. The mapping is documented field by field in docs/EVENTS.md.
//!
//! Typed, as every report of egress is: a field ECS does not know cannot be written by mistake.

use serde::Serialize;

use super::{BlockEvent, EventLine, EventMeta, ExceptionEvent, JsonEvent, ReloadEvent};
use crate::{alerts::AlertEvent, kube::PodMeta, policy::alert::AlertAction};

/// The ECS version the documents follow.
pub const ECS_VERSION: &str = "8.11.0";

/// One ECS document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Document {
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    /// One line a person can read.
    pub message: String,
    pub ecs: Ecs,
    pub event: EcsEvent,
    pub host: Host,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Group>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestrator: Option<Orchestrator>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// The event as egress writes it in its own format (custom fields, under egress's name).
    pub egress: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ecs {
    pub version: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct EcsEvent {
    /// `event` or `alert`.
    pub kind: &'static str,
    pub category: Vec<&'static str>,
    #[serde(rename = "type")]
    pub type_: Vec<&'static str>,
    /// egress's `event` (`deny`, `audit`, `alert`, `block`, `unblock`, `reload`, `dns`).
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    pub module: &'static str,
    pub dataset: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Host {
    pub hostname: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Process {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<Thread>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Thread {
    pub id: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Parent {
    pub pid: u32,
}

/// ECS ids are keywords: strings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Destination {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Network {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// `ipv4` or `ipv6`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rule {
    pub name: String,
    /// The policy's content hash (deny, audit and reload events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ruleset: Option<String>,
    /// The policy generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Dns {
    pub question: DnsQuestion,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DnsQuestion {
    pub name: String,
    #[serde(rename = "type", skip_serializing_if = "String::is_empty")]
    pub type_: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Orchestrator {
    #[serde(rename = "type")]
    pub type_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Resource {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Container {
    pub name: String,
}

impl Document {
    /// A document for `original` (kept under `egress`), of ECS kind `kind` and egress event
    /// `action`, the other field sets empty.
    pub fn new<T: Serialize>(
        original: &T,
        ts: &str,
        meta: &EventMeta,
        kind: &'static str,
        action: &str,
    ) -> Document {
        Document {
            timestamp: ts.to_string(),
            message: String::new(),
            ecs: Ecs {
                version: ECS_VERSION,
            },
            event: EcsEvent {
                kind,
                action: action.to_string(),
                module: "egress",
                dataset: "egress.events",
                ..EcsEvent::default()
            },
            host: Host {
                hostname: if meta.hostname.is_empty() {
                    super::hostname().to_string()
                } else {
                    meta.hostname.clone()
                },
            },
            process: None,
            user: None,
            group: None,
            destination: None,
            network: None,
            rule: None,
            dns: None,
            orchestrator: None,
            container: None,
            egress: serde_json::to_value(original).unwrap_or_default(),
        }
    }

    fn categorize(
        mut self,
        category: &[&'static str],
        type_: &[&'static str],
        outcome: Option<&'static str>,
    ) -> Document {
        self.event.category = category.to_vec();
        self.event.type_ = type_.to_vec();
        self.event.outcome = outcome;
        self
    }

    /// The pod and container of the event's cgroup, when known.
    pub fn with_pod(mut self, pod: &PodMeta) -> Document {
        if let Some(name) = &pod.pod {
            self.orchestrator = Some(Orchestrator {
                type_: "kubernetes",
                namespace: pod.namespace.clone(),
                resource: Some(Resource {
                    type_: "pod",
                    name: name.clone(),
                }),
            });
        }
        self.container = pod.container.clone().map(|name| Container { name });
        self
    }
}

/// A process's name or path: None when empty.
fn some(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// `pid` and what is known of the process behind it; None without a process.
pub fn process(
    pid: Option<u32>,
    comm: &str,
    exe: Option<&str>,
    cmdline: Option<&str>,
) -> Option<Process> {
    let pid = pid.filter(|p| *p != 0)?;
    Some(Process {
        pid: Some(pid),
        name: some(comm),
        executable: exe.and_then(some),
        command_line: cmdline.and_then(some),
        thread: None,
        parent: None,
    })
}

/// The user of uid `uid`.
pub fn user(uid: u32, name: Option<&str>) -> User {
    User {
        id: uid.to_string(),
        name: name.map(str::to_string),
    }
}

impl EventLine for JsonEvent {
    fn ecs(&self) -> Document {
        let deny = self.event != "audit";
        let mut d = Document::new(self, &self.ts, &self.meta, "event", &self.event).categorize(
            &["network"],
            if deny {
                &["connection", "denied"]
            } else {
                &["connection", "allowed"]
            },
            Some(if deny { "failure" } else { "success" }),
        );
        let target = if self.dst.is_empty() {
            format!("a {} socket", self.socket_type.as_deref().unwrap_or("new"))
        } else {
            format!("{}:{} ({})", self.dst, self.port, self.protocol)
        };
        d.message = format!(
            "{} {} (pid {}) to {target} by rule {}{}",
            if deny { "denied" } else { "audit: would deny" },
            if self.comm.is_empty() {
                "-"
            } else {
                &self.comm
            },
            self.pid,
            self.rule,
            self.feed_entry
                .as_ref()
                .map_or(String::new(), |e| format!(" (feed entry {e})"))
        );
        d.process = process(Some(self.pid), &self.comm, self.exe.as_deref(), None).map(|mut p| {
            p.thread = Some(Thread { id: self.tid });
            p
        });
        if self.pid != 0 {
            d.user = Some(user(self.uid, None));
            d.group = Some(Group {
                id: self.gid.to_string(),
            });
        }
        if !self.dst.is_empty() {
            d.destination = Some(Destination {
                ip: Some(self.dst.clone()),
                port: Some(self.port),
                domain: self.host.clone(),
            });
        }
        d.network = Some(Network {
            transport: Some(self.protocol.clone()),
            type_: Some(self.family.clone()),
            ..Network::default()
        });
        d.rule = Some(Rule {
            name: self.rule.clone(),
            ruleset: some(&self.policy_hash),
            version: Some(self.generation.to_string()),
        });
        d.with_pod(&self.pod)
    }
}

impl EventLine for AlertEvent {
    fn ecs(&self) -> Document {
        let blocked = self.action == AlertAction::Block;
        let mut d = Document::new(self, &self.ts, &self.meta, "alert", &self.event).categorize(
            &["network"],
            if blocked {
                &["info", "denied"]
            } else {
                &["info"]
            },
            None,
        );
        d.message = match &self.dns {
            Some(dns) => format!(
                "{} distinct names, {} bytes of names, entropy {:.2} under {} in {} from {}: DNS alert {}{}",
                dns.unique_subdomains,
                dns.dns_bytes,
                dns.entropy,
                dns.domain,
                self.window,
                self.key,
                self.alert_rule,
                if blocked { ", blocked" } else { "" }
            ),
            None => format!(
                "{} bytes in {} from {} (threshold {}): alert {}{}",
                self.bytes_in_window,
                self.window,
                self.key,
                self.threshold,
                self.alert_rule,
                if blocked { ", blocked" } else { "" }
            ),
        };
        d.event.start = Some(self.first_seen.clone());
        d.event.end = Some(self.last_seen.clone());
        d.process =
            process(self.pid, &self.comm, Some(&self.exe), Some(&self.cmdline)).map(|mut p| {
                p.parent = self.ppid.map(|pid| Parent { pid });
                p
            });
        d.user = self.uid.map(|u| user(u, self.user.as_deref()));
        d.group = self.gid.map(|g| Group { id: g.to_string() });
        if let Some(top) = self.top_destinations.first() {
            d.destination = Some(Destination {
                ip: Some(top.dst.clone()),
                port: Some(top.port),
                domain: None,
            });
        }
        d.network = Some(Network {
            bytes: Some(self.bytes_in_window),
            ..Network::default()
        });
        if let Some(dns) = &self.dns {
            // The registered domain as the destination, the last name asked as the question.
            d.destination = Some(Destination {
                ip: None,
                port: None,
                domain: Some(dns.domain.clone()),
            });
            d.network = Some(Network {
                protocol: Some("dns".into()),
                bytes: Some(dns.dns_bytes),
                ..Network::default()
            });
            if let Some(name) = dns.sample_names.last() {
                d.dns = Some(Dns {
                    question: DnsQuestion {
                        name: name.clone(),
                        type_: String::new(),
                    },
                });
            }
        }
        d.rule = Some(Rule {
            name: self.alert_rule.clone(),
            ruleset: None,
            version: None,
        });
        d.with_pod(&self.pod)
    }
}

impl EventLine for ExceptionEvent {
    fn ecs(&self) -> Document {
        let start = self.action == "granted";
        let mut d = Document::new(self, &self.ts, &self.meta, "event", "exception").categorize(
            &["network", "configuration"],
            if start {
                &["allowed", "start"]
            } else {
                &["end"]
            },
            None,
        );
        d.message = format!(
            "break-glass exception {} {}: {} for {} ({}), until {}",
            self.id,
            self.action,
            crate::exceptions::what(&self.dest, self.host.as_deref(), &self.addresses),
            self.scope,
            self.reason,
            self.until
        );
        d.event.reason = Some(self.reason.clone());
        d.event.end = Some(self.until.clone());
        d
    }
}

impl EventLine for BlockEvent {
    fn ecs(&self) -> Document {
        let block = self.event == "block";
        let mut d = Document::new(self, &self.ts, &self.meta, "event", &self.event).categorize(
            &["network"],
            if block { &["start"] } else { &["end"] },
            None,
        );
        d.message = format!(
            "{} {} (alert {}): {}",
            if block { "blocked" } else { "unblocked" },
            self.key,
            self.alert_rule,
            self.reason
        );
        d.event.reason = Some(self.reason.clone());
        if block {
            d.event.end = self.until.clone();
        }
        d.process = process(self.pid, "", self.exe.as_deref(), None);
        d.rule = Some(Rule {
            name: self.alert_rule.clone(),
            ruleset: None,
            version: None,
        });
        d
    }
}

impl EventLine for ReloadEvent {
    fn ecs(&self) -> Document {
        let mut d = Document::new(self, &self.ts, &self.meta, "event", &self.event).categorize(
            &["configuration"],
            &["change"],
            Some("success"),
        );
        d.message = format!(
            "policy {} in force: generation {}, hash {}",
            self.policy, self.generation, self.policy_hash
        );
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny() -> JsonEvent {
        serde_json::from_str(
            r#"{"ts":"2026-11-26T12:19:54.624942292Z","event":"deny","schema_version":1,"hostname":"node-1","pid":7720,"tid":7721,"comm":"curl","exe":"/usr/bin/curl","uid":1000,"gid":1001,"cgroup_id":44,"hook":"connect4","family":"ipv4","protocol":"tcp","dst":"203.0.113.9","port":443,"v4_mapped":false,"rule":"known-bad","host":"bad.example","namespace":"shop","pod":"web-1","container":"app","generation":3,"policy_hash":"ab12"}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_deny_maps_to_the_ecs_fields_siems_index() {
        let d = serde_json::to_value(deny().ecs()).unwrap();
        assert_eq!(d["@timestamp"], "2026-11-26T12:19:54.624942292Z");
        assert_eq!(d["ecs"]["version"], ECS_VERSION);
        assert_eq!(d["event"]["kind"], "event");
        assert_eq!(d["event"]["category"], serde_json::json!(["network"]));
        assert_eq!(
            d["event"]["type"],
            serde_json::json!(["connection", "denied"])
        );
        assert_eq!(d["event"]["action"], "deny");
        assert_eq!(d["event"]["outcome"], "failure");
        assert_eq!(d["process"]["pid"], 7720);
        assert_eq!(d["process"]["thread"]["id"], 7721);
        assert_eq!(d["process"]["name"], "curl");
        assert_eq!(d["process"]["executable"], "/usr/bin/curl");
        assert_eq!(d["user"]["id"], "1000", "ECS ids are keywords");
        assert_eq!(d["group"]["id"], "1001");
        assert_eq!(d["destination"]["ip"], "203.0.113.9");
        assert_eq!(d["destination"]["port"], 443);
        assert_eq!(d["destination"]["domain"], "bad.example");
        assert_eq!(d["network"]["transport"], "tcp");
        assert_eq!(d["network"]["type"], "ipv4");
        assert_eq!(d["rule"]["name"], "known-bad");
        assert_eq!(d["rule"]["ruleset"], "ab12");
        assert_eq!(d["rule"]["version"], "3");
        assert_eq!(d["host"]["hostname"], "node-1");
        assert_eq!(d["orchestrator"]["namespace"], "shop");
        assert_eq!(d["orchestrator"]["resource"]["name"], "web-1");
        assert_eq!(d["container"]["name"], "app");
        assert_eq!(d["egress"]["cgroup_id"], 44, "every egress field is kept");
    }

    #[test]
    fn an_audit_is_an_allowed_connection_and_a_tc_drop_has_no_process() {
        let mut e = deny();
        e.event = "audit".into();
        let d = serde_json::to_value(e.ecs()).unwrap();
        assert_eq!(
            d["event"]["type"],
            serde_json::json!(["connection", "allowed"])
        );
        assert_eq!(d["event"]["outcome"], "success");
        let mut e = deny();
        e.pid = 0;
        e.hook = "tc".into();
        let d = serde_json::to_value(e.ecs()).unwrap();
        assert!(d.get("process").is_none() && d.get("user").is_none(), "{d}");
    }

    #[test]
    fn alerts_and_blocks_name_their_alert_rule() {
        let b = BlockEvent {
            ts: "2026-11-26T12:00:00Z".into(),
            event: "block".into(),
            meta: EventMeta::current(),
            key: "process:9".into(),
            rule: "budget".into(),
            alert_rule: "budget".into(),
            reason: "over budget".into(),
            until: Some("2026-11-26T12:10:00Z".into()),
            pid: Some(9),
            exe: Some("/usr/bin/rsync".into()),
        };
        let d = serde_json::to_value(b.ecs()).unwrap();
        assert_eq!(d["rule"]["name"], "budget");
        assert_eq!(d["event"]["type"], serde_json::json!(["start"]));
        assert_eq!(d["event"]["end"], "2026-11-26T12:10:00Z");
        assert_eq!(d["process"]["executable"], "/usr/bin/rsync");
        let r = ReloadEvent {
            ts: "2026-11-26T12:00:00Z".into(),
            event: "reload".into(),
            meta: EventMeta::current(),
            generation: 2,
            policy_hash: "ff".into(),
            policy: "/etc/egress/policy.toml".into(),
            elapsed_ms: 1.0,
        };
        let d = serde_json::to_value(r.ecs()).unwrap();
        assert_eq!(d["event"]["category"], serde_json::json!(["configuration"]));
        assert!(d.get("rule").is_none());
    }
}
