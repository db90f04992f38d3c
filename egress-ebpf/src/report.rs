//! Refusals decided in the calling task's context (the cgroup hooks: connect/sendmsg,
//! sock_create, setsockopt): counted, and reported through the `EVENTS` ring with who asked.
//! A full ring only counts the loss; the verdict never depends on it.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
};
use egress_common::{EVENT_AUDIT, EVENT_DENY, Event, STAT_AUDITED, STAT_DENIED, STAT_EVENTS_LOST};

use crate::{maps::EVENTS, sock_addr::count};

/// What was refused, and why.
pub struct Refusal {
    pub rule_id: u32,
    /// `HOOK_*`.
    pub hook: u8,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    pub port: u16,
    pub addr: [u8; 16],
    pub v4_mapped: u8,
    /// The socket type, for `HOOK_SOCK_CREATE`.
    pub sock_type: u8,
}

/// Counts a refusal (as denied, or as audited in audit mode) and reports it.
#[inline(always)]
pub fn refused(r: Refusal, audit: bool, generation: u32) {
    count(if audit { STAT_AUDITED } else { STAT_DENIED });
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
                rule_id: r.rule_id,
                port: r.port,
                hook: r.hook,
                family: r.family,
                protocol: r.protocol,
                action: if audit { EVENT_AUDIT } else { EVENT_DENY },
                v4_mapped: r.v4_mapped,
                sock_type: r.sock_type,
                generation,
                addr: r.addr,
                comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
            });
            slot.submit(0);
        }
        None => count(STAT_EVENTS_LOST),
    }
}
