//! The agent's OCI image (`cargo xtask image`, target/image/egress.oci.tar) run with podman as
//! a privileged container with a cgroup namespace of its own, as a DaemonSet pod runs: it must
//! find the host's cgroup2 hierarchy (not its own cgroup namespace's root), enforce on a test
//! cgroup made here on the host (a probe in it gets EPERM for a denied loopback address and
//! ECONNREFUSED for an approved one), answer /healthz and /readyz, and leave its pins for the
//! host to remove. Without a way to the host's hierarchy it refuses to start.
//!
//! The container runs in a test network namespace (`--network ns:`), never the host's; podman
//! runs with runc and explicit ulimits (this machine: crun refuses hybrid cgroups, and there is
//! no CAP_SYS_RESOURCE to raise the default ulimits), and with a container storage of the test's
//! own (vfs), so nothing of the machine's container storage is touched. The image is built by
//! `.ci/run` (`cargo xtask image`) before the tests; when it is missing the test builds it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use egress_tests::{
    LoopNs, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    bins,
    controller::pin_dir,
    probe, wait_for,
};

const IMAGE: &str = "localhost/egress:dev";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// target/image/egress.oci.tar, built through `cargo xtask image` when it is not there.
fn archive() -> PathBuf {
    let a = workspace().join("target/image/egress.oci.tar");
    if !a.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["xtask", "image"])
            .current_dir(workspace())
            .status()
            .expect("running cargo xtask image");
        assert!(st.success(), "cargo xtask image failed");
    }
    a
}

/// podman with the test's own storage and state (removed with its directory), runc, cgroupfs and
/// file events (no systemd here).
struct Podman {
    dir: TempDir,
}

impl Podman {
    fn new() -> Podman {
        let p = Podman {
            dir: TempDir::new("podman"),
        };
        let out = p.run(&["load", "-q", "-i", archive().to_str().unwrap()]);
        assert!(out.status.success(), "podman load: {}", text(&out));
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            // libpod's own state too (default /run/libpod, shared by every podman here).
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .output()
            .expect("podman is required: apt-get install podman runc (.ci/run does it)")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Whatever is left (a failed test): removed with its storage.
        let _ = self.run(&["rm", "-a", "-f", "-t", "0"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Pins left by a container are removed from the host, however the test ends.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(bins::egress())
                .args(["stop", "--pin-dir"])
                .arg(&self.0)
                .output();
        }
    }
}

/// The `podman run` arguments of an agent container in `ns`, with its own cgroup namespace,
/// the host's /proc at /host/proc, the host's bpffs, and `work` at /work.
fn agent_args(ns: &LoopNs, work: &Path, name: &str, host_cgroup: bool) -> Vec<String> {
    agent_args_as(ns, work, name, host_cgroup, true)
}

/// The capabilities the DaemonSet gives the agent container (its `securityContext`, after
/// `drop: ["ALL"]`), read from deploy/kubernetes/daemonset.yaml: what the test runs with.
fn daemonset_capabilities() -> Vec<String> {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml"),
    )
    .expect("the DaemonSet manifest");
    let mut caps = Vec::new();
    let mut lines = yaml.lines().skip_while(|l| !l.contains("drop: [\"ALL\"]"));
    lines.next();
    for l in lines {
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') || t == "add:" {
            continue;
        }
        match t.strip_prefix("- ") {
            Some(cap) => caps.push(cap.trim().to_string()),
            None => break,
        }
    }
    assert!(
        caps.len() >= 3,
        "capabilities read from the DaemonSet: {caps:?}"
    );
    caps
}

/// As [`agent_args`]; unprivileged: `--cap-drop all` and the DaemonSet's capabilities, with
/// seccomp and AppArmor unconfined, as its `securityContext` says.
fn agent_args_as(
    ns: &LoopNs,
    work: &Path,
    name: &str,
    host_cgroup: bool,
    privileged: bool,
) -> Vec<String> {
    let mut a: Vec<String> = ["run", "-d", "--name", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if privileged {
        a.push("--privileged".into());
    } else {
        a.extend(["--cap-drop", "all"].map(String::from));
        for cap in daemonset_capabilities() {
            a.push("--cap-add".into());
            a.push(cap);
        }
        a.extend(
            [
                "--security-opt",
                "seccomp=unconfined",
                "--security-opt",
                "apparmor=unconfined",
            ]
            .map(String::from),
        );
    }
    a.extend(
        [
            "--cgroupns",
            "private",
            "--read-only",
            "--ulimit",
            "nofile=1024:20000",
            "--ulimit",
            "nproc=1024:1024",
        ]
        .map(String::from),
    );
    a.push(format!("--network=ns:{}", ns.path().display()));
    a.extend(["-v", "/proc:/host/proc:ro", "-v", "/sys/fs/bpf:/sys/fs/bpf"].map(String::from));
    a.push("-v".into());
    a.push(format!("{}:/work", work.display()));
    if host_cgroup {
        // As the DaemonSet's hostPath: the host's /sys/fs/cgroup, its submounts included.
        a.extend(["-v", "/sys/fs/cgroup:/host/sys/fs/cgroup:ro"].map(String::from));
    }
    a
}

#[test]
fn the_image_enforces_on_a_host_cgroup_from_its_own_cgroup_namespace() {
    enforces_from_a_container(true);
}

/// The same, not privileged: only the capabilities the DaemonSet gives the agent (read from the
/// manifest), seccomp and AppArmor unconfined. Shows the set is enough to load, attach, pin,
/// enforce and serve.
#[test]
fn the_daemonsets_capability_set_is_enough_to_enforce() {
    enforces_from_a_container(false);
}

fn enforces_from_a_container(privileged: bool) {
    let started = std::time::Instant::now();
    let podman = Podman::new();
    let ns = LoopNs::new();
    let work = TempDir::new("image");
    let cg = TestCgroup::new();
    let pins = pin_dir();
    let _pins = PinGuard(pins.clone());
    let policy = work.file(
        "policy.toml",
        "allow_loopback = false\n[[service]]\nname = \"app\"\ndestinations = [\"127.0.0.2\"]\nports = [8000]\n",
    );
    assert!(policy.exists());
    let host_root = egress::sys::cgroup::cgroup2_root().unwrap();
    let rel = cg.path().strip_prefix(&host_root).unwrap();
    // The host's root as the container sees it through the bind mount of /sys/fs/cgroup.
    let host_unified = Path::new("/sys/fs/cgroup");
    let in_container = Path::new("/host/sys/fs/cgroup")
        .join(host_root.strip_prefix(host_unified).unwrap())
        .join(rel);
    let name = format!("egress-image-{}-{privileged}", std::process::id());
    let mut args = agent_args_as(&ns, work.path(), &name, true, privileged);
    args.extend(
        [
            IMAGE,
            "--log-format",
            "json",
            "--host-proc",
            "/host/proc",
            "run",
            "--policy",
            "/work/policy.toml",
            "--cgroup",
            in_container.to_str().unwrap(),
            "--pin-dir",
            pins.to_str().unwrap(),
            "--socket",
            "/work/control.sock",
            "--metrics",
            "127.0.0.1:19464",
            "--events",
            "/work/events.jsonl",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podman.run(&args);
    assert!(out.status.success(), "podman run: {}", text(&out));
    let logs = || text(&podman.run(&["logs", &name]));

    // Up: its control socket answers as a running controller.
    let status = || {
        Command::new(bins::egress())
            .args(["status", "--json", "--socket"])
            .arg(work.join("control.sock"))
            .arg("--pin-dir")
            .arg(&pins)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
    };
    wait_for(
        "the agent in its container to come up",
        Duration::from_secs(30),
        || {
            let st = podman.run(&["inspect", "-f", "{{.State.Running}}", &name]);
            assert!(
                String::from_utf8_lossy(&st.stdout).trim() == "true",
                "the container stopped: {}",
                logs()
            );
            status().is_some_and(|s| s["controller"]["running"] == true)
        },
    );

    // Its own cgroup namespace, not the host's (seen from the host).
    let out = podman.run(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ns_of = |p: &str| {
        std::fs::read_link(format!("/proc/{p}/ns/cgroup"))
            .unwrap_or_else(|e| panic!("/proc/{p}/ns/cgroup: {e} ({})", text(&out)))
    };
    assert_ne!(
        ns_of(&pid),
        ns_of("self"),
        "the container has a cgroup namespace of its own"
    );

    // It found the host's hierarchy: the root it logs is the host's (cgroup id = the host
    // root's inode), reached through the bind mount; its own cgroup2 mount was passed over.
    use std::os::unix::fs::MetadataExt as _;
    let host_id = std::fs::metadata(&host_root).unwrap().ino();
    let log = logs();
    let chosen = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| {
            r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cgroup2 root"))
        })
        .unwrap_or_else(|| panic!("no cgroup2 root record in the logs: {log}"));
    let f = &chosen["fields"];
    assert_eq!(f["cgroup_id"], host_id, "{chosen}");
    assert_eq!(f["source"], "mount", "{chosen}");
    assert!(
        f["root"]
            .as_str()
            .unwrap()
            .starts_with("/host/sys/fs/cgroup"),
        "{chosen}"
    );
    assert_eq!(chosen["level"], "INFO", "{chosen}");

    // Enforcing on the test cgroup: a probe there, on the host, gets EPERM for the denied
    // loopback address and ECONNREFUSED (let through, nothing listens) for the approved one.
    assert_eq!(
        probe(&cg, &[("tcp", "127.0.0.3:8000"), ("tcp", "127.0.0.2:8000")]),
        [Denied, Refused]
    );

    // The probes, from the agent's network namespace.
    for (path, code) in [("/healthz", "200"), ("/readyz", "200")] {
        let out = ns
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:19464{path}"))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), code, "{path}");
    }

    // SIGTERM (podman stop): the agent exits, the pinned enforcement stays; the host's
    // `egress stop` then removes it.
    let out = podman.run(&["stop", "-t", "10", &name]);
    assert!(out.status.success(), "podman stop: {}", text(&out));
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.3:8000")]), [Denied], "pinned");
    let out = Command::new(bins::egress())
        .args(["stop", "--pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.3:8000")]), [Refused]);
    eprintln!("e2e_image: {:?}", started.elapsed());
}

/// Without the host's cgroup2 (no bind mount; <host-proc>/1/root out of reach), the agent
/// refuses to start rather than enforce on its own cgroup namespace, and says why.
#[test]
fn the_image_refuses_a_cgroup_namespace_of_its_own() {
    let podman = Podman::new();
    let ns = LoopNs::new();
    let work = TempDir::new("image-refuse");
    let pins = pin_dir();
    let _pins = PinGuard(pins.clone());
    let name = format!("egress-image-refuse-{}", std::process::id());
    let mut args = agent_args(&ns, work.path(), &name, false);
    args.retain(|a| a != "-d");
    args.extend(
        [
            IMAGE,
            "--host-proc",
            "/host/proc",
            "run",
            "--pin-dir",
            pins.to_str().unwrap(),
            "--socket",
            "/work/control.sock",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podman.run(&args);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("the host's cgroup2 hierarchy is not reachable"),
        "{t}"
    );
    // The candidates passed over are named: the host's through /host/proc, and the cgroup2
    // this container mounted itself (its own cgroup namespace's root).
    assert!(t.contains("/host/proc/1/root/sys/fs/cgroup"), "{t}");
    assert!(t.contains("a cgroup below the hierarchy's root"), "{t}");
    // The pin directory is locked before the root is chosen; nothing was attached in it.
    let links = std::fs::read_dir(pins.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(links, 0, "nothing attached: {t}");
}
