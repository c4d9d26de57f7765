//! Token buckets that several processes can share.
//!
//! A throttle group may have member nodes in different workers, so its
//! buckets live in a named shared-memory segment (the `shared_memory` crate:
//! POSIX shm found by name, which is what lets unrelated workers meet
//! without passing fds). Each bucket is one `AtomicU64` holding the GCRA
//! "theoretical arrival time" in CLOCK_MONOTONIC nanoseconds, which is the
//! same clock in every process; admitting a request is a CAS, no lock.
//!
//! A node without a group uses the same type backed by private memory.

use std::sync::atomic::{AtomicU64, Ordering};

use shared_memory::{Shmem, ShmemConf, ShmemError};

/// Buckets per set: iops total/read/write, bps total/read/write.
pub const BUCKETS: usize = 6;
const MAGIC: u64 = u64::from_le_bytes(*b"BLKMTHR1");
const SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BucketsError {
    #[error("throttle group shared memory {name}: {source}")]
    Shm {
        name: String,
        #[source]
        source: ShmemError,
    },
    #[error("throttle group shared memory {0} has a foreign layout")]
    Foreign(String),
}

enum Backing {
    Shared(Shmem),
    Private(Box<[AtomicU64; BUCKETS + 1]>),
}

/// A set of GCRA buckets (their arrival times).
pub struct BucketSet {
    backing: Backing,
}

impl std::fmt::Debug for BucketSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backing {
            Backing::Shared(_) => "BucketSet(shared)",
            Backing::Private(_) => "BucketSet(private)",
        })
    }
}

// SAFETY: the segment is only accessed through AtomicU64s.
unsafe impl Send for BucketSet {}
// SAFETY: as above.
unsafe impl Sync for BucketSet {}

impl BucketSet {
    /// Buckets private to this process.
    pub fn private() -> Self {
        BucketSet {
            backing: Backing::Private(Box::new(std::array::from_fn(|_| AtomicU64::new(0)))),
        }
    }

    /// The buckets of throttle group `group` on this host, created on first
    /// use. The segment outlives its creator (a group's state must survive
    /// a worker restart); it is a few bytes in /dev/shm.
    pub fn group(group: &str) -> Result<Self, BucketsError> {
        let name = format!("blkmesh-throttle-{group}");
        let err = |source| BucketsError::Shm {
            name: name.clone(),
            source,
        };
        let mut shm = match ShmemConf::new().size(SIZE).os_id(&name).create() {
            Ok(s) => s,
            Err(ShmemError::MappingIdExists) => {
                ShmemConf::new().os_id(&name).open().map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        shm.set_owner(false);
        if shm.len() < SIZE {
            return Err(BucketsError::Foreign(name));
        }
        let set = BucketSet {
            backing: Backing::Shared(shm),
        };
        // Claim a fresh (all-zero) segment, or check a used one.
        match set
            .word(0)
            .compare_exchange(0, MAGIC, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(set),
            Err(m) if m == MAGIC => Ok(set),
            Err(_) => Err(BucketsError::Foreign(name)),
        }
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        match &self.backing {
            Backing::Private(b) => &b[i],
            Backing::Shared(shm) => {
                // SAFETY: i <= BUCKETS, so the word lies in the first
                // 56 bytes of a page-aligned segment of SIZE bytes, which
                // stays mapped while `shm` lives; other processes access it
                // only atomically.
                unsafe { &*(shm.as_ptr().cast::<AtomicU64>().add(i)) }
            }
        }
    }

    /// Bucket `i`'s arrival time (CLOCK_MONOTONIC ns).
    pub fn tat(&self, i: usize) -> &AtomicU64 {
        self.word(1 + i.min(BUCKETS - 1))
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_segment_is_shared_between_openers() {
        let name = format!("test-{}", std::process::id());
        let a = BucketSet::group(&name).unwrap();
        let b = BucketSet::group(&name).unwrap();
        a.tat(2).store(12345, Ordering::Release);
        assert_eq!(b.tat(2).load(Ordering::Acquire), 12345);
        let _ = std::fs::remove_file(format!("/dev/shm/blkmesh-throttle-{name}"));
    }

    #[test]
    fn clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(monotonic_ns() > a);
    }
}
