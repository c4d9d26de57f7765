//! Bounce buffers for segments the driver cannot take as they are (guest
//! buffers that break its buf-alignment, e.g. with O_DIRECT). They come from
//! libblkio's own allocator so they are registered memory too, and are reused
//! per queue.

use std::sync::{Arc, Mutex};

/// Buffers are allocated in multiples of this (and of the driver's
/// mem-region-alignment).
const CHUNK: usize = 64 * 1024;
/// Free buffers kept per queue.
const KEEP: usize = 8;

/// A bounce buffer owned by one in-flight request.
pub struct BounceBuf {
    region: blkio::MemoryRegion,
    len: usize,
}

impl std::fmt::Debug for BounceBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BounceBuf({:#x}, {})", self.region.addr, self.len)
    }
}

impl BounceBuf {
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the region is a private libblkio allocation of at least
        // `len` bytes that only this buffer's owner touches (the driver reads
        // or writes it only while the request is in flight, and callers use
        // this slice only before submission or after completion).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.len) }
    }
}

/// Per-queue pool of bounce buffers.
pub struct BouncePool {
    blkio: Arc<Mutex<blkio::Blkio>>,
    free: Vec<blkio::MemoryRegion>,
}

impl BouncePool {
    pub fn new(blkio: Arc<Mutex<blkio::Blkio>>) -> Self {
        BouncePool {
            blkio,
            free: Vec::new(),
        }
    }

    /// A buffer of at least `len` bytes.
    pub fn get(&mut self, len: usize) -> Result<BounceBuf, blkio::Error> {
        if let Some(i) = self.free.iter().position(|r| r.len >= len) {
            let region = self.free.swap_remove(i);
            return Ok(BounceBuf { region, len });
        }
        let mut b = self.blkio.lock().unwrap_or_else(|p| p.into_inner());
        let align = b.get_u64("mem-region-alignment").unwrap_or(4096).max(1) as usize;
        let size = len.next_multiple_of(CHUNK).next_multiple_of(align);
        let region = b.alloc_mem_region(size)?;
        if let Err(e) = b.map_mem_region(&region) {
            b.free_mem_region(&region);
            return Err(e);
        }
        Ok(BounceBuf { region, len })
    }

    /// Returns a buffer to the pool.
    pub fn put(&mut self, buf: BounceBuf) {
        if self.free.len() < KEEP {
            self.free.push(buf.region);
        } else {
            self.release(buf.region);
        }
    }

    fn release(&mut self, region: blkio::MemoryRegion) {
        let mut b = self.blkio.lock().unwrap_or_else(|p| p.into_inner());
        b.unmap_mem_region(&region);
        b.free_mem_region(&region);
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.free) {
            self.release(r);
        }
    }
}
