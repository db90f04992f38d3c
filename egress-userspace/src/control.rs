//! The long-running commands: `egress run` (attach to a cgroup until signalled) and
//! `egress exec` (run one command in a fresh child cgroup under the policy). Both attach the
//! cgroup hooks and the TC accounting program, stream events, and fold the kernel's flow counters
//! into per-process totals once a second.

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    io::AsyncWrite,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    accounting::{Accounting, Procfs},
    cgroup::{self, ChildCgroup},
    ctlsock::{self, SharedReport, StatsReport},
    datapath::Datapath,
    events::{EventStream, cstr},
    iface, load_policy,
    policy::Policy,
};

type Sink = Box<dyn AsyncWrite + Unpin + Send>;

/// How often the flow counters are read.
const TICK: Duration = Duration::from_secs(1);

/// Where events go: `--events FILE` (appended), else the given default stream.
async fn event_sink(path: Option<&Path>, default: Sink) -> anyhow::Result<Sink> {
    match path {
        None => Ok(default),
        Some(p) if p == Path::new("-") => Ok(default),
        Some(p) => {
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .await
                .with_context(|| format!("opening events file {}", p.display()))?;
            Ok(Box::new(f))
        }
    }
}

/// The datapath, its event stream and the per-process totals of one controller.
struct Controller {
    dp: Datapath,
    stream: EventStream<Sink>,
    acct: Accounting,
    report: SharedReport,
    policy: Policy,
}

impl Controller {
    async fn new(
        policy_path: Option<&Path>,
        events: Option<&Path>,
        default_sink: Sink,
    ) -> anyhow::Result<Controller> {
        let (policy, compiled) = load_policy(policy_path)?;
        let mut dp = Datapath::load(&compiled).context("loading the datapath")?;
        let ring = dp.take_events()?;
        let sink = event_sink(events, default_sink).await?;
        let stream = EventStream::new(ring, compiled, sink)?;
        Ok(Controller {
            dp,
            stream,
            acct: Accounting::new(),
            report: Arc::new(Mutex::new(StatsReport::default())),
            policy,
        })
    }

    /// Attaches TC to `ifaces`, or to every interface that is up but loopback when none is given.
    fn attach_tc(&mut self, ifaces: &[String]) -> anyhow::Result<()> {
        let ifaces = if ifaces.is_empty() {
            iface::default_ifaces().context("listing interfaces")?
        } else {
            ifaces.to_vec()
        };
        if ifaces.is_empty() {
            warn!("no interface is up besides loopback: TC accounting is not attached");
            return Ok(());
        }
        self.dp
            .attach_tc(&ifaces)
            .context("attaching the TC egress program")?;
        info!(ifaces = ?ifaces, "TC egress accounting attached");
        Ok(())
    }

    /// Reads the flow counters into the totals and publishes a fresh report.
    fn tick(&mut self) -> anyhow::Result<()> {
        let flows = self.dp.flows()?;
        let dp = &self.dp;
        let owner_comm = |tgid: u32| dp.owner_of(tgid).map(|o| cstr(&o.comm));
        let exited = self.acct.tick(&flows, Instant::now(), &Procfs, &owner_comm);
        if !exited.is_empty() {
            self.dp.remove_flows(&exited)?;
        }
        let report = StatsReport {
            generated_at: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            policy: self.policy.source.clone(),
            mode: self.policy.mode.to_string(),
            processes: self.acct.snapshot(),
            counters: self.dp.stats()?,
            denies_by_rule: self.stream.by_rule().clone(),
        };
        *self.report.lock().expect("report lock") = report;
        Ok(())
    }
}

pub struct RunOptions {
    pub policy: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub events: Option<PathBuf>,
    pub ifaces: Vec<String>,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
}

/// `egress run`: enforce the policy on a cgroup (default: the whole cgroup2 hierarchy) until
/// SIGINT or SIGTERM, then detach.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let mut ctl = Controller::new(
        opts.policy.as_deref(),
        opts.events.as_deref(),
        Box::new(tokio::io::stdout()),
    )
    .await?;
    let root = cgroup::cgroup2_root()?;
    let cgroup = opts.cgroup.clone().unwrap_or_else(|| root.clone());
    // Below the root, TC only touches the sockets of that cgroup's processes.
    if cgroup != root {
        let (id, level) = cgroup::id_and_level(&root, &cgroup)?;
        ctl.dp.set_tc_scope(id, level)?;
    }
    let listener = ctlsock::bind(&opts.socket)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    ctl.dp
        .attach(&cgroup)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    ctl.attach_tc(&opts.ifaces)?;
    let server = tokio::spawn(ctlsock::serve(listener, ctl.report.clone()));
    let metrics = opts
        .metrics
        .map(|addr| tokio::spawn(crate::metrics::serve(addr, ctl.report.clone())));
    info!(
        policy = %ctl.policy.source,
        cgroup = %cgroup.display(),
        mode = %ctl.policy.mode,
        default = %ctl.policy.default,
        services = ctl.policy.services().count(),
        blocks = ctl.policy.blocks().count(),
        socket = %opts.socket.display(),
        "enforcing; SIGINT or SIGTERM detaches"
    );
    let mut ticker = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            r = ctl.stream.readable() => { r?; ctl.stream.drain().await?; }
            _ = ticker.tick() => ctl.tick()?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    ctl.stream.drain_all().await?;
    let stats = ctl.dp.stats()?;
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    let written = ctl.stream.written();
    drop(ctl);
    info!(
        allowed = stats.allowed,
        denied = stats.denied,
        audited = stats.audited,
        events_lost = stats.events_lost,
        tc_dropped = stats.tc_dropped,
        events_written = written,
        "detached"
    );
    Ok(())
}

pub struct ExecOptions {
    pub policy: Option<PathBuf>,
    pub events: Option<PathBuf>,
    pub command: Vec<String>,
    pub ifaces: Vec<String>,
    pub report: Option<PathBuf>,
}

/// `egress exec`: runs the command in a fresh child cgroup with the policy attached, and returns
/// the exit code to exit with (the command's, or 128 + the signal that killed it).
pub async fn exec(opts: ExecOptions) -> anyhow::Result<i32> {
    let (program, args) = opts
        .command
        .split_first()
        .context("no command given after `--`")?;
    let mut ctl = Controller::new(
        opts.policy.as_deref(),
        opts.events.as_deref(),
        Box::new(tokio::io::stderr()),
    )
    .await?;
    let root = cgroup::cgroup2_root()?;
    let cg = ChildCgroup::create(&root, "egress-exec")?;
    let (id, level) = cgroup::id_and_level(&root, cg.path())?;
    ctl.dp.set_tc_scope(id, level)?;
    ctl.dp
        .attach(cg.path())
        .with_context(|| format!("attaching to cgroup {}", cg.path().display()))?;
    ctl.attach_tc(&opts.ifaces)?;

    // Handlers first: a signal arriving between spawn and here would otherwise kill egress and
    // leave the command running unprotected.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigquit = signal(SignalKind::quit())?;

    let procs = cg.procs_fd()?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, write) on an fd opened
    // before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Fail closed: if egress dies (even by SIGKILL), the command dies with it rather than
            // running on without its policy.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // egress died before the prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            cgroup::join_in_child(&procs)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            tracing::error!(command = %program, error = %e, "cannot run the command");
            return Ok(code);
        }
    };
    let pid = child.id();
    let mut ticker = tokio::time::interval(TICK);
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.context("waiting for the command")?,
            r = ctl.stream.readable() => { r?; ctl.stream.drain().await?; }
            _ = ticker.tick() => ctl.tick()?,
            _ = sigint.recv() => forward_from_terminal(pid, libc::SIGINT),
            _ = sigquit.recv() => forward_from_terminal(pid, libc::SIGQUIT),
            _ = sigterm.recv() => forward(pid, libc::SIGTERM),
            _ = sighup.recv() => forward(pid, libc::SIGHUP),
        }
    };
    // The command's last events and counters may still be in the kernel.
    ctl.stream.drain_all().await?;
    ctl.tick()?;
    if let Some(path) = &opts.report {
        let report = ctl.report.lock().expect("report lock").clone();
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    // Anything the command left behind is killed while the policy is still attached; only then
    // is the datapath detached and the cgroup removed.
    cg.kill_all_and_wait();
    drop(ctl);
    if let Err(e) = cg.remove() {
        warn!(cgroup = %cg.path().display(), error = %e, "could not remove the exec cgroup");
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    })
}

/// SIGINT and SIGQUIT typed at a terminal already reach the whole foreground process group, the
/// command included: forward them only when egress is not in the terminal's foreground group
/// (someone sent them to egress alone), so a Ctrl-C is never delivered twice.
fn forward_from_terminal(pid: Option<u32>, sig: i32) {
    // SAFETY: plain syscalls.
    let foreground = unsafe {
        let fg = libc::tcgetpgrp(libc::STDIN_FILENO);
        fg > 0 && fg == libc::getpgrp()
    };
    if !foreground {
        forward(pid, sig);
    }
}

fn forward(pid: Option<u32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, sig) };
    }
}
