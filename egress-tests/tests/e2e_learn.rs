//! End-to-end tests of learning mode: `egress learn -- CMD` observes a workload in audit mode
//! (TCP to two ports, unconnected UDP, one destination by name through a dnsmasq upstream in the
//! test namespace), the draft passes `egress check`, and the same workload replayed under
//! `egress exec --policy draft.toml` (enforce) is denied nothing, while a destination not seen,
//! a name not seen and another executable are denied. `--cgroup DIR` observes a cgroup the test
//! made until interrupted; `--duration` bounds learning. Nothing leaves the test namespaces.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use egress_tests::{
    EgressCmd, NetPair, TcpSink, TempDir, TestCgroup,
    Verdict::{Denied, Succeeded},
    bins,
    dns::{DnsServer, NetnsResolvConf, Record},
    events,
    netns::VETH_B,
    probe::parse_calls,
    wait_for,
};

/// Namespace a (egress, the workload, dnsmasq on 127.0.0.2) and b (the servers: 198.18.0.2-.5
/// on TCP 80, 81 and 443).
struct World {
    pair: NetPair,
    _dns: DnsServer,
    _resolv: NetnsResolvConf,
    _sinks: Vec<TcpSink>,
    dir: TempDir,
}

fn world(tag: &str) -> World {
    let pair = NetPair::new();
    for last in 3..=5 {
        pair.b
            .ip(&["addr", "add", &format!("198.18.0.{last}/24"), "dev", VETH_B]);
    }
    let mut sinks = Vec::new();
    for last in 2..=5 {
        for port in [80, 81, 443] {
            sinks.push(TcpSink::start(
                &pair.b,
                (Ipv4Addr::new(198, 18, 0, last), port),
            ));
        }
    }
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let dns = DnsServer::start(
        &pair.a,
        ip("127.0.0.2"),
        &[
            Record::Addr("api.example.test", ip("198.18.0.2"), 300),
            Record::Addr("other.example.test", ip("198.18.0.5"), 300),
        ],
    );
    // A nameserver that does not exist: only the steering to egress's proxy answers.
    let resolv = NetnsResolvConf::new(&pair.a, &[ip("10.53.0.1")], "timeout:2 attempts:1");
    World {
        pair,
        _dns: dns,
        _resolv: resolv,
        _sinks: sinks,
        dir: TempDir::new(tag),
    }
}

/// The workload: one process (so its executable is read while it runs).
const WORKLOAD: [&str; 12] = [
    "resolve",
    "api.example.test:443",
    "tcp",
    "198.18.0.3:80",
    "tcp",
    "198.18.0.3:81",
    "udp-sendto",
    "198.18.0.4:5353",
    "socket",
    "raw4",
    "sleep",
    "300",
];

fn egress_check(file: &Path) -> std::process::Output {
    Command::new(bins::egress())
        .args(["check"])
        .arg(file)
        .output()
        .expect("running egress check")
}

#[test]
fn a_learned_draft_allows_the_replayed_workload_and_nothing_else() {
    let w = world("e2e-learn");
    let draft = w.dir.join("draft.toml");
    let learn_events = w.dir.join("learn-events.jsonl");
    let started = Instant::now();
    let out = EgressCmd::learn(&w.pair.a)
        .netns_sysfs()
        .args(["--dns-upstream", "127.0.0.2", "--output"])
        .arg(&draft)
        .arg("--events")
        .arg(&learn_events)
        .probe(WORKLOAD)
        .output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "egress learn failed: {stderr}");
    // Audit: nothing was refused while learning.
    let calls = parse_calls(&out.stdout);
    assert_eq!(calls.len(), 6, "{calls:#?}\n{stderr}");
    assert!(
        calls.iter().all(|c| c.result == Succeeded),
        "learning refused something: {calls:#?}\n{stderr}"
    );
    eprintln!("learned in {:?}", started.elapsed());
    let text = std::fs::read_to_string(&draft).expect("the draft was written");
    eprintln!("{text}");
    let audits = events::of_kind(&learn_events, "audit");
    assert_eq!(
        audits.len(),
        5,
        "one audit event per connect, datagram and socket: {audits:#?}"
    );
    assert!(events::of_kind(&learn_events, "deny").is_empty());

    // What the draft says: the name, not its address; the ports and protocols used; the
    // executable and user; how often; the upstream; nothing lost.
    let probe = std::fs::canonicalize(bins::probe()).unwrap();
    for needle in [
        "\"api.example.test\",  # 1 connection".to_string(),
        "(as 198.18.0.2)".into(),
        "\"198.18.0.3\",  # 2 connections".into(),
        "ports = [\"80-81\"]".into(),
        "\"198.18.0.4\",  # 1 datagram".into(),
        "ports = [5353]".into(),
        "protocols = [\"udp\"]".into(),
        format!("executables = [\"{}\"]", probe.display()),
        "users = [\"root\"]".into(),
        "upstream = [\"127.0.0.2\"]".into(),
        "# Events lost: 0".into(),
        "mode = \"enforce\"".into(),
        "raw = \"allow\"  # 1 socket,".into(),
        "default = \"deny\"".into(),
    ] {
        assert!(
            text.contains(&needle),
            "the draft lacks {needle:?}:\n{text}"
        );
    }
    assert!(
        !text.contains("\"198.18.0.2\""),
        "the named destination is listed as an address too:\n{text}"
    );
    assert!(text.contains("the command `"), "{text}");

    let check = egress_check(&draft);
    assert!(
        check.status.success(),
        "egress check refused the draft: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Replayed in enforce mode: zero denies.
    let replay_events = w.dir.join("replay-events.jsonl");
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&draft)
        .events(&replay_events)
        .probe(WORKLOAD)
        .output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    let calls = parse_calls(&out.stdout);
    assert_eq!(calls.len(), 6, "{calls:#?}\n{stderr}");
    assert!(
        calls.iter().all(|c| c.result == Succeeded),
        "the replay was refused something: {calls:#?}\n{stderr}"
    );
    let denies = events::of_kind(&replay_events, "deny");
    assert!(denies.is_empty(), "denies on replay: {denies:#?}");

    // Not seen: another address, another port, another protocol, a name that resolves to an
    // address not learned. All denied.
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&draft)
        .probe([
            "tcp",
            "198.18.0.5:443",
            "tcp",
            "198.18.0.3:443",
            "udp-sendto",
            "198.18.0.3:80",
            "resolve",
            "other.example.test:443",
            // A connect to the learned name's address without resolving it: no grant yet.
            "tcp",
            "198.18.0.2:443",
            // Resolved, then the learned port: allowed (the control of the line above).
            "resolve",
            "api.example.test:443",
            // A socket kind not seen.
            "socket",
            "udplite",
        ])
        .output();
    let got: Vec<_> = parse_calls(&out.stdout)
        .into_iter()
        .map(|c| c.result)
        .collect();
    assert_eq!(
        got,
        [Denied, Denied, Denied, Denied, Denied, Succeeded, Denied],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another executable (a copy of the probe: another inode) to a learned destination: denied.
    let copy = w.dir.join("other-probe");
    std::fs::copy(bins::probe(), &copy).unwrap();
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&draft)
        .command([copy.as_os_str()])
        .command(["tcp", "198.18.0.3:80", "resolve", "api.example.test:443"])
        .output();
    let got: Vec<_> = parse_calls(&out.stdout)
        .into_iter()
        .map(|c| (c.result, c.from))
        .collect();
    // The name still resolves (the proxy answers every name the policy does not block), but
    // its grant carries the service's scope: the copy's connect is refused.
    assert_eq!(
        got,
        [(Denied, None), (Denied, Some("198.18.0.2".to_string()))],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--policy BASE`: learning runs under the base (in audit mode), so only what it does not
/// allow is learned; the draft is the base as it is plus those services; what a block of the
/// base refuses stays refused.
#[test]
fn learning_from_a_base_policy_extends_it() {
    const BASE: &str = "# the team's base policy\nmode = \"enforce\"\n\n[[service]]\nname = \"web-80\"\ndestinations = [\"198.18.0.3\"]\nports = [80]\nprotocols = [\"tcp\"]\n\n[[block]]\nname = \"no-5353\"\ndestinations = [\"198.18.0.4\"]\nports = [5353]\n";
    let w = world("e2e-learn-base");
    let base = w.dir.file("base.toml", BASE);
    let draft = w.dir.join("extended.toml");
    let out = EgressCmd::learn(&w.pair.a)
        .netns_sysfs()
        .args(["--dns-upstream", "127.0.0.2", "--policy"])
        .arg(&base)
        .arg("--output")
        .arg(&draft)
        .probe(WORKLOAD)
        .output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Audit: the base's block refused nothing while learning.
    assert!(
        parse_calls(&out.stdout)
            .iter()
            .all(|c| c.result == Succeeded),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&draft).unwrap();
    eprintln!("{text}");
    assert!(text.contains(BASE), "the base is kept as it is:\n{text}");
    // Port 80 was the base's: only 81 is learned for 198.18.0.3.
    assert!(text.contains("ports = [81]"), "{text}");
    assert!(!text.contains("\"80-81\""), "{text}");
    assert!(
        text.contains("refused or reported by `no-5353` of the base policy"),
        "{text}"
    );
    assert!(egress_check(&draft).status.success());
    let replay_events = w.dir.join("base-replay.jsonl");
    let out = EgressCmd::exec(&w.pair.a)
        .netns_sysfs()
        .policy(&draft)
        .events(&replay_events)
        .probe(WORKLOAD)
        .output();
    let got: Vec<_> = parse_calls(&out.stdout)
        .into_iter()
        .map(|c| c.result)
        .collect();
    // Everything but what the base's block refuses.
    assert_eq!(
        got,
        [
            Succeeded, Succeeded, Succeeded, Denied, Succeeded, Succeeded
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let denies = events::of_kind(&replay_events, "deny");
    assert!(
        denies.len() == 1 && denies[0]["rule"] == "no-5353",
        "{denies:#?}"
    );
}

#[test]
fn learning_a_cgroup_until_interrupted() {
    let w = world("e2e-learn-cgroup");
    let cg = TestCgroup::new();
    let draft = w.dir.join("cgroup-draft.toml");
    let mut learn = EgressCmd::learn(&w.pair.a)
        .args([
            "--dns-upstream",
            "127.0.0.2",
            "--by",
            "exe",
            "--duration",
            "5m",
            "--cgroup",
        ])
        .arg(cg.path())
        .arg("--output")
        .arg(&draft)
        .spawn();
    wait_for("egress learn to attach", Duration::from_secs(30), || {
        if let Some(st) = learn.exited() {
            panic!("egress learn exited early ({st}): {}", learn.stderr_text());
        }
        learn.stderr_text().contains("learning (audit mode")
    });
    let mut cmd = w.pair.a.cmd(bins::probe());
    // A query to a server that does not exist: steered to the proxy, answered by dnsmasq.
    cmd.args([
        "tcp",
        "198.18.0.4:81",
        "tcp",
        "198.18.0.4:81",
        "dns-query",
        "api.example.test",
        "10.53.0.1:53",
        "tcp",
        "198.18.0.2:443",
        "sleep",
        "300",
    ]);
    cg.join_on_exec(&mut cmd);
    let out = cmd.output().expect("running the probe in the cgroup");
    let calls = parse_calls(&out.stdout);
    assert!(
        calls.len() == 5 && calls.iter().all(|c| c.result == Succeeded),
        "{calls:#?}"
    );
    assert_eq!(calls[2].from.as_deref(), Some("198.18.0.2"), "{calls:#?}");
    // A process outside the cgroup is not observed.
    let out = w
        .pair
        .a
        .cmd(bins::probe())
        .args(["tcp", "198.18.0.5:80"])
        .output()
        .unwrap();
    assert_eq!(parse_calls(&out.stdout)[0].result, Succeeded);
    let st = learn.stop(libc::SIGINT);
    assert!(st.success(), "{st}: {}", learn.stderr_text());
    let text = std::fs::read_to_string(&draft).expect("the draft was written on SIGINT");
    eprintln!("{text}");
    assert!(text.contains("\"198.18.0.4\",  # 2 connections"), "{text}");
    assert!(text.contains("ports = [81]"), "{text}");
    assert!(!text.contains("198.18.0.5"), "outside the cgroup:\n{text}");
    assert!(!text.contains("users ="), "--by exe:\n{text}");
    assert!(text.contains("executables = ["), "{text}");
    // The address reached after the lookup is written as the name.
    assert!(
        text.contains("\"api.example.test\",  # 1 connection"),
        "{text}"
    );
    assert!(!text.contains("\"198.18.0.2\""), "{text}");
    assert!(text.contains("Names: from egress's DNS proxy"), "{text}");
    assert!(
        text.contains(&format!("cgroup {}", cg.path().display())),
        "{text}"
    );
    assert!(egress_check(&draft).status.success());
}

#[test]
fn duration_bounds_learning() {
    let w = world("e2e-learn-duration");
    let draft = w.dir.join("d.toml");
    let started = Instant::now();
    let out = EgressCmd::learn(&w.pair.a)
        .args(["--duration", "2s", "--output"])
        .arg(&draft)
        .command(["sleep", &(60 * egress_tests::timeout_scale()).to_string()])
        .output();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "learning ended by --duration exits 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_secs(2),
        "ended before the duration: {took:?}"
    );
    // 2 s, the command's SIGTERM, the datapath loaded on a loaded machine: far from the
    // sleeper's 60 s (both stretched in VMs, where the load alone takes half a minute).
    assert!(
        took < Duration::from_secs(30) * egress_tests::timeout_scale(),
        "not bounded: {took:?}"
    );
    let text = std::fs::read_to_string(&draft).unwrap();
    assert!(
        text.contains("Nothing was observed that needs a service"),
        "{text}"
    );
    assert!(egress_check(&draft).status.success());

    // The command's own exit ends learning early, with its status.
    let started = Instant::now();
    let out = EgressCmd::learn(&w.pair.a)
        .args(["--duration", "5m", "--output"])
        .arg(&draft)
        .command(["sh", "-c", "exit 3"])
        .output();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// The ring buffer can fill under a burst: every call is either tallied in the draft or counted
/// as lost in its header, never silently missing.
#[test]
fn every_datagram_is_tallied_or_counted_lost() {
    let w = world("e2e-learn-burst");
    // The object's own 1 MiB ring holds about 11,900 records: the burst may overflow it (how
    // much depends on how fast the controller drains), and what is lost is counted.
    burst(&w, 1);
    // Learn's default of 16 MiB holds the whole burst (50,000 x 88 bytes) even if the
    // controller read nothing meanwhile: nothing may be lost.
    assert_eq!(burst(&w, 16), 0);
}

/// Learns 50,000 unconnected datagrams with a ring of `mib`; returns how many events were lost.
fn burst(w: &World, mib: u32) -> u64 {
    const N: u64 = 50_000;
    let draft = w.dir.join("burst.toml");
    let started = Instant::now();
    let out = EgressCmd::learn(&w.pair.a)
        .args(["--no-names", "--ring-mib", &mib.to_string(), "--output"])
        .arg(&draft)
        .probe([
            "udp-send",
            "198.18.0.4:9",
            &N.to_string(),
            "16",
            "sleep",
            "300",
        ])
        .output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&draft).unwrap();
    let number_after = |prefix: &str| -> u64 {
        let rest = &text[text
            .find(prefix)
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"))
            + prefix.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {prefix:?}:\n{text}"))
    };
    let datagrams = number_after("datagrams: ");
    let lost = number_after("# Events lost: ");
    eprintln!(
        "ring {mib} MiB: {N} datagrams in {:?}: {datagrams} tallied, {lost} lost",
        started.elapsed()
    );
    assert_eq!(datagrams + lost, N, "{text}");
    assert_eq!(
        text.contains("WARNING: the kernel's event ring was full"),
        lost > 0,
        "{text}"
    );
    if datagrams > 0 {
        assert!(text.contains("\"198.18.0.4\",  # "), "{text}");
    }
    lost
}
