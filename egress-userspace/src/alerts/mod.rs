//! High-volume transfer detection: sliding-window byte counts per alert key, de-duplicated
//! firings with the evidence a responder needs. Pure: fed with per-tick flow deltas, it knows
//! nothing of the kernel (the controller applies `block` actions and delivers the events).
//!
//! `per = "executable"` counts every process running one executable together, keyed by the
//! executable's full path as the accounting read it from `/proc/PID/exe`. A process whose
//! executable could not be read (it exited before the controller looked) is counted under its
//! process name instead, as `executable:comm:NAME`: its bytes still count towards an alert, but
//! a name is not an identity (any process can take any name), so such a key is never blocked.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use egress_common::{FlowKey, FlowValue, TGID_UNATTRIBUTED};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use egress_common::user::protocol_name;

use crate::{
    policy::alert::{Alert, AlertAction, AlertPer},
    sys::proc::ProcInfo,
};

/// Byte counts over a sliding window, kept in buckets of `window / 240` (at least 100 ms, at
/// most `window / 10`): the sum
/// covers exactly the last `window` to within one bucket, unlike fixed windows that reset and
/// miss a transfer split across two of them.
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    bucket: Duration,
    buckets: usize,
    /// (bucket index, bytes), oldest first.
    data: VecDeque<(u64, u64)>,
    sum: u64,
}

impl SlidingWindow {
    pub fn new(window: Duration) -> SlidingWindow {
        // At least 10 buckets per window, so short windows slide too.
        let bucket = (window / 240)
            .max(Duration::from_millis(100))
            .min(window / 10);
        let buckets = (window.as_nanos() / bucket.as_nanos()).max(1) as usize;
        SlidingWindow {
            bucket,
            buckets,
            data: VecDeque::new(),
            sum: 0,
        }
    }

    fn index(&self, since_epoch: Duration) -> u64 {
        (since_epoch.as_nanos() / self.bucket.as_nanos()) as u64
    }

    fn expire(&mut self, now_idx: u64) {
        while let Some(&(idx, bytes)) = self.data.front() {
            if idx + (self.buckets as u64) <= now_idx {
                self.data.pop_front();
                self.sum -= bytes;
            } else {
                break;
            }
        }
    }

    /// Adds bytes seen at `since_epoch` (monotonic, non-decreasing across calls).
    pub fn add(&mut self, since_epoch: Duration, bytes: u64) {
        let idx = self.index(since_epoch);
        self.expire(idx);
        match self.data.back_mut() {
            Some((last, b)) if *last == idx => *b += bytes,
            _ => self.data.push_back((idx, bytes)),
        }
        self.sum += bytes;
    }

    /// Bytes within the window ending at `since_epoch`.
    pub fn sum(&mut self, since_epoch: Duration) -> u64 {
        let idx = self.index(since_epoch);
        self.expire(idx);
        self.sum
    }
}

/// What an alert counts traffic by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AlertKey {
    Process(u32),
    Destination(IpAddr),
    ProcessDestination(u32, IpAddr),
    /// Every process of one uid.
    User(u32),
    Cgroup(u64),
    /// Every process running one executable.
    Executable(ExeName),
}

/// How `per = "executable"` names the processes it counts together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExeName {
    /// The executable's full path (always starts with `/`).
    Path(String),
    /// The process name of processes whose executable could not be read.
    Comm(String),
}

impl ExeName {
    /// The executable path, when the key has one (a name-only key cannot be blocked).
    pub fn path(&self) -> Option<&str> {
        match self {
            ExeName::Path(p) => Some(p),
            ExeName::Comm(_) => None,
        }
    }

    /// The `per = "executable"` name of a process: its executable, else its process name; None
    /// when neither is known.
    pub fn of(info: &ProcInfo) -> Option<ExeName> {
        match &info.exe {
            Some(exe) if !exe.is_empty() => Some(ExeName::Path(exe.clone())),
            _ if !info.comm.is_empty() => Some(ExeName::Comm(info.comm.clone())),
            _ => None,
        }
    }
}

impl AlertKey {
    /// The text form used in events and by `egress unblock`.
    pub fn text(&self) -> String {
        match self {
            AlertKey::Process(p) => format!("process:{p}"),
            AlertKey::Destination(d) => format!("destination:{d}"),
            AlertKey::ProcessDestination(p, d) => format!("process_destination:{p}->{d}"),
            AlertKey::User(u) => format!("user:{u}"),
            AlertKey::Cgroup(c) => format!("cgroup:{c}"),
            AlertKey::Executable(ExeName::Path(p)) => format!("executable:{p}"),
            AlertKey::Executable(ExeName::Comm(c)) => format!("executable:comm:{c}"),
        }
    }

    /// Parses the text form; a bare number is a process.
    pub fn parse(s: &str) -> Result<AlertKey, String> {
        let expected = "expected process:PID, process_destination:PID->ADDR, user:UID, executable:PATH, destination:ADDR or cgroup:ID";
        let bad = || format!("`{s}` is not an alert key: {expected}");
        if let Ok(pid) = s.parse::<u32>() {
            return Ok(AlertKey::Process(pid));
        }
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "process" => rest.parse().map(AlertKey::Process).map_err(|_| bad()),
            "destination" => rest.parse().map(AlertKey::Destination).map_err(|_| bad()),
            "cgroup" => rest.parse().map(AlertKey::Cgroup).map_err(|_| bad()),
            "user" => rest.parse().map(AlertKey::User).map_err(|_| bad()),
            "executable" => match rest.strip_prefix("comm:") {
                Some(comm) if !comm.is_empty() => {
                    Ok(AlertKey::Executable(ExeName::Comm(comm.into())))
                }
                None if rest.starts_with('/') => {
                    Ok(AlertKey::Executable(ExeName::Path(rest.into())))
                }
                _ => Err(bad()),
            },
            "process_destination" => {
                let (p, d) = rest.split_once("->").ok_or_else(bad)?;
                Ok(AlertKey::ProcessDestination(
                    p.parse().map_err(|_| bad())?,
                    d.parse().map_err(|_| bad())?,
                ))
            }
            _ => Err(bad()),
        }
    }

    /// The process a key is about, if it is about one.
    pub fn tgid(&self) -> Option<u32> {
        match self {
            AlertKey::Process(p) | AlertKey::ProcessDestination(p, _) => Some(*p),
            _ => None,
        }
    }
}

/// One destination in an alert's evidence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopDestination {
    pub dst: String,
    pub port: u16,
    pub protocol: String,
    pub bytes: u64,
}

/// An alert, as written to the event stream and POSTed to the webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertEvent {
    pub ts: String,
    /// Always `"alert"`.
    pub event: String,
    #[serde(flatten, default)]
    pub meta: crate::events::EventMeta,
    /// The alert rule (as `alert_rule`; kept for compatibility).
    pub rule: String,
    /// The alert rule that fired (`[[alert]] name`).
    #[serde(default)]
    pub alert_rule: String,
    pub key: String,
    pub per: String,
    /// Payload bytes within the window when the alert fired.
    pub bytes_in_window: u64,
    pub threshold: u64,
    /// The window as written in the policy ("5m").
    pub window: String,
    pub window_secs: f64,
    /// Bytes per second over the key's activity within the window.
    pub rate: f64,
    /// The process (for per = destination/cgroup: the one that sent most under the key).
    pub pid: Option<u32>,
    pub ppid: Option<u32>,
    pub comm: String,
    /// The process's executable (full path); empty when it could not be read.
    pub exe: String,
    pub cmdline: String,
    pub uid: Option<u32>,
    /// The name of `uid` (NSS), when it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    /// The process's real gid.
    #[serde(default)]
    pub gid: Option<u32>,
    pub cgroup_id: u64,
    pub cgroup_path: String,
    /// The pod, container and node of `cgroup_id`, when it is a known pod's (filled in by the
    /// controller; absent otherwise).
    #[serde(flatten, default)]
    pub pod: crate::kube::PodMeta,
    pub top_destinations: Vec<TopDestination>,
    pub first_seen: String,
    pub last_seen: String,
    /// `"alert"`, or `"block"` when the key was blocked in the kernel.
    pub action: AlertAction,
    /// End of the block (`action = "block"`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub blocked_until: Option<String>,
    /// For `per = "executable"` blocks: the processes running the executable that were
    /// blocked (each as `process:PID`, with what it forks afterwards).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub blocked_pids: Vec<u32>,
    /// A DNS alert's evidence (absent for byte alerts).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsEvidence>,
}

/// What a DNS alert saw under its key, within its window. For a DNS alert the event's
/// `bytes_in_window` is `dns_bytes`, `threshold` the `dns_bytes` threshold (0 when none), and
/// `top_destinations` is empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DnsEvidence {
    /// Always `"dns"`.
    pub kind: String,
    /// The registered domain (eTLD+1) the names were asked under.
    pub domain: String,
    /// Distinct subdomains under it within the window.
    pub unique_subdomains: u64,
    /// Bytes of query names under it within the window.
    pub dns_bytes: u64,
    /// Queries with a subdomain within the window.
    pub dns_queries: u64,
    /// Mean Shannon entropy of those subdomains, bits per character.
    pub entropy: f64,
    /// The window in seconds.
    pub window_s: f64,
    /// The thresholds reached: `dns_unique_subdomains`, `dns_bytes`, `dns_entropy`.
    pub reasons: Vec<String>,
    /// The alert's thresholds (absent when not set).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub threshold_unique_subdomains: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub threshold_entropy: Option<f64>,
    /// A few of the last names asked under the key.
    pub sample_names: Vec<String>,
}

/// A flow's policy verdict, as the alert filters need it.
pub struct FlowVerdict {
    /// Name of the deciding service or block, `default` or `loopback`.
    pub rule: String,
    /// A service approved it.
    pub approved_by_service: bool,
}

#[derive(Debug)]
struct KeyState {
    window: SlidingWindow,
    dests: HashMap<(IpAddr, u16, u8), SlidingWindow>,
    /// Bytes per process under the key (for keys not about one process).
    by_tgid: HashMap<u32, u64>,
    cgroup_id: u64,
    first_seen: SystemTime,
    first_seen_mono: Instant,
    last_seen: SystemTime,
    last_seen_mono: Instant,
}

/// An alert to deliver, and for `block`, the key to block until when.
#[derive(Debug, Clone)]
pub struct Firing {
    pub alert_index: usize,
    pub key: AlertKey,
    pub event: AlertEvent,
    pub block_for: Option<Duration>,
}

pub struct AlertEngine {
    alerts: Vec<Alert>,
    epoch: Instant,
    states: HashMap<(usize, AlertKey), KeyState>,
    last_fired: HashMap<(usize, AlertKey), Instant>,
}

fn contains(nets: &[crate::policy::Destination], ip: IpAddr) -> bool {
    nets.iter().any(|d| match (d.network(), ip) {
        (IpNetwork::V4(n), IpAddr::V4(a)) => n.contains(a),
        (IpNetwork::V6(n), IpAddr::V6(a)) => n.contains(a),
        _ => false,
    })
}

impl AlertEngine {
    pub fn new(alerts: Vec<Alert>, epoch: Instant) -> AlertEngine {
        AlertEngine {
            alerts,
            epoch,
            states: HashMap::new(),
            last_fired: HashMap::new(),
        }
    }

    /// Whether no byte alert is there to count (DNS alerts are the DNS proxy's).
    pub fn is_empty(&self) -> bool {
        self.alerts.iter().all(Alert::is_dns)
    }

    fn counts(
        alert: &Alert,
        key: &FlowKey,
        dst: IpAddr,
        verdict: &dyn Fn(&FlowKey) -> FlowVerdict,
    ) -> bool {
        if !alert.destinations.is_empty() && !contains(&alert.destinations, dst) {
            return false;
        }
        if contains(&alert.exclude_destinations, dst) {
            return false;
        }
        if !alert.services.is_empty() || alert.unapproved_only {
            let v = verdict(key);
            if !alert.services.is_empty() && !alert.services.contains(&v.rule) {
                return false;
            }
            if alert.unapproved_only && v.approved_by_service {
                return false;
            }
        }
        true
    }

    /// Folds one tick of flow deltas in and returns the alerts that fire now. `wall` is the wall
    /// clock at `now`; `info` describes a process. `cgroup_path` is left for the caller to fill
    /// (it reads /proc).
    pub fn observe(
        &mut self,
        deltas: &[(FlowKey, FlowValue)],
        now: Instant,
        wall: SystemTime,
        verdict: &dyn Fn(&FlowKey) -> FlowVerdict,
        info: &dyn Fn(u32) -> ProcInfo,
    ) -> Vec<Firing> {
        let t = now.saturating_duration_since(self.epoch);
        let mut touched: Vec<(usize, AlertKey)> = Vec::new();
        for (key, delta) in deltas {
            if delta.payload == 0 {
                continue;
            }
            let dst = key.dst();
            for (i, alert) in self.alerts.iter().enumerate() {
                if alert.is_dns() || !Self::counts(alert, key, dst, verdict) {
                    continue;
                }
                let akey = match alert.per {
                    AlertPer::Process if key.tgid != TGID_UNATTRIBUTED => {
                        AlertKey::Process(key.tgid)
                    }
                    AlertPer::ProcessDestination if key.tgid != TGID_UNATTRIBUTED => {
                        AlertKey::ProcessDestination(key.tgid, dst)
                    }
                    AlertPer::User if key.tgid != TGID_UNATTRIBUTED => match info(key.tgid).uid {
                        Some(uid) => AlertKey::User(uid),
                        // A process whose user nobody knows cannot be counted for one.
                        None => continue,
                    },
                    AlertPer::Executable if key.tgid != TGID_UNATTRIBUTED => {
                        match ExeName::of(&info(key.tgid)) {
                            Some(name) => AlertKey::Executable(name),
                            None => continue,
                        }
                    }
                    AlertPer::Destination => AlertKey::Destination(dst),
                    AlertPer::Cgroup => AlertKey::Cgroup(key.cgroup_id),
                    // Unattributed traffic has no process to alert on or block.
                    _ => continue,
                };
                let st = self
                    .states
                    .entry((i, akey.clone()))
                    .or_insert_with(|| KeyState {
                        window: SlidingWindow::new(alert.window),
                        dests: HashMap::new(),
                        by_tgid: HashMap::new(),
                        cgroup_id: key.cgroup_id,
                        first_seen: wall,
                        first_seen_mono: now,
                        last_seen: wall,
                        last_seen_mono: now,
                    });
                if st.window.sum(t) == 0 {
                    // The window had emptied: a new episode starts.
                    st.first_seen = wall;
                    st.first_seen_mono = now;
                    st.by_tgid.clear();
                }
                st.window.add(t, delta.payload);
                st.dests
                    .entry((dst, key.port, key.protocol))
                    .or_insert_with(|| SlidingWindow::new(alert.window))
                    .add(t, delta.payload);
                *st.by_tgid.entry(key.tgid).or_default() += delta.payload;
                st.last_seen = wall;
                st.last_seen_mono = now;
                touched.push((i, akey));
            }
        }
        touched.sort_by_key(|(i, k)| (*i, k.text()));
        touched.dedup();

        let mut out = Vec::new();
        for (i, akey) in touched {
            let alert = &self.alerts[i];
            let Some(st) = self.states.get_mut(&(i, akey.clone())) else {
                continue;
            };
            let in_window = st.window.sum(t);
            if in_window < alert.bytes {
                continue;
            }
            if self
                .last_fired
                .get(&(i, akey.clone()))
                .is_some_and(|&last| now.duration_since(last) < alert.cooldown)
            {
                continue;
            }
            self.last_fired.insert((i, akey.clone()), now);
            let pid = akey
                .tgid()
                .or_else(|| st.by_tgid.iter().max_by_key(|(_, b)| **b).map(|(p, _)| *p));
            let pinfo = pid.map(info).unwrap_or_default();
            let mut top: Vec<TopDestination> = st
                .dests
                .iter_mut()
                .map(|((d, port, proto), w)| TopDestination {
                    dst: d.to_string(),
                    port: *port,
                    protocol: protocol_name(*proto),
                    bytes: w.sum(t),
                })
                .filter(|d| d.bytes > 0)
                .collect();
            top.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.dst.cmp(&b.dst)));
            top.truncate(5);
            let active = st
                .last_seen_mono
                .duration_since(st.first_seen_mono)
                .as_secs_f64()
                .max(1.0);
            let block_for = (alert.action == AlertAction::Block).then_some(alert.cooldown);
            let event = AlertEvent {
                ts: humantime::format_rfc3339_nanos(wall).to_string(),
                event: "alert".into(),
                meta: crate::events::EventMeta::current(),
                rule: alert.name.clone(),
                alert_rule: alert.name.clone(),
                key: akey.text(),
                per: alert.per.as_str().into(),
                bytes_in_window: in_window,
                threshold: alert.bytes,
                window: alert.window_text(),
                window_secs: alert.window.as_secs_f64(),
                rate: in_window as f64 / active.min(alert.window.as_secs_f64()),
                pid,
                ppid: pinfo.ppid,
                comm: pinfo.comm,
                exe: pinfo.exe.unwrap_or_default(),
                cmdline: pinfo.cmdline,
                uid: pinfo.uid,
                user: None,
                gid: pinfo.gid,
                cgroup_id: st.cgroup_id,
                cgroup_path: String::new(),
                pod: crate::kube::PodMeta::default(),
                top_destinations: top,
                first_seen: humantime::format_rfc3339_nanos(st.first_seen).to_string(),
                last_seen: humantime::format_rfc3339_nanos(st.last_seen).to_string(),
                action: alert.action,
                blocked_until: block_for
                    .map(|d| humantime::format_rfc3339_nanos(wall + d).to_string()),
                blocked_pids: Vec::new(),
                dns: None,
            };
            out.push(Firing {
                alert_index: i,
                key: akey,
                event,
                block_for,
            });
        }
        // Keys idle for a whole window carry nothing; forget them (their cooldown stays).
        self.states.retain(|_, st| st.window.sum(t) > 0);
        let max_cooldown = self
            .alerts
            .iter()
            .map(|a| a.cooldown)
            .max()
            .unwrap_or_default();
        self.last_fired
            .retain(|_, at| now.duration_since(*at) < max_cooldown);
        out
    }
}

#[cfg(test)]
mod tests;
