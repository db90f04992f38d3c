//! Scopes end to end, through the `egress` binary and policy files (issue 12): an executable
//! replaced on disk (a package upgrade) followed by a reload and by `--watch`; a bad selector
//! refused at file:line with the policy in force kept; `explain` with a caller agreeing with
//! the kernel.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use egress_tests::{
    ChildGuard, EgressCmd, LoopNs, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    bins,
    probe::verdicts,
    wait_for,
};

/// A copy of the probe at `dir/name` (its own inode).
fn tool(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(bins::probe(), &p).expect("copying the probe");
    p
}

/// Replaces `path` the way a package manager does: a new file renamed over it.
fn upgrade(dir: &TempDir, path: &Path) {
    let fresh = dir.join(".upgrade.tmp");
    std::fs::copy(bins::probe(), &fresh).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

fn policy_for(exe: &Path) -> String {
    format!(
        "default = \"deny\"\nallow_loopback = false\n\n[[service]]\nname = \"tool-only\"\ndestinations = [\"127.0.0.2\"]\nports = [80]\nprotocols = [\"tcp\"]\nexecutables = [\"{}\"]\n",
        exe.display()
    )
}

/// Runs `exe tcp 127.0.0.2:80` in `cg`.
fn connect_as(exe: &Path, cg: &TestCgroup) -> egress_tests::Verdict {
    let mut cmd = Command::new(exe);
    cmd.args(["tcp", "127.0.0.2:80"]);
    cg.join_on_exec(&mut cmd);
    let out = ChildGuard::spawn(&mut cmd).output();
    assert!(out.status.success(), "{out:?}");
    verdicts(&out.stdout).remove(0)
}

/// Starts `exe` waiting for `go` before connecting (a process running the file as it is now).
fn waiting(exe: &Path, cg: &TestCgroup, go: &Path) -> ChildGuard {
    let mut cmd = Command::new(exe);
    cmd.args(["wait-file", go.to_str().unwrap(), "tcp", "127.0.0.2:80"]);
    cg.join_on_exec(&mut cmd);
    ChildGuard::spawn(&mut cmd)
}

fn last_verdict(p: ChildGuard) -> egress_tests::Verdict {
    verdicts(&p.output().stdout).pop().expect("a call")
}

#[test]
fn a_replaced_executable_is_followed_by_reload_and_processes_of_the_old_file_lose_it() {
    let ns = LoopNs::new();
    let dir = TempDir::new("scope-upgrade");
    let cg = TestCgroup::new();
    let exe = tool(&dir, "tool");
    let policy = dir.file("policy.toml", &policy_for(&exe));
    let run = EgressCmd::run(&ns, cg.path(), &dir).policy(&policy).start();
    assert_eq!(connect_as(&exe, &cg), Refused);
    let other = tool(&dir, "other");
    assert_eq!(connect_as(&other, &cg), Denied, "a copy is another file");
    // Two processes of the file as installed now, waiting.
    let (go1, go2) = (dir.join("go1"), dir.join("go2"));
    let old1 = waiting(&exe, &cg, &go1);
    let old2 = waiting(&exe, &cg, &go2);
    upgrade(&dir, &exe);
    // Until the policy follows the path, the new file is not the approved one; a process of
    // the old file still is.
    assert_eq!(
        connect_as(&exe, &cg),
        Denied,
        "the new file, before a reload"
    );
    std::fs::write(&go1, "").unwrap();
    assert_eq!(last_verdict(old1), Refused, "the old file, before a reload");
    let out = run.reload(&policy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        connect_as(&exe, &cg),
        Refused,
        "the new file, after the reload"
    );
    std::fs::write(&go2, "").unwrap();
    assert_eq!(
        last_verdict(old2),
        Denied,
        "after the reload the approval is the file at the path now; a process still running \
         the replaced file is not approved (restart it)"
    );
}

#[test]
fn watch_follows_an_upgraded_executable_without_a_reload() {
    let ns = LoopNs::new();
    let dir = TempDir::new("scope-watch");
    let cg = TestCgroup::new();
    let exe = tool(&dir, "tool");
    let policy = dir.file("policy.toml", &policy_for(&exe));
    let run = EgressCmd::run(&ns, cg.path(), &dir)
        .policy(&policy)
        .arg("--watch")
        .start();
    assert_eq!(connect_as(&exe, &cg), Refused);
    let before = run.generation();
    upgrade(&dir, &exe);
    wait_for(
        "--watch to follow the upgraded executable",
        Duration::from_secs(5),
        || connect_as(&exe, &cg) == Refused,
    );
    assert!(run.generation() > before, "applied as a new generation");
}

#[test]
fn a_selector_that_does_not_resolve_is_refused_at_its_line_and_the_policy_in_force_stays() {
    let ns = LoopNs::new();
    let dir = TempDir::new("scope-bad");
    let cg = TestCgroup::new();
    let exe = tool(&dir, "tool");
    let policy = dir.file("policy.toml", &policy_for(&exe));
    let run = EgressCmd::run(&ns, cg.path(), &dir).policy(&policy).start();
    for (what, bad) in [
        ("user", "users = [\"no-such-user-egress\"]"),
        ("group", "groups = [\"no-such-group-egress\"]"),
        ("executable", "executables = [\"/nonexistent/egress-tool\"]"),
        ("cgroup", "cgroups = [\"no/such/cgroup-egress\"]"),
    ] {
        let text = policy_for(&exe).replace(&format!("executables = [\"{}\"]", exe.display()), bad);
        let file = dir.file(&format!("bad-{what}.toml"), &text);
        let out = run.reload(&file);
        let err = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "{what}: a bad selector must be refused"
        );
        let line = text.lines().position(|l| l == bad).unwrap() + 1;
        assert!(
            err.contains(&format!("bad-{what}.toml:{line}")),
            "{what}: the error names file:line ({line}): {err}"
        );
        assert_eq!(run.generation(), 1, "{what}: the policy in force stays");
        assert_eq!(connect_as(&exe, &cg), Refused, "{what}: and still decides");
    }
}

#[test]
fn explain_with_a_caller_agrees_with_the_kernel() {
    let ns = LoopNs::new();
    let dir = TempDir::new("scope-explain");
    let cg = TestCgroup::new();
    let exe = tool(&dir, "tool");
    let other = tool(&dir, "other");
    let policy = dir.file("policy.toml", &policy_for(&exe));
    let _run = EgressCmd::run(&ns, cg.path(), &dir).policy(&policy).start();
    for (who, want) in [(&exe, Refused), (&other, Denied)] {
        let out = Command::new(bins::egress())
            .args(["explain", "--json", "--port", "80", "--policy"])
            .arg(&policy)
            .arg("--exe")
            .arg(who)
            .arg("127.0.0.2")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let allowed = v["allow"].as_bool().or_else(|| v["allowed"].as_bool());
        let allowed = allowed.unwrap_or_else(|| v["verdict"] == "allow");
        assert_eq!(
            allowed,
            want == Refused,
            "explain --exe {}: {v}",
            who.display()
        );
        assert_eq!(connect_as(who, &cg), want, "kernel, {}", who.display());
    }
}
