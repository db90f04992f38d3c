//! The system's resolvers, the proxy's upstreams when the policy's `[dns] upstream` names none:
//! the nameservers of /etc/resolv.conf, or, when those are only loopback stubs (systemd-resolved's
//! 127.0.0.53), the upstreams the stub itself uses, from /run/systemd/resolve/resolv.conf.
//!
//! Why look behind a stub: the stub answers from its own cache and its own view of the network
//! (per-link servers, DNS over TLS, its own retries), and the proxy's queries would then depend
//! on a second resolver in the path; asking the stub's upstreams directly keeps the proxy's
//! answers the upstream's own. When the stub's list is not there (no systemd-resolved, or a
//! stub of another kind such as dnsmasq on 127.0.0.1), the stub is the upstream, which works.
//!
//! The parsing is pure ([`nameservers`], [`choose`]) and tested on sample files; only
//! [`system_upstreams`] reads the machine's files.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
};

use crate::policy::dns::{DNS_PORT, MAX_UPSTREAMS};

/// The resolver configuration of the host.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of its own upstreams (the "uplink" file), beside its stub file.
pub const RESOLVED_UPLINK_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// The `nameserver` addresses of a resolv.conf text, in order, port 53. Comments (`#`, `;`),
/// other keywords and unparsable addresses are skipped, as the libc resolver skips them. An IPv6
/// link-local address keeps a numeric scope (`fe80::1%2`); a named scope (`%eth0`) cannot be
/// resolved without the host and is skipped.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let parsed = match addr.split_once('%') {
            None => addr
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, DNS_PORT)),
            Some((ip, scope)) => match (ip.parse::<Ipv6Addr>(), scope.parse::<u32>()) {
                (Ok(ip), Ok(scope)) => {
                    Some(SocketAddr::V6(SocketAddrV6::new(ip, DNS_PORT, 0, scope)))
                }
                _ => None,
            },
        };
        if let Some(a) = parsed
            && !out.contains(&a)
        {
            out.push(a);
        }
    }
    out
}

/// Why there is no upstream to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoUpstream {
    #[error(
        "{RESOLV_CONF} names no nameserver: set `[dns] upstream` in the policy (e.g. upstream = [\"10.0.0.2\"])"
    )]
    NoNameserver,
}

/// The upstreams from the text of /etc/resolv.conf and, when present, of resolved's uplink file:
/// the former's nameservers, unless all of them are loopback and the latter names some that are
/// not. At most [`MAX_UPSTREAMS`].
pub fn choose(etc: &str, uplink: Option<&str>) -> Result<Vec<SocketAddr>, NoUpstream> {
    let mut chosen = nameservers(etc);
    if chosen.is_empty() {
        return Err(NoUpstream::NoNameserver);
    }
    if chosen.iter().all(|a| a.ip().is_loopback())
        && let Some(uplink) = uplink
    {
        let behind: Vec<SocketAddr> = nameservers(uplink)
            .into_iter()
            .filter(|a| !a.ip().is_loopback())
            .collect();
        if !behind.is_empty() {
            chosen = behind;
        }
    }
    chosen.truncate(MAX_UPSTREAMS);
    Ok(chosen)
}

/// The host's upstreams, read from [`RESOLV_CONF`] and [`RESOLVED_UPLINK_CONF`].
pub fn system_upstreams() -> io::Result<Vec<SocketAddr>> {
    let etc = std::fs::read_to_string(RESOLV_CONF)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {RESOLV_CONF}: {e}")))?;
    let uplink = std::fs::read_to_string(RESOLVED_UPLINK_CONF).ok();
    choose(&etc, uplink.as_deref()).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STUB: &str = "\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
# Do not edit.
nameserver 127.0.0.53
options edns0 trust-ad
search corp.example
";

    const UPLINK: &str = "\
# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).
nameserver 10.0.0.2
nameserver 2001:db8::53
nameserver fe80::1%2
search corp.example
";

    const PLAIN: &str = "\
domain corp.example
nameserver 192.0.2.53   # primary
; a comment
nameserver\t192.0.2.54
nameserver 192.0.2.53
nameserver fe80::1%eth0
nameserver not-an-address
nameserver
options ndots:5
";

    fn addrs(v: &[SocketAddr]) -> Vec<String> {
        v.iter().map(SocketAddr::to_string).collect()
    }

    #[test]
    fn nameservers_are_read_like_libc_reads_them() {
        assert_eq!(
            addrs(&nameservers(PLAIN)),
            ["192.0.2.53:53", "192.0.2.54:53"]
        );
        assert_eq!(
            addrs(&nameservers(UPLINK)),
            ["10.0.0.2:53", "[2001:db8::53]:53", "[fe80::1%2]:53"]
        );
        assert!(nameservers("").is_empty());
        assert!(nameservers("#nameserver 10.0.0.1\n").is_empty());
    }

    #[test]
    fn a_loopback_stub_is_looked_behind() {
        assert_eq!(
            addrs(&choose(STUB, Some(UPLINK)).unwrap()),
            ["10.0.0.2:53", "[2001:db8::53]:53", "[fe80::1%2]:53"]
        );
        // No uplink file, or one with nothing but loopback: the stub it is.
        assert_eq!(addrs(&choose(STUB, None).unwrap()), ["127.0.0.53:53"]);
        assert_eq!(
            addrs(&choose(STUB, Some("nameserver 127.0.0.1\n")).unwrap()),
            ["127.0.0.53:53"]
        );
        // A resolv.conf with a real server is taken as it is.
        assert_eq!(
            addrs(&choose(PLAIN, Some(UPLINK)).unwrap()),
            ["192.0.2.53:53", "192.0.2.54:53"]
        );
        // Mixed loopback and not: as written.
        let mixed = "nameserver 127.0.0.1\nnameserver 192.0.2.1\n";
        assert_eq!(
            addrs(&choose(mixed, Some(UPLINK)).unwrap()),
            ["127.0.0.1:53", "192.0.2.1:53"]
        );
        assert_eq!(
            choose("search x\n", Some(UPLINK)),
            Err(NoUpstream::NoNameserver)
        );
    }

    #[test]
    fn at_most_max_upstreams() {
        let many: String = (1..=20)
            .map(|i| format!("nameserver 10.0.0.{i}\n"))
            .collect();
        assert_eq!(choose(&many, None).unwrap().len(), MAX_UPSTREAMS);
    }
}
