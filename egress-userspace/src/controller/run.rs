//! `egress run`: enforce the policy on a cgroup (default: the whole cgroup2 hierarchy). The
//! programs, links and maps are pinned, so enforcement goes on when the controller exits or
//! dies, and a restarted controller adopts them with no gap; `egress stop` turns it off. With
//! `--ephemeral` nothing is pinned and SIGINT/SIGTERM detach.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use super::{Controller, Options, TICK, Target};
use crate::{
    api::{
        Response,
        server::{self, Command},
    },
    datapath::pins::Pins,
    sys::cgroup,
};

pub struct RunOptions {
    pub common: Options,
    /// Reload when the policy file changes.
    pub watch: bool,
    /// The cgroup to enforce on (None: the cgroup2 root).
    pub cgroup: Option<PathBuf>,
    pub socket: PathBuf,
    /// Where programs, links and maps are pinned.
    pub pin_dir: PathBuf,
    /// Pin nothing and detach on exit.
    pub ephemeral: bool,
    /// Enforce on a cgroup namespace's root when the host's hierarchy is out of reach.
    pub allow_non_host_cgroup: bool,
    /// The group whose members may use the control socket for reading and for break-glass
    /// exceptions (`--admin-group`); None: root only.
    pub admin_gid: Option<u32>,
}

/// Refuses to adopt enforcement pinned for another cgroup.
fn check_pinned_cgroup(pins: &Pins, cgroup: &Path) -> anyhow::Result<()> {
    if let Some(state) = pins.adoptable().then(|| pins.read_state()).flatten()
        && Path::new(&state.cgroup) != cgroup
    {
        anyhow::bail!(
            "the enforcement pinned under {dir} is attached to cgroup {}, not {}: `egress stop --pin-dir {dir}` first, or use another --pin-dir",
            state.cgroup,
            cgroup.display(),
            dir = pins.dir.display(),
        );
    }
    Ok(())
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Signal handlers before anything else: a SIGHUP (a `systemctl reload` right after start)
    // or SIGTERM must never kill a controller that is half set up.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // logrotate's postrotate: reopen the events file.
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    let pins = (!opts.ephemeral).then(|| Pins::new(&opts.pin_dir));
    let _lock = pins.as_ref().map(Pins::lock).transpose()?;
    // The host's hierarchy, never a container's own cgroup namespace by accident.
    let root = cgroup::host_cgroup2_root(opts.allow_non_host_cgroup)?.path;
    let cgroup = opts.cgroup.clone().unwrap_or_else(|| root.clone());
    if let Some(p) = &pins {
        check_pinned_cgroup(p, &cgroup)?;
    }
    // Bound before anything is attached: a second controller on this socket fails here.
    let listener = server::bind(&opts.socket, opts.admin_gid)?;
    // The metrics server is up before the datapath: /healthz answers at once, /readyz says 503
    // until the programs are attached and the policy applied (Controller::start returned).
    let (ready, ready_rx) = tokio::sync::watch::channel(false);
    let (text_tx, text_rx) = tokio::sync::watch::channel(String::new());
    let metrics = match opts.common.metrics {
        Some(addr) => {
            let l = crate::metrics::bind(addr).await?;
            Some(tokio::spawn(crate::metrics::serve(l, text_rx, ready_rx)))
        }
        None => None,
    };
    let target = Target {
        root,
        cgroup,
        pins,
        socket: Some(opts.socket.clone()),
        link_pins: None,
    };
    let (mut ctl, metrics_text) =
        Controller::start(&opts.common, target, Box::new(tokio::io::stdout())).await?;
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<Command>(16);
    let server = tokio::spawn(server::serve(
        listener,
        ctl.stats.subscribe(),
        cmd_tx,
        ctl.feed.clone(),
        opts.admin_gid,
    ));
    let forward = metrics_text.map(|mut text| {
        tokio::spawn(async move {
            loop {
                text_tx.send_replace(text.borrow_and_update().clone());
                if text.changed().await.is_err() {
                    break;
                }
            }
        })
    });
    // Ready once the programs are attached and the policy applied; with pod awareness, also
    // once the first list of this node's pods arrived (until then pod selectors hold no pod).
    let pods_synced = |ctl: &Controller| ctl.pods.as_ref().is_none_or(|p| p.read().synced());
    ready.send_replace(pods_synced(&ctl));
    // The service manager's start job completes here (Type=notify / notify-reload): the
    // programs are attached and the policy applied. (Pod awareness only delays /readyz.)
    ctl.notifier.ready(&ctl.status_line());
    let p = &ctl.policy.policy;
    info!(
        policy = %p.source,
        cgroup = %ctl.target.cgroup.display(),
        mode = %p.mode,
        default = %p.default,
        services = p.services().count(),
        blocks = p.blocks().count(),
        alerts = p.alerts.len(),
        socket = %opts.socket.display(),
        "{}",
        match &ctl.target.pins {
            Some(p) => format!("enforcing; pinned under {}: the controller may exit or die, enforcement stays until `egress stop`", p.dir.display()),
            None => "enforcing (ephemeral); SIGINT or SIGTERM detaches".to_string(),
        }
    );
    let mut feed_news = ctl.take_feed_news();
    let mut ticker = tokio::time::interval(TICK);
    let mut learn_rx = ctl.take_learn_rx();
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut pod_tick = tokio::time::interval(super::scopes::POD_TICK);
    pod_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pods_changed = ctl.pods.as_ref().map(|p| p.changed.clone());
    // Pinged from this loop, between the events it serves: a loop that hangs stops pinging, and
    // the service manager restarts the controller (enforcement stays pinned meanwhile).
    let mut watchdog = ctl.notifier.watchdog().map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        // Biased, events last: a flood of denies (each drain takes up to DRAIN_BATCH of them)
        // never delays a reload, a stop or a signal by more than one drain.
        tokio::select! {
            biased;
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => { w.tick().await; }
                    None => std::future::pending().await,
                }
            } => ctl.notifier.ping(),
            _ = ticker.tick() => ctl.tick().await,
            Some(l) = async {
                match learn_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => ctl.learn_request(l),
            Some(cmd) = cmd_rx.recv() => {
                let response = ctl.command(cmd.request, cmd.caller).await;
                let _ = cmd.reply.send(response);
                if ctl.stop_requested {
                    break;
                }
            }
            _ = sighup.recv() => {
                let text = match ctl.reload(None, false, false).await {
                    Response::Done(m) | Response::Refused(m) => m,
                    other => format!("{other:?}"),
                };
                info!("SIGHUP reload: {}", text.lines().next().unwrap_or(""));
            }
            Some(news) = async {
                match feed_news.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => ctl.feed_news(news).await,
            _ = watch.tick() => {
                if opts.watch {
                    ctl.watch_tick().await;
                    ctl.watch_feeds().await;
                }
                // Cgroups named by scopes are followed always, executables with --watch.
                ctl.scope_tick(opts.watch).await;
            }
            _ = pod_tick.tick() => {
                if !*ready.borrow() && pods_synced(&ctl) {
                    info!("this node's pods listed: ready");
                    ready.send_replace(true);
                }
                ctl.pods_tick();
            }
            r = async {
                match pods_changed.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => match r {
                Ok(()) => ctl.pods_tick(),
                // The watch is gone: the tick alone follows the cgroups from here.
                Err(_) => pods_changed = None,
            },
            _ = sigusr1.recv() => ctl.reopen_events().await,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            r = ctl.events.readable() => { r?; ctl.events.drain().await?; }
        }
    }
    ready.send_replace(false);
    ctl.notifier.stopping();
    ctl.finish().await?;
    let stats = ctl.dp.stats()?;
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(f) = forward {
        f.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    let written = ctl.events.written();
    let stopped = ctl.stop_requested;
    let pinned = ctl.target.pins.as_ref().map(|p| p.dir.clone());
    drop(ctl);
    if let Some(dir) = &pinned
        && !stopped
    {
        info!(pinned = %dir.display(), "controller exiting; kernel enforcement stays active; `egress stop` turns it off");
    }
    info!(
        allowed = stats.allowed,
        denied = stats.denied,
        audited = stats.audited,
        events_lost = stats.events_lost,
        tc_dropped = stats.tc_dropped,
        events_written = written,
        "{}",
        if pinned.is_some() {
            "controller stopped"
        } else {
            "detached"
        }
    );
    Ok(())
}
