//! Live reload of a running `egress run` (on a test cgroup, in a test network namespace): a
//! reload storm under a prober with zero wrong verdicts, a flip that holds for the very next
//! connect, refusal of a corrupt policy with the old one untouched, dry runs, SIGHUP, and
//! `--watch` following a Kubernetes-style symlink swap.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use egress_tests::{
    Egress, EgressCmd, LoopNs, Probe, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    events, probe, wait_for,
};

/// Both allow 127.0.0.2:8000 and deny 127.0.0.3; they differ elsewhere (B also allows
/// 127.0.0.4:8000).
const POLICY_A: &str = "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n[[service]]\nname = \"only-in-a\"\ndestinations = [\"10.1.0.0/16\"]\n";
const POLICY_B: &str = "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.0/24\"]\nports = [\"7000-9000\"]\n[[block]]\nname = \"not-3\"\ndestinations = [\"127.0.0.3\"]\n[[service]]\nname = \"only-in-b\"\ndestinations = [\"2001:db8::/32\"]\n";

fn start(ns: &LoopNs, dir: &TempDir, cg: &TestCgroup, policy: &Path) -> EgressCmd {
    EgressCmd::run(ns, cg.path(), dir)
        .policy(policy)
        .events(&dir.join("events.jsonl"))
}

/// `reload --policy FILE`, which must succeed.
fn reload(run: &Egress, policy: &Path) {
    let out = run.reload(policy);
    assert!(
        out.status.success(),
        "reload {}: {}",
        policy.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `reload` events the controller wrote.
fn reload_events(dir: &TempDir) -> Vec<serde_json::Value> {
    events::of_kind(&dir.join("events.jsonl"), "reload")
}

#[test]
fn reload_storm_has_zero_wrong_verdicts() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-storm");
    let cg = TestCgroup::new();
    let a = dir.file("a.toml", POLICY_A);
    let b = dir.file("b.toml", POLICY_B);
    let run = start(&ns, &dir, &cg, &a).start();
    // Storming (in the cgroup, up to 60 s; up to 4 minutes in a VM, where 50 reloads under TCG
    // take about a minute) before the first reload.
    let stretch = egress_tests::timeout_scale().min(4);
    let mut storm = Probe::new().storm(
        &cg,
        "127.0.0.2:8000",
        "127.0.0.3:8000",
        60_000 * u64::from(stretch),
    );
    let storm_start = Instant::now();
    for i in 0..50 {
        let p = if i % 2 == 0 { &b } else { &a };
        reload(&run, p);
    }
    assert!(
        storm.running() && storm_start.elapsed() < Duration::from_secs(55) * stretch,
        "all reloads happened while the prober ran"
    );
    assert_eq!(run.generation(), 51);
    let r = storm.finish();
    eprintln!("storm: {r:?}");
    r.assert_clean("a storm of 50 reloads");
}

#[test]
fn a_flip_holds_for_the_very_next_connect_and_events_carry_generation_and_hash() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-flip");
    let cg = TestCgroup::new();
    let deny = dir.file("deny.toml", "allow_loopback = false\n");
    let allow = dir.file(
        "allow.toml",
        "allow_loopback = false\n[[service]]\nname = \"now-ok\"\ndestinations = [\"127.0.0.4\"]\n",
    );
    let run = start(&ns, &dir, &cg, &deny).start();
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.4:80")]), [Denied]);
    reload(&run, &allow);
    // Applied as generation 2 before `reload` returned: the controller says so, and so does the
    // very next connect.
    let status = run.status().expect("status --json");
    assert_eq!(status["policy"]["generation"], 2, "{status}");
    assert_eq!(
        status["policy"]["hash"],
        egress::policy::content_hash(&std::fs::read_to_string(&allow).unwrap()),
        "{status}"
    );
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.4:80")]), [Refused]);
    // And back: denied again at once; the deny event names the new generation and hash.
    reload(&run, &deny);
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.4:80")]), [Denied]);
    let status = run.status().expect("status --json");
    let hash = status["policy"]["hash"].as_str().unwrap().to_string();
    assert_eq!(
        hash,
        egress::policy::content_hash(&std::fs::read_to_string(&deny).unwrap())
    );
    let reloads = reload_events(&dir);
    assert_eq!(
        reloads
            .iter()
            .map(|r| r["generation"].as_u64())
            .collect::<Vec<_>>(),
        [Some(2), Some(3)],
        "{reloads:?}"
    );
    let denies = || events::of_kind(&dir.join("events.jsonl"), "deny");
    wait_for("both deny events", Duration::from_secs(5), || {
        denies().len() >= 2
    });
    let denies = denies();
    assert_eq!(denies.len(), 2, "{denies:?}");
    assert_eq!(
        (
            denies[0]["generation"].as_u64(),
            denies[1]["generation"].as_u64()
        ),
        (Some(1), Some(3))
    );
    assert_eq!(denies[1]["policy_hash"], hash.as_str());
}

#[test]
fn a_corrupt_reload_is_refused_and_verdicts_are_unchanged() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-corrupt");
    let cg = TestCgroup::new();
    let a = dir.file("a.toml", POLICY_A);
    let bad = dir.file(
        "bad.toml",
        "allow_loopback = false\n[[service]]\nname = \"x\"\ndestinations = [\"127.0.0.300\"]\n",
    );
    let run = start(&ns, &dir, &cg, &a).start();
    let calls = [
        ("tcp", "127.0.0.2:8000"),
        ("tcp", "127.0.0.3:8000"),
        ("tcp", "127.0.0.4:8000"),
    ];
    let before = probe(&cg, &calls);
    assert_eq!(before, [Refused, Denied, Denied]);
    let hash_before = run.status().expect("status --json")["policy"]["hash"].clone();
    let out = run.reload(&bad);
    assert_eq!(out.status.code(), Some(1));
    // The policy-error contract: file:line:column: field: message.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:4:17: service[1].destinations: ",
            bad.display()
        )),
        "{err}"
    );
    assert_eq!(probe(&cg, &calls), before);
    assert_eq!(run.generation(), 1, "nothing was applied");
    // A dry run describes and applies nothing: what it prints is the policy diff of the two
    // files (the diff's content is unit-tested), and B, which would allow 127.0.0.4:8000, is not
    // in force.
    let b = dir.file("b.toml", POLICY_B);
    let out = run.ctl(&["reload", "--dry-run", "--policy", b.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (pa, ca) = egress::policy::load(Some(&a)).unwrap();
    let (pb, cb) = egress::policy::load(Some(&b)).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        egress::policy::diff::describe(&pa, &ca, &pb, &cb)
    );
    assert_eq!(run.generation(), 1);
    assert_eq!(
        run.status().expect("status --json")["policy"]["hash"],
        hash_before
    );
    assert_eq!(probe(&cg, &calls), before);
    assert!(reload_events(&dir).is_empty(), "no reload was applied");
}

#[test]
fn sighup_and_watch_follow_the_policy_file_through_a_symlink_swap() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-watch");
    let cg = TestCgroup::new();
    dir.file("deny.toml", "allow_loopback = false\n");
    dir.file("allow.toml", "allow_loopback = false\n[[service]]\nname = \"swapped-in\"\ndestinations = [\"127.0.0.5\"]\n");
    // Kubernetes mounts a ConfigMap as a symlink that is swapped atomically on update.
    let current = dir.join("policy.toml");
    std::os::unix::fs::symlink(dir.join("deny.toml"), &current).unwrap();
    let mut run = start(&ns, &dir, &cg, &current).arg("--watch").start();
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.5:80")]), [Denied]);
    let tmp = dir.join(".policy.toml.new");
    std::os::unix::fs::symlink(dir.join("allow.toml"), &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();
    wait_for(
        "--watch to pick up the swap",
        Duration::from_secs(5),
        || probe(&cg, &[("tcp", "127.0.0.5:80")])[0] == Refused,
    );
    assert_eq!(run.generation(), 2);
    // SIGHUP re-reads the file: the same content is applied again as a new generation.
    run.signal(libc::SIGHUP);
    wait_for("SIGHUP to reload", Duration::from_secs(5), || {
        run.generation() == 3
    });
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.5:80")]), [Refused]);
}

#[test]
fn a_hundred_thousand_prefixes_apply_in_under_a_second() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-100k");
    let cg = TestCgroup::new();
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
    let run = start(&ns, &dir, &cg, &small).start();
    reload(&run, &big);
    // The `reload` event's elapsed_ms: the time to fill the inactive buffer and flip.
    let reloads = reload_events(&dir);
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    assert_eq!(reloads[0]["generation"], 2);
    let ms = reloads[0]["elapsed_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no elapsed_ms in {}", reloads[0]));
    eprintln!("100k prefixes applied in {ms} ms");
    assert!(ms < 1000.0, "{}", reloads[0]);
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:1"), ("tcp", "127.0.0.3:1")]),
        [Refused, Denied]
    );
}

/// The kubelet's ConfigMap update, step for step: the mounted directory holds `..<timestamp>/`
/// directories, `..data` pointing at the current one, and `policy.toml -> ..data/policy.toml`.
/// An update writes a new timestamped directory, points `..data_tmp` at it, renames it over
/// `..data` (atomic) and removes the old directory. `--watch` on `policy.toml` follows it.
#[test]
fn watch_follows_a_configmap_update_as_the_kubelet_makes_it() {
    let ns = LoopNs::new();
    let dir = TempDir::new("reload-configmap");
    let cg = TestCgroup::new();
    let mount = dir.join("policy");
    let write_version = |name: &str, text: &str| {
        let d = mount.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("policy.toml"), text).unwrap();
    };
    std::fs::create_dir_all(&mount).unwrap();
    write_version(
        "..2026_11_27_06_00_00.000000001",
        "allow_loopback = false\n",
    );
    std::os::unix::fs::symlink("..2026_11_27_06_00_00.000000001", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.toml", mount.join("policy.toml")).unwrap();
    let current = mount.join("policy.toml");
    let run = start(&ns, &dir, &cg, &current).arg("--watch").start();
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.5:80")]), [Denied]);
    write_version(
        "..2026_11_27_06_01_00.000000002",
        "allow_loopback = false\n[[service]]\nname = \"from-configmap\"\ndestinations = [\"127.0.0.5\"]\n",
    );
    std::os::unix::fs::symlink("..2026_11_27_06_01_00.000000002", mount.join("..data_tmp"))
        .unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join("..2026_11_27_06_00_00.000000001")).unwrap();
    wait_for(
        "--watch to follow the ConfigMap update",
        Duration::from_secs(5),
        || probe(&cg, &[("tcp", "127.0.0.5:80")])[0] == Refused,
    );
    assert_eq!(run.generation(), 2);
}
