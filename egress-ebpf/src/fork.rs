//! The fork tracker (tracepoint `task/task_newtask`): a process created by a process in
//! `BLOCK_TREE` (a blocked process, or one it created after its block) gets the same entry, so
//! that the byte-budget block covers it too. Forking children that each open a new connection
//! must not dodge a budget. Every new process also gets its creator's `PROCS` entry (what it
//! runs, until it execs), or loses whatever entry a previous holder of its pid left.
//!
//! The tracepoint fires in the creating task, at the end of `copy_process`, when the new task
//! can no longer fail to be created and before it can run: no connect of the child can come
//! before its entry. Threads (`CLONE_THREAD`) are skipped: they share their process's tgid,
//! which the hooks look up. The caller's tgid, not the record's pid of the creating thread,
//! names the creator, so a process forking from any of its threads is followed.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::TracePointContext};
use egress_common::STAT_TREE_FULL;

use crate::{
    maps::{BLOCK_TREE, PROCS},
    sock_addr::count,
};

/// Offsets of the record's fields `pid` (the new task's, 4 bytes) and `clone_flags` (8 bytes).
/// The controller reads them from the tracepoint's `format` in tracefs and sets them at load
/// time (`EbpfLoader::override_global`); these are the values of Linux 6.x, never used as a guess
/// (loading fails when the format does not have the fields).
#[unsafe(no_mangle)]
static NEWTASK_PID_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static NEWTASK_FLAGS_OFFSET: u32 = 32;

const CLONE_THREAD: u64 = 0x0001_0000;

pub fn task_newtask(ctx: &TracePointContext) -> u32 {
    let flags_at = unsafe { read_volatile(addr_of!(NEWTASK_FLAGS_OFFSET)) } as usize;
    // Unreadable flags: followed as a process (a thread's entry is harmless, and pruned).
    let flags: u64 = unsafe { ctx.read_at(flags_at) }.unwrap_or(0);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let pid_at = unsafe { read_volatile(addr_of!(NEWTASK_PID_OFFSET)) } as usize;
    let child = match unsafe { ctx.read_at::<i32>(pid_at) } {
        Ok(child) if child > 0 => child as u32,
        _ => {
            count(STAT_TREE_FULL);
            return 0;
        }
    };
    let creator = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The child runs what its creator runs until it execs (`exec.rs`). With no entry to copy,
    // any entry left under the child's pid by an earlier process goes.
    match unsafe { PROCS.get(creator) }.copied() {
        Some(identity) => {
            let _ = PROCS.insert(child, identity, 0);
        }
        None => {
            let _ = PROCS.remove(child);
        }
    }
    // In a map that is empty unless a block is in force, one lookup decides.
    let Some(root) = (unsafe { BLOCK_TREE.get(creator) }).copied() else {
        return 0;
    };
    if BLOCK_TREE.insert(child, root, 0).is_err() {
        count(STAT_TREE_FULL);
    }
    0
}
