//! End-to-end tests of high-volume transfer alerts and kernel-enforced byte budgets, between two
//! test network namespaces: one alert per crossing (within a second, with pid and exe), none under
//! the threshold, a transfer split across a window boundary, `block` stopping an in-flight upload
//! while another process keeps working, `unblock`, and webhook delivery through the spool.

use std::time::{Duration, Instant};

use egress_tests::{
    EgressCmd, HttpServer, NetPair, Probe, TcpSink, TempDir, TestCgroup,
    Verdict::{Denied, Succeeded},
    events,
    netns::{ADDR_B, VETH_A},
    probe::{CallLine, calls_so_far, parse_calls},
    wait_for,
};

/// TCP sinks in namespace b, on each of `ports`.
fn sinks(pair: &NetPair, ports: &[u16]) -> Vec<TcpSink> {
    ports
        .iter()
        .map(|&p| TcpSink::start(&pair.b, (ADDR_B, p)))
        .collect()
}

fn policy(alert: &str) -> String {
    format!(
        "allow_loopback = true\n[[service]]\nname = \"lab\"\ndestinations = [\"198.18.0.0/24\"]\nports = [\"5001-5100\"]\nprotocols = [\"tcp\"]\n{alert}"
    )
}

/// Runs the probe under `egress exec` in namespace a, events to `<dir>/events.jsonl`; returns
/// the probe's lines.
fn exec_probe(
    pair: &NetPair,
    dir: &TempDir,
    policy_text: &str,
    extra: &[&str],
    probe_args: &[&str],
) -> Vec<CallLine> {
    let policy = dir.file("p.toml", policy_text);
    let out = EgressCmd::exec(&pair.a)
        .iface(VETH_A)
        .policy(&policy)
        .events(&dir.join("events.jsonl"))
        .args(extra)
        .probe(probe_args)
        .success();
    parse_calls(&out.stdout)
}

#[test]
fn twice_the_threshold_raises_exactly_one_alert_within_a_second() {
    let pair = NetPair::new();
    let dir = TempDir::new("alert-once");
    let _sinks = sinks(&pair, &[5001]);
    let alert = "[[alert]]\nname = \"bulk-upload\"\nbytes = \"2MiB\"\nwindow = \"30s\"\ncooldown = \"10m\"\n";
    // Paced at 8 MB/s, the 4 MiB upload crosses 2 MiB about 0.26 s after its first byte.
    let lines = exec_probe(
        &pair,
        &dir,
        &policy(alert),
        &[],
        &[
            "--rate",
            "8000000",
            "tcp-send",
            "198.18.0.2:5001",
            &(4u64 << 20).to_string(),
            "sleep",
            "1500",
        ],
    );
    assert_eq!(lines[0].result, Succeeded);
    let pid = lines[0].pid;
    let alerts = events::alerts(&dir.join("events.jsonl"));
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!(
        (a.rule.as_str(), a.pid, a.comm.as_str()),
        ("bulk-upload", Some(pid), "egress-probe")
    );
    assert!(a.exe.ends_with("/egress-probe"), "{a:?}");
    assert_eq!(a.key, format!("process:{pid}"));
    assert!(a.bytes_in_window >= 2 << 20);
    assert_eq!(a.top_destinations[0].dst, "198.18.0.2");
    assert!(a.cgroup_path.contains("egress-exec-"), "{a:?}");
    assert_eq!(a.action, egress::policy::alert::AlertAction::Alert);
    // Within 1 s of crossing: the crossing came ~0.26 s after the first byte was seen.
    let alert_ts = humantime::parse_rfc3339(&a.ts).unwrap();
    let last_seen = humantime::parse_rfc3339(&a.last_seen).unwrap();
    let first_seen = humantime::parse_rfc3339(&a.first_seen).unwrap();
    assert!(first_seen <= last_seen && last_seen <= alert_ts);
    let delay = alert_ts.duration_since(first_seen).unwrap();
    assert!(
        delay >= Duration::from_millis(150),
        "fired before the threshold could be crossed: {delay:?}"
    );
    assert!(
        delay <= Duration::from_millis(1260 + 50),
        "alert {delay:?} after the first byte, crossing at ~0.26 s"
    );
}

#[test]
fn under_the_threshold_raises_none() {
    let pair = NetPair::new();
    let dir = TempDir::new("alert-none");
    let _sinks = sinks(&pair, &[5002]);
    let alert = "[[alert]]\nname = \"bulk-upload\"\nbytes = \"2MiB\"\nwindow = \"30s\"\n";
    let lines = exec_probe(
        &pair,
        &dir,
        &policy(alert),
        &[],
        &[
            "tcp-send",
            "198.18.0.2:5002",
            &(1u64 << 20).to_string(),
            "sleep",
            "1000",
        ],
    );
    assert_eq!(lines[0].result, Succeeded);
    assert!(events::alerts(&dir.join("events.jsonl")).is_empty());
}

#[test]
fn a_transfer_split_across_a_window_boundary_is_caught() {
    // Two halves of 600 KiB, 2.5 s apart, against 1 MiB in 4 s: any fixed 4 s bucketing that
    // separates them misses it; the sliding window cannot.
    let pair = NetPair::new();
    let dir = TempDir::new("alert-split");
    let _sinks = sinks(&pair, &[5003]);
    let alert = "[[alert]]\nname = \"split\"\nbytes = \"1MiB\"\nwindow = \"4s\"\n";
    let half = (600u64 << 10).to_string();
    let lines = exec_probe(
        &pair,
        &dir,
        &policy(alert),
        &[],
        &[
            "tcp-send",
            "198.18.0.2:5003",
            &half,
            "sleep",
            "2500",
            "tcp-send",
            "198.18.0.2:5003",
            &half,
            "sleep",
            "1000",
        ],
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.op == "tcp-send")
            .all(|l| l.result == Succeeded),
        "{lines:?}"
    );
    let alerts = events::alerts(&dir.join("events.jsonl"));
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert!(alerts[0].bytes_in_window >= 1 << 20);
}

#[test]
fn block_stops_an_upload_in_flight_spares_others_and_unblock_restores() {
    let pair = NetPair::new();
    let dir = TempDir::new("alert-block");
    let cg = TestCgroup::new();
    let _sinks = sinks(&pair, &[5010, 5011, 5012]);
    let policy = dir.file(
        "p.toml",
        &policy("[[alert]]\nname = \"budget\"\nbytes = \"4MiB\"\nwindow = \"60s\"\naction = \"block\"\ncooldown = \"10m\"\n"),
    );
    let events = dir.join("events.jsonl");
    let mut run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .iface(VETH_A)
        .policy(&policy)
        .events(&events)
        .start();
    let go = dir.join("go");
    // Process A: a 200 MiB upload (far over the 4 MiB budget), then a new connect, then after
    // the test unblocks it, a small upload.
    let mut a = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "3")
        .opt("--rate", "20000000")
        .args([
            "tcp-send",
            "198.18.0.2:5010",
            &(200u64 << 20).to_string(),
            "tcp",
            "198.18.0.2:5011",
            "wait-file",
        ])
        .args([&go])
        .args(["tcp-send", "198.18.0.2:5011", "100000"])
        .spawn();
    wait_for("probe A's first two calls", Duration::from_secs(60), || {
        calls_so_far(&a).len() >= 2
    });
    let l = calls_so_far(&a);
    assert_ne!(
        l[0].result, Succeeded,
        "the in-flight upload was stopped: {:?}",
        l[0]
    );
    assert_eq!(l[1].result, Denied, "new connects are refused: {:?}", l[1]);
    let pid_a = l[0].pid;
    // Process B, same cgroup, is not affected.
    let b = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "10")
        .args(["tcp-send", "198.18.0.2:5012", &(1u64 << 20).to_string()])
        .run();
    assert_eq!(
        b[0].result, Succeeded,
        "another process keeps working: {b:?}"
    );

    let out = run.ctl(&["unblock", &format!("process:{pid_a}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&go, b"").unwrap();
    wait_for("probe A's last two calls", Duration::from_secs(60), || {
        calls_so_far(&a).len() >= 4
    });
    assert_eq!(
        calls_so_far(&a)[3].result,
        Succeeded,
        "unblock restored process A"
    );
    a.wait();
    // Stopped here so that every event is in the file.
    let exit = run.stop(libc::SIGTERM);
    assert!(
        exit.success(),
        "egress run exited with {exit}: {}",
        run.stderr_text()
    );

    let alerts = events::alerts(&events);
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        (alerts[0].action.as_str(), alerts[0].pid),
        ("block", Some(pid_a))
    );
    let blocks = events::of_kind(&events, "block");
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0]["key"], format!("process:{pid_a}"));
    let unblocks = events::of_kind(&events, "unblock");
    assert_eq!(
        (unblocks.len(), unblocks[0]["reason"].as_str()),
        (1, Some("egress unblock"))
    );
    let denies = events::of_kind(&events, "deny");
    assert!(
        denies
            .iter()
            .any(|d| d["rule"] == "budget" && d["pid"] == pid_a),
        "the refused connect names the budget"
    );
}

#[test]
fn webhook_gets_alerts_and_spooled_ones_arrive_when_it_is_back() {
    let pair = NetPair::new();
    let dir = TempDir::new("alert-webhook");
    let _sinks = sinks(&pair, &[5020]);
    let spool = dir.join("spool");
    // Inside namespace a: any port is free.
    let port = 20000u16;
    let url = format!("http://127.0.0.1:{port}/hook");
    let alert = "[[alert]]\nname = \"hooked\"\nbytes = \"1MiB\"\nwindow = \"30s\"\n";
    let send = ["tcp-send", "198.18.0.2:5020", "2097152", "sleep", "1000"];
    let spool_files = || {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    };

    // The webhook is down: the alert is spooled, and exec still ends on time.
    let start = Instant::now();
    let extra = [
        "--webhook",
        url.as_str(),
        "--spool",
        spool.to_str().unwrap(),
    ];
    exec_probe(&pair, &dir, &policy(alert), &extra, &send);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(
        spool_files(),
        1,
        "the undeliverable alert waits in the spool"
    );

    // It comes back: the next controller delivers the spooled alert, then its own.
    let hook = HttpServer::start(&pair.a, (std::net::Ipv4Addr::LOCALHOST, port), b"");
    exec_probe(&pair, &dir, &policy(alert), &extra, &send);
    wait_for(
        "the webhook to get both alerts",
        Duration::from_secs(10),
        || hook.requests().len() >= 2,
    );
    let got: Vec<serde_json::Value> = hook.requests().iter().map(|r| r.json()).collect();
    assert!(
        got.iter()
            .all(|a| a["event"] == "alert" && a["rule"] == "hooked"),
        "{got:?}"
    );
    assert_ne!(
        got[0]["pid"], got[1]["pid"],
        "the spooled alert and the new one"
    );
    assert_eq!(spool_files(), 0);
}
