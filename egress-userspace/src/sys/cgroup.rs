//! cgroup v2 plumbing: finding (or mounting) the cgroup2 hierarchy, and child cgroups that are
//! removed when dropped.

use std::{
    fs,
    io::{self, Write as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
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

/// The host's /proc as the command line gave it (`--host-proc`; default `/proc`). Set once, before
/// anything looks for the cgroup2 root: it is a property of where this process runs (in a
/// DaemonSet, the host's /proc is mounted at /host/proc), shared by every lookup of the root.
static HOST_PROC: OnceLock<PathBuf> = OnceLock::new();

/// The default of `--host-proc`.
pub const DEFAULT_HOST_PROC: &str = "/proc";

/// Sets where the host's /proc is. Only the first call counts.
pub fn set_host_proc(dir: PathBuf) {
    let _ = HOST_PROC.set(dir);
}

fn host_proc() -> &'static Path {
    HOST_PROC.get_or_init(|| PathBuf::from(DEFAULT_HOST_PROC))
}

/// statfs(2)'s `f_type` of a cgroup2 file system.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Where a candidate for the cgroup2 root was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootSource {
    /// A cgroup2 mount of this mount namespace (/proc/self/mounts): the host's own on a plain
    /// host, or the host's /sys/fs/cgroup bind-mounted into a container.
    Mount,
    /// `<host-proc>/1/root/sys/fs/cgroup[/unified]`: the host's, through the root directory of
    /// the host's init process (as Tetragon finds it; needs ptrace access to pid 1).
    HostProc,
    /// Mounted by egress itself at /run/egress/cgroup2, nothing else being there.
    OwnMount,
}

impl std::fmt::Display for RootSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RootSource::Mount => "mount",
            RootSource::HostProc => "host-proc",
            RootSource::OwnMount => "own-mount",
        })
    }
}

/// What a candidate directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// statfs says cgroup2.
    pub cgroup2: bool,
    /// The root of the whole hierarchy (the host's), not a cgroup below it. The kernel gives
    /// every cgroup but the hierarchy's root `cgroup.type` and `cgroup.events` (CFTYPE_NOT_ON_ROOT);
    /// the root of a private cgroup namespace, or a mount made inside one, is such a cgroup.
    pub hierarchy_root: bool,
    /// The cgroup id (the directory's inode; 1 for the hierarchy's root).
    pub id: u64,
}

/// Probes `dir`, asking `is_cgroup2` whether it is on cgroup2 (statfs on the host; a stand-in in
/// tests of fake trees).
fn probe_with(dir: &Path, is_cgroup2: &dyn Fn(&Path) -> io::Result<bool>) -> io::Result<Probe> {
    use std::os::unix::fs::MetadataExt as _;
    let id = fs::metadata(dir)?.ino();
    let cgroup2 = is_cgroup2(dir)?;
    let hierarchy_root =
        cgroup2 && !dir.join("cgroup.type").exists() && !dir.join("cgroup.events").exists();
    Ok(Probe {
        cgroup2,
        hierarchy_root,
        id,
    })
}

fn statfs_is_cgroup2(dir: &Path) -> io::Result<bool> {
    let st = rustix::fs::statfs(dir).map_err(io::Error::from)?;
    // f_type is signed on glibc, unsigned on musl: compared as the kernel's bits.
    Ok(st.f_type as u64 == CGROUP2_SUPER_MAGIC)
}

/// Where the cgroup2 root may be, best first: this mount namespace's cgroup2 mounts, in
/// /proc/mounts order (on a plain host the first is the host's root: the path stays what it
/// always was), then the host's through `<host_proc>/1/root`, unified then hybrid layout.
pub fn root_candidates(mounts: &str, host_proc: &Path) -> Vec<(PathBuf, RootSource)> {
    let host = host_proc.join("1/root/sys/fs/cgroup");
    let mut out: Vec<_> = cgroup2_mounts(mounts)
        .into_iter()
        .map(|p| (p, RootSource::Mount))
        .collect();
    out.push((host.clone(), RootSource::HostProc));
    out.push((host.join("unified"), RootSource::HostProc));
    out
}

/// The outcome of looking at every candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The first candidate that is the hierarchy's root.
    pub host: Option<(PathBuf, RootSource, Probe)>,
    /// The first cgroup2 candidate, root or not (what earlier versions took).
    pub first: Option<(PathBuf, RootSource, Probe)>,
    /// Candidates passed over, and why (for the logs and the error).
    pub rejected: Vec<(PathBuf, String)>,
}

/// Looks at each candidate in turn (pure but for `probe`: unit-tested on fake trees).
pub fn select_root(
    candidates: &[(PathBuf, RootSource)],
    probe: &dyn Fn(&Path) -> io::Result<Probe>,
) -> Selection {
    let mut sel = Selection {
        host: None,
        first: None,
        rejected: Vec::new(),
    };
    for (path, source) in candidates {
        match probe(path) {
            Ok(p) if p.hierarchy_root => {
                if sel.first.is_none() {
                    sel.first = Some((path.clone(), *source, p));
                }
                sel.host = Some((path.clone(), *source, p));
                break;
            }
            Ok(p) if p.cgroup2 => {
                if sel.first.is_none() {
                    sel.first = Some((path.clone(), *source, p));
                }
                sel.rejected.push((
                    path.clone(),
                    format!(
                        "a cgroup below the hierarchy's root (cgroup id {}: a cgroup namespace's root, or a bind mount of a subtree)",
                        p.id
                    ),
                ));
            }
            Ok(_) => sel
                .rejected
                .push((path.clone(), "not a cgroup2 file system".into())),
            Err(e) => sel.rejected.push((path.clone(), e.to_string())),
        }
    }
    sel
}

/// Whether this process shares the host's cgroup namespace: `/proc/self/ns/cgroup` against
/// `<host_proc>/1/ns/cgroup` (the same namespace is the same inode of nsfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupNs {
    Host,
    Private,
    /// Could not be compared (no access to pid 1: ptrace rules), and why.
    Unknown(String),
}

pub fn cgroup_ns(self_ns: &Path, host_ns: &Path) -> CgroupNs {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| fs::metadata(p).map(|m| (m.dev(), m.ino()));
    match (id(self_ns), id(host_ns)) {
        (Ok(a), Ok(b)) if a == b => CgroupNs::Host,
        (Ok(_), Ok(_)) => CgroupNs::Private,
        (Err(e), _) => CgroupNs::Unknown(format!("{}: {e}", self_ns.display())),
        (_, Err(e)) => CgroupNs::Unknown(format!("{}: {e}", host_ns.display())),
    }
}

/// The cgroup2 root a controller enforces on, and how it was found.
#[derive(Debug, Clone)]
pub struct Cgroup2Root {
    pub path: PathBuf,
    pub id: u64,
    pub source: RootSource,
    /// The root of the whole hierarchy (the host's), not a cgroup namespace's.
    pub hierarchy_root: bool,
    pub cgroup_ns: CgroupNs,
}

/// The cgroup2 root, found with no side effects (alerts, status, policy checks): the hierarchy's
/// root (the host's) when a candidate is it, else the first cgroup2 mount, as before.
pub fn find_cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    let sel = select_root(&root_candidates(&mounts, host_proc()), &|p| {
        probe_with(p, &statfs_is_cgroup2)
    });
    sel.host.or(sel.first).map(|(p, _, _)| p)
}

/// The root of the cgroup2 hierarchy. When none is mounted (a container without it, a mount
/// namespace that hides it), mounts cgroup2 at `/run/egress/cgroup2` (as Cilium does): called
/// once when a controller starts. `egress exec` (its own child cgroup) and the tests take it as
/// it comes; `egress run` goes through [`host_cgroup2_root`].
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    if let Some(p) = find_cgroup2_root() {
        return Ok(p);
    }
    mount_own()?;
    Ok(PathBuf::from(OWN_MOUNT))
}

fn mount_own() -> anyhow::Result<()> {
    fs::create_dir_all(OWN_MOUNT).with_context(|| format!("creating {OWN_MOUNT}"))?;
    rustix::mount::mount("cgroup2", OWN_MOUNT, "cgroup2", MountFlags::empty(), None)
        .map_err(io::Error::from)
        .with_context(|| {
            format!("no cgroup2 hierarchy is mounted and mounting one at {OWN_MOUNT} failed")
        })
}

/// The host's cgroup2 root, for `egress run`: the first candidate (see [`root_candidates`]) that
/// is the root of the whole hierarchy. Inside a container with a private cgroup namespace the
/// cgroup2 mount it sees is its own cgroup: enforcing there would silently cover only the
/// container, so that is refused (an error saying how to reach the host's) unless
/// `allow_non_host` says the subtree is meant. Logs the root chosen, its cgroup id, where it was
/// found and whether the cgroup namespace is the host's.
pub fn host_cgroup2_root(allow_non_host: bool) -> anyhow::Result<Cgroup2Root> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let hp = host_proc();
    let probe = |p: &Path| probe_with(p, &statfs_is_cgroup2);
    let mut sel = select_root(&root_candidates(&mounts, hp), &probe);
    if sel.host.is_none() && sel.first.is_none() {
        mount_own()?;
        // The candidates passed over first stay named in the error.
        let mut own = select_root(&[(PathBuf::from(OWN_MOUNT), RootSource::OwnMount)], &probe);
        sel.rejected.append(&mut own.rejected);
        own.rejected = sel.rejected;
        sel = own;
    }
    let ns = cgroup_ns(Path::new("/proc/self/ns/cgroup"), &hp.join("1/ns/cgroup"));
    let decision = decide_root(sel, ns, allow_non_host, hp)?;
    for (path, why) in &decision.1 {
        tracing::debug!(candidate = %path.display(), why = %why, "cgroup2 root candidate passed over");
    }
    let root = decision.0;
    let ns_text = match &root.cgroup_ns {
        CgroupNs::Host => "host".to_string(),
        CgroupNs::Private => "private".to_string(),
        CgroupNs::Unknown(why) => format!("unknown ({why})"),
    };
    if root.hierarchy_root {
        tracing::info!(root = %root.path.display(), cgroup_id = root.id, source = %root.source, cgroup_namespace = %ns_text, "cgroup2 root: the host's hierarchy");
    } else {
        tracing::warn!(root = %root.path.display(), cgroup_id = root.id, source = %root.source, cgroup_namespace = %ns_text, "cgroup2 root: NOT the host's hierarchy (--allow-non-host-cgroup): only this subtree is enforced");
    }
    Ok(root)
}

/// The decision of [`host_cgroup2_root`] (pure: unit-tested), with the candidates passed over.
pub fn decide_root(
    sel: Selection,
    ns: CgroupNs,
    allow_non_host: bool,
    host_proc: &Path,
) -> anyhow::Result<(Cgroup2Root, Vec<(PathBuf, String)>)> {
    let make = |(path, source, p): (PathBuf, RootSource, Probe)| Cgroup2Root {
        path,
        id: p.id,
        source,
        hierarchy_root: p.hierarchy_root,
        cgroup_ns: ns.clone(),
    };
    if let Some(h) = sel.host {
        return Ok((make(h), sel.rejected));
    }
    let passed: Vec<String> = sel
        .rejected
        .iter()
        .map(|(p, why)| format!("  {}: {why}", p.display()))
        .collect();
    match sel.first {
        Some(first) if allow_non_host => Ok((make(first), sel.rejected)),
        _ => anyhow::bail!(
            "the host's cgroup2 hierarchy is not reachable from here (cgroup namespace: {}); enforcing on what is visible would cover only this container's own cgroup. Candidates:\n{}\nMount the host's /proc and pass --host-proc (it is {} now; reading <host-proc>/1/root needs CAP_SYS_PTRACE), or bind-mount the host's /sys/fs/cgroup, or share the host's cgroup namespace; --allow-non-host-cgroup enforces on the visible subtree anyway",
            match &ns {
                CgroupNs::Host => "the host's".to_string(),
                CgroupNs::Private => "private".to_string(),
                CgroupNs::Unknown(why) => format!("unknown: {why}"),
            },
            passed.join("\n"),
            host_proc.display(),
        ),
    }
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
                    remove_descendants(&self.path);
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Removes the cgroups below `path`, deepest first (a cgroup with children cannot be removed:
/// EBUSY). Their processes must be gone already (`cgroup.kill` covers the whole subtree);
/// failures are left to the caller's retry.
fn remove_descendants(path: &Path) {
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let child = entry.path();
            remove_descendants(&child);
            let _ = fs::remove_dir(&child);
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

    /// A fake tree: directories stand in for mounts; a `.cgroup2` file marks "statfs says
    /// cgroup2", and a cgroup below the hierarchy's root has `cgroup.type`, as the kernel gives it.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let base =
                std::env::temp_dir().join(format!("egress-cgroot-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&base);
            fs::create_dir_all(&base).unwrap();
            Tree(base)
        }
        /// A cgroup2 directory at `rel`: the hierarchy's root, or a cgroup below it.
        fn cgroup2(&self, rel: &str, root: bool) -> PathBuf {
            let d = self.0.join(rel);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(".cgroup2"), "").unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
            if !root {
                fs::write(d.join("cgroup.type"), "domain\n").unwrap();
                fs::write(d.join("cgroup.events"), "populated 1\n").unwrap();
            }
            d
        }
        fn select(&self, mounts: &str) -> Selection {
            let mounts = mounts.replace("@", &self.0.display().to_string());
            let cands = root_candidates(&mounts, &self.0.join("hostproc"));
            select_root(&cands, &|p| {
                probe_with(p, &|d: &Path| Ok(d.join(".cgroup2").exists()))
            })
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn chosen(sel: &Selection) -> Option<(PathBuf, RootSource)> {
        sel.host.as_ref().map(|(p, s, _)| (p.clone(), *s))
    }

    /// A plain host: the first cgroup2 mount is the hierarchy's root and is taken as before,
    /// unified or hybrid, whatever <host-proc>/1/root holds.
    #[test]
    fn a_plain_host_keeps_its_first_cgroup2_mount() {
        let t = Tree::new("plain");
        let root = t.cgroup2("sys/fs/cgroup/unified", true);
        t.cgroup2("hostproc/1/root/sys/fs/cgroup/unified", true);
        let sel = t.select(
            "tmpfs @/sys/fs/cgroup tmpfs rw 0 0\ncgroup2 @/sys/fs/cgroup/unified cgroup2 rw 0 0\n",
        );
        assert_eq!(chosen(&sel), Some((root, RootSource::Mount)));
        assert!(sel.rejected.is_empty());
    }

    /// A container with a private cgroup namespace: its own cgroup2 mount is a cgroup below the
    /// root and is passed over for the host's, through <host-proc>/1/root (unified layout first,
    /// then hybrid).
    #[test]
    fn a_private_cgroup_namespace_finds_the_host_root_through_host_proc() {
        let t = Tree::new("private");
        t.cgroup2("sys/fs/cgroup", false);
        let unified = t.cgroup2("hostproc/1/root/sys/fs/cgroup", true);
        let sel = t.select("cgroup2 @/sys/fs/cgroup cgroup2 rw 0 0\n");
        assert_eq!(chosen(&sel), Some((unified, RootSource::HostProc)));
        assert_eq!(sel.rejected.len(), 1);
        assert!(sel.rejected[0].1.contains("below the hierarchy's root"));

        let t = Tree::new("private-hybrid");
        t.cgroup2("sys/fs/cgroup", false);
        fs::create_dir_all(t.0.join("hostproc/1/root/sys/fs/cgroup")).unwrap(); // tmpfs
        let hybrid = t.cgroup2("hostproc/1/root/sys/fs/cgroup/unified", true);
        let sel = t.select("cgroup2 @/sys/fs/cgroup cgroup2 rw 0 0\n");
        assert_eq!(chosen(&sel), Some((hybrid, RootSource::HostProc)));
    }

    /// The host's /sys/fs/cgroup bind-mounted into the container (a hostPath) is a cgroup2 mount
    /// that is the hierarchy's root: taken, even listed after the container's own.
    #[test]
    fn a_bind_mount_of_the_host_hierarchy_is_found_among_the_mounts() {
        let t = Tree::new("bind");
        t.cgroup2("sys/fs/cgroup", false);
        let host = t.cgroup2("host/sys/fs/cgroup", true);
        let sel = t.select(
            "cgroup2 @/sys/fs/cgroup cgroup2 rw 0 0\ncgroup2 @/host/sys/fs/cgroup cgroup2 ro 0 0\n",
        );
        assert_eq!(chosen(&sel), Some((host, RootSource::Mount)));
    }

    /// Nothing reaches the host's root: the selection has none, the first cgroup2 candidate is
    /// kept for an explicit override, and the decision refuses by default with the candidates.
    #[test]
    fn a_non_host_root_is_refused_unless_allowed() {
        let t = Tree::new("refuse");
        let own = t.cgroup2("sys/fs/cgroup", false);
        let sel = t.select("cgroup2 @/sys/fs/cgroup cgroup2 rw 0 0\n");
        assert!(sel.host.is_none());
        assert_eq!(sel.first.as_ref().map(|f| f.0.clone()), Some(own.clone()));
        let err = decide_root(
            sel.clone(),
            CgroupNs::Private,
            false,
            Path::new("/host/proc"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not reachable"), "{err}");
        assert!(err.contains("cgroup namespace: private"), "{err}");
        assert!(err.contains(&own.display().to_string()), "{err}");
        assert!(err.contains("--host-proc"), "{err}");
        let (root, _) = decide_root(sel, CgroupNs::Private, true, Path::new("/proc")).unwrap();
        assert_eq!(root.path, own);
        assert!(!root.hierarchy_root);
        // Nothing cgroup2 at all, not even an override.
        let t = Tree::new("none");
        let sel = t.select("proc /proc proc rw 0 0\n");
        assert!(sel.first.is_none());
        assert!(decide_root(sel, CgroupNs::Host, true, Path::new("/proc")).is_err());
    }

    /// The namespace comparison: the same nsfs inode is the host's namespace.
    #[test]
    fn cgroup_namespaces_compare_by_inode() {
        let t = Tree::new("ns");
        let a = t.0.join("a");
        let b = t.0.join("b");
        fs::write(&a, "").unwrap();
        fs::write(&b, "").unwrap();
        std::os::unix::fs::symlink(&a, t.0.join("a2")).unwrap();
        assert_eq!(cgroup_ns(&a, &t.0.join("a2")), CgroupNs::Host);
        assert_eq!(cgroup_ns(&a, &b), CgroupNs::Private);
        assert!(matches!(
            cgroup_ns(&a, &t.0.join("missing")),
            CgroupNs::Unknown(_)
        ));
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
