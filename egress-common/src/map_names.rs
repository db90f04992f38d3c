//! The kernel names of the datapath's maps, for userspace to find them by and to pin them under.
//!
//! The eBPF crate's `#[map]` statics carry these names (the macro only takes a literal, so they
//! are written there again); a unit test of egress-userspace checks that the embedded object has
//! exactly the maps listed in [`ALL`], so the two cannot drift apart. Kernel names are capped at
//! 15 characters.

/// IPv4 policy tries of buffer 0 and 1.
pub const POLICY_V4: [&str; 2] = ["POLICY_V4_0", "POLICY_V4_1"];
/// IPv6 policy tries of buffer 0 and 1.
pub const POLICY_V6: [&str; 2] = ["POLICY_V6_0", "POLICY_V6_1"];
/// IPv4 range tables of buffer 0 and 1 (`egress_common::ranges`): the chunk directory and
/// the chunks' interval lists.
pub const DIR_V4: [&str; 2] = ["DIR_V4_0", "DIR_V4_1"];
pub const RANGES_V4: [&str; 2] = ["RANGES_V4_0", "RANGES_V4_1"];
/// Rule sets of buffer 0 and 1.
pub const RULESETS: [&str; 2] = ["RULESETS_0", "RULESETS_1"];
pub const CONFIG: &str = "CONFIG";
pub const ACTIVE: &str = "ACTIVE";
pub const STATS: &str = "STATS";
pub const EVENTS: &str = "EVENTS";
pub const SOCK_OWNERS: &str = "SOCK_OWNERS";
pub const PROC_COMMS: &str = "PROC_COMMS";
pub const FLOWS: &str = "FLOWS";
pub const IFACE_L2: &str = "IFACE_L2";
pub const BLOCKED: &str = "BLOCKED";
pub const BLOCK_TREE: &str = "BLOCK_TREE";

pub const GRANTS: &str = "GRANTS";
pub const DNS_ORIG: &str = "DNS_ORIG";

/// Break-glass exceptions (`egress allow`).
pub const EXCEPTIONS: &str = "EXCEPTIONS";

/// Process -> executable identity.
pub const PROCS: &str = "PROCS";
/// Scope tables of buffer 0 and 1, by selector key.
pub const SCOPE_EXE: [&str; 2] = ["SCOPE_EXE_0", "SCOPE_EXE_1"];
pub const SCOPE_UID: [&str; 2] = ["SCOPE_UID_0", "SCOPE_UID_1"];
pub const SCOPE_GID: [&str; 2] = ["SCOPE_GID_0", "SCOPE_GID_1"];
pub const SCOPE_CG: [&str; 2] = ["SCOPE_CG_0", "SCOPE_CG_1"];
/// The scope tables' defaults.
pub const SCOPE_DEF: &str = "SCOPE_DEF";

/// Every map of the object.
pub const ALL: [&str; 33] = [
    POLICY_V4[0],
    POLICY_V4[1],
    DIR_V4[0],
    DIR_V4[1],
    RANGES_V4[0],
    RANGES_V4[1],
    POLICY_V6[0],
    POLICY_V6[1],
    RULESETS[0],
    RULESETS[1],
    CONFIG,
    ACTIVE,
    STATS,
    EVENTS,
    SOCK_OWNERS,
    PROC_COMMS,
    FLOWS,
    IFACE_L2,
    BLOCKED,
    BLOCK_TREE,
    GRANTS,
    DNS_ORIG,
    EXCEPTIONS,
    PROCS,
    SCOPE_EXE[0],
    SCOPE_EXE[1],
    SCOPE_UID[0],
    SCOPE_UID[1],
    SCOPE_GID[0],
    SCOPE_GID[1],
    SCOPE_CG[0],
    SCOPE_CG[1],
    SCOPE_DEF,
];
