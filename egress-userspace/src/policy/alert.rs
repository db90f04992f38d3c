//! `[[alert]]` tables: high-volume transfer alerts and byte budgets.
//!
//! ```toml
//! [[alert]]
//! name = "bulk-upload"
//! bytes = "100MiB"          # KB, KiB, MB, MiB, GB, GiB (and B, TB, TiB); a bare integer is bytes
//! window = "5m"             # sliding window: s, m, h
//! per = "process"           # "process" | "destination" | "process_destination" | "cgroup"
//!                           # | "user" | "executable"
//! action = "alert"          # "alert" | "block" (per = process, process_destination, user or
//!                           # executable)
//! cooldown = "10m"          # no repeat alert per key within it; for "block", how long it lasts
//! services = ["corp-proxy"] # only count traffic that these services or blocks decide
//! destinations = ["10.0.0.0/8"]          # only count traffic to these networks
//! exclude_destinations = ["10.9.0.0/16"] # never count traffic to these
//! unapproved_only = true    # only count traffic no service approved (e.g. under default = "allow")
//! ```
//!
//! The DNS kind (tunnel and covert-channel detection, counted by the DNS proxy per process or
//! cgroup and per registered domain; see `dns::tunnel`):
//!
//! ```toml
//! [[alert]]
//! name = "dns-tunnel"
//! dns_unique_subdomains = 300  # distinct names under one registered domain within the window
//! dns_bytes = "64KiB"          # bytes of query names under one registered domain within it
//! dns_entropy = 3.5            # mean Shannon entropy (bits/char) of the subdomain labels ...
//! dns_min_queries = 20         # ... once at least this many queries were seen (default 20)
//! window = "1m"
//! per = "process"              # "process" | "cgroup"
//! action = "alert"             # "alert" | "block" (refuse that key's queries to that domain)
//! cooldown = "10m"
//! ```
//!
//! An alert is of one kind: `bytes` and the byte-only keys (`services`, `destinations`, ...) do
//! not mix with the `dns_*` keys.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use super::Destination;

/// A byte count with human units. Decimal (KB = 1000) and binary (KiB = 1024) units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let expected = "expected a size such as \"100MiB\", \"1.5GB\" or \"500KB\" (units B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)";
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size: {expected}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            "TB" => 1_000_000_000_000,
            "TiB" => 1 << 40,
            other => return Err(format!("unknown unit `{other}` in `{s}`: {expected}")),
        };
        let bytes = n * mult as f64;
        if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(format!("`{s}` is out of range: expected at least 1 byte"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"100MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                if v < 1 {
                    return Err(E::custom(format!(
                        "{v} is out of range: expected at least 1 byte"
                    )));
                }
                Ok(ByteSize(v as u64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as a number and one unit: "30s", "5m", "1h" (also "1.5h").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<HumanDuration, String> {
        let t = s.trim();
        let expected = "expected a duration such as \"30s\", \"5m\" or \"1h\"";
        let (num, mult) = if let Some(n) = t.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = t.strip_suffix('m') {
            (n, 60.0)
        } else if let Some(n) = t.strip_suffix('h') {
            (n, 3600.0)
        } else {
            return Err(format!("`{s}` has no unit: {expected}"));
        };
        let n: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a duration: {expected}"))?;
        let secs = n * mult;
        if !(1.0..=7.0 * 86_400.0).contains(&secs) {
            return Err(format!("`{s}` is out of range: expected 1s to 168h"));
        }
        Ok(HumanDuration(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs_f64();
        if s >= 3600.0 && s % 3600.0 == 0.0 {
            write!(f, "{}h", s / 3600.0)
        } else if s >= 60.0 && s % 60.0 == 0.0 {
            write!(f, "{}m", s / 60.0)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"5m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// What an alert's traffic is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertPer {
    /// One process; its block also covers what it forks after the block.
    #[default]
    Process,
    Destination,
    ProcessDestination,
    Cgroup,
    /// Every process of one user (uid), together, whoever started it.
    User,
    /// Every process running one executable (its full path), together. A block covers each
    /// process running it when the alert fires (and what they fork afterwards).
    Executable,
}

impl AlertPer {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertPer::Process => "process",
            AlertPer::Destination => "destination",
            AlertPer::ProcessDestination => "process_destination",
            AlertPer::Cgroup => "cgroup",
            AlertPer::User => "user",
            AlertPer::Executable => "executable",
        }
    }

    /// Whether `action = "block"` can apply: the key names processes (a process, a user, or
    /// the processes running an executable), not a destination or a cgroup.
    pub fn blockable(&self) -> bool {
        matches!(
            self,
            AlertPer::Process
                | AlertPer::ProcessDestination
                | AlertPer::User
                | AlertPer::Executable
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertAction {
    #[default]
    Alert,
    Block,
}

impl AlertAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertAction::Alert => "alert",
            AlertAction::Block => "block",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlert {
    pub name: Spanned<String>,
    #[serde(default)]
    pub bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub dns_unique_subdomains: Option<Spanned<i64>>,
    #[serde(default)]
    pub dns_bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub dns_entropy: Option<Spanned<f64>>,
    #[serde(default)]
    pub dns_min_queries: Option<Spanned<i64>>,
    pub window: HumanDuration,
    #[serde(default)]
    pub per: Option<Spanned<AlertPer>>,
    #[serde(default)]
    pub action: Option<Spanned<AlertAction>>,
    #[serde(default)]
    pub cooldown: Option<HumanDuration>,
    #[serde(default)]
    pub services: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub destinations: Option<Spanned<Vec<Destination>>>,
    #[serde(default)]
    pub exclude_destinations: Option<Spanned<Vec<Destination>>>,
    #[serde(default)]
    pub unapproved_only: Option<Spanned<bool>>,
}

/// The most distinct subdomains a DNS alert may count to: its state per key holds that many
/// names at most (see `dns::tunnel` for the memory bound).
pub const DNS_MAX_UNIQUE_SUBDOMAINS: u64 = 10_000;

/// The thresholds of a DNS alert (`dns_*` keys); at least one is set, and any one reached fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DnsThresholds {
    /// Distinct subdomains (the labels left of the registered domain, lowercased).
    pub unique_subdomains: Option<u64>,
    /// Bytes of query names (the whole name as asked, in its text form).
    pub bytes: Option<u64>,
    /// Mean Shannon entropy of the subdomain labels, in thousandths of a bit per character (kept
    /// as an integer so that alerts compare exactly).
    pub entropy_millibits: Option<u32>,
    /// Queries needed in the window before the entropy counts.
    pub min_queries: u64,
}

/// `dns_min_queries` when not given: a mean over fewer names says little.
pub const DNS_DEFAULT_MIN_QUERIES: u64 = 20;

impl DnsThresholds {
    pub fn entropy(&self) -> Option<f64> {
        self.entropy_millibits.map(|m| f64::from(m) / 1000.0)
    }
}
/// A validated `[[alert]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub name: String,
    pub bytes: u64,
    pub window: Duration,
    pub per: AlertPer,
    pub action: AlertAction,
    /// Default: the window.
    pub cooldown: Duration,
    /// Names of services/blocks whose traffic counts (empty: all).
    pub services: Vec<String>,
    pub destinations: Vec<Destination>,
    pub exclude_destinations: Vec<Destination>,
    pub unapproved_only: bool,
    /// The DNS kind: its thresholds (then `bytes` is 0 and the byte-only settings are empty).
    pub dns: Option<DnsThresholds>,
    pub line: usize,
}

impl Alert {
    pub fn window_text(&self) -> String {
        HumanDuration(self.window).to_string()
    }

    /// Whether two alerts say the same thing: every setting equal, wherever each is written
    /// (`line` does not count).
    fn same_settings(&self, other: &Alert) -> bool {
        // Destructured, so that a new field cannot be left out of the comparison unnoticed.
        let Alert {
            name,
            bytes,
            window,
            per,
            action,
            cooldown,
            services,
            destinations,
            exclude_destinations,
            unapproved_only,
            dns,
            line: _,
        } = self;
        *name == other.name
            && *bytes == other.bytes
            && *window == other.window
            && *per == other.per
            && *action == other.action
            && *cooldown == other.cooldown
            && *services == other.services
            && *destinations == other.destinations
            && *exclude_destinations == other.exclude_destinations
            && *unapproved_only == other.unapproved_only
            && *dns == other.dns
    }

    /// Whether this is a DNS alert (counted by the DNS proxy, not from the flow counters).
    pub fn is_dns(&self) -> bool {
        self.dns.is_some()
    }
}

/// Whether `new` differs from `old` in anything but where the alerts are written: a count, an
/// order or a setting. The one comparison for both a reload (which keeps the alert engine and its
/// sliding windows unless this is true; the engine knows alerts by position) and
/// [`describe`](super::diff::describe) (which compares one alert of each name).
pub fn alerts_differ(old: &[Alert], new: &[Alert]) -> bool {
    old.len() != new.len() || old.iter().zip(new).any(|(o, n)| !o.same_settings(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        let b = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(b("100MiB"), Ok(100 << 20));
        assert_eq!(b("1.5GB"), Ok(1_500_000_000));
        assert_eq!(b("500KB"), Ok(500_000));
        assert_eq!(b("2KiB"), Ok(2048));
        assert_eq!(b("7"), Ok(7));
        assert_eq!(b("1 GiB"), Ok(1 << 30));
        assert!(b("10XB").unwrap_err().contains("unknown unit `XB`"));
        assert!(b("MiB").unwrap_err().contains("not a size"));
        assert!(b("0MB").unwrap_err().contains("out of range"));
    }

    fn alert(name: &str, bytes: u64, line: usize) -> Alert {
        Alert {
            name: name.into(),
            bytes,
            window: Duration::from_secs(300),
            per: AlertPer::Process,
            action: AlertAction::Alert,
            cooldown: Duration::from_secs(300),
            services: vec!["web".into()],
            destinations: vec!["10.0.0.0/8".parse().unwrap()],
            exclude_destinations: Vec::new(),
            unapproved_only: false,
            dns: None,
            line,
        }
    }

    #[test]
    fn alerts_differ_ignores_lines_only() {
        let old = [alert("a", 100, 4), alert("b", 200, 9)];
        // Same alerts, moved down by a service added above them.
        let moved = [alert("a", 100, 8), alert("b", 200, 13)];
        assert!(!alerts_differ(&old, &moved));
        assert!(!alerts_differ(&[], &[]));
        assert!(alerts_differ(
            &old,
            &[alert("a", 100, 4), alert("b", 201, 9)]
        ));
        assert!(alerts_differ(&old, &[alert("a", 100, 4)]));
        assert!(alerts_differ(
            &old,
            &[alert("b", 200, 9), alert("a", 100, 4)]
        ));
        let mut other = alert("a", 100, 4);
        other.unapproved_only = true;
        assert!(alerts_differ(&old[..1], &[other]));
        let mut other = alert("a", 100, 4);
        other.dns = Some(DnsThresholds {
            unique_subdomains: Some(300),
            ..Default::default()
        });
        assert!(alerts_differ(&old[..1], &[other]));
    }

    #[test]
    fn durations_with_units() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(d("5").unwrap_err().contains("no unit"));
        assert!(d("0s").unwrap_err().contains("out of range"));
        assert!(d("xm").unwrap_err().contains("not a duration"));
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(HumanDuration(Duration::from_secs(90)).to_string(), "90s");
    }
}
