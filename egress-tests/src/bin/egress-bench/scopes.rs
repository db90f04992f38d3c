//! The benchmark of scoped entries (issue 12): the decision cost of 1,000 services over 100,000
//! approved prefixes, scoped in several ways, against the same policy unscoped, from the kernel's
//! own run-time statistics of `connect4` and `sendmsg4` (run_time_ns / run_cnt).
//!
//! The services share out the prefixes (100 each), approve UDP port 9, and everything else is
//! denied; the client connects (sends) to one address inside each prefix in turn, and every call
//! must be approved, so each variant takes the same path through the trie and the same rule sets
//! and differs only in the scoping. The policies are written as text to a file and compiled by
//! the real compiler, so their selectors resolve on this host as a user's would:
//! - *unscoped*: the baseline;
//! - *executable*: every service `executables = [the client binary]` (one scope): the hooks look
//!   the caller up in `PROCS` (written by the exec tracker when the client was started) and its
//!   identity in `SCOPE_EXE`;
//! - *user*: `users = [0]` (the client runs as root): one helper call and one hash lookup, the
//!   cheapest scoping there is, which shows the fixed cost of the scoped path;
//! - *user + cgroup*: `users = [0]`, `cgroups = [the bench's cgroup]`: two keys and the cgroup
//!   ancestor loop (one level);
//! - *255 scopes*: service i `executables = [the client, stand-in k]` with k = i mod 255: 255
//!   distinct scopes, all admitting the client, 256 identities in `SCOPE_EXE`. The stand-ins are
//!   small executable files in a temporary directory (each its own inode; never run): copies of
//!   the client would only cost disk;
//! - profiling, full runs only: the unscoped services plus one scoped entry no call meets
//!   (resolution without scoped rules), and a policy of one prefix called again and again (a
//!   warm cache), unscoped, by user and by executable.
//!
//! The variants alternate within each run (in a rotating order, so that none always lands in
//! the same buffer of the double-buffered policy); each figure's delta is taken against the
//! unscoped policy of the same size in the same run. The first call of a fresh process (its first `connect()`
//! right after exec: the `PROCS` entry just written, the socket's owner recorded) is measured
//! apart, from client runs of one connect each.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use egress::{
    datapath::{self, Datapath},
    policy::{Policy, compile::CompiledPolicy},
};
use egress_tests::{LoopNs, TempDir, TestCgroup};
use serde::Serialize;

use crate::{Latency, Mode, Settings, Stat, cidr, client_in, names::targets, sh, stat};

/// Approved prefixes, and the services sharing them out.
const PREFIXES: usize = 100_000;
const SERVICES: usize = 1_000;
/// The most scopes a policy may have (ids 1..=255).
const DISTINCT: usize = 255;
/// The port every service approves (UDP).
const PORT: u16 = 9;
/// The target on `+50 ns` per call, scoped against unscoped.
const TARGET_NS: f64 = 50.0;

/// How the services are scoped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scoping {
    None,
    Exe,
    User,
    UserCgroup,
    ManyExes,
    /// The services unscoped, plus one more, `users = [0]`, on an IPv6 prefix no call goes to:
    /// the caller's scopes are resolved on every call, but no scanned rule is scoped.
    UserElsewhere,
}

impl Scoping {
    fn label(self) -> &'static str {
        match self {
            Scoping::None => "unscoped",
            Scoping::Exe => "executables = [client] (1 scope)",
            Scoping::User => "users = [0] (1 scope)",
            Scoping::UserCgroup => "users = [0] + cgroups = [bench cgroup] (1 scope)",
            Scoping::ManyExes => "executables = [client, stand-in k] (255 scopes)",
            Scoping::UserElsewhere => {
                "unscoped + one `users = [0]` entry elsewhere (resolution only)"
            }
        }
    }
}

/// One policy measured: its scoping, how many prefixes (and targets) it has, and the index of
/// the variant its deltas are taken against.
struct Variant {
    scoping: Scoping,
    prefixes: usize,
    base: usize,
}

/// The variants, in order: the first [`QUICK_VARIANTS`] in every run, the rest (profiling: where
/// the cost goes) only in a full run. The last three have one prefix and one target, so that
/// every call hits the same trie path and rule set in a warm cache.
const VARIANTS: [Variant; 9] = [
    Variant {
        scoping: Scoping::None,
        prefixes: PREFIXES,
        base: 0,
    },
    Variant {
        scoping: Scoping::Exe,
        prefixes: PREFIXES,
        base: 0,
    },
    Variant {
        scoping: Scoping::User,
        prefixes: PREFIXES,
        base: 0,
    },
    Variant {
        scoping: Scoping::UserCgroup,
        prefixes: PREFIXES,
        base: 0,
    },
    Variant {
        scoping: Scoping::ManyExes,
        prefixes: PREFIXES,
        base: 0,
    },
    Variant {
        scoping: Scoping::UserElsewhere,
        prefixes: PREFIXES,
        base: 0,
    },
    Variant {
        scoping: Scoping::None,
        prefixes: 1,
        base: 6,
    },
    Variant {
        scoping: Scoping::User,
        prefixes: 1,
        base: 6,
    },
    Variant {
        scoping: Scoping::Exe,
        prefixes: 1,
        base: 6,
    },
];
const QUICK_VARIANTS: usize = 5;

/// What the selectors name: the client binary, the bench cgroup (relative to the cgroup2
/// root), the stand-in executables.
struct Who<'a> {
    client: &'a Path,
    cgroup: &'a str,
    stand_ins: &'a [PathBuf],
}

fn quoted<I: IntoIterator<Item = String>>(items: I) -> String {
    let v: Vec<String> = items.into_iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", v.join(","))
}

/// The policy text: `services` services sharing `prefixes` out in order, each approving UDP
/// port [`PORT`], scoped as `scoping` says; default deny.
fn policy_text(prefixes: &[(u32, u8)], services: usize, scoping: Scoping, who: &Who) -> String {
    let mut text = String::from("mode = \"enforce\"\ndefault = \"deny\"\n");
    if scoping == Scoping::UserElsewhere {
        text.push_str(&format!(
            "\n[[service]]\nname = \"elsewhere\"\nports = [{PORT}]\nprotocols = [\"udp\"]\ndestinations = [\"2001:db8::/32\"]\nusers = [0]\n"
        ));
    }
    let per = prefixes.len().div_ceil(services);
    for (i, chunk) in prefixes.chunks(per).enumerate() {
        text.push_str(&format!(
            "\n[[service]]\nname = \"svc-{i}\"\nports = [{PORT}]\nprotocols = [\"udp\"]\ndestinations = {}\n",
            quoted(chunk.iter().map(|p| cidr(*p)))
        ));
        let client = who.client.display().to_string();
        match scoping {
            Scoping::None | Scoping::UserElsewhere => {}
            Scoping::Exe => text.push_str(&format!("executables = {}\n", quoted([client]))),
            Scoping::User => text.push_str("users = [0]\n"),
            Scoping::UserCgroup => text.push_str(&format!(
                "users = [0]\ncgroups = {}\n",
                quoted([who.cgroup.to_string()])
            )),
            Scoping::ManyExes => {
                let stand_in = &who.stand_ins[i % who.stand_ins.len()];
                text.push_str(&format!(
                    "executables = {}\n",
                    quoted([client, stand_in.display().to_string()])
                ));
            }
        }
    }
    text
}

/// `client udp-sendto-many 0.0.0.0:PORT ITERS --targets N`: ITERS sendto() calls of one
/// unconnected UDP socket (and a tenth more first, untimed) to the N target addresses in turn,
/// port PORT (over the bench namespace's default route on loopback; nothing receives them).
/// Returns the times and how many were refused with EPERM; any other error fails the run.
pub fn sendto_many(port: u16, n: usize, iters: usize) -> anyhow::Result<(Vec<u64>, u64)> {
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
        let r = s.send_to(b"egress-bench", addr);
        let elapsed = t.elapsed().as_nanos() as u64;
        match r {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::PermissionDenied => denied += 1,
            Err(e) => return Err(e).with_context(|| format!("sendto {addr}")),
        }
        if i >= iters / 10 {
            samples.push(elapsed);
        }
    }
    Ok((samples, denied))
}

#[derive(Debug, Serialize, Default)]
pub struct ScopeRow {
    pub scoping: String,
    /// Prefixes in the policy, and addresses called in turn.
    pub prefixes: usize,
    /// The variant the deltas are taken against (none for a base).
    pub against: Option<String>,
    /// Distinct scopes in the policy (0: none).
    pub scopes: usize,
    /// run_time_ns / run_cnt of `connect4` (`sendmsg4`) over one client run, from the kernel.
    pub connect4_ns: Stat,
    pub sendmsg4_ns: Stat,
    /// The first connect of a fresh process, per call.
    pub first_connect4_ns: Stat,
    /// Minus the unscoped policy's figure of the same run.
    pub connect4_delta_ns: Stat,
    pub sendmsg4_delta_ns: Stat,
    pub first_connect4_delta_ns: Stat,
}

#[derive(Debug, Serialize, Default)]
pub struct ScopeReport {
    pub prefixes: usize,
    pub services: usize,
    /// Calls per client run (connects, and sends), to `prefixes` addresses in turn.
    pub calls_per_run: usize,
    /// Fresh client processes per run for the first-call figure, one connect each.
    pub first_calls_per_run: usize,
    pub target_ns: f64,
    /// Instructions the verifier processed for `connect4` (the same program in every variant).
    pub connect4_verified_insns: u32,
    pub rows: Vec<ScopeRow>,
}

/// The distinct scopes the rules of `p` carry.
fn scope_count(p: &CompiledPolicy) -> usize {
    let ids: std::collections::BTreeSet<u32> = p
        .rulesets
        .iter()
        .flat_map(|set| set.rules.iter().take(set.len as usize))
        .map(|r| r.scope)
        .filter(|&id| id != 0)
        .collect();
    ids.len()
}

/// One client run in `cg`: `mode` to the `n` targets, `calls` calls; the kernel's ns per run of
/// program `prog` over it. Fails if any call was refused.
fn kernel_ns(
    ns: &LoopNs,
    cg: &TestCgroup,
    dp: &Datapath,
    mode: Mode,
    prog: &'static str,
    n: usize,
    calls: usize,
) -> anyhow::Result<f64> {
    let before = dp.run_stats(prog)?;
    let port = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).to_string();
    let mut cmd = client_in(ns, cg, mode, &port, calls);
    cmd.args(["--targets", &n.to_string()]);
    let l: Latency = serde_json::from_str(sh(&mut cmd)?.trim())?;
    let after = dp.run_stats(prog)?;
    if l.denied > 0 {
        bail!("{prog}: {} of {calls} approved calls were denied", l.denied);
    }
    let runs = after.run_count - before.run_count;
    let expected = (calls + calls / 10) as u64;
    if runs < expected {
        bail!(
            "the kernel counted {runs} runs of {prog} for {expected} calls (are run-time statistics on?)"
        );
    }
    Ok((after.run_time - before.run_time).as_nanos() as f64 / runs as f64)
}

/// `k` fresh client processes in `cg`, one connect each: the kernel's mean ns per connect4 run.
fn first_calls(ns: &LoopNs, cg: &TestCgroup, dp: &Datapath, k: usize) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for _ in 0..k {
        sum += kernel_ns(ns, cg, dp, Mode::UdpConnectMany, "connect4", 1, 1)?;
    }
    Ok(sum / k as f64)
}

pub fn scope_cost(s: &Settings) -> anyhow::Result<ScopeReport> {
    eprintln!("bench: scopes, {SERVICES} services over {PREFIXES} prefixes, scoped and unscoped");
    let calls = if s.quick { PREFIXES } else { 2 * PREFIXES };
    let first = if s.quick { 10 } else { 30 };
    let ns = LoopNs::new();
    ns.ip(&["route", "add", "default", "dev", "lo"]);
    let cg = TestCgroup::with_prefix("egress-bench");
    let root = egress::sys::cgroup::cgroup2_root().context("the cgroup2 root")?;
    let cgroup = cg
        .path()
        .strip_prefix(&root)
        .context("the bench cgroup is below the cgroup2 root")?
        .display()
        .to_string();
    let client = std::env::current_exe().context("the bench's own path")?;
    let dir = TempDir::new("bench-scopes");
    let stand_ins: Vec<PathBuf> = (0..DISTINCT)
        .map(|k| -> anyhow::Result<PathBuf> {
            let p = dir.file(&format!("stand-in-{k}"), "#!/bin/sh\nexit 0\n");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            Ok(p)
        })
        .collect::<anyhow::Result<_>>()?;
    let who = Who {
        client: &client,
        cgroup: &cgroup,
        stand_ins: &stand_ins,
    };
    let all: Vec<(u32, u8)> = targets(PREFIXES).iter().map(|(p, _)| *p).collect();
    let variants = &VARIANTS[..if s.quick {
        QUICK_VARIANTS
    } else {
        VARIANTS.len()
    }];
    let mut policies = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        let services = SERVICES.min(v.prefixes);
        let text = policy_text(&all[..v.prefixes], services, v.scoping, &who);
        let file = dir.file(&format!("variant-{i}.toml"), &text);
        let policy = Policy::load(&file)?;
        let compiled = CompiledPolicy::compile(&policy)
            .with_context(|| format!("compiling {}", file.display()))?;
        if (v.scoping == Scoping::None) != (compiled.scopes.keys == 0) {
            bail!(
                "{}: scope keys {:#x}",
                v.scoping.label(),
                compiled.scopes.keys
            );
        }
        policies.push(compiled);
    }
    let mut dp = Datapath::load(&policies[0])?;
    dp.attach(cg.path())?;
    let _stats = datapath::enable_run_stats()?;
    let n = variants.len();
    let (mut c4, mut s4, mut f4) = (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
    for rep in 0..s.reps {
        // A rotating order: drift is spread over the variants, and with an even count none
        // always lands in the same buffer.
        for step in 0..n {
            let i = (rep + step) % n;
            let v = &variants[i];
            dp.reload(&policies[i])?;
            let c = kernel_ns(
                &ns,
                &cg,
                &dp,
                Mode::UdpConnectMany,
                "connect4",
                v.prefixes,
                calls,
            )?;
            let snd = kernel_ns(
                &ns,
                &cg,
                &dp,
                Mode::UdpSendtoMany,
                "sendmsg4",
                v.prefixes,
                calls,
            )?;
            let f = first_calls(&ns, &cg, &dp, first)?;
            eprintln!(
                "bench: run {}/{}: {} prefixes, {}: connect4 {c:.0} ns, sendmsg4 {snd:.0} ns, first connect4 {f:.0} ns",
                rep + 1,
                s.reps,
                v.prefixes,
                v.scoping.label(),
            );
            c4[i].push(c);
            s4[i].push(snd);
            f4[i].push(f);
        }
    }
    let insns = dp.run_stats("connect4")?.verified_insns;
    // Deltas pair each run with its base's run of the same repetition.
    let delta = |x: &[Vec<f64>], i: usize| {
        let base = &x[variants[i].base];
        stat(x[i].iter().zip(base).map(|(a, b)| a - b).collect())
    };
    let rows = variants
        .iter()
        .enumerate()
        .map(|(i, v)| ScopeRow {
            scoping: v.scoping.label().to_string(),
            prefixes: v.prefixes,
            against: (i != v.base).then(|| variants[v.base].scoping.label().to_string()),
            scopes: scope_count(&policies[i]),
            connect4_ns: stat(c4[i].clone()),
            sendmsg4_ns: stat(s4[i].clone()),
            first_connect4_ns: stat(f4[i].clone()),
            connect4_delta_ns: delta(&c4, i),
            sendmsg4_delta_ns: delta(&s4, i),
            first_connect4_delta_ns: delta(&f4, i),
        })
        .collect();
    Ok(ScopeReport {
        prefixes: PREFIXES,
        services: SERVICES,
        calls_per_run: calls,
        first_calls_per_run: first,
        target_ns: TARGET_NS,
        connect4_verified_insns: insns,
        rows,
    })
}

/// Section 7 of results.md.
pub fn markdown(r: &ScopeReport) -> String {
    let mut m = format!(
        "\n### 7. Scopes: {} services over {} prefixes, scoped against unscoped\n\n\
         UDP connects, then sends, to one address in each prefix in turn ({} per run), each \
         approved; the kernel's run-time statistics of `connect4` and `sendmsg4` (ns per run, \
         {} instructions verified for `connect4`); the first connect of a fresh process from {} \
         clients of one connect each. Δ: minus the unscoped policy of the same size in the same \
         run (median [min…max] over runs).\n\n\
         | prefixes | scoping | scopes | connect4 | Δ | sendmsg4 | Δ | first connect4 | Δ |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        r.services, r.prefixes, r.calls_per_run, r.connect4_verified_insns, r.first_calls_per_run
    );
    let abs = |s: &Stat| format!("{:.0} ns [{:.0}–{:.0}]", s.median, s.min, s.max);
    let rel = |row: &ScopeRow, s: &Stat| match row.against {
        None => "–".to_string(),
        Some(_) => format!("{:+.0} ns [{:+.0}…{:+.0}]", s.median, s.min, s.max),
    };
    for row in &r.rows {
        m.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.prefixes,
            row.scoping,
            row.scopes,
            abs(&row.connect4_ns),
            rel(row, &row.connect4_delta_ns),
            abs(&row.sendmsg4_ns),
            rel(row, &row.sendmsg4_delta_ns),
            abs(&row.first_connect4_ns),
            rel(row, &row.first_connect4_delta_ns),
        ));
    }
    let worst = r
        .rows
        .iter()
        .filter(|row| row.against.is_some() && row.prefixes == r.prefixes)
        .map(|row| {
            row.connect4_delta_ns
                .median
                .max(row.sendmsg4_delta_ns.median)
        })
        .fold(f64::NEG_INFINITY, f64::max);
    m.push_str(&format!(
        "\nTarget ≤ +{:.0} ns per call at {} prefixes (steady state, median Δ of `connect4` and \
         `sendmsg4`): the worst variant adds {:+.0} ns: {}.\n",
        r.target_ns,
        r.prefixes,
        worst,
        if worst <= r.target_ns {
            "met"
        } else {
            "**not met**"
        }
    ));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_a_valid_policy_sharing_out_every_prefix() {
        let prefixes: Vec<(u32, u8)> = targets(1_000).iter().map(|(p, _)| *p).collect();
        let stand_ins: Vec<PathBuf> = (0..DISTINCT)
            .map(|k| PathBuf::from(format!("/tmp/stand-in-{k}")))
            .collect();
        let who = Who {
            client: Path::new("/usr/bin/egress-bench"),
            cgroup: "egress-bench-1-0",
            stand_ins: &stand_ins,
        };
        for scoping in VARIANTS.iter().map(|v| v.scoping) {
            let text = policy_text(&prefixes, 300, scoping, &who);
            Policy::parse("scopes.toml", &text).unwrap_or_else(|e| panic!("{e}"));
            let extra = usize::from(scoping == Scoping::UserElsewhere);
            assert_eq!(
                text.matches("[[service]]").count(),
                250 + extra,
                "{scoping:?}"
            );
            for pfx in &prefixes {
                assert!(text.contains(&format!("\"{}\"", cidr(*pfx))), "{scoping:?}");
            }
            assert_eq!(
                text.contains("executables"),
                matches!(scoping, Scoping::Exe | Scoping::ManyExes)
            );
            assert_eq!(
                text.matches("users = [0]").count(),
                match scoping {
                    Scoping::User | Scoping::UserCgroup => 250,
                    Scoping::UserElsewhere => 1,
                    _ => 0,
                }
            );
            assert_eq!(text.contains("cgroups"), scoping == Scoping::UserCgroup);
        }
        for (i, v) in VARIANTS.iter().enumerate() {
            assert!(v.base <= i && VARIANTS[v.base].scoping == Scoping::None);
            assert_eq!(VARIANTS[v.base].prefixes, v.prefixes);
        }
        assert!(VARIANTS[..QUICK_VARIANTS].iter().all(|v| v.base == 0));
        let many = policy_text(&prefixes, 1_000, Scoping::ManyExes, &who);
        assert!(many.contains("/tmp/stand-in-254\"") && many.contains("/tmp/stand-in-0\""));
    }
}
