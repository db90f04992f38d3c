//! The IPv4 prefixes of a compiled policy as a range table (`egress_common::ranges`): the
//! structure the hooks look destinations up in, and `explain` with them. Pure.

use std::collections::BTreeMap;

use egress_common::ranges::{
    DIR_DIRECT, RANGE_LINE, RANGE_MAX_SETS, RANGE_NONE, RangeHit, RangeLine, RangeLines,
    V4_CHUNK_BITS, V4_DIR_BITS, lookup_v4, range_entry,
};

/// `DIR` and `RANGES` of one policy, as the kernel's arrays hold them.
#[derive(Clone, PartialEq, Eq)]
pub struct RangeTableV4 {
    /// One entry per chunk (2^20), read as lines of 16.
    pub dir: Vec<u32>,
    /// The chunks' interval lists.
    pub ranges: Vec<u64>,
    /// Elementary intervals of the whole space (adjacent equal ones merged).
    pub intervals: usize,
}

impl std::fmt::Debug for RangeTableV4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeTableV4")
            .field("ranges", &self.ranges.len())
            .field("intervals", &self.intervals)
            .finish()
    }
}

/// Why a policy has no range table (its IPv4 prefixes then go into the trie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTable {
    /// A prefix's rule set index does not fit the table's 31-bit values.
    TooManySets(u32),
}

impl RangeTableV4 {
    /// Compiles `v4` (`(network, length) -> rule set`, nested rules already folded into each
    /// prefix's set) into a range table.
    pub fn build(v4: &BTreeMap<(u32, u8), u32>) -> Result<RangeTableV4, NoTable> {
        let bounds = intervals(v4)?;
        let mut dir = vec![0u32; 1 << V4_DIR_BITS];
        let mut ranges = Vec::new();
        let chunk_size = 1u64 << V4_CHUNK_BITS;
        // `i`: the interval in force at the current chunk's first address.
        let mut i = 0usize;
        let mut chunk = 0u64;
        let chunks = 1u64 << V4_DIR_BITS;
        while chunk < chunks {
            let start = chunk << V4_CHUNK_BITS;
            while i + 1 < bounds.len() && u64::from(bounds[i + 1].0) <= start {
                i += 1;
            }
            // The next boundary after `start`: every chunk before the one it falls in is direct.
            let next = bounds.get(i + 1).map_or(1u64 << 32, |b| u64::from(b.0));
            let holder = next >> V4_CHUNK_BITS;
            if holder > chunk {
                let end = holder.min(chunks);
                dir[chunk as usize..end as usize].fill(DIR_DIRECT | bounds[i].1);
                chunk = end;
                continue;
            }
            // Chunk `chunk` holds boundaries: its list is the interval in force and each of them.
            let mut j = i + 1;
            while j < bounds.len() && u64::from(bounds[j].0) < start + chunk_size {
                j += 1;
            }
            let base = ranges.len() as u32;
            assert!(base & DIR_DIRECT == 0, "range table beyond 2^31 entries");
            dir[chunk as usize] = base;
            ranges.push(range_entry((j - i) as u32, bounds[i].1));
            for b in &bounds[i + 1..j] {
                ranges.push(range_entry((u64::from(b.0) - start) as u32, b.1));
            }
            i = j - 1;
            chunk += 1;
        }
        Ok(RangeTableV4 {
            dir,
            ranges,
            intervals: bounds.len(),
        })
    }

    /// The rule set of the longest prefix containing `addr`, as the kernel finds it.
    pub fn lookup(&self, addr: u32) -> Option<u32> {
        match lookup_v4(self, addr) {
            RangeHit::Set(s) => Some(s),
            RangeHit::None => None,
            RangeHit::Broken => unreachable!("a compiled range table is consistent"),
        }
    }

    /// Entries of `RANGES` this table fills.
    pub fn range_entries(&self) -> usize {
        self.ranges.len()
    }

    /// `DIR` as the kernel's array holds it.
    pub fn dir_bytes(&self) -> &[u8] {
        bytes(&self.dir)
    }

    /// `RANGES` as the kernel's array holds it.
    pub fn range_bytes(&self) -> &[u8] {
        bytes(&self.ranges)
    }
}

fn bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: called with u32 and u64 only: no padding, any byte a valid u8; the length is in
    // bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

impl RangeLines for RangeTableV4 {
    fn dir_line(&self, i: u32) -> Option<&RangeLine> {
        let at = i as usize * RANGE_LINE;
        self.dir.get(at..at + RANGE_LINE)?.try_into().ok()
    }
    fn range(&self, i: u32) -> Option<u64> {
        self.ranges.get(i as usize).copied()
    }
}

/// The elementary intervals of `v4`: `(first address, value)` in address order, the first at
/// 0, each the value of the longest prefix covering it (`RANGE_NONE`: none), adjacent equal
/// values merged.
fn intervals(v4: &BTreeMap<(u32, u8), u32>) -> Result<Vec<(u32, u32)>, NoTable> {
    let mut bounds: Vec<(u32, u32)> = vec![(0, RANGE_NONE)];
    // From `start` on, the value is `v` (`start` past the space: nothing).
    let set_at = |bounds: &mut Vec<(u32, u32)>, start: u64, v: u32| {
        let Ok(start) = u32::try_from(start) else {
            return;
        };
        let last = bounds.last_mut().expect("never empty");
        if last.0 == start {
            last.1 = v;
            let n = bounds.len();
            if n >= 2 && bounds[n - 2].1 == v {
                bounds.pop();
            }
        } else if last.1 != v {
            bounds.push((start, v));
        }
    };
    // The prefixes containing the current one: (end, exclusive; value). In `(network, length)`
    // order a prefix comes after every prefix containing it and before any it contains.
    let mut open: Vec<(u64, u32)> = Vec::new();
    let close_before = |bounds: &mut Vec<(u32, u32)>, open: &mut Vec<(u64, u32)>, at: u64| {
        while let Some(&(end, _)) = open.last() {
            if end > at {
                break;
            }
            open.pop();
            let outer = open.last().map_or(RANGE_NONE, |o| o.1);
            set_at(bounds, end, outer);
        }
    };
    for (&(net, len), &set) in v4 {
        if set >= RANGE_MAX_SETS {
            return Err(NoTable::TooManySets(set));
        }
        let start = u64::from(net);
        let end = start + (1u64 << (32 - u32::from(len)));
        close_before(&mut bounds, &mut open, start);
        set_at(&mut bounds, start, set);
        open.push((end, set));
    }
    close_before(&mut bounds, &mut open, u64::MAX);
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    /// The reference: the longest prefix containing `addr`, by brute force.
    fn lpm(v4: &BTreeMap<(u32, u8), u32>, addr: u32) -> Option<u32> {
        (0..=32u8)
            .rev()
            .find_map(|len| v4.get(&(addr & mask(len), len)).copied())
    }

    fn table(prefixes: &[(u32, u8, u32)]) -> (BTreeMap<(u32, u8), u32>, RangeTableV4) {
        let v4: BTreeMap<(u32, u8), u32> = prefixes
            .iter()
            .map(|&(a, l, s)| ((a & mask(l), l), s))
            .collect();
        let t = RangeTableV4::build(&v4).expect("fits");
        (v4, t)
    }

    /// Every prefix's first and last address, their neighbours, and chunk edges around them.
    fn probes(v4: &BTreeMap<(u32, u8), u32>) -> Vec<u32> {
        let mut out = vec![0, u32::MAX];
        for &(net, len) in v4.keys() {
            let last = net | !mask(len);
            for a in [net, last] {
                out.extend([a, a.wrapping_sub(1), a.wrapping_add(1)]);
                out.extend([a & !0xfff, a | 0xfff]);
            }
        }
        out
    }

    #[test]
    fn an_empty_policy_has_only_direct_chunks_of_nothing() {
        let (_, t) = table(&[]);
        assert!(t.dir.iter().all(|&d| d == DIR_DIRECT | RANGE_NONE));
        assert!(t.ranges.is_empty());
        assert_eq!(t.lookup(0x0a00_0001), None);
    }

    #[test]
    fn nested_prefixes_take_the_most_specific_set() {
        let (v4, t) = table(&[
            (0x0a00_0000, 8, 1),  // 10/8
            (0x0a01_0000, 16, 2), // 10.1/16
            (0x0a01_0200, 24, 3), // 10.1.2/24
            (0x0a01_0203, 32, 4), // 10.1.2.3
            (0x0a01_0204, 31, 1), // same set as 10/8, inside 10.1/16
            (0xffff_ffff, 32, 5),
            (0, 0, 6), // the default route
        ]);
        for a in probes(&v4) {
            assert_eq!(t.lookup(a), lpm(&v4, a), "{:#x}", a);
        }
        assert_eq!(t.lookup(0x0a01_0203), Some(4));
        assert_eq!(t.lookup(0x0a01_0205), Some(1));
        assert_eq!(t.lookup(0x0b00_0000), Some(6));
    }

    #[test]
    fn a_full_chunk_of_host_routes_is_searched_to_its_last_entry() {
        // Every address of one chunk a /32 of alternating sets: 4,096 intervals in one list.
        let prefixes: Vec<(u32, u8, u32)> =
            (0..4096u32).map(|i| (0x0a00_0000 + i, 32, i % 2)).collect();
        let (v4, t) = table(&prefixes);
        assert_eq!(t.ranges[0] & 0xffff_ffff, 4096);
        for a in 0x09ff_fff0..0x0a00_1010u32 {
            assert_eq!(t.lookup(a), lpm(&v4, a), "{a:#x}");
        }
    }

    #[test]
    fn too_many_rule_sets_leave_the_trie_to_it() {
        let v4 = BTreeMap::from([((0x0a00_0000, 8), RANGE_MAX_SETS)]);
        assert_eq!(
            RangeTableV4::build(&v4),
            Err(NoTable::TooManySets(RANGE_MAX_SETS))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

        /// The table agrees with a brute-force longest-prefix match at every prefix edge and at
        /// random addresses, whatever the nesting.
        #[test]
        fn the_table_is_longest_prefix_match(
            prefixes in prop::collection::vec((any::<u32>(), 0u8..=32, 0u32..5), 0..60),
            clustered in prop::collection::vec((0u32..0x4000, 18u8..=32, 0u32..5), 0..60),
            randoms in prop::collection::vec(any::<u32>(), 64),
        ) {
            // Half the prefixes packed in a few chunks, so that lists get long and nested.
            let all: Vec<(u32, u8, u32)> = prefixes
                .into_iter()
                .chain(clustered.into_iter().map(|(a, l, s)| (0xc0a8_0000 | a, l, s)))
                .collect();
            let (v4, t) = table(&all);
            for a in probes(&v4).into_iter().chain(randoms) {
                prop_assert_eq!(t.lookup(a), lpm(&v4, a), "{:#x}", a);
            }
        }
    }
}
