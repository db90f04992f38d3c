//! End-to-end tests of the CLI habits of issue 15, against `egress run` on a test cgroup in a
//! test network namespace: `egress events` (kept, `--since`, `--follow` seeing a deny made after
//! it started, `--filter` leaving one out, an unknown key a usage error), the global `--socket`
//! before and after the subcommand, `-o json` against `-o text`, `run` reading policy.d fragments
//! from its config directory (and naming a bad fragment), `explain` asking the running
//! controller for its policy, and `reload --dry-run --exit-code` both ways.

use std::{process::Command, time::Duration};

use egress_tests::{
    ChildGuard, EgressCmd, LoopNs, TempDir, TestCgroup,
    Verdict::{Denied, Refused},
    bins, probe, wait_for,
};

/// 127.0.0.2 is approved; 127.0.0.66 and 127.0.0.99 are blocked; loopback is judged.
const BASE: &str = "mode = \"enforce\"\nallow_loopback = false\n[[service]]\nname = \"local\"\ndestinations = [\"127.0.0.2\"]\n";
const BLOCKS: &str = "# blocks\n[[block]]\nname = \"bad\"\ndestinations = [\"127.0.0.66\"]\n[[block]]\nname = \"worse\"\ndestinations = [\"127.0.0.99\"]\n";

/// `egress ARGS` (nothing else added).
fn egress(args: &[&str]) -> std::process::Output {
    Command::new(bins::egress())
        .args(args)
        .output()
        .expect("running egress")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The deny events among JSON lines, as (dst, rule).
fn denies(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
        })
        .filter(|v| v["event"] == "deny")
        .map(|v| {
            (
                v["dst"].as_str().unwrap_or("").to_string(),
                v["rule"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn run_reads_policy_d_fragments_and_the_cli_habits_work_against_it() {
    let ns = LoopNs::new();
    let dir = TempDir::new("cli-habits");
    let cg = TestCgroup::new();
    let etc = dir.join("etc");
    let frags = etc.join("policy.d");
    std::fs::create_dir_all(&frags).unwrap();
    std::fs::write(frags.join("10-base.toml"), BASE).unwrap();
    std::fs::write(frags.join("20-blocks.toml"), BLOCKS).unwrap();
    // Not a fragment: only *.toml files merge.
    std::fs::write(frags.join("README"), "not toml [[").unwrap();

    // No --policy: the fragments of the config directory, merged.
    let run = EgressCmd::run(&ns, cg.path(), &dir)
        .env("EGRESS_CONFIG_DIR", &etc)
        .events(&dir.join("events.jsonl"))
        .start();
    let status = run.status().expect("status --json");
    assert_eq!(
        status["policy"]["source"],
        frags.display().to_string(),
        "{status}"
    );
    assert!(
        run.stderr_text()
            .contains("enforcing the configured policy fragments"),
        "{}",
        run.stderr_text()
    );
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.2:80")]), [Refused]);
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.66:80")]), [Denied]);

    let socket = dir.join("control.sock");
    let socket = socket.to_str().unwrap();

    // --follow: one follower of everything, one filtered to 127.0.0.99 only (as JSON lines).
    let follow = |filter: Option<&str>| {
        let mut c = Command::new(bins::egress());
        c.args(["events", "--follow", "-o", "json", "--socket", socket]);
        if let Some(f) = filter {
            c.args(["--filter", f]);
        }
        ChildGuard::spawn(&mut c)
    };
    let all = follow(None);
    let only_99 = follow(Some("dst=127.0.0.99,rule=worse"));
    // A deny made after the follower started reaches it (made again until the follower is
    // subscribed: it may not be yet when the first is made).
    wait_for(
        "the follower sees a new deny",
        Duration::from_secs(10),
        || {
            assert_eq!(probe(&cg, &[("tcp", "127.0.0.66:81")]), [Denied]);
            std::thread::sleep(Duration::from_millis(200));
            denies(&all.stdout_lines()).contains(&("127.0.0.66".into(), "bad".into()))
        },
    );
    // The filtered follower is live too (it sees 127.0.0.99), and never saw 127.0.0.66.
    wait_for(
        "the filtered follower sees its deny",
        Duration::from_secs(10),
        || {
            assert_eq!(probe(&cg, &[("tcp", "127.0.0.99:80")]), [Denied]);
            std::thread::sleep(Duration::from_millis(200));
            !denies(&only_99.stdout_lines()).is_empty()
        },
    );
    let seen = denies(&only_99.stdout_lines());
    assert!(
        seen.iter()
            .all(|d| *d == ("127.0.0.99".into(), "worse".into())),
        "the filter let through: {seen:?}"
    );
    drop(all);
    drop(only_99);

    // Without --follow: what the controller keeps, and exit; the global --socket before the
    // subcommand, and -o text against -o json.
    let kept_json = egress(&["--socket", socket, "events", "-o", "json"]);
    assert!(kept_json.status.success(), "{}", text(&kept_json.stderr));
    let lines: Vec<String> = text(&kept_json.stdout).lines().map(String::from).collect();
    let kept = denies(&lines);
    assert!(
        kept.contains(&("127.0.0.66".into(), "bad".into()))
            && kept.contains(&("127.0.0.99".into(), "worse".into())),
        "{kept:?}"
    );
    let kept_text = egress(&[
        "-o", "text", "events", "--socket", socket, "--filter", "rule=bad",
    ]);
    assert!(kept_text.status.success(), "{}", text(&kept_text.stderr));
    let out = text(&kept_text.stdout);
    assert!(
        out.lines().count() >= 2
            && out.lines().all(|l| l.contains(" deny ")
                && l.contains("127.0.0.66:")
                && l.contains("rule=bad")
                && serde_json::from_str::<serde_json::Value>(l).is_err()),
        "{out}"
    );
    // --since: the last hour has them; after a quiet while, the last second has none.
    let hour = egress(&["events", "--since", "1h", "--socket", socket, "--json"]);
    assert_eq!(
        denies(
            &text(&hour.stdout)
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        )
        .len(),
        kept.len()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let second = egress(&["events", "--since", "1s", "--socket", socket]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(
        text(&second.stdout),
        "",
        "nothing happened in the last second"
    );
    // An unknown filter key is a usage error naming it.
    let bad = egress(&["events", "--socket", socket, "--filter", "pid=1,colour=red"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        text(&bad.stderr).contains("`colour`"),
        "{}",
        text(&bad.stderr)
    );

    // -o json / --json / -o text on status.
    let j = run.ctl(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).expect("status -o json is JSON");
    assert_eq!(v["policy"]["source"], frags.display().to_string());
    let t = run.ctl(&["status", "-o", "text"]);
    assert!(t.status.success(), "{}", text(&t.stderr));
    assert!(serde_json::from_slice::<serde_json::Value>(&t.stdout).is_err());
    assert!(
        text(&t.stdout).contains("generation"),
        "{}",
        text(&t.stdout)
    );

    // explain without --policy: the running controller's policy (merged fragments).
    let e = run.ctl(&["explain", "127.0.0.66", "--port", "80"]);
    assert!(e.status.success(), "{}", text(&e.stderr));
    assert!(
        text(&e.stdout).contains("block `bad`"),
        "{}",
        text(&e.stdout)
    );
    let e = run.ctl(&["explain", "127.0.0.2", "--port", "80", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).expect("explain -o json");
    assert_eq!(v["rule"], "local", "{v}");
    let none = egress(&[
        "explain",
        "127.0.0.66",
        "--socket",
        &dir.join("nobody.sock").display().to_string(),
    ]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        text(&none.stderr).contains("none answered") && text(&none.stderr).contains("--policy"),
        "{}",
        text(&none.stderr)
    );

    // reload --dry-run --exit-code: 0 while the fragments are what is in force, 1 once one is
    // added; nothing is applied either way.
    let same = run.ctl(&["reload", "--dry-run", "--exit-code"]);
    assert_eq!(same.status.code(), Some(0), "{same:?}");
    assert_eq!(text(&same.stdout), "no change\n");
    std::fs::write(
        frags.join("30-more.toml"),
        "[[service]]\nname = \"more\"\ndestinations = [\"127.0.0.5\"]\n",
    )
    .unwrap();
    let changed = run.ctl(&["reload", "--dry-run", "--exit-code", "-o", "json"]);
    assert_eq!(changed.status.code(), Some(1), "{changed:?}");
    let v: serde_json::Value = serde_json::from_slice(&changed.stdout).expect("reload -o json");
    assert_eq!(v["changed"], true, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("service more"),
        "{v}"
    );
    assert_eq!(run.generation(), 1, "a dry run applies nothing");
    // A real reload re-reads the directory.
    let applied = run.ctl(&["reload"]);
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    assert_eq!(run.generation(), 2);
    assert_eq!(probe(&cg, &[("tcp", "127.0.0.5:80")]), [Refused]);
}

#[test]
fn a_bad_fragment_is_named_and_no_config_means_the_embedded_default() {
    let ns = LoopNs::new();
    let dir = TempDir::new("cli-fragments");
    let cg = TestCgroup::new();
    let etc = dir.join("etc");
    let frags = etc.join("policy.d");
    std::fs::create_dir_all(&frags).unwrap();
    std::fs::write(frags.join("10-base.toml"), BASE).unwrap();
    std::fs::write(
        frags.join("20-bad.toml"),
        "\n[[block]]\nname = \"oops\"\ndestinations = [\"127.0.0.300\"]\n",
    )
    .unwrap();
    let bad = frags.join("20-bad.toml").display().to_string();
    // `check` names the fragment, its line and field.
    let out = egress(&["check", frags.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("{bad}:4:")),
        "{}",
        text(&out.stderr)
    );
    // `run` refuses it as a configuration error (78), naming the fragment.
    let out = EgressCmd::run(&ns, cg.path(), &dir)
        .env("EGRESS_CONFIG_DIR", &etc)
        .output();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        text(&out.stderr).contains(&format!("{bad}:4:")),
        "{}",
        text(&out.stderr)
    );
    // A key two fragments set names both.
    std::fs::write(frags.join("20-bad.toml"), "mode = \"audit\"\n").unwrap();
    let out = egress(&["check", frags.to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check -o json");
    let error = v[0]["error"].as_str().unwrap();
    assert!(
        error.contains("20-bad.toml") && error.contains("10-base.toml"),
        "{error}"
    );
    // Neither policy.toml nor policy.d: the embedded default, and the log says so.
    std::fs::remove_dir_all(&etc).unwrap();
    let run = EgressCmd::run(&ns, cg.path(), &dir)
        .env("EGRESS_CONFIG_DIR", &etc)
        .start();
    let status = run.status().expect("status --json");
    assert_eq!(
        status["policy"]["source"],
        egress::policy::DEFAULT_POLICY_NAME,
        "{status}"
    );
    let log = run.stderr_text();
    assert!(
        log.contains("enforcing the embedded default policy"),
        "{log}"
    );
}
