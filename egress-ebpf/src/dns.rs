//! DNS by name: queries of enforced sockets are steered to the controller's proxy (connect and
//! sendmsg rewrite the destination), answers appear to come from the server the process asked
//! (recvmsg and getpeername rewrite the source back), and addresses the proxy learned for a
//! cgroup are approved for that cgroup only (`grant`, after the address rules).
//!
//! Not steered: the proxy's own upstream sockets (`DNS_UPSTREAM_MARK`), sockets of another
//! network namespace when the proxy listens on loopback (its loopback address is not theirs;
//! `dns_netns_cookie` 0 says it listens on an address every namespace reaches), and connected
//! sockets sending with no address (their peer was steered at connect).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    programs::SockAddrContext,
};
use egress_common::{
    Config, DNS_GRANTS, DNS_PORT, DNS_STEER, DNS_UPSTREAM_MARK, DnsOrig, GrantKey, IPPROTO_TCP,
    IPPROTO_UDP, ScopeBits,
};

use crate::{
    maps::{DNS_ORIG, GRANTS, RULESETS_0, RULESETS_1},
    policy::{self, Decision},
    sock_addr::user6,
};

/// What the hook does with a destination, before the policy.
pub enum Steer {
    /// Not DNS, or not to be steered: the policy decides.
    No,
    /// The destination is the proxy itself (a connected socket steered earlier): allowed.
    Proxy,
    /// Rewritten to the proxy: allowed.
    Steered,
}

#[inline(always)]
fn steerable(ctx: &SockAddrContext, cfg: &Config, port: u16, proto: u8) -> bool {
    if cfg.dns_flags & DNS_STEER == 0
        || port != DNS_PORT
        || (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
    {
        return false;
    }
    // SAFETY: the hook's socket, read the way the verifier expects (one load per field).
    let mark = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        read_volatile(addr_of!((*sk).mark))
    };
    if mark == DNS_UPSTREAM_MARK {
        return false;
    }
    // 0: the proxy listens on an address other namespaces reach (a node address): every
    // namespace is steered to it.
    cfg.dns_netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.dns_netns_cookie
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: DnsOrig) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG.insert(cookie, orig, 0);
}

/// connect4/sendmsg4 (also an AF_INET6 socket sending to a v4-mapped address: `mapped`).
#[inline(always)]
pub fn steer_v4(
    ctx: &SockAddrContext,
    cfg: &Config,
    addr: [u8; 4],
    port: u16,
    proto: u8,
    mapped: bool,
) -> Steer {
    if cfg.dns_flags & DNS_STEER != 0 && addr == cfg.dns_v4 && port == cfg.dns_port {
        return Steer::Proxy;
    }
    if !steerable(ctx, cfg, port, proto) {
        return Steer::No;
    }
    let mut orig = DnsOrig {
        family: 4,
        port,
        ..DnsOrig::default()
    };
    if mapped {
        orig.family = 6;
        orig.addr[10] = 0xff;
        orig.addr[11] = 0xff;
        orig.addr[12..].copy_from_slice(&addr);
    } else {
        orig.addr[..4].copy_from_slice(&addr);
    }
    remember(ctx, orig);
    // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4 (4-byte stores).
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(cfg.dns_v4);
        (*ctx.sock_addr).user_port = u32::from(cfg.dns_port.to_be());
    }
    Steer::Steered
}

/// connect6/sendmsg6 with an IPv6 destination, steered to the proxy's IPv6 address; or, with
/// `mapped`, a v4-mapped one, steered to the mapped form of the proxy's IPv4 address.
#[inline(always)]
pub fn steer_v6(
    ctx: &SockAddrContext,
    cfg: &Config,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
    mapped: bool,
) -> Steer {
    let (proxy, proxy_port) = if mapped {
        (mapped_form(cfg.dns_v4), cfg.dns_port)
    } else {
        (cfg.dns_v6, cfg.dns_port6)
    };
    if cfg.dns_flags & DNS_STEER != 0 && *addr == proxy && port == proxy_port {
        return Steer::Proxy;
    }
    if !steerable(ctx, cfg, port, proto) {
        return Steer::No;
    }
    remember(
        ctx,
        DnsOrig {
            family: 6,
            port,
            addr: *addr,
            ..DnsOrig::default()
        },
    );
    // SAFETY: user_ip6 and user_port are writable in connect6 and sendmsg6.
    unsafe { set_user6(ctx, &proxy, proxy_port) };
    Steer::Steered
}

/// `::ffff:a.b.c.d`, the v4-mapped form of an IPv4 address.
#[inline(always)]
pub(crate) fn mapped_form(v4: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(&v4);
    m
}

/// Writes `addr` and `port` (host order) into the context's IPv6 address and port.
///
/// # Safety
/// A sock_addr context of an AF_INET6 hook where they are writable (connect6, sendmsg6,
/// recvmsg6, getpeername6).
#[inline(always)]
unsafe fn set_user6(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY: as the caller promises; one 4-byte store per word.
    unsafe {
        (*ctx.sock_addr).user_ip6[0] = w(0);
        (*ctx.sock_addr).user_ip6[1] = w(4);
        (*ctx.sock_addr).user_ip6[2] = w(8);
        (*ctx.sock_addr).user_ip6[3] = w(12);
        (*ctx.sock_addr).user_port = u32::from(port.to_be());
    }
}

/// recvmsg4/getpeername4: an address that is the proxy's becomes the server the socket asked.
/// Always returns 1 (these hooks may not refuse).
pub fn restore_v4(ctx: &SockAddrContext) -> i32 {
    let cfg = crate::policy::config();
    if cfg.dns_flags & DNS_STEER == 0 {
        return 1;
    }
    // SAFETY: reads and 4-byte writes of the context's address, allowed in these hooks.
    unsafe {
        let ip = (*ctx.sock_addr).user_ip4;
        let port = u16::from_be((*ctx.sock_addr).user_port as u16);
        if ip != u32::from_ne_bytes(cfg.dns_v4) || port != cfg.dns_port {
            return 1;
        }
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        if let Some(o) = DNS_ORIG.get(cookie)
            && o.family == 4
        {
            (*ctx.sock_addr).user_ip4 =
                u32::from_ne_bytes([o.addr[0], o.addr[1], o.addr[2], o.addr[3]]);
            (*ctx.sock_addr).user_port = u32::from(o.port.to_be());
        }
    }
    1
}

/// recvmsg6/getpeername6: the proxy's IPv6 address, or the mapped form of its IPv4 address,
/// becomes the server the socket asked.
pub fn restore_v6(ctx: &SockAddrContext) -> i32 {
    let cfg = crate::policy::config();
    if cfg.dns_flags & DNS_STEER == 0 {
        return 1;
    }
    // SAFETY: the recvmsg6/getpeername6 context, whose address and port are readable and
    // writable.
    unsafe {
        let addr = user6(ctx);
        let port = u16::from_be((*ctx.sock_addr).user_port as u16);
        let is_v6 = port == cfg.dns_port6 && addr == cfg.dns_v6;
        let is_mapped = port == cfg.dns_port && addr == mapped_form(cfg.dns_v4);
        if !is_v6 && !is_mapped {
            return 1;
        }
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        if let Some(o) = DNS_ORIG.get(cookie)
            && o.family == 6
        {
            set_user6(ctx, &o.addr, o.port);
        }
    }
    1
}

/// The verdict of a live grant for this cgroup and address, when there is one: the service's
/// ports and protocols (its rule set in the buffer in force) decide. Consulted only where the
/// address rules reached the default verdict.
#[inline(always)]
pub fn grant(
    cfg: &Config,
    cgroup_id: u64,
    family: u8,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
    scopes: &ScopeBits,
) -> Option<Decision> {
    if cfg.dns_flags & DNS_GRANTS == 0 {
        return None;
    }
    let key = GrantKey {
        cgroup_id,
        family,
        _pad: [0; 7],
        addr: *addr,
    };
    let g = unsafe { GRANTS.get(key) }?;
    if g.until_ns <= unsafe { bpf_ktime_get_boot_ns() } {
        return None;
    }
    let set = if cfg.buffer == 0 {
        unsafe { RULESETS_0.get(g.ruleset) }
    } else {
        unsafe { RULESETS_1.get(g.ruleset) }
    }?;
    let m = policy::scan(set, port, proto, scopes);
    // A grant decides only through a rule of its service that applies to the caller (or, for
    // an audit service, one whose scope leaves the caller out: let through and reported).
    if m.rule_id == egress_common::RULE_DEFAULT && m.audit_pass == 0 {
        return None;
    }
    Some(policy::verdict(m, cfg))
}
