//! DNS by name: queries of enforced sockets are steered to the controller's proxy (connect and
//! sendmsg rewrite the destination), answers appear to come from the server the process asked
//! (recvmsg and getpeername rewrite the source back), and addresses the proxy learned for a
//! cgroup are approved for that cgroup only (`grant`, after the address rules).
//!
//! Not steered: the proxy's own upstream sockets (`DNS_UPSTREAM_MARK`), sockets of another
//! network namespace (the proxy's loopback address is not theirs), and connected sockets
//! sending with no address (their peer was steered at connect).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    programs::SockAddrContext,
};
use egress_common::{
    ACTION_BLOCK, Config, DNS_GRANTS, DNS_PORT, DNS_STEER, DNS_UPSTREAM_MARK, DnsOrig, GrantKey,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    maps::{DNS_ORIG, GRANTS, RULESETS_0, RULESETS_1},
    policy::Decision,
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
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    netns == cfg.dns_netns_cookie
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
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12..].copy_from_slice(&cfg.dns_v4);
        (m, cfg.dns_port)
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
    let w = |i: usize| u32::from_ne_bytes([proxy[i], proxy[i + 1], proxy[i + 2], proxy[i + 3]]);
    // SAFETY: user_ip6 words and user_port are writable in connect6 and sendmsg6.
    unsafe {
        (*ctx.sock_addr).user_ip6[0] = w(0);
        (*ctx.sock_addr).user_ip6[1] = w(4);
        (*ctx.sock_addr).user_ip6[2] = w(8);
        (*ctx.sock_addr).user_ip6[3] = w(12);
        (*ctx.sock_addr).user_port = u32::from(proxy_port.to_be());
    }
    Steer::Steered
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
    // SAFETY: as in `restore_v4`, word by word.
    unsafe {
        let ip6 = &(*ctx.sock_addr).user_ip6;
        let (w0, w1, w2, w3) = (ip6[0], ip6[1], ip6[2], ip6[3]);
        let port = u16::from_be((*ctx.sock_addr).user_port as u16);
        let word = |i: usize| {
            u32::from_ne_bytes([
                cfg.dns_v6[i],
                cfg.dns_v6[i + 1],
                cfg.dns_v6[i + 2],
                cfg.dns_v6[i + 3],
            ])
        };
        let is_v6 = port == cfg.dns_port6
            && w0 == word(0)
            && w1 == word(4)
            && w2 == word(8)
            && w3 == word(12);
        let is_mapped = port == cfg.dns_port
            && w0 == 0
            && w1 == 0
            && w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff])
            && w3 == u32::from_ne_bytes(cfg.dns_v4);
        if !is_v6 && !is_mapped {
            return 1;
        }
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        if let Some(o) = DNS_ORIG.get(cookie)
            && o.family == 6
        {
            let a = o.addr;
            (*ctx.sock_addr).user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
            (*ctx.sock_addr).user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
            (*ctx.sock_addr).user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
            (*ctx.sock_addr).user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
            (*ctx.sock_addr).user_port = u32::from(o.port.to_be());
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
    let r = set.first_match(port, proto)?;
    Some(Decision {
        allow: r.action != ACTION_BLOCK,
        rule_id: r.rule_id,
    })
}
