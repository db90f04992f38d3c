//! Pod awareness without a cluster: the kube-rs watch against a stub API server that speaks the
//! Kubernetes API's own JSON (list, then a watch stream of ADDED/MODIFIED/DELETED with resource
//! versions), and `egress run --kubernetes` end to end on a kubelet-shaped cgroup tree the test
//! makes under a test cgroup, with probes placed in container cgroups.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    sync::{Arc, RwLock},
    time::Duration,
};

use egress::kube::{CgroupLayout, PodIndex, watch::ApiSource};
use egress_tests::{
    EgressCmd, NetPair, Probe, TcpSink, TempDir, TestCgroup, Verdict, events, in_netns,
    kubeapi::{Container, KubeletTree, StubApi, pod},
    netns::{ADDR_B, VETH_A},
    wait_for,
};

const UID_A: &str = "5f3a9b1c-2d4e-4f60-8a7b-9c0d1e2f3a4b";
const UID_B: &str = "0c7e2a44-91b3-4d2f-b6a1-7e8f9a0b1c2d";
const CID_A: &str = "9d1bd3c8a0e5f6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";
const CID_A2: &str = "1111d3c8a0e5f6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";
const CID_B: &str = "4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f";

fn pod_a() -> serde_json::Value {
    pod(
        "payments",
        "api-7d4b9",
        UID_A,
        "n1",
        "BestEffort",
        &[
            Container {
                name: "app",
                id: CID_A,
            },
            Container {
                name: "sidecar",
                id: CID_A2,
            },
        ],
    )
}

fn pod_b() -> serde_json::Value {
    pod(
        "shop",
        "web-5c6f8",
        UID_B,
        "n1",
        "Guaranteed",
        &[Container {
            name: "nginx",
            id: CID_B,
        }],
    )
}

/// The watch lists this node's pods with the field selector, then follows ADDED, MODIFIED and
/// DELETED, bumping the generation at each change.
#[test]
fn the_watch_lists_then_follows_this_nodes_pods() {
    let api = StubApi::start(vec![pod_a()]);
    let tmp = TempDir::new("kube-watch");
    let index = Arc::new(RwLock::new(PodIndex::new(CgroupLayout::new(
        tmp.path(),
        None,
    ))));
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = ApiSource {
        server: Some(api.url()),
        kubeconfig: None,
    };
    rt.spawn(egress::kube::watch::run(
        source,
        "n1".into(),
        index.clone(),
        tx,
    ));
    let names = || {
        let i = index.read().unwrap();
        let mut v: Vec<String> = i
            .pods()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        v.sort();
        v
    };
    wait_for("the pods to be listed", Duration::from_secs(10), || {
        index.read().unwrap().synced()
    });
    assert_eq!(names(), ["payments/api-7d4b9"]);
    assert!(*rx.borrow() >= 1);
    {
        let i = index.read().unwrap();
        let p = i.by_uid(UID_A).unwrap();
        assert_eq!(
            (p.node.as_str(), p.qos.as_str(), p.labels["app"].as_str()),
            ("n1", "besteffort", "api")
        );
        assert_eq!(
            p.containers,
            [
                ("app".to_string(), CID_A.to_string()),
                ("sidecar".to_string(), CID_A2.to_string())
            ]
        );
    }
    wait_for("the watch to open", Duration::from_secs(10), || {
        api.watchers() >= 1
    });
    let reqs = api.requests();
    assert!(reqs.len() >= 2, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r.path, "/api/v1/pods");
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=n1"),
            "{r:?}"
        );
    }
    let watch = reqs
        .iter()
        .find(|r| r.query.get("watch").map(String::as_str) == Some("true"))
        .expect("a watch request");
    assert_eq!(
        watch.query.get("resourceVersion").map(String::as_str),
        Some("100"),
        "the watch starts at the list's resourceVersion: {watch:?}"
    );

    let generation = *rx.borrow();
    api.event("ADDED", pod_b());
    wait_for("ADDED to arrive", Duration::from_secs(10), || {
        names().len() == 2
    });
    let mut relabelled = pod_a();
    relabelled["metadata"]["labels"]["app"] = serde_json::json!("api-v2");
    api.event("MODIFIED", relabelled);
    wait_for("MODIFIED to arrive", Duration::from_secs(10), || {
        index.read().unwrap().by_uid(UID_A).unwrap().labels["app"] == "api-v2"
    });
    api.event("DELETED", pod_a());
    wait_for("DELETED to arrive", Duration::from_secs(10), || {
        names() == ["shop/web-5c6f8"]
    });
    assert!(*rx.borrow() >= generation + 3, "a generation per change");
}

/// `egress run --kubernetes` on a kubelet-shaped tree: deny events, `stats --json` rows and the
/// per-pod metrics carry the namespace, pod, container and node of the sender's cgroup; a pod's
/// series ends when the pod is deleted.
#[test]
fn events_stats_and_metrics_name_the_pod_and_container() {
    let pair = NetPair::new();
    let dir = TempDir::new("e2e-kube");
    let policy = dir.file(
        "p.toml",
        r#"
mode = "enforce"
allow_loopback = true
[[service]]
name = "upload-target"
destinations = ["198.18.0.0/24"]
ports = ["5060"]
protocols = ["tcp"]
"#,
    );
    let events_file = dir.join("events.jsonl");
    let cg = TestCgroup::new();
    let mut tree = KubeletTree::new(cg.path());
    let a = tree.pod(UID_A, "besteffort", &[CID_A, CID_A2]);
    let b = tree.pod(UID_B, "guaranteed", &[CID_B]);
    let api = StubApi::start_in(&pair.a, vec![pod_a(), pod_b()]);
    let kubepods = tree
        .root
        .strip_prefix(egress::sys::cgroup::cgroup2_root().unwrap())
        .unwrap();
    let metrics_port = 19465u16;
    let run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .iface(VETH_A)
        .policy(&policy)
        .events(&events_file)
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .args([
            "--kubernetes",
            "--kube-server",
            &api.url(),
            "--node-name",
            "n1",
        ])
        .arg("--kubernetes-cgroup-root")
        .arg(kubepods)
        .start();
    wait_for("the pod watch to open", Duration::from_secs(15), || {
        api.watchers() >= 1
    });
    assert!(
        api.requests()
            .iter()
            .all(|r| r.query.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=n1")),
        "{:?}",
        api.requests()
    );

    // A denied connect from each pod's container, and one upload from pod a's.
    let deny = |cgroup: &std::path::Path, port: &str| {
        let lines = Probe::new()
            .netns(&pair.a)
            .cgroup(cgroup)
            .call("tcp", &format!("198.18.0.2:{port}"))
            .run();
        assert_eq!(lines[0].result, Verdict::Denied, "{lines:?}");
        lines[0].pid
    };
    let pid_a = deny(&a[0], "7001");
    let pid_b = deny(&b[0], "7002");
    let pid_a2 = deny(&a[1], "7003");
    let sink = TcpSink::start(&pair.b, (ADDR_B, 5060));
    const BYTES: u64 = 1024 * 1024;
    let up = Probe::new()
        .netns(&pair.a)
        .cgroup(&a[0])
        .args(["tcp-send", "198.18.0.2:5060", &BYTES.to_string()])
        .run();
    assert_eq!(up[0].result, Verdict::Succeeded, "{up:?}");
    wait_for(
        "the sink to read the upload",
        Duration::from_secs(20),
        || sink.closed() == 1,
    );

    wait_for("three deny events", Duration::from_secs(10), || {
        events::decisions(&events_file).len() >= 3
    });
    let ev = events::decisions(&events_file);
    let of = |pid: u32| {
        let e = ev
            .iter()
            .find(|e| e.pid == pid)
            .unwrap_or_else(|| panic!("no event of {pid}: {ev:#?}"));
        (
            e.pod.namespace.as_deref(),
            e.pod.pod.as_deref(),
            e.pod.container.as_deref(),
            e.pod.node.as_deref(),
        )
    };
    assert_eq!(
        of(pid_a),
        (Some("payments"), Some("api-7d4b9"), Some("app"), Some("n1"))
    );
    assert_eq!(
        of(pid_a2),
        (
            Some("payments"),
            Some("api-7d4b9"),
            Some("sidecar"),
            Some("n1")
        )
    );
    assert_eq!(
        of(pid_b),
        (Some("shop"), Some("web-5c6f8"), Some("nginx"), Some("n1"))
    );
    // The raw JSON lines carry them as top-level fields.
    let raw = events::lines(&events_file);
    assert!(
        raw.iter().any(|l| l["pod"] == "web-5c6f8"
            && l["namespace"] == "shop"
            && l["container"] == "nginx"
            && l["node"] == "n1"),
        "{raw:#?}"
    );

    // stats --json: the uploader's row, and the pod's totals.
    let up_pid = up[0].pid;
    let mut report = None;
    wait_for(
        "stats --json to report the upload",
        Duration::from_secs(10),
        || {
            let r = run.stats();
            let found = r
                .processes
                .iter()
                .any(|p| p.pid == up_pid && p.payload_bytes >= BYTES)
                && r.pods
                    .iter()
                    .any(|p| p.pod == "api-7d4b9" && p.payload_bytes >= BYTES);
            report = Some(r);
            found
        },
    );
    let report = report.unwrap();
    let row = report.processes.iter().find(|p| p.pid == up_pid).unwrap();
    assert_eq!(
        (
            row.pod.namespace.as_deref(),
            row.pod.pod.as_deref(),
            row.pod.container.as_deref(),
            row.pod.node.as_deref()
        ),
        (Some("payments"), Some("api-7d4b9"), Some("app"), Some("n1"))
    );
    let stats_json = run.ctl(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&stats_json.stdout).unwrap();
    assert!(
        v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == up_pid && p["pod"] == "api-7d4b9" && p["container"] == "app"),
        "{v}"
    );
    let top = run.ctl(&["top", "--once"]);
    assert!(
        String::from_utf8_lossy(&top.stdout).contains("payments/api-7d4b9/app"),
        "{top:?}"
    );

    let metrics = || {
        in_netns(&pair.a, move || {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, metrics_port)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        })
    };
    let series = "egress_pod_bytes_total{namespace=\"payments\",pod=\"api-7d4b9\"}";
    wait_for("the pod's series", Duration::from_secs(10), || {
        metrics().contains(series)
    });

    // The pod is deleted: its series and totals end.
    api.event("DELETED", pod_a());
    wait_for(
        "the deleted pod's series to end",
        Duration::from_secs(10),
        || !metrics().contains(series),
    );
    assert!(run.stats().pods.iter().all(|p| p.pod != "api-7d4b9"));
    drop(run);
    drop(tree);
}

/// With the API server unreachable the controller starts and enforces all the same; events
/// simply carry no pod.
#[test]
fn an_unreachable_api_server_never_stops_enforcement() {
    let pair = NetPair::new();
    let dir = TempDir::new("e2e-kube-down");
    let policy = dir.file("p.toml", "mode = \"enforce\"\nallow_loopback = true\n");
    let events_file = dir.join("events.jsonl");
    let cg = TestCgroup::new();
    let mut tree = KubeletTree::new(cg.path());
    let a = tree.pod(UID_A, "burstable", &[CID_A]);
    let kubepods = tree
        .root
        .strip_prefix(egress::sys::cgroup::cgroup2_root().unwrap())
        .unwrap();
    // Nothing listens on port 1 of namespace a.
    let run = EgressCmd::run(&pair.a, cg.path(), &dir)
        .policy(&policy)
        .events(&events_file)
        .args(["--metrics", "127.0.0.1:19466"])
        .args([
            "--kubernetes",
            "--kube-server",
            "http://127.0.0.1:1",
            "--node-name",
            "n1",
        ])
        .arg("--kubernetes-cgroup-root")
        .arg(kubepods)
        .start();
    let lines = Probe::new()
        .netns(&pair.a)
        .cgroup(&a[0])
        .call("tcp", "198.18.0.2:7001")
        .run();
    assert_eq!(lines[0].result, Verdict::Denied, "{lines:?}");
    wait_for("the deny event", Duration::from_secs(10), || {
        !events::decisions(&events_file).is_empty()
    });
    let ev = &events::decisions(&events_file)[0];
    assert_eq!(ev.pod, egress::kube::PodMeta::default(), "{ev:?}");
    assert!(
        run.status()
            .is_some_and(|s| s["controller"]["running"] == true)
    );
    // Enforcing, but not ready: this node's pods were never listed (pod selectors would hold
    // no pod), so a rolling update does not go on to the next node.
    let code = |path: &str| {
        let out = pair
            .a
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:19466{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code("/healthz"), "200");
    assert_eq!(code("/readyz"), "503");
    drop(run);
    drop(tree);
}

/// Pod selectors end to end: a service for pods labelled app=api in namespace payments. Pod a
/// (app=api, payments) may connect, pod b (shop) may not; when the watch brings a new pod whose
/// cgroup kubelet creates afterwards, it is in scope within the pod tick; relabelled out of the
/// selector, or deleted, it is out at once. No reload happens on the way.
#[test]
fn pod_selectors_follow_the_pods_of_this_node() {
    let ns = egress_tests::LoopNs::new();
    let dir = TempDir::new("e2e-kube-sel");
    let policy = dir.file(
        "p.toml",
        r#"
default = "deny"
allow_loopback = false
[[service]]
name = "api-pods"
destinations = ["127.0.0.2"]
ports = [80]
protocols = ["tcp"]
pods = { namespace = "payments", labels = { app = "api" } }
"#,
    );
    let cg = TestCgroup::new();
    let mut tree = KubeletTree::new(cg.path());
    let a = tree.pod(UID_A, "besteffort", &[CID_A, CID_A2]);
    let b = tree.pod(UID_B, "guaranteed", &[CID_B]);
    let api = StubApi::start_in(&ns, vec![pod_a(), pod_b()]);
    let kubepods = tree
        .root
        .strip_prefix(egress::sys::cgroup::cgroup2_root().unwrap())
        .unwrap()
        .to_path_buf();
    let run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&policy)
        .args([
            "--kubernetes",
            "--kube-server",
            &api.url(),
            "--node-name",
            "n1",
        ])
        .arg("--kubernetes-cgroup-root")
        .arg(&kubepods)
        .start();
    let connect = |cgroup: &std::path::Path| {
        Probe::new()
            .netns(&ns)
            .cgroup(cgroup)
            .call("tcp", "127.0.0.2:80")
            .run()[0]
            .result
            .clone()
    };
    wait_for("pod a in its scope", Duration::from_secs(15), || {
        connect(&a[0]) == Verdict::Refused
    });
    assert_eq!(
        connect(&a[1]),
        Verdict::Refused,
        "every container of the pod"
    );
    assert_eq!(connect(&b[0]), Verdict::Denied, "another namespace");
    assert_eq!(connect(cg.path()), Verdict::Denied, "outside any pod");
    // A new pod of the selector arrives on the watch before kubelet makes its cgroup.
    const UID_C: &str = "77777777-2d4e-4f60-8a7b-9c0d1e2f3a4b";
    const CID_C: &str = "cccccccca0e5f6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";
    let pod_c = pod(
        "payments",
        "api-new01",
        UID_C,
        "n1",
        "Burstable",
        &[Container {
            name: "app",
            id: CID_C,
        }],
    );
    api.event("ADDED", pod_c.clone());
    std::thread::sleep(Duration::from_millis(300));
    let c = tree.pod(UID_C, "burstable", &[CID_C]);
    wait_for(
        "the new pod in scope once its cgroup exists",
        Duration::from_secs(2),
        || connect(&c[0]) == Verdict::Refused,
    );
    // Relabelled out of the selector: out of scope.
    let mut relabelled = pod_c.clone();
    relabelled["metadata"]["labels"]["app"] = serde_json::json!("batch");
    api.event("MODIFIED", relabelled.clone());
    wait_for(
        "the relabelled pod out of scope",
        Duration::from_secs(2),
        || connect(&c[0]) == Verdict::Denied,
    );
    // Pod a deleted: out of scope (its cgroup would go too; here it stays, still refused).
    api.event("DELETED", pod_a());
    wait_for(
        "the deleted pod out of scope",
        Duration::from_secs(2),
        || connect(&a[0]) == Verdict::Denied,
    );
    assert_eq!(run.generation(), 1, "no reload on the way");
}
