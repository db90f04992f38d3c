//! The policy draft `egress learn` writes (pure: observations in, TOML text out).
//!
//! Grouped the way a person writes a policy: per caller (executable and user, as selectors),
//! per destination (the name it was resolved from, else the address), the protocols and ports
//! it used. Destinations with the same caller, protocols and ports share one `[[service]]`; a
//! destination used over TCP and UDP on the same ports is one entry with both protocols. Every
//! entry says in a comment how often it was used and when; the header says what was observed,
//! when, for how long, and whether anything may be missing (events lost, tallies full).
//!
//! The draft allows exactly what was seen: `/32` and `/128` addresses (bare), exact names, the
//! ports used (consecutive ones written as a range), nothing else; `default = "deny"`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use super::{Dest, FlowKey, Observations, Proto, Tally, Who};

/// The most port ranges written for one service; beyond, the service allows every port (and
/// says so): the kernel folds at most 64 ranges per destination prefix.
pub const MAX_PORT_RANGES: usize = 32;

/// The most distinct scopes a policy may have (`policy::scopes`); a draft that would need more
/// is written without selectors.
const MAX_SCOPES: usize = 255;

/// What the host says about selectors: whether an executable can be one, and users' names.
pub trait HostFacts {
    /// Ok when `path` can stand in `executables` (exists, regular, executable, on a file system
    /// whose device numbers the kernel shares); else why not.
    fn executable(&self, path: &str) -> Result<(), String>;
    /// The user name of `uid` (NSS), when it has one.
    fn user_name(&self, uid: u32) -> Option<String>;
}

/// The real host: the policy compiler's own checks.
pub struct Host;

impl HostFacts for Host {
    fn executable(&self, path: &str) -> Result<(), String> {
        use crate::policy::resolve::{HostResolver, Resolver as _};
        HostResolver::default()
            .executable(std::path::Path::new(path))
            .map(|_| ())
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        crate::sys::nss::user_name(uid)
    }
}

/// Which selectors entries get (`learn --by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectorsWanted {
    pub executables: bool,
    pub users: bool,
}

/// Where names came from while learning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamesSource {
    /// DNS was steered to the proxy; `queries` were steered.
    Proxy { queries: u64 },
    /// Not used, and why.
    Off(String),
}

/// Everything besides the observations that the draft says or depends on.
#[derive(Debug, Clone)]
pub struct Context {
    /// What was observed: "the command `...`", "cgroup ...", "the whole host".
    pub observed: String,
    pub started: SystemTime,
    pub ended: SystemTime,
    pub hostname: String,
    pub names: NamesSource,
    /// Events the kernel could not put in its ring.
    pub events_lost: u64,
    /// Upstreams to write in `[dns]` (the ones given to `learn`, or the system's when the draft
    /// needs the proxy and names none).
    pub dns_upstream: Vec<String>,
    /// Whether `dns_upstream` was given explicitly (written whenever the draft has `[dns]`).
    pub dns_upstream_given: bool,
    pub selectors: SelectorsWanted,
    /// Entries seen fewer times are left out (listed in a comment).
    pub min_count: u64,
    /// The draft's `mode`.
    pub mode: crate::policy::Mode,
    /// Learning started from this policy (`--policy`): the draft is it, then the services
    /// learned.
    pub base: Option<Base>,
}

/// The base policy a draft extends (`learn --policy`).
#[derive(Debug, Clone, Default)]
pub struct Base {
    /// Its path, for the comments.
    pub path: String,
    /// Its text, kept as it is (comments included).
    pub text: String,
    /// The names it takes (rules and alerts): learned services get others.
    pub names: Vec<String>,
    /// Whether it has a `[dns]` / `[sockets]` table (the draft cannot add one then).
    pub has_dns: bool,
    pub has_sockets: bool,
}

impl Base {
    /// `text` of the policy at `path` (already loaded and validated as `policy`).
    pub fn new(path: &str, text: String, policy: &crate::policy::Policy) -> Base {
        let table: toml::Table = text.parse().unwrap_or_default();
        Base {
            path: path.to_string(),
            names: policy
                .rules
                .iter()
                .map(|r| r.name.clone())
                .chain(policy.alerts.iter().map(|a| a.name.clone()))
                .collect(),
            has_dns: table.contains_key("dns"),
            has_sockets: table.contains_key("sockets"),
            text,
        }
    }

    /// The learning policy: this one in audit mode, with `upstreams` for the proxy unless it
    /// names its own (None: as it is).
    pub fn learning_text(&self, upstreams: Option<&[String]>) -> Result<String, String> {
        let mut table: toml::Table = self
            .text
            .parse()
            .map_err(|e| format!("{}: {e}", self.path))?;
        table.insert("mode".into(), toml::Value::String("audit".into()));
        if let Some(up) = upstreams {
            let dns = table
                .entry("dns")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(dns) = dns.as_table_mut()
                && !dns.contains_key("upstream")
            {
                dns.insert(
                    "upstream".into(),
                    toml::Value::Array(up.iter().cloned().map(toml::Value::String).collect()),
                );
            }
        }
        toml::to_string(&table).map_err(|e| e.to_string())
    }
}

/// A caller as the draft writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Scope {
    exe: Option<String>,
    user: Option<User>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum User {
    Name(String),
    Uid(u32),
}

impl Scope {
    fn is_scoped(&self) -> bool {
        self.exe.is_some() || self.user.is_some()
    }
}

/// One `[[service]]` of the draft.
struct Entry {
    scope: Scope,
    protos: Vec<Proto>,
    ports: BTreeSet<u16>,
    /// Destinations with what was seen of each (names first, then addresses).
    dests: BTreeMap<Dest, Tally>,
    /// Per protocol and port, what was seen (for the entry's comment).
    uses: BTreeMap<(Proto, u16), Tally>,
    /// Why a selector the caller had is not used.
    notes: BTreeSet<String>,
}

/// Writes the draft.
pub fn build(obs: &Observations, ctx: &Context, host: &dyn HostFacts) -> String {
    // 1. Each flow's caller as a scope, and what was seen under it.
    let mut left_out: Vec<(&FlowKey, &Tally)> = Vec::new();
    let mut port_zero = 0u64;
    let mut exe_checks: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    let mut by_scope_dest: BTreeMap<(Scope, Dest), BTreeMap<(Proto, u16), Tally>> = BTreeMap::new();
    let mut notes_of: BTreeMap<Scope, BTreeSet<String>> = BTreeMap::new();
    for (key, tally) in &obs.flows {
        if tally.total() < ctx.min_count {
            left_out.push((key, tally));
            continue;
        }
        if !key.proto.is_icmp() && key.port == 0 {
            port_zero += tally.total();
            continue;
        }
        let (scope, notes) = scope_of(&key.who, ctx.selectors, host, &mut exe_checks);
        notes_of.entry(scope.clone()).or_default().extend(notes);
        by_scope_dest
            .entry((scope, key.dest.clone()))
            .or_default()
            .entry((key.proto, key.port))
            .or_default()
            .merge(tally);
    }
    // Too many scopes for the kernel: no selectors at all (and the header says so).
    let scopes: BTreeSet<&Scope> = by_scope_dest
        .keys()
        .map(|(s, _)| s)
        .filter(|s| s.is_scoped())
        .collect();
    let unscoped_all = scopes.len() > MAX_SCOPES;
    if unscoped_all {
        let mut merged: BTreeMap<(Scope, Dest), BTreeMap<(Proto, u16), Tally>> = BTreeMap::new();
        for ((_, dest), uses) in by_scope_dest {
            let m = merged.entry((Scope::default(), dest)).or_default();
            for (k, t) in uses {
                m.entry(k).or_default().merge(&t);
            }
        }
        by_scope_dest = merged;
        notes_of.clear();
    }

    // 2. Per (scope, destination): protocols that used the same ports go together.
    // 3. Destinations with the same scope, protocols and ports share a service.
    let mut entries: BTreeMap<(Scope, Vec<Proto>, BTreeSet<u16>), Entry> = BTreeMap::new();
    for ((scope, dest), uses) in &by_scope_dest {
        let mut ports_of: BTreeMap<Proto, BTreeSet<u16>> = BTreeMap::new();
        for (proto, port) in uses.keys() {
            let set = ports_of.entry(*proto).or_default();
            if !proto.is_icmp() {
                set.insert(*port);
            }
        }
        let mut protos_of: BTreeMap<BTreeSet<u16>, Vec<Proto>> = BTreeMap::new();
        for (proto, ports) in ports_of {
            protos_of.entry(ports).or_default().push(proto);
        }
        for (ports, protos) in protos_of {
            let e = entries
                .entry((scope.clone(), protos.clone(), ports.clone()))
                .or_insert_with(|| Entry {
                    scope: scope.clone(),
                    protos: protos.clone(),
                    ports: ports.clone(),
                    dests: BTreeMap::new(),
                    uses: BTreeMap::new(),
                    notes: notes_of.get(scope).cloned().unwrap_or_default(),
                });
            let d = e.dests.entry(dest.clone()).or_default();
            for ((proto, port), t) in uses {
                if protos.contains(proto) {
                    d.merge(t);
                    e.uses.entry((*proto, *port)).or_default().merge(t);
                }
            }
        }
    }

    let uses_hosts = entries
        .values()
        .any(|e| e.dests.keys().any(|d| matches!(d, Dest::Host(_))));
    let mut out = String::new();
    header(&mut out, obs, ctx, unscoped_all, port_zero);
    let mut taken: BTreeSet<String> = BTreeSet::new();
    match &ctx.base {
        None => {
            let _ = writeln!(out, "mode = {}", toml_str(&ctx.mode.to_string()));
            out.push_str("default = \"deny\"\n");
            out.push_str("# Loopback is allowed without rules (and was not observed).\n");
            out.push_str("allow_loopback = true\n");
            sockets(&mut out, obs);
            dns(&mut out, ctx, uses_hosts);
        }
        Some(base) => {
            taken.extend(base.names.iter().cloned());
            let _ = writeln!(
                out,
                "# ---- The base policy, {}, as it is (its mode stands; --mode is not applied) ----",
                comment(&base.path)
            );
            out.push_str(&base.text);
            if !base.text.ends_with('\n') {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "\n# ---- Learned by `egress learn`: what the base policy did not allow ----"
            );
            if base.has_sockets {
                for (rule, t) in &obs.sockets {
                    let _ = writeln!(
                        out,
                        "# {rule} was used ({}): allow it in the base's [sockets] if meant.",
                        counts_sockets(t)
                    );
                }
            } else {
                sockets(&mut out, obs);
            }
            if base.has_dns {
                let wanted = ctx.dns_upstream_given;
                if wanted {
                    out.push_str(
                        "# The base policy has its own [dns]: its upstreams are used as they are.\n",
                    );
                }
            } else {
                dns(&mut out, ctx, uses_hosts);
            }
        }
    }
    if uses_hosts && obs.dns_over_tls > 0 {
        let _ = writeln!(
            out,
            "\n# DNS over TLS (port 853) was used {} times: a policy that uses names blocks it \
             everywhere (`dns-over-tls`), whatever a service below says.",
            obs.dns_over_tls
        );
    }
    if entries.is_empty() {
        out.push_str("\n# Nothing was observed that needs a service.\n");
    }
    for e in entries.values() {
        service(&mut out, e, &mut taken);
    }
    if !left_out.is_empty() {
        let _ = writeln!(
            out,
            "\n# Seen fewer than {} times, left out ({}):",
            ctx.min_count,
            left_out.len()
        );
        for (k, t) in left_out {
            let _ = writeln!(
                out,
                "#   {} {}/{} by {}: {}",
                comment(&dest_text(&k.dest)),
                k.proto.as_str(),
                k.port,
                comment(&who_text(&k.who)),
                counts(t)
            );
        }
    }
    out
}

/// The scope of a caller, and notes on selectors it could not get.
fn scope_of(
    who: &Who,
    wanted: SelectorsWanted,
    host: &dyn HostFacts,
    checks: &mut BTreeMap<String, Result<(), String>>,
) -> (Scope, Vec<String>) {
    let mut notes = Vec::new();
    let exe = match (&who.exe, wanted.executables) {
        (Some(path), true) => {
            if let Some(stripped) = path.strip_suffix(" (deleted)") {
                notes.push(format!(
                    "executable {stripped} was replaced or removed while it ran: not a selector"
                ));
                None
            } else {
                match checks
                    .entry(path.clone())
                    .or_insert_with(|| host.executable(path))
                {
                    Ok(()) => Some(path.clone()),
                    Err(why) => {
                        notes.push(format!("executable {path} {why}: not a selector"));
                        None
                    }
                }
            }
        }
        (None, true) if who.uid.is_some() => {
            notes.push(
                "executable unknown (the process exited before it was read): not a selector".into(),
            );
            None
        }
        _ => None,
    };
    let user = match (who.uid, wanted.users) {
        (Some(uid), true) => Some(match host.user_name(uid) {
            Some(name) => User::Name(name),
            None => User::Uid(uid),
        }),
        _ => None,
    };
    (Scope { exe, user }, notes)
}

fn header(out: &mut String, obs: &Observations, ctx: &Context, unscoped_all: bool, port_zero: u64) {
    let secs = ctx
        .ended
        .duration_since(ctx.started)
        .unwrap_or_default()
        .as_secs();
    let _ = writeln!(
        out,
        "# Policy draft written by `egress learn`: it allows exactly what was observed.\n\
         # Review it before enforcing it (`egress check`, `egress explain`).\n\
         # Observed: {}, on {}\n\
         # From {} to {} ({})",
        comment(&ctx.observed),
        comment(&ctx.hostname),
        humantime::format_rfc3339_seconds(ctx.started),
        humantime::format_rfc3339_seconds(ctx.ended),
        humantime::format_duration(Duration::from_secs(secs)),
    );
    let (mut connects, mut datagrams, mut packets) = (0, 0, 0);
    for t in obs.flows.values() {
        connects += t.connects;
        datagrams += t.datagrams;
        packets += t.packets;
    }
    let _ = writeln!(
        out,
        "# Events: {} (connections: {}, datagrams: {}, packets judged at TC: {}, sockets: {})",
        obs.events,
        connects,
        datagrams,
        packets,
        obs.sockets.values().map(Tally::total).sum::<u64>()
    );
    match &ctx.names {
        NamesSource::Proxy { queries } => {
            let _ = writeln!(
                out,
                "# Names: from egress's DNS proxy (DNS calls steered to it: {queries}); an address \
                 reached without a lookup is listed as an address."
            );
        }
        NamesSource::Off(why) => {
            let _ = writeln!(
                out,
                "# Names: not learned ({}): addresses only.",
                comment(why)
            );
        }
    }
    let _ = writeln!(out, "# Events lost: {}", ctx.events_lost);
    if ctx.events_lost > 0 {
        let _ = writeln!(
            out,
            "# WARNING: the kernel's event ring was full {} times: destinations may be missing \
             from this draft. Learn again under less load.",
            ctx.events_lost
        );
    }
    if obs.overflow > 0 {
        let _ = writeln!(
            out,
            "# WARNING: {} events were not tallied ({} distinct destinations and ports were \
             already kept): destinations may be missing from this draft.",
            obs.overflow,
            super::MAX_FLOWS
        );
    }
    if unscoped_all {
        let _ = writeln!(
            out,
            "# WARNING: more than {MAX_SCOPES} distinct callers: entries are not scoped to \
             executables or users."
        );
    }
    if port_zero > 0 {
        let _ = writeln!(
            out,
            "# {port_zero} calls to port 0 (which never connect) are not listed."
        );
    }
    for (why, n) in &obs.skipped {
        let _ = writeln!(out, "# Not a service: {n} events ({})", comment(why));
    }
    out.push('\n');
}

fn sockets(out: &mut String, obs: &Observations) {
    let keys: Vec<(&str, &Tally)> = obs
        .sockets
        .iter()
        .filter_map(|(rule, t)| {
            let key = rule.strip_prefix("sockets.")?;
            matches!(key, "raw" | "other" | "packet" | "icmp").then_some((key, t))
        })
        .collect();
    if keys.is_empty() {
        return;
    }
    out.push_str(
        "\n# Sockets the hooks cannot judge by destination were used: allowed as observed.\n\
         # Raw and packet sockets can reach any destination: narrow this if you can.\n[sockets]\n",
    );
    for (key, t) in keys {
        let _ = writeln!(out, "{key} = \"allow\"  # {}", counts_sockets(t));
    }
}

fn dns(out: &mut String, ctx: &Context, uses_hosts: bool) {
    let queries = matches!(ctx.names, NamesSource::Proxy { queries } if queries > 0);
    // Names in the draft turn the proxy on by themselves. Without names, queries that were
    // steered during learning still need it (else they are judged as traffic to the resolver,
    // which the draft does not list): naming the upstreams turns it on.
    let write_upstream = ctx.dns_upstream_given || (!uses_hosts && queries);
    if !write_upstream || ctx.dns_upstream.is_empty() {
        return;
    }
    out.push_str("\n[dns]\n");
    if !ctx.dns_upstream_given {
        out.push_str(
            "# The system's resolvers when learning: names resolve through egress's proxy.\n",
        );
    }
    let list: Vec<String> = ctx.dns_upstream.iter().map(|u| toml_str(u)).collect();
    let _ = writeln!(out, "upstream = [{}]", list.join(", "));
}

fn service(out: &mut String, e: &Entry, taken: &mut BTreeSet<String>) {
    let name = unique_name(e, taken);
    out.push('\n');
    let who = match (&e.scope.exe, &e.scope.user) {
        (None, None) => "anyone".to_string(),
        (exe, user) => {
            let mut parts = Vec::new();
            if let Some(x) = exe {
                parts.push(x.clone());
            }
            if let Some(u) = user {
                parts.push(match u {
                    User::Name(n) => format!("user {n}"),
                    User::Uid(u) => format!("uid {u}"),
                });
            }
            parts.join(" as ")
        }
    };
    let total: Tally = e.dests.values().fold(Tally::default(), |mut acc, t| {
        acc.merge(t);
        acc
    });
    let _ = writeln!(out, "# {}: {}", comment(&who), counts(&total));
    for ((proto, port), t) in &e.uses {
        if proto.is_icmp() {
            let _ = writeln!(out, "#   {}: {}", proto.as_str(), counts(t));
        } else {
            let _ = writeln!(out, "#   {}/{}: {}", proto.as_str(), port, counts(t));
        }
    }
    for n in &e.notes {
        let _ = writeln!(out, "# Note: {}", comment(n));
    }
    out.push_str("[[service]]\n");
    let _ = writeln!(out, "name = {}", toml_str(&name));
    let hosts: Vec<(&String, &Tally)> = e
        .dests
        .iter()
        .filter_map(|(d, t)| match d {
            Dest::Host(h) => Some((h, t)),
            Dest::Addr(_) => None,
        })
        .collect();
    let addrs: Vec<(String, &Tally)> = e
        .dests
        .iter()
        .filter_map(|(d, t)| match d {
            Dest::Addr(a) => Some((a.to_string(), t)),
            Dest::Host(_) => None,
        })
        .collect();
    if !hosts.is_empty() {
        out.push_str("hosts = [\n");
        for (h, t) in hosts {
            let via: Vec<String> = t.addrs.iter().map(ToString::to_string).collect();
            let via = if via.is_empty() {
                String::new()
            } else {
                format!(" (as {})", via.join(", "))
            };
            let _ = writeln!(out, "    {},  # {}{via}", toml_str(h), counts(t));
        }
        out.push_str("]\n");
    }
    if !addrs.is_empty() {
        out.push_str("destinations = [\n");
        for (a, t) in addrs {
            let _ = writeln!(out, "    {},  # {}", toml_str(&a), counts(t));
        }
        out.push_str("]\n");
    }
    if !e.ports.is_empty() {
        let ranges = port_ranges(&e.ports);
        if ranges.len() > MAX_PORT_RANGES {
            let _ = writeln!(
                out,
                "# {} distinct ports were used ({} ranges): every port is allowed.",
                e.ports.len(),
                ranges.len()
            );
        } else {
            let _ = writeln!(out, "ports = [{}]", ranges.join(", "));
        }
    }
    let protos: Vec<String> = e.protos.iter().map(|p| toml_str(p.as_str())).collect();
    let _ = writeln!(out, "protocols = [{}]", protos.join(", "));
    if let Some(exe) = &e.scope.exe {
        let _ = writeln!(out, "executables = [{}]", toml_str(exe));
    }
    match &e.scope.user {
        Some(User::Name(n)) => {
            let _ = writeln!(out, "users = [{}]", toml_str(n));
        }
        Some(User::Uid(u)) => {
            let _ = writeln!(out, "users = [{u}]");
        }
        None => {}
    }
}

/// `[80, "8000-8002"]` items: consecutive ports as one range.
fn port_ranges(ports: &BTreeSet<u16>) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = ports.iter().copied().peekable();
    while let Some(lo) = it.next() {
        let mut hi = lo;
        while it.peek() == Some(&(hi.wrapping_add(1))) && hi < u16::MAX {
            hi = it.next().unwrap_or(hi);
        }
        out.push(if lo == hi {
            lo.to_string()
        } else {
            format!("\"{lo}-{hi}\"")
        });
    }
    out
}

/// A readable, unique service name: the executable's file name and the first destination
/// (`curl-api-example-com`), `-2`, `-3`... when taken.
fn unique_name(e: &Entry, taken: &mut BTreeSet<String>) -> String {
    let who = e
        .scope
        .exe
        .as_deref()
        .and_then(|p| p.rsplit('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("any");
    let first = e.dests.keys().next().map(dest_text).unwrap_or_default();
    let more = if e.dests.len() > 1 { "-and-more" } else { "" };
    let base = slug(&format!("{who}-{first}{more}"));
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) || egress_common::user::BUILTIN_RULE_NAMES.contains(&name.as_str())
    {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// Lowercase letters, digits, `-` and `_`; anything else becomes `-` (runs folded).
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "learned".into()
    } else {
        out
    }
}

fn dest_text(d: &Dest) -> String {
    match d {
        Dest::Host(h) => h.clone(),
        Dest::Addr(a) => a.to_string(),
    }
}

fn who_text(w: &Who) -> String {
    match (&w.exe, w.uid) {
        (None, None) => "anyone".into(),
        (Some(x), Some(u)) => format!("{x} (uid {u})"),
        (Some(x), None) => x.clone(),
        (None, Some(u)) => format!("uid {u}"),
    }
}

/// "3 connections, 1 datagram, first 11:40:01Z, last 11:45:10Z".
fn counts(t: &Tally) -> String {
    let mut parts = Vec::new();
    for (n, one, many) in [
        (t.connects, "connection", "connections"),
        (t.datagrams, "datagram", "datagrams"),
        (t.packets, "packet", "packets"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {}", if n == 1 { one } else { many }));
        }
    }
    let mut s = parts.join(", ");
    let _ = write!(
        s,
        ", first {}, last {}",
        short_ts(&t.first),
        short_ts(&t.last)
    );
    s
}

fn counts_sockets(t: &Tally) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut s = match (t.connects, t.packets) {
        (c, 0) => plural(c, "socket", "sockets"),
        (0, p) => plural(p, "frame", "frames"),
        (c, p) => format!(
            "{}, {}",
            plural(c, "socket", "sockets"),
            plural(p, "frame", "frames")
        ),
    };
    let _ = write!(
        s,
        ", first {}, last {}",
        short_ts(&t.first),
        short_ts(&t.last)
    );
    s
}

/// An event's RFC 3339 time to the second (`2026-11-27T11:40:01Z`).
fn short_ts(ts: &str) -> String {
    match ts.split_once('.') {
        Some((secs, _)) => format!("{secs}Z"),
        None => ts.to_string(),
    }
}

/// Text safe in a TOML comment: one line, no control characters.
fn comment(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A TOML basic string, escaped.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        learn::tests::event,
        policy::{Mode, Policy},
    };

    struct Fake;
    impl HostFacts for Fake {
        fn executable(&self, path: &str) -> Result<(), String> {
            if path.starts_with("/usr/bin/") {
                Ok(())
            } else {
                Err("is on overlayfs".into())
            }
        }
        fn user_name(&self, uid: u32) -> Option<String> {
            (uid == 0).then(|| "root".to_string())
        }
    }

    fn ctx() -> Context {
        Context {
            observed: "the command `probe`".into(),
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            ended: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_090),
            hostname: "host".into(),
            names: NamesSource::Proxy { queries: 2 },
            events_lost: 0,
            dns_upstream: vec!["127.0.0.2:53".into()],
            dns_upstream_given: true,
            selectors: SelectorsWanted {
                executables: true,
                users: true,
            },
            min_count: 1,
            mode: Mode::Enforce,
            base: None,
        }
    }

    fn obs(events: &[crate::events::JsonEvent]) -> Observations {
        let mut o = Observations::new(true);
        for e in events {
            o.record(e);
        }
        o
    }

    /// Parses the draft as `egress check` does (without the host's executables and users).
    fn parse(text: &str) -> Policy {
        Policy::parse("draft.toml", text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn named(mut e: crate::events::JsonEvent, host: &str) -> crate::events::JsonEvent {
        e.host = Some(host.into());
        e
    }

    #[test]
    fn grouped_by_caller_then_ports_with_names_where_known() {
        let mut other_user = event("connect4", "tcp", "198.18.0.9", 443);
        other_user.uid = 4242;
        let o = obs(&[
            named(
                event("connect4", "tcp", "198.18.0.2", 443),
                "api.example.test",
            ),
            named(
                event("connect4", "tcp", "198.18.0.2", 443),
                "api.example.test",
            ),
            named(
                event("connect4", "tcp", "198.18.0.5", 443),
                "cdn.example.test",
            ),
            event("connect4", "tcp", "198.18.0.3", 80),
            event("connect4", "tcp", "198.18.0.3", 81),
            event("sendmsg4", "udp", "198.18.0.4", 53),
            event("connect4", "tcp", "198.18.0.4", 53),
            other_user,
        ]);
        let text = build(&o, &ctx(), &Fake);
        let p = parse(&text);
        let services: Vec<_> = p.services().collect();
        assert_eq!(services.len(), 4, "{text}");
        // Both names on 443 share one service; the address on 80 and 81 is one entry; TCP and
        // UDP to the same port are one entry with both protocols; another user is another.
        let names = services.iter().find(|s| !s.hosts.is_empty()).unwrap();
        assert_eq!(names.hosts.len(), 2, "{text}");
        assert!(names.destinations.is_empty());
        assert!(
            text.contains("\"api.example.test\",  # 2 connections"),
            "{text}"
        );
        assert!(text.contains("(as 198.18.0.2)"), "{text}");
        assert!(text.contains("ports = [\"80-81\"]"), "{text}");
        assert!(text.contains("protocols = [\"tcp\", \"udp\"]"), "{text}");
        assert!(text.contains("users = [4242]"), "{text}");
        assert!(text.contains("users = [\"root\"]"), "{text}");
        assert!(text.contains("executables = [\"/usr/bin/curl\"]"), "{text}");
        assert!(
            text.contains("name = \"curl-api-example-test-and-more\""),
            "{text}"
        );
        assert!(text.contains("#   tcp/443: 3 connections"), "{text}");
        assert!(text.contains("first 2026-11-27T11:40:01Z"), "{text}");
        assert_eq!(p.mode, Mode::Enforce);
        assert!(p.uses_names());
    }

    #[test]
    fn the_same_observations_give_the_same_text() {
        let evs = [
            event("connect4", "tcp", "198.18.0.3", 80),
            named(event("connect4", "tcp", "198.18.0.2", 443), "b.test"),
            named(event("connect4", "tcp", "198.18.0.6", 443), "a.test"),
            event("sendmsg6", "udp", "fd00::2", 5353),
        ];
        let mut rev = evs.clone();
        rev.reverse();
        let a = build(&obs(&evs), &ctx(), &Fake);
        assert_eq!(a, build(&obs(&rev), &ctx(), &Fake));
        // Names in order, then the addresses.
        assert!(
            a.find("\"a.test\"").unwrap() < a.find("\"b.test\"").unwrap(),
            "{a}"
        );
        parse(&a);
    }

    #[test]
    fn selectors_a_policy_cannot_hold_are_left_out_with_a_note() {
        let mut deleted = event("connect4", "tcp", "198.18.0.2", 443);
        deleted.exe = Some("/usr/bin/old (deleted)".into());
        let mut overlay = event("connect4", "tcp", "198.18.0.3", 443);
        overlay.exe = Some("/opt/app/bin".into());
        let mut unknown = event("connect4", "tcp", "198.18.0.4", 443);
        unknown.exe = None;
        let text = build(&obs(&[deleted, overlay, unknown]), &ctx(), &Fake);
        let p = parse(&text);
        assert!(
            p.services().all(|s| s.selectors.executables.is_empty()),
            "{text}"
        );
        assert!(text.contains("replaced or removed"), "{text}");
        assert!(
            text.contains("/opt/app/bin is on overlayfs: not a selector"),
            "{text}"
        );
        assert!(text.contains("executable unknown"), "{text}");
        let mut no_sel = ctx();
        no_sel.selectors = SelectorsWanted {
            executables: false,
            users: false,
        };
        let text = build(
            &obs(&[event("connect4", "tcp", "198.18.0.2", 1)]),
            &no_sel,
            &Fake,
        );
        assert!(
            !text.contains("executables") && !text.contains("users ="),
            "{text}"
        );
        assert!(text.contains("# anyone:"), "{text}");
    }

    #[test]
    fn strange_names_and_paths_are_escaped() {
        let mut e = event("connect4", "tcp", "198.18.0.2", 443);
        e.exe = Some("/usr/bin/we\"ird\\app".into());
        let mut c = ctx();
        c.observed = "the command `sh -c 'a\nb'`".into();
        let text = build(&obs(&[e]), &c, &Fake);
        let p = parse(&text);
        let s = p.services().next().unwrap();
        assert_eq!(
            s.selectors.executables[0].value,
            std::path::Path::new("/usr/bin/we\"ird\\app")
        );
        assert!(text.contains("sh -c 'a?b'"), "{text}");
    }

    #[test]
    fn icmp_sockets_and_dns_are_written_as_a_policy_needs_them() {
        let mut raw = event("sock_create", "255", "", 0);
        raw.rule = "sockets.raw".into();
        let mut c = ctx();
        c.dns_upstream_given = false;
        let text = build(
            &obs(&[event("connect4", "icmp", "198.18.0.2", 9), raw]),
            &c,
            &Fake,
        );
        let p = parse(&text);
        let s = p.services().next().unwrap();
        assert!(
            s.ports.is_empty() && s.selectors.executables.is_empty(),
            "{text}"
        );
        assert_eq!(p.sockets.raw, crate::policy::SocketRule::Allow);
        // Queries were steered and no name is listed: the upstream keeps the proxy on.
        assert!(p.uses_names(), "{text}");
        c.names = NamesSource::Off("the whole host".into());
        let text = build(
            &obs(&[event("connect4", "tcp", "198.18.0.2", 9)]),
            &c,
            &Fake,
        );
        assert!(!parse(&text).uses_names(), "{text}");
        assert!(text.contains("not learned (the whole host)"), "{text}");
    }

    #[test]
    fn losses_rare_entries_and_many_ports_are_said() {
        let mut evs = vec![event("connect4", "tcp", "198.18.0.7", 22)];
        for port in (1000..1100).step_by(2) {
            evs.push(event("connect4", "tcp", "198.18.0.2", port));
            evs.push(event("connect4", "tcp", "198.18.0.2", port));
        }
        let mut c = ctx();
        c.events_lost = 3;
        c.min_count = 2;
        let text = build(&obs(&evs), &c, &Fake);
        let p = parse(&text);
        assert!(text.contains("# Events lost: 3"), "{text}");
        assert!(
            text.contains("WARNING: the kernel's event ring was full 3 times"),
            "{text}"
        );
        assert!(
            text.contains("Seen fewer than 2 times, left out (1)"),
            "{text}"
        );
        assert!(text.contains("every port is allowed"), "{text}");
        assert_eq!(p.services().count(), 1);
        assert!(p.services().next().unwrap().ports.is_empty());
    }

    #[test]
    fn a_base_policy_is_kept_as_it_is_and_extended() {
        const BASE: &str = "# our base\nmode = \"enforce\"\n\n[[service]]\nname = \"curl-198-18-0-3\"\ndestinations = [\"198.18.0.3\"]\nports = [80]\n\n[[block]]\nname = \"no-smtp\"\ndestinations = [\"0.0.0.0/0\"]\nports = [25]\n";
        let policy = parse(BASE);
        let base = Base::new("base.toml", BASE.to_string(), &policy);
        assert!(!base.has_dns && !base.has_sockets);
        let learning = base
            .learning_text(Some(&["127.0.0.2".to_string()]))
            .unwrap();
        let lp = parse(&learning);
        assert_eq!(lp.mode, Mode::Audit);
        assert_eq!(lp.rules.len(), 2);
        assert!(lp.uses_names());
        let mut c = ctx();
        c.base = Some(base);
        let mut smtp = event("connect4", "tcp", "198.18.0.9", 25);
        smtp.rule = "no-smtp".into();
        let text = build(
            &obs(&[event("connect4", "tcp", "198.18.0.3", 81), smtp]),
            &c,
            &Fake,
        );
        let p = parse(&text);
        assert!(text.contains(BASE), "{text}");
        assert_eq!(p.mode, Mode::Enforce);
        // The learned service's natural name is the base's: it gets another.
        assert!(text.contains("name = \"curl-198-18-0-3-2\""), "{text}");
        assert!(
            text.contains("refused or reported by `no-smtp` of the base policy"),
            "{text}"
        );
        assert_eq!(p.services().count(), 2);
        assert!(p.uses_names(), "[dns] added: the base had none\n{text}");
    }

    #[test]
    fn port_ranges_fold_consecutive_ports() {
        let set: BTreeSet<u16> = [1, 2, 3, 5, 65534, 65535].into();
        assert_eq!(port_ranges(&set), ["\"1-3\"", "5", "\"65534-65535\""]);
        assert_eq!(slug("curl-API.example.test"), "curl-api-example-test");
        assert_eq!(slug("::"), "learned");
    }
}
