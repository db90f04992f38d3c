//! End-to-end tests of byte accounting through the `egress` binary, between two test network
//! namespaces: `exec --report` around curl uploading to a server, and `stats`, `top` and
//! `--metrics` against a running `egress run`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};

use egress_tests::{
    EgressCmd, HttpServer, NetPair, Probe, TcpSink, TempDir, TestCgroup, Verdict, events, in_netns,
    netns::{ADDR_B, VETH_A, payload_accounts_for},
    wait_for,
};

const POLICY: &str = r#"
allow_loopback = true
[[service]]
name = "upload-target"
destinations = ["198.18.0.0/24"]
ports = ["5001-5100"]
protocols = ["tcp"]
"#;

/// How long a sink gets to see what the client sent.
const DELIVERY: Duration = Duration::from_secs(20);

#[test]
fn exec_report_counts_a_curl_upload() {
    let pair = NetPair::new();
    let dir = TempDir::new("acct-exec");
    let policy = dir.file("p.toml", POLICY);
    let report = dir.join("report.json");
    const SIZE: usize = 4 * 1024 * 1024;
    let upload = dir.join("upload.bin");
    std::fs::write(&upload, vec![0x42u8; SIZE]).unwrap();
    // The server ignores `Expect: 100-continue`, so curl waits a second before the body: the
    // controller sees it alive (exe, cmdline) on a tick before it exits.
    let server = HttpServer::start(&pair.b, (ADDR_B, 5050), b"ok");
    let retrans_before = pair.a.tcp_retransmitted_segments();
    let out = EgressCmd::exec(&pair.a)
        .iface(VETH_A)
        .policy(&policy)
        .report(&report)
        .command(["curl", "-sS", "--max-time", "20", "--data-binary"])
        .command([format!("@{}", upload.display())])
        .command([format!("http://{ADDR_B}:5050/upload")])
        .output();
    assert!(
        out.status.success(),
        "curl failed (it must be installed: .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"ok");
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].body.len(), SIZE);
    let r = events::report(&report);
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
    // Payload is the body plus the request head (within 1% of what curl wrote), plus what TCP
    // retransmitted.
    let retransmitted = pair.a.tcp_retransmitted_segments() - retrans_before;
    assert!(
        payload_accounts_for(d.payload_bytes, SIZE as u64, retransmitted),
        "payload {} for a {SIZE}-byte body ({retransmitted} segments retransmitted)",
        d.payload_bytes
    );
    assert!(d.bytes > d.payload_bytes);
}

#[test]
fn stats_top_and_metrics_from_a_running_controller() {
    let pair = NetPair::new();
    let dir = TempDir::new("acct-run");
    let policy = dir.file("p.toml", POLICY);
    let cg = TestCgroup::new();
    // Inside namespace a: any port is free.
    let metrics_port = 19464u16;
    let run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .iface(VETH_A)
        .policy(&policy)
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .events(&dir.join("events.jsonl"))
        .start();
    let sink = TcpSink::start(&pair.b, (ADDR_B, 5060));
    const BYTES: u64 = 3 * 1024 * 1024;
    let lines = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .args(["tcp-send", "198.18.0.2:5060", &BYTES.to_string()])
        .run();
    assert_eq!(lines[0].result, Verdict::Succeeded, "{lines:?}");
    let pid = lines[0].pid;
    wait_for("the sink to read the upload", DELIVERY, || {
        sink.closed() == 1
    });
    assert_eq!(sink.bytes(), BYTES);

    // Within a couple of ticks the controller reports the probe, by pid, with its destination.
    let mut report = None;
    wait_for(
        "stats --json to report the probe",
        Duration::from_secs(10),
        || {
            let r = run.stats();
            let found = r
                .processes
                .iter()
                .any(|p| p.pid == pid && p.payload_bytes >= BYTES);
            report = Some(r);
            found
        },
    );
    let report = report.unwrap();
    let p = report.processes.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!(p.comm, "egress-probe");
    assert!(p.payload_bytes.abs_diff(BYTES) * 100 <= BYTES, "{p:?}");
    assert_eq!(
        (p.destinations[0].dst.as_str(), p.destinations[0].port),
        ("198.18.0.2", 5060)
    );

    // The human views work against the same controller (their text is not a contract).
    for view in [&["stats"][..], &["top", "--once"][..]] {
        let out = run.ctl(view);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "egress {view:?}: {out:?}"
        );
    }

    // Prometheus exposition format and metric names are a contract.
    let metrics = in_netns(&pair.a, move || {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, metrics_port)).unwrap();
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
}

#[test]
fn default_interfaces_count_bridged_traffic_once() {
    // veth-a enslaved to a bridge br0 in namespace a: both are up, and a packet leaves through
    // both. The default interface choice must count it once.
    let pair = NetPair::new();
    let dir = TempDir::new("acct-bridge");
    pair.a.ip(&["addr", "flush", "dev", VETH_A]);
    pair.a.ip(&["link", "add", "br0", "type", "bridge"]);
    pair.a.ip(&["link", "set", VETH_A, "master", "br0"]);
    pair.a.ip(&["addr", "add", "198.18.0.1/24", "dev", "br0"]);
    pair.a.ip(&["link", "set", "br0", "up"]);
    let policy = dir.file("p.toml", POLICY);
    let report = dir.join("report.json");
    let sink = TcpSink::start(&pair.b, (ADDR_B, 5070));
    const BYTES: u64 = 4 * 1024 * 1024;
    let retrans_before = pair.a.tcp_retransmitted_segments();
    // `ip netns exec` gives egress a /sys of namespace a, where it can see the bridge; cgroup2
    // is not mounted there, so egress mounts its own view of it.
    let out = EgressCmd::exec(&pair.a)
        .netns_sysfs()
        .json_logs()
        .policy(&policy)
        .report(&report)
        .probe(["tcp-send", "198.18.0.2:5070", &BYTES.to_string()])
        .success();
    wait_for("the sink to read the upload", DELIVERY, || {
        sink.closed() == 1
    });
    // The interfaces TC was attached to, from the structured log record that lists them.
    let ifaces: Vec<Vec<String>> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let list = v["fields"]["ifaces"].as_str()?.to_string();
            Some(serde_json::from_str(&list).expect("ifaces is a list of names"))
        })
        .collect();
    assert_eq!(
        ifaces,
        [["br0"]],
        "TC on the bridge only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = events::report(&report);
    let p = r
        .processes
        .iter()
        .find(|p| p.comm == "egress-probe")
        .expect("the probe is reported");
    // Counted once (twice would be double), retransmissions allowed for.
    let retransmitted = pair.a.tcp_retransmitted_segments() - retrans_before;
    assert!(
        payload_accounts_for(p.payload_bytes, BYTES, retransmitted),
        "counted once: {} for {BYTES} ({retransmitted} segments retransmitted)",
        p.payload_bytes
    );
}

/// Without `--iface`, TC follows the interfaces: a veth made after the controller started gets
/// the TC program within seconds, and what a process sends over it is counted.
#[test]
fn tc_follows_an_interface_that_appears_after_the_start() {
    let a = egress_tests::LoopNs::new();
    let b = egress_tests::LoopNs::new();
    let dir = TempDir::new("acct-late-iface");
    let policy = dir.file("p.toml", POLICY);
    let cg = TestCgroup::new();
    let run = EgressCmd::run(&a, cg.path(), &dir).policy(&policy).start();
    let ifaces = |run: &egress_tests::Egress| {
        run.status().expect("egress status --json")["attached"]["tc"]["ifaces"].clone()
    };
    assert_eq!(
        ifaces(&run),
        serde_json::json!([]),
        "only loopback at start"
    );
    egress_tests::netns::veth_between(&a, &b);
    wait_for("TC on the new veth", Duration::from_secs(10), || {
        ifaces(&run) == serde_json::json!([VETH_A])
    });
    let sink = TcpSink::start(&b, (ADDR_B, 5080));
    const BYTES: u64 = 200_000;
    let got = Probe::new()
        .netns(&a)
        .cgroup(&cg)
        .args(["tcp-send", "198.18.0.2:5080", &BYTES.to_string()])
        .verdicts();
    assert_eq!(got, [Verdict::Succeeded]);
    wait_for("the sink", DELIVERY, || sink.bytes() == BYTES);
    wait_for("the upload in egress stats", DELIVERY, || {
        run.stats().processes.iter().any(|p| {
            p.destinations
                .iter()
                .any(|d| d.dst == "198.18.0.2" && d.port == 5080 && d.payload_bytes >= BYTES)
        })
    });
}
