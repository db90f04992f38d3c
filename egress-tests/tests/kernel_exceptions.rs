//! Real-kernel tests of break-glass exceptions without a controller: the real object loaded
//! in-process and attached to a child cgroup, `EXCEPTIONS` written through the datapath as the
//! controller writes it (`exceptions::compile`), and probes judged by the hooks. An exception
//! lets its scope through until its end in CLOCK_BOOTTIME, then not (the kernel's own clock,
//! nothing removes the entry); and a byte-budget block of the same user still wins. They need
//! root and fail (never skip) when the kernel refuses a program.

use std::{process::Command, time::Duration};

use egress::{
    datapath::Datapath,
    exceptions::{self, Exception, Scope},
    policy::{Policy, compile::CompiledPolicy},
    sys::clock,
};
use egress_common::BlockKey;
use egress_tests::{
    ChildGuard, TestCgroup,
    Verdict::{self, Denied, Refused},
    bins, probe,
};

const DEST: &str = "127.0.0.3:8000";

fn load() -> Datapath {
    let p = Policy::parse("test.toml", "allow_loopback = false\n").unwrap();
    let c = CompiledPolicy::compile(&p).unwrap();
    Datapath::load(&c).unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"))
}

fn exception(id: u32, scope: Scope, until_ns: u64) -> Exception {
    Exception {
        id,
        dest: "127.0.0.3/32".into(),
        host: None,
        addresses: Vec::new(),
        port: Some("8000".into()),
        protocol: Some("tcp".into()),
        scope,
        reason: "test".into(),
        by_uid: 0,
        by_user: None,
        granted: String::new(),
        until: String::new(),
        until_ns,
    }
}

fn set(dp: &mut Datapath, list: &[Exception]) {
    let (entries, levels) = exceptions::compile(list).unwrap();
    dp.set_exceptions(&entries, levels).unwrap();
}

fn as_nobody(cg: &TestCgroup) -> Verdict {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bins::probe())
        .args(["tcp", DEST]);
    cg.join_on_exec(&mut cmd);
    let out = ChildGuard::spawn(&mut cmd).output();
    assert!(out.status.success(), "probe as nobody: {out:?}");
    egress_tests::probe::verdicts(&out.stdout).remove(0)
}

#[test]
fn an_exception_ends_at_its_kernel_deadline_with_nothing_removing_it() {
    let cg = TestCgroup::new();
    let mut dp = load();
    dp.attach(cg.path()).expect("attach");
    let (id, level) =
        egress::sys::cgroup::id_and_level(&egress::sys::cgroup::cgroup2_root().unwrap(), cg.path())
            .unwrap();
    assert_eq!(probe(&cg, &[("tcp", DEST)]), [Denied]);
    let until = clock::boot_ns() + 3_000_000_000;
    set(
        &mut dp,
        &[exception(
            1,
            Scope::Cgroup {
                path: cg.path().display().to_string(),
                id,
                level,
            },
            until,
        )],
    );
    assert_eq!(dp.config().exceptions, 1);
    assert_eq!(dp.config().exc_cg_levels, 1 << level);
    assert_eq!(probe(&cg, &[("tcp", DEST)]), [Refused], "in force");
    let left = Duration::from_nanos(until.saturating_sub(clock::boot_ns()));
    std::thread::sleep(left + Duration::from_millis(200));
    assert_eq!(
        probe(&cg, &[("tcp", DEST)]),
        [Denied],
        "past its end, the entry still in the map"
    );
    assert_eq!(dp.exception_entries(), 1, "nothing removed it");
    // Emptied: the count goes back to 0 and the hooks stop looking.
    set(&mut dp, &[]);
    assert_eq!(dp.exception_entries(), 0);
    assert_eq!(dp.config().exceptions, 0);
}

#[test]
fn a_budget_block_wins_over_an_exception() {
    let cg = TestCgroup::new();
    let mut dp = load();
    dp.attach(cg.path()).expect("attach");
    let far = clock::boot_ns() + 600_000_000_000;
    set(
        &mut dp,
        &[exception(
            2,
            Scope::User {
                uid: 65534,
                name: None,
            },
            far,
        )],
    );
    assert_eq!(as_nobody(&cg), Refused, "the user's exception");
    assert_eq!(
        probe(&cg, &[("tcp", DEST)]),
        [Denied],
        "root is not that user"
    );
    dp.block(BlockKey::user(65534), far, 7).unwrap();
    assert_eq!(as_nobody(&cg), Denied, "the block wins");
    dp.unblock(&BlockKey::user(65534)).unwrap();
    assert_eq!(as_nobody(&cg), Refused, "the exception again");
}
