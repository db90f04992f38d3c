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

use aya_ebpf::programs::SockContext;
use egress_common::{
    HOOK_SOCK_CREATE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MODE_AUDIT,
    RULE_SOCKETS, SOCK_ALLOW, SOCK_AUDIT, SOCK_POLICY, SOCKETS_ICMP, SOCKETS_OTHER, SOCKETS_RAW,
};

use crate::{
    policy,
    report::{self, Refusal},
};

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
    report::refused(
        Refusal {
            rule_id: RULE_SOCKETS + class as u32,
            hook: HOOK_SOCK_CREATE,
            family: if family == AF_INET6 { 6 } else { 4 },
            protocol: protocol as u8,
            port: 0,
            addr: [0; 16],
            v4_mapped: 0,
            sock_type: ty as u8,
        },
        audit,
        cfg.generation,
    );
    if audit { CREATE } else { REFUSE }
}
