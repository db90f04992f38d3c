//! `cargo xtask test --kernel-image PATH` / `--kernels`: the real-kernel and end-to-end tiers in a
//! QEMU guest booted from another kernel (Debian's 6.1 and 6.12 by default).
//!
//! The guest's root is the host's own root filesystem, shared read-only over 9p, with fresh
//! proc, sys, cgroup2, bpffs and tmpfs mounts over it: the test binaries, `egress` and every tool
//! the tests run (ip, nsenter, curl, dnsmasq, python3) are the host's, built once on the host. The
//! initramfs holds only busybox, the kernel's modules the guest needs and `/init`. The guest has
//! no network device.

mod initramfs;
mod kernel;
mod plan;
mod qemu;

use std::{
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{Totals, cargo, run};

/// What `cargo xtask test` was asked to run in VMs.
#[derive(Debug, Default)]
pub struct VmOptions {
    /// Kernel images or `.deb` packages given by path.
    pub images: Vec<PathBuf>,
    /// Series of the matrix ("6.1", "6.12").
    pub series: Vec<String>,
    /// The representative subset only.
    pub quick: bool,
    /// The limit of each VM's whole run.
    pub timeout: Duration,
    /// Only these test binaries (`--test-binary`), when any are named.
    pub only: Vec<String>,
    /// Possible CPUs of the guest (`maxcpus`), when more than those online.
    pub possible_cpus: Option<u32>,
    /// The tiers: kernel_* and/or e2e_* (both when neither).
    pub kernel: bool,
    pub e2e: bool,
}

impl VmOptions {
    pub fn wanted(&self) -> bool {
        !self.images.is_empty() || !self.series.is_empty()
    }
}

/// The matrix's series, for `--kernels`.
pub fn matrix() -> Vec<String> {
    kernel::MATRIX.iter().map(|(s, _)| s.to_string()).collect()
}

/// One kernel's run, for the summary.
struct KernelRun {
    kernel: kernel::Kernel,
    outcome: anyhow::Result<qemu::Outcome>,
}

/// Builds everything on the host, then boots each kernel in turn and runs the binaries in it.
/// Prints a per-kernel, per-binary summary and the total line; fails when any binary failed, did
/// not finish, or a guest did not boot.
pub fn test_in_vms(root: &Path, opts: &VmOptions, args: &[OsString]) -> anyhow::Result<()> {
    // The guest reads the workspace's path from its kernel command line, split at spaces.
    anyhow::ensure!(
        !root.to_string_lossy().contains(char::is_whitespace),
        "the workspace's path {} has whitespace: the VM runs need a path without",
        root.display()
    );
    // The guests run the test binaries and `egress` from this tree's target/ (over 9p): a
    // second run building them again meanwhile would swap them under the first one's VM
    // (seen: `egress` dying of SIGSEGV in the guest). One run per tree at a time.
    std::fs::create_dir_all(root.join("target/vm"))?;
    let lock = std::fs::File::create(root.join("target/vm/lock")).context("target/vm/lock")?;
    if let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock() {
        bail!(
            "another `cargo xtask test --kernels`/`--kernel-image` runs on this tree: its VMs run the binaries in target/, which this run would rebuild under them; wait for it to end"
        );
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("qemu-system-x86_64 is missing: apt-get install qemu-system-x86");
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .context("a UTF-8 test argument")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut kernels = Vec::new();
    for s in &opts.series {
        kernels.push(kernel::debian(root, s)?);
    }
    for p in &opts.images {
        kernels.push(kernel::given(root, p)?);
    }
    let busybox = kernel::busybox(root)?;

    // Built once, on the host.
    run(Command::new(cargo()).args([
        "build",
        "-p",
        "egress-userspace",
        "-p",
        "egress-tests",
        "--bins",
    ]))?;
    // The guest's root is the host's, read-only, with tmpfs over the directories tests write:
    // one of them, `ip netns`'s per-namespace /etc (`/etc/netns`, where the DNS tests put a
    // namespace's resolv.conf), can only be mounted over if it exists here.
    std::fs::create_dir_all("/etc/netns").context("creating /etc/netns (ip netns's directory)")?;
    let both = !(opts.kernel || opts.e2e);
    let mut cmd = Command::new(cargo());
    cmd.args([
        "test",
        "-p",
        "egress-tests",
        "--no-run",
        "--message-format=json",
    ]);
    if both || opts.kernel {
        cmd.args(["--test", "kernel_*"]);
    }
    if both || opts.e2e {
        cmd.args(["--test", "e2e_*"]);
    }
    let json = crate::output(&mut cmd)?;
    let binaries = plan::select(plan::binaries_from_json(&json), opts.quick, &opts.only);
    if binaries.is_empty() {
        bail!("no test binary to run in the VM");
    }
    for (name, why) in plan::EXCLUDED {
        eprintln!("xtask: not in the VM: {name}: {why}");
    }

    let per_binary = opts.timeout.as_secs().max(60);
    let mut accel = qemu::first_accel()?;
    let mut runs = Vec::new();
    for k in kernels {
        let dir = qemu::run_dir(root, &k.label);
        let outcome = (|| {
            std::fs::create_dir_all(&dir)?;
            let tree = initramfs::ModuleTree::open(&k.modules)?;
            let modules = tree
                .resolve(initramfs::GUEST_MODULES)
                .with_context(|| format!("the modules of {}", k.release))?;
            let initrd = dir.join("initramfs.cpio");
            std::fs::write(&initrd, initramfs::build(&busybox, &modules)?)?;
            let script = dir.join("guest.sh");
            std::fs::write(
                &script,
                plan::guest_script(&root.join("egress-tests"), &binaries, &args, per_binary),
            )?;
            eprintln!(
                "xtask: booting {} ({}) with {} test binaries",
                k.label,
                k.package.as_deref().unwrap_or(&k.release),
                binaries.len()
            );
            qemu::boot(
                &qemu::Boot {
                    label: &k.label,
                    vmlinuz: &k.vmlinuz,
                    initrd: &initrd,
                    script: &script,
                    workspace: root,
                    dir: &dir,
                    timeout: opts.timeout,
                    cpus: 2,
                    max_cpus: opts.possible_cpus,
                    memory_mib: 4096,
                },
                &mut accel,
            )
        })();
        runs.push(KernelRun { kernel: k, outcome });
    }

    let (summary, totals, ok) = summarize(&runs, &binaries);
    print!("{summary}");
    let _ = std::fs::write(root.join("target/vm/summary.txt"), &summary);
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !ok {
        bail!("tests failed in the VM (logs under target/vm/runs/)");
    }
    Ok(())
}

/// The per-kernel, per-binary summary, the totals, and whether everything passed.
fn summarize(runs: &[KernelRun], binaries: &[plan::TestBinary]) -> (String, Totals, bool) {
    let mut s = String::from("\n== VM summary\n");
    let mut totals = Totals::default();
    let mut ok = true;
    for r in runs {
        let k = &r.kernel;
        let _ = writeln!(
            s,
            "kernel {} ({}):",
            k.label,
            k.package.as_deref().unwrap_or(&k.release)
        );
        let out = match &r.outcome {
            Ok(out) => out,
            Err(e) => {
                ok = false;
                let _ = writeln!(s, "  error: {e:#}");
                continue;
            }
        };
        totals.passed += out.totals.passed;
        totals.failed += out.totals.failed;
        totals.ignored += out.totals.ignored;
        let _ = writeln!(
            s,
            "  booted {} under {:?} in {:.0} s; {} passed, {} failed",
            out.release.as_deref().unwrap_or("(never)"),
            out.accel.unwrap_or(qemu::Accel::Tcg),
            out.elapsed.as_secs_f64(),
            out.totals.passed,
            out.totals.failed
        );
        if let Some(f) = &out.fatal {
            ok = false;
            let _ = writeln!(s, "  fatal: {f}");
        }
        for m in &out.module_failures {
            ok = false;
            let _ = writeln!(s, "  module failed to load: {m}");
        }
        for b in binaries {
            let verdict = match out.results.iter().find(|(n, _)| *n == b.name) {
                Some((_, 0)) => "ok".to_string(),
                Some((_, 124)) | Some((_, 137)) => {
                    ok = false;
                    "FAILED (timed out in the guest)".to_string()
                }
                Some((_, rc)) => {
                    ok = false;
                    format!("FAILED (exit {rc})")
                }
                None if out.unfinished.contains(&b.name) => {
                    ok = false;
                    "FAILED (unfinished: the VM's time ran out)".to_string()
                }
                None => {
                    ok = false;
                    "FAILED (never ran)".to_string()
                }
            };
            let _ = writeln!(s, "  {:<22} {verdict}", b.name);
        }
        if out.timed_out {
            ok = false;
        }
    }
    (s, totals, ok)
}
