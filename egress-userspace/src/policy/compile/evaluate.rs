//! The decision from the compiled entries, with the datapath's own algorithm (`egress explain`
//! and the accounting use it; a kernel test checks that both agree): loopback short-cut,
//! v4-mapped to IPv4, longest-prefix match, the shared scan `RuleSet::first_match::<false>` with
//! the caller's scopes, and `Match::verdict` with the default.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use egress_common::{
    DEFAULT_ALLOW, RULE_DEFAULT, RULE_LOOPBACK, RuleSet, ScopeBits, embedded_v4, is_loopback_v4,
    is_loopback_v6, v4_mapped,
};
use ipnetwork::IpNetwork;

use super::{CompiledPolicy, Family};

/// What decided a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `allow_loopback` short-cut.
    Loopback,
    /// The policy prefix that matched, and the rule of its set that matched.
    Rule { prefix: IpNetwork, rule_id: u32 },
    /// A policy prefix matched but none of its rules fits the port/protocol (and the caller).
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
    /// An entry in `mode = "audit"` that would have refused this allowed call (the kernel
    /// reports it as an `"audit"` event), else 0 (`Verdict::audit_rule`).
    pub audit_rule: u32,
}

impl CompiledPolicy {
    /// Decides like the datapath for a caller in no scope ([`ScopeBits::EVERYONE`]): see
    /// [`CompiledPolicy::evaluate_as`].
    pub fn evaluate(&self, dst: IpAddr, port: u16, ipproto: u8) -> Evaluation {
        self.evaluate_as(dst, port, ipproto, &ScopeBits::EVERYONE)
    }

    /// Decides like the datapath's hooks for a caller in `scopes` (`CompiledScopes::resolve`):
    /// loopback short-cut, v4-mapped to IPv4, longest-prefix match, then the scan of that
    /// prefix's set (`RuleSet::first_match::<false>`) and its verdict with the default
    /// (`Match::verdict`). An IPv6 destination that carries an IPv4 address (NAT64, 6to4,
    /// v4-compatible: `egress_common::embedded_v4`) must be allowed as that IPv4 address too.
    /// `ipproto` is the IP protocol number (6 TCP, 17 UDP).
    pub fn evaluate_as(
        &self,
        dst: IpAddr,
        port: u16,
        ipproto: u8,
        scopes: &ScopeBits,
    ) -> Evaluation {
        let as_given = self.evaluate_one(dst, port, ipproto, scopes);
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
        let as_v4 = self.evaluate_one(IpAddr::V4(carried), port, ipproto, scopes);
        // As `decide_v6`: the IPv4 decision replaces an allowed IPv6 one only when it refuses.
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

    fn evaluate_one(&self, dst: IpAddr, port: u16, ipproto: u8, scopes: &ScopeBits) -> Evaluation {
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
        let plain = |allow, rule_id, reason| Evaluation {
            allow,
            rule_id,
            reason,
            judged,
            carried_v4: None,
            audit_rule: 0,
        };
        if self.config.allow_loopback != 0 && loopback {
            return plain(true, RULE_LOOPBACK, Reason::Loopback);
        }
        let hit = match judged {
            IpAddr::V4(a) => self.v4_hit(u32::from(a)),
            IpAddr::V6(a) => lpm(&self.v6, u128::from(a)),
        };
        let default_allow = self.config.default_verdict == DEFAULT_ALLOW;
        let Some((prefix, set)) = hit else {
            return plain(default_allow, RULE_DEFAULT, Reason::Default);
        };
        let m = self.rulesets[set as usize].first_match::<false>(port, ipproto, scopes);
        let v = m.verdict(default_allow);
        Evaluation {
            allow: v.allow,
            rule_id: v.rule_id,
            reason: if m.rule_id != RULE_DEFAULT {
                Reason::Rule {
                    prefix,
                    rule_id: m.rule_id,
                }
            } else {
                Reason::DefaultInPrefix { prefix }
            },
            judged,
            carried_v4: None,
            audit_rule: v.audit_rule,
        }
    }

    /// The rule set of the longest policy prefix containing `dst` (v4-mapped judged as IPv4).
    pub fn matching_set(&self, dst: IpAddr) -> Option<(IpNetwork, &RuleSet)> {
        let hit = match dst {
            IpAddr::V4(a) => self.v4_hit(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.v4_hit(u32::from(v4)),
                None => lpm(&self.v6, u128::from(a)),
            },
        };
        hit.map(|(p, s)| (p, &self.rulesets[s as usize]))
    }
}

impl CompiledPolicy {
    /// The rule set an IPv4 destination gets, found as the kernel finds it: in the range table
    /// when the policy has one (the same lookup code), else by longest-prefix match as the trie
    /// does. The prefix named is the longest one containing `addr`.
    fn v4_hit(&self, addr: u32) -> Option<(IpNetwork, u32)> {
        let named = lpm(&self.v4, addr);
        let Ok(table) = self.v4_ranges() else {
            return named;
        };
        let set = table.lookup(addr);
        debug_assert_eq!(set, named.map(|n| n.1), "range table and prefixes disagree");
        let set = set?;
        let prefix = named.map_or_else(|| u32::to_ipnet(0, 0), |n| n.0);
        Some((prefix, set))
    }
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

impl CompiledPolicy {
    /// Where a scoped service does not narrow anything: a destination whose rule set lets an
    /// *unscoped* enforced service approve the same ports and protocols for everyone, so the
    /// callers outside the scoped service's scope get through anyway ("only restic may reach
    /// S3" with another service covering S3 for all). One line per pair of services, naming a
    /// destination prefix where they meet; `egress check` prints them as warnings.
    pub fn scope_overlaps(&self) -> Vec<String> {
        let mut found: BTreeMap<(u32, u32), IpNetwork> = BTreeMap::new();
        let prefixes = self
            .v4
            .iter()
            .map(|(&(n, l), &s)| (IpNetwork::new(IpAddr::V4(n.into()), l), s))
            .chain(
                self.v6
                    .iter()
                    .map(|(&(n, l), &s)| (IpNetwork::new(IpAddr::V6(n.into()), l), s)),
            );
        for (net, set) in prefixes {
            let (Ok(net), Some(set)) = (net, self.rulesets.get(set as usize)) else {
                continue;
            };
            let rules = &set.rules[..(set.len as usize).min(set.rules.len())];
            // A scoped enforced service (an audit one narrows nothing yet), and an unscoped
            // service of any mode (an unscoped audit service allows everyone too).
            let allows = |r: &&egress_common::PortRule| r.action != egress_common::ACTION_BLOCK;
            let narrows = |r: &&egress_common::PortRule| {
                r.scope != 0 && r.flags & egress_common::RULE_F_AUDIT == 0
            };
            for s in rules.iter().filter(allows).filter(narrows) {
                for u in rules.iter().filter(allows).filter(|r| r.scope == 0) {
                    let meet = s.proto_mask & u.proto_mask != 0
                        && s.port_lo <= u.port_hi
                        && u.port_lo <= s.port_hi;
                    if meet && s.rule_id != u.rule_id {
                        found.entry((s.rule_id, u.rule_id)).or_insert(net);
                    }
                }
            }
        }
        found
            .into_iter()
            .map(|((s, u), net)| {
                format!(
                    "service `{}` is scoped, but service `{}` approves the same ports for everyone at {net} (and maybe elsewhere): callers outside the scope get through it",
                    self.rule_name(s),
                    self.rule_name(u)
                )
            })
            .collect()
    }
}
