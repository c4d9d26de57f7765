//! The few system calls std does not wrap: block-device ioctls, CPU
//! pinning, and buffers aligned for O_DIRECT. Every unsafe block of the
//! program is here and in `aio` (native AIO).

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;

/// Alignment of O_DIRECT buffers: a page covers any logical block size.
pub const ALIGN: usize = 4096;

// <linux/fs.h>; _IO(0x12, n) and _IOR(0x12, 114, size_t).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A zeroed, [`ALIGN`]-aligned (or more) heap buffer.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes (> 0).
    pub fn new(len: usize) -> AlignedBuf {
        Self::with_align(len, ALIGN)
    }

    /// A buffer of `len` bytes (> 0) aligned to `align` (a power of two;
    /// 2 MiB lets the kernel back it with a transparent huge page, so a
    /// large O_DIRECT transfer needs few segments).
    pub fn with_align(len: usize, align: usize) -> AlignedBuf {
        let layout = Self::layout(len, align);
        // SAFETY: the layout has a non-zero size (asserted in layout()).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, align }
    }

    fn layout(len: usize, align: usize) -> Layout {
        assert!(len > 0, "empty aligned buffer");
        Layout::from_size_align(len, align.max(ALIGN)).expect("aligned buffer layout")
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialized (zeroed at allocation) bytes
        // that live as long as self; &self forbids concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in with_align() with exactly this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len, self.align)) }
    }
}

/// Size in bytes of the block device `f` (BLKGETSIZE64).
pub fn device_size(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local; the fd is open for the duration of the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn range_ioctl(f: &File, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length) from
    // the pointer, which points to a live local array of two u64.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, range.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// BLKDISCARD of `len` bytes at `offset`.
pub fn discard(f: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(f, BLKDISCARD, offset, len)
}

/// BLKZEROOUT of `len` bytes at `offset`.
pub fn zeroout(f: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(f, BLKZEROOUT, offset, len)
}

/// Pins the calling thread to `cpu`, so that blk-mq submits its I/O on that
/// CPU's hardware queue.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu is within the set's bounds (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set pointer and size describe
    // a live cpu_set_t.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    unsafe { libc::sched_getcpu() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(3 * ALIGN);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[5] = 7;
        assert_eq!(b[5], 7);
        let h = AlignedBuf::with_align(4 << 20, 2 << 20);
        assert_eq!(h.as_ptr() as usize % (2 << 20), 0);
    }

    #[test]
    fn pinning_to_cpu_zero_works() {
        pin_to_cpu(0).unwrap();
        assert_eq!(current_cpu(), 0);
    }
}
