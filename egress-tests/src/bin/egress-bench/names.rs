//! The benchmarks of approved services by name (issue 11), each beside its baseline in the same
//! run:
//! - **DNS lookup latency through the proxy, on the real path**: `egress run --cgroup` with a
//!   policy of `hosts`; a client in the enforced cgroup asks dnsmasq, the kernel steers the query
//!   to egress's proxy, which finds the asking socket (sock_diag, `SOCK_OWNERS`), forwards to
//!   dnsmasq, writes the grant into the kernel and replies. The baseline is the same client, in
//!   a cgroup of no firewall, asking the same dnsmasq directly. Runs alternate between the two.
//! - **The connect decision with N live grants against N approved CIDR prefixes**: the cost of
//!   the `connect4` program itself, from the kernel's run-time statistics (run_time_ns /
//!   run_cnt), for UDP connects to the same N addresses approved either way, and a floor of no
//!   rules at all.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use egress::{
    datapath::{self, Datapath, DnsSteering},
    policy::{Policy, compile::CompiledPolicy},
    sys::clock::boot_ns,
};
use egress_common::{GRANT_SET_BASE, GrantKey, GrantValue};
use egress_tests::{
    EgressCmd, LoopNs, TempDir, TestCgroup,
    dns::{DnsServer, Record},
};
use serde::Serialize;

use crate::{Latency, Mode, Settings, Stat, cidr, client_in, prefix_stream, sh, stat};

/// dnsmasq's address in the bench namespace: the upstream of the proxy and the server every
/// client asks.
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// A name the policy's service covers: every answer through egress writes a grant.
const COVERED: &str = "bench.example.test";
const COVERED_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A name nothing covers (`unlisted = "resolve"`): relayed, nothing granted.
const UNLISTED: &str = "other.example.test";
const UNLISTED_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The port the benchmarks' services approve.
const PORT: u16 = 9;

/// A default route over loopback in `ns`, so that UDP connects to any address find a route
/// (they send nothing; no dummy interface, whose module not every kernel has).
pub fn default_route(ns: &LoopNs) {
    ns.ip(&["route", "add", "default", "dev", "lo"]);
}

// ---------------------------------------------------------------------------------------------
// The clients (run by the bench inside a namespace and a cgroup).

/// A query for the A record of `name`, with recursion desired.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// What is wrong with `reply` as the answer to query `id`: not a reply, another ID, an error
/// code, or no answer record.
fn reply_fault(reply: &[u8], id: u16) -> Option<String> {
    if reply.len() < 12 {
        return Some(format!("a reply of {} bytes", reply.len()));
    }
    let got = u16::from_be_bytes([reply[0], reply[1]]);
    let rcode = reply[3] & 0x0f;
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    if got != id || reply[2] & 0x80 == 0 {
        Some(format!("not the reply to query {id} (id {got})"))
    } else if rcode != 0 {
        Some(format!("rcode {rcode}"))
    } else if answers == 0 {
        Some("no answer record".into())
    } else {
        None
    }
}

/// `client dns-udp ADDR ITERS --name NAME`: ITERS lookups of NAME's A record (and a tenth more
/// first, untimed), each as glibc's resolver makes one: a new UDP socket, connected to the
/// server, one query, the answer. Times each from socket() to the answer; any lookup that fails
/// or times out (2 s) fails the run.
pub fn dns_client(addr: SocketAddr, name: &str, iters: usize) -> anyhow::Result<Vec<u64>> {
    let mut samples = Vec::with_capacity(iters);
    let mut buf = [0u8; 512];
    let salt = std::process::id() as u16;
    for i in 0..iters + iters / 10 {
        let id = (i as u16).wrapping_mul(40503) ^ salt;
        let q = query(id, name);
        let t = Instant::now();
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(addr)?;
        s.send(&q)?;
        let n = s
            .recv(&mut buf)
            .with_context(|| format!("lookup {i} of {name} at {addr}"))?;
        let elapsed = t.elapsed().as_nanos() as u64;
        if let Some(fault) = reply_fault(&buf[..n], id) {
            bail!("lookup {i} of {name} at {addr}: {fault}");
        }
        if i >= iters / 10 {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// The bench's N target addresses: one in each of N distinct unicast prefixes of mixed lengths
/// (the network address plus one, or the /32 itself), in a fixed order. The grant benchmark
/// approves exactly these, by prefix or by grant. A prefix whose address another one already
/// gave (a /24 at the start of a /16) is skipped.
pub fn targets(n: usize) -> Vec<((u32, u8), Ipv4Addr)> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    prefix_stream()
        .filter(|&(a, _)| a >> 24 < 224)
        .map(|(a, l)| ((a, l), Ipv4Addr::from(if l < 32 { a | 1 } else { a })))
        .filter(|&(_, a)| seen.insert(a))
        .take(n)
        .collect()
}

/// `client udp-connect-many 0.0.0.0:PORT ITERS --targets N`: ITERS connects of one UDP socket
/// (and a tenth more first, untimed) to the N target addresses in turn, port PORT. Returns the
/// times and how many were refused with EPERM; any other error fails the run.
pub fn connect_many(port: u16, n: usize, iters: usize) -> anyhow::Result<(Vec<u64>, u64)> {
    let addrs: Vec<SocketAddr> = targets(n)
        .into_iter()
        .map(|(_, a)| SocketAddr::from((a, port)))
        .collect();
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let mut samples = Vec::with_capacity(iters);
    let mut denied = 0;
    for i in 0..iters + iters / 10 {
        let addr = addrs[i % addrs.len()];
        let t = Instant::now();
        let r = s.connect(addr);
        let elapsed = t.elapsed().as_nanos() as u64;
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::PermissionDenied => denied += 1,
            Err(e) => return Err(e).with_context(|| format!("connect to {addr}")),
        }
        if i >= iters / 10 {
            samples.push(elapsed);
        }
    }
    Ok((samples, denied))
}

// ---------------------------------------------------------------------------------------------
// 5. DNS lookup latency through the proxy.

#[derive(Debug, Serialize, Default)]
pub struct DnsRow {
    /// How the query was answered.
    pub path: String,
    pub name: String,
    pub p50_ns: Stat,
    pub p99_ns: Stat,
    /// p50 and p99 minus those of the direct query, in the same run.
    pub added_p50_ns: f64,
    pub added_p99_ns: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct DnsReport {
    /// Timed lookups per run (each client run makes a tenth more first, untimed).
    pub lookups_per_run: usize,
    pub rows: Vec<DnsRow>,
    /// Queries the kernel steered to the proxy, as egress counted them.
    pub steered: u64,
}

const DNS_POLICY: &str = r#"
mode = "enforce"
default = "deny"

[dns]
upstream = ["127.0.0.2"]

[[service]]
name = "bench"
hosts = ["bench.example.test"]
ports = [9]
protocols = ["udp"]
"#;

fn time_lookups(ns: &LoopNs, cg: &TestCgroup, name: &str, iters: usize) -> anyhow::Result<Latency> {
    let mut cmd = client_in(
        ns,
        cg,
        Mode::DnsUdp,
        &SocketAddr::from((UPSTREAM, 53)).to_string(),
        iters,
    );
    cmd.args(["--name", name]);
    Ok(serde_json::from_str(sh(&mut cmd)?.trim())?)
}

pub fn dns_latency(s: &Settings) -> anyhow::Result<DnsReport> {
    let ns = LoopNs::new();
    default_route(&ns);
    let _dns = DnsServer::start(
        &ns,
        IpAddr::V4(UPSTREAM),
        &[
            Record::Addr(COVERED, IpAddr::V4(COVERED_ADDR), 300),
            Record::Addr(UNLISTED, IpAddr::V4(UNLISTED_ADDR), 300),
        ],
    );
    let dir = TempDir::new("egress-bench");
    let policy = dir.file("names.toml", DNS_POLICY);
    // Both clients run in empty child cgroups of the root: the direct one sees no cgroup program,
    // the other only egress's.
    let plain = TestCgroup::with_prefix("egress-bench");
    let enforced = TestCgroup::with_prefix("egress-bench");
    let eg = EgressCmd::run(&ns, enforced.path(), &dir)
        .policy(&policy)
        .start();
    let steered_before = eg.stats().counters.dns_steered;
    let iters = if s.quick { 1_000 } else { 5_000 };
    let paths = [
        ("direct to dnsmasq (baseline)", &plain, COVERED),
        (
            "egress proxy, covered name (grant written)",
            &enforced,
            COVERED,
        ),
        ("egress proxy, unlisted name (relayed)", &enforced, UNLISTED),
    ];
    let mut p50 = vec![Vec::new(); paths.len()];
    let mut p99 = vec![Vec::new(); paths.len()];
    // Alternate the paths within each repetition, so that drift does not pass for cost.
    for rep in 0..s.reps {
        eprintln!("bench: DNS lookups, run {}/{}", rep + 1, s.reps);
        for (i, (_, cg, name)) in paths.iter().enumerate() {
            let l = time_lookups(&ns, cg, name, iters)?;
            eprintln!(
                "bench:   {}: p50 {:.1} µs, p99 {:.1} µs",
                paths[i].0,
                l.p50_ns / 1e3,
                l.p99_ns / 1e3
            );
            p50[i].push(l.p50_ns);
            p99[i].push(l.p99_ns);
        }
    }
    // The controller publishes its counters once a tick: wait for the reading to cover the runs.
    let expected = (2 * s.reps * (iters + iters / 10)) as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut steered = 0;
    while steered < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        steered = eg.stats().counters.dns_steered - steered_before;
    }
    if steered < expected {
        bail!(
            "egress steered {steered} queries to its proxy, expected {expected}: not the real path"
        );
    }
    // The grant is in the kernel: the covered name's address is now approved for the enforced
    // cgroup (the policy denies everything else).
    sh(&mut client_in(
        &ns,
        &enforced,
        Mode::UdpConnect,
        &SocketAddr::from((COVERED_ADDR, PORT)).to_string(),
        1,
    ))
    .with_context(|| format!("connecting to {COVERED_ADDR} after its lookups (no grant?)"))?;
    drop(eg);

    let mut rows: Vec<DnsRow> = Vec::new();
    for (i, (path, _, name)) in paths.iter().enumerate() {
        let (a, b) = (stat(p50[i].clone()), stat(p99[i].clone()));
        let (added_p50_ns, added_p99_ns) = match rows.first() {
            Some(base) => (a.median - base.p50_ns.median, b.median - base.p99_ns.median),
            None => (0.0, 0.0),
        };
        rows.push(DnsRow {
            path: path.to_string(),
            name: name.to_string(),
            p50_ns: a,
            p99_ns: b,
            added_p50_ns,
            added_p99_ns,
        });
    }
    Ok(DnsReport {
        lookups_per_run: iters,
        rows,
        steered,
    })
}

// ---------------------------------------------------------------------------------------------
// 6. The connect decision with live grants against CIDR prefixes.

#[derive(Debug, Serialize, Default)]
pub struct GrantRow {
    /// What approves the connects.
    pub approval: String,
    /// Prefixes in the policy, grants in the kernel.
    pub prefixes: usize,
    pub grants: usize,
    /// run_time_ns / run_cnt of `connect4` over one client run, from the kernel.
    pub kernel_ns_per_connect: Stat,
    /// p50 of connect() as the client timed it.
    pub client_p50_ns: Stat,
}

#[derive(Debug, Serialize, Default)]
pub struct GrantReport {
    /// Distinct addresses connected to, in turn (each approved).
    pub targets: usize,
    /// Timed connects per run.
    pub connects_per_run: usize,
    pub rows: Vec<GrantRow>,
}

/// The policy of this benchmark: one service, by name and (`prefixes`) by address, approving UDP
/// port 9; everything else gets `default`.
fn grant_policy(prefixes: &[(u32, u8)], default: &str) -> anyhow::Result<CompiledPolicy> {
    let mut text = format!(
        "mode = \"enforce\"\ndefault = \"{default}\"\n[[service]]\nname = \"bench\"\nhosts = [\"bench.example.test\"]\nports = [{PORT}]\nprotocols = [\"udp\"]\n"
    );
    if !prefixes.is_empty() {
        text.push_str("destinations = [");
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
    Ok(CompiledPolicy::compile(&Policy::parse(
        "grants.toml",
        &text,
    )?)?)
}

/// The grant slot of the service (the same in every policy of this benchmark).
fn slot(p: &CompiledPolicy) -> anyhow::Result<u32> {
    match p.host_sets.as_slice() {
        [h] => Ok(h.slot),
        other => bail!("expected one service by name, got {}", other.len()),
    }
}

pub fn grant_cost(s: &Settings) -> anyhow::Result<GrantReport> {
    let n = 100_000;
    let connects = 2 * n;
    eprintln!("bench: connect decision, {n} grants against {n} prefixes");
    let ns = LoopNs::new();
    default_route(&ns);
    let cg = TestCgroup::with_prefix("egress-bench");
    let targets = targets(n);
    let prefixes: Vec<(u32, u8)> = targets.iter().map(|(p, _)| *p).collect();
    let floor = grant_policy(&[], "allow")?;
    let by_name = grant_policy(&[], "deny")?;
    let by_prefix = grant_policy(&prefixes, "deny")?;
    let slot = slot(&by_name)?;
    if slot != self::slot(&by_prefix)? || slot != self::slot(&floor)? {
        bail!("the service's grant slot differs between the policies");
    }
    let mut dp = Datapath::load(&floor)?;
    dp.attach(cg.path())?;
    let until_ns = boot_ns() + 3_600_000_000_000;
    for (_, addr) in &targets {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&addr.octets());
        dp.grant(
            GrantKey {
                cgroup_id: cg.id(),
                family: 4,
                _pad: [0; 7],
                addr: a,
            },
            GrantValue {
                until_ns,
                ruleset: GRANT_SET_BASE | slot,
                _pad: 0,
            },
        )?;
    }
    // Grants are consulted only with the DNS flags on; the steering they come with never
    // applies here (no query is sent, and no namespace has cookie 0).
    let dns = DnsSteering {
        v4: Ipv4Addr::new(127, 0, 0, 153),
        port: 53,
        v6: Ipv6Addr::LOCALHOST,
        port6: 53,
        netns_cookie: 0,
    };
    let _stats = datapath::enable_run_stats()?;
    let cases: [(&str, &CompiledPolicy, usize, usize, bool); 3] = [
        ("nothing (no rules, default allow)", &floor, 0, 0, false),
        ("CIDR prefixes", &by_prefix, n, 0, true),
        ("live grants", &by_name, 0, n, true),
    ];
    let mut kernel = vec![Vec::new(); cases.len()];
    let mut client = vec![Vec::new(); cases.len()];
    let port = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).to_string();
    for rep in 0..s.reps {
        for (i, (what, policy, _, _, names)) in cases.iter().enumerate() {
            dp.reload(policy)?;
            dp.set_dns(names.then_some(dns))?;
            let before = dp.run_stats("connect4")?;
            let mut cmd = client_in(&ns, &cg, Mode::UdpConnectMany, &port, connects);
            cmd.args(["--targets", &n.to_string()]);
            let l: Latency = serde_json::from_str(sh(&mut cmd)?.trim())?;
            let after = dp.run_stats("connect4")?;
            if l.denied > 0 {
                bail!("{what}: {} of the approved connects were denied", l.denied);
            }
            let runs = after.run_count - before.run_count;
            if runs < connects as u64 {
                bail!(
                    "{what}: the kernel counted {runs} runs of connect4 for {connects} connects (are run-time statistics on?)"
                );
            }
            let ns_total = (after.run_time - before.run_time).as_nanos() as f64;
            kernel[i].push(ns_total / runs as f64);
            client[i].push(l.p50_ns);
            eprintln!(
                "bench: run {}/{}: {what}: {:.0} ns per connect4",
                rep + 1,
                s.reps,
                ns_total / runs as f64
            );
        }
    }
    let rows = cases
        .iter()
        .enumerate()
        .map(|(i, (what, _, prefixes, grants, _))| GrantRow {
            approval: what.to_string(),
            prefixes: *prefixes,
            grants: *grants,
            kernel_ns_per_connect: stat(kernel[i].clone()),
            client_p50_ns: stat(client[i].clone()),
        })
        .collect();
    Ok(GrantReport {
        targets: n,
        connects_per_run: connects,
        rows,
    })
}

/// Sections 5 and 6 of results.md.
pub fn markdown(dns: &DnsReport, grants: &GrantReport) -> String {
    let us = |ns: f64| format!("{:.1} µs", ns / 1000.0);
    let mut m = format!(
        "\n### 5. DNS lookup latency through the proxy (real path: `egress run --cgroup`)\n\n\
         {} lookups per run, the paths alternating; each lookup a new connected UDP socket, one A \
         query to dnsmasq at 127.0.0.2:53, the answer. {} queries steered by the kernel.\n\n\
         | path | p50 | p99 | added p50 | added p99 |\n|---|---:|---:|---:|---:|\n",
        dns.lookups_per_run, dns.steered
    );
    for (i, d) in dns.rows.iter().enumerate() {
        let added = |v: f64| if i == 0 { "–".to_string() } else { us(v) };
        m.push_str(&format!(
            "| {} | {} [{}–{}] | {} [{}–{}] | {} | {} |\n",
            d.path,
            us(d.p50_ns.median),
            us(d.p50_ns.min),
            us(d.p50_ns.max),
            us(d.p99_ns.median),
            us(d.p99_ns.min),
            us(d.p99_ns.max),
            added(d.added_p50_ns),
            added(d.added_p99_ns),
        ));
    }
    m.push_str(&format!(
        "\n### 6. Connect decision: live grants against CIDR prefixes\n\n\
         UDP connects to {} distinct addresses in turn ({} per run), each approved; the kernel's \
         run-time statistics of `connect4` (run_time_ns / run_cnt).\n\n\
         | approved by | prefixes | grants | connect4 per call (kernel) | connect() p50 (client) |\n\
         |---|---:|---:|---:|---:|\n",
        grants.targets, grants.connects_per_run
    ));
    for g in &grants.rows {
        let k = &g.kernel_ns_per_connect;
        let c = &g.client_p50_ns;
        m.push_str(&format!(
            "| {} | {} | {} | {:.0} ns [{:.0}–{:.0}] | {:.0} ns [{:.0}–{:.0}] |\n",
            g.approval, g.prefixes, g.grants, k.median, k.min, k.max, c.median, c.min, c.max
        ));
    }
    if let [floor, prefixes, live] = grants.rows.as_slice() {
        let (f, p, l) = (
            floor.kernel_ns_per_connect.median,
            prefixes.kernel_ns_per_connect.median,
            live.kernel_ns_per_connect.median,
        );
        m.push_str(&format!(
            "\nGrants / prefixes: {:.2} of the program's run time; above the floor: {:.0} ns \
             against {:.0} ns.\n",
            l / p,
            l - f,
            p - f
        ));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_well_formed_and_replies_are_checked() {
        let q = query(0x1234, "bench.example.test");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..18], b"\x05bench");
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
        let mut reply = q.clone();
        reply[2] |= 0x80;
        assert_eq!(
            reply_fault(&reply, 0x1234).as_deref(),
            Some("no answer record")
        );
        reply[7] = 1;
        assert_eq!(reply_fault(&reply, 0x1234), None);
        assert!(reply_fault(&reply, 0x1235).is_some());
        reply[3] |= 3;
        assert_eq!(reply_fault(&reply, 0x1234).as_deref(), Some("rcode 3"));
    }

    #[test]
    fn targets_are_distinct_unicast_addresses_inside_their_prefixes() {
        let t = targets(10_000);
        let addrs: std::collections::HashSet<_> = t.iter().map(|(_, a)| *a).collect();
        assert_eq!(addrs.len(), t.len());
        for ((net, len), a) in t {
            let mask = u32::MAX << (32 - len);
            assert_eq!(u32::from(a) & mask, net, "{a} in {}", cidr((net, len)));
            assert!(
                !a.is_multicast() && !a.is_loopback() && a.octets()[0] != 0 && a.octets()[0] < 224
            );
        }
    }
}
