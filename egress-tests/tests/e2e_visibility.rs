//! End-to-end tests of who a report names, between two test network namespaces: deny events and
//! per-process totals carry the sender's executable (`exe`) and `gid`, and a `per =
//! "executable"` budget counts every process running the probe binary together and blocks each
//! of them, until `egress unblock executable:PATH`.

use std::time::Duration;

use egress::events::JsonEvent;
use egress_tests::{
    EgressCmd, NetPair, Probe, TcpSink, TempDir, TestCgroup,
    Verdict::{Denied, Succeeded},
    bins, events,
    netns::{ADDR_B, VETH_A},
    probe::{calls_so_far, parse_calls},
    wait_for,
};

fn policy(extra: &str) -> String {
    format!(
        "allow_loopback = true\n[[service]]\nname = \"lab\"\ndestinations = [\"198.18.0.0/24\"]\nports = [\"5001-5100\"]\nprotocols = [\"tcp\"]\n[[block]]\nname = \"lab-port-5099\"\ndestinations = [\"198.18.0.0/24\"]\nports = [5099]\n{extra}"
    )
}

/// The probe binary, as the kernel names it in `/proc/PID/exe`.
fn probe_exe() -> String {
    std::fs::canonicalize(bins::probe())
        .expect("the probe's path")
        .display()
        .to_string()
}

/// The gid the probes run with (ours).
fn our_gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}

#[test]
fn deny_events_and_process_totals_name_the_executable_and_gid() {
    let pair = NetPair::new();
    let dir = TempDir::new("vis-exec");
    let _sink = TcpSink::start(&pair.b, (ADDR_B, 5040));
    let policy = dir.file("p.toml", &policy(""));
    let events_file = dir.join("events.jsonl");
    let report = dir.join("report.json");
    // The probe sleeps after its calls, so that the controller looks at it while it runs.
    let out = EgressCmd::exec(&pair.a)
        .iface(VETH_A)
        .policy(&policy)
        .events(&events_file)
        .report(&report)
        .probe([
            "tcp-send",
            "198.18.0.2:5040",
            "200000",
            "tcp",
            "198.18.0.2:5099",
            "sleep",
            "700",
        ])
        .success();
    let lines = parse_calls(&out.stdout);
    assert_eq!(
        (&lines[0].result, &lines[1].result),
        (&Succeeded, &Denied),
        "{lines:?}"
    );
    let pid = lines[0].pid;

    let denies = events::decisions(&events_file);
    assert_eq!(denies.len(), 1, "{denies:#?}");
    let d = &denies[0];
    assert_eq!((d.pid, d.rule.as_str()), (pid, "lab-port-5099"));
    assert_eq!(d.exe.as_deref(), Some(probe_exe().as_str()), "{d:?}");
    assert_eq!(d.gid, our_gid());
    // The JSON line itself: `exe` a string, `gid` a number, next to every field it had.
    let raw = &events::of_kind(&events_file, "deny")[0];
    assert!(raw["exe"].is_string() && raw["gid"].is_u64(), "{raw}");
    events::assert_contract_fields(&events_file);

    let r = events::report(&report);
    let p = r
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("no probe in {r:#?}"));
    assert_eq!(p.exe, probe_exe(), "{p:?}");
    assert_eq!(p.gid, Some(our_gid()), "{p:?}");
}

#[test]
fn a_per_executable_budget_counts_and_blocks_every_process_running_it() {
    let pair = NetPair::new();
    let dir = TempDir::new("vis-per-exe");
    let cg = TestCgroup::new();
    let _sinks: Vec<TcpSink> = [5060, 5061, 5062]
        .iter()
        .map(|&p| TcpSink::start(&pair.b, (ADDR_B, p)))
        .collect();
    let policy = dir.file(
        "p.toml",
        &policy("[[alert]]\nname = \"probe-budget\"\nbytes = \"4MiB\"\nwindow = \"60s\"\nper = \"executable\"\naction = \"block\"\ncooldown = \"10m\"\n"),
    );
    let events_file = dir.join("events.jsonl");
    let mut run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .iface(VETH_A)
        .policy(&policy)
        .events(&events_file)
        .start();
    let go = dir.join("go");
    // B sends a little and waits: it runs the executable when the budget is crossed.
    let mut b = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "5")
        .args(["tcp-send", "198.18.0.2:5062", "100000", "wait-file"])
        .args([&go])
        .args(["tcp", "198.18.0.2:5062"])
        .spawn();
    wait_for("probe B's first call", Duration::from_secs(30), || {
        !calls_so_far(&b).is_empty()
    });
    let pid_b = calls_so_far(&b)[0].pid;
    // A uploads far over the budget, then connects again.
    let a = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "3")
        .opt("--rate", "20000000")
        .args([
            "tcp-send",
            "198.18.0.2:5060",
            &(200u64 << 20).to_string(),
            "tcp",
            "198.18.0.2:5061",
        ])
        .run();
    assert_ne!(a[0].result, Succeeded, "the upload was stopped: {a:?}");
    assert_eq!(a[1].result, Denied, "new connects are refused: {a:?}");
    let pid_a = a[0].pid;

    let alerts = events::alerts(&events_file);
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let al = &alerts[0];
    let exe = probe_exe();
    assert_eq!(al.key, format!("executable:{exe}"));
    assert_eq!(
        (al.per.as_str(), al.exe.as_str()),
        ("executable", exe.as_str())
    );
    assert_eq!(al.action.as_str(), "block");
    assert_eq!(al.gid, Some(our_gid()));
    let mut blocked = al.blocked_pids.clone();
    blocked.sort_unstable();
    let mut want = vec![pid_a, pid_b];
    want.sort_unstable();
    assert_eq!(blocked, want, "both processes running it: {al:?}");
    let mut block_keys: Vec<String> = events::of_kind(&events_file, "block")
        .iter()
        .map(|v| v["key"].as_str().unwrap_or_default().to_string())
        .collect();
    block_keys.sort();
    let mut want_keys = vec![format!("process:{pid_a}"), format!("process:{pid_b}")];
    want_keys.sort();
    assert_eq!(block_keys, want_keys);

    // One unblock lifts every process block the executable's alert set.
    let out = run.ctl(&["unblock", &format!("executable:{exe}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&go, b"").unwrap();
    wait_for("probe B's last call", Duration::from_secs(30), || {
        calls_so_far(&b).len() >= 3
    });
    assert_eq!(calls_so_far(&b)[2].result, Succeeded, "unblocked");
    b.wait();
    let exit = run.stop(libc::SIGTERM);
    assert!(
        exit.success(),
        "egress run exited with {exit}: {}",
        run.stderr_text()
    );
    assert_eq!(events::of_kind(&events_file, "unblock").len(), 2);
    let denies: Vec<JsonEvent> = events::of_kind(&events_file, "deny")
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("a deny event"))
        .collect();
    assert!(
        denies.iter().any(|d| d.rule == "probe-budget"
            && d.pid == pid_a
            && d.exe.as_deref() == Some(exe.as_str())),
        "the refused connect names the budget and the executable: {denies:#?}"
    );
}
