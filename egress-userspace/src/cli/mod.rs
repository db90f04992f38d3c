//! The `egress` command line: clap definitions and dispatch (`mod.rs`), the policy commands
//! `check` and `explain` (`policy_cmds.rs`), `events` (`events.rs`), the `top` screen (`top.rs`)
//! and every human-readable view of a report (`display.rs`). `-o json` (or `--json`) prints the
//! typed reports as they are.

mod display;
mod events;
mod policy_cmds;
mod top;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::{
    api::{self, Request, client},
    controller::{self, DnsListen, ExecOptions, LearnOptions, Options, RunOptions},
    datapath::pins::{self, Pins},
    events::Format as EventsFormat,
    exit,
    policy::Protocol,
    report::{MessageReport, StatusReport, StopReport},
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
    /// Control socket of the controller: where `run` serves it (root only, mode 0600), and
    /// where the other commands find the running controller. Before or after the subcommand.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// bpffs directory where programs' links and maps are pinned, so that enforcement outlives
    /// the controller: where `run` pins (bpffs is mounted at /sys/fs/bpf if absent), what `stop`
    /// removes, and what `status` and `grants` read when no controller answers. Before or after
    /// the subcommand.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR, global = true)]
    pin_dir: PathBuf,
    /// Output of the commands that print: `text` for people, `json` for programs (the typed
    /// reports; JSON lines for `events`).
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT", default_value_t = Output::Text, global = true)]
    output: Output,
    /// Same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
    /// Where `run` looks for its policy when no --policy is given (policy.toml, or
    /// policy.d/*.toml). Default: $EGRESS_CONFIG_DIR, else /etc/egress. (For tests.)
    #[arg(long, value_name = "DIR", hide = true, global = true)]
    config_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where `egress run` looks for its policy: `policy.toml`, or the fragments `policy.d/*.toml`.
/// (Tests point `EGRESS_CONFIG_DIR` elsewhere.)
pub const DEFAULT_CONFIG_DIR: &str = "/etc/egress";

/// `-o`: how the commands that print print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// `learn --ring-mib`: a power of two from 1 to 1024.
fn ring_mib(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|e| format!("{e}: expected a number of MiB"))?;
    if (1..=1024).contains(&n) && n.is_power_of_two() {
        Ok(n)
    } else {
        Err(format!("{n} MiB: expected a power of two from 1 to 1024"))
    }
}

/// `learn --by`: which selectors a draft's entries get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LearnBy {
    Exe,
    User,
    None,
}

/// `learn --mode`: the draft's `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LearnMode {
    Enforce,
    Audit,
}

/// For `egress learn`, `--output FILE` (and `-o FILE`) names the draft file, as its contract
/// says, while everywhere else `--output` / `-o` is the global output format: the value decides
/// (`json` and `text` stay formats). Only arguments after the `learn` subcommand and before
/// `--` are touched.
fn learn_output_alias(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const GLOBAL_WITH_VALUE: [&str; 7] = [
        "--log-format",
        "--host-proc",
        "--socket",
        "--pin-dir",
        "-o",
        "--output",
        "--config-dir",
    ];
    let is_format = |v: &std::ffi::OsStr| v == "json" || v == "text";
    let mut i = 1;
    // Find the subcommand: the first argument that is neither an option nor an option's value.
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if GLOBAL_WITH_VALUE.contains(&a.as_ref()) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            break;
        }
    }
    if args.get(i).is_none_or(|a| a != "learn") {
        return args;
    }
    let mut out: Vec<std::ffi::OsString> = args[..=i].to_vec();
    let mut rest = args[i + 1..].iter().peekable();
    while let Some(a) = rest.next() {
        if a == "--" {
            out.push(a.clone());
            out.extend(rest.cloned());
            break;
        }
        let s = a.to_string_lossy();
        if (s == "--output" || s == "-o") && rest.peek().is_some_and(|v| !is_format(v)) {
            out.push("--draft".into());
        } else if let Some(v) = s.strip_prefix("--output=")
            && !is_format(std::ffi::OsStr::new(v))
        {
            out.push(format!("--draft={v}").into());
        } else {
            out.push(a.clone());
        }
    }
    out
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
        /// Policy file, or a directory of *.toml fragments merged in file-name order. Default:
        /// /etc/egress/policy.toml, else the fragments /etc/egress/policy.d/*.toml, when either
        /// exists (not both); else the policy of the enforcement pinned under --pin-dir (kept as
        /// the kernel holds it if its file changed since); with nothing pinned, the embedded
        /// policies/default.toml (audit mode), which is logged.
        #[arg(long, value_name = "FILE|DIR")]
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
        /// Troubleshooting: log one line per connect/sendmsg decision from the kernel (hook,
        /// verdict, rule id, destination, port, protocol, process), at debug level under the
        /// target `egress_ebpf` (as RUST_LOG=egress_ebpf=debug does). Chosen at start; off, the
        /// kernel skips the logging code.
        #[arg(long)]
        kernel_log: bool,
        /// Where the last good copy of every `[[blocklist]]` feed is kept: used when a feed
        /// cannot be fetched or read, and at start before a `url` feed's first fetch.
        #[arg(long, value_name = "DIR", default_value = crate::policy::feeds::DEFAULT_CACHE_DIR)]
        feed_cache: PathBuf,
        /// A group whose members may use the control socket without being root: read the state
        /// (status, stats, grants, events, policy) and grant or revoke break-glass exceptions
        /// (`egress allow`, `egress revoke`). Everything else (reload, stop, unblock) stays
        /// root's. The socket becomes mode 0660 and its directory 0710, both of that group.
        #[arg(long, value_name = "GROUP")]
        admin_group: Option<String>,
        /// The longest break-glass exception `egress allow --for` may ask for.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        max_exception: std::time::Duration,
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
        /// Troubleshooting: log one line per connect/sendmsg decision from the kernel (see `run
        /// --kernel-log`).
        #[arg(long)]
        kernel_log: bool,
        /// Where the last good copy of every `[[blocklist]]` feed is kept: used when a feed
        /// cannot be fetched or read, and at start before a `url` feed's first fetch.
        #[arg(long, value_name = "DIR", default_value = crate::policy::feeds::DEFAULT_CACHE_DIR)]
        feed_cache: PathBuf,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Observe in audit mode (nothing is refused) and write a policy draft that allows exactly
    /// what was seen: names learned through egress's DNS proxy rather than addresses where
    /// known, executables and users as selectors, ports and protocols, with comments saying how
    /// often each entry was used. Observes a command run in a fresh child cgroup (`-- CMD`, as
    /// `exec` runs it: until it exits), an existing cgroup (--cgroup), or the whole host
    /// (neither; DNS is then not steered, and the draft lists addresses).
    Learn {
        /// Observe this existing cgroup2 directory (absolute path under the cgroup2 root).
        #[arg(long, value_name = "DIR", conflicts_with = "command")]
        cgroup: Option<PathBuf>,
        /// Learn for at most this long (`10m`, `90s`, `1h30m`). When it passes, a command gets
        /// SIGTERM (killed 5 s later), and the draft is written. Default: until the command exits;
        /// without a command, 10m. Ctrl-C (SIGINT) or SIGTERM ends learning early; the draft is
        /// still written.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Write the draft to FILE instead of stdout (`-`: stdout). `--output FILE` is the same:
        /// for `learn`, `--output` / `-o` with a value other than `json` or `text` is the draft
        /// file.
        #[arg(long, value_name = "FILE")]
        draft: Option<PathBuf>,
        /// Where the DNS proxy forwards while learning (repeatable; ADDR or ADDR:PORT, `[v6]:PORT`),
        /// also written into the draft's `[dns]`. Default: the system's resolvers (not written).
        #[arg(long = "dns-upstream", value_name = "ADDR[:PORT]")]
        dns_upstream: Vec<String>,
        /// Do not learn names: no DNS steering, addresses only.
        #[arg(long)]
        no_names: bool,
        /// Selectors the draft's entries get: `exe` (executables), `user` (users), both
        /// (`exe,user`, the default) or `none`.
        #[arg(long, value_enum, value_delimiter = ',', value_name = "exe,user|none", default_values_t = [LearnBy::Exe, LearnBy::User])]
        by: Vec<LearnBy>,
        /// Leave out entries seen fewer than N times (listed in a comment instead).
        #[arg(long, value_name = "N", default_value_t = 1)]
        min_count: u64,
        /// The draft's `mode`: `enforce` (default) or `audit` (to roll it out gently). Not
        /// applied with --policy (the base's mode stands).
        #[arg(long, value_enum, value_name = "MODE", default_value_t = LearnMode::Enforce)]
        mode: LearnMode,
        /// Start from this policy file: learning runs under it in audit mode (so only what it
        /// would refuse is learned), and the draft is its text, as it is, followed by services
        /// for what it did not allow. What its blocks refuse is listed, never allowed.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Also append the audit events seen while learning to FILE (JSON lines).
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Interface for the TC program (repeatable). Default: every interface that is up,
        /// except loopback.
        #[arg(long = "iface", value_name = "IFACE")]
        ifaces: Vec<String>,
        /// Room for N socket owners (see `exec --owners-capacity`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        owners_capacity: Option<u32>,
        /// Where the DNS proxy listens (see `run --dns-listen`).
        #[arg(long = "dns-listen", value_name = "ADDR[:PORT]")]
        dns_listen: Vec<String>,
        /// Size of the kernel's event ring while learning, in MiB (a power of two, 1-1024;
        /// allocated for as long as learning runs). Each call observed is one 88-byte record
        /// until the controller reads it; a burst larger than the ring loses events, which the
        /// draft counts and warns about.
        #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = ring_mib)]
        ring_mib: u32,
        /// The command to run and observe, and its arguments.
        #[arg(last = true, value_name = "CMD")]
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
        /// With --dry-run: exit 1 when enforcement would change (what --dry-run lists), 0 when
        /// it would not (as `git diff --exit-code`); a new hash alone (comments) is no change.
        #[arg(long, requires = "dry_run")]
        exit_code: bool,
    },
    /// Mount bpffs at /sys/fs/bpf unless the pin directory is on one already, and create the pin
    /// directory: what a DaemonSet's privileged init container runs (its mount propagates to the
    /// host), so that the agent's pins outlive its container.
    /// (The pin directory is --pin-dir, the one `egress run` will use.)
    MountBpffs,
    /// Enforcement health, policy generation and hash, mode, counters, controller uptime. Works
    /// without a controller: it then reads the pins.
    Status,
    /// Turn egress off: detach every pinned program and remove every pin. The one way to stop
    /// enforcement; a controller still running is told to exit.
    Stop,
    /// Lift a byte-budget block (`[[alert]] action = "block"`) before its cooldown ends.
    Unblock {
        /// The alert key, as events print it: process:PID, process_destination:PID->ADDR (a bare
        /// PID means process:PID).
        key: String,
    },
    /// Break-glass: let one process, cgroup or user reach a destination the policy refuses, for
    /// a limited time. The exception lives in the kernel and ends by itself (controller or not);
    /// `egress revoke ID` ends it early. Who granted it (the caller's uid, from the kernel),
    /// what, why and until when go to the events. Root, or a member of the controller's
    /// `--admin-group`.
    Allow {
        /// The destination: an IPv4/IPv6 address or CIDR, or a host name (the addresses the scope
        /// resolves for it through the DNS proxy while the exception lasts).
        #[arg(value_name = "DEST")]
        dest: String,
        /// Only this port or range (`443`, `8000-8080`). Default: every port.
        #[arg(long, value_name = "N[-M]")]
        port: Option<String>,
        /// Only this protocol: tcp, udp, icmp, icmpv6. Default: every protocol.
        #[arg(long, value_name = "P")]
        protocol: Option<String>,
        /// For this process (and its threads; not the processes it starts: grant its cgroup
        /// for that). Ends early if the process exits.
        #[arg(long, value_name = "N", group = "exception_scope")]
        pid: Option<u32>,
        /// For every process in this cgroup2 directory and below it.
        #[arg(long, value_name = "DIR", group = "exception_scope")]
        cgroup: Option<PathBuf>,
        /// For every process of this user (name or uid; real uid).
        #[arg(long, value_name = "U", group = "exception_scope")]
        user: Option<String>,
        /// How long: `15m`, `2h`, `90s` (at most the controller's --max-exception, 24h by
        /// default).
        #[arg(long = "for", value_name = "DURATION", value_parser = crate::exceptions::parse_for)]
        for_: std::time::Duration,
        /// Why (a ticket, an incident): recorded in the event.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// End a break-glass exception now.
    Revoke {
        /// Its id, as `egress allow` printed it and `egress grants` lists it.
        id: u32,
    },
    /// Per-process egress totals (bytes, packets, rate, destinations) from the running controller.
    Stats,
    /// Live DNS grants: which cgroup may reach which address because it resolved which name,
    /// for which service, until when, and who asked. Without a controller, read from the pins:
    /// addresses, cgroups and expiries (names and who asked are known only to a controller).
    Grants {
        /// Also list the names resolved that nothing approves (no grant: their connects are
        /// judged by the address rules; deny events name them in `host`).
        #[arg(long)]
        all: bool,
        /// With -o json: print the break-glass exceptions (`egress allow`) rather than the DNS
        /// grants (the text lists both).
        #[arg(long)]
        exceptions: bool,
    },
    /// Live view of the processes sending the most, refreshed in place (q or Ctrl-C quits).
    /// With -o json: the stats report as a JSON line at each refresh.
    Top {
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
        /// Policy file or directory of fragments. Default: the policy in force in the running
        /// controller (asked over --socket; an error when none answers).
        #[arg(long, value_name = "FILE|DIR")]
        policy: Option<PathBuf>,
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
        /// Who calls: see `CallerArgs`. Without any, a caller in none of the policy's scopes.
        #[command(flatten)]
        caller: policy_cmds::CallerArgs,
    },
    /// The events of the running controller (denies, audits, alerts, blocks, reloads), as the
    /// events file has them (`-o json`: JSON lines) or one readable line each. Without --follow:
    /// the recent ones the controller keeps (the last 1024), then exit. With --follow: every
    /// later one as it happens, until interrupted (the recent ones first only with --since). A
    /// follower too slow to keep up loses events and is told how many on stderr; the controller
    /// never waits for it.
    Events {
        /// Keep streaming events as they happen.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only events of the last DURATION (`30s`, `5m`, `1h30m`), of those kept.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only events matching KEY=VALUE[,KEY=VALUE...] (repeatable; every condition must
        /// hold): pid=PID, rule=NAME (the deciding service or block), dst=ADDR or dst=CIDR,
        /// host=NAME or host=*.SUFFIX (the name dst was learned from), event=KIND (deny, audit,
        /// alert, block, unblock, reload). An unknown key is a usage error.
        #[arg(long, value_name = "KEY=VALUE,...")]
        filter: Vec<String>,
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

/// Whether the kernel is to log its decisions: `--kernel-log`, or a log filter (RUST_LOG) that
/// shows debug lines of `egress_ebpf`.
fn kernel_log_wanted(flag: bool) -> bool {
    flag || tracing::enabled!(
        target: crate::datapath::kernel_log::TARGET,
        tracing::Level::DEBUG
    )
}

/// `kernel_log`: `--kernel-log` was given, whose lines are shown whatever RUST_LOG says.
fn init_logging(format: LogFormat, kernel_log: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = if kernel_log {
        filter.add_directive(
            format!("{}=debug", crate::datapath::kernel_log::TARGET)
                .parse()
                .expect("a valid directive"),
        )
    } else {
        filter
    };
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
    let cli = match Cli::try_parse_from(learn_output_alias(std::env::args_os().collect())) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::code_of_clap(&e));
        }
    };
    let kernel_log = matches!(
        cli.command,
        Command::Run {
            kernel_log: true,
            ..
        } | Command::Exec {
            kernel_log: true,
            ..
        }
    );
    init_logging(cli.log_format, kernel_log);
    crate::sys::cgroup::set_host_proc(cli.host_proc.clone());
    match dispatch(cli) {
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

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let Cli {
        socket,
        pin_dir,
        config_dir,
        command,
        ..
    } = cli;
    let output = if cli.json { Output::Json } else { cli.output };
    let config_dir = config_dir
        .or_else(|| std::env::var_os("EGRESS_CONFIG_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR));
    let json = output == Output::Json;
    match command {
        Command::Run {
            policy,
            cgroup,
            events,
            events_format,
            ifaces,
            alerting,
            metrics,
            watch,
            ephemeral,
            owners_capacity,
            prefix_capacity,
            kube,
            dns_listen,
            allow_non_host_cgroup,
            kernel_log,
            feed_cache,
            admin_group,
            max_exception,
        } => {
            let admin_gid = match admin_group {
                Some(g) => Some(match g.parse::<u32>() {
                    Ok(gid) => gid,
                    Err(_) => crate::policy::resolve::gid_of(&g)
                        .map_err(|e| exit::ConfigError(format!("--admin-group {g}: {e}")))?,
                }),
                None => None,
            };
            let policy = match policy {
                Some(p) => Some(p),
                None => configured_policy(&config_dir, (!ephemeral).then_some(pin_dir.as_path()))?,
            };
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
                kernel_log: kernel_log_wanted(kernel_log),
                feed_cache,
                events_ring: None,
                max_exception,
            };
            runtime()?.block_on(controller::run(RunOptions {
                common,
                watch,
                cgroup,
                socket: socket.clone(),
                pin_dir: pin_dir.clone(),
                ephemeral,
                allow_non_host_cgroup,
                admin_gid,
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
            kernel_log,
            feed_cache,
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
                kernel_log: kernel_log_wanted(kernel_log),
                feed_cache,
                events_ring: None,
                max_exception: crate::exceptions::DEFAULT_MAX_FOR,
            };
            let code = runtime()?.block_on(controller::exec(ExecOptions {
                common,
                command,
                report,
            }))?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Learn {
            cgroup,
            duration,
            draft,
            dns_upstream,
            no_names,
            by,
            min_count,
            mode,
            events,
            ifaces,
            owners_capacity,
            dns_listen,
            ring_mib,
            policy,
            command,
        } => {
            let common = Options {
                policy: None,
                events,
                events_format: EventsFormat::Json,
                ifaces,
                webhook: None,
                metrics: None,
                owners_capacity,
                prefix_capacity: None,
                kube: None,
                dns_listen: DnsListen::parse(&dns_listen).map_err(exit::ConfigError)?,
                notify: false,
                kernel_log: false,
                feed_cache: crate::policy::feeds::DEFAULT_CACHE_DIR.into(),
                events_ring: Some(ring_mib * 1024 * 1024),
                max_exception: crate::exceptions::DEFAULT_MAX_FOR,
            };
            let none = by.contains(&LearnBy::None);
            let duration = duration.or_else(|| {
                command
                    .is_empty()
                    .then_some(std::time::Duration::from_secs(600))
            });
            let code = runtime()?.block_on(controller::learn(LearnOptions {
                common,
                cgroup,
                command,
                duration,
                // `-` is stdout, as for `--events`.
                output: draft.filter(|p| p.as_path() != Path::new("-")),
                dns_upstream,
                names: !no_names,
                selectors: crate::learn::draft::SelectorsWanted {
                    executables: !none && by.contains(&LearnBy::Exe),
                    users: !none && by.contains(&LearnBy::User),
                },
                min_count,
                mode: match mode {
                    LearnMode::Enforce => crate::policy::Mode::Enforce,
                    LearnMode::Audit => crate::policy::Mode::Audit,
                },
                base: policy,
            }))?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Reload {
            policy,
            dry_run,
            exit_code,
        } => {
            // The controller may run elsewhere in the filesystem: send an absolute path.
            let policy = policy.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string());
            let report = client::reload(&socket, policy, dry_run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.message);
            }
            if !exit_code {
                return Ok(exit::OK);
            }
            match report.changed {
                Some(true) => Ok(exit::FAILURE),
                Some(false) => Ok(exit::OK),
                None => anyhow::bail!(
                    "the running controller does not say whether anything would change (it is older than this egress): restart it for --exit-code"
                ),
            }
        }
        Command::MountBpffs => {
            Pins::new(&pin_dir).ensure()?;
            let message = format!("{} is on bpffs", pin_dir.display());
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&MessageReport { message })?
                );
            } else {
                println!("{message}");
            }
            Ok(0)
        }
        Command::Status => {
            let status = match client::status(&socket) {
                Ok(s) => s,
                Err(_) => {
                    let pins = Pins::new(&pin_dir);
                    let mut s =
                        StatusReport::from_pins(pins.status()?, pin_dir.display().to_string());
                    s.exceptions = pins.exceptions();
                    s
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", display::status_text(&status));
            }
            Ok(0)
        }
        Command::Stop => {
            let removed = Pins::new(&pin_dir).remove_all()?;
            // Exceptions end with the enforcement: their record goes with the pins.
            let _ = std::fs::remove_file(crate::exceptions::file_for(
                &Pins::new(&pin_dir).state_path(),
            ));
            let told = client::request(&socket, Request::Stop).is_ok();
            if json {
                let report = StopReport {
                    pin_dir: pin_dir.display().to_string(),
                    links: removed.links,
                    maps: removed.maps,
                    controller_told: told,
                };
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(0);
            }
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
        Command::Unblock { key } => {
            let message = client::done(&socket, Request::Unblock { key })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&MessageReport { message })?
                );
            } else {
                println!("{message}");
            }
            Ok(0)
        }
        Command::Stats => {
            let report = client::stats(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", display::stats_table(&report));
            }
            Ok(0)
        }
        Command::Allow {
            dest,
            port,
            protocol,
            pid,
            cgroup,
            user,
            for_,
            reason,
        } => {
            if pid.is_none() && cgroup.is_none() && user.is_none() {
                return Err(exit::ConfigError(
                    "egress allow: say whom the exception is for: --pid N, --cgroup DIR or --user U"
                        .into(),
                )
                .into());
            }
            // The controller may run elsewhere in the filesystem: send an absolute path.
            let cgroup = cgroup.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string());
            let e = client::allow(
                &socket,
                Request::Allow {
                    dest,
                    port,
                    protocol,
                    pid,
                    cgroup,
                    user,
                    for_secs: for_.as_secs(),
                    reason,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!(
                    "exception {} granted: {}{}{} for {} until {} (`egress revoke {}` ends it)",
                    e.id,
                    e.what(),
                    e.port
                        .as_ref()
                        .map(|p| format!(" port {p}"))
                        .unwrap_or_default(),
                    e.protocol
                        .as_ref()
                        .map(|p| format!(" {p}"))
                        .unwrap_or_default(),
                    e.scope,
                    e.until,
                    e.id
                );
            }
            Ok(0)
        }
        Command::Revoke { id } => {
            let message = client::done(&socket, Request::Revoke { id })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&MessageReport { message })?
                );
            } else {
                println!("{message}");
            }
            Ok(0)
        }
        Command::Grants {
            all,
            exceptions: true,
        } if json => {
            let rows = match client::exceptions(&socket) {
                Ok(rows) => rows,
                Err(_) => Pins::new(&pin_dir).exceptions(),
            };
            println!("{}", serde_json::to_string_pretty(&rows)?);
            let _ = all;
            Ok(0)
        }
        Command::Grants { all, .. } => {
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
                let exceptions = if from_pins {
                    Pins::new(&pin_dir).exceptions()
                } else {
                    // An older controller does not know the request: no exceptions there.
                    client::exceptions(&socket).unwrap_or_default()
                };
                print!("{}", display::exceptions_table(&exceptions));
            }
            Ok(0)
        }
        Command::Top { interval, once } => {
            top::top(&socket, interval, once, json)?;
            Ok(0)
        }
        Command::Check { files } => Ok(policy_cmds::check(&files, json)),
        Command::Explain {
            policy,
            dest,
            port,
            protocol,
            caller,
        } => {
            let loaded = policy_cmds::load_policy(policy.as_deref(), &socket)?;
            match dest.parse::<IpAddr>() {
                Ok(addr) => {
                    policy_cmds::explain(loaded, addr, port, protocol.into(), json, &caller)?
                }
                Err(_) => policy_cmds::explain_name(loaded, &dest, json, &socket)?,
            }
            Ok(0)
        }
        Command::Events {
            follow,
            since,
            filter,
        } => {
            events::events(&socket, follow, since, &filter, output)?;
            Ok(0)
        }
    }
}

/// The policy `egress run` enforces when no --policy is given: `DIR/policy.toml`, else the
/// fragments `DIR/policy.d/*.toml`, when either exists (both is a configuration error: which
/// one is meant is not clear); else None (the pinned enforcement's policy, or the embedded
/// default), which is logged.
fn configured_policy(dir: &Path, pin_dir: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let file = dir.join("policy.toml");
    let fragments = dir.join("policy.d");
    let has_fragments = fragments.is_dir()
        && !crate::policy::fragments::toml_files(&fragments)
            .map_err(|e| exit::ConfigError(format!("reading {}: {e}", fragments.display())))?
            .is_empty();
    match (file.exists(), has_fragments) {
        (true, true) => Err(exit::ConfigError(format!(
            "both {} and {}/*.toml exist: keep one (or give --policy)",
            file.display(),
            fragments.display()
        ))
        .into()),
        (true, false) => {
            tracing::info!(policy = %file.display(), "no --policy: enforcing the configured policy file");
            Ok(Some(file))
        }
        (false, true) => {
            tracing::info!(policy = %fragments.display(), "no --policy: enforcing the configured policy fragments, merged in file-name order");
            Ok(Some(fragments))
        }
        (false, false) => {
            let pinned = pin_dir.is_some_and(|d| Pins::new(d).adoptable());
            if pinned {
                tracing::info!(
                    "no --policy, and neither {} nor {}/*.toml exists: keeping the policy of the pinned enforcement",
                    file.display(),
                    fragments.display()
                );
            } else {
                tracing::info!(
                    "no --policy, and neither {} nor {}/*.toml exists: enforcing the embedded default policy (policies/default.toml, audit mode)",
                    file.display(),
                    fragments.display()
                );
            }
            Ok(None)
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

    fn parse_learn(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(learn_output_alias(
            args.split_whitespace().map(Into::into).collect(),
        ))
    }

    #[test]
    fn learn_takes_output_as_the_draft_file_and_keeps_output_formats() {
        let cli =
            parse_learn("egress learn --duration 10m --output draft.toml -- curl -o out.html x")
                .unwrap();
        let Command::Learn {
            draft,
            duration,
            command,
            by,
            ..
        } = cli.command
        else {
            panic!("learn")
        };
        assert_eq!(draft, Some(PathBuf::from("draft.toml")));
        assert_eq!(duration, Some(std::time::Duration::from_secs(600)));
        // After `--` the command's own `-o` is left alone.
        assert_eq!(command, ["curl", "-o", "out.html", "x"]);
        assert_eq!(by, [LearnBy::Exe, LearnBy::User]);
        let cli = parse_learn(
            "egress --socket /s learn --output=d.toml -o json --cgroup /sys/fs/cgroup/x",
        )
        .unwrap();
        assert_eq!(cli.output, Output::Json);
        let Command::Learn { draft, cgroup, .. } = cli.command else {
            panic!("learn")
        };
        assert_eq!(draft, Some(PathBuf::from("d.toml")));
        assert_eq!(cgroup, Some(PathBuf::from("/sys/fs/cgroup/x")));
        // Other commands keep `--output` as the format.
        assert!(parse_learn("egress status --output draft.toml").is_err());
        assert!(
            parse_learn("egress learn --cgroup /x -- true").is_err(),
            "both"
        );
        let cli = parse_learn("egress learn --by none --min-count 3 --mode audit").unwrap();
        let Command::Learn {
            by,
            min_count,
            mode,
            ..
        } = cli.command
        else {
            panic!("learn")
        };
        assert_eq!(
            (by, min_count, mode),
            (vec![LearnBy::None], 3, LearnMode::Audit)
        );
        for bad in ["0", "3", "2048", "x"] {
            assert!(
                parse_learn(&format!("egress learn --ring-mib {bad}")).is_err(),
                "{bad}"
            );
        }
        let Command::Learn { ring_mib, .. } = parse_learn("egress learn").unwrap().command else {
            panic!("learn")
        };
        assert_eq!(ring_mib, 16);
    }
}
