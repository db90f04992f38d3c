//! The `egress` command line: clap definitions and dispatch (`mod.rs`), the policy commands
//! `check` and `explain` (`policy_cmds.rs`), the `top` screen (`top.rs`) and every human-readable
//! view of a report (`display.rs`). `--json` prints the typed reports as they are.

mod display;
mod policy_cmds;
mod top;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::{
    api::{self, Request, client},
    controller::{self, DnsListen, ExecOptions, Options, RunOptions},
    datapath::pins::{self, Pins},
    events::Format as EventsFormat,
    exit,
    policy::Protocol,
    report::StatusReport,
    webhook,
};

/// Kernel-enforced egress firewall: approved-services policy on the cgroup connect/sendmsg hooks.
#[derive(Parser, Debug)]
#[command(name = "egress", version, about)]
struct Cli {
    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Where the host's /proc is. In a container, mount the host's /proc there (a DaemonSet
    /// mounts it at /host/proc): the host's cgroup2 hierarchy is then found through
    /// DIR/1/root/sys/fs/cgroup when no cgroup2 mount visible here is the hierarchy's root, and
    /// DIR/1/ns/cgroup tells whether this process shares the host's cgroup namespace.
    #[arg(long, value_name = "DIR", default_value = crate::sys::cgroup::DEFAULT_HOST_PROC, global = true)]
    host_proc: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enforce a policy on a cgroup (default: the whole host) until SIGINT/SIGTERM, writing deny,
    /// audit and alert events as JSON lines, and accounting egress bytes per process.
    Run {
        /// Policy file. Default: the policy of the enforcement pinned under --pin-dir (kept as
        /// the kernel holds it if its file changed since); with nothing pinned, the embedded
        /// policies/default.toml (audit mode).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// cgroup2 directory to attach to. Default: the root of the host's cgroup2 hierarchy (a
        /// cgroup2 mount in /proc/mounts that is the hierarchy's root, else
        /// <host-proc>/1/root/sys/fs/cgroup). A cgroup namespace's root (inside a container) is
        /// refused unless --allow-non-host-cgroup.
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
        /// Enforce even when the host's cgroup2 hierarchy cannot be reached and only a cgroup
        /// namespace's root is visible (a container without the host's /proc or cgroup2): only
        /// that subtree is then covered.
        #[arg(long)]
        allow_non_host_cgroup: bool,
        /// Append JSON-lines events to FILE instead of stdout ("-" for stdout). Created with mode
        /// 0600; SIGUSR1 reopens it (logrotate without copytruncate).
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Event line format: `json` (egress's own fields) or `ecs` (Elastic Common Schema; see
        /// docs/EVENTS.md).
        #[arg(long, value_enum, value_name = "FORMAT", default_value_t = EventsFormat::Json)]
        events_format: EventsFormat,
        /// Interface for the TC accounting program (repeatable). Default: every interface that
        /// is up, except loopback.
        #[arg(long = "iface", value_name = "IFACE")]
        ifaces: Vec<String>,
        #[command(flatten)]
        alerting: AlertArgs,
        /// Control socket for `egress stats`, `egress top` and `egress unblock` (root only, mode
        /// 0600).
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9464, with the probes
        /// /healthz (200 while the process serves) and /readyz (200 once the programs are
        /// attached and the policy applied; 503 before, and while stopping).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Reload when the policy file changes (edits, renames, and the symlink swap Kubernetes
        /// does for ConfigMaps), and when an executable a scoped entry names is replaced (a
        /// package upgrade). SIGHUP and `egress reload` reload too. (Cgroups scoped entries name
        /// are followed with or without it.)
        #[arg(long)]
        watch: bool,
        /// bpffs directory where programs' links and maps are pinned, so that enforcement
        /// outlives the controller (bpffs is mounted at /sys/fs/bpf if absent).
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pin nothing: SIGINT/SIGTERM (or a crash) detaches everything.
        #[arg(long)]
        ephemeral: bool,
        /// Room for N socket owners: one per open socket of the enforced cgroup that has
        /// connected or sent (about 100 bytes each, allocated at start). When it is full, a
        /// connect or send that needs a new one fails with EPERM in enforce mode (rule
        /// `owners-full`, counter `owners_full`) rather than go unattributed. Default: 131072.
        /// Over pinned enforcement the pinned size is kept; another size needs `egress stop`.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        owners_capacity: Option<u32>,
        /// Room in the IPv4 range table (the lookup whose cost does not grow with the policy)
        /// for N prefixes: at most 24 bytes each, in each of the two policy buffers, allocated
        /// at start; the starting policy's own need, doubled, when that is more. A policy
        /// reloaded later that does not fit is enforced through the kernel's LPM trie instead
        /// (slower at large sizes; logged, and shown by `egress status`). Default: 262144.
        /// Over pinned enforcement the pinned table's size is kept.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::datapath::MAX_PREFIX_CAPACITY)))]
        prefix_capacity: Option<u32>,
        #[command(flatten)]
        kube: KubeArgs,
        /// Where the DNS proxy listens while the policy uses names: ADDR or ADDR:PORT ([ADDR]:PORT
        /// for IPv6), one IPv4 and at most one IPv6 (repeat the flag). Without a port: 53, or a
        /// free port when 53 is taken. Default: 127.0.0.153 and ::1, reached from this network
        /// namespace only. On addresses other than loopback (a node address every pod routes
        /// to), the DNS of sockets in every network namespace is steered there (those of other
        /// namespaces get answers, but no grants yet: see README, Names).
        #[arg(long = "dns-listen", value_name = "ADDR[:PORT]")]
        dns_listen: Vec<String>,
    },
    /// Run CMD in a fresh child cgroup with the policy enforced; exit with CMD's status. Events go
    /// to stderr unless --events is given.
    Exec {
        /// Policy file. Default: the embedded policies/default.toml (audit mode).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Append JSON-lines events to FILE instead of stderr ("-" for stderr). Created with mode
        /// 0600; SIGUSR1 reopens it.
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Event line format: `json` (egress's own fields) or `ecs` (Elastic Common Schema; see
        /// docs/EVENTS.md).
        #[arg(long, value_enum, value_name = "FORMAT", default_value_t = EventsFormat::Json)]
        events_format: EventsFormat,
        /// Interface for the TC accounting program (repeatable). Default: every interface that
        /// is up, except loopback. TC only touches the command's own traffic.
        #[arg(long = "iface", value_name = "IFACE")]
        ifaces: Vec<String>,
        #[command(flatten)]
        alerting: AlertArgs,
        /// When the command exits, write its egress summary (per process and destination) as
        /// JSON to FILE.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Room for N socket owners: one per open socket of the enforced cgroup that has
        /// connected or sent (about 100 bytes each, allocated at start). When it is full, a
        /// connect or send that needs a new one fails with EPERM in enforce mode (rule
        /// `owners-full`, counter `owners_full`) rather than go unattributed. Default: 131072.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        owners_capacity: Option<u32>,
        /// Room in the IPv4 range table (the lookup whose cost does not grow with the policy)
        /// for N prefixes: at most 24 bytes each, in each of the two policy buffers, allocated
        /// at start; the starting policy's own need, doubled, when that is more. A policy
        /// reloaded later that does not fit is enforced through the kernel's LPM trie instead
        /// (slower at large sizes; logged, and shown by `egress status`). Default: 262144.
        /// Over pinned enforcement the pinned table's size is kept.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::datapath::MAX_PREFIX_CAPACITY)))]
        prefix_capacity: Option<u32>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Re-read the policy of the running controller (or switch it to FILE) and apply it
    /// atomically. A policy with errors is refused with file:line:field, and the one in force
    /// stays.
    Reload {
        /// Switch to this policy file.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Print what would change (rules and prefixes added and removed) without applying it.
        #[arg(long)]
        dry_run: bool,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Mount bpffs at /sys/fs/bpf unless the pin directory is on one already, and create the pin
    /// directory: what a DaemonSet's privileged init container runs (its mount propagates to the
    /// host), so that the agent's pins outlive its container.
    MountBpffs {
        /// The pin directory `egress run` will use.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Enforcement health, policy generation and hash, mode, counters, controller uptime. Works
    /// without a controller: it then reads the pins.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Pin directory to read when no controller answers.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Turn egress off: detach every pinned program and remove every pin. The one way to stop
    /// enforcement; a controller still running is told to exit.
    Stop {
        /// Pin directory.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Control socket of the running controller, if any.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Lift a byte-budget block (`[[alert]] action = "block"`) before its cooldown ends.
    Unblock {
        /// The alert key, as events print it: process:PID, process_destination:PID->ADDR (a bare
        /// PID means process:PID).
        key: String,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Per-process egress totals (bytes, packets, rate, destinations) from the running controller.
    Stats {
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Live DNS grants: which cgroup may reach which address because it resolved which name,
    /// for which service, until when, and who asked. Without a controller, read from the pins:
    /// addresses, cgroups and expiries (names and who asked are known only to a controller).
    Grants {
        /// Print a JSON array, one object per grant.
        #[arg(long)]
        json: bool,
        /// Also list the names resolved that nothing approves (no grant: their connects are
        /// judged by the address rules; deny events name them in `host`).
        #[arg(long)]
        all: bool,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Pin directory to read when no controller answers.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Live view of the processes sending the most, refreshed in place (q or Ctrl-C quits).
    Top {
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one frame and exit (for scripts and non-terminals).
        #[arg(long)]
        once: bool,
    },
    /// Validate policy files and print a summary of each. Exits 1 if any is invalid.
    Check {
        /// Policy files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the verdict for a destination and the rule that decides it, from the same compiled
    /// entries the kernel gets; or, for a DNS name, which service or block covers it (from the
    /// same name matcher the DNS proxy uses).
    Explain {
        /// Policy file.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Destination address (IPv4 or IPv6, v4-mapped included), or a DNS name such as
        /// api.github.com.
        #[arg(value_name = "DEST|NAME")]
        dest: String,
        /// Destination port. Omitted: the verdict for every port, or the port table when it varies.
        /// Not used with a name (the covering services' ports are printed).
        #[arg(long)]
        port: Option<u16>,
        /// Protocol.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
        protocol: ProtocolArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Control socket of a running controller: for a name, also what it resolves to now in
        /// the live grants (skipped when no controller answers there).
        #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Who calls: see `CallerArgs`. Without any, a caller in none of the policy's scopes.
        #[command(flatten)]
        caller: policy_cmds::CallerArgs,
    },
}

/// Where alerts go besides the event stream.
#[derive(clap::Args, Debug)]
struct AlertArgs {
    /// POST every alert as JSON (in --webhook-format) to URL (retries with backoff; undelivered
    /// alerts are spooled and sent when it is back).
    #[arg(long, value_name = "URL", group = "webhook_target")]
    webhook: Option<String>,
    /// As --webhook, the URL read from FILE (once, at start; it must not be accessible to its
    /// group or others): for URLs that are credentials, as a Slack incoming webhook's is.
    #[arg(
        long,
        value_name = "FILE",
        group = "webhook_target",
        conflicts_with = "webhook"
    )]
    webhook_url_file: Option<PathBuf>,
    /// Directory for alerts (and deny batches) the webhook could not take yet.
    #[arg(long, value_name = "DIR", default_value = webhook::DEFAULT_SPOOL)]
    spool: PathBuf,
    /// The shape of the webhook's requests: `generic` (egress's alert JSON, as before),
    /// `alertmanager` (Alertmanager's v2 API; point --webhook at
    /// http://alertmanager:9093/api/v2/alerts; alerts are resolved when their block is lifted or
    /// their cooldown ends) or `slack` (an incoming webhook's `{"text": ...}`).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = webhook::Format::Generic, requires = "webhook_target")]
    webhook_format: webhook::Format,
    /// A header for every webhook request, "Name: value" (repeatable). The command line is
    /// visible to every user of the host: put credentials in --webhook-header-file.
    #[arg(long = "webhook-header", value_name = "NAME: VALUE", value_parser = webhook::config::parse_header, requires = "webhook_target")]
    webhook_headers: Vec<webhook::Header>,
    /// Headers for every webhook request, one "Name: value" per line (`#` comments), e.g.
    /// `Authorization: Bearer ...`. Read once at start; the file must not be accessible to its
    /// group or others (chmod 600).
    #[arg(long, value_name = "FILE", requires = "webhook_target")]
    webhook_header_file: Option<PathBuf>,
    /// Sign every webhook request: header `X-Egress-Signature: sha256=<hex>`, the HMAC-SHA256 of
    /// the body keyed with this file's content (one trailing newline removed). Read once at
    /// start; the file must not be accessible to its group or others (chmod 600).
    #[arg(long, value_name = "FILE", requires = "webhook_target")]
    webhook_secret_file: Option<PathBuf>,
    /// What the webhook gets, comma-separated: `alert` (alerts, and their resolutions where the
    /// format has them) and `deny` (deny and audit events, batched: at most 100 per 5 s, what is
    /// over is dropped and counted in the next batch's `dropped`).
    #[arg(
        long,
        value_enum,
        value_name = "KINDS",
        value_delimiter = ',',
        default_value = "alert",
        requires = "webhook"
    )]
    webhook_events: Vec<WebhookEvent>,
}

/// What `--webhook-events` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WebhookEvent {
    Alert,
    Deny,
}

impl AlertArgs {
    /// The webhook asked for, or None.
    fn config(self) -> Option<webhook::Config> {
        let url = match (self.webhook, self.webhook_url_file) {
            (Some(url), _) => webhook::Url::Given(url),
            (None, Some(file)) => webhook::Url::File(file),
            (None, None) => return None,
        };
        Some(webhook::Config {
            url,
            spool: self.spool,
            format: self.webhook_format,
            headers: self.webhook_headers,
            header_file: self.webhook_header_file,
            secret_file: self.webhook_secret_file,
            alerts: self.webhook_events.contains(&WebhookEvent::Alert),
            denies: self.webhook_events.contains(&WebhookEvent::Deny),
        })
    }
}

/// Pod awareness on a Kubernetes node.
#[derive(clap::Args, Debug)]
struct KubeArgs {
    /// Watch this node's Pods on the Kubernetes API server and name the pod, container, namespace
    /// and node of events, stats rows, alerts and metrics. On by default when
    /// KUBERNETES_SERVICE_HOST is set (in a pod). Enforcement never depends on it.
    #[arg(long, overrides_with = "no_kubernetes")]
    kubernetes: bool,
    /// No pod awareness, even in a pod.
    #[arg(long)]
    no_kubernetes: bool,
    /// This node's name, for the field selector spec.nodeName. Default: $NODE_NAME (set it from
    /// the downward API, `fieldRef: spec.nodeName`).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Read the API server's address and credentials from this kubeconfig. Default: in-cluster
    /// (the service account's token and CA), else $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Talk to the API server at URL with no credentials (tests, `kubectl proxy`).
    #[arg(long, value_name = "URL", conflicts_with = "kubeconfig")]
    kube_server: Option<String>,
    /// The kubelet's pod cgroup root, relative to the cgroup2 root (kubepods.slice, kubepods,
    /// kubelet.slice/kubelet-kubepods.slice). Default: the first of those that exists.
    #[arg(long, value_name = "DIR")]
    kubernetes_cgroup_root: Option<PathBuf>,
}

impl KubeArgs {
    /// The pod awareness asked for, or None.
    fn options(self) -> anyhow::Result<Option<crate::kube::KubeOptions>> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty());
        if self.no_kubernetes || !(self.kubernetes || in_pod) {
            return Ok(None);
        }
        let node = match self.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
            Some(n) if !n.is_empty() => n,
            _ => anyhow::bail!(
                "pod awareness needs this node's name: --node-name NAME, or NODE_NAME from the downward API (fieldRef: spec.nodeName); --no-kubernetes turns it off"
            ),
        };
        Ok(Some(crate::kube::KubeOptions {
            node,
            api: crate::kube::watch::ApiSource {
                kubeconfig: self.kubeconfig,
                server: self.kube_server,
            },
            cgroup_root: self.kubernetes_cgroup_root,
        }))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Protocol {
        match p {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Icmp => Protocol::Icmp,
            ProtocolArg::Icmpv6 => Protocol::Icmpv6,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd (stderr is the journal, and the journal's socket answers): native journal
    // records, each with its priority (ERROR 3, WARN 4, INFO 5, DEBUG 6, TRACE 7), so that
    // `journalctl -p warning -u egress` selects by level. Else text or JSON lines on stderr.
    if crate::sys::journal::stderr_is_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        use tracing_subscriber::prelude::*;
        tracing_subscriber::registry()
            .with(filter)
            .with(journal.with_syslog_identifier("egress".into()))
            .init();
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The `egress` binary's entry point.
/// Exit codes: see [`crate::exit`] (78 for a configuration error).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::code_of_clap(&e));
        }
    };
    init_logging(cli.log_format);
    crate::sys::cgroup::set_host_proc(cli.host_proc);
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("egress: error: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn dispatch(cmd: Command) -> anyhow::Result<u8> {
    match cmd {
        Command::Run {
            policy,
            cgroup,
            events,
            events_format,
            ifaces,
            alerting,
            socket,
            metrics,
            watch,
            pin_dir,
            ephemeral,
            owners_capacity,
            prefix_capacity,
            kube,
            dns_listen,
            allow_non_host_cgroup,
        } => {
            let common = Options {
                policy,
                events,
                events_format,
                ifaces,
                webhook: alerting.config(),
                metrics,
                owners_capacity,
                prefix_capacity,
                kube: kube
                    .options()
                    .map_err(|e| exit::ConfigError(format!("{e:#}")))?,
                dns_listen: DnsListen::parse(&dns_listen).map_err(exit::ConfigError)?,
                notify: true,
            };
            runtime()?.block_on(controller::run(RunOptions {
                common,
                watch,
                cgroup,
                socket,
                pin_dir,
                ephemeral,
                allow_non_host_cgroup,
            }))?;
            Ok(0)
        }
        Command::Exec {
            policy,
            events,
            events_format,
            ifaces,
            alerting,
            report,
            command,
            owners_capacity,
            prefix_capacity,
        } => {
            let common = Options {
                policy,
                events,
                events_format,
                ifaces,
                webhook: alerting.config(),
                metrics: None,
                owners_capacity,
                prefix_capacity,
                kube: None,
                dns_listen: DnsListen::default(),
                notify: false,
            };
            let code = runtime()?.block_on(controller::exec(ExecOptions {
                common,
                command,
                report,
            }))?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Reload {
            policy,
            dry_run,
            socket,
        } => {
            // The controller may run elsewhere in the filesystem: send an absolute path.
            let policy = policy.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string());
            print!(
                "{}",
                client::done(&socket, Request::Reload { policy, dry_run })?
            );
            Ok(0)
        }
        Command::MountBpffs { pin_dir } => {
            Pins::new(&pin_dir).ensure()?;
            println!("{} is on bpffs", pin_dir.display());
            Ok(0)
        }
        Command::Status {
            json,
            socket,
            pin_dir,
        } => {
            let status = match client::status(&socket) {
                Ok(s) => s,
                Err(_) => StatusReport::from_pins(
                    Pins::new(&pin_dir).status()?,
                    pin_dir.display().to_string(),
                ),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", display::status_text(&status));
            }
            Ok(0)
        }
        Command::Stop { pin_dir, socket } => {
            let removed = Pins::new(&pin_dir).remove_all()?;
            let told = client::request(&socket, Request::Stop).is_ok();
            let tail = if told {
                "; the controller was told to exit"
            } else {
                ""
            };
            if removed.links.is_empty() && removed.maps == 0 {
                println!("nothing was pinned under {}{tail}", pin_dir.display());
            } else {
                println!(
                    "egress stopped: detached {} links ({}), removed {} map pins under {}{tail}. Enforcement is OFF.",
                    removed.links.len(),
                    removed.links.join(", "),
                    removed.maps,
                    pin_dir.display()
                );
            }
            Ok(0)
        }
        Command::Unblock { key, socket } => {
            println!("{}", client::done(&socket, Request::Unblock { key })?);
            Ok(0)
        }
        Command::Stats { json, socket } => {
            let report = client::stats(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", display::stats_table(&report));
            }
            Ok(0)
        }
        Command::Grants {
            json,
            all,
            socket,
            pin_dir,
        } => {
            let (rows, from_pins) = live_grants(&socket, &pin_dir, all)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                if from_pins {
                    println!(
                        "no controller answers on {}: grants read from the pins under {} (names, services and who asked are known only to a running controller)",
                        socket.display(),
                        pin_dir.display()
                    );
                }
                print!("{}", display::grants_table(&rows));
            }
            Ok(0)
        }
        Command::Top {
            socket,
            interval,
            once,
        } => {
            top::top(&socket, interval, once)?;
            Ok(0)
        }
        Command::Check { files } => Ok(policy_cmds::check(&files)),
        Command::Explain {
            policy,
            dest,
            port,
            protocol,
            json,
            socket,
            caller,
        } => {
            match dest.parse::<IpAddr>() {
                Ok(addr) => {
                    policy_cmds::explain(policy, addr, port, protocol.into(), json, &caller)?
                }
                Err(_) => policy_cmds::explain_name(policy, &dest, json, &socket)?,
            }
            Ok(0)
        }
    }
}

/// The grants of the controller on `socket`, else (no controller answers there) of the pins
/// under `pin_dir`, without names; true when read from the pins. A controller that answers with
/// an error is an error (its pins would be no truer).
fn live_grants(
    socket: &std::path::Path,
    pin_dir: &std::path::Path,
    all: bool,
) -> anyhow::Result<(Vec<crate::report::GrantRow>, bool)> {
    use anyhow::Context as _;
    match client::grants(socket, all) {
        Ok(rows) => Ok((rows, false)),
        Err(e) if std::os::unix::net::UnixStream::connect(socket).is_ok() => Err(e),
        Err(e) => {
            let pins = Pins::new(pin_dir);
            let kernel = pins.grants().with_context(|| {
                format!("no controller answers ({e:#}), and the pins cannot be read")
            })?;
            let mut rows = crate::dns::grants::grant_rows(
                &kernel,
                &[],
                |_| None,
                crate::sys::clock::boot_ns(),
                std::time::SystemTime::now(),
                all,
            );
            let state = pins.read_state().unwrap_or_default();
            if let Some(root) = crate::sys::cgroup::find_cgroup2_root() {
                let under = if state.cgroup.is_empty() {
                    root.clone()
                } else {
                    PathBuf::from(&state.cgroup)
                };
                let mut paths = crate::sys::cgroup::CgroupPaths::new(&root, &under);
                for r in &mut rows {
                    r.cgroup_path = paths.path(r.cgroup_id, None);
                }
            }
            Ok((rows, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(args.split_whitespace())
    }

    #[test]
    fn webhook_options_need_a_webhook_and_take_one_url() {
        let cli = parse("egress run --webhook http://x/ --webhook-format alertmanager --webhook-events alert,deny --webhook-header X-A:1").unwrap();
        let Command::Run { alerting, .. } = cli.command else {
            panic!("run")
        };
        let cfg = alerting.config().unwrap();
        assert_eq!(cfg.format, webhook::Format::Alertmanager);
        assert!(cfg.alerts && cfg.denies);
        assert_eq!(cfg.headers.len(), 1);
        assert!(parse("egress run --webhook-url-file /f --webhook-format slack").is_ok());
        assert!(parse("egress exec --webhook-format slack -- true").is_err());
        assert!(parse("egress run --webhook-secret-file /s").is_err());
        assert!(parse("egress run --webhook http://x/ --webhook-url-file /f").is_err());
        assert!(parse("egress run --webhook http://x/ --webhook-header nocolon").is_err());
        let Command::Run { alerting, .. } = parse("egress run").unwrap().command else {
            panic!("run")
        };
        assert!(alerting.config().is_none());
    }
}
