//! Where the guest writes what: fixed regions at the start of the disk,
//! seeded 4 KiB blocks scattered over the rest (always including the last
//! block), and a position-dependent pattern so that a write landing at the
//! wrong offset never matches.
//!
//! Layout (the disk must be at least [`MIN_DISK_SIZE`]):
//!
//! ```text
//! [ 0,  1 MiB)  buffered    written through the page cache, fsync'd
//! [ 1,  9 MiB)  concurrent  128 chunks of 64 KiB, even ones from CPU 0, odd from CPU 1
//! [ 9, 11 MiB)  discard     written, then BLKDISCARD: zeroes
//! [11, 13 MiB)  zeroout     written, then BLKZEROOUT: zeroes
//! [13, 14 MiB)  flush       FLUSH_BLOCKS 4 KiB blocks, one per fsync
//! [14, 16 MiB)  loop        1 MiB per thread, rewritten each round of the loop mode
//! [16, 20 MiB)  large       one 4 MiB O_DIRECT write and read (large requests)
//! [20 MiB, end) scattered   SCATTERED_BLOCKS 4 KiB blocks at seeded offsets + the last block
//! ```
//!
//! Everything else stays zero: the host test starts from a sparse (zero)
//! image and checks that too.

use std::fs::File;
use std::os::unix::fs::FileExt;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// Smallest disk the plan fits on.
pub const MIN_DISK_SIZE: u64 = 32 * MIB;
/// Block size of the scattered and flush writes (and the O_DIRECT alignment).
pub const BLOCK: u64 = 4 * KIB;

pub const BUFFERED: Region = Region::new(0, MIB);
pub const CONCURRENT: Region = Region::new(MIB, 8 * MIB);
/// Size of one concurrent write; chunk `i` is written by thread `i % 2`.
pub const CONCURRENT_CHUNK: u64 = 64 * KIB;
pub const DISCARD: Region = Region::new(9 * MIB, 2 * MIB);
pub const ZEROOUT: Region = Region::new(11 * MIB, 2 * MIB);
pub const FLUSH: Region = Region::new(13 * MIB, MIB);
/// Number of fsyncs (each after dirtying one 4 KiB block of [`FLUSH`]).
pub const FLUSH_BLOCKS: u64 = 16;
pub const LOOP: Region = Region::new(14 * MIB, 2 * MIB);
/// Size of one loop-mode write.
pub const LOOP_CHUNK: u64 = 64 * KIB;
/// Written and read with one system call each.
pub const LARGE: Region = Region::new(16 * MIB, 4 * MIB);
/// Where the scattered blocks start.
pub const SCATTERED_START: u64 = 20 * MIB;
/// Seeded scattered blocks (the last block of the disk comes on top).
pub const SCATTERED_BLOCKS: usize = 63;

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

impl Region {
    pub const fn new(offset: u64, len: u64) -> Region {
        Region { offset, len }
    }

    pub const fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Half `t` (0 or 1) of the region.
    pub const fn half(&self, t: u64) -> Region {
        Region::new(self.offset + t * (self.len / 2), self.len / 2)
    }
}

/// What a range must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    /// [`fill`] with this tag and generation.
    Pattern {
        tag: u64,
        generation: u64,
    },
}

/// Tags keep the patterns of different checks apart.
pub mod tag {
    pub const BUFFERED: u64 = 1;
    pub const CONCURRENT: u64 = 2;
    pub const DISCARD: u64 = 3;
    pub const ZEROOUT: u64 = 4;
    pub const FLUSH: u64 = 5;
    /// Loop thread `t` uses `LOOP + t`.
    pub const LOOP: u64 = 6;
    pub const LARGE: u64 = 9;
    pub const SCATTERED: u64 = 8;
}

/// One range and its expected content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub region: Region,
    pub content: Content,
}

/// The plan for one disk: the seed and disk size fix every offset and byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub seed: u64,
    pub disk_size: u64,
    /// Offsets of the scattered 4 KiB blocks, sorted; the last one is the
    /// disk's last block.
    pub scattered: Vec<u64>,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError(pub String);

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

impl Plan {
    /// The plan for a disk of `disk_size` bytes (at least
    /// [`MIN_DISK_SIZE`], a multiple of 4 KiB).
    pub fn new(seed: u64, disk_size: u64) -> Result<Plan, PlanError> {
        if disk_size < MIN_DISK_SIZE || disk_size % BLOCK != 0 {
            return Err(PlanError(format!(
                "disk size {disk_size} is not a multiple of 4 KiB of at least {MIN_DISK_SIZE}"
            )));
        }
        let last = disk_size - BLOCK;
        // Blocks strictly below the last one, so it is not drawn twice.
        let slots = (last - SCATTERED_START) / BLOCK;
        let want = (SCATTERED_BLOCKS as u64).min(slots) as usize;
        let mut rng = SplitMix(seed ^ 0x5ca7_7e12_b10c_0000);
        let mut picked: Vec<u64> = Vec::with_capacity(want + 1);
        while picked.len() < want {
            let off = SCATTERED_START + (rng.next() % slots) * BLOCK;
            if !picked.contains(&off) {
                picked.push(off);
            }
        }
        picked.push(last);
        picked.sort_unstable();
        Ok(Plan {
            seed,
            disk_size,
            scattered: picked,
        })
    }

    /// Chunks of [`CONCURRENT`] written by thread `t` (0 or 1).
    pub fn concurrent_chunks(&self, t: u64) -> Vec<Region> {
        (0..CONCURRENT.len / CONCURRENT_CHUNK)
            .filter(|i| i % 2 == t)
            .map(|i| Region::new(CONCURRENT.offset + i * CONCURRENT_CHUNK, CONCURRENT_CHUNK))
            .collect()
    }

    /// Block `i` of [`FLUSH`] (written before fsync number `i`).
    pub fn flush_block(&self, i: u64) -> Region {
        Region::new(FLUSH.offset + i * BLOCK, BLOCK)
    }

    /// What the disk must hold after a complete run. `loop_rounds[t]` is
    /// the number of loop rounds thread `t` completed (0: the loop did not
    /// run and its half is zero). Extents are sorted and do not overlap;
    /// everything outside them is zero.
    pub fn expected(&self, loop_rounds: [u64; 2]) -> Vec<Extent> {
        let pat = |tag| Content::Pattern { tag, generation: 0 };
        let mut v = vec![
            Extent {
                region: BUFFERED,
                content: pat(tag::BUFFERED),
            },
            Extent {
                region: CONCURRENT,
                content: pat(tag::CONCURRENT),
            },
            Extent {
                region: DISCARD,
                content: Content::Zero,
            },
            Extent {
                region: ZEROOUT,
                content: Content::Zero,
            },
            Extent {
                region: Region::new(FLUSH.offset, FLUSH_BLOCKS * BLOCK),
                content: pat(tag::FLUSH),
            },
        ];
        for (t, &rounds) in loop_rounds.iter().enumerate() {
            if rounds > 0 {
                v.push(Extent {
                    region: LOOP.half(t as u64),
                    content: Content::Pattern {
                        tag: tag::LOOP + t as u64,
                        generation: rounds - 1,
                    },
                });
            }
        }
        v.push(Extent {
            region: LARGE,
            content: pat(tag::LARGE),
        });
        v.extend(self.scattered.iter().map(|&off| Extent {
            region: Region::new(off, BLOCK),
            content: pat(tag::SCATTERED),
        }));
        v
    }

    /// Checks a disk image (on the host, after the guest stopped) against
    /// [`Plan::expected`]: every extent, and zeroes everywhere else. Returns
    /// one line per wrong range (at most a few per extent).
    pub fn verify_image(&self, image: &File, loop_rounds: [u64; 2]) -> Vec<String> {
        let mut problems = Vec::new();
        let len = match image.metadata() {
            Ok(m) => m.len(),
            Err(e) => return vec![format!("cannot stat the image: {e}")],
        };
        if len != self.disk_size {
            problems.push(format!(
                "image is {len} bytes, the plan is for {}",
                self.disk_size
            ));
        }
        let mut at = 0u64;
        let check = |region: Region, content: Content, problems: &mut Vec<String>| {
            let mut buf = vec![0u8; MIB as usize];
            let mut off = region.offset;
            while off < region.end() {
                let n = (region.end() - off).min(MIB) as usize;
                let b = &mut buf[..n];
                if let Err(e) = image.read_exact_at(b, off) {
                    problems.push(format!("read at {off}: {e}"));
                    return;
                }
                if let Some(bad) = first_mismatch(b, off, self.seed, content) {
                    problems.push(format!(
                        "{} at offset {bad} (in {}+{})",
                        describe(content),
                        region.offset,
                        region.len
                    ));
                    return;
                }
                off += n as u64;
            }
        };
        for e in self.expected(loop_rounds) {
            if e.region.offset > at {
                check(
                    Region::new(at, e.region.offset - at),
                    Content::Zero,
                    &mut problems,
                );
            }
            check(e.region, e.content, &mut problems);
            at = e.region.end();
        }
        if at < self.disk_size.min(len) {
            check(
                Region::new(at, self.disk_size.min(len) - at),
                Content::Zero,
                &mut problems,
            );
        }
        problems
    }
}

fn describe(c: Content) -> String {
    match c {
        Content::Zero => "expected zeroes, found data".to_string(),
        Content::Pattern { tag, generation } => {
            format!("pattern tag {tag} generation {generation} mismatch")
        }
    }
}

/// The 8-byte word of pattern (`seed`, `tag`, `generation`) at disk offset
/// `off` (a multiple of 8): a hash of all four, so every word of the disk
/// is distinct and a write at the wrong place, of the wrong check or of a
/// stale loop round never matches.
pub fn word(seed: u64, tag: u64, generation: u64, off: u64) -> u64 {
    let mut z = seed
        ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ off.wrapping_mul(0x1656_67b1_9e37_79f9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf`, which will be written at disk offset `off` (both multiples
/// of 8), with `content`.
pub fn fill(buf: &mut [u8], off: u64, seed: u64, content: Content) {
    match content {
        Content::Zero => buf.fill(0),
        Content::Pattern { tag, generation } => {
            for (i, w) in buf.chunks_exact_mut(8).enumerate() {
                let v = word(seed, tag, generation, off + 8 * i as u64);
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// The disk offset of the first 8-byte word of `buf` (read from disk
/// offset `off`) that differs from `content`, if any.
pub fn first_mismatch(buf: &[u8], off: u64, seed: u64, content: Content) -> Option<u64> {
    buf.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let at = off + 8 * i as u64;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(w);
        let want = match content {
            Content::Zero => 0,
            Content::Pattern { tag, generation } => word(seed, tag, generation, at),
        };
        (u64::from_le_bytes(bytes) != want).then_some(at)
    })
}

/// splitmix64: enough randomness for picking offsets, and the same
/// everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_deterministic_and_includes_last_block() {
        let a = Plan::new(7, 64 * MIB).unwrap();
        let b = Plan::new(7, 64 * MIB).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.scattered.len(), SCATTERED_BLOCKS + 1);
        assert_eq!(*a.scattered.last().unwrap(), 64 * MIB - BLOCK);
        assert!(a
            .scattered
            .iter()
            .all(|&o| o >= SCATTERED_START && o % BLOCK == 0));
        assert!(a.scattered.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(a.scattered, Plan::new(8, 64 * MIB).unwrap().scattered);
    }

    #[test]
    fn plan_rejects_small_or_unaligned_disks() {
        assert!(Plan::new(1, MIN_DISK_SIZE - BLOCK).is_err());
        assert!(Plan::new(1, MIN_DISK_SIZE + 512).is_err());
        assert!(Plan::new(1, MIN_DISK_SIZE).is_ok());
    }

    #[test]
    fn expected_extents_are_sorted_and_disjoint() {
        let p = Plan::new(3, 40 * MIB).unwrap();
        let e = p.expected([2, 0]);
        assert!(e
            .windows(2)
            .all(|w| w[0].region.end() <= w[1].region.offset));
        assert!(e.iter().any(|x| x.content
            == Content::Pattern {
                tag: tag::LOOP,
                generation: 1
            }));
        assert!(!e.iter().any(|x| matches!(
            x.content,
            Content::Pattern { tag, .. } if tag == tag::LOOP + 1
        )));
    }

    #[test]
    fn concurrent_chunks_split_region_between_threads() {
        let p = Plan::new(3, 40 * MIB).unwrap();
        let (a, b) = (p.concurrent_chunks(0), p.concurrent_chunks(1));
        assert_eq!(
            a.len() + b.len(),
            (CONCURRENT.len / CONCURRENT_CHUNK) as usize
        );
        assert_eq!(a[0].offset, CONCURRENT.offset);
        assert_eq!(b[0].offset, CONCURRENT.offset + CONCURRENT_CHUNK);
    }

    #[test]
    fn fill_and_mismatch_agree_and_depend_on_position() {
        let c = Content::Pattern {
            tag: 2,
            generation: 0,
        };
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 8192, 9, c);
        assert_eq!(first_mismatch(&buf, 8192, 9, c), None);
        assert_eq!(first_mismatch(&buf, 4096, 9, c), Some(4096));
        buf[100] ^= 1;
        assert_eq!(first_mismatch(&buf, 8192, 9, c), Some(8192 + 96));
        assert_eq!(first_mismatch(&[0; 64], 0, 9, Content::Zero), None);
    }

    #[test]
    fn verify_image_finds_good_and_bad_bytes() {
        let p = Plan::new(5, MIN_DISK_SIZE).unwrap();
        let f = tempfile::tempfile().unwrap();
        f.set_len(MIN_DISK_SIZE).unwrap();
        for e in p.expected([1, 1]) {
            let mut buf = vec![0u8; e.region.len as usize];
            fill(&mut buf, e.region.offset, p.seed, e.content);
            f.write_all_at(&buf, e.region.offset).unwrap();
        }
        assert_eq!(p.verify_image(&f, [1, 1]), Vec::<String>::new());
        // A stale loop round, and a stray byte in a zero area.
        assert_eq!(p.verify_image(&f, [2, 1]).len(), 1);
        f.write_all_at(&[1], 20 * MIB + 3).unwrap();
        let bad = p.verify_image(&f, [1, 1]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("expected zeroes"), "{bad:?}");
    }
}
