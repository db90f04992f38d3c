//! egress-bench: the benchmark harness behind `cargo xtask bench` (run as root).
//!
//! Everything runs in network namespaces and child cgroups this program creates and removes;
//! iptables and nftables rules only ever go into its own namespace. Figures are measured in the
//! same run against a baseline and reported as medians with their spread:
//! 1. connect()/sendto() decision cost vs policy size: no firewall, egress, iptables (one OUTPUT
//!    rule per prefix), nftables (an interval set);
//! 2. TC accounting cost: iperf3 TCP throughput and small-packet UDP rate over a veth pair;
//! 3. policy apply time and kernel memory per rule;
//! 4. the event path: denied connects per second with an event each, and events lost;
//! 5. DNS lookup latency through egress's proxy against the same lookup sent directly;
//! 6. the connect decision with 100k live DNS grants against 100k approved CIDR prefixes, from
//!    the kernel's own statistics of the program (5 and 6 in `names`);
//! 7. the decision with 1,000 scoped services over 100k prefixes against the same policy
//!    unscoped, from the same statistics (`scopes`).
//!
//! Namespaces, cgroups and the processes it starts come from the test harness (`egress_tests`),
//! so that the bench cleans up exactly as the tests do. `egress-bench client …` is its own timing
//! client, which it starts inside a namespace and a cgroup.
//! (Over 500 lines: one benchmark harness, each measurement beside its baseline.)

mod names;
mod scopes;

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use egress::{
    datapath::{Capacities, Datapath, V4Lookup},
    policy::Policy,
    policy::compile::CompiledPolicy,
};
use egress_tests::{ChildGuard, LoopNs, NetPair, TestCgroup, in_netns};
use serde::{Deserialize, Serialize};

/// The benchmarks behind `cargo xtask bench` (root; needs iproute2, iptables, nftables, iperf3,
/// dnsmasq, and the `egress` binary beside this one): egress against a no-firewall baseline,
/// iptables and nftables, in namespaces and cgroups of its own. Prints a table and writes
/// results.json and results.md.
#[derive(Parser, Debug)]
#[command(name = "egress-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    /// A smoke run of about a minute: fewer sizes, runs and iterations.
    #[arg(long)]
    quick: bool,
    /// Directory for results.json and results.md.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Run one section alone and write SECTION.json and SECTION.md instead (for re-measuring a
    /// section without the whole bench).
    #[arg(long, value_enum, value_name = "SECTION")]
    only: Option<Section>,
    #[command(subcommand)]
    helper: Option<Helper>,
}

#[derive(Subcommand, Debug)]
enum Helper {
    /// The timing client (the bench starts it inside a namespace and a cgroup): makes ITERS calls
    /// and prints their latency as JSON; for deny-flood, calls for ITERS milliseconds and prints
    /// the rate.
    #[command(hide = true)]
    Client {
        /// What to time.
        #[arg(value_enum)]
        mode: Mode,
        /// Destination.
        addr: SocketAddr,
        /// Calls (milliseconds for deny-flood).
        iters: usize,
        /// dns-udp: the name to look up.
        #[arg(long, default_value = "bench.example.test")]
        name: String,
        /// udp-connect-many, udp-sendto-many: how many of the bench's target addresses to connect to in turn
        /// (ADDR gives the port).
        #[arg(long, default_value_t = 1)]
        targets: usize,
    },
}

/// A section that can run alone (`--only`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// 7: scoped services against the same policy unscoped.
    Scopes,
    /// 1–3: decision cost (wall clock and per program), TC cost, apply time and memory.
    Lookup,
}

/// The calls the client times.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// connect() of one UDP socket, again and again.
    UdpConnect,
    /// sendto() from an unconnected UDP socket (to a sink of its own).
    UdpSendto,
    /// A TCP connect to a listener of its own.
    TcpConnect,
    /// UDP connects to a denied address, each with an event.
    DenyFlood,
    /// DNS lookups (A record of --name), each from a new connected UDP socket, as glibc does.
    DnsUdp,
    /// connect() of one UDP socket to --targets addresses in turn, counting EPERM.
    UdpConnectMany,
    /// sendto() from one unconnected UDP socket to --targets addresses in turn, counting EPERM.
    UdpSendtoMany,
}

impl Mode {
    /// As the client's command line spells it.
    fn arg(self) -> String {
        self.to_possible_value()
            .expect("every mode is a value")
            .get_name()
            .to_string()
    }
}

/// What the client prints: the latency of its calls.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
struct Latency {
    p50_ns: f64,
    p99_ns: f64,
    mean_ns: f64,
    /// Calls refused with EPERM (udp-connect-many counts them; the other modes fail instead).
    #[serde(default)]
    denied: u64,
}

fn percentiles(mut v: Vec<u64>) -> Latency {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize] as f64;
    Latency {
        p50_ns: at(0.5),
        p99_ns: at(0.99),
        mean_ns: v.iter().sum::<u64>() as f64 / v.len() as f64,
        denied: 0,
    }
}

/// `egress-bench client MODE ADDR ITERS`: times each call, prints a Latency as JSON.
fn client(
    mode: Mode,
    addr: SocketAddr,
    iters: usize,
    name: &str,
    targets: usize,
) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(iters);
    let any = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    match mode {
        Mode::DnsUdp => samples = names::dns_client(addr, name, iters)?,
        Mode::UdpConnectMany | Mode::UdpSendtoMany => {
            let (times, denied) = if mode == Mode::UdpConnectMany {
                names::connect_many(addr.port(), targets, iters)?
            } else {
                scopes::sendto_many(addr.port(), targets, iters)?
            };
            let l = Latency {
                denied,
                ..percentiles(times)
            };
            println!("{}", serde_json::to_string(&l)?);
            return Ok(());
        }
        Mode::UdpConnect => {
            let s = UdpSocket::bind(any)?;
            for _ in 0..iters / 10 {
                s.connect(addr)?;
            }
            for _ in 0..iters {
                let t = Instant::now();
                s.connect(addr)?;
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        Mode::UdpSendto => {
            let sink = UdpSocket::bind(addr)?;
            sink.set_nonblocking(true)?;
            let s = UdpSocket::bind(any)?;
            let mut buf = [0u8; 64];
            for i in 0..iters + iters / 10 {
                let t = Instant::now();
                s.send_to(b"egress-bench", addr)?;
                if i >= iters / 10 {
                    samples.push(t.elapsed().as_nanos() as u64);
                }
                while sink.recv(&mut buf).is_ok() {}
            }
        }
        Mode::TcpConnect => {
            let l = TcpListener::bind(addr)?;
            let acceptor = std::thread::spawn(move || {
                for c in l.incoming().take(iters + iters / 10) {
                    drop(c);
                }
            });
            for i in 0..iters + iters / 10 {
                let t = Instant::now();
                let c = TcpStream::connect(addr)?;
                if i >= iters / 10 {
                    samples.push(t.elapsed().as_nanos() as u64);
                }
                drop(c);
            }
            let _ = acceptor.join();
        }
        Mode::DenyFlood => {
            // Connect to a denied address for ITERS milliseconds; print the rate.
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let end = Instant::now() + Duration::from_millis(iters as u64);
            let mut n = 0u64;
            let start = Instant::now();
            while Instant::now() < end {
                for _ in 0..100 {
                    let _ = s.connect(addr);
                }
                n += 100;
            }
            println!(
                "{}",
                serde_json::json!({ "calls": n, "per_sec": n as f64 / start.elapsed().as_secs_f64() })
            );
            return Ok(());
        }
    }
    println!("{}", serde_json::to_string(&percentiles(samples))?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The parent: namespaces, policies, measurements.

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program` inside namespace `ns` and cgroup `cg`.
fn cmd_in(ns: &LoopNs, cg: &TestCgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = ns.cmd(program);
    cg.join_on_exec(&mut cmd);
    cmd
}

/// This bench's own client, inside namespace `ns` and cgroup `cg`.
fn client_in(ns: &LoopNs, cg: &TestCgroup, mode: Mode, addr: &str, iters: usize) -> Command {
    let me = std::env::current_exe().expect("own path");
    let mut cmd = cmd_in(ns, cg, me);
    cmd.arg("client")
        .arg(mode.arg())
        .args([addr, &iters.to_string()]);
    cmd
}

fn time_client(
    ns: &LoopNs,
    cg: &TestCgroup,
    mode: Mode,
    addr: &str,
    iters: usize,
) -> anyhow::Result<Latency> {
    let out = sh(&mut client_in(ns, cg, mode, addr, iters))?;
    Ok(serde_json::from_str(out.trim())?)
}

/// Deterministic, distinct, non-contiguous prefixes of mixed lengths (/16 to /32) outside 0/8
/// and 127/8, always in the same order.
fn prefix_stream() -> impl Iterator<Item = (u32, u8)> {
    let mut seen = std::collections::HashSet::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    std::iter::from_fn(move || {
        loop {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [16u8, 20, 22, 24, 24, 24, 28, 32][(x >> 60) as usize % 8];
            let mut addr = (x as u32) & (u32::MAX << (32 - len));
            if addr >> 24 == 127 || addr >> 24 == 0 {
                addr ^= 0x4000_0000;
            }
            if seen.insert((addr, len)) {
                return Some((addr, len));
            }
        }
    })
}

/// The first `n` prefixes of [`prefix_stream`].
fn prefixes(n: usize) -> Vec<(u32, u8)> {
    prefix_stream().take(n).collect()
}

fn cidr((a, l): (u32, u8)) -> String {
    format!("{}/{l}", std::net::Ipv4Addr::from(a))
}

fn egress_policy(prefixes: &[(u32, u8)], default_allow: bool) -> anyhow::Result<CompiledPolicy> {
    let mut text = format!(
        "allow_loopback = false\ndefault = \"{}\"\n",
        if default_allow { "allow" } else { "deny" }
    );
    text.push_str(
        "[[service]]\nname = \"bench-target\"\ndestinations = [\"127.0.0.2\", \"198.18.0.0/24\", \"::1\"]\n",
    );
    if !prefixes.is_empty() {
        text.push_str("[[block]]\nname = \"bench-blocked\"\ndestinations = [");
        for (i, p) in prefixes.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('"');
            text.push_str(&cidr(*p));
            text.push('"');
        }
        text.push_str("]\n");
    }
    let policy = Policy::parse("bench.toml", &text)?;
    Ok(CompiledPolicy::compile(&policy)?)
}

#[derive(Debug, Serialize, Default, Clone)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
        runs: v.len(),
    }
}

#[derive(Debug, Serialize, Default)]
struct DecisionRow {
    prefixes: usize,
    firewall: String,
    call: String,
    p50_ns: Stat,
    p99_ns: Stat,
    /// p50 minus the baseline's p50 of the same call, in the same run.
    overhead_p50_ns: f64,
}

struct Settings {
    quick: bool,
    reps: usize,
    iters: usize,
    sizes: Vec<usize>,
}

/// The calls of section 1: name, client mode, destination, iterations (a divisor of
/// `Settings::iters`). The sendto() client binds a UDP sink on its destination, and the TCP client
/// a listener, so that no datagram draws an ICMP port-unreachable the firewalls would judge too.
const CALLS: [(&str, Mode, &str, usize); 4] = [
    ("udp connect()", Mode::UdpConnect, "127.0.0.2:9", 1),
    ("udp sendto()", Mode::UdpSendto, "127.0.0.2:9", 1),
    ("tcp connect()", Mode::TcpConnect, "127.0.0.2:8080", 10),
    ("udp sendto() ipv6", Mode::UdpSendto, "[::1]:9", 1),
];

/// The programs whose kernel statistics section 1 reports (section 1c has the hook's floor).
const DECISION_PROGRAMS: [&str; 6] = [
    "connect4",
    "sendmsg4",
    "connect6",
    "sendmsg6",
    "skb_egress",
    "tc_egress",
];

fn measure_calls(
    ns: &LoopNs,
    cgroup: &TestCgroup,
    s: &Settings,
) -> anyhow::Result<Vec<(String, Stat, Stat)>> {
    let mut out = Vec::new();
    for (call, mode, addr, div) in CALLS {
        let iters = s.iters / div;
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..s.reps {
            let l = time_client(ns, cgroup, mode, addr, iters)?;
            p50.push(l.p50_ns);
            p99.push(l.p99_ns);
        }
        out.push((call.to_string(), stat(p50), stat(p99)));
    }
    Ok(out)
}

/// What the kernel counted for one egress program over one client run of one call
/// (`bpf_stats_enabled`): the program's own run time, free of the syscall around it.
#[derive(Debug, Serialize, Default)]
struct ProgramRow {
    prefixes: usize,
    /// Where egress looked IPv4 destinations up: "range table" or "trie".
    lookup: String,
    call: String,
    program: String,
    /// Runs of the program over the client run (calls and warm-up calls; packets for
    /// skb_egress and tc_egress, from both ends of a TCP connection).
    runs: u64,
    runs_per_call: f64,
    /// `run_time_ns / run_cnt`.
    ns_per_run: f64,
}

/// ICMP destination-unreachable messages the namespace sent (`/proc/net/snmp`, per namespace).
fn icmp_unreachable_sent(ns: &LoopNs) -> anyhow::Result<u64> {
    let snmp = sh(ns.cmd("cat").arg("/proc/net/snmp"))?;
    out_dest_unreachs(&snmp).context("no Icmp OutDestUnreachs in /proc/net/snmp")
}

/// `Icmp: … OutDestUnreachs …` of a `/proc/net/snmp` text (a line of names, then one of values).
fn out_dest_unreachs(snmp: &str) -> Option<u64> {
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next()?, icmp.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutDestUnreachs")
        .and_then(|(_, v)| v.parse().ok())
}

/// Section 1's kernel statistics for egress at `n` prefixes: with run-time statistics on (only
/// here, so that they cost the wall-clock runs nothing) and the TC program on the namespace's
/// loopback, one client run of each call; per program, the kernel's ns per run.
fn program_stats(
    ns: &LoopNs,
    cg: &TestCgroup,
    dp: &Datapath,
    s: &Settings,
    n: usize,
    lookup: &str,
) -> anyhow::Result<Vec<ProgramRow>> {
    let _on = egress::datapath::enable_run_stats()?;
    let read = || -> anyhow::Result<Vec<egress::datapath::RunStats>> {
        DECISION_PROGRAMS
            .iter()
            .map(|p| Ok(dp.run_stats(p)?))
            .collect()
    };
    let mut rows = Vec::new();
    for (call, mode, addr, div) in CALLS {
        let iters = s.iters / div;
        let before = read()?;
        time_client(ns, cg, mode, addr, iters)?;
        let after = read()?;
        let calls = (iters + iters / 10) as f64;
        for ((prog, b), a) in DECISION_PROGRAMS.iter().zip(&before).zip(&after) {
            let runs = a.run_count - b.run_count;
            if runs == 0 {
                continue;
            }
            rows.push(ProgramRow {
                prefixes: n,
                lookup: lookup.to_string(),
                call: call.to_string(),
                program: prog.to_string(),
                runs,
                runs_per_call: runs as f64 / calls,
                ns_per_run: (a.run_time - b.run_time).as_nanos() as f64 / runs as f64,
            });
        }
        let decided = match (mode == Mode::UdpSendto, addr.starts_with('[')) {
            (true, false) => "sendmsg4",
            (true, true) => "sendmsg6",
            (false, false) => "connect4",
            (false, true) => "connect6",
        };
        if !rows.iter().any(|r| {
            r.prefixes == n && r.lookup == lookup && r.call == call && r.program == decided
        }) {
            bail!(
                "the kernel counted no run of {decided} for {call} (are run-time statistics on?)"
            );
        }
    }
    Ok(rows)
}

/// Section 1c: one row per size and lookup.
#[derive(Debug, Serialize, Default)]
struct SpreadRow {
    prefixes: usize,
    /// Distinct destinations the client connects to in turn.
    targets: usize,
    lookup: String,
    /// `connect4` ns per run, median [min–max] over the runs.
    kernel_ns: Stat,
}

/// Section 1c: the lookup across many destinations. The N prefixes approved (UDP port 9), one
/// UDP socket connected to one address inside each of up to 200,000 of them in turn (cold
/// caches, every part of the table), with the range table and with the trie alternating (two
/// datapaths, each on its own cgroup), and a policy of no prefixes as the floor.
fn lookup_spread(s: &Settings) -> anyhow::Result<Vec<SpreadRow>> {
    let ns = LoopNs::new();
    names::default_route(&ns);
    let mut rows = Vec::new();
    for &n in &s.sizes {
        let t = names::targets(n);
        let prefixes: Vec<(u32, u8)> = t.iter().map(|(p, _)| *p).collect();
        let targets = t.len().min(200_000);
        drop(t);
        eprintln!("bench: lookup across {targets} destinations, {n} prefixes");
        let mut text = String::from(
            "mode = \"enforce\"\ndefault = \"deny\"\nallow_loopback = false\n[[service]]\nname = \"spread\"\nports = [9]\nprotocols = [\"udp\"]\ndestinations = [",
        );
        for (i, p) in prefixes.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('"');
            text.push_str(&cidr(*p));
            text.push('"');
        }
        text.push_str("]\n");
        let compiled = CompiledPolicy::compile(&Policy::parse("spread.toml", &text)?)?;
        let floor = CompiledPolicy::compile(&Policy::parse(
            "floor.toml",
            "mode = \"enforce\"\ndefault = \"allow\"\nallow_loopback = false\n",
        )?)?;
        let sizes = Capacities {
            owners: None,
            prefixes: Some(n as u32),
            kernel_log: false,
            events_ring: None,
        };
        let mut cases: Vec<(&str, Datapath, TestCgroup)> = vec![
            (
                "range table",
                Datapath::load_capacities(&compiled, sizes)?,
                TestCgroup::with_prefix("egress-bench"),
            ),
            (
                "trie",
                trie_datapath(&compiled)?,
                TestCgroup::with_prefix("egress-bench"),
            ),
            (
                "no prefixes (floor)",
                Datapath::load(&floor)?,
                TestCgroup::with_prefix("egress-bench"),
            ),
        ];
        for (_, dp, cg) in &mut cases {
            dp.attach(cg.path())?;
        }
        let _stats = egress::datapath::enable_run_stats()?;
        let mut kernel = vec![Vec::new(); cases.len()];
        let port = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 9)).to_string();
        for _ in 0..s.reps {
            for (i, (what, dp, cg)) in cases.iter().enumerate() {
                let before = dp.run_stats("connect4")?;
                let mut cmd = client_in(&ns, cg, Mode::UdpConnectMany, &port, 2 * targets);
                cmd.args(["--targets", &targets.to_string()]);
                let l: Latency = serde_json::from_str(sh(&mut cmd)?.trim())?;
                let after = dp.run_stats("connect4")?;
                if l.denied > 0 {
                    bail!("{what}: {} of the approved connects were denied", l.denied);
                }
                let runs = after.run_count - before.run_count;
                if runs < 2 * targets as u64 {
                    bail!("{what}: the kernel counted {runs} runs of connect4");
                }
                kernel[i].push((after.run_time - before.run_time).as_nanos() as f64 / runs as f64);
            }
        }
        for (i, (what, ..)) in cases.iter().enumerate() {
            rows.push(SpreadRow {
                prefixes: n,
                targets,
                lookup: what.to_string(),
                kernel_ns: stat(kernel[i].clone()),
            });
        }
    }
    Ok(rows)
}

/// A datapath enforcing `compiled` with its IPv4 prefixes in the trie: a range table with room
/// for nothing, then a reload.
fn trie_datapath(compiled: &CompiledPolicy) -> anyhow::Result<Datapath> {
    let sizes = Capacities {
        owners: None,
        prefixes: Some(1),
        kernel_log: false,
        events_ring: None,
    };
    let mut dp = Datapath::load_capacities(&egress_policy(&[], false)?, sizes)?;
    let applied = dp.reload(compiled)?;
    if !matches!(applied.v4_lookup, V4Lookup::Trie { .. }) && !compiled.v4.is_empty() {
        bail!("expected the trie, got {:?}", applied.v4_lookup);
    }
    Ok(dp)
}

/// Section 1: the wall-clock rows, the kernel's per-program rows, and the ICMP
/// destination-unreachable messages sent in its namespace over the whole section (0 expected).
type DecisionCost = (Vec<DecisionRow>, Vec<ProgramRow>, u64);

fn decision_cost(s: &Settings) -> anyhow::Result<DecisionCost> {
    let ns = LoopNs::new();
    // Every client runs in an empty child cgroup of the root: the baseline and the netfilter
    // runs see no cgroup program at all (the bench's own cgroup may carry systemd's), egress only
    // its own.
    let plain = TestCgroup::with_prefix("egress-bench");
    let mut rows = Vec::new();
    let mut programs = Vec::new();
    let icmp_before = icmp_unreachable_sent(&ns)?;
    let mut baseline: BTreeMap<String, f64> = BTreeMap::new();
    for &n in &s.sizes {
        let pfx = prefixes(n);
        eprintln!("bench: decision cost with {n} prefixes");
        // The baseline again, right before each size, so that drift does not pass for cost.
        for (call, p50, p99) in measure_calls(&ns, &plain, s)? {
            baseline.insert(call.clone(), p50.median);
            rows.push(DecisionRow {
                prefixes: n,
                firewall: "none (baseline)".into(),
                call,
                p50_ns: p50,
                p99_ns: p99,
                overhead_p50_ns: 0.0,
            });
        }
        // egress: the policy blocks every prefix and approves the target, so each call walks the
        // trie and a rule set.
        {
            let cg = TestCgroup::with_prefix("egress-bench");
            let compiled = egress_policy(&pfx, false)?;
            let mut dp = Datapath::load(&compiled)?;
            dp.attach(cg.path())?;
            for (call, p50, p99) in measure_calls(&ns, &cg, s)? {
                let over = p50.median - baseline[&call];
                rows.push(DecisionRow {
                    prefixes: n,
                    firewall: "egress".into(),
                    call,
                    p50_ns: p50,
                    p99_ns: p99,
                    overhead_p50_ns: over,
                });
            }
            // Then the kernel's own figures, TC included (after the wall-clock runs, which it
            // would otherwise slow down: egress does not attach TC to loopback).
            let dp = in_netns(&ns, move || -> anyhow::Result<Datapath> {
                dp.attach_tc(&["lo".to_string()])?;
                Ok(dp)
            })?;
            let t = Instant::now();
            programs.extend(program_stats(&ns, &cg, &dp, s, n, "range table")?);
            drop(dp);
            // The same policy looked up in the LPM trie (what egress did before the range
            // table, and still does for a policy the table has no room for), same run.
            let cg = TestCgroup::with_prefix("egress-bench");
            let mut dp = trie_datapath(&compiled)?;
            dp.attach(cg.path())?;
            let dp = in_netns(&ns, move || -> anyhow::Result<Datapath> {
                dp.attach_tc(&["lo".to_string()])?;
                Ok(dp)
            })?;
            programs.extend(program_stats(&ns, &cg, &dp, s, n, "trie")?);
            eprintln!(
                "bench: kernel statistics of the programs in {:.1?}",
                t.elapsed()
            );
            drop(dp);
        }
        // iptables: one DROP rule per prefix in OUTPUT (linear), only up to 10k.
        if n <= 10_000 {
            let mut rules = String::from(
                "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
            );
            for p in &pfx {
                rules.push_str(&format!("-A OUTPUT -d {} -j DROP\n", cidr(*p)));
            }
            rules.push_str("COMMIT\n");
            let mut child = ns.cmd("iptables-restore").stdin(Stdio::piped()).spawn()?;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(rules.as_bytes())?;
            if !child.wait()?.success() {
                bail!("iptables-restore failed");
            }
            for (call, p50, p99) in measure_calls(&ns, &plain, s)? {
                let over = p50.median - baseline[&call];
                rows.push(DecisionRow {
                    prefixes: n,
                    firewall: "iptables (linear OUTPUT)".into(),
                    call,
                    p50_ns: p50,
                    p99_ns: p99,
                    overhead_p50_ns: over,
                });
            }
            sh(ns.cmd("iptables").args(["-F", "OUTPUT"]))?;
        }
        // nftables: an interval set looked up per packet.
        {
            let mut conf = String::from(
                "table inet egressbench {\n set blocked { type ipv4_addr; flags interval; auto-merge; ",
            );
            if !pfx.is_empty() {
                conf.push_str("elements = { ");
                for (i, p) in pfx.iter().enumerate() {
                    if i > 0 {
                        conf.push_str(", ");
                    }
                    conf.push_str(&cidr(*p));
                }
                conf.push_str(" }");
            }
            conf.push_str(" }\n chain out { type filter hook output priority 0; ip daddr @blocked drop; }\n}\n");
            let file =
                std::env::temp_dir().join(format!("egress-bench-{}.nft", std::process::id()));
            fs::write(&file, conf)?;
            let loaded = sh(ns.cmd("nft").arg("-f").arg(&file));
            let _ = fs::remove_file(&file);
            loaded?;
            for (call, p50, p99) in measure_calls(&ns, &plain, s)? {
                let over = p50.median - baseline[&call];
                rows.push(DecisionRow {
                    prefixes: n,
                    firewall: "nftables (interval set)".into(),
                    call,
                    p50_ns: p50,
                    p99_ns: p99,
                    overhead_p50_ns: over,
                });
            }
            sh(ns
                .cmd("nft")
                .args(["delete", "table", "inet", "egressbench"]))?;
        }
    }
    let icmp = icmp_unreachable_sent(&ns)? - icmp_before;
    if icmp > 0 {
        eprintln!("bench: warning: {icmp} ICMP destination-unreachable messages in section 1");
    }
    Ok((rows, programs, icmp))
}

#[derive(Debug, Serialize, Default)]
struct TcRow {
    test: String,
    without_tc: Stat,
    with_tc: Stat,
    /// with / without.
    ratio: f64,
    /// with / without of each ABAB pair.
    pair_ratios: Stat,
}

fn iperf(
    client_ns: &LoopNs,
    cgroup: &TestCgroup,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = cmd_in(client_ns, cgroup, "iperf3");
    cmd.args(["-J", "-c", &egress_tests::netns::ADDR_B.to_string()])
        .args(args);
    let out = sh(&mut cmd)?;
    Ok(serde_json::from_str(&out)?)
}

/// The per-packet programs section 2 reports from the kernel's statistics.
const TC_PROGRAMS: [&str; 2] = ["tc_egress", "skb_egress"];

/// The kernel's statistics of one per-packet program over one iperf3 run of section 2.
#[derive(Debug, Serialize, Default)]
struct TcProgramRow {
    test: String,
    program: String,
    /// Runs: packets leaving through the veth (tc_egress) or from the client's cgroup
    /// (skb_egress), the iperf3 control connection included.
    runs: u64,
    /// `run_time_ns / run_cnt`.
    ns_per_run: f64,
}

fn tc_cost(s: &Settings) -> anyhow::Result<(Vec<TcRow>, Vec<TcProgramRow>)> {
    let pair = NetPair::new();
    let a = &pair.a;
    let _server = ChildGuard::spawn(pair.b.cmd("iperf3").args([
        "-s",
        "-B",
        &egress_tests::netns::ADDR_B.to_string(),
    ]));
    std::thread::sleep(Duration::from_millis(300));
    let secs = if s.quick { "2" } else { "5" };
    let run = |cg: &TestCgroup| -> anyhow::Result<(f64, f64)> {
        let tcp = iperf(a, cg, &["-t", secs])?;
        let bps = tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        let udp = iperf(a, cg, &["-u", "-l", "64", "-b", "0", "-t", secs])?;
        let pkts = udp["end"]["sum"]["packets"].as_f64().unwrap_or(0.0);
        let dur = udp["end"]["sum"]["seconds"].as_f64().unwrap_or(1.0);
        Ok((bps, pkts / dur))
    };
    let (mut tcp0, mut udp0, mut tcp1, mut udp1) = (vec![], vec![], vec![], vec![]);
    let cg = TestCgroup::with_prefix("egress-bench");
    // The cgroup hooks are attached in both runs: the difference is the TC program alone. Runs
    // alternate without and with TC (ABAB...), so that drift over the section lands on both.
    let compiled = egress_policy(&[], true)?;
    let mut dp = Datapath::load(&compiled)?;
    dp.attach(cg.path())?;
    let rounds = if s.quick { s.reps } else { 2 * s.reps };
    for _ in 0..rounds {
        let (t, u) = run(&cg)?;
        tcp0.push(t);
        udp0.push(u);
        dp = in_netns(a, move || -> anyhow::Result<Datapath> {
            dp.attach_tc(&[egress_tests::netns::VETH_A.to_string()])?;
            Ok(dp)
        })?;
        let (t, u) = run(&cg)?;
        tcp1.push(t);
        udp1.push(u);
        dp.detach_tc()?;
    }
    let dp = in_netns(a, move || -> anyhow::Result<Datapath> {
        dp.attach_tc(&[egress_tests::netns::VETH_A.to_string()])?;
        Ok(dp)
    })?;
    // The kernel's own figures per packet, in one more run of each with statistics on (only
    // then: they cost each program run two clock reads).
    let mut programs = Vec::new();
    let t = Instant::now();
    {
        let _on = egress::datapath::enable_run_stats()?;
        let udp_args = ["-u", "-l", "64", "-b", "0", "-t", secs];
        let tests: [(&str, &[&str]); 2] = [
            ("iperf3 TCP bulk", &["-t", secs]),
            ("iperf3 UDP 64-byte", &udp_args),
        ];
        for (test, args) in tests {
            let before = TC_PROGRAMS.map(|p| dp.run_stats(p));
            iperf(a, &cg, args)?;
            let after = TC_PROGRAMS.map(|p| dp.run_stats(p));
            for ((prog, b), a) in TC_PROGRAMS.iter().zip(before).zip(after) {
                let (b, a) = (b?, a?);
                let runs = a.run_count - b.run_count;
                programs.push(TcProgramRow {
                    test: test.into(),
                    program: prog.to_string(),
                    runs,
                    ns_per_run: (a.run_time - b.run_time).as_nanos() as f64 / runs.max(1) as f64,
                });
            }
        }
    }
    eprintln!("bench: kernel statistics of TC in {:.1?}", t.elapsed());
    let counted = dp.flows()?.iter().map(|(_, v)| v.packets).sum::<u64>();
    eprintln!("bench: TC counted {counted} packets");
    let _ = dp.stats();
    drop(dp);

    let row = |test: &str, w0: Vec<f64>, w1: Vec<f64>| {
        // Each pair (a run without, the next with) gives a ratio: their spread says how well
        // the section resolves TC's cost.
        let pairs: Vec<f64> = w0.iter().zip(&w1).map(|(a, b)| b / a).collect();
        let (a, b) = (stat(w0), stat(w1));
        TcRow {
            test: test.into(),
            ratio: b.median / a.median,
            pair_ratios: stat(pairs),
            without_tc: a,
            with_tc: b,
        }
    };
    Ok((
        vec![
            row("iperf3 TCP bulk (bits/s)", tcp0, tcp1),
            row("iperf3 UDP 64-byte (packets/s)", udp0, udp1),
        ],
        programs,
    ))
}

#[derive(Debug, Serialize, Default)]
struct ApplyRow {
    prefixes: usize,
    apply_ms: Stat,
    kernel_bytes: u64,
    bytes_per_rule: f64,
}

fn apply_cost(s: &Settings) -> anyhow::Result<Vec<ApplyRow>> {
    let sizes: Vec<usize> = if std::env::var_os("EGRESS_BENCH_SIZES").is_some() {
        s.sizes.clone()
    } else if s.quick {
        vec![10_000, 100_000]
    } else {
        vec![10_000, 100_000, 1_000_000]
    };
    let mut rows = Vec::new();
    for n in sizes {
        eprintln!("bench: apply {n} prefixes");
        let big = egress_policy(&prefixes(n), false)?;
        let small = egress_policy(&[], false)?;
        // A range table with room for the big policy, as `--prefix-capacity N` makes it.
        let sizes = Capacities {
            owners: None,
            prefixes: Some(n as u32),
            kernel_log: false,
            events_ring: None,
        };
        let mut dp = Datapath::load_capacities(&small, sizes)?;
        let mut times = Vec::new();
        let mut mem = 0;
        for _ in 0..s.reps {
            // Apply the big policy, then the small one (so the next apply starts from a clean
            // buffer as a fresh reload would).
            let applied = dp.reload(&big)?;
            if !matches!(applied.v4_lookup, V4Lookup::Ranges { .. }) {
                bail!(
                    "{n} prefixes: expected the range table, got {:?}",
                    applied.v4_lookup
                );
            }
            times.push(applied.elapsed.as_secs_f64() * 1000.0);
            mem = dp.policy_memlock(4).unwrap_or(0);
            dp.reload(&small)?;
        }
        rows.push(ApplyRow {
            prefixes: n,
            apply_ms: stat(times),
            kernel_bytes: mem,
            bytes_per_rule: mem as f64 / big.v4.len() as f64,
        });
    }
    Ok(rows)
}

#[derive(Debug, Serialize, Default)]
struct EventRow {
    denies_per_sec: Stat,
    events_received: u64,
    events_lost: u64,
}

fn event_path(s: &Settings) -> anyhow::Result<EventRow> {
    let ns = LoopNs::new();
    let cg = TestCgroup::with_prefix("egress-bench");
    let compiled = egress_policy(&[], false)?;
    let mut dp = Datapath::load(&compiled)?;
    let mut ring = dp.take_events()?;
    dp.attach(cg.path())?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let drainer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            while ring.try_next().is_some() {
                n += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        while ring.try_next().is_some() {
            n += 1;
        }
        n
    });
    let mut rates = Vec::new();
    let ms = if s.quick { 1000 } else { 3000 };
    for _ in 0..s.reps {
        let out = sh(&mut client_in(
            &ns,
            &cg,
            Mode::DenyFlood,
            "198.51.100.1:9",
            ms,
        ))?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        rates.push(v["per_sec"].as_f64().unwrap_or(0.0));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let received = drainer.join().expect("drainer");
    let lost = dp.stats()?.events_lost;
    Ok(EventRow {
        denies_per_sec: stat(rates),
        events_received: received,
        events_lost: lost,
    })
}

#[derive(Debug, Serialize)]
struct Results {
    when: String,
    kernel: String,
    cpu: String,
    cores: usize,
    quick: bool,
    command: String,
    decision: Vec<DecisionRow>,
    /// Section 1 from the kernel's statistics of each egress program.
    decision_programs: Vec<ProgramRow>,
    /// ICMP destination-unreachable messages sent in section 1's namespace (0 expected).
    decision_icmp_unreachable: u64,
    /// Section 1c.
    spread: Vec<SpreadRow>,
    tc: Vec<TcRow>,
    /// Section 2 from the kernel's statistics of the per-packet programs.
    tc_programs: Vec<TcProgramRow>,
    apply: Vec<ApplyRow>,
    events: EventRow,
    dns: names::DnsReport,
    grants: names::GrantReport,
    scopes: scopes::ScopeReport,
}

fn machine() -> (String, String, usize) {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    (kernel, cpu, cores)
}

fn ns(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} µs", v / 1000.0)
    } else {
        format!("{v:.0} ns")
    }
}

/// Section 1's per-program table.
fn programs_markdown(rows: &[ProgramRow], icmp: u64) -> String {
    let mut m = String::from(
        "\n#### 1b. Decision cost per program, from the kernel's statistics\n\n\
         `run_time_ns / run_cnt` of each egress program (`bpf_stats_enabled`), one client run of \
         each call per size, after the wall-clock runs above, with `tc_egress` attached to the \
         namespace's loopback for this run only. skb_egress and tc_egress run per packet (a TCP \
         connect and close is several packets from both ends, hence the runs per call). Each size \
         runs twice: with the IPv4 range table (what egress uses), then with the same policy in \
         the LPM trie (its fallback). The prefixes are IPv4; the IPv6 call goes to `::1`, one \
         prefix of the (small) IPv6 trie. \
         ICMP destination-unreachable messages sent in the section's namespace: ",
    );
    m.push_str(&format!(
        "{icmp}{}.\n\n| prefixes | IPv4 lookup | call | program | runs per call | ns per run |\n|---:|---|---|---|---:|---:|\n",
        if icmp == 0 { "" } else { " (expected 0: extra packets were judged)" }
    ));
    for p in rows {
        m.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.0} ns |\n",
            p.prefixes, p.lookup, p.call, p.program, p.runs_per_call, p.ns_per_run
        ));
    }
    m
}

fn markdown(r: &Results) -> String {
    let mut m = String::new();
    m.push_str(&format!(
        "Run {} on Linux {}, {} ({} cores){}. Medians of {} runs, [min–max] in brackets.\n\n",
        r.when,
        r.kernel,
        r.cpu,
        r.cores,
        if r.quick { ", quick mode" } else { "" },
        r.decision.first().map_or(0, |d| d.p50_ns.runs)
    ));
    m.push_str("### 1. Decision cost per call\n\n| prefixes | firewall | call | p50 | p99 | p50 overhead vs none |\n|---:|---|---|---:|---:|---:|\n");
    for d in &r.decision {
        m.push_str(&format!(
            "| {} | {} | {} | {} [{}–{}] | {} | {} |\n",
            d.prefixes,
            d.firewall,
            d.call,
            ns(d.p50_ns.median),
            ns(d.p50_ns.min),
            ns(d.p50_ns.max),
            ns(d.p99_ns.median),
            if d.firewall.starts_with("none") {
                "–".to_string()
            } else {
                ns(d.overhead_p50_ns)
            }
        ));
    }
    m.push_str(&programs_markdown(
        &r.decision_programs,
        r.decision_icmp_unreachable,
    ));
    m.push_str(
        "\n#### 1c. The lookup across many destinations\n\nThe N prefixes approved (UDP port 9, default deny); one UDP socket connected in turn to one address inside each of up to 200,000 of them (twice round per run; a connect sends nothing), so each lookup lands somewhere else in the table. `connect4` ns per run (kernel statistics), median [min–max] over the runs; the three datapaths alternate within each run, each on its own cgroup. The floor is a policy with no prefixes (default allow): the hook without a lookup.\n\n| prefixes | destinations | IPv4 lookup | connect4 ns per run |\n|---:|---:|---|---:|\n",
    );
    for r in &r.spread {
        m.push_str(&format!(
            "| {} | {} | {} | {:.0} ns [{:.0}–{:.0}] |\n",
            r.prefixes, r.targets, r.lookup, r.kernel_ns.median, r.kernel_ns.min, r.kernel_ns.max
        ));
    }
    m.push_str("\n### 2. TC accounting cost (veth between two namespaces)\n\nRuns alternate without and with TC (ABAB); the last column is the ratio of each pair, median [min–max], and its spread is what the section can resolve.\n\n| test | without TC | with TC | ratio of medians | ratio per pair |\n|---|---:|---:|---:|---:|\n");
    for t in &r.tc {
        m.push_str(&format!(
            "| {} | {:.3e} [{:.3e}–{:.3e}] | {:.3e} [{:.3e}–{:.3e}] | {:.3} | {:.3} [{:.3}–{:.3}] |\n",
            t.test,
            t.without_tc.median,
            t.without_tc.min,
            t.without_tc.max,
            t.with_tc.median,
            t.with_tc.min,
            t.with_tc.max,
            t.ratio,
            t.pair_ratios.median,
            t.pair_ratios.min,
            t.pair_ratios.max
        ));
    }
    m.push_str(
        "\nPer packet, from the kernel's statistics (`run_time_ns / run_cnt`, one more run of each \
         with statistics on and TC attached; empty policy, cgroup hooks attached):\n\n\
         | test | program | runs | ns per run |\n|---|---|---:|---:|\n",
    );
    for p in &r.tc_programs {
        m.push_str(&format!(
            "| {} | {} | {} | {:.0} ns |\n",
            p.test, p.program, p.runs, p.ns_per_run
        ));
    }
    m.push_str("\n### 3. Policy apply time and kernel memory (IPv4 range table, `--prefix-capacity` = prefixes; memory of both policy buffers as allocated: `DIR` and `RANGES` arrays, and the empty tries)\n\n| prefixes | apply (reload) | kernel memory | per rule |\n|---:|---:|---:|---:|\n");
    for a in &r.apply {
        m.push_str(&format!(
            "| {} | {:.1} ms [{:.1}–{:.1}] | {:.1} MiB | {:.0} B |\n",
            a.prefixes,
            a.apply_ms.median,
            a.apply_ms.min,
            a.apply_ms.max,
            a.kernel_bytes as f64 / (1 << 20) as f64,
            a.bytes_per_rule
        ));
    }
    let e = &r.events;
    m.push_str(&format!(
        "\n### 4. Event path\n\nDenied connects with an event each: {:.0}/s [{:.0}–{:.0}]; events received {}, lost (ring buffer full, counted by the datapath) {}.\n",
        e.denies_per_sec.median, e.denies_per_sec.min, e.denies_per_sec.max, e.events_received, e.events_lost
    ));
    m.push_str(&names::markdown(&r.dns, &r.grants));
    m.push_str(&scopes::markdown(&r.scopes));
    m
}

/// `--only scopes`: section 7 alone, into scopes.json and scopes.md.
fn scopes_alone(quick: bool, out_dir: PathBuf) -> anyhow::Result<()> {
    let s = settings(quick);
    let (kernel, cpu, cores) = machine();
    let report = scopes::scope_cost(&s)?;
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let md = format!(
        "Run {when} on Linux {kernel}, {cpu} ({cores} cores){}. Medians of {} runs, [min–max] in brackets.\n{}",
        if quick { ", quick mode" } else { "" },
        s.reps,
        scopes::markdown(&report)
    );
    fs::create_dir_all(&out_dir)?;
    fs::write(
        out_dir.join("scopes.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "when": when, "kernel": kernel, "cpu": cpu, "cores": cores, "quick": quick,
            "scopes": report,
        }))?,
    )?;
    fs::write(out_dir.join("scopes.md"), &md)?;
    println!("{md}");
    println!(
        "(written to {}/scopes.json and scopes.md)",
        out_dir.display()
    );
    Ok(())
}

/// The sizes, runs and iterations of a full or a quick run. `EGRESS_BENCH_SIZES` (prefix
/// counts, comma-separated) replaces the sizes of sections 1 and 3.
fn settings(quick: bool) -> Settings {
    let mut s = if quick {
        Settings {
            quick,
            reps: 3,
            iters: 20_000,
            sizes: vec![1_000, 10_000],
        }
    } else {
        Settings {
            quick,
            reps: 5,
            iters: 100_000,
            sizes: vec![1_000, 10_000, 100_000, 1_000_000],
        }
    };
    if let Ok(v) = std::env::var("EGRESS_BENCH_SIZES") {
        s.sizes = v.split(',').filter_map(|n| n.trim().parse().ok()).collect();
    }
    s
}

/// The whole bench into results.json and results.md; `lookup_only`: sections 1–3 alone, into
/// lookup.json and lookup.md.
fn bench(quick: bool, out_dir: PathBuf, lookup_only: bool) -> anyhow::Result<()> {
    for tool in ["ip", "iptables-restore", "nft", "iperf3", "dnsmasq"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!(
                "`{tool}` is missing (Debian packages: iproute2 iptables nftables iperf3 dnsmasq-base)"
            );
        }
    }
    // The DNS benchmark runs the controller; fail now (saying how to build it), not after
    // minutes of the others.
    egress_tests::bins::egress();
    let s = settings(quick);
    let (kernel, cpu, cores) = machine();
    let (decision, decision_programs, decision_icmp_unreachable) = decision_cost(&s)?;
    let spread = lookup_spread(&s)?;
    eprintln!("bench: TC accounting");
    let (tc, tc_programs) = tc_cost(&s)?;
    let apply = apply_cost(&s)?;
    let (events, dns, grants, scopes) = if lookup_only {
        Default::default()
    } else {
        eprintln!("bench: event path");
        (
            event_path(&s)?,
            names::dns_latency(&s)?,
            names::grant_cost(&s)?,
            scopes::scope_cost(&s)?,
        )
    };
    let results = Results {
        when: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        kernel,
        cpu,
        cores,
        quick,
        command: format!("cargo xtask bench{}", if quick { " --quick" } else { "" }),
        decision,
        decision_programs,
        decision_icmp_unreachable,
        spread,
        tc,
        tc_programs,
        apply,
        events,
        dns,
        grants,
        scopes,
    };
    let name = if lookup_only { "lookup" } else { "results" };
    fs::create_dir_all(&out_dir)?;
    fs::write(
        out_dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&results)?,
    )?;
    let mut md = markdown(&results);
    if lookup_only && let Some(at) = md.find("\n### 4.") {
        md.truncate(at + 1);
    }
    fs::write(out_dir.join(format!("{name}.md")), &md)?;
    println!("{md}");
    println!(
        "(written to {}/{name}.json and {name}.md)",
        out_dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.helper {
        Some(Helper::Client {
            mode,
            addr,
            iters,
            name,
            targets,
        }) => client(mode, addr, iters, &name, targets),
        None => match cli.only {
            Some(Section::Scopes) => scopes_alone(cli.quick, cli.out),
            Some(Section::Lookup) => bench(cli.quick, cli.out, true),
            None => bench(cli.quick, cli.out, false),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_unreachables_are_read_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Icmp: InMsgs InErrors OutMsgs OutDestUnreachs OutEchos\n\
                    Icmp: 7 0 12 9 3\nIcmpMsg: OutType3\nIcmpMsg: 9\n";
        assert_eq!(out_dest_unreachs(snmp), Some(9));
        assert_eq!(out_dest_unreachs("Ip: A\nIp: 1\n"), None);
    }

    #[test]
    fn the_program_table_lists_each_program_and_flags_icmp() {
        let rows = [ProgramRow {
            prefixes: 1_000,
            lookup: "range table".into(),
            call: "udp sendto()".into(),
            program: "skb_egress".into(),
            runs: 44_000,
            runs_per_call: 2.0,
            ns_per_run: 41.4,
        }];
        let m = programs_markdown(&rows, 0);
        assert!(
            m.contains("| 1000 | range table | udp sendto() | skb_egress | 2.00 | 41 ns |"),
            "{m}"
        );
        assert!(!m.contains("expected 0"));
        assert!(programs_markdown(&rows, 3).contains("3 (expected 0"));
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn xtask_and_client_command_lines_parse() {
        let cli = Cli::try_parse_from(["egress-bench", "--out", "/tmp/b", "--quick"]).unwrap();
        assert!(cli.quick && cli.out == std::path::Path::new("/tmp/b") && cli.helper.is_none());
        assert_eq!(cli.only, None);
        let cli = Cli::try_parse_from(["egress-bench", "--only", "scopes"]).unwrap();
        assert_eq!(cli.only, Some(Section::Scopes));
        let cli = Cli::try_parse_from([
            "egress-bench",
            "client",
            "udp-sendto-many",
            "0.0.0.0:9",
            "500",
            "--targets",
            "1000",
        ])
        .unwrap();
        assert!(matches!(
            cli.helper,
            Some(Helper::Client {
                mode: Mode::UdpSendtoMany,
                targets: 1_000,
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "egress-bench",
            "client",
            "deny-flood",
            "198.51.100.1:9",
            "1000",
        ])
        .unwrap();
        assert!(matches!(
            cli.helper,
            Some(Helper::Client {
                mode: Mode::DenyFlood,
                iters: 1000,
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "egress-bench",
            "client",
            "dns-udp",
            "127.0.0.2:53",
            "500",
            "--name",
            "other.example.test",
        ])
        .unwrap();
        assert!(
            matches!(&cli.helper, Some(Helper::Client { mode: Mode::DnsUdp, name, .. }) if name == "other.example.test")
        );
        let cli = Cli::try_parse_from([
            "egress-bench",
            "client",
            Mode::UdpConnectMany.arg().as_str(),
            "0.0.0.0:9",
            "500",
            "--targets",
            "100000",
        ])
        .unwrap();
        assert!(matches!(
            cli.helper,
            Some(Helper::Client {
                mode: Mode::UdpConnectMany,
                targets: 100_000,
                ..
            })
        ));
    }
}
