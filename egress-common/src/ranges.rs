//! The IPv4 range table: the policy's prefixes compiled into a lookup whose cost does not grow
//! with their number (issue 14; measurements and choices in `docs/design/flat-lookup.md`).
//!
//! The compiler sweeps the prefixes into *elementary intervals* of the address space, each
//! carrying the rule set of the longest prefix covering it (longest-prefix match, precomputed),
//! adjacent equal intervals merged. The space is cut into 2^20 *chunks* of 4,096 addresses
//! (`addr >> 12`):
//! - `DIR[chunk]` holds either the chunk's one value (`DIR_DIRECT` set: the whole chunk has the
//!   same rule set, or none), or the index in `RANGES` of the chunk's interval list;
//! - a chunk's list in `RANGES` is its intervals in address order, each a `u64`: the low 32 bits
//!   are the interval's first address within the chunk (0..4095), the high 32 bits its value.
//!   The first interval always starts at 0, so its low bits hold the list's length instead.
//!
//! A lookup is one `DIR` load and, for a chunk with several intervals, a binary search over at
//! most 4,096 entries (12 halvings) that stays within one or two cache lines for the common
//! chunk of a few intervals. `DIR` is stored as 64-byte lines of 16 entries (an ARRAY map's
//! element is rounded up to 8 bytes: a line wastes nothing), `RANGES` as one `u64` per element:
//! the search then reads each entry at offset 0 of its element, so the verifier never needs
//! the search's position to be precise, and walks the search once instead of once per outcome
//! of each comparison. The same function runs in the kernel hooks and in `egress explain`, over
//! the kernel's maps or the compiled vectors.

/// Bits of an IPv4 address that index `DIR`.
pub const V4_DIR_BITS: u32 = 20;
/// Bits of an address within a chunk.
pub const V4_CHUNK_BITS: u32 = 32 - V4_DIR_BITS;
/// Entries (`u32`) per map value of `DIR_V4_n` (one 64-byte line).
pub const RANGE_LINE: usize = 16;
/// A map value of `DIR_V4_n`.
pub type RangeLine = [u32; RANGE_LINE];
/// Lines of `DIR_V4_n`: one entry per chunk.
pub const V4_DIR_LINES: u32 = (1 << V4_DIR_BITS) / RANGE_LINE as u32;
/// A `DIR` entry with this bit holds its chunk's value in the low 31 bits; without it, the
/// index of the chunk's list in `RANGES`.
pub const DIR_DIRECT: u32 = 1 << 31;
/// The value of addresses no prefix covers.
pub const RANGE_NONE: u32 = DIR_DIRECT - 1;
/// The most rule sets a range table can name (values `0..RANGE_MAX_SETS`).
pub const RANGE_MAX_SETS: u32 = RANGE_NONE;
/// Halvings of the binary search: a chunk has at most 2^12 intervals.
pub const SEARCH_STEPS: u32 = V4_CHUNK_BITS;

/// Where the two arrays are read from: the kernel's maps, or the compiler's vectors.
pub trait RangeLines {
    /// Line `i` of `DIR`.
    fn dir_line(&self, i: u32) -> Option<&RangeLine>;
    /// Entry `i` of `RANGES`.
    fn range(&self, i: u32) -> Option<u64>;
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeHit {
    /// The rule set of the longest prefix containing the address.
    Set(u32),
    /// No prefix contains the address.
    None,
    /// The table is inconsistent (an index beyond the arrays): the caller fails closed.
    Broken,
}

#[inline(always)]
fn dir<T: RangeLines>(t: &T, chunk: u32) -> Option<u32> {
    let line = t.dir_line(chunk / RANGE_LINE as u32)?;
    line.get(chunk as usize % RANGE_LINE).copied()
}

#[inline(always)]
fn value(v: u32) -> RangeHit {
    let v = v & RANGE_NONE;
    if v == RANGE_NONE {
        RangeHit::None
    } else {
        RangeHit::Set(v)
    }
}

/// A chunk's binary search in progress: the answer is the last interval starting at or before
/// `off`, among entries `[lo, lo + n)` of the list at `base`; `at` is entry `lo`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Search {
    pub base: u64,
    pub off: u64,
    pub lo: u64,
    pub n: u64,
    pub at: u64,
}

/// Where a lookup stands after `DIR`: decided, or a search to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Done(RangeHit),
    Search(Search),
}

/// The first step of a lookup of `addr` (host order): `DIR`, then the head of the chunk's list.
#[inline(always)]
pub fn start_v4<T: RangeLines>(t: &T, addr: u32) -> Start {
    let Some(d) = dir(t, addr >> V4_CHUNK_BITS) else {
        return Start::Done(RangeHit::Broken);
    };
    if d & DIR_DIRECT != 0 {
        return Start::Done(value(d));
    }
    let Some(head) = t.range(d) else {
        return Start::Done(RangeHit::Broken);
    };
    Start::Search(Search {
        base: u64::from(d),
        off: u64::from(addr & ((1 << V4_CHUNK_BITS) - 1)),
        lo: 0,
        n: (head & 0xffff_ffff).min(1 << V4_CHUNK_BITS),
        at: head,
    })
}

impl Search {
    /// One halving: false once the answer is found (then [`Search::hit`] is it), or when the
    /// table reads as inconsistent (then `hit` is `Broken`). At most 12 halvings are needed.
    #[inline(always)]
    pub fn step<T: RangeLines>(&mut self, t: &T) -> bool {
        if self.n <= 1 {
            return false;
        }
        let half = self.n / 2;
        let Some(e) = t.range((self.base + self.lo + half) as u32) else {
            self.n = 0;
            return false;
        };
        // All ones when the entry starts at or before `off` (both below 2^32), else zero.
        let take = (self.off.wrapping_sub(e & 0xffff_ffff) >> 63).wrapping_sub(1);
        self.lo += half & take;
        self.at ^= (self.at ^ e) & take;
        self.n -= half;
        true
    }

    /// The answer of a finished search.
    #[inline(always)]
    pub fn hit(&self) -> RangeHit {
        if self.n == 0 {
            RangeHit::Broken
        } else {
            value((self.at >> 32) as u32)
        }
    }
}

/// The rule set of the longest prefix containing `addr` (host order). The hooks run the same
/// steps, with the halvings driven by `bpf_loop` (one callback the verifier walks once).
pub fn lookup_v4<T: RangeLines>(t: &T, addr: u32) -> RangeHit {
    match start_v4(t, addr) {
        Start::Done(hit) => hit,
        Start::Search(mut s) => {
            let mut steps = 0;
            while steps < SEARCH_STEPS && s.step(t) {
                steps += 1;
            }
            s.hit()
        }
    }
}

/// A `RANGES` entry: an interval starting `start` addresses into its chunk, of value `value`.
#[inline(always)]
pub const fn range_entry(start: u32, value: u32) -> u64 {
    (value as u64) << 32 | start as u64
}
