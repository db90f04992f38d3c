//! `cgroup_skb/egress`: per-owner byte accounting of the enforced cgroup's sockets, whatever
//! network namespace they are in.
//!
//! The kernel runs this program for every IP packet a socket of the cgroup sends, in the
//! sender's own network namespace, after its netfilter and before fragmentation, queueing and
//! the device; so a process in a pod (its own namespace, a veth, NAT on the node) is counted
//! under its own pid and the destination it addressed, which TC on the node's interfaces cannot
//! do (the packet reaches them forwarded, without its socket). The owner comes from
//! `SOCK_OWNERS` by socket cookie, as in TC.
//!
//! The work is split with TC by that lookup: this program counts every packet of a socket with a
//! recorded owner, TC counts only packets without one (and the echo requests it judges). So a
//! packet is counted once wherever TC is attached, on the sender's veth or not at all.
//!
//! What TC would drop from such a socket is not counted here (in enforce mode): packets of a
//! process over its byte budget, packets carrying a source route, and echo requests under
//! `icmp = "policy"` (TC judges and counts those). Where TC does not see the socket (a pod behind
//! a veth, TC on the node's interfaces only), those packets leave uncounted and undropped.
//!
//! `bytes` follows `FlowValue`'s wire semantics without `wire_len` (not readable here): the IP
//! length plus, per GSO segment, the headers again and the link-layer header (from `IFACE_L2`
//! by the output device's index, Ethernet when absent). A datagram that IP fragments after this
//! hook is counted as one packet with one set of headers (its payload is exact).
//!
//! Always returns 1 (pass): this program never drops.

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SkBuffContext};
use egress_common::{FlowKey, MODE_AUDIT, SOCK_POLICY, SOCKETS_ICMP};

use crate::{
    maps::{IFACE_L2, SOCK_OWNERS},
    policy,
    tc_egress::{account, parse_ip},
};

const PASS: i32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HLEN: u32 = 14;

pub fn count(ctx: &SkBuffContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(owner) = (unsafe { SOCK_OWNERS.get(cookie) }).copied() else {
        // No recorded owner: TC counts it, as unattributed, where it is attached.
        return PASS;
    };
    // The packet starts at its IP header here (no link-layer header yet).
    let proto = match ctx.load::<u8>(0) {
        Ok(b) if b >> 4 == 4 => ETH_P_IP,
        Ok(b) if b >> 4 == 6 => ETH_P_IPV6,
        _ => return PASS,
    };
    let Some(p) = parse_ip(&ctx.skb, proto, 0) else {
        return PASS;
    };
    let cfg = policy::config();
    if cfg.mode != MODE_AUDIT
        && (p.routed || policy::budget_block(cfg, owner.tgid, p.family, &p.addr).is_some())
    {
        return PASS;
    }
    if p.echo_request && cfg.sockets[SOCKETS_ICMP] == SOCK_POLICY {
        return PASS;
    }
    let skb = ctx.skb.skb;
    let len = ctx.len();
    let (ifindex, segs) = unsafe { ((*skb).ifindex, (*skb).gso_segs) };
    let l2 = match unsafe { IFACE_L2.get(ifindex) } {
        Some(l) => *l,
        None => ETH_HLEN,
    };
    // Every segment after the first repeats the IP and transport headers (what the kernel's
    // `qdisc_pkt_len_init` adds into `wire_len` at TC), and each has its link-layer header.
    let headers = len.saturating_sub(p.payload);
    let extra = segs.saturating_sub(1);
    let bytes = len as u64 + l2 as u64 + extra as u64 * (headers as u64 + l2 as u64);
    let key = FlowKey {
        cgroup_id: owner.cgroup_id,
        tgid: owner.tgid,
        port: p.port,
        protocol: p.protocol,
        family: p.family,
        addr: p.addr,
    };
    account(&key, bytes, p.payload as u64);
    PASS
}
