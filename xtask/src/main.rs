//! `cargo xtask`: what build.rs cannot do. Bootstraps the eBPF toolchain (rust-src on the
//! nightly, bpf-linker against the nightly's own libLLVM), builds, runs `egress` as root, and runs
//! the tiers of tests (all of them, or the ones asked for).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "egress build tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building eBPF needs, when it is missing (nightly rust-src, bpf-linker).
    Bootstrap,
    /// Build the workspace (the eBPF object is built and embedded by build.rs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build and run `egress` as root with the given arguments, e.g. `cargo xtask run -- run`.
    Run {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for `egress`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the tiers of tests: unit, real-kernel and end-to-end (all three unless some are
    /// named). The kernel and end-to-end tiers need root: they load eBPF and fail (never skip)
    /// when they cannot. Ends with one line totalling every tier: `tests: N passed, N failed, N
    /// skipped`.
    Test {
        /// The unit tier (no root needed): the host crates' own tests (egress-common,
        /// egress-userspace's library, binaries and loopback DNS proxy test, egress-tests' library
        /// and binaries, xtask).
        #[arg(long)]
        unit: bool,
        /// The real-kernel tier (root): egress-tests' `tests/kernel_*.rs`, which load the datapath
        /// in-process and attach it to test cgroups.
        #[arg(long)]
        kernel: bool,
        /// The end-to-end tier (root): egress-tests' `tests/e2e_*.rs`, which drive the `egress`
        /// binary.
        #[arg(long)]
        e2e: bool,
        /// Run the real-kernel and end-to-end tiers in a QEMU guest booted from this kernel
        /// instead of on the host (repeatable): a Debian kernel package (`.deb`, unpacked under
        /// target/vm, never installed) or an image `vmlinuz-<release>` with its modules in
        /// `../lib/modules/<release>` or `/lib/modules/<release>`. Needs qemu-system-x86.
        #[arg(long, value_name = "PATH")]
        kernel_image: Vec<PathBuf>,
        /// Run them in a VM on each kernel of the supported matrix: Debian's 6.1 and 6.12 (the
        /// newest package of each series that apt knows, downloaded into target/vm/debs), or on
        /// the series named (`--kernels 6.1`, `--kernels 6.1,6.12`).
        #[arg(long, value_name = "SERIES", num_args = 0.., value_delimiter = ',')]
        kernels: Option<Vec<String>>,
        /// In the VM, the representative subset only (CI's run on 6.1 under TCG).
        #[arg(long)]
        quick: bool,
        /// The limit, in minutes, of each VM's whole run (TCG is 10 to 30 times slower than
        /// the host).
        #[arg(long, default_value_t = 120, value_name = "MINUTES")]
        vm_timeout: u64,
        /// Boot the VM with N possible CPUs (2 online, the rest hot-pluggable, as
        /// `maxcpus`): the kernel sizes every per-CPU map for all of them, as on a many-core
        /// host.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=255))]
        possible_cpus: Option<u32>,
        /// In the VM, only this test binary (repeatable; `e2e_names`, `kernel_tc`, …), e.g. to
        /// run again what failed.
        #[arg(long, value_name = "NAME")]
        test_binary: Vec<String>,
        /// Extra arguments for the test binaries (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// fmt --check and clippy -D warnings on the host crates and the eBPF crate.
    Lint,
    /// Build the agent's OCI image with buildah: `FROM scratch`, one static (musl) `egress`
    /// binary and nothing else (no shell, no /etc/passwd: policies name users and groups by
    /// number). Written as an OCI archive to target/image/egress.oci.tar (needs buildah and
    /// musl-tools from Debian; adds the rustup musl target when missing).
    Image {
        /// The image name and tag recorded in the archive.
        #[arg(long, default_value = IMAGE_NAME)]
        name: String,
    },
    /// Benchmarks against a no-firewall baseline, iptables and nftables, in namespaces and
    /// cgroups of their own (root; needs iproute2, iptables, nftables, iperf3, dnsmasq). Prints a
    /// table and writes target/bench/results.json and results.md.
    Bench {
        /// A smoke run of about a minute: fewer sizes, runs and iterations.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.task {
        Task::Bootstrap => bootstrap(),
        Task::Build { release } => {
            bootstrap()?;
            cargo_build(release)
        }
        Task::Run { release, args } => {
            bootstrap()?;
            cargo_build(release)?;
            let bin = root
                .join("target")
                .join(if release { "release" } else { "debug" })
                .join("egress");
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                let mut c = Command::new("sudo");
                c.arg("--preserve-env=RUST_LOG").arg(&bin);
                c
            };
            cmd.args(&args);
            let status = cmd
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("egress exited with {status}");
            }
            Ok(())
        }
        Task::Test {
            unit,
            kernel,
            e2e,
            kernel_image,
            kernels,
            quick,
            vm_timeout,
            possible_cpus,
            test_binary,
            args,
        } => {
            let vm = vm::VmOptions {
                images: kernel_image,
                series: match kernels {
                    Some(s) if s.is_empty() => vm::matrix(),
                    Some(s) => s,
                    None => Vec::new(),
                },
                quick,
                timeout: std::time::Duration::from_secs(vm_timeout * 60),
                possible_cpus,
                only: test_binary,
                kernel,
                e2e,
            };
            if vm.wanted() {
                if unit {
                    bail!(
                        "the unit tier does not depend on the kernel: run it on the host (`cargo xtask test --unit`)"
                    );
                }
                bootstrap()?;
                if !is_root() {
                    bail!(
                        "the VM runs the host's test binaries as root in the guest and reads the host's root: run as root"
                    );
                }
                return vm::test_in_vms(&root, &vm, &args);
            }
            if quick {
                bail!("--quick selects the VM's subset: give --kernels or --kernel-image too");
            }
            if !vm.only.is_empty() {
                bail!("--test-binary picks what the VM runs: give --kernels or --kernel-image too");
            }
            let all = !(unit || kernel || e2e);
            let tiers: Vec<Tier> = [(Tier::Unit, unit), (Tier::Kernel, kernel), (Tier::E2e, e2e)]
                .into_iter()
                .filter(|&(_, asked)| all || asked)
                .map(|(tier, _)| tier)
                .collect();
            bootstrap()?;
            if tiers.iter().any(|t| t.needs_root()) && !is_root() {
                bail!(
                    "the kernel and end-to-end tests load eBPF programs and need root; run `sudo -E cargo xtask test` (or `cargo xtask test --unit` for the unit tier alone)"
                );
            }
            test_tiers(&tiers, &args)
        }
        Task::Bench { quick } => {
            bootstrap()?;
            if !is_root() {
                bail!("the benchmarks load eBPF programs and create namespaces: run as root");
            }
            // The DNS benchmark runs the `egress` controller: the bench finds it beside itself.
            run(Command::new(cargo()).args([
                "build",
                "--release",
                "-p",
                "egress-userspace",
                "-p",
                "egress-tests",
                "--bins",
            ]))?;
            let mut cmd = Command::new(root.join("target/release/egress-bench"));
            cmd.arg("--out").arg(root.join("target/bench"));
            if quick {
                cmd.arg("--quick");
            }
            run(&mut cmd)
        }
        Task::Image { name } => {
            bootstrap()?;
            let archive = image(&root, &name)?;
            let size = std::fs::metadata(&archive)?.len();
            println!(
                "xtask: image {name} written to {} ({:.1} MiB)",
                archive.display(),
                size as f64 / (1024.0 * 1024.0)
            );
            Ok(())
        }
        Task::Lint => {
            bootstrap()?;
            run(Command::new(cargo()).args(["fmt", "--all", "--check"]))?;
            run(Command::new(cargo()).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(Command::new("rustup").args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "egress-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Zbuild-std=core",
                "--",
                "-D",
                "warnings",
            ]))
        }
    }
}

/// The name the image is built and archived under.
const IMAGE_NAME: &str = "localhost/egress:dev";
/// The static target of the image's binary.
const MUSL: &str = "x86_64-unknown-linux-musl";

/// The image's build file: the binary alone, run as root (it loads eBPF). The policy comes from a
/// mounted ConfigMap at /etc/egress/policy; without one the embedded audit default applies.
const CONTAINERFILE: &str = "FROM scratch
COPY egress /usr/bin/egress
LABEL org.opencontainers.image.title=egress
LABEL org.opencontainers.image.description=\"eBPF egress firewall node agent\"
LABEL org.opencontainers.image.licenses=\"MIT OR Apache-2.0 (userspace), Dual MIT/GPL (eBPF)\"
ENTRYPOINT [\"/usr/bin/egress\"]
CMD [\"run\", \"--watch\", \"--host-proc\", \"/host/proc\"]
";

/// Builds the static binary, then the image in a buildah storage of target/image's own (nothing
/// of the machine's container storage is touched), and writes it as an OCI archive.
fn image(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    for tool in ["buildah", "musl-gcc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` is missing: apt-get install buildah musl-tools");
        }
    }
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == MUSL) {
        eprintln!("xtask: adding the rustup target {MUSL}");
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    // ring's C code is compiled by musl-gcc; the musl target links statically by default.
    run(Command::new(cargo())
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .args([
            "build",
            "--release",
            "-p",
            "egress-userspace",
            "--bin",
            "egress",
            "--target",
            MUSL,
        ]))?;
    let out = root.join("target/image");
    let ctx = out.join("context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx)?;
    let bin = ctx.join("egress");
    std::fs::copy(root.join("target").join(MUSL).join("release/egress"), &bin)?;
    // Symbols are half the binary; the eBPF object embedded in it is data and stays whole.
    if Command::new("strip").arg(&bin).status().is_err() {
        eprintln!("xtask: no `strip`: the binary keeps its symbols");
    }
    let file = Command::new("file").arg(&bin).output();
    if let Ok(f) = file {
        let text = String::from_utf8_lossy(&f.stdout);
        if text.contains("dynamically linked") {
            bail!("the image's binary is not static: {text}");
        }
    }
    std::fs::write(ctx.join("Containerfile"), CONTAINERFILE)?;
    let storage = out.join("storage");
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    };
    let ctx_s = ctx.to_str().context("a UTF-8 path")?;
    run(&mut buildah(&[
        "bud",
        "--quiet",
        "--timestamp",
        "0",
        "-f",
        &format!("{ctx_s}/Containerfile"),
        "-t",
        name,
        ctx_s,
    ]))?;
    let archive = out.join("egress.oci.tar");
    let _ = std::fs::remove_file(&archive);
    run(&mut buildah(&[
        "push",
        "--quiet",
        name,
        &format!("oci-archive:{}:{name}", archive.display()),
    ]))?;
    Ok(archive)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub(crate) fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A tier of tests, selectable on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Unit,
    Kernel,
    E2e,
}

impl Tier {
    fn needs_root(self) -> bool {
        self != Tier::Unit
    }

    /// The `cargo test` arguments that select the tier.
    fn cargo_args(self) -> &'static [&'static str] {
        match self {
            // Every host crate's own tests, and egress-userspace's loopback-only integration
            // test of the DNS proxy; none of them needs root or the kernel.
            Tier::Unit => &[
                "-p",
                "egress-common",
                "-p",
                "egress-userspace",
                "-p",
                "egress-tests",
                "-p",
                "xtask",
                "--lib",
                "--bins",
                "--test",
                "dns_proxy",
            ],
            // The harness crate's test files are named by tier (cargo globs `--test`).
            Tier::Kernel => &["-p", "egress-tests", "--test", "kernel_*"],
            Tier::E2e => &["-p", "egress-tests", "--test", "e2e_*"],
        }
    }
}

/// Test totals, summed over `cargo test`'s "test result:" lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; 1 ignored; …` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part
                .split_whitespace()
                .skip_while(|w| *w == "ok." || *w == "FAILED.");
            if let (Some(n), Some(what)) = (words.next(), words.next()) {
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// Runs the tiers one after another (all of them, even after a failure, as `--no-fail-fast`
/// does) and closes with one line totalling every test binary of every tier ("tests: N passed, N
/// failed, N skipped"), since cargo's own last line is that of the last binary only. Before the
/// kernel and end-to-end tiers it builds the binaries they run: `egress` belongs to another
/// package than the tests, so `cargo test` would not build it.
fn test_tiers(tiers: &[Tier], args: &[OsString]) -> anyhow::Result<()> {
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    if tiers.iter().any(|t| t.needs_root()) {
        run(Command::new(cargo()).args([
            "build",
            "-p",
            "egress-userspace",
            "-p",
            "egress-tests",
            "--bins",
        ]))?;
    }
    for &tier in tiers {
        let mut cmd = Command::new(cargo());
        cmd.arg("test")
            .args(tier.cargo_args())
            .arg("--no-fail-fast");
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        if let Err(e) = run_tests(&mut cmd, &mut totals) {
            failures.push(format!("{tier:?}: {e:#}"));
        }
    }
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output and adding its results to `totals`.
fn run_tests(cmd: &mut Command, totals: &mut Totals) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        totals.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_build(release: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(cargo());
    cmd.args(["build", "--workspace"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// The steps of ../shared/TOOLCHAIN.md, each skipped when already done.
fn bootstrap() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker links the nightly's own libLLVM (through an rpath into a folder that lasts).
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("the nightly does not report its LLVM version")?
        .to_string();
    let libllvm = std::fs::read_dir(sysroot.join("lib"))
        .with_context(|| format!("reading {}/lib", sysroot.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so") && n.contains("-rust-"))
        })
        .context("the nightly ships no libLLVM shared library")?;
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    let prefix = cargo_home.join("egress-llvm");
    let lib = prefix.join("lib");
    // bpf-linker's build links `$LLVM_PREFIX/lib/libLLVM.so`; at run time its rpath must also find
    // the library under its soname. Both names point at the nightly's libLLVM.
    let soname = libllvm.file_name().context("libLLVM has a file name")?;
    let links = [lib.join("libLLVM.so"), lib.join(soname)];
    let links_ok = links
        .iter()
        .all(|l| std::fs::read_link(l).is_ok_and(|t| t == libllvm));
    if !links_ok {
        std::fs::create_dir_all(&lib)?;
        for l in &links {
            let _ = std::fs::remove_file(l);
            std::os::unix::fs::symlink(&libllvm, l)
                .with_context(|| format!("linking {} -> {}", l.display(), libllvm.display()))?;
        }
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !links_ok || !linker_ok {
        eprintln!("xtask: installing bpf-linker against {}", libllvm.display());
        run(Command::new(cargo())
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 7.95s");
        t.add_line(
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 14,
                failed: 1,
                ignored: 1
            }
        );
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
