//! The only module that touches aya: loads the embedded eBPF object, writes a compiled policy
//! into its maps, attaches the hooks to a cgroup and reads counters and the event ring buffer.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use egress_common::{
    BlockKey, BlockValue, Config, FlowKey, FlowValue, Owner, PrefixValue, RuleSet, STAT_ALLOWED,
    STAT_AUDITED, STAT_BUDGET_DROPPED, STAT_COUNT, STAT_DENIED, STAT_EVENTS_LOST,
    STAT_FLOWS_FULL_BYTES, STAT_FLOWS_FULL_PACKETS, STAT_TC_AUDITED, STAT_TC_DROPPED,
};

use crate::compile::CompiledPolicy;

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The cgroup hooks, by program name in the object.
pub const HOOKS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];
/// The TC egress classifier.
pub const TC_PROGRAM: &str = "tc_egress";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("interface {iface}: {message}")]
    Iface { iface: String, message: String },
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Counters summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
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
}

/// A loaded (and, after [`Datapath::attach`], attached) datapath. Dropping it detaches every
/// hook and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
    config: Config,
}

/// Map capacity for `n` compiled entries: never 0 (the kernel refuses empty maps).
fn capacity(n: usize) -> u32 {
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

impl Datapath {
    /// Loads the programs and writes `policy` into the maps. Nothing is attached yet, so a failure
    /// here changes nothing in the kernel's enforcement.
    pub fn load(policy: &CompiledPolicy) -> Result<Datapath, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("POLICY_V4", capacity(policy.v4.len()))
            .map_max_entries("POLICY_V6", capacity(policy.v6.len()))
            .map_max_entries("RULESETS", capacity(policy.rulesets.len()))
            .load(EBPF_OBJECT)?;
        write_policy(&mut ebpf, policy)?;
        for name in HOOKS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .ok_or(DatapathError::Missing(TC_PROGRAM))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: TC_PROGRAM,
                source,
            })?;
        tc.load().map_err(|source| DatapathError::Program {
            name: TC_PROGRAM,
            source,
        })?;
        Ok(Datapath {
            ebpf,
            config: policy.config,
        })
    }

    /// Restricts the TC program to packets of sockets in `cgroup` (and below). Call before
    /// [`Datapath::attach_tc`]. Not calling it means every packet on the interfaces.
    pub fn set_tc_scope(&mut self, cgroup_id: u64, level: u32) -> Result<(), DatapathError> {
        self.config.tc_cgroup_id = cgroup_id;
        self.config.tc_cgroup_level = level;
        let map = self
            .ebpf
            .map_mut("CONFIG")
            .ok_or(DatapathError::Missing("CONFIG map"))?;
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(map_err("CONFIG"))?;
        config.set(0, self.config, 0).map_err(map_err("CONFIG"))
    }

    /// Attaches the TC egress program to each interface: TCX on kernels with it (6.6+), else a
    /// clsact qdisc filter. Other programs on the interface keep running.
    pub fn attach_tc(&mut self, ifaces: &[String]) -> Result<(), DatapathError> {
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        for iface in ifaces {
            let ifindex = crate::iface::index(iface).map_err(|e| DatapathError::Iface {
                iface: iface.clone(),
                message: e.to_string(),
            })?;
            let l2 = crate::iface::l2_header_len(iface);
            {
                let map = self
                    .ebpf
                    .map_mut("IFACE_L2")
                    .ok_or(DatapathError::Missing("IFACE_L2 map"))?;
                let mut m: HashMap<&mut MapData, u32, u32> =
                    HashMap::try_from(map).map_err(map_err("IFACE_L2"))?;
                m.insert(ifindex, l2, 0).map_err(map_err("IFACE_L2"))?;
            }
            if !tcx {
                // EEXIST: a clsact qdisc is already there, which is what we need.
                if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface)
                    && !e.to_string().contains("exists")
                {
                    return Err(DatapathError::Iface {
                        iface: iface.clone(),
                        message: format!("adding clsact qdisc: {e}"),
                    });
                }
            }
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(TC_PROGRAM)
                .ok_or(DatapathError::Missing(TC_PROGRAM))?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    name: TC_PROGRAM,
                    source,
                })?;
            prog.attach(iface, TcAttachType::Egress)
                .map_err(|source| DatapathError::Program {
                    name: TC_PROGRAM,
                    source,
                })?;
        }
        Ok(())
    }

    /// Blocks `key` in the kernel until `until_ns` (CLOCK_BOOTTIME), reporting `rule_id`.
    pub fn block(
        &mut self,
        key: BlockKey,
        until_ns: u64,
        rule_id: u32,
    ) -> Result<(), DatapathError> {
        {
            let map = self
                .ebpf
                .map_mut("BLOCKED")
                .ok_or(DatapathError::Missing("BLOCKED map"))?;
            let mut m: HashMap<&mut MapData, BlockKey, BlockValue> =
                HashMap::try_from(map).map_err(map_err("BLOCKED"))?;
            m.insert(
                key,
                BlockValue {
                    until_ns,
                    rule_id,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err("BLOCKED"))?;
        }
        self.sync_block_count()
    }

    /// Lifts a block; true if there was one.
    pub fn unblock(&mut self, key: &BlockKey) -> Result<bool, DatapathError> {
        let removed = {
            let map = self
                .ebpf
                .map_mut("BLOCKED")
                .ok_or(DatapathError::Missing("BLOCKED map"))?;
            let mut m: HashMap<&mut MapData, BlockKey, BlockValue> =
                HashMap::try_from(map).map_err(map_err("BLOCKED"))?;
            m.remove(key).is_ok()
        };
        self.sync_block_count()?;
        Ok(removed)
    }

    /// Tells the hooks how many blocks exist (0 lets them skip the lookups).
    fn sync_block_count(&mut self) -> Result<(), DatapathError> {
        let n = {
            let map = self
                .ebpf
                .map("BLOCKED")
                .ok_or(DatapathError::Missing("BLOCKED map"))?;
            let m: HashMap<&MapData, BlockKey, BlockValue> =
                HashMap::try_from(map).map_err(map_err("BLOCKED"))?;
            m.keys().count() as u32
        };
        self.config.budget_blocks = n;
        let map = self
            .ebpf
            .map_mut("CONFIG")
            .ok_or(DatapathError::Missing("CONFIG map"))?;
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(map_err("CONFIG"))?;
        config.set(0, self.config, 0).map_err(map_err("CONFIG"))
    }

    /// Every flow counter, summed over CPUs.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        let map = self
            .ebpf
            .map("FLOWS")
            .ok_or(DatapathError::Missing("FLOWS map"))?;
        let flows: PerCpuHashMap<&MapData, FlowKey, FlowValue> =
            PerCpuHashMap::try_from(map).map_err(map_err("FLOWS"))?;
        let mut out = Vec::new();
        for item in flows.iter() {
            // A key deleted between the key walk and its lookup is simply gone.
            let Ok((key, per_cpu)) = item else { continue };
            let mut total = FlowValue::default();
            for v in per_cpu.iter() {
                total.packets += v.packets;
                total.bytes += v.bytes;
                total.payload += v.payload;
            }
            out.push((key, total));
        }
        Ok(out)
    }

    /// Deletes flow counters (of owners that have exited, once their totals are read).
    pub fn remove_flows(&mut self, keys: &[FlowKey]) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut("FLOWS")
            .ok_or(DatapathError::Missing("FLOWS map"))?;
        let mut flows: PerCpuHashMap<&mut MapData, FlowKey, FlowValue> =
            PerCpuHashMap::try_from(map).map_err(map_err("FLOWS"))?;
        for k in keys {
            let _ = flows.remove(k);
        }
        Ok(())
    }

    /// The recorded owner of some socket of process `tgid`, for processes that exited before
    /// /proc could be read.
    pub fn owner_of(&self, tgid: u32) -> Option<Owner> {
        let map = self.ebpf.map("SOCK_OWNERS")?;
        let owners: HashMap<&MapData, u64, Owner> = HashMap::try_from(map).ok()?;
        owners
            .iter()
            .filter_map(Result::ok)
            .map(|(_, o)| o)
            .find(|o| o.tgid == tgid)
    }

    /// Attaches every hook to the cgroup2 directory `cgroup` through BPF links. A cgroup link
    /// always coexists with other programs there and in ancestor cgroups (every attached program
    /// must allow a call), and the kernel rejects attach flags on links, hence `Single` (flags 0).
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let dir = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        for name in HOOKS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(DatapathError::Missing("EVENTS map"))?;
        RingBuf::try_from(map).map_err(map_err("EVENTS"))
    }

    /// The datapath's counters.
    pub fn stats(&self) -> Result<Stats, DatapathError> {
        let map = self
            .ebpf
            .map("STATS")
            .ok_or(DatapathError::Missing("STATS map"))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err("STATS"))?;
        let mut sums = [0u64; STAT_COUNT as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            *sum = arr
                .get(&(i as u32), 0)
                .map_err(map_err("STATS"))?
                .iter()
                .sum();
        }
        Ok(Stats {
            allowed: sums[STAT_ALLOWED as usize],
            denied: sums[STAT_DENIED as usize],
            audited: sums[STAT_AUDITED as usize],
            events_lost: sums[STAT_EVENTS_LOST as usize],
            tc_dropped: sums[STAT_TC_DROPPED as usize],
            tc_audited: sums[STAT_TC_AUDITED as usize],
            flows_full_packets: sums[STAT_FLOWS_FULL_PACKETS as usize],
            flows_full_bytes: sums[STAT_FLOWS_FULL_BYTES as usize],
            budget_dropped: sums[STAT_BUDGET_DROPPED as usize],
        })
    }
}

/// Writes every compiled entry. The config goes last: the maps hold the full policy before the
/// mode and default verdict that interpret it are set.
fn write_policy(ebpf: &mut Ebpf, policy: &CompiledPolicy) -> Result<(), DatapathError> {
    {
        let map = ebpf
            .map_mut("RULESETS")
            .ok_or(DatapathError::Missing("RULESETS map"))?;
        let mut sets: Array<&mut MapData, RuleSet> =
            Array::try_from(map).map_err(map_err("RULESETS"))?;
        for (i, set) in policy.rulesets.iter().enumerate() {
            sets.set(i as u32, set, 0).map_err(map_err("RULESETS"))?;
        }
    }
    {
        let map = ebpf
            .map_mut("POLICY_V4")
            .ok_or(DatapathError::Missing("POLICY_V4 map"))?;
        let mut trie: LpmTrie<&mut MapData, [u8; 4], PrefixValue> =
            LpmTrie::try_from(map).map_err(map_err("POLICY_V4"))?;
        for (&(net, len), &set) in &policy.v4 {
            trie.insert(
                &Key::new(u32::from(len), net.to_be_bytes()),
                PrefixValue { ruleset: set },
                0,
            )
            .map_err(map_err("POLICY_V4"))?;
        }
    }
    {
        let map = ebpf
            .map_mut("POLICY_V6")
            .ok_or(DatapathError::Missing("POLICY_V6 map"))?;
        let mut trie: LpmTrie<&mut MapData, [u8; 16], PrefixValue> =
            LpmTrie::try_from(map).map_err(map_err("POLICY_V6"))?;
        for (&(net, len), &set) in &policy.v6 {
            trie.insert(
                &Key::new(u32::from(len), net.to_be_bytes()),
                PrefixValue { ruleset: set },
                0,
            )
            .map_err(map_err("POLICY_V6"))?;
        }
    }
    let map = ebpf
        .map_mut("CONFIG")
        .ok_or(DatapathError::Missing("CONFIG map"))?;
    let mut config: Array<&mut MapData, Config> =
        Array::try_from(map).map_err(map_err("CONFIG"))?;
    config.set(0, policy.config, 0).map_err(map_err("CONFIG"))?;
    Ok(())
}
