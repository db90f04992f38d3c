//! DNS-tunnel and covert-channel detection: the DNS alerts (`[[alert]]` with `dns_*` keys)
//! counted over the queries the proxy answers. Pure (no sockets, no kernel): the proxy feeds it
//! each query with who asked, and it says whether the query is refused (an alert's block in
//! force), and queues the alerts that fire for the controller to deliver.
//!
//! **What is counted**, per alert, per asker (the process, or its cgroup under
//! `per = "cgroup"`) and per **registered domain** (eTLD+1 from the Public Suffix List, compiled
//! in with the `psl` crate, private suffixes such as `github.io` included; a name under an
//! unknown top-level domain counts under its last two labels): within a sliding window,
//! - the distinct subdomains (the labels left of the registered domain, lowercased, so that 0x20
//!   case randomisation makes no new names),
//! - the bytes of the query names (the whole name's text),
//! - the mean Shannon entropy (bits per character) of the subdomains, once `dns_min_queries`
//!   queries with a subdomain were seen.
//!
//! Every query type counts (A, AAAA, TXT, NULL, CNAME, MX, ...), over UDP and TCP alike: the
//! proxy calls [`TunnelWatch::observe`] before anything else.
//!
//! **Bounded under a flood of unique names.** A key keeps at most `dns_unique_subdomains` names
//! (a hash and a time each; 256 when the alert sets no such threshold): reaching it is reaching
//! the threshold, so the oldest goes and the count stays exact up to it. At most [`MAX_KEYS`]
//! keys and [`MAX_NAMES`] names over all keys are kept; idle keys go first, then the least
//! recently seen (an eighth of them at once); what had to go is counted ([`TunnelStats`]). Names are hashed with a per-run
//! random key, so that nobody can craft names that collide.
//!
//! **Limits** (documented in the README): a tunnel slower than the thresholds within one window
//! is not seen (its rate is bounded by them: 300 names a minute of ~60 bytes is ~18 KB a
//! minute at most); a tunnel spread over more registered domains than thresholds allow is
//! counted per domain; queries to a server on another port than 53 are not steered to the proxy
//! (the address rules decide them).

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    alerts::SlidingWindow,
    policy::alert::{Alert, AlertAction, AlertPer, DnsThresholds},
};

/// Keys (alert, asker, registered domain) kept at most.
pub const MAX_KEYS: usize = 4096;
/// Subdomain names kept at most over all keys (about 40 bytes each).
pub const MAX_NAMES: usize = 1 << 19;
/// Names kept per key when its alert has no `dns_unique_subdomains` (for the event's count).
const DEFAULT_NAMES_PER_KEY: usize = 256;
/// Names an alert event carries as samples.
const SAMPLES: usize = 5;
/// Firings and lifted blocks queued for the controller at most (it takes them every tick).
const MAX_QUEUED: usize = 1024;
/// The resolution of a name's last-seen time.
const TICK: Duration = Duration::from_millis(100);

/// Who a DNS alert counts and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Process(u32),
    Cgroup(u64),
}

/// The process that asked: its pid and cgroup (from the socket's owner record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asker {
    pub tgid: u32,
    pub cgroup_id: u64,
}

/// A block of DNS queries: a subject, towards one registered domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsBlockKey {
    pub subject: Subject,
    pub domain: String,
}

impl DnsBlockKey {
    /// The text form used in events and by `egress unblock`: `dns:process:PID:DOMAIN` or
    /// `dns:cgroup:ID:DOMAIN`.
    pub fn text(&self) -> String {
        match self.subject {
            Subject::Process(p) => format!("dns:process:{p}:{}", self.domain),
            Subject::Cgroup(c) => format!("dns:cgroup:{c}:{}", self.domain),
        }
    }

    /// Parses the text form; `None` when `s` is not a DNS key at all (no `dns:` prefix).
    pub fn parse(s: &str) -> Option<Result<DnsBlockKey, String>> {
        let rest = s.strip_prefix("dns:")?;
        let bad = || {
            format!(
                "`{s}` is not a DNS alert key: expected dns:process:PID:DOMAIN or dns:cgroup:ID:DOMAIN"
            )
        };
        let parsed = (|| {
            let (kind, rest) = rest.split_once(':')?;
            let (id, domain) = rest.split_once(':')?;
            if domain.is_empty() || domain.contains(':') {
                return None;
            }
            let subject = match kind {
                "process" => Subject::Process(id.parse().ok()?),
                "cgroup" => Subject::Cgroup(id.parse().ok()?),
                _ => return None,
            };
            Some(DnsBlockKey {
                subject,
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            })
        })();
        Some(parsed.ok_or_else(bad))
    }
}

/// The registered domain of a name (lowercase, no trailing dot) and the subdomain left of it
/// (empty for the registered domain itself, or a name that is a public suffix).
pub fn split(name: &str) -> (&str, &str) {
    let name = name.trim_end_matches('.');
    match psl::domain_str(name) {
        Some(domain) if domain.len() < name.len() => {
            let sub = &name[..name.len() - domain.len()];
            (domain, sub.strip_suffix('.').unwrap_or(sub))
        }
        Some(domain) => (domain, ""),
        // A public suffix itself (`co.uk`), or one label: counted under itself.
        None => (name, ""),
    }
}

/// Shannon entropy of a subdomain's characters, dots left out, in bits per character.
pub fn entropy(sub: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in sub.bytes().filter(|&b| b != b'.') {
        counts[usize::from(b)] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// What was dropped to keep the state bounded, and what was refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TunnelStats {
    /// Queries counted by the DNS alerts.
    pub queries: u64,
    /// Queries refused by a DNS alert's block.
    pub refused: u64,
    /// Keys (alert, asker, domain) forgotten while active, to make room for others.
    pub keys_evicted: u64,
    /// Names forgotten before their window ended (a key at its cap, or all keys at theirs).
    pub names_evicted: u64,
    /// DNS alerts that fired.
    pub fired: u64,
    /// Firings or lifted blocks not queued for the controller (the queue was full).
    pub queue_dropped: u64,
}

/// Why a DNS alert fired: which thresholds were reached.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsFiring {
    /// Index of the alert in the policy's `alerts`.
    pub alert_index: usize,
    pub alert_rule: String,
    pub key: DnsBlockKey,
    pub per: AlertPer,
    /// The last process that asked under the key.
    pub asker: Asker,
    pub unique_subdomains: u64,
    pub dns_bytes: u64,
    pub queries: u64,
    /// Mean entropy of the subdomains in the window (bits per character).
    pub entropy: f64,
    pub window: Duration,
    /// A few recent names asked under the key.
    pub samples: Vec<String>,
    /// The thresholds reached (`dns_unique_subdomains`, `dns_bytes`, `dns_entropy`).
    pub reasons: Vec<&'static str>,
    pub thresholds: DnsThresholds,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub action: AlertAction,
    /// For `action = "block"`: how long the block lasts (the cooldown).
    pub block_for: Option<Duration>,
}

/// A block that ended (its time up, or lifted by `egress unblock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiftedBlock {
    pub key: DnsBlockKey,
    pub alert_rule: String,
    pub reason: &'static str,
    pub fired_at: SystemTime,
}

/// An active block, as `egress status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveDnsBlock {
    pub key: DnsBlockKey,
    pub alert_rule: String,
    pub until: SystemTime,
}

/// What the proxy does with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    Pass,
    /// A DNS alert's block covers it.
    Refused {
        alert_rule: String,
        key: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    alert: usize,
    subject: Subject,
    domain: String,
}

struct KeyState {
    /// Subdomain hash -> when last seen (in ticks of [`TICK`]).
    names: HashMap<u64, u32>,
    /// (when, hash) in time order; an entry is stale when `names` holds a later time.
    order: VecDeque<(u32, u64)>,
    cap: usize,
    bytes: SlidingWindow,
    /// Queries with a subdomain, and the sum of their entropies (millibits).
    queries: SlidingWindow,
    entropy: SlidingWindow,
    samples: VecDeque<String>,
    asker: Asker,
    first_seen: SystemTime,
    last_seen: Instant,
    last_seen_wall: SystemTime,
}

impl KeyState {
    fn new(cap: usize, window: Duration, now: Instant, wall: SystemTime) -> KeyState {
        KeyState {
            names: HashMap::new(),
            order: VecDeque::new(),
            cap,
            bytes: SlidingWindow::new(window),
            queries: SlidingWindow::new(window),
            entropy: SlidingWindow::new(window),
            samples: VecDeque::new(),
            asker: Asker::default(),
            first_seen: wall,
            last_seen: now,
            last_seen_wall: wall,
        }
    }

    /// Forgets the names last seen before `oldest`; returns how many went.
    fn expire(&mut self, oldest: u32) -> usize {
        let before = self.names.len();
        while let Some(&(at, h)) = self.order.front() {
            if at >= oldest {
                break;
            }
            self.order.pop_front();
            if self.names.get(&h) == Some(&at) {
                self.names.remove(&h);
            }
        }
        before - self.names.len()
    }

    /// Forgets the least recently seen name; true if one went.
    fn evict_oldest(&mut self) -> bool {
        while let Some((at, h)) = self.order.pop_front() {
            if self.names.get(&h) == Some(&at) {
                self.names.remove(&h);
                return true;
            }
        }
        false
    }

    /// Notes a name seen at `at`; returns how many names the key holds more (0 or 1).
    fn see(&mut self, h: u64, at: u32) -> usize {
        let new = self.names.insert(h, at).is_none();
        self.order.push_back((at, h));
        // Re-seen names leave stale entries: rebuild the order before it grows past its bound.
        if self.order.len() > 2 * self.cap + 64 {
            let mut live: Vec<(u32, u64)> = self.names.iter().map(|(h, t)| (*t, *h)).collect();
            live.sort_unstable();
            self.order = live.into();
        }
        usize::from(new)
    }
}

/// The DNS alerts' state: counters per key, blocks in force, what to deliver.
pub struct TunnelWatch {
    /// (index in the policy's alerts, alert), DNS alerts only.
    alerts: Vec<(usize, Alert)>,
    epoch: Instant,
    hasher: RandomState,
    keys: HashMap<Key, KeyState>,
    names: usize,
    last_fired: HashMap<Key, Instant>,
    blocks: HashMap<DnsBlockKey, (Instant, SystemTime, String, SystemTime)>,
    firings: Vec<DnsFiring>,
    lifted: Vec<LiftedBlock>,
    last_sweep: Instant,
    stats: TunnelStats,
}

impl TunnelWatch {
    /// The watch of a policy's DNS alerts (the others are left alone).
    pub fn new(alerts: &[Alert], now: Instant) -> TunnelWatch {
        TunnelWatch {
            alerts: alerts
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_dns())
                .map(|(i, a)| (i, a.clone()))
                .collect(),
            epoch: now,
            hasher: RandomState::new(),
            keys: HashMap::new(),
            names: 0,
            last_fired: HashMap::new(),
            blocks: HashMap::new(),
            firings: Vec::new(),
            lifted: Vec::new(),
            last_sweep: now,
            stats: TunnelStats::default(),
        }
    }

    /// Whether there is anything to count or enforce.
    pub fn is_active(&self) -> bool {
        !self.alerts.is_empty() || !self.blocks.is_empty()
    }

    /// A new policy's alerts: counts start again; blocks in force stay until they end.
    pub fn set_alerts(&mut self, alerts: &[Alert], now: Instant) {
        let blocks = std::mem::take(&mut self.blocks);
        let lifted = std::mem::take(&mut self.lifted);
        let firings = std::mem::take(&mut self.firings);
        let stats = self.stats;
        *self = TunnelWatch::new(alerts, now);
        self.blocks = blocks;
        self.lifted = lifted;
        self.firings = firings;
        self.stats = stats;
    }

    pub fn stats(&self) -> TunnelStats {
        self.stats
    }

    /// One query: `name` (lowercase, no trailing dot) asked by `asker`. Refused when a block
    /// covers the asker (its process or its cgroup) and the name's registered domain;
    /// otherwise counted, and the alerts that fire are queued (a block takes effect at once).
    pub fn observe(&mut self, asker: Asker, name: &str, now: Instant, wall: SystemTime) -> Screen {
        if now.duration_since(self.last_sweep) >= Duration::from_secs(1) {
            self.sweep(now);
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let (domain, sub) = split(&name);
        for subject in [
            Subject::Process(asker.tgid),
            Subject::Cgroup(asker.cgroup_id),
        ] {
            let key = DnsBlockKey {
                subject,
                domain: domain.to_string(),
            };
            if let Some((until, _, rule, _)) = self.blocks.get(&key)
                && *until > now
            {
                self.stats.refused += 1;
                return Screen::Refused {
                    alert_rule: rule.clone(),
                    key: key.text(),
                };
            }
        }
        if self.alerts.is_empty() {
            return Screen::Pass;
        }
        self.stats.queries += 1;
        let t = now.saturating_duration_since(self.epoch);
        let at = (t.as_millis() / TICK.as_millis()) as u32;
        let sub_entropy = (!sub.is_empty()).then(|| entropy(sub));
        let hash = (!sub.is_empty()).then(|| self.hasher.hash_one(sub));
        for ai in 0..self.alerts.len() {
            let (index, alert) = &self.alerts[ai];
            let Some(th) = alert.dns else { continue };
            let (index, per, window, cooldown, action) = (
                *index,
                alert.per,
                alert.window,
                alert.cooldown,
                alert.action,
            );
            let subject = match per {
                AlertPer::Cgroup => Subject::Cgroup(asker.cgroup_id),
                _ => Subject::Process(asker.tgid),
            };
            let key = Key {
                alert: ai,
                subject,
                domain: domain.to_string(),
            };
            let window_ticks = (window.as_millis() / TICK.as_millis()).max(1) as u32;
            let cap = th
                .unique_subdomains
                .map_or(DEFAULT_NAMES_PER_KEY, |n| n as usize);
            if !self.keys.contains_key(&key) {
                self.make_room(now);
                self.keys
                    .insert(key.clone(), KeyState::new(cap, window, now, wall));
            }
            let Some(st) = self.keys.get_mut(&key) else {
                continue;
            };
            if st.bytes.sum(t) == 0 && st.names.is_empty() {
                // The window had emptied: a new episode starts.
                st.first_seen = wall;
            }
            self.names -= st.expire(at.saturating_sub(window_ticks));
            st.asker = asker;
            st.last_seen = now;
            st.last_seen_wall = wall;
            st.bytes.add(t, name.len() as u64);
            if st.samples.len() == SAMPLES {
                st.samples.pop_front();
            }
            st.samples.push_back(name.clone());
            if let (Some(h), Some(e)) = (hash, sub_entropy) {
                st.queries.add(t, 1);
                st.entropy.add(t, (e * 1000.0).round() as u64);
                if !st.names.contains_key(&h) && st.names.len() >= st.cap {
                    // At its cap the key is at its threshold: the count stays exact up to it.
                    if st.evict_oldest() {
                        self.names -= 1;
                        self.stats.names_evicted += 1;
                    }
                }
                if st.names.contains_key(&h) || self.names < MAX_NAMES {
                    self.names += st.see(h, at);
                } else {
                    self.stats.names_evicted += 1;
                }
            }
            let unique = st.names.len() as u64;
            let bytes = st.bytes.sum(t);
            let queries = st.queries.sum(t);
            let mean_entropy = if queries > 0 {
                st.entropy.sum(t) as f64 / 1000.0 / queries as f64
            } else {
                0.0
            };
            let mut reasons = Vec::new();
            if th.unique_subdomains.is_some_and(|n| unique >= n) {
                reasons.push("dns_unique_subdomains");
            }
            if th.bytes.is_some_and(|n| bytes >= n) {
                reasons.push("dns_bytes");
            }
            if th
                .entropy_millibits
                .is_some_and(|m| queries >= th.min_queries && mean_entropy * 1000.0 >= f64::from(m))
            {
                reasons.push("dns_entropy");
            }
            if reasons.is_empty() {
                continue;
            }
            if self
                .last_fired
                .get(&key)
                .is_some_and(|&last| now.duration_since(last) < cooldown)
            {
                continue;
            }
            self.last_fired.insert(key.clone(), now);
            let block_key = DnsBlockKey {
                subject,
                domain: domain.to_string(),
            };
            let block_for = (action == AlertAction::Block).then_some(cooldown);
            let alert_rule = self.alerts[ai].1.name.clone();
            if let Some(d) = block_for {
                self.blocks.insert(
                    block_key.clone(),
                    (now + d, wall + d, alert_rule.clone(), wall),
                );
            }
            self.stats.fired += 1;
            let firing = DnsFiring {
                alert_index: index,
                alert_rule,
                key: block_key,
                per,
                asker,
                unique_subdomains: unique,
                dns_bytes: bytes,
                queries,
                entropy: (mean_entropy * 1000.0).round() / 1000.0,
                window,
                samples: st.samples.iter().cloned().collect(),
                reasons,
                thresholds: th,
                first_seen: st.first_seen,
                last_seen: st.last_seen_wall,
                action,
                block_for,
            };
            if self.firings.len() < MAX_QUEUED {
                self.firings.push(firing);
            } else {
                self.stats.queue_dropped += 1;
            }
        }
        Screen::Pass
    }

    /// Makes room for one more key: idle keys go first, then the least recently seen eighth at
    /// once, so that a flood of new keys pays the scan once per [`MAX_KEYS`]/8 of them, not on
    /// every query (the lock is held meanwhile).
    fn make_room(&mut self, now: Instant) {
        if self.keys.len() < MAX_KEYS {
            return;
        }
        self.sweep(now);
        if self.keys.len() < MAX_KEYS {
            return;
        }
        let mut by_age: Vec<(Instant, Key)> = self
            .keys
            .iter()
            .map(|(k, st)| (st.last_seen, k.clone()))
            .collect();
        let n = MAX_KEYS / 8;
        by_age.select_nth_unstable_by_key(n, |(t, _)| *t);
        for (_, k) in by_age.into_iter().take(n) {
            if let Some(st) = self.keys.remove(&k) {
                self.names -= st.names.len();
                self.stats.keys_evicted += 1;
            }
        }
    }

    /// Forgets expired names and idle keys, ends the blocks whose time is up, and forgets
    /// cooldowns that ended.
    pub fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        let t = now.saturating_duration_since(self.epoch);
        let at = (t.as_millis() / TICK.as_millis()) as u32;
        let alerts = &self.alerts;
        let mut names = 0;
        self.keys.retain(|k, st| {
            let window = alerts[k.alert].1.window;
            let window_ticks = (window.as_millis() / TICK.as_millis()).max(1) as u32;
            st.expire(at.saturating_sub(window_ticks));
            let keep = now.duration_since(st.last_seen) < window;
            if keep {
                names += st.names.len();
            }
            keep
        });
        self.names = names;
        self.last_fired.retain(|k, at| {
            alerts
                .get(k.alert)
                .is_some_and(|(_, a)| now.duration_since(*at) < a.cooldown)
        });
        let ended: Vec<DnsBlockKey> = self
            .blocks
            .iter()
            .filter(|(_, (until, ..))| *until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            self.lift(&k, "cooldown ended");
        }
    }

    /// Ends a block (`egress unblock`); false if there was none.
    pub fn lift(&mut self, key: &DnsBlockKey, reason: &'static str) -> bool {
        let Some((_, _, rule, fired_at)) = self.blocks.remove(key) else {
            return false;
        };
        if self.lifted.len() < MAX_QUEUED {
            self.lifted.push(LiftedBlock {
                key: key.clone(),
                alert_rule: rule,
                reason,
                fired_at,
            });
        } else {
            self.stats.queue_dropped += 1;
        }
        true
    }

    /// The alerts fired and the blocks ended since the last call.
    pub fn take(&mut self) -> (Vec<DnsFiring>, Vec<LiftedBlock>) {
        (
            std::mem::take(&mut self.firings),
            std::mem::take(&mut self.lifted),
        )
    }

    /// The blocks in force, in key order.
    pub fn blocks(&self, now: Instant) -> Vec<ActiveDnsBlock> {
        let mut v: Vec<ActiveDnsBlock> = self
            .blocks
            .iter()
            .filter(|(_, (until, ..))| *until > now)
            .map(|(k, (_, until_wall, rule, _))| ActiveDnsBlock {
                key: k.clone(),
                alert_rule: rule.clone(),
                until: *until_wall,
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Keys and names held now (for tests and the metrics of the bound).
    pub fn held(&self) -> (usize, usize) {
        (self.keys.len(), self.names)
    }
}

#[cfg(test)]
mod tests;
