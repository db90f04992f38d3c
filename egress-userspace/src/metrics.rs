//! Prometheus metrics on `--metrics ADDR` (`GET /metrics`, OpenMetrics 1.0 text under its own
//! content type; names follow Prometheus' naming guide: units and `_total`), and the probes
//! `GET /healthz` (liveness) and `GET /readyz` (readiness: attached and the policy applied), built with
//! prometheus-client from the controller's latest [`StatsReport`]: the controller hands each
//! report to an [`Exporter`], which folds it into stable series and renders the text served. Label cardinality is bounded:
//! the top processes and destinations by bytes get their own series, the rest is summed under
//! `pid="other"`. The DNS proxy's series (`egress_dns_*`) are always there, zero while the policy
//! uses no names, so that dashboards and alert rules find them; they restart from zero when the
//! proxy does (a reload that drops names and brings them back, a controller restart), which
//! Prometheus' `rate()` takes as a counter reset.

use std::net::SocketAddr;

use anyhow::Context as _;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use tokio::sync::watch;

use crate::report::StatsReport;

/// Series per metric before the rest is folded into "other".
pub const TOP_PROCESSES: usize = 20;
pub const TOP_DESTINATIONS: usize = 50;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcLabels {
    pid: String,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestLabels {
    pid: String,
    comm: String,
    dst: String,
    port: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
}

/// Registers the DNS proxy's series (see the module documentation).
fn register_dns(reg: &mut Registry, report: &StatsReport) {
    let d = report.dns.clone().unwrap_or_default();
    let p = d.proxy.unwrap_or_default();
    let k = d.sink.unwrap_or_default();
    let t = d.tunnel.unwrap_or_default();
    let queries = Family::<TransportLabels, Counter>::default();
    for (transport, n) in [("udp", p.queries_udp), ("tcp", p.queries_tcp)] {
        queries
            .get_or_create(&TransportLabels {
                transport: transport.into(),
            })
            .inc_by(n);
    }
    let refused = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in [
        ("blocked", p.blocked),
        ("blocked_target", p.blocked_target),
        ("unlisted", p.refused_unlisted),
        ("dns_alert", p.refused_tunnel),
    ] {
        refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    let limits = Family::<LimitLabels, Counter>::default();
    for (limit, n) in [
        ("in_flight", p.limit_in_flight),
        ("tcp_clients", p.limit_tcp_clients),
        ("addresses", p.limit_addresses),
        ("grant_map_full", k.full),
        ("dns_alert_keys", t.keys_evicted),
        ("dns_alert_names", t.names_evicted),
    ] {
        limits
            .get_or_create(&LimitLabels {
                limit: limit.into(),
            })
            .inc_by(n);
    }
    let live = Gauge::<i64>::default();
    live.set(i64::try_from(d.grants_live).unwrap_or(i64::MAX));
    reg.register(
        "dns_queries",
        "DNS queries the proxy received, by transport",
        queries,
    );
    reg.register(
        "dns_refused",
        "DNS queries the policy refused (answered NXDOMAIN), by reason: a block covers the name, a block covers a CNAME target, nothing covers it under unlisted = \"refuse\", or a DNS alert's block covers the asker and the domain",
        refused,
    );
    reg.register(
        "dns_relayed",
        "DNS answers relayed from an upstream",
        counter(p.relayed),
    );
    reg.register(
        "dns_grants",
        "DNS answers whose addresses were granted to the asking cgroup",
        counter(p.grants),
    );
    reg.register(
        "dns_granted_addresses",
        "Addresses written into the kernel grant map",
        counter(k.written),
    );
    reg.register(
        "dns_grant_failures",
        "DNS answers whose grant could not be written (answered SERVFAIL)",
        counter(p.grant_failures),
    );
    reg.register(
        "dns_upstream_failures",
        "DNS queries no upstream answered in time (answered SERVFAIL)",
        counter(p.upstream_failures),
    );
    reg.register("dns_limits", "DNS proxy limits hit, by limit", limits);
    reg.register(
        "dns_grants_live",
        "Unexpired grants in the kernel grant map (counted every few seconds)",
        live,
    );
    reg.register(
        "dns_steered",
        "DNS queries of enforced sockets the kernel steered to the proxy",
        counter(report.counters.dns_steered),
    );
}

/// What the controller knows besides the stats report: the policy in force, how the last
/// reload went, how full the bounded maps are and which links are attached.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControllerMetrics {
    pub generation: u32,
    pub policy_hash: String,
    pub mode: String,
    pub last_reload_successful: bool,
    /// Seconds since the epoch of the last successful apply (the start counts).
    pub last_reload_success_secs: f64,
    /// Bounded maps: name, entries, capacity (empty until first counted).
    pub maps: Vec<crate::datapath::MapFill>,
    /// Links: name (program, and interface for TC), attached.
    pub links: Vec<(String, bool)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    verdict: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    control_protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    hash: String,
    generation: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    link: String,
}

fn counter(n: u64) -> Counter {
    let c = Counter::<u64>::default();
    c.inc_by(n);
    c
}

fn gauge(n: u64) -> Gauge {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(n).unwrap_or(i64::MAX));
    g
}

/// The deprecated names of the previous release, same values (see the README's metrics table):
/// dashboards have one release to move to the new names.
const DEPRECATED: &str = "DEPRECATED, removed in the next release: use";

/// The metrics text (OpenMetrics 1.0) for one report, its folded series and the controller's
/// state.
pub fn render(report: &StatsReport, series: &MetricSeries, ctl: &ControllerMetrics) -> String {
    let mut reg = Registry::with_prefix("egress");
    let proc_bytes = Family::<ProcLabels, Counter>::default();
    let proc_packets = Family::<ProcLabels, Counter>::default();
    let proc_rate = Family::<ProcLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let dest_bytes = Family::<DestLabels, Counter>::default();
    let rule_events = Family::<RuleLabels, Counter>::default();
    let denies = Family::<RuleLabels, Counter>::default();
    let decisions = Family::<DecisionLabels, Counter>::default();
    let alerts = Family::<RuleLabels, Counter>::default();

    for (pid, comm, bytes, packets, rate) in &series.procs {
        let labels = ProcLabels {
            pid: pid.clone(),
            comm: comm.clone(),
        };
        proc_bytes.get_or_create(&labels).inc_by(*bytes);
        proc_packets.get_or_create(&labels).inc_by(*packets);
        proc_rate.get_or_create(&labels).set(*rate);
    }
    for ((pid, comm, dst, port, protocol), bytes) in &series.dests {
        let labels = DestLabels {
            pid: pid.clone(),
            comm: comm.clone(),
            dst: dst.clone(),
            port: port.clone(),
            protocol: protocol.clone(),
        };
        dest_bytes.get_or_create(&labels).inc_by(*bytes);
    }
    for (rule, n) in &report.denies_by_rule {
        let labels = RuleLabels { rule: rule.clone() };
        rule_events.get_or_create(&labels).inc_by(*n);
        denies.get_or_create(&labels).inc_by(*n);
    }
    let c = &report.counters;
    // The kernel counts the cgroup hooks' verdicts (connect, sendmsg, sock_create, setsockopt)
    // together, and TC's refusals apart; TC counts no "allow" (that would be every packet).
    for (verdict, hook, n) in [
        ("allow", "cgroup", c.allowed),
        ("deny", "cgroup", c.denied),
        ("audit", "cgroup", c.audited),
        ("deny", "tc", c.tc_dropped),
        ("audit", "tc", c.tc_audited),
    ] {
        decisions
            .get_or_create(&DecisionLabels {
                verdict: verdict.into(),
                hook: hook.into(),
            })
            .inc_by(n);
    }
    for (rule, n) in &report.alerts_by_rule {
        alerts
            .get_or_create(&RuleLabels { rule: rule.clone() })
            .inc_by(*n);
    }

    reg.register(
        "build",
        "The egress binary: version, and the control socket's protocol version",
        prometheus_client::metrics::info::Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").into(),
            control_protocol: crate::api::PROTOCOL_VERSION.to_string(),
        }),
    );
    reg.register(
        "policy",
        "The policy in force: content hash, generation (1 at the first load, +1 per reload) and mode",
        prometheus_client::metrics::info::Info::new(PolicyLabels {
            hash: ctl.policy_hash.clone(),
            generation: ctl.generation.to_string(),
            mode: ctl.mode.clone(),
        }),
    );
    reg.register(
        "config_last_reload_successful",
        "Whether the last reload applied its policy (1), or was refused and the previous policy stays (0)",
        gauge(u64::from(ctl.last_reload_successful)),
    );
    let success = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    success.set(ctl.last_reload_success_secs);
    reg.register_with_unit(
        "config_last_reload_success_timestamp",
        "When a policy was last applied successfully (at start, or by a reload), since the epoch",
        Unit::Seconds,
        success,
    );
    let map_entries = Family::<MapLabels, Gauge>::default();
    let map_capacity = Family::<MapLabels, Gauge>::default();
    for m in &ctl.maps {
        let labels = MapLabels { map: m.map.into() };
        map_entries.get_or_create(&labels).set(m.entries as i64);
        map_capacity
            .get_or_create(&labels)
            .set(i64::from(m.capacity));
    }
    reg.register(
        "map_entries",
        "Entries in each bounded kernel map (flows, owners, blocks, block_tree, grants), counted every few seconds",
        map_entries,
    );
    reg.register(
        "map_max_entries",
        "Capacity of each bounded kernel map: when entries reach it, see egress_flow_map_full_packets_total, egress_owners_full_total, egress_block_tree_full_total, egress_dns_limits_total{limit=\"grant_map_full\"}",
        map_capacity,
    );
    let links = Family::<LinkLabels, Gauge>::default();
    for (link, attached) in &ctl.links {
        links
            .get_or_create(&LinkLabels { link: link.clone() })
            .set(i64::from(*attached));
    }
    reg.register(
        "link_attached",
        "Each link of the datapath (cgroup hooks, fork tracker, TC per interface): 1 while attached",
        links,
    );

    reg.register_with_unit(
        "process",
        "Bytes sent per process (wire bytes)",
        Unit::Bytes,
        proc_bytes,
    );
    reg.register("process_packets", "Packets sent per process", proc_packets);
    reg.register_with_unit(
        "destination",
        "Bytes sent per process and destination (wire bytes)",
        Unit::Bytes,
        dest_bytes,
    );
    reg.register(
        "decisions",
        "Policy verdicts by verdict (allow, deny, audit) and hook: cgroup (connect, sendmsg, sock_create and setsockopt, counted together by the kernel) or tc (unattributed packets to blocked destinations; no allow counted)",
        decisions,
    );
    reg.register(
        "rule_events",
        "Deny and audit events received, by deciding rule (events lost to a full ring are in egress_events_lost_total, and counted in egress_decisions_total)",
        rule_events,
    );
    reg.register(
        "alerts",
        "High-volume transfer alerts raised, by alert rule",
        alerts,
    );
    reg.register(
        "budget_dropped_packets",
        "Packets dropped because their process is over a byte budget",
        counter(c.budget_dropped),
    );
    reg.register(
        "events_lost",
        "Events dropped because the ring buffer was full",
        counter(c.events_lost),
    );
    reg.register(
        "tc_dropped_packets",
        "Packets the TC program dropped (unattributed traffic to blocked destinations)",
        counter(c.tc_dropped),
    );
    reg.register(
        "flow_map_full_packets",
        "Packets not counted per flow because the flow map was full",
        counter(c.flows_full_packets),
    );
    reg.register(
        "block_tree_full",
        "Processes created by blocked processes that the block could not follow (tree map full)",
        counter(c.tree_full),
    );
    reg.register(
        "owners_full",
        "connect/sendmsg calls whose socket owner could not be recorded (owner map full)",
        counter(c.owners_full),
    );
    // The previous release's names, for one release.
    reg.register(
        "process_rate_bytes_per_second",
        format!("{DEPRECATED} rate(egress_process_bytes_total[1m])"),
        proc_rate,
    );
    reg.register(
        "denies",
        format!("{DEPRECATED} egress_rule_events_total"),
        denies,
    );
    reg.register(
        "budget_dropped",
        format!("{DEPRECATED} egress_budget_dropped_packets_total"),
        counter(c.budget_dropped),
    );
    reg.register(
        "tc_dropped",
        format!("{DEPRECATED} egress_tc_dropped_packets_total"),
        counter(c.tc_dropped),
    );
    register_dns(&mut reg, report);
    crate::kube::register_metrics(&mut reg, &report.pods);
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics server's socket (early: a taken port fails the start, before anything is
/// attached).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics on {addr}"))
}

/// The answer to one request head: `GET /metrics` (the latest text), `GET /healthz` (200 while
/// the process serves at all: the liveness probe), `GET /readyz` (200 once the programs are
/// attached and the policy applied, 503 before and while stopping: the readiness probe).
pub fn respond(request: &str, text: &str, ready: bool) -> String {
    let path = request
        .strip_prefix("GET ")
        .and_then(|r| r.split([' ', '?']).next())
        .unwrap_or("");
    let (status, content_type, body) = match path {
        // What the encoder writes (`# EOF`, info and unit metadata) is OpenMetrics text, not the
        // 0.0.4 text format: say so, or a 0.0.4 parser would choke on the info type.
        "/metrics" => ("200 OK", OPENMETRICS, text.to_string()),
        "/healthz" => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" if ready => ("200 OK", "text/plain; charset=utf-8", "ready\n".into()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain; charset=utf-8",
            "not ready: the programs are not attached or the policy not applied yet\n".into(),
        ),
        _ => ("404 Not Found", "text/plain; charset=utf-8", String::new()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` (see [`respond`]) on `listener` until the
/// task is dropped. `ready` is the controller's readiness, `text` the latest metrics.
pub async fn serve(
    listener: TcpListener,
    text: watch::Receiver<String>,
    ready: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics on /metrics, probes on /healthz and /readyz");
    }
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let text = text.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            // Read the request head (bounded in size and time).
            let head = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while n < buf.len() {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if head.is_err() {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let resp = respond(&req, &text.borrow(), *ready.borrow());
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// Folds each report into stable series and publishes the rendered text for [`serve`].
pub struct Exporter {
    folder: Folder,
    text: watch::Sender<String>,
}

impl Exporter {
    pub fn new() -> (Exporter, watch::Receiver<String>) {
        let (text, rx) = watch::channel(String::new());
        let exporter = Exporter {
            folder: Folder::default(),
            text,
        };
        (exporter, rx)
    }

    pub fn publish(&mut self, report: &StatsReport, ctl: &ControllerMetrics) {
        let series = self.folder.fold(&report.processes);
        self.text.send_replace(render(report, &series, ctl));
    }
}

/// Label values of one process series: pid, comm, bytes, packets, rate.
pub type ProcSeries = (String, String, u64, u64, f64);
/// Label values of one destination series: (pid, comm, dst, port, protocol), bytes.
pub type DestSeries = ((String, String, String, String, String), u64);

/// The folded series of one reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricSeries {
    pub procs: Vec<ProcSeries>,
    pub dests: Vec<DestSeries>,
}

type DestId = (u32, String, u16, String);

/// Decides, once and for good, which processes and destinations get a series of their own, and
/// keeps "other" monotonic: it accumulates what left the table.
#[derive(Debug, Default)]
pub struct Folder {
    own: std::collections::HashSet<u32>,
    folded: std::collections::HashSet<u32>,
    last: std::collections::HashMap<u32, (u64, u64)>,
    retired: (u64, u64),
    own_dest: std::collections::HashSet<DestId>,
    folded_dest: std::collections::HashSet<DestId>,
    last_dest: std::collections::HashMap<DestId, u64>,
    retired_dest: u64,
}

impl Folder {
    pub fn fold(&mut self, processes: &[crate::accounting::ProcTotals]) -> MetricSeries {
        let mut out = MetricSeries::default();
        // "other" = everything that left the table + the processes folded there for good.
        let (mut folded_bytes, mut folded_packets, mut other_rate) = (0u64, 0u64, 0.0);
        let mut seen = std::collections::HashSet::new();
        for p in processes {
            seen.insert(p.pid);
            // Totals below the last reading: the pid belongs to a new process. What the old one
            // sent is retired into "other", and the new one is folded there for good.
            if let Some(&(b, k)) = self.last.get(&p.pid)
                && p.bytes < b
            {
                self.retired.0 += b;
                self.retired.1 += k;
                self.own.remove(&p.pid);
                self.folded.insert(p.pid);
            }
            self.last.insert(p.pid, (p.bytes, p.packets));
            if !self.own.contains(&p.pid) && !self.folded.contains(&p.pid) {
                if self.own.len() < TOP_PROCESSES {
                    self.own.insert(p.pid);
                } else {
                    self.folded.insert(p.pid);
                }
            }
            if self.own.contains(&p.pid) {
                out.procs.push((
                    p.pid.to_string(),
                    p.comm.clone(),
                    p.bytes,
                    p.packets,
                    p.rate_bps,
                ));
            } else {
                folded_bytes += p.bytes;
                folded_packets += p.packets;
                other_rate += p.rate_bps;
            }
        }
        // Processes gone from the table: their last totals stay counted under "other".
        let gone: Vec<u32> = self
            .last
            .keys()
            .filter(|p| !seen.contains(p))
            .copied()
            .collect();
        for pid in gone {
            let (b, k) = self.last.remove(&pid).unwrap_or_default();
            // Its own series, if it had one, ends; its bytes continue under "other".
            self.retired.0 += b;
            self.retired.1 += k;
            self.own.remove(&pid);
            self.folded.remove(&pid);
        }
        out.procs.push((
            "other".into(),
            "other".into(),
            self.retired.0 + folded_bytes,
            self.retired.1 + folded_packets,
            other_rate,
        ));

        let mut folded_dest = 0u64;
        let mut seen_dest = std::collections::HashSet::new();
        for p in processes {
            for d in &p.destinations {
                let id: DestId = (p.pid, d.dst.clone(), d.port, d.protocol.clone());
                seen_dest.insert(id.clone());
                if let Some(&b) = self.last_dest.get(&id)
                    && d.bytes < b
                {
                    self.retired_dest += b;
                    self.own_dest.remove(&id);
                    self.folded_dest.insert(id.clone());
                }
                self.last_dest.insert(id.clone(), d.bytes);
                if !self.own_dest.contains(&id) && !self.folded_dest.contains(&id) {
                    if self.own_dest.len() < TOP_DESTINATIONS {
                        self.own_dest.insert(id.clone());
                    } else {
                        self.folded_dest.insert(id.clone());
                    }
                }
                if self.own_dest.contains(&id) {
                    out.dests.push((
                        (
                            p.pid.to_string(),
                            p.comm.clone(),
                            d.dst.clone(),
                            d.port.to_string(),
                            d.protocol.clone(),
                        ),
                        d.bytes,
                    ));
                } else {
                    folded_dest += d.bytes;
                }
            }
        }
        let gone: Vec<DestId> = self
            .last_dest
            .keys()
            .filter(|k| !seen_dest.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            let b = self.last_dest.remove(&id).unwrap_or_default();
            self.retired_dest += b;
            self.own_dest.remove(&id);
            self.folded_dest.remove(&id);
        }
        let other = || "other".to_string();
        out.dests.push((
            (other(), other(), other(), other(), other()),
            self.retired_dest + folded_dest,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{DestTotals, ProcTotals};

    fn proc(pid: u32, bytes: u64) -> ProcTotals {
        ProcTotals {
            pid,
            comm: format!("p{pid}"),
            exe: String::new(),
            cmdline: String::new(),
            uid: None,
            gid: None,
            ppid: None,
            cgroup_id: 0,
            pod: Default::default(),
            unattributed: pid == 0,
            alive: true,
            bytes,
            packets: bytes / 100,
            payload_bytes: bytes,
            rate_bps: 0.0,
            destinations: vec![DestTotals {
                dst: "198.18.0.2".into(),
                port: 443,
                protocol: "tcp".into(),
                bytes,
                packets: bytes / 100,
                payload_bytes: bytes,
                rate_bps: 0.0,
            }],
        }
    }

    fn other(s: &MetricSeries) -> u64 {
        s.procs.iter().find(|p| p.0 == "other").unwrap().2
    }

    #[test]
    fn probes_answer_by_path_and_readiness() {
        let status = |r: &str| r.lines().next().unwrap().to_string();
        assert_eq!(
            status(&respond("GET /healthz HTTP/1.1\r\n\r\n", "", false)),
            "HTTP/1.1 200 OK"
        );
        assert_eq!(
            status(&respond("GET /readyz HTTP/1.1\r\n\r\n", "", false)),
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(
            status(&respond("GET /readyz?verbose HTTP/1.1\r\n\r\n", "", true)),
            "HTTP/1.1 200 OK"
        );
        let m = respond("GET /metrics HTTP/1.1\r\n\r\n", "egress_x 1\n", false);
        assert!(
            m.starts_with("HTTP/1.1 200 OK") && m.ends_with("egress_x 1\n"),
            "{m}"
        );
        assert_eq!(
            status(&respond("GET /other HTTP/1.1\r\n\r\n", "", true)),
            "HTTP/1.1 404 Not Found"
        );
        assert_eq!(
            status(&respond("POST /readyz HTTP/1.1\r\n\r\n", "", true)),
            "HTTP/1.1 404 Not Found"
        );
    }

    /// Over a real socket: /readyz is 503 until readiness flips, /healthz 200 all along.
    #[tokio::test]
    async fn readiness_flips_over_http() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_text_tx, text) = watch::channel(String::new());
        let (ready_tx, ready) = watch::channel(false);
        let server = tokio::spawn(serve(listener, text, ready));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out.lines().next().unwrap_or("").to_string()
        };
        assert_eq!(get("/healthz").await, "HTTP/1.1 200 OK");
        assert_eq!(get("/readyz").await, "HTTP/1.1 503 Service Unavailable");
        ready_tx.send_replace(true);
        assert_eq!(get("/readyz").await, "HTTP/1.1 200 OK");
        ready_tx.send_replace(false);
        assert_eq!(get("/readyz").await, "HTTP/1.1 503 Service Unavailable");
        server.abort();
    }

    /// The DNS series are there with or without names in use, named as the README lists them.
    #[test]
    fn dns_series_are_always_rendered() {
        let mut report = StatsReport::default();
        let text = render(
            &report,
            &MetricSeries::default(),
            &ControllerMetrics::default(),
        );
        for line in [
            "egress_dns_queries_total{transport=\"udp\"} 0",
            "egress_dns_grants_live 0",
            "egress_dns_steered_total 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        report.counters.dns_steered = 7;
        report.dns = Some(crate::report::DnsStatus {
            proxy_running: true,
            grants_live: 3,
            proxy: Some(crate::dns::DnsStats {
                queries_tcp: 2,
                refused_unlisted: 4,
                grants: 5,
                grant_failures: 1,
                upstream_failures: 6,
                limit_addresses: 8,
                ..Default::default()
            }),
            sink: Some(crate::dns::grants::GrantCounters {
                written: 9,
                full: 1,
                ..Default::default()
            }),
            ..Default::default()
        });
        let text = render(
            &report,
            &MetricSeries::default(),
            &ControllerMetrics::default(),
        );
        for line in [
            "egress_dns_queries_total{transport=\"tcp\"} 2",
            "egress_dns_refused_total{reason=\"unlisted\"} 4",
            "egress_dns_refused_total{reason=\"blocked\"} 0",
            "egress_dns_refused_total{reason=\"dns_alert\"} 0",
            "egress_dns_limits_total{limit=\"dns_alert_names\"} 0",
            "egress_dns_grants_total 5",
            "egress_dns_granted_addresses_total 9",
            "egress_dns_grant_failures_total 1",
            "egress_dns_upstream_failures_total 6",
            "egress_dns_limits_total{limit=\"addresses\"} 8",
            "egress_dns_limits_total{limit=\"grant_map_full\"} 1",
            "egress_dns_grants_live 3",
            "egress_dns_steered_total 7",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    /// The names of the naming guide, the controller's own series, and the previous release's
    /// names beside them.
    #[test]
    fn series_follow_the_naming_guide_and_keep_the_old_names() {
        let mut report = StatsReport::default();
        report.counters.allowed = 5;
        report.counters.denied = 2;
        report.counters.audited = 1;
        report.counters.tc_dropped = 3;
        report.denies_by_rule.insert("no-ssh".into(), 2);
        let ctl = ControllerMetrics {
            generation: 4,
            policy_hash: "abcd".into(),
            mode: "enforce".into(),
            last_reload_successful: false,
            last_reload_success_secs: 1_700_000_000.5,
            maps: vec![crate::datapath::MapFill {
                map: "owners",
                entries: 12,
                capacity: 131_072,
            }],
            links: vec![("connect4".into(), true), ("tc_egress-eth0".into(), false)],
        };
        let series = Folder::default().fold(&[proc(42, 1000)]);
        let text = render(&report, &series, &ctl);
        for line in [
            "egress_decisions_total{verdict=\"allow\",hook=\"cgroup\"} 5",
            "egress_decisions_total{verdict=\"deny\",hook=\"cgroup\"} 2",
            "egress_decisions_total{verdict=\"audit\",hook=\"cgroup\"} 1",
            "egress_decisions_total{verdict=\"deny\",hook=\"tc\"} 3",
            "egress_rule_events_total{rule=\"no-ssh\"} 2",
            "egress_tc_dropped_packets_total 3",
            "egress_budget_dropped_packets_total 0",
            "# UNIT egress_process_bytes bytes",
            "egress_process_bytes_total{pid=\"42\",comm=\"p42\"} 1000",
            "egress_destination_bytes_total{",
            &format!(
                "egress_build_info{{version=\"{}\",control_protocol=\"1\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "egress_policy_info{hash=\"abcd\",generation=\"4\",mode=\"enforce\"} 1",
            "egress_config_last_reload_successful 0",
            "egress_config_last_reload_success_timestamp_seconds 1700000000.5",
            "egress_map_entries{map=\"owners\"} 12",
            "egress_map_max_entries{map=\"owners\"} 131072",
            "egress_link_attached{link=\"connect4\"} 1",
            "egress_link_attached{link=\"tc_egress-eth0\"} 0",
            // Deprecated for one release.
            "egress_denies_total{rule=\"no-ssh\"} 2",
            "egress_tc_dropped_total 3",
            "egress_budget_dropped_total 0",
            "egress_process_rate_bytes_per_second{pid=\"42\",comm=\"p42\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        let m = respond("GET /metrics HTTP/1.1\r\n\r\n", &text, true);
        assert!(
            m.contains(&format!("Content-Type: {OPENMETRICS}\r\n")),
            "{m}"
        );
    }

    #[test]
    fn counters_only_go_up_as_processes_come_and_go() {
        let mut f = Folder::default();
        let mut table: Vec<ProcTotals> = (1..=TOP_PROCESSES as u32 + 5)
            .map(|p| proc(p, 1000))
            .collect();
        let s1 = f.fold(&table);
        assert_eq!(s1.procs.len(), TOP_PROCESSES + 1);
        assert_eq!(other(&s1), 5 * 1000);
        // A process with its own series leaves; a big newcomer arrives: it does not take the
        // freed slot's history, and "other" never goes down.
        table.remove(0);
        table.push(proc(999, 50_000));
        let s2 = f.fold(&table);
        assert!(other(&s2) >= other(&s1));
        let mut prev = other(&s2);
        for round in 0..5 {
            for p in &mut table {
                p.bytes += 10 * round;
            }
            let s = f.fold(&table);
            assert!(other(&s) >= prev);
            prev = other(&s);
        }
        // Everything leaves: all of it ends up in "other".
        let s = f.fold(&[]);
        assert!(other(&s) >= prev);
        assert_eq!(s.procs.len(), 1);
    }
}
