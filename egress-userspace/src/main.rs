//! `egress`: the command line of the egress firewall.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use egress::{
    control::{self, CommonOptions, ExecOptions, RunOptions},
    ctlsock, display, pins,
    policy::{self, Protocol, explain},
    webhook,
};
use tracing_subscriber::EnvFilter;

/// Kernel-enforced egress firewall: approved-services policy on the cgroup connect/sendmsg hooks.
#[derive(Parser, Debug)]
#[command(name = "egress", version, about)]
struct Cli {
    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
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
        /// Policy file. Default: the embedded policies/default.toml (audit mode).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// cgroup2 directory to attach to. Default: the cgroup2 root found in /proc/mounts.
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
        /// Append JSON-lines events to FILE instead of stdout ("-" for stdout).
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Interface for the TC accounting program (repeatable). Default: every interface that
        /// is up, except loopback.
        #[arg(long = "iface", value_name = "IFACE")]
        ifaces: Vec<String>,
        #[command(flatten)]
        alerting: AlertArgs,
        /// Control socket for `egress stats`, `egress top` and `egress unblock` (root only, mode
        /// 0600).
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Reload when the policy file changes (edits, renames, and the symlink swap Kubernetes
        /// does for ConfigMaps). SIGHUP and `egress reload` reload too.
        #[arg(long)]
        watch: bool,
        /// bpffs directory where programs' links and maps are pinned, so that enforcement
        /// outlives the controller (bpffs is mounted at /sys/fs/bpf if absent).
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pin nothing: SIGINT/SIGTERM (or a crash) detaches everything.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Run CMD in a fresh child cgroup with the policy enforced; exit with CMD's status. Events go
    /// to stderr unless --events is given.
    Exec {
        /// Policy file. Default: the embedded policies/default.toml (audit mode).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Append JSON-lines events to FILE instead of stderr ("-" for stderr).
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
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
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
        socket: PathBuf,
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
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Turn egress off: detach every pinned program and remove every pin. The one way to stop
    /// enforcement; a controller still running is told to exit.
    Stop {
        /// Pin directory.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Control socket of the running controller, if any.
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Lift a byte-budget block (`[[alert]] action = "block"`) before its cooldown ends.
    Unblock {
        /// The alert key, as events print it: process:PID, process_destination:PID->ADDR (a bare
        /// PID means process:PID).
        key: String,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Per-process egress totals (bytes, packets, rate, destinations) from the running controller.
    Stats {
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Live view of the processes sending the most, refreshed in place (q or Ctrl-C quits).
    Top {
        /// Control socket of the running controller.
        #[arg(long, value_name = "PATH", default_value = ctlsock::DEFAULT_SOCKET)]
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
    /// entries the kernel gets.
    Explain {
        /// Policy file.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Destination address (IPv4 or IPv6, v4-mapped included).
        dest: IpAddr,
        /// Destination port. Omitted: the verdict for every port, or the port table when it varies.
        #[arg(long)]
        port: Option<u16>,
        /// Protocol.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
        protocol: ProtocolArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where alerts go besides the event stream.
#[derive(clap::Args, Debug)]
struct AlertArgs {
    /// POST every alert as JSON to URL (retries with backoff; undelivered alerts are spooled
    /// and sent when it is back).
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// Directory for alerts the webhook could not take yet.
    #[arg(long, value_name = "DIR", default_value = webhook::DEFAULT_SPOOL)]
    spool: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Protocol {
        match p {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("egress: error: {e:#}");
            ExitCode::FAILURE
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
            ifaces,
            alerting,
            socket,
            metrics,
            watch,
            pin_dir,
            ephemeral,
        } => {
            let common = CommonOptions {
                policy,
                events,
                ifaces,
                webhook: alerting.webhook,
                spool: alerting.spool,
            };
            runtime()?.block_on(control::run(RunOptions {
                common,
                watch,
                cgroup,
                socket,
                metrics,
                pin_dir,
                ephemeral,
            }))?;
            Ok(0)
        }
        Command::Exec {
            policy,
            events,
            ifaces,
            alerting,
            report,
            command,
        } => {
            let common = CommonOptions {
                policy,
                events,
                ifaces,
                webhook: alerting.webhook,
                spool: alerting.spool,
            };
            let code = runtime()?.block_on(control::exec(ExecOptions {
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
            let resp = ctlsock::request(&socket, &ctlsock::Request::Reload { policy, dry_run })?;
            print!("{}", resp.message.unwrap_or_default());
            Ok(0)
        }
        Command::Status {
            json,
            socket,
            pin_dir,
        } => {
            let status = match ctlsock::request(&socket, &ctlsock::Request::Status) {
                Ok(resp) => resp.status.unwrap_or_default(),
                Err(_) => pins::status_from_pins(&pins::Pins::new(pin_dir))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", display::status_text(&status));
            }
            Ok(0)
        }
        Command::Stop { pin_dir, socket } => {
            let p = pins::Pins::new(&pin_dir);
            let removed = p.remove_all()?;
            let told = ctlsock::request(&socket, &ctlsock::Request::Stop).is_ok();
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
            let resp = ctlsock::request(&socket, &ctlsock::Request::Unblock { key })?;
            println!("{}", resp.message.unwrap_or_default());
            Ok(0)
        }
        Command::Stats { json, socket } => {
            let report = ctlsock::fetch_stats(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", display::stats_table(&report));
            }
            Ok(0)
        }
        Command::Top {
            socket,
            interval,
            once,
        } => {
            top(&socket, interval, once)?;
            Ok(0)
        }
        Command::Check { files } => Ok(check(&files)),
        Command::Explain {
            policy,
            dest,
            port,
            protocol,
            json,
        } => {
            explain_cmd(policy, dest, port, protocol.into(), json)?;
            Ok(0)
        }
    }
}

fn check(files: &[PathBuf]) -> u8 {
    let mut failed = 0;
    for f in files {
        match policy::load(Some(f)) {
            Ok((p, c)) => println!(
                "{}: ok: mode {}, default {}, loopback {}: {} services, {} blocks, {} alerts, {} prefixes ({} IPv4, {} IPv6), {} rule sets",
                f.display(),
                p.mode,
                p.default,
                if p.allow_loopback {
                    "allowed"
                } else {
                    "judged"
                },
                c.services,
                c.blocks,
                c.alerts,
                c.prefix_count(),
                c.v4.len(),
                c.v6.len(),
                c.rulesets.len()
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{e:#}");
            }
        }
    }
    u8::from(failed > 0)
}

fn explain_cmd(
    path: PathBuf,
    dest: IpAddr,
    port: Option<u16>,
    protocol: Protocol,
    json: bool,
) -> anyhow::Result<()> {
    let (policy, compiled) = policy::load(Some(&path))?;
    let port_given = port.is_some();
    // Without --port: the verdict holds for every port when every port boundary of the matching
    // rule set gives the same answer.
    let ports: Vec<u16> = match port {
        Some(p) => vec![p],
        None => {
            let mut ps = vec![1u16];
            if let Some((_, set)) = compiled.matching_set(dest) {
                for r in &set.rules[..set.len as usize] {
                    ps.extend([r.port_lo.max(1), r.port_hi, r.port_hi.saturating_add(1)]);
                    ps.push(r.port_lo.saturating_sub(1).max(1));
                }
            }
            ps.sort_unstable();
            ps.dedup();
            ps
        }
    };
    let all: Vec<_> = ports
        .iter()
        .map(|&p| explain::explain(&policy, &compiled, dest, p, protocol))
        .collect();
    let uniform = all
        .iter()
        .all(|e| e.verdict == all[0].verdict && e.rule == all[0].rule);
    if json {
        if uniform {
            let mut v = serde_json::to_value(&all[0])?;
            if !port_given {
                v["port"] = serde_json::Value::String("any".into());
            }
            println!("{v}");
        } else {
            println!(
                "{}",
                serde_json::json!({ "dst": dest.to_string(), "protocol": protocol.to_string(), "port": "varies", "by_port": all })
            );
        }
        return Ok(());
    }
    if uniform {
        let e = &all[0];
        let port_text = if port_given {
            e.port.to_string()
        } else {
            "any".to_string()
        };
        println!(
            "{} {}/{} port {}: {} by {} `{}`",
            e.verdict, e.dst, e.protocol, port_text, e.effect, e.rule_kind, e.rule
        );
        if e.judged_as != e.dst {
            println!("  judged as {} (v4-mapped)", e.judged_as);
        }
        println!("  {}", e.reason);
    } else {
        println!("{dest}/{protocol}: the verdict depends on the port (give --port N)");
        for line in explain::rule_table(&compiled, dest) {
            println!("{line}");
        }
    }
    Ok(())
}

/// `egress top`: redraws in place on the alternate screen until q, Esc or Ctrl-C.
fn top(socket: &Path, interval: f64, once: bool) -> anyhow::Result<()> {
    use std::io::Write as _;

    use crossterm::{
        cursor, event, execute, queue,
        terminal::{self, ClearType},
    };
    let interval = Duration::from_secs_f64(interval.max(0.1));
    if once || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let report = ctlsock::fetch_stats(socket)?;
        let (cols, rows) = terminal::size().unwrap_or((160, 50));
        for line in display::top_frame(&report, rows as usize, cols as usize) {
            println!("{line}");
        }
        return Ok(());
    }
    // Fail before touching the terminal if the controller is not there.
    ctlsock::fetch_stats(socket)?;
    let mut out = std::io::stdout();
    terminal::enable_raw_mode()?;
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let report = ctlsock::fetch_stats(socket)?;
            let (cols, rows) = terminal::size().unwrap_or((80, 24));
            queue!(out, cursor::MoveTo(0, 0), terminal::Clear(ClearType::All))?;
            for (i, line) in display::top_frame(&report, rows as usize, cols as usize)
                .iter()
                .enumerate()
            {
                queue!(out, cursor::MoveTo(0, i as u16))?;
                write!(out, "{line}")?;
            }
            out.flush()?;
            if event::poll(interval)?
                && let event::Event::Key(k) = event::read()?
            {
                let ctrl_c = k.code == event::KeyCode::Char('c')
                    && k.modifiers.contains(event::KeyModifiers::CONTROL);
                if ctrl_c || matches!(k.code, event::KeyCode::Char('q') | event::KeyCode::Esc) {
                    return Ok(());
                }
            }
        }
    })();
    execute!(out, cursor::Show, terminal::LeaveAlternateScreen)?;
    terminal::disable_raw_mode()?;
    result
}
