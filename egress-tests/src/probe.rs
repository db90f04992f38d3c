//! `egress-probe`, typed: the JSON lines it prints (these types are shared by the binary, which
//! writes them, and the tests, which read them), and a runner that starts it in a test cgroup
//! and, if asked, a test namespace.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{bins, netns::LoopNs, process::ChildGuard, wait_for};

/// The result of one call, as the probe prints it: `"ok"`, or the errno's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Verdict {
    /// The call succeeded (`"ok"`).
    Succeeded,
    /// `ECONNREFUSED`: the firewall let the connect through and it reached a closed port.
    Refused,
    /// `EPERM`: the firewall denied it. Nothing else is a deny.
    Denied,
    /// Any other failure (`ETIMEDOUT`, `ENETUNREACH`, …), by errno name: never a verdict of the
    /// firewall.
    Other(String),
}

impl Verdict {
    /// The verdict of a call that returned `r`.
    pub fn of(r: &io::Result<()>) -> Verdict {
        match r {
            Ok(()) => Verdict::Succeeded,
            Err(e) => Verdict::from_error(e),
        }
    }

    pub fn from_error(e: &io::Error) -> Verdict {
        match e.raw_os_error() {
            Some(libc::EPERM) => Verdict::Denied,
            Some(libc::ECONNREFUSED) => Verdict::Refused,
            _ => Verdict::Other(errno_name(e)),
        }
    }

    /// As the probe prints it.
    pub fn name(&self) -> &str {
        match self {
            Verdict::Succeeded => "ok",
            Verdict::Refused => "ECONNREFUSED",
            Verdict::Denied => "EPERM",
            Verdict::Other(name) => name,
        }
    }

    /// Did the firewall let the call through? Panics on [`Verdict::Other`], which says nothing
    /// about the firewall.
    pub fn passed(&self) -> bool {
        match self {
            Verdict::Succeeded | Verdict::Refused => true,
            Verdict::Denied => false,
            Verdict::Other(e) => panic!("{e} is not a firewall verdict"),
        }
    }
}

impl From<String> for Verdict {
    fn from(s: String) -> Verdict {
        match s.as_str() {
            "ok" => Verdict::Succeeded,
            "ECONNREFUSED" => Verdict::Refused,
            "EPERM" => Verdict::Denied,
            _ => Verdict::Other(s),
        }
    }
}

impl From<Verdict> for String {
    fn from(v: Verdict) -> String {
        v.name().to_string()
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The errno's name (`ETIMEDOUT`), `errno<N>` for the less common ones.
pub fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EBADF) => "EBADF".into(),
        Some(libc::ENOBUFS) => "ENOBUFS".into(),
        Some(n) => format!("errno{n}"),
        None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => e.to_string(),
    }
}

/// The line of one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallLine {
    pub op: String,
    pub dst: String,
    pub result: Verdict,
    pub pid: u32,
    /// The `dns-*` calls: the source address of the answer (`recvfrom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The `dns-*` calls on connected sockets: `getpeername`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// The line of one call repeated `--count` times: how many times each result came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryLine {
    pub op: String,
    pub dst: String,
    pub count: u64,
    /// By result name (`"ok"`, `"EPERM"`, …).
    pub results: BTreeMap<String, u64>,
    pub pid: u32,
}

impl SummaryLine {
    pub fn times(&self, v: &Verdict) -> u64 {
        self.results.get(v.name()).copied().unwrap_or(0)
    }
}

/// The line of `storm ALLOWED DENIED MS`: UDP connects alternating between an address that must
/// pass and one that must be denied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    pub op: String,
    pub attempts: u64,
    pub per_sec: f64,
    /// `allowed_denied + denied_ok`.
    pub wrong: u64,
    pub allowed_ok: u64,
    /// Connects to the allowed address that failed with `EPERM`.
    pub allowed_denied: u64,
    pub denied_ok: u64,
    /// Connects to the denied address that failed with `EPERM`.
    pub denied_denied: u64,
    /// Connects that failed otherwise (neither address), by errno name. Not a verdict either
    /// way: a test expecting a clean storm wants none.
    pub errors: BTreeMap<String, u64>,
    pub pid: u32,
}

impl StormReport {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Checks the storm was clean: both addresses probed, no wrong verdict, and no attempt
    /// without a verdict (only `EPERM` is a deny: a timeout or an unreachable network is not).
    pub fn assert_clean(&self, what: &str) {
        assert_eq!(self.wrong, 0, "{what}: wrong verdicts: {self:?}");
        assert_eq!(
            self.error_count(),
            0,
            "{what}: attempts without a verdict: {self:?}"
        );
        assert!(
            self.allowed_ok > 0 && self.denied_denied > 0,
            "{what}: both addresses were probed: {self:?}"
        );
    }
}

/// Parses the call lines of a probe run (its stdout); panics on anything else.
pub fn parse_calls(stdout: &[u8]) -> Vec<CallLine> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}")))
        .collect()
}

/// The verdict of each call line of a probe run (its stdout).
pub fn verdicts(stdout: &[u8]) -> Vec<Verdict> {
    parse_calls(stdout).into_iter().map(|l| l.result).collect()
}

/// The call lines a running probe has printed so far.
pub fn calls_so_far(probe: &ChildGuard) -> Vec<CallLine> {
    parse_calls(probe.stdout_lines().join("\n").as_bytes())
}

/// One line of a run that mixes single calls with counted ones (`hold`, `flood`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Summary(SummaryLine),
    Call(CallLine),
}

impl Line {
    /// The line of a single call; panics on a summary.
    pub fn call(&self) -> &CallLine {
        match self {
            Line::Call(c) => c,
            Line::Summary(s) => panic!("a call line was expected, not {s:?}"),
        }
    }

    /// The line of a counted call; panics on a single call's.
    pub fn summary(&self) -> &SummaryLine {
        match self {
            Line::Summary(s) => s,
            Line::Call(c) => panic!("a summary line was expected, not {c:?}"),
        }
    }
}

/// Parses every line of a probe run that mixes single calls with counted ones.
pub fn parse_lines(stdout: &[u8]) -> Vec<Line> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}")))
        .collect()
}

/// Parses one line of another kind (a summary or a storm report).
pub fn parse_one<T: for<'de> Deserialize<'de>>(stdout: &[u8]) -> T {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad probe output {text:?}: {e}"))
}

/// How to run `egress-probe`: options, then calls.
#[must_use]
#[derive(Debug, Default)]
pub struct Probe {
    cgroup: Option<PathBuf>,
    netns: Option<PathBuf>,
    opts: Vec<OsString>,
    calls: Vec<OsString>,
}

impl Probe {
    pub fn new() -> Probe {
        Probe::default()
    }

    /// `--cgroup DIR`: the probe joins the cgroup before any call.
    pub fn cgroup(mut self, dir: impl AsRef<Path>) -> Self {
        self.cgroup = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Runs in namespace `ns` (through nsenter, which execs the probe in place).
    pub fn netns(mut self, ns: &LoopNs) -> Self {
        self.netns = Some(ns.path());
        self
    }

    /// An option and its value, e.g. `("--rate", "8000000")`.
    pub fn opt(mut self, name: &str, value: impl Into<OsString>) -> Self {
        self.opts.push(name.into());
        self.opts.push(value.into());
        self
    }

    /// A call: OP ADDR:PORT.
    pub fn call(self, op: &str, addr: &str) -> Self {
        self.args([op, addr])
    }

    /// Call words as they are (an op, its address, its arguments).
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, words: I) -> Self {
        self.calls.extend(words.into_iter().map(Into::into));
        self
    }

    /// The command line.
    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(bins::probe());
                c
            }
            None => Command::new(bins::probe()),
        };
        if let Some(cg) = &self.cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        cmd.args(&self.opts).args(&self.calls);
        cmd
    }

    /// Runs it to the end (it must succeed) and returns its stdout.
    fn stdout(self) -> Vec<u8> {
        let out = ChildGuard::spawn(&mut self.command()).output();
        assert!(out.status.success(), "egress-probe failed: {out:?}");
        out.stdout
    }

    /// Runs it to the end; one line per call.
    pub fn run(self) -> Vec<CallLine> {
        parse_calls(&self.stdout())
    }

    /// Runs it to the end; the verdict of each call.
    pub fn verdicts(self) -> Vec<Verdict> {
        verdicts(&self.stdout())
    }

    /// Runs it to the end; every line, single calls and summaries alike.
    pub fn lines(self) -> Vec<Line> {
        parse_lines(&self.stdout())
    }

    /// Runs it (with `--count N`, one call) to the end; its summary line.
    pub fn summary(self) -> SummaryLine {
        parse_one(&self.stdout())
    }

    /// Starts it and returns at once.
    pub fn spawn(self) -> ChildGuard {
        ChildGuard::spawn(&mut self.command())
    }

    /// Starts `storm ALLOWED DENIED MS` in `cgroup` (joined before the storm starts), and waits
    /// until it is in the cgroup, i.e. about to make its first connect. [`Storm::finish`] ends it
    /// early through `--stop-file`.
    pub fn storm(self, cgroup: &crate::TestCgroup, allowed: &str, denied: &str, ms: u64) -> Storm {
        let stop = std::env::temp_dir().join(format!(
            "egress-storm-stop-{}-{}",
            std::process::id(),
            cgroup.id()
        ));
        let _ = std::fs::remove_file(&stop);
        let mut proc = self
            .cgroup(cgroup.path())
            .opt("--stop-file", &stop)
            .args(["storm", allowed, denied, &ms.to_string()])
            .spawn();
        let pid = proc.pid();
        wait_for(
            "the storm prober to join its cgroup",
            Duration::from_secs(10),
            || {
                assert!(
                    proc.exited().is_none(),
                    "the prober exited: {}",
                    proc.stderr_text()
                );
                cgroup.pids().contains(&pid)
            },
        );
        Storm { proc, stop }
    }
}

/// A running storm prober (see [`Probe::storm`]).
#[derive(Debug)]
pub struct Storm {
    proc: ChildGuard,
    stop: PathBuf,
}

impl Storm {
    /// Still storming?
    pub fn running(&mut self) -> bool {
        self.proc.exited().is_none()
    }

    /// Ends the storm (through the stop file) and returns its report.
    pub fn finish(self) -> StormReport {
        std::fs::write(&self.stop, b"").expect("writing the storm's stop file");
        let out = self.proc.output();
        let _ = std::fs::remove_file(&self.stop);
        assert!(out.status.success(), "the storm prober failed: {out:?}");
        parse_one(&out.stdout)
    }
}

/// Runs the probe in `cgroup` (in the test's own namespace: loopback destinations only) and
/// returns the verdict of each call.
pub fn probe(cgroup: impl AsRef<Path>, calls: &[(&str, &str)]) -> Vec<Verdict> {
    probe_with_pid(cgroup, calls).0
}

/// As [`probe`], also returning the probe's pid.
pub fn probe_with_pid(cgroup: impl AsRef<Path>, calls: &[(&str, &str)]) -> (Vec<Verdict>, u32) {
    let mut p = Probe::new().cgroup(cgroup);
    for (op, addr) in calls {
        p = p.call(op, addr);
    }
    let lines = p.run();
    assert_eq!(lines.len(), calls.len(), "one line per call: {lines:?}");
    let pid = lines.first().map_or(0, |l| l.pid);
    (lines.into_iter().map(|l| l.result).collect(), pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_read_back_as_printed() {
        for (v, name) in [
            (Verdict::Succeeded, "ok"),
            (Verdict::Refused, "ECONNREFUSED"),
            (Verdict::Denied, "EPERM"),
            (Verdict::Other("ETIMEDOUT".into()), "ETIMEDOUT"),
        ] {
            assert_eq!(serde_json::to_value(&v).unwrap(), name);
            assert_eq!(Verdict::from(name.to_string()), v);
        }
        let timeout = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        assert_eq!(
            Verdict::of(&Err(timeout)),
            Verdict::Other("ETIMEDOUT".into())
        );
        assert_eq!(
            Verdict::of(&Err(io::Error::from_raw_os_error(libc::EPERM))),
            Verdict::Denied
        );
    }

    #[test]
    #[should_panic(expected = "not a firewall verdict")]
    fn an_error_is_no_verdict() {
        Verdict::Other("ENETUNREACH".into()).passed();
    }

    #[test]
    fn a_storm_with_errors_is_not_clean() {
        let mut r = StormReport {
            op: "storm".into(),
            attempts: 4,
            per_sec: 1.0,
            wrong: 0,
            allowed_ok: 1,
            allowed_denied: 0,
            denied_ok: 0,
            denied_denied: 1,
            errors: BTreeMap::new(),
            pid: 1,
        };
        r.assert_clean("no errors");
        r.errors.insert("ETIMEDOUT".into(), 2);
        let caught = std::panic::catch_unwind(|| r.assert_clean("timeouts"));
        assert!(caught.is_err(), "timeouts are not denies");
    }
}
