//! Policy text to a validated [`Policy`]: the TOML schema as written (`Raw*`), deserialized with
//! the deserializer's path tracked, then the checks serde cannot make (unique and unreserved
//! names, non-empty lists, `destinations` or `hosts` in every rule, selectors and the sets they
//! reference (`selectors`), alerts' references and actions, `[dns]`), in file order.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv6Addr,
};

use egress_common::MAX_NAT64_PREFIXES;
use ipnetwork::IpNetwork;

use serde::Deserialize;
use toml::Spanned;

use super::{
    DefaultVerdict, Destination, HostPattern, Mode, Policy, PolicyError, PortRange, Protocol, Rule,
    RuleKind, SocketRule, Sockets,
    alert::{
        Alert, AlertAction, AlertPer, DNS_DEFAULT_MIN_QUERIES, DNS_MAX_UNIQUE_SUBDOMAINS,
        DnsThresholds, HumanDuration, RawAlert,
    },
    content_hash,
    dns::{RawDns, dns},
    error::{Entry, Source, Table},
    feeds::{self, Blocklist, FeedFormat, FeedSource},
    selectors::{RawList, RawSets, Sets},
};

/// Names that events use for verdicts no rule made; rules and alerts may not take them.
const RESERVED_NAMES: [&str; 9] = egress_common::user::BUILTIN_RULE_NAMES;

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
    nat64_prefixes: Option<Spanned<Vec<Spanned<Destination>>>>,
    #[serde(default)]
    sockets: Option<RawSockets>,
    #[serde(default)]
    service: Vec<Spanned<RawRule>>,
    #[serde(default)]
    block: Vec<Spanned<RawRule>>,
    #[serde(default)]
    alert: Vec<Spanned<RawAlert>>,
    #[serde(default)]
    blocklist: Vec<Spanned<RawBlocklist>>,
    #[serde(default)]
    dns: Option<RawDns>,
    // The named sets (`selectors`). Not flattened: serde's `flatten` does not combine with
    // `deny_unknown_fields`.
    #[serde(default)]
    executable_sets: BTreeMap<String, RawList>,
    #[serde(default)]
    user_sets: BTreeMap<String, RawList>,
    #[serde(default)]
    group_sets: BTreeMap<String, RawList>,
    #[serde(default)]
    cgroup_sets: BTreeMap<String, RawList>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSockets {
    raw: Option<Spanned<SocketRule>>,
    icmp: Option<Spanned<SocketRule>>,
    other: Option<Spanned<SocketRule>>,
    packet: Option<Spanned<SocketRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    destinations: Option<Spanned<Vec<Destination>>>,
    #[serde(default)]
    hosts: Option<Spanned<Vec<HostPattern>>>,
    #[serde(default)]
    ports: Option<Spanned<Vec<PortRange>>>,
    #[serde(default)]
    protocols: Option<Spanned<Vec<Protocol>>>,
    #[serde(default)]
    executables: Option<RawList>,
    #[serde(default)]
    users: Option<RawList>,
    #[serde(default)]
    groups: Option<RawList>,
    #[serde(default)]
    cgroups: Option<RawList>,
    /// Pod selectors (`pods`): one table or a list of tables.
    #[serde(default)]
    pods: Option<Spanned<super::pods::RawPods>>,
    /// Per entry: `"audit"` reports what the entry would refuse and refuses nothing.
    #[serde(default)]
    mode: Option<Mode>,
}

/// One `[[blocklist]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlocklist {
    name: Spanned<String>,
    #[serde(default)]
    file: Option<Spanned<String>>,
    #[serde(default)]
    url: Option<Spanned<String>>,
    format: FeedFormat,
    #[serde(default)]
    refresh: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    ports: Option<Spanned<Vec<PortRange>>>,
    #[serde(default)]
    protocols: Option<Spanned<Vec<Protocol>>>,
}

impl From<RuleKind> for Table {
    fn from(kind: RuleKind) -> Table {
        match kind {
            RuleKind::Service => Table::Service,
            RuleKind::Block => Table::Block,
        }
    }
}

impl Policy {
    /// Parses and validates policy text. `file` is used in error messages only.
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        Policy::parse_source(file, Source::new(file, text))
    }

    /// Parses and validates `src` (one file's text, or merged fragments) as the policy `source`.
    pub(super) fn parse_source(source: &str, src: Source<'_>) -> Result<Policy, PolicyError> {
        let text = src.text;
        let de = toml::Deserializer::parse(text).map_err(|e| src.syntax(&e))?;
        let raw: RawPolicy = serde_path_to_error::deserialize(de).map_err(|e| src.serde(&e))?;

        let mut names = Names::default();
        let mut sets = Sets::new(
            src,
            RawSets {
                executable_sets: raw.executable_sets,
                user_sets: raw.user_sets,
                group_sets: raw.group_sets,
                cgroup_sets: raw.cgroup_sets,
            },
        )?;
        // Validate in file order, so that a duplicate is reported where it is, not where the name
        // was first used; services are then put first, blocks second (a stable sort).
        let mut tables: Vec<(RuleKind, usize, Spanned<RawRule>)> = raw
            .service
            .into_iter()
            .enumerate()
            .map(|(i, r)| (RuleKind::Service, i, r))
            .chain(
                raw.block
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (RuleKind::Block, i, r)),
            )
            .collect();
        tables.sort_by_key(|(_, _, r)| r.span().start);
        let mut rules = tables
            .into_iter()
            .map(|(kind, index, r)| {
                let entry = Entry {
                    table: kind.into(),
                    index,
                };
                rule(src, &mut names, &mut sets, kind, entry, r)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.sort_by_key(|r| r.kind == RuleKind::Block);

        let blocklists = raw
            .blocklist
            .into_iter()
            .enumerate()
            .map(|(index, b)| {
                let entry = Entry {
                    table: Table::Blocklist,
                    index,
                };
                blocklist(src, &mut names, entry, b)
            })
            .collect::<Result<Vec<_>, _>>()?;

        let rule_names: HashSet<&str> = rules
            .iter()
            .map(|r| r.name.as_str())
            .chain(blocklists.iter().map(|b| b.name.as_str()))
            .collect();
        let alerts = raw
            .alert
            .into_iter()
            .enumerate()
            .map(|(index, a)| {
                let entry = Entry {
                    table: Table::Alert,
                    index,
                };
                alert(src, &mut names, &rule_names, entry, a)
            })
            .collect::<Result<Vec<_>, _>>()?;

        let sockets = match raw.sockets {
            Some(s) => sockets(src, s)?,
            None => Sockets::default(),
        };
        let nat64_prefixes = match raw.nat64_prefixes {
            Some(list) => nat64_prefixes(src, list)?,
            None => Vec::new(),
        };
        let dns = match raw.dns {
            Some(d) => dns(src, d)?,
            None => Default::default(),
        };
        Ok(Policy {
            source: source.to_string(),
            mode: raw.mode,
            default: raw.default,
            allow_loopback: raw.allow_loopback,
            nat64_prefixes,
            sockets,
            rules,
            alerts,
            blocklists,
            feeds: Vec::new(),
            feeds_hash: String::new(),
            dns,
            hash: content_hash(text),
            warnings: sets.unused(src),
        })
    }
}

/// `[sockets]`: `"policy"` only makes sense for ping sockets, whose destinations the policy can
/// judge; raw sockets write whole packets and other protocols have no hook.
fn sockets(src: Source<'_>, raw: RawSockets) -> Result<Sockets, PolicyError> {
    let defaults = Sockets::default();
    let pick = |key: &str,
                value: Option<Spanned<SocketRule>>,
                default: SocketRule|
     -> Result<SocketRule, PolicyError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == SocketRule::Policy && key != "icmp" => Err(src.error(
                v.span().start,
                format!("sockets.{key}"),
                "\"policy\" applies to icmp only: expected \"deny\", \"allow\" or \"audit\"".into(),
            )),
            Some(v) => Ok(v.into_inner()),
        }
    };
    Ok(Sockets {
        raw: pick("raw", raw.raw, defaults.raw)?,
        icmp: pick("icmp", raw.icmp, defaults.icmp)?,
        other: pick("other", raw.other, defaults.other)?,
        packet: pick("packet", raw.packet, defaults.packet)?,
    })
}

/// `nat64_prefixes`: the site's NAT64 /96 prefixes (RFC 6052 allows shorter ones, with the
/// IPv4 address split around a reserved octet; only /96 is supported, and said so).
fn nat64_prefixes(
    src: Source<'_>,
    list: Spanned<Vec<Spanned<Destination>>>,
) -> Result<Vec<Ipv6Addr>, PolicyError> {
    if list.get_ref().len() > MAX_NAT64_PREFIXES {
        return Err(src.error(
            list.span().start,
            "nat64_prefixes".into(),
            format!("at most {MAX_NAT64_PREFIXES} prefixes: expected fewer"),
        ));
    }
    let mut out = Vec::new();
    for d in list.into_inner() {
        let at = d.span().start;
        match d.into_inner().network() {
            IpNetwork::V6(n) if n.prefix() == 96 => out.push(n.ip()),
            other => {
                return Err(src.error(
                    at,
                    "nat64_prefixes".into(),
                    format!(
                        "{other} is not an IPv6 /96: expected a NAT64 prefix such as 64:ff9b:1::/96 (only /96 prefixes are supported)"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// The names taken so far (services and blocks, then alerts), with where each is (`line 3`).
#[derive(Debug, Default)]
struct Names(HashMap<String, String>);

impl Names {
    /// Takes the name of a rule or alert: it must be non-empty, not reserved and not yet taken.
    fn take(
        &mut self,
        src: Source<'_>,
        entry: Entry,
        name: Spanned<String>,
    ) -> Result<String, PolicyError> {
        let at = name.span().start;
        let name = name.into_inner();
        let is_alert = entry.table == Table::Alert;
        let problem = if name.trim().is_empty() {
            Some("expected a non-empty name".to_string())
        } else if RESERVED_NAMES.contains(&name.as_str()) {
            Some(if is_alert {
                format!("`{name}` is reserved: expected another name")
            } else {
                format!("`{name}` is reserved for verdicts no rule makes: expected another name")
            })
        } else if let Some(first) = self.0.get(&name) {
            let across = if is_alert {
                "services, blocks and alerts"
            } else {
                "services and blocks"
            };
            Some(format!(
                "duplicate name `{name}` (first used on {first}): expected names unique across {across}"
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(src.error(at, entry.field("name"), message));
        }
        self.0.insert(name.clone(), src.where_is(at));
        Ok(name)
    }
}

/// The list under `key`, which must not be empty.
fn non_empty<T>(
    src: Source<'_>,
    entry: Entry,
    key: &str,
    list: Spanned<Vec<T>>,
    expected: &str,
) -> Result<Vec<T>, PolicyError> {
    if list.get_ref().is_empty() {
        return Err(src.error(list.span().start, entry.field(key), expected.into()));
    }
    Ok(list.into_inner())
}

/// One `[[service]]` or `[[block]]`.
fn rule(
    src: Source<'_>,
    names: &mut Names,
    sets: &mut Sets,
    kind: RuleKind,
    entry: Entry,
    table: Spanned<RawRule>,
) -> Result<Rule, PolicyError> {
    let table_start = table.span().start;
    let line = src.line(table_start);
    let r = table.into_inner();
    let name = names.take(src, entry, r.name)?;
    if r.destinations.is_none() && r.hosts.is_none() {
        return Err(src.error(
            table_start,
            entry.whole(),
            "missing `destinations` and `hosts`: expected at least one of them (addresses or CIDRs, names), or both".into(),
        ));
    }
    let destinations = r
        .destinations
        .map(|d| {
            non_empty(
                src,
                entry,
                "destinations",
                d,
                "expected at least one address or CIDR (omit `destinations` for a rule of `hosts` only)",
            )
        })
        .transpose()?
        .unwrap_or_default();
    let mut hosts = r
        .hosts
        .map(|h| {
            non_empty(
                src,
                entry,
                "hosts",
                h,
                "expected at least one name (omit `hosts` for a rule of `destinations` only)",
            )
        })
        .transpose()?
        .unwrap_or_default();
    let mut seen = HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    let ports_at = r.ports.as_ref().map_or(0, |p| p.span().start);
    let ports = r
        .ports
        .map(|p| {
            non_empty(
                src,
                entry,
                "ports",
                p,
                "expected at least one port or range (omit `ports` for all ports)",
            )
        })
        .transpose()?
        .unwrap_or_default();
    let mut protocols = r
        .protocols
        .map(|p| {
            non_empty(
                src,
                entry,
                "protocols",
                p,
                "expected \"tcp\", \"udp\", \"icmp\" and/or \"icmpv6\" (omit `protocols` for tcp and udp)",
            )
        })
        .transpose()?
        .unwrap_or_default();
    protocols.sort();
    protocols.dedup();
    if !ports.is_empty() && !protocols.is_empty() && !protocols.iter().any(|p| p.has_ports()) {
        return Err(src.error(
            ports_at,
            entry.field("ports"),
            "icmp has no ports: expected \"tcp\" or \"udp\" in `protocols`, or no `ports`".into(),
        ));
    }
    let mut selectors =
        sets.selectors(src, entry, [r.executables, r.users, r.groups, r.cgroups])?;
    selectors.pods = super::pods::pod_selectors(src, entry, r.pods)?;
    Ok(Rule {
        kind,
        name,
        destinations,
        hosts,
        ports,
        protocols,
        line,
        selectors,
        audit: r.mode == Some(Mode::Audit),
        feed: None,
    })
}

/// One `[[blocklist]]`: exactly one of `file` and `url`; `refresh` for `url` only; `ports` and
/// `protocols` as a `[[block]]`'s. A relative `file` is relative to the policy file naming it.
fn blocklist(
    src: Source<'_>,
    names: &mut Names,
    entry: Entry,
    table: Spanned<RawBlocklist>,
) -> Result<Blocklist, PolicyError> {
    let table_start = table.span().start;
    let line = src.line(table_start);
    let file_of = src.file_of(table_start).to_string();
    let b = table.into_inner();
    let name = names.take(src, entry, b.name)?;
    let source = match (b.file, b.url) {
        (Some(_), Some(u)) => {
            return Err(src.error(
                u.span().start,
                entry.field("url"),
                "both `file` and `url`: expected exactly one of them".into(),
            ));
        }
        (None, None) => {
            return Err(src.error(
                table_start,
                entry.whole(),
                "missing `file` or `url`: expected where the feed is read from".into(),
            ));
        }
        (Some(f), None) => {
            let at = f.span().start;
            let f = f.into_inner();
            if f.trim().is_empty() {
                return Err(src.error(at, entry.field("file"), "expected a file path".into()));
            }
            let path = std::path::PathBuf::from(&f);
            let path = if path.is_relative() {
                std::path::Path::new(&file_of)
                    .parent()
                    .map_or(path.clone(), |dir| dir.join(&path))
            } else {
                path
            };
            FeedSource::File(path)
        }
        (None, Some(u)) => {
            let at = u.span().start;
            let u = u.into_inner();
            let rest = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"));
            match rest {
                Some(r)
                    if !r.is_empty()
                        && !r.starts_with('/')
                        && !u.chars().any(char::is_whitespace) => {}
                _ => {
                    return Err(src.error(
                        at,
                        entry.field("url"),
                        format!("`{u}` is not an http:// or https:// URL: expected such as \"https://feeds.example/drop.txt\""),
                    ));
                }
            }
            FeedSource::Url(u)
        }
    };
    let refresh = match (b.refresh, &source) {
        (Some(r), FeedSource::File(_)) => {
            return Err(src.error(
                r.span().start,
                entry.field("refresh"),
                "a `file` feed is re-read at every reload: expected `refresh` only with `url`"
                    .into(),
            ));
        }
        (Some(r), FeedSource::Url(_)) if r.get_ref().0 < feeds::MIN_REFRESH => {
            return Err(src.error(
                r.span().start,
                entry.field("refresh"),
                format!(
                    "{} is too often: expected at least {}s",
                    r.get_ref(),
                    feeds::MIN_REFRESH.as_secs()
                ),
            ));
        }
        (Some(r), _) => r.into_inner().0,
        (None, _) => feeds::DEFAULT_REFRESH,
    };
    let ports_at = b.ports.as_ref().map_or(0, |p| p.span().start);
    let ports = b.ports.map(|p| p.into_inner()).unwrap_or_default();
    let mut protocols = b
        .protocols
        .map(|p| {
            non_empty(
                src,
                entry,
                "protocols",
                p,
                "expected \"tcp\", \"udp\", \"icmp\" and/or \"icmpv6\" (omit `protocols` for every protocol)",
            )
        })
        .transpose()?
        .unwrap_or_default();
    protocols.sort();
    protocols.dedup();
    if !ports.is_empty() && !protocols.is_empty() && !protocols.iter().any(|p| p.has_ports()) {
        return Err(src.error(
            ports_at,
            entry.field("ports"),
            "icmp has no ports: expected \"tcp\" or \"udp\" in `protocols`, or no `ports`".into(),
        ));
    }
    if b.format == FeedFormat::Hosts && (!ports.is_empty() || !protocols.is_empty()) {
        let at = if ports.is_empty() {
            table_start
        } else {
            ports_at
        };
        return Err(src.error(
            at,
            entry.field("ports"),
            "a `hosts` feed blocks names at the DNS proxy, for every port: expected no `ports` or `protocols`".into(),
        ));
    }
    Ok(Blocklist {
        name,
        source,
        format: b.format,
        refresh,
        ports,
        protocols,
        line,
        file: file_of,
    })
}

/// One `[[alert]]`; `rule_names` are the names of every service and block. Either the byte kind
/// (`bytes`) or the DNS kind (`dns_*` keys), never both.
fn alert(
    src: Source<'_>,
    names: &mut Names,
    rule_names: &HashSet<&str>,
    entry: Entry,
    table: Spanned<RawAlert>,
) -> Result<Alert, PolicyError> {
    let table_start = table.span().start;
    let a = table.into_inner();
    let name = names.take(src, entry, a.name)?;
    let (per, per_at) = match &a.per {
        Some(p) => (*p.get_ref(), p.span().start),
        None => (AlertPer::default(), table_start),
    };
    let (action, action_at) = match &a.action {
        Some(s) => (*s.get_ref(), s.span().start),
        None => (AlertAction::Alert, table_start),
    };
    let dns_keys: Vec<(&str, usize)> = [
        (
            "dns_unique_subdomains",
            a.dns_unique_subdomains.as_ref().map(|s| s.span().start),
        ),
        ("dns_bytes", a.dns_bytes.as_ref().map(|s| s.span().start)),
        (
            "dns_entropy",
            a.dns_entropy.as_ref().map(|s| s.span().start),
        ),
        (
            "dns_min_queries",
            a.dns_min_queries.as_ref().map(|s| s.span().start),
        ),
    ]
    .into_iter()
    .filter_map(|(k, at)| at.map(|at| (k, at)))
    .collect();
    if !dns_keys.is_empty() {
        let thresholds = dns_thresholds(
            src,
            entry,
            table_start,
            &a.dns_unique_subdomains,
            &a.dns_bytes,
            &a.dns_entropy,
            &a.dns_min_queries,
        )?;
        // The byte kind's own keys make no sense on a DNS alert: say so at the first one.
        let byte_only = [
            ("bytes", a.bytes.as_ref().map(|s| s.span().start)),
            ("services", a.services.as_ref().map(|s| s.span().start)),
            (
                "destinations",
                a.destinations.as_ref().map(|s| s.span().start),
            ),
            (
                "exclude_destinations",
                a.exclude_destinations.as_ref().map(|s| s.span().start),
            ),
            (
                "unapproved_only",
                a.unapproved_only.as_ref().map(|s| s.span().start),
            ),
        ];
        if let Some((key, at)) = byte_only
            .into_iter()
            .find_map(|(k, at)| at.map(|at| (k, at)))
        {
            return Err(src.error(
                at,
                entry.field(key),
                format!(
                    "`{key}` belongs to a byte-budget alert, and this one is a DNS alert (`{}`): an alert is of one kind; write two alerts",
                    dns_keys[0].0
                ),
            ));
        }
        if !matches!(per, AlertPer::Process | AlertPer::Cgroup) {
            return Err(src.error(
                per_at,
                entry.field("per"),
                format!(
                    "a DNS alert counts per = \"process\" or per = \"cgroup\", not \"{}\"",
                    per.as_str()
                ),
            ));
        }
        let _ = action_at;
        return Ok(Alert {
            name,
            bytes: 0,
            window: a.window.0,
            per,
            action,
            cooldown: a.cooldown.map_or(a.window.0, |c| c.0),
            services: Vec::new(),
            destinations: Vec::new(),
            exclude_destinations: Vec::new(),
            unapproved_only: false,
            dns: Some(thresholds),
            line: src.line(table_start),
        });
    }
    let Some(bytes) = a.bytes else {
        return Err(src.error(
            table_start,
            entry.whole(),
            "missing field `bytes`: an alert needs `bytes` (a byte budget) or a DNS threshold (`dns_unique_subdomains`, `dns_bytes` or `dns_entropy`)".into(),
        ));
    };
    let services = a
        .services
        .map(Spanned::into_inner)
        .unwrap_or_default()
        .into_iter()
        .map(|svc| {
            if rule_names.contains(svc.get_ref().as_str()) {
                Ok(svc.into_inner())
            } else {
                Err(src.error(
                    svc.span().start,
                    entry.field("services"),
                    format!(
                        "no service or block is named `{}`: expected one of the names above",
                        svc.get_ref()
                    ),
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if action == AlertAction::Block && !per.blockable() {
        return Err(src.error(
            action_at,
            entry.field("action"),
            format!(
                "action = \"block\" cannot apply per = \"{}\": expected per = \"process\", \"process_destination\", \"user\" or \"executable\"",
                per.as_str()
            ),
        ));
    }
    Ok(Alert {
        name,
        bytes: bytes.into_inner().0,
        window: a.window.0,
        per,
        action,
        cooldown: a.cooldown.map_or(a.window.0, |c| c.0),
        services,
        destinations: a.destinations.map(Spanned::into_inner).unwrap_or_default(),
        exclude_destinations: a
            .exclude_destinations
            .map(Spanned::into_inner)
            .unwrap_or_default(),
        unapproved_only: a.unapproved_only.is_some_and(|u| *u.get_ref()),
        dns: None,
        line: src.line(table_start),
    })
}

/// The `dns_*` keys of a DNS alert, each in range.
fn dns_thresholds(
    src: Source<'_>,
    entry: Entry,
    table_start: usize,
    unique: &Option<Spanned<i64>>,
    bytes: &Option<Spanned<super::alert::ByteSize>>,
    entropy: &Option<Spanned<f64>>,
    min_queries: &Option<Spanned<i64>>,
) -> Result<DnsThresholds, PolicyError> {
    let count = |v: &Option<Spanned<i64>>, key: &str, min: i64, max: u64| {
        v.as_ref()
            .map(|s| {
                let n = *s.get_ref();
                if n < min || n as u64 > max {
                    Err(src.error(
                        s.span().start,
                        entry.field(key),
                        format!("{n} is out of range: expected {min} to {max}"),
                    ))
                } else {
                    Ok(n as u64)
                }
            })
            .transpose()
    };
    let unique_subdomains = count(
        unique,
        "dns_unique_subdomains",
        2,
        DNS_MAX_UNIQUE_SUBDOMAINS,
    )?;
    let min_queries_at = min_queries.as_ref().map(|s| s.span().start);
    let min_queries =
        count(min_queries, "dns_min_queries", 1, 1_000_000)?.unwrap_or(DNS_DEFAULT_MIN_QUERIES);
    let entropy_millibits = entropy
        .as_ref()
        .map(|s| {
            let e = *s.get_ref();
            // Base32 text has at most 5 bits a character, hex 4, any byte 8.
            if (0.5..=8.0).contains(&e) {
                Ok((e * 1000.0).round() as u32)
            } else {
                Err(src.error(
                    s.span().start,
                    entry.field("dns_entropy"),
                    format!(
                        "{e} is out of range: expected bits per character, 0.5 to 8.0 (e.g. 3.5)"
                    ),
                ))
            }
        })
        .transpose()?;
    let t = DnsThresholds {
        unique_subdomains,
        bytes: bytes.as_ref().map(|b| b.get_ref().0),
        entropy_millibits,
        min_queries,
    };
    if t.unique_subdomains.is_none() && t.bytes.is_none() && t.entropy_millibits.is_none() {
        let at = min_queries_at.unwrap_or(table_start);
        return Err(src.error(
            at,
            entry.field("dns_min_queries"),
            "`dns_min_queries` alone sets no threshold: add `dns_unique_subdomains`, `dns_bytes` or `dns_entropy`".into(),
        ));
    }
    Ok(t)
}
