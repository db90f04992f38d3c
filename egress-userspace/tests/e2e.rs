//! End-to-end tests of the `egress` binary: `exec` and `run` with real clients (egress-probe and
//! curl) against loopback servers, asserting on exit codes and the JSON event stream; `check` and
//! `explain` through the CLI.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{EGRESS, LoopNs, PROBE, TempDir, in_netns, parse_probe, probe, test_cgroup};
use egress::events::JsonEvent;

fn read_events(path: &Path) -> Vec<JsonEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("event line is not a JSON event ({e}): {l}"))
        })
        .collect()
}

/// Checks that an event line carries every contract field.
fn assert_contract_fields(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for field in [
            "ts",
            "event",
            "pid",
            "comm",
            "uid",
            "cgroup_id",
            "hook",
            "protocol",
            "dst",
            "port",
            "rule",
        ] {
            assert!(v.get(field).is_some(), "event lacks `{field}`: {line}");
        }
    }
}

fn exec_cgroups_of(pid: u32) -> Vec<String> {
    let root = egress::sys::cgroup::cgroup2_root().unwrap();
    std::fs::read_dir(root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("egress-exec-{pid}-")))
        .collect()
}

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

#[test]
fn exec_enforces_reports_and_cleans_up() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-exec");
    let policy = dir.file("p.toml", POLICY);
    let events = dir.0.join("events.jsonl");
    let child = ns
        .cmd(EGRESS)
        .args(["exec", "--policy"])
        .arg(&policy)
        .arg("--events")
        .arg(&events)
        .args([
            "--",
            PROBE,
            "tcp",
            "127.0.0.2:8080",
            "tcp",
            "127.0.0.66:8080",
            "udp-sendto",
            "[::1]:53",
            "tcp",
            "[::ffff:127.0.0.3]:8080",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "egress exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        parse_probe(&out.stdout, 4),
        ["ECONNREFUSED", "EPERM", "EPERM", "EPERM"]
    );
    let ev = read_events(&events);
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

#[test]
fn exec_exits_with_the_commands_status() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let status = ns
        .cmd(EGRESS)
        .args(["exec", "--", "sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
    let status = ns
        .cmd(EGRESS)
        .args(["exec", "--", "sh", "-c", "kill -TERM $$"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    let out = ns
        .cmd(EGRESS)
        .args(["exec", "--", "/nonexistent/egress-test-binary"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn exec_removes_the_cgroup_even_with_leftover_processes() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    // The command backgrounds a sleeper and exits; exec must kill it and remove the cgroup.
    let child = ns
        .cmd(EGRESS)
        .args(["exec", "--", "sh", "-c", "sleep 30 & exit 0"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(exec_cgroups_of(pid).is_empty());
}

/// A one-shot HTTP server on 127.0.0.2; returns its port.
fn http_server(ns: &LoopNs) -> (u16, thread::JoinHandle<bool>) {
    let listener = in_netns(&ns.name, || TcpListener::bind("127.0.0.2:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let h = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
                    return true;
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    });
    (port, h)
}

#[test]
fn curl_through_exec_allowed_and_denied() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-curl");
    let (port, server) = http_server(&ns);
    let allow = dir.file(
        "allow.toml",
        &format!("allow_loopback = false\n[[service]]\nname = \"local-http\"\ndestinations = [\"127.0.0.2\"]\nports = [{port}]\nprotocols = [\"tcp\"]\n"),
    );
    let url = format!("http://127.0.0.2:{port}/");
    let out = ns
        .cmd(EGRESS)
        .args(["exec", "--policy"])
        .arg(&allow)
        .args(["--", "curl", "-sS", "--max-time", "5", &url])
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hello");
    assert!(server.join().unwrap());

    let deny = dir.file("deny.toml", "allow_loopback = false\n[[block]]\nname = \"no-local-http\"\ndestinations = [\"127.0.0.2\"]\n");
    let events = dir.0.join("events.jsonl");
    let out = ns
        .cmd(EGRESS)
        .args(["exec", "--policy"])
        .arg(&deny)
        .arg("--events")
        .arg(&events)
        .args(["--", "curl", "-sS", "--max-time", "5", &url])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: couldn't connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = read_events(&events);
    assert!(!ev.is_empty());
    assert!(
        ev.iter().all(|e| e.comm == "curl"
            && e.rule == "no-local-http"
            && e.port == port
            && e.protocol == "tcp"),
        "{ev:#?}"
    );
}

/// A running `egress run`, with its stderr collected by a thread.
struct Running {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
}

/// Starts `egress run` on a test cgroup and waits (bounded) for its "enforcing" log line, which
/// it prints once every hook is attached.
fn start_run(ns: &LoopNs, cg: &Path, policy: Option<&Path>, events: &Path) -> Running {
    let mut cmd = ns.cmd(EGRESS);
    let socket = events.with_extension("sock");
    cmd.args(["run", "--ephemeral"])
        .arg("--cgroup")
        .arg(cg)
        .arg("--events")
        .arg(events)
        .arg("--socket")
        .arg(&socket);
    if let Some(p) = policy {
        cmd.arg("--policy").arg(p);
    }
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log.lock().unwrap().contains("enforcing") {
        if let Some(st) = child.try_wait().unwrap() {
            thread::sleep(Duration::from_millis(100));
            panic!("egress run exited early ({st}): {}", log.lock().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "egress run did not attach within 20 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
    Running {
        child,
        log,
        reader: Some(reader),
    }
}

impl Running {
    /// Signals the controller, waits (bounded) for a clean exit, and returns its whole log.
    fn stop(mut self, sig: i32) -> String {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "egress run did not exit on signal {sig}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        self.reader.take().unwrap().join().unwrap();
        let log = self.log.lock().unwrap().clone();
        assert!(status.success(), "egress run exited with {status}: {log}");
        log
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed assertion must not leave a controller running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn run_enforces_on_a_cgroup_and_detaches_on_sigint() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-run");
    let policy = dir.file("p.toml", POLICY);
    let events = dir.0.join("events.jsonl");
    let cg = test_cgroup();
    let run = start_run(&ns, cg.path(), Some(&policy), &events);
    assert_eq!(
        probe(
            cg.path(),
            &[
                ("tcp", "127.0.0.66:8080"),
                ("tcp", "127.0.0.2:8443"),
                ("udp-connect", "127.0.0.3:9")
            ]
        ),
        ["EPERM", "ECONNREFUSED", "EPERM"]
    );
    // Events are written as they happen, not only at exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_events(&events).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "events did not reach the file while running"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let log = run.stop(libc::SIGINT);
    assert!(log.contains("detached"), "{log}");
    let ev = read_events(&events);
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
    assert_eq!(
        probe(cg.path(), &[("tcp", "127.0.0.66:8080")]),
        ["ECONNREFUSED"]
    );
}

#[test]
fn run_with_the_embedded_default_policy_audits_and_blocks_nothing() {
    // egress runs in a namespace of its own: its TC program never touches the host's interfaces.
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-default");
    let events = dir.0.join("events.jsonl");
    let cg = test_cgroup();
    let run = start_run(&ns, cg.path(), None, &events);
    assert_eq!(
        probe(
            cg.path(),
            &[("tcp", "127.0.0.2:9"), ("udp-sendto", "[::1]:9")]
        ),
        ["ECONNREFUSED", "ok"]
    );
    let log = run.stop(libc::SIGTERM);
    assert!(
        log.contains("mode=audit") && log.contains("embedded policies/default.toml"),
        "{log}"
    );
    assert!(
        read_events(&events).is_empty(),
        "loopback is approved by the default policy"
    );
}

#[test]
fn check_summarises_good_policies_and_pinpoints_bad_ones() {
    let dir = TempDir::new("e2e-check");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/example.toml");
    let out = Command::new(EGRESS)
        .args(["check", example])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("3 services, 3 blocks, 2 alerts, 10 prefixes"),
        "{text}"
    );

    let bad = dir.file(
        "bad.toml",
        "[[service]]\nname = \"x\"\ndestinations = [\"10.0.0.0/8\"]\nports = [\"90-80\"]\n",
    );
    let out = Command::new(EGRESS)
        .arg("check")
        .arg(example)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:4:10: service[1].ports: range 90-80 is reversed",
            bad.display()
        )),
        "{err}"
    );
}

#[test]
fn explain_prints_verdict_and_rule() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/example.toml");
    let out = Command::new(EGRESS)
        .args([
            "explain",
            "--policy",
            example,
            "10.20.99.4",
            "--port",
            "3128",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["rule"], "quarantined-lab");
    assert_eq!(v["prefix"], "10.20.99.0/24");
    let out = Command::new(EGRESS)
        .args([
            "explain",
            "--policy",
            example,
            "::ffff:10.20.1.5",
            "--port",
            "3128",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("allow ")
            && text.contains("corp-proxy")
            && text.contains("judged as 10.20.1.5"),
        "{text}"
    );
}

#[test]
fn exec_in_audit_mode_writes_audit_events_and_blocks_nothing() {
    let ns = LoopNs::new();
    let dir = TempDir::new("e2e-audit");
    let policy = dir.file("p.toml", "mode = \"audit\"\nallow_loopback = false\n[[block]]\nname = \"lab\"\ndestinations = [\"127.0.0.66\"]\n");
    let events = dir.0.join("events.jsonl");
    let out = ns
        .cmd(EGRESS)
        .args(["exec", "--policy"])
        .arg(&policy)
        .arg("--events")
        .arg(&events)
        .args([
            "--",
            PROBE,
            "tcp",
            "127.0.0.66:80",
            "udp-sendto",
            "127.0.0.9:53",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(parse_probe(&out.stdout, 2), ["ECONNREFUSED", "ok"]);
    let ev = read_events(&events);
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
    let events = dir.0.join("events.jsonl");
    let start = Instant::now();
    let out = ns
        .cmd(EGRESS)
        .args(["exec", "--policy"])
        .arg(&policy)
        .arg("--events")
        .arg(&events)
        .args([
            "--",
            PROBE,
            "--count",
            "100000",
            "udp-sendto",
            "127.0.0.9:9",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["results"]["EPERM"], 100_000);
    let written = std::fs::read_to_string(&events).unwrap().lines().count();
    assert!(written > 10_000, "only {written} events written");
}

#[test]
fn exec_forwards_sighup_and_cleans_up() {
    let ns = LoopNs::new();
    let mut child = ns
        .cmd(EGRESS)
        .args(["exec", "--", "sleep", "30"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let egress_pid = child.id();
    // nsenter execs egress in place, so the pid is egress's. Wait until its cgroup exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    while exec_cgroups_of(egress_pid).is_empty() {
        assert!(Instant::now() < deadline, "exec cgroup never appeared");
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(egress_pid as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "egress exec did not end after SIGHUP"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGHUP),
        "the command died of the forwarded SIGHUP"
    );
    assert!(exec_cgroups_of(egress_pid).is_empty());
}
