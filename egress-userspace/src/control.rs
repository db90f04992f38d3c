//! The long-running commands: `egress run` (attach to a cgroup until signalled) and
//! `egress exec` (run one command in a fresh child cgroup under the policy). Both attach the
//! cgroup hooks and the TC accounting program, stream events, and fold the kernel's flow counters
//! into per-process totals once a second.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use egress_common::{BlockKey, FlowKey};
use tokio::{
    io::AsyncWrite,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    accounting::{Accounting, ProcSource as _, Procfs},
    alerts::{AlertEngine, AlertKey, FlowVerdict},
    cgroup::{self, ChildCgroup},
    ctlsock::{self, BlockInfo, Response, SharedReport, StatsReport},
    datapath::Datapath,
    events::EventStream,
    iface,
    pins::{Pins, State},
    policy::compile::CompiledPolicy,
    policy::{Policy, RuleKind},
    webhook::Webhook,
};

type Sink = Box<dyn AsyncWrite + Unpin + Send>;

/// How often the flow counters are read: alerts fire within this of a threshold being crossed.
const TICK: Duration = Duration::from_millis(250);

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

/// A byte-budget block in force.
struct ActiveBlock {
    key: BlockKey,
    rule: String,
    until: Instant,
    until_wall: SystemTime,
}

/// The datapath, its event stream, the per-process totals and the alert engine of one
/// controller.
struct Controller {
    dp: Datapath,
    stream: EventStream<Sink>,
    acct: Accounting,
    alerts: AlertEngine,
    webhook: Option<Webhook>,
    blocks: HashMap<AlertKey, ActiveBlock>,
    alerts_by_rule: BTreeMap<String, u64>,
    /// Stable Prometheus label assignment.
    folder: crate::metrics::Folder,
    report: SharedReport,
    /// The policy file (None: the embedded default).
    policy_path: Option<PathBuf>,
    policy: Policy,
    compiled: CompiledPolicy,
    applied_at: SystemTime,
    started: Instant,
    /// Where the programs are attached, for `egress status`.
    attached: serde_json::Value,
    /// Hash of a watched policy file that failed to load (reported once, not every poll).
    bad_watch_hash: Option<String>,
    /// Where the state outlives this process (None: `exec`, `run --ephemeral`).
    pins: Option<Pins>,
    cgroup: String,
    socket: String,
    ifaces: Vec<String>,
    /// `egress stop` asked the controller to exit.
    stop_requested: bool,
}

/// CLOCK_BOOTTIME now, in nanoseconds (the datapath's clock for block expiry).
fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel's key for blocking an alert key (only process keys can be blocked).
fn block_key(key: &AlertKey) -> Option<BlockKey> {
    let (tgid, dst) = match key {
        AlertKey::Process(p) => (*p, None),
        AlertKey::ProcessDestination(p, d) => (*p, Some(*d)),
        _ => return None,
    };
    let mut bk = BlockKey {
        tgid,
        ..BlockKey::default()
    };
    match dst {
        Some(IpAddr::V4(v4)) => {
            bk.family = 4;
            bk.addr[..4].copy_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                bk.family = 4;
                bk.addr[..4].copy_from_slice(&v4.octets());
            }
            None => {
                bk.family = 6;
                bk.addr = v6.octets();
            }
        },
        None => {}
    }
    Some(bk)
}

/// The cgroup2 path of a process, from /proc (for alert evidence).
fn cgroup_path_of(pid: Option<u32>) -> String {
    let Some(pid) = pid else { return String::new() };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return String::new();
    };
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return String::new();
    };
    match cgroup::cgroup2_root() {
        Ok(root) => format!("{}{}", root.display(), rel),
        Err(_) => rel.to_string(),
    }
}

impl Controller {
    /// Loads the policy and the datapath. With `pins`, maps (and later links) are pinned there,
    /// and a previous controller's pinned state is adopted as it is (returned `true`).
    async fn new(
        opts: &CommonOptions,
        default_sink: Sink,
        pins: Option<&Pins>,
    ) -> anyhow::Result<(Controller, bool)> {
        let (policy, compiled) = crate::policy::load(opts.policy.as_deref())?;
        let (mut dp, adopted) = match pins {
            Some(p) => Datapath::load_pinned(&compiled, p).context("loading the datapath")?,
            None => (
                Datapath::load(&compiled).context("loading the datapath")?,
                false,
            ),
        };
        let ring = dp.take_events()?;
        let sink = event_sink(opts.events.as_deref(), default_sink).await?;
        let mut stream = EventStream::new(ring, compiled.clone(), policy.hash.clone(), sink)?;
        stream.set_policy(dp.generation(), compiled.clone(), policy.hash.clone());
        let webhook = match &opts.webhook {
            Some(url) => Some(Webhook::start(url.clone(), opts.spool.clone())?),
            None => None,
        };
        let ctl = Controller {
            dp,
            stream,
            acct: Accounting::new(),
            alerts: AlertEngine::new(policy.alerts.clone(), Instant::now()),
            webhook,
            blocks: HashMap::new(),
            alerts_by_rule: BTreeMap::new(),
            folder: crate::metrics::Folder::default(),
            report: Arc::new(Mutex::new(StatsReport::default())),
            policy_path: opts
                .policy
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            policy,
            compiled,
            applied_at: SystemTime::now(),
            started: Instant::now(),
            attached: serde_json::Value::Null,
            bad_watch_hash: None,
            pins: pins.cloned(),
            cgroup: String::new(),
            socket: String::new(),
            ifaces: Vec::new(),
            stop_requested: false,
        };
        Ok((ctl, adopted))
    }

    /// Attaches TC to `ifaces`, or to every interface that is up but loopback when none is given.
    fn attach_tc(&mut self, ifaces: &[String]) -> anyhow::Result<Vec<String>> {
        let ifaces = if ifaces.is_empty() {
            iface::default_ifaces().context("listing interfaces")?
        } else {
            ifaces.to_vec()
        };
        if ifaces.is_empty() {
            warn!("no interface is up besides loopback: TC accounting is not attached");
            return Ok(ifaces);
        }
        self.dp
            .attach_tc(&ifaces)
            .context("attaching the TC egress program")?;
        info!(ifaces = ?ifaces, "TC egress accounting attached");
        Ok(ifaces)
    }

    /// Writes one JSON object to the event stream; a failing sink is logged, never fatal.
    async fn emit_logged<T: serde::Serialize>(&mut self, value: &T) {
        if let Err(e) = self.emit(value).await {
            error!(error = %format!("{e:#}"), "could not write an event");
        }
    }

    /// Writes one JSON object to the event stream.
    async fn emit<T: serde::Serialize>(&mut self, value: &T) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        self.stream.write_line(&line).await
    }

    /// Reads the flow counters into the totals, runs the alert rules, applies and expires
    /// byte-budget blocks, and publishes a fresh report.
    async fn tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let flows = self.dp.flows()?;
        let outcome = {
            let dp = &self.dp;
            // One walk of the socket-owner map per tick at most, and only when needed.
            let owners: std::cell::OnceCell<HashMap<u32, String>> = std::cell::OnceCell::new();
            let owner_comm =
                |tgid: u32| owners.get_or_init(|| dp.owner_comms()).get(&tgid).cloned();
            self.acct.tick(&flows, now, &Procfs, &owner_comm)
        };
        if !outcome.prune.is_empty() {
            self.dp.remove_flows(&outcome.prune)?;
        }
        if !self.alerts.is_empty() && !outcome.deltas.is_empty() {
            let firings = {
                let compiled = &self.compiled;
                let acct = &self.acct;
                let verdict = |k: &FlowKey| {
                    let dst = crate::accounting::flow_addr(k);
                    let e = compiled.evaluate(dst, k.port, k.protocol);
                    let kind = compiled
                        .rule_kinds
                        .get(e.rule_id as usize)
                        .copied()
                        .flatten();
                    FlowVerdict {
                        rule: compiled.rule_name(e.rule_id).to_string(),
                        approved_by_service: e.allow && kind == Some(RuleKind::Service),
                    }
                };
                let info = |tgid: u32| {
                    let i = acct.info(tgid);
                    if i.comm.is_empty() {
                        Procfs.info(tgid).unwrap_or_default()
                    } else {
                        i
                    }
                };
                self.alerts
                    .observe(&outcome.deltas, now, wall, &verdict, &info, &|_| {
                        String::new()
                    })
            };
            for mut f in firings {
                f.event.cgroup_path = cgroup_path_of(f.event.pid);
                *self.alerts_by_rule.entry(f.event.rule.clone()).or_default() += 1;
                if let Some(dur) = f.block_for
                    && let Some(bk) = block_key(&f.key)
                {
                    let rule_id = self.compiled.alert_rule_id(f.alert_index);
                    match self
                        .dp
                        .block(bk, boot_ns() + dur.as_nanos() as u64, rule_id)
                    {
                        Ok(()) => {
                            self.blocks.insert(
                                f.key,
                                ActiveBlock {
                                    key: bk,
                                    rule: f.event.rule.clone(),
                                    until: now + dur,
                                    until_wall: wall + dur,
                                },
                            );
                        }
                        Err(e) => {
                            // The alert still goes out, saying what happened; enforcement of
                            // everything else goes on.
                            error!(key = %f.event.key, error = %e, "could not block: alerting only");
                            f.event.action = "alert".into();
                            f.event.blocked_until = None;
                        }
                    }
                }
                warn!(rule = %f.event.rule, key = %f.event.key, bytes = f.event.bytes_in_window, action = %f.event.action, "high-volume transfer alert");
                self.emit_logged(&f.event).await;
                if let Some(w) = &self.webhook {
                    w.send(serde_json::to_vec(&f.event)?);
                }
                if f.event.action == "block" {
                    let ev = BlockEvent::new(
                        "block",
                        &f.event.key,
                        &f.event.rule,
                        "over budget",
                        f.event.blocked_until.clone(),
                    );
                    self.emit_logged(&ev).await;
                }
            }
        }
        // A block belongs to a process: when it exits, its pid must not pass the block on.
        let gone: Vec<AlertKey> = self
            .blocks
            .keys()
            .filter(|k| k.tgid().is_some_and(|t| !Procfs.alive(t)))
            .copied()
            .collect();
        for k in gone {
            self.lift(&k, "process exited").await?;
        }
        let expired: Vec<AlertKey> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.until <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.lift(&k, "cooldown ended").await?;
        }
        let report = StatsReport {
            series: crate::metrics::MetricSeries::default(),
            generated_at: humantime::format_rfc3339_nanos(wall).to_string(),
            policy: self.policy.source.clone(),
            mode: self.policy.mode.to_string(),
            processes: self.acct.snapshot(),
            counters: self.dp.stats()?,
            denies_by_rule: self.stream.by_rule().clone(),
            alerts_by_rule: self.alerts_by_rule.clone(),
            blocks: self
                .blocks
                .iter()
                .map(|(k, b)| BlockInfo {
                    key: k.text(),
                    rule: b.rule.clone(),
                    until: humantime::format_rfc3339_seconds(b.until_wall).to_string(),
                })
                .collect(),
        };
        let mut report = report;
        report.series = self.folder.fold(&report.processes);
        *self.report.lock().expect("report lock") = report;
        Ok(())
    }

    /// Re-reads the policy (or switches to `path`) and applies it atomically, or with `dry_run`
    /// only describes the change. A policy that does not load is refused with its error and the
    /// policy in force stays untouched.
    async fn reload(&mut self, path: Option<PathBuf>, dry_run: bool) -> anyhow::Result<Response> {
        let path = path.or_else(|| self.policy_path.clone());
        let (policy, compiled) = match crate::policy::load(path.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reload refused; the policy in force is unchanged");
                return Ok(Response::err(format!("{e:#}")));
            }
        };
        let change =
            crate::policy::diff::describe(&self.policy, &self.compiled, &policy, &compiled);
        if dry_run {
            return Ok(Response::ok(change));
        }
        let applied = match self.dp.reload(&compiled) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "reload failed before the switch; the policy in force is unchanged");
                return Ok(Response::err(format!("applying {}: {e}", policy.source)));
            }
        };
        self.stream
            .set_policy(applied.generation, compiled.clone(), policy.hash.clone());
        if self.policy.alerts != policy.alerts {
            self.alerts = AlertEngine::new(policy.alerts.clone(), Instant::now());
        }
        info!(
            policy = %policy.source,
            generation = applied.generation,
            hash = %policy.hash,
            elapsed_ms = applied.elapsed.as_secs_f64() * 1000.0,
            "policy applied"
        );
        let msg = format!(
            "applied generation {} (hash {}) from {} in {:.1} ms\n{}",
            applied.generation,
            policy.hash,
            policy.source,
            applied.elapsed.as_secs_f64() * 1000.0,
            change
        );
        let event = serde_json::json!({
            "ts": humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            "event": "reload",
            "generation": applied.generation,
            "policy_hash": policy.hash,
            "policy": policy.source,
            "elapsed_ms": applied.elapsed.as_secs_f64() * 1000.0,
        });
        self.policy_path = path;
        self.policy = policy;
        self.compiled = compiled;
        self.applied_at = SystemTime::now();
        self.bad_watch_hash = None;
        self.write_state();
        self.emit_logged(&event).await;
        Ok(Response::ok(msg))
    }

    /// `--watch`: reloads when the policy file's content changes (edits, renames, and the
    /// atomic symlink swap Kubernetes does for ConfigMaps all change what the path reads).
    async fn watch_tick(&mut self) -> anyhow::Result<()> {
        let Some(path) = self.policy_path.clone() else {
            return Ok(());
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let hash = crate::policy::content_hash(&text);
        if hash == self.policy.hash || self.bad_watch_hash.as_ref() == Some(&hash) {
            return Ok(());
        }
        let resp = self.reload(Some(path), false).await?;
        if !resp.ok {
            self.bad_watch_hash = Some(hash);
        }
        Ok(())
    }

    /// Records what is applied beside the pins (for restarts and `egress status`).
    fn write_state(&self) {
        let Some(p) = &self.pins else { return };
        let state = State {
            pin_dir: p.dir.display().to_string(),
            cgroup: self.cgroup.clone(),
            ifaces: self.ifaces.clone(),
            policy: self.policy.source.clone(),
            policy_hash: self.policy.hash.clone(),
            generation: self.dp.generation(),
            applied_at: humantime::format_rfc3339_seconds(self.applied_at).to_string(),
            mode: self.policy.mode.to_string(),
            default: self.policy.default.to_string(),
            controller_pid: std::process::id(),
            socket: self.socket.clone(),
        };
        if let Err(e) = p.write_state(&state) {
            warn!(error = %format!("{e:#}"), "could not write the state file");
        }
    }

    /// Controller and enforcement state.
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::json!({
            "controller": {
                "running": true,
                "pid": std::process::id(),
                "uptime_secs": self.started.elapsed().as_secs(),
            },
            "policy": {
                "source": self.policy.source,
                "generation": self.dp.generation(),
                "hash": self.policy.hash,
                "applied_at": humantime::format_rfc3339_seconds(self.applied_at).to_string(),
                "mode": self.policy.mode.to_string(),
                "default": self.policy.default.to_string(),
            },
            "attached": self.attached,
            "links": self.pins.as_ref().map(crate::pins::link_report),
            "counters": self.dp.stats()?,
        }))
    }

    /// A tick whose failure is logged: accounting and alerting must never take enforcement down.
    async fn tick_logged(&mut self) {
        if let Err(e) = self.tick().await {
            error!(error = %format!("{e:#}"), "accounting tick failed");
        }
    }

    /// Lifts a byte-budget block and reports it.
    async fn lift(&mut self, key: &AlertKey, reason: &str) -> anyhow::Result<bool> {
        let Some(b) = self.blocks.remove(key) else {
            return Ok(false);
        };
        self.dp.unblock(&b.key)?;
        info!(key = %key.text(), rule = %b.rule, reason, "byte-budget block lifted");
        self.emit_logged(&BlockEvent::new(
            "unblock",
            &key.text(),
            &b.rule,
            reason,
            None,
        ))
        .await;
        Ok(true)
    }

    /// Acts on a control-socket request that needs the datapath.
    async fn command(&mut self, cmd: ctlsock::Command) -> anyhow::Result<()> {
        let resp = match &cmd.request {
            ctlsock::Request::Unblock { key } => match AlertKey::parse(key) {
                Err(e) => Response::err(e),
                Ok(k) => {
                    if self.lift(&k, "egress unblock").await? {
                        Response::ok(format!("unblocked {}", k.text()))
                    } else {
                        Response::err(format!("no byte-budget block on {}", k.text()))
                    }
                }
            },
            ctlsock::Request::Reload { policy, dry_run } => {
                let path = policy.as_ref().map(PathBuf::from);
                self.reload(path, *dry_run).await?
            }
            ctlsock::Request::Stop => {
                self.stop_requested = true;
                Response::ok("controller exiting")
            }
            ctlsock::Request::Status => Response {
                status: Some(self.status()?),
                ..Response::ok("status")
            },
            ctlsock::Request::Stats => Response::err("stats is answered by the socket server"),
        };
        let _ = cmd.reply.send(resp);
        Ok(())
    }
}

/// A block being set or lifted, in the event stream.
#[derive(Debug, serde::Serialize)]
struct BlockEvent {
    ts: String,
    event: String,
    key: String,
    rule: String,
    reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
}

impl BlockEvent {
    fn new(event: &str, key: &str, rule: &str, reason: &str, until: Option<String>) -> BlockEvent {
        BlockEvent {
            ts: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            event: event.into(),
            key: key.into(),
            rule: rule.into(),
            reason: reason.into(),
            until,
        }
    }
}

/// Options `run` and `exec` share.
pub struct CommonOptions {
    pub policy: Option<PathBuf>,
    pub events: Option<PathBuf>,
    pub ifaces: Vec<String>,
    pub webhook: Option<String>,
    pub spool: PathBuf,
}

pub struct RunOptions {
    pub common: CommonOptions,
    /// Reload when the policy file changes.
    pub watch: bool,
    pub cgroup: Option<PathBuf>,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Where programs, links and maps are pinned.
    pub pin_dir: PathBuf,
    /// Pin nothing and detach on exit.
    pub ephemeral: bool,
}

/// `egress run`: enforce the policy on a cgroup (default: the whole cgroup2 hierarchy). The
/// programs, links and maps are pinned, so enforcement goes on when the controller exits or
/// dies, and a restarted controller adopts them with no gap; `egress stop` turns it off. With
/// `--ephemeral` nothing is pinned and SIGINT/SIGTERM detach.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Signal handlers before anything else: a SIGHUP (a `systemctl reload` right after start)
    // or SIGTERM must never kill a controller that is half set up.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let pins = (!opts.ephemeral).then(|| Pins::new(&opts.pin_dir));
    let _lock = pins.as_ref().map(Pins::lock).transpose()?;
    let root = cgroup::cgroup2_root()?;
    let cgroup = opts.cgroup.clone().unwrap_or_else(|| root.clone());
    if let Some(state) = pins
        .as_ref()
        .filter(|p| p.adoptable())
        .and_then(|p| p.read_state())
        && Path::new(&state.cgroup) != cgroup
    {
        anyhow::bail!(
            "the enforcement pinned under {} is attached to cgroup {}, not {}: `egress stop --pin-dir {}` first, or use another --pin-dir",
            opts.pin_dir.display(),
            state.cgroup,
            cgroup.display(),
            opts.pin_dir.display()
        );
    }
    let (mut ctl, adopted) =
        Controller::new(&opts.common, Box::new(tokio::io::stdout()), pins.as_ref()).await?;
    ctl.cgroup = cgroup.display().to_string();
    ctl.socket = opts.socket.display().to_string();
    // Below the root, TC only touches the sockets of that cgroup's processes.
    if cgroup != root {
        let (id, level) = cgroup::id_and_level(&root, &cgroup)?;
        ctl.dp.set_tc_scope(id, level)?;
    }
    let listener = ctlsock::bind(&opts.socket)?;
    ctl.dp
        .attach(&cgroup)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    let ifaces = ctl.attach_tc(&opts.common.ifaces)?;
    ctl.attached = serde_json::json!({
        "cgroup": cgroup.display().to_string(),
        "hooks": crate::datapath::HOOKS,
        "tc": { "program": crate::datapath::TC_PROGRAM, "ifaces": ifaces },
        "pinned": pins.as_ref().map(|p| p.dir.display().to_string()),
    });
    ctl.ifaces = ifaces;
    if adopted {
        // The pinned counters' history is not new traffic.
        let flows = ctl.dp.flows()?;
        ctl.acct.prime(&flows);
        let pinned_hash = pins
            .as_ref()
            .and_then(|p| p.read_state())
            .map(|s| s.policy_hash);
        info!(generation = ctl.dp.generation(), pinned = %opts.pin_dir.display(), "adopted the pinned enforcement without detaching");
        if pinned_hash.as_deref() != Some(ctl.policy.hash.as_str()) {
            // The policy in force is not this one: switch atomically, as a reload does.
            let resp = ctl.reload(None, false).await?;
            if !resp.ok {
                anyhow::bail!(
                    "applying the policy over the adopted state: {}",
                    resp.error.unwrap_or_default()
                );
            }
        }
    }
    ctl.write_state();
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel(16);
    let server = tokio::spawn(ctlsock::serve(listener, ctl.report.clone(), cmd_tx));
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
        alerts = ctl.policy.alerts.len(),
        socket = %opts.socket.display(),
        "{}",
        match &pins {
            Some(p) => format!("enforcing; pinned under {}: the controller may exit or die, enforcement stays until `egress stop`", p.dir.display()),
            None => "enforcing (ephemeral); SIGINT or SIGTERM detaches".to_string(),
        }
    );
    let mut ticker = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            r = ctl.stream.readable() => { r?; ctl.stream.drain().await?; }
                        _ = ticker.tick() => ctl.tick_logged().await,
            Some(cmd) = cmd_rx.recv() => {
                ctl.command(cmd).await?;
                if ctl.stop_requested {
                    break;
                }
            }
            _ = sighup.recv() => {
                let resp = ctl.reload(None, false).await?;
                info!(ok = resp.ok, "SIGHUP reload: {}", resp.message.or(resp.error).unwrap_or_default().lines().next().unwrap_or(""));
            }
            _ = watch.tick(), if opts.watch => ctl.watch_tick().await?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    ctl.stream.drain_all().await?;
    if let Some(w) = &ctl.webhook {
        w.flush(Duration::from_secs(5)).await;
    }
    let stats = ctl.dp.stats()?;
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    let written = ctl.stream.written();
    let stopped = ctl.stop_requested;
    drop(ctl);
    if let Some(p) = &pins
        && !stopped
    {
        info!(pinned = %p.dir.display(), "controller exiting; kernel enforcement stays active; `egress stop` turns it off");
    }
    info!(
        allowed = stats.allowed,
        denied = stats.denied,
        audited = stats.audited,
        events_lost = stats.events_lost,
        tc_dropped = stats.tc_dropped,
        events_written = written,
        "{}",
        if pins.is_some() {
            "controller stopped"
        } else {
            "detached"
        }
    );
    Ok(())
}

pub struct ExecOptions {
    pub common: CommonOptions,
    pub command: Vec<String>,
    pub report: Option<PathBuf>,
}

/// `egress exec`: runs the command in a fresh child cgroup with the policy attached, and returns
/// the exit code to exit with (the command's, or 128 + the signal that killed it).
pub async fn exec(opts: ExecOptions) -> anyhow::Result<i32> {
    let (program, args) = opts
        .command
        .split_first()
        .context("no command given after `--`")?;
    let (mut ctl, _) = Controller::new(&opts.common, Box::new(tokio::io::stderr()), None).await?;
    let root = cgroup::cgroup2_root()?;
    let cg = ChildCgroup::create(&root, "egress-exec")?;
    let (id, level) = cgroup::id_and_level(&root, cg.path())?;
    ctl.dp.set_tc_scope(id, level)?;
    ctl.dp
        .attach(cg.path())
        .with_context(|| format!("attaching to cgroup {}", cg.path().display()))?;
    ctl.attach_tc(&opts.common.ifaces)?;

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
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, getppid, write, _exit)
    // on an fd opened before fork.
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
                        _ = ticker.tick() => ctl.tick_logged().await,
            _ = sigint.recv() => forward_from_terminal(pid, libc::SIGINT),
            _ = sigquit.recv() => forward_from_terminal(pid, libc::SIGQUIT),
            _ = sigterm.recv() => forward(pid, libc::SIGTERM),
            _ = sighup.recv() => forward(pid, libc::SIGHUP),
        }
    };
    // The command's last events and counters may still be in the kernel.
    ctl.stream.drain_all().await?;
    ctl.tick_logged().await;
    if let Some(path) = &opts.report {
        let report = ctl.report.lock().expect("report lock").clone();
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    if let Some(w) = &ctl.webhook {
        w.flush(Duration::from_secs(5)).await;
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
