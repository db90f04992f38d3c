//! The controller behind `egress run` and `egress exec`: one [`Controller`] per enforcement,
//! built in one step from a [`Target`] (where it enforces) and [`Options`] (what, and where
//! reports go). Each concern has its file:
//! - `tick.rs`: every 250 ms, the kernel's flow counters become per-process totals, alerts and
//!   the published reports;
//! - `blocks.rs`: byte-budget blocks set, adopted, expired and lifted in the kernel, and the
//!   processes they cover;
//! - `dns_alerts.rs`: the DNS alerts (tunnel detection) the DNS proxy fires, delivered like the
//!   byte alerts, and their blocks lifted;
//! - `reload.rs`: atomic policy reloads (`egress reload`, SIGHUP, `--watch`) and the state kept
//!   beside the pins; `scopes.rs`: following the executables and cgroups scoped entries name;
//! - `adopt.rs`: what a controller that finds enforcement pinned enforces (never less than the
//!   kernel holds unless told);
//! - `run.rs` and `exec.rs`: the two commands' event loops; `learn.rs`: `egress learn` (a
//!   command, a cgroup or the host observed in audit mode, and the policy draft written); `signals.rs`: forwarding signals to
//!   `exec`'s command.
//!
//! The control *socket* (`crate::api`) only carries requests to the controller's loop.

mod adopt;
mod blocks;
mod breakglass;
mod dns_alerts;
mod exec;
mod feeds;
mod learn;
mod names;
mod reload;
mod run;
mod scopes;
mod signals;
mod tick;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{io::AsyncWrite, sync::watch};
use tracing::{error, info, warn};

use self::{adopt::Plan, blocks::Blocks, reload::PolicyInForce};
pub use self::{
    exec::{ExecOptions, exec},
    learn::{LearnOptions, learn},
    names::DnsListen,
    run::{RunOptions, run},
};
use crate::{
    accounting::Accounting,
    alerts::AlertEngine,
    api::{Request, Response},
    datapath::{Capacities, Datapath, pins::Pins},
    events::EventStream,
    metrics,
    report::{Attachment, ControllerInfo, PolicyInfo, StatsReport, StatusReport},
    sys::{cgroup, iface, notify::Notifier},
    webhook::Webhook,
};

/// Where events go.
type Sink = Box<dyn AsyncWrite + Unpin + Send>;

/// How often the flow counters are read: alerts fire within this of a threshold being crossed.
const TICK: Duration = Duration::from_millis(250);

/// Options `run` and `exec` share: what to enforce, and where events and alerts go.
pub struct Options {
    /// Policy file (None: the policy pinned enforcement holds, else the embedded default).
    pub policy: Option<PathBuf>,
    /// Append events here instead of the command's default stream (`-`: the default).
    pub events: Option<PathBuf>,
    /// How events are written.
    pub events_format: crate::events::Format,
    /// Interfaces for TC (empty: every interface that is up but loopback and stacked devices).
    pub ifaces: Vec<String>,
    /// Where alerts (and deny events, if asked) are POSTed.
    pub webhook: Option<crate::webhook::Config>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<std::net::SocketAddr>,
    /// Capacity of the socket-owner map (None: the default for fresh maps, the pinned map's
    /// when adopting).
    pub owners_capacity: Option<u32>,
    /// IPv4 prefixes the range table has room for (None: the default, or what is pinned).
    pub prefix_capacity: Option<u32>,
    /// Pod awareness (`run --kubernetes`).
    pub kube: Option<crate::kube::KubeOptions>,
    /// Where the DNS proxy listens, while the policy uses names.
    pub dns_listen: names::DnsListen,
    /// Speak the service manager's notification protocol when `$NOTIFY_SOCKET` is set (`run`):
    /// RELOADING=1 / READY=1 around reloads, STATUS=, watchdog pings.
    pub notify: bool,
    /// The kernel's debug line per decision, forwarded to the log (target `egress_ebpf`, debug):
    /// `--kernel-log`, or a RUST_LOG that enables it. Fixed at load.
    pub kernel_log: bool,
    /// Where the last good copy of every blocklist's feed is kept (`--feed-cache`).
    pub feed_cache: PathBuf,
    /// Bytes of the deny/audit event ring (None: the object's 1 MiB). A power of two, a
    /// multiple of the page size; fresh loads only (`learn` asks for more: it must see every
    /// call).
    pub events_ring: Option<u32>,
    /// The longest break-glass exception (`egress allow --for`) granted (`--max-exception`).
    pub max_exception: Duration,
}

/// Where a controller enforces.
pub struct Target {
    /// The cgroup2 root of this host.
    pub root: PathBuf,
    /// The cgroup the hooks attach to (the root: the whole host).
    pub cgroup: PathBuf,
    /// Where maps and links outlive the controller (None: `exec`, `run --ephemeral`).
    pub pins: Option<Pins>,
    /// The control socket, when the controller serves one (recorded for `egress status`).
    pub socket: Option<PathBuf>,
    /// Pin only the links here (`exec`): if the controller dies, the cgroup stays enforced for
    /// whatever is left in it; the next `exec` removes them once the cgroup is empty.
    pub link_pins: Option<Pins>,
}

/// One enforcement: the datapath, its event stream, the per-process totals, alerts and blocks,
/// and the policy in force.
pub struct Controller {
    dp: Datapath,
    events: EventStream<Sink>,
    acct: Accounting,
    alerts: AlertEngine,
    alerts_by_rule: BTreeMap<String, u64>,
    webhook: Option<Webhook>,
    /// Alerts sent to the webhook without a block, to resolve when their cooldown ends: (alert
    /// rule, key) to (fired at, RFC 3339; cooldown end).
    open_alerts: BTreeMap<(String, String), (String, Instant)>,
    /// The events file (`--events FILE`), reopened on SIGUSR1.
    events_path: Option<PathBuf>,
    blocks: Blocks,
    policy: PolicyInForce,
    target: Target,
    /// The interfaces TC is attached to.
    ifaces: Vec<String>,
    /// No `--iface` was given: TC follows the default interfaces as they come and go.
    follow_ifaces: bool,
    /// Ticks since the interfaces were last looked at.
    ticks_since_ifaces: u32,
    /// The latest stats report, for the control socket and `exec --report`.
    stats: watch::Sender<Arc<StatsReport>>,
    metrics: Option<metrics::Exporter>,
    started: Instant,
    /// The fetchers of the policy's `url` feeds.
    fetchers: feeds::Fetchers,
    /// What they report, until the event loop takes it ([`Controller::take_feed_news`]).
    feed_news: Option<tokio::sync::mpsc::Receiver<feeds::FeedNews>>,
    /// The `file` feeds' sizes and times as the policy in force read them (`--watch`).
    feed_stamps: Vec<Option<(u64, std::time::SystemTime)>>,
    /// `egress stop` asked the controller to exit.
    stop_requested: bool,
    /// What the scope watch last warned about (logged once, not every second).
    scope_warned: Option<String>,
    /// The scope tables last written with this node's pods (pod selectors), if any.
    pod_scopes_applied: Option<crate::policy::scopes::CompiledScopes>,
    /// The DNS proxy, while the policy uses names.
    names: Option<names::Names>,
    /// Where it listens.
    dns_listen: names::DnsListen,
    /// Ticks so far.
    ticks: u32,
    /// This node's pods (`--kubernetes`).
    pods: Option<crate::kube::Pods>,
    /// Bytes per pod, for `stats` and the metrics.
    pod_acct: crate::kube::PodAccounting,
    /// The service manager (systemd), when one listens.
    notifier: Notifier,
    /// How the last reload went, for the metrics.
    last_reload: LastReload,
    /// How full the bounded maps were at the last count, and the links' state (metrics only).
    map_fill: Vec<crate::datapath::MapFill>,
    /// The recent events and their followers (`egress events`).
    feed: Arc<crate::feed::Feed>,
    /// Break-glass exceptions in force (`egress allow`).
    breakglass: breakglass::BreakGlass,
}

/// The outcome of the last reload (at start: the policy applied then), as Prometheus' own
/// `*_config_last_reload_*` series say it.
#[derive(Debug, Clone, Copy)]
struct LastReload {
    successful: bool,
    /// When a policy was last applied successfully.
    success_at: std::time::SystemTime,
}

impl Controller {
    /// Loads the policy and the datapath (adopting pinned state when `target.pins` holds some,
    /// and switching it atomically to `opts.policy` if that is given and another is in force
    /// there), attaches the hooks to the target cgroup and TC to the interfaces, records the state
    /// beside the pins, and starts the webhook and the metrics exporter. On return the controller
    /// enforces.
    ///
    /// Without `opts.policy`, adopted enforcement keeps its policy: the recorded file if it still
    /// has the recorded hash, else what the kernel holds (see `adopt.rs`). The embedded default
    /// is only ever loaded when nothing is pinned.
    pub async fn start(
        opts: &Options,
        target: Target,
        default_sink: Sink,
    ) -> anyhow::Result<(Controller, Option<watch::Receiver<String>>)> {
        // Every policy this controller loads reads its blocklists through this cache; a `url`
        // feed with no copy yet gets one chance to be fetched before the first load.
        feeds::set_cache(opts.feed_cache.clone());
        if let Some(p) = &opts.policy {
            feeds::prefetch(p).await;
        }
        let plan = Plan::new(opts.policy.as_deref(), target.pins.as_ref())?;
        // Its secret and header files are read before anything in the kernel changes: a missing
        // or unsafe one stops the start with nothing attached.
        let webhook = match &opts.webhook {
            Some(cfg) => Some(Webhook::start(cfg.clone()).context("starting the webhook")?),
            None => None,
        };
        // Restarting over pins whose steering points at the DNS proxy: the proxy comes back
        // first, on the pinned maps, so that names resolve again before the programs are loaded
        // and verified (seconds). Nothing in the kernel changes until the datapath is loaded.
        let early_names = match (&target.pins, plan.fresh_loaded()) {
            (Some(p), Some(l)) if p.adoptable() && l.policy.uses_names() => {
                match crate::datapath::DnsMaps::from_pins(p) {
                    Ok(maps) => names::Names::spawn(maps, &l.policy, &l.compiled, &opts.dns_listen)
                        .await
                        .ok(),
                    Err(_) => None,
                }
            }
            _ => None,
        };
        // Started first and in the background: the pod list arrives while the datapath loads,
        // and enforcement never waits for (or depends on) the API server.
        let pods = opts
            .kube
            .as_ref()
            .map(|k| crate::kube::Pods::spawn(k, &target.root));
        let sizes = Capacities {
            owners: opts.owners_capacity,
            prefixes: opts.prefix_capacity,
            kernel_log: opts.kernel_log,
            events_ring: opts.events_ring,
        };
        let (mut dp, adopted) = match &target.pins {
            Some(p) => {
                Datapath::load_pinned(plan.fresh(), p, sizes).context("loading the datapath")?
            }
            None => {
                let policy = plan.fresh().context("no policy to load")?;
                (
                    Datapath::load_capacities(policy, sizes).context("loading the datapath")?,
                    false,
                )
            }
        };
        if let Some(p) = &target.link_pins {
            dp.pin_links_under(p.clone())?;
        }
        // Read for as long as the runtime runs; the programs keep writing until detached.
        if let Some(log) = dp.take_kernel_log() {
            tokio::spawn(async move {
                if let Err(e) = log.forward().await {
                    tracing::warn!("reading the kernel's log ring stopped: {e}");
                }
            });
        }
        let (in_force, switch_to) = plan.resolve(adopted, &dp.config())?;
        let ring = dp.take_events()?.watch()?;
        let sink = event_sink(opts.events.as_deref(), default_sink).await?;
        // Events the adopted generation decided while no controller ran are named by its policy
        // (registered before any switch), never by the one this controller brings.
        let mut events = EventStream::new(
            ring,
            dp.generation(),
            in_force.rule_names(),
            in_force.policy.hash.clone(),
            sink,
        );
        events.set_pods(pods.clone());
        events.set_format(opts.events_format);
        events.set_webhook(webhook.as_ref().and_then(Webhook::deny_feed));
        let feed = crate::feed::Feed::new();
        events.set_feed(Some(feed.clone()));
        // Below the root, TC only touches the sockets of that cgroup's processes.
        if target.cgroup != target.root {
            let (id, level) = cgroup::id_and_level(&target.root, &target.cgroup)?;
            dp.set_tc_scope(id, level)?;
        }
        dp.attach(&target.cgroup)
            .with_context(|| format!("attaching to cgroup {}", target.cgroup.display()))?;
        let ifaces = attach_tc(&mut dp, &opts.ifaces)?;
        let (metrics, metrics_text) = match opts.metrics {
            Some(_) => {
                let (exporter, text) = metrics::Exporter::new();
                (Some(exporter), Some(text))
            }
            None => (None, None),
        };
        let (fetchers, feed_news) = feeds::Fetchers::new();
        // Break-glass exceptions are recorded beside the pins' state (an ephemeral run keeps
        // them in memory, as its maps).
        let breakglass = breakglass::BreakGlass::new(
            target
                .pins
                .as_ref()
                .map(|p| crate::exceptions::file_for(&p.state_path())),
            opts.max_exception,
        );
        let mut acct = Accounting::new();
        if adopted {
            // The pinned counters' history is not new traffic (nor a reason to alert).
            acct.prime(&dp.flows()?);
        }
        let mut ctl = Controller {
            alerts: AlertEngine::new(in_force.policy.alerts.clone(), Instant::now()),
            policy: in_force,
            dp,
            events,
            acct,
            alerts_by_rule: BTreeMap::new(),
            webhook,
            open_alerts: BTreeMap::new(),
            events_path: opts
                .events
                .clone()
                .filter(|p| p.as_path() != Path::new("-")),
            blocks: Blocks::default(),
            target,
            ifaces,
            follow_ifaces: opts.ifaces.is_empty(),
            ticks_since_ifaces: 0,
            stats: watch::Sender::new(Arc::new(StatsReport::default())),
            metrics,
            started: Instant::now(),
            stop_requested: false,
            scope_warned: None,
            pod_scopes_applied: None,
            names: early_names,
            dns_listen: opts.dns_listen.clone(),
            ticks: 0,
            pods,
            pod_acct: crate::kube::PodAccounting::default(),
            notifier: if opts.notify {
                Notifier::from_env()
            } else {
                Notifier::disabled()
            },
            last_reload: LastReload {
                successful: true,
                success_at: std::time::SystemTime::now(),
            },
            map_fill: Vec::new(),
            feed,
            fetchers,
            feed_news: Some(feed_news),
            feed_stamps: Vec::new(),
            breakglass,
        };
        if adopted {
            info!(
                generation = ctl.dp.generation(),
                policy = %ctl.policy.policy.source,
                hash = %ctl.policy.policy.hash,
                "adopted the pinned enforcement without detaching"
            );
            // Named by the adopted generation's policy, before any switch.
            ctl.adopt_blocks();
        }
        if let Some(requested) = switch_to {
            ctl.apply_over_adopted(requested).await?;
        }
        ctl.adopt_exceptions().await;
        ctl.follow_names().await?;
        ctl.follow_feeds();
        ctl.write_state();
        Ok((ctl, metrics_text))
    }

    /// Fetches the `url` feeds of the policy in force, follows its `file` feeds, and says which
    /// blocklists have no copy at all.
    fn follow_feeds(&mut self) {
        self.fetchers.follow(&self.policy.policy);
        self.feed_stamps = feeds::file_stamps(&self.policy.policy);
        for w in &self.policy.policy.warnings {
            if w.contains(": blocklist ") {
                warn!("{w}");
            }
        }
    }

    /// The fetchers' reports, for the event loop (once).
    fn take_feed_news(&mut self) -> Option<tokio::sync::mpsc::Receiver<feeds::FeedNews>> {
        self.feed_news.take()
    }

    /// Reopens the events file (SIGUSR1): after logrotate renamed it, events go to a new file at
    /// the same path (created 0600). Without `--events FILE` there is nothing to reopen. If the
    /// file cannot be opened, events go on to the old one.
    pub(super) async fn reopen_events(&mut self) {
        let Some(path) = self.events_path.clone() else {
            info!("SIGUSR1: events go to a stream, not a file: nothing to reopen");
            return;
        };
        match crate::events::open_file(&path).await {
            Ok(f) => match self.events.replace_out(Box::new(f)).await {
                Ok(_old) => info!(events = %path.display(), "SIGUSR1: events file reopened"),
                Err(e) => warn!(error = %e, "flushing the events file before reopening it"),
            },
            Err(e) => {
                error!(error = %format!("{e:#}"), "SIGUSR1: could not reopen the events file; events go on to the old one")
            }
        }
    }

    /// Writes one of the controller's events; a failing sink is logged, never fatal.
    async fn emit<T: crate::events::EventLine>(&mut self, event: &T) {
        if let Err(e) = self.events.emit(event).await {
            error!(error = %format!("{e:#}"), "could not write an event");
        }
    }

    /// One line for the service manager's `STATUS=` (`systemctl status egress`).
    fn status_line(&self) -> String {
        let p = &self.policy.policy;
        let mut line = format!(
            "enforcing generation {} (hash {}) of {} in {} mode",
            self.dp.generation(),
            p.hash,
            p.source,
            p.mode
        );
        if !self.last_reload.successful {
            line.push_str("; the last reload was refused (see the log)");
        }
        line
    }

    /// Controller and enforcement state, for `egress status`.
    fn status(&self) -> anyhow::Result<StatusReport> {
        let p = &self.policy.policy;
        let counters = self.dp.stats()?;
        Ok(StatusReport {
            controller: ControllerInfo {
                running: true,
                pid: Some(std::process::id()),
                uptime_secs: Some(self.started.elapsed().as_secs()),
                last_pid: None,
            },
            policy: PolicyInfo {
                source: p.source.clone(),
                generation: self.dp.generation(),
                hash: p.hash.clone(),
                applied_at: humantime::format_rfc3339_seconds(self.policy.applied_at).to_string(),
                mode: p.mode.to_string(),
                default: p.default.to_string(),
            },
            attached: self.attachment(),
            links: self.target.pins.as_ref().map(Pins::link_statuses),
            counters,
            dns: self
                .names
                .as_ref()
                .map(|n| n.status(counters.dns_steered, true)),
            feeds: self.feed_statuses(),
            exceptions: self.exception_rows(),
            kernel: Some(crate::datapath::features::kernel_status()),
        })
    }

    fn attachment(&self) -> Attachment {
        Attachment::new(
            self.target.cgroup.display().to_string(),
            self.ifaces.clone(),
            self.target
                .pins
                .as_ref()
                .map(|p| p.dir.display().to_string()),
        )
    }

    /// Acts on a control-socket request.
    async fn command(&mut self, request: Request, caller: crate::api::server::Caller) -> Response {
        match request {
            Request::Unblock { key } => match crate::dns::tunnel::DnsBlockKey::parse(&key) {
                Some(Ok(k)) => self.unblock_dns(k).await,
                Some(Err(e)) => Response::Refused(e),
                None => self.unblock_request(&key).await,
            },
            Request::Allow {
                dest,
                port,
                protocol,
                pid,
                cgroup,
                user,
                for_secs,
                reason,
            } => {
                let r = breakglass::AllowRequest {
                    dest,
                    port,
                    protocol,
                    pid,
                    cgroup,
                    user,
                    for_secs,
                    reason,
                };
                self.allow_request(r, caller).await
            }
            Request::Revoke { id } => self.revoke_request(id, caller).await,
            Request::Exceptions => Response::Exceptions(self.exception_rows()),
            Request::Reload {
                policy,
                dry_run,
                detail,
            } => {
                self.reload(policy.map(PathBuf::from), dry_run, detail)
                    .await
            }
            Request::Policy => self.policy_text(),
            // Streamed by the socket server from the feed.
            Request::Events { .. } => {
                Response::Refused("events are answered by the control socket's server".into())
            }
            Request::Stop => {
                self.stop_requested = true;
                Response::Done("controller exiting".into())
            }
            Request::Status => match self.status() {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => Response::Refused(format!("reading the datapath: {e:#}")),
            },
            Request::Grants { all } => match self.grant_rows(all) {
                Ok(rows) => Response::Grants(rows),
                Err(e) => Response::Refused(format!("reading the grants: {e:#}")),
            },
            // Answered by the socket server from the published report.
            Request::Stats => Response::Stats(Box::new(StatsReport::clone(&self.stats.borrow()))),
        }
    }

    /// Flushes what is in flight at exit: the last events and alerts.
    async fn finish(&mut self) -> anyhow::Result<()> {
        self.deliver_names().await;
        self.events.drain_all().await?;
        if let Some(w) = &self.webhook {
            w.flush(Duration::from_secs(5)).await;
        }
        Ok(())
    }
}

/// Where events go: `--events FILE` (appended), else the given default stream.
async fn event_sink(path: Option<&Path>, default: Sink) -> anyhow::Result<Sink> {
    match path {
        None => Ok(default),
        Some(p) if p == Path::new("-") => Ok(default),
        Some(p) => Ok(Box::new(crate::events::open_file(p).await?)),
    }
}

/// Attaches TC to `ifaces`, or to the default interfaces when none is given; returns where.
fn attach_tc(dp: &mut Datapath, ifaces: &[String]) -> anyhow::Result<Vec<String>> {
    let ifaces = if ifaces.is_empty() {
        iface::default_ifaces().context("listing interfaces")?
    } else {
        ifaces.to_vec()
    };
    if ifaces.is_empty() {
        warn!("no interface is up besides loopback: TC accounting is not attached");
        return Ok(ifaces);
    }
    dp.attach_tc(&ifaces)
        .context("attaching the TC egress program")?;
    info!(ifaces = ?ifaces, "TC egress accounting attached");
    Ok(ifaces)
}
