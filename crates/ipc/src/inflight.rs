//! vhost-user inflight I/O tracking (the INFLIGHT_SHMFD protocol feature)
//! for split virtqueues.
//!
//! The back-end (the frontend process here) allocates a shared region, the
//! VMM keeps its fd across back-end restarts and hands it back with
//! SET_INFLIGHT_FD, and the back-end records in it which descriptor heads it
//! has taken from the avail ring and not yet put on the used ring. A
//! restarted back-end finds those heads there and processes them again.
//!
//! Layout (compatible with QEMU's libvhost-user), per queue, each queue's
//! part `queue_region_size(queue_size)` bytes long:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc_num × { u8 inflight | u8 pad[5] | u16 next | u64 counter }
//! ```
//!
//! Everything is little-endian and accessed with volatile loads and stores;
//! every index is bounds-checked against the queue size we chose, never
//! against what the region says.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::shm::{SharedMemory, ShmError};

const HEADER: usize = 16;
const DESC: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH: usize = 12;
const OFF_USED_IDX: usize = 14;
const VERSION: u16 = 1;
/// Largest virtqueue we track.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues one region covers.
pub const MAX_QUEUES: u16 = 64;

/// Bytes of one queue's part of the region (libvhost-user's rule).
pub fn queue_region_size(queue_size: u16) -> usize {
    (DESC * queue_size as usize + 2).next_multiple_of(64)
}

#[derive(Debug, Error)]
pub enum InflightError {
    #[error("queue size {0} is not a power of two in 1..={MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("{0} queues is not in 1..={MAX_QUEUES}")]
    Queues(u16),
    #[error("region of {size} bytes at offset {offset} cannot hold {needed} bytes")]
    Size {
        size: u64,
        offset: u64,
        needed: usize,
    },
    #[error("region offset {0} is not a multiple of the page size ({PAGE} bytes)")]
    Unaligned(u64),
    #[error(transparent)]
    Shm(#[from] ShmError),
}

/// Alignment required of a peer's region offset: what mmap requires of an
/// offset (libvhost-user maps the region at it), and enough for the atomic
/// fields the region holds.
const PAGE: u64 = 4096;

/// The inflight region of one device: `num_queues` queues of `queue_size`.
#[derive(Debug, Clone)]
pub struct InflightRegion {
    shm: Arc<SharedMemory>,
    offset: usize,
    num_queues: u16,
    queue_size: u16,
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<usize, InflightError> {
    if !(1..=MAX_QUEUES).contains(&num_queues) {
        return Err(InflightError::Queues(num_queues));
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
        return Err(InflightError::QueueSize(queue_size));
    }
    Ok(num_queues as usize * queue_region_size(queue_size))
}

impl InflightRegion {
    /// Allocates a zeroed region (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let size = check_geometry(num_queues, queue_size)?;
        let shm = SharedMemory::create("blkmesh-inflight", size)?;
        Ok(InflightRegion {
            shm: Arc::new(shm),
            offset: 0,
            num_queues,
            queue_size,
        })
    }

    /// Maps a region the VMM handed back (SET_INFLIGHT_FD). It must be a
    /// sealed memfd holding `mmap_offset + mmap_size` bytes, enough for the
    /// geometry.
    pub fn from_peer(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let needed = check_geometry(num_queues, queue_size)?;
        let too_small = || InflightError::Size {
            size: mmap_size,
            offset: mmap_offset,
            needed,
        };
        if mmap_offset % PAGE != 0 {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        if mmap_size < needed as u64 {
            return Err(too_small());
        }
        let offset = usize::try_from(mmap_offset).map_err(|_| too_small())?;
        let len = offset.checked_add(needed).ok_or_else(too_small)?;
        let shm = SharedMemory::from_peer(file, len)?;
        Ok(InflightRegion {
            shm: Arc::new(shm),
            offset,
            num_queues,
            queue_size,
        })
    }

    /// The memfd, for the VMM to keep.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shm.fd()
    }

    /// Bytes the VMM must map (all queues).
    pub fn size(&self) -> u64 {
        self.num_queues as u64 * queue_region_size(self.queue_size) as u64
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s tracker, for a ring of `size` entries (at most the
    /// region's queue size).
    pub fn queue(&self, index: u16, size: u16) -> Option<InflightQueue> {
        if index >= self.num_queues || size == 0 || size > self.queue_size {
            return None;
        }
        let base = self.offset + index as usize * queue_region_size(self.queue_size);
        Some(InflightQueue {
            shm: Arc::clone(&self.shm),
            base,
            size,
        })
    }
}

/// One queue's part of the region.
#[derive(Debug)]
pub struct InflightQueue {
    shm: Arc<SharedMemory>,
    base: usize,
    /// Ring size: every head index is checked against it.
    size: u16,
}

/// What a queue found in its part of the region when it started.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads taken from the avail ring and never completed, oldest first.
    pub heads: Vec<u16>,
    /// The submission counter to continue from.
    pub next_counter: u64,
}

impl InflightQueue {
    fn ptr<T>(&self, at: usize) -> *mut T {
        let p = self
            .shm
            .ptr_at(self.base + at, std::mem::size_of::<T>())
            .expect("inflight offsets are checked against the region size at creation");
        p.cast()
    }

    fn read_u16(&self, at: usize) -> u16 {
        // SAFETY: `ptr` returns an in-bounds pointer into our shared mapping;
        // the offset is 2-aligned (the region and every field are).
        u16::from_le(unsafe { self.ptr::<u16>(at).read_volatile() })
    }

    fn write_u16(&self, at: usize, v: u16) {
        // SAFETY: as in read_u16.
        unsafe { self.ptr::<u16>(at).write_volatile(v.to_le()) }
    }

    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.size).then(|| HEADER + head as usize * DESC)
    }

    fn set_flag(&self, head: u16, inflight: bool) {
        if let Some(d) = self.desc(head) {
            // SAFETY: d < HEADER + size * DESC <= the queue's part.
            unsafe { self.ptr::<u8>(d).write_volatile(inflight as u8) }
        }
    }

    fn flag(&self, head: u16) -> bool {
        // SAFETY: as in set_flag.
        self.desc(head)
            .is_some_and(|d| unsafe { self.ptr::<u8>(d).read_volatile() } == 1)
    }

    fn counter(&self, head: u16) -> u64 {
        match self.desc(head) {
            // SAFETY: d + 8 is 8-aligned and inside the descriptor's 16 bytes.
            Some(d) => u64::from_le(unsafe { self.ptr::<u64>(d + 8).read_volatile() }),
            None => 0,
        }
    }

    /// Starts tracking. A fresh part (version 0, or another geometry) is
    /// initialized and nothing is recovered; otherwise the heads still
    /// marked in flight are returned. `used_idx` is the used ring's index as
    /// the guest sees it: if the previous back-end died between putting a
    /// head on the used ring and clearing its mark, that head is cleared.
    pub fn start(&self, used_idx: u16) -> Recovered {
        let version = self.read_u16(OFF_VERSION);
        if version != VERSION || self.read_u16(OFF_DESC_NUM) != self.size {
            for head in 0..self.size {
                self.set_flag(head, false);
            }
            self.write_u16(OFF_DESC_NUM, self.size);
            self.write_u16(OFF_LAST_BATCH, 0);
            self.write_u16(OFF_USED_IDX, used_idx);
            fence(Ordering::Release);
            self.write_u16(OFF_VERSION, VERSION);
            return Recovered::default();
        }
        if self.read_u16(OFF_USED_IDX) != used_idx {
            let last = self.read_u16(OFF_LAST_BATCH);
            self.set_flag(last, false);
            fence(Ordering::Release);
            self.write_u16(OFF_USED_IDX, used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.flag(h))
            .map(|h| (self.counter(h), h))
            .collect();
        heads.sort_unstable();
        let next_counter = heads.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovered {
            heads: heads.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }

    /// `head` was taken from the avail ring (submission number `counter`).
    pub fn taken(&self, head: u16, counter: u64) {
        if let Some(d) = self.desc(head) {
            // SAFETY: as in counter().
            unsafe { self.ptr::<u64>(d + 8).write_volatile(counter.to_le()) };
            fence(Ordering::Release);
            self.set_flag(head, true);
        }
    }

    /// `head` is about to go on the used ring.
    pub fn completing(&self, head: u16) {
        self.write_u16(OFF_LAST_BATCH, head);
        fence(Ordering::Release);
    }

    /// `head` is on the used ring, whose index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        self.set_flag(head, false);
        fence(Ordering::Release);
        self.write_u16(OFF_USED_IDX, used_idx);
    }
}

impl AsFd for InflightRegion {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shm.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_libvhost_user() {
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(128), 2112);
        for qs in [1u16, 2, 4, 64, 1024] {
            assert!(queue_region_size(qs) >= HEADER + DESC * qs as usize);
        }
    }

    #[test]
    fn fresh_region_recovers_nothing_then_tracks_heads() {
        let r = InflightRegion::create(2, 8).unwrap();
        let q = r.queue(1, 8).unwrap();
        assert_eq!(q.start(0), Recovered::default());
        q.taken(3, 0);
        q.taken(5, 1);
        q.taken(1, 2);
        q.completing(5);
        q.completed(5, 1);
        // A restarted back-end maps the same memfd.
        let file = File::from(r.fd().try_clone_to_owned().unwrap());
        let again = InflightRegion::from_peer(file, r.size(), 0, 2, 8).unwrap();
        let rec = again.queue(1, 8).unwrap().start(1);
        assert_eq!(rec.heads, vec![3, 1]);
        assert_eq!(rec.next_counter, 3);
        // Queue 0 was never started.
        assert!(again.queue(0, 8).unwrap().start(0).heads.is_empty());
    }

    #[test]
    fn head_put_on_the_used_ring_but_not_cleared_is_not_redone() {
        let r = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0, 4).unwrap();
        q.start(7);
        q.taken(2, 10);
        q.taken(0, 11);
        // Died after the used ring moved to 8 for head 0, before clearing.
        q.completing(0);
        let rec = r.queue(0, 4).unwrap().start(8);
        assert_eq!(rec.heads, vec![2]);
    }

    #[test]
    fn bad_geometry_and_short_regions_are_refused() {
        assert!(matches!(
            InflightRegion::create(0, 8),
            Err(InflightError::Queues(0))
        ));
        assert!(matches!(
            InflightRegion::create(1, 100),
            Err(InflightError::QueueSize(100))
        ));
        let r = InflightRegion::create(1, 8).unwrap();
        let file = || File::from(r.fd().try_clone_to_owned().unwrap());
        // An unaligned offset would put the atomics off their alignment.
        for offset in [1, 8, 4095] {
            assert!(matches!(
                InflightRegion::from_peer(file(), r.size() + 4096, offset, 1, 8),
                Err(InflightError::Unaligned(o)) if o == offset
            ));
        }
        assert!(matches!(
            InflightRegion::from_peer(file(), 16, 0, 1, 8),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            InflightRegion::from_peer(file(), r.size(), 4096, 1, 8),
            Err(InflightError::Shm(ShmError::TooSmall { .. }))
        ));
        assert!(InflightRegion::from_peer(file(), r.size(), 0, 2, 8).is_err());
        // Heads beyond the ring are ignored, not written.
        let q = r.queue(0, 8).unwrap();
        q.start(0);
        q.taken(8, 1);
        q.taken(u16::MAX, 1);
        assert!(q.start(0).heads.is_empty());
        assert!(r.queue(1, 8).is_none());
        assert!(r.queue(0, 16).is_none());
    }
}
