//! The only module that touches aya: loads the embedded eBPF object, writes a compiled policy
//! into its maps, attaches the hooks to a cgroup and reads counters and the event ring buffer.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use egress_common::{
    Config, PrefixValue, RuleSet, STAT_ALLOWED, STAT_AUDITED, STAT_COUNT, STAT_DENIED,
    STAT_EVENTS_LOST,
};

use crate::compile::CompiledPolicy;

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The cgroup hooks, by program name in the object.
pub const HOOKS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

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
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Counters summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub events_lost: u64,
}

/// A loaded (and, after [`Datapath::attach`], attached) datapath. Dropping it detaches every
/// hook and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
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
        Ok(Datapath { ebpf })
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
