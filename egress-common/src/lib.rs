//! Types shared by the eBPF datapath and the userspace controller.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and a size assertion, so the
//! kernel and userspace always agree on the layout. Userspace gets `aya::Pod` impls behind the
//! `user` feature.
#![no_std]

use core::mem::size_of;

/// Maximum number of port rules one destination prefix can carry, after the rules of all covering
/// prefixes have been folded in (see `compile` in egress-userspace). The kernel scans at most this
/// many entries per decision.
pub const MAX_PORT_RULES: usize = 64;

/// `rule_id` of the policy's default verdict (no service or block matched).
pub const RULE_DEFAULT: u32 = 0;
/// `rule_id` of the loopback short-cut (`allow_loopback = true`).
pub const RULE_LOOPBACK: u32 = u32::MAX;
/// `rule_id` of a refused source route: an `IP_OPTIONS` source route or an `IPV6_RTHDR`
/// routing header (set with setsockopt, or found on a packet at TC). Events name it
/// `source-route`.
pub const RULE_SOURCE_ROUTE: u32 = u32::MAX - 1;
/// `rule_id` of a connect/sendmsg refused because the socket's owner could not be recorded
/// (`SOCK_OWNERS` full): its packets could not be attributed, so in enforce mode the call fails
/// closed rather than let an unattributed upload escape per-process budgets and alerts. Events
/// name it `owners-full`.
pub const RULE_OWNERS_FULL: u32 = u32::MAX - 2;

/// Protocol bits of [`PortRule::proto_mask`].
pub const PROTO_TCP: u8 = 1 << 0;
pub const PROTO_UDP: u8 = 1 << 1;
/// Any other IP protocol (SCTP, UDP-Lite, ... at TC). Only blocks can name it, implicitly, by
/// omitting `protocols`.
pub const PROTO_OTHER: u8 = 1 << 2;
/// ICMP (ping sockets, echo requests at TC): `protocols = ["icmp"]`.
pub const PROTO_ICMP: u8 = 1 << 3;
/// ICMPv6: `protocols = ["icmpv6"]`.
pub const PROTO_ICMPV6: u8 = 1 << 4;
/// The bits of protocols without ports: their rules span every port.
pub const PROTO_PORTLESS: u8 = PROTO_OTHER | PROTO_ICMP | PROTO_ICMPV6;

/// IANA protocol numbers as the kernel reports them in `bpf_sock_addr.protocol`.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The bit of [`PortRule::proto_mask`] that an IP protocol number falls under.
#[inline(always)]
pub const fn proto_bit(ipproto: u8) -> u8 {
    match ipproto {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        IPPROTO_ICMP => PROTO_ICMP,
        IPPROTO_ICMPV6 => PROTO_ICMPV6,
        _ => PROTO_OTHER,
    }
}

/// What a matching [`PortRule`] decides.
pub const ACTION_ALLOW: u8 = 1;
pub const ACTION_BLOCK: u8 = 2;

/// One port/protocol rule of a [`RuleSet`]. Ports are inclusive and in host byte order. For
/// protocols without ports (`PROTO_OTHER`) the port is whatever the kernel reports (the sockaddr's
/// port for an ICMP connect, 0 at TC), so only rules spanning 0-65535 carry `PROTO_OTHER`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    pub port_lo: u16,
    pub port_hi: u16,
    /// `PROTO_*` bits.
    pub proto_mask: u8,
    /// `ACTION_ALLOW` or `ACTION_BLOCK`.
    pub action: u8,
    /// The protocol bits the TC program matches on: `proto_mask` for an enforced rule that
    /// applies to everyone, 0 for a scoped or per-entry audit rule. TC judges packets without
    /// knowing who sent them (unattributed traffic, ping echoes), so only those rules can decide
    /// there; reading this byte instead of `proto_mask` costs TC no instruction.
    pub tc_mask: u8,
    /// `RULE_F_*` bits.
    pub flags: u8,
    /// Index of the deciding service/block in the controller's rule table (never `RULE_DEFAULT`).
    pub rule_id: u32,
    /// Who the rule applies to: 0 everyone, else a scope id (1..`MAX_SCOPES`): the rule matches
    /// only callers whose [`ScopeBits`] have that bit.
    pub scope: u32,
}

/// `PortRule::flags`: the entry is in audit mode (`mode = "audit"`): a block reports the calls it
/// would refuse and refuses none; a scoped service reports the callers its scope would refuse
/// and lets them through.
pub const RULE_F_AUDIT: u8 = 1 << 0;
const _: () = assert!(size_of::<PortRule>() == 16);

/// The rules that apply to every destination inside one policy prefix. Block rules come first, so
/// the first match is the verdict ("explicit blocks win over any approval").
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleSet {
    pub len: u32,
    pub _pad: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}
const _: () = assert!(size_of::<RuleSet>() == 8 + 16 * MAX_PORT_RULES);

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            rules: [PortRule::default(); MAX_PORT_RULES],
        }
    }
}

/// Value of the LPM tries `POLICY_V4` / `POLICY_V6`: which [`RuleSet`] a prefix uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixValue {
    /// Index into the `RULESETS` array.
    pub ruleset: u32,
}
const _: () = assert!(size_of::<PrefixValue>() == 4);

/// `Config::mode`.
pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;
/// `Config::default_verdict`.
pub const DEFAULT_DENY: u32 = 0;
pub const DEFAULT_ALLOW: u32 = 1;

/// The single entry of the `CONFIG` array. An all-zero `Config` (a map never written) is
/// enforce + default deny + no loopback: the fail-closed state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub mode: u32,
    pub default_verdict: u32,
    /// 1: loopback destinations (127.0.0.0/8, ::1, the unspecified address, and their v4-mapped
    /// forms) are allowed without consulting the policy.
    pub allow_loopback: u32,
    /// Generation of the policy in force, copied into every event.
    pub generation: u32,
    /// TC scope: when non-zero, the TC program only touches packets whose socket belongs to this
    /// cgroup (or a descendant); 0 means every packet (a controller attached to the root).
    pub tc_cgroup_id: u64,
    /// Level of `tc_cgroup_id` in the hierarchy (the root is 0).
    pub tc_cgroup_level: u32,
    /// Number of entries in `BLOCKED` (byte-budget blocks); 0 skips the lookups.
    pub budget_blocks: u32,
    /// Which policy buffer (0 or 1: `POLICY_V4_0`/`_1`, ...) this config describes. The hooks
    /// read `ACTIVE`, then `CONFIG[ACTIVE]`, then only that buffer's maps.
    pub buffer: u32,
    /// How many entries of `nat64` are in use.
    pub nat64_count: u16,
    /// `LOOKUP_*` bits: which structure IPv4 destinations are looked up in. (A u16 beside
    /// `nat64_count`: the hooks copy `Config` onto a stack near its 512-byte limit.)
    pub lookup: u16,
    /// The policy's own NAT64 /96 prefixes (`nat64_prefixes`), first 12 bytes each; the
    /// well-known `64:ff9b::/96` is always recognised and not listed here.
    pub nat64: [[u8; 12]; MAX_NAT64_PREFIXES],
    /// `[sockets]`: what the sock_create hook does with each class of socket the
    /// connect/sendmsg hooks cannot judge, indexed by `SOCKETS_*`; each `SOCK_*`. All zero (a
    /// config never written) refuses them all: fail-closed.
    pub sockets: [u8; 4],
    /// `DNS_*` bits: whether DNS is steered to the controller's proxy and grants are consulted.
    pub dns_flags: u32,
    /// The proxy's IPv4 address (network order bytes) and port (host order).
    pub dns_v4: [u8; 4],
    pub dns_port: u16,
    /// The port of the proxy's IPv6 address (host order).
    pub dns_port6: u16,
    /// Network namespace (`bpf_get_netns_cookie`) the proxy listens in: only sockets of that
    /// namespace are steered to it (elsewhere its loopback address is another host's). 0: the
    /// proxy listens on addresses other namespaces reach (not loopback): sockets of every
    /// namespace are steered.
    pub dns_netns_cookie: u64,
    /// The proxy's IPv6 address.
    pub dns_v6: [u8; 16],
    /// Which selector keys the policy's scopes use (bits `1 << SCOPE_KEY_*`); 0: no rule is
    /// scoped, and the hooks resolve no scope.
    pub scope_keys: u32,
    /// The cgroup levels (bit n: level n, the root is 0) at which the policy's `cgroups`
    /// selectors sit: the hooks look up the caller's ancestor at each.
    pub scope_cg_levels: u32,
    /// Number of entries in `EXCEPTIONS` (break-glass exceptions, `egress allow`); 0 skips the
    /// lookup, so that a host without exceptions pays nothing for them.
    pub exceptions: u32,
    /// The cgroup levels (bit n: level n, the root is 0) at which `--cgroup` exceptions sit:
    /// the hooks look up the caller's ancestor at each.
    pub exc_cg_levels: u32,
}
const _: () = assert!(size_of::<Config>() == 144);

impl Config {
    /// The all-zero config: enforce, default deny, no loopback, buffer 0 (fail-closed).
    // SAFETY: every field is an integer or an array of integers, for which zero is valid.
    pub const ZERO: Config = unsafe { core::mem::zeroed() };
}

/// `Config::lookup`: IPv4 destinations are looked up in the buffer's range table
/// (`DIR_V4_n`/`RANGES_V4_n`, [`ranges`]); without it, in its trie (`POLICY_V4_n`: a policy
/// the range table has no room for). A table that reads as inconsistent fails closed.
pub const LOOKUP_V4_RANGES: u16 = 1 << 0;

/// `Config::dns_flags`: DNS queries (TCP/UDP port 53) of enforced sockets are steered to the
/// proxy, and answers appear to come from the server the process asked.
pub const DNS_STEER: u32 = 1 << 0;
/// `Config::dns_flags`: the decision consults `GRANTS` (addresses learned from DNS answers to
/// names a `hosts` service covers) after the address rules.
pub const DNS_GRANTS: u32 = 1 << 1;
/// `SO_MARK` of the proxy's own upstream sockets: never steered (its queries would loop back into
/// it). Setting a mark needs CAP_NET_ADMIN, which an enforced workload must not have.
pub const DNS_UPSTREAM_MARK: u32 = 0x6567_7273;
/// The port DNS is steered from.
pub const DNS_PORT: u16 = 53;

/// Key of `GRANTS`: an address one cgroup learned from a DNS answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    /// The cgroup of the process that resolved the name (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// 4 (address in the first 4 bytes) or 6.
    pub family: u8,
    pub _pad: [u8; 7],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<GrantKey>() == 32);

/// Value of `GRANTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantValue {
    /// CLOCK_BOOTTIME nanoseconds when the grant ends: new connects are judged without it after
    /// that (established ones are left alone).
    pub until_ns: u64,
    /// Key of the service's rule set in `RULESETS` (`GRANT_SET_BASE | slot`): the ports and
    /// protocols the service approves, looked up in the buffer in force, so a reload that
    /// changes them applies to live grants at once.
    pub ruleset: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<GrantValue>() == 16);

/// `rule_id` of a call a break-glass exception (`egress allow`) let through where the policy
/// would have refused it. Events name it `exception`.
pub const RULE_EXCEPTION: u32 = u32::MAX - 16;

/// Whom a break-glass exception covers, in the top byte of its [`exception_scope`] key.
pub const EXC_PROCESS: u8 = 1;
pub const EXC_CGROUP: u8 = 2;
pub const EXC_USER: u8 = 3;
/// Exceptions one scope (a process, a cgroup, a user) may hold at once.
pub const EXC_ENTRIES: usize = 8;
/// The deepest cgroup level a `--cgroup` exception may sit at (bits of `exc_cg_levels`).
pub const EXC_MAX_CG_LEVEL: u32 = 31;
/// Scope ids (cgroup ids) must fit below the kind byte.
pub const EXC_ID_MASK: u64 = (1 << 56) - 1;

/// The `EXCEPTIONS` key of a scope: its kind (`EXC_*`) in the top byte, its id (tgid, cgroup
/// id, uid) below. Eight bytes, so that the hooks' lookup needs almost no stack (they are near
/// the 512-byte limit).
#[inline(always)]
pub const fn exception_scope(kind: u8, id: u64) -> u64 {
    ((kind as u64) << 56) | (id & EXC_ID_MASK)
}

/// One break-glass exception of a scope: a destination prefix (as two big-endian halves and
/// their masks: `addr & mask == net`), ports, protocols and its end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExceptionEntry {
    pub net_hi: u64,
    pub net_lo: u64,
    pub mask_hi: u64,
    pub mask_lo: u64,
    /// CLOCK_BOOTTIME nanoseconds when the exception ends (0: an empty entry). The hooks ignore
    /// it after that, controller or not.
    pub until_ns: u64,
    /// The exception's id (`egress revoke ID`).
    pub id: u32,
    /// Inclusive port range, host order.
    pub port_lo: u16,
    pub port_hi: u16,
    /// 4 or 6.
    pub family: u8,
    /// `PROTO_*` bits.
    pub proto_mask: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<ExceptionEntry>() == 56);

/// Value of `EXCEPTIONS`: the live exceptions of one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionList {
    pub entries: [ExceptionEntry; EXC_ENTRIES],
}
const _: () = assert!(size_of::<ExceptionList>() == 56 * EXC_ENTRIES);

/// The two big-endian halves of a 16-byte address field (an IPv4 address in the first 4 bytes,
/// the rest zero).
#[inline(always)]
pub fn addr_halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

impl ExceptionList {
    /// The id of the first exception of this scope still in force at `now` that covers the
    /// destination (`family`, address halves), `port` and protocol `ipproto`. The hooks and
    /// the controller's tests share it.
    #[inline(always)]
    pub fn allows(
        &self,
        now: u64,
        family: u8,
        hi: u64,
        lo: u64,
        port: u16,
        ipproto: u8,
    ) -> Option<u32> {
        let bit = proto_bit(ipproto);
        let mut i = 0;
        while i < EXC_ENTRIES {
            let e = &self.entries[i];
            if e.until_ns > now
                && e.family == family
                && hi & e.mask_hi == e.net_hi
                && lo & e.mask_lo == e.net_lo
                && e.proto_mask & bit != 0
                && (bit & PROTO_PORTLESS != 0 || (port >= e.port_lo && port <= e.port_hi))
            {
                return Some(e.id);
            }
            i += 1;
        }
        None
    }
}

/// `RULESETS` keys at and above this are the rule sets of `hosts` services (grants point at
/// them); below it, those of address prefixes.
pub const GRANT_SET_BASE: u32 = 0x8000_0000;

/// Value of `DNS_ORIG`: where a steered socket meant to send its query, by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrig {
    /// 4 or 6, as the process gave it (a v4-mapped address is 6 with the mapped form in `addr`).
    pub family: u8,
    pub _pad: u8,
    /// Host order.
    pub port: u16,
    pub _pad2: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<DnsOrig>() == 24);

/// Classes of sockets in `Config::sockets`: raw IP sockets, ping sockets, any other IP
/// protocol (SCTP, UDP-Lite, MPTCP, DCCP, ...), and `AF_PACKET` sockets. TCP and UDP are always
/// allowed to be created and judged at connect/sendmsg.
pub const SOCKETS_RAW: usize = 0;
pub const SOCKETS_ICMP: usize = 1;
pub const SOCKETS_OTHER: usize = 2;
/// `AF_PACKET`: no cgroup hook sees these sockets; TC judges their frames (by the sending
/// socket's family), and `egress exec` withholds `CAP_NET_RAW` where the policy denies them.
pub const SOCKETS_PACKET: usize = 3;
/// What to do with a class of socket.
pub const SOCK_DENY: u8 = 0;
pub const SOCK_ALLOW: u8 = 1;
pub const SOCK_AUDIT: u8 = 2;
/// Ping sockets only: allowed, and every destination judged by the policy (connect hook, and
/// echo requests at TC) with protocol `icmp`/`icmpv6`.
pub const SOCK_POLICY: u8 = 3;
/// `rule_id` of a socket refused (or audited) at creation, or of an `AF_PACKET` frame refused at
/// TC: `RULE_SOCKETS + SOCKETS_*`. Events name them `sockets.raw`, `sockets.icmp`,
/// `sockets.other`, `sockets.packet`.
pub const RULE_SOCKETS: u32 = u32::MAX - 8;

/// How many `nat64_prefixes` a policy may name.
pub const MAX_NAT64_PREFIXES: usize = 4;

/// The NAT64 well-known prefix `64:ff9b::/96` (RFC 6052), first 12 bytes.
pub const NAT64_WELL_KNOWN: [u8; 12] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];

/// Hook that produced an event (`Event::hook`).
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
/// The TC egress program (second line of enforcement).
pub const HOOK_TC: u8 = 5;
/// A setsockopt refused (source routes).
pub const HOOK_SETSOCKOPT: u8 = 6;
/// A socket refused at creation (`[sockets]`).
pub const HOOK_SOCK_CREATE: u8 = 7;

/// `Event::action`.
pub const EVENT_DENY: u8 = 1;
pub const EVENT_AUDIT: u8 = 2;

/// Indices of the per-CPU `STATS` counters.
pub const STAT_ALLOWED: u32 = 0;
pub const STAT_DENIED: u32 = 1;
pub const STAT_AUDITED: u32 = 2;
/// Events that could not be reserved in the ring buffer (it was full). The verdict stood.
pub const STAT_EVENTS_LOST: u32 = 3;
/// Packets the TC program dropped (unattributed traffic to an explicitly blocked destination).
pub const STAT_TC_DROPPED: u32 = 4;
/// Packets the TC program would have dropped in audit mode.
pub const STAT_TC_AUDITED: u32 = 5;
/// Packets and bytes that could not be counted under their own flow because `FLOWS` was full.
pub const STAT_FLOWS_FULL_PACKETS: u32 = 6;
pub const STAT_FLOWS_FULL_BYTES: u32 = 7;
/// Packets TC dropped because their owner is over a byte budget (`action = "block"`).
pub const STAT_BUDGET_DROPPED: u32 = 8;
/// Processes a blocked process (or one of its descendants) created that could not be recorded
/// in `BLOCK_TREE` (it was full): their connects and sends escape the block.
pub const STAT_TREE_FULL: u32 = 9;
/// DNS queries the hooks steered to the controller's proxy.
pub const STAT_DNS_STEERED: u32 = 10;
/// connect/sendmsg calls whose socket owner could not be recorded (`SOCK_OWNERS` full, or the
/// kernel could not allocate the entry). In enforce mode each was refused (`owners-full`).
pub const STAT_OWNERS_FULL: u32 = 11;
pub const STAT_COUNT: u32 = 12;

/// Key of `BLOCKED`: a process over its byte budget, everywhere (`addr` all zero, `family` 0)
/// or towards one destination; or a user (`family` [`BLOCK_USER`], `tgid` holding the uid).
/// `scope` says whom a process block refuses: the process itself ([`BLOCK_SCOPE_PROCESS`]) or
/// the processes it created after the block, and theirs ([`BLOCK_SCOPE_DESCENDANTS`], found
/// through `BLOCK_TREE`). A process block is written in both scopes; when the process exits
/// the first goes (its pid must not pass the block on) and the second stays for its
/// descendants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub tgid: u32,
    /// 0 (any destination), 4 or 6.
    pub family: u8,
    /// `BLOCK_SCOPE_*` (always `BLOCK_SCOPE_PROCESS` for a user).
    pub scope: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<BlockKey>() == 24);

/// `BlockKey::family` of a block on every process of one user (the uid in `tgid`).
pub const BLOCK_USER: u8 = 0xff;
/// `BlockKey::scope`: the process `tgid` itself.
pub const BLOCK_SCOPE_PROCESS: u8 = 0;
/// `BlockKey::scope`: the descendants of `tgid` recorded in `BLOCK_TREE` under it.
pub const BLOCK_SCOPE_DESCENDANTS: u8 = 1;

/// Value of `BLOCKED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockValue {
    /// CLOCK_BOOTTIME nanoseconds when the block ends (the datapath ignores expired entries even
    /// if the controller is gone).
    pub until_ns: u64,
    /// `rule_id` of the alert that set it, reported in deny events.
    pub rule_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<BlockValue>() == 16);

/// Who owns a socket, recorded by the cgroup hooks (where the current task is the owner) and
/// looked up by socket cookie in TC (where it usually is not).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub pid: u32,
    /// Real uid of the recording task (low half of `bpf_get_current_uid_gid`).
    pub uid: u32,
    /// Real gid of the recording task (high half of `bpf_get_current_uid_gid`). It takes the
    /// place of what was padding, so the layout (and a pinned map's value size) is unchanged.
    pub gid: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<Owner>() == 40);

/// `FlowKey::tgid` of packets whose socket has no recorded owner (raw sockets, sockets older
/// than the controller, accepted server sockets, forwarded traffic).
pub const TGID_UNATTRIBUTED: u32 = 0;

/// Key of the per-CPU `FLOWS` counters: one owner process and one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// cgroup of the socket (0 when the packet has none).
    pub cgroup_id: u64,
    /// Owner process, or `TGID_UNATTRIBUTED`.
    pub tgid: u32,
    /// Destination port (host order); 0 for protocols without ports.
    pub port: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    /// Destination address: 4 bytes (v4) or 16 bytes (v6).
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<FlowKey>() == 32);

/// Per-CPU counters of one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub packets: u64,
    /// Bytes on the wire: the frame length of every segment (`__sk_buff.wire_len`: link-layer,
    /// IP and transport headers of each GSO/TSO segment, and payload; no FCS or preamble).
    pub bytes: u64,
    /// Transport payload bytes (what the application wrote, retransmissions included).
    pub payload: u64,
}
const _: () = assert!(size_of::<FlowValue>() == 24);

/// A deny (or, in audit mode, a would-be deny), sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub rule_id: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// `HOOK_*`.
    pub hook: u8,
    /// Address family of the socket: 4 or 6. A v4-mapped destination on an AF_INET6 socket is 6
    /// with `v4_mapped = 1`.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// `EVENT_*`.
    pub action: u8,
    pub v4_mapped: u8,
    /// The socket type (`SOCK_RAW` 3, `SOCK_DGRAM` 2, ...) for `HOOK_SOCK_CREATE`, else 0.
    pub sock_type: u8,
    pub generation: u32,
    /// Destination address as given by the process: 4 bytes (v4) or 16 bytes (v6).
    pub addr: [u8; 16],
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<Event>() == 80);

/// What the scan of a [`RuleSet`] found for one call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// The `rule_id` of the deciding rule (an enforced rule that matches and applies to the
    /// caller, or an in-scope audit service); `RULE_DEFAULT` (0, never a rule's id): nothing
    /// decided, the default verdict applies.
    pub rule_id: u32,
    /// Whether the deciding rule blocks.
    pub block: bool,
    pub _pad: [u8; 3],
    /// The first in-scope audit block the scan passed over (0: none): it would have refused the
    /// call.
    pub audit_block: u32,
    /// The first audit service whose scope leaves the caller out (0: none): enforced, the call
    /// would have fallen through it.
    pub audit_pass: u32,
}
const _: () = assert!(size_of::<Match>() == 16);

/// [`RuleSet::scan_step`]'s classes of a rule.
pub const STEP_NONE: u8 = 0;
pub const STEP_DECIDES: u8 = 1;
pub const STEP_AUDIT_BLOCK: u8 = 2;
pub const STEP_AUDIT_PASS: u8 = 3;

impl Match {
    /// Takes rule `r`, of class `step`, into the match: true when it decides (the scan stops).
    /// Only the first audit block and the first audit pass are kept.
    #[inline(always)]
    pub fn take(&mut self, r: &PortRule, step: u8) -> bool {
        match step {
            STEP_DECIDES => {
                self.rule_id = r.rule_id;
                self.block = r.action == ACTION_BLOCK;
                true
            }
            STEP_AUDIT_BLOCK => {
                if self.audit_block == 0 {
                    self.audit_block = r.rule_id;
                }
                false
            }
            STEP_AUDIT_PASS => {
                if self.audit_pass == 0 {
                    self.audit_pass = r.rule_id;
                }
                false
            }
            _ => false,
        }
    }
}

/// A verdict from a [`Match`] and the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    /// The deciding rule, or `RULE_DEFAULT`.
    pub rule_id: u32,
    /// An audit-mode entry that would have refused this allowed call (reported as an audit
    /// event), else 0. Never set on a refusal: the call is refused anyway.
    pub audit_rule: u32,
}

impl Match {
    /// The verdict: the deciding rule's action, else the default. An audit service that left the
    /// caller out lets through what the default would refuse (`rule_id` stays `RULE_DEFAULT`, so
    /// a DNS grant may still decide). Any audit entry the allowed call would have been refused
    /// by is named in `audit_rule`.
    #[inline(always)]
    pub fn verdict(&self, default_allow: bool) -> Verdict {
        if self.rule_id != RULE_DEFAULT {
            return Verdict {
                allow: !self.block,
                rule_id: self.rule_id,
                audit_rule: if self.block { 0 } else { self.audit_block },
            };
        }
        match default_allow {
            true => Verdict {
                allow: true,
                rule_id: RULE_DEFAULT,
                audit_rule: self.audit_block,
            },
            // Refused by the default, unless an audit service's scope is what refused it.
            false if self.audit_pass == 0 => Verdict {
                allow: false,
                rule_id: RULE_DEFAULT,
                audit_rule: 0,
            },
            false => Verdict {
                allow: true,
                rule_id: RULE_DEFAULT,
                audit_rule: if self.audit_block != 0 {
                    self.audit_block
                } else {
                    self.audit_pass
                },
            },
        }
    }
}

impl RuleSet {
    /// The scan of the rule set, exactly as the kernel does it. Shared by the datapath and by
    /// `egress explain`, so both decide with the same code.
    ///
    /// `TC = true` is the TC program's scan ([`RuleSet::first_match_tc`]): `tc_mask` alone, so
    /// scoped and audit rules never match there (TC cannot tell who sent a packet). `TC = false`
    /// is the hooks' scan ([`RuleSet::scan_into`]): a rule matches when its protocol bit and
    /// port range fit and the caller is in its scope (`scopes`); an in-scope audit block that
    /// matches is noted and the scan goes on; an audit service whose scope leaves the caller out
    /// is noted as the refusal its scope would cause and the scan goes on; an in-scope audit
    /// service allows. [`Match::verdict`] turns the result into the verdict.
    #[inline(always)]
    pub fn first_match<const TC: bool>(&self, port: u16, ipproto: u8, scopes: &ScopeBits) -> Match {
        let mut m = Match::default();
        if TC {
            if let Some((rule_id, block)) = self.first_match_tc(port, ipproto) {
                m.rule_id = rule_id;
                m.block = block;
            }
        } else {
            self.scan_into(port, ipproto, scopes, &mut m);
        }
        m
    }

    /// [`RuleSet::first_match`] into `m` (which must start as `Match::default()`): every rule
    /// in order, classified by [`RuleSet::scan_step`] and taken into `m` by [`Match::take`],
    /// until one decides. The datapath runs the same steps under `bpf_loop`.
    #[inline(always)]
    pub fn scan_into(&self, port: u16, ipproto: u8, scopes: &ScopeBits, m: &mut Match) {
        let bit = proto_bit(ipproto);
        let mut i = 0;
        while i < MAX_PORT_RULES && i < self.len as usize {
            if m.take(&self.rules[i], self.scan_step(i, port, bit, scopes)) {
                return;
            }
            i += 1;
        }
    }

    /// What rule `i` is to this call (`bit` the protocol's `PROTO_*` bit): `STEP_NONE` (it does
    /// not match: its protocol, port range or scope leaves the call out), `STEP_DECIDES` (an
    /// enforced match, or an in-scope audit service), `STEP_AUDIT_BLOCK` (an in-scope audit
    /// block: noted, the scan goes on) or `STEP_AUDIT_PASS` (an audit service whose scope leaves
    /// the caller out: noted, the scan goes on). Reads nothing but the rule and the caller.
    #[inline(always)]
    pub fn scan_step(&self, i: usize, port: u16, bit: u8, scopes: &ScopeBits) -> u8 {
        let Some(r) = self.rules.get(i) else {
            return STEP_NONE;
        };
        if r.proto_mask & bit == 0 || r.port_lo > port || port > r.port_hi {
            return STEP_NONE;
        }
        let block = r.action == ACTION_BLOCK;
        let audit = r.flags & RULE_F_AUDIT != 0;
        let inside = r.scope == 0 || scopes.has(r.scope);
        match (inside, audit, block) {
            (true, true, true) => STEP_AUDIT_BLOCK,
            (true, _, _) => STEP_DECIDES,
            (false, true, false) => STEP_AUDIT_PASS,
            (false, _, _) => STEP_NONE,
        }
    }

    /// Whether rule `i` matches at TC: its `tc_mask` has protocol bit `bit` and its port range
    /// holds `port`. `i` is checked against the array only (as in `scan_step`: a bound the
    /// verifier of Linux 6.1 can follow); the caller keeps it below `len`.
    #[inline(always)]
    pub fn tc_rule_matches(&self, i: usize, port: u16, bit: u8) -> bool {
        match self.rules.get(i) {
            Some(r) => r.tc_mask & bit != 0 && r.port_lo <= port && port <= r.port_hi,
            None => false,
        }
    }

    /// The TC program's scan: the first rule whose `tc_mask` has the protocol's bit and whose
    /// port range holds `port` (scoped and audit rules have no `tc_mask`: TC cannot tell who
    /// sent a packet). `(rule_id, blocks)`. The unscoped scan as it always was: TC's
    /// verification budget is spent.
    #[inline(always)]
    pub fn first_match_tc(&self, port: u16, ipproto: u8) -> Option<(u32, bool)> {
        let bit = proto_bit(ipproto);
        let len = self.len as usize;
        let mut i = 0;
        while i < MAX_PORT_RULES {
            if i >= len {
                break;
            }
            let r = &self.rules[i];
            if r.tc_mask & bit != 0 && r.port_lo <= port && port <= r.port_hi {
                return Some((r.rule_id, r.action == ACTION_BLOCK));
            }
            i += 1;
        }
        None
    }
}

/// How many scopes a policy may have (ids 1..MAX_SCOPES; 0 is "everyone").
pub const MAX_SCOPES: usize = 256;

/// A set of scope ids: bit `s` is set when the caller satisfies every selector key of scope `s`.
/// Bit 0 (everyone) is always set in a resolved set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeBits {
    pub w: [u64; 4],
}
const _: () = assert!(size_of::<ScopeBits>() == MAX_SCOPES / 8);

impl ScopeBits {
    /// Every scope.
    pub const ALL: ScopeBits = ScopeBits { w: [u64::MAX; 4] };
    /// Only scope 0 (everyone): the set of a caller no scope takes in.
    pub const EVERYONE: ScopeBits = ScopeBits { w: [1, 0, 0, 0] };

    /// Whether scope `id` is in the set (ids wrap at `MAX_SCOPES`; the mask keeps the index in
    /// bounds for the verifier).
    #[inline(always)]
    pub fn has(&self, id: u32) -> bool {
        (self.w[((id >> 6) & 3) as usize] >> (id & 63)) & 1 != 0
    }

    #[inline(always)]
    pub fn set(&mut self, id: u32) {
        self.w[((id >> 6) & 3) as usize] |= 1 << (id & 63);
    }

    #[inline(always)]
    pub fn and(&mut self, o: &ScopeBits) {
        self.w[0] &= o.w[0];
        self.w[1] &= o.w[1];
        self.w[2] &= o.w[2];
        self.w[3] &= o.w[3];
    }

    #[inline(always)]
    pub fn or(&mut self, o: &ScopeBits) {
        self.w[0] |= o.w[0];
        self.w[1] |= o.w[1];
        self.w[2] |= o.w[2];
        self.w[3] |= o.w[3];
    }
}

/// Identity of an executable file: the device of its file system (the kernel's encoding,
/// `major << 20 | minor`, as `super_block.s_dev` holds it) and its inode number. A hard link is
/// the same identity; a copy is another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}
const _: () = assert!(size_of::<ExeKey>() == 16);

/// Value of `PROCS`: what a process runs, recorded by the exec tracker when it execs (copied to
/// the processes it forks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcIdentity {
    pub exe: ExeKey,
}
const _: () = assert!(size_of::<ProcIdentity>() == 16);

/// The selector keys (`Config::scope_keys` bits, and indices of a buffer's defaults in
/// `SCOPE_DEF`: `buffer * SCOPE_KEYS + key`).
pub const SCOPE_KEY_EXE: u32 = 0;
pub const SCOPE_KEY_UID: u32 = 1;
pub const SCOPE_KEY_GID: u32 = 2;
pub const SCOPE_KEY_CGROUP: u32 = 3;
pub const SCOPE_KEYS: u32 = 4;

/// Where a caller's scopes are looked up: the kernel's `SCOPE_*` maps, or the compiled tables
/// (`egress explain`). Each per-key table maps one value of that key to the scopes it admits:
/// those it is named in, and (for exe, uid and gid) those that do not constrain the key. A value
/// not in the table admits the key's default: the scopes that do not constrain it.
pub trait ScopeTables {
    fn exe(&self, k: &ExeKey) -> Option<&ScopeBits>;
    fn uid(&self, uid: u32) -> Option<&ScopeBits>;
    fn gid(&self, gid: u32) -> Option<&ScopeBits>;
    /// Only the scopes that name this cgroup (or, through the caller's ancestors, a cgroup above
    /// it); the defaults are ORed in by [`resolve_scopes`].
    fn cgroup(&self, id: u64) -> Option<&ScopeBits>;
    /// `SCOPE_KEY_*`. `None` (a table that was never written) admits nobody.
    fn default_of(&self, key: u32) -> Option<&ScopeBits>;
}

/// Who is calling, as the hooks see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub exe: ExeKey,
    pub uid: u32,
    pub gid: u32,
}

/// The scopes a caller is in: the AND over the selector keys the policy uses (`keys`, bits
/// `1 << SCOPE_KEY_*`) of the scopes each key admits. For cgroups, `ancestor(level)` is the id of
/// the caller's cgroup's ancestor at that level (the cgroup itself at its own level; 0 below
/// it), for every level set in `cg_levels` (the levels the policy's cgroups sit at). Bit 0 is
/// always set. One implementation for the kernel and `explain`.
#[inline(always)]
pub fn resolve_scopes<T: ScopeTables, A: Fn(u32) -> u64>(
    t: &T,
    keys: u32,
    cg_levels: u32,
    caller: &Caller,
    ancestor: A,
) -> ScopeBits {
    let mut bits = ScopeBits::ALL;
    if keys & (1 << SCOPE_KEY_EXE) != 0 {
        admit(&mut bits, t.exe(&caller.exe), t, SCOPE_KEY_EXE);
    }
    if keys & (1 << SCOPE_KEY_UID) != 0 {
        admit(&mut bits, t.uid(caller.uid), t, SCOPE_KEY_UID);
    }
    if keys & (1 << SCOPE_KEY_GID) != 0 {
        admit(&mut bits, t.gid(caller.gid), t, SCOPE_KEY_GID);
    }
    if keys & (1 << SCOPE_KEY_CGROUP) != 0 {
        let mut cg = ScopeBits::default();
        if let Some(d) = t.default_of(SCOPE_KEY_CGROUP) {
            cg.or(d);
        }
        let mut level = 1u32;
        while level < 32 {
            if cg_levels & (1 << level) != 0 {
                let id = ancestor(level);
                if id != 0
                    && let Some(b) = t.cgroup(id)
                {
                    cg.or(b);
                }
            }
            level += 1;
        }
        bits.and(&cg);
    }
    bits.w[0] |= 1;
    bits
}

/// `bits &= found`, or the key's default when the value is not in its table (looked up only
/// then; nothing when neither is there).
#[inline(always)]
fn admit<T: ScopeTables>(bits: &mut ScopeBits, found: Option<&ScopeBits>, t: &T, key: u32) {
    match found.or_else(|| t.default_of(key)) {
        Some(b) => bits.and(b),
        None => *bits = ScopeBits::default(),
    }
}

/// Loopback for `allow_loopback`: 127.0.0.0/8, and 0.0.0.0 (connecting to it reaches this host).
#[inline(always)]
pub fn is_loopback_v4(a: &[u8; 4]) -> bool {
    a[0] == 127 || (a[0] | a[1] | a[2] | a[3]) == 0
}

/// Loopback for `allow_loopback`: ::1 and :: (connecting to it reaches this host). v4-mapped
/// addresses are judged as IPv4 before this is asked.
#[inline(always)]
pub fn is_loopback_v6(a: &[u8; 16]) -> bool {
    let mut head = 0u8;
    let mut i = 0;
    while i < 15 {
        head |= a[i];
        i += 1;
    }
    head == 0 && (a[15] == 1 || a[15] == 0)
}

/// The IPv4 address inside a v4-mapped IPv6 address (`::ffff:a.b.c.d`), if it is one.
#[inline(always)]
pub fn v4_mapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    let mut head = 0u8;
    let mut i = 0;
    while i < 10 {
        head |= a[i];
        i += 1;
    }
    if head == 0 && a[10] == 0xff && a[11] == 0xff {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

pub mod map_names;
pub mod ranges;

/// Whether the first 12 bytes of `a` are `prefix`.
#[inline(always)]
fn starts_with96(a: &[u8; 16], prefix: &[u8; 12]) -> bool {
    let mut diff = 0u8;
    let mut i = 0;
    while i < 12 {
        diff |= a[i] ^ prefix[i];
        i += 1;
    }
    diff == 0
}

/// The IPv4 address an IPv6 destination carries, where a translator or tunnel would deliver the
/// packet to that IPv4 host: NAT64 (`64:ff9b::/96` and the policy's `nat64_prefixes`, the
/// address in the last 32 bits), 6to4 (`2002:AABB:CCDD::/48`) and the deprecated
/// IPv4-compatible form (`::a.b.c.d`, not `::` or `::1`). v4-mapped addresses are not here:
/// they *are* IPv4 on the wire and are judged as IPv4 alone. Such a destination must be allowed
/// both as IPv6 and as the IPv4 it carries, so an IPv4 block cannot be dodged through a
/// translator.
#[inline(always)]
pub fn embedded_v4(a: &[u8; 16], cfg: &Config) -> Option<[u8; 4]> {
    let tail = [a[12], a[13], a[14], a[15]];
    if a[0] == 0x20 && a[1] == 0x02 {
        return Some([a[2], a[3], a[4], a[5]]);
    }
    if starts_with96(a, &[0; 12]) {
        if (tail[0] | tail[1] | tail[2]) == 0 && tail[3] <= 1 {
            return None;
        }
        return Some(tail);
    }
    if starts_with96(a, &NAT64_WELL_KNOWN) {
        return Some(tail);
    }
    let mut i = 0;
    while i < MAX_NAT64_PREFIXES {
        if i >= cfg.nat64_count as usize {
            break;
        }
        if starts_with96(a, &cfg.nat64[i]) {
            return Some(tail);
        }
        i += 1;
    }
    None
}

#[cfg(feature = "user")]
pub mod user;
