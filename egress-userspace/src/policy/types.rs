//! The policy's value types and how each is read from TOML: [`Mode`], [`DefaultVerdict`],
//! [`Protocol`], [`PortRange`] and [`Destination`].
//!
//! "Parse, don't validate": a value of these types is valid by construction. A [`PortRange`] is
//! non-empty and within 1..=65535; a [`Destination`] is a canonical network (no host bits set,
//! v4-mapped IPv6 stored as IPv4). Their `Deserialize` impls fail inside the visitor, so that the
//! parser's error carries the span of the offending element.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, de};

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
    /// ICMP echo (ping sockets): judged where `[sockets] icmp = "policy"`.
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// TCP and UDP have ports; ICMP does not.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }

    /// The IP protocol number, as the kernel reports it.
    pub fn ipproto(self) -> u8 {
        match self {
            Protocol::Tcp => egress_common::IPPROTO_TCP,
            Protocol::Udp => egress_common::IPPROTO_UDP,
            Protocol::Icmp => egress_common::IPPROTO_ICMP,
            Protocol::Icmpv6 => egress_common::IPPROTO_ICMPV6,
        }
    }
}

/// What `[sockets]` does with a class of socket the connect/sendmsg hooks cannot judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketRule {
    /// socket() fails with EPERM, and an event says so.
    Deny,
    Allow,
    /// Allowed, with an audit event.
    Audit,
    /// `icmp` only: allowed, and every destination judged by the policy (protocol
    /// `icmp`/`icmpv6`) at connect and, for echo requests, at TC.
    Policy,
}

impl fmt::Display for SocketRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketRule::Deny => "deny",
            SocketRule::Allow => "allow",
            SocketRule::Audit => "audit",
            SocketRule::Policy => "policy",
        })
    }
}

/// `[sockets]`: the sockets beyond TCP and UDP that a process in an enforced cgroup may create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sockets {
    /// SOCK_RAW in AF_INET/AF_INET6.
    pub raw: SocketRule,
    /// Ping sockets (SOCK_DGRAM with IPPROTO_ICMP/ICMPV6).
    pub icmp: SocketRule,
    /// Any other IP protocol: SCTP, UDP-Lite, MPTCP, DCCP, ...
    pub other: SocketRule,
    /// `AF_PACKET` sockets: their frames are judged at TC by the sending socket's family (no
    /// cgroup hook sees them), and `egress exec` withholds `CAP_NET_RAW` when both `raw` and
    /// `packet` are denied (`PACKET_QDISC_BYPASS` skips TC).
    pub packet: SocketRule,
}

impl Default for Sockets {
    fn default() -> Self {
        Sockets {
            raw: SocketRule::Deny,
            icmp: SocketRule::Policy,
            other: SocketRule::Deny,
            packet: SocketRule::Deny,
        }
    }
}

impl fmt::Display for Sockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "raw = {}, icmp = {}, other = {}, packet = {}",
            self.raw, self.icmp, self.other, self.packet
        )
    }
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
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
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

    /// The network `net` is in (host bits cleared), v4-mapped IPv6 as IPv4: for feeds, whose
    /// entries are taken as their prefixes say rather than refused.
    pub fn canonical(net: IpNetwork) -> Destination {
        let masked = IpNetwork::new(net.network(), net.prefix()).expect("same prefix length");
        match masked {
            IpNetwork::V6(v6) if v6.prefix() >= 96 => match v6.ip().to_ipv4_mapped() {
                Some(v4) => Destination(
                    IpNetwork::new(IpAddr::V4(v4), v6.prefix() - 96).expect("a v4 prefix"),
                ),
                None => Destination(masked),
            },
            _ => Destination(masked),
        }
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
