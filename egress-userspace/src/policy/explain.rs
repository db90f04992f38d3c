//! `egress explain`: the verdict for one destination and the rule that decides it, computed from
//! the compiled map entries with the datapath's algorithm.

use std::net::IpAddr;

use egress_common::{ACTION_BLOCK, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER, PROTO_TCP, PROTO_UDP};
use serde::Serialize;

use super::{
    Mode, Policy, Protocol,
    compile::{CompiledPolicy, Reason},
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
}

pub fn explain(
    policy: &Policy,
    compiled: &CompiledPolicy,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Explanation {
    let ipproto = protocol.ipproto();
    let ev = compiled.evaluate(dst, port, ipproto);
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
            let why = format!(
                "{} `{}` (line {}) covers {}/{} on {} {}",
                kind,
                r.name,
                r.line,
                prefix.ip(),
                prefix.prefix(),
                if r.protocols.is_empty() {
                    "tcp/udp".to_string()
                } else {
                    r.protocols
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                },
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
                },
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
        (true, _) => "allowed",
        (false, Mode::Enforce) => "denied (EPERM)",
        (false, Mode::Audit) => "allowed (audit mode: would deny, an audit event is logged)",
    };
    let reason = match ev.carried_v4 {
        Some(v4) => format!(
            "{reason}; it carries the IPv4 address {v4} (NAT64, 6to4 or v4-compatible), which is judged too: both must be allowed"
        ),
        None => reason,
    };
    Explanation {
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
