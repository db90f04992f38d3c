//! Typed handles on every map of the object, taken once right after load. The kernel names come
//! from `egress_common::map_names` (the eBPF crate's `maps.rs` documents each map: who writes
//! it, who reads it); nothing else in the controller looks a map up by name.

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
};
use egress_common::{
    BlockKey, BlockValue, Config, ExceptionList, ExeKey, FlowKey, FlowValue, GRANT_SET_BASE,
    GrantKey, GrantValue, LOOKUP_V4_RANGES, Owner, PrefixValue, ProcIdentity, RuleSet, SCOPE_KEYS,
    ScopeBits, map_names,
};

use serde::{Deserialize, Serialize};

use super::{DatapathError, mapped::MappedArray, pins::MapShape};
use crate::policy::{
    compile::{CompiledPolicy, NoTable},
    scopes::CompiledScopes,
};

/// Where a policy buffer's IPv4 destinations are looked up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum V4Lookup {
    /// The range table: lookup cost independent of the number of prefixes.
    Ranges {
        /// `RANGES_V4` entries the policy fills, of `capacity`.
        entries: usize,
        capacity: usize,
    },
    /// The LPM trie (slower as it grows), and why the range table was not used.
    Trie { why: String },
}

/// The datapath's counters (`STATS`), summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub events_lost: u64,
    /// Packets TC dropped (unattributed traffic to blocked destinations).
    pub tc_dropped: u64,
    /// Packets TC would have dropped, in audit mode.
    pub tc_audited: u64,
    /// Packets/bytes not counted under their own flow because the flow map was full.
    pub flows_full_packets: u64,
    pub flows_full_bytes: u64,
    /// Packets TC dropped because their owner is over a byte budget.
    pub budget_dropped: u64,
    /// Processes created by blocked processes that `BLOCK_TREE` had no room for (their
    /// connects escaped the block).
    #[serde(default)]
    pub tree_full: u64,
    /// DNS queries steered to the controller's proxy.
    #[serde(default)]
    pub dns_steered: u64,
    /// connect/sendmsg calls whose socket owner could not be recorded (the owner map was full):
    /// refused in enforce mode (rule `owners-full`).
    #[serde(default)]
    pub owners_full: u64,
}

/// One of the two policy buffers: the tries and the rule sets they point into.
pub(super) struct PolicyBuffer {
    v4: LpmTrie<MapData, [u8; 4], PrefixValue>,
    /// The IPv4 range table (`DIR_V4_n`, `RANGES_V4_n`), mapped.
    dir_v4: MappedArray,
    ranges_v4: MappedArray,
    v6: LpmTrie<MapData, [u8; 16], PrefixValue>,
    rulesets: HashMap<MapData, u32, RuleSet>,
    scope_exe: HashMap<MapData, ExeKey, ScopeBits>,
    scope_uid: HashMap<MapData, u32, ScopeBits>,
    scope_gid: HashMap<MapData, u32, ScopeBits>,
    scope_cg: HashMap<MapData, u64, ScopeBits>,
}

/// Every map of the datapath.
pub(super) struct Maps {
    /// Policy buffers 0 and 1 (`POLICY_V4_n`, `POLICY_V6_n`, `RULESETS_n`).
    pub buffers: [PolicyBuffer; 2],
    /// `CONFIG[n]` describes buffer n.
    pub config: Array<MapData, Config>,
    /// The buffer in force.
    pub active: Array<MapData, u32>,
    pub stats: PerCpuArray<MapData, u64>,
    pub flows: PerCpuHashMap<MapData, FlowKey, FlowValue>,
    pub owners: HashMap<MapData, u64, Owner>,
    pub comms: HashMap<MapData, u32, [u8; 16]>,
    pub iface_l2: HashMap<MapData, u32, u32>,
    pub blocked: HashMap<MapData, BlockKey, BlockValue>,
    /// Process -> the blocked process whose block covers it.
    pub block_tree: HashMap<MapData, u32, u32>,
    /// DNS grants: (cgroup, address) -> (until, service rule set).
    pub grants: HashMap<MapData, GrantKey, GrantValue>,
    /// Break-glass exceptions: scope -> its exceptions.
    pub exceptions: HashMap<MapData, u64, ExceptionList>,
    /// Process -> executable identity (exec tracker, seeded at start).
    pub procs: HashMap<MapData, u32, ProcIdentity>,
    /// The scope tables' defaults, per buffer and key.
    pub scope_def: Array<MapData, ScopeBits>,
    /// Taken by [`super::Datapath::take_events`].
    pub events: Option<RingBuf<MapData>>,
}

/// The error of a call on map `name`.
pub(super) fn err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Takes map `name` out of the object as its typed handle.
fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(err(name))
}

/// Takes ARRAY map `name` out of the object, mapped into this process.
fn mapped(ebpf: &mut Ebpf, name: &'static str) -> Result<MappedArray, DatapathError> {
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    MappedArray::new(map, name)
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, DatapathError> {
        let mut buffer = |n: usize| -> Result<PolicyBuffer, DatapathError> {
            Ok(PolicyBuffer {
                v4: take(ebpf, map_names::POLICY_V4[n])?,
                dir_v4: mapped(ebpf, map_names::DIR_V4[n])?,
                ranges_v4: mapped(ebpf, map_names::RANGES_V4[n])?,
                v6: take(ebpf, map_names::POLICY_V6[n])?,
                rulesets: take(ebpf, map_names::RULESETS[n])?,
                scope_exe: take(ebpf, map_names::SCOPE_EXE[n])?,
                scope_uid: take(ebpf, map_names::SCOPE_UID[n])?,
                scope_gid: take(ebpf, map_names::SCOPE_GID[n])?,
                scope_cg: take(ebpf, map_names::SCOPE_CG[n])?,
            })
        };
        let buffers = [buffer(0)?, buffer(1)?];
        Ok(Maps {
            buffers,
            config: take(ebpf, map_names::CONFIG)?,
            active: take(ebpf, map_names::ACTIVE)?,
            stats: take(ebpf, map_names::STATS)?,
            flows: take(ebpf, map_names::FLOWS)?,
            owners: take(ebpf, map_names::SOCK_OWNERS)?,
            comms: take(ebpf, map_names::PROC_COMMS)?,
            iface_l2: take(ebpf, map_names::IFACE_L2)?,
            blocked: take(ebpf, map_names::BLOCKED)?,
            block_tree: take(ebpf, map_names::BLOCK_TREE)?,
            grants: take(ebpf, map_names::GRANTS)?,
            exceptions: take(ebpf, map_names::EXCEPTIONS)?,
            procs: take(ebpf, map_names::PROCS)?,
            scope_def: take(ebpf, map_names::SCOPE_DEF)?,
            events: Some(take(ebpf, map_names::EVENTS)?),
        })
    }

    /// The buffer `ACTIVE` points the hooks at: the map, not our memory, says which is live.
    pub fn active(&self) -> Result<u32, DatapathError> {
        Ok(self.active.get(&0, 0).map_err(err(map_names::ACTIVE))? & 1)
    }

    /// Points the hooks at buffer `buf`: one 4-byte array write, atomic for every reader.
    pub fn set_active(&mut self, buf: u32) -> Result<(), DatapathError> {
        self.active.set(0, buf, 0).map_err(err(map_names::ACTIVE))
    }

    pub fn config(&self, buf: u32) -> Result<Config, DatapathError> {
        self.config.get(&buf, 0).map_err(err(map_names::CONFIG))
    }

    pub fn set_config(&mut self, buf: u32, config: Config) -> Result<(), DatapathError> {
        let config = Config {
            buffer: buf,
            ..config
        };
        self.config
            .set(buf, config, 0)
            .map_err(err(map_names::CONFIG))
    }

    /// Fills policy buffer `buf` with `policy`: clears what it held, writes the rule sets, then
    /// the IPv4 range table (or, for a policy it has no room for, the IPv4 trie), the IPv6
    /// trie, the scope tables, then the buffer's config (which says which IPv4 structure to
    /// read). The hooks never read this buffer until `ACTIVE` points at it. Returns which
    /// structure IPv4 destinations are looked up in.
    pub fn write_buffer(
        &mut self,
        buf: u32,
        policy: &CompiledPolicy,
        config: Config,
    ) -> Result<V4Lookup, DatapathError> {
        let b = &mut self.buffers[buf as usize];
        // Tries first (they reference the rule sets), then the rule sets, are emptied.
        fill_trie(
            &mut b.v4,
            map_names::POLICY_V4[buf as usize],
            std::iter::empty(),
        )?;
        fill_trie(
            &mut b.v6,
            map_names::POLICY_V6[buf as usize],
            std::iter::empty(),
        )?;
        let name = map_names::RULESETS[buf as usize];
        let old: Vec<u32> = b.rulesets.keys().filter_map(Result::ok).collect();
        for k in &old {
            let _ = b.rulesets.remove(k);
        }
        for (i, set) in policy.rulesets.iter().enumerate() {
            b.rulesets.insert(i as u32, set, 0).map_err(err(name))?;
        }
        // The rule sets of `hosts` services, under keys that stay the same across reloads
        // (grants point at them).
        for h in &policy.host_sets {
            b.rulesets
                .insert(GRANT_SET_BASE | h.slot, h.set, 0)
                .map_err(err(name))?;
        }
        let lookup = match policy.v4_ranges() {
            Ok(t) if t.range_entries() <= b.ranges_v4.entries() as usize => {
                b.ranges_v4.write(t.range_bytes())?;
                b.dir_v4.write(t.dir_bytes())?;
                V4Lookup::Ranges {
                    entries: t.range_entries(),
                    capacity: b.ranges_v4.entries() as usize,
                }
            }
            table => {
                let v4 = policy
                    .v4
                    .iter()
                    .map(|(&(net, len), &set)| (Key::new(u32::from(len), net.to_be_bytes()), set));
                fill_trie(&mut b.v4, map_names::POLICY_V4[buf as usize], v4)?;
                V4Lookup::Trie {
                    why: match table {
                        Ok(t) => format!(
                            "its range table needs {} entries, the kernel's has room for {} (restart with a larger --prefix-capacity)",
                            t.range_entries(),
                            b.ranges_v4.entries()
                        ),
                        Err(NoTable::TooManySets(n)) => {
                            format!("it has more rule sets ({n}+) than the range table can name")
                        }
                    },
                }
            }
        };
        let v6 = policy
            .v6
            .iter()
            .map(|(&(net, len), &set)| (Key::new(u32::from(len), net.to_be_bytes()), set));
        fill_trie(&mut b.v6, map_names::POLICY_V6[buf as usize], v6)?;
        self.write_scopes(buf, &policy.scopes)?;
        let config = Config {
            scope_keys: policy.scopes.keys,
            scope_cg_levels: policy.scopes.cg_levels,
            lookup: match lookup {
                V4Lookup::Ranges { .. } => LOOKUP_V4_RANGES,
                V4Lookup::Trie { .. } => 0,
            },
            ..config
        };
        self.set_config(buf, config)?;
        Ok(lookup)
    }

    /// Makes the `SCOPE_CG` table of buffer `buf` hold exactly `table`, in place: new and
    /// changed entries first, then the ones gone, each write atomic for a reader (for the
    /// buffer in force: the cgroups of pods that come and go).
    pub fn update_cgroup_scopes(
        &mut self,
        buf: u32,
        table: &std::collections::BTreeMap<u64, ScopeBits>,
    ) -> Result<(), DatapathError> {
        let name = map_names::SCOPE_CG[buf as usize];
        let map = &mut self.buffers[buf as usize].scope_cg;
        for (k, v) in table {
            if map.get(k, 0).ok().as_ref() != Some(v) {
                map.insert(k, v, 0).map_err(err(name))?;
            }
        }
        let gone: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !table.contains_key(k))
            .collect();
        for k in &gone {
            let _ = map.remove(k);
        }
        Ok(())
    }

    /// Fills the scope tables of buffer `buf` (cleared first) and its defaults.
    fn write_scopes(&mut self, buf: u32, s: &CompiledScopes) -> Result<(), DatapathError> {
        let i = buf as usize;
        let b = &mut self.buffers[i];
        refill(&mut b.scope_exe, map_names::SCOPE_EXE[i], &s.exe)?;
        refill(&mut b.scope_uid, map_names::SCOPE_UID[i], &s.uid)?;
        refill(&mut b.scope_gid, map_names::SCOPE_GID[i], &s.gid)?;
        refill(&mut b.scope_cg, map_names::SCOPE_CG[i], &s.cgroup)?;
        for (key, bits) in s.defaults.iter().enumerate() {
            self.scope_def
                .set(buf * SCOPE_KEYS + key as u32, *bits, 0)
                .map_err(err(map_names::SCOPE_DEF))?;
        }
        Ok(())
    }

    /// Kernel memory charged to the IPv4 (`family` 4: range tables and tries) or IPv6 (tries)
    /// lookup structures of both policy buffers: what holding a policy costs, double buffering
    /// included.
    pub fn lookup_memlock(&self, family: u8) -> Option<u64> {
        use aya::maps::IterableMap as _;
        let mut total = 0;
        for b in &self.buffers {
            if family == 4 {
                total += memlock(b.v4.map())? + memlock(b.dir_v4.map())?;
                total += memlock(b.ranges_v4.map())?;
            } else {
                total += memlock(b.v6.map())?;
            }
        }
        Some(total)
    }
}

/// Empties a policy trie, then inserts `entries`.
fn fill_trie<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, PrefixValue>,
    name: &'static str,
    entries: impl Iterator<Item = (Key<K>, u32)>,
) -> Result<(), DatapathError> {
    let old: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for k in &old {
        let _ = trie.remove(k);
    }
    for (key, set) in entries {
        trie.insert(&key, PrefixValue { ruleset: set }, 0)
            .map_err(err(name))?;
    }
    Ok(())
}

/// `memlock` of a map's fdinfo: the kernel memory charged to it.
fn memlock(map: &MapData) -> Option<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The `STATS` counters summed over all CPUs. Shared by a running datapath and by `egress
/// status` reading the pins, so both report the same counters.
pub(super) fn sum_stats(stats: &PerCpuArray<MapData, u64>) -> Result<Counters, DatapathError> {
    use egress_common::*;
    let sum = |i: u32| -> Result<u64, DatapathError> {
        Ok(stats
            .get(&i, 0)
            .map_err(err(map_names::STATS))?
            .iter()
            .sum())
    };
    Ok(Counters {
        allowed: sum(STAT_ALLOWED)?,
        denied: sum(STAT_DENIED)?,
        audited: sum(STAT_AUDITED)?,
        events_lost: sum(STAT_EVENTS_LOST)?,
        tc_dropped: sum(STAT_TC_DROPPED)?,
        tc_audited: sum(STAT_TC_AUDITED)?,
        flows_full_packets: sum(STAT_FLOWS_FULL_PACKETS)?,
        flows_full_bytes: sum(STAT_FLOWS_FULL_BYTES)?,
        budget_dropped: sum(STAT_BUDGET_DROPPED)?,
        tree_full: sum(STAT_TREE_FULL)?,
        dns_steered: sum(STAT_DNS_STEERED)?,
        owners_full: sum(STAT_OWNERS_FULL)?,
    })
}

/// Empties a hash map and writes `entries` into it.
fn refill<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, ScopeBits>,
    name: &'static str,
    entries: &std::collections::BTreeMap<K, ScopeBits>,
) -> Result<(), DatapathError> {
    let old: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in &old {
        let _ = map.remove(k);
    }
    for (k, v) in entries {
        map.insert(k, v, 0).map_err(err(name))?;
    }
    Ok(())
}

/// Opens a pinned map as its typed handle (`egress status` without a controller).
pub(super) fn open_pinned<T: TryFrom<Map, Error = MapError>>(
    path: &std::path::Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, DatapathError> {
    let data = MapData::from_pin(path).map_err(err(name))?;
    T::try_from(wrap(data)).map_err(err(name))
}

/// The shape of every map of the object, as this controller creates them: map type, key size,
/// value size and max entries (the loader's overrides included, `owners` for `SOCK_OWNERS`), by
/// name.
pub(super) fn expected_maps(
    owners: u32,
    range_entries: u32,
) -> Result<std::collections::HashMap<String, MapShape>, DatapathError> {
    let obj = aya_obj::Object::parse(super::EBPF_OBJECT)
        .map_err(|e| DatapathError::Pin(format!("parsing the embedded object: {e}")))?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, _)| map_names::ALL.contains(&name.as_str()))
        .map(|(name, m)| {
            let max_entries = if map_names::POLICY_V4.contains(&name.as_str())
                || map_names::POLICY_V6.contains(&name.as_str())
            {
                super::POLICY_CAPACITY
            } else if map_names::RULESETS.contains(&name.as_str()) {
                super::RULESET_CAPACITY
            } else if name == map_names::GRANTS {
                super::GRANT_CAPACITY
            } else if name == map_names::SOCK_OWNERS {
                owners
            } else if map_names::RANGES_V4.contains(&name.as_str()) {
                range_entries
            } else {
                m.max_entries()
            };
            let shape = MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
            };
            (name.clone(), shape)
        })
        .collect())
}
