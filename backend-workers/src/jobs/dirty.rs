//! The ranges of an image written while a commit job copies it: one bit
//! per granule, set by the queues as writes complete, taken (and cleared)
//! by the job. Lock-free, so a completion pays one atomic OR.

use std::sync::atomic::{AtomicU64, Ordering};

/// Most granules tracked: the granule grows with the disk so that the map
/// stays within 2 MiB however large the disk is.
const MAX_GRANULES: u64 = 1 << 24;
/// The smallest granule, 64 KiB (qcow2's default cluster).
const MIN_SHIFT: u32 = 16;

/// Marked granules of a disk of `size` bytes.
#[derive(Debug)]
pub struct DirtyMap {
    shift: u32,
    size: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyMap {
    pub fn new(size: u64) -> DirtyMap {
        let mut shift = MIN_SHIFT;
        while (size >> shift) > MAX_GRANULES {
            shift += 1;
        }
        let granules = size.div_ceil(1 << shift);
        let words = (0..granules.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyMap { shift, size, words }
    }

    /// Bytes per bit.
    pub fn granule(&self) -> u64 {
        1 << self.shift
    }

    /// Marks `len` bytes at `offset` (clipped to the disk).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        for g in first..=last {
            if let Some(w) = self.words.get((g / 64) as usize) {
                w.fetch_or(1 << (g % 64), Ordering::Release);
            }
        }
    }

    /// Takes every marked granule, clearing it: byte ranges, in order,
    /// neighbours merged, clipped to the disk.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = ((i as u64) * 64 + b) << self.shift;
                let end = (start + self.granule()).min(self.size);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l = end - *s,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_once_as_merged_granules() {
        let m = DirtyMap::new(1 << 20);
        assert_eq!(m.granule(), 64 << 10);
        m.mark(100, 1);
        m.mark(64 << 10, 128 << 10);
        m.mark(512 << 10, 1);
        assert_eq!(
            m.take(),
            vec![(0, 192 << 10), (512 << 10, 64 << 10)],
            "neighbours merge"
        );
        assert!(m.take().is_empty(), "taking clears");
    }

    #[test]
    fn the_end_of_the_disk_clips() {
        let size = (1 << 20) + 4096;
        let m = DirtyMap::new(size);
        m.mark(size - 512, 4096);
        m.mark(size + 10, 10);
        m.mark(5, 0);
        assert_eq!(m.take(), vec![(1 << 20, 4096)]);
    }

    #[test]
    fn a_huge_disk_keeps_the_map_small() {
        let m = DirtyMap::new(1 << 50);
        assert!(m.words.len() as u64 * 8 <= 2 << 20);
        m.mark((1 << 50) - 1, 1);
        let got = m.take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0 + got[0].1, 1 << 50);
    }
}
