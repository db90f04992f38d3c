//! Who a process runs: the exec tracker (raw tracepoint `sched_process_exec`) records, in
//! `PROCS`, the identity (device, inode) of the file every process execs, before the new image
//! runs a single instruction: the first connect after `execve` is judged as the new program.
//! The fork tracker (`fork.rs`) copies the entry to the processes it creates, so a reused pid
//! never inherits a stale identity. A process with no entry (started before the controller and
//! missed by its seeding, or evicted) is read directly from `current->mm->exe_file`.
//!
//! Kernel structures are read with `bpf_probe_read_kernel` at offsets the controller takes from
//! the running kernel's BTF at load time (`EbpfLoader::override_global`); until it sets
//! `EXE_OFFSETS_SET`, nothing is read and every identity is unknown (all zero).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    programs::RawTracePointContext,
};
use egress_common::{ExeKey, ProcIdentity};

use crate::maps::PROCS;

/// 1 once the controller has set the offsets below from BTF.
#[unsafe(no_mangle)]
static EXE_OFFSETS_SET: u32 = 0;
/// `struct linux_binprm`: `file`.
#[unsafe(no_mangle)]
static OFF_BPRM_FILE: u32 = 0;
/// `struct file`: `f_inode`.
#[unsafe(no_mangle)]
static OFF_FILE_INODE: u32 = 0;
/// `struct inode`: `i_ino`, `i_sb`.
#[unsafe(no_mangle)]
static OFF_INODE_INO: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_SB: u32 = 0;
/// `struct super_block`: `s_dev`.
#[unsafe(no_mangle)]
static OFF_SB_DEV: u32 = 0;
/// `struct task_struct`: `mm`; `struct mm_struct`: `exe_file`.
#[unsafe(no_mangle)]
static OFF_TASK_MM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_MM_EXE_FILE: u32 = 0;

#[inline(always)]
fn global(v: &'static u32) -> u64 {
    // SAFETY: a read of a read-only global the loader set.
    u64::from(unsafe { read_volatile(addr_of!(*v)) })
}

#[inline(always)]
fn read_u64(at: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_kernel(at as *const u64) }.ok()
}

/// The identity of the file behind a `struct file *`.
#[inline(always)]
fn file_identity(file: u64) -> Option<ExeKey> {
    if file == 0 {
        return None;
    }
    let inode = read_u64(file + global(&OFF_FILE_INODE))?;
    if inode == 0 {
        return None;
    }
    let ino = read_u64(inode + global(&OFF_INODE_INO))?;
    let sb = read_u64(inode + global(&OFF_INODE_SB))?;
    if sb == 0 {
        return None;
    }
    // SAFETY: as above.
    let dev = unsafe { bpf_probe_read_kernel((sb + global(&OFF_SB_DEV)) as *const u32) }.ok()?;
    Some(ExeKey { dev, _pad: 0, ino })
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: fires
/// in the exec'ing task after the point of no return (the old image is gone, tgid == pid),
/// before it returns to user space.
pub fn sched_process_exec(ctx: &RawTracePointContext) -> i32 {
    if global(&EXE_OFFSETS_SET) == 0 {
        return 0;
    }
    let bprm: u64 = ctx.arg(2);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let identity = match read_u64(bprm + global(&OFF_BPRM_FILE)).and_then(file_identity) {
        Some(exe) => ProcIdentity { exe },
        // Unreadable: the entry must not keep the previous image's identity.
        None => {
            let _ = PROCS.remove(tgid);
            return 0;
        }
    };
    let _ = PROCS.insert(tgid, identity, 0);
    0
}

/// The executable of the calling process: its `PROCS` entry, else `current->mm->exe_file`.
/// Unknown: all zero (no `executables` selector matches it).
#[inline(always)]
pub fn current_exe() -> ExeKey {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(p) = unsafe { PROCS.get(tgid) } {
        return p.exe;
    }
    if global(&EXE_OFFSETS_SET) == 0 {
        return ExeKey::default();
    }
    let task = unsafe { bpf_get_current_task() };
    read_u64(task + global(&OFF_TASK_MM))
        .filter(|&mm| mm != 0)
        .and_then(|mm| read_u64(mm + global(&OFF_MM_EXE_FILE)))
        .and_then(file_identity)
        .unwrap_or_default()
}
