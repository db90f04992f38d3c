//! Which test binaries run in the guest, and the script that runs them there.

use std::path::{Path, PathBuf};

/// Test files that do not run in the VM, each with its reason: they test host tooling, not the
/// kernel, and need what the guest does not have. This is the one list of them.
pub const EXCLUDED: &[(&str, &str)] = &[
    (
        "e2e_image",
        "runs the agent's OCI image with podman and runc: the container runtime's storage and cgroup manager are the host's, not the guest's",
    ),
    (
        "e2e_systemd",
        "systemd-analyze scores the unit file offline: no kernel involved",
    ),
    (
        "e2e_manifests",
        "kubectl and a Python schema validator check the Kubernetes manifests: no kernel involved",
    ),
];

/// The representative subset of `--quick` (CI's run on 6.1 under TCG): what the kernel version
/// changes. The feature probes' answers; every program loaded and verified, the sock_addr hooks
/// judging real sockets in a test cgroup, TC attached to a veth pair (over the clsact fallback
/// before 6.6); and the `egress` binary's pinned state across restarts, end to end.
pub const QUICK: &[&str] = &[
    "kernel_features",
    "kernel_sockaddr",
    "kernel_tc",
    "e2e_persistence",
];

/// A test binary built on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// The test file's stem, e.g. `kernel_tc`.
    pub name: String,
    pub path: PathBuf,
}

/// The test binaries of `cargo test --no-run --message-format=json` output.
pub fn binaries_from_json(output: &str) -> Vec<TestBinary> {
    let mut out: Vec<TestBinary> = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|v| {
            Some(TestBinary {
                name: v["target"]["name"].as_str()?.to_string(),
                path: PathBuf::from(v["executable"].as_str()?),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// The binaries to run: the excluded ones dropped, only [`QUICK`]'s when `quick`, and only
/// those named in `only` when it names any.
pub fn select(all: Vec<TestBinary>, quick: bool, only: &[String]) -> Vec<TestBinary> {
    all.into_iter()
        .filter(|b| !EXCLUDED.iter().any(|(n, _)| *n == b.name))
        .filter(|b| !quick || QUICK.contains(&b.name.as_str()))
        .filter(|b| only.is_empty() || only.contains(&b.name))
        .collect()
}

/// Quotes a word for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs (in a chroot of the host's root): each binary in turn, from the
/// test package's directory as cargo would, its exit code reported on the marker port; a binary
/// that passes `per_binary_secs` is killed (and reported as failed). The harness's waits are
/// stretched 15 times (`EGRESS_TEST_TIMEOUT_SCALE`): TCG is that much slower than the host.
pub fn guest_script(
    tests_dir: &Path,
    binaries: &[TestBinary],
    args: &[String],
    per_binary_secs: u64,
) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# Written by `cargo xtask test --kernel…`: run in the VM, not on the host.\n\
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1\n\
export EGRESS_TEST_TIMEOUT_SCALE=15\n\
mark() { echo \"@@EGRESS-VM $*\" > /dev/ttyS1; }\n\
ip link set lo up\n",
    );
    s.push_str(&format!(
        "export CARGO_MANIFEST_DIR={dir}\ncd {dir} || exit 1\nfailed=0\n",
        dir = sh_quote(&tests_dir.display().to_string())
    ));
    let extra: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    for b in binaries {
        s.push_str(&format!(
            "mark start {name}\necho \"== {name} on $(uname -r)\"\ntimeout -k 10 {per_binary_secs} {path} {extra} 2>&1\nrc=$?\nmark result {name} $rc\n[ $rc -eq 0 ] || failed=1\n",
            name = b.name,
            path = sh_quote(&b.path.display().to_string()),
            extra = extra.join(" "),
        ));
    }
    s.push_str("exit $failed\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(name: &str) -> TestBinary {
        TestBinary {
            name: name.into(),
            path: PathBuf::from(format!("/t/{name}-1")),
        }
    }

    #[test]
    fn binaries_come_from_test_artifacts_only() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"egress_tests"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"kernel_tc"},"executable":"/t/kernel_tc-ab"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"egress-probe"},"executable":"/t/egress-probe"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            binaries_from_json(json),
            [TestBinary {
                name: "kernel_tc".into(),
                path: "/t/kernel_tc-ab".into()
            }]
        );
    }

    #[test]
    fn exclusions_and_the_quick_subset() {
        let all = vec![
            bin("e2e_image"),
            bin("kernel_tc"),
            bin("kernel_dns"),
            bin("e2e_persistence"),
        ];
        let names = |v: Vec<TestBinary>| v.into_iter().map(|b| b.name).collect::<Vec<_>>();
        assert_eq!(
            names(select(all.clone(), false, &[])),
            ["kernel_tc", "kernel_dns", "e2e_persistence"]
        );
        assert_eq!(
            names(select(all.clone(), true, &[])),
            ["kernel_tc", "e2e_persistence"]
        );
        assert_eq!(
            names(select(
                all,
                false,
                &["kernel_dns".into(), "e2e_image".into()]
            )),
            ["kernel_dns"],
            "--test-binary picks among the binaries that may run"
        );
        for q in QUICK {
            assert!(
                !EXCLUDED.iter().any(|(n, _)| n == q),
                "{q} is both quick and excluded"
            );
        }
    }

    #[test]
    fn the_script_reports_every_binary() {
        let s = guest_script(
            Path::new("/w/egress-tests"),
            &[bin("kernel_tc")],
            &["it's".into()],
            600,
        );
        assert!(s.contains("mark start kernel_tc\n"));
        assert!(s.contains("timeout -k 10 600 '/t/kernel_tc-1' 'it'\\''s' 2>&1\n"));
        assert!(s.contains("mark result kernel_tc $rc\n"));
        assert!(s.ends_with("exit $failed\n"));
    }
}
