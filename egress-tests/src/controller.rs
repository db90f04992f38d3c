//! The one controller guard: [`EgressCmd`] starts `egress run` or `egress exec` inside a test
//! network namespace, and the [`Egress`] it returns always stops what it started when dropped,
//! also when the test panics: SIGTERM, a wait, SIGKILL, and for a pinned run `egress stop
//! --pin-dir` so that no link or pin is left behind.
//!
//! A test run never uses the controller's defaults that reach outside the test: it always has a
//! control socket in the test's temporary directory, is either `--ephemeral` or pinned in a
//! directory of its own ([`pin_dir`]) (`status` is pointed at that directory too), and looks for
//! its configured policy under the test's directory (`EGRESS_CONFIG_DIR`), never /etc/egress.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use egress::report::StatsReport;

use crate::{TempDir, bins, netns::LoopNs, process::ChildGuard, wait_for};

/// How long `egress run` gets to attach and answer on its control socket.
const COME_UP: Duration = Duration::from_secs(20);
/// How long a controller gets to exit once signalled.
const EXIT: Duration = Duration::from_secs(10);

/// A fresh pin directory of the test's own under bpffs (`/sys/fs/bpf/egress-test-<pid>-<n>`),
/// never the default `/sys/fs/bpf/egress`. Nothing is created: `egress run --pin-dir` does it.
pub fn pin_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/egress-test-{}-{n}",
        std::process::id()
    ))
}

/// What an `egress` process is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Run,
    Exec,
    Learn,
}

/// How to start `egress run` or `egress exec` in a test namespace; see [`EgressCmd::run`] and
/// [`EgressCmd::exec`].
#[must_use]
#[derive(Debug)]
pub struct EgressCmd {
    sub: Sub,
    netns: PathBuf,
    netns_name: String,
    /// Through `ip netns exec` (the namespace's own /sys) rather than nsenter.
    netns_sysfs: bool,
    json_logs: bool,
    opts: Vec<OsString>,
    command: Vec<OsString>,
    socket: Option<PathBuf>,
    pins: Option<PathBuf>,
    /// Where `status` looks for pins when the run is ephemeral (nothing is ever there).
    no_pins: PathBuf,
    /// Descriptors `egress` inherits: (ours, the number it gets).
    pass_fds: Vec<(std::os::fd::OwnedFd, i32)>,
    /// Environment variables `egress` gets besides ours.
    env: Vec<(OsString, OsString)>,
}

impl EgressCmd {
    fn new(sub: Sub, ns: &LoopNs, no_pins: PathBuf) -> EgressCmd {
        EgressCmd {
            sub,
            netns: ns.path(),
            netns_name: ns.name().to_string(),
            netns_sysfs: false,
            json_logs: false,
            opts: Vec::new(),
            command: Vec::new(),
            socket: None,
            pins: None,
            no_pins,
            pass_fds: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `egress run --cgroup <cgroup>` in `ns`, with its control socket at `<dir>/control.sock`.
    /// Ephemeral unless [`EgressCmd::pinned`].
    pub fn run(ns: &LoopNs, cgroup: &Path, dir: &TempDir) -> EgressCmd {
        let mut c = EgressCmd::new(Sub::Run, ns, dir.join("no-pins"));
        c.socket = Some(dir.join("control.sock"));
        // Never the host's /etc/egress: without --policy, a run reads the test's own (absent
        // unless the test writes it; `.env` may point it elsewhere).
        c.env
            .push(("EGRESS_CONFIG_DIR".into(), dir.join("etc-egress").into()));
        c.opts.push("--cgroup".into());
        c.opts.push(cgroup.into());
        c
    }

    /// `egress exec` in `ns` (it makes its own cgroup); give the command with
    /// [`EgressCmd::command`].
    pub fn exec(ns: &LoopNs) -> EgressCmd {
        EgressCmd::new(Sub::Exec, ns, PathBuf::from("/nonexistent"))
    }

    /// `egress learn` in `ns`; a command (after `--`) only if given with
    /// [`EgressCmd::command`].
    pub fn learn(ns: &LoopNs) -> EgressCmd {
        EgressCmd::new(Sub::Learn, ns, PathBuf::from("/nonexistent"))
    }

    /// One more option (or option value) for the subcommand.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.opts.push(a.into());
        self
    }

    /// More options for the subcommand.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.opts.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--policy FILE`.
    pub fn policy(self, file: &Path) -> Self {
        self.arg("--policy").arg(file)
    }

    /// `--events FILE`.
    pub fn events(self, file: &Path) -> Self {
        self.arg("--events").arg(file)
    }

    /// `--iface IFACE`.
    pub fn iface(self, iface: &str) -> Self {
        self.arg("--iface").arg(iface)
    }

    /// `exec --report FILE`.
    pub fn report(self, file: &Path) -> Self {
        self.arg("--report").arg(file)
    }

    /// The control socket, instead of `<dir>/control.sock`.
    pub fn socket(mut self, path: &Path) -> Self {
        self.socket = Some(path.to_path_buf());
        self
    }

    /// Pin under `dir` (see [`pin_dir`]) instead of `--ephemeral`; on drop the guard runs
    /// `egress stop --pin-dir <dir>`.
    pub fn pinned(mut self, dir: &Path) -> Self {
        self.pins = Some(dir.to_path_buf());
        self
    }

    /// The command `exec` runs (after `--`).
    pub fn command<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, argv: I) -> Self {
        self.command.extend(argv.into_iter().map(Into::into));
        self
    }

    /// `exec` runs `egress-probe ARGS`.
    pub fn probe<I: IntoIterator<Item = S>, S: Into<OsString>>(self, args: I) -> Self {
        self.command([bins::probe()]).command(args)
    }

    /// Start through `ip netns exec`, which gives `egress` the namespace's own /sys (where it can
    /// see a bridge made there; cgroup2 is then not mounted, and egress mounts its own view).
    pub fn netns_sysfs(mut self) -> Self {
        self.netns_sysfs = true;
        self
    }

    /// `--log-format json`: stderr carries one JSON object per log record.
    pub fn json_logs(mut self) -> Self {
        self.json_logs = true;
        self
    }

    /// `egress` gets the environment variable `key=value` (e.g. `NOTIFY_SOCKET`, as systemd
    /// sets it).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `egress` inherits `fd` as descriptor number `target` (not close-on-exec), the way a
    /// parent process leaks a socket to its children.
    pub fn pass_fd(mut self, fd: std::os::fd::OwnedFd, target: i32) -> Self {
        self.pass_fds.push((fd, target));
        self
    }

    fn build(&self) -> Command {
        let egress = bins::egress();
        let mut cmd = if self.netns_sysfs {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.netns_name]).arg(egress);
            c
        } else {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", self.netns.display()))
                .arg("--")
                .arg(egress);
            c
        };
        if self.json_logs {
            cmd.args(["--log-format", "json"]);
        }
        match self.sub {
            Sub::Run => {
                cmd.arg("run");
                match &self.pins {
                    Some(p) => cmd.arg("--pin-dir").arg(p),
                    None => cmd.arg("--ephemeral"),
                };
                if let Some(s) = &self.socket {
                    cmd.arg("--socket").arg(s);
                }
                cmd.args(&self.opts);
            }
            Sub::Exec => {
                cmd.arg("exec")
                    .args(&self.opts)
                    .arg("--")
                    .args(&self.command);
            }
            Sub::Learn => {
                cmd.arg("learn").args(&self.opts);
                if !self.command.is_empty() {
                    cmd.arg("--").args(&self.command);
                }
            }
        }
        // Text logs without colour codes, whatever the terminal.
        cmd.env("NO_COLOR", "1");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let fds: Vec<(i32, i32)> = self
            .pass_fds
            .iter()
            .map(|(fd, target)| (std::os::fd::AsRawFd::as_raw_fd(fd), *target))
            .collect();
        if !fds.is_empty() {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only dup2/fcntl, async-signal-safe, on fds that outlive the spawn.
            unsafe {
                cmd.pre_exec(move || {
                    for &(fd, target) in &fds {
                        if fd == target {
                            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        } else if libc::dup2(fd, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Starts it and returns at once.
    pub fn spawn(self) -> Egress {
        let proc = ChildGuard::spawn(&mut self.build());
        Egress {
            proc: Some(proc),
            socket: self.socket,
            status_pins: self.pins.clone().unwrap_or(self.no_pins),
            pins: self.pins,
        }
    }

    /// Starts `egress run` and waits (up to 20 s) until it answers `status` on its control
    /// socket as a running controller, which it does once every hook is attached.
    pub fn start(self) -> Egress {
        assert_eq!(
            self.sub,
            Sub::Run,
            "start() waits for a controller: use spawn()"
        );
        let mut eg = self.spawn();
        wait_for("egress run to come up", COME_UP, || {
            if let Some(st) = eg.exited() {
                panic!("egress run exited early ({st}): {}", eg.stderr_text());
            }
            eg.status()
                .is_some_and(|s| s["controller"]["running"] == true)
        });
        eg
    }

    /// Runs it to the end (however long that takes) and returns its status and output.
    pub fn output(self) -> Output {
        self.spawn().output()
    }

    /// As [`EgressCmd::output`], and it must exit with status 0.
    pub fn success(self) -> Output {
        let out = self.output();
        assert!(
            out.status.success(),
            "egress exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// A running `egress run` or `egress exec`, stopped on drop. See [`EgressCmd`].
#[derive(Debug)]
pub struct Egress {
    /// None once [`Egress::output`] took it.
    proc: Option<ChildGuard>,
    socket: Option<PathBuf>,
    pins: Option<PathBuf>,
    status_pins: PathBuf,
}

impl Egress {
    fn proc(&self) -> &ChildGuard {
        self.proc.as_ref().expect("the process, until output()")
    }

    fn proc_mut(&mut self) -> &mut ChildGuard {
        self.proc.as_mut().expect("the process, until output()")
    }

    /// Its pid (nsenter and `ip netns exec` exec `egress` in place).
    pub fn pid(&self) -> u32 {
        self.proc().pid()
    }

    pub fn signal(&mut self, sig: i32) {
        self.proc_mut().signal(sig);
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc_mut().exited()
    }

    /// Sends `sig` and waits (up to 10 s) for it to exit; returns how it exited.
    pub fn stop(&mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(&format!("egress after signal {sig}"))
    }

    /// Waits (up to 10 s) for it to exit by itself.
    pub fn wait_exit(&mut self, what: &str) -> ExitStatus {
        self.proc_mut().wait_within(what, EXIT)
    }

    /// `kill -9`: no chance to clean up (pins stay; the guard still removes them on drop).
    pub fn kill_9(&mut self) {
        self.proc_mut().kill();
    }

    /// What it has logged so far.
    pub fn stderr_text(&self) -> String {
        self.proc().stderr_text()
    }

    /// The log records it has written so far, started with [`EgressCmd::json_logs`]: one JSON
    /// object per stderr line (`level`, `fields`, `target`); other lines are skipped.
    pub fn log_records(&self) -> Vec<serde_json::Value> {
        self.stderr_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The records of [`Egress::log_records`] at level WARN.
    pub fn warnings(&self) -> Vec<serde_json::Value> {
        self.log_records()
            .into_iter()
            .filter(|r| r["level"] == "WARN")
            .collect()
    }

    /// Waits for it to exit, however long that takes; returns its status and output.
    pub fn output(mut self) -> Output {
        self.proc.take().expect("the process").output()
    }

    fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .expect("a control socket: only `egress run` has one")
    }

    /// `egress ARGS --socket <its socket>`, run to the end.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bins::egress())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("running egress")
    }

    /// `egress status --json` (from the controller, else from its pins), if it succeeds.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(bins::egress())
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .arg("--pin-dir")
            .arg(&self.status_pins)
            .output()
            .expect("running egress status");
        out.status.success().then(|| {
            serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out:?}"))
        })
    }

    /// The policy generation `status --json` reports.
    pub fn generation(&self) -> u64 {
        let s = self.status().expect("egress status --json");
        s["policy"]["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("no policy.generation in {s}"))
    }

    /// `egress stats --json`.
    pub fn stats(&self) -> StatsReport {
        let out = self.ctl(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "egress stats --json: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stats --json is not a StatsReport ({e}): {out:?}"))
    }

    /// `egress reload --policy FILE`.
    pub fn reload(&self, policy: &Path) -> Output {
        let policy = policy.to_str().expect("a UTF-8 policy path");
        self.ctl(&["reload", "--policy", policy])
    }
}

/// True while a live controller holds the lock of pin directory `dir` (`egress run` takes it
/// for as long as it drives those pins).
fn pins_locked(dir: &Path) -> bool {
    egress::datapath::pins::Pins::new(dir).is_locked()
}

impl Drop for Egress {
    fn drop(&mut self) {
        if let Some(p) = &mut self.proc {
            p.terminate();
        }
        let Some(dir) = &self.pins else { return };
        // Another controller still drives these pins (this one was refused them, or the test
        // restarted egress over them): stopping them is that controller's guard's job.
        if pins_locked(dir) {
            return;
        }
        let _ = Command::new(bins::egress())
            .arg("stop")
            .arg("--pin-dir")
            .arg(dir)
            .arg("--socket")
            .arg(self.socket.as_deref().unwrap_or(Path::new("/nonexistent")))
            .output();
    }
}
