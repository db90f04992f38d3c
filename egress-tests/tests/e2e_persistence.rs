//! Fail-closed persistence: a pinned `egress run` (on a test cgroup, pins in a test directory)
//! survives `kill -9` with every verdict intact, a restarted controller adopts the pinned state
//! and swaps the programs in place with no gap, `egress status` works without a controller, and
//! `egress stop` leaves nothing attached or pinned.

use std::time::Duration;

use egress_tests::{
    EgressCmd, LoopNs, Probe, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    controller::pin_dir,
    probe,
};

fn prog_ids(s: &serde_json::Value) -> Vec<u64> {
    s["links"]
        .as_array()
        .unwrap_or_else(|| panic!("no links in {s}"))
        .iter()
        .map(|l| l["prog_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn enforcement_survives_kill_9_a_restart_adopts_it_and_stop_removes_it() {
    let ns = LoopNs::new();
    let dir = TempDir::new("persist");
    let cg = TestCgroup::new();
    let pins = pin_dir();
    // Both allow 127.0.0.2:8000 and deny 127.0.0.3; the second differs elsewhere.
    let a = dir.file("a.toml", "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n");
    let b = dir.file("b.toml", "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n[[service]]\nname = \"extra\"\ndestinations = [\"10.9.0.0/16\"]\n");
    let pinned = |policy: &std::path::Path| {
        EgressCmd::run(&ns, cg.path(), &dir)
            .pinned(&pins)
            .policy(policy)
    };

    let mut first = pinned(&a).start();
    let before = first.status().unwrap();
    // 8 sock_addr hooks, sock_create, setsockopt, sock_release, sock_ops, skb_egress, the fork
    // and exec trackers.
    assert_eq!(before["links"].as_array().unwrap().len(), 15, "{before}");
    kernel_is_reported(&before);
    let storm = Probe::new().storm(&cg, "127.0.0.2:8000", "127.0.0.3:8000", 60_000);
    std::thread::sleep(Duration::from_millis(300));

    // kill -9: the kernel keeps enforcing, and status reads the pins.
    first.kill_9();
    std::thread::sleep(Duration::from_millis(500));
    let dead = first.status().expect("status works without a controller");
    assert_eq!(dead["controller"]["running"], false, "{dead}");
    assert_eq!(dead["policy"]["generation"], 1);
    kernel_is_reported(&dead);
    assert!(
        dead["links"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["attached"] == true),
        "{dead}"
    );

    // A restart with a changed policy adopts the pins, swaps in its programs and applies the
    // policy atomically, while the prober keeps going.
    let mut second = pinned(&b).start();
    // Two controllers never drive the same pins: a third is refused, and the second goes on.
    let mut third = pinned(&b).socket(&dir.join("other.sock")).spawn();
    let refused = third.wait_exit("a third controller on the same pins");
    assert!(!refused.success(), "{}", third.stderr_text());
    drop(third);
    let after = second.status().unwrap();
    assert_eq!(after["controller"]["pid"], second.pid(), "{after}");
    assert_eq!(
        after["policy"]["generation"], 2,
        "the changed policy was reloaded: {after}"
    );
    assert_eq!(after["links"].as_array().unwrap().len(), 15, "{after}");
    let (old_ids, new_ids) = (prog_ids(&before), prog_ids(&after));
    assert!(
        old_ids.iter().zip(&new_ids).all(|(o, n)| o != n && *n != 0),
        "programs replaced in place: {old_ids:?} -> {new_ids:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    storm
        .finish()
        .assert_clean("a storm across kill -9 and restart");

    // egress stop: nothing attached, nothing pinned, and the controller exits.
    let out = second.ctl(&["stop", "--pin-dir", pins.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(!pins.exists(), "pins removed");
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.3:8000")]),
        [Refused],
        "nothing attached any more"
    );
    let exit = second.wait_exit("the controller after egress stop");
    assert!(exit.success(), "{exit}: {}", second.stderr_text());
    assert!(
        second.status().is_none(),
        "no controller and nothing pinned: status fails"
    );
}

/// Pinned maps of another layout (another egress version) are never adopted: the restart is
/// refused with the map named, and the enforcement in place goes on as it was.
#[test]
fn pinned_maps_of_another_layout_are_refused_and_enforcement_stays() {
    let ns = LoopNs::new();
    let dir = TempDir::new("persist-layout");
    let cg = TestCgroup::new();
    let pins = pin_dir();
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let mut first = EgressCmd::run(&ns, cg.path(), &dir)
        .pinned(&pins)
        .policy(&policy)
        .start();
    first.kill_9();
    // Two maps of different shapes trade places: what a version with other layouts would leave.
    let maps = pins.join("maps");
    std::fs::rename(maps.join("IFACE_L2"), maps.join("swap")).unwrap();
    std::fs::rename(maps.join("BLOCKED"), maps.join("IFACE_L2")).unwrap();
    std::fs::rename(maps.join("swap"), maps.join("BLOCKED")).unwrap();
    // Its guard stops the pins only when dropped, after the checks below.
    let mut second = EgressCmd::run(&ns, cg.path(), &dir)
        .pinned(&pins)
        .policy(&policy)
        .spawn();
    let status = second.wait_exit("the refused restart");
    assert!(!status.success(), "adopting foreign maps must fail");
    let stderr = second.stderr_text();
    assert!(
        stderr.contains("IFACE_L2") || stderr.contains("BLOCKED"),
        "the error names the map: {stderr}"
    );
    // Still enforced: the pinned programs run on.
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.3:80")]), [Denied]);
}

/// The socket-owner map keeps the capacity it was pinned with: a bare restart adopts it, a
/// restart asking another one is refused. The LRU owner map of earlier versions is never reused
/// as the new plain hash: the restart is refused naming it (`egress stop` first), and the
/// enforcement in place goes on.
#[test]
fn the_owner_map_keeps_its_pinned_capacity_and_an_old_lru_one_is_refused() {
    use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH;
    let ns = LoopNs::new();
    let dir = TempDir::new("persist-owners");
    let cg = TestCgroup::new();
    let pins = pin_dir();
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let owners = pins.join("maps").join("SOCK_OWNERS");
    let run = |capacity: Option<&str>| {
        let cmd = EgressCmd::run(&ns, cg.path(), &dir)
            .pinned(&pins)
            .policy(&policy);
        match capacity {
            Some(n) => cmd.args(["--owners-capacity", n]),
            None => cmd,
        }
    };
    let max_entries = || aya::maps::MapInfo::from_pin(&owners).unwrap().max_entries();

    let mut first = run(Some("1024")).start();
    assert_eq!(max_entries(), 1024);
    first.kill_9();
    let mut second = run(None).start();
    assert_eq!(max_entries(), 1024, "a bare restart adopts the pinned size");
    second.kill_9();
    let mut resized = run(Some("2048")).spawn();
    assert!(!resized.wait_exit("a restart asking another size").success());
    let stderr = resized.stderr_text();
    assert!(
        stderr.contains("SOCK_OWNERS") && stderr.contains("another size"),
        "{stderr}"
    );

    // What an earlier version pinned: an LRU of the same key and value.
    std::fs::remove_file(&owners).unwrap();
    let lru = aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
        def: aya_obj::maps::bpf_map_def {
            map_type: BPF_MAP_TYPE_LRU_HASH as u32,
            key_size: 8,
            value_size: size_of::<egress_common::Owner>() as u32,
            max_entries: 131_072,
            map_flags: 0,
            id: 0,
            pinning: aya_obj::maps::PinningType::None,
        },
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    aya::maps::MapData::create(lru, "SOCK_OWNERS", None)
        .expect("creating an LRU map")
        .pin(&owners)
        .expect("pinning it");
    let mut upgraded = run(None).spawn();
    assert!(
        !upgraded
            .wait_exit("a restart over an LRU owner map")
            .success()
    );
    let stderr = upgraded.stderr_text();
    assert!(
        stderr.contains("SOCK_OWNERS") && stderr.contains("another layout"),
        "{stderr}"
    );
    // Still enforced: the pinned programs run on.
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.3:80")]), [Denied]);
}

/// The controller lock lives on the pin directory itself: a second controller that shares the
/// pins but not /run (another container on the node) is refused, and the first goes on.
#[test]
fn a_controller_that_shares_the_pins_but_not_run_is_refused() {
    let ns = LoopNs::new();
    let dir = TempDir::new("persist-lock");
    let cg = TestCgroup::new();
    let pins = pin_dir();
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let first = EgressCmd::run(&ns, cg.path(), &dir)
        .pinned(&pins)
        .policy(&policy)
        .start();
    // The second one gets a /run of its own (a fresh tmpfs in a mount namespace of its own).
    let script = format!(
        "mount -t tmpfs tmpfs /run && exec {} run --policy {} --cgroup {} --pin-dir {} --socket {}",
        egress_tests::bins::egress().display(),
        policy.display(),
        cg.path().display(),
        pins.display(),
        dir.join("second.sock").display()
    );
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .args(["--", "unshare", "-m", "sh", "-c", &script]);
    let mut second = egress_tests::ChildGuard::spawn(&mut cmd);
    let status = second.wait_within("the second controller", Duration::from_secs(20));
    // 1 is egress's own failure (a failed mount would be sh's 32).
    assert_eq!(
        status.code(),
        Some(1),
        "a second controller on the same pins must be refused: {}",
        second.stderr_text()
    );
    let s = first.status().expect("the first controller answers");
    assert_eq!(s["controller"]["pid"], first.pid(), "{s}");
}

/// `status` names the running kernel, how TC is attached on it and what it degrades: TCX from
/// 6.6, a clsact filter (and that said as degraded) before.
fn kernel_is_reported(status: &serde_json::Value) {
    let k = &status["kernel"];
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(k["release"], release.trim(), "{status}");
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap(), v.next().unwrap());
    let tcx = (major, minor) >= (6, 6);
    assert_eq!(
        k["tc_attach"],
        if tcx { "tcx" } else { "clsact" },
        "{status}"
    );
    let degraded = k["degraded"].as_array().expect("degraded is a list");
    assert_eq!(
        degraded.iter().any(|d| d.as_str().unwrap().contains("TCX")),
        !tcx,
        "{status}"
    );
    assert!(
        k.get("missing").is_none(),
        "nothing required is missing: {status}"
    );
}
