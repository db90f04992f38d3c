//! Real-kernel tests of the TC egress program: two network namespaces joined by a veth pair, a
//! server in one, a client (in a test cgroup) in the other. Byte counts (by the cgroup_skb
//! program, with and without TC on the veth, never twice), attribution, the unattributed owner,
//! and the second line of enforcement for raw sockets.

use std::{thread, time::Duration};

use egress::{
    datapath::{ACCOUNTING_HOOK, Datapath, TC_PROGRAM},
    policy::Policy,
    policy::compile::CompiledPolicy,
};
use egress_common::{FlowValue, HOOK_TC, IPPROTO_TCP, IPPROTO_UDP, TGID_UNATTRIBUTED};
use egress_tests::{
    NetPair, Probe, TcpSink, TestCgroup, UdpSink,
    Verdict::{Denied, Refused, Succeeded},
    in_netns,
    netns::{ADDR_B, VETH_A, payload_accounts_for},
    wait_for,
};

const POLICY: &str = r#"
allow_loopback = false
[sockets]
raw = "allow"          # the raw-socket test exercises TC's second line
[[service]]
name = "bench-net"
destinations = ["198.18.0.0/24", "fd00:e9e5::/64"]
ports = ["5001-5010"]
[[block]]
name = "raw-blocked"
destinations = ["198.18.0.2"]
ports = [5009]
protocols = ["udp"]
"#;

/// How long a sink gets to see what the probe sent.
const DELIVERY: Duration = Duration::from_secs(10);

/// The datapath, loaded, attached to `cg`, and with TC attached to the veth of namespace `a`.
fn load_attached(pair: &NetPair, cg: &TestCgroup) -> Datapath {
    load_attached_with(pair, cg, POLICY)
}

fn load_attached_with(pair: &NetPair, cg: &TestCgroup, policy: &str) -> Datapath {
    let p = Policy::parse("t.toml", policy).unwrap();
    let mut dp =
        Datapath::load(&CompiledPolicy::compile(&p).unwrap()).expect("loading the datapath (root)");
    dp.attach(cg.path()).unwrap();
    in_netns(&pair.a, move || {
        dp.attach_tc(&[VETH_A.to_string()])
            .expect("attach TC to the test veth");
        dp
    })
}

/// Runs egress-probe in namespace a and the test cgroup; returns (results, pid).
fn probe_in_a(pair: &NetPair, cg: &TestCgroup, args: &[&str]) -> (Vec<egress_tests::Verdict>, u32) {
    let lines = Probe::new().netns(&pair.a).cgroup(cg).args(args).run();
    let pid = lines.first().expect("a probe line").pid;
    (lines.into_iter().map(|l| l.result).collect(), pid)
}

fn flows_of(dp: &Datapath, tgid: u32, port: u16, proto: u8) -> FlowValue {
    let mut total = FlowValue::default();
    for (k, v) in dp.flows().unwrap() {
        if k.tgid == tgid && k.port == port && k.protocol == proto {
            total.packets += v.packets;
            total.bytes += v.bytes;
            total.payload += v.payload;
        }
    }
    total
}

/// A 16 MiB TCP upload to port `tcp_port` and 500 UDP datagrams of 1200 bytes to `udp_port`,
/// from a process in namespace a and the test cgroup, to sinks in namespace b: each counted once,
/// under the sender's pid, payload within 1% (TCP) and exact (UDP), wire bytes exact for UDP
/// (Ethernet 14 + IPv4 20 + UDP 8 per datagram), nothing of it unattributed. Returns the pid.
fn upload_is_counted_once(
    pair: &NetPair,
    cg: &TestCgroup,
    dp: &Datapath,
    ports: (u16, u16),
) -> u32 {
    let (tcp_port, udp_port) = ports;
    let tcp_got = TcpSink::start(&pair.b, (ADDR_B, tcp_port));
    let udp_got = UdpSink::start(&pair.b, (ADDR_B, udp_port));

    const TCP_BYTES: u64 = 16 * 1024 * 1024;
    const UDP_COUNT: u64 = 500;
    const UDP_SIZE: u64 = 1200;
    let retrans_before = pair.a.tcp_retransmitted_segments();
    let (r, pid) = probe_in_a(
        pair,
        cg,
        &[
            "tcp-send",
            &format!("198.18.0.2:{tcp_port}"),
            &TCP_BYTES.to_string(),
            "udp-send",
            &format!("198.18.0.2:{udp_port}"),
            &UDP_COUNT.to_string(),
            &UDP_SIZE.to_string(),
        ],
    );
    assert_eq!(r, [Succeeded, Succeeded]);
    wait_for("the TCP sink", DELIVERY, || tcp_got.bytes() == TCP_BYTES);
    // The receiver may drop datagrams when its buffer overflows; what left the client is counted.
    wait_for("the UDP sink", DELIVERY, || udp_got.bytes() > 0);

    let tcp = flows_of(dp, pid, tcp_port, IPPROTO_TCP);
    let retransmitted = pair.a.tcp_retransmitted_segments() - retrans_before;
    assert!(
        payload_accounts_for(tcp.payload, TCP_BYTES, retransmitted),
        "TCP payload counted {} for {TCP_BYTES} written ({retransmitted} segments retransmitted)",
        tcp.payload
    );
    assert!(
        tcp.bytes > tcp.payload,
        "wire bytes include headers: {tcp:?}"
    );
    // Headers of every segment: at least 14 + 20 + 20 bytes per segment of at most 1460 bytes
    // (the MSS on a 1500-byte MTU).
    assert!(
        tcp.bytes >= tcp.payload + tcp.payload / 1500 * 54,
        "wire bytes count the headers of every GSO segment: {tcp:?}"
    );
    let udp = flows_of(dp, pid, udp_port, IPPROTO_UDP);
    assert_eq!(udp.payload, UDP_COUNT * UDP_SIZE, "{udp:?}");
    assert_eq!(udp.packets, UDP_COUNT);
    assert_eq!(udp.bytes, UDP_COUNT * (UDP_SIZE + 42));
    // Nothing of this was unattributed.
    for (port, proto) in [(tcp_port, IPPROTO_TCP), (udp_port, IPPROTO_UDP)] {
        assert_eq!(
            flows_of(dp, TGID_UNATTRIBUTED, port, proto),
            FlowValue::default()
        );
    }
    pid
}

/// TC on the sender's veth and the cgroup_skb program both see every packet (the kernel's run
/// counts say so); each packet is counted once.
#[test]
fn tcp_and_udp_bytes_are_attributed_and_accurate() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let dp = load_attached(&pair, &cg);
    let _stats = egress::datapath::enable_run_stats().unwrap();
    let stats = || {
        [ACCOUNTING_HOOK, TC_PROGRAM].map(|p| {
            let s = dp.run_stats(p).unwrap();
            (s.run_count, s.run_time)
        })
    };
    let before = stats();
    upload_is_counted_once(&pair, &cg, &dp, (5001, 5002));
    let after = stats();
    let ran = (after[0].0 - before[0].0, after[1].0 - before[1].0);
    // The kernel's own measure of each program's cost per packet (skb), for the record.
    for (i, name) in [ACCOUNTING_HOOK, TC_PROGRAM].iter().enumerate() {
        let runs = after[i].0 - before[i].0;
        let ns = (after[i].1 - before[i].1).as_nanos() as u64 / runs.max(1);
        eprintln!("{name}: {runs} runs, {ns} ns per run");
    }
    assert!(
        ran.0 >= 500 && ran.1 >= 500,
        "both programs saw the upload (runs of skb_egress, tc_egress): {ran:?}"
    );
}

/// A pod's view: a process in its own network namespace and cgroup sends through a veth, and
/// no TC program is attached anywhere. The cgroup_skb program attributes every byte to it.
#[test]
fn a_process_in_its_own_namespace_is_counted_without_tc() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let p = Policy::parse("t.toml", POLICY).unwrap();
    let mut dp =
        Datapath::load(&CompiledPolicy::compile(&p).unwrap()).expect("loading the datapath (root)");
    dp.attach(cg.path()).unwrap();
    upload_is_counted_once(&pair, &cg, &dp, (5003, 5004));
}

#[test]
fn raw_socket_packets_are_unattributed_and_blocked_ones_dropped() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let mut dp = load_attached(&pair, &cg);
    let mut ring = dp.take_events().unwrap();
    let allowed_got = UdpSink::start(&pair.b, (ADDR_B, 5008));
    let blocked_got = UdpSink::start(&pair.b, (ADDR_B, 5009));
    let (r, _pid) = probe_in_a(
        &pair,
        &cg,
        &["raw-udp", "198.18.0.2:5008", "raw-udp", "198.18.0.2:5009"],
    );
    assert_eq!(
        r,
        [Succeeded, Succeeded],
        "raw sockets pass no cgroup hook: sendto succeeds"
    );
    wait_for("the unblocked raw datagram", DELIVERY, || {
        allowed_got.bytes() > 0
    });
    let unattributed = flows_of(&dp, TGID_UNATTRIBUTED, 5008, IPPROTO_UDP);
    assert_eq!(
        unattributed.packets, 1,
        "counted under the unattributed owner"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        blocked_got.bytes(),
        0,
        "the blocked raw datagram was dropped at TC"
    );
    assert_eq!(
        flows_of(&dp, TGID_UNATTRIBUTED, 5009, IPPROTO_UDP).packets,
        0
    );
    assert_eq!(dp.stats().unwrap().tc_dropped, 1);
    let mut tc_events = Vec::new();
    while let Some(ev) = ring.try_next() {
        if ev.hook == HOOK_TC {
            tc_events.push(ev);
        }
    }
    assert_eq!(tc_events.len(), 1);
    assert_eq!(
        (
            tc_events[0].port,
            tc_events[0].protocol,
            &tc_events[0].addr[..4]
        ),
        (5009, IPPROTO_UDP, &[198, 18, 0, 2][..])
    );
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() {
    // 3000-byte UDP datagrams over a 1500-byte MTU leave as IPv6 fragments: a fragment header
    // precedes UDP in the first, and the rest carry no UDP header at all.
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let dp = load_attached(&pair, &cg);
    // A TCP connect first resolves the neighbour, so no datagram waits in (or falls out of) the
    // neighbour queue.
    let (r, pid) = probe_in_a(
        &pair,
        &cg,
        &[
            "tcp",
            "[fd00:e9e5::2]:5006",
            "udp-send",
            "[fd00:e9e5::2]:5005",
            "4",
            "3000",
        ],
    );
    assert_eq!(r, [Refused, Succeeded]);
    thread::sleep(Duration::from_millis(300));
    let flows = dp.flows().unwrap();
    assert!(
        flows.iter().all(|(k, _)| k.protocol != 44),
        "no flow is counted as protocol 44 (fragment header)"
    );
    let udp: u64 = flows
        .iter()
        .filter(|(k, _)| k.tgid == pid && k.protocol == IPPROTO_UDP && k.family == 6)
        .map(|(_, v)| v.payload)
        .sum();
    assert_eq!(
        udp,
        4 * 3000,
        "all fragments counted as the process's UDP payload"
    );
    let first = flows_of(&dp, pid, 5005, IPPROTO_UDP);
    assert_eq!(first.packets, 4, "each first fragment carries the UDP port");
}

/// Source routes (IPv4 LSRR) and routing headers (IPv6 segment routing) change where a packet
/// goes after the hooks judged its destination: in an enforced cgroup the setsockopt forms are
/// refused with EPERM (and reported), and every packet that carries one anyway (the cmsg form,
/// or a socket from outside the cgroup) is dropped at TC and reported as `source-route`. A plain
/// datagram to the same sink still arrives.
#[test]
fn source_routes_are_refused_at_setsockopt_and_dropped_at_tc() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let mut dp = load_attached(&pair, &cg);
    let mut ring = dp.take_events().unwrap();
    let sink = UdpSink::start(&pair.b, (ADDR_B, 5002));
    let sink6 = UdpSink::start(&pair.b, (egress_tests::netns::ADDR6_B, 5002));
    let (r, _) = probe_in_a(
        &pair,
        &cg,
        &[
            "udp-lsrr",
            "198.18.0.2:5002",
            "udp-rthdr",
            "[fd00:e9e5::2]:5002",
            "udp-lsrr-cmsg",
            "198.18.0.2:5002",
        ],
    );
    assert_eq!(
        r,
        [Denied, Denied, Succeeded],
        "setsockopt forms refused; the cmsg form passes the hooks (its destination is approved)"
    );
    // Any other option passes untouched, also one larger than the page the hook sees.
    let (r, _) = probe_in_a(&pair, &cg, &["setsockopt-large"]);
    assert_eq!(r, [Succeeded]);
    // The same from a process outside the enforced cgroup: no setsockopt hook, TC still sees
    // every packet on the interface.
    let outside = Probe::new()
        .netns(&pair.a)
        .args([
            "udp-lsrr",
            "198.18.0.2:5002",
            "udp-rthdr",
            "[fd00:e9e5::2]:5002",
            "udp-sendto",
            "198.18.0.2:5002",
        ])
        .verdicts();
    assert_eq!(outside, [Succeeded, Succeeded, Succeeded]);
    wait_for("the plain datagram", DELIVERY, || sink.datagrams() > 0);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.datagrams(), 1, "only the plain datagram arrives");
    assert_eq!(
        sink6.datagrams(),
        0,
        "the routed IPv6 datagram never arrives"
    );
    assert_eq!(dp.stats().unwrap().tc_dropped, 3);
    let (mut setsockopt, mut tc) = (0, 0);
    while let Some(ev) = ring.try_next() {
        assert_eq!(ev.rule_id, egress_common::RULE_SOURCE_ROUTE, "{ev:?}");
        match ev.hook {
            egress_common::HOOK_SETSOCKOPT => setsockopt += 1,
            HOOK_TC => tc += 1,
            other => panic!("unexpected hook {other}"),
        }
    }
    assert_eq!((setsockopt, tc), (2, 3));
}

/// AF_PACKET sockets pass no cgroup hook. TC judges their frames by the sending socket's family
/// (not by `skb->protocol`, which the sender chooses): `packet = "deny"` drops them all, also an
/// IPv4 frame sent on a socket of another protocol; `PACKET_QDISC_BYPASS` skips TC (which is
/// why `egress exec` withholds CAP_NET_RAW: see e2e_cli).
#[test]
fn packet_socket_frames_are_judged_at_tc() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let mut dp = load_attached(&pair, &cg);
    let mut ring = dp.take_events().unwrap();
    let sink = UdpSink::start(&pair.b, (ADDR_B, 5003));
    let (r, _) = probe_in_a(
        &pair,
        &cg,
        &[
            "packet-udp",
            "198.18.0.2:5003",
            "ip",
            "packet-udp",
            "198.18.0.2:5003",
            "alien",
        ],
    );
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(
        r.iter().all(|v| *v != Denied),
        "no cgroup hook refuses an AF_PACKET send: {r:?}"
    );
    // The gap no cgroup program closes: with PACKET_QDISC_BYPASS the frame never meets TC (and
    // it shows that the frames above were good ones).
    let (r, _) = probe_in_a(&pair, &cg, &["packet-udp", "198.18.0.2:5003", "bypass"]);
    assert_eq!(r, [Succeeded]);
    wait_for("the frame that bypassed the qdisc", DELIVERY, || {
        sink.datagrams() > 0
    });
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.datagrams(),
        1,
        "the two frames that met TC were dropped"
    );
    assert_eq!(dp.stats().unwrap().tc_dropped, 2);
    let mut rules = Vec::new();
    while let Some(ev) = ring.try_next() {
        assert_eq!(ev.hook, HOOK_TC, "{ev:?}");
        rules.push((ev.rule_id, ev.port, ev.addr[..4].to_vec()));
    }
    let packet_rule = egress_common::RULE_SOCKETS + egress_common::SOCKETS_PACKET as u32;
    assert_eq!(
        rules,
        [
            (packet_rule, 5003, vec![198, 18, 0, 2]),
            (packet_rule, 5003, vec![198, 18, 0, 2])
        ],
        "both reported as sockets.packet, the IPv4 inside the alien frame parsed"
    );
    assert_eq!(
        egress_common::user::builtin_rule_name(packet_rule),
        Some("sockets.packet")
    );
}

/// With `packet = "allow"`, frames pass and are counted (unattributed, by what they carry:
/// the frame is parsed, not `skb->protocol`); non-IP frames of IP sockets cannot exist, and
/// an allowed packet socket's non-IP frames pass.
#[test]
fn allowed_packet_socket_frames_are_counted_by_what_they_carry() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let policy = POLICY.replace("raw = \"allow\"", "raw = \"allow\"\npacket = \"allow\"");
    assert!(policy.contains("packet = \"allow\""));
    let dp = load_attached_with(&pair, &cg, &policy);
    let sink = UdpSink::start(&pair.b, (ADDR_B, 5004));
    let (r, _) = probe_in_a(
        &pair,
        &cg,
        &[
            "packet-udp",
            "198.18.0.2:5004",
            "ip",
            "packet-udp",
            "198.18.0.2:5004",
            "alien",
        ],
    );
    assert_eq!(r, [Succeeded, Succeeded]);
    wait_for("both frames", DELIVERY, || sink.datagrams() == 2);
    let f = flows_of(&dp, TGID_UNATTRIBUTED, 5004, IPPROTO_UDP);
    assert_eq!(
        f.packets, 2,
        "both counted, the alien one by the IPv4 it carries"
    );
    assert_eq!(f.payload, 2 * "egress-probe packet".len() as u64);
    assert_eq!(dp.stats().unwrap().tc_dropped, 0);
}
