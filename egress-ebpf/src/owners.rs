//! Socket owners: who owns a socket, kept in `SOCK_OWNERS` by socket cookie for as long as the
//! socket can send, so that TC can attribute packets sent in softirq context.
//!
//! The map is a plain hash, not an LRU: a flood of short-lived sockets must never evict the
//! owner of a live one (which would turn its upload into unattributed traffic that escapes
//! per-process budgets and alerts). So every entry is deleted when its socket is done:
//! - UDP, ping and every other non-TCP socket at `cgroup/sock_release` (close of the last file
//!   reference): such a socket sends only from its own syscalls, which are over by then;
//! - TCP at the move to `TCP_CLOSE` (a `sock_ops` state callback): a TCP socket keeps sending
//!   what is in its send buffer, and its FIN, after `close()`; deleting at release would leave
//!   that tail (megabytes, at the socket's choice) unattributed. A TCP socket that is already
//!   closed (or only listening) at release is deleted there.
//!
//! When an owner cannot be recorded (the map is full, or the kernel could not allocate) the hook
//! fails closed: see `sock_addr::finish`.
//!
//! The owner's process name also goes to `PROC_COMMS` (by tgid), which outlives the sockets: the
//! controller names a process that exited between two of its readings from there.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_LISTEN,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie,
    },
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use egress_common::{IPPROTO_TCP, Owner};

use crate::maps::{PROC_COMMS, SOCK_OWNERS};

/// Remembers who owns the hook's socket, so that TC can attribute its packets. The current task
/// is the caller of connect()/sendmsg() here, unlike in TC. False when the owner could not be
/// recorded (and is not already): the socket's packets would go unattributed.
#[inline(always)]
pub fn record(ctx: &SockAddrContext) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // One hash lookup on the hot path; the update only when the owner is new or changed.
    if let Some(o) = unsafe { SOCK_OWNERS.get(cookie) }
        && o.tgid == tgid
    {
        return true;
    }
    let uid_gid = bpf_get_current_uid_gid();
    let owner = Owner {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    };
    // The name outlives the sockets, for reports on processes that exit between two readings.
    if unsafe { PROC_COMMS.get(tgid) } != Some(&owner.comm) {
        let _ = PROC_COMMS.insert(tgid, owner.comm, 0);
    }
    // A full preallocated hash refuses a new key (E2BIG); replacing an existing key never fails.
    SOCK_OWNERS.insert(cookie, owner, 0).is_ok()
}

/// `cgroup/sock_release`: the socket's last file reference is closed. Forgets its owner, except
/// for a TCP socket that can still send (its owner goes at `TCP_CLOSE`, in [`sock_ops`]).
/// Always 1: a release cannot be refused.
#[inline(always)]
pub fn released(ctx: &SockContext) -> i32 {
    let (protocol, state) = unsafe {
        let sk = ctx.sock;
        (
            read_volatile(addr_of!((*sk).protocol)),
            read_volatile(addr_of!((*sk).state)),
        )
    };
    let tcp_sends_on =
        protocol == IPPROTO_TCP as u32 && state != BPF_TCP_CLOSE && state != BPF_TCP_LISTEN;
    if !tcp_sends_on {
        forget(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
    }
    1
}

/// `sockops`: asks for state callbacks on every TCP socket that connects, and forgets the owner
/// when the socket reaches `TCP_CLOSE` (nothing of it is sent after that). Always 1.
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        // The connect hook has just recorded the owner (it runs before tcp_connect). Other
        // programs' flags are kept.
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
        }
        // args[0] is the old state, args[1] the new one.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            forget(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
        }
        _ => {}
    }
    1
}

/// Deletes the owner of socket `cookie`, if one is recorded.
#[inline(always)]
fn forget(cookie: u64) {
    let _ = SOCK_OWNERS.remove(cookie);
}
