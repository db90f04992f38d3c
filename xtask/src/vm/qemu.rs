//! Boots a kernel under QEMU and follows the guest: the first serial port (the console: kernel
//! and test output) is echoed with the kernel's label and its `test result:` lines totalled; the
//! second carries the guest's `@@EGRESS-VM` markers (boot, each binary's exit code, the end).
//!
//! KVM is tried first when /dev/kvm exists; a guest that has not reported its boot within
//! [`KVM_BOOT_TIMEOUT`] is killed and booted again under TCG (`-accel tcg -cpu max`), whose
//! timeouts are longer. `EGRESS_VM_ACCEL=tcg|kvm` forces one.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Totals;

/// How long a KVM guest may take to report its boot before TCG is used instead. On this project's
/// CI machine `-enable-kvm` hangs after the BIOS; a working KVM boots in about a second.
pub const KVM_BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a TCG guest may take to report its boot (Debian's 6.1 needs about 2 s on a loaded
/// 2-core host; module loading and 9p add a few more).
pub const TCG_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What to boot.
pub struct Boot<'a> {
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    /// The script the guest runs (a host path, seen through the 9p share).
    pub script: &'a Path,
    /// The workspace (test binaries, `egress`, the run's script): shared again on its own and
    /// mounted at its own path in the guest, so that it is seen even where the guest puts a
    /// fresh tmpfs over the host's root (a clone under /tmp, as CI makes).
    pub workspace: &'a Path,
    /// Where the serial logs go.
    pub dir: &'a Path,
    /// The whole run's limit, boot included.
    pub timeout: Duration,
    pub cpus: u32,
    /// Possible CPUs (`maxcpus`: the rest hot-pluggable), when more than `cpus`.
    pub max_cpus: Option<u32>,
    pub memory_mib: u32,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `uname -r` in the guest.
    pub release: Option<String>,
    /// Each test binary's name and exit code, in order.
    pub results: Vec<(String, i32)>,
    /// Binaries started and never finished (the run timed out in them).
    pub unfinished: Vec<String>,
    /// Modules that failed to load.
    pub module_failures: Vec<String>,
    /// A fatal guest error (e.g. the 9p mount failed).
    pub fatal: Option<String>,
    /// The script's exit code, when it ended.
    pub exit: Option<i32>,
    pub timed_out: bool,
    pub accel: Option<Accel>,
    pub totals: Totals,
    pub elapsed: Duration,
}

/// The line without its ANSI escape sequences and control characters (libtest colours `ok`
/// and `FAILED` on a terminal, and the guest's console is one).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then one final byte in @..~.
            if chars.clone().next() == Some('[') {
                chars.next();
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
            continue;
        }
        // The terminal's other controls (libtest's `tput sgr0` ends with SI, \x0f).
        if c.is_control() {
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses the marker file into `out` (idempotent: it is re-read whole).
pub fn parse_markers(text: &str, out: &mut Outcome) {
    out.results.clear();
    out.unfinished.clear();
    out.module_failures.clear();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("@@EGRESS-VM ") else {
            continue;
        };
        let (what, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match what {
            "booted" => out.release = Some(arg.to_string()),
            "start" => out.unfinished.push(arg.to_string()),
            "result" => {
                if let Some((name, code)) = arg.rsplit_once(' ') {
                    out.unfinished.retain(|n| n != name);
                    out.results
                        .push((name.to_string(), code.trim().parse().unwrap_or(-1)));
                }
            }
            "modfail" => out.module_failures.push(arg.to_string()),
            "fatal" => out.fatal = Some(arg.to_string()),
            "exit" => out.exit = arg.trim().parse().ok(),
            _ => {}
        }
    }
}

fn qemu_command(b: &Boot, accel: Accel, markers: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    match accel {
        Accel::Kvm => c.args(["-enable-kvm", "-cpu", "host"]),
        Accel::Tcg => c.args(["-accel", "tcg", "-cpu", "max"]),
    };
    let smp = match b.max_cpus {
        Some(max) if max > b.cpus => format!("{},maxcpus={max}", b.cpus),
        _ => b.cpus.to_string(),
    };
    c.arg("-smp")
        .arg(smp)
        .arg("-m")
        .arg(b.memory_mib.to_string())
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init egress.script={} egress.workspace={}",
            b.script.display(),
            b.workspace.display()
        ))
        // The host's root, read-only: the guest runs the host's binaries and tools on it.
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=workspace,security_model=none,readonly=on,multidevs=remap",
            b.workspace.display()
        ))
        // No network device: the guest reaches nothing of the host's but the read-only share.
        .args(["-nic", "none", "-serial", "stdio", "-serial"])
        .arg(format!("file:{}", markers.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One boot under `accel`. `Ok(None)` when a KVM guest did not report its boot in time.
fn boot_once(b: &Boot, accel: Accel) -> anyhow::Result<Option<Outcome>> {
    std::fs::create_dir_all(b.dir)?;
    let markers = b.dir.join("markers.log");
    let console = b.dir.join("console.log");
    let _ = std::fs::remove_file(&markers);
    let mut cmd = qemu_command(b, accel, &markers);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let totals = Arc::new(Mutex::new(Totals::default()));
    let label = b.label.to_string();
    let mut log = std::fs::File::create(&console)
        .with_context(|| format!("creating {}", console.display()))?;
    let echo_totals = Arc::clone(&totals);
    let echo = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\r', '\n']);
            let _ = writeln!(log, "{line}");
            println!("[{label}] {line}");
            if let Ok(mut t) = echo_totals.lock() {
                t.add_line(strip_ansi(line).trim_start());
            }
            buf.clear();
        }
    });
    let boot_limit = match accel {
        Accel::Kvm => KVM_BOOT_TIMEOUT,
        Accel::Tcg => TCG_BOOT_TIMEOUT,
    };
    let mut out = Outcome {
        accel: Some(accel),
        ..Outcome::default()
    };
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let text = std::fs::read_to_string(&markers).unwrap_or_default();
        parse_markers(&text, &mut out);
        let exited = child.try_wait()?.is_some();
        if exited && out.release.is_none() && accel == Accel::Kvm {
            let _ = echo.join();
            eprintln!(
                "xtask: [{}] QEMU ended before the guest booted under KVM: using TCG",
                b.label
            );
            return Ok(None);
        }
        if exited {
            break;
        }
        if out.release.is_none() && start.elapsed() > boot_limit {
            kill(&mut child);
            let _ = echo.join();
            if accel == Accel::Kvm {
                eprintln!(
                    "xtask: [{}] no boot under KVM in {:?}: using TCG",
                    b.label, KVM_BOOT_TIMEOUT
                );
                return Ok(None);
            }
            bail!(
                "[{}] the guest did not boot in {:?} (console: {})",
                b.label,
                boot_limit,
                console.display()
            );
        }
        if start.elapsed() > b.timeout {
            eprintln!(
                "xtask: [{}] the run passed its limit of {} min: stopping the VM",
                b.label,
                b.timeout.as_secs() / 60
            );
            kill(&mut child);
            out.timed_out = true;
            break;
        }
    }
    let _ = echo.join();
    let text = std::fs::read_to_string(&markers).unwrap_or_default();
    parse_markers(&text, &mut out);
    out.totals = *totals
        .lock()
        .map_err(|_| anyhow::anyhow!("a poisoned lock"))?;
    out.elapsed = start.elapsed();
    Ok(Some(out))
}

/// The accelerator to try first: `EGRESS_VM_ACCEL`, else KVM when /dev/kvm exists.
pub fn first_accel() -> anyhow::Result<Accel> {
    match std::env::var("EGRESS_VM_ACCEL").ok().as_deref() {
        Some("tcg") => Ok(Accel::Tcg),
        Some("kvm") => Ok(Accel::Kvm),
        Some(other) => bail!("EGRESS_VM_ACCEL={other}: expected tcg or kvm"),
        None if Path::new("/dev/kvm").exists() => Ok(Accel::Kvm),
        None => Ok(Accel::Tcg),
    }
}

/// Boots under `*accel`, falling back to TCG (and remembering it in `*accel`) when KVM stalls.
pub fn boot(b: &Boot, accel: &mut Accel) -> anyhow::Result<Outcome> {
    if *accel == Accel::Kvm {
        if let Some(out) = boot_once(b, Accel::Kvm)? {
            return Ok(out);
        }
        *accel = Accel::Tcg;
    }
    boot_once(b, Accel::Tcg)?.context("a TCG boot always reports")
}

/// The run directory of a kernel.
pub fn run_dir(root: &Path, label: &str) -> PathBuf {
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    root.join("target/vm/runs").join(safe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coloured_result_lines_are_counted() {
        let mut t = Totals::default();
        t.add_line(&strip_ansi(
            "test result: \u{1b}[32mok\u{1b}[m\u{f}. 20 passed; 0 failed; 0 ignored; 0 measured",
        ));
        t.add_line(&strip_ansi(
            "test result: \u{1b}[31mFAILED\u{1b}[m. 2 passed; 2 failed; 0 ignored",
        ));
        assert_eq!((t.passed, t.failed), (22, 2));
    }

    #[test]
    fn markers_give_results_and_unfinished_binaries() {
        let mut out = Outcome::default();
        parse_markers(
            "@@EGRESS-VM booted 6.1.0-56-amd64\n@@EGRESS-VM modfail dummy\n@@EGRESS-VM start kernel_tc\n@@EGRESS-VM result kernel_tc 0\n@@EGRESS-VM start kernel_dns\n@@EGRESS-VM result kernel_dns 101\nnoise\n@@EGRESS-VM start e2e_cli\n",
            &mut out,
        );
        assert_eq!(out.release.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(
            out.results,
            [
                ("kernel_tc".to_string(), 0),
                ("kernel_dns".to_string(), 101)
            ]
        );
        assert_eq!(out.unfinished, ["e2e_cli"]);
        assert_eq!(out.module_failures, ["dummy"]);
        assert_eq!(out.exit, None);
        parse_markers("@@EGRESS-VM exit 1\n", &mut out);
        assert_eq!(out.exit, Some(1));
    }
}
