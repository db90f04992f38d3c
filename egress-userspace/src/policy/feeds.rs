//! Threat-feed blocklists (`[[blocklist]]`): the feed formats, read into the networks or names a
//! block refuses, and the store of last good copies. Pure but for [`FeedStore`], which reads the
//! feed files and the cached copies (fetching `url` feeds is the controller's: `controller/feeds.rs`).
//!
//! ```toml
//! [[blocklist]]
//! name = "firehol-level1"
//! file = "/etc/egress/feeds/firehol_level1.netset"   # or url = "https://…"
//! format = "netset"   # "netset" | "spamhaus-drop" | "tor-exits" | "hosts"
//! refresh = "1h"      # url feeds: how often the controller fetches it
//! ports = []          # optional, as for [[block]]
//! ```
//!
//! A feed is a block: once read, a blocklist becomes one [`Rule`] of kind block (its name the
//! blocklist's), compiled and applied with the rest of the policy, so it wins over services
//! exactly as a `[[block]]` does, goes through the same range table and trie, and its names (the
//! `hosts` format) through the DNS proxy's name matcher.
//!
//! A bad copy never empties a blocklist silently. Lines that do not parse are rejected and
//! counted (the first few kept, with their line numbers); a copy that is clearly not a feed (HTML,
//! more rejected lines than entries, no entry at all where the last good copy had some, more than
//! [`MAX_FEED_ENTRIES`]) is refused as a whole, and the last good copy stays in force.

use std::{
    collections::HashMap,
    fmt,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipnetwork::IpNetwork;
use serde::Deserialize;

use super::{Destination, HostPattern, PortRange, Protocol, Rule, RuleKind, Selectors};

/// The most entries one feed may hold (the issue's 1M, rounded up to 2^20).
pub const MAX_FEED_ENTRIES: usize = 1 << 20;
/// How many rejected lines a feed's report quotes.
pub const QUOTED_REJECTS: usize = 5;
/// The refresh of a `url` feed that names none.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
/// The shortest refresh accepted.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Where the controller keeps the last good copy of each feed, unless told otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/egress/feeds";

/// How a feed is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum FeedFormat {
    /// One IPv4/IPv6 address or CIDR a line; `#` and `;` comments.
    #[serde(rename = "netset")]
    Netset,
    /// Spamhaus DROP/EDROP: `1.2.3.0/24 ; SBL123` (the id is kept as the entry's label).
    #[serde(rename = "spamhaus-drop")]
    SpamhausDrop,
    /// The Tor exit list: `ExitAddress a.b.c.d DATE TIME` lines (the other lines ignored).
    #[serde(rename = "tor-exits")]
    TorExits,
    /// One DNS name a line, or the hosts-file form `0.0.0.0 name`: blocked through the DNS proxy.
    #[serde(rename = "hosts")]
    Hosts,
}

impl FeedFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedFormat::Netset => "netset",
            FeedFormat::SpamhausDrop => "spamhaus-drop",
            FeedFormat::TorExits => "tor-exits",
            FeedFormat::Hosts => "hosts",
        }
    }
}

impl fmt::Display for FeedFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a feed is read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FeedSource {
    /// A local file, re-read at every reload.
    File(PathBuf),
    /// Fetched by the controller every `refresh`; the last good copy is cached on disk.
    Url(String),
}

impl fmt::Display for FeedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedSource::File(p) => write!(f, "{}", p.display()),
            FeedSource::Url(u) => f.write_str(u),
        }
    }
}

/// A validated `[[blocklist]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocklist {
    pub name: String,
    pub source: FeedSource,
    pub format: FeedFormat,
    /// For `url`: how often the controller fetches it.
    pub refresh: Duration,
    /// Empty: every port.
    pub ports: Vec<PortRange>,
    /// Empty: every protocol (as a `[[block]]` without `protocols`).
    pub protocols: Vec<Protocol>,
    /// 1-based line of the table in its file.
    pub line: usize,
    /// The policy file that holds it (its fragment's, for a policy directory).
    pub file: String,
}

/// One rejected line of a feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// 1-based.
    pub line: usize,
    pub why: String,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

/// A feed's text, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedEntries {
    /// The networks (canonical, sorted, deduplicated).
    pub nets: Vec<Destination>,
    /// Spamhaus ids by network (`spamhaus-drop` only).
    pub labels: HashMap<Destination, String>,
    /// The names (`hosts` only), deduplicated, in feed order.
    pub hosts: Vec<HostPattern>,
    /// Lines that named an entry (before deduplication).
    pub entry_lines: usize,
    /// Entries named more than once.
    pub duplicates: usize,
    /// How many lines were rejected.
    pub rejected: usize,
    /// The first [`QUOTED_REJECTS`] of them.
    pub first_rejects: Vec<Reject>,
}

impl FeedEntries {
    /// Entries in force: networks and names.
    pub fn len(&self) -> usize {
        self.nets.len() + self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn reject(&mut self, line: usize, why: String) {
        self.rejected += 1;
        if self.first_rejects.len() < QUOTED_REJECTS {
            self.first_rejects.push(Reject { line, why });
        }
    }

    /// The rejected lines for people: `3 lines rejected (line 4: …; line 9: …)`.
    pub fn rejects_text(&self) -> String {
        let quoted: Vec<String> = self.first_rejects.iter().map(Reject::to_string).collect();
        let more = if self.rejected > quoted.len() {
            "; …"
        } else {
            ""
        };
        format!(
            "{} line{} rejected ({}{more})",
            self.rejected,
            if self.rejected == 1 { "" } else { "s" },
            quoted.join("; ")
        )
    }
}

/// A line's text, shortened and made printable, to quote in a reject.
fn quote(line: &str) -> String {
    let mut s: String = line.chars().take(60).collect();
    if line.chars().count() > 60 {
        s.push('…');
    }
    super::error::one_line(&s)
}

/// An address or CIDR as feeds write them. Unlike a policy's `destinations`, host bits are
/// masked rather than refused (the feed means the network its prefix says); an IPv4 netmask is
/// refused.
pub fn parse_net(s: &str) -> Result<Destination, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{}` is not an IPv4/IPv6 address or CIDR", quote(s)))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => {
                return Err(format!(
                    "`{}` has a bad prefix length: expected 0-{max}",
                    quote(s)
                ));
            }
        },
    };
    let net = IpNetwork::new(ip, len).map_err(|e| format!("`{}`: {e}", quote(s)))?;
    Ok(Destination::canonical(net))
}

/// Reads a feed's text. Never fails: what does not parse is rejected line by line; whether the
/// copy as a whole is acceptable is [`check_copy`]'s call.
pub fn parse(format: FeedFormat, text: &str) -> FeedEntries {
    let mut out = FeedEntries::default();
    let mut nets: Vec<Destination> = Vec::new();
    let mut seen_hosts = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        match format {
            FeedFormat::Netset => {
                if line.starts_with('#') || line.starts_with(';') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let first = words.next().unwrap_or_default();
                if let Some(extra) = words.next()
                    && !(extra.starts_with('#') || extra.starts_with(';'))
                {
                    out.reject(
                        n,
                        format!("`{}`: expected one address or CIDR a line", quote(line)),
                    );
                    continue;
                }
                match parse_net(first) {
                    Ok(d) => {
                        out.entry_lines += 1;
                        nets.push(d);
                    }
                    Err(why) => out.reject(n, why),
                }
            }
            FeedFormat::SpamhausDrop => {
                if line.starts_with(';') || line.starts_with('#') {
                    continue;
                }
                let (net, label) = match line.split_once(';') {
                    Some((net, label)) => (net.trim(), label.trim()),
                    None => (line, ""),
                };
                match parse_net(net) {
                    Ok(d) => {
                        out.entry_lines += 1;
                        nets.push(d);
                        if !label.is_empty() {
                            out.labels.insert(d, label.to_string());
                        }
                    }
                    Err(why) => out.reject(n, why),
                }
            }
            FeedFormat::TorExits => {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("ExitAddress") => match words.next().map(parse_net) {
                        Some(Ok(d)) => {
                            out.entry_lines += 1;
                            nets.push(d);
                        }
                        Some(Err(why)) => out.reject(n, why),
                        None => out.reject(n, "ExitAddress without an address".into()),
                    },
                    Some("ExitNode" | "Published" | "LastStatus" | "@type") => {}
                    Some(w) if w.starts_with('#') => {}
                    _ => out.reject(
                        n,
                        format!(
                            "`{}`: expected ExitNode, Published, LastStatus or ExitAddress lines",
                            quote(line)
                        ),
                    ),
                }
            }
            FeedFormat::Hosts => {
                if line.starts_with('#') {
                    continue;
                }
                let line = line.split('#').next().unwrap_or_default();
                let words: Vec<&str> = line.split_whitespace().collect();
                // `0.0.0.0 name [name…]` (a hosts file), or `name`.
                let names: &[&str] = match words.as_slice() {
                    [addr, rest @ ..] if addr.parse::<IpAddr>().is_ok() => {
                        if rest.is_empty() {
                            out.reject(n, format!("`{}`: an address without a name", quote(line)));
                            continue;
                        }
                        rest
                    }
                    [_] => &words,
                    _ => {
                        out.reject(
                            n,
                            format!(
                                "`{}`: expected one name a line, or `0.0.0.0 name`",
                                quote(line)
                            ),
                        );
                        continue;
                    }
                };
                for name in names {
                    let name = name.trim_end_matches('.');
                    if LOCAL_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
                        continue;
                    }
                    match HostPattern::from_str(name) {
                        Ok(p) => {
                            out.entry_lines += 1;
                            if seen_hosts.insert(p.clone()) {
                                out.hosts.push(p);
                            } else {
                                out.duplicates += 1;
                            }
                        }
                        Err(why) => out.reject(n, why),
                    }
                }
            }
        }
    }
    nets.sort_unstable_by_key(|d| {
        let n = d.network();
        (n.is_ipv6(), ip_bits(n.ip()), n.prefix())
    });
    let before = nets.len();
    nets.dedup();
    out.duplicates += before - nets.len();
    out.nets = nets;
    out
}

/// Names every hosts file lists for the machine itself; never blocked.
const LOCAL_NAMES: [&str; 11] = [
    "localhost",
    "localhost.localdomain",
    "local",
    "broadcasthost",
    "ip6-localhost",
    "ip6-loopback",
    "ip6-localnet",
    "ip6-mcastprefix",
    "ip6-allnodes",
    "ip6-allrouters",
    "0.0.0.0",
];

fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Whether a copy may replace the one in force: refused as a whole when it is clearly not a
/// feed. `last_good`: how many entries the last good copy had, if there is one.
pub fn check_copy(text: &str, read: &FeedEntries, last_good: Option<usize>) -> Result<(), String> {
    let first = text.trim_start_matches('\u{feff}').trim_start();
    if first.starts_with('<') {
        return Err("the copy is HTML (or XML), not a feed".into());
    }
    if read.rejected > read.entry_lines {
        return Err(format!(
            "the copy is mostly unparseable: {} entries, {}",
            read.entry_lines,
            read.rejects_text()
        ));
    }
    if read.len() > MAX_FEED_ENTRIES {
        return Err(format!(
            "the copy has {} entries: at most {MAX_FEED_ENTRIES} fit one blocklist",
            read.len()
        ));
    }
    if read.is_empty()
        && let Some(n) = last_good
        && n > 0
    {
        return Err(format!(
            "the copy has no entry, where the last good copy had {n}"
        ));
    }
    Ok(())
}

/// What a blocklist's rule knows of its feed, for events and `explain` (which entry matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedInfo {
    pub format: FeedFormat,
    pub source: String,
    /// Spamhaus ids by network.
    pub labels: HashMap<Destination, String>,
    /// The networks, sorted as [`parse`] sorts them (for [`matching_net`]).
    pub nets: Vec<Destination>,
    /// The names (`hosts` feeds), sorted (for [`FeedInfo::host_entry_of`]).
    pub hosts: Vec<HostPattern>,
}

impl FeedInfo {
    /// The entry that holds `dst`, and its label (a Spamhaus id), if any.
    pub fn entry_of(&self, dst: IpAddr) -> Option<(Destination, Option<&str>)> {
        let d = matching_net(&self.nets, dst)?;
        Some((d, self.labels.get(&d).map(String::as_str)))
    }

    /// The entry (a name or pattern) that covers DNS name `name`: the name itself, `*.` its
    /// parent, or `**.` one of its ancestors, in that order. A few lookups, whatever the size.
    pub fn host_entry_of(&self, name: &str) -> Option<String> {
        if self.hosts.is_empty() {
            return None;
        }
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let has = |text: &str| {
            HostPattern::from_str(text)
                .ok()
                .filter(|p| self.hosts.binary_search(p).is_ok())
                .map(|p| p.to_string())
        };
        if let Some(hit) = has(&name) {
            return Some(hit);
        }
        let mut rest = name.as_str();
        let mut first = true;
        while let Some((_, parent)) = rest.split_once('.') {
            if first && let Some(hit) = has(&format!("*.{parent}")) {
                return Some(hit);
            }
            if let Some(hit) = has(&format!("**.{parent}")) {
                return Some(hit);
            }
            first = false;
            rest = parent;
        }
        None
    }
}

/// The rule a blocklist's entries make.
pub fn rule(b: &Blocklist, read: &FeedEntries) -> Rule {
    Rule {
        kind: RuleKind::Block,
        name: b.name.clone(),
        destinations: read.nets.clone(),
        hosts: read.hosts.clone(),
        ports: b.ports.clone(),
        protocols: b.protocols.clone(),
        line: b.line,
        selectors: Selectors::default(),
        audit: false,
        feed: Some(Arc::new(FeedInfo {
            format: b.format,
            source: b.source.to_string(),
            labels: read.labels.clone(),
            nets: read.nets.clone(),
            hosts: {
                let mut h = read.hosts.clone();
                h.sort_unstable();
                h
            },
        })),
    }
}

/// A digest of the entries of the blocklists' rules (empty when there is none): what a
/// restarted controller compares to know the kernel holds the feeds it reads now.
pub fn entries_hash(rules: &[Rule]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut any = false;
    for r in rules.iter().filter(|r| r.feed.is_some()) {
        any = true;
        h.update(r.name.as_bytes());
        h.update([0]);
        for d in &r.destinations {
            let n = d.network();
            match n.ip() {
                IpAddr::V4(a) => h.update(a.octets()),
                IpAddr::V6(a) => h.update(a.octets()),
            }
            h.update([n.prefix(), 0xff]);
        }
        for p in &r.hosts {
            h.update(p.to_string().as_bytes());
            h.update([0]);
        }
        h.update([0xfe]);
    }
    if !any {
        return String::new();
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How a blocklist's copy in force was read, for `egress status` and `egress check`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedStatus {
    pub name: String,
    /// The file or URL.
    pub source: String,
    pub format: String,
    /// Entries in force (networks and names).
    pub entries: usize,
    /// Lines rejected in the copy in force.
    pub rejected: usize,
    /// The first of them, `line N: why`.
    #[serde(default)]
    pub first_rejects: Vec<String>,
    /// When the copy in force was read or fetched successfully (RFC 3339; absent: never).
    #[serde(default)]
    pub last_success: Option<String>,
    /// The last failure to read or fetch a new copy, if the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Whether the copy in force is the cached last good copy (the source failed).
    #[serde(default)]
    pub from_cache: bool,
}

/// A blocklist read: its entries, and how.
#[derive(Debug, Clone)]
pub struct LoadedFeed {
    pub entries: FeedEntries,
    pub status: FeedStatus,
}

/// The feed files and the cached last good copies.
///
/// The controller's store is `writable`: it keeps the last good copy of every feed (a `file`
/// feed's too) and falls back to it. A read-only store (`egress check`, `explain`) reads the
/// cached copies of `url` feeds, if it is given the cache, and is strict with `file` feeds: a bad
/// file is an error, not hidden behind an older copy.
#[derive(Debug, Clone, Default)]
pub struct FeedStore {
    pub cache: Option<PathBuf>,
    pub writable: bool,
}

/// A feed that has no good copy at all: the policy cannot load (file feeds only; a `url` feed
/// never fetched loads empty, reported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: blocklist {name}: {message}")]
pub struct FeedError {
    pub file: String,
    pub line: usize,
    pub name: String,
    pub message: String,
}

impl FeedStore {
    /// The controller's store: copies kept in (and read from) `cache`.
    pub fn new(cache: Option<PathBuf>) -> FeedStore {
        FeedStore {
            cache,
            writable: true,
        }
    }

    /// A read-only store over `cache` (`url` feeds' copies only).
    pub fn reader(cache: Option<PathBuf>) -> FeedStore {
        FeedStore {
            cache,
            writable: false,
        }
    }

    /// A read-only store over the default cache directory, when it exists.
    pub fn default_reader() -> FeedStore {
        let dir = Path::new(DEFAULT_CACHE_DIR);
        FeedStore::reader(dir.is_dir().then(|| dir.to_path_buf()))
    }

    /// Where the last good copy of `b` is kept: one file per name and source.
    pub fn cache_path(&self, b: &Blocklist) -> Option<PathBuf> {
        let dir = self.cache.as_ref()?;
        let safe: String = b
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let key = super::content_hash(&format!("{}\n{}", b.format, b.source));
        Some(dir.join(format!("{safe}.{key}.feed")))
    }

    /// The cached last good copy, with when it was stored.
    pub fn cached(&self, b: &Blocklist) -> Option<(String, SystemTime)> {
        let path = self.cache_path(b)?;
        let text = std::fs::read(&path).ok()?;
        let at = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Some((String::from_utf8_lossy(&text).into_owned(), at))
    }

    /// Stores `text` as the last good copy of `b` (atomically: a reader sees the old copy or the
    /// new one), unless it is that already.
    pub fn store(&self, b: &Blocklist, text: &str) -> std::io::Result<()> {
        let Some(path) = self.cache_path(b).filter(|_| self.writable) else {
            return Ok(());
        };
        if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
            // Touch: the copy was confirmed good now.
            let f = std::fs::File::options().append(true).open(&path)?;
            return f.set_modified(SystemTime::now());
        }
        let dir = path.parent().expect("the cache path is in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    }

    /// Reads `b`: a `file` feed from its file (the cached copy when the file cannot be read or
    /// is refused, an error when there is none), a `url` feed from its cached copy (empty, and
    /// reported, when it was never fetched).
    pub fn load(&self, b: &Blocklist) -> Result<LoadedFeed, FeedError> {
        let cached = self.cached(b);
        let status = |read: &FeedEntries, at: Option<SystemTime>, error, from_cache| FeedStatus {
            name: b.name.clone(),
            source: b.source.to_string(),
            format: b.format.to_string(),
            entries: read.len(),
            rejected: read.rejected,
            first_rejects: read.first_rejects.iter().map(Reject::to_string).collect(),
            last_success: at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            last_error: error,
            from_cache,
        };
        let from_cache = |error: String| -> Option<LoadedFeed> {
            let (text, at) = cached.as_ref()?;
            let read = parse(b.format, text);
            check_copy(text, &read, None).ok()?;
            Some(LoadedFeed {
                status: status(&read, Some(*at), Some(error), true),
                entries: read,
            })
        };
        let fail = |message: String| FeedError {
            file: b.file.clone(),
            line: b.line,
            name: b.name.clone(),
            message,
        };
        match &b.source {
            FeedSource::File(path) => {
                // Only the controller falls back to an older copy of a file.
                let from_cache = |why: String| from_cache(why).filter(|_| self.writable);
                let cached = cached.as_ref().filter(|_| self.writable);
                let text = match std::fs::read(path) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(e) => {
                        let why = format!("cannot read {}: {e}", path.display());
                        return from_cache(why.clone()).ok_or_else(|| {
                            fail(format!("{why} (and no last good copy is cached)"))
                        });
                    }
                };
                let last_good = cached.map(|(t, _)| parse(b.format, t).len());
                let read = parse(b.format, &text);
                if let Err(why) = check_copy(&text, &read, last_good) {
                    let why = format!("{}: {why}", path.display());
                    return from_cache(why.clone()).ok_or_else(|| {
                        fail(format!("{why} (and no last good copy is cached)"))
                    });
                }
                let mut error = None;
                if let Err(e) = self.store(b, &text) {
                    error = Some(format!("could not cache the copy: {e}"));
                }
                Ok(LoadedFeed {
                    status: status(&read, Some(SystemTime::now()), error, false),
                    entries: read,
                })
            }
            FeedSource::Url(_) => Ok(from_cache(String::new())
                .map(|mut l| {
                    // The cached copy is the fetched one: not a fallback.
                    l.status.last_error = None;
                    l.status.from_cache = false;
                    l
                })
                .unwrap_or_else(|| {
                    let read = FeedEntries::default();
                    LoadedFeed {
                        status: status(
                            &read,
                            None,
                            Some("never fetched, and no copy is cached: the blocklist is empty until a fetch succeeds".into()),
                            false,
                        ),
                        entries: read,
                    }
                })),
        }
    }
}

/// The feed entry (network, and its label) that holds `dst` in a blocklist's networks (sorted
/// as [`parse`] sorts them): the most specific, as the kernel's lookup is.
pub fn matching_net(nets: &[Destination], dst: IpAddr) -> Option<Destination> {
    let dst = match dst {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(dst, IpAddr::V4),
        v4 => v4,
    };
    let (v6, bits, max) = match dst {
        IpAddr::V4(a) => (false, u128::from(u32::from(a)), 32u8),
        IpAddr::V6(a) => (true, u128::from(a), 128u8),
    };
    for len in (0..=max).rev() {
        let masked = if len == 0 {
            0
        } else {
            let host = u32::from(max - len);
            if host >= 128 {
                0
            } else {
                bits & (u128::MAX << host)
            }
        };
        let key = (v6, masked, len);
        if let Ok(i) = nets.binary_search_by_key(&key, |d| {
            let n = d.network();
            (n.is_ipv6(), ip_bits(n.ip()), n.prefix())
        }) {
            return Some(nets[i]);
        }
    }
    None
}

#[cfg(test)]
mod tests;
