//! cgroup v2 plumbing: finding (or mounting) the cgroup2 hierarchy, and child cgroups that are
//! removed when dropped.

use std::{
    fs,
    io::{self, Write as _},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

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

/// The root of the cgroup2 hierarchy, from /proc/mounts. When none is mounted (a container
/// without it, a mount namespace that hides it), mounts cgroup2 at `/run/egress/cgroup2`.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if let Some(p) = cgroup2_mounts(&mounts).into_iter().next() {
        return Ok(p);
    }
    fs::create_dir_all(OWN_MOUNT).with_context(|| format!("creating {OWN_MOUNT}"))?;
    let target = std::ffi::CString::new(OWN_MOUNT).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "no cgroup2 hierarchy is mounted and mounting one at {OWN_MOUNT} failed: {}",
            io::Error::last_os_error()
        );
    }
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
            let populated = fs::read_to_string(self.path.join("cgroup.events"))
                .map(|e| e.lines().any(|l| l.trim() == "populated 1"))
                .unwrap_or(false);
            if !populated || Instant::now() >= deadline {
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
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    kill_all(&self.path);
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }
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
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
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
    // SAFETY: write(2) of a static buffer to a valid fd.
    let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unescapes_octal_in_mount_points() {
        let m = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mounts(m), vec![PathBuf::from("/mnt/my cg")]);
    }
}
