//! The cgroup setsockopt hook: options that change where a socket's packets go after the
//! connect/sendmsg hooks judged the destination are refused in an enforced cgroup: IPv4 source
//! routes (`IP_OPTIONS` with LSRR/SSRR) and IPv6 routing headers (`IPV6_RTHDR`, and the RFC 2292
//! forms). The kernel applies them *after* the sock_addr hooks, so the judged address would only
//! be the first hop. The cmsg forms never reach this hook: TC drops their packets.
//!
//! Return values: 1 lets the kernel handle the option, 0 makes setsockopt fail with EPERM.

use aya_ebpf::programs::SockoptContext;
use egress_common::{HOOK_SETSOCKOPT, MODE_AUDIT, RULE_SOURCE_ROUTE};

use crate::{
    policy,
    report::{self, Refusal},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_RTHDR: i32 = 57;
/// IPv4 option types that route the packet: loose and strict source route.
pub const IPOPT_LSRR: u8 = 0x83;
pub const IPOPT_SSRR: u8 = 0x89;
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
/// The most option bytes an IPv4 header carries.
const MAX_IP_OPTIONS: usize = 40;

const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

pub fn setsockopt(ctx: &SockoptContext) -> i32 {
    // An optval larger than a page is cut to a page for the program; left as it is, the kernel
    // fails the call with EFAULT (before 6.5). optlen 0 tells it to use the caller's own buffer,
    // which is what we want: we never change an option. (4096: the smallest page size.)
    let optlen = unsafe { (*ctx.sockopt).optlen };
    if optlen > 4096 {
        unsafe { (*ctx.sockopt).optlen = 0 };
    }
    let (level, optname) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
    let routes = match (level, optname) {
        (SOL_IP, IP_OPTIONS) => ip_options_route(ctx),
        // Any non-empty routing header (clearing one is fine); RFC 2292 packet options may carry
        // one as well.
        (SOL_IPV6, IPV6_RTHDR | IPV6_2292RTHDR | IPV6_2292PKTOPTIONS) => optlen > 0,
        _ => false,
    };
    if !routes {
        return PROCEED;
    }
    let cfg = policy::config();
    let audit = cfg.mode == MODE_AUDIT;
    report::refused(
        Refusal {
            rule_id: RULE_SOURCE_ROUTE,
            hook: HOOK_SETSOCKOPT,
            family: if level == SOL_IPV6 { 6 } else { 4 },
            protocol: 0,
            port: 0,
            addr: [0; 16],
            v4_mapped: 0,
            sock_type: 0,
        },
        audit,
        cfg.generation,
    );
    if audit { PROCEED } else { REFUSE }
}

/// Whether an `IP_OPTIONS` buffer holds a source route. Options are walked as the kernel walks
/// them (END stops, NOOP is one byte, others are type-length-value); a malformed buffer counts
/// as a route: the kernel would refuse it anyway.
#[inline(always)]
fn ip_options_route(ctx: &SockoptContext) -> bool {
    let start = unsafe { (*ctx.sockopt).__bindgen_anon_2.optval } as *const u8;
    let end = unsafe { (*ctx.sockopt).__bindgen_anon_3.optval_end } as *const u8;
    let mut off = 0usize;
    let mut i = 0;
    while i < MAX_IP_OPTIONS {
        if off >= MAX_IP_OPTIONS {
            return false;
        }
        let p = unsafe { start.add(off) };
        if unsafe { p.add(1) } > end {
            return false;
        }
        let kind = unsafe { *p };
        match kind {
            IPOPT_END => return false,
            IPOPT_NOOP => off += 1,
            IPOPT_LSRR | IPOPT_SSRR => return true,
            _ => {
                if unsafe { p.add(2) } > end {
                    return true;
                }
                let len = unsafe { *p.add(1) } as usize;
                if len < 2 {
                    return true;
                }
                off += len;
            }
        }
        i += 1;
    }
    false
}
