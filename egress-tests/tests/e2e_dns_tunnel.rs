//! End-to-end tests of DNS-tunnel detection: `egress run` over a test cgroup with DNS alerts,
//! dnsmasq as the upstream in the test namespace, and real clients whose queries the kernel
//! steers to egress's DNS proxy (they ask a nameserver that does not exist). A tunnel-shaped
//! client (base32 chunks of a payload in subdomains of one domain) is alerted on and blocked,
//! for every query type, over UDP and TCP, and whatever server address it asks; a browser-like
//! mix of a few dozen names of several domains, asked over and over by another process of the
//! same cgroup, is not, and keeps resolving; `egress unblock` lifts the block. Spreading the
//! tunnel over processes of one cgroup is caught by `per = "cgroup"`.

use std::{net::IpAddr, time::Duration};

use egress::alerts::AlertEvent;
use egress_tests::{
    EgressCmd, NetPair, Probe, TempDir, TestCgroup,
    dns::{DnsServer, Record},
    events,
    probe::{Line, SummaryLine, parse_lines},
    wait_for,
};

/// The nameserver the clients ask: nothing is there, only the steering answers.
const NAMESERVER: &str = "10.53.0.1:53";

/// The browser-like mix: several domains, a few names each (the usual labels).
const MIX_DOMAINS: [&str; 5] = [
    "shop.test",
    "news.test",
    "mail.test",
    "video.test",
    "corp.co.uk",
];
const MIX_LABELS: [&str; 7] = ["www", "cdn", "api", "static", "img", "login", "m"];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// dnsmasq on 127.0.0.2 in namespace a, answering every name of the tunnel's and the mix's
/// domains.
fn upstream(pair: &NetPair) -> DnsServer {
    let mut records = vec![
        Record::Domain("tunnel.test", ip("198.18.0.9")),
        Record::Domain("other-tunnel.test", ip("198.18.0.9")),
    ];
    for d in MIX_DOMAINS {
        records.push(Record::Domain(d, ip("198.18.0.10")));
    }
    DnsServer::start(&pair.a, ip("127.0.0.2"), &records)
}

/// The mix: every name `rounds` times (`dns-query`, A), one summary
/// line per name.
fn mix_probe(cg: &TestCgroup, pair: &NetPair, rounds: u64) -> Probe {
    let mut p = Probe::new()
        .netns(&pair.a)
        .cgroup(cg)
        .opt("--timeout", "3")
        .opt("--count", rounds.to_string());
    for d in MIX_DOMAINS {
        for l in MIX_LABELS {
            p = p.args(["dns-query", &format!("{l}.{d}"), NAMESERVER]);
        }
    }
    p
}

fn assert_all_resolved(lines: &[Line], rounds: u64) {
    assert_eq!(lines.len(), MIX_DOMAINS.len() * MIX_LABELS.len());
    for l in lines {
        let s = l.summary();
        assert_eq!(
            (s.count, s.results.get("ok").copied()),
            (rounds, Some(rounds)),
            "every name of the mix resolves: {s:?}"
        );
    }
}

fn rcodes(s: &SummaryLine) -> Vec<(&str, u64)> {
    s.results.iter().map(|(k, v)| (k.as_str(), *v)).collect()
}

const POLICY: &str = r#"
mode = "enforce"
allow_loopback = true

[dns]
upstream = ["127.0.0.2"]

[[alert]]
name = "dns-tunnel"
dns_unique_subdomains = 100
dns_bytes = "64KiB"
window = "1m"
action = "block"
cooldown = "10m"

[[alert]]
name = "dns-entropy"
dns_entropy = 3.5
dns_min_queries = 20
window = "1m"
cooldown = "10m"
"#;

#[test]
fn a_tunnel_is_alerted_and_blocked_a_browser_mix_is_not_and_unblock_lifts_it() {
    let pair = NetPair::new();
    let _dns = upstream(&pair);
    let dir = TempDir::new("e2e-dns-tunnel");
    let cg = TestCgroup::new();
    let policy = dir.file("p.toml", POLICY);
    let events_path = dir.join("events.jsonl");
    let mut run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .policy(&policy)
        .events(&events_path)
        .start();

    // The mix first: 35 names of 5 domains, 4 times each.
    let mix = mix_probe(&cg, &pair, 4).lines();
    assert_all_resolved(&mix, 4);

    // The tunnel: 150 TXT queries of unique names under tunnel.test. The 100th reaches the
    // threshold; from the 101st on, refused (NXDOMAIN). Then, blocked: A over TCP, NULL to
    // another server address, CNAME and MX; another registered domain still resolves; after the
    // test unblocks it, answered again.
    let go = dir.join("go");
    let tunnel = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "3")
        .args(["dns-tunnel", "tunnel.test", NAMESERVER, "150", "TXT", "udp"])
        .args(["dns-tunnel", "tunnel.test", NAMESERVER, "5", "A", "tcp"])
        .args([
            "dns-tunnel",
            "tunnel.test",
            "192.0.2.53:53",
            "5",
            "NULL",
            "udp",
        ])
        .args(["dns-tunnel", "tunnel.test", NAMESERVER, "3", "CNAME", "udp"])
        .args(["dns-tunnel", "tunnel.test", NAMESERVER, "3", "MX", "tcp"])
        .args(["dns-query", "www.shop.test", NAMESERVER])
        .args(["wait-file"])
        .args([&go])
        .args(["dns-tunnel", "tunnel.test", NAMESERVER, "5", "A", "udp"])
        .spawn();
    let so_far = |want: usize| {
        let lines = parse_lines(tunnel.stdout_lines().join("\n").as_bytes());
        (lines.len() >= want).then_some(lines)
    };
    let mut lines = Vec::new();
    wait_for("the tunnel's first calls", Duration::from_secs(60), || {
        so_far(6).map(|l| lines = l).is_some()
    });
    let tunnel_pid = lines[0].summary().pid;
    // dnsmasq answers TXT for its --address domains with REFUSED: what matters is that the
    // first 100 were answered by it, and the rest by the proxy's block.
    let first = lines[0].summary();
    assert_eq!(
        (first.count, first.results.get("NXDOMAIN").copied()),
        (150, Some(50)),
        "the first 100 names answered, the rest refused: {first:?}"
    );
    for (i, what) in [
        (1, "TCP"),
        (2, "another server address"),
        (3, "CNAME"),
        (4, "MX over TCP"),
    ] {
        let s = lines[i].summary();
        assert_eq!(
            s.results.get("NXDOMAIN").copied(),
            Some(s.count),
            "{what} is refused too: {s:?}"
        );
    }
    assert_eq!(
        lines[5].call().result.name(),
        "ok",
        "another domain still resolves for the blocked process"
    );

    // The mix, in another process of the same cgroup, still resolves: nothing of it is blocked.
    let mix = mix_probe(&cg, &pair, 2).lines();
    assert_all_resolved(&mix, 2);

    // `egress stats` lists the block; `egress unblock` lifts it.
    let key = format!("dns:process:{tunnel_pid}:tunnel.test");
    // The stats are published every tick (250 ms): wait for the one after the last refusal.
    let mut stats = run.stats();
    wait_for(
        "the stats to count every refusal",
        Duration::from_secs(10),
        || {
            stats = run.stats();
            stats
                .dns
                .as_ref()
                .and_then(|d| d.tunnel)
                .is_some_and(|t| t.refused >= 50 + 16)
        },
    );
    let b = stats
        .blocks
        .iter()
        .find(|b| b.key == key)
        .unwrap_or_else(|| panic!("no block {key} in {:?}", stats.blocks));
    assert_eq!(b.rule, "dns-tunnel");
    let t = stats.dns.as_ref().and_then(|d| d.tunnel).unwrap();
    assert_eq!((t.refused, t.fired), (50 + 16, 2), "{t:?}");
    let out = run.ctl(&["unblock", &key]);
    assert!(
        out.status.success(),
        "egress unblock {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not twice.
    assert!(!run.ctl(&["unblock", &key]).status.success());
    std::fs::write(&go, b"").unwrap();
    wait_for("the tunnel's last call", Duration::from_secs(30), || {
        so_far(8).map(|l| lines = l).is_some()
    });
    assert_eq!(
        rcodes(lines[7].summary()),
        [("ok", 5)],
        "unblocked: answered again (its alert is in its cooldown: no new block)"
    );
    let exit = run.stop(libc::SIGTERM);
    assert!(exit.success(), "egress run: {exit}: {}", run.stderr_text());

    // Alerts for the tunnel only: one per alert rule, with the DNS evidence.
    let alerts: Vec<AlertEvent> = events::alerts(&events_path);
    let mut rules: Vec<&str> = alerts.iter().map(|a| a.alert_rule.as_str()).collect();
    rules.sort_unstable();
    assert_eq!(rules, ["dns-entropy", "dns-tunnel"], "{alerts:#?}");
    for a in &alerts {
        assert_eq!(a.pid, Some(tunnel_pid), "{a:#?}");
        assert!(a.exe.ends_with("egress-probe"), "{a:#?}");
        let d = a.dns.as_ref().expect("DNS evidence");
        assert_eq!((d.kind.as_str(), d.domain.as_str()), ("dns", "tunnel.test"));
        assert!(d.entropy > 3.5, "{d:?}");
        assert!(
            !d.sample_names.is_empty()
                && d.sample_names.iter().all(|n| n.ends_with(".tunnel.test"))
        );
    }
    let blocked = alerts
        .iter()
        .find(|a| a.alert_rule == "dns-tunnel")
        .unwrap();
    let d = blocked.dns.as_ref().unwrap();
    assert_eq!(d.unique_subdomains, 100);
    assert_eq!(d.reasons, ["dns_unique_subdomains"]);
    assert_eq!(
        (blocked.action.as_str(), blocked.key.as_str()),
        ("block", key.as_str())
    );
    let entropy = alerts
        .iter()
        .find(|a| a.alert_rule == "dns-entropy")
        .unwrap();
    assert_eq!(
        entropy.dns.as_ref().unwrap().dns_queries,
        20,
        "fired at its minimum"
    );
    assert_eq!(entropy.action.as_str(), "alert");

    // The block and its end, as events; each refused query as a "dns" event with the key.
    let blocks = events::of_kind(&events_path, "block");
    assert_eq!(blocks.len(), 1, "{blocks:#?}");
    assert_eq!(
        (&blocks[0]["key"], &blocks[0]["pid"]),
        (&serde_json::json!(key), &serde_json::json!(tunnel_pid))
    );
    let unblocks = events::of_kind(&events_path, "unblock");
    assert_eq!(unblocks.len(), 1, "{unblocks:#?}");
    assert_eq!(unblocks[0]["reason"], "egress unblock");
    let refused = events::of_kind(&events_path, "dns");
    assert_eq!(refused.len(), 50 + 5 + 5 + 3 + 3, "{}", refused.len());
    assert!(
        refused
            .iter()
            .all(|e| e["key"] == key.as_str() && e["rule"] == "dns-tunnel")
    );
    let mut qtypes: Vec<&str> = refused.iter().filter_map(|e| e["qtype"].as_str()).collect();
    qtypes.sort_unstable();
    qtypes.dedup();
    assert_eq!(qtypes, ["A", "CNAME", "MX", "NULL", "TXT"]);
}

#[test]
fn a_tunnel_spread_over_processes_is_caught_per_cgroup_and_over_domains_per_domain() {
    let pair = NetPair::new();
    let _dns = upstream(&pair);
    let dir = TempDir::new("e2e-dns-tunnel-cg");
    let cg = TestCgroup::new();
    let policy = dir.file(
        "p.toml",
        r#"
mode = "enforce"
allow_loopback = true

[dns]
upstream = ["127.0.0.2"]

[[alert]]
name = "per-process"
dns_unique_subdomains = 100
window = "1m"

[[alert]]
name = "per-cgroup"
dns_unique_subdomains = 100
window = "1m"
per = "cgroup"
"#,
    );
    let events_path = dir.join("events.jsonl");
    let mut run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .policy(&policy)
        .events(&events_path)
        .start();
    // Three processes, 40 names each under tunnel.test: 120 for the cgroup, 40 for each.
    // And one process spreading 90 names over two domains: under the threshold in each.
    for _ in 0..3 {
        let s = Probe::new()
            .netns(&pair.a)
            .cgroup(&cg)
            .args(["dns-tunnel", "tunnel.test", NAMESERVER, "40", "A", "udp"])
            .lines();
        assert_eq!(rcodes(s[0].summary()), [("ok", 40)]);
    }
    Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .args([
            "dns-tunnel",
            "other-tunnel.test",
            NAMESERVER,
            "45",
            "AAAA",
            "udp",
        ])
        .args(["dns-tunnel", "shop.test", NAMESERVER, "45", "AAAA", "tcp"])
        .lines();
    let exit = run.stop(libc::SIGTERM);
    assert!(exit.success(), "egress run: {exit}: {}", run.stderr_text());
    let alerts = events::alerts(&events_path);
    assert_eq!(alerts.len(), 1, "{alerts:#?}\n{}", run.stderr_text());
    let a = &alerts[0];
    assert_eq!(a.alert_rule, "per-cgroup");
    assert_eq!(a.key, format!("dns:cgroup:{}:tunnel.test", cg.id()));
    assert_eq!(a.per, "cgroup");
    assert_eq!(a.dns.as_ref().unwrap().unique_subdomains, 100);
    assert_eq!(a.action.as_str(), "alert");
}
