//! `egress learn`: observes a command (in a fresh child cgroup, as `exec` runs it), an existing
//! cgroup, or the whole host, under a learning policy in **audit mode** that approves nothing
//! (so every call is reported and none refused), and writes a policy draft that allows exactly
//! what was seen (`crate::learn`).
//!
//! Names: for a command or a cgroup, DNS is steered to egress's proxy as under a policy with
//! names (the learning policy names the upstreams, which turns the proxy on), so each address
//! reached after a lookup is written as the name. For the whole host DNS is not steered: the
//! host's own resolver traffic is left alone while learning, and the draft lists addresses.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rustix::process::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use super::{
    Controller, Options, TICK, Target,
    exec::{EXEC_PREFIX, remove_stale, spawn_in, withhold_inherited_sockets},
    signals::{forward, forward_from_terminal},
};
use crate::{
    learn::{
        Observations,
        draft::{self, Context, NamesSource, SelectorsWanted},
    },
    policy::Mode,
    sys::cgroup::{self, ChildCgroup},
};

/// How long a command gets to exit after learning ended (duration over, or interrupted) before
/// it is killed.
const GRACE: Duration = Duration::from_secs(5);

pub struct LearnOptions {
    /// Where events go, interfaces, capacities, the DNS proxy's address (`policy` is ignored:
    /// learning has its own).
    pub common: Options,
    /// Observe this existing cgroup.
    pub cgroup: Option<PathBuf>,
    /// Run and observe this command (empty: none).
    pub command: Vec<String>,
    /// Learn for at most this long (None: until the command exits, or until interrupted).
    pub duration: Option<Duration>,
    /// Write the draft here (None: stdout).
    pub output: Option<PathBuf>,
    /// Where the DNS proxy forwards while learning (empty: the system's resolvers).
    pub dns_upstream: Vec<String>,
    /// Learn names through the DNS proxy (else addresses only, and no steering).
    pub names: bool,
    pub selectors: SelectorsWanted,
    pub min_count: u64,
    /// The draft's `mode`.
    pub mode: Mode,
    /// Start from this policy (a file): learned in audit mode, the draft is it plus what it
    /// did not allow.
    pub base: Option<PathBuf>,
}

/// How learning ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The command exited by itself.
    Exited,
    /// `--duration` passed.
    Duration,
    /// SIGINT or SIGTERM.
    Interrupted,
}

/// The learning policy: audit, nothing approved, every socket kind reported; with the proxy's
/// upstreams when names are learned.
fn learning_policy(upstreams: Option<&[String]>) -> String {
    let mut text = String::from(
        "# egress learn: report every call, refuse none\n\
         mode = \"audit\"\n\
         default = \"deny\"\n\
         allow_loopback = true\n\
         [sockets]\n\
         raw = \"audit\"\n\
         icmp = \"policy\"\n\
         other = \"audit\"\n\
         packet = \"audit\"\n",
    );
    if let Some(up) = upstreams {
        let list: Vec<String> = up
            .iter()
            .map(|u| toml::Value::String(u.clone()).to_string())
            .collect();
        text.push_str(&format!("[dns]\nupstream = [{}]\n", list.join(", ")));
    }
    text
}

/// Where the learning proxy forwards (None: no proxy, no steering), or why names are not
/// learned. The whole host is never steered: learning must not reroute the host's own resolver
/// traffic (and another controller's proxy may be serving it).
fn names_plan(
    names: bool,
    whole_host: bool,
    given: &[String],
    system: impl FnOnce() -> std::io::Result<Vec<std::net::SocketAddr>>,
) -> (Option<Vec<String>>, Option<String>) {
    if !names {
        (None, Some("--no-names".to_string()))
    } else if whole_host {
        (
            None,
            Some("the whole host: DNS is not steered through the proxy".to_string()),
        )
    } else if !given.is_empty() {
        (Some(given.to_vec()), None)
    } else {
        match system() {
            Ok(up) if !up.is_empty() => (Some(up.iter().map(ToString::to_string).collect()), None),
            Ok(_) => (None, Some("the system names no DNS resolver".into())),
            Err(e) => (None, Some(format!("no DNS resolver: {e}"))),
        }
    }
}

/// Returns the exit code: the command's when it ended learning by exiting (128 + N for signal
/// N), else 0; 1 when the draft failed its own check.
pub async fn learn(opts: LearnOptions) -> anyhow::Result<i32> {
    if !opts.command.is_empty() && opts.cgroup.is_some() {
        anyhow::bail!("give either --cgroup or a command after `--`, not both");
    }
    // Where the draft goes must be writable before anything is learned, not after.
    if let Some(out) = &opts.output {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            anyhow::bail!(
                "--output {}: {} is not a directory",
                out.display(),
                parent.display()
            );
        }
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let root = cgroup::cgroup2_root()?;

    // Where to observe.
    let mut child_cg = None;
    let (cgroup, observed) = if let Some(dir) = &opts.cgroup {
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("--cgroup {}: no such cgroup", dir.display()))?;
        if !dir.starts_with(&root) || !dir.join("cgroup.procs").exists() {
            anyhow::bail!(
                "--cgroup {}: not a cgroup2 directory under {}",
                dir.display(),
                root.display()
            );
        }
        let what = format!("cgroup {}", dir.display());
        (dir, what)
    } else if !opts.command.is_empty() {
        remove_stale(&root);
        let cg = ChildCgroup::create(&root, EXEC_PREFIX)?;
        let path = cg.path().to_path_buf();
        child_cg = Some(cg);
        (
            path,
            format!("the command `{}`", shell_words(&opts.command)),
        )
    } else {
        (root.clone(), "the whole host".to_string())
    };
    let whole_host = cgroup == root;

    // Names: steered to the proxy for a command or a cgroup; never for the whole host.
    let (upstreams, names_off) = names_plan(
        opts.names,
        whole_host,
        &opts.dns_upstream,
        crate::dns::resolv::system_upstreams,
    );
    if let Some(why) = &names_off {
        info!("learning addresses only: {why}");
    }
    let base = match &opts.base {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --policy {}", path.display()))?;
            let policy = crate::policy::Policy::parse(&path.display().to_string(), &text)
                .map_err(|e| crate::exit::ConfigError(e.to_string()))?;
            crate::policy::compile::CompiledPolicy::compile(&policy)
                .map_err(|e| crate::exit::ConfigError(format!("{e:#}")))?;
            Some(draft::Base::new(&path.display().to_string(), text, &policy))
        }
    };
    let learning_text = match &base {
        None => learning_policy(upstreams.as_deref()),
        Some(b) => b
            .learning_text(upstreams.as_deref())
            .map_err(crate::exit::ConfigError)?,
    };
    let policy_dir = tempfile_dir()?;
    let policy_path = policy_dir.join("learn.toml");
    std::fs::write(&policy_path, learning_text)
        .with_context(|| format!("writing {}", policy_path.display()))?;
    let mut common = opts.common;
    common.policy = Some(policy_path.clone());
    let target = Target {
        root: root.clone(),
        cgroup: cgroup.clone(),
        pins: None,
        socket: None,
        link_pins: None,
    };
    let started_ctl = Controller::start(&common, target, Box::new(tokio::io::sink())).await;
    let _ = std::fs::remove_dir_all(&policy_dir);
    let (mut ctl, _) = match started_ctl {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = &child_cg {
                let _ = cg.remove();
            }
            return Err(e.context("starting to learn"));
        }
    };
    let observations = Arc::new(Mutex::new(Observations::new(upstreams.is_some())));
    ctl.events.set_observer(Some(Arc::clone(&observations)));
    let started = SystemTime::now();
    info!(observing = %observed, cgroup = %cgroup.display(), "learning (audit mode: nothing is refused)");

    let mut child = None;
    if let (Some(cg), Some((program, args))) = (&child_cg, opts.command.split_first()) {
        withhold_inherited_sockets();
        match spawn_in(program, args, cg.procs_fd()?, false) {
            Ok(c) => child = Some(c),
            Err(code) => {
                ctl.finish().await?;
                drop(ctl);
                let _ = cg.remove();
                return Ok(code);
            }
        }
    }
    let pid = child.as_ref().and_then(tokio::process::Child::id);
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until);
    let mut ticker = tokio::time::interval(TICK);
    let mut status = None;
    let ended = loop {
        tokio::select! {
            biased;
            st = async { child.as_mut().expect("guarded").wait().await }, if child.is_some() => {
                status = Some(st.context("waiting for the command")?);
                break Ended::Exited;
            }
            _ = sigint.recv() => {
                forward_from_terminal(pid, Signal::INT);
                break Ended::Interrupted;
            }
            _ = sigterm.recv() => {
                forward(pid, Signal::TERM);
                break Ended::Interrupted;
            }
            _ = sighup.recv() => forward(pid, Signal::HUP),
            _ = &mut sleep_until => {
                forward(pid, Signal::TERM);
                break Ended::Duration;
            }
            _ = ticker.tick() => ctl.tick().await,
            r = ctl.events.readable() => { r?; ctl.events.drain().await?; }
        }
    };
    // The command's last calls are still observed while it winds down (up to GRACE).
    if let (Some(c), None) = (child.as_mut(), status) {
        let wait = tokio::time::timeout(GRACE, async {
            loop {
                tokio::select! {
                    st = c.wait() => return st,
                    r = ctl.events.readable() => {
                        if r.is_ok() { let _ = ctl.events.drain().await; }
                    }
                }
            }
        });
        status = match wait.await {
            Ok(st) => Some(st.context("waiting for the command")?),
            Err(_) => {
                warn!("the command did not exit within 5 s of the end of learning: killed");
                None
            }
        };
    }
    let ended_at = SystemTime::now();
    ctl.events.drain_all().await?;
    ctl.tick().await;
    let counters = ctl.dp.stats().context("reading the datapath's counters")?;
    let names = match &names_off {
        Some(why) => NamesSource::Off(why.clone()),
        None => NamesSource::Proxy {
            queries: counters.dns_steered,
        },
    };
    ctl.finish().await?;
    if let Some(cg) = &child_cg {
        cg.kill_all_and_wait();
    }
    drop(ctl);
    if let Some(cg) = &child_cg
        && let Err(e) = cg.remove()
    {
        warn!(cgroup = %cg.path().display(), error = %e, "could not remove the learning cgroup");
    }

    let obs = observations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let ctx = Context {
        observed,
        started,
        ended: ended_at,
        hostname: crate::events::hostname().to_string(),
        names,
        events_lost: counters.events_lost,
        dns_upstream: if opts.dns_upstream.is_empty() {
            upstreams.unwrap_or_default()
        } else {
            opts.dns_upstream.clone()
        },
        dns_upstream_given: !opts.dns_upstream.is_empty(),
        selectors: opts.selectors,
        min_count: opts.min_count,
        mode: opts.mode,
        base,
    };
    let text = draft::build(&obs, &ctx, &draft::Host);
    if counters.events_lost > 0 {
        warn!(
            lost = counters.events_lost,
            "events were lost while learning: the draft may miss destinations"
        );
    }
    let checked = check_draft(&text, opts.output.as_deref());
    write_draft(&text, opts.output.as_deref())?;
    info!(
        events = obs.events,
        entries = obs.flows.len(),
        ended = ?ended,
        "learning done"
    );
    if let Err(e) = checked {
        tracing::error!("the draft does not pass `egress check` (please report this): {e:#}");
        return Ok(1);
    }
    Ok(match (ended, status) {
        (Ended::Exited, Some(st)) => match (st.code(), st.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        },
        _ => 0,
    })
}

/// The draft must load as `egress check` loads it (executables and users resolved on this host).
fn check_draft(text: &str, output: Option<&Path>) -> anyhow::Result<()> {
    let name = output.map_or_else(|| "<draft>".to_string(), |p| p.display().to_string());
    let policy = crate::policy::Policy::parse(&name, text)?;
    crate::policy::compile::CompiledPolicy::compile(&policy)?;
    Ok(())
}

/// Writes the draft to `output` (whole, through a temporary file renamed over it), or stdout.
fn write_draft(text: &str, output: Option<&Path>) -> anyhow::Result<()> {
    match output {
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Some(path) => {
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
            info!(draft = %path.display(), "policy draft written");
        }
    }
    Ok(())
}

/// A private directory for the learning policy (removed once it is loaded).
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "egress-learn-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

use std::os::unix::fs::DirBuilderExt as _;

/// The command as one would type it (for the draft's header).
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_policy_audits_everything_and_names_only_with_upstreams() {
        let p = crate::policy::Policy::parse("learn", &learning_policy(None)).unwrap();
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.rules.len(), 0);
        assert!(!p.uses_names());
        let up = vec!["127.0.0.2".to_string(), "[fd00::53]:5353".to_string()];
        let p = crate::policy::Policy::parse("learn", &learning_policy(Some(&up))).unwrap();
        assert!(p.uses_names());
        assert_eq!(p.mode, Mode::Audit);
    }

    #[test]
    fn the_whole_host_is_never_steered_and_other_targets_are() {
        let sys = || Ok(vec!["10.0.0.2:53".parse().unwrap()]);
        let given = ["127.0.0.2".to_string()];
        let (up, off) = names_plan(true, true, &given, sys);
        assert_eq!(up, None);
        assert!(off.unwrap().contains("whole host"));
        assert_eq!(names_plan(true, false, &given, sys).0, Some(given.to_vec()));
        assert_eq!(
            names_plan(true, false, &[], sys).0,
            Some(vec!["10.0.0.2:53".to_string()])
        );
        assert_eq!(
            names_plan(false, false, &given, sys).1.as_deref(),
            Some("--no-names")
        );
        let (up, off) = names_plan(true, false, &[], || Ok(Vec::new()));
        assert!(up.is_none() && off.unwrap().contains("no DNS resolver"));
        let (up, off) = names_plan(true, false, &[], || Err(std::io::Error::other("gone")));
        assert!(up.is_none() && off.unwrap().contains("gone"));
    }

    #[test]
    fn commands_are_quoted_for_the_header() {
        let argv = ["sh", "-c", "curl https://x.test/a b", "it's"].map(String::from);
        assert_eq!(
            shell_words(&argv),
            "sh -c 'curl https://x.test/a b' 'it'\\''s'"
        );
    }
}
