//! Policy lookups shared by every hook: loopback short-cut, LPM trie, then the first matching
//! port rule (`RuleSet::first_match`, the same code `egress explain` runs).

use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key};
use egress_common::{
    ACTION_BLOCK, BlockKey, Config, PrefixValue, RULE_DEFAULT, RULE_LOOPBACK, is_loopback_v4,
    is_loopback_v6,
};

use crate::maps::{BLOCKED, CONFIG, POLICY_V4, POLICY_V6, RULESETS};

/// The outcome of a policy lookup.
pub struct Decision {
    pub allow: bool,
    pub rule_id: u32,
}

/// The config in force. An array entry always exists; should the lookup ever fail we use the
/// all-zero config: enforce, default deny, no loopback. Fail-closed is the named choice.
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
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
    let set = POLICY_V4
        .get(Key::new(32, addr))
        .map(|v: &PrefixValue| v.ruleset);
    decide_set(cfg, set, port, ipproto)
}

#[inline(always)]
pub fn decide_v6(cfg: &Config, addr: [u8; 16], port: u16, ipproto: u8) -> Decision {
    if cfg.allow_loopback != 0 && is_loopback_v6(&addr) {
        return Decision {
            allow: true,
            rule_id: RULE_LOOPBACK,
        };
    }
    let set = POLICY_V6
        .get(Key::new(128, addr))
        .map(|v: &PrefixValue| v.ruleset);
    decide_set(cfg, set, port, ipproto)
}

/// First matching rule of the prefix's rule set decides (blocks are stored first). No prefix, or
/// no matching rule: the default verdict.
#[inline(always)]
fn decide_set(cfg: &Config, set: Option<u32>, port: u16, ipproto: u8) -> Decision {
    let default = Decision {
        allow: cfg.default_verdict != 0,
        rule_id: RULE_DEFAULT,
    };
    let Some(set) = set.and_then(|idx| RULESETS.get(idx)) else {
        return default;
    };
    match set.first_match(port, ipproto) {
        Some(r) => Decision {
            allow: r.action != ACTION_BLOCK,
            rule_id: r.rule_id,
        },
        None => default,
    }
}

/// The alert rule blocking process `tgid` (everywhere, or towards `addr`), if a byte-budget block
/// is in force. `family` is 4 (address in the first 4 bytes) or 6.
#[inline(always)]
pub fn budget_block(cfg: &Config, tgid: u32, family: u8, addr: &[u8; 16]) -> Option<u32> {
    if cfg.budget_blocks == 0 {
        return None;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
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
