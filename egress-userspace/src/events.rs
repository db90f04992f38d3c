//! The event stream: every JSON line egress writes (deny/audit events decoded from the
//! datapath's ring, and the controller's own `reload`, `block` and `unblock` events; alerts are
//! `crate::alerts::AlertEvent`), and the pump that drains the ring into a writer.
//!
//! Every event carries [`EventMeta`] (`schema_version`, `hostname`) and is written in the format
//! asked for ([`Format`]): egress's own JSON lines, or Elastic Common Schema documents
//! (`ecs.rs`, one [`EventLine::ecs`] per event kind). A field means one thing across kinds:
//! `rule` is the policy's deciding rule in deny, audit and dns events; the alert rule of alert,
//! block and unblock events is `alert_rule` (they keep `rule` too, as before).
//!
//! The kernel records the sender's tgid, not its executable: the pump names it from
//! `/proc/PID/exe` through an [`ExeCache`], which keeps each process's executable with its start
//! time, so an event drained after its process exited is still named, and never by a later
//! process that took the pid.

pub mod ecs;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use egress_common::{
    EVENT_AUDIT, Event, HOOK_SOCK_CREATE,
    user::{builtin_rule_name, comm_str, hook_name, protocol_name},
};
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::{
    datapath::AsyncEventRing,
    policy::compile::CompiledPolicy,
    sys::{
        clock,
        proc::{ExeCache, Procfs},
    },
};

/// The version of the event schema, in every event as `schema_version`. Raised when a field
/// changes meaning or goes away; fields are added without raising it.
pub const SCHEMA_VERSION: u32 = 1;

/// What every event carries besides its own fields: the schema it follows and the host it is
/// about.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct EventMeta {
    /// [`SCHEMA_VERSION`] (0 when read from a line written before it existed).
    #[serde(default)]
    pub schema_version: u32,
    /// This host's name (`uname -n`, read once at start).
    #[serde(default)]
    pub hostname: String,
}

impl EventMeta {
    /// The metadata of an event written now, on this host.
    pub fn current() -> EventMeta {
        EventMeta {
            schema_version: SCHEMA_VERSION,
            hostname: hostname().to_string(),
        }
    }
}

/// This host's name (the UTS namespace's, as `uname -n`), read once.
pub fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    })
}

/// How events are written (`--events-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// egress's own JSON lines (the fields documented in the README).
    #[default]
    Json,
    /// Elastic Common Schema documents, one per line (`@timestamp`, `event.*`, `process.*`,
    /// `destination.*`, `rule.name`, `host.hostname`, ...), the egress line under `egress`.
    Ecs,
}

/// An event egress writes: serialized as it is for [`Format::Json`], mapped by
/// [`EventLine::ecs`] for [`Format::Ecs`].
pub trait EventLine: Serialize {
    /// The event as an Elastic Common Schema document.
    fn ecs(&self) -> ecs::Document;
}

/// `event` as one line (newline included) in `format`.
pub fn line<T: EventLine>(event: &T, format: Format) -> serde_json::Result<Vec<u8>> {
    let mut buf = match format {
        Format::Json => serde_json::to_vec(event)?,
        Format::Ecs => serde_json::to_vec(&event.ecs())?,
    };
    buf.push(b'\n');
    Ok(buf)
}

/// One event as written to the JSON stream.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct JsonEvent {
    /// RFC 3339 wall-clock time, nanoseconds.
    pub ts: String,
    /// `"deny"`, or `"audit"` for a would-be deny in audit mode.
    pub event: String,
    #[serde(flatten, default)]
    pub meta: EventMeta,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub comm: String,
    /// The full path of the process's executable (a ` (deleted)` suffix kept as the kernel
    /// gives it); absent when it could not be read (the process was gone before the controller
    /// looked, or the event has no process: `"hook": "tc"`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exe: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// `connect4`, `connect6`, `sendmsg4` or `sendmsg6`.
    pub hook: String,
    /// `ipv4` or `ipv6`: the family of the socket.
    pub family: String,
    /// `tcp`, `udp`, or the IP protocol number.
    pub protocol: String,
    /// Destination as the process gave it.
    pub dst: String,
    pub port: u16,
    /// True when `dst` is `::ffff:a.b.c.d` and was judged as IPv4.
    pub v4_mapped: bool,
    /// For `"hook": "sock_create"`: the type of the socket refused (`raw`, `dgram`, `stream`,
    /// `seqpacket`, or its number); `dst` is then empty.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub socket_type: Option<String>,
    /// The deciding block or service, or `"default"`.
    pub rule: String,
    /// The name this cgroup learned `dst` from through the DNS proxy, when it did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host: Option<String>,
    /// When `rule` is a `[[blocklist]]`: the feed entry that holds `dst` (`203.0.113.0/24`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub feed_entry: Option<String>,
    /// That entry's label in the feed (a Spamhaus DROP id, `SBL123`), if it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub feed_label: Option<String>,
    /// The pod, container and node of the sender's cgroup, when it is a known pod's (absent
    /// otherwise).
    #[serde(flatten, default)]
    pub pod: crate::kube::PodMeta,
    /// Policy generation in force.
    pub generation: u32,
    /// Content hash of that policy (see `egress status`).
    #[serde(default)]
    pub policy_hash: String,
}

impl JsonEvent {
    /// The event `ev`, its rule named from `policy` (the policy of its generation).
    pub fn from_raw(ev: &Event, policy: &CompiledPolicy, policy_hash: &str) -> JsonEvent {
        let mut json = Self::decode(ev, policy.rule_name(ev.rule_id).to_string(), policy_hash);
        json.name_feed_entry(ev, policy);
        json
    }

    /// When a blocklist decided: the feed entry that holds the destination, and its label.
    fn name_feed_entry(&mut self, ev: &Event, policy: &CompiledPolicy) {
        if ev.hook == HOOK_SOCK_CREATE || policy.feeds.is_empty() {
            return;
        }
        if let Some((entry, label)) = policy.feed_entry(ev.rule_id, ev.dst()) {
            self.feed_entry = Some(entry);
            self.feed_label = label;
        }
    }

    fn decode(ev: &Event, rule: String, policy_hash: &str) -> JsonEvent {
        JsonEvent {
            ts: humantime::format_rfc3339_nanos(clock::wall_of(ev.ts_ns)).to_string(),
            event: if ev.action == EVENT_AUDIT {
                "audit"
            } else {
                "deny"
            }
            .into(),
            meta: EventMeta::current(),
            pid: ev.tgid,
            tid: ev.pid,
            comm: comm_str(&ev.comm),
            exe: None,
            uid: ev.uid,
            gid: ev.gid,
            cgroup_id: ev.cgroup_id,
            hook: hook_name(ev.hook).into(),
            family: if ev.family == 4 { "ipv4" } else { "ipv6" }.into(),
            protocol: protocol_name(ev.protocol),
            // A socket refused at creation has no destination yet.
            dst: if ev.hook == HOOK_SOCK_CREATE {
                String::new()
            } else {
                ev.dst().to_string()
            },
            port: ev.port,
            socket_type: (ev.hook == HOOK_SOCK_CREATE).then(|| socket_type_name(ev.sock_type)),
            v4_mapped: ev.v4_mapped != 0,
            rule,
            host: None,
            feed_entry: None,
            feed_label: None,
            pod: crate::kube::PodMeta::default(),
            policy_hash: policy_hash.to_string(),
            generation: ev.generation,
        }
    }
}

fn socket_type_name(t: u8) -> String {
    match t {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        5 => "seqpacket".into(),
        n => n.to_string(),
    }
}

/// The `"event": "reload"` line: a new policy generation is in force.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ReloadEvent {
    pub ts: String,
    /// Always `"reload"`.
    pub event: String,
    #[serde(flatten, default)]
    pub meta: EventMeta,
    pub generation: u32,
    pub policy_hash: String,
    pub policy: String,
    pub elapsed_ms: f64,
}

/// The `"event": "block"` / `"unblock"` lines: a byte-budget block set or lifted.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BlockEvent {
    pub ts: String,
    /// `"block"` or `"unblock"`.
    pub event: String,
    #[serde(flatten, default)]
    pub meta: EventMeta,
    pub key: String,
    /// The alert rule that set the block (as `alert_rule`; kept for compatibility).
    pub rule: String,
    /// The alert rule that set the block.
    #[serde(default)]
    pub alert_rule: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub until: Option<String>,
    /// The blocked process, for a process key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<u32>,
    /// Its executable, when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exe: Option<String>,
}

/// The `"event": "exception"` line: a break-glass exception granted, revoked, or expired.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ExceptionEvent {
    pub ts: String,
    /// Always `"exception"`.
    pub event: String,
    #[serde(flatten, default)]
    pub meta: EventMeta,
    /// `granted`, `revoked` or `expired`.
    pub action: String,
    pub id: u32,
    /// The destination (canonical CIDR); absent for a host exception.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dest: String,
    /// A host exception: its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A host exception: the addresses its scope resolved for it so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    /// Whom it covers: `pid:N`, `cgroup:PATH`, `user:NAME`.
    pub scope: String,
    pub reason: String,
    /// When it ends (or ended early, for `revoked`), RFC 3339.
    pub until: String,
    /// Who granted it (the control socket peer's uid) and its name.
    pub by_uid: u32,
    #[serde(default)]
    pub by_user: Option<String>,
    /// Who revoked it, for `revoked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by_uid: Option<u32>,
    /// Why it ended before `until`, for an early end (`revoked`, the process exited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// The RFC 3339 form of `t`, nanoseconds, as every event's `ts`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Where the rule names of one generation's events come from.
#[derive(Clone)]
pub enum RuleNames {
    /// The compiled policy of that generation.
    Policy(Arc<CompiledPolicy>),
    /// Its policy is not known to this controller (adopted from the pins after the policy file
    /// changed, or a generation older than any it knew): a rule is named by its id, `rule#3`,
    /// never by whatever another policy calls that id. The default and loopback keep their
    /// names, which no policy changes.
    Ids,
}

impl RuleNames {
    /// The name events give to `rule_id`.
    pub fn name(&self, rule_id: u32) -> String {
        match self {
            RuleNames::Policy(p) => p.rule_name(rule_id).to_string(),
            RuleNames::Ids => match builtin_rule_name(rule_id) {
                Some(name) => name.into(),
                None => format!("rule#{rule_id}"),
            },
        }
    }
}

/// The policy of one generation, to name the rules of its events.
struct Generation {
    names: RuleNames,
    hash: String,
}

/// The event stream: the ring buffer, and where its JSON lines go.
pub struct EventStream<W> {
    ring: AsyncEventRing,
    /// The policies of recent generations, to name the rules of events still in flight from
    /// before a reload.
    generations: BTreeMap<u32, Generation>,
    out: W,
    written: u64,
    by_rule: BTreeMap<String, u64>,
    /// The last drain stopped at a full batch: records are waiting.
    pending: bool,
    /// Names learned through the DNS proxy, for `host`.
    hosts: Option<Arc<crate::dns::grants::KernelGrants>>,
    /// The senders' executables, for `exe`.
    exes: ExeCache,
    /// This node's pods, for `namespace`, `pod`, `container`, `node`.
    pods: Option<crate::kube::Pods>,
    /// How lines are written.
    format: Format,
    /// Deny and audit events also go to the webhook (`--webhook-events deny`).
    webhook: Option<crate::webhook::DenyFeed>,
    /// Where `egress events` finds every event written, as native JSON lines whatever `format`
    /// (`run`; None: `exec`).
    feed: Option<Arc<crate::feed::Feed>>,
    /// Every deny and audit event is also tallied here (`egress learn`).
    observer: Option<Arc<std::sync::Mutex<crate::learn::Observations>>>,
}

/// Opens the events file for appending, created owner-only (mode 0600: events carry command
/// lines and destinations). An existing file keeps its mode (logrotate's `create` sets it).
pub async fn open_file(path: &Path) -> anyhow::Result<tokio::fs::File> {
    use anyhow::Context as _;
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await
        .with_context(|| format!("opening events file {}", path.display()))
}

/// Records written per [`EventStream::drain`] call: the most work the controller's loop does
/// before it looks at a command again (a reload during a deny flood waits at most one batch).
pub const DRAIN_BATCH: usize = 1024;

impl<W: AsyncWrite + Unpin> EventStream<W> {
    /// A stream whose events of `generation` are named by `names`, with `hash`.
    pub fn new(
        ring: AsyncEventRing,
        generation: u32,
        names: RuleNames,
        hash: String,
        out: W,
    ) -> Self {
        let mut stream = EventStream {
            ring,
            generations: BTreeMap::new(),
            out,
            written: 0,
            by_rule: BTreeMap::new(),
            pending: false,
            hosts: None,
            exes: ExeCache::default(),
            pods: None,
            format: Format::Json,
            webhook: None,
            feed: None,
            observer: None,
        };
        stream.set_names(generation, names, hash);
        stream
    }

    /// Waits until there is something to drain (cancel-safe: it consumes nothing). Returns at
    /// once while an earlier [`EventStream::drain`] left records behind.
    pub async fn readable(&mut self) -> std::io::Result<()> {
        if self.pending {
            return Ok(());
        }
        self.ring.readable().await
    }

    /// Writes up to [`DRAIN_BATCH`] records as JSON lines and flushes. A deny flood must not
    /// starve the controller's other work or grow an unbounded buffer, so a full batch returns and
    /// leaves the rest for the next call (see [`EventStream::readable`]).
    pub async fn drain(&mut self) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        let mut n = 0;
        self.pending = false;
        // One look at /proc per sender per batch: a flood of denies from one process reads it
        // once.
        let mut exes: HashMap<u32, Option<String>> = HashMap::new();
        let pods = self.pods.clone();
        let index = pods.as_ref().map(crate::kube::Pods::read);
        while let Some(ev) = self.ring.try_next() {
            let mut json = self.to_json(&ev);
            if let Some(index) = &index {
                json.pod = crate::kube::PodMeta::of(index, ev.cgroup_id).unwrap_or_default();
            }
            json.exe = exes
                .entry(ev.tgid)
                .or_insert_with(|| self.exes.resolve(&Procfs, ev.tgid, ev.ts_ns))
                .clone();
            if let Some(hosts) = &self.hosts
                && ev.hook != HOOK_SOCK_CREATE
            {
                let dst = ev.dst();
                let judged = match dst {
                    std::net::IpAddr::V6(v6) => {
                        v6.to_ipv4_mapped().map_or(dst, std::net::IpAddr::V4)
                    }
                    v4 => v4,
                };
                json.host = hosts.host_of(ev.cgroup_id, judged);
            }
            *self.by_rule.entry(json.rule.clone()).or_default() += 1;
            if let Some(o) = &self.observer {
                o.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record(&json);
            }
            let written = line(&json, self.format)?;
            if let Some(feed) = &self.feed {
                // The feed takes native JSON lines: the line written, unless it is ECS.
                match self.format {
                    Format::Json => feed.publish(&written[..written.len() - 1]),
                    Format::Ecs => feed.publish(&serde_json::to_vec(&json)?),
                }
            }
            buf.extend_from_slice(&written);
            if let Some(feed) = &self.webhook {
                feed.offer(json);
            }
            self.written += 1;
            n += 1;
            if n == DRAIN_BATCH {
                self.pending = true;
                break;
            }
        }
        drop(index);
        if !buf.is_empty() {
            self.out.write_all(&buf).await?;
            self.out.flush().await?;
        }
        Ok(())
    }

    /// An event as written: named by the policy of the generation that decided it. One of a
    /// generation this stream does not know (decided before the generation it started with, or
    /// more than a few reloads ago) is named by rule id with no hash: naming it from another
    /// policy would put a wrong rule and hash on it.
    fn to_json(&self, ev: &Event) -> JsonEvent {
        match self.generations.get(&ev.generation) {
            Some(g) => {
                let mut json = JsonEvent::decode(ev, g.names.name(ev.rule_id), &g.hash);
                if let RuleNames::Policy(p) = &g.names {
                    json.name_feed_entry(ev, p);
                }
                json
            }
            None => JsonEvent::decode(ev, RuleNames::Ids.name(ev.rule_id), ""),
        }
    }

    /// Takes the executables the accounting read (tgid, start time, path): a process that sent
    /// bytes and then exited right after a deny is still named.
    pub fn learn_exes<'a>(&mut self, known: impl Iterator<Item = (u32, u64, Option<&'a str>)>) {
        for (tgid, start, exe) in known {
            self.exes.learn(tgid, start, exe);
        }
    }

    /// Forgets the executables of processes that have exited (and reads again those of the
    /// live ones, which may have executed another program). Called once a second.
    pub fn prune_exes(&mut self) {
        self.exes.prune(&Procfs);
    }

    /// Where deny events find the name their destination was learned from (`host`).
    pub fn set_hosts(&mut self, hosts: Option<Arc<crate::dns::grants::KernelGrants>>) {
        self.hosts = hosts;
    }

    /// Where deny events find the pod of their cgroup (`--kubernetes`).
    pub fn set_pods(&mut self, pods: Option<crate::kube::Pods>) {
        self.pods = pods;
    }

    /// Where every line written is also published (`egress events`).
    pub fn set_feed(&mut self, feed: Option<Arc<crate::feed::Feed>>) {
        self.feed = feed;
    }

    /// Tallies every deny and audit event in `observer` too (`egress learn`).
    pub fn set_observer(
        &mut self,
        observer: Option<Arc<std::sync::Mutex<crate::learn::Observations>>>,
    ) {
        self.observer = observer;
    }

    /// Names the rules of events of a new policy generation (after a reload).
    pub fn set_policy(&mut self, generation: u32, policy: Arc<CompiledPolicy>, hash: String) {
        self.set_names(generation, RuleNames::Policy(policy), hash);
    }

    /// Names the rules of events of `generation` by `names`, with `hash`.
    pub fn set_names(&mut self, generation: u32, names: RuleNames, hash: String) {
        self.generations
            .insert(generation, Generation { names, hash });
        while self.generations.len() > 4 {
            self.generations.pop_first();
        }
    }

    /// Writes one of the controller's own events (alerts, blocks, reloads) to the same stream.
    pub async fn emit<T: EventLine>(&mut self, event: &T) -> anyhow::Result<()> {
        let line = line(event, self.format)?;
        if let Some(feed) = &self.feed {
            match self.format {
                Format::Json => feed.publish(&line[..line.len() - 1]),
                Format::Ecs => feed.publish(&serde_json::to_vec(event)?),
            }
        }
        self.out.write_all(&line).await?;
        self.out.flush().await?;
        Ok(())
    }

    /// Writes lines in `format` from now on.
    pub fn set_format(&mut self, format: Format) {
        self.format = format;
    }

    /// Also hands every deny and audit event to the webhook's deny batches.
    pub fn set_webhook(&mut self, feed: Option<crate::webhook::DenyFeed>) {
        self.webhook = feed;
    }

    /// Writes to `out` from now on (the events file reopened after a rotation); returns the old
    /// writer, flushed. Nothing is buffered between lines, so no line is split across the two.
    pub async fn replace_out(&mut self, out: W) -> std::io::Result<W> {
        self.out.flush().await?;
        Ok(std::mem::replace(&mut self.out, out))
    }

    /// Drains until the ring buffer is empty (at exit).
    pub async fn drain_all(&mut self) -> anyhow::Result<()> {
        loop {
            self.drain().await?;
            if !self.pending {
                return Ok(());
            }
        }
    }

    /// Events received so far, by deciding rule.
    pub fn by_rule(&self) -> &BTreeMap<String, u64> {
        &self.by_rule
    }

    /// Events written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn rules_of_an_unknown_policy_are_named_by_id_and_never_by_another_policy() {
        assert_eq!(RuleNames::Ids.name(egress_common::RULE_DEFAULT), "default");
        assert_eq!(
            RuleNames::Ids.name(egress_common::RULE_LOOPBACK),
            "loopback"
        );
        assert_eq!(RuleNames::Ids.name(3), "rule#3");
        let known = RuleNames::Policy(Arc::new(
            CompiledPolicy::compile(&Policy::embedded_default()).unwrap(),
        ));
        assert_eq!(known.name(1), "ping");
    }

    fn raw_event() -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[203, 0, 113, 9]);
        Event {
            ts_ns: 1,
            cgroup_id: 44,
            pid: 7721,
            tgid: 7720,
            uid: 1000,
            gid: 1001,
            rule_id: egress_common::RULE_DEFAULT,
            port: 443,
            hook: egress_common::HOOK_CONNECT4,
            family: 4,
            protocol: 6,
            addr,
            comm,
            ..Event::default()
        }
    }

    #[test]
    fn deny_events_carry_gid_and_exe_when_known_and_every_field_they_had() {
        let mut json = JsonEvent::decode(&raw_event(), "default".into(), "abc");
        let v = serde_json::to_value(&json).unwrap();
        assert_eq!(v["gid"], 1001);
        assert_eq!(v["uid"], 1000);
        assert!(v.get("exe").is_none(), "absent when unknown: {v}");
        for field in [
            "ts",
            "event",
            "pid",
            "tid",
            "comm",
            "uid",
            "gid",
            "cgroup_id",
            "hook",
            "family",
            "protocol",
            "dst",
            "port",
            "v4_mapped",
            "rule",
            "generation",
            "policy_hash",
        ] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        json.exe = Some("/usr/bin/curl".into());
        let line = serde_json::to_string(&json).unwrap();
        assert!(
            line.contains(r#""comm":"curl","exe":"/usr/bin/curl","uid":1000,"gid":1001"#),
            "{line}"
        );
        let back: JsonEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, json);
    }

    #[test]
    fn every_event_carries_its_schema_version_and_host() {
        let v =
            serde_json::to_value(JsonEvent::decode(&raw_event(), "default".into(), "abc")).unwrap();
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
        assert_eq!(v["hostname"], hostname());
        assert!(!hostname().is_empty());
        // A line written before they existed still reads.
        let old = r#"{"ts":"t","event":"deny","pid":1,"tid":1,"comm":"c","uid":0,"gid":0,"cgroup_id":1,"hook":"connect4","family":"ipv4","protocol":"tcp","dst":"192.0.2.1","port":1,"v4_mapped":false,"rule":"default","generation":1}"#;
        let back: JsonEvent = serde_json::from_str(old).unwrap();
        assert_eq!(back.meta, EventMeta::default());
    }

    #[test]
    fn lines_are_written_in_the_format_asked_for() {
        let ev = JsonEvent::decode(&raw_event(), "default".into(), "abc");
        let json = line(&ev, Format::Json).unwrap();
        assert_eq!(json.last(), Some(&b'\n'));
        let back: JsonEvent = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, ev);
        let ecs: serde_json::Value =
            serde_json::from_slice(&line(&ev, Format::Ecs).unwrap()).unwrap();
        assert_eq!(ecs["event"]["action"], "deny");
        assert_eq!(ecs["egress"], serde_json::to_value(&ev).unwrap());
    }
}
