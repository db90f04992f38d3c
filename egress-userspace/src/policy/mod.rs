//! Policy files: TOML parsing and validation. Knows nothing of aya or the kernel.
//!
//! Parsing is "parse, don't validate": after [`Policy::parse`] every destination is a canonical
//! network, every port range is non-empty and within 1..=65535, and every rule name is unique.
//! Every error names the file, line, column and field, and says what was expected.

use std::{collections::HashMap, fmt, net::IpAddr, path::Path, str::FromStr};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

/// The policy embedded in the binary, used when `--policy` is not given.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");
/// The name under which the embedded default policy is reported.
pub const DEFAULT_POLICY_NAME: &str = "<embedded policies/default.toml>";

/// Names that events use for verdicts no rule made; rules may not take them.
const RESERVED_NAMES: [&str; 2] = ["default", "loopback"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny unapproved destinations with EPERM.
    #[default]
    Enforce,
    /// Block nothing; report every would-be deny.
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultVerdict {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

impl fmt::Display for DefaultVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultVerdict::Deny => "deny",
            DefaultVerdict::Allow => "allow",
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// An inclusive, non-empty port range within 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        lo: 1,
        hi: u16::MAX,
    };

    pub fn new(lo: u16, hi: u16) -> Result<Self, String> {
        if lo == 0 || hi == 0 {
            return Err("port 0 is not a destination port: expected 1-65535".into());
        }
        if lo > hi {
            return Err(format!(
                "range {lo}-{hi} is reversed: expected LOW-HIGH with LOW <= HIGH"
            ));
        }
        Ok(Self { lo, hi })
    }
    pub fn lo(&self) -> u16 {
        self.lo
    }
    pub fn hi(&self) -> u16 {
        self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a port number: expected 1-65535"))?;
    u16::try_from(n).map_err(|_| format!("port {n} is out of range: expected 1-65535"))
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('-') {
            Some((lo, hi)) => PortRange::new(parse_port(lo)?, parse_port(hi)?),
            None => {
                let p = parse_port(s)?;
                PortRange::new(p, p)
            }
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (1-65535) or a range string such as \"8000-8080\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                let p = u16::try_from(v).map_err(|_| {
                    E::custom(format!("port {v} is out of range: expected 1-65535"))
                })?;
                PortRange::new(p, p).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                let p = u16::try_from(v).map_err(|_| {
                    E::custom(format!("port {v} is out of range: expected 1-65535"))
                })?;
                PortRange::new(p, p).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A destination network in canonical form (no host bits set). v4-mapped IPv6 networks
/// (`::ffff:0:0/96` and longer) are stored as the IPv4 networks they reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination(IpNetwork);

impl Destination {
    pub fn network(&self) -> IpNetwork {
        self.0
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.ip(), self.0.prefix())
    }
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "expected an IPv4/IPv6 address or CIDR, such as 192.0.2.7, 10.0.0.0/8 or 2001:db8::/32";
        let t = s.trim();
        let net = IpNetwork::from_str(t)
            .map_err(|e| format!("`{s}` is not a valid destination ({e}): {EXPECTED}"))?;
        // ipnetwork accepts an IPv4 netmask after the slash ("10.0.0.0/255.0.0.0"); we keep to
        // prefix lengths so that a policy reads one way.
        if let Some((_, len)) = t.split_once('/')
            && len.parse::<u8>().is_err()
        {
            return Err(format!(
                "`{s}` has a prefix length that is not a number: {EXPECTED}"
            ));
        }
        let canonical = IpNetwork::new(net.network(), net.prefix()).map_err(|e| e.to_string())?;
        if canonical.ip() != net.ip() {
            return Err(format!(
                "`{s}` has host bits set: expected the network address, `{}/{}`",
                canonical.ip(),
                canonical.prefix()
            ));
        }
        let canonical = match canonical {
            IpNetwork::V6(v6) if v6.prefix() >= 96 => match v6.ip().to_ipv4_mapped() {
                Some(v4) => {
                    IpNetwork::new(IpAddr::V4(v4), v6.prefix() - 96).map_err(|e| e.to_string())?
                }
                None => canonical,
            },
            _ => canonical,
        };
        Ok(Destination(canonical))
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Fail inside the visitor, so that the error carries the span of this very element.
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Destination;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address or CIDR string such as \"10.0.0.0/8\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Destination, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    default: DefaultVerdict,
    #[serde(default = "yes")]
    allow_loopback: bool,
    #[serde(default)]
    service: Vec<Spanned<RawRule>>,
    #[serde(default)]
    block: Vec<Spanned<RawRule>>,
    #[serde(default)]
    alert: Vec<Spanned<alert::RawAlert>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    destinations: Spanned<Vec<Destination>>,
    #[serde(default)]
    ports: Option<Spanned<Vec<PortRange>>>,
    #[serde(default)]
    protocols: Option<Spanned<Vec<Protocol>>>,
}

/// Whether a rule approves or blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub destinations: Vec<Destination>,
    /// Empty: every port.
    pub ports: Vec<PortRange>,
    /// Empty: a service approves TCP and UDP; a block blocks every protocol.
    pub protocols: Vec<Protocol>,
    /// 1-based line of the rule's table in its file.
    pub line: usize,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Where it came from (a path, or [`DEFAULT_POLICY_NAME`]).
    pub source: String,
    pub mode: Mode,
    pub default: DefaultVerdict,
    pub allow_loopback: bool,
    /// Services first, then blocks, each in file order.
    pub rules: Vec<Rule>,
    /// `[[alert]]` tables, in file order.
    pub alerts: Vec<alert::Alert>,
    /// SHA-256 of the policy text (hex, first 16 digits): identifies what is applied.
    pub hash: String,
}

/// A policy error, pointing at the offending place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {field}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `service[2].ports`, or `policy` for the file as a whole.
    pub field: String,
    pub message: String,
}

impl Policy {
    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: file.clone(),
            line: 0,
            column: 0,
            field: "policy".into(),
            message: format!("cannot read the policy file: {e}"),
        })?;
        Policy::parse(&file, &text)
    }

    /// The embedded default policy.
    pub fn embedded_default() -> Policy {
        Policy::parse(DEFAULT_POLICY_NAME, DEFAULT_POLICY)
            .expect("the embedded default policy is valid (unit-tested)")
    }

    /// Parses and validates policy text. `file` is used in error messages only.
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let err_at = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            PolicyError {
                file: file.to_string(),
                line,
                column,
                field: field_at(text, offset),
                message,
            }
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            err_at(offset, clean_toml_message(e.message()))
        })?;

        let mut rules = Vec::with_capacity(raw.service.len() + raw.block.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        // Validate in file order, so that a duplicate is reported where it is, not where the name
        // was first used; services are then put first, blocks second.
        let mut all: Vec<(RuleKind, Spanned<RawRule>)> = raw
            .service
            .into_iter()
            .map(|r| (RuleKind::Service, r))
            .chain(raw.block.into_iter().map(|r| (RuleKind::Block, r)))
            .collect();
        all.sort_by_key(|(_, r)| r.span().start);
        for (kind, spanned) in all {
            {
                let table_start = spanned.span().start;
                let r = spanned.into_inner();
                let name_span = r.name.span();
                let name = r.name.into_inner();
                if name.trim().is_empty() {
                    return Err(err_at(name_span.start, "expected a non-empty name".into()));
                }
                if RESERVED_NAMES.contains(&name.as_str()) {
                    return Err(err_at(
                        name_span.start,
                        format!(
                            "`{name}` is reserved for verdicts no rule makes: expected another name"
                        ),
                    ));
                }
                if let Some(first_line) = seen.get(&name) {
                    return Err(err_at(
                        name_span.start,
                        format!(
                            "duplicate name `{name}` (first used on line {first_line}): expected names unique across services and blocks"
                        ),
                    ));
                }
                seen.insert(name.clone(), line_col(text, name_span.start).0);
                let dest_span = r.destinations.span();
                let destinations = r.destinations.into_inner();
                if destinations.is_empty() {
                    return Err(err_at(
                        dest_span.start,
                        "expected at least one address or CIDR".into(),
                    ));
                }
                let ports = match r.ports {
                    Some(p) => {
                        let span = p.span();
                        let p = p.into_inner();
                        if p.is_empty() {
                            return Err(err_at(
                                span.start,
                                "expected at least one port or range (omit `ports` for all ports)"
                                    .into(),
                            ));
                        }
                        p
                    }
                    None => Vec::new(),
                };
                let protocols = match r.protocols {
                    Some(p) => {
                        let span = p.span();
                        let mut p = p.into_inner();
                        if p.is_empty() {
                            return Err(err_at(
                                span.start,
                                "expected \"tcp\" and/or \"udp\" (omit `protocols` for both)"
                                    .into(),
                            ));
                        }
                        p.sort();
                        p.dedup();
                        p
                    }
                    None => Vec::new(),
                };
                rules.push(Rule {
                    kind,
                    name,
                    destinations,
                    ports,
                    protocols,
                    line: line_col(text, table_start).0,
                });
            }
        }
        rules.sort_by_key(|r| r.kind == RuleKind::Block);

        let mut alerts = Vec::with_capacity(raw.alert.len());
        for spanned in raw.alert {
            let table_start = spanned.span().start;
            let a = spanned.into_inner();
            let name_span = a.name.span();
            let name = a.name.into_inner();
            if name.trim().is_empty() {
                return Err(err_at(name_span.start, "expected a non-empty name".into()));
            }
            if RESERVED_NAMES.contains(&name.as_str()) {
                return Err(err_at(
                    name_span.start,
                    format!("`{name}` is reserved: expected another name"),
                ));
            }
            if let Some(first_line) = seen.get(&name) {
                return Err(err_at(
                    name_span.start,
                    format!(
                        "duplicate name `{name}` (first used on line {first_line}): expected names unique across services, blocks and alerts"
                    ),
                ));
            }
            seen.insert(name.clone(), line_col(text, name_span.start).0);
            let mut services = Vec::with_capacity(a.services.len());
            for svc in a.services {
                let span = svc.span();
                let svc = svc.into_inner();
                if !rules.iter().any(|r| r.name == svc) {
                    return Err(err_at(
                        span.start,
                        format!(
                            "no service or block is named `{svc}`: expected one of the names above"
                        ),
                    ));
                }
                services.push(svc);
            }
            let (action, action_at) = match a.action {
                Some(s) => (*s.get_ref(), s.span().start),
                None => (alert::AlertAction::Alert, table_start),
            };
            if action == alert::AlertAction::Block
                && !matches!(
                    a.per,
                    alert::AlertPer::Process | alert::AlertPer::ProcessDestination
                )
            {
                return Err(err_at(
                    action_at,
                    format!(
                        "action = \"block\" cannot apply per = \"{}\": expected per = \"process\" or \"process_destination\"",
                        a.per.as_str()
                    ),
                ));
            }
            alerts.push(alert::Alert {
                name,
                bytes: a.bytes.0,
                window: a.window.0,
                per: a.per,
                action,
                cooldown: a.cooldown.map_or(a.window.0, |c| c.0),
                services,
                destinations: a.destinations,
                exclude_destinations: a.exclude_destinations,
                unapproved_only: a.unapproved_only,
                line: line_col(text, table_start).0,
            });
        }
        Ok(Policy {
            source: file.to_string(),
            mode: raw.mode,
            default: raw.default,
            allow_loopback: raw.allow_loopback,
            rules,
            alerts,
            hash: content_hash(text),
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.kind == RuleKind::Service)
    }

    pub fn blocks(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.kind == RuleKind::Block)
    }
}

/// SHA-256 of the policy text, hex, first 16 digits.
pub fn content_hash(text: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The dotted field path at a byte offset: the closest `key =` at or before it, qualified by the
/// `[[service]]`/`[[block]]` table it sits in (`service[2].ports`). `policy` when there is none.
fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let mut key: Option<String> = None;
    let mut table: Option<(String, usize)> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if pos > offset {
            break;
        }
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            *n += 1;
            table = Some((name, *n));
            key = None;
        } else if let Some((k, _)) = t.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '"')
            {
                key = Some(k.trim_matches('"').to_string());
            }
        }
        pos += line.len();
    }
    match (table, key) {
        (Some((t, n)), Some(k)) => format!("{t}[{n}].{k}"),
        (Some((t, n)), None) => format!("{t}[{n}]"),
        (None, Some(k)) => k,
        (None, None) => "policy".to_string(),
    }
}

/// toml's messages sometimes end in a newline; keep ours on one line.
fn clean_toml_message(m: &str) -> String {
    m.trim().replace('\n', "; ")
}

pub mod alert;
pub mod compile;
pub mod diff;
pub mod explain;

/// Reads, validates and compiles a policy file, or the embedded default when `path` is `None`.
/// Errors carry the file:line:column: field: message text.
pub fn load(path: Option<&Path>) -> anyhow::Result<(Policy, compile::CompiledPolicy)> {
    use anyhow::Context as _;
    let policy = match path {
        Some(p) => Policy::load(p)?,
        None => Policy::embedded_default(),
    };
    let compiled = compile::CompiledPolicy::compile(&policy)
        .with_context(|| format!("compiling policy {}", policy.source))?;
    Ok((policy, compiled))
}

#[cfg(test)]
mod tests;
