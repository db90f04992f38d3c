//! Real-kernel tests of socket ownership (`SOCK_OWNERS`): a flood of short-lived sockets cannot
//! evict the owner of a live one (their entries go when they close), and a full owner map fails
//! closed: connects and sends that need a new owner get `EPERM`, an `owners-full` deny event and
//! a counter, until sockets close and free their entries. The datapath is loaded in-process and
//! attached to a child cgroup made by the test; traffic stays inside test network namespaces.

use std::time::Duration;

use egress::{
    datapath::{Datapath, OWNERS_CAPACITY},
    events::JsonEvent,
    policy::{Policy, compile::CompiledPolicy},
};
use egress_common::{IPPROTO_TCP, TGID_UNATTRIBUTED};
use egress_tests::{
    LoopNs, NetPair, Probe, TcpSink, TestCgroup,
    Verdict::{Denied, Succeeded},
    in_netns,
    netns::{ADDR_B, VETH_A, payload_accounts_for},
    wait_for,
};

fn compile(text: &str) -> CompiledPolicy {
    let p = Policy::parse("owners.toml", text).unwrap_or_else(|e| panic!("{e}"));
    CompiledPolicy::compile(&p).unwrap_or_else(|e| panic!("{e}"))
}

/// Payload bytes TC counted for (`tgid`, `port`, TCP).
fn tcp_payload(dp: &Datapath, tgid: u32, port: u16) -> u64 {
    dp.flows()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.tgid == tgid && k.port == port && k.protocol == IPPROTO_TCP)
        .map(|(_, v)| v.payload)
        .sum()
}

#[test]
fn a_flood_of_short_lived_sockets_does_not_evict_a_live_owner() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let policy = compile(
        "allow_loopback = true\n[[service]]\nname = \"sink\"\ndestinations = [\"198.18.0.0/24\"]\nports = [5003]\nprotocols = [\"tcp\"]\n",
    );
    let mut dp = Datapath::load(&policy)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    dp.attach(cg.path()).expect("attach to the test cgroup");
    let dp = in_netns(&pair.a, move || {
        dp.attach_tc(&[VETH_A.to_string()])
            .expect("attach TC to the test veth");
        dp
    });
    let sink = TcpSink::start(&pair.b, (ADDR_B, 5003));
    // More short-lived sockets than the map holds: under an LRU they evict the upload's owner;
    // here each one's entry goes when it closes, so none is refused either.
    const FLOOD: u64 = 150_000;
    assert!(FLOOD > u64::from(OWNERS_CAPACITY));
    const BYTES: u64 = 4 * 1024 * 1024;
    let retrans_before = pair.a.tcp_retransmitted_segments();
    let lines = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .args(["hold", "tcp", "198.18.0.2:5003", "1"])
        .args(["flood", "127.0.0.1:9", &FLOOD.to_string()])
        .args(["held-send", &BYTES.to_string()])
        .lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0].summary().times(&Succeeded), 1, "{lines:?}");
    let flood = lines[1].summary();
    assert_eq!(
        flood.times(&Succeeded),
        FLOOD,
        "every short-lived socket got an owner (closed ones free theirs): {flood:?}"
    );
    assert_eq!(lines[2].call().result, Succeeded, "{lines:?}");
    let pid = lines[2].call().pid;
    wait_for(
        "the sink to read the upload",
        Duration::from_secs(20),
        || sink.closed() == 1,
    );
    assert_eq!(sink.bytes(), BYTES);

    let retransmitted = pair.a.tcp_retransmitted_segments() - retrans_before;
    let attributed = tcp_payload(&dp, pid, 5003);
    assert!(
        payload_accounts_for(attributed, BYTES, retransmitted),
        "the upload after the flood is attributed to pid {pid}: {attributed} of {BYTES} bytes \
         ({retransmitted} segments retransmitted)"
    );
    assert_eq!(
        tcp_payload(&dp, TGID_UNATTRIBUTED, 5003),
        0,
        "nothing of the upload is unattributed"
    );
    // Once the probe is gone, so are its owners (it made every socket of the cgroup): UDP at
    // close, TCP once the connection closed. Its name stays, for the reports.
    wait_for(
        "the probe's owners to be deleted",
        // TCP owners go at TCP_CLOSE, after the upload's FIN exchange: seconds on a loaded
        // machine.
        Duration::from_secs(30),
        || dp.owner_count() == 0,
    );
    assert_eq!(
        dp.owner_comms().get(&pid).map(String::as_str),
        Some("egress-probe")
    );
}

#[test]
fn a_full_owner_map_refuses_new_sockets_until_some_close() {
    const CAPACITY: u32 = 64;
    let ns = LoopNs::new();
    let cg = TestCgroup::new();
    let policy = compile(
        "allow_loopback = false\n[[service]]\nname = \"local\"\ndestinations = [\"127.0.0.2\"]\n",
    );
    let mut dp = Datapath::load_sized(&policy, CAPACITY)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    let mut ring = dp.take_events().unwrap();
    dp.attach(cg.path()).expect("attach to the test cgroup");
    // Reads every connection to its end and closes it: a released TCP socket then reaches
    // TCP_CLOSE (through TIME_WAIT), where its owner is deleted.
    let _sink = TcpSink::start(&ns, (std::net::Ipv4Addr::new(127, 0, 0, 2), 7000));
    let half = (CAPACITY / 2).to_string();
    let lines = Probe::new()
        .netns(&ns)
        .cgroup(&cg)
        // Fill the map: 32 TCP connections and 32 connected UDP sockets, all held open.
        .args(["hold", "tcp", "127.0.0.2:7000", &half])
        .args(["hold", "udp", "127.0.0.2:9", &half])
        // Full: a new connected UDP socket, a TCP connect, an unconnected send are refused.
        .args(["hold", "udp", "127.0.0.2:9", "1"])
        .args(["hold", "tcp", "127.0.0.2:7000", "1"])
        .args(["udp-sendto", "127.0.0.2:9"])
        // Close them all; the TCP ones go through their FIN handshake with the sink.
        .args(["release", "sleep", "1000"])
        .args(["hold", "tcp", "127.0.0.2:7000", &half])
        .args(["hold", "udp", "127.0.0.2:9", &half])
        .args(["hold", "udp", "127.0.0.2:9", "1"])
        .lines();
    let pid = lines[0].summary().pid;
    let held = |i: usize| {
        (
            lines[i].summary().times(&Succeeded),
            lines[i].summary().times(&Denied),
        )
    };
    assert_eq!(held(0), (32, 0), "{lines:?}");
    assert_eq!(held(1), (32, 0), "{lines:?}");
    assert_eq!(held(2), (0, 1), "full: a UDP connect is refused: {lines:?}");
    assert_eq!(held(3), (0, 1), "full: a TCP connect is refused: {lines:?}");
    assert_eq!(lines[4].call().result, Denied, "full: a sendto is refused");
    assert_eq!(lines[5].call().result, Succeeded);
    assert_eq!(
        (held(7), held(8)),
        ((32, 0), (32, 0)),
        "closed sockets freed their owners: {lines:?}"
    );
    assert_eq!(held(9), (0, 1), "full again: {lines:?}");

    let stats = dp.stats().unwrap();
    assert_eq!(stats.owners_full, 4, "{stats:?}");
    assert_eq!(stats.denied, 4, "{stats:?}");
    let mut events = Vec::new();
    while let Some(item) = ring.try_next() {
        events.push(JsonEvent::from_raw(&item, &policy, ""));
    }
    let seen: Vec<(&str, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.event.as_str(),
                e.hook.as_str(),
                e.protocol.as_str(),
                e.rule.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("deny", "connect4", "udp", "owners-full"),
            ("deny", "connect4", "tcp", "owners-full"),
            ("deny", "sendmsg4", "udp", "owners-full"),
            ("deny", "connect4", "udp", "owners-full"),
        ],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e.pid == pid && e.dst == "127.0.0.2"));
}

/// A TCP socket sends what is left in its send buffer, and its FIN, after `close()`: its owner
/// stays until the connection reaches TCP_CLOSE, so that tail is attributed too (deleted at
/// release, it would be unattributed: a way to upload past a per-process budget).
#[test]
fn a_tcp_upload_closed_at_once_is_attributed_to_its_end() {
    let pair = NetPair::new();
    let cg = TestCgroup::new();
    let policy = compile(
        "[[service]]\nname = \"sink\"\ndestinations = [\"198.18.0.0/24\"]\nports = [5004]\nprotocols = [\"tcp\"]\n",
    );
    let mut dp = Datapath::load(&policy)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    dp.attach(cg.path()).expect("attach to the test cgroup");
    let dp = in_netns(&pair.a, move || {
        dp.attach_tc(&[VETH_A.to_string()])
            .expect("attach TC to the test veth");
        dp
    });
    let sink = TcpSink::start(&pair.b, (ADDR_B, 5004));
    const BYTES: u64 = 8 * 1024 * 1024;
    let retrans_before = pair.a.tcp_retransmitted_segments();
    let lines = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .args(["tcp-send-close", "198.18.0.2:5004", &BYTES.to_string()])
        .run();
    assert_eq!(lines[0].result, Succeeded, "{lines:?}");
    let pid = lines[0].pid;
    wait_for(
        "the sink to read the upload",
        Duration::from_secs(20),
        || sink.closed() == 1,
    );
    assert_eq!(sink.bytes(), BYTES);
    let retransmitted = pair.a.tcp_retransmitted_segments() - retrans_before;
    let attributed = tcp_payload(&dp, pid, 5004);
    assert!(
        payload_accounts_for(attributed, BYTES, retransmitted),
        "attributed to pid {pid} to the end: {attributed} of {BYTES} bytes ({retransmitted} \
         segments retransmitted)"
    );
    assert_eq!(tcp_payload(&dp, TGID_UNATTRIBUTED, 5004), 0);
}

/// Audit mode refuses nothing: a call whose owner cannot be recorded goes through, reported as
/// an `owners-full` audit event and counted.
#[test]
fn in_audit_mode_a_full_owner_map_is_reported_and_lets_calls_through() {
    let ns = LoopNs::new();
    let cg = TestCgroup::new();
    let policy = compile("mode = \"audit\"\nallow_loopback = true\n");
    let mut dp = Datapath::load_sized(&policy, 2)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"));
    let mut ring = dp.take_events().unwrap();
    dp.attach(cg.path()).expect("attach to the test cgroup");
    let lines = Probe::new()
        .netns(&ns)
        .cgroup(&cg)
        .args(["hold", "udp", "127.0.0.1:9", "3"])
        .lines();
    assert_eq!(lines[0].summary().times(&Succeeded), 3, "{lines:?}");
    let stats = dp.stats().unwrap();
    assert_eq!((stats.owners_full, stats.audited, stats.denied), (1, 1, 0));
    let item = ring.try_next().expect("an audit event");
    let e = JsonEvent::from_raw(&item, &policy, "");
    assert_eq!(
        (e.event.as_str(), e.rule.as_str()),
        ("audit", "owners-full")
    );
    assert!(ring.try_next().is_none());
}
