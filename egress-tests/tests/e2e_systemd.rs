//! egress under systemd, without starting a unit: the shipped unit's sandbox scored by
//! `systemd-analyze security --offline` (required, never skipped: `.ci/run` installs systemd's
//! package for it), the exit code a configuration error gives (what `RestartPreventExitStatus=`
//! names), and the sd_notify protocol spoken to a `$NOTIFY_SOCKET` the test listens on: READY=1
//! only once enforcing, RELOADING=1 with MONOTONIC_USEC= and READY=1 around every reload,
//! STATUS= with the generation and hash, and watchdog pings while `$WATCHDOG_USEC` is set.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use egress_tests::{EgressCmd, LoopNs, TempDir, TestCgroup, Verdict::Denied, probe};

/// The workspace root (this crate's parent).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The shipped unit.
fn unit() -> PathBuf {
    workspace().join("deploy/systemd/egress.service")
}

/// The number of `→ Overall exposure level for egress.service: 3.5 OK 🙂`.
fn exposure(report: &str) -> Option<f64> {
    report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
}

#[test]
fn the_exposure_line_is_parsed() {
    assert_eq!(
        exposure("x\n→ Overall exposure level for egress.service: 9.6 UNSAFE 😨\n"),
        Some(9.6)
    );
    assert_eq!(exposure("nothing here"), None);
}

/// The sandbox of the shipped unit scores at most 4.0 ("OK") in systemd's own offline analysis.
#[test]
fn the_unit_is_hardened() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit())
        .output()
        .expect("running systemd-analyze (Debian package systemd; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let score = exposure(&text).unwrap_or_else(|| {
        panic!(
            "no exposure level in systemd-analyze's output ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 4.0, "exposure {score} > 4.0:\n{text}");
}

/// What the unit relies on from egress is in it: the notify protocol, the synchronous reload,
/// the exit code that stops restarts, and a writable bpffs.
#[test]
fn the_unit_says_what_egress_relies_on() {
    let text = std::fs::read_to_string(unit()).expect("reading the unit");
    let settings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for want in [
        "Type=notify-reload",
        "ExecReload=/usr/local/bin/egress reload",
        "RestartPreventExitStatus=78 2",
        "ReadWritePaths=/sys/fs/bpf",
        "RuntimeDirectoryPreserve=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(settings.contains(&want), "{want} in {}", unit().display());
    }
    assert!(
        settings.iter().any(|l| l.starts_with("WatchdogSec=")),
        "a watchdog"
    );
}

/// A policy that does not validate makes `egress run` exit 78 (EX_CONFIG) before anything is
/// attached, as does a flag value clap rejects; the unit's RestartPreventExitStatus= names it.
#[test]
fn a_configuration_error_exits_78() {
    let ns = LoopNs::new();
    let dir = TempDir::new("systemd-exit");
    let cg = TestCgroup::new();
    let bad = dir.file(
        "bad.toml",
        "mode = \"enforce\"\n[[service]]\nname = \"x\"\nports = [\"not-a-port\"]\n",
    );
    let out = EgressCmd::run(&ns, cg.path(), &dir).policy(&bad).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("bad.toml:"),
        "the error names the file: {stderr}"
    );
    let out = EgressCmd::run(&ns, cg.path(), &dir)
        .args(["--owners-capacity", "0"])
        .output();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = EgressCmd::run(&ns, cg.path(), &dir)
        .args(["--no-such-flag"])
        .output();
    assert_eq!(out.status.code(), Some(2), "a usage error stays 2");
    // A missing policy file is a configuration error too.
    let out = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&dir.join("missing.toml"))
        .output();
    assert_eq!(out.status.code(), Some(78));
}

/// Datagrams the controller sent to the test's `$NOTIFY_SOCKET`.
struct Manager {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let sock = UnixDatagram::bind(path).expect("binding the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Manager {
            sock,
            seen: Vec::new(),
        }
    }

    /// Reads messages until one satisfies `f` (returned), or panics after 20 s.
    fn until(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                if f(&m) {
                    return m;
                }
            }
        }
        panic!("no {what} within 20 s; seen: {:?}", self.seen);
    }

    /// The next message that is not a watchdog ping.
    fn next(&mut self, what: &str) -> String {
        self.until(what, |m| m != "WATCHDOG=1\n")
    }
}

fn field<'a>(m: &'a str, key: &str) -> Option<&'a str> {
    m.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The sd_notify protocol as `Type=notify-reload` needs it, over a socket the test listens on.
#[test]
fn the_service_manager_hears_ready_reloads_status_and_watchdog() {
    let ns = LoopNs::new();
    let dir = TempDir::new("systemd-notify");
    let cg = TestCgroup::new();
    let deny = dir.file("deny.toml", "allow_loopback = false\n");
    let allow = dir.file(
        "allow.toml",
        "allow_loopback = false\n[[service]]\nname = \"ok\"\ndestinations = [\"127.0.0.4\"]\n",
    );
    let bad = dir.file("bad.toml", "mode = \"sometimes\"\n");
    let mut manager = Manager::bind(&dir.join("notify.sock"));
    let mut run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&deny)
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        // 0.6 s: a ping every 0.3 s.
        .env("WATCHDOG_USEC", "600000")
        .spawn();

    // READY=1 only once enforcing: the very next connect is judged by the policy.
    let ready = manager.next("READY=1");
    assert!(ready.starts_with("READY=1\n"), "the first message: {ready}");
    let status = field(&ready, "STATUS").unwrap();
    let hash = egress::policy::content_hash(&std::fs::read_to_string(&deny).unwrap());
    assert!(
        status.contains("generation 1") && status.contains(&hash),
        "{status}"
    );
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.4:80")]), [Denied]);

    // Watchdog pings keep coming from the main loop.
    for _ in 0..3 {
        manager.until("WATCHDOG=1", |m| m == "WATCHDOG=1\n");
    }

    // egress reload (what ExecReload= runs): RELOADING=1 with the monotonic time, then READY=1
    // with the new generation, before `egress reload` returns.
    let before = monotonic_usec();
    let out = run.reload(&allow);
    assert!(out.status.success(), "{out:?}");
    let reloading = manager.next("RELOADING=1");
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading}"));
    assert!(before <= usec && usec <= monotonic_usec(), "{usec}");
    let ready = manager.next("READY=1 after the reload");
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        field(&ready, "STATUS").unwrap().contains("generation 2"),
        "{ready}"
    );

    // A refused policy: `egress reload` fails (what makes `systemctl reload` fail), the manager
    // still hears READY=1 (the old policy stays in force) and the status says so.
    let out = run.reload(&bad);
    assert!(!out.status.success(), "a bad policy must fail the reload");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml"),
        "{out:?}"
    );
    assert!(manager.next("RELOADING=1").starts_with("RELOADING=1\n"));
    let ready = manager.next("READY=1 after the refusal");
    let status = field(&ready, "STATUS").unwrap();
    assert!(
        status.contains("generation 2") && status.contains("refused"),
        "{status}"
    );

    // SIGHUP (what Type=notify-reload sends): the same pair, generation 3.
    run.signal(libc::SIGHUP);
    assert!(manager.next("RELOADING=1").starts_with("RELOADING=1\n"));
    let ready = manager.next("READY=1 after SIGHUP");
    assert!(
        field(&ready, "STATUS").unwrap().contains("generation 3"),
        "{ready}"
    );

    // Stopping.
    run.stop(libc::SIGTERM);
    let stopping = manager.next("STOPPING=1");
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
}

fn monotonic_usec() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// Under systemd (stderr is the stream `$JOURNAL_STREAM` names), logs go to the journal as
/// native records with a priority per level. The journal here is the test's own datagram
/// socket, mounted at /run/systemd/journal in a mount namespace of egress's own (nothing on the
/// host changes; this machine runs no journald).
#[test]
fn logs_reach_the_journal_with_priorities() {
    let ns = LoopNs::new();
    let dir = TempDir::new("systemd-journal");
    let cg = TestCgroup::new();
    let policy = dir.file("p.toml", "allow_loopback = false\n");
    let bad = dir.file("bad.toml", "mode = \"sometimes\"\n");
    let journal_dir = dir.join("journal");
    std::fs::create_dir_all(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket = dir.join("control.sock");
    // unshare -m: a private mount namespace (util-linux makes its propagation private), where
    // /run/systemd is a fresh tmpfs holding the test's journal; JOURNAL_STREAM is the pipe that
    // stderr is, as systemd would set it.
    let script = format!(
        "mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal && mount --bind {jd} /run/systemd/journal && JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec nsenter --net={ns} -- {egress} run --ephemeral --cgroup {cg} --socket {sock} --policy {p}",
        jd = journal_dir.display(),
        ns = ns.path().display(),
        egress = egress_tests::bins::egress().display(),
        cg = cg.path().display(),
        sock = socket.display(),
        p = policy.display(),
    );
    let mut run = egress_tests::ChildGuard::spawn(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .env("NO_COLOR", "1"),
    );
    type Record = std::collections::BTreeMap<String, String>;
    let mut records: Vec<Record> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut read_until = |what: &str, records: &mut Vec<Record>, f: &dyn Fn(&Record) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(n) = journal.recv(&mut buf) {
                let r = journal_fields(&buf[..n]);
                records.push(r.clone());
                if f(&r) {
                    return r;
                }
            }
        }
        panic!("no journal record {what} within 20 s; records: {records:?}");
    };
    let message = |r: &Record| r.get("MESSAGE").cloned().unwrap_or_default();
    let enforcing = read_until("saying it enforces", &mut records, &|r| {
        message(r).starts_with("enforcing")
    });
    assert_eq!(enforcing["PRIORITY"], "5", "INFO is notice: {enforcing:?}");
    assert_eq!(enforcing["SYSLOG_IDENTIFIER"], "egress", "{enforcing:?}");
    let out = Command::new(egress_tests::bins::egress())
        .args(["reload", "--socket"])
        .arg(&socket)
        .arg("--policy")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let refused = read_until("for the refused reload", &mut records, &|r| {
        message(r).starts_with("reload refused")
    });
    assert_eq!(refused["PRIORITY"], "4", "WARN is warning: {refused:?}");
    assert!(
        !run.stderr_text().contains("reload refused"),
        "records go to the journal, not to stderr as text"
    );
    run.signal(libc::SIGTERM);
    run.wait_within("egress after SIGTERM", Duration::from_secs(10));
}

/// The fields of one datagram of the journal's native protocol: `KEY=value\n`, or `KEY\n`, a
/// little-endian u64 length, the value and `\n` (values that may hold newlines).
fn journal_fields(mut d: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            d = &rest[8 + len + 1..];
        }
    }
    out
}
