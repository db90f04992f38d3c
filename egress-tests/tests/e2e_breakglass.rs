//! Break-glass exceptions (`egress allow`, `egress revoke`) with real enforcement: a pinned
//! `egress run` on test cgroups under a default-deny policy (`allow_loopback = false`), clients
//! connecting to loopback addresses nothing listens on (ECONNREFUSED: let through; EPERM:
//! denied). An exception opens one destination, port and protocol to its scope only (a cgroup,
//! a process, a user), ends by itself in the kernel with the controller killed, ends at once on
//! `revoke`, survives a restart, is listed without a controller, and is reported with who, what,
//! why and until when. The control socket refuses whoever is neither root nor in the admin
//! group, and lets that group grant but not reload.

use std::{
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output},
    time::{Duration, Instant},
};

use egress_tests::{
    ChildGuard, EgressCmd, LoopNs, TempDir, TestCgroup,
    Verdict::{self, Denied, Refused},
    bins,
    controller::pin_dir,
    events, probe,
};

const DEST: &str = "127.0.0.3:8000";

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output, what: &str) -> serde_json::Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// A cgroup below `parent` (a test cgroup made at the root of the hierarchy, or one below
/// such a cgroup).
fn child_of(parent: &TestCgroup, name: &str) -> TestCgroup {
    let root = egress::sys::cgroup::find_cgroup2_root().expect("a cgroup2 hierarchy");
    let rel = parent.path().strip_prefix(&root).unwrap_or_else(|_| {
        panic!(
            "{} is not below the cgroup2 root {}",
            parent.path().display(),
            root.display()
        )
    });
    TestCgroup::with_prefix(&format!("{}/{name}", rel.display()))
}

fn one(cg: &TestCgroup, op: &str, addr: &str) -> Verdict {
    probe(cg, &[(op, addr)]).remove(0)
}

/// The verdict of one TCP connect to DEST by a probe that runs as `uid` (setpriv, after joining
/// `cg` as root).
fn as_uid(cg: &TestCgroup, uid: u32, addr: &str) -> Verdict {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(bins::probe())
    .args(["tcp", addr]);
    cg.join_on_exec(&mut cmd);
    let out = ChildGuard::spawn(&mut cmd).output();
    assert!(out.status.success(), "probe as uid {uid}: {out:?}");
    egress_tests::probe::verdicts(&out.stdout).remove(0)
}

#[test]
fn an_exception_opens_one_destination_to_its_scope_only_and_ends_in_the_kernel() {
    let ns = LoopNs::new();
    let dir = TempDir::new("breakglass");
    // Enforced on `parent`; the exception is for `cg`, and `other` (its sibling) stays denied.
    let parent = TestCgroup::new();
    let cg = child_of(&parent, "granted");
    let other = child_of(&parent, "other");
    let pins = pin_dir();
    let ev = dir.join("events.jsonl");
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let pinned = || {
        EgressCmd::run(&ns, parent.path(), &dir)
            .pinned(&pins)
            .policy(&policy)
            .events(&ev)
    };
    let mut run = pinned().start();
    assert_eq!(one(&cg, "tcp", DEST), Denied, "the policy denies it");

    // Argument checks happen before anything is granted.
    let out = run.ctl(&["allow", "127.0.0.3", "--for", "1m", "--reason", "x"]);
    assert!(!out.status.success(), "a scope is required: {out:?}");
    let cgp = cg.path().to_str().unwrap();
    let out = run.ctl(&[
        "allow",
        "127.0.0.3",
        "--cgroup",
        cgp,
        "--for",
        "25h",
        "--reason",
        "x",
    ]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("longer than"),
        "--for is capped: {out:?}"
    );
    let out = run.ctl(&[
        "allow",
        "127.0.0.3",
        "--cgroup",
        cgp,
        "--for",
        "1m",
        "--reason",
        "x",
        "--pid",
        "1",
    ]);
    assert!(!out.status.success(), "one scope only: {out:?}");
    // A host name needs the DNS proxy, which this policy (no names) does not run.
    let out = run.ctl(&[
        "allow",
        "vendor.example.test",
        "--cgroup",
        cgp,
        "--for",
        "1m",
        "--reason",
        "x",
    ]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("needs the DNS proxy"),
        "a host exception without names in the policy: {out:?}"
    );

    // The grant: one destination, port and protocol, for the cgroup, for 8 seconds.
    let granted_at = Instant::now();
    let e = json(
        &run.ctl(&[
            "allow",
            "127.0.0.3",
            "--port",
            "8000",
            "--protocol",
            "tcp",
            "--cgroup",
            cgp,
            "--for",
            "8s",
            "--reason",
            "ticket 123",
            "-o",
            "json",
        ]),
        "egress allow",
    );
    let id_n = e["id"].as_u64().unwrap();
    let id = id_n.to_string();
    assert_eq!(e["dest"], "127.0.0.3/32", "{e}");
    assert_eq!(e["by_uid"], 0, "{e}");
    assert_eq!(
        one(&cg, "tcp", DEST),
        Refused,
        "the exception lets it through"
    );
    assert_eq!(one(&other, "tcp", DEST), Denied, "another cgroup");
    assert_eq!(one(&parent, "tcp", DEST), Denied, "the cgroup above");
    assert_eq!(one(&cg, "tcp", "127.0.0.3:8001"), Denied, "another port");
    assert_eq!(one(&cg, "tcp", "127.0.0.4:8000"), Denied, "another address");
    assert_eq!(one(&cg, "udp-sendto", DEST), Denied, "another protocol");
    // A process below the cgroup is covered, as `--cgroup` says.
    let child = child_of(&cg, "below");
    assert_eq!(one(&child, "tcp", DEST), Refused, "a cgroup below it");
    drop(child);

    // Listed by grants (text and JSON) and status.
    let text = ok(&run.ctl(&["grants"]), "egress grants");
    assert!(
        text.contains(&format!(
            "exception {id}: 127.0.0.3/32 port 8000 tcp for cgroup:"
        )) && text.contains("ticket 123"),
        "{text}"
    );
    let rows = json(
        &run.ctl(&["grants", "--exceptions", "-o", "json"]),
        "grants --exceptions",
    );
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    let status = run.status().unwrap();
    assert_eq!(status["exceptions"][0]["reason"], "ticket 123", "{status}");

    // The event: who, what, why, until when.
    let granted = events::of_kind(&ev, "exception");
    let g = granted
        .iter()
        .find(|v| v["action"] == "granted")
        .unwrap_or_else(|| panic!("no granted event in {granted:?}"));
    assert_eq!(g["id"], id_n);
    assert_eq!(g["dest"], "127.0.0.3/32");
    assert_eq!(g["port"], "8000");
    assert_eq!(g["protocol"], "tcp");
    assert_eq!(g["scope"], format!("cgroup:{}", cg.path().display()));
    assert_eq!(g["reason"], "ticket 123");
    assert_eq!(g["by_uid"], 0);
    assert!(
        humantime::parse_rfc3339(g["until"].as_str().unwrap()).is_ok(),
        "until is RFC 3339: {g}"
    );

    // kill -9: the exception stays in the kernel, is listed from the pins, and still ends on
    // time with no controller.
    run.kill_9();
    let dead = run.status().expect("status from the pins");
    assert_eq!(dead["controller"]["running"], false, "{dead}");
    assert_eq!(
        dead["exceptions"][0]["id"], id_n,
        "listed without a controller: {dead}"
    );
    assert_eq!(one(&cg, "tcp", DEST), Refused, "still in force");
    let mut ended = None;
    while granted_at.elapsed() < Duration::from_secs(20) {
        if one(&cg, "tcp", DEST) == Denied {
            ended = Some(granted_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ended = ended.expect("the exception ended in the kernel with the controller dead");
    assert!(
        ended >= Duration::from_secs(7),
        "not before its time: {ended:?}"
    );
    assert!(
        run.status().unwrap()["exceptions"]
            .as_array()
            .unwrap()
            .is_empty(),
        "an expired exception is not listed"
    );

    // A restart adopts the pins and reports the expiry it missed.
    let run = pinned().start();
    egress_tests::wait_for("the expired event", Duration::from_secs(10), || {
        events::of_kind(&ev, "exception")
            .iter()
            .any(|v| v["action"] == "expired" && v["id"] == id_n)
    });

    // A user exception: that user's processes only, until revoked.
    let e = json(
        &run.ctl(&[
            "allow",
            "127.0.0.3",
            "--user",
            "65534",
            "--for",
            "10m",
            "--reason",
            "inc-7",
            "-o",
            "json",
        ]),
        "allow --user",
    );
    let uid_n = e["id"].as_u64().unwrap();
    let uid_id = uid_n.to_string();
    assert_ne!(uid_id, id, "ids are not reused");
    assert_eq!(as_uid(&cg, 65534, DEST), Refused, "the user's process");
    assert_eq!(one(&cg, "tcp", DEST), Denied, "root's process");
    assert_eq!(as_uid(&cg, 65533, DEST), Denied, "another user's process");
    assert_eq!(
        as_uid(&other, 65534, DEST),
        Refused,
        "the user's process anywhere"
    );

    // It survives a restart (SIGTERM: the pins stay), and is listed by the new controller.
    let mut run = run;
    let exit = run.stop(15);
    assert!(exit.success(), "{exit}");
    let run = pinned().start();
    assert_eq!(as_uid(&cg, 65534, DEST), Refused, "after a restart");
    let rows = json(
        &run.ctl(&["grants", "--exceptions", "-o", "json"]),
        "grants after a restart",
    );
    assert_eq!(rows[0]["reason"], "inc-7", "{rows}");

    // A process exception: that process only (a shell that waits for its turn, then execs
    // the probe in place, keeping its pid), not its sibling in the same cgroup.
    let go = dir.join("go");
    // A child it forks (the first probe) has a pid of its own: not covered.
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; {probe} tcp {DEST}; exec {probe} tcp {DEST}",
        go = go.display(),
        probe = bins::probe().display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    cg.join_on_exec(&mut cmd);
    let waiting = ChildGuard::spawn(&mut cmd);
    let pid = waiting.pid().to_string();
    ok(
        &run.ctl(&[
            "allow",
            "127.0.0.3",
            "--pid",
            &pid,
            "--for",
            "10m",
            "--reason",
            "debug",
        ]),
        "allow --pid",
    );
    assert_eq!(
        one(&cg, "tcp", DEST),
        Denied,
        "another process of the cgroup"
    );
    std::fs::write(&go, "").unwrap();
    let out = waiting.output();
    assert_eq!(
        egress_tests::probe::verdicts(&out.stdout),
        [Denied, Refused],
        "its child, then the process itself: {out:?}"
    );
    // Its process exited: the exception ends (the pid could be reused).
    egress_tests::wait_for("the pid exception to end", Duration::from_secs(10), || {
        events::of_kind(&ev, "exception")
            .iter()
            .any(|v| v["action"] == "expired" && v["scope"] == format!("pid:{pid}"))
    });

    // Revoke ends the user exception at once.
    ok(&run.ctl(&["revoke", &uid_id]), "egress revoke");
    assert_eq!(as_uid(&cg, 65534, DEST), Denied, "revoked");
    let revoked = events::of_kind(&ev, "exception");
    let r = revoked
        .iter()
        .find(|v| v["action"] == "revoked")
        .unwrap_or_else(|| panic!("no revoked event: {revoked:?}"));
    assert_eq!(r["id"], uid_n);
    assert_eq!(r["revoked_by_uid"], 0);
    let out = run.ctl(&["revoke", &uid_id]);
    assert!(!out.status.success(), "revoking twice fails: {out:?}");

    // `egress stop` ends them all: a fresh start over the same pin directory restores none.
    ok(
        &run.ctl(&[
            "allow",
            "127.0.0.3",
            "--user",
            "65534",
            "--for",
            "10m",
            "--reason",
            "last",
        ]),
        "allow before stop",
    );
    assert_eq!(as_uid(&cg, 65534, DEST), Refused);
    ok(
        &run.ctl(&["stop", "--pin-dir", pins.to_str().unwrap()]),
        "egress stop",
    );
    let mut run = run;
    run.wait_exit("the controller after egress stop");
    let fresh = pinned().start();
    assert_eq!(as_uid(&cg, 65534, DEST), Denied, "not restored after stop");
    let status = fresh.status().unwrap();
    assert!(
        status["exceptions"].as_array().unwrap().is_empty(),
        "{status}"
    );
    drop(fresh);
    drop((cg, other));
}

/// Both families and every hook: an IPv6 destination (connect6), a v4-mapped one (connect6
/// judging IPv4), unconnected UDP (sendmsg4) under a UDP-only exception; and an exception
/// overrides an explicit `[[block]]` of the policy, as documented.
#[test]
fn exceptions_cover_ipv6_v4_mapped_and_udp_sends_and_override_blocks() {
    let ns = LoopNs::new();
    let dir = TempDir::new("breakglass-families");
    let cg = TestCgroup::new();
    let policy = dir.file(
        "p.toml",
        "allow_loopback = false\n[[block]]\nname = \"blocked\"\ndestinations = [\"127.0.0.6\"]\n",
    );
    let run = EgressCmd::run(&ns, cg.path(), &dir).policy(&policy).start();
    let cgp = cg.path().to_str().unwrap();
    let grant = |args: &[&str]| {
        let mut all = vec!["allow"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", cgp, "--for", "5m", "--reason", "t"]);
        ok(&run.ctl(&all), "egress allow");
    };
    for (op, addr) in [
        ("tcp", "[::1]:8000"),
        ("tcp", "[::ffff:127.0.0.3]:8000"),
        ("udp-sendto", "127.0.0.5:9000"),
        ("tcp", "127.0.0.6:8000"),
    ] {
        assert_eq!(one(&cg, op, addr), Denied, "before: {op} {addr}");
    }
    grant(&["::1", "--port", "8000", "--protocol", "tcp"]);
    grant(&["127.0.0.3/32", "--port", "8000"]);
    grant(&["127.0.0.5", "--protocol", "udp"]);
    grant(&["127.0.0.6"]);
    assert_eq!(one(&cg, "tcp", "[::1]:8000"), Refused, "IPv6");
    assert_eq!(one(&cg, "tcp", "[::1]:8001"), Denied, "IPv6, another port");
    assert_eq!(one(&cg, "udp-sendto", "[::1]:8000"), Denied, "IPv6, udp");
    assert_eq!(
        one(&cg, "tcp", "[::ffff:127.0.0.3]:8000"),
        Refused,
        "v4-mapped"
    );
    assert_eq!(
        one(&cg, "tcp", "[::ffff:127.0.0.3]:8001"),
        Denied,
        "v4-mapped, port"
    );
    assert_eq!(
        one(&cg, "udp-sendto", "127.0.0.5:9000"),
        Verdict::Succeeded,
        "sendmsg4"
    );
    assert_eq!(
        one(&cg, "tcp", "127.0.0.5:9000"),
        Denied,
        "tcp under a udp exception"
    );
    assert_eq!(
        one(&cg, "tcp", "127.0.0.6:8000"),
        Refused,
        "over a [[block]]"
    );
    let status = run.status().unwrap();
    assert_eq!(
        status["exceptions"].as_array().unwrap().len(),
        4,
        "{status}"
    );
}

/// `--admin-group`: the socket is the group's (0660), a member may grant and read but not
/// reload, and a user outside the group cannot use it at all; the uid recorded is the peer's.
#[test]
fn only_root_and_the_admin_group_may_grant() {
    let ns = LoopNs::new();
    let dir = TempDir::new("breakglass-admin");
    let cg = TestCgroup::new();
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    // The socket in a directory of its own, below a directory others may traverse.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock_dir = dir.join("sock");
    std::fs::create_dir(&sock_dir).unwrap();
    let socket = sock_dir.join("control.sock");
    let ev = dir.join("events.jsonl");
    let _run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&policy)
        .socket(&socket)
        .events(&ev)
        .args(["--admin-group", "users"])
        .start();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the socket is the group's");
    let egress_as = |uid: u32, gid: u32, args: &[&str]| -> Output {
        Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(bins::egress())
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap()
    };
    let cgp = cg.path().to_str().unwrap();
    let grant = [
        "allow",
        "127.0.0.3",
        "--port",
        "8000",
        "--cgroup",
        cgp,
        "--for",
        "5m",
        "--reason",
        "on call",
        "-o",
        "json",
    ];

    // Outside the group: not even a connection.
    let out = egress_as(65534, 65534, &grant);
    assert!(!out.status.success(), "a stranger may not grant: {out:?}");
    assert_eq!(one(&cg, "tcp", DEST), Denied);

    // A member (the group as its primary group) may grant, and is recorded as itself.
    let e = json(&egress_as(65534, 100, &grant), "allow by a member");
    assert_eq!(e["by_uid"], 65534, "{e}");
    assert_eq!(one(&cg, "tcp", DEST), Refused);
    let out = egress_as(65534, 100, &["status", "-o", "json"]);
    ok(&out, "status by a member");
    // ... but not reload or stop.
    let out = egress_as(65534, 100, &["reload"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("root only"),
        "{out:?}"
    );
    // A member may revoke.
    let id = e["id"].as_u64().unwrap().to_string();
    ok(
        &egress_as(65534, 100, &["revoke", &id]),
        "revoke by a member",
    );
    assert_eq!(one(&cg, "tcp", DEST), Denied);
    let evs = events::of_kind(&ev, "exception");
    assert!(
        evs.iter()
            .any(|v| v["action"] == "revoked" && v["revoked_by_uid"] == 65534),
        "{evs:?}"
    );
}

/// A host exception (`egress allow NAME`): under a policy of names whose services do not
/// approve the name and whose proxy refuses unlisted names, the exception's cgroup resolves it
/// through the proxy and connects to its address; a sibling cgroup still gets NXDOMAIN and a
/// denied connect; `revoke` takes the learned address away again.
#[test]
fn a_host_exception_opens_the_names_answers_to_its_scope_only() {
    use egress_tests::{
        NetPair, Probe, TcpSink,
        Verdict::Succeeded,
        dns::{DnsServer, NetnsResolvConf, Record},
        netns::VETH_B,
    };
    let pair = NetPair::new();
    pair.b.ip(&["addr", "add", "198.18.0.4/24", "dev", VETH_B]);
    let _sink = TcpSink::start(&pair.b, (std::net::Ipv4Addr::new(198, 18, 0, 4), 443));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let _dns = DnsServer::start(
        &pair.a,
        ip("127.0.0.2"),
        &[
            Record::Addr("api.example.test", ip("198.18.0.2"), 300),
            Record::Addr("vendor.example.test", ip("198.18.0.4"), 300),
            Record::Addr("bad.paste.test", ip("198.18.0.4"), 300),
        ],
    );
    // A nameserver that does not exist: only the steering to the proxy answers.
    let _resolv = NetnsResolvConf::new(&pair.a, &[ip("10.53.0.1")], "timeout:2 attempts:1");
    let dir = TempDir::new("breakglass-host");
    let policy = dir.file(
        "p.toml",
        r#"
mode = "enforce"
allow_loopback = false

[dns]
upstream = ["127.0.0.2"]
unlisted = "refuse"

[[service]]
name = "api"
hosts = ["api.example.test"]
ports = [443]
protocols = ["tcp"]

[[block]]
name = "paste"
hosts = ["**.paste.test"]
"#,
    );
    let parent = TestCgroup::new();
    let cg = child_of(&parent, "granted");
    let other = child_of(&parent, "other");
    let pins = pin_dir();
    let ev = dir.join("events.jsonl");
    let run = EgressCmd::run(&pair.a, parent.path(), &dir)
        .pinned(&pins)
        .policy(&policy)
        .events(&ev)
        .start();
    let probe = |c: &TestCgroup, args: &[&str]| -> Vec<(Verdict, Option<String>)> {
        Probe::new()
            .netns(&pair.a)
            .cgroup(c.path())
            .opt("--timeout", "2")
            .args(args)
            .run()
            .into_iter()
            .map(|l| (l.result, l.from))
            .collect()
    };
    let nxdomain = || Verdict::Other("EAI_NONAME".into());
    let name = "vendor.example.test:443";
    let addr = "198.18.0.4:443";
    assert_eq!(
        probe(&cg, &["resolve", name, "tcp", addr]),
        [(nxdomain(), None), (Denied, None)],
        "before the exception: the name is refused, its address denied"
    );

    let e = json(
        &run.ctl(&[
            "allow",
            "Vendor.Example.Test.",
            "--port",
            "443",
            "--protocol",
            "tcp",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--for",
            "30s",
            "--reason",
            "t",
            "-o",
            "json",
        ]),
        "egress allow NAME",
    );
    let id = e["id"].as_u64().unwrap().to_string();
    assert_eq!(e["host"], "vendor.example.test", "{e}");
    assert!(e.get("dest").is_none(), "{e}");

    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        probe(&cg, &["resolve", name, "tcp", "198.18.0.4:80"]),
        [(Succeeded, s("198.18.0.4")), (Denied, None)],
        "the scope resolves the name and connects, on the exception's port only"
    );
    assert_eq!(
        probe(&other, &["resolve", name, "tcp", addr]),
        [(nxdomain(), None), (Denied, None)],
        "another cgroup is still refused"
    );
    assert_eq!(
        probe(&parent, &["tcp", addr]),
        [(Denied, None)],
        "the cgroup above is not covered"
    );

    // Listed with what was learned, and in the event.
    let rows = json(
        &run.ctl(&["grants", "--exceptions", "-o", "json"]),
        "grants --exceptions",
    );
    assert_eq!(rows[0]["host"], "vendor.example.test", "{rows}");
    assert_eq!(
        rows[0]["addresses"],
        serde_json::json!(["198.18.0.4"]),
        "{rows}"
    );
    let text = ok(&run.ctl(&["grants"]), "egress grants");
    assert!(
        text.contains(&format!(
            "exception {id}: host vendor.example.test (198.18.0.4) port 443 tcp"
        )),
        "{text}"
    );
    let granted = events::of_kind(&ev, "exception");
    assert!(
        granted
            .iter()
            .any(|v| v["action"] == "granted" && v["host"] == "vendor.example.test"),
        "{granted:?}"
    );

    // A name a `[[block]]` refuses: resolved for the exception's scope (`other` here) only.
    let out = run.ctl(&[
        "allow",
        "bad.paste.test",
        "--cgroup",
        other.path().to_str().unwrap(),
        "--for",
        "30s",
        "--reason",
        "t2",
    ]);
    ok(&out, "egress allow a blocked name");
    assert_eq!(
        probe(&other, &["resolve", "bad.paste.test:443"]),
        [(Succeeded, s("198.18.0.4"))],
        "the block is overridden for the exception's scope"
    );
    assert_eq!(
        probe(&parent, &["resolve", "bad.paste.test:443"]),
        [(nxdomain(), None)],
        "and for no one else"
    );
    assert_eq!(
        probe(&other, &["resolve", name]),
        [(nxdomain(), None)],
        "one exception's name is not another's"
    );

    // Revoked: the learned address goes with it.
    ok(&run.ctl(&["revoke", &id]), "egress revoke");
    assert_eq!(
        probe(&cg, &["tcp", addr, "resolve", name]),
        [(Denied, None), (nxdomain(), None)],
        "after revoke: denied again"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let evs = events::of_kind(&ev, "exception");
        if let Some(r) = evs.iter().find(|v| v["action"] == "revoked") {
            assert_eq!(r["addresses"], serde_json::json!(["198.18.0.4"]), "{r}");
            assert_eq!(r["host"], "vendor.example.test", "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "no revoked event: {evs:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
