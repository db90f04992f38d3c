//! Shared helpers of the real-kernel and end-to-end tests. Every test makes its own child cgroup
//! (never the root) and removes it on drop, also when the test fails. Traffic goes to loopback
//! addresses only.
#![allow(dead_code, reason = "each test crate uses a different subset")]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use egress::cgroup::{ChildCgroup, cgroup2_root};

pub const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
pub const EGRESS: &str = env!("CARGO_BIN_EXE_egress");

/// A fresh child cgroup of the cgroup2 root, removed on drop.
pub fn test_cgroup() -> ChildCgroup {
    let root = cgroup2_root().expect("cgroup2 must be available (tests run as root)");
    ChildCgroup::create(&root, "egress-test").expect("creating a test cgroup (are we root?)")
}

/// Runs egress-probe inside `cgroup` and returns one result string per call ("ok", "EPERM", ...).
pub fn probe(cgroup: &Path, calls: &[(&str, &str)]) -> Vec<String> {
    let (results, _pid) = probe_with_pid(cgroup, calls);
    results
}

/// As [`probe`], also returning the probe's pid.
pub fn probe_with_pid(cgroup: &Path, calls: &[(&str, &str)]) -> (Vec<String>, u32) {
    let mut cmd = Command::new(PROBE);
    cmd.arg("--cgroup").arg(cgroup);
    for (op, dst) in calls {
        cmd.arg(op).arg(dst);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawning egress-probe");
    let pid = child.id();
    let out = child.wait_with_output().expect("egress-probe output");
    assert!(out.status.success(), "egress-probe failed: {:?}", out);
    (parse_probe(&out.stdout, calls.len()), pid)
}

pub fn parse_probe(stdout: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(stdout);
    let results: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}"));
            v["result"].as_str().expect("result").to_string()
        })
        .collect();
    assert_eq!(results.len(), n, "probe output: {text}");
    results
}

/// Did the firewall let the call through? ECONNREFUSED means it reached a closed port.
pub fn passed(result: &str) -> bool {
    match result {
        "ok" | "ECONNREFUSED" => true,
        "EPERM" => false,
        other => panic!("unexpected probe result {other}"),
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("egress-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
