//! Policy lookups shared by every hook: loopback short-cut, LPM trie, then the first matching
//! port rule (`RuleSet::first_match`, the same code `egress explain` runs).

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::{
    helpers::{bpf_ktime_get_boot_ns, bpf_loop},
    maps::lpm_trie::Key,
};
use egress_common::{
    ACTION_BLOCK, BLOCK_SCOPE_DESCENDANTS, BLOCK_SCOPE_PROCESS, BLOCK_USER, BlockKey, Config,
    LOOKUP_V4_RANGES, MAX_PORT_RULES, Match, PrefixValue, RULE_DEFAULT, RULE_LOOPBACK, RuleSet,
    STEP_AUDIT_BLOCK, STEP_AUDIT_PASS, STEP_DECIDES, ScopeBits, embedded_v4, is_loopback_v4,
    is_loopback_v6, proto_bit,
    ranges::{RangeHit, RangeLine, RangeLines, SEARCH_STEPS, Search, Start, start_v4},
};

use crate::maps::{
    ACTIVE, BLOCK_TREE, BLOCKED, CONFIG, DIR_V4_0, DIR_V4_1, POLICY_V4_0, POLICY_V4_1, POLICY_V6_0,
    POLICY_V6_1, RANGES_V4_0, RANGES_V4_1, RULESETS_0, RULESETS_1,
};

/// The outcome of a policy lookup.
pub struct Decision {
    pub allow: bool,
    pub rule_id: u32,
    /// An audit-mode entry this allowed call would have been refused by (reported as an audit
    /// event), else 0.
    pub audit_rule: u32,
}

impl Decision {
    /// A decision no audit entry is involved in.
    #[inline(always)]
    pub fn plain(allow: bool, rule_id: u32) -> Decision {
        Decision {
            allow,
            rule_id,
            audit_rule: 0,
        }
    }
}

/// The config of the buffer in force, read in place (not copied: the hooks' stacks are near
/// their 512-byte limit). `ACTIVE` is read once; everything after uses that buffer. Should a
/// lookup fail, or the entry not describe that buffer (never written), we use the all-zero
/// config: enforce, default deny, no loopback, buffer 0. Fail-closed is the named choice.
#[inline(always)]
pub fn config() -> &'static Config {
    let active = match ACTIVE.get(0) {
        Some(a) => *a & 1,
        None => 0,
    };
    match CONFIG.get(active) {
        Some(c) if c.buffer == active => c,
        _ => &FAIL_CLOSED,
    }
}

/// The all-zero config (see [`config`]).
static FAIL_CLOSED: Config = Config::ZERO;

#[inline(always)]
pub fn decide_v4<const TC: bool>(
    cfg: &Config,
    addr: [u8; 4],
    port: u16,
    ipproto: u8,
    scopes: &ScopeBits,
) -> Decision {
    if cfg.allow_loopback != 0 && is_loopback_v4(&addr) {
        return Decision::plain(true, RULE_LOOPBACK);
    }
    let set = if cfg.lookup & LOOKUP_V4_RANGES != 0 {
        match range_lookup::<TC>(cfg.buffer, u32::from_be_bytes(addr)) {
            HIT_NONE => None,
            HIT_BROKEN => return Decision::plain(false, RULE_DEFAULT),
            set => Some(set),
        }
    } else {
        let key = Key::new(32, addr);
        let hit = if cfg.buffer == 0 {
            POLICY_V4_0.get(&key)
        } else {
            POLICY_V4_1.get(&key)
        };
        hit.map(|v: &PrefixValue| v.ruleset)
    };
    decide_set::<TC>(cfg, set, port, ipproto, scopes)
}

/// [`range_lookup`]'s answers besides a rule set (`0..RANGE_MAX_SETS`).
const HIT_NONE: u32 = u32::MAX;
const HIT_BROKEN: u32 = u32::MAX - 1;

/// The range table lookup of buffer `buffer` (`egress_common::ranges`): `DIR` and the list's
/// head here, the binary search's halvings in a `bpf_loop` callback, so that the verifier walks
/// one halving once, not twelve at every call site (unrolled, they cost connect4 200k
/// instructions and TC 170k; two inline halvings cost TC 195k, the hooks 1k). One copy of each step per buffer, each over its own maps, so
/// that the verifier inlines every array lookup and never merges two maps' pointers.
#[inline(always)]
fn range_lookup<const TC: bool>(buffer: u32, addr: u32) -> u32 {
    let start = if buffer == 0 {
        start_v4(&Ranges::<0>, addr)
    } else {
        start_v4(&Ranges::<1>, addr)
    };
    let hit = match start {
        Start::Done(hit) => hit,
        Start::Search(mut s) => {
            // The hooks do the first two halvings inline (a chunk of up to four intervals, the
            // common case, is done without the loop's indirect calls), the rest in the loop.
            // TC, near its verification budget, loops from the start.
            let more = if TC {
                true
            } else if buffer == 0 {
                s.step(&Ranges::<0>) && s.step(&Ranges::<0>)
            } else {
                s.step(&Ranges::<1>) && s.step(&Ranges::<1>)
            };
            let mut ctx = SearchCtx { s, buffer };
            // SAFETY: a static callback and a context on this stack, as bpf_loop requires.
            let done = if more {
                unsafe {
                    bpf_loop(
                        SEARCH_STEPS,
                        search_callback as *mut c_void,
                        &mut ctx as *mut SearchCtx as *mut c_void,
                        0,
                    )
                }
            } else {
                0
            };
            if done < 0 {
                RangeHit::Broken
            } else {
                ctx.s.hit()
            }
        }
    };
    match hit {
        RangeHit::Set(s) => s,
        RangeHit::None => HIT_NONE,
        RangeHit::Broken => HIT_BROKEN,
    }
}

/// A range table search and the buffer it reads (on the caller's stack).
#[repr(C)]
struct SearchCtx {
    s: Search,
    buffer: u32,
}

/// One halving of a range table search, as a `bpf_loop` callback: 1 (stop) once it is done.
#[inline(never)]
extern "C" fn search_callback(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `SearchCtx` `range_lookup` passed, alive for the whole loop, on the
    // stack of the program that runs this loop: nothing else writes it.
    let c = unsafe { &mut *(ctx as *mut SearchCtx) };
    let more = if c.buffer == 0 {
        c.s.step(&Ranges::<0>)
    } else {
        c.s.step(&Ranges::<1>)
    };
    i64::from(!more)
}

/// The range table of buffer `B`, as the lookup's steps read it.
struct Ranges<const B: u32>;

impl RangeLines for Ranges<0> {
    #[inline(always)]
    fn dir_line(&self, i: u32) -> Option<&RangeLine> {
        DIR_V4_0.get(i)
    }
    #[inline(always)]
    fn range(&self, i: u32) -> Option<u64> {
        RANGES_V4_0.get(i).copied()
    }
}

impl RangeLines for Ranges<1> {
    #[inline(always)]
    fn dir_line(&self, i: u32) -> Option<&RangeLine> {
        DIR_V4_1.get(i)
    }
    #[inline(always)]
    fn range(&self, i: u32) -> Option<u64> {
        RANGES_V4_1.get(i).copied()
    }
}

#[inline(always)]
pub fn decide_v6<const TC: bool>(
    cfg: &Config,
    addr: [u8; 16],
    port: u16,
    ipproto: u8,
    scopes: &ScopeBits,
) -> Decision {
    if cfg.allow_loopback != 0 && is_loopback_v6(&addr) {
        return Decision::plain(true, RULE_LOOPBACK);
    }
    let key = Key::new(128, addr);
    let hit = if cfg.buffer == 0 {
        POLICY_V6_0.get(&key)
    } else {
        POLICY_V6_1.get(&key)
    };
    let d = decide_set::<TC>(
        cfg,
        hit.map(|v: &PrefixValue| v.ruleset),
        port,
        ipproto,
        scopes,
    );
    // An address that carries an IPv4 address (NAT64, 6to4, v4-compatible) must be allowed as
    // that IPv4 address too: a translator would deliver it there.
    if d.allow
        && let Some(v4) = embedded_v4(&addr, cfg)
    {
        let d4 = decide_v4::<TC>(cfg, v4, port, ipproto, scopes);
        if !d4.allow {
            return d4;
        }
    }
    d
}

/// First matching rule of the prefix's rule set decides (blocks are stored first). No prefix, or
/// no matching rule: the default verdict.
#[inline(always)]
fn decide_set<const TC: bool>(
    cfg: &Config,
    set: Option<u32>,
    port: u16,
    ipproto: u8,
    scopes: &ScopeBits,
) -> Decision {
    let default = Decision::plain(cfg.default_verdict != 0, RULE_DEFAULT);
    let Some(idx) = set else { return default };
    let found = if cfg.buffer == 0 {
        unsafe { RULESETS_0.get(idx) }
    } else {
        unsafe { RULESETS_1.get(idx) }
    };
    let Some(set) = found else { return default };
    if TC {
        return match scan_tc(set, port, ipproto) {
            Some((rule_id, block)) => Decision::plain(!block, rule_id),
            None => default,
        };
    }
    verdict(scan(set, port, ipproto, scopes), cfg)
}

/// What the TC scan's `bpf_loop` callback reads (on the caller's stack; it writes nothing).
#[repr(C)]
struct TcScanCtx {
    set: *const RuleSet,
    port: u16,
    bit: u8,
    _pad: u8,
}

/// One rule of the TC scan, as a `bpf_loop` callback: 1 (stop) at the first rule that matches
/// (`RuleSet::tc_rule_matches`).
#[inline(never)]
extern "C" fn tc_scan_callback(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `TcScanCtx` `scan_tc` passed, alive for the whole loop; `set` is a
    // map value.
    let c = unsafe { &*(ctx as *const TcScanCtx) };
    let set = unsafe { &*c.set };
    i64::from(set.tc_rule_matches(i as usize, c.port, c.bit))
}

/// `RuleSet::first_match_tc` with the rules walked by `bpf_loop`: the verifier walks one rule
/// per call site instead of every rule of the unrolled loop, which Linux 6.1's verifier could not
/// prune (the TC program passed its limit of a million instructions there). The loop stops at the
/// first matching rule; this frame checks that rule again (the callback writes nothing).
#[inline(always)]
fn scan_tc(set: &RuleSet, port: u16, ipproto: u8) -> Option<(u32, bool)> {
    let len = (set.len as usize).min(MAX_PORT_RULES) as u32;
    if len == 0 {
        return None;
    }
    let mut ctx = TcScanCtx {
        set,
        port,
        bit: proto_bit(ipproto),
        _pad: 0,
    };
    // SAFETY: a static callback and a context on this stack, as bpf_loop requires.
    let done = unsafe {
        bpf_loop(
            len,
            tc_scan_callback as *mut c_void,
            &mut ctx as *mut TcScanCtx as *mut c_void,
            0,
        )
    };
    // A failing helper (negative) finds nothing: the default verdict. The loop ran `done`
    // rules (at most `len`): the last is where it stopped, if it stopped.
    if done <= 0 || done > i64::from(len) {
        return None;
    }
    let at = done as usize - 1;
    if !set.tc_rule_matches(at, port, ctx.bit) {
        return None;
    }
    let r = set.rules.get(at)?;
    Some((r.rule_id, r.action == ACTION_BLOCK))
}

/// What the scan's `bpf_loop` callback reads (on the caller's stack; it writes nothing).
#[repr(C)]
struct ScanCtx {
    set: *const RuleSet,
    scopes: *const ScopeBits,
    /// The rule the loop's index 0 is.
    start: u32,
    port: u16,
    bit: u8,
    /// What was noted so far: bit 0 an audit block, bit 1 an audit pass (`Match::take` keeps
    /// only the first of each, so the loop need not stop at another).
    noted: u8,
}

/// One rule of the scan, as a `bpf_loop` callback: 1 (stop) at a rule the scan must take.
#[inline(never)]
extern "C" fn scan_callback(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `ScanCtx` `scan` passed, alive for the whole loop; its pointers are
    // a map value and the caller's stack.
    let c = unsafe { &*(ctx as *const ScanCtx) };
    let (set, scopes) = unsafe { (&*c.set, &*c.scopes) };
    let step = set.scan_step(c.start as usize + i as usize, c.port, c.bit, scopes);
    i64::from(stops(step, c.noted))
}

/// Whether the scan stops at a rule of class `step`: at the deciding rule, and at an audit
/// note of a kind not noted yet.
#[inline(always)]
fn stops(step: u8, noted: u8) -> bool {
    match step {
        STEP_DECIDES => true,
        STEP_AUDIT_BLOCK => noted & 1 == 0,
        STEP_AUDIT_PASS => noted & 2 == 0,
        _ => false,
    }
}

/// `RuleSet::first_match` for the hooks: the same steps (`RuleSet::scan_step`, `Match::take`),
/// with the rules walked by `bpf_loop`, so that the verifier walks one rule, not 64, per call
/// site (an unrolled scan with scopes and audit notes tripled the hooks' verification). The
/// callback only reads: it stops the loop at the next rule to take, which this frame takes,
/// then goes on after it (at most three loops: an audit block, an audit pass, the decision).
/// Nothing is written outside this frame, so nothing is shared with a task that preempts this
/// one.
#[inline(always)]
pub fn scan(set: &RuleSet, port: u16, ipproto: u8, scopes: &ScopeBits) -> Match {
    let mut m = Match::default();
    let len = (set.len as usize).min(MAX_PORT_RULES) as u32;
    let mut ctx = ScanCtx {
        set,
        scopes,
        start: 0,
        port,
        bit: proto_bit(ipproto),
        noted: 0,
    };
    let mut round = 0;
    while round < 3 {
        if ctx.start >= len {
            break;
        }
        // SAFETY: a static callback and a context on this stack, as bpf_loop requires.
        let done = unsafe {
            bpf_loop(
                len - ctx.start,
                scan_callback as *mut c_void,
                &mut ctx as *mut ScanCtx as *mut c_void,
                0,
            )
        };
        // The loop ran `done` rules: the last is where it stopped, if it stopped. A failing
        // helper (negative) takes nothing: the default verdict (fail-closed under deny).
        if done <= 0 {
            break;
        }
        let at = ctx.start as usize + done as usize - 1;
        let Some(r) = set.rules.get(at) else {
            break;
        };
        let step = set.scan_step(at, port, ctx.bit, scopes);
        if !stops(step, ctx.noted) {
            break;
        }
        if m.take(r, step) {
            break;
        }
        ctx.noted = u8::from(m.audit_block != 0) | (u8::from(m.audit_pass != 0) << 1);
        ctx.start = at as u32 + 1;
        round += 1;
    }
    m
}

/// The decision of a scan, with the policy's default.
#[inline(always)]
pub fn verdict(m: Match, cfg: &Config) -> Decision {
    let v = m.verdict(cfg.default_verdict != 0);
    Decision {
        allow: v.allow,
        rule_id: v.rule_id,
        audit_rule: v.audit_rule,
    }
}

/// The alert rule blocking process `tgid` (everywhere, or towards `addr`), if a byte-budget
/// block is in force. `family` is 4 (address in the first 4 bytes) or 6. This is TC's check: two
/// lookups at most, so the TC program stays within the verifier's budget. The hooks use
/// [`caller_budget_block`], which also covers users and descendants.
#[inline(always)]
pub fn budget_block(cfg: &Config, tgid: u32, family: u8, addr: &[u8; 16]) -> Option<u32> {
    if cfg.budget_blocks == 0 {
        return None;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    blocked_as(tgid, BLOCK_SCOPE_PROCESS, family, addr, now)
}

/// The alert rule blocking the caller of connect()/sendmsg(): process `tgid` itself, its user
/// `uid`, or, when `tgid` was created by a blocked process (or one of its descendants) after
/// the block, that block (`BLOCK_TREE`, then the root's descendants twin).
#[inline(always)]
pub fn caller_budget_block(
    cfg: &Config,
    tgid: u32,
    uid: u32,
    family: u8,
    addr: &[u8; 16],
) -> Option<u32> {
    if cfg.budget_blocks == 0 {
        return None;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(rule_id) = block_in_force(uid, BLOCK_USER, BLOCK_SCOPE_PROCESS, None, now) {
        return Some(rule_id);
    }
    if let Some(rule_id) = blocked_as(tgid, BLOCK_SCOPE_PROCESS, family, addr, now) {
        return Some(rule_id);
    }
    let root = unsafe { BLOCK_TREE.get(tgid) }.copied()?;
    blocked_as(root, BLOCK_SCOPE_DESCENDANTS, family, addr, now)
}

/// The rule of a block on `tgid` in `scope`, everywhere or towards `addr`, still in force at
/// `now`.
#[inline(always)]
fn blocked_as(tgid: u32, scope: u8, family: u8, addr: &[u8; 16], now: u64) -> Option<u32> {
    if let Some(rule_id) = block_in_force(tgid, 0, scope, None, now) {
        return Some(rule_id);
    }
    block_in_force(tgid, family, scope, Some(addr), now)
}

/// The rule of the `BLOCKED` entry (`tgid`, `family`, `scope`, `addr` or all zeros), if still in
/// force at `now`. The key is written field by field, its zero address as volatile words: a
/// zeroed 16-byte array becomes a call to compiler-builtins' byte-by-byte `memset`, a loop that
/// older verifiers (6.1) walk byte by byte at every call site, which put TC past their
/// 1M-instruction limit.
#[inline(always)]
fn block_in_force(
    tgid: u32,
    family: u8,
    scope: u8,
    addr: Option<&[u8; 16]>,
    now: u64,
) -> Option<u32> {
    let mut key = core::mem::MaybeUninit::<BlockKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every field of the local key is written before it is read.
    let key = unsafe {
        addr_of_mut!((*k).tgid).write(tgid);
        addr_of_mut!((*k).family).write(family);
        addr_of_mut!((*k).scope).write(scope);
        addr_of_mut!((*k)._pad).write([0; 2]);
        match addr {
            Some(a) => addr_of_mut!((*k).addr).write(*a),
            None => zero_u32s::<4>(addr_of_mut!((*k).addr).cast()),
        }
        key.assume_init_ref()
    };
    match unsafe { BLOCKED.get(key) } {
        Some(b) if b.until_ns > now => Some(b.rule_id),
        _ => None,
    }
}

/// Zeroes `N` 32-bit words at `p` with plain stores (volatile: never merged into a `memset`
/// call, see [`block_in_force`]).
///
/// # Safety
/// `p` must be valid for writes of `N` aligned `u32`s.
#[inline(always)]
pub(crate) unsafe fn zero_u32s<const N: usize>(p: *mut u32) {
    let mut i = 0;
    while i < N {
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}
