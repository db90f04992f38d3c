//! Fail-closed persistence: a pinned `egress run` (on a test cgroup, pins in a test directory)
//! survives `kill -9` with every verdict intact, a restarted controller adopts the pinned state
//! and swaps the programs in place with no gap, `egress status` works without a controller, and
//! `egress stop` leaves nothing attached or pinned.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{EGRESS, LoopNs, PROBE, TempDir, probe, test_cgroup};

/// Removes the test's pins whatever happens (`egress stop` on drop).
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = Command::new(EGRESS)
            .arg("stop")
            .arg("--pin-dir")
            .arg(&self.0)
            .arg("--socket")
            .arg("/nonexistent")
            .output();
    }
}

fn pin_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/egress-test-{}-{n}",
        std::process::id()
    ))
}

#[expect(
    clippy::zombie_processes,
    reason = "the child is returned; its caller kills or stops it and waits"
)]
fn start(ns: &LoopNs, cg: &Path, policy: &Path, pins: &Path, socket: &Path) -> Child {
    let mut child = ns
        .cmd(EGRESS)
        .arg("run")
        .arg("--policy")
        .arg(policy)
        .arg("--cgroup")
        .arg(cg)
        .arg("--pin-dir")
        .arg(pins)
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = status(socket, pins)
            && s["controller"]["running"] == true
        {
            return child;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("controller did not come up");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn status(socket: &Path, pins: &Path) -> Option<serde_json::Value> {
    let out = Command::new(EGRESS)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .arg("--pin-dir")
        .arg(pins)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn prog_ids(s: &serde_json::Value) -> Vec<u64> {
    s["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["prog_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn enforcement_survives_kill_9_a_restart_adopts_it_and_stop_removes_it() {
    let ns = LoopNs::new();
    let dir = TempDir::new("persist");
    let cg = test_cgroup();
    let pins = pin_dir();
    let _guard = PinGuard(pins.clone());
    let socket = dir.0.join("control.sock");
    // Both allow 127.0.0.2:8000 and deny 127.0.0.3; the second differs elsewhere.
    let a = dir.file("a.toml", "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n");
    let b = dir.file("b.toml", "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n[[service]]\nname = \"extra\"\ndestinations = [\"10.9.0.0/16\"]\n");

    let mut first = start(&ns, cg.path(), &a, &pins, &socket);
    let before = status(&socket, &pins).unwrap();
    assert_eq!(before["links"].as_array().unwrap().len(), 4, "{before}");
    let stop_file = dir.0.join("stop");
    let prober = Command::new(PROBE)
        .arg("--cgroup")
        .arg(cg.path())
        .args(["storm", "127.0.0.2:8000", "127.0.0.3:8000", "60000"])
        .env("EGRESS_PROBE_STOP", &stop_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));

    // kill -9: the kernel keeps enforcing, and status reads the pins.
    first.kill().unwrap();
    first.wait().unwrap();
    thread::sleep(Duration::from_millis(500));
    let dead = status(&socket, &pins).expect("status works without a controller");
    assert_eq!(dead["controller"]["running"], false);
    assert_eq!(dead["policy"]["generation"], 1);
    assert!(
        dead["links"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["attached"] == true),
        "{dead}"
    );
    let out = Command::new(EGRESS)
        .args(["status", "--socket"])
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("controller: not running, kernel enforcement active"),
        "{out:?}"
    );

    // A restart with a changed policy adopts the pins, swaps in its programs and applies the
    // policy atomically, while the prober keeps going.
    let second = start(&ns, cg.path(), &b, &pins, &socket);
    // Two controllers never drive the same pins.
    let third = ns
        .cmd(EGRESS)
        .arg("run")
        .arg("--policy")
        .arg(&b)
        .arg("--cgroup")
        .arg(cg.path())
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--socket")
        .arg(dir.0.join("other.sock"))
        .output()
        .unwrap();
    assert!(!third.status.success());
    assert!(
        String::from_utf8_lossy(&third.stderr).contains("another egress controller is running"),
        "{third:?}"
    );
    let after = status(&socket, &pins).unwrap();
    assert_eq!(
        after["policy"]["generation"], 2,
        "the changed policy was reloaded: {after}"
    );
    let (old_ids, new_ids) = (prog_ids(&before), prog_ids(&after));
    assert!(
        old_ids.iter().zip(&new_ids).all(|(o, n)| o != n && *n != 0),
        "programs replaced in place: {old_ids:?} -> {new_ids:?}"
    );
    thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop_file, b"").unwrap();
    let out = prober.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["wrong"], 0,
        "no wrong verdict across kill -9 and restart: {v}"
    );
    assert!(v["per_sec"].as_f64().unwrap() >= 1000.0, "{v}");

    // egress stop: nothing attached, nothing pinned, and the controller exits.
    let out = Command::new(EGRESS)
        .arg("stop")
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("detached 4 links")
            && text.contains("Enforcement is OFF"),
        "{text}"
    );
    assert!(!pins.exists(), "pins removed");
    assert_eq!(
        probe(cg.path(), &[("tcp", "127.0.0.3:8000")]),
        ["ECONNREFUSED"],
        "nothing attached any more"
    );
    let mut second = second;
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the controller did not exit after egress stop"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
