//! Per-process egress totals, built from the kernel's cumulative per-flow counters.
//!
//! Every tick the controller reads `FLOWS` and hands the counters to [`Accounting::tick`], which
//! turns them into deltas, adds them to per-process and per-destination totals, computes rates,
//! and notices processes that have exited. Their flow keys are returned so that the controller
//! deletes them from the kernel map (keeping it bounded); their totals stay in the table for
//! [`Accounting::retention`], so a short-lived upload still shows.
//! Process details (exe, cmdline, uid, gid) come from /proc while the process lives, through the
//! [`ProcSource`] trait so that this module is unit-tested without a kernel. They are read once,
//! when a process is first seen, and kept with its start time: a pid that another process holds
//! now (the kernel reuses pids) starts a new entry instead of inheriting the old one's name.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use egress_common::{FlowKey, FlowValue, TGID_UNATTRIBUTED};
use serde::{Deserialize, Serialize};

use egress_common::user::protocol_name;

use crate::sys::proc::{ProcInfo, ProcSource};

/// Totals towards one destination.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestTotals {
    pub dst: String,
    pub port: u16,
    pub protocol: String,
    pub bytes: u64,
    pub packets: u64,
    pub payload_bytes: u64,
    /// Bytes per second, smoothed over about two seconds.
    pub rate_bps: f64,
}

/// Totals of one process (or of the unattributed owner).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcTotals {
    /// 0 for the unattributed owner.
    pub pid: u32,
    pub comm: String,
    /// The full path of the executable (a ` (deleted)` suffix kept as the kernel gives it);
    /// empty when it could not be read (the process exited before the controller looked).
    pub exe: String,
    pub cmdline: String,
    pub uid: Option<u32>,
    /// Real gid.
    #[serde(default)]
    pub gid: Option<u32>,
    pub ppid: Option<u32>,
    pub cgroup_id: u64,
    /// The pod, container and node of `cgroup_id`, when it is a known pod's (filled in by the
    /// controller; absent otherwise).
    #[serde(flatten, default)]
    pub pod: crate::kube::PodMeta,
    /// Traffic whose socket had no recorded owner.
    pub unattributed: bool,
    pub alive: bool,
    pub bytes: u64,
    pub packets: u64,
    pub payload_bytes: u64,
    pub rate_bps: f64,
    /// Sorted by bytes, largest first.
    pub destinations: Vec<DestTotals>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct DestKey {
    addr: IpAddr,
    port: u16,
    protocol: u8,
}

#[derive(Debug, Default, Clone)]
struct Counter {
    total: FlowValue,
    rate: f64,
    /// Bytes added during the current tick.
    tick_bytes: u64,
}

impl Counter {
    fn add(&mut self, d: &FlowValue) {
        self.total.packets += d.packets;
        self.total.bytes += d.bytes;
        self.total.payload += d.payload;
        self.tick_bytes += d.bytes;
    }

    /// Exponentially weighted rate with a time constant of `TAU`.
    fn close_tick(&mut self, dt: f64) {
        if dt > 0.0 {
            let inst = self.tick_bytes as f64 / dt;
            let alpha = 1.0 - (-dt / TAU).exp();
            self.rate += alpha * (inst - self.rate);
        }
        self.tick_bytes = 0;
    }
}

const TAU: f64 = 2.0;

/// Readings without change after which a flow's kernel counter is deleted.
pub const IDLE_TICKS: u32 = 40;

#[derive(Debug)]
struct ProcState {
    info: ProcInfo,
    cgroup_id: u64,
    alive: bool,
    exited_at: Option<Instant>,
    counter: Counter,
    dests: HashMap<DestKey, Counter>,
}

/// The result of one [`Accounting::tick`].
#[derive(Debug, Default)]
pub struct TickOutcome {
    /// Flow keys to delete from the kernel map: those of exited processes, and flows idle for
    /// [`IDLE_TICKS`] readings. Both are fully counted; a later packet recreates its key and is
    /// counted from zero.
    pub prune: Vec<FlowKey>,
    /// Counter increases since the previous reading.
    pub deltas: Vec<(FlowKey, FlowValue)>,
}

/// Per-process totals.
#[derive(Debug)]
pub struct Accounting {
    procs: BTreeMap<u32, ProcState>,
    /// Last cumulative value seen per kernel flow key.
    last: HashMap<FlowKey, (FlowValue, u32)>,
    last_tick: Option<Instant>,
    /// How long an exited process stays in the table.
    pub retention: Duration,
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            procs: BTreeMap::new(),
            last: HashMap::new(),
            last_tick: None,
            retention: Duration::from_secs(300),
        }
    }
}

impl Accounting {
    pub fn new() -> Accounting {
        Accounting::default()
    }

    /// Folds one reading of the kernel counters in. `owner_comm` names processes that exited
    /// before /proc could be read (from the kernel's socket-owner records). Returns what changed
    /// since the last reading, and the flow keys to delete from the kernel map: those of processes
    /// that have exited, now fully counted.
    pub fn tick(
        &mut self,
        flows: &[(FlowKey, FlowValue)],
        now: Instant,
        procs: &dyn ProcSource,
        owner_comm: &dyn Fn(u32) -> Option<String>,
    ) -> TickOutcome {
        let mut deltas = Vec::new();
        // Start times read this tick: one /proc read per process at most.
        let mut starts: HashMap<u32, Option<u64>> = HashMap::new();
        let mut start_of =
            |tgid: u32| *starts.entry(tgid).or_insert_with(|| procs.start_time(tgid));
        for (key, value) in flows {
            let (prev, idle) = self.last.get(key).copied().unwrap_or_default();
            // A counter below its last value was deleted and recreated: all of it is new.
            let delta = if value.packets < prev.packets {
                *value
            } else {
                FlowValue {
                    packets: value.packets - prev.packets,
                    bytes: value.bytes.saturating_sub(prev.bytes),
                    payload: value.payload.saturating_sub(prev.payload),
                }
            };
            if delta.packets == 0 && delta.bytes == 0 {
                self.last.insert(*key, (*value, idle + 1));
                continue;
            }
            self.last.insert(*key, (*value, 0));
            deltas.push((*key, delta));
            // A pid seen again after its process exited, or held by a process that started
            // later, belongs to a new process now.
            if key.tgid != TGID_UNATTRIBUTED
                && let Some(p) = self.procs.get(&key.tgid)
                && let Some(start) = start_of(key.tgid)
                && (!p.alive || p.info.start_time.is_some_and(|s| s != start))
            {
                self.procs.remove(&key.tgid);
            }
            let state = self.procs.entry(key.tgid).or_insert_with(|| {
                let (info, alive) = if key.tgid == TGID_UNATTRIBUTED {
                    (
                        ProcInfo {
                            comm: "[unattributed]".into(),
                            ..ProcInfo::default()
                        },
                        true,
                    )
                } else {
                    match procs.info(key.tgid) {
                        Some(i) => {
                            let alive = start_of(key.tgid).is_some();
                            (i, alive)
                        }
                        None => (
                            ProcInfo {
                                comm: owner_comm(key.tgid).unwrap_or_default(),
                                ..ProcInfo::default()
                            },
                            false,
                        ),
                    }
                };
                ProcState {
                    info,
                    cgroup_id: key.cgroup_id,
                    alive,
                    exited_at: if alive { None } else { Some(now) },
                    counter: Counter::default(),
                    dests: HashMap::new(),
                }
            });
            state.counter.add(&delta);
            state
                .dests
                .entry(DestKey {
                    addr: key.dst(),
                    port: key.port,
                    protocol: key.protocol,
                })
                .or_default()
                .add(&delta);
        }

        let dt = self
            .last_tick
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last_tick = Some(now);
        for (&tgid, st) in self.procs.iter_mut() {
            st.counter.close_tick(dt);
            st.dests.values_mut().for_each(|c| c.close_tick(dt));
            if st.alive && tgid != TGID_UNATTRIBUTED {
                let same = match (start_of(tgid), st.info.start_time) {
                    (None, _) => false,
                    (Some(now), Some(then)) => now == then,
                    (Some(_), None) => true,
                };
                if !same {
                    st.alive = false;
                    st.exited_at = Some(now);
                }
            }
        }

        // Flows of exited processes are fully counted: delete them from the kernel. A late packet
        // (data still in a dead process's socket buffer) recreates its key and is counted anew.
        // Keep the kernel map bounded: delete what is fully counted and will not move again
        // (exited owners), or has not moved for a while (idle flows, unattributed ones included).
        let prune: Vec<FlowKey> = self
            .last
            .iter()
            .filter(|(k, (_, idle))| {
                *idle >= IDLE_TICKS || self.procs.get(&k.tgid).is_some_and(|p| !p.alive)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &prune {
            self.last.remove(k);
        }
        let retention = self.retention;
        self.procs.retain(|_, p| {
            p.exited_at
                .is_none_or(|t| now.duration_since(t) < retention)
        });
        TickOutcome { prune, deltas }
    }

    /// Takes `flows` as the starting point without counting them: after adopting a previous
    /// controller's pinned counters, their history is not new traffic (nor a reason to alert).
    pub fn prime(&mut self, flows: &[(FlowKey, FlowValue)]) {
        for (k, v) in flows {
            self.last.insert(*k, (*v, 0));
        }
    }

    /// What /proc said about a process (empty when unknown).
    pub fn info(&self, tgid: u32) -> ProcInfo {
        self.procs
            .get(&tgid)
            .map(|p| p.info.clone())
            .unwrap_or_default()
    }

    /// The live processes read from /proc: tgid, start time and executable.
    pub fn identities(&self) -> impl Iterator<Item = (u32, u64, Option<&str>)> {
        self.procs
            .iter()
            .filter(|(_, p)| p.alive)
            .filter_map(|(&tgid, p)| Some((tgid, p.info.start_time?, p.info.exe.as_deref())))
    }

    /// Every process, highest rate first (then most bytes).
    pub fn snapshot(&self) -> Vec<ProcTotals> {
        let mut out: Vec<ProcTotals> = self
            .procs
            .iter()
            .map(|(&tgid, st)| {
                let mut destinations: Vec<DestTotals> = st
                    .dests
                    .iter()
                    .map(|(k, c)| DestTotals {
                        dst: k.addr.to_string(),
                        port: k.port,
                        protocol: protocol_name(k.protocol),
                        bytes: c.total.bytes,
                        packets: c.total.packets,
                        payload_bytes: c.total.payload,
                        rate_bps: c.rate,
                    })
                    .collect();
                destinations.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.dst.cmp(&b.dst)));
                ProcTotals {
                    pid: tgid,
                    comm: st.info.comm.clone(),
                    exe: st.info.exe.clone().unwrap_or_default(),
                    cmdline: st.info.cmdline.clone(),
                    uid: st.info.uid,
                    gid: st.info.gid,
                    ppid: st.info.ppid,
                    cgroup_id: st.cgroup_id,
                    pod: crate::kube::PodMeta::default(),
                    unattributed: tgid == TGID_UNATTRIBUTED,
                    alive: st.alive,
                    bytes: st.counter.total.bytes,
                    packets: st.counter.total.packets,
                    payload_bytes: st.counter.total.payload,
                    rate_bps: st.counter.rate,
                    destinations,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.rate_bps
                .total_cmp(&a.rate_bps)
                .then_with(|| b.bytes.cmp(&a.bytes))
        });
        out
    }
}

#[cfg(test)]
mod tests;
