//! Selector values on this host: user and group names through NSS, executables to the identity
//! the kernel sees (device and inode), cgroup paths to cgroup ids. Behind [`Resolver`], so that
//! compiling stays testable with a fake host; [`HostResolver`] is the real one.
//!
//! Executables are accepted only on file systems whose `st_dev` is the kernel's
//! `super_block.s_dev` ([`TRUSTED_FS`]: ext2/3/4, xfs, tmpfs). On btrfs subvolumes and overlayfs
//! `stat` may report another device than the one the exec tracker reads, and the executable
//! would silently never match; so such files are refused, not guessed at.

use std::{
    ffi::CString,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use egress_common::ExeKey;

/// Where selector values are looked up. Each error is a message completing "`VALUE`: …".
pub trait Resolver {
    /// The uid of a user name.
    fn user(&self, name: &str) -> Result<u32, String>;
    /// The gid of a group name.
    fn group(&self, name: &str) -> Result<u32, String>;
    /// The identity of the executable file at `path` (symlinks followed).
    fn executable(&self, path: &Path) -> Result<ExeKey, String>;
    /// The id (directory inode) of a cgroup, by its path relative to the cgroup2 root.
    fn cgroup(&self, relative: &str) -> Result<u64, String>;
}

/// `statfs` magics of the file systems whose `st_dev` is the kernel's `s_dev`: ext2/3/4 (one
/// magic), xfs, tmpfs.
pub const TRUSTED_FS: [(u32, &str); 3] = [
    (0xEF53, "ext2/ext3/ext4"),
    (0x5846_5342, "xfs"),
    (0x0102_1994, "tmpfs"),
];

/// The kernel's encoding of a device number (`MKDEV`: `major << 20 | minor`, as
/// `super_block.s_dev` holds it) from the userspace one `stat` reports.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & !0xff);
    ((major << 20) | (minor & 0xf_ffff)) as u32
}

/// The identity of the file at `path` (symlinks followed), without the checks compiling makes
/// (for `egress explain --exe`: any file has an identity).
pub fn exe_key(path: &Path) -> Result<ExeKey, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("cannot stat it: {e}"))?;
    Ok(ExeKey {
        dev: kernel_dev(m.dev()),
        _pad: 0,
        ino: m.ino(),
    })
}

/// The real host.
#[derive(Debug, Default)]
pub struct HostResolver {
    /// The cgroup2 root; found in /proc/mounts when `None`.
    cgroup_root: Option<PathBuf>,
}

impl HostResolver {
    /// A resolver whose cgroup paths are under `root` (tests; the host's is found otherwise).
    pub fn with_cgroup_root(root: PathBuf) -> HostResolver {
        HostResolver {
            cgroup_root: Some(root),
        }
    }

    fn cgroup_root(&self) -> Result<PathBuf, String> {
        match &self.cgroup_root {
            Some(r) => Ok(r.clone()),
            None => crate::sys::cgroup::find_cgroup2_root()
                .ok_or_else(|| "no cgroup2 hierarchy is mounted (see /proc/mounts)".to_string()),
        }
    }
}

impl Resolver for HostResolver {
    fn user(&self, name: &str) -> Result<u32, String> {
        lookup_name(name, NssKind::User)
    }

    fn group(&self, name: &str) -> Result<u32, String> {
        lookup_name(name, NssKind::Group)
    }

    fn executable(&self, path: &Path) -> Result<ExeKey, String> {
        let m = std::fs::metadata(path).map_err(|e| format!("cannot stat it: {e}"))?;
        if !m.is_file() {
            return Err("is not a regular file: expected an executable file".into());
        }
        if m.permissions().mode() & 0o111 == 0 {
            return Err("is not executable (no execute bit): expected an executable file".into());
        }
        let fs = rustix::fs::statfs(path).map_err(|e| format!("cannot statfs it: {e}"))?;
        let magic = fs.f_type as u32;
        if !TRUSTED_FS.iter().any(|(m, _)| *m == magic) {
            return Err(format!(
                "is on a file system (statfs magic {magic:#x}) whose device number may differ from the kernel's: only {} are supported for `executables`",
                TRUSTED_FS
                    .iter()
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(ExeKey {
            dev: kernel_dev(m.dev()),
            _pad: 0,
            ino: m.ino(),
        })
    }

    fn cgroup(&self, relative: &str) -> Result<u64, String> {
        let root = self.cgroup_root()?;
        let path = root.join(relative);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(m.ino()),
            Ok(_) => Err(format!("{} is not a directory", path.display())),
            Err(e) => Err(format!(
                "no such cgroup: {} ({e}); a systemd unit's cgroup exists while the unit runs",
                path.display()
            )),
        }
    }
}

/// The ids of a cgroup and of its ancestors, by level (index 0 the root): what
/// `bpf_get_current_ancestor_cgroup_id(level)` gives a process in it. `path` is relative to the
/// cgroup2 root, or absolute under it.
pub fn cgroup_ancestors(root: &Path, path: &Path) -> Result<Vec<u64>, String> {
    let relative = if path.is_absolute() {
        path.strip_prefix(root).map_err(|_| {
            format!(
                "{} is not below the cgroup2 root {}",
                path.display(),
                root.display()
            )
        })?
    } else {
        path
    };
    let mut dir = root.to_path_buf();
    let mut ids = Vec::new();
    let stat = |d: &Path| {
        std::fs::metadata(d)
            .map(|m| m.ino())
            .map_err(|e| format!("cannot stat cgroup {}: {e}", d.display()))
    };
    ids.push(stat(&dir)?);
    for c in relative.components() {
        match c {
            std::path::Component::Normal(part) => {
                dir.push(part);
                ids.push(stat(&dir)?);
            }
            std::path::Component::CurDir => {}
            _ => return Err(format!("{}: expected no `..`", path.display())),
        }
    }
    Ok(ids)
}

/// A user's uid by name, through NSS.
pub fn uid_of(name: &str) -> Result<u32, String> {
    lookup_name(name, NssKind::User)
}

/// A group's gid by name, through NSS.
pub fn gid_of(name: &str) -> Result<u32, String> {
    lookup_name(name, NssKind::Group)
}

#[derive(Clone, Copy)]
enum NssKind {
    User,
    Group,
}

/// A user's uid or a group's gid by name, through NSS (`getpwnam_r` / `getgrnam_r`, so
/// /etc/passwd, LDAP, systemd's dynamic users alike).
fn lookup_name(name: &str, kind: NssKind) -> Result<u32, String> {
    let what = match kind {
        NssKind::User => "user",
        NssKind::Group => "group",
    };
    let c = CString::new(name).map_err(|_| format!("a {what} name cannot hold a NUL byte"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let (rc, id, found) = match kind {
            NssKind::User => {
                // SAFETY: an all-zero `passwd` is a valid value (null pointers, zero ids).
                let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
                let mut out: *mut libc::passwd = std::ptr::null_mut();
                // SAFETY: `c` is NUL-terminated; `pw`, `buf` and `out` outlive the call, and
                // `buf.len()` is its size.
                let rc = unsafe {
                    libc::getpwnam_r(
                        c.as_ptr(),
                        &mut pw,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        &mut out,
                    )
                };
                (rc, pw.pw_uid, !out.is_null())
            }
            NssKind::Group => {
                // SAFETY: an all-zero `group` is a valid value.
                let mut gr: libc::group = unsafe { std::mem::zeroed() };
                let mut out: *mut libc::group = std::ptr::null_mut();
                // SAFETY: as for `getpwnam_r`.
                let rc = unsafe {
                    libc::getgrnam_r(
                        c.as_ptr(),
                        &mut gr,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        &mut out,
                    )
                };
                (rc, gr.gr_gid, !out.is_null())
            }
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(format!(
                "looking up the {what} failed: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        if !found {
            return Err(format!(
                "no {what} of that name on this host (NSS: /etc/{}, and any directory service configured)",
                match kind {
                    NssKind::User => "passwd",
                    NssKind::Group => "group",
                }
            ));
        }
        return Ok(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_take_the_kernel_encoding() {
        // stat's 0xfe00 (major 254, minor 0) is the kernel's 0xfe00000 (seen on this machine).
        assert_eq!(kernel_dev(0xfe00), 0x0fe0_0000);
        // major 8, minor 1 (sda1): 0x801 in both old encodings, 8 << 20 | 1 in the kernel's.
        assert_eq!(kernel_dev(0x801), (8 << 20) | 1);
        // A large minor: glibc's makedev(259, 300) = 0x1032c, with minor bits above 8 at 12..
        let st = (259u64 << 8) | (300 & 0xff) | ((300u64 & !0xff) << 12);
        assert_eq!(kernel_dev(st), (259 << 20) | 300);
    }

    #[test]
    fn the_real_host_resolves_root_env_and_a_cgroup() {
        let host = HostResolver::default();
        assert_eq!(host.user("root"), Ok(0));
        assert_eq!(host.group("root"), Ok(0));
        assert!(
            host.user("no-such-user-egress-test")
                .unwrap_err()
                .contains("no user"),
            "unknown user"
        );
        let env = Path::new("/usr/bin/env");
        let key = host
            .executable(env)
            .unwrap_or_else(|e| panic!("/usr/bin/env: {e}"));
        let m = std::fs::metadata(env).unwrap();
        assert_eq!(key.ino, m.ino());
        assert_eq!(key, exe_key(env).unwrap());
        assert!(
            host.executable(Path::new("/etc/passwd"))
                .unwrap_err()
                .contains("not executable")
        );
        assert!(
            host.executable(Path::new("/usr/bin"))
                .unwrap_err()
                .contains("regular file")
        );
        assert!(
            host.executable(Path::new("/no/such/file"))
                .unwrap_err()
                .contains("cannot stat")
        );
        let Some(root) = crate::sys::cgroup::find_cgroup2_root() else {
            panic!("this host has no cgroup2 hierarchy");
        };
        // A cgroup of our own, two levels deep, removed however the test ends.
        struct Dirs(Vec<PathBuf>);
        impl Drop for Dirs {
            fn drop(&mut self) {
                for d in self.0.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
        let top = format!("egress-resolve-test-{}", std::process::id());
        let name = format!("{top}/inner");
        let dirs = Dirs(vec![root.join(&top), root.join(&name)]);
        for d in &dirs.0 {
            std::fs::create_dir(d)
                .unwrap_or_else(|e| panic!("creating cgroup {} (needs root): {e}", d.display()));
        }
        let id = host.cgroup(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(id, std::fs::metadata(&dirs.0[1]).unwrap().ino());
        let ancestors = cgroup_ancestors(&root, Path::new(&name)).unwrap();
        assert_eq!(ancestors.len(), 3);
        assert_eq!(ancestors[2], id);
        assert_eq!(ancestors[1], host.cgroup(&top).unwrap());
        assert_eq!(cgroup_ancestors(&root, &dirs.0[1]).unwrap(), ancestors);
        assert!(
            host.cgroup("no-such-cgroup-egress-test")
                .unwrap_err()
                .contains("no such cgroup")
        );
    }
}
