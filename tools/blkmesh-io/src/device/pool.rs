//! The buffer region carved into disjoint [`Buffer`]s by [`BufferPool`]s,
//! first fit.

use std::sync::{Arc, Mutex, MutexGuard};

use super::error::PoolError;
use super::shared::Shared;

/// Chunks handed out by a pool start on this boundary (before any skew).
pub const CHUNK_ALIGN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    off: usize,
    len: usize,
}

/// Free extents of the region (offsets relative to the region start),
/// sorted by offset and coalesced. Pure bookkeeping, no memory access.
#[derive(Debug, Default, PartialEq, Eq)]
struct FreeList(Vec<Extent>);

impl FreeList {
    /// First fit: removes and returns `need` bytes.
    fn take(&mut self, need: usize) -> Option<Extent> {
        let i = self.0.iter().position(|e| e.len >= need)?;
        let chunk = Extent {
            off: self.0[i].off,
            len: need,
        };
        if self.0[i].len == need {
            self.0.remove(i);
        } else {
            self.0[i].off += need;
            self.0[i].len -= need;
        }
        Some(chunk)
    }

    /// Returns a chunk, merging it with its neighbours.
    fn give(&mut self, chunk: Extent) {
        let v = &mut self.0;
        let i = v.partition_point(|e| e.off < chunk.off);
        v.insert(i, chunk);
        if i + 1 < v.len() && v[i].off + v[i].len == v[i + 1].off {
            v[i].len += v[i + 1].len;
            v.remove(i + 1);
        }
        if i > 0 && v[i - 1].off + v[i - 1].len == v[i].off {
            v[i - 1].len += v[i].len;
            v.remove(i);
        }
    }

    fn total(&self) -> usize {
        self.0.iter().map(|e| e.len).sum()
    }
}

struct PoolInner {
    shared: Arc<Shared>,
    free: Mutex<FreeList>,
    /// For a sub-pool: the parent's chunk it manages, returned on drop.
    _backing: Option<Buffer>,
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, FreeList> {
        // A panic while holding the lock cannot break the list's invariants
        // in a way that matters for memory safety (at worst a chunk leaks).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, chunk: Extent) {
        self.lock().give(chunk);
    }
}

/// Hands out disjoint [`Buffer`]s from the mapped region (first fit).
#[derive(Clone)]
pub struct BufferPool(Arc<PoolInner>);

impl BufferPool {
    /// The pool over the whole of `shared`'s region.
    pub(super) fn whole_region(shared: &Arc<Shared>) -> BufferPool {
        BufferPool(Arc::new(PoolInner {
            shared: Arc::clone(shared),
            free: Mutex::new(FreeList(vec![Extent {
                off: 0,
                len: shared.region.len,
            }])),
            _backing: None,
        }))
    }

    /// A buffer of `len` bytes starting on a [`CHUNK_ALIGN`] boundary.
    pub fn alloc(&self, len: u64) -> Result<Buffer, PoolError> {
        self.alloc_skewed(len, 0)
    }

    /// A buffer of `len` bytes starting `skew` bytes (rounded up to the
    /// device's buf-alignment) past a [`CHUNK_ALIGN`] boundary: used to put
    /// iovecs at deliberately odd places.
    pub fn alloc_skewed(&self, len: u64, skew: usize) -> Result<Buffer, PoolError> {
        let len = usize::try_from(len).map_err(|_| PoolError::TooLarge(len))?;
        let skew = skew
            .checked_next_multiple_of(self.0.shared.buf_alignment)
            .ok_or(PoolError::TooLarge(skew as u64))?;
        let need = len
            .checked_add(skew)
            .and_then(|n| n.max(1).checked_next_multiple_of(CHUNK_ALIGN))
            .ok_or(PoolError::TooLarge(len as u64))?;
        let mut free = self.0.lock();
        let chunk = free.take(need).ok_or_else(|| PoolError::Exhausted {
            need,
            free: free.total(),
        })?;
        drop(free);
        Ok(Buffer {
            pool: Arc::clone(&self.0),
            chunk,
            off: chunk.off + skew,
            len,
        })
    }

    /// Takes `len` bytes out of this pool as a separate pool, e.g. one per
    /// thread; the bytes come back when the sub-pool and its buffers are gone.
    pub fn sub_pool(&self, len: u64) -> Result<BufferPool, PoolError> {
        let backing = self.alloc(len)?;
        let extent = backing.chunk;
        Ok(BufferPool(Arc::new(PoolInner {
            shared: Arc::clone(&self.0.shared),
            free: Mutex::new(FreeList(vec![extent])),
            _backing: Some(backing),
        })))
    }

    /// Bytes needed for a pool that must hold buffers of these lengths (and
    /// skews) at the same time.
    pub fn bytes_needed(lens: impl IntoIterator<Item = (u64, usize)>) -> u64 {
        lens.into_iter()
            .map(|(len, skew)| {
                (len + skew as u64)
                    .max(1)
                    .next_multiple_of(CHUNK_ALIGN as u64)
            })
            .sum()
    }
}

/// A disjoint piece of the mapped region. Not `Clone`: whoever holds it may
/// access it, and while it is in flight the [`Queue`] holds it.
pub struct Buffer {
    pool: Arc<PoolInner>,
    /// What goes back to the pool.
    chunk: Extent,
    /// The usable bytes: `off..off + len` within `chunk`.
    off: usize,
    len: usize,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.pool.release(self.chunk);
    }
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn addr(&self) -> usize {
        self.pool.shared.region.addr + self.off
    }

    pub(super) fn belongs_to(&self, shared: &Arc<Shared>) -> bool {
        Arc::ptr_eq(&self.pool.shared, shared)
    }

    /// Sets every byte to `byte`.
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: `off..off + len` lies inside the mapped region (pool
        // invariant) which stays allocated while `self.pool.shared` keeps the
        // `Blkio` alive; no other `Buffer` overlaps it, and `&mut self` means
        // it is not in flight. Raw writes create no reference to shared memory.
        unsafe { std::ptr::write_bytes(self.addr() as *mut u8, byte, self.len) };
    }

    /// Copies `src` to the start of the buffer; returns the bytes copied
    /// (`min(src.len(), self.len())`).
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.len);
        // SAFETY: as in `fill`; `n <= self.len` and `src` is a distinct,
        // valid slice of at least `n` bytes (it cannot alias the region: no
        // reference into the region is ever created).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.addr() as *mut u8, n) };
        n
    }

    /// Copies the start of the buffer into `dst`; returns the bytes copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len);
        // SAFETY: as in `copy_from`, reading instead of writing; `&self`
        // means the buffer is not in flight.
        unsafe { std::ptr::copy_nonoverlapping(self.addr() as *const u8, dst.as_mut_ptr(), n) };
        n
    }

    /// The contents as a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.copy_to(&mut v);
        v
    }

    pub(super) fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.addr() as *mut libc::c_void,
            iov_len: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Extent, FreeList};

    fn ext(off: usize, len: usize) -> Extent {
        Extent { off, len }
    }

    #[test]
    fn free_list_takes_first_fit() {
        let mut free = FreeList(vec![ext(0, 4096), ext(8192, 16384)]);
        assert_eq!(free.take(8192), Some(ext(8192, 8192)));
        assert_eq!(free.take(4096), Some(ext(0, 4096)));
        assert_eq!(free.take(16384), None);
        assert_eq!(free, FreeList(vec![ext(16384, 8192)]));
        assert_eq!(free.total(), 8192);
    }

    #[test]
    fn free_list_coalesces_returned_chunks() {
        let mut free = FreeList::default();
        free.give(ext(8192, 4096));
        free.give(ext(0, 4096));
        assert_eq!(free.0.len(), 2);
        free.give(ext(4096, 4096));
        assert_eq!(free, FreeList(vec![ext(0, 12288)]));
        assert_eq!(free.take(12288), Some(ext(0, 12288)));
        assert_eq!(free.total(), 0);
    }
}
