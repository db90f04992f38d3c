//! End-to-end tests of approved services by name: `egress exec` with a policy of `hosts`, a
//! dnsmasq upstream in the test namespace, and the command resolving through the C library
//! (getaddrinfo reads the namespace's resolv.conf, whose nameserver does not even exist: the
//! kernel steers every query to egress's proxy). Servers live in a second namespace behind a
//! veth pair; nothing leaves the test namespaces. And what a running controller shows of names:
//! `egress grants`, `status`, `explain NAME`, also from the pins once it is gone.

use std::{net::IpAddr, process::Command};

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress::report::GrantRow;
use egress_tests::{
    ChildGuard, EgressCmd, NetPair, Probe, TcpSink, TempDir, TestCgroup,
    Verdict::{Denied, Succeeded},
    bins,
    controller::pin_dir,
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
min_ttl = "2s"
max_ttl = "1h"

[[service]]
name = "api"
hosts = ["api.example.test", "cdn.example.test", "*.one.test", "**.many.test", "short.example.test", "v6.example.test"]
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
    for last in 3..=7 {
        pair.b
            .ip(&["addr", "add", &format!("198.18.0.{last}/24"), "dev", VETH_B]);
    }
    let mut sinks: Vec<TcpSink> = (2..=7)
        .map(|last| TcpSink::start(&pair.b, (std::net::Ipv4Addr::new(198, 18, 0, last), 443)))
        .collect();
    sinks.push(TcpSink::start(&pair.b, (egress_tests::netns::ADDR6_B, 443)));
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
            Record::Addr("short.example.test", ip("198.18.0.7"), 1),
            Record::Addr("v6.example.test", ip("fd00:e9e5::2"), 300),
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

/// Lines of any kind (call lines and summary lines), as JSON.
fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn an_expired_grant_denies_new_connects_and_keeps_established_ones() {
    let w = world();
    let policy = w.dir.file("p.toml", POLICY);
    // short.example.test has a TTL of 1 s, raised to min_ttl (2 s).
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&policy)
        .probe([
            "resolve-only",
            "short.example.test",
            "hold",
            "tcp",
            "198.18.0.7:443",
            "1",
            "sleep",
            "3500",
            "tcp",
            "198.18.0.7:443",
            "held-send",
            "10000",
        ])
        .success();
    let got: Vec<String> = json_lines(&out.stdout)
        .iter()
        .map(|l| {
            l["result"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| l["results"].to_string())
        })
        .collect();
    assert_eq!(
        got,
        ["ok", r#"{"ok":1}"#, "ok", "EPERM", "ok"],
        "resolved, connected, expired: a new connect is denied, the established one goes on"
    );
}

#[test]
fn tcp_dns_and_an_ipv6_answer_work_through_the_proxy() {
    let w = world();
    // glibc over TCP (use-vc), asking an IPv6 nameserver that does not exist.
    let _vc = NetnsResolvConf::new(&w.pair.a, &["fd53::1".parse().unwrap()], "use-vc");
    let policy = w.dir.file("p.toml", POLICY);
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&policy)
        .probe([
            "resolve",
            "api.example.test:443",
            "resolve",
            "v6.example.test:443",
        ])
        .success();
    let got: Vec<_> = lines(&out.stdout)
        .into_iter()
        .map(|l| (l.result, l.from))
        .collect();
    assert_eq!(
        got,
        [
            (Succeeded, Some("198.18.0.2".to_string())),
            (Succeeded, Some("fd00:e9e5::2".to_string())),
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Child cgroups of a test cgroup, removed on drop (before their parent).
struct Children(Vec<PathBuf>);

impl Children {
    fn new(parent: &TestCgroup, names: &[&str]) -> Children {
        Children(
            names
                .iter()
                .map(|n| {
                    let p = parent.path().join(n);
                    std::fs::create_dir(&p).unwrap();
                    p
                })
                .collect(),
        )
    }

    fn get(&self, i: usize) -> &Path {
        &self.0[i]
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir(p);
        }
    }
}

#[test]
fn grants_are_per_cgroup_queries_to_any_server_are_steered_and_grants_survive_a_restart() {
    let w = world();
    let cg = TestCgroup::new();
    let kids = Children::new(&cg, &["a", "b"]);
    let pins = pin_dir();
    let policy = w.dir.file("p.toml", POLICY);
    let run = || {
        EgressCmd::run(&w.pair.a, cg.path(), &w.dir)
            .pinned(&pins)
            .policy(&policy)
    };
    let mut first = run().start();
    let probe = |cgroup: &Path, args: &[&str]| -> Vec<(egress_tests::Verdict, Option<String>)> {
        Probe::new()
            .netns(&w.pair.a)
            .cgroup(cgroup)
            .opt("--timeout", "2")
            .args(args)
            .run()
            .into_iter()
            .map(|l| (l.result, l.from))
            .collect()
    };
    let s = |x: &str| Some(x.to_string());
    // a asks a resolver that does not exist (steered), then connects.
    assert_eq!(
        probe(
            kids.get(0),
            &[
                "dns-query",
                "api.example.test",
                "10.53.0.1:53",
                "tcp",
                "198.18.0.2:443"
            ]
        ),
        [(Succeeded, s("198.18.0.2")), (Succeeded, None)]
    );
    // b never asked: the same address is denied to it.
    assert_eq!(
        probe(kids.get(1), &["tcp", "198.18.0.2:443"]),
        [(Denied, None)],
        "another cgroup does not inherit a's grant"
    );
    // Any server, any family: the proxy answers (a blocked name: NXDOMAIN from the proxy, not
    // from the server asked, which does not run a DNS server at all); DoT is not approved.
    assert_eq!(
        probe(
            kids.get(0),
            &[
                "dns-query",
                "bad.paste.test",
                "198.18.0.2:53",
                "dns-query",
                "api.example.test",
                "[fd53::1]:53",
                "tcp",
                "198.18.0.2:853",
            ]
        ),
        [
            (egress_tests::Verdict::Other("NXDOMAIN".into()), None),
            (Succeeded, s("198.18.0.2")),
            (Denied, None),
        ]
    );

    // kill -9: the grant is pinned with the maps, so the kernel still approves a's connect.
    first.kill_9();
    assert_eq!(
        probe(kids.get(0), &["tcp", "198.18.0.2:443"]),
        [(Succeeded, None)],
        "the grant outlives its controller"
    );
    // While no controller runs, names do not resolve (the steering points at a proxy that is
    // gone: fail closed), and address rules keep working.
    let (r, _) = probe(
        kids.get(0),
        &["dns-query", "api.example.test", "10.53.0.1:53"],
    )
    .remove(0);
    assert_ne!(r, Succeeded, "no proxy, no answer");
    // The gap a restart leaves: from the restart until the first answer.
    let t0 = Instant::now();
    let second = run().spawn();
    loop {
        let (r, _) = probe(
            kids.get(0),
            &["dns-query", "api.example.test", "10.53.0.1:53"],
        )
        .remove(0);
        if r == Succeeded {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20) * egress_tests::timeout_scale(),
            "no answer after the restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let gap = t0.elapsed();
    eprintln!("DNS gap across a controller restart: {gap:?}");
    // The proxy comes back before the programs are loaded and verified (which takes seconds).
    assert!(
        gap < Duration::from_secs(2),
        "names resolved again only after {gap:?}"
    );
    let out = second.ctl(&["stop", "--pin-dir", pins.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    drop(kids);
}

/// `egress-probe ARGS` in cgroup `cg` and namespace `w.pair.a`, through `ip netns exec` so that
/// getaddrinfo reads the namespace's resolv.conf; its call lines.
fn probe_in(w: &World, cg: &TestCgroup, args: &[&str]) -> Vec<CallLine> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", w.pair.a.name()])
        .arg(bins::probe())
        .args(args);
    cg.join_on_exec(&mut cmd);
    let out = ChildGuard::spawn(&mut cmd).output();
    assert!(out.status.success(), "egress-probe failed: {out:?}");
    lines(&out.stdout)
}

/// The rows `egress ARGS` prints as JSON (it must succeed).
fn grant_rows(out: &std::process::Output) -> Vec<GrantRow> {
    assert!(
        out.status.success(),
        "egress grants: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("grants --json is not an array of rows ({e}): {out:?}"))
}

#[test]
fn grants_status_and_explain_show_what_the_enforced_cgroup_resolved() {
    let w = world();
    let cg = TestCgroup::new();
    let pins = pin_dir();
    let policy = w.dir.file("p.toml", POLICY);
    let mut run = EgressCmd::run(&w.pair.a, cg.path(), &w.dir)
        .pinned(&pins)
        .policy(&policy)
        .start();
    let calls = probe_in(
        &w,
        &cg,
        &[
            "resolve",
            "api.example.test:443",
            "resolve",
            "other.example.test:443",
            "resolve-only",
            "bad.paste.test",
        ],
    );
    let got: Vec<_> = calls.iter().map(|c| c.result.clone()).collect();
    assert_eq!(
        got,
        [
            Succeeded,
            Denied,
            egress_tests::Verdict::Other("EAI_NONAME".into())
        ],
        "{calls:#?}"
    );
    let pid = calls[0].pid;

    // One grant: api.example.test's address, for the cgroup that asked, by the service `api`.
    let rows = grant_rows(&run.ctl(&["grants", "--json"]));
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let g = &rows[0];
    assert_eq!(
        (
            g.name.as_deref(),
            g.address,
            g.service.as_deref(),
            g.granted
        ),
        (
            Some("api.example.test"),
            "198.18.0.2".parse().unwrap(),
            Some("api"),
            true
        ),
        "{g:#?}"
    );
    assert_eq!(g.cgroup_id, cg.id(), "{g:#?}");
    assert_eq!(
        g.cgroup_path.as_deref(),
        Some(cg.path().to_str().unwrap()),
        "{g:#?}"
    );
    assert_eq!(
        (g.pid, g.comm.as_deref()),
        (Some(pid), Some("egress-probe")),
        "{g:#?}"
    );
    // dnsmasq's TTL is 300 s, within [min_ttl, max_ttl].
    assert!(
        (290..=300).contains(&g.expires_in_secs),
        "{}",
        g.expires_in_secs
    );
    // `--all` adds the name resolved that nothing approves, without a grant.
    let all = grant_rows(&run.ctl(&["grants", "--json", "--all"]));
    let other = all
        .iter()
        .find(|r| r.name.as_deref() == Some("other.example.test"))
        .unwrap_or_else(|| panic!("other.example.test under --all: {all:#?}"));
    assert_eq!(
        (other.address, other.granted, other.service.as_deref()),
        ("198.18.0.4".parse().unwrap(), false, None),
        "{other:#?}"
    );
    // The text table names it too.
    let text = run.ctl(&["grants"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("api.example.test") && text.contains("198.18.0.2"),
        "{text}"
    );

    // status: the proxy, its counters and the kernel's.
    let s = run.status().expect("egress status --json");
    let dns = &s["dns"];
    assert_eq!(dns["proxy_running"], true, "{s:#}");
    assert_eq!(dns["upstreams"][0], "127.0.0.2:53", "{s:#}");
    assert_eq!(dns["grants_live"], 1, "{s:#}");
    assert_eq!(dns["grants_capacity"], 131072, "{s:#}");
    let p = &dns["proxy"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("a number: {s:#}"));
    // A and AAAA for each of the three names.
    assert!(n(&p["queries_udp"]) + n(&p["queries_tcp"]) >= 6, "{s:#}");
    assert!(n(&p["grants"]) >= 1, "{s:#}");
    assert!(n(&p["blocked"]) >= 2, "{s:#}");
    assert!(n(&dns["sink"]["written"]) >= 1, "{s:#}");
    // At least one steered connect per name looked up.
    assert!(n(&dns["steered"]) >= 3, "{s:#}");
    assert_eq!(dns["steered"], s["counters"]["dns_steered"], "{s:#}");

    // explain NAME with a controller: what the name resolves to now.
    let policy_arg = policy.to_str().unwrap();
    let e = run.ctl(&[
        "explain",
        "--policy",
        policy_arg,
        "api.example.test",
        "--json",
    ]);
    assert!(e.status.success(), "{e:?}");
    let e: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(e["verdict"], "approved", "{e:#}");
    assert_eq!(e["live"][0]["address"], "198.18.0.2", "{e:#}");
    assert_eq!(e["live"][0]["cgroup_id"], cg.id(), "{e:#}");

    // The controller gone (kill -9): the pins still hold the grant, without its name, and
    // status says nothing answers where DNS is steered.
    run.kill_9();
    let pin_arg = pins.to_str().unwrap();
    let from_pins = grant_rows(&run.ctl(&["grants", "--json", "--pin-dir", pin_arg]));
    assert_eq!(from_pins.len(), 1, "{from_pins:#?}");
    assert_eq!(
        (
            from_pins[0].name.as_deref(),
            from_pins[0].address,
            from_pins[0].cgroup_id,
            from_pins[0].granted
        ),
        (None, "198.18.0.2".parse().unwrap(), cg.id(), true),
        "{from_pins:#?}"
    );
    let s = run.status().expect("egress status --json from the pins");
    assert_eq!(s["controller"]["running"], false, "{s:#}");
    assert_eq!(s["dns"]["proxy_running"], false, "{s:#}");
    assert_eq!(s["dns"]["grants_live"], 1, "{s:#}");
    assert!(
        s["dns"]["listen"][0]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.153:")),
        "{s:#}"
    );
}

/// No controller and nothing pinned: `egress grants` says so and fails.
#[test]
fn grants_without_a_controller_or_pins_fail_clearly() {
    let dir = TempDir::new("grants-nothing");
    let out = Command::new(bins::egress())
        .args(["grants", "--socket"])
        .arg(dir.join("no.sock"))
        .arg("--pin-dir")
        .arg(dir.join("no-pins"))
        .output()
        .expect("running egress");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("no controller answers") && err.contains("nothing is pinned"),
        "{err}"
    );
}

/// A loopback stub resolver in the path (what systemd-resolved's 127.0.0.53 is): resolv.conf
/// names only the stub, and the policy names no upstream, so the proxy takes the system's
/// resolvers: the stub itself (no /run/systemd/resolve/resolv.conf here). The enforced process's
/// query to the stub is steered to the proxy, whose own marked query reaches the stub, which
/// asks the upstream: the name resolves, its grant works, nothing loops.
#[test]
fn a_loopback_stub_resolver_in_the_path() {
    let w = world();
    let _stub = DnsServer::forwarder(
        &w.pair.a,
        "127.0.0.53".parse().unwrap(),
        "127.0.0.2:53".parse().unwrap(),
    );
    let _resolv = NetnsResolvConf::new(&w.pair.a, &["127.0.0.53".parse().unwrap()], "");
    let policy = w.dir.file(
        "p.toml",
        &POLICY.replace("upstream = [\"127.0.0.2\"]\n", ""),
    );
    assert!(
        !std::fs::read_to_string(&policy)
            .unwrap()
            .contains("upstream")
    );
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&policy)
        .probe(["resolve", "api.example.test:443", "tcp", "198.18.0.4:443"])
        .output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<_> = lines(&out.stdout)
        .into_iter()
        .map(|l| (l.result, l.from))
        .collect();
    assert_eq!(
        got,
        [(Succeeded, Some("198.18.0.2".to_string())), (Denied, None)],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod's view of `--dns-listen` on a node address: the controller (and its proxy) in namespace
/// b, listening on b's veth address; the process in namespace a and the enforced cgroup. Its
/// query to a server that does not exist is steered across the veth and answered (the answer
/// shows the server asked). The proxy finds the asking socket with sock_diag in its own
/// namespace, which does not see namespace a: no grant, so the connect to the answer is denied
/// (what README's Names section says of other namespaces).
#[test]
fn a_proxy_on_a_non_loopback_address_answers_other_namespaces_without_grants() {
    let pair = NetPair::new();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let _dns = DnsServer::start(
        &pair.b,
        ip("127.0.0.2"),
        &[Record::Addr("api.example.test", ip("198.18.0.2"), 300)],
    );
    let _sink = TcpSink::start(&pair.b, (std::net::Ipv4Addr::new(198, 18, 0, 2), 443));
    let dir = TempDir::new("e2e-names-listen");
    let cg = TestCgroup::new();
    let policy = dir.file("p.toml", POLICY);
    let c = EgressCmd::run(&pair.b, cg.path(), &dir)
        .policy(&policy)
        .args(["--dns-listen", "198.18.0.2"])
        .start();
    let got: Vec<_> = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "2")
        .args([
            "dns-query",
            "api.example.test",
            "10.53.0.1:53",
            "tcp",
            "198.18.0.2:443",
        ])
        .run()
        .into_iter()
        .map(|l| (l.result, l.from))
        .collect();
    assert_eq!(
        got,
        [(Succeeded, Some("198.18.0.2".to_string())), (Denied, None)],
        "steered across the veth and answered; no grant"
    );
    let s = c.status().unwrap();
    assert_eq!(s["dns"]["listen"][0], "198.18.0.2:53", "{s}");
    assert!(s["dns"]["steered"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        s["dns"]["sink"]["unknown_client"].as_u64().unwrap() >= 1,
        "{s}"
    );
}

/// `--dns-listen` values are checked before anything is loaded.
#[test]
fn a_bad_dns_listen_address_is_refused_before_anything_is_loaded() {
    let pair = NetPair::new();
    let dir = TempDir::new("e2e-names-listen-bad");
    let cg = TestCgroup::new();
    let policy = dir.file("p.toml", POLICY);
    let mut c = EgressCmd::run(&pair.a, cg.path(), &dir)
        .policy(&policy)
        .args(["--dns-listen", "0.0.0.0"])
        .spawn();
    let status = c.wait_exit("egress run with --dns-listen 0.0.0.0");
    assert!(!status.success());
    assert!(
        c.stderr_text().contains("--dns-listen 0.0.0.0"),
        "{}",
        c.stderr_text()
    );
}
