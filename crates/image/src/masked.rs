//! The storage every layer sits on: a file, whose qcow2 header may be
//! read with its state bits (dirty, corrupt) cleared.
//!
//! QEMU opens a dirty image (lazy refcounts, not closed cleanly) and a
//! corrupt one read-only: reading needs neither the refcounts nor trust
//! in what QEMU found inconsistent. imago refuses both bits as unknown
//! incompatible features. A read-only layer with them is opened on a
//! [`Masked`] file that reports them clear, so imago opens it; a writable
//! one is refused before (see `header::check`).
//!
//! This is the crate's one unsafe room: imago's storage trait has unsafe
//! I/O functions (their callers promise not to race their own writes),
//! which this type only passes on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use imago::io_buffers::{IoBuffer, IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageCreateOptions, StorageOpenOptions};

/// Where the incompatible features field of a qcow2 v3 header is.
const FEATURES: std::ops::Range<u64> = 72..80;
/// Dirty (bit 0) and corrupt (bit 1), in the field's last byte.
const STATE_BITS: u8 = 0b11;

/// A file; `mask`: its header's state bits read as clear.
#[derive(Debug)]
pub struct Masked {
    inner: imago::file::File,
    mask: bool,
}

impl Masked {
    /// `file` as it is.
    pub fn plain(inner: imago::file::File) -> Masked {
        Masked { inner, mask: false }
    }

    /// `file`, its header's state bits read as clear.
    pub fn state_bits_clear(inner: imago::file::File) -> Masked {
        Masked { inner, mask: true }
    }
}

impl fmt::Display for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl Storage for Masked {
    fn create_open(opts: StorageCreateOptions) -> io::Result<Self> {
        imago::file::File::create_open(opts).map(Masked::plain)
    }

    fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        imago::file::File::open(opts).map(Masked::plain)
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        let end = offset.saturating_add(len);
        if !self.mask || end <= FEATURES.start || offset >= FEATURES.end {
            // SAFETY: the caller's promise (no write of ours races this
            // read of the same range) is passed on unchanged.
            return unsafe { self.inner.pure_readv(bufv, offset) };
        }
        // A read of the header: through a buffer of ours, patched.
        let n = usize::try_from(len).map_err(|_| io::Error::other("header read too large"))?;
        let mut tmp = IoBuffer::new(n, self.inner.mem_align())?;
        // SAFETY: as above; `tmp` is ours and as long as the read.
        unsafe { self.inner.pure_readv(IoVectorMut::from(&mut tmp), offset)? };
        let bytes = tmp.as_mut().into_slice();
        let last = FEATURES.end - 1;
        if (offset..end).contains(&last) {
            bytes[(last - offset) as usize] &= !STATE_BITS;
        }
        bufv.copy_from_slice(bytes);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}
