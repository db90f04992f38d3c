//! `cargo xtask`: what build.rs cannot do. Bootstraps the eBPF toolchain (rust-src on the
//! nightly, bpf-linker against the nightly's own libLLVM), builds, runs `egress` as root, and runs
//! every tier of tests.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

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
    /// Run every tier of tests: unit, real-kernel and end-to-end. Needs root: the kernel tests
    /// load eBPF and fail (never skip) when they cannot.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// fmt --check and clippy -D warnings on the host crates and the eBPF crate.
    Lint,
    /// Benchmarks against a no-firewall baseline, iptables and nftables, in namespaces and
    /// cgroups of their own (root; needs iproute2, iptables, nftables, iperf3). Prints a table and
    /// writes target/bench/results.json and results.md.
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
        Task::Test { args } => {
            bootstrap()?;
            if !is_root() {
                bail!(
                    "the kernel and end-to-end tests load eBPF programs and need root; run `sudo -E cargo xtask test`"
                );
            }
            let mut cmd = Command::new(cargo());
            cmd.args(["test", "--workspace", "--no-fail-fast"]);
            if !args.is_empty() {
                cmd.arg("--").args(&args);
            }
            run_tests(&mut cmd)
        }
        Task::Bench { quick } => {
            bootstrap()?;
            if !is_root() {
                bail!("the benchmarks load eBPF programs and create namespaces: run as root");
            }
            run(Command::new(cargo()).args([
                "build",
                "--release",
                "-p",
                "egress-userspace",
                "--bin",
                "egress-bench",
            ]))?;
            let mut cmd = Command::new(root.join("target/release/egress-bench"));
            cmd.arg("--out").arg(root.join("target/bench"));
            if quick {
                cmd.arg("--quick");
            }
            run(&mut cmd)
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

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with one line totalling every test binary
/// ("tests: N passed, N failed"), since cargo's own last line is that of the last binary only.
fn run_tests(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part
                    .split_whitespace()
                    .skip_while(|w| *w == "ok." || *w == "FAILED.");
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    writeln!(
        out,
        "\ntests: {passed} passed, {failed} failed, {ignored} skipped"
    )?;
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
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
