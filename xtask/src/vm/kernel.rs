//! The kernels the VM boots: Debian's packages (downloaded with `apt-get download` into
//! target/vm/debs and unpacked with `dpkg-deb -x`, never installed), or a kernel image given by
//! path with its modules beside it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The supported matrix of `cargo xtask test --kernels`: Debian 12's own kernel (6.1 LTS, no TCX)
/// and the current LTS from bookworm's security and backports updates (6.12). Each is the newest
/// package of its series that apt knows, matched by these patterns.
pub const MATRIX: &[(&str, &str)] = &[
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-amd64$"),
    ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$"),
];

/// A kernel to boot: its image and its unpacked module tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// A short name for output: the series ("6.1") or the image's file name.
    pub label: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The Debian package and version it came from, when it did.
    pub package: Option<String>,
}

/// Orders package names by the numbers in them (`6.1.0-9` < `6.1.0-56`).
fn numeric_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest of `apt-cache search` output lines' package names.
pub fn newest(search_output: &str) -> Option<String> {
    search_output
        .lines()
        .filter_map(|l| l.split(" - ").next())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .max_by_key(|n| numeric_key(n))
        .map(str::to_string)
}

fn vm_dir(root: &Path) -> PathBuf {
    root.join("target/vm")
}

/// Downloads (once) the newest package `apt-cache` knows by `pattern`, or `name` itself; returns
/// the `.deb`. With no apt answer, an already downloaded package of the pattern is used.
fn download(root: &Path, pattern: &str) -> anyhow::Result<PathBuf> {
    let debs = vm_dir(root).join("debs");
    std::fs::create_dir_all(&debs)?;
    let search = Command::new("apt-cache")
        .args(["search", "--names-only", pattern])
        .output();
    let name = search
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| newest(&String::from_utf8_lossy(&o.stdout)));
    let cached = |name: &str| -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
            })
            .max()
    };
    let Some(name) = name else {
        bail!(
            "apt knows no package matching {pattern}: run `apt-get update` (Debian 12 with bookworm-security/backports in sources.list)"
        );
    };
    if let Some(deb) = cached(&name) {
        return Ok(deb);
    }
    eprintln!("xtask: downloading {name} into {}", debs.display());
    let status = Command::new("apt-get")
        .args(["download", "-q", &name])
        .current_dir(&debs)
        .status()
        .context("running apt-get download")?;
    if !status.success() {
        bail!("apt-get download {name} failed: {status}");
    }
    cached(&name)
        .with_context(|| format!("apt-get download {name} left no .deb in {}", debs.display()))
}

/// Unpacks a `.deb` (once) under target/vm/unpacked/<file stem>.
fn unpack(root: &Path, deb: &Path) -> anyhow::Result<PathBuf> {
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .context("a .deb with a UTF-8 name")?;
    let dir = vm_dir(root).join("unpacked").join(stem);
    let done = dir.join(".unpacked");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&dir)
            .status()
            .context("running dpkg-deb")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed: {status}", deb.display());
        }
        std::fs::write(&done, "")?;
    }
    Ok(dir)
}

/// The package's name and version from its `.deb` file name (`name_version_arch.deb`).
fn package_of(deb: &Path) -> Option<String> {
    let f = deb.file_stem()?.to_str()?;
    let mut parts = f.split('_');
    let name = parts.next()?;
    let version = parts.next()?.replace("%3a", ":");
    Some(format!("{name} {version}"))
}

/// The kernel in an unpacked tree: `boot/vmlinuz-<release>` and `lib/modules/<release>`.
fn from_tree(label: &str, tree: &Path, package: Option<String>) -> anyhow::Result<Kernel> {
    let boot = tree.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    from_image(label, &vmlinuz, package)
}

/// A kernel image `…/vmlinuz-<release>` whose modules are in `…/../lib/modules/<release>` (an
/// unpacked package) or in the host's `/lib/modules/<release>`.
fn from_image(label: &str, vmlinuz: &Path, package: Option<String>) -> anyhow::Result<Kernel> {
    let file = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .context("a kernel image with a UTF-8 file name")?;
    let release = file
        .strip_prefix("vmlinuz-")
        .with_context(|| {
            format!(
                "{}: the image's name must be vmlinuz-<release> (its modules are looked up by release)",
                vmlinuz.display()
            )
        })?
        .to_string();
    let beside = vmlinuz
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("lib/modules").join(&release));
    let candidates: Vec<PathBuf> = beside
        .into_iter()
        .chain([Path::new("/lib/modules").join(&release)])
        .collect();
    let modules = candidates
        .iter()
        .find(|p| p.join("modules.builtin").is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no modules for {release}: looked in {}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    Ok(Kernel {
        label: label.to_string(),
        vmlinuz: vmlinuz.to_path_buf(),
        modules,
        release,
        package,
    })
}

/// A kernel of the matrix, by series ("6.1", "6.12").
pub fn debian(root: &Path, series: &str) -> anyhow::Result<Kernel> {
    let (_, pattern) = MATRIX.iter().find(|(s, _)| *s == series).with_context(|| {
        format!(
            "no kernel series {series} in the matrix (known: {})",
            MATRIX
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let deb = download(root, pattern)?;
    let tree = unpack(root, &deb)?;
    from_tree(series, &tree, package_of(&deb))
}

/// A kernel given by path: a Debian kernel `.deb`, or an image `vmlinuz-<release>`.
pub fn given(root: &Path, path: &Path) -> anyhow::Result<Kernel> {
    if !path.exists() {
        bail!("{}: no such kernel image", path.display());
    }
    let label = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("kernel")
        .to_string();
    if path.extension().is_some_and(|e| e == "deb") {
        let tree = unpack(root, path)?;
        from_tree(&label, &tree, package_of(path))
    } else {
        from_image(&label, path, None)
    }
}

/// busybox from Debian's `busybox-static`, unpacked under target/vm.
pub fn busybox(root: &Path) -> anyhow::Result<PathBuf> {
    let deb = download(root, "^busybox-static$")?;
    let tree = unpack(root, &deb)?;
    let bin = tree.join("bin/busybox");
    if !bin.is_file() {
        bail!("{} has no bin/busybox", deb.display());
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_orders_by_numbers() {
        let out = "linux-image-6.1.0-9-amd64 - Linux 6.1\nlinux-image-6.1.0-56-amd64 - Linux 6.1 (signed)\nlinux-image-6.1.0-55-amd64 - x\n";
        assert_eq!(newest(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(newest(""), None);
    }

    #[test]
    fn package_names_from_deb_files() {
        assert_eq!(
            package_of(Path::new(
                "/x/linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"
            ))
            .as_deref(),
            Some("linux-image-6.1.0-56-amd64 6.1.192-2")
        );
        assert_eq!(
            package_of(Path::new("busybox-static_1%3a1.35.0-4_amd64.deb")).as_deref(),
            Some("busybox-static 1:1.35.0-4")
        );
    }

    #[test]
    fn images_need_a_release_in_their_name() {
        let err = from_image("x", Path::new("/tmp/bzImage"), None).unwrap_err();
        assert!(err.to_string().contains("vmlinuz-<release>"), "{err}");
    }
}
