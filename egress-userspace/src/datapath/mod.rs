//! The only module that touches aya: loads the embedded eBPF object, takes typed handles on its
//! maps (`maps`), writes a compiled policy into them, attaches the hooks to a cgroup, the fork
//! tracker to its tracepoint (`fork`) and TC to interfaces, pins what must outlive the
//! controller (`pins`), sets and lifts byte-budget blocks (`blocks`), and reads counters, the
//! event ring (`ring`) and the kernel's run-time statistics of its programs. Raw bpf(2) calls only where aya has no API (`bpfsys`).

mod blocks;
mod bpfsys;
mod error;
mod exceptions;
mod exec;
pub mod features;
mod fork;
pub mod kernel_log;
mod links;
mod mapped;
mod maps;
pub mod pins;
mod ring;

use std::{collections::HashSet, fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, RawTracePoint, SchedClassifier, SockOps, TcAttachType, TracePoint,
    },
    util::KernelVersion,
};
use egress_common::{BlockKey, Config, FlowKey, FlowValue, map_names};

pub use self::{
    error::DatapathError,
    kernel_log::KernelLog,
    maps::{Counters, V4Lookup},
    pins::{LinkStatus, PinnedStatus, State},
    ring::{AsyncEventRing, EventRing},
};
use self::{
    links::{pin_link, take_over},
    maps::Maps,
    pins::Pins,
};
use crate::policy::compile::CompiledPolicy;

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The cgroup sock_addr hooks, by program name in the object.
pub const HOOKS: [&str; 8] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
];
/// The cgroup setsockopt hook (refuses source routes).
pub const SOCKOPT_HOOK: &str = "setsockopt";
/// The cgroup sock_create hook (`[sockets]`).
pub const SOCK_CREATE_HOOK: &str = "sock_create";
/// The hooks that forget a socket's owner when the socket is done: `cgroup/sock_release`, and
/// `sock_ops` (TCP sockets, at TCP_CLOSE). Attached before the hooks that record owners, so
/// that no owner is ever recorded without them in place.
pub const OWNER_HOOKS: [&str; 2] = ["sock_release", "sock_ops"];
/// The `cgroup_skb/egress` program: byte accounting of the packets of sockets with a recorded
/// owner, in whatever network namespace they are (TC counts the rest).
pub const ACCOUNTING_HOOK: &str = "skb_egress";
/// The TC egress classifier.
pub const TC_PROGRAM: &str = "tc_egress";
/// The fork tracker (tracepoint `task/task_newtask`).
pub const FORK_TRACKER: &str = "track_fork";
/// The exec tracker (raw tracepoint `sched_process_exec`).
pub const EXEC_TRACKER: &str = "track_exec";

/// Prefixes one policy buffer can hold, per address family. The tries allocate per entry, so the
/// ceiling costs nothing until used.
pub const POLICY_CAPACITY: u32 = 1 << 22;
/// IPv4 prefixes the range table (`RANGES_V4_n`) has room for by default, whatever the policy
/// (`--prefix-capacity`); the starting policy's own need, doubled, when larger. A policy loaded
/// later that does not fit is looked up in the trie instead (slower, and said so).
pub const PREFIX_CAPACITY: u32 = 1 << 18;
/// The most `--prefix-capacity` can ask for (24 bytes of `RANGES_V4_n` each, per buffer).
pub const MAX_PREFIX_CAPACITY: u32 = 1 << 25;

/// `RANGES_V4_n` entries for `prefixes` IPv4 prefixes: a table has at most 3 entries per
/// prefix (its two ends, and the head of a chunk it alone splits) plus one.
pub fn range_entries_for(prefixes: u32) -> u32 {
    3 * prefixes.min(MAX_PREFIX_CAPACITY) + 1
}

/// The `RANGES_V4_n` entries of a fresh datapath: `prefixes` (default [`PREFIX_CAPACITY`])
/// worth, or twice what `policy` fills, whichever is more.
fn range_entries(prefixes: Option<u32>, policy: Option<&CompiledPolicy>) -> u32 {
    let asked = range_entries_for(prefixes.unwrap_or(PREFIX_CAPACITY));
    let needed = policy
        .and_then(|p| p.v4_ranges().ok())
        .map_or(0, |t| t.range_entries() as u64 * 2);
    let most = u64::from(range_entries_for(MAX_PREFIX_CAPACITY));
    u64::from(asked).max(needed.min(most)) as u32
}

/// Capacities of the maps sized at load (None: the default, or what is pinned when adopting).
#[derive(Debug, Clone, Copy, Default)]
pub struct Capacities {
    /// Socket owners (`SOCK_OWNERS`): a pinned map of another size is refused.
    pub owners: Option<u32>,
    /// IPv4 prefixes the range table holds (`RANGES_V4_n`): a pinned table keeps its size.
    pub prefixes: Option<u32>,
    /// Not a capacity, but fixed at load like them: the sock_addr hooks write one debug line
    /// per decision (see [`kernel_log`]; taken with [`Datapath::take_kernel_log`]). Off, the
    /// verifier drops the logging code.
    pub kernel_log: bool,
    /// Bytes of the `EVENTS` ring (None: as the object says, 1 MiB). A pinned ring keeps its
    /// size.
    pub events_ring: Option<u32>,
}

/// Distinct rule sets one policy buffer can hold.
pub const RULESET_CAPACITY: u32 = 1 << 16;
/// Live DNS grants ((cgroup, address) pairs) the kernel holds; the proxy answers SERVFAIL when
/// it is full.
pub const GRANT_CAPACITY: u32 = 1 << 17;

/// Returns once every BPF program invocation that started before the call has ended: an RCU
/// grace period, through `membarrier(MEMBARRIER_CMD_GLOBAL)` (implemented by the kernel with
/// `synchronize_rcu()`). Where the command is not available (nohz_full CPUs), a pause far
/// longer than any program runs.
fn wait_for_readers() {
    const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let supported = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
    if supported >= 0 && supported & MEMBARRIER_CMD_GLOBAL != 0 {
        // SAFETY: as above.
        if unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0 {
            return;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
}

/// What the kernel counted for one program while run-time statistics were on (see
/// [`enable_run_stats`]): how often it ran, and for how long in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub run_time: std::time::Duration,
    pub run_count: u64,
    /// Instructions the verifier processed to load the program (its verification cost; the
    /// kernel refuses a program at 1,000,000).
    pub verified_insns: u32,
}

/// Turns on the kernel's run-time statistics of every BPF program (`BPF_ENABLE_STATS`, what
/// `sysctl kernel.bpf_stats_enabled=1` does) until the returned descriptor is closed, so that
/// the host setting is never left on behind the caller. While on, each program run costs two
/// clock reads more. For measurements ([`Datapath::run_stats`]), not for production.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, DatapathError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(DatapathError::Stats)
}

/// The maps the DNS proxy works with, see [`Datapath::dns_maps`].
pub struct DnsMaps {
    pub grants: aya::maps::HashMap<MapData, egress_common::GrantKey, egress_common::GrantValue>,
    /// `GRANTS` again, for reading (listing, counting, finding what expired) without holding
    /// up the writer.
    pub grants_read:
        aya::maps::HashMap<MapData, egress_common::GrantKey, egress_common::GrantValue>,
    pub owners: aya::maps::HashMap<MapData, u64, egress_common::Owner>,
}

impl DnsMaps {
    /// The pinned maps under `pins`, before any datapath is loaded (a restarting controller
    /// starts its DNS proxy first, so that names resolve again at once). Fails when they are
    /// missing or of another layout.
    pub fn from_pins(pins: &Pins) -> Result<DnsMaps, DatapathError> {
        let open = |name| MapData::from_pin(pins.map(name));
        Ok(DnsMaps {
            grants: typed_map(open(map_names::GRANTS), map_names::GRANTS)?,
            grants_read: typed_map(open(map_names::GRANTS), map_names::GRANTS)?,
            owners: typed_map(open(map_names::SOCK_OWNERS), map_names::SOCK_OWNERS)?,
        })
    }
}

/// Map `name`, opened as `data`, as the typed handle `T` (its key and value sizes checked).
fn typed_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    data: Result<MapData, aya::maps::MapError>,
    name: &'static str,
) -> Result<T, DatapathError> {
    let data = data.map_err(maps::err(name))?;
    let map = aya::maps::Map::from_map_data(data).map_err(maps::err(name))?;
    T::try_from(map).map_err(maps::err(name))
}

/// Where the DNS proxy listens, for [`Datapath::set_dns`].
#[derive(Debug, Clone, Copy)]
pub struct DnsSteering {
    pub v4: std::net::Ipv4Addr,
    pub port: u16,
    /// Where AF_INET6 sockets' queries to IPv6 servers go (queries to v4-mapped servers go to
    /// the mapped form of `v4`).
    pub v6: std::net::Ipv6Addr,
    pub port6: u16,
    /// `SO_NETNS_COOKIE` of the namespace the proxy listens in.
    pub netns_cookie: u64,
}

/// Socket owners `SOCK_OWNERS` holds by default: one per open socket that connected or sent in
/// the enforced cgroup. Preallocated (about 100 bytes each). When it is full, connects and sends
/// that need a new entry are refused in enforce mode (`owners-full`).
pub const OWNERS_CAPACITY: u32 = 131_072;

/// Whether a TC program of ours is loaded in the kernel (on a kernel without TCX, with no
/// controller running: a killed controller's clsact filter still holds it).
pub fn tc_program_loaded() -> bool {
    aya::programs::loaded_programs().flatten().any(|p| {
        p.name_as_str() == Some(TC_PROGRAM)
            && p.program_type() == aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS
    })
}

/// Whether adding a clsact qdisc failed because the interface already has one.
fn clsact_exists(e: &aya::programs::tc::TcError) -> bool {
    match e {
        aya::programs::tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

/// Flows (`FLOWS`) the per-CPU flow table holds on a host with few CPUs.
pub const FLOWS_CAPACITY: u32 = 65_536;
/// The least it holds however many CPUs the host may have.
pub const FLOWS_CAPACITY_MIN: u32 = 4_096;
/// What the flow table's per-CPU counters may take: the kernel preallocates every entry's
/// counters (24 bytes) for every *possible* CPU, so 65,536 flows cost 400 MB on a host with
/// 256 possible CPUs (charged to the controller's memory cgroup: a DaemonSet's limit).
pub const FLOWS_PER_CPU_BUDGET: u64 = 32 << 20;

/// The flow table's size for a host with `possible_cpus` possible CPUs: [`FLOWS_CAPACITY`],
/// halved until the per-CPU counters fit [`FLOWS_PER_CPU_BUDGET`], and never below
/// [`FLOWS_CAPACITY_MIN`] (flows beyond it are counted in `flows_full_*`, never lost).
pub fn flows_capacity(possible_cpus: usize) -> u32 {
    let per_flow = size_of::<egress_common::FlowValue>() as u64 * possible_cpus.max(1) as u64;
    let mut n = FLOWS_CAPACITY;
    while n > FLOWS_CAPACITY_MIN && u64::from(n) * per_flow > FLOWS_PER_CPU_BUDGET {
        n /= 2;
    }
    n
}

/// How full one bounded map is ([`Datapath::map_fill`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    /// `flows`, `owners`, `blocks`, `block_tree` or `grants`.
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// What a reload did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub generation: u32,
    pub elapsed: std::time::Duration,
    /// Where IPv4 destinations are looked up under this policy.
    pub v4_lookup: V4Lookup,
}

/// A loaded (and, after [`Datapath::attach`], attached) datapath. Dropping it detaches every
/// hook that is not pinned and frees the maps that are not pinned.
pub struct Datapath {
    /// The programs (the maps are taken out into `maps`).
    ebpf: Ebpf,
    maps: Maps,
    /// The config in force (that of buffer `active`).
    config: Config,
    /// The policy buffer in force.
    active: u32,
    /// Keys in `BLOCKED` (their count tells the hooks whether to look).
    blocked: HashSet<BlockKey>,
    /// Where maps and links are pinned (None: nothing outlives this process).
    pins: Option<Pins>,
    /// The fork tracker is attached (once, whatever the number of cgroups attached to).
    fork_tracked: bool,
    /// TC links this datapath owns (not pinned), for [`Datapath::detach_tc`].
    tc_links: Vec<aya::programs::tc::SchedClassifierLinkId>,
    /// The reader of the kernel's log ring, until taken (loaded with `kernel_log` only).
    kernel_log: Option<KernelLog>,
}

fn check_capacity(policy: &CompiledPolicy) -> Result<(), DatapathError> {
    let fits = policy.v4.len() <= POLICY_CAPACITY as usize
        && policy.v6.len() <= POLICY_CAPACITY as usize
        && policy.rulesets.len() + policy.host_sets.len() <= RULESET_CAPACITY as usize;
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

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// The end of a verifier log, where the verifier says why it stopped ("BPF program is too
/// large", "invalid access to map value", the instruction count): its last three lines that
/// are not instruction traces (nor the time and stack statistics), on one line.
fn verifier_summary(log: &str) -> String {
    let mut lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            l.split(':')
                .next()
                .is_none_or(|n| n.parse::<u32>().is_err())
        })
        .filter(|l| !l.starts_with(';'))
        .filter(|l| !l.starts_with("verification time") && !l.starts_with("stack depth"))
        .rev()
        .take(3)
        .collect();
    lines.reverse();
    if lines.is_empty() {
        "the verifier gave no log".to_string()
    } else {
        lines.join("; ")
    }
}

/// Loads program `name`, again when the kernel says EAGAIN: the verifier stops a long
/// verification when a signal is pending for the loading thread, and asks to be called again.
fn load_retrying(
    name: &'static str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), DatapathError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::debug!(
                    program = name,
                    attempt,
                    "verification interrupted; loading again"
                );
                attempt += 1;
            }
            Err(aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                let log = verifier_log.to_string();
                tracing::debug!(program = name, "the verifier's log:\n{log}");
                return Err(DatapathError::Verifier {
                    name,
                    kernel: KernelVersion::current()
                        .map_or_else(|_| "version unknown".into(), |v| v.to_string()),
                    errno: io_error,
                    summary: verifier_summary(&log),
                });
            }
            r => return r.map_err(prog_err(name)),
        }
    }
}

/// Attaches cgroup program `$name` (of aya type `$ty`) to the open cgroup directory `$dir`:
/// takes over the link a previous controller pinned, or attaches and (with pins) pins the link.
/// A macro because aya's cgroup program types share these methods but no trait.
macro_rules! attach_cgroup_program {
    ($self:ident, $ty:ty, $name:expr, $dir:expr) => {
        attach_cgroup_program!($self, $ty, $name, $dir, )
    };
    ($self:ident, $ty:ty, $name:expr, $dir:expr, $($attach_type:expr)?) => {{
        let name: &'static str = $name;
        let pinned = $self.pins.as_ref().map(|p| p.link(name));
        let prog: &mut $ty = program(&mut $self.ebpf, name)?;
        if !take_over(pinned.as_deref(), prog.fd().map_err(prog_err(name))?)? {
            let id = prog
                .attach($dir, $($attach_type,)? CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            if let Some(path) = pinned {
                pin_link(prog.take_link(id).map_err(prog_err(name))?, &path)?;
            }
        }
    }};
}

impl Datapath {
    /// Loads the programs and writes `policy` into the maps. Nothing is attached yet, so a failure
    /// here changes nothing in the kernel's enforcement. Nothing is pinned: dropping the
    /// datapath detaches everything (`egress exec`, `egress run --ephemeral`, tests).
    pub fn load(policy: &CompiledPolicy) -> Result<Datapath, DatapathError> {
        Self::load_sized(policy, OWNERS_CAPACITY)
    }

    /// As [`Datapath::load`], with room for `owners` socket owners (see [`OWNERS_CAPACITY`]).
    pub fn load_sized(policy: &CompiledPolicy, owners: u32) -> Result<Datapath, DatapathError> {
        let sizes = Capacities {
            owners: Some(owners),
            ..Capacities::default()
        };
        Self::load_capacities(policy, sizes)
    }

    /// As [`Datapath::load`], with the capacities `sizes`.
    pub fn load_capacities(
        policy: &CompiledPolicy,
        sizes: Capacities,
    ) -> Result<Datapath, DatapathError> {
        let sizes = Capacities {
            owners: Some(sizes.owners.unwrap_or(OWNERS_CAPACITY)),
            ..sizes
        };
        Self::load_with(Some(policy), None, sizes).map(|(dp, _)| dp)
    }

    /// As [`Datapath::load`], with every map pinned under `pins` (reusing the pinned maps, and
    /// so the policy in force and every counter, when a previous controller left its programs
    /// attached there). Returns whether that state was adopted; then nothing is written to the
    /// policy maps: the caller reloads atomically if its policy differs. `policy` goes into fresh
    /// maps when there is nothing to adopt; None: adopt or fail (keep what the kernel holds).
    ///
    /// `owners`: the capacity of the socket-owner map (None: [`OWNERS_CAPACITY`] for fresh maps,
    /// and whatever the pinned map has when adopting). A pinned map of another capacity than one
    /// asked for is refused, like any map of another shape: a live map cannot be resized without
    /// losing the owners of open sockets.
    pub fn load_pinned(
        policy: Option<&CompiledPolicy>,
        pins: &Pins,
        sizes: Capacities,
    ) -> Result<(Datapath, bool), DatapathError> {
        Self::load_with(policy, Some(pins), sizes)
    }

    fn load_with(
        policy: Option<&CompiledPolicy>,
        pins: Option<&Pins>,
        sizes: Capacities,
    ) -> Result<(Datapath, bool), DatapathError> {
        let owners = sizes.owners;
        if let Some(policy) = policy {
            check_capacity(policy)?;
        }
        // Before anything is loaded: a kernel without a required feature is refused by name,
        // not by a verifier dump; what a missing feature only degrades is said once.
        let features = features::probe();
        if let Some(refusal) = features.refusal() {
            return Err(DatapathError::KernelFeature(refusal));
        }
        static DEGRADED: std::sync::Once = std::sync::Once::new();
        DEGRADED.call_once(|| {
            for d in features.degraded() {
                tracing::warn!("degraded on this kernel: {d}");
            }
        });
        // Before anything is loaded: a kernel whose tracepoint record we cannot read is refused
        // here, never guessed at.
        let newtask = fork::NewTaskLayout::read()?;
        let exe_offsets = exec::ExeOffsets::read()?;
        let mut loader = EbpfLoader::new();
        newtask.set_globals(&mut loader);
        exe_offsets.set_globals(&mut loader);
        kernel_log::set_level(&mut loader, sizes.kernel_log);
        for name in map_names::POLICY_V4.iter().chain(&map_names::POLICY_V6) {
            loader.map_max_entries(name, POLICY_CAPACITY);
        }
        for name in map_names::RULESETS {
            loader.map_max_entries(name, RULESET_CAPACITY);
        }
        loader.map_max_entries(map_names::GRANTS, GRANT_CAPACITY);
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        let flows = flows_capacity(cpus);
        if flows < FLOWS_CAPACITY {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    possible_cpus = cpus,
                    flows,
                    "the flow table holds {flows} flows, not {FLOWS_CAPACITY}: its per-CPU counters are kept within {} MiB",
                    FLOWS_PER_CPU_BUDGET >> 20
                )
            });
        }
        loader.map_max_entries(map_names::FLOWS, flows);
        let owners_capacity = owners.unwrap_or(OWNERS_CAPACITY);
        loader.map_max_entries(map_names::SOCK_OWNERS, owners_capacity);
        let range_entries = range_entries(sizes.prefixes, policy);
        for name in map_names::RANGES_V4 {
            loader.map_max_entries(name, range_entries);
        }
        if let (Some(bytes), None) = (sizes.events_ring, pins) {
            loader.map_max_entries(map_names::EVENTS, bytes);
        }
        let mut adopt = false;
        if let Some(p) = pins {
            p.ensure()
                .map_err(|e| DatapathError::Pin(format!("{e:#}")))?;
            // Adopt only a complete state: links to follow and every map they use.
            adopt = p.adoptable() && p.maps_complete();
            if !adopt && policy.is_none() {
                return Err(DatapathError::Pin(format!(
                    "nothing complete to adopt under {} and no policy to load",
                    p.dir.display()
                )));
            }
            if adopt {
                // A map pinned by another version with another layout must never be read or
                // written with ours: refuse, and the enforcement in place stays as it is. (The
                // LRU `SOCK_OWNERS` of earlier versions is one: the kernel would let our programs
                // use it, and it would go on evicting live owners instead of failing closed.)
                // The owner map's capacity is adopted as pinned unless one is asked.
                // So is the range table's: a policy it has no room for uses the trie; and the
                // flow table's (sized by the possible CPUs, or by an earlier version).
                let any_size: &[&str] = match owners {
                    Some(_) => &[
                        map_names::FLOWS,
                        map_names::RANGES_V4[0],
                        map_names::RANGES_V4[1],
                    ],
                    None => &[
                        map_names::FLOWS,
                        map_names::SOCK_OWNERS,
                        map_names::RANGES_V4[0],
                        map_names::RANGES_V4[1],
                    ],
                };
                p.check_maps(
                    &maps::expected_maps(owners_capacity, range_entries)?,
                    any_size,
                )?;
            } else {
                // Maps without links are leftovers: start from fresh ones.
                p.remove_maps();
            }
            for name in map_names::ALL {
                loader.map_pin_path(name, p.map(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let (active, config) = match policy.filter(|_| !adopt) {
            None => {
                let active = maps.active()?;
                (active, maps.config(active)?)
            }
            Some(policy) => {
                let lookup = maps.write_buffer(0, policy, policy.config)?;
                if let V4Lookup::Trie { why } = &lookup {
                    tracing::warn!("IPv4 destinations are looked up in the trie: {why}");
                }
                maps.set_active(0)?;
                (0, maps.config(0)?)
            }
        };
        for name in HOOKS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            load_retrying(name, || prog.load())?;
        }
        let sockopt: &mut CgroupSockopt = program(&mut ebpf, SOCKOPT_HOOK)?;
        load_retrying(SOCKOPT_HOOK, || sockopt.load())?;
        let sock_create: &mut CgroupSock = program(&mut ebpf, SOCK_CREATE_HOOK)?;
        load_retrying(SOCK_CREATE_HOOK, || sock_create.load())?;
        let [release, sock_ops] = OWNER_HOOKS;
        let prog: &mut CgroupSock = program(&mut ebpf, release)?;
        load_retrying(release, || prog.load())?;
        let prog: &mut SockOps = program(&mut ebpf, sock_ops)?;
        load_retrying(sock_ops, || prog.load())?;
        let skb: &mut CgroupSkb = program(&mut ebpf, ACCOUNTING_HOOK)?;
        load_retrying(ACCOUNTING_HOOK, || skb.load())?;
        let tc: &mut SchedClassifier = program(&mut ebpf, TC_PROGRAM)?;
        load_retrying(TC_PROGRAM, || tc.load())?;
        let tracker: &mut TracePoint = program(&mut ebpf, FORK_TRACKER)?;
        load_retrying(FORK_TRACKER, || tracker.load())?;
        let exec: &mut RawTracePoint = program(&mut ebpf, EXEC_TRACKER)?;
        load_retrying(EXEC_TRACKER, || exec.load())?;
        // After the programs hold the ring: taking it leaves them theirs.
        let kernel_log = if sizes.kernel_log {
            Some(KernelLog::take(&mut ebpf)?)
        } else {
            None
        };
        // Blocks set by an earlier controller keep counting towards `budget_blocks`.
        let blocked = if adopt {
            maps.blocked.keys().filter_map(Result::ok).collect()
        } else {
            HashSet::new()
        };
        let dp = Datapath {
            ebpf,
            maps,
            config,
            active,
            blocked,
            pins: pins.cloned(),
            fork_tracked: false,
            tc_links: Vec::new(),
            kernel_log,
        };
        Ok((dp, adopt))
    }

    /// The reader of the kernel's debug log, once (None: loaded without `kernel_log`). Keep it
    /// while the programs run and drain it ([`KernelLog::forward`]); records it does not read
    /// in time are dropped by the kernel when its ring is full, never the decisions.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// Pins the links of the attachments to come under `pins` (maps stay unpinned): enforcement
    /// then outlives this process until the pins are removed (`egress exec`, which removes them
    /// when it ends normally). Call before [`Datapath::attach`].
    pub fn pin_links_under(&mut self, pins: Pins) -> Result<(), DatapathError> {
        pins.ensure()
            .map_err(|e| DatapathError::Pin(format!("{e:#}")))?;
        self.pins = Some(pins);
        Ok(())
    }

    /// Applies a new policy atomically: the inactive buffer is filled completely, then `ACTIVE`
    /// flips to it. Until the flip every decision uses the old policy, after it the new one; a
    /// failure before the flip leaves the old policy in force, untouched.
    ///
    /// The inactive buffer is the one the previous reload retired: a hook that read `ACTIVE`
    /// just before that flip may still be reading it. Before it is cleared, an RCU grace period
    /// passes (every program invocation runs inside an RCU read-side section, and
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()`), so no decision ever mixes two
    /// policies, however fast reloads follow each other.
    pub fn reload(&mut self, policy: &CompiledPolicy) -> Result<Applied, DatapathError> {
        let start = std::time::Instant::now();
        check_capacity(policy)?;
        self.active = self.maps.active()?;
        let next = 1 - self.active;
        wait_for_readers();
        let config = Config {
            generation: self.config.generation + 1,
            ..self.controller_fields(policy.config)
        };
        let v4_lookup = self.maps.write_buffer(next, policy, config)?;
        self.maps.set_active(next)?;
        self.active = next;
        self.config = self.maps.config(next)?;
        Ok(Applied {
            generation: config.generation,
            elapsed: start.elapsed(),
            v4_lookup,
        })
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> u32 {
        self.config.generation
    }

    /// Brings the scope tables in force up to date with `scopes` (the compiled tables with the
    /// pods of the moment, `CompiledScopes::with_pods`): the buffer in force's `SCOPE_CG` and
    /// its cgroup levels, without a reload. A pod's cgroup becomes in scope for its selectors
    /// from here on; one gone leaves them.
    pub fn set_cgroup_scopes(
        &mut self,
        scopes: &crate::policy::scopes::CompiledScopes,
    ) -> Result<(), DatapathError> {
        self.active = self.maps.active()?;
        // Levels first (a level with no entry yet costs a lookup, nothing else), then entries.
        self.config.scope_cg_levels = scopes.cg_levels;
        self.maps.set_config(self.active, self.config)?;
        self.maps.update_cgroup_scopes(self.active, &scopes.cgroup)
    }

    /// The config in force: generation, mode, default verdict, loopback.
    pub fn config(&self) -> Config {
        self.config
    }

    /// `c` with the fields the controller owns (TC scope, block count) set as they are now.
    fn controller_fields(&self, c: Config) -> Config {
        Config {
            tc_cgroup_id: self.config.tc_cgroup_id,
            tc_cgroup_level: self.config.tc_cgroup_level,
            budget_blocks: self.config.budget_blocks,
            exceptions: self.config.exceptions,
            exc_cg_levels: self.config.exc_cg_levels,
            dns_flags: self.config.dns_flags,
            dns_v4: self.config.dns_v4,
            dns_port: self.config.dns_port,
            dns_port6: self.config.dns_port6,
            dns_netns_cookie: self.config.dns_netns_cookie,
            dns_v6: self.config.dns_v6,
            ..c
        }
    }

    /// Steers the DNS queries of enforced sockets in network namespace `netns_cookie` to the
    /// proxy at `v4`/`v6` port `port`, and consults grants (`DNS_STEER | DNS_GRANTS`); `None`
    /// turns both off.
    pub fn set_dns(&mut self, dns: Option<DnsSteering>) -> Result<(), DatapathError> {
        match dns {
            Some(d) => {
                self.config.dns_flags = egress_common::DNS_STEER | egress_common::DNS_GRANTS;
                self.config.dns_v4 = d.v4.octets();
                self.config.dns_v6 = d.v6.octets();
                self.config.dns_port = d.port;
                self.config.dns_port6 = d.port6;
                self.config.dns_netns_cookie = d.netns_cookie;
            }
            None => {
                self.config.dns_flags = 0;
                self.config.dns_v4 = [0; 4];
                self.config.dns_v6 = [0; 16];
                self.config.dns_port = 0;
                self.config.dns_port6 = 0;
                self.config.dns_netns_cookie = 0;
            }
        }
        self.write_configs()
    }

    /// Writes (or refreshes) a DNS grant.
    pub fn grant(
        &mut self,
        key: egress_common::GrantKey,
        value: egress_common::GrantValue,
    ) -> Result<(), DatapathError> {
        self.maps
            .grants
            .insert(key, value, 0)
            .map_err(maps::err(map_names::GRANTS))
    }

    /// Handles of their own on the maps the DNS proxy needs (`GRANTS` to write, `SOCK_OWNERS`
    /// to find who asked), for the proxy's tasks: the same kernel maps, opened again by id.
    pub fn dns_maps(&self) -> Result<DnsMaps, DatapathError> {
        use aya::maps::IterableMap as _;
        let reopen = |data: &MapData| data.info().and_then(|i| MapData::from_id(i.id()));
        let (grants, owners) = (self.maps.grants.map(), self.maps.owners.map());
        Ok(DnsMaps {
            grants: typed_map(reopen(grants), map_names::GRANTS)?,
            grants_read: typed_map(reopen(grants), map_names::GRANTS)?,
            owners: typed_map(reopen(owners), map_names::SOCK_OWNERS)?,
        })
    }

    /// Every grant in the kernel, expired ones included.
    pub fn grants(
        &self,
    ) -> Result<Vec<(egress_common::GrantKey, egress_common::GrantValue)>, DatapathError> {
        self.maps
            .grants
            .iter()
            .map(|r| r.map_err(maps::err(map_names::GRANTS)))
            .collect()
    }

    /// Removes grants that ended before `now_ns` (CLOCK_BOOTTIME); returns how many.
    pub fn prune_grants(&mut self, now_ns: u64) -> Result<usize, DatapathError> {
        let expired: Vec<_> = self
            .grants()?
            .into_iter()
            .filter(|(_, v)| v.until_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        for k in &expired {
            let _ = self.maps.grants.remove(k);
        }
        Ok(expired.len())
    }

    /// Writes the controller-owned config fields into both buffers.
    fn write_configs(&mut self) -> Result<(), DatapathError> {
        let other = 1 - self.active;
        let inactive = self.controller_fields(self.maps.config(other)?);
        let active = self.controller_fields(self.config);
        self.maps.set_config(other, inactive)?;
        self.maps.set_config(self.active, active)
    }

    /// Restricts the TC program to packets of sockets in `cgroup` (and below). Call before
    /// [`Datapath::attach_tc`]. Not calling it means every packet on the interfaces.
    pub fn set_tc_scope(&mut self, cgroup_id: u64, level: u32) -> Result<(), DatapathError> {
        self.config.tc_cgroup_id = cgroup_id;
        self.config.tc_cgroup_level = level;
        self.write_configs()
    }

    /// Attaches every cgroup hook (sock_release and sock_ops first, then the cgroup_skb egress
    /// accounting, sock_addr, sock_create, setsockopt) to the cgroup2 directory `cgroup` through BPF links, and the fork tracker
    /// (host-wide: what it records only matters for blocked processes, which are in the cgroup).
    /// A cgroup link always coexists with other programs there and in ancestor cgroups (every
    /// attached program must allow a call), and the kernel rejects attach flags on links, hence
    /// `Single` (flags 0). A link a previous controller pinned gets our program in place instead.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        if !self.fork_tracked {
            // The exec tracker first, then the fork tracker (which copies its entries), then the
            // processes already running: no process is ever without an identity once the hooks
            // that read it are attached.
            self.attach_exec_tracker()?;
            self.attach_fork_tracker()?;
            let seeded = self.seed_procs();
            tracing::debug!(seeded, "recorded the executables of running processes");
            self.fork_tracked = true;
        }
        let dir = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let [release, sock_ops] = OWNER_HOOKS;
        attach_cgroup_program!(self, CgroupSock, release, &dir);
        attach_cgroup_program!(self, SockOps, sock_ops, &dir);
        // Accounting reads the owners: it starts with them, before the hooks that record them.
        attach_cgroup_program!(
            self,
            CgroupSkb,
            ACCOUNTING_HOOK,
            &dir,
            CgroupSkbAttachType::Egress
        );
        for name in HOOKS {
            attach_cgroup_program!(self, CgroupSockAddr, name, &dir);
        }
        attach_cgroup_program!(self, CgroupSock, SOCK_CREATE_HOOK, &dir);
        // aya cannot turn a setsockopt link into a pinnable `FdLink`: pinned, it is created
        // through bpf(2) directly.
        let pinned = self.pins.as_ref().map(|p| p.link(SOCKOPT_HOOK));
        let prog: &mut CgroupSockopt = program(&mut self.ebpf, SOCKOPT_HOOK)?;
        let fd = prog.fd().map_err(prog_err(SOCKOPT_HOOK))?;
        if take_over(pinned.as_deref(), fd)? {
            return Ok(());
        }
        match pinned {
            Some(path) => links::pin_cgroup_link(
                fd,
                &dir,
                aya_obj::generated::bpf_attach_type::BPF_CGROUP_SETSOCKOPT,
                &path,
            ),
            None => prog
                .attach(&dir, CgroupAttachMode::Single)
                .map(drop)
                .map_err(prog_err(SOCKOPT_HOOK)),
        }
    }

    /// Attaches the TC egress program to each interface: TCX on kernels with it (6.6+), else a
    /// clsact qdisc filter. Other programs on the interface keep running.
    pub fn attach_tc(&mut self, ifaces: &[String]) -> Result<(), DatapathError> {
        let tcx = features::has_tcx();
        for iface in ifaces {
            let iface_err = |message: String| DatapathError::Iface {
                iface: iface.clone(),
                message,
            };
            let ifindex = crate::sys::iface::index(iface).map_err(|e| iface_err(e.to_string()))?;
            let l2 = crate::sys::iface::l2_header_len(iface);
            self.maps
                .iface_l2
                .insert(ifindex, l2, 0)
                .map_err(maps::err(map_names::IFACE_L2))?;
            if !tcx {
                // EEXIST: a clsact qdisc is already there (ours from an earlier start, or
                // another tool's), which is what we need. Judged by the errno: the message
                // differs by kernel (6.1's extack says "Exclusivity flag on, cannot modify").
                if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface)
                    && !clsact_exists(&e)
                {
                    return Err(iface_err(format!("adding clsact qdisc: {e}")));
                }
            }
            if !tcx {
                // A netlink filter is not tied to a file descriptor: one attached by an earlier
                // controller that was killed (or crashed) is still there, running the programs
                // that controller loaded. Replace it rather than run both (each packet counted
                // twice, the old code judging with maps no one updates any more). TC is
                // detached for one netlink round trip; the cgroup hooks never are.
                match aya::programs::tc::qdisc_detach_program(
                    iface,
                    TcAttachType::Egress,
                    TC_PROGRAM,
                ) {
                    Ok(()) => tracing::info!(
                        iface = %iface,
                        "replaced the TC filter an earlier controller left on the interface"
                    ),
                    Err(aya::programs::tc::TcError::IoError(e))
                        if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(iface_err(format!(
                            "removing an earlier controller's TC filter: {e}"
                        )));
                    }
                }
            }
            // Only TCX links can be pinned. A netlink (pre-6.6) filter is detached when this
            // controller drops it (a clean exit); enforcement at the cgroup hooks is pinned
            // regardless.
            let pinned = self
                .pins
                .as_ref()
                .filter(|_| tcx)
                .map(|p| p.link(&format!("tc-{iface}")));
            let prog: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
            if take_over(pinned.as_deref(), prog.fd().map_err(prog_err(TC_PROGRAM))?)? {
                continue;
            }
            let id = prog
                .attach(iface, TcAttachType::Egress)
                .map_err(prog_err(TC_PROGRAM))?;
            match pinned {
                Some(path) => pin_link(prog.take_link(id).map_err(prog_err(TC_PROGRAM))?, &path)?,
                None => self.tc_links.push(id),
            }
        }
        Ok(())
    }

    /// Detaches the TC program from every interface [`Datapath::attach_tc`] attached it to
    /// without pinning (the benchmark alternates runs with and without it).
    pub fn detach_tc(&mut self) -> Result<(), DatapathError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
        for id in self.tc_links.drain(..) {
            prog.detach(id).map_err(prog_err(TC_PROGRAM))?;
        }
        Ok(())
    }

    /// Kernel memory charged to the lookup structures of `family` (4 or 6), both policy buffers:
    /// range tables and tries for IPv4, tries for IPv6.
    pub fn policy_memlock(&self, family: u8) -> Option<u64> {
        self.maps.lookup_memlock(family)
    }

    /// Every flow counter, summed over CPUs.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.maps.flows.iter() {
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
    pub fn remove_flows(&mut self, keys: &[FlowKey]) {
        for k in keys {
            let _ = self.maps.flows.remove(k);
        }
    }

    /// The comm of every process that recorded a socket owner (the most recent ones, as many as
    /// `PROC_COMMS` holds), for processes that exited before /proc could be read. One walk of
    /// the map.
    pub fn owner_comms(&self) -> std::collections::HashMap<u32, String> {
        self.maps
            .comms
            .iter()
            .filter_map(Result::ok)
            .map(|(tgid, comm)| (tgid, egress_common::user::comm_str(&comm)))
            .collect()
    }

    /// How many socket owners are recorded: one per open socket that connected or sent. One walk
    /// of the keys.
    pub fn owner_count(&self) -> usize {
        self.maps.owners.keys().filter_map(Result::ok).count()
    }

    /// How full the bounded maps are: entries (one walk of each map's keys) and capacity, for
    /// the metrics. Flows, socket owners, byte-budget blocks, the processes blocks cover, and DNS
    /// grants.
    pub fn map_fill(&self) -> Vec<MapFill> {
        fn fill<K: aya::Pod, V, M: aya::maps::IterableMap<K, V>>(
            name: &'static str,
            m: &M,
            keys: usize,
        ) -> MapFill {
            MapFill {
                map: name,
                entries: keys as u64,
                capacity: m.map().info().map_or(0, |i| i.max_entries()),
            }
        }
        let m = &self.maps;
        vec![
            fill(
                "flows",
                &m.flows,
                m.flows.keys().filter_map(Result::ok).count(),
            ),
            fill(
                "owners",
                &m.owners,
                m.owners.keys().filter_map(Result::ok).count(),
            ),
            fill(
                "blocks",
                &m.blocked,
                m.blocked.keys().filter_map(Result::ok).count(),
            ),
            fill(
                "block_tree",
                &m.block_tree,
                m.block_tree.keys().filter_map(Result::ok).count(),
            ),
            fill(
                "grants",
                &m.grants,
                m.grants.keys().filter_map(Result::ok).count(),
            ),
        ]
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<EventRing, DatapathError> {
        self.maps
            .events
            .take()
            .map(EventRing::new)
            .ok_or(DatapathError::Missing("EVENTS map (already taken)"))
    }

    /// The datapath's counters.
    pub fn stats(&self) -> Result<Counters, DatapathError> {
        maps::sum_stats(&self.maps.stats)
    }

    /// The kernel's id of loaded program `name`.
    pub fn program_id(&self, name: &'static str) -> Result<u32, DatapathError> {
        let info = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Missing(name))?
            .info()
            .map_err(prog_err(name))?;
        Ok(info.id())
    }

    /// The kernel's run-time statistics of program `name` (one of [`HOOKS`], ...) since it was
    /// loaded; they only grow while [`enable_run_stats`] holds them on.
    pub fn run_stats(&self, name: &'static str) -> Result<RunStats, DatapathError> {
        let info = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Missing(name))?
            .info()
            .map_err(prog_err(name))?;
        Ok(RunStats {
            run_time: info.run_time(),
            run_count: info.run_count(),
            verified_insns: info.verified_instruction_count().unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_flow_table_shrinks_with_many_possible_cpus_within_its_budget() {
        assert_eq!(super::flows_capacity(1), super::FLOWS_CAPACITY);
        assert_eq!(super::flows_capacity(2), super::FLOWS_CAPACITY);
        assert_eq!(super::flows_capacity(16), super::FLOWS_CAPACITY);
        assert_eq!(super::flows_capacity(64), 16_384);
        assert_eq!(super::flows_capacity(256), 4_096);
        assert_eq!(super::flows_capacity(8192), super::FLOWS_CAPACITY_MIN);
        for cpus in [1, 3, 21, 22, 64, 100, 128] {
            let n = u64::from(super::flows_capacity(cpus));
            assert!(
                n * 24 * cpus as u64 <= super::FLOWS_PER_CPU_BUDGET,
                "{cpus}"
            );
            assert!(n.is_power_of_two());
        }
    }

    #[test]
    fn verifier_summaries_keep_why_it_stopped() {
        // The end of Linux 6.1's log for the TC program's unrolled rule scan.
        let log = "0: R1=ctx(off=0,imm=0) R10=fp0\n; while i < MAX_PORT_RULES {\n2002: (25) if r3 > 0x3e goto pc-408   ; R3=4\nBPF program is too large. Processed 1000001 insn\nverification time 85773297 usec\nstack depth 320+0+8\nprocessed 1000001 insns (limit 1000000) max_states_per_insn 62\n";
        assert_eq!(
            super::verifier_summary(log),
            "BPF program is too large. Processed 1000001 insn; processed 1000001 insns (limit 1000000) max_states_per_insn 62"
        );
        assert_eq!(super::verifier_summary(""), "the verifier gave no log");
    }

    #[test]
    fn the_range_table_is_sized_for_the_capacity_asked_or_twice_the_starting_policy() {
        use super::{PREFIX_CAPACITY, range_entries, range_entries_for};
        use crate::policy::{Policy, compile::CompiledPolicy};
        assert_eq!(range_entries(None, None), 3 * PREFIX_CAPACITY + 1);
        assert_eq!(range_entries(Some(10), None), 31);
        // 2,000 disjoint /32s, one per chunk: a head and two edges each.
        let dests: Vec<String> = (0..2000u32)
            .map(|i| {
                format!(
                    "\"{}\"",
                    std::net::Ipv4Addr::from(0x0a00_0000 + (i << 12) + 7)
                )
            })
            .collect();
        let text = format!(
            "[[block]]\nname = \"b\"\ndestinations = [{}]\n",
            dests.join(", ")
        );
        let c = CompiledPolicy::compile(&Policy::parse("t.toml", &text).unwrap()).unwrap();
        let need = c.v4_ranges().unwrap().range_entries() as u32;
        assert_eq!(
            need,
            3 * 2000,
            "the bound of 3 entries per prefix is reached"
        );
        assert!(need <= range_entries_for(2000));
        assert_eq!(range_entries(Some(10), Some(&c)), 2 * need);
        assert_eq!(
            range_entries(None, Some(&c)),
            range_entries_for(PREFIX_CAPACITY)
        );
    }

    #[test]
    fn the_object_has_exactly_the_maps_egress_common_names() {
        let obj = aya_obj::Object::parse(super::EBPF_OBJECT).expect("parsing the embedded object");
        let mut in_object: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with('.'))
            // aya-log's ring (`--kernel-log`): never pinned, a fresh one per load.
            .filter(|&n| n != "AYA_LOGS")
            .collect();
        in_object.sort_unstable();
        let mut named = egress_common::map_names::ALL.to_vec();
        named.sort_unstable();
        assert_eq!(in_object, named);
    }

    /// The socket-owner map of earlier versions was an LRU of the same key and value: pinned, it
    /// must be refused (its evictions are the flood this map now resists), not reused.
    #[test]
    fn a_pinned_lru_owner_map_does_not_fit_and_a_resized_one_only_when_allowed() {
        use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};
        use egress_common::map_names::SOCK_OWNERS;
        let expected = super::maps::expected_maps(64, 100).unwrap();
        let want = expected[SOCK_OWNERS];
        assert_eq!(want.map_type, BPF_MAP_TYPE_HASH as u32);
        assert_eq!(
            (want.key_size, want.value_size, want.max_entries),
            (8, 40, 64)
        );
        let lru = super::pins::MapShape {
            map_type: BPF_MAP_TYPE_LRU_HASH as u32,
            max_entries: super::OWNERS_CAPACITY,
            ..want
        };
        assert_eq!(lru.fits(&want, true), Err("layout"));
        let bigger = super::pins::MapShape {
            max_entries: 1 << 20,
            ..want
        };
        assert_eq!(bigger.fits(&want, false), Err("size"));
        assert_eq!(bigger.fits(&want, true), Ok(()));
        assert_eq!(
            super::maps::expected_maps(super::OWNERS_CAPACITY, 100).unwrap()[SOCK_OWNERS]
                .max_entries,
            131_072
        );
    }
}

#[cfg(test)]
mod grace_tests {
    /// The grace period between reloads is the kernel's RCU one, not the fallback pause: the
    /// command must be there (it is on every kernel without nohz_full CPUs).
    #[test]
    fn membarrier_global_is_available_and_returns() {
        // SAFETY: membarrier takes no pointers.
        let supported = unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) };
        assert!(
            supported >= 0 && supported & 1 != 0,
            "MEMBARRIER_CMD_GLOBAL: {supported}"
        );
        let t = std::time::Instant::now();
        super::wait_for_readers();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
