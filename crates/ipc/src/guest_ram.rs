//! A worker's mapping of guest RAM.
//!
//! The frontend forwards the VMM's memory table: one fd per region with its
//! guest address, size and offset in the fd. The worker maps each region
//! `MAP_SHARED` and from then on accepts only `(region, offset, len)` segments,
//! each checked against its own mapping before it becomes a host buffer. Guest
//! memory is never turned into `&[u8]`: the guest may change it at any time, so
//! it is only passed to the kernel (as iovecs) or copied with volatile-safe
//! raw copies.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use thiserror::Error;

use crate::ring::Segment;

/// Most regions accepted in one memory table (vhost-user's own limit is 509).
pub const MAX_REGIONS: usize = 512;

#[derive(Debug, Error)]
pub enum GuestRamError {
    #[error("{0} regions, at most {MAX_REGIONS} are supported")]
    TooManyRegions(usize),
    #[error("{regions} regions but {fds} file descriptors")]
    FdCount { regions: usize, fds: usize },
    #[error("region {0} is empty")]
    EmptyRegion(usize),
    #[error("region {0}: offset + size overflows")]
    Overflow(usize),
    #[error("region {index}: fd is {file_len} bytes, region needs {needed}")]
    FdTooSmall {
        index: usize,
        file_len: u64,
        needed: u64,
    },
    #[error("region {index}: mmap")]
    Map {
        index: usize,
        #[source]
        source: nix::Error,
    },
    #[error("region {index}: fstat")]
    Stat {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Why a segment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum SegmentError {
    #[error("segment names region {0}, which does not exist")]
    NoSuchRegion(u32),
    #[error("segment of {len} bytes at {offset:#x} leaves region {region}")]
    OutOfBounds { region: u32, offset: u64, len: u32 },
}

/// One region as described by the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub guest_addr: u64,
    pub size: u64,
    pub fd_offset: u64,
}

impl From<&blkmesh_proto::ipc::v1::MemRegion> for RegionSpec {
    /// A region of the frontend's `SetMemTable` message.
    fn from(r: &blkmesh_proto::ipc::v1::MemRegion) -> RegionSpec {
        RegionSpec {
            guest_addr: r.guest_addr,
            size: r.size,
            fd_offset: r.fd_offset,
        }
    }
}

/// A mapped guest-RAM region.
#[derive(Debug)]
pub struct GuestRegion {
    file: File,
    /// Start of our mapping (page-aligned, may begin before the region).
    map: NonNull<u8>,
    map_len: usize,
    /// Offset of the region's first byte within the mapping.
    skew: usize,
    spec: RegionSpec,
}

impl GuestRegion {
    /// The page-aligned mapping: (address, length, fd, offset of the mapping
    /// in the fd), as libblkio's map_mem_region wants it.
    pub fn registration(&self) -> (usize, usize, RawFd, u64) {
        (
            self.map.as_ptr() as usize,
            self.map_len,
            self.file.as_raw_fd(),
            self.spec.fd_offset - self.skew as u64,
        )
    }

    pub fn spec(&self) -> RegionSpec {
        self.spec
    }
}

/// A host buffer inside guest RAM, produced only from a checked segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

impl HostBuf {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// As an iovec for vectored I/O.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }

    /// Copies `src` into this buffer's first bytes (at most `len`).
    pub fn copy_from(&self, src: &[u8]) -> usize {
        let n = src.len().min(self.len);
        // SAFETY: HostBuf points at `len` valid, mapped bytes (checked when it
        // was produced, and the mapping outlives it by contract of GuestRam);
        // src is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, n) };
        n
    }

    /// Copies this buffer's first bytes into `dst` (at most `len`).
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len);
        // SAFETY: as in copy_from; the guest may change the bytes while we
        // copy, which yields some byte values but no undefined behaviour for
        // a plain byte copy into our own buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), n) };
        n
    }
}

// SAFETY: a HostBuf is an address range in a shared mapping; moving it to
// another thread is fine as long as the GuestRam outlives it (callers hold an
// Arc<GuestRam> for every in-flight request).
unsafe impl Send for HostBuf {}

/// The whole memory table, mapped.
#[derive(Debug, Default)]
pub struct GuestRam {
    regions: Vec<GuestRegion>,
}

// SAFETY: the mappings are plain shared memory accessed only via raw pointers.
unsafe impl Send for GuestRam {}
// SAFETY: as above; &GuestRam only produces raw-pointer HostBufs.
unsafe impl Sync for GuestRam {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

impl GuestRam {
    /// Maps every region. `files[i]` backs `specs[i]`.
    pub fn map(specs: &[RegionSpec], files: Vec<File>) -> Result<Self, GuestRamError> {
        if specs.len() > MAX_REGIONS {
            return Err(GuestRamError::TooManyRegions(specs.len()));
        }
        if specs.len() != files.len() {
            return Err(GuestRamError::FdCount {
                regions: specs.len(),
                fds: files.len(),
            });
        }
        let page = page_size();
        let mut regions = Vec::with_capacity(specs.len());
        for (index, (spec, file)) in specs.iter().zip(files).enumerate() {
            if spec.size == 0 {
                return Err(GuestRamError::EmptyRegion(index));
            }
            let end = spec
                .fd_offset
                .checked_add(spec.size)
                .ok_or(GuestRamError::Overflow(index))?;
            let file_len = file
                .metadata()
                .map_err(|source| GuestRamError::Stat { index, source })?
                .len();
            if file_len < end {
                return Err(GuestRamError::FdTooSmall {
                    index,
                    file_len,
                    needed: end,
                });
            }
            let skew = (spec.fd_offset % page as u64) as usize;
            let map_len = (spec.size as usize + skew).next_multiple_of(page);
            let len = NonZeroUsize::new(map_len).ok_or(GuestRamError::EmptyRegion(index))?;
            // SAFETY: a fresh shared mapping of a file we hold; the kernel
            // picks the address, so nothing in this process aliases it.
            let map = unsafe {
                mmap(
                    None,
                    len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    file.as_fd(),
                    (spec.fd_offset - skew as u64) as libc::off_t,
                )
            }
            .map_err(|source| GuestRamError::Map { index, source })?;
            regions.push(GuestRegion {
                file,
                map: map.cast(),
                map_len,
                skew,
                spec: *spec,
            });
        }
        Ok(GuestRam { regions })
    }

    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Turns a segment into a host buffer, if it lies inside its region.
    pub fn buf(&self, seg: &Segment) -> Result<HostBuf, SegmentError> {
        let region = self
            .regions
            .get(seg.region as usize)
            .ok_or(SegmentError::NoSuchRegion(seg.region))?;
        let oob = SegmentError::OutOfBounds {
            region: seg.region,
            offset: seg.offset,
            len: seg.len,
        };
        let end = seg.offset.checked_add(seg.len as u64).ok_or(oob)?;
        if end > region.spec.size {
            return Err(oob);
        }
        let at = region.skew + seg.offset as usize;
        // SAFETY: skew + offset + len <= skew + size <= map_len, so the range
        // lies inside the mapping.
        let ptr = unsafe { region.map.as_ptr().add(at) };
        Ok(HostBuf {
            ptr,
            len: seg.len as usize,
        })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: exactly the mapping made in `map`; HostBufs must not
            // outlive the GuestRam (holders keep an Arc).
            let _ = unsafe { munmap(r.map.cast(), r.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn memfd(len: u64) -> File {
        let m = memfd::MemfdOptions::new().create("ram").unwrap();
        m.as_file().set_len(len).unwrap();
        m.into_file()
    }

    #[test]
    fn segments_map_to_the_right_bytes() {
        let mut f = memfd(3 * 4096);
        f.seek(SeekFrom::Start(4096 + 100)).unwrap();
        f.write_all(b"hello").unwrap();
        let spec = RegionSpec {
            guest_addr: 0x1000_0000,
            size: 8192,
            fd_offset: 4096,
        };
        let ram = GuestRam::map(&[spec], vec![f.try_clone().unwrap()]).unwrap();
        let b = ram
            .buf(&Segment {
                region: 0,
                offset: 100,
                len: 5,
            })
            .unwrap();
        let mut out = [0u8; 5];
        b.copy_to(&mut out);
        assert_eq!(&out, b"hello");
        b.copy_from(b"HELLO");
        let mut back = [0u8; 5];
        f.seek(SeekFrom::Start(4096 + 100)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"HELLO");
    }

    #[test]
    fn rejects_segment_past_region_end() {
        let spec = RegionSpec {
            guest_addr: 0,
            size: 4096,
            fd_offset: 0,
        };
        let ram = GuestRam::map(&[spec], vec![memfd(4096)]).unwrap();
        let seg = |region, offset, len| Segment {
            region,
            offset,
            len,
        };
        assert!(ram.buf(&seg(0, 4095, 1)).is_ok());
        assert!(matches!(
            ram.buf(&seg(0, 4095, 2)),
            Err(SegmentError::OutOfBounds { .. })
        ));
        assert!(matches!(
            ram.buf(&seg(0, u64::MAX, 2)),
            Err(SegmentError::OutOfBounds { .. })
        ));
        assert_eq!(ram.buf(&seg(1, 0, 1)), Err(SegmentError::NoSuchRegion(1)));
    }

    #[test]
    fn rejects_region_larger_than_its_fd() {
        let spec = RegionSpec {
            guest_addr: 0,
            size: 8192,
            fd_offset: 0,
        };
        assert!(matches!(
            GuestRam::map(&[spec], vec![memfd(4096)]),
            Err(GuestRamError::FdTooSmall { .. })
        ));
    }

    #[test]
    fn rejects_fd_count_mismatch() {
        let spec = RegionSpec {
            guest_addr: 0,
            size: 4096,
            fd_offset: 0,
        };
        assert!(matches!(
            GuestRam::map(&[spec, spec], vec![memfd(4096)]),
            Err(GuestRamError::FdCount { .. })
        ));
    }
}
