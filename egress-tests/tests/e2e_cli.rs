//! End-to-end tests of the `egress` binary: `exec` and `run` with real clients (egress-probe and
//! curl) against loopback servers in a test namespace, asserting on exit codes, `status --json`
//! and the JSON event stream; `check` and `explain` through the CLI.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use egress_tests::{
    EgressCmd, HttpServer, LoopNs, TempDir, TestCgroup,
    Verdict::{Denied, Refused, Succeeded},
    bins,
    cgroup::exec_cgroups_of,
    events::{self, assert_contract_fields},
    probe,
    probe::verdicts,
    wait_for,
};

const POLICY: &str = r#"
mode = "enforce"
allow_loopback = false
[[service]]
name = "local-web"
destinations = ["127.0.0.2", "::1"]
ports = ["8000-8999"]
[[block]]
name = "bad-host"
destinations = ["127.0.0.66"]
"#;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/example.toml");

#[test]
fn exec_enforces_reports_and_cleans_up() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-exec");
    let policy = dir.file("p.toml", POLICY);
    let events = dir.join("events.jsonl");
    let eg = EgressCmd::exec(&ns)
        .policy(&policy)
        .events(&events)
        .probe([
            "tcp",
            "127.0.0.2:8080",
            "tcp",
            "127.0.0.66:8080",
            "udp-sendto",
            "[::1]:53",
            "tcp",
            "[::ffff:127.0.0.3]:8080",
        ])
        .spawn();
    let pid = eg.pid();
    let out = eg.output();
    assert!(
        out.status.success(),
        "egress exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(verdicts(&out.stdout), [Refused, Denied, Denied, Denied]);
    let ev = events::decisions(&events);
    assert_eq!(ev.len(), 3, "{ev:#?}");
    assert!(
        ev.iter()
            .all(|e| e.event == "deny" && e.comm == "egress-probe")
    );
    assert_eq!(
        (
            ev[0].dst.as_str(),
            ev[0].port,
            ev[0].rule.as_str(),
            ev[0].hook.as_str()
        ),
        ("127.0.0.66", 8080, "bad-host", "connect4")
    );
    assert_eq!(
        (
            ev[1].dst.as_str(),
            ev[1].protocol.as_str(),
            ev[1].hook.as_str(),
            ev[1].rule.as_str()
        ),
        ("::1", "udp", "sendmsg6", "default")
    );
    assert_eq!(
        (ev[2].dst.as_str(), ev[2].v4_mapped),
        ("::ffff:127.0.0.3", true)
    );
    assert_contract_fields(&events);
    assert!(
        exec_cgroups_of(pid).is_empty(),
        "exec left its cgroup behind"
    );
}

/// `--owners-capacity` sizes the socket-owner map: when it is full a connect fails closed with
/// an `owners-full` deny and the `owners_full` counter, until sockets close.
#[test]
fn exec_with_a_small_owner_map_fails_closed_until_sockets_close() {
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-owners");
    let policy = dir.file("p.toml", "allow_loopback = true\n");
    let events = dir.join("events.jsonl");
    let report = dir.join("report.json");
    let hold = |n: &'static str| ["hold", "udp", "127.0.0.1:9", n];
    let out = EgressCmd::exec(&ns)
        .policy(&policy)
        .events(&events)
        .report(&report)
        .args(["--owners-capacity", "8"])
        .probe(hold("8"))
        .command(hold("1"))
        .command(["release"])
        .command(hold("8"))
        .success();
    let lines = egress_tests::probe::parse_lines(&out.stdout);
    let times = |i: usize, v| lines[i].summary().times(v);
    assert_eq!(
        (times(0, &Succeeded), times(1, &Denied)),
        (8, 1),
        "{lines:?}"
    );
    assert_eq!(
        times(3, &Succeeded),
        8,
        "released sockets freed theirs: {lines:?}"
    );
    let ev = events::decisions(&events);
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(
        (
            ev[0].event.as_str(),
            ev[0].hook.as_str(),
            ev[0].rule.as_str()
        ),
        ("deny", "connect4", "owners-full")
    );
    let r = events::report(&report);
    assert_eq!(
        (r.counters.owners_full, r.counters.denied),
        (1, 1),
        "{r:#?}"
    );
    assert_eq!(r.denies_by_rule.get("owners-full"), Some(&1), "{r:#?}");
}

#[test]
fn exec_exits_with_the_commands_status() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let out = EgressCmd::exec(&ns)
        .command(["sh", "-c", "exit 7"])
        .output();
    assert_eq!(out.status.code(), Some(7));
    let out = EgressCmd::exec(&ns)
        .command(["sh", "-c", "kill -TERM $$"])
        .output();
    assert_eq!(out.status.code(), Some(128 + 15));
    let out = EgressCmd::exec(&ns)
        .command(["/nonexistent/egress-test-binary"])
        .output();
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn exec_removes_the_cgroup_even_with_leftover_processes() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    // The command backgrounds a sleeper and exits; exec must kill it and remove the cgroup.
    let eg = EgressCmd::exec(&ns)
        .command(["sh", "-c", "sleep 120 & exit 0"])
        .spawn();
    let pid = eg.pid();
    let start = Instant::now();
    let out = eg.output();
    assert!(out.status.success());
    // Well below the sleeper's 120 s (it was killed, not waited for), loose enough for the
    // program load on a loaded machine.
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(exec_cgroups_of(pid).is_empty());
}

/// The command makes a cgroup of its own below the one exec made and moves a sleeper there:
/// a cgroup with children cannot be removed (EBUSY), so exec must kill and remove the subtree,
/// deepest first, and leak nothing.
#[test]
fn exec_removes_the_cgroups_its_command_made_below_its_own() {
    let ns = LoopNs::new();
    let root = egress::sys::cgroup::cgroup2_root().expect("cgroup2 must be available");
    let script = r#"cg="$CGROOT$(sed -n 's/^0:://p' /proc/self/cgroup)"
mkdir -p "$cg/made-by-cmd/deeper" || exit 3
sleep 120 &
echo $! > "$cg/made-by-cmd/deeper/cgroup.procs" || exit 4
exit 0"#;
    let eg = EgressCmd::exec(&ns)
        .env("CGROOT", root.display().to_string())
        .command(["sh", "-c", script])
        .spawn();
    let pid = eg.pid();
    let start = Instant::now();
    let out = eg.output();
    assert!(
        out.status.success(),
        "exec: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(
        exec_cgroups_of(pid).is_empty(),
        "exec left {:?}",
        exec_cgroups_of(pid)
    );
}

#[test]
fn curl_through_exec_allowed_and_denied() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-curl");
    let server = HttpServer::start(&ns, (Ipv4Addr::new(127, 0, 0, 2), 0), b"hello");
    let port = server.addr().port();
    let allow = dir.file(
        "allow.toml",
        &format!("allow_loopback = false\n[[service]]\nname = \"local-http\"\ndestinations = [\"127.0.0.2\"]\nports = [{port}]\nprotocols = [\"tcp\"]\n"),
    );
    let url = format!("http://127.0.0.2:{port}/");
    let out = EgressCmd::exec(&ns)
        .policy(&allow)
        .command(["curl", "-sS", "--max-time", "5", &url])
        .output();
    assert!(
        out.status.success(),
        "curl failed (it must be installed: .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hello");
    assert_eq!(server.requests().len(), 1);

    let deny = dir.file("deny.toml", "allow_loopback = false\n[[block]]\nname = \"no-local-http\"\ndestinations = [\"127.0.0.2\"]\n");
    let events = dir.join("events.jsonl");
    let out = EgressCmd::exec(&ns)
        .policy(&deny)
        .events(&events)
        .command(["curl", "-sS", "--max-time", "5", &url])
        .output();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: couldn't connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events::decisions(&events);
    assert!(!ev.is_empty());
    assert!(
        ev.iter().all(|e| e.comm == "curl"
            && e.rule == "no-local-http"
            && e.port == port
            && e.protocol == "tcp"),
        "{ev:#?}"
    );
    assert_eq!(
        server.requests().len(),
        1,
        "the denied curl never got there"
    );
}

#[test]
fn run_enforces_on_a_cgroup_and_detaches_on_sigint() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-run");
    let policy = dir.file("p.toml", POLICY);
    let events = dir.join("events.jsonl");
    let cg = TestCgroup::new();
    let mut run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&policy)
        .events(&events)
        .start();
    assert_eq!(
        probe(
            &cg,
            &[
                ("tcp", "127.0.0.66:8080"),
                ("tcp", "127.0.0.2:8443"),
                ("udp-connect", "127.0.0.3:9")
            ]
        ),
        [Denied, Refused, Denied]
    );
    // Events are written as they happen, not only at exit.
    wait_for(
        "events to reach the file while running",
        Duration::from_secs(5),
        || events::decisions(&events).len() >= 2,
    );
    let status = run.stop(libc::SIGINT);
    assert!(
        status.success(),
        "egress run exited with {status}: {}",
        run.stderr_text()
    );
    let ev = events::decisions(&events);
    assert!(
        ev.iter()
            .any(|e| e.rule == "bad-host" && e.dst == "127.0.0.66")
    );
    assert!(
        ev.iter()
            .any(|e| e.hook == "connect4" && e.protocol == "udp" && e.dst == "127.0.0.3")
    );
    assert_contract_fields(&events);
    // Detached: the cgroup is unrestricted again.
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.66:8080")]), [Refused]);
}

#[test]
fn run_with_the_embedded_default_policy_audits_and_blocks_nothing() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-default");
    let events = dir.join("events.jsonl");
    let cg = TestCgroup::new();
    let mut run = EgressCmd::run(&ns, cg.path(), &dir).events(&events).start();
    let status = run.status().expect("status --json");
    assert_eq!(
        (&status["policy"]["mode"], &status["policy"]["source"]),
        (
            &serde_json::json!("audit"),
            &serde_json::json!(egress::policy::DEFAULT_POLICY_NAME)
        ),
        "{status}"
    );
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:9"), ("udp-sendto", "[::1]:9")]),
        [Refused, Succeeded]
    );
    let exit = run.stop(libc::SIGTERM);
    assert!(
        exit.success(),
        "egress run exited with {exit}: {}",
        run.stderr_text()
    );
    assert!(
        events::decisions(&events).is_empty(),
        "loopback is approved by the default policy"
    );
}

#[test]
fn check_accepts_good_policies_and_pinpoints_bad_ones() {
    let dir = TempDir::new("e2e-check");
    let out = std::process::Command::new(bins::egress())
        .args(["check", EXAMPLE])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What `check` summarises, from the same loader.
    let (_, c) = egress::policy::load(Some(std::path::Path::new(EXAMPLE))).unwrap();
    assert_eq!(
        (c.services, c.blocks, c.alerts, c.prefix_count()),
        (3, 3, 2, 10)
    );

    let bad = dir.file(
        "bad.toml",
        "[[service]]\nname = \"x\"\ndestinations = [\"10.0.0.0/8\"]\nports = [\"90-80\"]\n",
    );
    let out = std::process::Command::new(bins::egress())
        .arg("check")
        .arg(EXAMPLE)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // The policy-error contract: file:line:column: field: message.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:10: service[1].ports: ", bad.display())),
        "{err}"
    );
}

#[test]
fn explain_prints_verdict_and_rule() {
    let explain = |dest: &str| {
        let out = std::process::Command::new(bins::egress())
            .args([
                "explain", "--policy", EXAMPLE, dest, "--port", "3128", "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = explain("10.20.99.4");
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["rule"], "quarantined-lab");
    assert_eq!(v["prefix"], "10.20.99.0/24");
    let v = explain("::ffff:10.20.1.5");
    assert_eq!(
        (&v["verdict"], &v["rule"], &v["judged_as"]),
        (
            &serde_json::json!("allow"),
            &serde_json::json!("corp-proxy"),
            &serde_json::json!("10.20.1.5")
        ),
        "{v}"
    );
}

#[test]
fn exec_in_audit_mode_writes_audit_events_and_blocks_nothing() {
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-audit");
    let policy = dir.file("p.toml", "mode = \"audit\"\nallow_loopback = false\n[[block]]\nname = \"lab\"\ndestinations = [\"127.0.0.66\"]\n");
    let events = dir.join("events.jsonl");
    let out = EgressCmd::exec(&ns)
        .policy(&policy)
        .events(&events)
        .probe(["tcp", "127.0.0.66:80", "udp-sendto", "127.0.0.9:53"])
        .success();
    assert_eq!(verdicts(&out.stdout), [Refused, Succeeded]);
    let ev = events::decisions(&events);
    assert_eq!(ev.len(), 2, "{ev:#?}");
    assert!(ev.iter().all(|e| e.event == "audit"));
    assert_eq!(
        (ev[0].rule.as_str(), ev[1].rule.as_str()),
        ("lab", "default")
    );
}

#[test]
fn a_deny_flood_neither_hangs_nor_loses_the_controller() {
    // 100,000 denied sends overflow the ring buffer many times; the controller must keep up in
    // bounded batches, exit with the command, and account for every event (written or lost).
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-flood");
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let events = dir.join("events.jsonl");
    let report = dir.join("report.json");
    let start = Instant::now();
    let out = EgressCmd::exec(&ns)
        .policy(&policy)
        .events(&events)
        .report(&report)
        .probe(["--count", "100000", "udp-sendto", "127.0.0.9:9"])
        .success();
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    let line: egress_tests::probe::SummaryLine = egress_tests::probe::parse_one(&out.stdout);
    assert_eq!(line.times(&Denied), 100_000, "{line:?}");
    let written = events::decisions(&events).len() as u64;
    let counters = events::report(&report).counters;
    assert_eq!(counters.denied, 100_000, "{counters:?}");
    assert!(written > 0, "no event written");
    assert_eq!(
        written + counters.events_lost,
        100_000,
        "every deny's event is written or counted lost: {written} written, {counters:?}"
    );
}

#[test]
fn exec_forwards_sighup_and_cleans_up() {
    let ns = LoopNs::new();
    let mut eg = EgressCmd::exec(&ns).command(["sleep", "30"]).spawn();
    // nsenter execs egress in place, so the pid is egress's. Wait until its cgroup exists.
    let egress_pid = eg.pid();
    wait_for("the exec cgroup", Duration::from_secs(10), || {
        !exec_cgroups_of(egress_pid).is_empty()
    });
    std::thread::sleep(Duration::from_millis(200));
    eg.signal(libc::SIGHUP);
    let status = eg.wait_exit("egress exec after SIGHUP");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGHUP),
        "the command died of the forwarded SIGHUP"
    );
    assert!(exec_cgroups_of(egress_pid).is_empty());
}

/// Removes, whatever happens, what a killed `egress exec` leaves: its cgroup's processes, its
/// link pins and the cgroup.
struct ExecLeftovers(String);

impl Drop for ExecLeftovers {
    fn drop(&mut self) {
        let root = egress::sys::cgroup::cgroup2_root().expect("cgroup2");
        let cg = root.join(&self.0);
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        let _ = std::process::Command::new(bins::egress())
            .args(["stop", "--pin-dir"])
            .arg(format!("/sys/fs/bpf/egress-exec/{}", self.0))
            .args(["--socket", "/nonexistent"])
            .output();
        for _ in 0..100 {
            if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Fail-closed beyond the command itself: when `egress exec` is killed (SIGKILL: no cleanup),
/// the command dies with it, and what the command left behind stays enforced (the links are
/// pinned). Once those leftovers are gone, the next `egress exec` removes the pins and cgroup.
#[test]
fn a_killed_exec_leaves_its_leftovers_enforced_until_they_are_gone() {
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-exec-kill");
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let go = dir.join("go");
    let out = dir.join("probe.jsonl");
    // The probe is the command's child: nothing ties its life to egress.
    let script = format!(
        "{} wait-file {} tcp 127.0.0.5:80 > {} & sleep 60",
        bins::probe().display(),
        go.display(),
        out.display()
    );
    let mut eg = EgressCmd::exec(&ns)
        .policy(&policy)
        .command(["sh", "-c", &script])
        .spawn();
    let pid = eg.pid();
    wait_for("the exec cgroup", Duration::from_secs(10), || {
        !exec_cgroups_of(pid).is_empty()
    });
    let name = exec_cgroups_of(pid).remove(0);
    let _cleanup = ExecLeftovers(name.clone());
    let cg = egress::sys::cgroup::cgroup2_root()
        .expect("cgroup2")
        .join(&name);
    wait_for("the probe in the cgroup", Duration::from_secs(10), || {
        std::fs::read_to_string(cg.join("cgroup.procs")).is_ok_and(|p| p.lines().count() >= 3)
    });
    eg.kill_9();
    std::fs::write(&go, b"").unwrap();
    // Both lines: the wait's and the connect's (the first alone already ends with a newline).
    wait_for("the probe's result", Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() >= 2 && t.ends_with('\n'))
    });
    assert_eq!(
        verdicts(&std::fs::read(&out).unwrap()),
        [Succeeded, Denied],
        "the wait, then the connect: still denied after egress died"
    );
    // The leftovers go; the next exec removes what the dead one pinned, and its cgroup.
    std::fs::write(cg.join("cgroup.kill"), "1").unwrap();
    wait_for("the cgroup to empty", Duration::from_secs(10), || {
        !egress::sys::cgroup::populated(&cg)
    });
    let next = EgressCmd::exec(&ns).command(["true"]).output();
    assert!(next.status.success(), "{next:?}");
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/egress-exec/{name}")).exists());
    assert!(!cg.exists());
}

/// `AF_PACKET` sockets pass no cgroup hook and `PACKET_QDISC_BYPASS` skips TC: where the
/// enforced policy denies both raw and packet sockets, `exec` runs the command without
/// CAP_NET_RAW (bounding set included), so neither can be opened even by root. A policy that
/// allows packet sockets keeps the capability.
#[test]
fn exec_withholds_cap_net_raw_when_raw_and_packet_sockets_are_denied() {
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-netraw");
    let denied = dir.file("deny.toml", "mode = \"enforce\"\n");
    let out = EgressCmd::exec(&ns)
        .policy(&denied)
        .probe(["socket", "packet", "socket", "raw4", "socket", "udplite"])
        .success();
    assert_eq!(verdicts(&out.stdout), [Denied, Denied, Denied]);
    let allowed = dir.file(
        "allow.toml",
        "mode = \"enforce\"\n[sockets]\npacket = \"allow\"\n",
    );
    let out = EgressCmd::exec(&ns)
        .policy(&allowed)
        .probe(["socket", "packet", "socket", "raw4"])
        .success();
    assert_eq!(
        verdicts(&out.stdout),
        [Succeeded, Denied],
        "packet sockets allowed: the capability stays; raw4 is refused by the sock_create hook"
    );
    // Audit mode refuses nothing, so it withholds nothing either.
    let audit = dir.file("audit.toml", "mode = \"audit\"\n");
    let out = EgressCmd::exec(&ns)
        .policy(&audit)
        .probe(["socket", "packet"])
        .success();
    assert_eq!(verdicts(&out.stdout), [Succeeded]);
}

/// A socket is judged by the cgroup it was created in. One that `egress exec` inherited from
/// its parent (made outside the command's cgroup, connected to a blocked host) would carry the
/// command's data past the policy: exec does not pass it on (close-on-exec), and says so.
#[test]
fn exec_does_not_pass_inherited_ip_sockets_to_the_command() {
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-inherit");
    let policy = dir.file("p.toml", POLICY);
    let sink = egress_tests::UdpSink::start(&ns, (Ipv4Addr::new(127, 0, 0, 66), 9999));
    let leaked = egress_tests::in_netns(&ns, || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect("127.0.0.66:9999").unwrap();
        s
    });
    // Control: the socket works, from here.
    leaked.send(b"control").unwrap();
    wait_for("the control datagram", Duration::from_secs(10), || {
        sink.datagrams() == 1
    });
    let out = EgressCmd::exec(&ns)
        .policy(&policy)
        .pass_fd(leaked.into(), 7)
        .probe(["send-fd", "7", "tcp", "127.0.0.66:80"])
        .output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        verdicts(&out.stdout),
        [egress_tests::Verdict::Other("EBADF".into()), Denied],
        "the inherited socket is not the command's"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inherited IP socket is not passed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.datagrams(),
        1,
        "nothing from the command reached the blocked host"
    );
}

/// An `exec` killed during its start leaves only its cgroup (nothing pinned yet): the next
/// `exec` removes it once its creator is gone, as it does the pins of one killed later.
#[test]
fn the_next_exec_removes_the_empty_cgroup_of_an_exec_killed_at_start() {
    let ns = LoopNs::new();
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let root = egress::sys::cgroup::cgroup2_root().expect("cgroup2");
    let left = root.join(format!("egress-exec-{dead}-0"));
    std::fs::create_dir(&left).unwrap();
    struct Rmdir(std::path::PathBuf);
    impl Drop for Rmdir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _guard = Rmdir(left.clone());
    EgressCmd::exec(&ns).command(["true"]).success();
    assert!(!left.exists(), "{} is still there", left.display());
}

#[test]
fn exec_kernel_log_writes_one_line_per_decision_and_nothing_without_it() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-kernel-log");
    let policy = dir.file("p.toml", POLICY);
    let run = |flag: bool| {
        let mut cmd = EgressCmd::exec(&ns)
            .policy(&policy)
            .events(&dir.join("events.jsonl"))
            .env("RUST_LOG", "info");
        if flag {
            cmd = cmd.arg("--kernel-log");
        }
        let out = cmd.probe(["udp-connect", "127.0.0.66:53"]).success();
        assert_eq!(verdicts(&out.stdout), [Denied]);
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("egress_ebpf"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let lines = run(true);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    for part in [
        "DEBUG",
        "connect4 deny rule=",
        "dst=127.0.0.66 port=53 proto=17",
    ] {
        assert!(lines[0].contains(part), "{part:?} in {lines:?}");
    }
    assert_eq!(run(false), Vec::<String>::new());
}
