//! `egress explain`: the verdict for one destination and the rule that decides it, computed from
//! the compiled map entries with the datapath's algorithm; and for a DNS name, which service or
//! block covers it, from the same name matcher the DNS proxy uses.

use std::net::IpAddr;

use egress_common::{
    ACTION_BLOCK, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER, PROTO_TCP, PROTO_UDP, ScopeBits,
};
use serde::Serialize;

use super::{
    Mode, Policy, Protocol, Rule, Unlisted,
    compile::{CompiledPolicy, Reason},
    hosts::{MAX_NAME_LEN, normalize_name},
    names::{NameHit, NameIndex, NameVerdict},
};

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub dst: String,
    /// The IPv4 address a v4-mapped destination was judged as, else `dst`.
    pub judged_as: String,
    pub port: u16,
    pub protocol: String,
    /// `allow` or `deny`: the policy's decision.
    pub verdict: String,
    /// What happens to the call: `allowed`, `denied (EPERM)`, or in audit mode `allowed (audit: would deny)`.
    pub effect: String,
    pub rule: String,
    /// `service`, `block`, `default` or `loopback`.
    pub rule_kind: String,
    /// The policy prefix that matched, if any.
    pub prefix: Option<String>,
    /// The IPv4 address an IPv6 destination carries (NAT64, 6to4, v4-compatible): it is judged
    /// too, and the destination is allowed only if both are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carries_ipv4: Option<String>,
    pub reason: String,
    /// The entry in `mode = "audit"` that would refuse this allowed call (an `"audit"` event
    /// names it), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_entry: Option<String>,
    /// When a `[[blocklist]]` decides: the feed's source (file or URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed: Option<String>,
    /// When a `[[blocklist]]` decides: the feed entry that holds the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed_entry: Option<String>,
    /// The entry's label in the feed (a Spamhaus DROP id), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed_label: Option<String>,
}

/// The verdict for a caller in no scope ([`ScopeBits::EVERYONE`]).
pub fn explain(
    policy: &Policy,
    compiled: &CompiledPolicy,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Explanation {
    explain_as(policy, compiled, dst, port, protocol, &ScopeBits::EVERYONE)
}

/// The verdict for a caller in `scopes` (`CompiledScopes::resolve`), as the hooks decide it.
pub fn explain_as(
    policy: &Policy,
    compiled: &CompiledPolicy,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
    scopes: &ScopeBits,
) -> Explanation {
    let ipproto = protocol.ipproto();
    let ev = compiled.evaluate_as(dst, port, ipproto, scopes);
    let rule = compiled.rule_name(ev.rule_id).to_string();
    let (rule_kind, prefix, reason) = match &ev.reason {
        Reason::Loopback => (
            "loopback".to_string(),
            None,
            "loopback destination and allow_loopback = true".to_string(),
        ),
        Reason::Rule { prefix, rule_id } => {
            let kind = compiled.rule_kinds[*rule_id as usize]
                .map_or("rule", |k| k.as_str())
                .to_string();
            let r = &policy.rules[(*rule_id - 1) as usize];
            let kind = match &r.feed {
                Some(_) => "blocklist".to_string(),
                None => kind,
            };
            let why = format!(
                "{} `{}` (line {}) covers {}/{} on {} {}",
                kind,
                r.name,
                r.line,
                prefix.ip(),
                prefix.prefix(),
                protocols_text(r),
                ports_text(r),
            );
            (
                kind,
                Some(format!("{}/{}", prefix.ip(), prefix.prefix())),
                why,
            )
        }
        Reason::DefaultInPrefix { prefix } => (
            "default".to_string(),
            Some(format!("{}/{}", prefix.ip(), prefix.prefix())),
            format!(
                "policy prefix {}/{} matches but none of its rules covers {}/{}; default = {}",
                prefix.ip(),
                prefix.prefix(),
                protocol,
                port,
                policy.default
            ),
        ),
        Reason::Default => (
            "default".to_string(),
            None,
            format!(
                "no policy prefix contains the destination; default = {}",
                policy.default
            ),
        ),
    };
    let effect = match (ev.allow, policy.mode) {
        (true, _) if ev.audit_rule != 0 => {
            "allowed (an entry in audit mode would refuse it: an audit event is logged)"
        }
        (true, _) => "allowed",
        (false, Mode::Enforce) => "denied (EPERM)",
        (false, Mode::Audit) => "allowed (audit mode: would deny, an audit event is logged)",
    };
    let reason = if compiled.scopes.keys != 0 && !matches!(ev.reason, Reason::Loopback) {
        format!("{reason} (scoped entries apply only to callers in their scope)")
    } else {
        reason
    };
    let reason = match ev.carried_v4 {
        Some(v4) => format!(
            "{reason}; it carries the IPv4 address {v4} (NAT64, 6to4 or v4-compatible), which is judged too: both must be allowed"
        ),
        None => reason,
    };
    let feed = match &ev.reason {
        Reason::Rule { rule_id, .. } => compiled
            .feeds
            .get(rule_id)
            .map(|f| (f.source.clone(), compiled.feed_entry(*rule_id, ev.judged))),
        _ => None,
    };
    let (feed, feed_entry, feed_label) = match feed {
        Some((source, Some((entry, label)))) => (Some(source), Some(entry), label),
        Some((source, None)) => (Some(source), None, None),
        None => (None, None, None),
    };
    let reason = match (&feed, &feed_entry) {
        (Some(source), Some(entry)) => format!(
            "{reason}; feed {source} lists {entry}{}",
            feed_label
                .as_ref()
                .map_or(String::new(), |l| format!(" ({l})"))
        ),
        _ => reason,
    };
    Explanation {
        feed,
        feed_entry,
        feed_label,
        carries_ipv4: ev.carried_v4.map(|v| v.to_string()),
        dst: dst.to_string(),
        judged_as: ev.judged.to_string(),
        port,
        protocol: protocol.to_string(),
        verdict: if ev.allow { "allow" } else { "deny" }.to_string(),
        effect: effect.to_string(),
        rule,
        rule_kind,
        prefix,
        reason,
        audit_entry: (ev.audit_rule != 0).then(|| compiled.rule_name(ev.audit_rule).to_string()),
    }
}

/// Human-readable rule table of the prefix that matches `dst`, for `explain` without `--port`.
pub fn rule_table(compiled: &CompiledPolicy, dst: IpAddr) -> Vec<String> {
    let Some((prefix, set)) = compiled.matching_set(dst) else {
        return vec![format!("no policy prefix contains {dst}")];
    };
    let mut out = vec![format!(
        "policy prefix {}/{} applies these rules, first match wins:",
        prefix.ip(),
        prefix.prefix()
    )];
    for r in &set.rules[..set.len as usize] {
        let mut protos = Vec::new();
        for (bit, name) in [
            (PROTO_TCP, "tcp"),
            (PROTO_UDP, "udp"),
            (PROTO_ICMP, "icmp"),
            (PROTO_ICMPV6, "icmpv6"),
            (PROTO_OTHER, "other"),
        ] {
            if r.proto_mask & bit != 0 {
                protos.push(name);
            }
        }
        out.push(format!(
            "  {} {} ports {}-{} -> {} `{}`",
            if r.action == ACTION_BLOCK {
                "deny "
            } else {
                "allow"
            },
            protos.join("/"),
            r.port_lo,
            r.port_hi,
            if r.action == ACTION_BLOCK {
                "block"
            } else {
                "service"
            },
            compiled.rule_name(r.rule_id)
        ));
    }
    out.push(format!(
        "  otherwise -> default ({})",
        if compiled.config.default_verdict != 0 {
            "allow"
        } else {
            "deny"
        }
    ));
    out
}

/// A rule's protocols as `explain` prints them: `tcp/udp` when it names none.
fn protocols_text(r: &Rule) -> String {
    if r.protocols.is_empty() {
        "tcp/udp".to_string()
    } else {
        r.protocols
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// A rule's ports as `explain` prints them: `all ports` when it names none.
fn ports_text(r: &Rule) -> String {
    if r.ports.is_empty() {
        "all ports".to_string()
    } else {
        format!(
            "ports {}",
            r.ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// One rule whose `hosts` cover a name.
#[derive(Debug, Serialize)]
pub struct NameRule {
    pub rule: String,
    /// `service` or `block`.
    pub rule_kind: String,
    /// The rule's first pattern that covers the name.
    pub pattern: String,
    pub line: usize,
    pub protocols: String,
    pub ports: String,
}

/// `egress explain NAME`: what the policy says about a DNS name.
#[derive(Debug, Serialize)]
pub struct NameExplanation {
    /// The name as matched: lowercase, no trailing dot.
    pub name: String,
    /// `blocked`, `approved` or `unlisted`.
    pub verdict: String,
    /// The deciding rule: the first block, else the first service; none when unlisted.
    pub rule: Option<String>,
    pub rule_kind: Option<String>,
    pub pattern: Option<String>,
    /// Every rule that covers the name, blocks first, each in file order.
    pub covered_by: Vec<NameRule>,
    /// What the DNS proxy does with a query for the name.
    pub dns: String,
    pub reason: String,
}

/// What the policy says about `name`; an error (completing "`NAME` …") when it is not a name.
pub fn explain_name(policy: &Policy, name: &str) -> Result<NameExplanation, String> {
    let name = normalize_name(name, MAX_NAME_LEN)?;
    let index = NameIndex::new(policy);
    let coverage = index.lookup(&name);
    let describe = |h: &NameHit| {
        let r = &policy.rules[h.rule as usize];
        NameRule {
            rule: r.name.clone(),
            rule_kind: r.kind.as_str().to_string(),
            pattern: r.hosts[h.pattern as usize].to_string(),
            line: r.line,
            protocols: protocols_text(r),
            ports: ports_text(r),
        }
    };
    let covered_by: Vec<NameRule> = coverage
        .blocks
        .iter()
        .chain(&coverage.services)
        .map(describe)
        .collect();
    let (verdict, decider, dns, reason) = match coverage.verdict() {
        NameVerdict::Blocked(b) => {
            let d = describe(&b);
            let also = if coverage.services.is_empty() {
                String::new()
            } else {
                format!(
                    "; blocks win over the services that cover it too ({})",
                    coverage
                        .services
                        .iter()
                        .map(|h| format!("`{}`", policy.rules[h.rule as usize].name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let reason = format!(
                "block `{}` (line {}) covers it by `{}`{also}",
                d.rule, d.line, d.pattern
            );
            (
                "blocked",
                Some(d),
                "answered by the DNS proxy as a blocked name, never forwarded".to_string(),
                reason,
            )
        }
        NameVerdict::Approved(services) => {
            let d = describe(&services[0]);
            let reason = format!(
                "service `{}` (line {}) covers it by `{}`, on {} {}{}",
                d.rule,
                d.line,
                d.pattern,
                d.protocols,
                d.ports,
                if services.len() > 1 {
                    format!("; {} more services cover it too", services.len() - 1)
                } else {
                    String::new()
                }
            );
            (
                "approved",
                Some(d),
                format!(
                    "resolved through the upstream; the addresses of the answer are granted to the cgroup that asked, for the answer's TTL within [{}, {}]",
                    super::alert::HumanDuration(policy.dns.min_ttl),
                    super::alert::HumanDuration(policy.dns.max_ttl)
                ),
                reason,
            )
        }
        NameVerdict::Unlisted => (
            "unlisted",
            None,
            match policy.dns.unlisted {
                Unlisted::Resolve => "resolved through the upstream (unlisted = \"resolve\"); nothing is granted: its addresses are judged by the address rules".to_string(),
                Unlisted::Refuse => "answered by the DNS proxy as a blocked name, never forwarded (unlisted = \"refuse\")".to_string(),
            },
            "no service or block has a `hosts` pattern that covers it".to_string(),
        ),
    };
    Ok(NameExplanation {
        name,
        verdict: verdict.to_string(),
        rule: decider.as_ref().map(|d| d.rule.clone()),
        rule_kind: decider.as_ref().map(|d| d.rule_kind.clone()),
        pattern: decider.map(|d| d.pattern),
        covered_by,
        dns,
        reason,
    })
}
