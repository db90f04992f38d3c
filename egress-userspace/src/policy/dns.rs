//! The `[dns]` table: how the DNS proxy resolves names and how long what it learns is granted.
//!
//! ```toml
//! [dns]
//! upstream = ["10.0.0.2", "10.0.0.3:5353", "[2001:db8::53]:53"]  # default: the system's
//! min_ttl = "60s"        # a grant lives at least this long (default 60s)
//! max_ttl = "1h"         # and at most this long (default 1h)
//! unlisted = "resolve"   # names no service or block covers: "resolve" (default) | "refuse"
//! ```
//!
//! `upstream` left out means the nameservers of /etc/resolv.conf, or, when that names only a
//! loopback stub such as systemd-resolved's 127.0.0.53, the stub's own upstreams. Which those are
//! is read when the proxy starts (the `dns` module), not here: a policy stays a pure value.
//!
//! Why a 60 s floor: clients keep addresses longer than short TTLs say (libcurl 60 s, Java 30 s,
//! .NET 120 s), and a grant that expires under a cached address breaks the next connect.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use super::{PolicyError, alert::HumanDuration, error::Source};

/// The DNS port, when an upstream names none.
pub const DNS_PORT: u16 = 53;
/// At most this many upstreams (glibc reads 3; a few more for split setups).
pub const MAX_UPSTREAMS: usize = 8;
/// Defaults of `min_ttl` and `max_ttl`.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// What the proxy does with a name that no service or block covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlisted {
    /// Resolve it (the answer grants nothing: its addresses are judged by the address rules).
    #[default]
    Resolve,
    /// Answer it as a blocked name, without asking the upstream: closes DNS tunnelling through
    /// the resolver.
    Refuse,
}

impl fmt::Display for Unlisted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unlisted::Resolve => "resolve",
            Unlisted::Refuse => "refuse",
        })
    }
}

/// An upstream resolver: an address and a port (53 unless given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Upstream(pub SocketAddr);

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Upstream, String> {
        const EXPECTED: &str = "expected an address with an optional port, such as \"10.0.0.2\", \"10.0.0.3:5353\", \"2001:db8::53\" or \"[2001:db8::53]:53\"";
        let t = s.trim();
        let addr = if let Ok(ip) = t.parse::<IpAddr>() {
            SocketAddr::new(ip, DNS_PORT)
        } else if let Ok(sa) = t.parse::<SocketAddr>() {
            sa
        } else if let Some(ip) = t
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.parse::<std::net::Ipv6Addr>().ok())
        {
            SocketAddr::new(IpAddr::V6(ip), DNS_PORT)
        } else {
            return Err(format!(
                "`{s}` is not an upstream (a resolver is given by address, never by name): {EXPECTED}"
            ));
        };
        if addr.port() == 0 {
            return Err(format!("`{s}` has port 0: {EXPECTED}"));
        }
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(format!(
                "`{s}` is not a unicast address a resolver can listen on: {EXPECTED}"
            ));
        }
        Ok(Upstream(addr))
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Fail inside the visitor, so that the error carries the span of this very element.
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Upstream;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string such as \"10.0.0.2\" or \"10.0.0.3:5353\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Upstream, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// The validated `[dns]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Empty: the system's resolvers (see the module documentation).
    pub upstream: Vec<Upstream>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub unlisted: Unlisted,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            upstream: Vec::new(),
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            unlisted: Unlisted::Resolve,
        }
    }
}

impl DnsSettings {
    /// A TTL in seconds, clamped to `[min_ttl, max_ttl]`.
    pub fn clamp_ttl(&self, ttl_secs: u32) -> Duration {
        Duration::from_secs(u64::from(ttl_secs)).clamp(self.min_ttl, self.max_ttl)
    }
}

impl fmt::Display for DnsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let upstream = if self.upstream.is_empty() {
            "system".to_string()
        } else {
            self.upstream
                .iter()
                .map(Upstream::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "upstream {upstream}, ttl {}-{}, unlisted {}",
            HumanDuration(self.min_ttl),
            HumanDuration(self.max_ttl),
            self.unlisted
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    upstream: Option<Spanned<Vec<Upstream>>>,
    #[serde(default)]
    min_ttl: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    max_ttl: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    unlisted: Unlisted,
}

/// The checks serde cannot make: a non-empty, short upstream list; `min_ttl <= max_ttl`.
pub(super) fn dns(src: Source<'_>, raw: RawDns) -> Result<DnsSettings, PolicyError> {
    let defaults = DnsSettings::default();
    let upstream = match raw.upstream {
        None => Vec::new(),
        Some(list) => {
            let at = list.span().start;
            let n = list.get_ref().len();
            if n == 0 {
                return Err(src.error(
                    at,
                    "dns.upstream".into(),
                    "expected at least one resolver address (omit `upstream` for the system's resolvers)".into(),
                ));
            }
            if n > MAX_UPSTREAMS {
                return Err(src.error(
                    at,
                    "dns.upstream".into(),
                    format!("{n} resolvers: expected at most {MAX_UPSTREAMS}"),
                ));
            }
            let mut out = list.into_inner();
            let mut seen = std::collections::HashSet::new();
            out.retain(|u| seen.insert(*u));
            out
        }
    };
    let min_ttl = raw
        .min_ttl
        .as_ref()
        .map_or(defaults.min_ttl, |d| d.get_ref().0);
    let max_ttl = raw
        .max_ttl
        .as_ref()
        .map_or(defaults.max_ttl, |d| d.get_ref().0);
    if min_ttl > max_ttl {
        // Point at the key the user wrote; with both written, at max_ttl.
        let (at, key) = match (&raw.max_ttl, &raw.min_ttl) {
            (Some(m), _) => (m.span().start, "dns.max_ttl"),
            (None, Some(m)) => (m.span().start, "dns.min_ttl"),
            (None, None) => (0, "dns"),
        };
        return Err(src.error(
            at,
            key.into(),
            format!(
                "min_ttl {} is longer than max_ttl {}: expected min_ttl <= max_ttl",
                HumanDuration(min_ttl),
                HumanDuration(max_ttl)
            ),
        ));
    }
    Ok(DnsSettings {
        upstream,
        min_ttl,
        max_ttl,
        unlisted: raw.unlisted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_take_v4_v6_and_ports() {
        let u = |s: &str| s.parse::<Upstream>().map(|u| u.0.to_string());
        assert_eq!(u("10.0.0.2").unwrap(), "10.0.0.2:53");
        assert_eq!(u(" 10.0.0.3:5353 ").unwrap(), "10.0.0.3:5353");
        assert_eq!(u("::1").unwrap(), "[::1]:53");
        assert_eq!(u("[::1]:53").unwrap(), "[::1]:53");
        assert_eq!(u("[2001:db8::53]").unwrap(), "[2001:db8::53]:53");
        assert_eq!(u("[2001:db8::53]:5353").unwrap(), "[2001:db8::53]:5353");
        for (bad, why) in [
            ("dns.example.com", "never by name"),
            ("10.0.0.2:0", "port 0"),
            ("10.0.0.2:65536", "never by name"),
            ("0.0.0.0", "unicast"),
            ("224.0.0.251", "unicast"),
            ("", "not an upstream"),
            ("10.0.0.0/8", "not an upstream"),
        ] {
            let e = u(bad).expect_err(bad);
            assert!(
                e.contains(why) && e.contains("expected an address"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn ttls_clamp() {
        let d = DnsSettings {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            ..DnsSettings::default()
        };
        assert_eq!(d.clamp_ttl(0), Duration::from_secs(5));
        assert_eq!(d.clamp_ttl(300), Duration::from_secs(300));
        assert_eq!(d.clamp_ttl(u32::MAX), Duration::from_secs(3600));
    }
}
