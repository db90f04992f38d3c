use std::cell::RefCell;

use super::*;
use crate::sys::proc::ExeRead;

/// Live processes by tgid, with their start times.
#[derive(Default)]
struct FakeProcs {
    alive: RefCell<HashMap<u32, u64>>,
}

impl FakeProcs {
    /// Processes that all started at tick 1.
    fn with(pids: &[u32]) -> FakeProcs {
        FakeProcs {
            alive: RefCell::new(pids.iter().map(|&p| (p, 1)).collect()),
        }
    }
}

/// The executable of process `tgid` started at `start`.
fn exe_of(tgid: u32, start: u64) -> String {
    if start == 1 {
        format!("/usr/bin/proc{tgid}")
    } else {
        format!("/usr/bin/proc{tgid}-{start}")
    }
}

impl ProcSource for FakeProcs {
    fn info(&self, tgid: u32) -> Option<ProcInfo> {
        let start = *self.alive.borrow().get(&tgid)?;
        Some(ProcInfo {
            comm: format!("proc{tgid}"),
            exe: Some(exe_of(tgid, start)),
            cmdline: format!("proc{tgid} --upload"),
            uid: Some(1000),
            gid: Some(100),
            ppid: Some(1),
            start_time: Some(start),
        })
    }
    fn start_time(&self, tgid: u32) -> Option<u64> {
        self.alive.borrow().get(&tgid).copied()
    }
    fn exe(&self, tgid: u32) -> Option<ExeRead> {
        let start = *self.alive.borrow().get(&tgid)?;
        Some(ExeRead {
            start_time: start,
            exe: Some(exe_of(tgid, start)),
        })
    }
}

fn key(tgid: u32, last_octet: u8, port: u16) -> FlowKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[198, 18, 0, last_octet]);
    FlowKey {
        cgroup_id: 7,
        tgid,
        port,
        protocol: 6,
        family: 4,
        addr,
    }
}

fn val(packets: u64, bytes: u64) -> FlowValue {
    FlowValue {
        packets,
        bytes,
        payload: bytes.saturating_sub(packets * 66),
    }
}

fn no_owner(_: u32) -> Option<String> {
    None
}

#[test]
fn cumulative_counters_become_totals_per_process_and_destination() {
    let procs = FakeProcs::with(&[10, 20]);
    let mut acct = Accounting::new();
    let t0 = Instant::now();
    acct.tick(
        &[
            (key(10, 2, 443), val(10, 10_000)),
            (key(20, 3, 80), val(1, 100)),
        ],
        t0,
        &procs,
        &no_owner,
    );
    acct.tick(
        &[
            (key(10, 2, 443), val(30, 50_000)),
            (key(10, 4, 443), val(5, 5_000)),
            (key(20, 3, 80), val(1, 100)),
        ],
        t0 + Duration::from_secs(1),
        &procs,
        &no_owner,
    );
    let snap = acct.snapshot();
    let p10 = snap.iter().find(|p| p.pid == 10).unwrap();
    assert_eq!((p10.bytes, p10.packets), (55_000, 35));
    assert_eq!(p10.comm, "proc10");
    assert_eq!(p10.exe, "/usr/bin/proc10");
    assert_eq!((p10.uid, p10.gid), (Some(1000), Some(100)));
    assert_eq!(p10.cmdline, "proc10 --upload");
    assert_eq!(p10.destinations.len(), 2);
    assert_eq!(
        (p10.destinations[0].dst.as_str(), p10.destinations[0].bytes),
        ("198.18.0.2", 50_000)
    );
    assert_eq!(p10.destinations[0].protocol, "tcp");
    let p20 = snap.iter().find(|p| p.pid == 20).unwrap();
    assert_eq!(p20.bytes, 100);
    assert_eq!(snap[0].pid, 10, "sorted by rate");
    assert!(p10.rate_bps > 0.0 && p20.rate_bps == 0.0);
}

#[test]
fn rate_follows_the_traffic() {
    let procs = FakeProcs::with(&[1]);
    let mut acct = Accounting::new();
    let t0 = Instant::now();
    let mut total = 0;
    for i in 0..20u64 {
        total += 1_000_000;
        acct.tick(
            &[(key(1, 2, 443), val(i + 1, total))],
            t0 + Duration::from_secs(i),
            &procs,
            &no_owner,
        );
    }
    let rate = acct.snapshot()[0].rate_bps;
    assert!(
        (rate - 1_000_000.0).abs() < 20_000.0,
        "steady 1 MB/s, got {rate}"
    );
    // Traffic stops: the rate decays.
    for i in 20..30u64 {
        acct.tick(
            &[(key(1, 2, 443), val(20, total))],
            t0 + Duration::from_secs(i),
            &procs,
            &no_owner,
        );
    }
    assert!(acct.snapshot()[0].rate_bps < 10_000.0);
}

#[test]
fn exited_processes_are_kept_then_aged_out_and_their_keys_deleted() {
    let procs = FakeProcs::with(&[5]);
    let mut acct = Accounting::new();
    acct.retention = Duration::from_secs(60);
    let t0 = Instant::now();
    let del = acct.tick(&[(key(5, 2, 443), val(3, 3_000))], t0, &procs, &no_owner);
    assert!(del.prune.is_empty());
    procs.alive.borrow_mut().remove(&5);
    let del = acct.tick(
        &[(key(5, 2, 443), val(4, 4_000))],
        t0 + Duration::from_secs(1),
        &procs,
        &no_owner,
    );
    assert_eq!(
        del.prune,
        vec![key(5, 2, 443)],
        "counted to the end, then deleted from the kernel"
    );
    let snap = acct.snapshot();
    assert_eq!((snap[0].bytes, snap[0].alive), (4_000, false));
    // A late packet recreates the key from zero: it still adds up.
    acct.tick(
        &[(key(5, 2, 443), val(1, 500))],
        t0 + Duration::from_secs(2),
        &procs,
        &no_owner,
    );
    assert_eq!(acct.snapshot()[0].bytes, 4_500);
    acct.tick(&[], t0 + Duration::from_secs(120), &procs, &no_owner);
    assert!(acct.snapshot().is_empty(), "aged out after the retention");
}

#[test]
fn short_lived_process_named_from_the_kernel_record() {
    let procs = FakeProcs::with(&[]);
    let mut acct = Accounting::new();
    let owner = |tgid: u32| (tgid == 99).then(|| "curl".to_string());
    let del = acct.tick(
        &[(key(99, 2, 443), val(2, 2_000))],
        Instant::now(),
        &procs,
        &owner,
    );
    let snap = acct.snapshot();
    assert_eq!(
        (snap[0].comm.as_str(), snap[0].alive, snap[0].bytes),
        ("curl", false, 2_000)
    );
    assert_eq!(del.prune.len(), 1);
}

#[test]
fn unattributed_traffic_has_its_own_owner() {
    let procs = FakeProcs::with(&[]);
    let mut acct = Accounting::new();
    acct.tick(
        &[(key(TGID_UNATTRIBUTED, 2, 5008), val(1, 60))],
        Instant::now(),
        &procs,
        &no_owner,
    );
    let snap = acct.snapshot();
    assert_eq!(snap.len(), 1);
    assert!(snap[0].unattributed && snap[0].alive);
    assert_eq!((snap[0].pid, snap[0].comm.as_str()), (0, "[unattributed]"));
}

#[test]
fn idle_flows_are_pruned_and_resume_from_zero() {
    let procs = FakeProcs::with(&[3]);
    let mut acct = Accounting::new();
    let t0 = Instant::now();
    let k = key(3, 2, 443);
    acct.tick(&[(k, val(1, 1_000))], t0, &procs, &no_owner);
    let mut pruned = Vec::new();
    for i in 1..=IDLE_TICKS {
        pruned = acct
            .tick(
                &[(k, val(1, 1_000))],
                t0 + Duration::from_millis(250 * i as u64),
                &procs,
                &no_owner,
            )
            .prune;
    }
    assert_eq!(
        pruned,
        vec![k],
        "idle for {IDLE_TICKS} readings: deleted from the kernel"
    );
    // The kernel recreates the key on the next packet: counted from zero, nothing lost.
    acct.tick(
        &[(k, val(1, 700))],
        t0 + Duration::from_secs(20),
        &procs,
        &no_owner,
    );
    assert_eq!(acct.snapshot()[0].bytes, 1_700);
}

#[test]
fn a_reused_pid_is_a_new_process() {
    let procs = FakeProcs::with(&[8]);
    let mut acct = Accounting::new();
    let t0 = Instant::now();
    acct.tick(&[(key(8, 2, 443), val(1, 1_000))], t0, &procs, &no_owner);
    procs.alive.borrow_mut().remove(&8);
    acct.tick(&[], t0 + Duration::from_secs(1), &procs, &no_owner);
    assert!(!acct.snapshot()[0].alive);
    // The pid comes back: another process.
    procs.alive.borrow_mut().insert(8, 2);
    acct.tick(
        &[(key(8, 3, 80), val(1, 50))],
        t0 + Duration::from_secs(2),
        &procs,
        &no_owner,
    );
    let snap = acct.snapshot();
    assert_eq!(snap.len(), 1);
    assert!(snap[0].alive);
    assert_eq!(snap[0].bytes, 50, "the new process starts from zero");
    assert_eq!(
        snap[0].exe, "/usr/bin/proc8-2",
        "and is named by its own executable"
    );
}

#[test]
fn a_pid_reused_between_two_readings_is_a_new_process() {
    // Process 8 exits and its pid goes to another process before any reading saw it gone: the
    // start time tells them apart.
    let procs = FakeProcs::with(&[8]);
    let mut acct = Accounting::new();
    let t0 = Instant::now();
    acct.tick(&[(key(8, 2, 443), val(1, 1_000))], t0, &procs, &no_owner);
    procs.alive.borrow_mut().insert(8, 500);
    acct.tick(
        &[(key(8, 3, 80), val(1, 50))],
        t0 + Duration::from_secs(1),
        &procs,
        &no_owner,
    );
    let snap = acct.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(
        (snap[0].bytes, snap[0].exe.as_str(), snap[0].alive),
        (50, "/usr/bin/proc8-500", true)
    );
    // Seen at the end of a reading with no traffic: the old process is marked exited.
    let procs = FakeProcs::with(&[9]);
    let mut acct = Accounting::new();
    acct.tick(&[(key(9, 2, 443), val(1, 1_000))], t0, &procs, &no_owner);
    procs.alive.borrow_mut().insert(9, 700);
    let out = acct.tick(&[], t0 + Duration::from_secs(1), &procs, &no_owner);
    assert!(!acct.snapshot()[0].alive);
    assert_eq!(out.prune, vec![key(9, 2, 443)], "its counters are final");
}

#[test]
fn a_process_gone_before_it_was_read_has_no_executable() {
    let procs = FakeProcs::with(&[]);
    let mut acct = Accounting::new();
    acct.tick(
        &[(key(77, 2, 443), val(1, 100))],
        Instant::now(),
        &procs,
        &|_| Some("curl".into()),
    );
    let p = &acct.snapshot()[0];
    assert_eq!((p.comm.as_str(), p.exe.as_str(), p.gid), ("curl", "", None));
}

#[test]
fn primed_history_is_not_new_traffic() {
    // After adopting pinned counters, their history must not count as one tick's traffic.
    let procs = FakeProcs::with(&[4]);
    let mut acct = Accounting::new();
    let t0 = Instant::now();
    acct.prime(&[(key(4, 2, 443), val(1000, 900_000_000))]);
    let out = acct.tick(
        &[(key(4, 2, 443), val(1001, 900_001_000))],
        t0,
        &procs,
        &no_owner,
    );
    assert_eq!(out.deltas.len(), 1);
    assert_eq!(
        out.deltas[0].1.bytes, 1_000,
        "only what came after the adoption"
    );
}
