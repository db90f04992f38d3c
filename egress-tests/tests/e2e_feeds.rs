//! Threat-feed blocklists (`[[blocklist]]`) enforced by a real `egress run` on a test cgroup in a
//! test network namespace, loopback judged (`allow_loopback = false`): feed files in each
//! address format blocking real connections over a service that approves them, deny events and
//! `explain` naming the feed and the entry, a file re-read at reload, a bad copy (HTML) keeping
//! the last good one; and a `url` feed served over HTTP in the namespace: refreshed without a
//! restart (a new entry blocked, a removed one allowed), an HTML answer keeping the last good
//! copy, and a restart with the server gone enforcing the cached copy.

use std::{path::Path, process::Command, time::Duration};

use egress_tests::{
    ChildGuard, Egress, EgressCmd, LoopNs, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    bins, events, probe, wait_for,
};

/// A service approving everything on loopback: what the feeds block, they block over it.
const BASE: &str = "allow_loopback = false\n[[service]]\nname = \"everything\"\ndestinations = [\"127.0.0.0/8\"]\n";

fn start(ns: &LoopNs, dir: &TempDir, cg: &TestCgroup, policy: &Path) -> Egress {
    EgressCmd::run(ns, cg.path(), dir)
        .policy(policy)
        .events(&dir.join("events.jsonl"))
        .args(["--feed-cache", dir.join("feed-cache").to_str().unwrap()])
        .start()
}

fn status_feed(run: &Egress, name: &str) -> serde_json::Value {
    let s = run.status().expect("status --json");
    s["feeds"]
        .as_array()
        .unwrap_or_else(|| panic!("no feeds in status: {s}"))
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no feed {name} in status: {s}"))
        .clone()
}

#[test]
fn feed_files_in_each_format_block_real_connections_and_name_the_entry() {
    let ns = LoopNs::new();
    let dir = TempDir::new("feeds-files");
    let cg = TestCgroup::new();
    let netset = dir.file(
        "level1.netset",
        "# firehol-like\n127.0.0.2\n127.0.1.0/24\nnot-an-address\n",
    );
    dir.file(
        "drop.txt",
        "; Spamhaus DROP\n127.0.2.0/24 ; SBL42\n127.0.3.0/24 ; SBL43\n",
    );
    dir.file(
        "exits.txt",
        "ExitNode ABCDEF\nPublished 2026-01-01 00:00:00\nExitAddress 127.0.0.3 2026-01-01 00:00:00\n",
    );
    let policy = dir.file(
        "p.toml",
        &format!(
            "{BASE}\n[[blocklist]]\nname = \"level1\"\nfile = \"level1.netset\"\nformat = \"netset\"\n\n[[blocklist]]\nname = \"drop\"\nfile = \"drop.txt\"\nformat = \"spamhaus-drop\"\nports = [80]\n\n[[blocklist]]\nname = \"tor\"\nfile = \"exits.txt\"\nformat = \"tor-exits\"\n"
        ),
    );
    let run = start(&ns, &dir, &cg, &policy);
    assert_eq!(
        probe(
            &cg,
            &[
                ("tcp", "127.0.0.2:80"),
                ("tcp", "127.0.1.77:80"),
                ("tcp", "127.0.2.9:80"),
                ("tcp", "127.0.2.9:81"),
                ("tcp", "127.0.0.3:80"),
                ("tcp", "127.0.0.4:80"),
                ("udp-sendto", "127.0.1.77:53"),
            ]
        ),
        [Denied, Denied, Denied, Refused, Denied, Refused, Denied],
        "feeds block over the service; the drop feed only on its port"
    );
    // Deny events name the feed (`rule`) and the entry.
    let ev = dir.join("events.jsonl");
    wait_for("the deny events", Duration::from_secs(10), || {
        events::of_kind(&ev, "deny").len() >= 5
    });
    let denies = events::of_kind(&ev, "deny");
    let find = |dst: &str| {
        denies
            .iter()
            .find(|d| d["dst"] == dst)
            .unwrap_or_else(|| panic!("no deny to {dst}: {denies:?}"))
            .clone()
    };
    let d = find("127.0.1.77");
    assert_eq!(
        (d["rule"].as_str(), d["feed_entry"].as_str()),
        (Some("level1"), Some("127.0.1.0/24")),
        "{d}"
    );
    let d = find("127.0.2.9");
    assert_eq!(
        (
            d["rule"].as_str(),
            d["feed_entry"].as_str(),
            d["feed_label"].as_str()
        ),
        (Some("drop"), Some("127.0.2.0/24"), Some("SBL42")),
        "{d}"
    );
    let d = find("127.0.0.3");
    assert_eq!(
        (d["rule"].as_str(), d["feed_entry"].as_str()),
        (Some("tor"), Some("127.0.0.3/32")),
        "{d}"
    );
    // `explain` (from the controller's policy) names them too.
    let out = run.ctl(&["explain", "127.0.2.200", "--port", "80", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["verdict"], "deny", "{e}");
    assert_eq!(e["rule"], "drop", "{e}");
    assert_eq!(e["rule_kind"], "blocklist", "{e}");
    assert_eq!(e["feed_entry"], "127.0.2.0/24", "{e}");
    assert_eq!(e["feed_label"], "SBL42", "{e}");
    // Status lists the feeds, with the rejected line.
    let f = status_feed(&run, "level1");
    assert_eq!(
        (f["entries"].as_u64(), f["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{f}"
    );
    assert!(
        f["first_rejects"][0]
            .as_str()
            .unwrap()
            .starts_with("line 4:"),
        "{f}"
    );
    assert!(f["last_success"].is_string(), "{f}");
    let text = Command::new(bins::egress())
        .args(["status", "--socket"])
        .arg(dir.join("control.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("blocklist level1 (netset, ") && text.contains("2 entries, 1 lines rejected"),
        "{text}"
    );

    // The file changes: a reload re-reads it (127.0.0.2 out, 127.0.0.5 in).
    std::fs::write(&netset, "127.0.0.5\n127.0.1.0/24\n").unwrap();
    let out = run.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:80"), ("tcp", "127.0.0.5:80")]),
        [Refused, Denied]
    );
    // HTML where the feed was: refused as a whole; the last good copy stays in force.
    std::fs::write(&netset, "<!DOCTYPE html>\n<html>maintenance</html>\n").unwrap();
    let out = run.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("warning: ")
            && said.contains("HTML")
            && said.contains("the last good copy is used"),
        "the reload says the feed kept its last good copy: {said}"
    );
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:80"), ("tcp", "127.0.0.5:80")]),
        [Refused, Denied],
        "the last good copy stays"
    );
    let f = status_feed(&run, "level1");
    assert_eq!(f["entries"].as_u64(), Some(2), "{f}");
    assert_eq!(f["from_cache"], true, "{f}");
    assert!(f["last_error"].as_str().unwrap().contains("HTML"), "{f}");
    // Emptied: refused too.
    std::fs::write(&netset, "# nothing\n").unwrap();
    assert!(run.ctl(&["reload"]).status.success());
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.5:80")]), [Denied]);
}

#[test]
fn a_bad_feed_file_with_no_good_copy_is_an_error_naming_it() {
    let dir = TempDir::new("feeds-check");
    let policy = dir.file(
        "p.toml",
        &format!("{BASE}\n[[blocklist]]\nname = \"gone\"\nfile = \"missing.netset\"\nformat = \"netset\"\n"),
    );
    let out = Command::new(bins::egress())
        .arg("check")
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.toml:6: blocklist gone: cannot read") && err.contains("missing.netset"),
        "{err}"
    );
    dir.file("missing.netset", "127.0.0.9\n127.0.0.10\nbad line here\n");
    let out = Command::new(bins::egress())
        .arg("check")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("blocklist gone (netset, "), "{text}");
    assert!(text.contains("2 entries, 1 lines rejected"), "{text}");
    assert!(err.contains("line 3: `bad line here`"), "{err}");
}

/// `python3 -m http.server` on 127.0.0.1:PORT in `ns`, serving `root`.
fn http_server(ns: &LoopNs, root: &Path, port: u16) -> ChildGuard {
    let server = ChildGuard::spawn(
        ns.cmd("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(root),
    );
    wait_for("the HTTP server", Duration::from_secs(10), || {
        ns.cmd("python3")
            .args([
                "-c",
                &format!(
                    "import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
                ),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    server
}

#[test]
fn a_url_feed_refreshes_keeps_its_last_good_copy_and_survives_a_restart_without_its_server() {
    let ns = LoopNs::new();
    let dir = TempDir::new("feeds-url");
    let cg = TestCgroup::new();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let feed = www.join("drop.txt");
    std::fs::write(&feed, "127.0.0.2\n").unwrap();
    let mut server = http_server(&ns, &www, 8931);
    let policy = dir.file(
        "p.toml",
        &format!(
            "{BASE}\n[[blocklist]]\nname = \"remote\"\nurl = \"http://127.0.0.1:8931/drop.txt\"\nformat = \"netset\"\nrefresh = \"1s\"\n"
        ),
    );
    let mut run = start(&ns, &dir, &cg, &policy);
    // Fetched before the first apply.
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:80"), ("tcp", "127.0.0.5:80")]),
        [Denied, Refused]
    );
    let generation = run.generation();
    // The feed changes: applied without a restart.
    std::fs::write(&feed, "127.0.0.5\n").unwrap();
    wait_for("the new copy in force", Duration::from_secs(20), || {
        probe(&cg, &[("tcp", "127.0.0.5:80")]) == [Denied]
    });
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.2:80")]), [Refused]);
    assert!(run.generation() > generation);
    let feed_events = events::of_kind(&dir.join("events.jsonl"), "feed");
    assert!(
        feed_events
            .iter()
            .any(|e| e["status"] == "updated" && e["blocklist"] == "remote"),
        "{feed_events:?}"
    );
    // An HTML answer: refused, the last good copy stays, and status says why.
    std::fs::write(&feed, "<html><body>Rate limited</body></html>\n").unwrap();
    wait_for("the HTML copy refused", Duration::from_secs(20), || {
        status_feed(&run, "remote")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("HTML"))
    });
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.5:80")]), [Denied]);
    assert_eq!(status_feed(&run, "remote")["entries"].as_u64(), Some(1));
    assert!(
        events::of_kind(&dir.join("events.jsonl"), "feed")
            .iter()
            .any(|e| e["status"] == "failed" && e["error"].as_str().unwrap_or("").contains("HTML")),
        "a feed event reports the refusal"
    );
    // The server goes away, and so does the controller: a new one enforces the cached copy.
    server.kill();
    run.stop(libc::SIGTERM);
    let run = start(&ns, &dir, &cg, &policy);
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.5:80"), ("tcp", "127.0.0.2:80")]),
        [Denied, Refused]
    );
    let f = status_feed(&run, "remote");
    assert_eq!(f["entries"].as_u64(), Some(1), "{f}");
    wait_for("the failed fetch reported", Duration::from_secs(20), || {
        status_feed(&run, "remote")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("fetching"))
    });
}

#[test]
fn a_url_feed_never_fetched_starts_empty_and_is_enforced_once_its_server_answers() {
    let ns = LoopNs::new();
    let dir = TempDir::new("feeds-late");
    let cg = TestCgroup::new();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("f.txt"), "127.0.0.7\n").unwrap();
    let policy = dir.file(
        "p.toml",
        &format!(
            "{BASE}\n[[blocklist]]\nname = \"late\"\nurl = \"http://127.0.0.1:8932/f.txt\"\nformat = \"netset\"\nrefresh = \"1s\"\n"
        ),
    );
    let run = start(&ns, &dir, &cg, &policy);
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.7:80")]), [Refused]);
    let f = status_feed(&run, "late");
    assert_eq!(f["entries"].as_u64(), Some(0), "{f}");
    assert!(f["last_error"].is_string(), "{f}");
    assert!(f["last_success"].is_null(), "{f}");
    let _server = http_server(&ns, &www, 8932);
    wait_for("the feed enforced", Duration::from_secs(60), || {
        probe(&cg, &[("tcp", "127.0.0.7:80")]) == [Denied]
    });
    let f = status_feed(&run, "late");
    assert_eq!(
        (f["entries"].as_u64(), f["last_error"].as_str()),
        (Some(1), None),
        "{f}"
    );
}

/// A `hosts` feed blocks names at the DNS proxy, over a service that approves them: the names
/// do not resolve, the `dns` events name the blocklist and the entry, and other names of the
/// service still work. (The world of `e2e_names.rs`: dnsmasq on 127.0.0.2 in namespace a, the
/// servers in namespace b, resolv.conf pointing nowhere: only the steering answers.)
#[test]
fn a_hosts_feed_blocks_names_through_the_dns_proxy() {
    use egress_tests::{
        NetPair, TcpSink,
        Verdict::{Other, Succeeded},
        dns::{DnsServer, NetnsResolvConf, Record},
        probe::parse_calls,
    };
    let pair = NetPair::new();
    let _sink = TcpSink::start(&pair.b, (std::net::Ipv4Addr::new(198, 18, 0, 2), 443));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let _dns = DnsServer::start(
        &pair.a,
        ip("127.0.0.2"),
        &[
            Record::Addr("good.example.test", ip("198.18.0.2"), 300),
            Record::Addr("bad.example.test", ip("198.18.0.2"), 300),
            Record::Addr("evil.example.test", ip("198.18.0.2"), 300),
        ],
    );
    let _resolv = NetnsResolvConf::new(&pair.a, &[ip("10.53.0.1")], "timeout:2 attempts:1");
    let dir = TempDir::new("feeds-hosts");
    dir.file(
        "names.txt",
        "# a hosts file\n127.0.0.1 localhost\n0.0.0.0 evil.example.test\nbad.example.test\n",
    );
    let policy = dir.file(
        "p.toml",
        "allow_loopback = false\n[dns]\nupstream = [\"127.0.0.2\"]\n[[service]]\nname = \"api\"\nhosts = [\"**.example.test\"]\nports = [443]\n[[blocklist]]\nname = \"bad-names\"\nfile = \"names.txt\"\nformat = \"hosts\"\n",
    );
    let events_path = dir.join("events.jsonl");
    let out = EgressCmd::exec(&pair.a)
        .netns_sysfs()
        .policy(&policy)
        .events(&events_path)
        .args(["--feed-cache", dir.join("cache").to_str().unwrap()])
        .probe([
            "resolve",
            "good.example.test:443",
            "resolve",
            "bad.example.test:443",
            "resolve",
            "evil.example.test:443",
        ])
        .output();
    assert!(
        out.status.success(),
        "egress exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<_> = parse_calls(&out.stdout)
        .into_iter()
        .map(|l| l.result)
        .collect();
    assert_eq!(
        got,
        [
            Succeeded,
            Other("EAI_NONAME".into()),
            Other("EAI_NONAME".into())
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dns = events::of_kind(&events_path, "dns");
    for name in ["bad.example.test", "evil.example.test"] {
        let e = dns
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no dns event for {name}: {dns:#?}"));
        assert_eq!(e["rule"], "bad-names", "{e}");
        assert_eq!(e["feed_entry"], name, "{e}");
    }
}

fn openssl(dir: &TempDir, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir.path())
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTPS file server in Python on 127.0.0.1:PORT serving the current directory.
const HTTPS_FILES: &str = r#"
import http.server, ssl, sys, functools
H = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[4])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("up", flush=True)
server.serve_forever()
"#;

/// A feed over HTTPS from a server whose CA only `SSL_CERT_FILE` names: refused without it (the
/// blocklist stays empty and says why), fetched and enforced with it.
#[test]
fn an_https_feed_is_trusted_through_ssl_cert_file() {
    let ns = LoopNs::new();
    let dir = TempDir::new("feeds-tls");
    let cg = TestCgroup::new();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=egress feed test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    dir.file(
        "leaf.ext",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("drop.txt"), "127.0.2.0/24 ; SBL7\n").unwrap();
    let server = ChildGuard::spawn(
        ns.cmd("python3")
            .args(["-c", HTTPS_FILES])
            .arg(dir.join("leaf.pem"))
            .arg(dir.join("leaf.key"))
            .arg(&www)
            .arg("8933"),
    );
    wait_for("the HTTPS server", Duration::from_secs(10), || {
        !server.stdout_lines().is_empty()
    });
    let policy = dir.file(
        "p.toml",
        &format!(
            "{BASE}\n[[blocklist]]\nname = \"tls\"\nurl = \"https://127.0.0.1:8933/drop.txt\"\nformat = \"spamhaus-drop\"\nrefresh = \"1h\"\n"
        ),
    );
    let run = |ca: Option<&Path>, cache: &str| {
        let mut cmd = EgressCmd::run(&ns, cg.path(), &dir)
            .policy(&policy)
            .args(["--feed-cache", dir.join(cache).to_str().unwrap()]);
        if let Some(ca) = ca {
            cmd = cmd.env("SSL_CERT_FILE", ca);
        }
        cmd.start()
    };
    {
        let untrusted = run(None, "cache-a");
        assert_eq!(probe(&cg, &[("tcp", "127.0.2.1:80")]), [Refused]);
        let f = status_feed(&untrusted, "tls");
        assert_eq!(f["entries"].as_u64(), Some(0), "{f}");
        wait_for("the failed fetch reported", Duration::from_secs(20), || {
            status_feed(&untrusted, "tls")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("fetching"))
        });
    }
    let trusted = run(Some(&dir.join("ca.pem")), "cache-b");
    assert_eq!(probe(&cg, &[("tcp", "127.0.2.1:80")]), [Denied]);
    let f = status_feed(&trusted, "tls");
    assert_eq!(
        (f["entries"].as_u64(), f["last_error"].as_str()),
        (Some(1), None),
        "{f}"
    );
}

/// Pinned enforcement outlives its controller; a feed file that changed meanwhile is not taken
/// for the one the kernel holds: the restarted controller applies the new entries at once.
#[test]
fn a_restart_over_pins_applies_a_feed_that_changed_while_no_controller_ran() {
    let ns = LoopNs::new();
    let dir = TempDir::new("feeds-pins");
    let cg = TestCgroup::new();
    let pins = egress_tests::controller::pin_dir();
    let netset = dir.file("f.netset", "127.0.0.2\n");
    let policy = dir.file(
        "p.toml",
        &format!("{BASE}\n[[blocklist]]\nname = \"f\"\nfile = \"f.netset\"\nformat = \"netset\"\n"),
    );
    let pinned = || {
        EgressCmd::run(&ns, cg.path(), &dir)
            .pinned(&pins)
            .policy(&policy)
            .args(["--feed-cache", dir.join("cache").to_str().unwrap()])
    };
    let mut first = pinned().start();
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:80"), ("tcp", "127.0.0.6:80")]),
        [Denied, Refused]
    );
    first.kill_9();
    std::fs::write(&netset, "127.0.0.6\n").unwrap();
    // Still the old entries: the kernel enforces what was applied.
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.2:80")]), [Denied]);
    let second = pinned().start();
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.2:80"), ("tcp", "127.0.0.6:80")]),
        [Refused, Denied],
        "the new copy is applied over the adopted pins"
    );
    assert_eq!(second.generation(), 2);
    drop(first);
}

/// A feed of 1,000,000 entries (the issue's size): read, compiled and applied by a reload, then
/// enforced. Prints the times (in a release build: `cargo test --release`); the bounds are loose
/// enough for a debug build on a loaded machine.
#[test]
fn a_million_entry_feed_applies_and_is_enforced() {
    let ns = LoopNs::new();
    let dir = TempDir::new("feeds-1m");
    let cg = TestCgroup::new();
    let mut text = String::with_capacity(16 << 20);
    // 1M /32s spread over 11.0.0.0/8 and 12.0.0.0/8 (every fourth address), and 127.0.0.9.
    for i in 0..999_999u32 {
        let a = 0x0b00_0000u32 + i * 4;
        text.push_str(&std::net::Ipv4Addr::from(a).to_string());
        text.push('\n');
    }
    text.push_str("127.0.0.9\n");
    dir.file("big.netset", &text);
    let small = dir.file("small.toml", BASE);
    let big = dir.file(
        "big.toml",
        &format!(
            "{BASE}\n[[blocklist]]\nname = \"big\"\nfile = \"big.netset\"\nformat = \"netset\"\n"
        ),
    );
    let t = std::time::Instant::now();
    let out = Command::new(bins::egress())
        .arg("check")
        .arg(&big)
        .output()
        .unwrap();
    let check = t.elapsed();
    assert!(out.status.success(), "{out:?}");
    let run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&small)
        .events(&dir.join("events.jsonl"))
        .args(["--feed-cache", dir.join("cache").to_str().unwrap()])
        .args(["--prefix-capacity", "2097152"])
        .start();
    let t = std::time::Instant::now();
    let out = run.reload(&big);
    let reload = t.elapsed();
    assert!(out.status.success(), "{out:?}");
    let message = String::from_utf8_lossy(&out.stdout);
    assert!(
        !message.contains("LPM trie"),
        "the range table holds it: {message}"
    );
    let reloads = events::of_kind(&dir.join("events.jsonl"), "reload");
    let applied_ms = reloads
        .last()
        .and_then(|r| r["elapsed_ms"].as_f64())
        .unwrap_or_else(|| panic!("no elapsed_ms in {reloads:?}"));
    eprintln!(
        "1M-entry feed: egress check {check:?}; reload (read, compile, apply) {reload:?}, of which kernel apply {applied_ms:.1} ms"
    );
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.9:80"), ("tcp", "127.0.0.4:80"),]),
        [Denied, Refused]
    );
    assert_eq!(
        status_feed(&run, "big")["entries"].as_u64(),
        Some(1_000_000)
    );
    assert!(reload < Duration::from_secs(120), "{reload:?}");
    // A reload with the same feed: nothing changes, and it says so quickly.
    let t = std::time::Instant::now();
    let out = run.ctl(&["reload", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no change"),
        "{out:?}"
    );
    eprintln!(
        "1M-entry feed: dry-run reload with no change {:?}",
        t.elapsed()
    );
}
