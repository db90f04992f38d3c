//! End-to-end tests of byte accounting through the `egress` binary, between two test network
//! namespaces: `exec --report` around curl uploading to a server, and `stats`, `top` and
//! `--metrics` against a running `egress run`.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use common::{EGRESS, NetPair, PROBE, TempDir, VETH_A, in_netns, test_cgroup};
use egress::report::StatsReport;

const POLICY: &str = r#"
allow_loopback = true
[[service]]
name = "upload-target"
destinations = ["198.18.0.0/24"]
ports = ["5001-5100"]
protocols = ["tcp"]
"#;

/// An HTTP sink in namespace b: reads one request with its body, answers 200, returns the body
/// length it read.
fn http_sink(pair: &NetPair, port: u16) -> thread::JoinHandle<u64> {
    let listener = in_netns(&pair.b, move || {
        TcpListener::bind(("198.18.0.2", port)).unwrap()
    });
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let (head_end, len) = loop {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed before the headers");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                let len: u64 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .expect("content-length");
                break (i + 4, len);
            }
        };
        let mut got = (buf.len() - head_end) as u64;
        while got < len {
            let n = s.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .unwrap();
        got
    })
}

#[test]
fn exec_report_counts_a_curl_upload() {
    let pair = NetPair::new();
    let dir = TempDir::new("acct-exec");
    let policy = dir.file("p.toml", POLICY);
    let report = dir.0.join("report.json");
    const SIZE: usize = 4 * 1024 * 1024;
    let upload = dir.0.join("upload.bin");
    std::fs::write(&upload, vec![0x42u8; SIZE]).unwrap();
    let server = http_sink(&pair, 5050);
    let out = pair
        .cmd_in_a(EGRESS)
        .args(["exec", "--iface", VETH_A, "--policy"])
        .arg(&policy)
        .arg("--report")
        .arg(&report)
        .args(["--", "curl", "-sS", "--max-time", "20", "--data-binary"])
        .arg(format!("@{}", upload.display()))
        .arg("http://198.18.0.2:5050/upload")
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"ok");
    assert_eq!(server.join().unwrap(), SIZE as u64);
    let r: StatsReport = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let curl = r
        .processes
        .iter()
        .find(|p| p.comm == "curl")
        .unwrap_or_else(|| panic!("no curl in {r:#?}"));
    assert!(curl.exe.ends_with("/curl"), "{curl:?}");
    assert!(curl.cmdline.contains("--data-binary"), "{curl:?}");
    let d = &curl.destinations[0];
    assert_eq!(
        (d.dst.as_str(), d.port, d.protocol.as_str()),
        ("198.18.0.2", 5050, "tcp")
    );
    // Payload is the body plus the request head: within 1% of what curl wrote.
    assert!(
        d.payload_bytes.abs_diff(SIZE as u64) * 100 <= SIZE as u64,
        "payload {} for a {SIZE}-byte body",
        d.payload_bytes
    );
    assert!(d.bytes > d.payload_bytes);
}

struct Run(std::process::Child);

impl Drop for Run {
    fn drop(&mut self) {
        common::terminate(&mut self.0);
    }
}

#[test]
fn stats_top_and_metrics_from_a_running_controller() {
    let pair = NetPair::new();
    let dir = TempDir::new("acct-run");
    let policy = dir.file("p.toml", POLICY);
    let socket = dir.0.join("control.sock");
    let cg = test_cgroup();
    let metrics_port = 19464u16 + (std::process::id() % 500) as u16;
    let run = Run(pair
        .cmd_in_a(EGRESS)
        .args(["run", "--ephemeral", "--iface", VETH_A, "--policy"])
        .arg(&policy)
        .arg("--cgroup")
        .arg(cg.path())
        .arg("--socket")
        .arg(&socket)
        .args([
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
            "--events",
        ])
        .arg(dir.0.join("events.jsonl"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let stats = |json: bool| {
        let mut c = std::process::Command::new(EGRESS);
        c.arg("stats").arg("--socket").arg(&socket);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stats(true).status.success() {
        assert!(Instant::now() < deadline, "the controller did not come up");
        thread::sleep(Duration::from_millis(50));
    }
    let sink = thread::spawn({
        let l = in_netns(&pair.b, || TcpListener::bind(("198.18.0.2", 5060)).unwrap());
        move || {
            let (mut s, _) = l.accept().unwrap();
            let mut n = 0u64;
            let mut buf = vec![0u8; 65536];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            n
        }
    });
    const BYTES: u64 = 3 * 1024 * 1024;
    let out = pair
        .cmd_in_a(PROBE)
        .arg("--cgroup")
        .arg(cg.path())
        .args(["tcp-send", "198.18.0.2:5060", &BYTES.to_string()])
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["result"], "ok", "{line}");
    let pid = line["pid"].as_u64().unwrap() as u32;
    assert_eq!(sink.join().unwrap(), BYTES);

    // Within a couple of ticks the controller reports the probe, by pid, with its destination.
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let out = stats(true);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: StatsReport = serde_json::from_slice(&out.stdout).unwrap();
        if r.processes
            .iter()
            .any(|p| p.pid == pid && p.payload_bytes >= BYTES)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "probe not reported: {r:#?}");
        thread::sleep(Duration::from_millis(200));
    };
    let p = report.processes.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!(p.comm, "egress-probe");
    assert!(p.payload_bytes.abs_diff(BYTES) * 100 <= BYTES, "{p:?}");
    assert_eq!(
        (p.destinations[0].dst.as_str(), p.destinations[0].port),
        ("198.18.0.2", 5060)
    );

    let table = String::from_utf8(stats(false).stdout).unwrap();
    assert!(
        table.contains("egress-probe") && table.contains("-> 198.18.0.2:5060/tcp"),
        "{table}"
    );

    let top = std::process::Command::new(EGRESS)
        .args(["top", "--once", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let top = String::from_utf8(top.stdout).unwrap();
    assert!(
        top.starts_with("egress top") && top.contains(&pid.to_string()),
        "{top}"
    );

    let metrics = in_netns(&pair.a, move || {
        let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "egress_process_bytes_total{{pid=\"{pid}\",comm=\"egress-probe\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("egress_destination_bytes_total{"),
        "{metrics}"
    );
    assert!(metrics.contains("egress_events_lost_total 0"), "{metrics}");
    drop(run);
}

#[test]
fn default_interfaces_count_bridged_traffic_once() {
    // veth-a enslaved to a bridge br0 in namespace a: both are up, and a packet leaves through
    // both. The default interface choice must count it once.
    let pair = NetPair::new();
    let dir = TempDir::new("acct-bridge");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["-n", &pair.a])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["addr", "flush", "dev", VETH_A]);
    run(&["link", "add", "br0", "type", "bridge"]);
    run(&["link", "set", VETH_A, "master", "br0"]);
    run(&["addr", "add", "198.18.0.1/24", "dev", "br0"]);
    run(&["link", "set", "br0", "up"]);
    let policy = dir.file("p.toml", POLICY);
    let report = dir.0.join("report.json");
    let sink = thread::spawn({
        let l = in_netns(&pair.b, || TcpListener::bind(("198.18.0.2", 5070)).unwrap());
        move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 65536];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
            }
        }
    });
    const BYTES: u64 = 4 * 1024 * 1024;
    // `ip netns exec` gives egress a /sys of namespace a, where it can see the bridge; cgroup2
    // is not mounted there, so egress mounts its own view of it.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pair.a, EGRESS, "exec", "--policy"])
        .arg(&policy)
        .arg("--report")
        .arg(&report)
        .args([
            "--",
            PROBE,
            "tcp-send",
            "198.18.0.2:5070",
            &BYTES.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sink.join().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("\"br0\"") && !log.contains("veth-a"),
        "TC on the bridge only: {log}"
    );
    let r: StatsReport = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let p = r
        .processes
        .iter()
        .find(|p| p.comm == "egress-probe")
        .expect("the probe is reported");
    assert!(
        p.payload_bytes.abs_diff(BYTES) * 100 <= BYTES,
        "counted once: {} for {BYTES}",
        p.payload_bytes
    );
}
