use super::*;
use crate::policy::Policy;

fn alerts(text: &str) -> Vec<Alert> {
    Policy::parse("t.toml", text)
        .unwrap_or_else(|e| panic!("{e}"))
        .alerts
}

fn flow(tgid: u32, last: u8, port: u16) -> FlowKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[198, 18, 0, last]);
    FlowKey {
        cgroup_id: 9,
        tgid,
        port,
        protocol: 6,
        family: 4,
        addr,
    }
}

fn bytes(n: u64) -> FlowValue {
    FlowValue {
        packets: 1,
        bytes: n + 66,
        payload: n,
    }
}

fn any_verdict(_: &FlowKey) -> FlowVerdict {
    FlowVerdict {
        rule: "default".into(),
        approved_by_service: false,
    }
}

/// Processes: 500-599 run /usr/bin/rsync (uid 1000 for even pids, 1001 for odd ones); 900-999
/// exited before their executable was read; every other pid runs its own /bin/pPID as root.
fn info(pid: u32) -> ProcInfo {
    match pid {
        500..=599 => ProcInfo {
            comm: "rsync".into(),
            exe: Some("/usr/bin/rsync".into()),
            cmdline: "rsync -a /data remote:".into(),
            uid: Some(1000 + pid % 2),
            gid: Some(100),
            ppid: Some(1),
            start_time: Some(1),
        },
        900..=999 => ProcInfo {
            comm: "ghost".into(),
            ..ProcInfo::default()
        },
        _ => ProcInfo {
            comm: format!("p{pid}"),
            exe: Some(format!("/bin/p{pid}")),
            cmdline: format!("p{pid} -x"),
            uid: Some(0),
            gid: Some(0),
            ppid: Some(1),
            start_time: Some(1),
        },
    }
}

struct Clock {
    start: Instant,
    wall: SystemTime,
}

impl Clock {
    fn at(&self, secs: f64) -> (Instant, SystemTime) {
        let d = Duration::from_secs_f64(secs);
        (self.start + d, self.wall + d)
    }
}

fn run(
    engine: &mut AlertEngine,
    clock: &Clock,
    secs: f64,
    deltas: &[(FlowKey, FlowValue)],
) -> Vec<Firing> {
    let (now, wall) = clock.at(secs);
    engine.observe(deltas, now, wall, &any_verdict, &info)
}

const ONE_MB_10S: &str =
    "[[alert]]\nname = \"bulk\"\nbytes = \"1MB\"\nwindow = \"10s\"\ncooldown = \"60s\"\n";

#[test]
fn sliding_window_sums_exactly_the_last_window() {
    let mut w = SlidingWindow::new(Duration::from_secs(10));
    let s = Duration::from_secs;
    w.add(s(0), 100);
    w.add(s(5), 50);
    assert_eq!(w.sum(s(9)), 150);
    assert_eq!(w.sum(s(10)), 50, "the first bucket left the window");
    assert_eq!(w.sum(s(15)), 0);
    // Long windows use coarser buckets, still covering the window to within one bucket.
    let mut h = SlidingWindow::new(Duration::from_secs(3600));
    h.add(s(0), 1);
    h.add(s(3599), 1);
    assert_eq!(h.sum(s(3599)), 2);
    assert_eq!(h.sum(s(3600 + 15)), 1);
}

#[test]
fn twice_the_threshold_fires_exactly_once() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut e = AlertEngine::new(alerts(ONE_MB_10S), clock.start);
    let mut fired = Vec::new();
    for i in 0..20 {
        fired.extend(run(
            &mut e,
            &clock,
            i as f64 * 0.25,
            &[(flow(42, 2, 443), bytes(100_000))],
        ));
    }
    assert_eq!(
        fired.len(),
        1,
        "2 MB in 5 s over a 1 MB threshold: one alert"
    );
    let ev = &fired[0].event;
    assert_eq!(
        (ev.rule.as_str(), ev.key.as_str(), ev.pid),
        ("bulk", "process:42", Some(42))
    );
    assert_eq!(
        (ev.exe.as_str(), ev.cmdline.as_str(), ev.ppid),
        ("/bin/p42", "p42 -x", Some(1))
    );
    assert_eq!(ev.bytes_in_window, 1_000_000);
    assert_eq!(ev.top_destinations[0].dst, "198.18.0.2");
    assert_eq!(ev.cgroup_id, 9);
    assert_eq!(ev.action, AlertAction::Alert);
    assert!(fired[0].block_for.is_none());
}

#[test]
fn under_the_threshold_never_fires() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut e = AlertEngine::new(alerts(ONE_MB_10S), clock.start);
    // 100 kB/s for a minute: 1 MB is never inside one 10 s window.
    for i in 0..60 {
        assert!(
            run(
                &mut e,
                &clock,
                i as f64,
                &[(flow(1, 2, 443), bytes(95_000))]
            )
            .is_empty()
        );
    }
}

#[test]
fn a_transfer_split_across_a_boundary_is_caught() {
    // 600 kB at t=8 s and 600 kB at t=12 s: fixed 10 s buckets ([0,10) and [10,20)) would each
    // see 600 kB and miss it; the sliding window sees 1.2 MB.
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut e = AlertEngine::new(alerts(ONE_MB_10S), clock.start);
    assert!(run(&mut e, &clock, 8.0, &[(flow(7, 2, 443), bytes(600_000))]).is_empty());
    let f = run(&mut e, &clock, 12.0, &[(flow(7, 2, 443), bytes(600_000))]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].event.bytes_in_window, 1_200_000);
}

#[test]
fn cooldown_deduplicates_per_key_and_keys_are_independent() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut e = AlertEngine::new(alerts(ONE_MB_10S), clock.start);
    assert_eq!(
        run(
            &mut e,
            &clock,
            0.0,
            &[
                (flow(1, 2, 443), bytes(2_000_000)),
                (flow(2, 2, 443), bytes(2_000_000))
            ]
        )
        .len(),
        2
    );
    // Still over budget within the cooldown: silent.
    assert!(run(&mut e, &clock, 30.0, &[(flow(1, 2, 443), bytes(2_000_000))]).is_empty());
    // After the cooldown: again.
    assert_eq!(
        run(&mut e, &clock, 61.0, &[(flow(1, 2, 443), bytes(2_000_000))]).len(),
        1
    );
}

#[test]
fn per_destination_and_cgroup_keys_name_the_top_process() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let text = "[[alert]]\nname = \"to-dst\"\nbytes = \"1MB\"\nwindow = \"10s\"\nper = \"destination\"\n[[alert]]\nname = \"cg\"\nbytes = \"1MB\"\nwindow = \"10s\"\nper = \"cgroup\"\n";
    let mut e = AlertEngine::new(alerts(text), clock.start);
    let f = run(
        &mut e,
        &clock,
        0.0,
        &[
            (flow(1, 2, 443), bytes(300_000)),
            (flow(2, 2, 443), bytes(800_000)),
        ],
    );
    assert_eq!(f.len(), 2);
    let dst = f.iter().find(|f| f.event.rule == "to-dst").unwrap();
    assert_eq!(
        (dst.event.key.as_str(), dst.event.pid),
        ("destination:198.18.0.2", Some(2))
    );
    let cg = f.iter().find(|f| f.event.rule == "cg").unwrap();
    assert_eq!(cg.event.key, "cgroup:9");
}

#[test]
fn filters_select_the_counted_traffic() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let text = "[[service]]\nname = \"proxy\"\ndestinations = [\"198.18.0.2\"]\n[[alert]]\nname = \"not-proxy\"\nbytes = \"1MB\"\nwindow = \"10s\"\nunapproved_only = true\n[[alert]]\nname = \"lab-only\"\nbytes = \"1MB\"\nwindow = \"10s\"\ndestinations = [\"198.18.0.0/24\"]\nexclude_destinations = [\"198.18.0.3\"]\n";
    let mut e = AlertEngine::new(alerts(text), clock.start);
    let verdict = |k: &FlowKey| {
        let proxy = k.addr[3] == 2;
        FlowVerdict {
            rule: if proxy {
                "proxy".into()
            } else {
                "default".into()
            },
            approved_by_service: proxy,
        }
    };
    let (now, wall) = clock.at(0.0);
    let f = e.observe(
        &[
            (flow(1, 2, 443), bytes(2_000_000)),
            (flow(2, 3, 443), bytes(2_000_000)),
        ],
        now,
        wall,
        &verdict,
        &info,
    );
    let names: Vec<(&str, &str)> = f
        .iter()
        .map(|f| (f.event.rule.as_str(), f.event.key.as_str()))
        .collect();
    assert!(names.contains(&("not-proxy", "process:2")), "{names:?}");
    assert!(names.contains(&("lab-only", "process:1")), "{names:?}");
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn block_action_carries_its_duration_and_unattributed_traffic_is_not_keyed_by_process() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let text = "[[alert]]\nname = \"budget\"\nbytes = \"1MB\"\nwindow = \"10s\"\naction = \"block\"\ncooldown = \"2m\"\n";
    let mut e = AlertEngine::new(alerts(text), clock.start);
    let f = run(
        &mut e,
        &clock,
        0.0,
        &[
            (flow(5, 2, 443), bytes(2_000_000)),
            (flow(TGID_UNATTRIBUTED, 2, 443), bytes(2_000_000)),
        ],
    );
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].block_for, Some(Duration::from_secs(120)));
    assert_eq!(f[0].event.action, AlertAction::Block);
    assert!(f[0].event.blocked_until.is_some());
}

#[test]
fn keys_round_trip_through_text() {
    for k in [
        AlertKey::Process(12),
        AlertKey::Destination("2001:db8::1".parse().unwrap()),
        AlertKey::ProcessDestination(3, "198.18.0.2".parse().unwrap()),
        AlertKey::Cgroup(77),
        AlertKey::User(1001),
        AlertKey::Executable(ExeName::Path("/usr/bin/rsync".into())),
        AlertKey::Executable(ExeName::Path("/opt/a b/app (deleted)".into())),
        AlertKey::Executable(ExeName::Comm("ghost".into())),
    ] {
        assert_eq!(AlertKey::parse(&k.text()), Ok(k));
    }
    assert_eq!(
        AlertKey::parse("executable:/usr/bin/rsync").map(|k| k.text()),
        Ok("executable:/usr/bin/rsync".into())
    );
    for bad in ["executable:rsync", "executable:comm:", "executable:"] {
        assert!(AlertKey::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(AlertKey::parse("1234"), Ok(AlertKey::Process(1234)));
    assert!(
        AlertKey::parse("pid=3")
            .unwrap_err()
            .contains("expected process:PID")
    );
}

#[test]
fn per_user_sums_every_process_of_the_user_so_forking_does_not_dodge_it() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let text = "[[alert]]\nname = \"user-budget\"\nbytes = \"1MB\"\nwindow = \"10s\"\nper = \"user\"\naction = \"block\"\ncooldown = \"1m\"\n";
    let mut e = AlertEngine::new(alerts(text), clock.start);
    // Three processes of the same user (the test's `info` says uid 0), each well under the
    // budget: together over it.
    let f = run(
        &mut e,
        &clock,
        0.0,
        &[
            (flow(31, 2, 443), bytes(400_000)),
            (flow(32, 2, 443), bytes(400_000)),
            (flow(33, 2, 443), bytes(400_000)),
        ],
    );
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].key, AlertKey::User(0));
    assert_eq!(f[0].event.key, "user:0");
    assert_eq!(f[0].block_for, Some(Duration::from_secs(60)));
    assert_eq!(f[0].event.action, AlertAction::Block);
}

const PER_EXE: &str = "[[alert]]\nname = \"exe-budget\"\nbytes = \"1MB\"\nwindow = \"10s\"\nper = \"executable\"\naction = \"block\"\ncooldown = \"1m\"\n";

#[test]
fn per_executable_sums_every_process_running_it_and_nothing_else() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut e = AlertEngine::new(alerts(PER_EXE), clock.start);
    // Three rsync processes (two users), each under the budget, together over it; another
    // program sending as much is counted on its own.
    let f = run(
        &mut e,
        &clock,
        0.0,
        &[
            (flow(501, 2, 873), bytes(300_000)),
            (flow(502, 2, 873), bytes(500_000)),
            (flow(503, 3, 873), bytes(300_000)),
            (flow(42, 2, 443), bytes(900_000)),
            (flow(TGID_UNATTRIBUTED, 2, 443), bytes(900_000)),
        ],
    );
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        f[0].key,
        AlertKey::Executable(ExeName::Path("/usr/bin/rsync".into()))
    );
    let ev = &f[0].event;
    assert_eq!(
        (ev.key.as_str(), ev.per.as_str(), ev.exe.as_str()),
        ("executable:/usr/bin/rsync", "executable", "/usr/bin/rsync")
    );
    assert_eq!(ev.bytes_in_window, 1_100_000);
    assert_eq!(
        (ev.pid, ev.uid, ev.gid),
        (Some(502), Some(1000), Some(100)),
        "the process that sent most"
    );
    assert_eq!(f[0].block_for, Some(Duration::from_secs(60)));
    assert!(ev.blocked_pids.is_empty(), "filled by the controller");
}

#[test]
fn per_executable_groups_processes_whose_executable_is_unknown_by_name() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut e = AlertEngine::new(alerts(PER_EXE), clock.start);
    let f = run(
        &mut e,
        &clock,
        0.0,
        &[
            (flow(901, 2, 443), bytes(600_000)),
            (flow(902, 2, 443), bytes(600_000)),
        ],
    );
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].event.key, "executable:comm:ghost");
    assert_eq!(
        (f[0].event.exe.as_str(), f[0].event.comm.as_str()),
        ("", "ghost")
    );
    let AlertKey::Executable(name) = &f[0].key else {
        panic!("{:?}", f[0].key)
    };
    assert_eq!(
        name.path(),
        None,
        "a name-only key has no executable to block"
    );
}

#[test]
fn per_user_keys_each_uid_apart() {
    let clock = Clock {
        start: Instant::now(),
        wall: SystemTime::now(),
    };
    let text =
        "[[alert]]\nname = \"user-budget\"\nbytes = \"1MB\"\nwindow = \"10s\"\nper = \"user\"\n";
    let mut e = AlertEngine::new(alerts(text), clock.start);
    // rsync 501 and 503 run as uid 1001, 502 as uid 1000.
    let f = run(
        &mut e,
        &clock,
        0.0,
        &[
            (flow(501, 2, 873), bytes(600_000)),
            (flow(503, 2, 873), bytes(600_000)),
            (flow(502, 2, 873), bytes(900_000)),
        ],
    );
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].key, AlertKey::User(1001));
    let ev = &f[0].event;
    assert_eq!(
        (ev.key.as_str(), ev.uid, ev.bytes_in_window),
        ("user:1001", Some(1001), 1_200_000)
    );
    assert_eq!(ev.exe, "/usr/bin/rsync");
    let json = serde_json::to_value(ev).unwrap();
    assert_eq!(json["gid"], 100);
    assert!(
        json.get("user").is_none(),
        "the controller names the user: {json}"
    );
    assert!(json.get("blocked_pids").is_none(), "{json}");
}
