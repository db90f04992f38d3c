//! Policy files: a TOML file to a validated [`Policy`]. Knows nothing of aya or the kernel.
//!
//! One home per concern:
//! - this file: the [`Policy`], [`Rule`] and [`RuleKind`] types, [`load`] (read, validate,
//!   compile), [`content_hash`] and the embedded default policy;
//! - `types`: the value types ([`Mode`], [`DefaultVerdict`], [`Protocol`], [`PortRange`],
//!   [`Destination`]) and how each is read from TOML;
//! - `parse`: TOML text to a validated [`Policy`] ([`Policy::parse`]);
//! - `error`: [`PolicyError`], and how a place in the text becomes file:line:column and field;
//! - [`selectors`]: who an entry applies to (`executables`, `users`, `groups`, `cgroups`) and
//!   the named sets they reference; [`resolve`]: those values on this host (NSS, stat, the
//!   cgroup2 hierarchy), behind a trait; [`scopes`]: the scope tables they compile to;
//! - [`hosts`]: `hosts` name patterns; [`names`]: the name matcher (which service or block covers
//!   a DNS name); [`dns`]: the `[dns]` table;
//! - [`alert`]: `[[alert]]` tables; [`compile`]: the kernel map entries; [`diff`]: what a reload
//!   changes; [`explain`]: the verdict for one destination or name;
//! - `fuzz` (tests only): property tests of parsing and compiling over generated policy text.
//!
//! Parsing is "parse, don't validate": after [`Policy::parse`] every destination is a canonical
//! network, every `hosts` pattern a lowercase, label-checked name, every port range is non-empty
//! and within 1..=65535, and every rule name is unique.
//! Every error names the file, line, column and field, and says what was expected.

use std::path::Path;

pub mod alert;
pub mod compile;
pub mod diff;
pub mod dns;
mod error;
pub mod explain;
pub mod feeds;
pub mod fragments;
pub mod hosts;
pub mod names;
mod parse;
pub mod pods;
pub mod resolve;
pub mod scopes;
pub mod selectors;
mod types;

pub use dns::{DnsSettings, Unlisted, Upstream};
pub use error::PolicyError;
pub use fragments::Fragment;
pub use hosts::HostPattern;
pub use selectors::{Principal, Selectors, Written};
pub use types::{DefaultVerdict, Destination, Mode, PortRange, Protocol, SocketRule, Sockets};

/// The policy embedded in the binary, used when `--policy` is not given.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");
/// The name under which the embedded default policy is reported.
pub const DEFAULT_POLICY_NAME: &str = "<embedded policies/default.toml>";

/// Whether a rule approves or blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleKind {
    Service,
    Block,
}

impl RuleKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RuleKind::Service => "service",
            RuleKind::Block => "block",
        }
    }
}

/// A validated `[[service]]` or `[[block]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub kind: RuleKind,
    pub name: String,
    /// Empty when the rule names `hosts` only.
    pub destinations: Vec<Destination>,
    /// Name patterns (`hosts`), deduplicated, in file order; empty when the rule names
    /// `destinations` only. A rule has destinations, hosts or both.
    pub hosts: Vec<HostPattern>,
    /// Empty: every port.
    pub ports: Vec<PortRange>,
    /// Empty: a service approves TCP and UDP; a block blocks every protocol.
    pub protocols: Vec<Protocol>,
    /// 1-based line of the rule's table in its file.
    pub line: usize,
    /// Who the rule applies to (all empty: everyone), as written, sets expanded.
    pub selectors: Selectors,
    /// `mode = "audit"` on the entry: a block reports the calls it would refuse and refuses
    /// none; a scoped service lets the callers its scope leaves out through, and reports them.
    pub audit: bool,
    /// For the block a `[[blocklist]]` makes: its feed (which entry matched, for events and
    /// `explain`).
    pub feed: Option<std::sync::Arc<feeds::FeedInfo>>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Where it came from (a path, or [`DEFAULT_POLICY_NAME`]).
    pub source: String,
    pub mode: Mode,
    pub default: DefaultVerdict,
    pub allow_loopback: bool,
    /// The site's NAT64 /96 prefixes (besides the well-known `64:ff9b::/96`).
    pub nat64_prefixes: Vec<std::net::Ipv6Addr>,
    /// `[sockets]`: which sockets beyond TCP and UDP may be created.
    pub sockets: Sockets,
    /// Services first, then blocks, each in file order.
    pub rules: Vec<Rule>,
    /// `[[alert]]` tables, in file order.
    pub alerts: Vec<alert::Alert>,
    /// `[[blocklist]]` tables, in file order. Their entries join `rules` (as blocks, after the
    /// policy's own) once read ([`Policy::with_feeds`]).
    pub blocklists: Vec<feeds::Blocklist>,
    /// How each blocklist's copy in force was read (empty until [`Policy::with_feeds`]).
    pub feeds: Vec<feeds::FeedStatus>,
    /// SHA-256 (16 hex digits) of the entries the feeds hold (empty: no blocklist): with
    /// [`Policy::hash`], identifies what is applied.
    pub feeds_hash: String,
    /// `[dns]`: the DNS proxy's upstreams, grant TTL bounds and what it does with unlisted names.
    pub dns: DnsSettings,
    /// SHA-256 of the policy text (hex, first 16 digits): identifies what is applied.
    pub hash: String,
    /// What is legal but probably a mistake (an unused set), as `file:line:column: field:
    /// message` lines: `egress check` prints them, loading logs them.
    pub warnings: Vec<String>,
}

impl Policy {
    /// Reads and parses a policy file, or a policy directory: its `*.toml` fragments merged
    /// in file-name order (see [`fragments`]).
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let files = fragments::read(path)?;
        Policy::from_fragments(&path.display().to_string(), &files)
    }

    /// Parses the files of one policy (one file, or the fragments of a directory in the order
    /// they merge) as the policy `source`. Errors name the fragment's own file and line.
    pub fn from_fragments(source: &str, files: &[Fragment]) -> Result<Policy, PolicyError> {
        match files {
            [] => Err(PolicyError::whole(
                source,
                "no policy file: expected at least one".into(),
            )),
            [one] => {
                let mut p = Policy::parse(&one.file, &one.text)?;
                p.source = source.to_string();
                Ok(p)
            }
            many => {
                let merged = fragments::merge(many)?;
                let src = error::Source {
                    file: source,
                    text: &merged.text,
                    merged: Some(&merged),
                };
                Policy::parse_source(source, src)
            }
        }
    }

    /// Reads the blocklists' feeds (files, cached copies) from `store` and adds a block per
    /// blocklist after the policy's own rules. A `file` feed with no good copy at all is an
    /// error naming the policy file, line and feed; rejected lines and fallbacks to the cached
    /// copy are reported in [`Policy::feeds`] and [`Policy::warnings`].
    pub fn with_feeds(mut self, store: &feeds::FeedStore) -> Result<Policy, feeds::FeedError> {
        for b in &self.blocklists {
            let loaded = store.load(b)?;
            if loaded.entries.rejected > 0 {
                self.warnings.push(format!(
                    "{}:{}: blocklist {}: {}",
                    b.file,
                    b.line,
                    b.name,
                    loaded.entries.rejects_text()
                ));
            }
            if let Some(e) = &loaded.status.last_error {
                self.warnings.push(format!(
                    "{}:{}: blocklist {}: {e}{}",
                    b.file,
                    b.line,
                    b.name,
                    if loaded.status.from_cache {
                        "; the last good copy is used"
                    } else {
                        ""
                    }
                ));
            }
            self.rules.push(feeds::rule(b, &loaded.entries));
            self.feeds.push(loaded.status);
        }
        self.feeds_hash = feeds::entries_hash(&self.rules);
        Ok(self)
    }

    /// The embedded default policy.
    pub fn embedded_default() -> Policy {
        Policy::parse(DEFAULT_POLICY_NAME, DEFAULT_POLICY)
            .expect("the embedded default policy is valid (unit-tested)")
    }

    pub fn services(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.kind == RuleKind::Service)
    }

    pub fn blocks(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.kind == RuleKind::Block)
    }

    /// How many `hosts` patterns the rules hold.
    pub fn host_patterns(&self) -> usize {
        self.rules.iter().map(|r| r.hosts.len()).sum()
    }

    /// Whether the policy approves or blocks anything by name, or says how names resolve: then
    /// the controller runs the DNS proxy and DNS is steered to it.
    pub fn uses_names(&self) -> bool {
        self.host_patterns() > 0
            || !self.dns.upstream.is_empty()
            || self.dns.unlisted == Unlisted::Refuse
            // DNS alerts count the queries the proxy answers.
            || self.alerts.iter().any(alert::Alert::is_dns)
    }

    /// The rules the kernel enforces: the policy's own and, when it uses names, the
    /// `dns-over-tls` block (TCP and UDP port 853, everywhere), so that names resolve through the
    /// proxy or not at all. It comes last: its rule id follows the policy's rules.
    pub fn enforced_rules(&self) -> std::borrow::Cow<'_, [Rule]> {
        if !self.uses_names() {
            return std::borrow::Cow::Borrowed(&self.rules);
        }
        let mut rules = self.rules.clone();
        rules.push(Rule {
            kind: RuleKind::Block,
            name: DOT_BLOCK.to_string(),
            destinations: vec![
                "0.0.0.0/0".parse().expect("a network"),
                "::/0".parse().expect("a network"),
            ],
            hosts: Vec::new(),
            ports: vec![PortRange::new(853, 853).expect("a port")],
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            line: 0,
            selectors: Selectors::default(),
            audit: false,
            feed: None,
        });
        std::borrow::Cow::Owned(rules)
    }
}

/// The name of the block of DNS over TLS that a policy using names gets (reserved: no policy
/// rule may take it).
pub const DOT_BLOCK: &str = "dns-over-tls";

/// SHA-256 of the policy text, hex, first 16 digits.
pub fn content_hash(text: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The hash of a policy's files, as [`Policy::hash`] has it once parsed (a file's text, or the
/// merged text of fragments).
pub fn fragments_hash(files: &[Fragment]) -> Result<String, PolicyError> {
    match files {
        [one] => Ok(content_hash(&one.text)),
        many => Ok(content_hash(&fragments::merge(many)?.text)),
    }
}

/// Reads, validates and compiles a policy file, or the embedded default when `path` is `None`.
/// Errors carry the file:line:column: field: message text.
/// Blocklists' `file` feeds are read as they are; `url` feeds from the controller's default
/// cache of last good copies, when it exists ([`feeds::FeedStore::default_reader`]).
pub fn load(path: Option<&Path>) -> anyhow::Result<(Policy, compile::CompiledPolicy)> {
    load_with(path, &feeds::FeedStore::default_reader())
}

/// As [`load`], the blocklists' feeds read from `store`.
pub fn load_with(
    path: Option<&Path>,
    store: &feeds::FeedStore,
) -> anyhow::Result<(Policy, compile::CompiledPolicy)> {
    use anyhow::Context as _;
    let policy = match path {
        Some(p) => Policy::load(p)?,
        None => Policy::embedded_default(),
    };
    let policy = policy.with_feeds(store)?;
    let compiled = compile::CompiledPolicy::compile(&policy)
        .with_context(|| format!("compiling policy {}", policy.source))?;
    Ok((policy, compiled))
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod scope_tests;
#[cfg(test)]
mod tests;
