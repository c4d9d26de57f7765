//! A first-fit allocator for data buffers in guest RAM.
//!
//! Small and predictable rather than fast: a test driver has a few dozen
//! buffers in flight. Free ranges are kept sorted by address and merged
//! with their neighbours when a buffer is freed.

use std::collections::{BTreeMap, HashMap};

use crate::layout::align_up;

/// Hands out aligned ranges of `[start, end)`.
#[derive(Debug)]
pub struct Allocator {
    /// Free ranges: start → length.
    free: BTreeMap<u64, u64>,
    /// Live allocations: start → length (as reserved, alignment padding
    /// excluded).
    live: HashMap<u64, u64>,
    start: u64,
    end: u64,
}

impl Allocator {
    /// An allocator for the addresses `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        Allocator {
            free,
            live: HashMap::new(),
            start,
            end,
        }
    }

    /// The managed range.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// Number of live allocations.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Reserves `len` bytes (at least 1) aligned to `align` (a power of
    /// two); `None` when no free range is large enough.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = len.max(1);
        let align = align.max(1).next_power_of_two();
        let (&at, &flen, addr) = self.free.iter().find_map(|(at, flen)| {
            let addr = align_up(*at, align);
            let pad = addr - at;
            (pad.checked_add(len)? <= *flen).then_some((at, flen, addr))
        })?;
        self.free.remove(&at);
        if addr > at {
            self.free.insert(at, addr - at);
        }
        let tail = at + flen - (addr + len);
        if tail > 0 {
            self.free.insert(addr + len, tail);
        }
        self.live.insert(addr, len);
        Some(addr)
    }

    /// Returns a buffer from [`Allocator::alloc`]; false if `addr` is not
    /// a live allocation.
    pub fn free(&mut self, addr: u64) -> bool {
        let Some(len) = self.live.remove(&addr) else {
            return false;
        };
        let mut start = addr;
        let mut len = len;
        // Merge with the free range just before.
        if let Some((&pstart, &plen)) = self.free.range(..addr).next_back() {
            if pstart + plen == addr {
                self.free.remove(&pstart);
                start = pstart;
                len += plen;
            }
        }
        // And with the one just after.
        if let Some(&nlen) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nlen;
        }
        self.free.insert(start, len);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let mut a = Allocator::new(0x1000, 0x10000);
        let x = a.alloc(16, 16).unwrap();
        let y = a.alloc(512, 4096).unwrap();
        let z = a.alloc(1, 1).unwrap();
        assert_eq!(x, 0x1000);
        assert_eq!(y, 0x2000);
        // The gap before y is used first-fit.
        assert_eq!(z, 0x1010);
        assert_eq!(a.live(), 3);
    }

    #[test]
    fn freeing_merges_neighbours_back_into_one_range() {
        let mut a = Allocator::new(0, 0x4000);
        let bufs: Vec<u64> = (0..4).map(|_| a.alloc(0x1000, 0x1000).unwrap()).collect();
        assert!(a.alloc(1, 1).is_none());
        for &b in [bufs[1], bufs[3], bufs[0], bufs[2]].iter() {
            assert!(a.free(b));
        }
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.free_bytes(), 0x4000);
        assert_eq!(a.alloc(0x4000, 1), Some(0));
    }

    #[test]
    fn double_free_and_unknown_addresses_are_refused() {
        let mut a = Allocator::new(0, 0x1000);
        let x = a.alloc(8, 8).unwrap();
        assert!(a.free(x));
        assert!(!a.free(x));
        assert!(!a.free(0x500));
    }

    #[test]
    fn too_large_requests_fail_without_side_effects() {
        let mut a = Allocator::new(0x100, 0x200);
        assert!(a.alloc(0x101, 1).is_none());
        assert!(a.alloc(u64::MAX, 1).is_none());
        assert_eq!(a.free_bytes(), 0x100);
        assert_eq!(a.alloc(0x100, 0x100), Some(0x100));
    }
}
