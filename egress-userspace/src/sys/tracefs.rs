//! tracefs: where the kernel describes its tracepoints. The fork tracker's record layout is read
//! from the tracepoint's `format` file rather than assumed, and tracefs is mounted at
//! `/sys/kernel/tracing` when no one has (as bpffs is for the pins).

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

/// Where tracefs is looked for, in the order aya looks (it attaches tracepoints through the
/// first that is populated).
const MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

fn populated(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// The tracefs directory, mounting tracefs at `/sys/kernel/tracing` if nothing is mounted.
pub fn ensure_mounted() -> io::Result<PathBuf> {
    if let Some(dir) = MOUNTS.iter().map(Path::new).find(|d| populated(d)) {
        return Ok(dir.to_path_buf());
    }
    let dir = Path::new(MOUNTS[0]);
    rustix::mount::mount(
        "tracefs",
        dir,
        "tracefs",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        c"",
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("mounting tracefs at {}: {e}", dir.display()),
        )
    })?;
    Ok(dir.to_path_buf())
}

/// The fields of a tracepoint's record, by name, from its `format` file's text.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    text.lines()
        .filter_map(|line| {
            // `\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;`
            let mut parts = line.trim().split(';').map(str::trim);
            let decl = parts.next()?.strip_prefix("field:")?;
            let name = decl.rsplit(' ').next()?;
            let name = name.split('[').next()?.to_string();
            let mut offset = None;
            let mut size = None;
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            Some((
                name,
                Field {
                    offset: offset?,
                    size: size?,
                },
            ))
        })
        .collect()
}

/// The fields of tracepoint `category/name`.
pub fn format(tracefs: &Path, category: &str, name: &str) -> io::Result<HashMap<String, Field>> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    Ok(parse_format(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `task/task_newtask` and `sched/sched_process_fork` of Linux 6.18.
    const NEWTASK: &str = "name: task_newtask\nID: 205\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n\tfield:short oom_score_adj;\toffset:40;\tsize:2;\tsigned:1;\n\nprint fmt: \"pid=%d comm=%s clone_flags=%llx oom_score_adj=%hd\", REC->pid, REC->comm, REC->clone_flags, REC->oom_score_adj\n";
    const FORK: &str = "format:\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";

    #[test]
    fn fields_are_read_with_their_offsets_and_sizes() {
        let f = parse_format(NEWTASK);
        assert_eq!(f["pid"], Field { offset: 8, size: 4 });
        assert_eq!(
            f["clone_flags"],
            Field {
                offset: 32,
                size: 8
            }
        );
        assert_eq!(
            f["comm"],
            Field {
                offset: 12,
                size: 16
            }
        );
        assert_eq!(f["common_pid"], Field { offset: 4, size: 4 });
        let f = parse_format(FORK);
        assert_eq!(
            f["parent_pid"],
            Field {
                offset: 12,
                size: 4
            }
        );
        assert_eq!(
            f["child_pid"],
            Field {
                offset: 20,
                size: 4
            }
        );
        assert_eq!(
            f["child_comm"],
            Field {
                offset: 16,
                size: 4
            }
        );
        assert!(parse_format("print fmt: \"x\"").is_empty());
    }
}
