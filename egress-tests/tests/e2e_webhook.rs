//! End-to-end tests of the webhook against receivers of the kinds operators run, each an HTTP
//! server on the loopback of a test namespace that checks what it gets: Alertmanager's v2 API
//! (an array of alerts, labels a map of strings with `alertname`, RFC 3339 `startsAt`, and the
//! same labels again with `endsAt` when the alert's cooldown ends), a Slack incoming webhook
//! (`{"text": ...}` only), deny events batched in the generic format, the headers given and the
//! HMAC-SHA256 signature (checked by the receiver with the secret), secret files refused
//! before anything is attached, and an HTTPS receiver whose certificate comes from a CA only the
//! system's store (here `SSL_CERT_FILE`) trusts.

use std::{collections::BTreeMap, path::Path, time::Duration};

use egress_tests::{
    ChildGuard, EgressCmd, HttpServer, NetPair, Probe, TcpSink, TempDir, TestCgroup,
    netns::{ADDR_B, VETH_A},
    probe::{calls_so_far, parse_calls},
    sinks::Request,
    wait_for,
};
use hmac::{Hmac, Mac as _};

/// Traffic to 198.18.0.2:5070-5079 is approved, but port 5079 is blocked.
fn policy(alert: &str) -> String {
    format!(
        "allow_loopback = true\n[[service]]\nname = \"lab\"\ndestinations = [\"198.18.0.0/24\"]\nports = [\"5070-5079\"]\nprotocols = [\"tcp\"]\n[[block]]\nname = \"lab-port-5079\"\ndestinations = [\"198.18.0.0/24\"]\nports = [5079]\n{alert}"
    )
}

/// A file only its owner can read, as secrets must be.
fn private_file(dir: &TempDir, name: &str, contents: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.file(name, contents);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `egress exec` of the probe with `args` in namespace a, with webhook options `webhook`.
fn exec(pair: &NetPair, dir: &TempDir, policy_text: &str, webhook: &[&str], args: &[&str]) {
    let policy = dir.file("p.toml", policy_text);
    let spool = dir.join("spool");
    let out = EgressCmd::exec(&pair.a)
        .iface(VETH_A)
        .policy(&policy)
        .events(&dir.join("events.jsonl"))
        .args(["--spool", spool.to_str().unwrap()])
        .args(webhook)
        .probe(args)
        .success();
    assert!(!parse_calls(&out.stdout).is_empty());
}

fn rfc3339(v: &serde_json::Value) -> std::time::SystemTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("a timestamp string: {v}"));
    humantime::parse_rfc3339_weak(s).unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {s}"))
}

/// Alertmanager's `postableAlerts`: an array of objects with `labels` (a map of strings,
/// `alertname` among them), optional `annotations` (strings too), RFC 3339 `startsAt` and
/// optional `endsAt`, not before `startsAt`. Returns each alert's labels and ends.
fn check_alertmanager(req: &Request) -> Vec<(BTreeMap<String, String>, std::time::SystemTime)> {
    assert!(req.head.starts_with("POST /api/v2/alerts "), "{}", req.head);
    assert_eq!(req.header("content-type"), Some("application/json"));
    let body = req.json();
    let alerts = body
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {body}"));
    assert!(!alerts.is_empty());
    alerts
        .iter()
        .map(|a| {
            let labels: BTreeMap<String, String> = serde_json::from_value(a["labels"].clone())
                .unwrap_or_else(|e| panic!("labels are not a map of strings ({e}): {a}"));
            assert!(
                labels.get("alertname").is_some_and(|n| !n.is_empty()),
                "{a}"
            );
            if let Some(ann) = a.get("annotations") {
                let _: BTreeMap<String, String> = serde_json::from_value(ann.clone())
                    .unwrap_or_else(|e| panic!("annotations are not strings ({e}): {a}"));
            }
            let starts = rfc3339(&a["startsAt"]);
            let ends = rfc3339(&a["endsAt"]);
            assert!(starts <= ends, "{a}");
            (labels, ends)
        })
        .collect()
}

/// Checks the signature header against the body, as a receiver does with its copy of the secret.
fn check_signature(req: &Request, secret: &[u8]) {
    let sig = req
        .header("x-egress-signature")
        .unwrap_or_else(|| panic!("no signature: {}", req.head));
    let hex = sig.strip_prefix("sha256=").expect("sha256=<hex>");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(&req.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, want, "the signature does not verify");
}

#[test]
fn alertmanager_gets_the_alert_signed_with_its_headers_and_then_its_resolution() {
    let pair = NetPair::new();
    let dir = TempDir::new("hook-am");
    let _sink = TcpSink::start(&pair.b, (ADDR_B, 5070));
    let am = HttpServer::start(&pair.a, (std::net::Ipv4Addr::LOCALHOST, 0), b"");
    let url = format!("http://{}/api/v2/alerts", am.addr());
    let secret = private_file(&dir, "secret", "s3cret-key\n");
    let headers = private_file(
        &dir,
        "headers",
        "# credentials\nAuthorization: Bearer t0ken\n",
    );
    // Crossed about 0.25 s in; the cooldown ends 2 s later, while the probe still sleeps.
    let alert = "[[alert]]\nname = \"bulk-upload\"\nbytes = \"1MiB\"\nwindow = \"30s\"\ncooldown = \"2s\"\n";
    exec(
        &pair,
        &dir,
        &policy(alert),
        &[
            "--webhook",
            &url,
            "--webhook-format",
            "alertmanager",
            "--webhook-header",
            "X-Scope-OrgID: team-a",
            "--webhook-header-file",
            headers.to_str().unwrap(),
            "--webhook-secret-file",
            secret.to_str().unwrap(),
        ],
        &[
            "tcp-send",
            "198.18.0.2:5070",
            &(2u64 << 20).to_string(),
            "sleep",
            "4500",
        ],
    );
    wait_for(
        "the alert and its resolution",
        Duration::from_secs(10),
        || am.requests().len() >= 2,
    );
    let reqs = am.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    for r in &reqs {
        check_signature(r, b"s3cret-key");
        assert_eq!(r.header("x-scope-orgid"), Some("team-a"));
        assert_eq!(r.header("authorization"), Some("Bearer t0ken"));
    }
    let fired = check_alertmanager(&reqs[0]);
    let resolved = check_alertmanager(&reqs[1]);
    assert_eq!(fired[0].0["alertname"], "bulk-upload");
    assert!(fired[0].0["key"].starts_with("process:"), "{fired:?}");
    assert_eq!(
        fired[0].0, resolved[0].0,
        "the resolution names the alert by the same labels"
    );
    let body = reqs[0].json();
    assert!(
        body[0]["annotations"]["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("/egress-probe")),
        "{body}"
    );
    assert!(
        resolved[0].1 <= std::time::SystemTime::now(),
        "resolved: endsAt is past"
    );
}

/// A block's alert stands until the block ends (`endsAt` = `blocked_until`), and `egress
/// unblock` resolves it at once.
#[test]
fn alertmanager_gets_a_block_resolved_when_it_is_lifted() {
    let pair = NetPair::new();
    let dir = TempDir::new("hook-am-block");
    let cg = TestCgroup::new();
    let _sink = TcpSink::start(&pair.b, (ADDR_B, 5073));
    let am = HttpServer::start(&pair.a, (std::net::Ipv4Addr::LOCALHOST, 0), b"");
    let url = format!("http://{}/api/v2/alerts", am.addr());
    let policy = dir.file(
        "p.toml",
        &policy("[[alert]]\nname = \"budget\"\nbytes = \"1MiB\"\nwindow = \"60s\"\naction = \"block\"\ncooldown = \"10m\"\n"),
    );
    let spool = dir.join("spool");
    let run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .iface(VETH_A)
        .policy(&policy)
        .args(["--spool", spool.to_str().unwrap(), "--webhook", &url])
        .args(["--webhook-format", "alertmanager"])
        .start();
    let mut probe = Probe::new()
        .netns(&pair.a)
        .cgroup(&cg)
        .opt("--timeout", "3")
        .opt("--rate", "20000000")
        .args(["tcp-send", "198.18.0.2:5073", &(64u64 << 20).to_string()])
        .args(["sleep", "3000"])
        .spawn();
    wait_for("the block's alert", Duration::from_secs(30), || {
        !am.requests().is_empty()
    });
    let fired = check_alertmanager(&am.requests()[0]);
    assert!(
        fired[0].1 > std::time::SystemTime::now() + Duration::from_secs(300),
        "it stands until the block ends, 10 minutes on"
    );
    let key = &fired[0].0["key"];
    wait_for("the upload to be stopped", Duration::from_secs(30), || {
        !calls_so_far(&probe).is_empty()
    });
    assert_eq!(*key, format!("process:{}", calls_so_far(&probe)[0].pid));
    let out = run.ctl(&["unblock", key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the resolution", Duration::from_secs(10), || {
        am.requests().len() >= 2
    });
    let reqs = am.requests();
    let resolved = check_alertmanager(&reqs[1]);
    assert_eq!(resolved[0].0, fired[0].0, "the same labels");
    assert!(resolved[0].1 <= std::time::SystemTime::now());
    let body = reqs[1].json();
    assert!(
        body[0]["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("egress unblock")),
        "{body}"
    );
    probe.wait();
}

#[test]
fn slack_gets_text_messages_for_alerts_and_batched_denies() {
    let pair = NetPair::new();
    let dir = TempDir::new("hook-slack");
    let _sink = TcpSink::start(&pair.b, (ADDR_B, 5071));
    let slack = HttpServer::start(&pair.a, (std::net::Ipv4Addr::LOCALHOST, 0), b"ok");
    // A Slack URL is a credential: from a private file, not the command line.
    let url = private_file(
        &dir,
        "slack-url",
        &format!("http://{}/services/T000/B000/XXXX\n", slack.addr()),
    );
    let alert = "[[alert]]\nname = \"slack-upload\"\nbytes = \"1MiB\"\nwindow = \"30s\"\n";
    exec(
        &pair,
        &dir,
        &policy(alert),
        &[
            "--webhook-url-file",
            url.to_str().unwrap(),
            "--webhook-format",
            "slack",
            "--webhook-events",
            "alert,deny",
        ],
        &[
            "tcp",
            "198.18.0.2:5079",
            "tcp",
            "198.18.0.2:5079",
            "tcp-send",
            "198.18.0.2:5071",
            &(2u64 << 20).to_string(),
            "sleep",
            "1000",
        ],
    );
    wait_for("an alert and a deny batch", Duration::from_secs(10), || {
        slack.requests().len() >= 2
    });
    let texts: Vec<String> = slack
        .requests()
        .iter()
        .map(|r| {
            assert!(
                r.head.starts_with("POST /services/T000/B000/XXXX "),
                "{}",
                r.head
            );
            let v = r.json();
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {v}"));
            assert_eq!(obj.len(), 1, "only `text`: {v}");
            v["text"]
                .as_str()
                .unwrap_or_else(|| panic!("text is not a string: {v}"))
                .to_string()
        })
        .collect();
    assert!(
        texts.iter().any(|t| t.contains("slack-upload")),
        "{texts:#?}"
    );
    let denies = texts
        .iter()
        .find(|t| t.contains("denied"))
        .unwrap_or_else(|| panic!("no deny batch: {texts:#?}"));
    assert!(
        denies.contains("lab-port-5079") && denies.contains("198.18.0.2:5079"),
        "{denies}"
    );
}

#[test]
fn deny_events_alone_reach_a_generic_receiver_in_batches() {
    let pair = NetPair::new();
    let dir = TempDir::new("hook-deny");
    let hook = HttpServer::start(&pair.a, (std::net::Ipv4Addr::LOCALHOST, 0), b"");
    let url = format!("http://{}/hook", hook.addr());
    exec(
        &pair,
        &dir,
        &policy(""),
        &["--webhook", &url, "--webhook-events", "deny"],
        // It sleeps after its calls, so that the controller reads its executable while it runs.
        &[["tcp", "198.18.0.2:5079"].repeat(5), vec!["sleep", "700"]].concat(),
    );
    wait_for("a deny batch", Duration::from_secs(10), || {
        !hook.requests().is_empty()
    });
    let reqs = hook.requests();
    assert_eq!(reqs.len(), 1, "five denies in one batch: {reqs:#?}");
    let b = reqs[0].json();
    assert_eq!(b["event"], "denies");
    assert_eq!(b["dropped"], 0);
    let events = b["events"].as_array().unwrap();
    assert_eq!(events.len(), 5, "{b}");
    for e in events {
        assert_eq!(
            (e["event"].as_str(), e["rule"].as_str(), e["port"].as_u64()),
            (Some("deny"), Some("lab-port-5079"), Some(5079)),
            "{e}"
        );
        assert!(
            e["exe"]
                .as_str()
                .is_some_and(|x| x.ends_with("/egress-probe"))
        );
        assert_eq!(e["schema_version"], 1);
    }
}

/// A secret file others can read, or none at all, stops `exec` with an error that names it,
/// before the command runs.
#[test]
fn a_secret_file_that_is_missing_or_readable_by_others_is_refused() {
    let pair = NetPair::new();
    let dir = TempDir::new("hook-secret");
    let policy = dir.file("p.toml", &policy(""));
    let open = dir.file("open-secret", "s3cret\n");
    let missing = dir.join("no-such-secret");
    let ran = dir.join("ran");
    for (secret, expect) in [(&open, "chmod 600"), (&missing, "no-such-secret")] {
        let out = EgressCmd::exec(&pair.a)
            .policy(&policy)
            .args([
                "--webhook",
                "http://127.0.0.1:9/hook",
                "--webhook-secret-file",
            ])
            .arg(secret)
            .command(["touch", ran.to_str().unwrap()])
            .output();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(expect) && stderr.contains(&*secret.display().to_string()),
            "{stderr}"
        );
        assert!(!Path::new(&ran).exists(), "the command never ran");
    }
}

/// Runs `openssl ARGS` in `dir`; panics when it fails.
fn openssl(dir: &TempDir, args: &[&str]) {
    let out = std::process::Command::new("openssl")
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

/// A CA of the test's own (`ca.pem`), and a certificate it signed for 127.0.0.1 (`leaf.pem`,
/// `leaf.key`).
fn test_ca(dir: &TempDir) {
    openssl(
        dir,
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
            "/CN=egress test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
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
        dir,
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
}

/// An HTTPS server in Python on 127.0.0.1 (any port) that prints each POST body on a line.
const HTTPS_RECEIVER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        sys.stdout.write(body.decode() + "\n")
        sys.stdout.flush()
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

#[test]
fn an_https_receiver_of_a_ca_in_the_system_store_is_trusted() {
    let pair = NetPair::new();
    let dir = TempDir::new("hook-tls");
    let _sink = TcpSink::start(&pair.b, (ADDR_B, 5072));
    test_ca(&dir);
    let receiver = ChildGuard::spawn(
        pair.a
            .cmd("python3")
            .args(["-c", HTTPS_RECEIVER])
            .arg(dir.join("leaf.pem"))
            .arg(dir.join("leaf.key")),
    );
    wait_for("the HTTPS receiver", Duration::from_secs(10), || {
        !receiver.stdout_lines().is_empty()
    });
    let port = receiver.stdout_lines()[0].clone();
    let url = format!("https://127.0.0.1:{port}/hook");
    let policy = dir.file(
        "p.toml",
        &policy("[[alert]]\nname = \"tls-upload\"\nbytes = \"1MiB\"\nwindow = \"30s\"\n"),
    );
    let spool = dir.join("spool");
    let run = |ca: Option<&Path>| {
        let mut cmd = EgressCmd::exec(&pair.a)
            .iface(VETH_A)
            .policy(&policy)
            .args(["--spool", spool.to_str().unwrap(), "--webhook", &url]);
        if let Some(ca) = ca {
            cmd = cmd.env("SSL_CERT_FILE", ca);
        }
        cmd.probe(["tcp-send", "198.18.0.2:5072", "2097152", "sleep", "700"])
            .success();
    };
    let alerts = || {
        receiver
            .stdout_lines()
            .iter()
            .skip(1)
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    // The CA is in no store egress trusts: the alert is not delivered and waits in the spool.
    run(None);
    assert!(alerts().is_empty(), "{:?}", alerts());
    // The host trusts it (the system's store, here through SSL_CERT_FILE): both get through.
    run(Some(&dir.join("ca.pem")));
    wait_for("both alerts over TLS", Duration::from_secs(10), || {
        alerts().len() >= 2
    });
    assert!(
        alerts().iter().all(|a| a["alert_rule"] == "tls-upload"),
        "{:?}",
        alerts()
    );
}
