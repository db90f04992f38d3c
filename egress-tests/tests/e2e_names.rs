//! End-to-end tests of approved services by name: `egress exec` with a policy of `hosts`, a
//! dnsmasq upstream in the test namespace, and the command resolving through the C library
//! (getaddrinfo reads the namespace's resolv.conf, whose nameserver does not even exist: the
//! kernel steers every query to egress's proxy). Servers live in a second namespace behind a
//! veth pair; nothing leaves the test namespaces.

use std::net::IpAddr;

use egress_tests::{
    EgressCmd, NetPair, TcpSink, TempDir,
    Verdict::{Denied, Succeeded},
    dns::{DnsServer, NetnsResolvConf, Record},
    events,
    netns::VETH_B,
    probe::{CallLine, parse_calls},
};

const POLICY: &str = r#"
mode = "enforce"
allow_loopback = false

[dns]
upstream = ["127.0.0.2"]
min_ttl = "5s"
max_ttl = "1h"

[[service]]
name = "api"
hosts = ["api.example.test", "cdn.example.test", "*.one.test", "**.many.test"]
ports = [443]
protocols = ["tcp"]

[[block]]
name = "paste"
hosts = ["**.paste.test"]
"#;

/// The test's world: namespace a (egress and the command, dnsmasq on 127.0.0.2) and b (the
/// servers, on 198.18.0.2-.6 port 443).
struct World {
    pair: NetPair,
    _dns: DnsServer,
    _resolv: NetnsResolvConf,
    _sinks: Vec<TcpSink>,
    dir: TempDir,
}

fn world() -> World {
    let pair = NetPair::new();
    for last in 3..=6 {
        pair.b
            .ip(&["addr", "add", &format!("198.18.0.{last}/24"), "dev", VETH_B]);
    }
    let sinks = (2..=6)
        .map(|last| TcpSink::start(&pair.b, (std::net::Ipv4Addr::new(198, 18, 0, last), 443)))
        .collect();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let dns = DnsServer::start(
        &pair.a,
        ip("127.0.0.2"),
        &[
            Record::Addr("api.example.test", ip("198.18.0.2"), 300),
            Record::Addr("edge.cdn.test", ip("198.18.0.3"), 30),
            Record::Cname("cdn.example.test", "edge.cdn.test", 120),
            Record::Addr("other.example.test", ip("198.18.0.4"), 300),
            Record::Addr("x.one.test", ip("198.18.0.5"), 300),
            Record::Addr("x.y.one.test", ip("198.18.0.9"), 300),
            Record::Addr("a.b.c.many.test", ip("198.18.0.6"), 300),
            Record::Addr("bad.paste.test", ip("198.18.0.2"), 300),
        ],
    );
    // A nameserver that does not exist: only the steering can answer.
    let resolv = NetnsResolvConf::new(&pair.a, &[ip("10.53.0.1")], "timeout:2 attempts:1");
    World {
        pair,
        _dns: dns,
        _resolv: resolv,
        _sinks: sinks,
        dir: TempDir::new("e2e-names"),
    }
}

fn lines(stdout: &[u8]) -> Vec<CallLine> {
    parse_calls(stdout)
}

#[test]
fn names_approve_their_addresses_for_the_resolving_command_only() {
    let w = world();
    let policy = w.dir.file("p.toml", POLICY);
    let events_path = w.dir.join("events.jsonl");
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&policy)
        .events(&events_path)
        .probe([
            "resolve",
            "api.example.test:443",
            "tcp",
            "198.18.0.2:80",
            "resolve",
            "other.example.test:443",
            "resolve",
            "cdn.example.test:443",
            "resolve",
            "x.one.test:443",
            "resolve",
            "x.y.one.test:443",
            "resolve",
            "a.b.c.many.test:443",
            "resolve",
            "bad.paste.test:443",
            "tcp",
            "198.18.0.3:443",
        ])
        .output();
    assert!(
        out.status.success(),
        "egress exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<_> = lines(&out.stdout)
        .into_iter()
        .map(|l| (l.dst, l.result, l.from))
        .collect();
    let s = |x: &str| Some(x.to_string());
    let other = |e: &str| egress_tests::Verdict::Other(e.into());
    assert_eq!(
        got.iter()
            .map(|(_, r, f)| (r.clone(), f.clone()))
            .collect::<Vec<_>>(),
        [
            // Resolved, granted, connected.
            (Succeeded, s("198.18.0.2")),
            // The grant carries the service's ports: 80 is not one.
            (Denied, None),
            // Resolved (unlisted names resolve), but nothing approves it.
            (Denied, s("198.18.0.4")),
            // A CNAME chain: the final address is granted.
            (Succeeded, s("198.18.0.3")),
            // `*.` covers one label, not two; `**.` covers several.
            (Succeeded, s("198.18.0.5")),
            (Denied, s("198.18.0.9")),
            (Succeeded, s("198.18.0.6")),
            // A blocked name does not resolve.
            (other("EAI_NONAME"), None),
            // The CDN address was granted by name: a direct connect to it is allowed too (same
            // cgroup, same service), as Cilium's toFQDNs does.
            (Succeeded, None),
        ],
        "{got:#?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let denies = events::of_kind(&events_path, "deny");
    let denied_other = denies
        .iter()
        .find(|e| e["dst"] == "198.18.0.4")
        .unwrap_or_else(|| panic!("no deny for other.example.test: {denies:#?}"));
    assert_eq!(denied_other["host"], "other.example.test", "{denied_other}");
    assert_eq!(denied_other["rule"], "default");
    let dns_events = events::of_kind(&events_path, "dns");
    // getaddrinfo asks for A and AAAA: both refused, each reported.
    let mut qtypes: Vec<&str> = dns_events
        .iter()
        .filter_map(|e| e["qtype"].as_str())
        .collect();
    qtypes.sort_unstable();
    assert_eq!(qtypes, ["A", "AAAA"], "{dns_events:#?}");
    let dns = &dns_events[0];
    assert_eq!(
        (&dns["name"], &dns["rule"], &dns["comm"]),
        (
            &serde_json::json!("bad.paste.test"),
            &serde_json::json!("paste"),
            &serde_json::json!("egress-probe")
        ),
        "{dns}"
    );
    // The port-80 deny names the host too: the address was learned from api.example.test.
    let port80 = denies
        .iter()
        .find(|e| e["port"] == 80)
        .expect("the port-80 deny");
    assert_eq!(port80["host"], "api.example.test", "{port80}");
}

#[test]
fn unlisted_refuse_answers_only_names_the_policy_covers() {
    let w = world();
    let policy = w.dir.file(
        "p.toml",
        &POLICY.replace(
            "max_ttl = \"1h\"",
            "max_ttl = \"1h\"\nunlisted = \"refuse\"",
        ),
    );
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&policy)
        .probe([
            "resolve-only",
            "other.example.test",
            "resolve",
            "api.example.test:443",
        ])
        .success();
    let got: Vec<_> = lines(&out.stdout).into_iter().map(|l| l.result).collect();
    assert_eq!(
        got,
        [egress_tests::Verdict::Other("EAI_NONAME".into()), Succeeded]
    );
}

#[test]
fn a_thousand_resolve_then_connect_rounds_never_fail() {
    let w = world();
    let policy = w.dir.file("p.toml", POLICY);
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&policy)
        .probe(["--count", "1000", "resolve", "api.example.test:443"])
        .success();
    let line: egress_tests::probe::SummaryLine = egress_tests::probe::parse_one(&out.stdout);
    assert_eq!(line.times(&Succeeded), 1000, "{line:?}");
}
