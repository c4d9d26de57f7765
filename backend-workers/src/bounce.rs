//! Bounce buffers for segments the driver cannot take as they are (guest
//! buffers that break its buf-alignment, e.g. with O_DIRECT). They come from
//! libblkio's own allocator so they are registered memory too, and are reused
//! per queue. The null leaf, which has no driver, bounces through the heap
//! (so the limit knobs behave the same over it).

use std::sync::{Arc, Mutex};

use blkmesh_ipc::ring::Segment;

use crate::errno::Errno;
use crate::memory::RegisteredRam;

/// Buffers are allocated in multiples of this (and of the driver's
/// mem-region-alignment).
const CHUNK: usize = 64 * 1024;
/// Free buffers kept per queue.
const KEEP: usize = 8;
/// Larger buffers are given back at once rather than kept, so a guest
/// that sends a few huge misaligned requests does not pin that memory.
const KEEP_MAX_BYTES: usize = 4 << 20;

/// A bounce buffer owned by one in-flight request.
pub struct BounceBuf {
    mem: Mem,
    len: usize,
}

/// Where a bounce buffer's bytes live.
enum Mem {
    /// libblkio's allocator, mapped for the driver.
    Blkio(blkio::MemoryRegion),
    /// The heap, for a leaf without a driver (null).
    Heap(Box<[u8]>),
}

impl Mem {
    fn capacity(&self) -> usize {
        match self {
            Mem::Blkio(r) => r.len,
            Mem::Heap(b) => b.len(),
        }
    }
}

impl std::fmt::Debug for BounceBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BounceBuf({:p}, {})", self.as_ptr(), self.len)
    }
}

impl BounceBuf {
    pub fn as_ptr(&self) -> *mut u8 {
        match &self.mem {
            Mem::Blkio(r) => r.addr as *mut u8,
            Mem::Heap(b) => b.as_ptr().cast_mut(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.mem {
            // SAFETY: the region is a private libblkio allocation of at least
            // `len` bytes that only this buffer's owner touches (the driver
            // reads or writes it only while the request is in flight, and
            // callers use this slice only before submission or after
            // completion).
            Mem::Blkio(r) => unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, self.len) },
            Mem::Heap(b) => &mut b[..self.len],
        }
    }

    /// Fills the buffer from the guest buffers `segs` of `ram`, in order
    /// (a write, before submission).
    pub fn copy_from_guest(&mut self, ram: &RegisteredRam, segs: &[Segment]) -> Result<(), Errno> {
        let dst = self.bytes_mut();
        let mut at = 0;
        for s in segs {
            let b = ram.ram().buf(s).map_err(|_| Errno::EFAULT)?;
            at += b.copy_to(&mut dst[at..]);
        }
        Ok(())
    }

    /// Copies the buffer out to the guest buffers `segs` of `ram`, in order
    /// (a read, after completion). A segment outside the mapping fails the
    /// copy, the others are still written.
    pub fn copy_to_guest(&mut self, ram: &RegisteredRam, segs: &[Segment]) -> Result<(), Errno> {
        let src = self.bytes_mut();
        let mut at = 0;
        let mut result = Ok(());
        for s in segs {
            match ram.ram().buf(s) {
                Ok(b) => at += b.copy_from(&src[at..]),
                Err(_) => result = Err(Errno::EFAULT),
            }
        }
        result
    }
}

/// Per-queue pool of bounce buffers.
pub struct BouncePool {
    /// `None`: heap buffers (no driver to register them with).
    blkio: Option<Arc<Mutex<blkio::Blkio>>>,
    free: Vec<Mem>,
}

impl BouncePool {
    pub fn new(blkio: Arc<Mutex<blkio::Blkio>>) -> Self {
        BouncePool {
            blkio: Some(blkio),
            free: Vec::new(),
        }
    }

    /// A pool of plain heap buffers, for the null leaf.
    pub fn heap() -> Self {
        BouncePool {
            blkio: None,
            free: Vec::new(),
        }
    }

    /// A buffer of at least `len` bytes.
    pub fn get(&mut self, len: usize) -> Result<BounceBuf, blkio::Error> {
        if let Some(i) = self.free.iter().position(|m| m.capacity() >= len) {
            let mem = self.free.swap_remove(i);
            return Ok(BounceBuf { mem, len });
        }
        let Some(blkio) = &self.blkio else {
            // Fallible: a huge request must fail, not abort the worker.
            let size = len.next_multiple_of(CHUNK);
            let mut v = Vec::new();
            v.try_reserve_exact(size).map_err(|_| {
                blkio::Error::new(blkio::Errno::NOMEM, "bounce buffer allocation failed")
            })?;
            v.resize(size, 0u8);
            return Ok(BounceBuf {
                mem: Mem::Heap(v.into_boxed_slice()),
                len,
            });
        };
        let mut b = blkio.lock().unwrap_or_else(|p| p.into_inner());
        let align = b.get_u64("mem-region-alignment").unwrap_or(4096).max(1) as usize;
        let size = len.next_multiple_of(CHUNK).next_multiple_of(align);
        let region = b.alloc_mem_region(size)?;
        if let Err(e) = b.map_mem_region(&region) {
            b.free_mem_region(&region);
            return Err(e);
        }
        Ok(BounceBuf {
            mem: Mem::Blkio(region),
            len,
        })
    }

    /// Returns a buffer to the pool.
    pub fn put(&mut self, buf: BounceBuf) {
        if self.free.len() < KEEP && buf.mem.capacity() <= KEEP_MAX_BYTES {
            self.free.push(buf.mem);
        } else {
            self.release(buf.mem);
        }
    }

    fn release(&mut self, mem: Mem) {
        if let (Mem::Blkio(region), Some(blkio)) = (mem, &self.blkio) {
            let mut b = blkio.lock().unwrap_or_else(|p| p.into_inner());
            b.unmap_mem_region(&region);
            b.free_mem_region(&region);
        }
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        for m in std::mem::take(&mut self.free) {
            self.release(m);
        }
    }
}
