//! Human-readable views of a [`StatsReport`]: the `egress stats` table and the `egress top`
//! frame.

use std::fmt::Write as _;

use crate::report::{StatsReport, StatusReport};

/// "1.5 MB", "12 B": decimal units, as iftop and most dashboards show rates.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The PID column: "-" for the unattributed owner.
fn pid_text(p: &crate::accounting::ProcTotals) -> String {
    if p.unattributed {
        "-".to_string()
    } else {
        p.pid.to_string()
    }
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n.saturating_sub(1)).collect::<String>() + "…"
    }
}

/// The `egress stats` table: every process, and under it each destination.
pub fn stats_table(r: &StatsReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {} ({}), at {}",
        r.policy, r.mode, r.generated_at
    );
    let c = &r.counters;
    let _ = writeln!(
        out,
        "decisions: {} allowed, {} denied, {} audited; tc dropped {}; events lost {}; flow-map full {} packets; owner map full {}",
        c.allowed,
        c.denied,
        c.audited,
        c.tc_dropped,
        c.events_lost,
        c.flows_full_packets,
        c.owners_full
    );
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:>12} {:>12} {:>10}  EXE",
        "PID", "COMM", "RATE", "BYTES", "PACKETS"
    );
    for p in &r.processes {
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:>12} {:>12} {:>10}  {}{}",
            pid_text(p),
            trunc(&p.comm, 16),
            format!("{}/s", human_bytes(p.rate_bps)),
            human_bytes(p.bytes as f64),
            p.packets,
            p.exe,
            if p.alive { "" } else { " (exited)" }
        );
        for d in &p.destinations {
            let _ = writeln!(
                out,
                "{:>8} {:<16} {:>12} {:>12} {:>10}  -> {}",
                "",
                "",
                format!("{}/s", human_bytes(d.rate_bps)),
                human_bytes(d.bytes as f64),
                d.packets,
                dest(&d.dst, d.port, &d.protocol)
            );
        }
    }
    out
}

fn dest(dst: &str, port: u16, proto: &str) -> String {
    if dst.contains(':') {
        format!("[{dst}]:{port}/{proto}")
    } else {
        format!("{dst}:{port}/{proto}")
    }
}

/// The `egress status` text.
pub fn status_text(s: &StatusReport) -> String {
    let mut out = String::new();
    let c = &s.controller;
    if c.running {
        let _ = writeln!(
            out,
            "controller: running (pid {}, up {} s)",
            c.pid.unwrap_or_default(),
            c.uptime_secs.unwrap_or_default()
        );
    } else {
        let _ = writeln!(out, "controller: not running, kernel enforcement active");
    }
    let p = &s.policy;
    let _ = writeln!(
        out,
        "policy: {} generation {} hash {} applied {} (mode {}, default {})",
        p.source, p.generation, p.hash, p.applied_at, p.mode, p.default
    );
    let a = &s.attached;
    let _ = writeln!(
        out,
        "attached: {} on cgroup {}",
        a.hooks.join(", "),
        a.cgroup
    );
    let _ = writeln!(
        out,
        "tc: {} on {}",
        a.tc.program,
        if a.tc.ifaces.is_empty() {
            "no interface".to_string()
        } else {
            a.tc.ifaces.join(", ")
        }
    );
    let k = &s.counters;
    let _ = writeln!(
        out,
        "counters: {} allowed, {} denied, {} audited, {} tc dropped, {} budget dropped, {} events lost, {} owner map full",
        k.allowed,
        k.denied,
        k.audited,
        k.tc_dropped,
        k.budget_dropped,
        k.events_lost,
        k.owners_full
    );
    out
}

/// One `egress top` frame for a terminal of `rows` x `cols`: processes by rate, each with its top
/// three destinations.
pub fn top_frame(r: &StatsReport, rows: usize, cols: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let total_rate: f64 = r.processes.iter().map(|p| p.rate_bps).sum();
    lines.push(format!(
        "egress top - {} - {} processes, {}/s total - denied {} - q to quit",
        r.generated_at.get(11..19).unwrap_or(&r.generated_at),
        r.processes.len(),
        human_bytes(total_rate),
        r.counters.denied
    ));
    lines.push(format!(
        "{:>8} {:<16} {:>12} {:>12}  TOP DESTINATIONS",
        "PID", "COMM", "RATE", "TOTAL"
    ));
    for p in &r.processes {
        if lines.len() >= rows.saturating_sub(1) {
            break;
        }
        let dests: Vec<String> = p
            .destinations
            .iter()
            .take(3)
            .map(|d| {
                format!(
                    "{} {}/s",
                    dest(&d.dst, d.port, &d.protocol),
                    human_bytes(d.rate_bps)
                )
            })
            .collect();
        lines.push(format!(
            "{:>8} {:<16} {:>12} {:>12}  {}",
            pid_text(p),
            trunc(&p.comm, 16),
            format!("{}/s", human_bytes(p.rate_bps)),
            human_bytes(p.bytes as f64),
            dests.join(", ")
        ));
    }
    lines.into_iter().map(|l| trunc(&l, cols)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{DestTotals, ProcTotals};

    fn report() -> StatsReport {
        StatsReport {
            generated_at: "2026-11-26T12:00:00.000000000Z".into(),
            policy: "p.toml".into(),
            mode: "enforce".into(),
            processes: vec![ProcTotals {
                pid: 42,
                comm: "curl".into(),
                exe: "/usr/bin/curl".into(),
                cmdline: "curl -T big".into(),
                uid: Some(0),
                ppid: Some(1),
                cgroup_id: 1,
                unattributed: false,
                alive: true,
                bytes: 2_500_000,
                packets: 2000,
                payload_bytes: 2_400_000,
                rate_bps: 1_250_000.0,
                destinations: vec![DestTotals {
                    dst: "198.18.0.2".into(),
                    port: 443,
                    protocol: "tcp".into(),
                    bytes: 2_500_000,
                    packets: 2000,
                    payload_bytes: 2_400_000,
                    rate_bps: 1_250_000.0,
                }],
            }],
            ..StatsReport::default()
        }
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(12.0), "12 B");
        assert_eq!(human_bytes(1_500_000.0), "1.5 MB");
        assert_eq!(human_bytes(2e12), "2.0 TB");
    }

    #[test]
    fn table_and_frame_show_process_rate_and_destination() {
        let t = stats_table(&report());
        assert!(
            t.contains("curl") && t.contains("1.2 MB/s") && t.contains("-> 198.18.0.2:443/tcp"),
            "{t}"
        );
        let f = top_frame(&report(), 10, 200);
        assert!(
            f[2].contains("42")
                && f[2].contains("curl")
                && f[2].contains("198.18.0.2:443/tcp 1.2 MB/s"),
            "{f:?}"
        );
        let narrow = top_frame(&report(), 2, 20);
        assert_eq!(narrow.len(), 2);
        assert!(narrow.iter().all(|l| l.chars().count() <= 20));
    }
}
