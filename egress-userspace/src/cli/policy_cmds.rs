//! `egress check` and `egress explain`: the policy, read and judged without the kernel.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use egress_common::{Caller, ExeKey, ScopeBits};

use crate::{
    api::client,
    policy::{
        self, Protocol,
        compile::CompiledPolicy,
        explain as why,
        resolve::{self, HostResolver, Resolver as _},
        scopes::scoped_names,
    },
    report::GrantRow,
};

/// `egress explain`'s caller: who the scoped entries (`executables`, `users`, `groups`,
/// `cgroups`) are judged against. A key not given is a value no scope names.
#[derive(clap::Args, Debug, Default)]
pub struct CallerArgs {
    /// The caller's executable: its identity (device, inode) is what is matched.
    #[arg(long, value_name = "PATH")]
    exe: Option<PathBuf>,
    /// The caller's (real) user, a name or a uid.
    #[arg(long, value_name = "NAME|UID")]
    user: Option<String>,
    /// The caller's (real, primary) group, a name or a gid.
    #[arg(long, value_name = "NAME|GID")]
    group: Option<String>,
    /// The caller's cgroup: relative to the cgroup2 root, or absolute under it.
    #[arg(long, value_name = "PATH", conflicts_with = "pod_namespace")]
    cgroup: Option<PathBuf>,
    /// The caller is in a pod of this namespace (for `pods` selectors; with `--pod-label`).
    #[arg(long = "pod-namespace", value_name = "NAMESPACE")]
    pod_namespace: Option<String>,
    /// A label of the caller's pod, `KEY=VALUE` (repeatable).
    #[arg(
        long = "pod-label",
        value_name = "KEY=VALUE",
        requires = "pod_namespace"
    )]
    pod_labels: Vec<String>,
}

impl CallerArgs {
    fn given(&self) -> bool {
        self.exe.is_some()
            || self.user.is_some()
            || self.group.is_some()
            || self.cgroup.is_some()
            || self.pod_namespace.is_some()
    }

    /// The scopes of this caller under `compiled`, with the same resolution as the hooks.
    fn scopes(&self, compiled: &CompiledPolicy) -> anyhow::Result<ScopeBits> {
        if !self.given() {
            return Ok(ScopeBits::EVERYONE);
        }
        let host = HostResolver::default();
        let id = |v: &Option<String>, lookup: &dyn Fn(&str) -> Result<u32, String>, flag: &str| {
            match v {
                None => Ok(u32::MAX),
                Some(s) => match s.parse::<u32>() {
                    Ok(n) => Ok(n),
                    Err(_) => lookup(s).map_err(|m| anyhow::anyhow!("--{flag} {s}: {m}")),
                },
            }
        };
        let caller = Caller {
            exe: match &self.exe {
                Some(p) => resolve::exe_key(p)
                    .map_err(|m| anyhow::anyhow!("--exe {}: {m}", p.display()))?,
                None => ExeKey::default(),
            },
            uid: id(&self.user, &|n| host.user(n), "user")?,
            gid: id(&self.group, &|n| host.group(n), "group")?,
        };
        let ancestors = match &self.cgroup {
            Some(p) => {
                let root = crate::sys::cgroup::find_cgroup2_root()
                    .ok_or_else(|| anyhow::anyhow!("--cgroup: no cgroup2 hierarchy is mounted"))?;
                resolve::cgroup_ancestors(&root, p)
                    .map_err(|m| anyhow::anyhow!("--cgroup {}: {m}", p.display()))?
            }
            None => Vec::new(),
        };
        let Some(namespace) = &self.pod_namespace else {
            return Ok(compiled.scopes.resolve(&caller, &ancestors));
        };
        // A pod as the controller sees one: its pod-level cgroup (a stand-in id, at level 1)
        // joins the cgroup table with the scopes its namespace and labels select.
        let mut labels = std::collections::BTreeMap::new();
        for l in &self.pod_labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--pod-label {l}: expected KEY=VALUE"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        const POD_CGROUP: u64 = u64::MAX - 1;
        let (entries, levels) =
            compiled
                .scopes
                .pod_entries([(namespace.as_str(), &labels, POD_CGROUP, 1)]);
        let scopes = compiled.scopes.with_pods(&entries, levels);
        Ok(scopes.resolve(&caller, &[0, POD_CGROUP]))
    }
}

/// The policy `explain` judges by: `path` (a file or a directory of fragments), else the one in
/// force in the controller on `socket`.
pub fn load_policy(
    path: Option<&Path>,
    socket: &Path,
) -> anyhow::Result<(policy::Policy, CompiledPolicy)> {
    use anyhow::Context as _;
    if let Some(p) = path {
        return policy::load(Some(p));
    }
    let text = client::policy(socket).with_context(|| {
        format!(
            "without --policy, explain asks the running controller on {} for its policy, and none answered: give --policy FILE, or --socket PATH",
            socket.display()
        )
    })?;
    let p = policy::Policy::from_fragments(&text.source, &text.files)
        .context("reading the controller's policy")?
        .with_feeds(&policy::feeds::FeedStore::reader(text.feed_cache.clone()))
        .context("reading the controller's blocklists")?;
    let c =
        CompiledPolicy::compile(&p).with_context(|| format!("compiling policy {}", p.source))?;
    Ok((p, c))
}

/// One file's result under `check -o json`.
#[derive(serde::Serialize)]
struct CheckRow {
    file: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<CheckSummary>,
    warnings: Vec<String>,
}

#[derive(serde::Serialize)]
struct CheckSummary {
    mode: String,
    default: String,
    allow_loopback: bool,
    services: usize,
    blocks: usize,
    alerts: usize,
    prefixes: usize,
    hash: String,
    /// The `[[blocklist]]` feeds as read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    feeds: Vec<policy::feeds::FeedStatus>,
}

/// Validates every file (or directory of fragments) and prints a summary of each (with `json`,
/// a JSON array of one object per file); 1 if any is invalid.
pub fn check(files: &[PathBuf], json: bool) -> u8 {
    let mut failed = 0;
    if json {
        let rows: Vec<CheckRow> = files
            .iter()
            .map(|f| match policy::load(Some(f)) {
                Ok((p, c)) => CheckRow {
                    file: f.display().to_string(),
                    ok: true,
                    error: None,
                    warnings: p
                        .warnings
                        .iter()
                        .cloned()
                        .chain(
                            c.scope_overlaps()
                                .iter()
                                .map(|w| format!("{}: {w}", f.display())),
                        )
                        .collect(),
                    summary: Some(CheckSummary {
                        mode: p.mode.to_string(),
                        default: p.default.to_string(),
                        allow_loopback: p.allow_loopback,
                        services: c.services,
                        blocks: c.blocks,
                        alerts: c.alerts,
                        prefixes: c.prefix_count(),
                        hash: p.hash.clone(),
                        feeds: p.feeds.clone(),
                    }),
                },
                Err(e) => {
                    failed += 1;
                    CheckRow {
                        file: f.display().to_string(),
                        ok: false,
                        error: Some(format!("{e:#}")),
                        summary: None,
                        warnings: Vec::new(),
                    }
                }
            })
            .collect();
        match serde_json::to_string_pretty(&rows) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        }
        return u8::from(failed > 0);
    }
    for f in files {
        match policy::load(Some(f)) {
            Ok((p, c)) => {
                for w in &p.warnings {
                    eprintln!("warning: {w}");
                }
                for w in c.scope_overlaps() {
                    eprintln!("warning: {}: {w}", f.display());
                }
                println!(
                    "{}: ok: mode {}, default {}, loopback {}: {} services, {} blocks, {} alerts, {} prefixes ({} IPv4, {} IPv6), {} rule sets, {} host patterns; dns: {}",
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
                    c.rulesets.len(),
                    p.host_patterns(),
                    p.dns,
                );
                for b in &p.feeds {
                    println!(
                        "  blocklist {} ({}, {}): {} entries, {} lines rejected{}",
                        b.name,
                        b.format,
                        b.source,
                        b.entries,
                        b.rejected,
                        b.last_error
                            .as_ref()
                            .map_or(String::new(), |e| format!(" ({e})"))
                    );
                }
                if c.scopes.keys != 0 {
                    println!(
                        "  scopes: {} executables, {} users, {} groups, {} cgroups named",
                        c.scopes.exe_paths.len(),
                        c.scopes.uid.len(),
                        c.scopes.gid.len(),
                        c.scopes.cgroup_paths.len(),
                    );
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("{e:#}");
            }
        }
    }
    u8::from(failed > 0)
}

pub fn explain(
    (policy, compiled): (policy::Policy, CompiledPolicy),
    dest: IpAddr,
    port: Option<u16>,
    protocol: Protocol,
    json: bool,
    caller: &CallerArgs,
) -> anyhow::Result<()> {
    let scopes = caller.scopes(&compiled)?;
    let scoped = scoped_names(&policy.rules);
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
        .map(|&p| why::explain_as(&policy, &compiled, dest, p, protocol, &scopes))
        .collect();
    let uniform = all.iter().all(|e| {
        e.verdict == all[0].verdict && e.rule == all[0].rule && e.audit_entry == all[0].audit_entry
    });
    let note = (!scoped.is_empty() && !caller.given()).then(|| {
        format!(
            "the policy has scoped entries ({}): this is the verdict for a caller in none of their scopes; give --exe, --user, --group or --cgroup to judge a caller",
            scoped.join(", ")
        )
    });
    if json {
        if uniform {
            let mut v = serde_json::to_value(&all[0])?;
            if !port_given {
                v["port"] = serde_json::Value::String("any".into());
            }
            if let Some(n) = &note {
                v["note"] = serde_json::Value::String(n.clone());
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
        if let Some(a) = &e.audit_entry {
            println!(
                "  audit: `{a}` (mode = \"audit\") would refuse this call; it is reported as an audit event"
            );
        }
    } else {
        println!("{dest}/{protocol}: the verdict depends on the port (give --port N)");
        for line in why::rule_table(&compiled, dest) {
            println!("{line}");
        }
    }
    if let Some(n) = note {
        println!("  note: {n}");
    }
    Ok(())
}

/// `egress explain NAME`: which service or block covers a DNS name.
/// `explain NAME --json`: the policy's explanation, and with a controller running, the name's
/// live grants (`live`, absent without one).
#[derive(serde::Serialize)]
struct NameJson<'a> {
    #[serde(flatten)]
    explanation: &'a why::NameExplanation,
    #[serde(skip_serializing_if = "Option::is_none")]
    live: Option<&'a [GrantRow]>,
}

pub fn explain_name(
    (policy, _): (policy::Policy, CompiledPolicy),
    name: &str,
    json: bool,
    socket: &Path,
) -> anyhow::Result<()> {
    let e = why::explain_name(&policy, name).map_err(|problem| {
        anyhow::anyhow!(
            "`{name}` is neither an address nor a DNS name: it {problem}",
            name = name.escape_debug()
        )
    })?;
    // What the running controller learned for the name, if one answers (the policy file given
    // may not be the one in force: these are the controller's facts, not the file's).
    let live: Option<Vec<GrantRow>> = client::grants(socket, true).ok().map(|rows| {
        rows.into_iter()
            .filter(|r| r.name.as_deref() == Some(e.name.as_str()))
            .collect()
    });
    if json {
        let out = NameJson {
            explanation: &e,
            live: live.as_deref(),
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    match (&e.rule_kind, &e.rule) {
        (Some(kind), Some(rule)) => println!("{} {}: by {kind} `{rule}`", e.verdict, e.name),
        _ => println!("{} {}: no service or block covers it", e.verdict, e.name),
    }
    println!("  {}", e.reason);
    println!("  dns: {}", e.dns);
    for r in e.covered_by.iter().skip(1) {
        println!(
            "  also covered by {} `{}` (line {}) through `{}`, on {} {}",
            r.rule_kind, r.rule, r.line, r.pattern, r.protocols, r.ports
        );
    }
    match live.as_deref() {
        None => {}
        Some([]) => println!("  now: the running controller holds no live answer for it"),
        Some(rows) => {
            println!("  now, in the running controller:");
            for r in rows {
                println!(
                    "    {} for cgroup {} ({}, {} s left, asked by {} {})",
                    r.address,
                    r.cgroup_path
                        .clone()
                        .unwrap_or_else(|| r.cgroup_id.to_string()),
                    match &r.service {
                        Some(s) if r.granted => format!("granted by `{s}`"),
                        _ => "resolved, not granted".to_string(),
                    },
                    r.expires_in_secs,
                    r.comm.as_deref().unwrap_or("-"),
                    r.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
                );
            }
        }
    }
    Ok(())
}
