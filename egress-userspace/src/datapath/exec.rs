//! The exec tracker (raw tracepoint `sched_process_exec`, egress-ebpf `exec.rs`): the offsets it
//! reads kernel structures at come from the running kernel's BTF (`/sys/kernel/btf/vmlinux`),
//! read before the object is loaded; a kernel without BTF or without one of the members is
//! refused by name, never guessed at. Its link is pinned like the fork tracker's. At start the
//! controller seeds `PROCS` with the processes already running.

use std::fs;

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData},
    programs::RawTracePoint,
};
use btfparse::{Offset, Readable, TypeInformation};
use egress_common::ProcIdentity;

use super::{Datapath, DatapathError, EXEC_TRACKER, links::pin_link, program};
use crate::policy::resolve::exe_key;

/// Where the kernel publishes its own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The raw tracepoint the tracker attaches to.
const TRACEPOINT: &str = "sched_process_exec";

/// The kernel-structure members the tracker reads: (global in the object, struct, member).
const MEMBERS: [(&str, &str, &str); 7] = [
    ("OFF_BPRM_FILE", "linux_binprm", "file"),
    ("OFF_FILE_INODE", "file", "f_inode"),
    ("OFF_INODE_INO", "inode", "i_ino"),
    ("OFF_INODE_SB", "inode", "i_sb"),
    ("OFF_SB_DEV", "super_block", "s_dev"),
    ("OFF_TASK_MM", "task_struct", "mm"),
    ("OFF_MM_EXE_FILE", "mm_struct", "exe_file"),
];

/// The byte offsets of [`MEMBERS`] in the running kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExeOffsets {
    values: [u32; MEMBERS.len()],
}

/// A BTF blob in memory, as the parser reads it.
struct Blob(Vec<u8>);

impl Readable for Blob {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| {
                btfparse::Error::new(btfparse::ErrorKind::IOError, "read past the end of BTF")
            })?;
        buffer.copy_from_slice(src);
        Ok(())
    }
}

impl ExeOffsets {
    /// Reads the offsets from the running kernel's BTF.
    pub fn read() -> Result<ExeOffsets, DatapathError> {
        let err = |m: String| DatapathError::Btf(format!("{VMLINUX_BTF}: {m}"));
        let blob = fs::read(VMLINUX_BTF).map_err(|e| {
            err(format!(
                "{e} (the exec tracker needs the kernel's BTF: CONFIG_DEBUG_INFO_BTF)"
            ))
        })?;
        ExeOffsets::from_btf(blob).map_err(err)
    }

    /// The offsets in a BTF blob.
    fn from_btf(blob: Vec<u8>) -> Result<ExeOffsets, String> {
        let blob = Blob(blob);
        let types = TypeInformation::new(&blob).map_err(|e| format!("unreadable BTF: {e:?}"))?;
        let mut values = [0u32; MEMBERS.len()];
        for (slot, (_, strukt, member)) in values.iter_mut().zip(MEMBERS) {
            let id = types
                .id_of(strukt)
                .ok_or_else(|| format!("no type `struct {strukt}`"))?;
            *slot = match types.offset_of(id, member) {
                Ok((_, Offset::ByteOffset(off))) => off,
                Ok((_, Offset::BitOffsetAndSize(..))) => {
                    return Err(format!("`{strukt}.{member}` is a bit field"));
                }
                Err(e) => return Err(format!("no member `{strukt}.{member}`: {e:?}")),
            };
        }
        Ok(ExeOffsets { values })
    }

    /// Gives the program the offsets (its read-only globals).
    pub fn set_globals<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        for (value, (global, _, _)) in self.values.iter().zip(MEMBERS) {
            loader.override_global(global, value, true);
        }
        loader.override_global("EXE_OFFSETS_SET", &1u32, true);
    }
}

impl Datapath {
    /// Attaches the exec tracker (see [`Datapath::attach_fork_tracker`] for the pinned case:
    /// ours is attached first, then its pin replaces the old one, so no exec is missed).
    pub(super) fn attach_exec_tracker(&mut self) -> Result<(), DatapathError> {
        let pinned = self.pins.as_ref().map(|p| p.link(EXEC_TRACKER));
        let prog: &mut RawTracePoint = program(&mut self.ebpf, EXEC_TRACKER)?;
        let prog_err = |source| DatapathError::Program {
            name: EXEC_TRACKER,
            source,
        };
        let id = prog.attach(TRACEPOINT).map_err(prog_err)?;
        let Some(path) = pinned else {
            return Ok(());
        };
        let link = prog.take_link(id).map_err(prog_err)?;
        let fresh = path.with_file_name(format!("{EXEC_TRACKER}_new"));
        let _ = fs::remove_file(&fresh);
        pin_link(link, &fresh)?;
        fs::rename(&fresh, &path)
            .map_err(|e| DatapathError::Pin(format!("{}: {e}", path.display())))
    }

    /// Records in `PROCS` what every running process runs (`/proc/PID/exe`), without replacing
    /// what the tracker wrote (it is attached first: an exec racing with this walk is its to
    /// record). Returns how many were added. Kernel threads and processes gone meanwhile are
    /// skipped.
    pub(super) fn seed_procs(&mut self) -> usize {
        seed(&mut self.maps.procs)
    }
}

fn seed(procs: &mut HashMap<MapData, u32, ProcIdentity>) -> usize {
    const BPF_NOEXIST: u64 = 1;
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut added = 0;
    for entry in dir.filter_map(Result::ok) {
        let Some(tgid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(exe) = exe_key(&entry.path().join("exe")) else {
            continue;
        };
        if procs
            .insert(tgid, ProcIdentity { exe }, BPF_NOEXIST)
            .is_ok()
        {
            added += 1;
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_btf_has_every_member_the_tracker_reads() {
        let o = ExeOffsets::read().expect("this kernel has BTF");
        // Pointers and inode numbers are 8-byte aligned members; none is at 0 except by
        // accident of layout, and `exe_file` sits inside an anonymous struct of `mm_struct`.
        for (v, (g, _, _)) in o.values.iter().zip(MEMBERS) {
            assert_eq!(v % 4, 0, "{g} = {v}");
        }
        assert!(
            o.values[6] > 0,
            "mm_struct.exe_file found through the anonymous member"
        );
    }

    #[test]
    fn a_blob_that_is_not_btf_is_refused_with_a_message() {
        let err = ExeOffsets::from_btf(b"not btf at all".to_vec()).unwrap_err();
        assert!(err.contains("unreadable BTF"), "{err}");
    }

    #[test]
    fn seeding_records_this_process_as_stat_sees_its_executable() {
        use std::os::unix::fs::MetadataExt as _;
        let me = std::env::current_exe().unwrap();
        let k = exe_key(std::path::Path::new("/proc/self/exe")).unwrap();
        assert_eq!(k.ino, fs::metadata(&me).unwrap().ino());
    }
}
