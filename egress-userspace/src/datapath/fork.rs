//! The fork tracker: the tracepoint program that records, in `BLOCK_TREE`, the processes blocked
//! processes create (see egress-ebpf `fork.rs`). Its record layout comes from the tracepoint's
//! `format` in tracefs, read before the object is loaded; its link is pinned like the hooks'.

use std::fs;

use aya::{EbpfLoader, programs::TracePoint};

use super::{Datapath, DatapathError, FORK_TRACKER, links::pin_link, program};
use crate::sys::tracefs;

/// The tracepoint the tracker attaches to.
const CATEGORY: &str = "task";
const EVENT: &str = "task_newtask";

/// Where the tracker finds its fields in the tracepoint's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewTaskLayout {
    /// The new task's pid (4 bytes).
    pid: u32,
    /// Its clone flags (8 bytes).
    clone_flags: u32,
}

impl NewTaskLayout {
    /// Reads the layout from tracefs (mounting it if needed).
    pub fn read() -> Result<NewTaskLayout, DatapathError> {
        let err = |m: String| DatapathError::Tracepoint(format!("{CATEGORY}/{EVENT}: {m}"));
        let dir = tracefs::ensure_mounted().map_err(|e| err(e.to_string()))?;
        let fields = tracefs::format(&dir, CATEGORY, EVENT).map_err(|e| err(e.to_string()))?;
        NewTaskLayout::from_fields(&fields).map_err(err)
    }

    /// The layout in `fields`, if it has the fields with the sizes the tracker reads.
    fn from_fields(
        fields: &std::collections::HashMap<String, tracefs::Field>,
    ) -> Result<NewTaskLayout, String> {
        let field = |name: &str, size: u32| match fields.get(name) {
            Some(f) if f.size == size => Ok(f.offset),
            Some(f) => Err(format!(
                "field `{name}` is {} bytes, the fork tracker reads {size}",
                f.size
            )),
            None => Err(format!("the record has no field `{name}`")),
        };
        Ok(NewTaskLayout {
            pid: field("pid", 4)?,
            clone_flags: field("clone_flags", 8)?,
        })
    }

    /// Gives the program the offsets (its read-only globals).
    pub fn set_globals<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader.override_global("NEWTASK_PID_OFFSET", &self.pid, true);
        loader.override_global("NEWTASK_FLAGS_OFFSET", &self.clone_flags, true);
    }
}

impl Datapath {
    /// Attaches the fork tracker. A tracepoint link cannot be given another program in place
    /// (BPF_LINK_UPDATE is for cgroup, TCX and XDP links), so over a link a previous controller
    /// pinned, ours is attached first and its pin then replaces the old one (rename): for a
    /// moment both run, and no task created meanwhile is missed.
    pub(super) fn attach_fork_tracker(&mut self) -> Result<(), DatapathError> {
        let pinned = self.pins.as_ref().map(|p| p.link(FORK_TRACKER));
        let prog: &mut TracePoint = program(&mut self.ebpf, FORK_TRACKER)?;
        let prog_err = |source| DatapathError::Program {
            name: FORK_TRACKER,
            source,
        };
        let id = prog.attach(CATEGORY, EVENT).map_err(prog_err)?;
        let Some(path) = pinned else {
            return Ok(());
        };
        let link = prog.take_link(id).map_err(prog_err)?;
        // bpffs refuses names with a dot.
        let fresh = path.with_file_name(format!("{FORK_TRACKER}_new"));
        let _ = fs::remove_file(&fresh);
        pin_link(link, &fresh)?;
        fs::rename(&fresh, &path)
            .map_err(|e| DatapathError::Pin(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_comes_from_the_format_and_a_missing_or_resized_field_is_refused() {
        let text = "format:\n\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n";
        let fields = tracefs::parse_format(text);
        assert_eq!(
            NewTaskLayout::from_fields(&fields),
            Ok(NewTaskLayout {
                pid: 8,
                clone_flags: 32
            })
        );
        let narrow = text.replace("offset:32;\tsize:8", "offset:28;\tsize:4");
        let err = NewTaskLayout::from_fields(&tracefs::parse_format(&narrow)).unwrap_err();
        assert!(err.contains("`clone_flags` is 4 bytes"), "{err}");
        let none = text.replace("pid_t pid;", "pid_t child;");
        let err = NewTaskLayout::from_fields(&tracefs::parse_format(&none)).unwrap_err();
        assert!(err.contains("no field `pid`"), "{err}");
    }
}
