//! Sealed memfds and shared mappings.
//!
//! A [`SharedMemory`] is a `MAP_SHARED` mapping of a memfd. When we create the
//! memfd we seal it against shrinking and growing so the peer cannot truncate it
//! under us (which would turn our next access into SIGBUS). A mapping of a
//! peer's memfd checks the seals before trusting the size.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use memfd::{FileSeal, MemfdOptions};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use thiserror::Error;

/// Errors creating or mapping shared memory.
#[derive(Debug, Error)]
pub enum ShmError {
    #[error("creating memfd")]
    Create(#[source] memfd::Error),
    #[error("sizing memfd")]
    Resize(#[source] std::io::Error),
    #[error("sealing memfd")]
    Seal(#[source] memfd::Error),
    #[error("memfd is not sealed against shrinking")]
    NotSealed,
    #[error("memfd is {actual} bytes, expected at least {expected}")]
    TooSmall { expected: u64, actual: u64 },
    #[error("reading memfd size")]
    Stat(#[source] std::io::Error),
    #[error("zero-length mapping")]
    Empty,
    #[error("mmap")]
    Map(#[source] nix::Error),
}

/// A read-write shared mapping of a whole memfd.
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through raw
// pointers/atomics whose synchronization is the users' (ring protocol's) job.
unsafe impl Send for SharedMemory {}
// SAFETY: as above; `&SharedMemory` only hands out raw pointers.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates a zero-filled memfd of `len` bytes, sealed against shrink and
    /// grow (and against further sealing), and maps it.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        if len == 0 {
            return Err(ShmError::Empty);
        }
        let memfd = MemfdOptions::new()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(ShmError::Create)?;
        memfd
            .as_file()
            .set_len(len as u64)
            .map_err(ShmError::Resize)?;
        memfd
            .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
            .map_err(ShmError::Seal)?;
        Self::map_file(memfd.into_file(), len)
    }

    /// Maps a memfd received from a peer. It must be sealed against shrinking
    /// and hold at least `len` bytes; only the first `len` bytes are mapped.
    pub fn from_peer(file: File, len: usize) -> Result<Self, ShmError> {
        if len == 0 {
            return Err(ShmError::Empty);
        }
        let memfd = memfd::Memfd::try_from_file(file).map_err(|_| ShmError::NotSealed)?;
        let seals = memfd.seals().map_err(|_| ShmError::NotSealed)?;
        if !seals.contains(&FileSeal::SealShrink) {
            return Err(ShmError::NotSealed);
        }
        let file = memfd.into_file();
        let actual = file.metadata().map_err(ShmError::Stat)?.len();
        if actual < len as u64 {
            return Err(ShmError::TooSmall {
                expected: len as u64,
                actual,
            });
        }
        Self::map_file(file, len)
    }

    fn map_file(file: File, len: usize) -> Result<Self, ShmError> {
        let nz = std::num::NonZeroUsize::new(len).ok_or(ShmError::Empty)?;
        // SAFETY: mapping a file we own with a fresh address chosen by the kernel;
        // nothing else in this process aliases the new range.
        let ptr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(ShmError::Map)?;
        Ok(SharedMemory {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// The memfd, to send to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The raw fd number (for logs).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Pointer to `offset`, valid for `size` bytes, or `None` when the range
    /// does not fit in the mapping. The pointer is valid for as long as `self`.
    pub fn ptr_at(&self, offset: usize, size: usize) -> Option<*mut u8> {
        let end = offset.checked_add(size)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset + size <= len, so the result stays inside the mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) })
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping made in map_file, which
        // nothing uses after drop (borrowers hold `&self`).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_memfd_is_sealed_and_zeroed() {
        let shm = SharedMemory::create("test", 8192).unwrap();
        let p = shm.ptr_at(0, 8192).unwrap();
        // SAFETY: p is valid for 8192 bytes of our own mapping.
        let first = unsafe { p.read_volatile() };
        assert_eq!(first, 0);
        let file = shm.file.try_clone().unwrap();
        assert!(file.set_len(4096).is_err(), "shrink must be refused");
        assert!(file.set_len(16384).is_err(), "grow must be refused");
    }

    #[test]
    fn peer_mapping_sees_writes() {
        let a = SharedMemory::create("test", 4096).unwrap();
        let b = SharedMemory::from_peer(a.file.try_clone().unwrap(), 4096).unwrap();
        // SAFETY: both pointers are valid for 1 byte inside their mappings.
        unsafe {
            a.ptr_at(100, 1).unwrap().write_volatile(0x5a);
            assert_eq!(b.ptr_at(100, 1).unwrap().read_volatile(), 0x5a);
        }
    }

    #[test]
    fn rejects_unsealed_peer_memfd() {
        let memfd = MemfdOptions::new().create("unsealed").unwrap();
        memfd.as_file().set_len(4096).unwrap();
        assert!(matches!(
            SharedMemory::from_peer(memfd.into_file(), 4096),
            Err(ShmError::NotSealed)
        ));
    }

    #[test]
    fn rejects_peer_memfd_smaller_than_claimed() {
        let a = SharedMemory::create("test", 4096).unwrap();
        assert!(matches!(
            SharedMemory::from_peer(a.file.try_clone().unwrap(), 8192),
            Err(ShmError::TooSmall { .. })
        ));
    }

    #[test]
    fn ptr_at_checks_bounds() {
        let a = SharedMemory::create("test", 4096).unwrap();
        assert!(a.ptr_at(4095, 1).is_some());
        assert!(a.ptr_at(4095, 2).is_none());
        assert!(a.ptr_at(usize::MAX, 2).is_none());
    }
}
