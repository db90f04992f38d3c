//! The live event feed behind `egress events`: every line the event stream writes (denies,
//! audits, alerts, blocks, reloads) is also kept in a bounded ring of the last [`RECENT`] and
//! broadcast to followers, and [`EventFilter`] picks lines by `pid`, `rule`, `dst`, `host` and
//! `event`.
//!
//! The controller never waits for a follower: the broadcast holds [`FOLLOW_BUFFER`] lines, and a
//! follower that falls further behind loses the oldest and is told how many
//! ([`tokio::sync::broadcast`]'s `Lagged`). A line is published as the text written to the
//! events file, so a follower sees exactly what the file gets.

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use ipnetwork::IpNetwork;
use tokio::sync::broadcast;

/// How many of the latest events the controller keeps for `egress events` without `--follow`.
pub const RECENT: usize = 1024;
/// How many lines a follower may fall behind before it loses some.
pub const FOLLOW_BUFFER: usize = 4096;

/// One event line, with when it happened (the event's `ts` when it has one, else when it was
/// written).
#[derive(Debug, Clone)]
pub struct FeedItem {
    pub at: SystemTime,
    /// The JSON line, without its newline.
    pub line: Arc<str>,
}

/// The recent events and the broadcast to followers.
pub struct Feed {
    recent: Mutex<VecDeque<FeedItem>>,
    tx: broadcast::Sender<FeedItem>,
}

impl Feed {
    pub fn new() -> Arc<Feed> {
        Arc::new(Feed {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            tx: broadcast::Sender::new(FOLLOW_BUFFER),
        })
    }

    /// Keeps `line` (one JSON object, no newline) and sends it to every follower. Never blocks
    /// on a follower.
    pub fn publish(&self, line: &[u8]) {
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        let item = FeedItem {
            at: event_time(text).unwrap_or_else(SystemTime::now),
            line: Arc::from(text),
        };
        // Under the lock: a subscriber sees each line either in its backlog or live, never both
        // and never neither.
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(item.clone());
        // No follower: nothing to do.
        let _ = self.tx.send(item);
    }

    /// The events kept so far (oldest first) and a receiver of every later one.
    pub fn subscribe(&self) -> (Vec<FeedItem>, broadcast::Receiver<FeedItem>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }
}

/// The `ts` of an event line, if it has one that reads.
fn event_time(line: &str) -> Option<SystemTime> {
    #[derive(serde::Deserialize)]
    struct Ts<'a> {
        #[serde(borrow)]
        ts: Option<std::borrow::Cow<'a, str>>,
    }
    let ts = serde_json::from_str::<Ts<'_>>(line).ok()?.ts?;
    humantime::parse_rfc3339_weak(&ts).ok()
}

/// A filter key of `egress events --filter`.
#[derive(Debug, Clone, PartialEq)]
enum Condition {
    /// `pid=N`: the event's `pid`.
    Pid(u32),
    /// `rule=NAME`: the event's `rule` (the deciding service or block of a deny or audit).
    Rule(String),
    /// `dst=ADDR` or `dst=CIDR`: the event's `dst` (a v4-mapped IPv6 address counts as IPv4).
    Dst(IpNetwork),
    /// `host=NAME` or `host=*.SUFFIX`: the name `dst` was learned from (`host`), any case.
    Host(String),
    /// `event=KIND`: `deny`, `audit`, `alert`, `block`, `unblock`, `reload`, ...
    Event(String),
}

/// The keys `--filter` knows, for the usage error that names an unknown one.
pub const FILTER_KEYS: &str = "pid, rule, dst, host, event";

/// Conditions on event lines, all of which must hold (AND). Empty: every line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    conditions: Vec<Condition>,
}

/// A `--filter` that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("--filter: unknown key `{0}` (known: {FILTER_KEYS})")]
    UnknownKey(String),
    #[error("--filter: `{0}` is not KEY=VALUE (keys: {FILTER_KEYS})")]
    NotKeyValue(String),
    #[error("--filter: {key}={value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
}

impl EventFilter {
    /// Reads `--filter` values: each a comma-separated list of KEY=VALUE.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<EventFilter, FilterError> {
        let mut conditions = Vec::new();
        for part in specs
            .iter()
            .flat_map(|s| s.as_ref().split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| FilterError::NotKeyValue(part.to_string()))?;
            let (key, value) = (key.trim(), value.trim());
            let bad = |why: String| FilterError::BadValue {
                key: key.to_string(),
                value: value.to_string(),
                why,
            };
            conditions.push(match key {
                "pid" => Condition::Pid(
                    value
                        .parse()
                        .map_err(|_| bad("expected a process id".into()))?,
                ),
                "rule" => Condition::Rule(value.to_string()),
                "dst" => Condition::Dst(match value.parse::<IpAddr>() {
                    Ok(a) => IpNetwork::from(unmapped(a)),
                    Err(_) => value
                        .parse::<IpNetwork>()
                        .map_err(|e| bad(format!("expected an address or a CIDR prefix ({e})")))?,
                }),
                "host" => Condition::Host(value.trim_end_matches('.').to_ascii_lowercase()),
                "event" => Condition::Event(value.to_string()),
                other => return Err(FilterError::UnknownKey(other.to_string())),
            });
        }
        Ok(EventFilter { conditions })
    }

    /// Whether the filter keeps every line.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Whether an event line passes every condition. A line that is not a JSON object passes
    /// only an empty filter.
    pub fn matches_line(&self, line: &str) -> bool {
        if self.is_empty() {
            return true;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => self.matches(&v),
            Err(_) => false,
        }
    }

    /// Whether an event passes every condition (a field it lacks fails its condition).
    pub fn matches(&self, v: &serde_json::Value) -> bool {
        let text = |key: &str| v.get(key).and_then(serde_json::Value::as_str);
        self.conditions.iter().all(|c| match c {
            Condition::Pid(pid) => {
                v.get("pid").and_then(serde_json::Value::as_u64) == Some(*pid as u64)
            }
            Condition::Rule(rule) => text("rule") == Some(rule.as_str()),
            Condition::Event(kind) => text("event") == Some(kind.as_str()),
            Condition::Dst(net) => text("dst")
                .and_then(|d| d.parse::<IpAddr>().ok())
                .is_some_and(|a| net.contains(unmapped(a))),
            Condition::Host(want) => text("host").is_some_and(|h| {
                let h = h.trim_end_matches('.').to_ascii_lowercase();
                match want.strip_prefix("*.") {
                    Some(suffix) => h
                        .strip_suffix(suffix)
                        .is_some_and(|head| head.ends_with('.')),
                    None => h == *want,
                }
            }),
        })
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d` (the kernel judges it as IPv4, and so does the filter).
fn unmapped(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = r#"{"ts":"2025-01-02T03:04:05.000000006Z","event":"deny","pid":7720,"tid":7721,"comm":"curl","dst":"::ffff:203.0.113.9","port":443,"rule":"default","host":"API.Example.com"}"#;
    const RELOAD: &str = r#"{"ts":"2025-01-02T03:04:06Z","event":"reload","generation":3}"#;

    fn f(spec: &str) -> EventFilter {
        EventFilter::parse(&[spec]).unwrap()
    }

    #[test]
    fn keys_combine_with_and() {
        assert!(f("").matches_line(DENY));
        assert!(f("pid=7720").matches_line(DENY));
        assert!(f("pid=7720,rule=default").matches_line(DENY));
        assert!(!f("pid=7720,rule=web").matches_line(DENY));
        assert!(!f("pid=1").matches_line(DENY));
        assert!(f("event=deny").matches_line(DENY));
        assert!(!f("event=deny").matches_line(RELOAD));
        // A field the event lacks fails its condition.
        assert!(!f("pid=7720").matches_line(RELOAD));
        let two = EventFilter::parse(&["pid=7720", "rule=default"]).unwrap();
        assert_eq!(two, f("pid=7720, rule=default"));
    }

    #[test]
    fn dst_takes_an_address_or_a_prefix_and_reads_v4_mapped_as_v4() {
        assert!(f("dst=203.0.113.9").matches_line(DENY));
        assert!(f("dst=203.0.113.0/24").matches_line(DENY));
        assert!(f("dst=::ffff:203.0.113.9").matches_line(DENY));
        assert!(!f("dst=198.51.100.0/24").matches_line(DENY));
        assert!(!f("dst=2001:db8::/32").matches_line(DENY));
    }

    #[test]
    fn host_matches_names_and_suffixes_in_any_case() {
        assert!(f("host=api.example.com").matches_line(DENY));
        assert!(f("host=api.example.com.").matches_line(DENY));
        assert!(f("host=*.EXAMPLE.com").matches_line(DENY));
        assert!(!f("host=*.api.example.com").matches_line(DENY));
        assert!(!f("host=example.com").matches_line(DENY));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = EventFilter::parse(&["pid=1,colour=red"]).unwrap_err();
        assert_eq!(e, FilterError::UnknownKey("colour".into()));
        assert!(e.to_string().contains("`colour`"), "{e}");
        assert!(matches!(
            EventFilter::parse(&["pid=me"]).unwrap_err(),
            FilterError::BadValue { key, .. } if key == "pid"
        ));
        assert!(matches!(
            EventFilter::parse(&["dst=nowhere"]).unwrap_err(),
            FilterError::BadValue { key, .. } if key == "dst"
        ));
        assert_eq!(
            EventFilter::parse(&["pid"]).unwrap_err(),
            FilterError::NotKeyValue("pid".into())
        );
    }

    #[test]
    fn the_ring_keeps_the_last_events_and_followers_get_the_rest() {
        let feed = Feed::new();
        for i in 0..RECENT + 5 {
            feed.publish(format!(r#"{{"event":"deny","pid":{i}}}"#).as_bytes());
        }
        let (backlog, mut rx) = feed.subscribe();
        assert_eq!(backlog.len(), RECENT);
        assert!(
            backlog[0].line.contains(r#""pid":5}"#),
            "{}",
            backlog[0].line
        );
        feed.publish(RELOAD.as_bytes());
        let item = rx.try_recv().unwrap();
        assert_eq!(&*item.line, RELOAD);
        assert_eq!(
            item.at,
            humantime::parse_rfc3339("2025-01-02T03:04:06Z").unwrap()
        );
    }

    #[test]
    fn a_slow_follower_loses_the_oldest_and_is_told_how_many() {
        let feed = Feed::new();
        let (_, mut rx) = feed.subscribe();
        for i in 0..FOLLOW_BUFFER + 10 {
            feed.publish(format!(r#"{{"pid":{i}}}"#).as_bytes());
        }
        assert_eq!(
            rx.try_recv().unwrap_err(),
            broadcast::error::TryRecvError::Lagged(10)
        );
        assert!(rx.try_recv().unwrap().line.contains(r#""pid":10}"#));
    }
}
