//! End-to-end tests of the event stream as a log shipper and a SIEM take it: the events file is
//! created owner-only and reopened on SIGUSR1 (logrotate without `copytruncate`: rename, signal,
//! and the next event is in a new file), every event carries `schema_version` and `hostname`,
//! and `--events-format ecs` writes Elastic Common Schema documents.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use egress_tests::{
    EgressCmd, NetPair, Probe, TempDir, TestCgroup, Verdict::Denied, events, netns::VETH_A,
    probe::parse_calls, wait_for,
};

fn policy() -> String {
    "allow_loopback = true\n[[service]]\nname = \"lab\"\ndestinations = [\"198.18.0.0/24\"]\nports = [\"5080-5089\"]\nprotocols = [\"tcp\"]\n[[block]]\nname = \"lab-port-5089\"\ndestinations = [\"198.18.0.0/24\"]\nports = [5089]\n".into()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The pids of the deny events in `file`.
fn denied_pids(file: &Path) -> Vec<u64> {
    events::of_kind(file, "deny")
        .iter()
        .filter_map(|e| e["pid"].as_u64())
        .collect()
}

#[test]
fn the_events_file_is_private_and_reopened_on_sigusr1_after_a_rotation() {
    let pair = NetPair::new();
    let dir = TempDir::new("events-rotate");
    let cg = TestCgroup::new();
    let policy = dir.file("p.toml", &policy());
    let file = dir.join("events.jsonl");
    let rotated = dir.join("events.jsonl.1");
    let mut run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .iface(VETH_A)
        .policy(&policy)
        .events(&file)
        .start();
    assert_eq!(mode(&file), 0o600, "created owner-only");
    let denied = || {
        let l = Probe::new()
            .netns(&pair.a)
            .cgroup(&cg)
            .args(["tcp", "198.18.0.2:5089", "sleep", "300"])
            .run();
        assert_eq!(l[0].result, Denied, "{l:?}");
        u64::from(l[0].pid)
    };

    let first = denied();
    wait_for("the first deny", Duration::from_secs(10), || {
        denied_pids(&file).contains(&first)
    });
    let line = &events::of_kind(&file, "deny")[0];
    assert_eq!(line["schema_version"], 1, "{line}");
    assert!(
        line["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{line}"
    );

    // logrotate: rename, then the postrotate signal.
    std::fs::rename(&file, &rotated).unwrap();
    run.signal(libc::SIGUSR1);
    wait_for(
        "the events file to be reopened",
        Duration::from_secs(10),
        || file.exists(),
    );
    assert_eq!(mode(&file), 0o600, "the new file is owner-only too");
    let second = denied();
    wait_for(
        "the second deny in the new file",
        Duration::from_secs(10),
        || denied_pids(&file).contains(&second),
    );
    assert_eq!(
        denied_pids(&file),
        [second],
        "only the new event in the new file"
    );
    assert_eq!(
        denied_pids(&rotated),
        [first],
        "the rotated file is left alone"
    );
    let exit = run.stop(libc::SIGTERM);
    assert!(exit.success(), "{}", run.stderr_text());
}

#[test]
fn ecs_events_carry_the_fields_a_siem_indexes() {
    let pair = NetPair::new();
    let dir = TempDir::new("events-ecs");
    let policy = dir.file("p.toml", &policy());
    let file = dir.join("events.jsonl");
    let out = EgressCmd::exec(&pair.a)
        .iface(VETH_A)
        .policy(&policy)
        .events(&file)
        .args(["--events-format", "ecs"])
        .probe(["tcp", "198.18.0.2:5089", "sleep", "700"])
        .success();
    let l = parse_calls(&out.stdout);
    assert_eq!(l[0].result, Denied);
    let docs = events::lines(&file);
    assert_eq!(docs.len(), 1, "{docs:#?}");
    let d = &docs[0];
    humantime::parse_rfc3339(d["@timestamp"].as_str().expect("@timestamp")).unwrap();
    assert!(
        d["ecs"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("8."))
    );
    assert_eq!(d["event"]["kind"], "event");
    assert_eq!(d["event"]["category"], serde_json::json!(["network"]));
    assert_eq!(
        d["event"]["type"],
        serde_json::json!(["connection", "denied"])
    );
    assert_eq!(d["event"]["action"], "deny");
    assert_eq!(d["process"]["pid"], l[0].pid);
    assert_eq!(d["process"]["name"], "egress-probe");
    assert!(
        d["process"]["executable"]
            .as_str()
            .is_some_and(|e| e.ends_with("/egress-probe")),
        "{d}"
    );
    assert!(d["user"]["id"].is_string(), "{d}");
    assert_eq!(d["destination"]["ip"], "198.18.0.2");
    assert_eq!(d["destination"]["port"], 5089);
    assert_eq!(d["network"]["transport"], "tcp");
    assert_eq!(d["rule"]["name"], "lab-port-5089");
    assert!(
        d["host"]["hostname"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "{d}"
    );
    assert_eq!(d["egress"]["event"], "deny", "the egress line is kept");
}
