//! `egress exec`: runs one command in a fresh child cgroup with the policy attached, and exits
//! with its status. Fail-closed: the command dies with egress, and whatever it left behind is
//! killed before the policy is detached.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use rustix::process::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

use super::{
    Controller, Options, TICK, Target,
    signals::{forward, forward_from_terminal},
};
use crate::{
    datapath::pins::Pins,
    sys::{
        cgroup::{self, ChildCgroup},
        proc::{ProcSource as _, Procfs},
    },
};

/// Where exec cgroups are made (under the cgroup2 root), and their link pins (under bpffs).
pub(super) const EXEC_PREFIX: &str = "egress-exec";
const EXEC_PINS: &str = "/sys/fs/bpf/egress-exec";

/// The pin directory of the links of exec cgroup `cgroup`.
fn exec_pin_dir(cgroup: &Path) -> PathBuf {
    Path::new(EXEC_PINS).join(cgroup.file_name().unwrap_or_default())
}

/// Fail-closed cleanup: an `egress exec` that died (even by SIGKILL) left its links pinned, so
/// whatever its command left behind stays enforced. Once that cgroup is empty (and its exec is
/// gone), the pins and the cgroup are removed here, by the next exec.
pub(super) fn remove_stale(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(EXEC_PINS) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if ChildCgroup::creator(&name, EXEC_PREFIX).is_some_and(|p| Procfs.alive(p)) {
                continue;
            }
            let cgroup = root.join(&name);
            if cgroup::populated(&cgroup) {
                continue;
            }
            let pins = Pins::new(e.path());
            match pins.remove_all() {
                Ok(_) => {
                    let _ = std::fs::remove_dir(&cgroup);
                    tracing::info!(cgroup = %cgroup.display(), "removed what a dead egress exec left enforced");
                }
                Err(err) => {
                    warn!(pins = %pins.dir.display(), error = %format!("{err:#}"), "could not remove a dead exec's pins")
                }
            }
        }
    }
    // An exec killed before it pinned anything (during its start) leaves only its cgroup: empty,
    // unenforced, its creator dead. Its pins, if any, were handled above.
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(creator) = ChildCgroup::creator(&name, EXEC_PREFIX) else {
            continue;
        };
        let cgroup = e.path();
        if Procfs.alive(creator)
            || cgroup::populated(&cgroup)
            || Path::new(EXEC_PINS).join(&name).exists()
        {
            continue;
        }
        if std::fs::remove_dir(&cgroup).is_ok() {
            tracing::info!(cgroup = %cgroup.display(), "removed the empty cgroup of a dead egress exec");
        }
    }
}

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
    // Not forwarded: egress's own, as for `run` (reopen the events file).
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    let root = cgroup::cgroup2_root()?;
    remove_stale(&root);
    let cg = ChildCgroup::create(&root, EXEC_PREFIX)?;
    let link_pins = Pins::new(exec_pin_dir(cg.path()));
    let target = Target {
        root,
        cgroup: cg.path().to_path_buf(),
        pins: None,
        socket: None,
        link_pins: Some(link_pins.clone()),
    };
    let (mut ctl, _) =
        Controller::start(&opts.common, target, Box::new(tokio::io::stderr())).await?;

    let procs = cg.procs_fd()?;
    withhold_inherited_sockets();
    let drop_net_raw = withholds_net_raw(&ctl.policy.policy);
    if drop_net_raw {
        tracing::info!("raw and packet sockets are denied: the command runs without CAP_NET_RAW");
    }
    let mut child = match spawn_in(program, args, procs, drop_net_raw) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let pid = child.id();
    let mut feed_news = ctl.take_feed_news();
    let mut ticker = tokio::time::interval(TICK);
    let status = loop {
        // Biased, events last: a flood of denies never delays a signal by more than one drain.
        tokio::select! {
            biased;
            st = child.wait() => break st.context("waiting for the command")?,
            _ = sigint.recv() => forward_from_terminal(pid, Signal::INT),
            _ = sigquit.recv() => forward_from_terminal(pid, Signal::QUIT),
            _ = sigterm.recv() => forward(pid, Signal::TERM),
            _ = sighup.recv() => forward(pid, Signal::HUP),
            _ = sigusr1.recv() => ctl.reopen_events().await,
            Some(news) = async {
                match feed_news.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => ctl.feed_news(news).await,
            _ = ticker.tick() => ctl.tick().await,
            r = ctl.events.readable() => { r?; ctl.events.drain().await?; }
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
    if let Err(e) = link_pins.remove_all() {
        warn!(pins = %link_pins.dir.display(), error = %format!("{e:#}"), "could not remove the exec link pins");
    }
    // The parent goes too once no exec has pins there.
    let _ = std::fs::remove_dir(EXEC_PINS);
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

/// Starts `program` in the cgroup whose `cgroup.procs` is `procs` (joined before exec, so its
/// first instruction already runs there), killed if egress dies, without `CAP_NET_RAW` when
/// asked. Err: the exit code to exit with (127 not found, 126 cannot run), logged.
pub(super) fn spawn_in(
    program: &str,
    args: &[String],
    procs: std::os::fd::OwnedFd,
    drop_net_raw: bool,
) -> Result<tokio::process::Child, i32> {
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
            if drop_net_raw {
                drop_cap_net_raw()?;
            }
            cgroup::join_in_child(&procs)
        });
    }
    cmd.spawn().map_err(|e| {
        tracing::error!(command = %program, error = %e, "cannot run the command");
        if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    })
}

/// Whether the command runs without `CAP_NET_RAW`: an enforced policy that denies both raw and
/// `AF_PACKET` sockets. The sock_create hook refuses raw sockets and TC judges packet sockets'
/// frames, but a packet socket with `PACKET_QDISC_BYPASS` skips TC and no cgroup hook sees it;
/// without the capability neither kind can be opened (ping sockets need none).
fn withholds_net_raw(policy: &crate::policy::Policy) -> bool {
    use crate::policy::{Mode, SocketRule};
    policy.mode == Mode::Enforce
        && policy.sockets.raw == SocketRule::Deny
        && policy.sockets.packet == SocketRule::Deny
}

/// Removes `CAP_NET_RAW` from the calling process for good: bounding set (no setuid binary or
/// file capability brings it back), ambient, effective, permitted and inheritable sets. Only
/// prctl/capget/capset: async-signal-safe, for `pre_exec`.
fn drop_cap_net_raw() -> std::io::Result<()> {
    use rustix::thread::{
        CapabilitySet, capabilities, configure_capability_in_ambient_set,
        remove_capability_from_bounding_set, set_capabilities,
    };
    remove_capability_from_bounding_set(CapabilitySet::NET_RAW)?;
    configure_capability_in_ambient_set(CapabilitySet::NET_RAW, false)?;
    let mut sets = capabilities(None)?;
    sets.effective.remove(CapabilitySet::NET_RAW);
    sets.permitted.remove(CapabilitySet::NET_RAW);
    sets.inheritable.remove(CapabilitySet::NET_RAW);
    set_capabilities(None, sets)?;
    Ok(())
}

/// Marks close-on-exec every IPv4/IPv6 socket egress inherited above stdio, so the command does
/// not get them: a socket is judged by the cgroup it was created in, and one made outside the
/// command's cgroup would carry its traffic past the policy. Standard input, output and error
/// stay as they are (an inetd-style connection is the command's own channel). Files, pipes and
/// Unix sockets pass as before.
pub(super) fn withhold_inherited_sockets() {
    use rustix::{
        fd::BorrowedFd,
        io::{FdFlags, fcntl_getfd, fcntl_setfd},
        net::{AddressFamily, sockopt::socket_domain},
    };
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!("cannot list /proc/self/fd: inherited sockets are not checked");
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for raw in fds {
        // SAFETY: the fd was open a moment ago and nothing in this thread closes it meanwhile;
        // one that closed (the directory's own) fails the calls below harmlessly.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let Ok(flags) = fcntl_getfd(fd) else { continue };
        if flags.contains(FdFlags::CLOEXEC) {
            continue;
        }
        let Ok(domain) = socket_domain(fd) else {
            continue;
        };
        if domain == AddressFamily::INET || domain == AddressFamily::INET6 {
            match fcntl_setfd(fd, flags | FdFlags::CLOEXEC) {
                Ok(()) => tracing::warn!(
                    fd = raw,
                    "an inherited IP socket is not passed to the command: it was made outside \
                     the enforced cgroup"
                ),
                Err(e) => {
                    tracing::error!(fd = raw, error = %e, "cannot withhold an inherited socket")
                }
            }
        }
    }
}
