//! The only module that touches aya: loads the embedded eBPF object, writes a compiled policy
//! into its maps, attaches the hooks to a cgroup and reads counters and the event ring buffer.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, links::FdLink},
    util::KernelVersion,
};
use egress_common::{
    BlockKey, BlockValue, Config, FlowKey, FlowValue, Owner, PrefixValue, RuleSet, STAT_ALLOWED,
    STAT_AUDITED, STAT_BUDGET_DROPPED, STAT_COUNT, STAT_DENIED, STAT_EVENTS_LOST,
    STAT_FLOWS_FULL_BYTES, STAT_FLOWS_FULL_PACKETS, STAT_TC_AUDITED, STAT_TC_DROPPED,
};

use crate::{bpfsys, pins::Pins, policy::compile::CompiledPolicy};

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
    #[error("pinning: {0}")]
    Pin(String),
    #[error(
        "policy too large: {v4} IPv4 and {v6} IPv6 prefixes, {rulesets} rule sets (at most 4194304 prefixes per family and 65536 rule sets)"
    )]
    TooLarge {
        v4: usize,
        v6: usize,
        rulesets: usize,
    },
}

/// A program of the object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
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
    /// The config in force (that of buffer `active`).
    config: Config,
    /// The policy buffer in force.
    active: u32,
    /// Keys this controller has in `BLOCKED` (their count tells the hooks whether to look).
    blocked: std::collections::HashSet<BlockKey>,
    /// Where maps and links are pinned (None: nothing outlives this process).
    pins: Option<Pins>,
}

/// Every map of the object, as pinned under `maps/`.
pub const MAP_NAMES: [&str; 14] = [
    "POLICY_V4_0",
    "POLICY_V4_1",
    "POLICY_V6_0",
    "POLICY_V6_1",
    "RULESETS_0",
    "RULESETS_1",
    "CONFIG",
    "ACTIVE",
    "STATS",
    "EVENTS",
    "SOCK_OWNERS",
    "FLOWS",
    "IFACE_L2",
    "BLOCKED",
];

/// What a reload did.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    pub generation: u32,
    pub buffer: u32,
    pub elapsed: std::time::Duration,
}

/// Prefixes one policy buffer can hold, per address family. The tries allocate per entry, so the
/// ceiling costs nothing until used.
pub const POLICY_CAPACITY: u32 = 1 << 22;
/// Distinct rule sets one policy buffer can hold.
pub const RULESET_CAPACITY: u32 = 1 << 16;

fn check_capacity(policy: &CompiledPolicy) -> Result<(), DatapathError> {
    let fits = policy.v4.len() <= POLICY_CAPACITY as usize
        && policy.v6.len() <= POLICY_CAPACITY as usize
        && policy.rulesets.len() <= RULESET_CAPACITY as usize;
    if fits {
        Ok(())
    } else {
        Err(DatapathError::TooLarge {
            v4: policy.v4.len(),
            v6: policy.v6.len(),
            rulesets: policy.rulesets.len(),
        })
    }
}

impl Datapath {
    /// Loads the programs and writes `policy` into the maps. Nothing is attached yet, so a failure
    /// here changes nothing in the kernel's enforcement. Nothing is pinned: dropping the
    /// datapath detaches everything (`egress exec`, `egress run --ephemeral`, tests).
    pub fn load(policy: &CompiledPolicy) -> Result<Datapath, DatapathError> {
        Self::load_with(policy, None).map(|(dp, _)| dp)
    }

    /// As [`Datapath::load`], with every map pinned under `pins` (reusing the pinned maps, and
    /// so the policy in force and every counter, when a previous controller left its programs
    /// attached there). Returns whether that state was adopted; then nothing is written to the
    /// policy maps: the caller reloads atomically if its policy differs.
    pub fn load_pinned(
        policy: &CompiledPolicy,
        pins: &Pins,
    ) -> Result<(Datapath, bool), DatapathError> {
        Self::load_with(policy, Some(pins))
    }

    fn load_with(
        policy: &CompiledPolicy,
        pins: Option<&Pins>,
    ) -> Result<(Datapath, bool), DatapathError> {
        check_capacity(policy)?;
        let mut adopt = false;
        let pin_paths: Vec<(&'static str, std::path::PathBuf)> = match pins {
            Some(p) => {
                p.ensure()
                    .map_err(|e| DatapathError::Pin(format!("{e:#}")))?;
                // Adopt only a complete state: links to follow and every map they use.
                adopt = p.adoptable() && MAP_NAMES.iter().all(|n| p.map(n).exists());
                if !adopt {
                    // Maps without links are leftovers: start from fresh ones.
                    for name in MAP_NAMES {
                        let _ = std::fs::remove_file(p.map(name));
                    }
                }
                MAP_NAMES.iter().map(|n| (*n, p.map(n))).collect()
            }
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("POLICY_V4_0", POLICY_CAPACITY)
            .map_max_entries("POLICY_V4_1", POLICY_CAPACITY)
            .map_max_entries("POLICY_V6_0", POLICY_CAPACITY)
            .map_max_entries("POLICY_V6_1", POLICY_CAPACITY)
            .map_max_entries("RULESETS_0", RULESET_CAPACITY)
            .map_max_entries("RULESETS_1", RULESET_CAPACITY);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let (active, config) = if adopt {
            let active = {
                let map = ebpf
                    .map("ACTIVE")
                    .ok_or(DatapathError::Missing("ACTIVE map"))?;
                let a: Array<&MapData, u32> = Array::try_from(map).map_err(map_err("ACTIVE"))?;
                a.get(&0, 0).map_err(map_err("ACTIVE"))? & 1
            };
            let map = ebpf
                .map("CONFIG")
                .ok_or(DatapathError::Missing("CONFIG map"))?;
            let c: Array<&MapData, Config> = Array::try_from(map).map_err(map_err("CONFIG"))?;
            (active, c.get(&active, 0).map_err(map_err("CONFIG"))?)
        } else {
            write_buffer(&mut ebpf, 0, policy, policy.config)?;
            set_active(&mut ebpf, 0)?;
            (0, policy.config)
        };
        for name in HOOKS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let tc: &mut SchedClassifier = program(&mut ebpf, TC_PROGRAM)?;
        tc.load().map_err(|source| DatapathError::Program {
            name: TC_PROGRAM,
            source,
        })?;
        // Blocks set by an earlier controller keep counting towards `budget_blocks`.
        let blocked = if adopt {
            let map = ebpf
                .map("BLOCKED")
                .ok_or(DatapathError::Missing("BLOCKED map"))?;
            let m: HashMap<&MapData, BlockKey, BlockValue> =
                HashMap::try_from(map).map_err(map_err("BLOCKED"))?;
            m.keys().filter_map(Result::ok).collect()
        } else {
            Default::default()
        };
        let dp = Datapath {
            ebpf,
            config,
            active,
            blocked,
            pins: pins.cloned(),
        };
        Ok((dp, adopt))
    }

    /// Applies a new policy atomically: the inactive buffer is filled completely, then `ACTIVE`
    /// flips to it. Until the flip every decision uses the old policy, after it the new one; a
    /// failure before the flip leaves the old policy in force, untouched.
    pub fn reload(&mut self, policy: &CompiledPolicy) -> Result<Applied, DatapathError> {
        let start = std::time::Instant::now();
        check_capacity(policy)?;
        // The map, not our memory, says which buffer is live.
        if let Some(map) = self.ebpf.map("ACTIVE")
            && let Ok(a) = Array::<&MapData, u32>::try_from(map)
            && let Ok(live) = a.get(&0, 0)
        {
            self.active = live & 1;
        }
        let next = 1 - self.active;
        let config = Config {
            generation: self.config.generation + 1,
            tc_cgroup_id: self.config.tc_cgroup_id,
            tc_cgroup_level: self.config.tc_cgroup_level,
            budget_blocks: self.config.budget_blocks,
            ..policy.config
        };
        write_buffer(&mut self.ebpf, next, policy, config)?;
        set_active(&mut self.ebpf, next)?;
        self.active = next;
        self.config = Config {
            buffer: next,
            ..config
        };
        Ok(Applied {
            generation: config.generation,
            buffer: next,
            elapsed: start.elapsed(),
        })
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> u32 {
        self.config.generation
    }

    /// Writes the controller-owned config fields (TC scope, block count) into both buffers.
    fn write_configs(&mut self) -> Result<(), DatapathError> {
        let other = 1 - self.active;
        let inactive = {
            let map = self
                .ebpf
                .map("CONFIG")
                .ok_or(DatapathError::Missing("CONFIG map"))?;
            let configs: Array<&MapData, Config> =
                Array::try_from(map).map_err(map_err("CONFIG"))?;
            configs.get(&other, 0).map_err(map_err("CONFIG"))?
        };
        let shared = |c: Config| Config {
            tc_cgroup_id: self.config.tc_cgroup_id,
            tc_cgroup_level: self.config.tc_cgroup_level,
            budget_blocks: self.config.budget_blocks,
            ..c
        };
        let (active_cfg, inactive_cfg) = (shared(self.config), shared(inactive));
        set_config(&mut self.ebpf, other, inactive_cfg)?;
        set_config(&mut self.ebpf, self.active, active_cfg)
    }

    /// Restricts the TC program to packets of sockets in `cgroup` (and below). Call before
    /// [`Datapath::attach_tc`]. Not calling it means every packet on the interfaces.
    pub fn set_tc_scope(&mut self, cgroup_id: u64, level: u32) -> Result<(), DatapathError> {
        self.config.tc_cgroup_id = cgroup_id;
        self.config.tc_cgroup_level = level;
        self.write_configs()
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
            let prog: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
            // Only TCX links can be pinned. A netlink (pre-6.6) filter stays owned by this process
            // and is removed when it exits; enforcement at the cgroup hooks is pinned regardless.
            let pinned = self
                .pins
                .as_ref()
                .filter(|_| tcx)
                .map(|p| p.link(&format!("tc-{iface}")));
            let fd = prog.fd().map_err(|source| DatapathError::Program {
                name: TC_PROGRAM,
                source,
            })?;
            let replaced = match &pinned {
                Some(path) if path.exists() => replace_program(path, fd)?,
                _ => false,
            };
            if !replaced {
                let id = prog.attach(iface, TcAttachType::Egress).map_err(|source| {
                    DatapathError::Program {
                        name: TC_PROGRAM,
                        source,
                    }
                })?;
                if let Some(path) = pinned {
                    let link = prog
                        .take_link(id)
                        .map_err(|source| DatapathError::Program {
                            name: TC_PROGRAM,
                            source,
                        })?;
                    pin_link(link, &path)?;
                }
            }
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
        self.blocked.insert(key);
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
        self.blocked.remove(key);
        self.sync_block_count()?;
        Ok(removed)
    }

    /// Tells the hooks how many blocks exist (0 lets them skip the lookups).
    fn sync_block_count(&mut self) -> Result<(), DatapathError> {
        let n = self.blocked.len() as u32;
        if n == self.config.budget_blocks {
            return Ok(());
        }
        self.config.budget_blocks = n;
        self.write_configs()
    }

    /// Kernel memory charged to a map (`memlock` in its fdinfo), and the name of the policy trie
    /// in force for `family` (4 or 6).
    pub fn map_memlock(&self, name: &str) -> Option<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let map = self.ebpf.map(name)?;
        let data: &MapData = match map {
            aya::maps::Map::LpmTrie(d) | aya::maps::Map::HashMap(d) | aya::maps::Map::Array(d) => d,
            _ => return None,
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The name of the policy trie in force for `family` (4 or 6).
    pub fn active_trie(&self, family: u8) -> &'static str {
        match (family, self.active) {
            (4, 0) => "POLICY_V4_0",
            (4, _) => "POLICY_V4_1",
            (_, 0) => "POLICY_V6_0",
            _ => "POLICY_V6_1",
        }
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

    /// The comm of every process with a recorded socket owner, for processes that exited before
    /// /proc could be read. One walk of the map.
    pub fn owner_comms(&self) -> std::collections::HashMap<u32, String> {
        let Some(map) = self.ebpf.map("SOCK_OWNERS") else {
            return Default::default();
        };
        let Ok(owners) = HashMap::<&MapData, u64, Owner>::try_from(map) else {
            return Default::default();
        };
        owners
            .iter()
            .filter_map(Result::ok)
            .map(|(_, o)| (o.tgid, crate::events::cstr(&o.comm)))
            .collect()
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
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let pinned = self.pins.as_ref().map(|p| p.link(name));
            let fd = prog
                .fd()
                .map_err(|source| DatapathError::Program { name, source })?;
            // A previous controller's link: swap its program for ours in one step.
            let replaced = match &pinned {
                Some(path) if path.exists() => replace_program(path, fd)?,
                _ => false,
            };
            if !replaced {
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|source| DatapathError::Program { name, source })?;
                if let Some(path) = pinned {
                    let link = prog
                        .take_link(id)
                        .map_err(|source| DatapathError::Program { name, source })?;
                    pin_link(link, &path)?;
                }
            }
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

/// Pins an attachment's link at `path`, so that it outlives this process.
fn pin_link<L>(link: L, path: &Path) -> Result<(), DatapathError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let fd = FdLink::try_from(link)
        .map_err(|e| DatapathError::Pin(format!("{}: {e}", path.display())))?;
    fd.pin(path)
        .map(drop)
        .map_err(|e| DatapathError::Pin(format!("{}: {e}", path.display())))
}

/// Replaces the program of the link pinned at `path` (BPF_LINK_UPDATE): the hook never runs
/// without a program, and the old one is released.
fn replace_program(path: &Path, prog: &aya::programs::ProgramFd) -> Result<bool, DatapathError> {
    use std::os::fd::AsFd as _;
    let link = bpfsys::obj_get(path)
        .map_err(|e| DatapathError::Pin(format!("opening {}: {e}", path.display())))?;
    match bpfsys::link_update(link.as_fd(), prog.as_fd()) {
        Ok(()) => Ok(true),
        // The link's target went away (interface or cgroup deleted and recreated): it is
        // detached for good. Drop its pin; the caller attaches afresh.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            tracing::warn!(link = %path.display(), "pinned link was detached by the kernel; attaching afresh");
            let _ = std::fs::remove_file(path);
            Ok(false)
        }
        Err(e) => Err(DatapathError::Pin(format!(
            "updating {}: {e}",
            path.display()
        ))),
    }
}

/// Fills policy buffer `buf` (0 or 1) with `policy`: clears what the buffer held, writes the
/// rule sets, then the tries, then the buffer's config. The hooks never read this buffer until
/// `ACTIVE` points at it.
fn write_buffer(
    ebpf: &mut Ebpf,
    buf: u32,
    policy: &CompiledPolicy,
    config: Config,
) -> Result<(), DatapathError> {
    let (v4_name, v6_name, sets_name): (&'static str, &'static str, &'static str) = if buf == 0 {
        ("POLICY_V4_0", "POLICY_V6_0", "RULESETS_0")
    } else {
        ("POLICY_V4_1", "POLICY_V6_1", "RULESETS_1")
    };
    let v4 = policy
        .v4
        .iter()
        .map(|(&(net, len), &set)| (Key::new(u32::from(len), net.to_be_bytes()), set));
    let v6 = policy
        .v6
        .iter()
        .map(|(&(net, len), &set)| (Key::new(u32::from(len), net.to_be_bytes()), set));
    // Rule sets before the tries that reference them; both cleared of the older policy first.
    fill_trie::<[u8; 4]>(ebpf, v4_name, std::iter::empty())?;
    fill_trie::<[u8; 16]>(ebpf, v6_name, std::iter::empty())?;
    {
        let map = ebpf
            .map_mut(sets_name)
            .ok_or(DatapathError::Missing("RULESETS map"))?;
        let mut sets: HashMap<&mut MapData, u32, RuleSet> =
            HashMap::try_from(map).map_err(map_err(sets_name))?;
        let old: Vec<u32> = sets.keys().filter_map(Result::ok).collect();
        for k in &old {
            let _ = sets.remove(k);
        }
        for (i, set) in policy.rulesets.iter().enumerate() {
            sets.insert(i as u32, set, 0).map_err(map_err(sets_name))?;
        }
    }
    fill_trie(ebpf, v4_name, v4)?;
    fill_trie(ebpf, v6_name, v6)?;
    set_config(ebpf, buf, config)
}

/// Empties the policy trie `name`, then inserts `entries`.
fn fill_trie<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: impl Iterator<Item = (Key<K>, u32)>,
) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut(name)
        .ok_or(DatapathError::Missing("policy trie"))?;
    let mut trie: LpmTrie<&mut MapData, K, PrefixValue> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    let old: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for k in &old {
        let _ = trie.remove(k);
    }
    for (key, set) in entries {
        trie.insert(&key, PrefixValue { ruleset: set }, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn set_config(ebpf: &mut Ebpf, buf: u32, config: Config) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut("CONFIG")
        .ok_or(DatapathError::Missing("CONFIG map"))?;
    let mut configs: Array<&mut MapData, Config> =
        Array::try_from(map).map_err(map_err("CONFIG"))?;
    configs
        .set(
            buf,
            Config {
                buffer: buf,
                ..config
            },
            0,
        )
        .map_err(map_err("CONFIG"))
}

/// Points the hooks at buffer `buf`: one 4-byte array write, atomic for every reader.
fn set_active(ebpf: &mut Ebpf, buf: u32) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut("ACTIVE")
        .ok_or(DatapathError::Missing("ACTIVE map"))?;
    let mut active: Array<&mut MapData, u32> = Array::try_from(map).map_err(map_err("ACTIVE"))?;
    active.set(0, buf, 0).map_err(map_err("ACTIVE"))
}
