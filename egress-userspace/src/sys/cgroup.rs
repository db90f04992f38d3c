//! cgroup v2 plumbing: finding (or mounting) the cgroup2 hierarchy, and child cgroups that are
//! removed when dropped.

use std::{
    fs,
    io::{self, Write as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rustix::{
    mount::MountFlags,
    process::{Pid, Signal, kill_process},
};

/// Where we mount cgroup2 ourselves when the host has it nowhere (as Cilium does).
const OWN_MOUNT: &str = "/run/egress/cgroup2";

/// The cgroup2 mount points listed in a `/proc/mounts` text.
pub fn cgroup2_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
        })
        .collect()
}

/// `/proc/mounts` escapes spaces and a few other bytes as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup2 mount point listed in /proc/mounts, if any. No side effects: safe on any
/// path (alerts, status).
pub fn find_cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    cgroup2_mounts(&mounts).into_iter().next()
}

/// The root of the cgroup2 hierarchy. When none is mounted (a container without it, a mount
/// namespace that hides it), mounts cgroup2 at `/run/egress/cgroup2` (as Cilium does): called
/// once when a controller starts.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    if let Some(p) = find_cgroup2_root() {
        return Ok(p);
    }
    fs::create_dir_all(OWN_MOUNT).with_context(|| format!("creating {OWN_MOUNT}"))?;
    rustix::mount::mount("cgroup2", OWN_MOUNT, "cgroup2", MountFlags::empty(), None)
        .map_err(io::Error::from)
        .with_context(|| {
            format!("no cgroup2 hierarchy is mounted and mounting one at {OWN_MOUNT} failed")
        })?;
    Ok(PathBuf::from(OWN_MOUNT))
}

/// The cgroup id (the directory's inode, as `bpf_get_current_cgroup_id` reports it) and level
/// (depth below the cgroup2 root, which is level 0) of `path`.
pub fn id_and_level(root: &Path, path: &Path) -> anyhow::Result<(u64, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let id = fs::metadata(path)
        .with_context(|| format!("reading cgroup {}", path.display()))?
        .ino();
    let rel = path.strip_prefix(root).with_context(|| {
        format!(
            "{} is not below the cgroup2 root {}",
            path.display(),
            root.display()
        )
    })?;
    Ok((id, rel.components().count() as u32))
}

/// Directories a [`CgroupPaths`] walks at most: naming cgroups in a report must stay cheap on a
/// host with very many.
const WALK_LIMIT: usize = 4096;

/// Finds the paths of cgroups by id, for reports (`egress grants`). Cheap ways first: the
/// cgroup of a process known to have been in it (checked by inode), then one bounded walk of the
/// enforced cgroup's subtree; a cgroup found by neither (gone, or past the walk's limit) has no
/// path. Answers are kept for the life of the value (one report).
pub struct CgroupPaths {
    root: PathBuf,
    under: PathBuf,
    found: std::collections::HashMap<u64, PathBuf>,
    walked: bool,
}

impl CgroupPaths {
    /// `root` is the cgroup2 mount, `under` the enforced cgroup (the subtree walked).
    pub fn new(root: &Path, under: &Path) -> CgroupPaths {
        CgroupPaths {
            root: root.to_path_buf(),
            under: under.to_path_buf(),
            found: std::collections::HashMap::new(),
            walked: false,
        }
    }

    /// The path of cgroup `id`; `pid`, a process that was in it.
    pub fn path(&mut self, id: u64, pid: Option<u32>) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        if !self.found.contains_key(&id)
            && let Some(rel) = pid.and_then(super::proc::cgroup_of)
        {
            let p = self.root.join(rel.trim_start_matches('/'));
            if fs::metadata(&p).is_ok_and(|m| m.ino() == id) {
                self.found.insert(id, p);
            }
        }
        if !self.found.contains_key(&id) && !self.walked {
            self.walked = true;
            self.walk();
        }
        self.found.get(&id).map(|p| p.display().to_string())
    }

    fn walk(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let mut todo = vec![self.under.clone()];
        let mut seen = 0;
        while let Some(dir) = todo.pop() {
            seen += 1;
            if seen > WALK_LIMIT {
                break;
            }
            if let Ok(m) = fs::metadata(&dir) {
                self.found.entry(m.ino()).or_insert_with(|| dir.clone());
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            todo.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

/// A child cgroup that we created, removed (after killing anything left in it) on drop.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl ChildCgroup {
    /// Creates `<parent>/<prefix>-<pid>-<seq>`.
    pub fn create(parent: &Path, prefix: &str) -> anyhow::Result<ChildCgroup> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(ChildCgroup { path })
    }

    /// The pid of the process that made child cgroup `name` with `prefix` (the name
    /// [`ChildCgroup::create`] gives: `<prefix>-<pid>-<seq>`).
    pub fn creator(name: &str, prefix: &str) -> Option<u32> {
        name.strip_prefix(prefix)?
            .strip_prefix('-')?
            .split('-')
            .next()?
            .parse()
            .ok()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An fd of `cgroup.procs`, opened for writing. A forked child writes "0" to it before exec to
    /// join the cgroup (async-signal-safe, so it can be done in `pre_exec`).
    pub fn procs_fd(&self) -> anyhow::Result<OwnedFd> {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", self.path.display()))?;
        Ok(f.into())
    }

    /// Kills every process in the cgroup and waits (up to 5 s) until it is empty.
    pub fn kill_all_and_wait(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if !populated(&self.path) || Instant::now() >= deadline {
                return;
            }
            kill_all(&self.path);
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills every process left in the cgroup and removes it.
    pub fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                        && Instant::now() < deadline =>
                {
                    kill_all(&self.path);
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether a process is in the cgroup at `path` or below it (false when it does not exist).
pub fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// `cgroup.kill` (Linux 5.14) where it exists, else SIGKILL to each listed pid.
fn kill_all(path: &Path) {
    if fs::OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok()
    {
        return;
    }
    if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs
            .lines()
            .filter_map(|l| Pid::from_raw(l.trim().parse().ok()?))
        {
            let _ = kill_process(pid, Signal::KILL);
        }
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(cgroup = %self.path.display(), error = %e, "could not remove cgroup");
        }
    }
}

/// Joins the cgroup whose `cgroup.procs` is open as `fd`. Only async-signal-safe calls: usable
/// between fork and exec.
pub fn join_in_child(fd: &OwnedFd) -> io::Result<()> {
    match rustix::io::write(fd, b"0")? {
        1 => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk finds a directory below the enforced one by its inode (any directory has one:
    /// a plain tree stands in for cgroup2), and nothing outside it.
    #[test]
    fn cgroup_paths_are_found_by_inode_below_the_enforced_cgroup() {
        use std::os::unix::fs::MetadataExt as _;
        let base = std::env::temp_dir().join(format!("egress-cgpaths-{}", std::process::id()));
        let deep = base.join("enforced/a/b");
        let outside = base.join("other");
        fs::create_dir_all(&deep).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let mut paths = CgroupPaths::new(&base, &base.join("enforced"));
        assert_eq!(
            paths.path(ino(&deep), None),
            Some(deep.display().to_string())
        );
        assert_eq!(paths.path(ino(&outside), None), None);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mounts(hybrid),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mounts(unified),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert!(cgroup2_mounts("proc /proc proc rw 0 0\n").is_empty());
    }

    #[test]
    fn levels_count_components_below_the_root() {
        let root = Path::new("/");
        assert_eq!(id_and_level(root, Path::new("/")).unwrap().1, 0);
        assert_eq!(id_and_level(root, Path::new("/tmp")).unwrap().1, 1);
        assert!(id_and_level(Path::new("/proc"), Path::new("/tmp")).is_err());
    }

    #[test]
    fn a_child_cgroup_names_its_creator() {
        assert_eq!(
            ChildCgroup::creator("egress-exec-4321-3", "egress-exec"),
            Some(4321)
        );
        assert_eq!(
            ChildCgroup::creator("egress-test-12-0", "egress-exec"),
            None
        );
        assert_eq!(ChildCgroup::creator("egress-exec-x-0", "egress-exec"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let m = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mounts(m), vec![PathBuf::from("/mnt/my cg")]);
    }
}
