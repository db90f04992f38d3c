//! Userspace side of the shared types (the `user` feature): `aya::Pod` impls, and the
//! conversions from kernel records to what people read (addresses, names), kept next to the
//! types so that every consumer decodes them the same way.

extern crate std;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::string::{String, ToString as _};

use super::*;

// SAFETY: all of these are repr(C), Copy, and have no implicit padding (asserted in lib.rs).
unsafe impl aya::Pod for PortRule {}
unsafe impl aya::Pod for RuleSet {}
unsafe impl aya::Pod for PrefixValue {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for Event {}
unsafe impl aya::Pod for Owner {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowValue {}
unsafe impl aya::Pod for BlockKey {}
unsafe impl aya::Pod for BlockValue {}
unsafe impl aya::Pod for GrantKey {}
unsafe impl aya::Pod for GrantValue {}
unsafe impl aya::Pod for DnsOrig {}
unsafe impl aya::Pod for ExceptionList {}
unsafe impl aya::Pod for ScopeBits {}
unsafe impl aya::Pod for ExeKey {}
unsafe impl aya::Pod for ProcIdentity {}

/// The address in a `family` (4 or 6) + 16-byte record field.
pub fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

/// A NUL-padded kernel string (`comm`) as text.
pub fn comm_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// `tcp`, `udp`, or the IP protocol number.
pub fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// The names events give to verdicts no policy rule made, whatever the policy: `default`,
/// `loopback`, `source-route`, `sockets.raw`, `sockets.icmp`, `sockets.other`,
/// `sockets.packet`, `owners-full`; and `dns-over-tls`, the block a policy that uses names gets
/// (see `CompiledPolicy::compile`). Policies may not name a rule any of these.
pub const BUILTIN_RULE_NAMES: [&str; 9] = [
    "default",
    "loopback",
    "source-route",
    "sockets.raw",
    "sockets.icmp",
    "sockets.other",
    "sockets.packet",
    "owners-full",
    "dns-over-tls",
];

/// The name of a rule id no policy rule has (see [`BUILTIN_RULE_NAMES`]).
pub fn builtin_rule_name(rule_id: u32) -> Option<&'static str> {
    let i = match rule_id {
        RULE_DEFAULT => 0,
        RULE_LOOPBACK => 1,
        RULE_SOURCE_ROUTE => 2,
        id if (RULE_SOCKETS..RULE_SOCKETS + 4).contains(&id) => 3 + (id - RULE_SOCKETS) as usize,
        RULE_OWNERS_FULL => 7,
        _ => return None,
    };
    Some(BUILTIN_RULE_NAMES[i])
}

/// The name of a `HOOK_*` value, as events report it.
pub fn hook_name(hook: u8) -> &'static str {
    match hook {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_TC => "tc",
        HOOK_SETSOCKOPT => "setsockopt",
        HOOK_SOCK_CREATE => "sock_create",
        _ => "unknown",
    }
}

impl FlowKey {
    /// The flow's destination address.
    pub fn dst(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }
}

impl Event {
    /// The destination as the process gave it.
    pub fn dst(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }

    /// Decodes one ring-buffer record; `None` if it is too short to be an `Event`.
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        if bytes.len() < size_of::<Event>() {
            return None;
        }
        // SAFETY: Event is plain old data; the length is checked; read_unaligned copes with any
        // alignment.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
    }
}

impl BlockKey {
    /// The key that blocks every process of user `uid`.
    pub fn user(uid: u32) -> BlockKey {
        BlockKey {
            tgid: uid,
            family: BLOCK_USER,
            ..BlockKey::default()
        }
    }

    /// The key that blocks process `tgid`, everywhere (`dst` None) or towards one destination.
    /// A v4-mapped IPv6 destination is keyed as the IPv4 address the hooks judge it as.
    pub fn process(tgid: u32, dst: Option<IpAddr>) -> BlockKey {
        let mut key = BlockKey {
            tgid,
            ..BlockKey::default()
        };
        match dst.map(|d| d.to_canonical()) {
            Some(IpAddr::V4(v4)) => {
                key.family = 4;
                key.addr[..4].copy_from_slice(&v4.octets());
            }
            Some(IpAddr::V6(v6)) => {
                key.family = 6;
                key.addr = v6.octets();
            }
            None => {}
        }
        key
    }

    /// True for a block on a user, false for one on a process.
    pub fn is_user(&self) -> bool {
        self.family == BLOCK_USER
    }

    /// The destination of a process block towards one destination (None: everywhere, or a
    /// user).
    pub fn destination(&self) -> Option<IpAddr> {
        matches!(self.family, 4 | 6).then(|| ip_of(self.family, &self.addr))
    }

    /// This block in `scope` (`BLOCK_SCOPE_*`): the twin that covers the process's
    /// descendants, or the one that covers the process itself.
    pub fn in_scope(&self, scope: u8) -> BlockKey {
        BlockKey { scope, ..*self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_names_and_keys() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[198, 18, 0, 2]);
        assert_eq!(ip_of(4, &a).to_string(), "198.18.0.2");
        assert_eq!(comm_str(b"curl\0\0\0"), "curl");
        assert_eq!(comm_str(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(protocol_name(IPPROTO_UDP), "udp");
        assert_eq!(protocol_name(IPPROTO_ICMP), "icmp");
        assert_eq!(protocol_name(132), "132");
        assert_eq!(hook_name(HOOK_TC), "tc");
        let mapped = BlockKey::process(7, Some("::ffff:198.18.0.2".parse().unwrap()));
        assert_eq!(
            mapped,
            BlockKey::process(7, Some("198.18.0.2".parse().unwrap()))
        );
        assert_eq!(mapped.family, 4);
        assert_eq!(BlockKey::process(7, None).family, 0);
        assert_eq!(
            mapped.destination(),
            Some("198.18.0.2".parse::<IpAddr>().unwrap())
        );
        assert_eq!(BlockKey::process(7, None).destination(), None);
        assert_eq!(BlockKey::user(7).destination(), None);
        assert!(BlockKey::user(7).is_user() && !mapped.is_user());
        let desc = mapped.in_scope(BLOCK_SCOPE_DESCENDANTS);
        assert_ne!(desc, mapped);
        assert_eq!(desc.in_scope(BLOCK_SCOPE_PROCESS), mapped);
        assert!(Event::from_bytes(&[0u8; 10]).is_none());
        assert_eq!(
            builtin_rule_name(RULE_SOCKETS + SOCKETS_ICMP as u32),
            Some("sockets.icmp")
        );
        assert_eq!(builtin_rule_name(RULE_SOURCE_ROUTE), Some("source-route"));
        assert_eq!(builtin_rule_name(RULE_OWNERS_FULL), Some("owners-full"));
        assert_eq!(builtin_rule_name(3), None);
    }
}
