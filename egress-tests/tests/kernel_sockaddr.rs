//! Real-kernel tests of the cgroup hooks (connect4/6, sendmsg4/6): load the real eBPF object
//! in-process, attach it to a child cgroup made by the test, and drive real sockets on loopback
//! addresses from `egress-probe` inside that cgroup. They need root and fail (never skip) when
//! the programs cannot load.

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    str::FromStr,
};

use egress::{
    datapath::Datapath, events::JsonEvent, policy::Policy, policy::compile::CompiledPolicy,
};
use egress_common::{IPPROTO_TCP, IPPROTO_UDP};
use egress_tests::{
    Probe, TestCgroup,
    Verdict::{Denied, Refused, Succeeded},
    probe, probe_with_pid,
};

fn load(text: &str) -> (Datapath, CompiledPolicy) {
    let p = Policy::parse("test.toml", text).unwrap_or_else(|e| panic!("{e}"));
    let c = CompiledPolicy::compile(&p).unwrap_or_else(|e| panic!("{e}"));
    let dp = Datapath::load(&c)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    (dp, c)
}

const LOOPBACK_POLICY: &str = r#"
mode = "enforce"
default = "deny"
allow_loopback = false

[[service]]
name = "v4-tcp-web"
destinations = ["127.0.0.2"]
ports = [80, "8000-8080"]
protocols = ["tcp"]

[[service]]
name = "v4-udp"
destinations = ["127.0.0.3"]
protocols = ["udp"]

[[service]]
name = "v6-local"
destinations = ["::1"]
ports = ["9000-9100"]

[[service]]
name = "net-127"
destinations = ["127.0.0.0/8"]
ports = [7000]

[[block]]
name = "no-127-5"
destinations = ["127.0.0.5/32"]
"#;

#[test]
fn tcp_v4_and_v6_allow_and_deny() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).expect("attach");
    let r = probe(
        &cg,
        &[
            ("tcp", "127.0.0.2:80"),
            ("tcp", "127.0.0.2:81"),
            ("tcp", "127.0.0.4:80"),
            ("tcp", "[::1]:9050"),
            ("tcp", "[::1]:9101"),
        ],
    );
    assert_eq!(r, [Refused, Denied, Denied, Refused, Denied]);
}

#[test]
fn tcp_to_a_real_listener_connects() {
    let cg = TestCgroup::new();
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let policy = format!(
        "allow_loopback = false\n[[service]]\nname = \"srv\"\ndestinations = [\"127.0.0.2\"]\nports = [{port}]\n"
    );
    let (mut dp, _) = load(&policy);
    dp.attach(cg.path()).unwrap();
    let r = probe(
        &cg,
        &[
            ("tcp", &format!("127.0.0.2:{port}")),
            ("tcp", &format!("127.0.0.1:{port}")),
        ],
    );
    assert_eq!(r, [Succeeded, Denied]);
}

#[test]
fn connected_and_unconnected_udp_v4_and_v6() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).unwrap();
    let r = probe(
        &cg,
        &[
            ("udp-connect", "127.0.0.3:5353"),
            ("udp-sendto", "127.0.0.3:5353"),
            ("udp-connect", "127.0.0.2:80"),
            ("udp-sendto", "127.0.0.2:80"),
            ("udp-connect", "[::1]:9000"),
            ("udp-sendto", "[::1]:9000"),
            ("udp-connect", "[::1]:53"),
            ("udp-sendto", "[::1]:53"),
        ],
    );
    assert_eq!(
        r,
        [
            Succeeded, Succeeded, Denied, Denied, Succeeded, Succeeded, Denied, Denied
        ]
    );
}

#[test]
fn v4_mapped_ipv6_is_judged_as_ipv4() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).unwrap();
    let r = probe(
        &cg,
        &[
            ("tcp", "[::ffff:127.0.0.2]:80"),
            ("tcp", "[::ffff:127.0.0.4]:80"),
            ("udp-sendto", "[::ffff:127.0.0.3]:53"),
            ("udp-connect", "[::ffff:127.0.0.4]:53"),
            ("tcp", "[::ffff:127.0.0.5]:7000"),
        ],
    );
    assert_eq!(r, [Refused, Denied, Succeeded, Denied, Denied]);
}

#[test]
fn port_ranges_are_inclusive() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).unwrap();
    let r = probe(
        &cg,
        &[
            ("tcp", "127.0.0.2:7999"),
            ("tcp", "127.0.0.2:8000"),
            ("tcp", "127.0.0.2:8080"),
            ("tcp", "127.0.0.2:8081"),
        ],
    );
    assert_eq!(r, [Denied, Refused, Refused, Denied]);
}

#[test]
fn block_wins_over_service() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).unwrap();
    // net-127 approves 127.0.0.0/8 port 7000; the /32 block on 127.0.0.5 still wins, and a
    // broader block wins over a narrower service too (below).
    let r = probe(
        &cg,
        &[
            ("tcp", "127.0.0.4:7000"),
            ("tcp", "127.0.0.5:7000"),
            ("udp-sendto", "127.0.0.5:7000"),
        ],
    );
    assert_eq!(r, [Refused, Denied, Denied]);

    let cg2 = TestCgroup::new();
    let (mut dp2, _) = load(
        "allow_loopback = false\n[[service]]\nname = \"narrow\"\ndestinations = [\"127.0.0.9\"]\n[[block]]\nname = \"broad\"\ndestinations = [\"127.0.0.0/24\"]\n",
    );
    dp2.attach(cg2.path()).unwrap();
    assert_eq!(probe(&cg2, &[("tcp", "127.0.0.9:80")]), [Denied]);
}

/// TCP Fast Open connects from inside sendto(MSG_FASTOPEN): the connect hook still judges it
/// (the kernel runs it from the fast-open path too), so data never reaches a denied host.
#[test]
fn tcp_fast_open_is_judged_like_a_connect() {
    let cg = TestCgroup::new();
    let listener = TcpListener::bind("127.0.0.4:7000").unwrap();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).unwrap();
    let r = probe(
        &cg,
        &[
            ("tcp-fastopen", "127.0.0.5:7000"),
            ("tcp-fastopen", "127.0.0.4:7000"),
        ],
    );
    assert_eq!(
        r,
        [Denied, Succeeded],
        "the blocked host refused, the approved one reached"
    );
    drop(listener);
}

#[test]
fn audit_mode_allows_and_reports() {
    let cg = TestCgroup::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (mut dp, compiled) = load("mode = \"audit\"\nallow_loopback = false\n");
    let mut ring = dp.take_events().unwrap();
    dp.attach(cg.path()).unwrap();
    let (r, pid) = probe_with_pid(&cg, &[("tcp", &format!("127.0.0.1:{port}"))]);
    assert_eq!(r, [Succeeded], "audit mode must not block");
    let item = ring.try_next().expect("an audit event");
    let ev = JsonEvent::from_raw(&item, &compiled, "");
    assert_eq!(ev.event, "audit");
    assert_eq!(ev.pid, pid);
    assert_eq!(ev.dst, "127.0.0.1");
    assert_eq!(ev.port, port);
    assert_eq!(ev.rule, "default");
    let stats = dp.stats().unwrap();
    assert_eq!((stats.audited, stats.denied), (1, 0));
}

#[test]
fn deny_events_carry_the_full_context() {
    let cg = TestCgroup::new();
    let (mut dp, compiled) = load(LOOPBACK_POLICY);
    let mut ring = dp.take_events().unwrap();
    dp.attach(cg.path()).unwrap();
    let (r, pid) = probe_with_pid(
        &cg,
        &[
            ("tcp", "127.0.0.5:7000"),
            ("udp-sendto", "[::1]:53"),
            ("tcp", "[::ffff:127.0.0.4]:81"),
            ("udp-sendto", "[::ffff:127.0.0.4]:53"),
        ],
    );
    assert_eq!(r, [Denied, Denied, Denied, Denied]);
    let mut events = Vec::new();
    while let Some(item) = ring.try_next() {
        events.push(JsonEvent::from_raw(&item, &compiled, ""));
    }
    assert_eq!(events.len(), 4, "{events:#?}");
    let cgroup_id = cg.id();
    for e in &events {
        assert_eq!(e.event, "deny");
        assert_eq!(e.pid, pid);
        assert_eq!(e.comm, "egress-probe");
        assert_eq!(e.uid, 0);
        assert_eq!(
            e.cgroup_id, cgroup_id,
            "cgroup id is the test cgroup's inode"
        );
        assert!(e.ts.ends_with('Z'));
        assert_eq!(e.generation, 1);
    }
    assert_eq!(
        (events[0].hook.as_str(), events[0].protocol.as_str()),
        ("connect4", "tcp")
    );
    assert_eq!(
        (
            events[0].dst.as_str(),
            events[0].port,
            events[0].rule.as_str()
        ),
        ("127.0.0.5", 7000, "no-127-5")
    );
    assert_eq!(
        (
            events[1].hook.as_str(),
            events[1].family.as_str(),
            events[1].protocol.as_str()
        ),
        ("sendmsg6", "ipv6", "udp")
    );
    assert_eq!(
        (events[1].dst.as_str(), events[1].rule.as_str()),
        ("::1", "default")
    );
    assert_eq!(
        (
            events[2].hook.as_str(),
            events[2].dst.as_str(),
            events[2].v4_mapped
        ),
        ("connect6", "::ffff:127.0.0.4", true)
    );
    // Unconnected UDP from an AF_INET6 socket to a v4-mapped address runs the sendmsg4 hook; the
    // event still shows the address as the process gave it.
    assert_eq!(
        (
            events[3].hook.as_str(),
            events[3].family.as_str(),
            events[3].dst.as_str(),
            events[3].v4_mapped
        ),
        ("sendmsg4", "ipv6", "::ffff:127.0.0.4", true)
    );
    assert_eq!(dp.stats().unwrap().denied, 4);
}

#[test]
fn full_ring_buffer_keeps_the_verdict_and_counts_the_loss() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load("allow_loopback = false\n");
    let _ring = dp.take_events().unwrap(); // never drained
    dp.attach(cg.path()).unwrap();
    // 1 MiB ring, 88 bytes a record: 20,000 denies overflow it.
    let line = Probe::new()
        .cgroup(&cg)
        .opt("--count", "20000")
        .call("udp-sendto", "127.0.0.9:9")
        .summary();
    assert_eq!(line.times(&Denied), 20000, "every call denied: {line:?}");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.denied, 20000);
    assert!(
        stats.events_lost > 0 && stats.events_lost < 20000,
        "{stats:?}"
    );
}

#[test]
fn loopback_shortcut_in_the_kernel() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(
        "allow_loopback = true\n[[block]]\nname = \"b\"\ndestinations = [\"127.0.0.0/8\", \"::1\"]\n",
    );
    dp.attach(cg.path()).unwrap();
    let r = probe(
        &cg,
        &[
            ("tcp", "127.0.0.7:1"),
            ("tcp", "[::1]:1"),
            ("tcp", "[::ffff:127.0.0.7]:1"),
        ],
    );
    assert!(r.iter().all(|x| x.passed()), "{r:?}");
}

#[test]
fn kernel_and_explain_agree() {
    // One policy, a grid of loopback destinations, ports and protocols: the kernel's verdict
    // (EPERM or not) must equal CompiledPolicy::evaluate, which `egress explain` prints.
    let policy = r#"
allow_loopback = false
[[service]]
name = "wide"
destinations = ["127.0.0.0/8"]
ports = [443]
[[service]]
name = "mid-udp"
destinations = ["127.0.0.0/29"]
ports = ["5000-5010"]
protocols = ["udp"]
[[service]]
name = "host"
destinations = ["127.0.0.6", "::1"]
ports = [22, "8000-8001"]
[[block]]
name = "deny-4-7"
destinations = ["127.0.0.4/31"]
ports = [443, 5005]
[[block]]
name = "v6-high"
destinations = ["::1"]
ports = ["8001-9000"]
"#;
    let cg = TestCgroup::new();
    let (mut dp, compiled) = load(policy);
    dp.attach(cg.path()).unwrap();
    let hosts = [
        "127.0.0.1",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.9",
        "::1",
        "::ffff:127.0.0.4",
        "::ffff:127.0.0.6",
    ];
    let ports = [22u16, 443, 5000, 5005, 5011, 8000, 8001];
    let mut calls: Vec<(String, String, IpAddr, u16, u8)> = Vec::new();
    for h in hosts {
        let ip = IpAddr::from_str(h).unwrap();
        for p in ports {
            let sa = SocketAddr::new(ip, p).to_string();
            calls.push(("tcp".into(), sa.clone(), ip, p, IPPROTO_TCP));
            calls.push(("udp-sendto".into(), sa, ip, p, IPPROTO_UDP));
        }
    }
    let args: Vec<(&str, &str)> = calls
        .iter()
        .map(|(o, a, ..)| (o.as_str(), a.as_str()))
        .collect();
    let results = probe(&cg, &args);
    let mut allowed = 0;
    for ((op, addr, ip, port, proto), got) in calls.iter().zip(&results) {
        let want = compiled.evaluate(*ip, *port, *proto);
        assert_eq!(
            got.passed(),
            want.allow,
            "{op} {addr}: kernel said {got}, explain said {want:?}"
        );
        allowed += usize::from(want.allow);
    }
    assert!(
        allowed > 5 && allowed < calls.len() - 5,
        "the grid exercises both verdicts ({allowed}/{})",
        calls.len()
    );
}

#[test]
fn hundred_thousand_prefixes_load_and_enforce() {
    let mut dests = Vec::with_capacity(100_000);
    for i in 0..100_000u32 {
        // Distinct, non-contiguous /24 slots (an odd multiplier permutes them) in 11.0.0.0 and
        // 12.0.0.0, every fifth one narrowed to a /28.
        let slot = (i % 65_536).wrapping_mul(40_503) % 65_536;
        let net = ((11 + i / 65_536) << 24) | (slot << 8);
        let len = if i % 5 == 0 { 28 } else { 24 };
        dests.push(format!("\"{}/{len}\"", std::net::Ipv4Addr::from(net)));
    }
    dests.sort();
    dests.dedup();
    let policy = format!(
        "allow_loopback = false\n[[service]]\nname = \"big\"\ndestinations = [{}]\n[[service]]\nname = \"lo\"\ndestinations = [\"127.0.0.2\"]\n",
        dests.join(",")
    );
    let cg = TestCgroup::new();
    let (mut dp, compiled) = load(&policy);
    assert_eq!(compiled.v4.len(), 100_001);
    dp.attach(cg.path()).unwrap();
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:1"), ("tcp", "127.0.0.3:1")]),
        [Refused, Denied]
    );
}

/// IPv6 destinations that carry an IPv4 address (NAT64 well-known and site prefixes, 6to4,
/// v4-compatible) are judged as that IPv4 address too, so an IPv4 block is not dodged through a
/// translator; `explain` agrees with the kernel on each. The probe runs in a namespace with only
/// loopback: an allowed call fails with ENETUNREACH and nothing leaves the host.
#[test]
fn ipv6_carrying_a_blocked_ipv4_address_is_denied() {
    const POLICY: &str = r#"
mode = "enforce"
default = "allow"
allow_loopback = false
nat64_prefixes = ["fd00:64::/96"]

[[block]]
name = "blocked-v4"
destinations = ["198.51.100.0/24"]
"#;
    let ns = egress_tests::LoopNs::new();
    let cg = TestCgroup::new();
    let (mut dp, compiled) = load(POLICY);
    dp.attach(cg.path()).expect("attach");
    let cases: [(&str, &str, bool); 8] = [
        ("tcp", "[64:ff9b::198.51.100.7]:443", false),
        ("tcp", "[fd00:64::198.51.100.7]:443", false),
        ("tcp", "[2002:c633:6407::1]:443", false),
        ("tcp", "[::198.51.100.7]:443", false),
        ("udp-sendto", "[64:ff9b::198.51.100.7]:53", false),
        ("tcp", "[64:ff9b::203.0.113.7]:443", true),
        ("tcp", "[fd00:65::198.51.100.7]:443", true),
        ("tcp", "[2001:db8::198.51.100.7]:443", true),
    ];
    let mut p = Probe::new().netns(&ns).cgroup(cg.path());
    for (op, addr, _) in cases {
        p = p.call(op, addr);
    }
    let got = p.verdicts();
    for ((op, addr, allowed), verdict) in cases.iter().zip(&got) {
        let expected = if *allowed {
            egress_tests::Verdict::Other("ENETUNREACH".into())
        } else {
            Denied
        };
        assert_eq!(verdict, &expected, "{op} {addr}");
        let sa = SocketAddr::from_str(addr).unwrap();
        let proto = if *op == "tcp" {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        };
        let e = compiled.evaluate(sa.ip(), sa.port(), proto);
        assert_eq!(e.allow, *allowed, "explain disagrees on {addr}: {e:?}");
        if !*allowed {
            assert_eq!(compiled.rule_name(e.rule_id), "blocked-v4", "{addr}");
            assert!(e.carried_v4.is_some(), "{addr}");
        }
    }
}

/// A connected UDP socket that sends with a cmsg reaches the sendmsg hook with no address: the
/// hook judges the socket's peer. With `allow_loopback = false` an approved peer passes (the
/// zero address used to be judged, and denied).
#[test]
fn connected_udp_with_a_cmsg_is_judged_by_its_peer() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load(LOOPBACK_POLICY);
    dp.attach(cg.path()).expect("attach");
    let r = probe(
        &cg,
        &[
            ("udp-connect-cmsg", "127.0.0.3:9"),
            ("udp-connect-cmsg", "[::1]:9050"),
        ],
    );
    assert_eq!(r, [Succeeded, Succeeded]);
}

/// The other half: with `allow_loopback = true` the zero address counted as "this host", so a
/// socket connected while its peer was approved kept sending after a reload denied it. The peer
/// is judged now: the send after the reload is refused.
#[test]
fn connected_udp_with_a_cmsg_is_denied_once_its_peer_is() {
    const ALLOW: &str = "allow_loopback = true\n[[service]]\nname = \"peer\"\ndestinations = [\"198.18.0.2\"]\nprotocols = [\"udp\"]\n";
    const DENY: &str = "allow_loopback = true\n[[block]]\nname = \"peer-now-blocked\"\ndestinations = [\"198.18.0.2\"]\n";
    let pair = egress_tests::NetPair::new();
    let cg = TestCgroup::new();
    let (mut dp, _) = load(ALLOW);
    dp.attach(cg.path()).expect("attach");
    let dir = egress_tests::TempDir::new("cmsg");
    let go = dir.join("go");
    let mut probe = Probe::new()
        .netns(&pair.a)
        .cgroup(cg.path())
        .args(["udp-connect-cmsg", "198.18.0.2:9", "--then"])
        .args([go.as_os_str()])
        .spawn();
    let mut connected = go.clone().into_os_string();
    connected.push(".connected");
    egress_tests::wait_for(
        "the probe's connect",
        std::time::Duration::from_secs(10),
        || std::path::Path::new(&connected).exists(),
    );
    let deny = CompiledPolicy::compile(&Policy::parse("deny.toml", DENY).unwrap()).unwrap();
    dp.reload(&deny).expect("reload");
    std::fs::write(&go, b"").unwrap();
    probe.wait_within("the probe", std::time::Duration::from_secs(10));
    assert_eq!(egress_tests::probe::verdicts(&probe.stdout()), [Denied]);
}

/// `[sockets]`: in an enforced cgroup, raw sockets and other IP protocols are refused at
/// creation (EPERM, a `sock_create` event naming the class); ping sockets are created and, with
/// `icmp = "policy"`, every echo request they send is judged at TC like a connect, default
/// included (their sendto passes no cgroup hook). The probe runs in a namespace of its own, with
/// TC on its loopback.
#[test]
fn sockets_beyond_tcp_and_udp_follow_the_policy() {
    const POLICY: &str = r#"
mode = "enforce"
allow_loopback = false
[sockets]
raw = "deny"
icmp = "policy"
other = "deny"
[[service]]
name = "ping-ok"
destinations = ["127.0.0.1", "127.0.0.2", "::1"]
protocols = ["icmp", "icmpv6"]
"#;
    let ns = egress_tests::LoopNs::new();
    let sysctl = ns
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.ping_group_range=0 0"])
        .status()
        .unwrap();
    assert!(
        sysctl.success(),
        "ping sockets for root in the test namespace"
    );
    let cg = TestCgroup::new();
    let (mut dp, compiled) = load(POLICY);
    let mut ring = dp.take_events().unwrap();
    dp.attach(cg.path()).expect("attach");
    let dp = egress_tests::in_netns(&ns, move || {
        dp.attach_tc(&["lo".to_string()])
            .expect("TC on the test namespace's loopback");
        dp
    });
    let got = Probe::new()
        .netns(&ns)
        .cgroup(cg.path())
        .args([
            "socket",
            "raw4",
            "socket",
            "raw6",
            "socket",
            "udplite",
            "socket",
            "mptcp",
            "socket",
            "ping4",
            "socket",
            "ping6",
            "ping",
            "127.0.0.2:0",
            "ping",
            "[::1]:0",
        ])
        .verdicts();
    assert_eq!(
        got,
        [
            Denied, Denied, Denied, Denied, Succeeded, Succeeded, Succeeded, Succeeded
        ]
    );
    assert_eq!(dp.stats().unwrap().tc_dropped, 0, "approved pings pass TC");
    // Pings to destinations no rule approves: the socket call may succeed, TC drops them. Also
    // through a socket "laundered" by an approved connect (an owner recorded) then AF_UNSPEC.
    let got = Probe::new()
        .netns(&ns)
        .cgroup(cg.path())
        .args(["ping", "127.0.0.3:0", "ping-laundered", "127.0.0.4:0"])
        .verdicts();
    assert!(
        got.iter()
            .all(|v| matches!(v, Succeeded | egress_tests::Verdict::Other(_))),
        "{got:?}"
    );
    assert_eq!(dp.stats().unwrap().tc_dropped, 2);
    let mut events = Vec::new();
    while let Some(ev) = ring.try_next() {
        events.push(JsonEvent::from_raw(&ev, &compiled, ""));
    }
    let created: Vec<(&str, &str, Option<&str>)> = events
        .iter()
        .filter(|e| e.hook == "sock_create")
        .map(|e| (e.rule.as_str(), e.event.as_str(), e.socket_type.as_deref()))
        .collect();
    assert_eq!(
        created,
        [
            ("sockets.raw", "deny", Some("raw")),
            ("sockets.raw", "deny", Some("raw")),
            ("sockets.other", "deny", Some("dgram")),
            ("sockets.other", "deny", Some("stream")),
        ]
    );
    let tc: Vec<(&str, &str, &str)> = events
        .iter()
        .filter(|e| e.hook == "tc")
        .map(|e| (e.rule.as_str(), e.protocol.as_str(), e.dst.as_str()))
        .collect();
    assert_eq!(
        tc,
        [
            ("default", "icmp", "127.0.0.3"),
            ("default", "icmp", "127.0.0.4")
        ]
    );
    drop(dp);
}

/// In audit mode the same sockets are created, and reported.
#[test]
fn sockets_in_audit_mode_are_created_and_reported() {
    let cg = TestCgroup::new();
    let (mut dp, compiled) = load("mode = \"audit\"\n[sockets]\nraw = \"deny\"\n");
    let mut ring = dp.take_events().unwrap();
    dp.attach(cg.path()).expect("attach");
    let ns = egress_tests::LoopNs::new();
    let got = Probe::new()
        .netns(&ns)
        .cgroup(cg.path())
        .args(["socket", "raw4"])
        .verdicts();
    assert_eq!(got, [Succeeded]);
    let ev = ring.try_next().expect("an audit event");
    let ev = JsonEvent::from_raw(&ev, &compiled, "");
    assert_eq!(
        (ev.event.as_str(), ev.hook.as_str(), ev.rule.as_str()),
        ("audit", "sock_create", "sockets.raw")
    );
}

/// A byte-budget block on a user (`per = "user"`) refuses every process of that uid, forked
/// children included, and no one else's.
#[test]
fn a_user_block_refuses_every_process_of_that_user_only() {
    let cg = TestCgroup::new();
    let (mut dp, _) = load("allow_loopback = true\n");
    dp.attach(cg.path()).expect("attach");
    let nobody = 65534;
    dp.block(egress_common::BlockKey::user(nobody), u64::MAX, 7)
        .expect("block");
    let as_user = |uid: Option<u32>| {
        let mut cmd = match uid {
            Some(u) => {
                let mut c = std::process::Command::new("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    &format!("--regid={u}"),
                    "--clear-groups",
                ])
                .arg(egress_tests::bins::probe());
                c
            }
            None => std::process::Command::new(egress_tests::bins::probe()),
        };
        // A process the block never saw: what a blocked process forks is one of these too.
        cg.join_on_exec(&mut cmd);
        let out = cmd
            .args(["tcp", "127.0.0.2:9"])
            .output()
            .expect("running the probe");
        assert!(out.status.success(), "{out:?}");
        egress_tests::probe::verdicts(&out.stdout)
    };
    assert_eq!(as_user(Some(nobody)), [Denied], "the blocked user");
    assert_eq!(as_user(None), [Refused], "root is not blocked");
}

/// A policy of `n` nested prefixes inside 127.0.0.0/8 (a threat-feed mix of lengths: mostly
/// /32 and /24, some /16–/31, a few shorter), each in one of five services and blocks with
/// different ports; deterministic. Returns the policy text and every prefix (network, length).
fn nested_policy(n: usize, seed: u64) -> (String, Vec<(u32, u8)>) {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let mut prefixes = std::collections::BTreeSet::new();
    while prefixes.len() < n {
        let len = match next() % 100 {
            0..=59 => 32,
            60..=79 => 24,
            80..=89 => 16 + (next() % 8) as u8,
            90..=96 => 25 + (next() % 7) as u8,
            _ => 9 + (next() % 7) as u8,
        };
        // Half of them packed into 127.1.0.0/16, so that chunks hold long, nested lists.
        let addr = if next() % 2 == 0 {
            0x7f01_0000 | (next() & 0xffff)
        } else {
            0x7f00_0000 | (next() & 0x00ff_ffff)
        };
        let mask = u32::MAX << (32 - len);
        prefixes.insert((addr & mask, len));
    }
    let rules = [
        (
            "service",
            "svc-https",
            "ports = [443]\nprotocols = [\"udp\"]",
        ),
        (
            "service",
            "svc-dns",
            "ports = [5353]\nprotocols = [\"udp\"]",
        ),
        ("block", "blk-https", "ports = [443]"),
        ("service", "svc-all", ""),
        ("block", "blk-all", ""),
    ];
    let mut members: Vec<Vec<String>> = vec![Vec::new(); rules.len()];
    for (i, &(net, len)) in prefixes.iter().enumerate() {
        let ip = std::net::Ipv4Addr::from(net);
        members[(i * 7 + len as usize) % rules.len()].push(format!("\"{ip}/{len}\""));
    }
    let mut text = String::from("mode = \"enforce\"\ndefault = \"deny\"\nallow_loopback = false\n");
    for ((kind, name, extra), dests) in rules.iter().zip(&members) {
        if dests.is_empty() {
            continue;
        }
        text.push_str(&format!(
            "\n[[{kind}]]\nname = \"{name}\"\ndestinations = [{}]\n{extra}\n",
            dests.join(", ")
        ));
    }
    (text, prefixes.into_iter().collect())
}

/// Every prefix's first and last address and their outside neighbours (within 127/8, but its
/// broadcast address), plus
/// pseudo-random addresses of 127/8; each as IPv4 and, for a share, v4-mapped IPv6.
fn edge_addresses(prefixes: &[(u32, u8)], seed: u64) -> Vec<IpAddr> {
    let mut set = std::collections::BTreeSet::new();
    for &(net, len) in prefixes {
        let last = net | u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        for a in [net, last, net.wrapping_sub(1), last.wrapping_add(1)] {
            // (127.255.255.255 is loopback's broadcast address: sendto says EACCES.)
            if a >> 24 == 127 && a != 0x7fff_ffff {
                set.insert(a);
            }
        }
    }
    let mut x = seed;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        set.insert(0x7f00_0000 | ((x >> 33) as u32 & 0x00ff_fffe));
    }
    set.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let v4 = std::net::Ipv4Addr::from(a);
            if i % 5 == 0 {
                IpAddr::V6(v4.to_ipv6_mapped())
            } else {
                IpAddr::V4(v4)
            }
        })
        .collect()
}

/// The kernel's verdicts for unconnected UDP sends to `addrs` on ports 443 and 5353 against
/// `compiled.evaluate` (what `egress explain` prints); returns how many were allowed.
fn agree_on(cg: &TestCgroup, compiled: &CompiledPolicy, addrs: &[IpAddr]) -> usize {
    let mut calls: Vec<(String, IpAddr, u16)> = Vec::new();
    for &ip in addrs {
        for port in [443u16, 5353] {
            calls.push((SocketAddr::new(ip, port).to_string(), ip, port));
        }
    }
    let args: Vec<(&str, &str)> = calls
        .iter()
        .map(|(a, ..)| ("udp-sendto", a.as_str()))
        .collect();
    let results = probe(cg, &args);
    let mut allowed = 0;
    for ((addr, ip, port), got) in calls.iter().zip(&results) {
        let want = compiled.evaluate(*ip, *port, IPPROTO_UDP);
        assert_eq!(
            got.passed(),
            want.allow,
            "udp-sendto {addr}: kernel said {got}, explain said {want:?}"
        );
        allowed += usize::from(want.allow);
    }
    assert!(
        allowed > calls.len() / 10 && allowed < calls.len() * 9 / 10,
        "the addresses exercise both verdicts ({allowed}/{})",
        calls.len()
    );
    allowed
}

#[test]
fn the_range_table_and_the_trie_agree_with_explain_at_every_prefix_edge() {
    use egress::datapath::{Capacities, V4Lookup};
    let (text, prefixes) = nested_policy(400, 0x5eed);
    let p = Policy::parse("ranges.toml", &text).unwrap_or_else(|e| panic!("{e}"));
    let big = CompiledPolicy::compile(&p).unwrap_or_else(|e| panic!("{e}"));
    let table = big.v4_ranges().expect("the policy has a range table");
    assert!(
        table.range_entries() > 400,
        "lists are long enough to search: {table:?}"
    );
    let addrs = edge_addresses(&prefixes, 7);
    assert!(addrs.len() > 1000, "{} addresses", addrs.len());

    // The range table: a datapath sized for the policy.
    let cg = TestCgroup::new();
    let mut dp = Datapath::load(&big)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    dp.attach(cg.path()).unwrap();
    let with_table = agree_on(&cg, &big, &addrs);
    // Reloaded (the other buffer), the same answers.
    let applied = dp.reload(&big).unwrap();
    assert!(
        matches!(applied.v4_lookup, V4Lookup::Ranges { .. }),
        "{applied:?}"
    );
    assert_eq!(agree_on(&cg, &big, &addrs), with_table);
    drop(dp);

    // The trie: a datapath whose range table has no room for it falls back, and says so; a
    // policy that fits goes back to the table.
    let small_text = "mode = \"enforce\"\ndefault = \"deny\"\nallow_loopback = false\n[[service]]\nname = \"one\"\ndestinations = [\"127.0.0.1\"]\n";
    let small = CompiledPolicy::compile(&Policy::parse("small.toml", small_text).unwrap()).unwrap();
    let cg = TestCgroup::new();
    let sizes = Capacities {
        owners: None,
        prefixes: Some(1),
        kernel_log: false,
        events_ring: None,
    };
    let mut dp = Datapath::load_capacities(&small, sizes).expect("loading the datapath");
    dp.attach(cg.path()).unwrap();
    let applied = dp.reload(&big).unwrap();
    match &applied.v4_lookup {
        V4Lookup::Trie { why } => assert!(why.contains("--prefix-capacity"), "{why}"),
        other => panic!("a table without room must fall back to the trie: {other:?}"),
    }
    assert_eq!(agree_on(&cg, &big, &addrs), with_table);
    let applied = dp.reload(&small).unwrap();
    assert!(
        matches!(applied.v4_lookup, V4Lookup::Ranges { .. }),
        "{applied:?}"
    );
    let r = probe(
        &cg,
        &[("udp-sendto", "127.0.0.1:9"), ("udp-sendto", "127.0.0.2:9")],
    );
    assert!(r[0].passed() && !r[1].passed(), "{r:?}");
}
