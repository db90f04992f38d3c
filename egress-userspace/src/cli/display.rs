//! Human-readable views of the reports: the `egress stats` table, the `egress status` text, the
//! `egress grants` table and the `egress top` frame.

use std::fmt::Write as _;

use crate::report::{DnsStatus, GrantRow, StatsReport, StatusReport};

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

/// An executable path in at most `n` characters, cut on the left so that the file name shows:
/// `…/libexec/app`. "-" when unknown.
/// ` [namespace/pod/container]` when the process is a pod's, else nothing.
fn pod_text(p: &crate::accounting::ProcTotals) -> String {
    match (&p.pod.namespace, &p.pod.pod) {
        (Some(ns), Some(pod)) => match &p.pod.container {
            Some(c) => format!(" [{ns}/{pod}/{c}]"),
            None => format!(" [{ns}/{pod}]"),
        },
        _ => String::new(),
    }
}

fn exe_text(exe: &str, n: usize) -> String {
    let len = exe.chars().count();
    if exe.is_empty() {
        "-".to_string()
    } else if len <= n {
        exe.to_string()
    } else {
        "…".to_string() + &exe.chars().skip(len + 1 - n).collect::<String>()
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
            "{:>8} {:<16} {:>12} {:>12} {:>10}  {}{}{}",
            pid_text(p),
            trunc(&p.comm, 16),
            format!("{}/s", human_bytes(p.rate_bps)),
            human_bytes(p.bytes as f64),
            p.packets,
            exe_text(&p.exe, usize::MAX),
            pod_text(p),
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
    let clsact = s.kernel.as_ref().is_some_and(|k| k.tc_attach == "clsact");
    if a.tc.ifaces.is_empty() {
        let _ = writeln!(out, "tc: {} on no interface", a.tc.program);
    } else if clsact && !c.running && a.tc.attached != Some(true) {
        // A clsact filter is not pinned: a clean stop detached it.
        let _ = writeln!(
            out,
            "tc: {} NOT attached on {} (clsact filters are not pinned on this kernel)",
            a.tc.program,
            a.tc.ifaces.join(", ")
        );
    } else if clsact && !c.running {
        let _ = writeln!(
            out,
            "tc: {} on {} (the clsact filter of a controller that was killed, until the next start replaces it)",
            a.tc.program,
            a.tc.ifaces.join(", ")
        );
    } else {
        let _ = writeln!(
            out,
            "tc: {} on {}{}",
            a.tc.program,
            a.tc.ifaces.join(", "),
            if clsact { " (clsact)" } else { "" }
        );
    }
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
    if let Some(d) = &s.dns {
        dns_text(&mut out, d);
    }
    for f in &s.feeds {
        feed_text(&mut out, f, std::time::SystemTime::now());
    }
    if !s.exceptions.is_empty() {
        let _ = writeln!(out, "break-glass exceptions: {} live", s.exceptions.len());
        for line in exceptions_table(&s.exceptions).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some(k) = &s.kernel {
        let _ = writeln!(out, "kernel: {} (tc via {})", k.release, k.tc_attach);
        for d in &k.degraded {
            let _ = writeln!(out, "  degraded: {d}");
        }
        for m in &k.missing {
            let _ = writeln!(out, "  MISSING: {m}");
        }
    }
    out
}

/// The break-glass exceptions (`egress grants`, `egress status`), one per line.
pub fn exceptions_table(rows: &[crate::exceptions::Exception]) -> String {
    if rows.is_empty() {
        return "no break-glass exceptions\n".to_string();
    }
    let mut out = String::new();
    for e in rows {
        let _ = writeln!(
            out,
            "exception {}: {}{}{} for {} until {} (granted by uid {}{}: {})",
            e.id,
            e.what(),
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
                .map(|u| format!(" ({u})"))
                .unwrap_or_default(),
            e.reason
        );
    }
    out
}

/// One `blocklist` line of `egress status` (and one more for its last error).
fn feed_text(out: &mut String, f: &crate::policy::feeds::FeedStatus, now: std::time::SystemTime) {
    let age = f
        .last_success
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map(|at| {
            let secs = now.duration_since(at).unwrap_or_default().as_secs();
            format!(
                "last good copy {} ago",
                humantime::format_duration(std::time::Duration::from_secs(secs))
            )
        })
        .unwrap_or_else(|| "no good copy yet".into());
    let _ = writeln!(
        out,
        "blocklist {} ({}, {}): {} entries, {} lines rejected, {age}{}",
        f.name,
        f.format,
        f.source,
        f.entries,
        f.rejected,
        if f.from_cache {
            " (the cached copy: the source failed)"
        } else {
            ""
        }
    );
    if let Some(e) = &f.last_error {
        let _ = writeln!(out, "  last error: {e}");
    }
}

/// The `dns` lines of `egress status`.
fn dns_text(out: &mut String, d: &DnsStatus) {
    let listen = if d.listen.is_empty() {
        "-".to_string()
    } else {
        d.listen.join(", ")
    };
    if d.proxy_running {
        let _ = writeln!(
            out,
            "dns: proxy on {listen}, upstreams {}; {} grants live (of {}); {} queries steered",
            if d.upstreams.is_empty() {
                "none (names do not resolve)".to_string()
            } else {
                d.upstreams.join(", ")
            },
            d.grants_live,
            d.grants_capacity,
            d.steered
        );
    } else if d.listen.is_empty() {
        let _ = writeln!(
            out,
            "dns: not steered; {} grants live (of {})",
            d.grants_live, d.grants_capacity
        );
    } else {
        let _ = writeln!(
            out,
            "dns: steered to {listen}, but no proxy answers there (no controller): names do not resolve; {} grants live (of {}); {} queries steered",
            d.grants_live, d.grants_capacity, d.steered
        );
    }
    if let Some(p) = &d.proxy {
        let _ = writeln!(
            out,
            "  proxy: {} queries ({} udp, {} tcp), {} relayed, {} refused ({} blocked, {} blocked by a CNAME target, {} unlisted, {} by a DNS alert's block), {} granted, {} grant failures, {} upstream failures, {} malformed",
            p.queries_udp + p.queries_tcp,
            p.queries_udp,
            p.queries_tcp,
            p.relayed,
            p.blocked + p.blocked_target + p.refused_unlisted + p.refused_tunnel,
            p.blocked,
            p.blocked_target,
            p.refused_unlisted,
            p.refused_tunnel,
            p.grants,
            p.grant_failures,
            p.upstream_failures,
            p.malformed
        );
        let _ = writeln!(
            out,
            "  limits hit: {} in flight, {} tcp clients, {} addresses per answer",
            p.limit_in_flight, p.limit_tcp_clients, p.limit_addresses
        );
    }
    if let Some(k) = &d.sink {
        let _ = writeln!(
            out,
            "  grants: {} addresses written, {} grant map full, {} answers to sockets of no enforced process",
            k.written, k.full, k.unknown_client
        );
    }
    if let Some(t) = &d.tunnel
        && (t.queries > 0 || t.refused > 0)
    {
        let _ = writeln!(
            out,
            "  dns alerts: {} queries counted, {} alerts, {} refused by their blocks; forgotten to stay bounded: {} keys, {} names",
            t.queries, t.fired, t.refused, t.keys_evicted, t.names_evicted
        );
    }
}

/// The `egress grants` table: one row per (cgroup, address), grouped by cgroup.
pub fn grants_table(rows: &[GrantRow]) -> String {
    if rows.is_empty() {
        return "no live grants\n".to_string();
    }
    let dash = || "-".to_string();
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone().unwrap_or_else(dash),
                r.address.to_string(),
                match (&r.service, r.granted) {
                    (Some(s), _) => s.clone(),
                    (None, true) => dash(),
                    (None, false) => "(not granted)".to_string(),
                },
                humantime::format_duration(std::time::Duration::from_secs(r.expires_in_secs))
                    .to_string(),
                r.pid.map_or_else(dash, |p| p.to_string()),
                r.comm.clone().unwrap_or_else(dash),
                match &r.cgroup_path {
                    Some(p) => format!("{p} ({})", r.cgroup_id),
                    None => r.cgroup_id.to_string(),
                },
            ]
        })
        .collect();
    let head = [
        "NAME",
        "ADDRESS",
        "SERVICE",
        "EXPIRES IN",
        "PID",
        "COMM",
        "CGROUP",
    ];
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, v) in width.iter_mut().zip(c) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(head.map(String::from)).chain(cells) {
        let mut l = String::new();
        for (i, (v, w)) in line.iter().zip(width).enumerate() {
            if i + 1 == line.len() {
                l.push_str(v);
            } else {
                let _ = write!(l, "{v:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    }
    out
}

/// Width of the executable column of `egress top`.
const TOP_EXE_WIDTH: usize = 24;

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
        "{:>8} {:<16} {:>12} {:>12}  {:<TOP_EXE_WIDTH$}  TOP DESTINATIONS",
        "PID", "COMM", "RATE", "TOTAL", "EXE"
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
            "{:>8} {:<16} {:>12} {:>12}  {:<TOP_EXE_WIDTH$}  {}",
            pid_text(p),
            trunc(&p.comm, 16),
            format!("{}/s", human_bytes(p.rate_bps)),
            human_bytes(p.bytes as f64),
            // A pod's process is named by its pod: the column is narrow, and on a node that is
            // what tells processes apart.
            match pod_text(p).trim() {
                "" => exe_text(&p.exe, TOP_EXE_WIDTH),
                pod => exe_text(pod.trim_matches(['[', ']']), TOP_EXE_WIDTH),
            },
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
                gid: Some(0),
                ppid: Some(1),
                cgroup_id: 1,
                pod: Default::default(),
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
    fn grants_table_lines_up_known_and_unknown_names() {
        let row = |name: Option<&str>, addr: &str, service: Option<&str>, granted| GrantRow {
            name: name.map(Into::into),
            address: addr.parse().unwrap(),
            cgroup_id: 5,
            cgroup_path: Some("/sys/fs/cgroup/app".into()),
            service: service.map(Into::into),
            granted,
            expires: "2027-01-15T08:05:00Z".into(),
            expires_in_secs: 297,
            pid: name.map(|_| 77),
            comm: name.map(|_| "curl".into()),
        };
        let t = grants_table(&[
            row(Some("api.example.test"), "198.18.0.2", Some("api"), true),
            row(None, "2001:db8::7", None, true),
            row(Some("other.example.test"), "198.18.0.4", None, false),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(
            lines[1].contains("api.example.test")
                && lines[1].contains("198.18.0.2")
                && lines[1].contains("4m 57s")
                && lines[1].contains("curl")
                && lines[1].ends_with("/sys/fs/cgroup/app (5)"),
            "{t}"
        );
        assert!(lines[2].starts_with("-  "), "{t}");
        assert!(lines[3].contains("(not granted)"), "{t}");
        // Columns line up: every row's address starts where the header's does.
        let col = lines[0].find("ADDRESS").unwrap();
        assert_eq!(lines[1].find("198.18.0.2"), Some(col), "{t}");
        assert_eq!(grants_table(&[]), "no live grants\n");
    }

    #[test]
    fn status_text_has_a_dns_section_when_names_are_in_use() {
        let mut s = StatusReport::default();
        assert!(!status_text(&s).contains("dns:"));
        s.dns = Some(DnsStatus {
            proxy_running: true,
            listen: vec!["127.0.0.153:53".into(), "[::1]:53".into()],
            upstreams: vec!["10.0.0.2:53".into()],
            grants_live: 3,
            grants_capacity: 131072,
            steered: 12,
            proxy: Some(crate::dns::DnsStats {
                queries_udp: 10,
                queries_tcp: 2,
                blocked: 1,
                ..Default::default()
            }),
            sink: Some(Default::default()),
            tunnel: None,
        });
        let t = status_text(&s);
        assert!(
            t.contains("dns: proxy on 127.0.0.153:53, [::1]:53, upstreams 10.0.0.2:53; 3 grants live (of 131072); 12 queries steered"),
            "{t}"
        );
        assert!(
            t.contains("12 queries (10 udp, 2 tcp)") && t.contains("1 refused"),
            "{t}"
        );
        s.dns.as_mut().unwrap().proxy_running = false;
        assert!(
            status_text(&s).contains("no proxy answers there"),
            "{}",
            status_text(&s)
        );
    }

    #[test]
    fn status_text_names_the_kernel_and_a_tc_filter_gone_with_its_controller() {
        let mut s = StatusReport::default();
        s.attached.tc.program = "tc_egress".into();
        s.attached.tc.ifaces = vec!["eth0".into()];
        s.kernel = Some(crate::report::KernelStatus {
            release: "6.1.0-56-amd64".into(),
            tc_attach: "clsact".into(),
            degraded: vec![
                "no TCX links (BPF_LINK_TYPE_TCX) (Linux 6.6+): TC is attached as a clsact filter"
                    .into(),
            ],
            missing: vec![],
        });
        let t = status_text(&s);
        assert!(t.contains("kernel: 6.1.0-56-amd64 (tc via clsact)"), "{t}");
        assert!(t.contains("  degraded: no TCX links"), "{t}");
        assert!(t.contains("tc: tc_egress NOT attached on eth0"), "{t}");
        s.attached.tc.attached = Some(true);
        let t = status_text(&s);
        assert!(
            t.contains("tc: tc_egress on eth0 (the clsact filter of a controller that was killed"),
            "{t}"
        );
        s.controller.running = true;
        let t = status_text(&s);
        assert!(t.contains("tc: tc_egress on eth0 (clsact)"), "{t}");
        s.kernel.as_mut().unwrap().tc_attach = "tcx".into();
        assert!(status_text(&s).contains("tc: tc_egress on eth0\n"));
    }

    #[test]
    fn long_executables_keep_their_file_name() {
        assert_eq!(exe_text("", 10), "-");
        assert_eq!(exe_text("/usr/bin/curl", 24), "/usr/bin/curl");
        let cut = exe_text("/usr/lib/jvm/java-21/bin/java (deleted)", 24);
        assert_eq!(cut.chars().count(), 24);
        assert!(
            cut.starts_with('…') && cut.ends_with("bin/java (deleted)"),
            "{cut}"
        );
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
        assert!(t.contains("EXE") && t.contains("  /usr/bin/curl"), "{t}");
        let f = top_frame(&report(), 10, 200);
        assert!(f[1].contains("EXE"), "{f:?}");
        assert!(
            f[2].contains("42")
                && f[2].contains("curl")
                && f[2].contains("/usr/bin/curl")
                && f[2].contains("198.18.0.2:443/tcp 1.2 MB/s"),
            "{f:?}"
        );
        // The columns line up with the header.
        assert_eq!(f[1].find("TOP DESTINATIONS"), f[2].find("198.18.0.2"));
        let narrow = top_frame(&report(), 2, 20);
        assert_eq!(narrow.len(), 2);
        assert!(narrow.iter().all(|l| l.chars().count() <= 20));
    }
}

/// One event line for people: time, kind, then what it is about. A deny or audit reads
/// `TIME deny curl[7720] uid=1000 connect4 tcp 203.0.113.9:443 rule=default (exe /usr/bin/curl)`;
/// other events list their fields as KEY=VALUE. A line that is not a JSON object is printed as
/// it is.
pub fn event_line(line: &str) -> String {
    use std::fmt::Write as _;
    let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let text = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let kind = text("event");
    let mut out = format!("{} {kind:<6}", text("ts"));
    if kind == "deny" || kind == "audit" {
        let _ = write!(
            out,
            " {}[{}] uid={} {} {}",
            text("comm"),
            text("pid"),
            text("uid"),
            text("hook"),
            text("protocol")
        );
        let dst = text("dst");
        if dst.is_empty() {
            let _ = write!(out, " socket={}", text("socket_type"));
        } else if dst.contains(':') {
            let _ = write!(out, " [{dst}]:{}", text("port"));
        } else {
            let _ = write!(out, " {dst}:{}", text("port"));
        }
        if v.contains_key("host") {
            let _ = write!(out, " host={}", text("host"));
        }
        let _ = write!(out, " rule={}", text("rule"));
        for k in ["namespace", "pod", "exe"] {
            if v.contains_key(k) {
                let _ = write!(out, " {k}={}", text(k));
            }
        }
        return out;
    }
    for (k, value) in &v {
        if k == "ts" || k == "event" {
            continue;
        }
        match value {
            serde_json::Value::String(s) => {
                let _ = write!(out, " {k}={s}");
            }
            other => {
                let _ = write!(out, " {k}={other}");
            }
        }
    }
    out
}

#[cfg(test)]
mod event_line_tests {
    use super::event_line;

    #[test]
    fn denies_read_as_one_line_and_other_events_as_fields() {
        let deny = r#"{"ts":"2025-01-02T03:04:05Z","event":"deny","pid":7720,"tid":7720,"comm":"curl","exe":"/usr/bin/curl","uid":1000,"gid":1000,"cgroup_id":5,"hook":"connect4","family":"ipv4","protocol":"tcp","dst":"203.0.113.9","port":443,"v4_mapped":false,"rule":"default","generation":1,"policy_hash":"ab"}"#;
        assert_eq!(
            event_line(deny),
            "2025-01-02T03:04:05Z deny   curl[7720] uid=1000 connect4 tcp 203.0.113.9:443 rule=default exe=/usr/bin/curl"
        );
        let reload = r#"{"ts":"T","event":"reload","generation":3,"policy":"p.toml"}"#;
        let line = event_line(reload);
        assert!(line.starts_with("T reload "), "{line}");
        assert!(
            line.contains(" generation=3") && line.contains(" policy=p.toml"),
            "{line}"
        );
        assert_eq!(event_line("not json"), "not json");
    }
}
