//! Every map of the datapath, in one place. Kernel names are capped at 15 characters.
//!
//! Sizes given here are placeholders for the policy maps and `SOCK_OWNERS`: the controller sets
//! their `max_entries` at load time (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use egress_common::{
    BlockKey, BlockValue, Config, DnsOrig, ExceptionList, ExeKey, FlowKey, FlowValue, GrantKey,
    GrantValue, Owner, PrefixValue, ProcIdentity, RuleSet, STAT_COUNT, ScopeBits,
    ranges::{RangeLine, V4_DIR_LINES},
};

// The policy is double-buffered so that a reload is atomic: the controller fills the inactive
// buffer (tries, rule sets, config) completely, then flips `ACTIVE` with one 4-byte write. A hook
// reads `ACTIVE` once and then only that buffer, so no decision ever mixes two policies.

/// IPv4 policy prefixes -> rule set, buffer 0 and 1. Written by the controller (compile step),
/// read by every hook. v4-mapped IPv6 destinations are looked up here too. No preallocation:
/// `max_entries` is a ceiling that costs nothing until used.
#[map]
pub static POLICY_V4_0: LpmTrie<[u8; 4], PrefixValue> = LpmTrie::with_max_entries(1, 0);
#[map]
pub static POLICY_V4_1: LpmTrie<[u8; 4], PrefixValue> = LpmTrie::with_max_entries(1, 0);

/// The IPv4 range table of buffer 0 and 1 (`egress_common::ranges`): the chunk directory
/// (2^20 entries in 64-byte lines, 4 MiB) and the chunks' interval lists (`max_entries`
/// entries of 8 bytes, set by the controller at load: `--prefix-capacity`). Written by the
/// controller (the compile step's table, through mmap), read by every hook when the
/// buffer's `Config::lookup` has `LOOKUP_V4_RANGES`. Plain ARRAYs: the verifier inlines their
/// lookups (no helper call), and their cost does not depend on the policy's size.
#[map]
pub static DIR_V4_0: Array<RangeLine> = Array::with_max_entries(V4_DIR_LINES, BPF_F_MMAPABLE);
#[map]
pub static DIR_V4_1: Array<RangeLine> = Array::with_max_entries(V4_DIR_LINES, BPF_F_MMAPABLE);
#[map]
pub static RANGES_V4_0: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static RANGES_V4_1: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// IPv6 policy prefixes -> rule set, buffer 0 and 1. Written by the controller, read by the
/// hooks.
#[map]
pub static POLICY_V6_0: LpmTrie<[u8; 16], PrefixValue> = LpmTrie::with_max_entries(1, 0);
#[map]
pub static POLICY_V6_1: LpmTrie<[u8; 16], PrefixValue> = LpmTrie::with_max_entries(1, 0);

/// Rule sets (port ranges, protocols, block/allow, deciding rule) referenced by the tries, buffer
/// 0 and 1. Written by the controller, read by the hooks.
#[map]
pub static RULESETS_0: HashMap<u32, RuleSet> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
pub static RULESETS_1: HashMap<u32, RuleSet> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Mode, default verdict, loopback switch and generation of each buffer (entries 0 and 1).
/// Written by the controller, read by every hook.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(2, 0);

/// The buffer in force (0 or 1). Written by the controller last, read first by every hook.
#[map]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `STAT_*`. Written by the hooks, summed by the controller.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Deny and audit events (`egress_common::Event`) to the controller. When it is full the verdict
/// still stands and `STAT_EVENTS_LOST` is incremented.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Socket cookie -> owner (process, user, cgroup, comm). Written by the connect/sendmsg hooks for
/// every allowed call, read by the `cgroup_skb/egress` program and TC to attribute packets (sent
/// in softirq context, or in another network namespace), deleted when the
/// socket is done (`sock_release`; TCP at `TCP_CLOSE`, from `sock_ops`): see `owners.rs`.
/// Not LRU: a flood of short-lived sockets must never evict a live socket's owner. When it is
/// full, a connect/sendmsg that needs a new entry is refused in enforce mode (`owners-full`,
/// `STAT_OWNERS_FULL`). Preallocated, so that an insert fails only when it is full. The controller
/// sets `max_entries` (`--owners-capacity`, default 131,072: one entry per open socket that
/// connected or sent).
#[map]
pub static SOCK_OWNERS: HashMap<u64, Owner> = HashMap::with_max_entries(131_072, 0);

/// Process (tgid) -> comm, of every process that recorded a socket owner. Written with the
/// owner by the connect/sendmsg hooks, read by the controller to name a process that exited (and
/// whose owners are gone with its sockets) before it could read /proc. LRU: an evicted entry
/// costs a name in the reports, never attribution (the flows carry the tgid).
#[map]
pub static PROC_COMMS: LruHashMap<u32, [u8; 16]> = LruHashMap::with_max_entries(16_384, 0);

/// Per-CPU packet and byte counters per (owner, destination). Written by the `cgroup_skb/egress`
/// program (packets of sockets with a recorded owner) and by TC (the rest: each packet is counted
/// by exactly one of them), read (and pruned of exited owners) by the controller. Not LRU: when it is full, new flows are counted in
/// `STAT_FLOWS_FULL_*` instead of evicting someone else's counts. The controller sizes it at load
/// from the number of possible CPUs (`flows_capacity`): every entry's counters are preallocated
/// for each of them.
#[map]
pub static FLOWS: PerCpuHashMap<FlowKey, FlowValue> = PerCpuHashMap::with_max_entries(65_536, 0);

/// ifindex -> link-layer header length, for interfaces without an Ethernet header (tun,
/// wireguard: 0). Written by the controller at attach time; missing means Ethernet (14). Read by
/// TC and the `cgroup_skb/egress` program.
#[map]
pub static IFACE_L2: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);

/// Byte-budget blocks (`[[alert]] action = "block"`): a process, everywhere or towards one
/// destination, gets EPERM on connect/sendmsg and its packets are dropped at TC until `until_ns`;
/// so do (at connect/sendmsg) the processes it creates after the block, through `BLOCK_TREE`
/// and the block's `BLOCK_SCOPE_DESCENDANTS` twin. Written by the controller, read by every
/// hook.
#[map]
pub static BLOCKED: HashMap<BlockKey, BlockValue> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// Process (tgid) -> the blocked process whose block covers it: the blocked process itself (the
/// root, written by the controller when it blocks the process) and every process created by a
/// process with an entry, from then on (written by the fork tracker, `fork.rs`, before the new
/// process can run; threads are not entries: they share their process's tgid). Read by the fork
/// tracker and the connect/sendmsg hooks, which then look up the root's
/// `BLOCK_SCOPE_DESCENDANTS` block; never by TC (its instruction budget is spent; the sockets a
/// child inherits are owned by the blocked parent already). The controller deletes the entries
/// of processes that have exited (a reused pid must not inherit a block) and of blocks that
/// ended. Preallocated, as a tracing program's maps should be; when it is full a new process is
/// not recorded and `STAT_TREE_FULL` is counted.
#[map]
pub static BLOCK_TREE: HashMap<u32, u32> = HashMap::with_max_entries(16_384, 0);

/// DNS grants: (cgroup, address) -> (until, service rule set). Written by the controller's DNS
/// proxy before it answers a query for a name a `hosts` service covers; read by the
/// connect/sendmsg hooks after the address rules (`DNS_GRANTS`). Not LRU: a full map makes the
/// proxy answer SERVFAIL (fail-closed) rather than evict a live grant; the controller removes
/// expired entries. Survives controller restarts (pinned).
#[map]
pub static GRANTS: HashMap<GrantKey, GrantValue> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Break-glass exceptions (`egress allow`): scope (`exception_scope`: a process by tgid, a
/// cgroup by id, a user by uid) -> its live exceptions (destination prefix, ports, protocols,
/// id, end). Written by the controller when an exception is granted, revoked or has ended;
/// read by the connect/sendmsg hooks only where the policy refuses a call and
/// `Config::exceptions` says entries exist. Each exception carries its own end
/// (CLOCK_BOOTTIME), checked by the hooks: it ends on time with no controller. An 8-byte key,
/// not an LPM trie: the lookup runs in a frame of its own below the decision's (near 512 bytes
/// already), which has room for little more than that. Pinned: exceptions survive controller
/// restarts.
#[map]
pub static EXCEPTIONS: HashMap<u64, ExceptionList> =
    HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Socket cookie -> the DNS server a steered socket addressed, so that answers from the proxy
/// appear to come from it (recvmsg, getpeername). Written by the connect/sendmsg hooks when
/// they steer, read by the recvmsg/getpeername hooks. LRU: an evicted entry only makes an answer
/// show the proxy's address (the resolver retries), never lets anything through.
#[map]
pub static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(16_384, 0);

/// Process (tgid) -> the identity (device, inode) of the file it runs. Written by the exec
/// tracker (`exec.rs`) at every exec, copied to a forked child by the fork tracker (or deleted
/// there when the creator has none, so a reused pid never inherits a stale identity), seeded by
/// the controller at start from /proc (without overwriting what the kernel wrote). Read by the
/// connect/sendmsg hooks when the policy scopes entries by executable. LRU: an evicted process
/// is read from `current->mm->exe_file` instead, never mistaken for another.
#[map]
pub static PROCS: LruHashMap<u32, ProcIdentity> = LruHashMap::with_max_entries(65_536, 0);

// Scope tables, double-buffered like the policy (`_0`/`_1` by `Config::buffer`): one value of a
// selector key -> the scopes it admits (see `egress_common::ScopeTables`). Written by the
// controller (compile step), read by the connect/sendmsg hooks. No preallocation.

/// Executable identity -> scopes.
#[map]
pub static SCOPE_EXE_0: HashMap<ExeKey, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
#[map]
pub static SCOPE_EXE_1: HashMap<ExeKey, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
/// Real uid -> scopes.
#[map]
pub static SCOPE_UID_0: HashMap<u32, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
#[map]
pub static SCOPE_UID_1: HashMap<u32, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
/// Real gid -> scopes.
#[map]
pub static SCOPE_GID_0: HashMap<u32, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
#[map]
pub static SCOPE_GID_1: HashMap<u32, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
/// cgroup id -> the scopes naming that cgroup (and so everything below it).
#[map]
pub static SCOPE_CG_0: HashMap<u64, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
#[map]
pub static SCOPE_CG_1: HashMap<u64, ScopeBits> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);
/// Per buffer and key (`buffer * SCOPE_KEYS + SCOPE_KEY_*`): the scopes a value missing from
/// the key's table admits.
#[map]
pub static SCOPE_DEF: Array<ScopeBits> = Array::with_max_entries(8, 0);
