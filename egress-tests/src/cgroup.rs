//! Test cgroups: children of the cgroup2 root that the test makes (never the root itself, so that
//! nothing a test attaches reaches processes other than its own), removed on drop after whatever
//! is left in them is killed.

use std::{
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
};

use egress::sys::cgroup::{ChildCgroup, cgroup2_root};

/// A fresh child cgroup of the cgroup2 root, removed on drop.
#[derive(Debug)]
pub struct TestCgroup(ChildCgroup);

impl TestCgroup {
    /// `<cgroup2 root>/egress-test-<pid>-<n>`.
    pub fn new() -> TestCgroup {
        TestCgroup::with_prefix("egress-test")
    }

    /// `<cgroup2 root>/<prefix>-<pid>-<n>`.
    pub fn with_prefix(prefix: &str) -> TestCgroup {
        let root = cgroup2_root().expect("cgroup2 must be available (tests run as root)");
        TestCgroup(
            ChildCgroup::create(&root, prefix)
                .unwrap_or_else(|e| panic!("creating a test cgroup (are we root?): {e:#}")),
        )
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The cgroup id, as events report it (the directory's inode).
    pub fn id(&self) -> u64 {
        std::fs::metadata(self.path())
            .expect("the test cgroup exists")
            .ino()
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Makes `cmd` join this cgroup between fork and exec, so that everything it runs is inside
    /// from its first instruction.
    pub fn join_on_exec<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let fd = self
            .0
            .procs_fd()
            .unwrap_or_else(|e| panic!("opening the test cgroup's cgroup.procs: {e:#}"));
        // SAFETY: the closure makes one async-signal-safe write(2) on an fd opened before fork.
        unsafe { cmd.pre_exec(move || egress::sys::cgroup::join_in_child(&fd)) }
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        TestCgroup::new()
    }
}

impl AsRef<Path> for TestCgroup {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

/// Moves the calling process into the cgroup2 directory `dir`.
pub fn join(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

/// The cgroups `egress exec` (running as `pid`) made and has not removed yet.
pub fn exec_cgroups_of(pid: u32) -> Vec<String> {
    let root = cgroup2_root().expect("cgroup2 must be available");
    let prefix = format!("egress-exec-{pid}-");
    std::fs::read_dir(root)
        .expect("reading the cgroup2 root")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}
