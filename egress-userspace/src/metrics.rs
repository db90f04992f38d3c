//! Prometheus metrics on `--metrics ADDR` (`GET /metrics`, text format), built with
//! prometheus-client from the controller's latest [`StatsReport`]. Label cardinality is bounded:
//! the top processes and destinations by bytes get their own series, the rest is summed under
//! `pid="other"`.

use std::net::SocketAddr;

use anyhow::Context as _;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::ctlsock::{SharedReport, StatsReport};

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
struct VerdictLabels {
    verdict: String,
}

/// The metrics text for one report.
pub fn render(report: &StatsReport) -> String {
    let mut reg = Registry::with_prefix("egress");
    let proc_bytes = Family::<ProcLabels, Counter>::default();
    let proc_packets = Family::<ProcLabels, Counter>::default();
    let proc_rate = Family::<ProcLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let dest_bytes = Family::<DestLabels, Counter>::default();
    let denies = Family::<RuleLabels, Counter>::default();
    let decisions = Family::<VerdictLabels, Counter>::default();
    let alerts = Family::<RuleLabels, Counter>::default();
    let budget_dropped = Counter::<u64>::default();
    let events_lost = Counter::<u64>::default();
    let tc_dropped = Counter::<u64>::default();
    let flows_full = Counter::<u64>::default();

    let mut by_bytes: Vec<_> = report.processes.iter().collect();
    by_bytes.sort_by_key(|p| std::cmp::Reverse(p.bytes));
    for (i, p) in by_bytes.iter().enumerate() {
        let labels = if i < TOP_PROCESSES {
            ProcLabels {
                pid: p.pid.to_string(),
                comm: p.comm.clone(),
            }
        } else {
            ProcLabels {
                pid: "other".into(),
                comm: "other".into(),
            }
        };
        proc_bytes.get_or_create(&labels).inc_by(p.bytes);
        proc_packets.get_or_create(&labels).inc_by(p.packets);
        let g = proc_rate.get_or_create(&labels);
        g.set(g.get() + p.rate_bps);
    }
    let mut dests: Vec<_> = report
        .processes
        .iter()
        .flat_map(|p| p.destinations.iter().map(move |d| (p, d)))
        .collect();
    dests.sort_by_key(|(_, d)| std::cmp::Reverse(d.bytes));
    for (i, (p, d)) in dests.iter().enumerate() {
        let labels = if i < TOP_DESTINATIONS {
            DestLabels {
                pid: p.pid.to_string(),
                comm: p.comm.clone(),
                dst: d.dst.clone(),
                port: d.port.to_string(),
                protocol: d.protocol.clone(),
            }
        } else {
            DestLabels {
                pid: "other".into(),
                comm: "other".into(),
                dst: "other".into(),
                port: "other".into(),
                protocol: "other".into(),
            }
        };
        dest_bytes.get_or_create(&labels).inc_by(d.bytes);
    }
    for (rule, n) in &report.denies_by_rule {
        denies
            .get_or_create(&RuleLabels { rule: rule.clone() })
            .inc_by(*n);
    }
    let c = &report.counters;
    for (verdict, n) in [
        ("allowed", c.allowed),
        ("denied", c.denied),
        ("audited", c.audited),
    ] {
        decisions
            .get_or_create(&VerdictLabels {
                verdict: verdict.into(),
            })
            .inc_by(n);
    }
    for (rule, n) in &report.alerts_by_rule {
        alerts
            .get_or_create(&RuleLabels { rule: rule.clone() })
            .inc_by(*n);
    }
    budget_dropped.inc_by(c.budget_dropped);
    events_lost.inc_by(c.events_lost);
    tc_dropped.inc_by(c.tc_dropped);
    flows_full.inc_by(c.flows_full_packets);

    reg.register(
        "process_bytes",
        "Bytes sent per process (wire bytes)",
        proc_bytes,
    );
    reg.register("process_packets", "Packets sent per process", proc_packets);
    reg.register(
        "process_rate_bytes_per_second",
        "Smoothed send rate per process",
        proc_rate,
    );
    reg.register(
        "destination_bytes",
        "Bytes sent per process and destination",
        dest_bytes,
    );
    reg.register("denies", "Deny and audit events by deciding rule", denies);
    reg.register(
        "decisions",
        "connect/sendmsg decisions by verdict",
        decisions,
    );
    reg.register(
        "alerts",
        "High-volume transfer alerts raised, by alert rule",
        alerts,
    );
    reg.register(
        "budget_dropped",
        "Packets dropped because their process is over a byte budget",
        budget_dropped,
    );
    reg.register(
        "events_lost",
        "Events dropped because the ring buffer was full",
        events_lost,
    );
    reg.register(
        "tc_dropped",
        "Packets dropped by the TC program",
        tc_dropped,
    );
    reg.register(
        "flow_map_full_packets",
        "Packets not counted per flow because the flow map was full",
        flows_full,
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// Serves `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, report: SharedReport) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics on {addr}"))?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let report = report.clone();
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
            let resp = if req.starts_with("GET /metrics ") || req.starts_with("GET /metrics?") {
                let body = render(&report.lock().expect("report lock"));
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}
