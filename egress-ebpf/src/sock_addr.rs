//! The cgroup sock_addr hooks (connect4/6, sendmsg4/6): read the destination from the context,
//! decide, record the socket's owner (`owners.rs`; a call whose owner cannot be recorded is
//! refused), report denies, and turn the decision into the hook's return value.
//!
//! Return values: 1 lets the call proceed, 0 makes it fail with EPERM.
//!
//! Every decision ends in `finish`, which also writes the one aya-log debug line per decision
//! (off unless the controller runs with `--kernel-log`).

use core::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    programs::SockAddrContext,
};
use egress_common::{
    Config, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, MODE_AUDIT, RULE_DEFAULT,
    RULE_EXCEPTION, RULE_OWNERS_FULL, STAT_ALLOWED, STAT_DNS_STEERED, STAT_OWNERS_FULL, ScopeBits,
    addr_halves, v4_mapped,
};

use crate::{
    dns::{self, Steer},
    exception,
    maps::STATS,
    owners,
    policy::{self, Decision},
    report::{self, Refusal},
    scope,
};

const AF_INET6: u32 = 10;
const VERDICT_ALLOW: i32 = 1;
const VERDICT_DENY: i32 = 0;

#[inline(always)]
fn port_of(ctx: &SockAddrContext) -> u16 {
    // user_port holds the port in network byte order in its low 16 bits.
    let raw = unsafe { (*ctx.sock_addr).user_port };
    u16::from_be(raw as u16)
}

#[inline(always)]
fn protocol_of(ctx: &SockAddrContext) -> u8 {
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

/// A sendmsg on a connected socket that carries a cmsg (`IP_TOS`, `IP_TTL`, ...) reaches the
/// hook with no address at all (`user_family` 0, address and port zero). The datagram goes to
/// the socket's peer: judge that, never the zero address (which `allow_loopback` would wave
/// through as "this host", and which would wrongly deny with `allow_loopback = false`).
#[inline(always)]
fn no_address(ctx: &SockAddrContext) -> bool {
    let family = unsafe { (*ctx.sock_addr).user_family };
    family == 0
}

// The verifier allows no pointer arithmetic on a socket pointer: each field is read with its
// own volatile load (`*(u32 *)(sk + off)`), so LLVM cannot fold the offsets into the pointer.

/// The connected peer of the hook's socket: IPv4 address (network order) and port.
#[inline(always)]
fn peer_v4(ctx: &SockAddrContext) -> ([u8; 4], u16) {
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let ip = read_volatile(addr_of!((*sk).dst_ip4));
        let port = read_volatile(addr_of!((*sk).dst_port));
        (ip.to_ne_bytes(), u16::from_be(port))
    }
}

/// The connected peer of the hook's socket: IPv6 address and port.
#[inline(always)]
fn peer_v6(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let w0 = read_volatile(addr_of!((*sk).dst_ip6[0]));
        let w1 = read_volatile(addr_of!((*sk).dst_ip6[1]));
        let w2 = read_volatile(addr_of!((*sk).dst_ip6[2]));
        let w3 = read_volatile(addr_of!((*sk).dst_ip6[3]));
        let port = read_volatile(addr_of!((*sk).dst_port));
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&w0.to_ne_bytes());
        addr[4..8].copy_from_slice(&w1.to_ne_bytes());
        addr[8..12].copy_from_slice(&w2.to_ne_bytes());
        addr[12..16].copy_from_slice(&w3.to_ne_bytes());
        (addr, u16::from_be(port))
    }
}

/// The context's IPv6 address, as bytes.
///
/// # Safety
/// A sock_addr context of an AF_INET6 hook.
#[inline(always)]
pub(crate) unsafe fn user6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut a = [0u8; 16];
    // SAFETY: as the caller promises; one 4-byte load per word.
    unsafe {
        let ip6 = &(*ctx.sock_addr).user_ip6;
        a[0..4].copy_from_slice(&ip6[0].to_ne_bytes());
        a[4..8].copy_from_slice(&ip6[1].to_ne_bytes());
        a[8..12].copy_from_slice(&ip6[2].to_ne_bytes());
        a[12..16].copy_from_slice(&ip6[3].to_ne_bytes());
    }
    a
}

pub fn decide_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let (addr, port) = if no_address(ctx) {
        peer_v4(ctx)
    } else {
        (
            unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes(),
            port_of(ctx),
        )
    };
    let proto = protocol_of(ctx);
    let cfg = policy::config();
    let inet6 = unsafe { (*ctx.sock_addr).family } == AF_INET6;
    if !no_address(ctx) {
        match dns::steer_v4(ctx, cfg, addr, port, proto, inet6) {
            Steer::No => {}
            Steer::Proxy | Steer::Steered => return steered(ctx),
        }
    }
    let scopes = scope::caller(cfg);
    let d = policy::decide_v4::<false>(cfg, addr, port, proto, &scopes);
    let mut full = [0u8; 16];
    full[..4].copy_from_slice(&addr);
    let d = with_grant(cfg, d, 4, &full, port, proto, &scopes);
    let d = with_exception(cfg, d, 4, &full, port, proto);
    // An AF_INET6 socket sending to ::ffff:a.b.c.d reaches sendmsg4 with the IPv4 address: report
    // it as the process gave it.
    if inet6 {
        return finish(ctx, cfg, d, hook, 6, 1, dns::mapped_form(addr), port, proto);
    }
    finish(ctx, cfg, d, hook, 4, 0, full, port, proto)
}

pub fn decide_v6(ctx: &SockAddrContext, hook: u8) -> i32 {
    let (addr, port) = if no_address(ctx) {
        peer_v6(ctx)
    } else {
        // SAFETY: the context of an AF_INET6 hook.
        (unsafe { user6(ctx) }, port_of(ctx))
    };
    let proto = protocol_of(ctx);
    let cfg = policy::config();
    let v4 = v4_mapped(&addr);
    if !no_address(ctx) {
        match dns::steer_v6(ctx, cfg, &addr, port, proto, v4.is_some()) {
            Steer::No => {}
            Steer::Proxy | Steer::Steered => return steered(ctx),
        }
    }
    let scopes = scope::caller(cfg);
    // ::ffff:a.b.c.d reaches the IPv4 address a.b.c.d: judge it exactly as IPv4.
    let (d, mapped) = match v4 {
        Some(v4) => {
            let mut full = [0u8; 16];
            full[..4].copy_from_slice(&v4);
            let d = policy::decide_v4::<false>(cfg, v4, port, proto, &scopes);
            let d = with_grant(cfg, d, 4, &full, port, proto, &scopes);
            (with_exception(cfg, d, 4, &full, port, proto), 1)
        }
        None => {
            let d = policy::decide_v6::<false>(cfg, addr, port, proto, &scopes);
            let d = with_grant(cfg, d, 6, &addr, port, proto, &scopes);
            (with_exception(cfg, d, 6, &addr, port, proto), 0)
        }
    };
    finish(ctx, cfg, d, hook, 6, mapped, addr, port, proto)
}

/// A DNS query sent to the proxy (steered now, or connected to it before): allowed, and its
/// owner recorded (the proxy finds the asking process by it).
#[inline(always)]
fn steered(ctx: &SockAddrContext) -> i32 {
    count(STAT_DNS_STEERED);
    // Without an owner the proxy cannot tell who asked and grants nothing (fail closed for
    // names); the query itself goes on.
    if !owners::record(ctx) {
        count(STAT_OWNERS_FULL);
    }
    VERDICT_ALLOW
}

/// Where the address rules reached the default verdict, a grant of this cgroup for this
/// address (learned from a DNS answer) decides.
#[inline(always)]
fn with_grant(
    cfg: &Config,
    d: Decision,
    family: u8,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
    scopes: &ScopeBits,
) -> Decision {
    if d.rule_id != RULE_DEFAULT {
        return d;
    }
    let cgroup = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    match dns::grant(cfg, cgroup, family, addr, port, proto, scopes) {
        // An audit entry the address rules passed over still names the call if it is allowed.
        Some(g) if g.audit_rule == 0 && g.allow => Decision {
            audit_rule: d.audit_rule,
            ..g
        },
        Some(g) => g,
        None => d,
    }
}

/// Where the policy (grants included) refuses the call, a live break-glass exception of the
/// caller for this destination lets it through (`exception.rs`). Only on the deny path, and only
/// when exceptions exist. A byte-budget block still wins: `finish` checks it on every allowed
/// call, this one included.
#[inline(always)]
fn with_exception(
    cfg: &Config,
    d: Decision,
    family: u8,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
) -> Decision {
    if d.allow || cfg.exceptions == 0 {
        return d;
    }
    let (hi, lo) = addr_halves(addr);
    let what = u64::from(port)
        | u64::from(proto) << 16
        | u64::from(family) << 24
        | u64::from(cfg.exc_cg_levels) << 32;
    match exception::egress_excepted(hi, lo, what) {
        0 => d,
        _ => Decision::plain(true, RULE_EXCEPTION),
    }
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "flat hot-path helper, inlined")]
fn finish(
    ctx: &SockAddrContext,
    cfg: &Config,
    d: Decision,
    hook: u8,
    family: u8,
    v4_mapped: u8,
    addr: [u8; 16],
    port: u16,
    proto: u8,
) -> i32 {
    // A process over its byte budget (or created by one after its block) is refused whatever
    // the policy says.
    let d = if d.allow {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let (jfamily, jaddr) = judged(family, v4_mapped, &addr);
        let uid = bpf_get_current_uid_gid() as u32;
        match policy::caller_budget_block(cfg, tgid, uid, jfamily, &jaddr) {
            Some(rule_id) => Decision::plain(false, rule_id),
            None => d,
        }
    } else {
        d
    };
    // An allowed call whose owner cannot be recorded (`SOCK_OWNERS` full) is refused: its
    // packets would go unattributed and escape per-process budgets and alerts. Fail closed.
    let d = if !d.allow || owners::record(ctx) {
        d
    } else {
        count(STAT_OWNERS_FULL);
        Decision::plain(false, RULE_OWNERS_FULL)
    };
    let mode_audit = cfg.mode == MODE_AUDIT;
    // One report at most: the refusal, or, for an allowed call an audit entry would have
    // refused, that entry as audited. (One call site: the event is built once on the stack.)
    let (report, rule_id, as_audit) = if d.allow {
        (d.audit_rule != 0, d.audit_rule, true)
    } else {
        (true, d.rule_id, mode_audit)
    };
    if report {
        report::refused(
            Refusal {
                rule_id,
                hook,
                family,
                protocol: proto,
                port,
                addr,
                v4_mapped,
                sock_type: 0,
            },
            as_audit,
            cfg.generation,
        );
    }
    // The verdict never depends on whether the event (or the log line) could be sent.
    let verdict = if d.allow {
        count(STAT_ALLOWED);
        VERDICT_ALLOW
    } else if mode_audit {
        // Audit lets the call through: its owner is recorded if it can be (counted once if not).
        if d.rule_id != RULE_OWNERS_FULL && !owners::record(ctx) {
            count(STAT_OWNERS_FULL);
        }
        VERDICT_ALLOW
    } else {
        VERDICT_DENY
    };
    // The one kernel log line of a decision (`egress run --kernel-log`), last (fewest values
    // live across the call: the hooks have little stack to spare), behind aya-log's level
    // (`AYA_LOG_LEVEL`, read-only data the loader sets): off unless asked, and then the
    // verifier sees the frozen value and drops the branch (one load and a jump per call).
    if aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Debug) {
        let verdict_code = if d.allow {
            LOG_ALLOW
        } else if mode_audit {
            LOG_AUDIT
        } else {
            LOG_DENY
        };
        let what = u64::from(hook)
            | u64::from(verdict_code) << 8
            | u64::from(family) << 16
            | u64::from(proto) << 24
            | u64::from(port) << 32;
        let (hi, lo) = addr.split_at(8);
        egress_log_decision(
            what,
            u64::from(d.rule_id),
            u64::from_ne_bytes(hi.try_into().unwrap_or_default()),
            u64::from_ne_bytes(lo.try_into().unwrap_or_default()),
        );
    }
    verdict
}

const LOG_DENY: u8 = 0;
const LOG_ALLOW: u8 = 1;
const LOG_AUDIT: u8 = 2;

/// Writes the debug line of one decision. A global BPF function (exported, not inlined, with
/// scalar arguments only): the verifier checks its body once, on its own, not once per way
/// into it; as a static subprogram 6.1's verifier walked it with every caller state and took
/// connect4 past its 1M-instruction limit. Returns 0 (6.1 refuses global functions that
/// return void).
/// `what`: hook | verdict << 8 | family << 16 | protocol << 24 | port << 32; `hi`, `lo`: the
/// address's bytes (in registers: a pointer to the caller's array cost it stack).
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn egress_log_decision(what: u64, rule_id: u64, hi: u64, lo: u64) -> u32 {
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hi.to_ne_bytes());
    addr[8..].copy_from_slice(&lo.to_ne_bytes());
    let dst = if (what >> 16) as u8 == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    };
    // aya-log's macros take a context they do not use (the ring buffer needs none).
    aya_log_ebpf::debug!(
        &(),
        target: "egress_ebpf",
        "{} rule={} dst={} port={} proto={} tgid={}",
        hook_and_verdict(what as u8, (what >> 8) as u8),
        rule_id as u32,
        dst,
        (what >> 32) as u16,
        (what >> 24) as u8,
        (bpf_get_current_pid_tgid() >> 32) as u32
    );
    0
}

/// The hook's name and the verdict, for the log line (one argument: each costs the logging
/// code stack, and the hooks have little to spare).
#[inline(always)]
fn hook_and_verdict(hook: u8, verdict: u8) -> &'static str {
    match (hook, verdict) {
        (HOOK_CONNECT4, LOG_ALLOW) => "connect4 allow",
        (HOOK_CONNECT4, LOG_AUDIT) => "connect4 audit",
        (HOOK_CONNECT4, _) => "connect4 deny",
        (HOOK_CONNECT6, LOG_ALLOW) => "connect6 allow",
        (HOOK_CONNECT6, LOG_AUDIT) => "connect6 audit",
        (HOOK_CONNECT6, _) => "connect6 deny",
        (HOOK_SENDMSG4, LOG_ALLOW) => "sendmsg4 allow",
        (HOOK_SENDMSG4, LOG_AUDIT) => "sendmsg4 audit",
        (HOOK_SENDMSG4, _) => "sendmsg4 deny",
        (HOOK_SENDMSG6, LOG_ALLOW) => "sendmsg6 allow",
        (HOOK_SENDMSG6, LOG_AUDIT) => "sendmsg6 audit",
        (HOOK_SENDMSG6, _) => "sendmsg6 deny",
        _ => "sock_addr",
    }
}

/// The family and address a destination is judged as: a v4-mapped address as its IPv4 address.
#[inline(always)]
fn judged(family: u8, v4_mapped: u8, addr: &[u8; 16]) -> (u8, [u8; 16]) {
    if v4_mapped != 0 {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&addr[12..16]);
        (4, v4)
    } else {
        (family, *addr)
    }
}

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(c) = STATS.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}
