//! Policy lookups shared by every hook: loopback short-cut, LPM trie, then the first matching
//! port rule (`RuleSet::first_match`, the same code `egress explain` runs).

use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key};
use egress_common::{
    ACTION_BLOCK, BLOCK_USER, BlockKey, Config, PrefixValue, RULE_DEFAULT, RULE_LOOPBACK,
    embedded_v4, is_loopback_v4, is_loopback_v6,
};

use crate::maps::{
    ACTIVE, BLOCKED, CONFIG, POLICY_V4_0, POLICY_V4_1, POLICY_V6_0, POLICY_V6_1, RULESETS_0,
    RULESETS_1,
};

/// The outcome of a policy lookup.
pub struct Decision {
    pub allow: bool,
    pub rule_id: u32,
}

/// The config of the buffer in force. `ACTIVE` is read once; everything after uses that buffer.
/// Should a lookup ever fail we use the all-zero config: enforce, default deny, no loopback,
/// buffer 0. Fail-closed is the named choice.
#[inline(always)]
pub fn config() -> Config {
    let active = match ACTIVE.get(0) {
        Some(a) => *a & 1,
        None => 0,
    };
    match CONFIG.get(active) {
        Some(c) => {
            let mut c = *c;
            c.buffer = active;
            c
        }
        None => Config::default(),
    }
}

#[inline(always)]
pub fn decide_v4(cfg: &Config, addr: [u8; 4], port: u16, ipproto: u8) -> Decision {
    if cfg.allow_loopback != 0 && is_loopback_v4(&addr) {
        return Decision {
            allow: true,
            rule_id: RULE_LOOPBACK,
        };
    }
    let key = Key::new(32, addr);
    let hit = if cfg.buffer == 0 {
        POLICY_V4_0.get(&key)
    } else {
        POLICY_V4_1.get(&key)
    };
    decide_set(cfg, hit.map(|v: &PrefixValue| v.ruleset), port, ipproto)
}

#[inline(always)]
pub fn decide_v6(cfg: &Config, addr: [u8; 16], port: u16, ipproto: u8) -> Decision {
    if cfg.allow_loopback != 0 && is_loopback_v6(&addr) {
        return Decision {
            allow: true,
            rule_id: RULE_LOOPBACK,
        };
    }
    let key = Key::new(128, addr);
    let hit = if cfg.buffer == 0 {
        POLICY_V6_0.get(&key)
    } else {
        POLICY_V6_1.get(&key)
    };
    let d = decide_set(cfg, hit.map(|v: &PrefixValue| v.ruleset), port, ipproto);
    // An address that carries an IPv4 address (NAT64, 6to4, v4-compatible) must be allowed as
    // that IPv4 address too: a translator would deliver it there.
    if d.allow
        && let Some(v4) = embedded_v4(&addr, cfg)
    {
        let d4 = decide_v4(cfg, v4, port, ipproto);
        if !d4.allow {
            return d4;
        }
    }
    d
}

/// First matching rule of the prefix's rule set decides (blocks are stored first). No prefix, or
/// no matching rule: the default verdict.
#[inline(always)]
fn decide_set(cfg: &Config, set: Option<u32>, port: u16, ipproto: u8) -> Decision {
    let default = Decision {
        allow: cfg.default_verdict != 0,
        rule_id: RULE_DEFAULT,
    };
    let Some(idx) = set else { return default };
    let found = if cfg.buffer == 0 {
        unsafe { RULESETS_0.get(idx) }
    } else {
        unsafe { RULESETS_1.get(idx) }
    };
    let Some(set) = found else { return default };
    match set.first_match(port, ipproto) {
        Some(r) => Decision {
            allow: r.action != ACTION_BLOCK,
            rule_id: r.rule_id,
        },
        None => default,
    }
}

/// The alert rule blocking process `tgid` (everywhere, or towards `addr`) or, when `uid` is
/// given, its user, if a byte-budget block is in force. `family` is 4 (address in the first 4
/// bytes) or 6. TC passes no uid: user blocks refuse new connections and sends at the hooks, and
/// the TC program stays within the verifier's budget.
#[inline(always)]
pub fn budget_block(
    cfg: &Config,
    tgid: u32,
    uid: Option<u32>,
    family: u8,
    addr: &[u8; 16],
) -> Option<u32> {
    if cfg.budget_blocks == 0 {
        return None;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(uid) = uid {
        let user = BlockKey {
            tgid: uid,
            family: BLOCK_USER,
            _pad: [0; 3],
            addr: [0; 16],
        };
        if let Some(b) = unsafe { BLOCKED.get(user) }
            && b.until_ns > now
        {
            return Some(b.rule_id);
        }
    }
    let any = BlockKey {
        tgid,
        family: 0,
        _pad: [0; 3],
        addr: [0; 16],
    };
    if let Some(b) = unsafe { BLOCKED.get(any) }
        && b.until_ns > now
    {
        return Some(b.rule_id);
    }
    let one = BlockKey {
        tgid,
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    match unsafe { BLOCKED.get(one) } {
        Some(b) if b.until_ns > now => Some(b.rule_id),
        _ => None,
    }
}
