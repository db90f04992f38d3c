//! The long-running commands: `egress run` (attach to a cgroup until signalled) and
//! `egress exec` (run one command in a fresh child cgroup under the policy).

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use tokio::{
    io::AsyncWrite,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    cgroup::{self, ChildCgroup},
    datapath::Datapath,
    events::EventStream,
    load_policy,
};

type Sink = Box<dyn AsyncWrite + Unpin + Send>;

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

pub struct RunOptions {
    pub policy: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub events: Option<PathBuf>,
}

/// `egress run`: enforce the policy on a cgroup (default: the whole cgroup2 hierarchy) until
/// SIGINT or SIGTERM, then detach.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let (policy, compiled) = load_policy(opts.policy.as_deref())?;
    let cgroup = match opts.cgroup {
        Some(c) => c,
        None => cgroup::cgroup2_root()?,
    };
    let mut dp = Datapath::load(&compiled).context("loading the datapath")?;
    let ring = dp.take_events()?;
    let sink = event_sink(opts.events.as_deref(), Box::new(tokio::io::stdout())).await?;
    let mut stream = EventStream::new(ring, compiled.clone(), sink)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    dp.attach(&cgroup)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    info!(
        policy = %policy.source,
        cgroup = %cgroup.display(),
        mode = %policy.mode,
        default = %policy.default,
        services = compiled.services,
        blocks = compiled.blocks,
        prefixes = compiled.prefix_count(),
        "enforcing; SIGINT or SIGTERM detaches"
    );
    loop {
        tokio::select! {
            r = stream.readable() => { r?; stream.drain().await?; }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    stream.drain().await?;
    let stats = dp.stats()?;
    drop(dp);
    info!(
        allowed = stats.allowed,
        denied = stats.denied,
        audited = stats.audited,
        events_lost = stats.events_lost,
        events_written = stream.written(),
        "detached"
    );
    Ok(())
}

pub struct ExecOptions {
    pub policy: Option<PathBuf>,
    pub events: Option<PathBuf>,
    pub command: Vec<String>,
}

/// `egress exec`: runs the command in a fresh child cgroup with the policy attached, and returns
/// the exit code to exit with (the command's, or 128 + the signal that killed it).
pub async fn exec(opts: ExecOptions) -> anyhow::Result<i32> {
    let (program, args) = opts
        .command
        .split_first()
        .context("no command given after `--`")?;
    let (_policy, compiled) = load_policy(opts.policy.as_deref())?;
    let root = cgroup::cgroup2_root()?;
    let mut dp = Datapath::load(&compiled).context("loading the datapath")?;
    let ring = dp.take_events()?;
    let sink = event_sink(opts.events.as_deref(), Box::new(tokio::io::stderr())).await?;
    let mut stream = EventStream::new(ring, compiled, sink)?;
    let cg = ChildCgroup::create(&root, "egress-exec")?;
    dp.attach(cg.path())
        .with_context(|| format!("attaching to cgroup {}", cg.path().display()))?;

    let procs = cg.procs_fd()?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only calls write(2) on an fd opened before fork.
    unsafe {
        cmd.pre_exec(move || cgroup::join_in_child(&procs));
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
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.context("waiting for the command")?,
            r = stream.readable() => { r?; stream.drain().await?; }
            _ = sigint.recv() => forward(pid, libc::SIGINT),
            _ = sigterm.recv() => forward(pid, libc::SIGTERM),
        }
    };
    // The command's last events may still be in the ring buffer.
    stream.drain().await?;
    drop(dp);
    if let Err(e) = cg.remove() {
        warn!(cgroup = %cg.path().display(), error = %e, "could not remove the exec cgroup");
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    })
}

fn forward(pid: Option<u32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, sig) };
    }
}
