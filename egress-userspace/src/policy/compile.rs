//! The compile step: a validated [`Policy`] to the exact entries written into the kernel maps
//! (pure, but for resolving selectors through a [`Resolver`]), and (`evaluate`)
//! [`CompiledPolicy::evaluate_as`], which decides from those entries with the datapath's own
//! algorithm (`egress explain` uses it; a kernel test checks that both agree).
//!
//! An LPM trie returns only the longest matching prefix, but a destination is subject to every
//! rule whose network contains it. Those networks are nested, so they are exactly the rules of
//! the longest matching policy prefix and of every policy prefix containing it. Compilation
//! therefore folds each prefix's ancestors' rules into the prefix's own rule set. Within a set,
//! block rules come first: the first matching rule decides, so a block wins over any service
//! whatever the prefix lengths.
//!
//! Scoped entries (`scopes`) get a scope id in their port rules; TC, which cannot see who sends
//! a packet, never matches them (`tc_mask` 0).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_common::user::builtin_rule_name;
use egress_common::{
    ACTION_ALLOW, ACTION_BLOCK, Config, DEFAULT_ALLOW, DEFAULT_DENY, GRANT_SET_BASE,
    MAX_NAT64_PREFIXES, MAX_PORT_RULES, MODE_AUDIT, MODE_ENFORCE, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_PORTLESS, PROTO_TCP, PROTO_UDP, PortRule, RULE_F_AUDIT, RuleSet, SOCK_ALLOW, SOCK_AUDIT,
    SOCK_DENY, SOCK_POLICY,
};
use ipnetwork::IpNetwork;

use super::{
    DefaultVerdict, Mode, Policy, PortRange, Protocol, Rule, RuleKind, SocketRule,
    error::one_line,
    resolve::{HostResolver, Resolver},
    scopes::compile_scopes,
};

mod evaluate;
mod ranges;

pub use evaluate::{Evaluation, Reason};
pub use ranges::{NoTable, RangeTableV4};

/// A policy that cannot be represented in the kernel maps, or whose selectors do not resolve on
/// this host. Shown as `file:line: destination PREFIX: message` for a destination's problem,
/// `file:line[:column]: FIELD: message` for a rule's (`service[2].users`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}{}: {}: {message}", column_text(*column), place(prefix, field))]
pub struct CompileError {
    pub file: String,
    /// Line of the most specific rule involved, or of the selector value.
    pub line: usize,
    /// Column of the selector value (0: the error is about a whole rule or destination).
    pub column: usize,
    /// The destination involved (or `hosts`); empty for an error about a field.
    pub prefix: String,
    /// The field involved (`service[2].users`, `user_sets.humans`); empty for a destination's.
    pub field: String,
    pub message: String,
}

fn column_text(column: usize) -> String {
    if column == 0 {
        String::new()
    } else {
        format!(":{column}")
    }
}

fn place(prefix: &str, field: &str) -> String {
    if field.is_empty() {
        format!("destination {prefix}")
    } else {
        field.to_string()
    }
}

/// Everything the kernel maps hold for one policy.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub source: String,
    pub config: Config,
    /// `(network, prefix length) -> rule set index`, for `POLICY_V4`.
    pub v4: BTreeMap<(u32, u8), u32>,
    /// `v4` as the kernel's range table (`DIR_V4`/`RANGES_V4`), built on first use
    /// ([`CompiledPolicy::v4_ranges`]).
    v4_table: std::sync::OnceLock<Result<RangeTableV4, NoTable>>,
    /// `(network, prefix length) -> rule set index`, for `POLICY_V6`.
    pub v6: BTreeMap<(u128, u8), u32>,
    /// `RULESETS`, indexed by rule set index.
    pub rulesets: Vec<RuleSet>,
    /// The rule sets of services with `hosts`, by stable slot (`RULESETS` key
    /// `GRANT_SET_BASE | slot`; DNS grants point at them).
    pub host_sets: Vec<HostSet>,
    /// Rule names by `rule_id`; index 0 is `"default"`.
    pub rule_names: Vec<String>,
    /// Kind of each rule by `rule_id` (index 0 unused).
    pub rule_kinds: Vec<Option<RuleKind>>,
    /// Who scoped entries apply to (`PortRule::scope` ids index into these tables).
    pub scopes: super::scopes::CompiledScopes,
    pub services: usize,
    pub blocks: usize,
    pub alerts: usize,
    /// The feeds of blocklists' rules, by rule id (which entry matched, for events).
    pub feeds: BTreeMap<u32, std::sync::Arc<super::feeds::FeedInfo>>,
}

/// Protocol bits a rule covers: those with ports (TCP, UDP), and those without (ICMP, and for
/// a block with neither protocols nor ports every other protocol: SCTP, raw packets at TC, ...).
/// A block that names ports is about TCP and UDP.
fn proto_masks(kind: RuleKind, protocols: &[Protocol], ports: &[PortRange]) -> (u8, u8) {
    if protocols.is_empty() {
        return match kind {
            RuleKind::Block if ports.is_empty() => (PROTO_TCP | PROTO_UDP, PROTO_PORTLESS),
            _ => (PROTO_TCP | PROTO_UDP, 0),
        };
    }
    protocols
        .iter()
        .fold((0, 0), |(ported, portless), p| match p {
            Protocol::Tcp => (ported | PROTO_TCP, portless),
            Protocol::Udp => (ported | PROTO_UDP, portless),
            Protocol::Icmp => (ported, portless | PROTO_ICMP),
            Protocol::Icmpv6 => (ported, portless | PROTO_ICMPV6),
        })
}

/// The `Config::sockets` value of a `[sockets]` rule.
fn sock_rule(r: SocketRule) -> u8 {
    match r {
        SocketRule::Deny => SOCK_DENY,
        SocketRule::Allow => SOCK_ALLOW,
        SocketRule::Audit => SOCK_AUDIT,
        SocketRule::Policy => SOCK_POLICY,
    }
}

/// Sorted, merged port ranges; `(0, 65535)` when a rule names no ports, so that port-less
/// protocols (reported as port 0) are covered too.
fn merged_ranges(ports: &[PortRange]) -> Vec<(u16, u16)> {
    if ports.is_empty() {
        return vec![(0, u16::MAX)];
    }
    let mut r: Vec<(u16, u16)> = ports.iter().map(|p| (p.lo(), p.hi())).collect();
    r.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(r.len());
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// A prefix of one address family, as a left-aligned integer.
trait Family: Copy + Ord + std::hash::Hash + fmt::Debug {
    const BITS: u8;
    /// The network of `addr` at prefix length `len`.
    fn masked(addr: Self, len: u8) -> Self;
    fn contains(net: Self, len: u8, other: Self) -> bool {
        Self::masked(other, len) == net
    }
    fn network(net: IpNetwork) -> Option<Self>;
    fn to_ipnet(net: Self, len: u8) -> IpNetwork;
}

impl Family for u32 {
    const BITS: u8 = 32;
    fn masked(addr: u32, len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            addr & (u32::MAX << (32 - len))
        }
    }
    fn network(net: IpNetwork) -> Option<u32> {
        match net {
            IpNetwork::V4(n) => Some(u32::from(n.network())),
            IpNetwork::V6(_) => None,
        }
    }
    fn to_ipnet(net: u32, len: u8) -> IpNetwork {
        IpNetwork::new(IpAddr::V4(Ipv4Addr::from(net)), len).expect("valid prefix")
    }
}

impl Family for u128 {
    const BITS: u8 = 128;
    fn masked(addr: u128, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            addr & (u128::MAX << (128 - len))
        }
    }
    fn network(net: IpNetwork) -> Option<u128> {
        match net {
            IpNetwork::V6(n) => Some(u128::from(n.network())),
            IpNetwork::V4(_) => None,
        }
    }
    fn to_ipnet(net: u128, len: u8) -> IpNetwork {
        IpNetwork::new(IpAddr::V6(Ipv6Addr::from(net)), len).expect("valid prefix")
    }
}

/// The port rules of one service or block (`id` its rule id, `scope` its scope id, 0 for
/// everyone): its ports and protocols. TC matches on `tc_mask`, and it cannot tell who sent a
/// packet: so only an entry for everyone that refuses or allows for real has one; a scoped entry,
/// or an audit block (which must refuse nothing), is invisible there.
fn port_rules(rule: &Rule, id: u32, scope: u32) -> Vec<PortRule> {
    let (ported, portless) = proto_masks(rule.kind, &rule.protocols, &rule.ports);
    let action = if rule.kind == RuleKind::Block {
        ACTION_BLOCK
    } else {
        ACTION_ALLOW
    };
    let at_tc = scope == 0 && !(rule.audit && rule.kind == RuleKind::Block);
    let rule_of = |port_lo, port_hi, proto_mask| PortRule {
        port_lo,
        port_hi,
        proto_mask,
        action,
        tc_mask: if at_tc { proto_mask } else { 0 },
        flags: if rule.audit { RULE_F_AUDIT } else { 0 },
        rule_id: id,
        scope,
    };
    let mut entries = Vec::new();
    if rule.ports.is_empty() {
        // Every port: one rule carries every protocol.
        entries.push(rule_of(0, u16::MAX, ported | portless));
    } else {
        if ported != 0 {
            for (lo, hi) in merged_ranges(&rule.ports) {
                entries.push(rule_of(lo, hi, ported));
            }
        }
        // Protocols without ports match whatever port the kernel reports.
        if portless != 0 {
            entries.push(rule_of(0, u16::MAX, portless));
        }
    }
    entries
}

/// The slot of a `hosts` service's rule set: a hash of its name, so that it stays the same
/// across reloads (live grants point at it) and a renamed or removed service's grants find
/// nothing.
pub fn host_slot(name: &str) -> u32 {
    // FNV-1a, 31 bits.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h & !GRANT_SET_BASE
}

/// The rule sets of the services that name `hosts`, by slot (`scope_of[i]`: the scope id of
/// rule `i`). Their port rules carry the scope, flags and TC mask of the service: the scope is
/// enforced at the connect, by the hooks' scan of the grant's set.
fn host_sets(policy: &Policy, scope_of: &[u32]) -> Result<Vec<HostSet>, CompileError> {
    let mut out: Vec<HostSet> = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        if rule.kind != RuleKind::Service || rule.hosts.is_empty() {
            continue;
        }
        let id = i as u32 + 1;
        let slot = host_slot(&rule.name);
        if let Some(other) = out.iter().find(|h| h.slot == slot) {
            return Err(CompileError {
                file: policy.source.clone(),
                line: rule.line,
                column: 0,
                field: String::new(),
                prefix: "hosts".into(),
                message: format!(
                    "services {} and {} share a grant slot (a hash of the name): rename one",
                    one_line(&policy.rules[(other.rule_id - 1) as usize].name),
                    one_line(&rule.name)
                ),
            });
        }
        let entries = port_rules(rule, id, scope_of[i]);
        let mut set = RuleSet {
            len: entries.len().min(MAX_PORT_RULES) as u32,
            ..RuleSet::default()
        };
        if entries.len() > MAX_PORT_RULES {
            return Err(CompileError {
                file: policy.source.clone(),
                line: rule.line,
                column: 0,
                field: String::new(),
                prefix: "hosts".into(),
                message: format!(
                    "service {} needs {} port ranges; at most {MAX_PORT_RULES} fit",
                    one_line(&rule.name),
                    entries.len()
                ),
            });
        }
        set.rules[..entries.len()].copy_from_slice(&entries);
        out.push(HostSet {
            rule_id: id,
            slot,
            set,
        });
    }
    Ok(out)
}

/// The rule set of a service that names `hosts`: what a grant for it approves.
#[derive(Debug, Clone, Copy)]
pub struct HostSet {
    pub rule_id: u32,
    /// `RULESETS` key `GRANT_SET_BASE | slot`.
    pub slot: u32,
    pub set: RuleSet,
}

/// Rule sets, shared between prefixes with the same applicable rules.
struct SetBuilder<'p> {
    policy: &'p Policy,
    /// The scope id of each rule, by index.
    scope_of: &'p [u32],
    by_rules: HashMap<Vec<u32>, u32>,
    sets: Vec<RuleSet>,
}

impl SetBuilder<'_> {
    /// The rule set index for a list of applicable rule ids (sorted, deduplicated).
    fn intern(&mut self, rules: &[u32], prefix: IpNetwork) -> Result<u32, CompileError> {
        if let Some(&idx) = self.by_rules.get(rules) {
            return Ok(idx);
        }
        let mut entries: Vec<PortRule> = Vec::new();
        // Blocks first: the first match decides, so a block beats every service.
        for want in [RuleKind::Block, RuleKind::Service] {
            for &id in rules {
                let rule = &self.policy.rules[(id - 1) as usize];
                if rule.kind == want {
                    entries.extend(port_rules(rule, id, self.scope_of[(id - 1) as usize]));
                }
            }
        }
        if entries.len() > MAX_PORT_RULES {
            let names: Vec<String> = rules
                .iter()
                .map(|&id| one_line(&self.policy.rules[(id - 1) as usize].name))
                .collect();
            let line = rules
                .last()
                .map_or(0, |&id| self.policy.rules[(id - 1) as usize].line);
            return Err(CompileError {
                file: self.policy.source.clone(),
                line,
                column: 0,
                field: String::new(),
                prefix: format!("{}/{}", prefix.ip(), prefix.prefix()),
                message: format!(
                    "the rules covering it ({}) need {} port ranges; at most {MAX_PORT_RULES} fit one destination. Merge port lists into ranges or split overlapping rules",
                    names.join(", "),
                    entries.len()
                ),
            });
        }
        let mut set = RuleSet {
            len: entries.len() as u32,
            ..RuleSet::default()
        };
        set.rules[..entries.len()].copy_from_slice(&entries);
        let idx = self.sets.len() as u32;
        self.sets.push(set);
        self.by_rules.insert(rules.to_vec(), idx);
        Ok(idx)
    }
}

/// Folds ancestors' rules into every prefix of one family. Returns `(net, len) -> set index`.
/// Linear after one sort, with one allocation per prefix: a blocklist of 1M entries compiles in
/// a fraction of a second.
fn compile_family<F: Family>(
    policy: &Policy,
    builder: &mut SetBuilder<'_>,
) -> Result<BTreeMap<(F, u8), u32>, CompileError> {
    // ((net, len), rule id) for every destination of every rule. Sorted, each prefix comes
    // after all prefixes that contain it (net, then len), its rule ids in order.
    let mut own: Vec<((F, u8), u32)> = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for d in &rule.destinations {
            let net = d.network();
            if let Some(n) = F::network(net) {
                own.push(((n, net.prefix()), i as u32 + 1));
            }
        }
    }
    own.sort_unstable();
    let mut out = BTreeMap::new();
    // Stack of open ancestors: (net, len) with their rule lists.
    let mut stack: Vec<(F, u8, Vec<u32>)> = Vec::new();
    let mut start = 0;
    while start < own.len() {
        let (net, len) = own[start].0;
        let end = start + own[start..].partition_point(|(k, _)| *k == (net, len));
        while let Some((anet, alen, _)) = stack.last() {
            if F::contains(*anet, *alen, net) && *alen <= len {
                break;
            }
            stack.pop();
        }
        let mut applicable: Vec<u32> = stack.last().map(|(_, _, r)| r.clone()).unwrap_or_default();
        applicable.extend(own[start..end].iter().map(|(_, id)| *id));
        applicable.sort_unstable();
        applicable.dedup();
        let set = builder.intern(&applicable, F::to_ipnet(net, len))?;
        out.insert((net, len), set);
        debug_assert!(len <= F::BITS);
        stack.push((net, len, applicable));
        start = end;
    }
    Ok(out)
}

impl CompiledPolicy {
    /// Compiles `policy`, resolving its selectors on this host ([`HostResolver`]).
    pub fn compile(policy: &Policy) -> Result<CompiledPolicy, CompileError> {
        Self::compile_with(policy, &HostResolver::default())
    }

    /// Compiles `policy`, resolving its selectors (user and group names, executables, cgroups)
    /// with `resolver`. Pure but for what `resolver` reads.
    pub fn compile_with(
        policy: &Policy,
        resolver: &dyn Resolver,
    ) -> Result<CompiledPolicy, CompileError> {
        // A policy that uses names also blocks DNS over TLS (`Policy::enforced_rules`).
        let written = policy;
        let extended;
        let policy: &Policy = match policy.enforced_rules() {
            std::borrow::Cow::Borrowed(_) => policy,
            std::borrow::Cow::Owned(rules) => {
                extended = Policy {
                    rules,
                    ..policy.clone()
                };
                &extended
            }
        };
        let (scope_of, scopes) = compile_scopes(&policy.source, &policy.rules, resolver)?;
        let mut builder = SetBuilder {
            policy,
            scope_of: &scope_of,
            by_rules: HashMap::new(),
            sets: Vec::new(),
        };
        let v4 = compile_family::<u32>(policy, &mut builder)?;
        let v6 = compile_family::<u128>(policy, &mut builder)?;
        let mut rule_names = vec!["default".to_string()];
        let mut rule_kinds = vec![None];
        for r in &policy.rules {
            rule_names.push(r.name.clone());
            rule_kinds.push(Some(r.kind));
        }
        // Alerts follow the rules: a byte-budget block reports its alert as the deciding rule.
        for a in &policy.alerts {
            rule_names.push(a.name.clone());
            rule_kinds.push(None);
        }
        Ok(CompiledPolicy {
            source: policy.source.clone(),
            config: Config {
                mode: match policy.mode {
                    Mode::Enforce => MODE_ENFORCE,
                    Mode::Audit => MODE_AUDIT,
                },
                default_verdict: match policy.default {
                    DefaultVerdict::Deny => DEFAULT_DENY,
                    DefaultVerdict::Allow => DEFAULT_ALLOW,
                },
                allow_loopback: policy.allow_loopback as u32,
                generation: 1,
                nat64_count: policy.nat64_prefixes.len() as u16,
                nat64: nat64_table(&policy.nat64_prefixes),
                sockets: [
                    sock_rule(policy.sockets.raw),
                    sock_rule(policy.sockets.icmp),
                    sock_rule(policy.sockets.other),
                    sock_rule(policy.sockets.packet),
                ],
                scope_keys: scopes.keys,
                scope_cg_levels: scopes.cg_levels,
                ..Config::default()
            },
            v4,
            v4_table: std::sync::OnceLock::new(),
            v6,
            rulesets: builder.sets,
            host_sets: host_sets(policy, &scope_of)?,
            rule_names,
            rule_kinds,
            scopes,
            services: written.services().count(),
            blocks: written.blocks().count(),
            alerts: policy.alerts.len(),
            feeds: policy
                .rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.feed.clone().map(|f| (i as u32 + 1, f)))
                .collect(),
        })
    }

    /// The `rule_id` of alert number `i` (in policy order).
    pub fn alert_rule_id(&self, i: usize) -> u32 {
        (self.rule_names.len() - self.alerts + i) as u32
    }

    /// Name of a rule id as events report it.
    pub fn rule_name(&self, rule_id: u32) -> &str {
        if let Some(name) = builtin_rule_name(rule_id) {
            return name;
        }
        self.rule_names
            .get(rule_id as usize)
            .map_or("unknown", String::as_str)
    }

    /// The IPv4 prefixes as the range table the hooks look destinations up in; why not, when
    /// the policy cannot have one (its IPv4 prefixes then go into the trie).
    pub fn v4_ranges(&self) -> Result<&RangeTableV4, NoTable> {
        self.v4_table
            .get_or_init(|| RangeTableV4::build(&self.v4))
            .as_ref()
            .map_err(|e| *e)
    }

    /// For a blocklist's rule: the feed entry that holds `dst` (`203.0.113.0/24`) and its label
    /// (a Spamhaus id), as events and `explain` report them.
    pub fn feed_entry(&self, rule_id: u32, dst: IpAddr) -> Option<(String, Option<String>)> {
        let (net, label) = self.feeds.get(&rule_id)?.entry_of(dst)?;
        Some((net.to_string(), label.map(str::to_string)))
    }

    pub fn prefix_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// The `nat64_prefixes` as the kernel's `Config::nat64` holds them (parsing allows at most
/// `MAX_NAT64_PREFIXES`).
fn nat64_table(prefixes: &[Ipv6Addr]) -> [[u8; 12]; MAX_NAT64_PREFIXES] {
    let mut table = [[0u8; 12]; MAX_NAT64_PREFIXES];
    for (slot, p) in table.iter_mut().zip(prefixes) {
        slot.copy_from_slice(&p.octets()[..12]);
    }
    table
}

#[cfg(test)]
mod scope_tests;
#[cfg(test)]
mod tests;
