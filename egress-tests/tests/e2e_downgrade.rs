//! No silent downgrade: a controller restarted over pinned enforcement (a test cgroup, pins in a
//! test directory, `egress run` in a test namespace) keeps the policy in force unless it is given
//! another with `--policy`, and reports the denies decided while no controller ran with the rules
//! and hash of the policy that decided them.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use egress::{datapath::pins::Pins, events::JsonEvent, policy::content_hash};
use egress_tests::{
    Egress, EgressCmd, LoopNs, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    controller::pin_dir,
    events, probe, wait_for,
};

/// Enforces; 127.0.0.3 is denied by rule 2, `old-block`.
const ENFORCE: &str = "mode = \"enforce\"\ndefault = \"deny\"\nallow_loopback = false\n\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n\n[[block]]\nname = \"old-block\"\ndestinations = [\"127.0.0.3\"]\n";
/// Audits; its rule 2 is `new-service`, so an event named from it would say so.
const AUDIT: &str = "mode = \"audit\"\ndefault = \"deny\"\nallow_loopback = false\n\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n\n[[service]]\nname = \"new-service\"\ndestinations = [\"10.9.0.0/16\"]\n";
/// Where the deny made while no controller runs goes (no other probe uses this port).
const GAP: &str = "127.0.0.3:9001";
const GAP_PORT: u16 = 9001;
/// How long a restarted controller gets to report what waited in the ring buffer.
const DRAIN: Duration = Duration::from_secs(10);

/// Enforcement of [`ENFORCE`] pinned for a test cgroup by a controller that was then killed with
/// SIGKILL, and one deny (to [`GAP`]) decided while no controller ran.
struct Orphaned {
    /// First, so that it drops first: its guard removes the pins once no controller holds them.
    _first: Egress,
    ns: LoopNs,
    dir: TempDir,
    cg: TestCgroup,
    pins: PathBuf,
    /// The enforce policy's file, and its hash as applied.
    policy: PathBuf,
    hash: String,
}

fn orphaned() -> Orphaned {
    let ns = LoopNs::new();
    let dir = TempDir::new("downgrade");
    let cg = TestCgroup::new();
    let pins = pin_dir();
    let policy = dir.file("enforce.toml", ENFORCE);
    let mut first = EgressCmd::run(&ns, cg.path(), &dir)
        .pinned(&pins)
        .policy(&policy)
        .start();
    let s = first.status().expect("status of the first controller");
    let hash = content_hash(ENFORCE);
    assert_eq!(s["policy"]["hash"], hash.as_str(), "{s}");
    assert_eq!(s["policy"]["mode"], "enforce", "{s}");
    first.kill_9();
    assert_eq!(
        probe(&cg, &[("tcp", GAP)]),
        [Denied],
        "denied with no controller running"
    );
    Orphaned {
        _first: first,
        ns,
        dir,
        cg,
        pins,
        policy,
        hash,
    }
}

impl Orphaned {
    /// `egress run` on the same cgroup, pins and socket, logging JSON.
    fn restart(&self) -> EgressCmd {
        EgressCmd::run(&self.ns, self.cg.path(), &self.dir)
            .pinned(&self.pins)
            .json_logs()
    }
}

/// The `kind` event (`deny`, `audit`) to `port`, once the controller has written it.
fn decision(events_file: &Path, kind: &str, port: u16) -> JsonEvent {
    let find = || {
        events::of_kind(events_file, kind)
            .into_iter()
            .map(|v| serde_json::from_value::<JsonEvent>(v).expect("a deny or audit event"))
            .find(|e| e.port == port)
    };
    wait_for(&format!("the {kind} event to port {port}"), DRAIN, || {
        find().is_some()
    });
    find().expect("found")
}

fn policy_of(s: &serde_json::Value) -> (&str, &str, u64, &str, &str) {
    let p = &s["policy"];
    (
        p["source"].as_str().unwrap_or_default(),
        p["hash"].as_str().unwrap_or_default(),
        p["generation"].as_u64().unwrap_or_default(),
        p["mode"].as_str().unwrap_or_default(),
        p["default"].as_str().unwrap_or_default(),
    )
}

#[test]
fn a_bare_restart_keeps_the_pinned_enforce_policy_and_names_its_denies_by_it() {
    let o = orphaned();
    // The pins alone say which policy is in force: /run (where the state file lives) may have
    // been emptied, as a service manager does on stop.
    let state_file = Pins::new(&o.pins).state_path();
    std::fs::remove_file(&state_file)
        .unwrap_or_else(|e| panic!("removing {}: {e}", state_file.display()));
    let events_file = o.dir.join("events.jsonl");
    let second = o.restart().events(&events_file).start();

    let s = second.status().expect("status");
    assert_eq!(s["controller"]["pid"], second.pid(), "{s}");
    assert_eq!(
        policy_of(&s),
        (
            o.policy.to_str().unwrap(),
            o.hash.as_str(),
            1,
            "enforce",
            "deny"
        ),
        "the enforce policy stays in force, not the embedded default: {s}"
    );
    assert_eq!(
        probe(
            &o.cg,
            &[("tcp", "127.0.0.3:8000"), ("tcp", "127.0.0.4:8000")]
        ),
        [Denied, Denied],
        "still denied by the block and by the default"
    );

    let gap = decision(&events_file, "deny", GAP_PORT);
    assert_eq!(gap.rule, "old-block", "{gap:?}");
    assert_eq!(gap.policy_hash, o.hash, "{gap:?}");
    assert_eq!(gap.generation, 1, "{gap:?}");
    assert!(
        events::of_kind(&events_file, "reload").is_empty(),
        "nothing was reloaded"
    );
}

#[test]
fn an_explicit_audit_policy_switches_with_a_warning_and_old_denies_keep_their_policy() {
    let o = orphaned();
    let audit = o.dir.file("audit.toml", AUDIT);
    let audit_hash = content_hash(AUDIT);
    let events_file = o.dir.join("events.jsonl");
    let second = o.restart().policy(&audit).events(&events_file).start();

    let s = second.status().expect("status");
    assert_eq!(
        policy_of(&s),
        (
            audit.to_str().unwrap(),
            audit_hash.as_str(),
            2,
            "audit",
            "deny"
        ),
        "{s}"
    );
    assert_eq!(
        probe(&o.cg, &[("tcp", "127.0.0.3:8000")]),
        [Refused],
        "audit blocks nothing"
    );

    // The deny decided by generation 1 keeps generation 1's names and hash; what generation 2
    // decides is named by the audit policy.
    let gap = decision(&events_file, "deny", GAP_PORT);
    assert_eq!(
        (gap.rule.as_str(), gap.policy_hash.as_str(), gap.generation),
        ("old-block", o.hash.as_str(), 1),
        "{gap:?}"
    );
    let audited = decision(&events_file, "audit", 8000);
    assert_eq!(
        (audited.policy_hash.as_str(), audited.generation),
        (audit_hash.as_str(), 2),
        "{audited:?}"
    );
    let reloads = events::of_kind(&events_file, "reload");
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    assert_eq!(reloads[0]["generation"], 2);

    let warned = second.warnings().into_iter().any(|w| {
        let f = &w["fields"];
        f["old_policy"] == o.policy.to_str().unwrap()
            && f["old_hash"] == o.hash.as_str()
            && f["old_mode"] == "enforce"
            && f["new_policy"] == audit.to_str().unwrap()
            && f["new_hash"] == audit_hash.as_str()
            && f["new_mode"] == "audit"
    });
    assert!(
        warned,
        "a WARN record names the old and the new policy: {:?}",
        second.log_records()
    );
}

#[test]
fn a_bare_restart_after_the_file_changed_keeps_what_the_kernel_holds_until_reloaded() {
    let o = orphaned();
    // The recorded file no longer holds what was applied.
    std::fs::write(&o.policy, AUDIT).expect("rewriting the policy file");
    let events_file = o.dir.join("events.jsonl");
    let second = o.restart().events(&events_file).start();

    let s = second.status().expect("status");
    assert_eq!(
        policy_of(&s),
        (
            o.policy.to_str().unwrap(),
            o.hash.as_str(),
            1,
            "enforce",
            "deny"
        ),
        "what the kernel holds, neither the changed file nor the embedded default: {s}"
    );
    assert_eq!(
        probe(
            &o.cg,
            &[("tcp", "127.0.0.3:8000"), ("tcp", "127.0.0.4:8000")]
        ),
        [Denied, Denied]
    );
    let warned = second.warnings().into_iter().any(|w| {
        let f = &w["fields"];
        f["generation"] == 1 && f["hash"] == o.hash.as_str() && f["mode"] == "enforce"
    });
    assert!(
        warned,
        "a WARN record says what is kept: {:?}",
        second.log_records()
    );
    // The rules of generation 1 are not known any more: named by id, with the recorded hash.
    let gap = decision(&events_file, "deny", GAP_PORT);
    assert_eq!(
        (gap.rule.as_str(), gap.policy_hash.as_str(), gap.generation),
        ("rule#2", o.hash.as_str(), 1),
        "{gap:?}"
    );

    // An explicit reload applies the file as it is now.
    let out = second.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let s = second.status().expect("status");
    assert_eq!(
        policy_of(&s),
        (
            o.policy.to_str().unwrap(),
            content_hash(AUDIT).as_str(),
            2,
            "audit",
            "deny"
        ),
        "{s}"
    );
}
