//! Live reload of a running `egress run` (on a test cgroup, in a test network namespace): a
//! reload storm under a prober with zero wrong verdicts, a flip that holds for the very next
//! connect, refusal of a corrupt policy with the old one untouched, dry runs, SIGHUP, and
//! `--watch` following a Kubernetes-style symlink swap.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{EGRESS, LoopNs, PROBE, TempDir, probe, test_cgroup};

/// Both allow 127.0.0.2:8000 and deny 127.0.0.3; they differ elsewhere.
const POLICY_A: &str = "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n[[service]]\nname = \"only-in-a\"\ndestinations = [\"10.1.0.0/16\"]\n";
const POLICY_B: &str = "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.0/24\"]\nports = [\"7000-9000\"]\n[[block]]\nname = \"not-3\"\ndestinations = [\"127.0.0.3\"]\n[[service]]\nname = \"only-in-b\"\ndestinations = [\"2001:db8::/32\"]\n";

struct Run {
    child: Child,
    socket: std::path::PathBuf,
}

impl Run {
    fn start(ns: &LoopNs, dir: &TempDir, cg: &Path, policy: &Path, extra: &[&str]) -> Run {
        let socket = dir.0.join("control.sock");
        let child = ns
            .cmd(EGRESS)
            .args(["run", "--ephemeral"])
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(cg)
            .arg("--socket")
            .arg(&socket)
            .arg("--events")
            .arg(dir.0.join("events.jsonl"))
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let run = Run { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !run.ctl(&["status", "--json"]).status.success() {
            assert!(Instant::now() < deadline, "controller did not come up");
            thread::sleep(Duration::from_millis(50));
        }
        run
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(EGRESS)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn generation(&self) -> u64 {
        let out = self.ctl(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["policy"]["generation"].as_u64().unwrap()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

#[test]
fn reload_storm_has_zero_wrong_verdicts() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-storm");
    let cg = test_cgroup();
    let a = dir.file("a.toml", POLICY_A);
    let b = dir.file("b.toml", POLICY_B);
    let run = Run::start(&ns, &dir, cg.path(), &a, &[]);
    let prober = Command::new(PROBE)
        .arg("--cgroup")
        .arg(cg.path())
        .args(["storm", "127.0.0.2:8000", "127.0.0.3:8000", "60000"])
        .env("EGRESS_PROBE_STOP", dir.0.join("stop"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let storm_start = Instant::now();
    thread::sleep(Duration::from_millis(200));
    for i in 0..50 {
        let p = if i % 2 == 0 { &b } else { &a };
        let out = run.ctl(&["reload", "--policy", p.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "reload {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The prober ran through every reload; stop it now.
    std::fs::write(dir.0.join("stop"), b"").unwrap();
    assert!(
        storm_start.elapsed() < Duration::from_secs(55),
        "all reloads happened while the prober ran"
    );
    assert_eq!(run.generation(), 51);
    let out = prober.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("storm: {v}");
    assert_eq!(v["wrong"], 0, "{v}");
    assert!(
        v["per_sec"].as_f64().unwrap() >= 1000.0,
        "the prober must make at least 1,000 attempts/s: {v}"
    );
}

#[test]
fn a_flip_holds_for_the_very_next_connect_and_events_carry_generation_and_hash() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-flip");
    let cg = test_cgroup();
    let deny = dir.file("deny.toml", "allow_loopback = false\n");
    let allow = dir.file(
        "allow.toml",
        "allow_loopback = false\n[[service]]\nname = \"now-ok\"\ndestinations = [\"127.0.0.4\"]\n",
    );
    let run = Run::start(&ns, &dir, cg.path(), &deny, &[]);
    assert_eq!(probe(cg.path(), &[("tcp", "127.0.0.4:80")]), ["EPERM"]);
    let out = run.ctl(&["reload", "--policy", allow.to_str().unwrap()]);
    assert!(out.status.success());
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(
        msg.starts_with("applied generation 2") && msg.contains("added (1):\n  service now-ok"),
        "{msg}"
    );
    assert_eq!(
        probe(cg.path(), &[("tcp", "127.0.0.4:80")]),
        ["ECONNREFUSED"]
    );
    // And back: denied again at once; the deny event names the new generation and hash.
    assert!(
        run.ctl(&["reload", "--policy", deny.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(probe(cg.path(), &[("tcp", "127.0.0.4:80")]), ["EPERM"]);
    let status: serde_json::Value =
        serde_json::from_slice(&run.ctl(&["status", "--json"]).stdout).unwrap();
    let hash = status["policy"]["hash"].as_str().unwrap().to_string();
    assert_eq!(
        hash,
        egress::policy::content_hash(&std::fs::read_to_string(&deny).unwrap())
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(dir.0.join("events.jsonl")).unwrap_or_default();
        let denies: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["event"] == "deny")
            .collect();
        if denies.len() == 2 {
            assert_eq!(
                (
                    denies[0]["generation"].as_u64(),
                    denies[1]["generation"].as_u64()
                ),
                (Some(1), Some(3))
            );
            assert_eq!(denies[1]["policy_hash"], hash.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_corrupt_reload_is_refused_and_verdicts_are_unchanged() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-corrupt");
    let cg = test_cgroup();
    let a = dir.file("a.toml", POLICY_A);
    let bad = dir.file(
        "bad.toml",
        "allow_loopback = false\n[[service]]\nname = \"x\"\ndestinations = [\"127.0.0.300\"]\n",
    );
    let run = Run::start(&ns, &dir, cg.path(), &a, &[]);
    let before = probe(
        cg.path(),
        &[("tcp", "127.0.0.2:8000"), ("tcp", "127.0.0.3:8000")],
    );
    assert_eq!(before, ["ECONNREFUSED", "EPERM"]);
    let out = run.ctl(&["reload", "--policy", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:17: service[1].destinations:", bad.display()))
            && err.contains("127.0.0.300"),
        "{err}"
    );
    assert_eq!(
        probe(
            cg.path(),
            &[("tcp", "127.0.0.2:8000"), ("tcp", "127.0.0.3:8000")]
        ),
        before
    );
    assert_eq!(run.generation(), 1, "nothing was applied");
    // A dry run describes and applies nothing.
    let b = dir.file("b.toml", POLICY_B);
    let out = run.ctl(&["reload", "--dry-run", "--policy", b.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("added (2):")
            && text.contains("block not-3")
            && text.contains("removed (1):\n  service only-in-a"),
        "{text}"
    );
    assert!(
        text.contains("prefixes removed") && text.contains("10.1.0.0/16"),
        "{text}"
    );
    assert_eq!(run.generation(), 1);
}

#[test]
fn sighup_and_watch_follow_the_policy_file_through_a_symlink_swap() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-watch");
    let cg = test_cgroup();
    dir.file("deny.toml", "allow_loopback = false\n");
    dir.file("allow.toml", "allow_loopback = false\n[[service]]\nname = \"swapped-in\"\ndestinations = [\"127.0.0.5\"]\n");
    // Kubernetes mounts a ConfigMap as a symlink that is swapped atomically on update.
    let current = dir.0.join("policy.toml");
    std::os::unix::fs::symlink(dir.0.join("deny.toml"), &current).unwrap();
    let run = Run::start(&ns, &dir, cg.path(), &current, &["--watch"]);
    assert_eq!(probe(cg.path(), &[("tcp", "127.0.0.5:80")]), ["EPERM"]);
    let tmp = dir.0.join(".policy.toml.new");
    std::os::unix::fs::symlink(dir.0.join("allow.toml"), &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe(cg.path(), &[("tcp", "127.0.0.5:80")])[0] != "ECONNREFUSED" {
        assert!(
            Instant::now() < deadline,
            "--watch did not pick up the swap"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(run.generation(), 2);
    // SIGHUP re-reads the file: the same content is applied again as a new generation.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.generation() != 3 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        probe(cg.path(), &[("tcp", "127.0.0.5:80")]),
        ["ECONNREFUSED"]
    );
}

#[test]
fn a_hundred_thousand_prefixes_apply_in_under_a_second() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-100k");
    let cg = test_cgroup();
    let small = dir.file("small.toml", "allow_loopback = false\n");
    let mut dests = Vec::with_capacity(100_000);
    for i in 0..100_000u32 {
        let slot = (i % 65_536).wrapping_mul(40_503) % 65_536;
        dests.push(format!(
            "\"{}.{}.{}.0/24\"",
            11 + i / 65_536,
            slot >> 8,
            slot & 255
        ));
    }
    let big = dir.file(
        "big.toml",
        &format!("allow_loopback = false\n[[service]]\nname = \"big\"\ndestinations = [{}]\n[[service]]\nname = \"lo\"\ndestinations = [\"127.0.0.2\"]\n", dests.join(",")),
    );
    let run = Run::start(&ns, &dir, cg.path(), &small, &[]);
    let out = run.ctl(&["reload", "--policy", big.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "applied generation 2 (hash …) from … in 99.5 ms": the time to fill the buffer and flip.
    let ms: f64 = text
        .split(" in ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    eprintln!("100k prefixes applied in {ms} ms");
    assert!(ms < 1000.0, "{text}");
    assert_eq!(
        probe(cg.path(), &[("tcp", "127.0.0.2:1"), ("tcp", "127.0.0.3:1")]),
        ["ECONNREFUSED", "EPERM"]
    );
}
