//! Break-glass exceptions (`egress allow`): where the policy refuses a connect/sendmsg, a live
//! exception of the calling process (tgid), of its real user (uid) or of one of its cgroups
//! (the cgroup named, or any below it) towards the destination lets it through. Consulted
//! only on the deny path and only when `Config::exceptions` says entries exist, so allowed
//! calls and hosts without exceptions pay nothing. The expiry is each slot's, checked here
//! against CLOCK_BOOTTIME: an exception ends on time even when no controller runs.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
    },
    maps::lpm_trie::Key,
};
use egress_common::{
    EXC_CGROUP, EXC_MAX_CG_LEVEL, EXC_PROCESS, EXC_SCOPE_BITS, EXC_USER, ExceptionKey,
};

use crate::maps::EXCEPTIONS;

/// The id of a live exception covering the caller for this destination, else 0. `family` 4
/// (address in the first 4 bytes) or 6; `cg_levels`: `Config::exc_cg_levels`.
///
/// Not inlined: its key (36 bytes) lives in its own frame, and the verifier walks its body
/// once per call site rather than once per path through the whole decision.
#[inline(never)]
pub fn excepted(cg_levels: u32, family: u8, addr: &[u8; 16], port: u16, proto: u8) -> u32 {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let bits = EXC_SCOPE_BITS + if family == 4 { 32 } else { 128 };
    let mut key = Key::new(
        bits,
        ExceptionKey {
            kind: EXC_PROCESS,
            family,
            _pad: [0; 6],
            scope_id: bpf_get_current_pid_tgid() >> 32,
            addr: *addr,
        },
    );
    if let Some(id) = lookup(&key, now, port, proto) {
        return id;
    }
    key.data.kind = EXC_USER;
    key.data.scope_id = u64::from(bpf_get_current_uid_gid() as u32);
    if let Some(id) = lookup(&key, now, port, proto) {
        return id;
    }
    key.data.kind = EXC_CGROUP;
    let mut level = 0;
    while level <= EXC_MAX_CG_LEVEL {
        if cg_levels >> level == 0 {
            break;
        }
        if cg_levels & (1 << level) != 0 {
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id != 0 {
                key.data.scope_id = id;
                if let Some(id) = lookup(&key, now, port, proto) {
                    return id;
                }
            }
        }
        level += 1;
    }
    0
}

#[inline(always)]
fn lookup(key: &Key<ExceptionKey>, now: u64, port: u16, proto: u8) -> Option<u32> {
    EXCEPTIONS.get(key)?.allows(now, port, proto)
}
