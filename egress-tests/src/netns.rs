//! Test network namespaces, made with `ip netns` (so that `ip netns list` shows them while a test
//! runs) and deleted on drop, and running code or commands inside them. Every `egress` a test
//! starts runs in one, so that its TC program never touches an interface of the host.

use std::{
    ffi::OsStr,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// The address of namespace `a` of a [`NetPair`] (the client side).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The address of namespace `b` of a [`NetPair`] (the server side).
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ADDR6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9e5, 0, 0, 0, 0, 0, 1);
pub const ADDR6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9e5, 0, 0, 0, 0, 0, 2);
/// The veth end in namespace `a`.
pub const VETH_A: &str = "veth-a";
/// The veth end in namespace `b`.
pub const VETH_B: &str = "veth-b";

/// Runs `ip ARGS`, panicking with its stderr when it fails.
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

/// One network namespace with only loopback, up; deleted on drop.
#[derive(Debug)]
pub struct LoopNs {
    name: String,
}

impl LoopNs {
    pub fn new() -> LoopNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ns = LoopNs {
            name: format!("egt-{}-{n}", std::process::id()),
        };
        ip(&["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `program` run inside the namespace. nsenter execs it in place (its pid is the program's)
    /// and keeps the host's mounts, cgroup2 included.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// `ip -n <name> ARGS`; panics when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// TCP segments this namespace has retransmitted so far (`Tcp: RetransSegs` of its
    /// /proc/net/snmp). Byte counters include retransmissions, so an exact check allows for them.
    /// The netlink (clsact) egress filters on `iface` that run our TC program, as `tc filter
    /// show` lists them (TCX links are not listed there).
    pub fn tc_egress_filters(&self, iface: &str) -> usize {
        let out = self
            .cmd("tc")
            .args(["filter", "show", "dev", iface, "egress"])
            .output()
            .expect("running tc");
        assert!(out.status.success(), "tc filter show: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(egress::datapath::TC_PROGRAM))
            .count()
    }

    pub fn tcp_retransmitted_segments(&self) -> u64 {
        let out = self
            .cmd("cat")
            .arg("/proc/net/snmp")
            .output()
            .expect("reading /proc/net/snmp in the namespace");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next(), tcp.next());
        let (Some(names), Some(values)) = (names, values) else {
            panic!("no Tcp lines in /proc/net/snmp: {text}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RetransSegs")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no RetransSegs in /proc/net/snmp: {text}"))
    }
}

/// Whether `counted` payload bytes account for `written` bytes to within 1%, plus at most one
/// full segment (1500 bytes: the veth MTU) for each of `retransmitted` segments: a payload
/// counter counts what leaves, retransmissions included, and never less than was written.
pub fn payload_accounts_for(counted: u64, written: u64, retransmitted: u64) -> bool {
    counted >= written && counted - written <= written / 100 + retransmitted * 1500
}

impl Default for LoopNs {
    fn default() -> Self {
        LoopNs::new()
    }
}

impl Drop for LoopNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two test namespaces joined by a veth pair: `a` (client) has [`VETH_A`] with 198.18.0.1/24 and
/// fd00:e9e5::1/64, `b` (server) has [`VETH_B`] with 198.18.0.2/24 and fd00:e9e5::2/64 (the
/// RFC 2544 benchmarking and a ULA range, which exist only inside these namespaces). The veth is
/// made directly inside them; both are deleted on drop.
#[derive(Debug)]
pub struct NetPair {
    pub a: LoopNs,
    pub b: LoopNs,
}

impl NetPair {
    pub fn new() -> NetPair {
        let pair = NetPair {
            a: LoopNs::new(),
            b: LoopNs::new(),
        };
        veth_between(&pair.a, &pair.b);
        pair
    }
}

/// Joins two namespaces with a veth pair, addressed as [`NetPair`] describes: [`VETH_A`] in
/// `a`, [`VETH_B`] in `b`. For tests that need the link to appear while something already runs
/// in `a`.
pub fn veth_between(a: &LoopNs, b: &LoopNs) {
    ip(&[
        "link",
        "add",
        VETH_A,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        VETH_B,
        "netns",
        b.name(),
    ]);
    for (ns, dev, v4, v6) in [(a, VETH_A, ADDR_A, ADDR6_A), (b, VETH_B, ADDR_B, ADDR6_B)] {
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
        ns.ip(&["link", "set", dev, "up"]);
    }
}

impl Default for NetPair {
    fn default() -> Self {
        NetPair::new()
    }
}

/// Runs `f` on a thread that has entered namespace `ns`, and returns what it returns. Sockets it
/// makes stay in that namespace after it returns; the calling thread is not moved.
pub fn in_netns<T: Send + 'static>(ns: &LoopNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let f_ns = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // SAFETY: setns on a valid namespace fd; it moves only this thread.
        let rc = unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
