//! Real-kernel tests of byte-budget blocks on process trees: the real object loaded in-process,
//! its hooks attached to a child cgroup the test makes and its fork tracker to
//! `task/task_newtask`, a block set on a process in that cgroup, and the processes it forks
//! trying to reach an approved sink on the loopback of a test network namespace. The sinks
//! count what arrives. They need root and fail (never skip) when the kernel refuses a program.

use std::time::Duration;

use egress::{datapath::Datapath, policy::Policy, policy::compile::CompiledPolicy};
use egress_common::BlockKey;
use egress_tests::{
    LoopNs, Probe, TcpSink, TempDir, TestCgroup, UdpSink,
    Verdict::{Denied, Succeeded},
    probe::{CallLine, calls_so_far},
    wait_for,
};

const POLICY: &str = r#"
allow_loopback = false

[[service]]
name = "sink"
destinations = ["127.0.0.2"]
ports = [7001, 7002]
"#;

fn load() -> Datapath {
    let p = Policy::parse("test.toml", POLICY).unwrap_or_else(|e| panic!("{e}"));
    let c = CompiledPolicy::compile(&p).unwrap_or_else(|e| panic!("{e}"));
    Datapath::load(&c).unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"))
}

/// The lines of process `pid`, in order.
fn of(lines: &[CallLine], pid: u32) -> Vec<(String, egress_tests::Verdict)> {
    lines
        .iter()
        .filter(|l| l.pid == pid)
        .map(|l| (l.op.clone(), l.result.clone()))
        .collect()
}

/// A blocked process forks after its block: each child, and the child's child, is refused at
/// connect() and sendto() to an approved sink, and not a byte of theirs arrives. A child forked
/// *before* the block is not covered (the documented semantics) and delivers its payload.
#[test]
fn children_forked_after_a_process_block_are_refused_and_send_nothing() {
    let ns = LoopNs::new();
    let dir = TempDir::new("block-tree");
    let cg = TestCgroup::new();
    let mut dp = load();
    dp.attach(cg.path())
        .expect("attaching the hooks and the fork tracker");
    let tcp = TcpSink::start(&ns, ([127, 0, 0, 2], 7001));
    let udp = UdpSink::start(&ns, ([127, 0, 0, 2], 7002));
    let (blocked, go) = (dir.join("blocked"), dir.join("go"));
    let (tcp_sink, udp_sink) = ("127.0.0.2:7001", "127.0.0.2:7002");

    let mut parent = Probe::new()
        .netns(&ns)
        .cgroup(cg.path())
        .opt("--timeout", "5")
        // Forked before the block: sends once the test says so, after everything else.
        .args(["fork", "wait-file"])
        .args([&go])
        .args(["tcp-send", tcp_sink, "1000", "end", "wait-file"])
        .args([&blocked])
        // After the block: the parent, a child, its child, and a UDP sender.
        .args(["tcp", tcp_sink])
        .args(["fork", "tcp-send", tcp_sink, "1000", "udp-sendto", udp_sink])
        .args(["fork", "tcp-send", tcp_sink, "1000", "end", "end"])
        .args(["fork", "udp-send", udp_sink, "3", "100", "end"])
        .args(["wait-file"])
        .args([&go])
        .args(["wait-children"])
        .spawn();
    wait_for("the first fork", Duration::from_secs(20), || {
        !calls_so_far(&parent).is_empty()
    });
    let first = calls_so_far(&parent)[0].clone();
    assert_eq!((first.op.as_str(), &first.result), ("fork", &Succeeded));
    let pid = first.pid;
    dp.block(BlockKey::process(pid, None), u64::MAX, 3)
        .expect("blocking the parent");
    std::fs::write(&blocked, b"").unwrap();

    // The parent's tcp, its three forks, then four calls from the children.
    wait_for(
        "the forked children's calls",
        Duration::from_secs(30),
        || {
            calls_so_far(&parent)
                .iter()
                .filter(|l| l.op != "fork" && l.op != "wait-file")
                .count()
                >= 5
        },
    );
    let lines = calls_so_far(&parent);
    let parent_lines = of(&lines, pid);
    assert_eq!(
        parent_lines[..2],
        [
            ("fork".to_string(), Succeeded),
            ("wait-file".to_string(), Succeeded)
        ]
    );
    assert_eq!(
        parent_lines[2],
        ("tcp".to_string(), Denied),
        "the blocked parent"
    );
    let children: Vec<&CallLine> = lines
        .iter()
        .filter(|l| l.pid != pid && l.op != "fork")
        .collect();
    let pids: std::collections::BTreeSet<u32> = children.iter().map(|l| l.pid).collect();
    assert_eq!(pids.len(), 3, "two children and a grandchild: {lines:?}");
    assert!(
        children.iter().all(|l| l.result == Denied),
        "every process forked after the block is refused (EPERM): {children:?}"
    );
    let ops: Vec<&str> = children.iter().map(|l| l.op.as_str()).collect();
    for op in ["tcp-send", "udp-sendto", "udp-send"] {
        assert!(ops.contains(&op), "{op} was tried: {ops:?}");
    }
    // The kernel's record: each of them under the parent, the pre-block child not.
    let tree = dp.block_tree();
    for p in &pids {
        assert!(
            tree.contains(&(*p, pid)),
            "{p} is in {pid}'s tree: {tree:?}"
        );
    }
    assert!(tree.contains(&(pid, pid)), "{tree:?}");
    assert_eq!(tree.len(), 4, "the pre-block child is not in it: {tree:?}");

    // The child forked before the block still works, and its bytes are the only ones.
    std::fs::write(&go, b"").unwrap();
    parent.wait();
    wait_for("the early child's upload", Duration::from_secs(10), || {
        calls_so_far(&parent)
            .iter()
            .any(|l| l.op == "tcp-send" && l.result == Succeeded)
    });
    let lines = calls_so_far(&parent);
    let early: Vec<&CallLine> = lines
        .iter()
        .filter(|l| l.op == "tcp-send" && l.result == Succeeded)
        .collect();
    assert_eq!(early.len(), 1, "{lines:?}");
    assert!(!pids.contains(&early[0].pid) && early[0].pid != pid);
    wait_for("the early child's bytes", Duration::from_secs(10), || {
        tcp.closed() >= 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        (tcp.bytes(), tcp.closed()),
        (1000, 1),
        "only the child forked before the block reached the TCP sink"
    );
    assert_eq!(udp.datagrams(), 0, "nothing reached the UDP sink");
}

/// Threads of a blocked process are not tree entries (they share its tgid, which the hooks
/// look up), and a process forked from a thread of a blocked process is followed: the creator
/// is the caller's process, not the thread.
#[test]
fn a_fork_from_a_thread_is_followed_and_threads_are_not_entries() {
    let ns = LoopNs::new();
    let dir = TempDir::new("block-tree-thread");
    let cg = TestCgroup::new();
    let mut dp = load();
    dp.attach(cg.path())
        .expect("attaching the hooks and the fork tracker");
    let tcp = TcpSink::start(&ns, ([127, 0, 0, 2], 7001));
    let blocked = dir.join("blocked");
    let mut probe = Probe::new()
        .netns(&ns)
        .cgroup(cg.path())
        .args(["sleep", "1", "wait-file"])
        .args([&blocked])
        .args([
            "thread",
            "tcp",
            "127.0.0.2:7001",
            "thread",
            "sleep",
            "1",
            "end",
        ])
        .args(["fork", "tcp-send", "127.0.0.2:7001", "10", "end", "end"])
        .args(["wait-children"])
        .spawn();
    wait_for("the probe's first call", Duration::from_secs(20), || {
        !calls_so_far(&probe).is_empty()
    });
    let pid = calls_so_far(&probe)[0].pid;
    dp.block(BlockKey::process(pid, None), u64::MAX, 3)
        .expect("blocking the probe");
    std::fs::write(&blocked, b"").unwrap();
    probe.wait();
    wait_for("the forked child's upload", Duration::from_secs(10), || {
        calls_so_far(&probe).iter().any(|l| l.op == "tcp-send")
    });
    let lines = calls_so_far(&probe);
    let tried: Vec<(u32, &str, &egress_tests::Verdict)> = lines
        .iter()
        .filter(|l| l.op == "tcp" || l.op == "tcp-send")
        .map(|l| (l.pid, l.op.as_str(), &l.result))
        .collect();
    assert_eq!(tried.len(), 2, "{lines:?}");
    assert_eq!(
        tried[0],
        (pid, "tcp", &Denied),
        "a thread of the blocked process"
    );
    assert_ne!(tried[1].0, pid, "{lines:?}");
    assert_eq!(
        (tried[1].1, tried[1].2),
        ("tcp-send", &Denied),
        "the process a thread forked"
    );
    assert_eq!(tcp.bytes(), 0);
    let mut tree = dp.block_tree();
    tree.sort_unstable();
    let mut want = vec![(pid, pid), (tried[1].0, pid)];
    want.sort_unstable();
    assert_eq!(tree, want, "two threads were made: neither is an entry");
}
