//! Learning mode (`egress learn`): what a workload did while it ran under an audit policy that
//! approves nothing, tallied from the audit events ([`Observations`]), and the policy draft that
//! allows exactly that (`draft.rs`, pure). The controller side (running the command, attaching
//! to a cgroup, the learning policy) is `controller/learn.rs`.
//!
//! Every connect, every unconnected datagram and every socket the hooks would refuse is one
//! audit event: the learning policy has no service, so every call reaches the default (`deny`,
//! in audit mode: reported, let through). Connected UDP sockets are judged once, at connect; a
//! datagram on one is not an event. Events the ring had no room for are counted by the kernel
//! (`events_lost`), and the draft says so.

pub mod draft;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::events::JsonEvent;

/// The most distinct (who, destination, protocol, port) keys kept; more are counted as
/// overflow (and the draft says so), so a port scan cannot grow the controller without bound.
pub const MAX_FLOWS: usize = 65_536;

/// Addresses kept per destination name, for the draft's comments.
const MAX_ADDRS_PER_NAME: usize = 4;

/// Who made a call, as the event says (the selectors the draft may use).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Who {
    /// The executable's full path as /proc gave it (` (deleted)` kept), None when unknown or
    /// when the call has no process (TC) or cannot be scoped (ICMP).
    pub exe: Option<String>,
    /// The real uid; None as for `exe`.
    pub uid: Option<u32>,
}

/// Where a call went: the name it was resolved from through the DNS proxy, or the address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dest {
    Host(String),
    Addr(IpAddr),
}

/// The protocols a draft's services can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        }
    }

    fn parse(s: &str) -> Option<Proto> {
        Some(match s {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            _ => return None,
        })
    }

    /// ICMP has no ports, and scoped entries cannot name it (TC judges echoes too, and cannot
    /// tell who sent a packet).
    pub fn is_icmp(self) -> bool {
        matches!(self, Proto::Icmp | Proto::Icmpv6)
    }
}

/// One key of the tally.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub who: Who,
    pub dest: Dest,
    pub proto: Proto,
    /// 0 for ICMP.
    pub port: u16,
}

/// How often something was seen, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Connects (TCP, connected UDP, ping sockets).
    pub connects: u64,
    /// Unconnected datagrams (sendto/sendmsg with an address).
    pub datagrams: u64,
    /// Packets judged at TC (ICMP echoes of unconnected ping sockets, packet-socket frames).
    pub packets: u64,
    /// RFC 3339 times of the first and last event (as the events write them: comparable as
    /// strings).
    pub first: String,
    pub last: String,
    /// For a name: the addresses it led to (a few).
    pub addrs: BTreeSet<IpAddr>,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.connects + self.datagrams + self.packets
    }

    fn seen(&mut self, ts: &str) {
        if self.first.is_empty() || ts < self.first.as_str() {
            self.first = ts.to_string();
        }
        if ts > self.last.as_str() {
            self.last = ts.to_string();
        }
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &Tally) {
        self.connects += other.connects;
        self.datagrams += other.datagrams;
        self.packets += other.packets;
        if !other.first.is_empty() {
            self.seen(&other.first);
        }
        if !other.last.is_empty() {
            self.seen(&other.last);
        }
        for a in &other.addrs {
            if self.addrs.len() < MAX_ADDRS_PER_NAME {
                self.addrs.insert(*a);
            }
        }
    }
}

/// What was observed while learning.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// Use the names the DNS proxy learned (else addresses only).
    pub use_names: bool,
    pub flows: BTreeMap<FlowKey, Tally>,
    /// Sockets the sock_create hook (or TC, for packet sockets) would refuse, by the rule that
    /// would: `sockets.raw`, `sockets.other`, `sockets.packet`, `sockets.icmp`.
    pub sockets: BTreeMap<String, Tally>,
    /// Events that become no entry, by why (`setsockopt source-route`, `owners-full`, ...).
    pub skipped: BTreeMap<String, u64>,
    /// Calls refused by the built-in `dns-over-tls` block a policy with names carries.
    pub dns_over_tls: u64,
    /// Audit events read.
    pub events: u64,
    /// Events not tallied because [`MAX_FLOWS`] keys were already kept.
    pub overflow: u64,
}

impl Observations {
    pub fn new(use_names: bool) -> Observations {
        Observations {
            use_names,
            ..Observations::default()
        }
    }

    /// Tallies one deny/audit event.
    pub fn record(&mut self, ev: &JsonEvent) {
        self.events += 1;
        let ts = ev.ts.as_str();
        if ev.hook == "sock_create" || ev.rule.starts_with("sockets.") {
            let t = self.sockets.entry(ev.rule.clone()).or_default();
            match ev.hook.as_str() {
                "tc" => t.packets += 1,
                _ => t.connects += 1,
            }
            t.seen(ts);
            return;
        }
        let kind = match ev.hook.as_str() {
            "connect4" | "connect6" => Kind::Connect,
            "sendmsg4" | "sendmsg6" => Kind::Datagram,
            "tc" => Kind::Packet,
            other => {
                *self
                    .skipped
                    .entry(format!("{other} {}", ev.rule))
                    .or_default() += 1;
                return;
            }
        };
        if ev.rule == "owners-full" {
            *self.skipped.entry(ev.rule.clone()).or_default() += 1;
            return;
        }
        // Learning from a base policy (`--policy`): a call one of its blocks (or audit entries)
        // refuses is not for a service to allow (a block wins over every service).
        if ev.rule != "default" && ev.rule != crate::policy::DOT_BLOCK {
            *self
                .skipped
                .entry(format!(
                    "refused or reported by `{}` of the base policy",
                    ev.rule
                ))
                .or_default() += 1;
            return;
        }
        let Ok(addr) = ev.dst.parse::<IpAddr>() else {
            *self
                .skipped
                .entry("unreadable destination".into())
                .or_default() += 1;
            return;
        };
        // A v4-mapped destination is judged (and written in a policy) as its IPv4 address.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        let Some(proto) = Proto::parse(&ev.protocol) else {
            *self
                .skipped
                .entry(format!("protocol {}", ev.protocol))
                .or_default() += 1;
            return;
        };
        if ev.rule == crate::policy::DOT_BLOCK {
            self.dns_over_tls += 1;
        }
        // TC has no process; ICMP cannot be scoped: both are anyone's.
        let who = if kind == Kind::Packet || proto.is_icmp() {
            Who::default()
        } else {
            Who {
                exe: ev.exe.clone(),
                uid: Some(ev.uid),
            }
        };
        let dest = match ev.host.as_deref().filter(|_| self.use_names) {
            Some(name) if usable_name(name) => {
                Dest::Host(name.trim_end_matches('.').to_lowercase())
            }
            _ => Dest::Addr(addr),
        };
        let key = FlowKey {
            who,
            dest,
            proto,
            port: if proto.is_icmp() { 0 } else { ev.port },
        };
        if !self.flows.contains_key(&key) && self.flows.len() >= MAX_FLOWS {
            self.overflow += 1;
            return;
        }
        let host = matches!(key.dest, Dest::Host(_));
        let t = self.flows.entry(key).or_default();
        match kind {
            Kind::Connect => t.connects += 1,
            Kind::Datagram => t.datagrams += 1,
            Kind::Packet => t.packets += 1,
        }
        if host && t.addrs.len() < MAX_ADDRS_PER_NAME {
            t.addrs.insert(addr);
        }
        t.seen(ts);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect,
    Datagram,
    Packet,
}

/// Whether a name from the proxy can stand in a policy's `hosts` as exactly itself: a valid
/// exact pattern (no wildcard character, not an address).
fn usable_name(name: &str) -> bool {
    !name.contains('*') && name.parse::<crate::policy::hosts::HostPattern>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn event(hook: &str, proto: &str, dst: &str, port: u16) -> JsonEvent {
        JsonEvent {
            ts: "2026-11-27T11:40:01.000000000Z".into(),
            event: "audit".into(),
            meta: Default::default(),
            pid: 100,
            tid: 100,
            comm: "curl".into(),
            exe: Some("/usr/bin/curl".into()),
            uid: 0,
            gid: 0,
            cgroup_id: 7,
            hook: hook.into(),
            family: "ipv4".into(),
            protocol: proto.into(),
            dst: dst.into(),
            port,
            v4_mapped: false,
            socket_type: None,
            rule: "default".into(),
            host: None,
            feed_entry: None,
            feed_label: None,
            pod: Default::default(),
            generation: 1,
            policy_hash: String::new(),
        }
    }

    #[test]
    fn events_are_tallied_by_who_where_protocol_and_port() {
        let mut o = Observations::new(true);
        let mut e = event("connect4", "tcp", "198.18.0.2", 443);
        e.host = Some("API.Example.test.".into());
        o.record(&e);
        e.ts = "2026-11-27T11:40:05.000000000Z".into();
        o.record(&e);
        o.record(&event("sendmsg4", "udp", "198.18.0.3", 53));
        let mut mapped = event("connect6", "tcp", "::ffff:198.18.0.4", 80);
        mapped.v4_mapped = true;
        o.record(&mapped);
        assert_eq!(o.flows.len(), 3);
        let (k, t) = o.flows.iter().next().unwrap();
        assert_eq!(k.dest, Dest::Host("api.example.test".into()));
        assert_eq!(t.connects, 2);
        assert_eq!(t.first, "2026-11-27T11:40:01.000000000Z");
        assert_eq!(t.last, "2026-11-27T11:40:05.000000000Z");
        assert!(t.addrs.contains(&"198.18.0.2".parse().unwrap()));
        assert!(
            o.flows
                .keys()
                .any(|k| k.dest == Dest::Addr("198.18.0.4".parse().unwrap()))
        );
        let udp = o
            .flows
            .iter()
            .find(|(k, _)| k.proto == Proto::Udp)
            .unwrap()
            .1;
        assert_eq!((udp.connects, udp.datagrams), (0, 1));
    }

    #[test]
    fn without_names_or_with_unusable_ones_addresses_stand() {
        let mut o = Observations::new(false);
        let mut e = event("connect4", "tcp", "198.18.0.2", 443);
        e.host = Some("api.example.test".into());
        o.record(&e);
        let mut o2 = Observations::new(true);
        e.host = Some("*.evil.test".into());
        o2.record(&e);
        e.host = Some("1.2.3.4".into());
        o2.record(&e);
        for o in [o, o2] {
            assert!(
                o.flows.keys().all(|k| matches!(k.dest, Dest::Addr(_))),
                "{o:?}"
            );
        }
    }

    #[test]
    fn icmp_and_tc_are_anyones_and_sockets_are_kept_apart() {
        let mut o = Observations::new(true);
        o.record(&event("connect4", "icmp", "198.18.0.2", 7));
        o.record(&event("tc", "icmp", "198.18.0.2", 0));
        let mut raw = event("sock_create", "255", "", 0);
        raw.rule = "sockets.raw".into();
        o.record(&raw);
        assert_eq!(o.flows.len(), 1);
        let (k, t) = o.flows.iter().next().unwrap();
        assert_eq!(k.who, Who::default());
        assert_eq!(k.port, 0);
        assert_eq!((t.connects, t.packets), (1, 1));
        assert_eq!(o.sockets["sockets.raw"].connects, 1);
    }

    #[test]
    fn calls_a_base_policy_rule_refuses_are_not_tallied() {
        let mut o = Observations::new(false);
        let mut e = event("connect4", "tcp", "203.0.113.9", 25);
        e.rule = "no-smtp".into();
        o.record(&e);
        assert!(o.flows.is_empty());
        assert_eq!(
            o.skipped["refused or reported by `no-smtp` of the base policy"],
            1
        );
        e.rule = crate::policy::DOT_BLOCK.into();
        o.record(&e);
        assert_eq!((o.flows.len(), o.dns_over_tls), (1, 1));
    }

    #[test]
    fn the_tally_is_bounded() {
        let mut o = Observations::new(false);
        for port in 1..=u16::MAX {
            o.record(&event("connect4", "tcp", "198.18.0.2", port));
        }
        for port in 1..=10 {
            o.record(&event("connect4", "udp", "198.18.0.2", port));
        }
        assert_eq!(o.flows.len(), MAX_FLOWS);
        assert_eq!(o.overflow, 65_535 + 10 - MAX_FLOWS as u64);
    }
}
