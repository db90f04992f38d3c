//! The Kubernetes manifests (deploy/kubernetes, a kustomize base): `kubectl kustomize` renders
//! them, `kubernetes-validate --strict` (PyPI, bundled API schemas; unknown fields are errors, so
//! a `mountPropogation` typo fails) validates every object, and the invariants a node agent needs
//! are asserted on the rendered objects. No cluster is involved.
//!
//! The tools are required, never skipped: `.ci/run` installs kubernetes-validate into
//! target/tools/venv (or set KUBERNETES_VALIDATE to its path); kubectl comes from the machine.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use egress_tests::{TempDir, bins};
use serde_json::Value;

/// The Kubernetes version the objects are validated against (the kubectl here is 1.32).
const K8S_VERSION: &str = "1.32.0";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The venv's kubernetes-validate, or KUBERNETES_VALIDATE; fails (never skips) without it.
fn validator() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let venv = workspace().join("target/tools/venv/bin/kubernetes-validate");
    assert!(
        venv.is_file(),
        "{} is missing: python3 -m venv target/tools/venv && target/tools/venv/bin/pip install kubernetes-validate (.ci/run does it)",
        venv.display()
    );
    venv
}

fn rendered() -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(workspace().join("deploy/kubernetes"))
        .output()
        .expect("kubectl is required (`kubectl kustomize`): install it");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rendered YAML as JSON objects, through the validator venv's PyYAML (no YAML crate here).
fn objects(yaml: &str) -> Vec<Value> {
    let python = validator().parent().unwrap().join("python3");
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

#[test]
fn the_manifests_render_and_pass_strict_schema_validation() {
    let yaml = rendered();
    let dir = TempDir::new("manifests");
    let file = dir.file("rendered.yaml", &yaml);
    let out = Command::new(validator())
        .args(["--strict", "-k", K8S_VERSION])
        .arg(&file)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate --strict: {text}");
    let objs = objects(&yaml);
    assert_eq!(objs.len(), 6, "{yaml}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        objs.len(),
        "every object validated: {text}"
    );

    // The validator is strict: a misspelt field fails it.
    let typo = dir.file(
        "typo.yaml",
        &yaml.replacen("mountPropagation:", "mountPropogation:", 1),
    );
    let out = Command::new(validator())
        .args(["--strict", "-k", K8S_VERSION])
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a typo must fail strict validation");
}

#[test]
fn the_manifests_hold_the_node_agent_invariants() {
    let objs = objects(&rendered());
    let ns = find(&objs, "Namespace", "egress-system");
    assert_eq!(ns["apiVersion"], "v1");
    for o in &objs {
        if o["kind"] != "Namespace"
            && o["kind"] != "ClusterRole"
            && o["kind"] != "ClusterRoleBinding"
        {
            assert_eq!(o["metadata"]["namespace"], "egress-system", "{o}");
        }
    }
    find(&objs, "ServiceAccount", "egress");
    let role = find(&objs, "ClusterRole", "egress");
    let rules = role["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["resources"] == serde_json::json!(["pods"])
                && r["verbs"] == serde_json::json!(["get", "list", "watch"])),
        "{role}"
    );
    for r in rules {
        for v in r["verbs"].as_array().unwrap() {
            assert!(
                ["get", "list", "watch"].contains(&v.as_str().unwrap()),
                "read-only: {role}"
            );
        }
    }
    let binding = find(&objs, "ClusterRoleBinding", "egress");
    assert_eq!(binding["roleRef"]["name"], "egress");
    assert_eq!(binding["subjects"][0]["name"], "egress");
    assert_eq!(binding["subjects"][0]["namespace"], "egress-system");

    // The policy: the embedded default (audit mode), as a file of the ConfigMap.
    let cm = find(&objs, "ConfigMap", "egress-policy");
    let default = std::fs::read_to_string(workspace().join("policies/default.toml")).unwrap();
    assert_eq!(
        cm["data"]["policy.toml"].as_str().unwrap(),
        default,
        "deploy/kubernetes/policy.toml is policies/default.toml"
    );

    let ds = find(&objs, "DaemonSet", "egress");
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "egress");
    assert!(pod["terminationGracePeriodSeconds"].as_u64().is_some());
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the selector matches the pod template");
    }

    // Bidirectional propagation only in privileged containers (the API refuses it otherwise).
    let all: Vec<&Value> = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["containers"].as_array().unwrap())
        .collect();
    for c in &all {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            if m["mountPropagation"] == "Bidirectional" {
                assert_eq!(c["securityContext"]["privileged"], true, "{c}");
            }
        }
    }
    let init = &pod["initContainers"][0];
    assert_eq!(init["securityContext"]["privileged"], true);
    assert!(
        init["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/sys/fs/bpf" && m["mountPropagation"] == "Bidirectional"),
        "{init}"
    );

    let agent = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "egress")
        .expect("the agent container");
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("{flag} in {args:?}"))
    };
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--watch"), "{args:?}");
    assert_eq!(value_of("--host-proc"), "/host/proc");
    // Every flag is one the real binary takes.
    let help = Command::new(bins::egress())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "`egress run` has no {flag}: {help}");
    }
    let policy = Path::new(value_of("--policy"));
    let metrics_port: u64 = value_of("--metrics")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // NODE_NAME from the downward API.
    let env = agent["env"].as_array().unwrap();
    let node = env.iter().find(|e| e["name"] == "NODE_NAME").unwrap();
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");

    // Probes on the metrics server's /healthz and /readyz.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"].as_u64(), Some(metrics_port), "{probe}");
    }
    for what in ["requests", "limits"] {
        let r = &agent["resources"][what];
        assert!(r["cpu"].is_string() && r["memory"].is_string(), "{what}");
    }

    // Capabilities: not privileged; exactly the documented set.
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut caps: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    caps.sort_unstable();
    assert_eq!(
        caps,
        [
            "BPF",
            "NET_ADMIN",
            "NET_BIND_SERVICE",
            "PERFMON",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]
    );
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined");

    // Mounts: the policy as a directory (never subPath, so the ..data swap arrives), the host's
    // bpffs (HostToContainer), /proc at /host/proc read-only, cgroup2, /run/egress.
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let mounts = agent["volumeMounts"].as_array().unwrap();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("a mount at {path}: {mounts:?}"))
    };
    for m in mounts {
        assert!(m.get("subPath").is_none(), "no subPath: {m}");
        assert!(m.get("subPathExpr").is_none(), "no subPathExpr: {m}");
    }
    let pm = mount(policy.parent().unwrap().to_str().unwrap());
    assert_eq!(
        volume(pm["name"].as_str().unwrap())["configMap"]["name"],
        "egress-policy"
    );
    assert_eq!(policy.file_name().unwrap(), "policy.toml");
    let bpf = mount("/sys/fs/bpf");
    assert_eq!(bpf["mountPropagation"], "HostToContainer");
    assert_eq!(
        volume(bpf["name"].as_str().unwrap())["hostPath"]["path"],
        "/sys/fs/bpf"
    );
    let proc_ = mount("/host/proc");
    assert_eq!(proc_["readOnly"], true);
    assert_eq!(
        volume(proc_["name"].as_str().unwrap())["hostPath"]["path"],
        "/proc"
    );
    let cg = mount("/host/sys/fs/cgroup");
    assert_eq!(
        volume(cg["name"].as_str().unwrap())["hostPath"]["path"],
        "/sys/fs/cgroup"
    );
    let run = volume(mount("/run/egress")["name"].as_str().unwrap());
    assert_eq!(run["hostPath"]["path"], "/run/egress");
    assert_eq!(run["hostPath"]["type"], "DirectoryOrCreate");
}
