//! The guest's initramfs: busybox (static, from Debian's `busybox-static`), the kernel's own
//! modules that the guest needs (loaded by `/init` in dependency order) and `/init` itself, which
//! mounts the host's root filesystem read-only over 9p and runs the test script in it.
//!
//! Written as a `newc` cpio archive by [`Cpio`], so no `cpio` tool is needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The modules the guest needs, by module name: 9p over virtio (the host's root), veth (the
/// tests' network namespaces), sch_ingress and cls_bpf (the clsact fallback of TC before 6.6),
/// bridge (e2e_accounting), dummy, and the socket diagnostics the DNS proxy finds its askers
/// with (inet_diag, tcp_diag, udp_diag: on a host the kernel loads them on first use through
/// modprobe, which cannot find the guest kernel's modules). Those built into a kernel are
/// skipped; dependencies come from each module's own `depends=`.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "sch_ingress",
    "cls_bpf",
    "bridge",
    "dummy",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

/// A `newc` cpio archive being written in memory.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, exec: bool, data: &[u8]) {
        self.entry(name, if exec { 0o100755 } else { 0o100644 }, (0, 0), data);
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    /// Closes the archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// A kernel's module tree (`lib/modules/<version>` of an unpacked package): which modules are
/// built in, and where each loadable one is.
pub struct ModuleTree {
    builtin: BTreeSet<String>,
    files: BTreeMap<String, PathBuf>,
}

/// A module's name from its file name: `veth.ko.xz` -> `veth`, `nf-nat.ko` -> `nf_nat`.
fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko.xz")
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// The `depends=` field of a module's `.modinfo` section (the module's bytes, uncompressed).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

impl ModuleTree {
    pub fn open(dir: &Path) -> anyhow::Result<ModuleTree> {
        let builtin_path = dir.join("modules.builtin");
        let builtin = std::fs::read_to_string(&builtin_path)
            .with_context(|| format!("reading {}", builtin_path.display()))?
            .lines()
            .filter_map(|l| module_name(l.rsplit('/').next().unwrap_or(l)))
            .collect();
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.join("kernel")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(name) =
                    p.file_name().and_then(|n| n.to_str()).and_then(module_name)
                {
                    files.insert(name, p);
                }
            }
        }
        Ok(ModuleTree { builtin, files })
    }

    /// The module's bytes, uncompressed.
    fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
        let name = path.to_string_lossy();
        if name.ends_with(".xz") || name.ends_with(".zst") {
            let tool = if name.ends_with(".xz") { "xz" } else { "zstd" };
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| {
                    format!("running {tool} -dc {name} (apt-get install xz-utils zstd)")
                })?;
            if !out.status.success() {
                bail!(
                    "{tool} -dc {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        } else {
            std::fs::read(path).with_context(|| format!("reading {name}"))
        }
    }

    /// The loadable modules that `wanted` needs, dependencies first, each with its uncompressed
    /// bytes. Built-in modules are left out; a module that is neither is an error naming it.
    pub fn resolve(&self, wanted: &[&str]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for w in wanted {
            self.visit(w, &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if depth > 64 {
            bail!("module dependencies loop at {name}");
        }
        if !seen.insert(name.to_string()) || self.builtin.contains(name) {
            return Ok(());
        }
        let path = self
            .files
            .get(name)
            .with_context(|| format!("the kernel has no module {name} and does not build it in"))?;
        let bytes = Self::read(path)?;
        for dep in module_depends(&bytes) {
            self.visit(&dep, seen, order, depth + 1)?;
        }
        order.push((name.to_string(), bytes));
        Ok(())
    }
}

/// The guest's `/init` (busybox sh). Loads the modules, mounts the host's root read-only over 9p
/// at /host with fresh proc, sys, dev, cgroup2, bpffs and tmpfs mounts over it, runs the script
/// named by `egress.script=` on the kernel command line in a chroot there, reports its exit code
/// on the second serial port and powers off.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
report() { echo "@@EGRESS-VM $*" > /dev/ttyS1; }
report booted "$(uname -r)"
for m in $(cat /modules.order); do
    insmod "/modules/$m.ko" || report modfail "$m"
done
script=$(sed -n 's/.*egress\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host; then
    report fatal "mounting the host root over 9p failed"
    poweroff -f
fi
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
mount -t bpf bpf /host/sys/fs/bpf
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
# Not /root: the host's tools may live there (pyenv's python behind the metrics test's venv);
# the guest's HOME is /tmp.
for d in /tmp /run /var/tmp /var/lib /var/log /var/cache /etc/egress /etc/netns; do
    [ -d "/host$d" ] && mount -t tmpfs tmpfs "/host$d"
done
mount -t tmpfs tmpfs /host/mnt
chmod 1777 /host/tmp /host/var/tmp
# The workspace again, at its own path: a tmpfs above may have hidden it (a clone under /tmp).
ws=$(sed -n 's/.*egress\.workspace=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$ws" ]; then
    mkdir -p "/host$ws" 2>/dev/null
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 workspace "/host$ws"; then
        report fatal "mounting the workspace $ws over 9p failed"
        poweroff -f
    fi
fi
hostname egress-vm
chroot /host /bin/sh "$script"
report exit $?
sync
poweroff -f
"#;

/// Builds the initramfs: busybox, `/init`, `/dev/console` and the modules with their load order.
pub fn build(busybox: &Path, modules: &[(String, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    let bb = std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    c.file("bin/busybox", true, &bb);
    c.file("init", true, INIT.as_bytes());
    let mut order = String::new();
    for (name, bytes) in modules {
        c.file(&format!("modules/{name}.ko"), false, bytes);
        order.push_str(name);
        order.push('\n');
    }
    c.file("modules.order", false, order.as_bytes());
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_depends() {
        assert_eq!(module_name("veth.ko.xz").as_deref(), Some("veth"));
        assert_eq!(module_name("nf-nat.ko").as_deref(), Some("nf_nat"));
        assert_eq!(module_name("modules.dep"), None);
        let ko = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["9pnet", "netfs"]);
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(module_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_closed() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", true, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        // Header (110) + "bin\0" (4) is 114, padded to 116.
        assert_eq!(&out[116..122], b"070701");
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
        // The file's mode and size fields.
        let second = &text[116..];
        assert_eq!(&second[14..22], "000081ed");
        assert_eq!(&second[54..62], format!("{:08x}", 10));
    }

    #[test]
    fn resolve_orders_dependencies_first_and_skips_builtins() {
        let dir = std::env::temp_dir().join(format!("xtask-mods-{}", std::process::id()));
        let k = dir.join("kernel/x");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(dir.join("modules.builtin"), "kernel/net/virtio_pci.ko\n").unwrap();
        std::fs::write(k.join("9p.ko"), b"\0depends=9pnet,netfs\0").unwrap();
        std::fs::write(k.join("9pnet.ko"), b"\0depends=\0").unwrap();
        std::fs::write(k.join("netfs.ko"), b"\0depends=9pnet\0").unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        let names: Vec<String> = tree
            .resolve(&["virtio_pci", "9p"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["9pnet", "netfs", "9p"]);
        let err = tree.resolve(&["veth"]).unwrap_err().to_string();
        assert!(err.contains("no module veth"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
