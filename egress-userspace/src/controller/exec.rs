//! `egress exec`: runs one command in a fresh child cgroup with the policy attached, and exits
//! with its status. Fail-closed: the command dies with egress, and whatever it left behind is
//! killed before the policy is detached.

use std::{os::unix::process::ExitStatusExt as _, path::PathBuf};

use anyhow::Context as _;
use rustix::process::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

use super::{
    Controller, Options, TICK, Target,
    signals::{forward, forward_from_terminal},
};
use crate::sys::cgroup::{self, ChildCgroup};

pub struct ExecOptions {
    pub common: Options,
    pub command: Vec<String>,
    /// Write the command's egress summary (JSON) here when it exits.
    pub report: Option<PathBuf>,
}

/// Returns the exit code to exit with: the command's, 128 + the signal that killed it, 127 if
/// it was not found, 126 if it could not run.
pub async fn exec(opts: ExecOptions) -> anyhow::Result<i32> {
    let (program, args) = opts
        .command
        .split_first()
        .context("no command given after `--`")?;
    // Handlers before anything else: a signal arriving during set-up must neither kill egress
    // half set up nor, once the command runs, leave it unprotected. One that arrives before the
    // command starts is forwarded to it as soon as it does.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigquit = signal(SignalKind::quit())?;
    let root = cgroup::cgroup2_root()?;
    let cg = ChildCgroup::create(&root, "egress-exec")?;
    let target = Target {
        root,
        cgroup: cg.path().to_path_buf(),
        pins: None,
        socket: None,
    };
    let (mut ctl, _) =
        Controller::start(&opts.common, target, Box::new(tokio::io::stderr())).await?;

    let procs = cg.procs_fd()?;
    let parent = rustix::process::getpid();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, getppid, write, _exit)
    // on an fd opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Fail closed: if egress dies (even by SIGKILL), the command dies with it rather than
            // running on without its policy.
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // egress died before the prctl took effect.
            if rustix::process::getppid() != Some(parent) {
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
            r = ctl.events.readable() => { r?; ctl.events.drain().await?; }
            _ = ticker.tick() => ctl.tick().await,
            _ = sigint.recv() => forward_from_terminal(pid, Signal::INT),
            _ = sigquit.recv() => forward_from_terminal(pid, Signal::QUIT),
            _ = sigterm.recv() => forward(pid, Signal::TERM),
            _ = sighup.recv() => forward(pid, Signal::HUP),
        }
    };
    // The command's last events and counters may still be in the kernel.
    ctl.events.drain_all().await?;
    ctl.tick().await;
    if let Some(path) = &opts.report {
        let text = serde_json::to_string_pretty(&**ctl.stats.borrow())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    ctl.finish().await?;
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
