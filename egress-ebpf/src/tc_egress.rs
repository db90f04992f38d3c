//! TC egress: byte accounting of what no cgroup program sees, budget drops, and the second line
//! of enforcement for traffic that never passed the connect/sendmsg hooks (raw sockets, sockets
//! older than the controller).
//!
//! The owner of a packet is looked up by socket cookie in `SOCK_OWNERS` (recorded by the cgroup
//! hooks): packets often leave in softirq context, where the current task is someone else.
//! Packets with an owner are counted by the `cgroup_skb/egress` program (`skb_egress.rs`), not
//! here, so nothing is counted twice. Packets without a recorded owner are counted here under
//! `TGID_UNATTRIBUTED`; they are dropped only when an explicit `[[block]]` covers their
//! destination (never for the default verdict, which would cut replies of accepted connections).
//!
//! Return values: `TC_ACT_UNSPEC` (-1, "next": lets other TCX programs and filters run) to pass,
//! `TC_ACT_SHOT` to drop.

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_loop, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    programs::{TcContext, sk_buff::SkBuff},
};
use egress_common::{
    EVENT_AUDIT, EVENT_DENY, Event, FlowKey, FlowValue, HOOK_TC, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP, MODE_AUDIT, RULE_DEFAULT, RULE_LOOPBACK, RULE_SOCKETS,
    RULE_SOURCE_ROUTE, SOCK_ALLOW, SOCK_AUDIT, SOCK_POLICY, SOCKETS_ICMP, SOCKETS_PACKET,
    STAT_BUDGET_DROPPED, STAT_EVENTS_LOST, STAT_FLOWS_FULL_BYTES, STAT_FLOWS_FULL_PACKETS,
    STAT_TC_AUDITED, STAT_TC_DROPPED, ScopeBits, TGID_UNATTRIBUTED,
};

use crate::{
    maps::{EVENTS, FLOWS, IFACE_L2, SOCK_OWNERS, STATS},
    policy,
    sock_addr::count,
    sockopt::{IPOPT_LSRR, IPOPT_SSRR},
};

const AF_PACKET: u32 = 17;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HLEN: u32 = 14;
const BPF_NOEXIST: u64 = 1;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// What the parser found in a packet.
#[derive(Clone, Copy)]
pub(crate) struct Parsed {
    pub family: u8,
    pub protocol: u8,
    pub port: u16,
    pub addr: [u8; 16],
    /// Transport payload length.
    pub payload: u32,
    /// The packet carries a source route (IPv4 LSRR/SSRR option) or an IPv6 routing header:
    /// where it goes is not the destination a hook judged.
    pub routed: bool,
    /// An ICMP or ICMPv6 echo request: what a ping socket sends.
    pub echo_request: bool,
}

impl Parsed {
    /// A frame that carries no IP packet: reported with an empty destination.
    const NONE: Parsed = Parsed {
        family: 0,
        protocol: 0,
        port: 0,
        addr: [0u8; 16],
        payload: 0,
        routed: false,
        echo_request: false,
    };
}

/// The address family of the socket that sent this packet, 0 when there is none (forwarded
/// traffic, ARP, kernel replies).
#[inline(always)]
fn socket_family(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    // SAFETY: ctx fields, read the way the verifier expects (one load each, null checked).
    unsafe {
        let sk = read_volatile(addr_of!((*skb).__bindgen_anon_2.sk));
        if sk.is_null() {
            0
        } else {
            read_volatile(addr_of!((*sk).family))
        }
    }
}

pub fn classify(ctx: &TcContext) -> i32 {
    let cfg = policy::config();
    let skb = ctx.skb.skb;
    if cfg.tc_cgroup_id != 0 {
        let anc = unsafe { bpf_skb_ancestor_cgroup_id(skb, cfg.tc_cgroup_level as i32) };
        if anc != cfg.tc_cgroup_id {
            return TC_ACT_UNSPEC;
        }
    }
    let sk_family = socket_family(skb);
    let parsed = parse(ctx);
    // AF_PACKET sockets pass no cgroup hook: their frames are judged here, by the sending
    // socket's family and whatever they carry (`PACKET_QDISC_BYPASS` skips TC: see exec).
    if sk_family == AF_PACKET {
        let rule = cfg.sockets[SOCKETS_PACKET];
        if rule != SOCK_ALLOW {
            let p = match &parsed {
                Some(p) => *p,
                None => Parsed::NONE,
            };
            let rule_id = RULE_SOCKETS + SOCKETS_PACKET as u32;
            if refuse(cfg, &p, rule_id, rule == SOCK_AUDIT, skb) {
                return TC_ACT_SHOT;
            }
        }
    }
    let Some(p) = parsed else {
        // Not IP, or truncated. From a socket of the enforced scope (an allowed AF_PACKET socket
        // aside), such a frame is no traffic the policy can judge: dropped in enforce mode.
        if sk_family != 0 && sk_family != AF_PACKET && cfg.mode != MODE_AUDIT {
            count(STAT_TC_DROPPED);
            return TC_ACT_SHOT;
        }
        return TC_ACT_UNSPEC;
    };
    // Source routes and routing headers are refused at setsockopt; their cmsg forms (and sockets
    // from outside the cgroup) end here.
    if p.routed && refuse(cfg, &p, RULE_SOURCE_ROUTE, false, skb) {
        return TC_ACT_SHOT;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The recorded owner's fields, read out at once: every value defined on both paths (an
    // `Option<Owner>`'s undefined payload may reach a spill the verifier refuses to read).
    let owner = if cookie != 0 {
        unsafe { SOCK_OWNERS.get(cookie) }
    } else {
        None
    };
    let (owned, owner_tgid, owner_cgroup) = match owner {
        Some(o) => (true, o.tgid, o.cgroup_id),
        None => (false, TGID_UNATTRIBUTED, 0),
    };

    // A process over its byte budget: its packets stop here, established connections included.
    if owned
        && policy::budget_block(cfg, owner_tgid, p.family, &p.addr).is_some()
        && cfg.mode != MODE_AUDIT
    {
        count(STAT_BUDGET_DROPPED);
        return TC_ACT_SHOT;
    }
    // Ping sockets under `icmp = "policy"`: every echo request is judged like a connect, default
    // included (a ping socket's sendto passes no cgroup hook, and may name any address even after
    // a judged connect). Echo replies and errors are the kernel's answers: not judged. Other
    // packets with no recorded owner are dropped only for an explicit block: the default verdict
    // also covers replies of accepted connections and forwarded traffic, which the connect hooks
    // never judged. One decision for both (the verifier's budget).
    let judge_echo = p.echo_request && cfg.sockets[SOCKETS_ICMP] == SOCK_POLICY;
    if judge_echo || !owned {
        let d = decide(cfg, &p);
        let explicit = d.rule_id != RULE_DEFAULT && d.rule_id != RULE_LOOPBACK;
        if !d.allow && (judge_echo || explicit) && refuse(cfg, &p, d.rule_id, false, skb) {
            return TC_ACT_SHOT;
        }
    }

    // The packets of a socket with a recorded owner were counted by `cgroup_skb/egress`
    // (`skb_egress.rs`), which sees them in the sender's own network namespace, before NAT and
    // veths: TC counts the rest (no owner: forwarded, raw, AF_PACKET, sockets older than the
    // controller), and the echo requests it judges (the cgroup program leaves those to it).
    if owned && !judge_echo {
        return TC_ACT_UNSPEC;
    }
    let wire = unsafe { (*skb).wire_len };
    let bytes = if wire != 0 { wire } else { ctx.len() } as u64;
    let key = FlowKey {
        cgroup_id: if owned {
            owner_cgroup
        } else {
            unsafe { bpf_skb_cgroup_id(skb) }
        },
        tgid: owner_tgid,
        port: p.port,
        protocol: p.protocol,
        family: p.family,
        addr: p.addr,
    };
    account(&key, bytes, p.payload as u64);
    TC_ACT_UNSPEC
}

#[inline(always)]
pub(crate) fn account(key: &FlowKey, bytes: u64, payload: u64) {
    if let Some(v) = FLOWS.get_ptr_mut(key) {
        add(v, bytes, payload);
        return;
    }
    let init = FlowValue {
        packets: 1,
        bytes,
        payload,
    };
    if FLOWS.insert(key, init, BPF_NOEXIST).is_ok() {
        return;
    }
    // Another CPU created it meanwhile, or the map is full.
    match FLOWS.get_ptr_mut(key) {
        Some(v) => add(v, bytes, payload),
        None => {
            count(STAT_FLOWS_FULL_PACKETS);
            if let Some(c) = STATS.get_ptr_mut(STAT_FLOWS_FULL_BYTES) {
                unsafe { *c += bytes };
            }
        }
    }
}

#[inline(always)]
fn add(v: *mut FlowValue, bytes: u64, payload: u64) {
    // Per-CPU value: no other CPU writes this copy.
    unsafe {
        (*v).packets += 1;
        (*v).bytes += bytes;
        (*v).payload += payload;
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Parsed> {
    let skb = ctx.skb.skb;
    let ifindex = unsafe { (*skb).ifindex };
    let l2 = match unsafe { IFACE_L2.get(ifindex) } {
        Some(l) => *l,
        None => ETH_HLEN,
    } as usize;
    // The frame says what it carries, not `skb->protocol`: an AF_PACKET socket bound to another
    // protocol may send an IP packet.
    let proto = if l2 == ETH_HLEN as usize {
        u16::from_be(ctx.load::<u16>(12).ok()?)
    } else if l2 == 0 {
        match ctx.load::<u8>(0).ok()? >> 4 {
            4 => ETH_P_IP,
            6 => ETH_P_IPV6,
            _ => return None,
        }
    } else {
        u16::from_be(unsafe { (*skb).protocol } as u16)
    };
    parse_ip(&ctx.skb, proto, l2)
}

/// Parses the IP packet (EtherType `proto`) that starts at `l2` in `skb`: TC's frames (after
/// their link-layer header) and, from offset 0, what the `cgroup_skb` program sees.
#[inline(always)]
pub(crate) fn parse_ip(ctx: &SkBuff, proto: u16, l2: usize) -> Option<Parsed> {
    let len = ctx.len();
    let mut addr = [0u8; 16];
    // `l3_end`: first byte after the IP header. `has_l4`: false for a non-first IPv4 fragment,
    // which carries no transport header (all of it is payload, port unknown: 0).
    let (family, protocol, l3_end, has_l4, routed) = match proto {
        ETH_P_IP => {
            let ver_ihl: u8 = ctx.load(l2).ok()?;
            let frag: u16 = u16::from_be(ctx.load(l2 + 6).ok()?);
            let protocol: u8 = ctx.load(l2 + 9).ok()?;
            let dst: [u8; 4] = ctx.load(l2 + 16).ok()?;
            addr[..4].copy_from_slice(&dst);
            let ihl = ((ver_ihl & 0x0f) as usize) * 4;
            let routed = ihl > 20 && ipv4_source_routed(ctx, l2 + 20, ihl - 20);
            (4u8, protocol, l2 + ihl, frag & 0x1fff == 0, routed)
        }
        ETH_P_IPV6 => {
            addr = ctx.load(l2 + 24).ok()?;
            let w = skip_ipv6_extensions(ctx, ctx.load(l2 + 6).ok()?, l2 + 40)?;
            (6u8, w.next, w.end, w.has_l4, w.routed)
        }
        _ => return None,
    };
    let mut echo_request = false;
    let (port, l4_hdr) = if !has_l4 {
        (0u16, 0usize)
    } else if protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 {
        let icmp_type: u8 = ctx.load(l3_end).ok()?;
        echo_request = (protocol == IPPROTO_ICMP && icmp_type == ICMP_ECHO)
            || (protocol == IPPROTO_ICMPV6 && icmp_type == ICMPV6_ECHO_REQUEST);
        (0, 8)
    } else if protocol == IPPROTO_TCP {
        let port = u16::from_be(ctx.load(l3_end + 2).ok()?);
        let doff: u8 = ctx.load(l3_end + 12).ok()?;
        (port, ((doff >> 4) as usize) * 4)
    } else if protocol == IPPROTO_UDP {
        (u16::from_be(ctx.load(l3_end + 2).ok()?), 8)
    } else {
        (0, 0)
    };
    let payload = (len as usize).saturating_sub(l3_end + l4_hdr) as u32;
    Some(Parsed {
        family,
        protocol,
        port,
        addr,
        payload,
        routed,
        echo_request,
    })
}

/// Counts and reports a packet the policy refuses (`rule_id` decided); true when it is to be
/// dropped (enforce mode), false in audit mode or when the rule itself only audits.
#[inline(always)]
fn refuse(
    cfg: &egress_common::Config,
    p: &Parsed,
    rule_id: u32,
    audit_only: bool,
    skb: *mut aya_ebpf::bindings::__sk_buff,
) -> bool {
    let audit = audit_only || cfg.mode == MODE_AUDIT;
    count(if audit {
        STAT_TC_AUDITED
    } else {
        STAT_TC_DROPPED
    });
    report(p, rule_id, audit, cfg.generation, unsafe {
        bpf_skb_cgroup_id(skb)
    });
    !audit
}

/// The policy's verdict for a parsed packet.
#[inline(always)]
fn decide(cfg: &egress_common::Config, p: &Parsed) -> policy::Decision {
    if p.family == 4 {
        policy::decide_v4::<true>(
            cfg,
            [p.addr[0], p.addr[1], p.addr[2], p.addr[3]],
            p.port,
            p.protocol,
            &ScopeBits::EVERYONE,
        )
    } else {
        policy::decide_v6::<true>(cfg, p.addr, p.port, p.protocol, &ScopeBits::EVERYONE)
    }
}

/// Whether the IPv4 options at `off` (`len` bytes, at most 40) hold a source route: any byte of
/// them that is an LSRR or SSRR option type. Scanning bytes rather than walking the options keeps
/// the verifier's work small; a byte of another option's data that happens to read 0x83 or 0x89
/// makes a false positive, which only ever drops (options are all but unused on TCP/UDP/ICMP).
#[inline(always)]
fn ipv4_source_routed(ctx: &SkBuff, off: usize, len: usize) -> bool {
    const MAX_OPTIONS: usize = 40;
    // Words, zeroed by volatile stores: a `[0u8; 40]` becomes a byte-by-byte `memset` call that
    // 6.1's verifier walks at length (see `policy::block_in_force`).
    let mut words = core::mem::MaybeUninit::<[u32; MAX_OPTIONS / 4]>::uninit();
    let buf: *mut u8 = words.as_mut_ptr().cast();
    // SAFETY: the local buffer holds MAX_OPTIONS / 4 words.
    unsafe { policy::zero_u32s::<{ MAX_OPTIONS / 4 }>(buf.cast()) };
    if len == 0 || len > MAX_OPTIONS {
        return len != 0;
    }
    // The raw helper: aya's `load_bytes` clamps the length to the packet, which loses the
    // non-zero lower bound the verifier needs.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(ctx.skb.cast(), off as u32, buf.cast(), len as u32)
    };
    if rc != 0 {
        return true;
    }
    let mut i = 0;
    while i < MAX_OPTIONS {
        // SAFETY: i < MAX_OPTIONS, within the zeroed buffer.
        let b = unsafe { *buf.add(i) };
        if i < len && (b == IPOPT_LSRR || b == IPOPT_SSRR) {
            return true;
        }
        i += 1;
    }
    false
}

/// IPv6 extension headers a packet may carry before its transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked at most (bounded for the verifier); more is treated as no L4.
const MAX_IPV6_EXT: usize = 6;

/// Where the IPv6 extension headers end.
struct Ipv6Walk {
    /// The transport protocol.
    next: u8,
    /// Where its header starts.
    end: usize,
    /// Whether it is there at all (a non-first fragment carries none).
    has_l4: bool,
    /// A routing header was on the way.
    routed: bool,
}

/// The state of the IPv6 extension walk, on the caller's stack (`bpf_loop`'s context).
#[repr(C)]
struct Ipv6WalkCtx {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    off: u64,
    next: u8,
    /// `WALK_*`.
    state: u8,
    routed: u8,
}

const WALK_ON: u8 = 0;
const WALK_L4: u8 = 1;
const WALK_NO_L4: u8 = 2;
const WALK_ERROR: u8 = 3;

/// Walks IPv6 extension headers from `off` to the transport header, one header per iteration of
/// a `bpf_loop` callback: unrolled, every way out of every iteration reached the rest of the
/// program as a state of its own, which took 6.1's verifier past its 1M-instruction limit.
#[inline(always)]
fn skip_ipv6_extensions(ctx: &SkBuff, next: u8, off: usize) -> Option<Ipv6Walk> {
    let mut w = Ipv6WalkCtx {
        skb: ctx.skb,
        off: off as u64,
        next,
        state: WALK_ON,
        routed: 0,
    };
    // SAFETY: a static callback and a context on this stack, as bpf_loop requires.
    unsafe {
        bpf_loop(
            MAX_IPV6_EXT as u32,
            ipv6_walk_callback as *mut c_void,
            &mut w as *mut Ipv6WalkCtx as *mut c_void,
            0,
        )
    };
    // SAFETY: bpf_loop has returned; the context is this function's again.
    let (state, next, off, routed) = unsafe {
        (
            read_volatile(&w.state),
            read_volatile(&w.next),
            read_volatile(&w.off),
            read_volatile(&w.routed),
        )
    };
    if state == WALK_ERROR {
        return None;
    }
    Some(Ipv6Walk {
        next,
        end: off as usize,
        // Headers left after MAX_IPV6_EXT: treated as no L4.
        has_l4: state == WALK_L4,
        routed: routed != 0,
    })
}

/// One IPv6 extension header, as a `bpf_loop` callback: 1 (stop) once the walk is over.
#[inline(never)]
extern "C" fn ipv6_walk_callback(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Ipv6WalkCtx` `skip_ipv6_extensions` passed, alive for the whole loop.
    let w = unsafe { &mut *(ctx as *mut Ipv6WalkCtx) };
    let skb = SkBuff { skb: w.skb };
    let off = w.off as usize;
    let next = w.next;
    if next == IPV6_ROUTING {
        w.routed = 1;
    }
    match next {
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => match skb.load::<[u8; 2]>(off) {
            Ok(hdr) => {
                w.next = hdr[0];
                w.off = (off + (hdr[1] as usize + 1) * 8) as u64;
                0
            }
            Err(_) => {
                w.state = WALK_ERROR;
                1
            }
        },
        IPV6_AH => match skb.load::<[u8; 2]>(off) {
            Ok(hdr) => {
                w.next = hdr[0];
                w.off = (off + (hdr[1] as usize + 2) * 4) as u64;
                0
            }
            Err(_) => {
                w.state = WALK_ERROR;
                1
            }
        },
        IPV6_FRAGMENT => match skb.load::<[u8; 4]>(off) {
            Ok(hdr) => {
                w.next = hdr[0];
                w.off = (off + 8) as u64;
                let frag_off = u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8;
                if frag_off != 0 {
                    w.state = WALK_NO_L4;
                    1
                } else {
                    0
                }
            }
            Err(_) => {
                w.state = WALK_ERROR;
                1
            }
        },
        _ => {
            w.state = WALK_L4;
            1
        }
    }
}

#[inline(always)]
fn report(p: &Parsed, rule_id: u32, audit: bool, generation: u32, cgroup_id: u64) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            // Field by field, the zero ones as volatile words: a struct literal's zero runs
            // become byte-by-byte `memset` calls that 6.1's verifier walks at length (see
            // `policy::block_in_force`).
            let e: *mut Event = slot.as_mut_ptr();
            // SAFETY: `e` is the reserved 80-byte record; every byte of it is written.
            unsafe {
                addr_of_mut!((*e).ts_ns).write(bpf_ktime_get_boot_ns());
                addr_of_mut!((*e).cgroup_id).write(cgroup_id);
                // pid, tgid, uid, gid.
                const _: () = assert!(TGID_UNATTRIBUTED == 0);
                policy::zero_u32s::<4>(addr_of_mut!((*e).pid));
                addr_of_mut!((*e).rule_id).write(rule_id);
                addr_of_mut!((*e).port).write(p.port);
                addr_of_mut!((*e).hook).write(HOOK_TC);
                addr_of_mut!((*e).family).write(p.family);
                addr_of_mut!((*e).protocol).write(p.protocol);
                addr_of_mut!((*e).action).write(if audit { EVENT_AUDIT } else { EVENT_DENY });
                addr_of_mut!((*e).v4_mapped).write(0);
                addr_of_mut!((*e).sock_type).write(0);
                addr_of_mut!((*e).generation).write(generation);
                addr_of_mut!((*e).addr).write(p.addr);
                policy::zero_u32s::<4>(addr_of_mut!((*e).comm).cast());
            }
            slot.submit(0);
        }
        None => count(STAT_EVENTS_LOST),
    }
}
