//! Shared helpers of the real-kernel and end-to-end tests. Every test makes its own child cgroup
//! (never the root) and removes it on drop, also when the test fails. Traffic goes to loopback
//! addresses only.
#![allow(dead_code, reason = "each test crate uses a different subset")]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use egress::sys::cgroup::{ChildCgroup, cgroup2_root};

pub const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
pub const EGRESS: &str = env!("CARGO_BIN_EXE_egress");

/// A fresh child cgroup of the cgroup2 root, removed on drop.
pub fn test_cgroup() -> ChildCgroup {
    let root = cgroup2_root().expect("cgroup2 must be available (tests run as root)");
    ChildCgroup::create(&root, "egress-test").expect("creating a test cgroup (are we root?)")
}

/// Runs egress-probe inside `cgroup` and returns one result string per call ("ok", "EPERM", ...).
pub fn probe(cgroup: &Path, calls: &[(&str, &str)]) -> Vec<String> {
    let (results, _pid) = probe_with_pid(cgroup, calls);
    results
}

/// As [`probe`], also returning the probe's pid.
pub fn probe_with_pid(cgroup: &Path, calls: &[(&str, &str)]) -> (Vec<String>, u32) {
    let mut cmd = Command::new(PROBE);
    cmd.arg("--cgroup").arg(cgroup);
    for (op, dst) in calls {
        cmd.arg(op).arg(dst);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawning egress-probe");
    let pid = child.id();
    let out = child.wait_with_output().expect("egress-probe output");
    assert!(out.status.success(), "egress-probe failed: {:?}", out);
    (parse_probe(&out.stdout, calls.len()), pid)
}

pub fn parse_probe(stdout: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(stdout);
    let results: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}"));
            v["result"].as_str().expect("result").to_string()
        })
        .collect();
    assert_eq!(results.len(), n, "probe output: {text}");
    results
}

/// Did the firewall let the call through? ECONNREFUSED means it reached a closed port.
pub fn passed(result: &str) -> bool {
    match result {
        "ok" | "ECONNREFUSED" => true,
        "EPERM" => false,
        other => panic!("unexpected probe result {other}"),
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("egress-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f` on a thread that has entered the network namespace `/run/netns/<name>`. Sockets it
/// makes stay in that namespace after it returns.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two test network namespaces joined by a veth pair, removed on drop:
/// `a` (client) has `veth-a` with 198.18.0.1/24 and fd00:e9e5::1/64; `b` (server) has `veth-b`
/// with 198.18.0.2/24 and fd00:e9e5::2/64 (RFC 2544 benchmarking and ULA ranges, which only
/// exist inside these namespaces). Loopback is up in both.
pub struct NetPair {
    pub a: String,
    pub b: String,
}

pub const ADDR_A: &str = "198.18.0.1";
pub const ADDR_B: &str = "198.18.0.2";
pub const ADDR6_B: &str = "fd00:e9e5::2";
pub const VETH_A: &str = "veth-a";

impl NetPair {
    pub fn new() -> NetPair {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        let pair = NetPair {
            a: format!("egt-a-{tag}"),
            b: format!("egt-b-{tag}"),
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "link", "add", VETH_A, "netns", &pair.a, "type", "veth", "peer", "name", "veth-b",
            "netns", &pair.b,
        ]);
        for (ns, dev, v4, v6) in [
            (&pair.a, VETH_A, "198.18.0.1/24", "fd00:e9e5::1/64"),
            (&pair.b, "veth-b", "198.18.0.2/24", "fd00:e9e5::2/64"),
        ] {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// A command run inside namespace `a` (nsenter keeps the host's mounts, cgroup2 included).
    pub fn cmd_in_a(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.a))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// One network namespace with only loopback up, removed on drop: where end-to-end tests run
/// `egress`, so that its default TC attachment never touches the host's interfaces.
pub struct LoopNs {
    pub name: String,
}

impl LoopNs {
    pub fn new() -> LoopNs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = LoopNs {
            name: format!("egt-lo-{}-{n}", std::process::id()),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for LoopNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Stops a controller the test started: SIGTERM, then SIGKILL if it has not exited within 10 s.
pub fn terminate(child: &mut std::process::Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
