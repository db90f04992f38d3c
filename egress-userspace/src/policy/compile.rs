//! The pure compile step: a validated [`Policy`] to the exact entries written into the kernel
//! maps, and [`CompiledPolicy::evaluate`], which decides from those entries with the datapath's
//! own algorithm (`egress explain` uses it; a kernel test checks that both agree).
//!
//! An LPM trie returns only the longest matching prefix, but a destination is subject to every
//! rule whose network contains it. Those networks are nested, so they are exactly the rules of
//! the longest matching policy prefix and of every policy prefix containing it. Compilation
//! therefore folds each prefix's ancestors' rules into the prefix's own rule set. Within a set,
//! block rules come first: the first matching rule decides, so a block wins over any service
//! whatever the prefix lengths.
//!
//! (Just over 500 lines: the compile step and the decision it must agree with, kept together.)

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_common::user::builtin_rule_name;
use egress_common::{
    ACTION_ALLOW, ACTION_BLOCK, Config, DEFAULT_ALLOW, DEFAULT_DENY, GRANT_SET_BASE,
    MAX_NAT64_PREFIXES, MAX_PORT_RULES, MODE_AUDIT, MODE_ENFORCE, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_PORTLESS, PROTO_TCP, PROTO_UDP, PortRule, RULE_DEFAULT, RULE_LOOPBACK, RuleSet,
    SOCK_ALLOW, SOCK_AUDIT, SOCK_DENY, SOCK_POLICY, embedded_v4, is_loopback_v4, is_loopback_v6,
    v4_mapped,
};
use ipnetwork::IpNetwork;

use super::{
    DefaultVerdict, Mode, Policy, PortRange, Protocol, Rule, RuleKind, SocketRule, error::one_line,
};

/// A policy that cannot be represented in the kernel maps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: destination {prefix}: {message}")]
pub struct CompileError {
    pub file: String,
    /// Line of the most specific rule involved.
    pub line: usize,
    pub prefix: String,
    pub message: String,
}

/// Everything the kernel maps hold for one policy.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub source: String,
    pub config: Config,
    /// `(network, prefix length) -> rule set index`, for `POLICY_V4`.
    pub v4: BTreeMap<(u32, u8), u32>,
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
}

/// What decided a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `allow_loopback` short-cut.
    Loopback,
    /// The policy prefix that matched, and the rule of its set that matched.
    Rule { prefix: IpNetwork, rule_id: u32 },
    /// A policy prefix matched but none of its rules fits the port/protocol.
    DefaultInPrefix { prefix: IpNetwork },
    /// No policy prefix contains the destination.
    Default,
}

/// A verdict, as the kernel would give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The policy's decision (before audit mode turns a deny into an allowed call).
    pub allow: bool,
    /// `rule_id` as events report it.
    pub rule_id: u32,
    pub reason: Reason,
    /// The address whose rule decided (the IPv4 address of a v4-mapped destination, or the
    /// IPv4 address an IPv6 destination carries when that is what denied it).
    pub judged: IpAddr,
    /// The IPv4 address an IPv6 destination carries (NAT64, 6to4, v4-compatible), judged too.
    pub carried_v4: Option<Ipv4Addr>,
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

/// The port rules of one service or block (`id` its rule id): its ports and protocols.
fn port_rules(rule: &Rule, id: u32) -> Vec<PortRule> {
    let (ported, portless) = proto_masks(rule.kind, &rule.protocols, &rule.ports);
    let action = if rule.kind == RuleKind::Block {
        ACTION_BLOCK
    } else {
        ACTION_ALLOW
    };
    let rule_of = |port_lo, port_hi, proto_mask| PortRule {
        port_lo,
        port_hi,
        proto_mask,
        action,
        tc_mask: proto_mask,
        flags: 0,
        rule_id: id,
        scope: 0,
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

/// The rule sets of the services that name `hosts`, by slot.
fn host_sets(policy: &Policy) -> Result<Vec<HostSet>, CompileError> {
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
                prefix: "hosts".into(),
                message: format!(
                    "services {} and {} share a grant slot (a hash of the name): rename one",
                    one_line(&policy.rules[(other.rule_id - 1) as usize].name),
                    one_line(&rule.name)
                ),
            });
        }
        let entries = port_rules(rule, id);
        let mut set = RuleSet {
            len: entries.len().min(MAX_PORT_RULES) as u32,
            ..RuleSet::default()
        };
        if entries.len() > MAX_PORT_RULES {
            return Err(CompileError {
                file: policy.source.clone(),
                line: rule.line,
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
    by_rules: HashMap<Vec<u32>, u32>,
    sets: Vec<RuleSet>,
}

impl SetBuilder<'_> {
    /// The rule set index for a list of applicable rule ids (sorted, deduplicated).
    fn intern(&mut self, rules: Vec<u32>, prefix: IpNetwork) -> Result<u32, CompileError> {
        if let Some(&idx) = self.by_rules.get(&rules) {
            return Ok(idx);
        }
        let mut entries: Vec<PortRule> = Vec::new();
        // Blocks first: the first match decides, so a block beats every service.
        for want in [RuleKind::Block, RuleKind::Service] {
            for &id in &rules {
                let rule = &self.policy.rules[(id - 1) as usize];
                if rule.kind == want {
                    entries.extend(port_rules(rule, id));
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
        self.by_rules.insert(rules, idx);
        Ok(idx)
    }
}

/// Folds ancestors' rules into every prefix of one family. Returns `(net, len) -> set index`.
fn compile_family<F: Family>(
    policy: &Policy,
    builder: &mut SetBuilder<'_>,
) -> Result<BTreeMap<(F, u8), u32>, CompileError> {
    // (net, len) -> rule ids naming exactly this prefix. BTreeMap order (net, then len) puts
    // every prefix after all prefixes that contain it.
    let mut own: BTreeMap<(F, u8), Vec<u32>> = BTreeMap::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for d in &rule.destinations {
            let net = d.network();
            if let Some(n) = F::network(net) {
                own.entry((n, net.prefix())).or_default().push(i as u32 + 1);
            }
        }
    }
    let mut out = BTreeMap::new();
    // Stack of open ancestors: (net, len, index into `own` order) with their rule lists.
    let mut stack: Vec<(F, u8, Vec<u32>)> = Vec::new();
    for ((net, len), ids) in own {
        while let Some((anet, alen, _)) = stack.last() {
            if F::contains(*anet, *alen, net) && *alen <= len {
                break;
            }
            stack.pop();
        }
        let mut applicable: Vec<u32> = stack.last().map(|(_, _, r)| r.clone()).unwrap_or_default();
        applicable.extend(ids);
        applicable.sort_unstable();
        applicable.dedup();
        let set = builder.intern(applicable.clone(), F::to_ipnet(net, len))?;
        out.insert((net, len), set);
        debug_assert!(len <= F::BITS);
        stack.push((net, len, applicable));
    }
    Ok(out)
}

impl CompiledPolicy {
    pub fn compile(policy: &Policy) -> Result<CompiledPolicy, CompileError> {
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
        let mut builder = SetBuilder {
            policy,
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
                nat64_count: policy.nat64_prefixes.len() as u32,
                nat64: nat64_table(&policy.nat64_prefixes),
                sockets: [
                    sock_rule(policy.sockets.raw),
                    sock_rule(policy.sockets.icmp),
                    sock_rule(policy.sockets.other),
                    sock_rule(policy.sockets.packet),
                ],
                ..Config::default()
            },
            v4,
            v6,
            rulesets: builder.sets,
            host_sets: host_sets(policy)?,
            rule_names,
            rule_kinds,
            scopes: super::scopes::CompiledScopes::default(),
            services: written.services().count(),
            blocks: written.blocks().count(),
            alerts: policy.alerts.len(),
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

    pub fn prefix_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Decides like the datapath: loopback short-cut, v4-mapped to IPv4, longest-prefix match,
    /// then the first matching rule of that prefix's set (`RuleSet::first_match`), else the
    /// default. An IPv6 destination that carries an IPv4 address (NAT64, 6to4,
    /// v4-compatible: `egress_common::embedded_v4`) must be allowed as that IPv4 address too.
    /// `ipproto` is the IP protocol number (6 TCP, 17 UDP).
    pub fn evaluate(&self, dst: IpAddr, port: u16, ipproto: u8) -> Evaluation {
        let as_given = self.evaluate_one(dst, port, ipproto);
        let IpAddr::V6(v6) = as_given.judged else {
            return as_given;
        };
        if as_given.reason == Reason::Loopback {
            return as_given;
        }
        let Some(v4) = embedded_v4(&v6.octets(), &self.config) else {
            return as_given;
        };
        let carried = Ipv4Addr::from(v4);
        let as_v4 = self.evaluate_one(IpAddr::V4(carried), port, ipproto);
        let decided = if as_given.allow && !as_v4.allow {
            as_v4
        } else {
            as_given
        };
        Evaluation {
            carried_v4: Some(carried),
            ..decided
        }
    }

    fn evaluate_one(&self, dst: IpAddr, port: u16, ipproto: u8) -> Evaluation {
        let judged = match dst {
            IpAddr::V6(v6) => match v4_mapped(&v6.octets()) {
                Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
                None => dst,
            },
            IpAddr::V4(_) => dst,
        };
        let loopback = match judged {
            IpAddr::V4(a) => is_loopback_v4(&a.octets()),
            IpAddr::V6(a) => is_loopback_v6(&a.octets()),
        };
        if self.config.allow_loopback != 0 && loopback {
            return Evaluation {
                allow: true,
                rule_id: RULE_LOOPBACK,
                reason: Reason::Loopback,
                judged,
                carried_v4: None,
            };
        }
        let hit = match judged {
            IpAddr::V4(a) => lpm(&self.v4, u32::from(a)),
            IpAddr::V6(a) => lpm(&self.v6, u128::from(a)),
        };
        let default_allow = self.config.default_verdict == DEFAULT_ALLOW;
        let Some((prefix, set)) = hit else {
            return Evaluation {
                allow: default_allow,
                rule_id: RULE_DEFAULT,
                reason: Reason::Default,
                judged,
                carried_v4: None,
            };
        };
        let m = self.rulesets[set as usize].first_match::<false>(
            port,
            ipproto,
            &egress_common::ScopeBits::EVERYONE,
        );
        match (m.rule_id != RULE_DEFAULT).then_some(m) {
            Some(r) => Evaluation {
                allow: !r.block,
                rule_id: r.rule_id,
                reason: Reason::Rule {
                    prefix,
                    rule_id: r.rule_id,
                },
                judged,
                carried_v4: None,
            },
            None => Evaluation {
                allow: default_allow,
                rule_id: RULE_DEFAULT,
                reason: Reason::DefaultInPrefix { prefix },
                judged,
                carried_v4: None,
            },
        }
    }

    /// The rule set of the longest policy prefix containing `dst` (v4-mapped judged as IPv4).
    pub fn matching_set(&self, dst: IpAddr) -> Option<(IpNetwork, &RuleSet)> {
        let hit = match dst {
            IpAddr::V4(a) => lpm(&self.v4, u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => lpm(&self.v4, u32::from(v4)),
                None => lpm(&self.v6, u128::from(a)),
            },
        };
        hit.map(|(p, s)| (p, &self.rulesets[s as usize]))
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

/// Longest-prefix match over compiled entries.
fn lpm<F: Family>(entries: &BTreeMap<(F, u8), u32>, addr: F) -> Option<(IpNetwork, u32)> {
    (0..=F::BITS).rev().find_map(|len| {
        let net = F::masked(addr, len);
        entries
            .get(&(net, len))
            .map(|&set| (F::to_ipnet(net, len), set))
    })
}

#[cfg(test)]
mod tests;
