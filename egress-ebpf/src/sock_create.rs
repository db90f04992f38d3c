//! The cgroup sock_create hook: in an enforced cgroup, sockets the connect/sendmsg hooks cannot
//! judge are refused at creation, per the policy's `[sockets]`: raw IP sockets, ping sockets
//! (unless `icmp = "policy"`, which judges their destinations), and every other IP protocol
//! (SCTP, UDP-Lite, MPTCP, ...). TCP and UDP sockets are always created: their destinations are
//! judged at connect/sendmsg.
//!
//! The kernel runs this hook for AF_INET and AF_INET6 sockets only; AF_PACKET never reaches a
//! cgroup hook (see the README's threat model).
//!
//! Return values: 1 lets the socket be created, 0 makes socket() fail with EPERM.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
    },
    programs::SockContext,
};
use egress_common::{
    EVENT_AUDIT, EVENT_DENY, Event, HOOK_SOCK_CREATE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, MODE_AUDIT, RULE_SOCKETS, SOCK_ALLOW, SOCK_AUDIT, SOCK_POLICY, SOCKETS_ICMP,
    SOCKETS_OTHER, SOCKETS_RAW, STAT_AUDITED, STAT_DENIED, STAT_EVENTS_LOST,
};

use crate::{maps::EVENTS, policy, sock_addr::count};

const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;

const CREATE: i32 = 1;
const REFUSE: i32 = 0;

/// The `[sockets]` class of a socket, or None for TCP and UDP.
#[inline(always)]
fn class(ty: u32, protocol: u32) -> Option<usize> {
    match ty {
        SOCK_STREAM if protocol == 0 || protocol == IPPROTO_TCP as u32 => None,
        SOCK_DGRAM if protocol == 0 || protocol == IPPROTO_UDP as u32 => None,
        SOCK_DGRAM if protocol == IPPROTO_ICMP as u32 || protocol == IPPROTO_ICMPV6 as u32 => {
            Some(SOCKETS_ICMP)
        }
        SOCK_RAW => Some(SOCKETS_RAW),
        _ => Some(SOCKETS_OTHER),
    }
}

pub fn sock_create(ctx: &SockContext) -> i32 {
    let (family, ty, protocol) = unsafe {
        let sk = ctx.sock;
        ((*sk).family, (*sk).type_, (*sk).protocol)
    };
    let Some(class) = class(ty, protocol) else {
        return CREATE;
    };
    let cfg = policy::config();
    // Constant indices only: a variable index into the config copy on the stack compiles to
    // pointer arithmetic the verifier refuses.
    let what = match class {
        SOCKETS_RAW => cfg.sockets[SOCKETS_RAW],
        SOCKETS_ICMP => cfg.sockets[SOCKETS_ICMP],
        _ => cfg.sockets[SOCKETS_OTHER],
    };
    if what == SOCK_ALLOW || what == SOCK_POLICY {
        return CREATE;
    }
    // The policy's mode is the global switch: in audit mode nothing is refused.
    let audit = what == SOCK_AUDIT || cfg.mode == MODE_AUDIT;
    count(if audit { STAT_AUDITED } else { STAT_DENIED });
    report(
        if family == AF_INET6 { 6 } else { 4 },
        ty as u8,
        protocol as u8,
        RULE_SOCKETS + class as u32,
        audit,
        cfg.generation,
    );
    if audit { CREATE } else { REFUSE }
}

#[inline(always)]
fn report(family: u8, sock_type: u8, protocol: u8, rule_id: u32, audit: bool, generation: u32) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            let pid_tgid = bpf_get_current_pid_tgid();
            let uid_gid = bpf_get_current_uid_gid();
            slot.write(Event {
                ts_ns: unsafe { bpf_ktime_get_boot_ns() },
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                pid: pid_tgid as u32,
                tgid: (pid_tgid >> 32) as u32,
                uid: uid_gid as u32,
                gid: (uid_gid >> 32) as u32,
                rule_id,
                port: 0,
                hook: HOOK_SOCK_CREATE,
                family,
                protocol,
                action: if audit { EVENT_AUDIT } else { EVENT_DENY },
                v4_mapped: 0,
                sock_type,
                generation,
                addr: [0u8; 16],
                comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
            });
            slot.submit(0);
        }
        None => count(STAT_EVENTS_LOST),
    }
}
