//! What `egress run --metrics` serves, read by an independent parser: the OpenMetrics parser of
//! the Prometheus project's Python client (`prometheus_client.openmetrics.parser`, strict: a
//! malformed exposition is an exception). Required, never skipped: `.ci/run` installs it into
//! target/tools/venv (or set EGRESS_METRICS_PYTHON to a python that has it). Also the content
//! type, the probes, and the series the README lists.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use egress_tests::{EgressCmd, LoopNs, TempDir, TestCgroup, Verdict::Denied, in_netns, probe};
use serde_json::Value;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRESS_METRICS_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/tools/venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: python3 -m venv target/tools/venv && target/tools/venv/bin/pip install prometheus-client (.ci/run does it)",
        venv.display()
    );
    venv
}

/// Families as the parser reads them: `[{name, type, unit, samples: [{name, labels, value}]}]`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "unit": f.unit,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]})
print(json.dumps(out))
"#;

fn parse(body: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the OpenMetrics parser");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("the parser's JSON")
}

/// `GET path` on 127.0.0.1:port inside `ns`: (status line, headers, body).
fn get(ns: &LoopNs, port: u16, path: &'static str) -> (String, String, String) {
    let text = in_netns(ns, move || {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t
    });
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.into(), headers.into(), body.into())
}

fn family<'a>(families: &'a [Value], name: &str) -> &'a Value {
    families
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(families: &[Value], family_name: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = family(families, family_name);
    f["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {f}"))["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn metrics_are_openmetrics_an_independent_parser_reads() {
    let ns = LoopNs::new();
    let dir = TempDir::new("metrics-om");
    let cg = TestCgroup::new();
    let policy = dir.file("deny.toml", "allow_loopback = false\n");
    let bad = dir.file("bad.toml", "mode = \"sometimes\"\n");
    let port = 19465u16;
    let run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&policy)
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .start();
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.4:80")]), [Denied]);
    // A refused reload: the reload series say so.
    assert!(!run.reload(&bad).status.success());
    let hash = egress::policy::content_hash(&std::fs::read_to_string(&policy).unwrap());

    let mut families = Vec::new();
    egress_tests::wait_for(
        "the deny in the metrics",
        std::time::Duration::from_secs(10),
        || {
            let (status, headers, body) = get(&ns, port, "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert!(
                headers.lines().any(|h| h
                    == "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
                "{headers}"
            );
            families = parse(&body);
            sample(
                &families,
                "egress_decisions",
                "egress_decisions_total",
                &[("verdict", "deny"), ("hook", "cgroup")],
            ) >= 1.0
                && sample(
                    &families,
                    "egress_config_last_reload_successful",
                    "egress_config_last_reload_successful",
                    &[],
                ) == 0.0
        },
    );
    let f = &families;
    assert_eq!(family(f, "egress_decisions")["type"], "counter");
    for (verdict, hook) in [
        ("allow", "cgroup"),
        ("audit", "cgroup"),
        ("deny", "tc"),
        ("audit", "tc"),
    ] {
        sample(
            f,
            "egress_decisions",
            "egress_decisions_total",
            &[("verdict", verdict), ("hook", hook)],
        );
    }
    assert_eq!(family(f, "egress_build")["type"], "info");
    sample(
        f,
        "egress_build",
        "egress_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    assert_eq!(family(f, "egress_policy")["type"], "info");
    assert_eq!(
        sample(
            f,
            "egress_policy",
            "egress_policy_info",
            &[("hash", &hash), ("generation", "1"), ("mode", "enforce")],
        ),
        1.0
    );
    let success = sample(
        f,
        "egress_config_last_reload_success_timestamp_seconds",
        "egress_config_last_reload_success_timestamp_seconds",
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - 120.0 < success && success <= now,
        "{success} vs {now}"
    );
    for map in ["flows", "owners", "blocks", "block_tree", "grants"] {
        let cap = sample(
            f,
            "egress_map_max_entries",
            "egress_map_max_entries",
            &[("map", map)],
        );
        let n = sample(
            f,
            "egress_map_entries",
            "egress_map_entries",
            &[("map", map)],
        );
        assert!(cap > 0.0 && n <= cap, "{map}: {n} of {cap}");
    }
    assert_eq!(
        sample(
            f,
            "egress_map_max_entries",
            "egress_map_max_entries",
            &[("map", "owners")]
        ),
        131_072.0
    );
    for link in ["connect4", "sendmsg6", "skb_egress"] {
        assert_eq!(
            sample(
                f,
                "egress_link_attached",
                "egress_link_attached",
                &[("link", link)]
            ),
            1.0,
            "{link}"
        );
    }
    assert_eq!(family(f, "egress_process_bytes")["unit"], "bytes");
    assert_eq!(family(f, "egress_destination_bytes")["unit"], "bytes");
    for name in [
        "egress_tc_dropped_packets",
        "egress_budget_dropped_packets",
        "egress_events_lost",
        "egress_rule_events",
        // The previous release's names, one more release.
        "egress_tc_dropped",
        "egress_denies",
    ] {
        assert_eq!(family(f, name)["type"], "counter", "{name}");
    }

    let (status, _, body) = get(&ns, port, "/healthz");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, _, _) = get(&ns, port, "/readyz");
    assert_eq!(status, "HTTP/1.1 200 OK");
}
