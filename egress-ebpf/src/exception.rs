//! Break-glass exceptions (`egress allow`): where the policy refuses a connect/sendmsg, a live
//! exception of the calling process (tgid), of its real user (uid) or of one of its cgroups
//! (the cgroup named, or any below it) towards the destination lets it through. Consulted
//! only on the deny path and only when `Config::exceptions` says entries exist, so allowed
//! calls and hosts without exceptions pay nothing. The end is each exception's, checked here
//! against CLOCK_BOOTTIME: an exception ends on time even when no controller runs.

use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    bpf_ktime_get_boot_ns,
};
use egress_common::{EXC_CGROUP, EXC_MAX_CG_LEVEL, EXC_PROCESS, EXC_USER, exception_scope};

use crate::maps::EXCEPTIONS;

/// The id of a live exception covering the caller for this destination, else 0. `hi`, `lo`:
/// the address's big-endian halves (`addr_halves`); `what`: port | protocol << 16 | family
/// << 24 | `Config::exc_cg_levels` << 32 (in registers: this frame sits below the decision's,
/// which leaves it 32 bytes of stack).
///
/// Not inlined: its locals live in its own frame, and the verifier walks its body once per
/// call site rather than once per path through the whole decision.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn egress_excepted(hi: u64, lo: u64, what: u64) -> u32 {
    let id = check(
        exception_scope(EXC_PROCESS, bpf_get_current_pid_tgid() >> 32),
        hi,
        lo,
        what,
    );
    if id != 0 {
        return id;
    }
    let uid = bpf_get_current_uid_gid() as u32;
    let id = check(exception_scope(EXC_USER, u64::from(uid)), hi, lo, what);
    if id != 0 {
        return id;
    }
    let levels = (what >> 32) as u32;
    let mut level = 0;
    while level <= EXC_MAX_CG_LEVEL {
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) != 0 {
            let cg = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if cg != 0 {
                let id = check(exception_scope(EXC_CGROUP, cg), hi, lo, what);
                if id != 0 {
                    return id;
                }
            }
        }
        level += 1;
    }
    0
}

#[inline(always)]
fn check(scope: u64, hi: u64, lo: u64, what: u64) -> u32 {
    let Some(list) = (unsafe { EXCEPTIONS.get(scope) }) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    list.allows(
        now,
        (what >> 24) as u8,
        hi,
        lo,
        what as u16,
        (what >> 16) as u8,
    )
    .unwrap_or(0)
}
