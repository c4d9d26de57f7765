//! The guest memory table as the frontend sees it.
//!
//! The VMM's SET_MEM_TABLE gives regions (guest address, size, VMM virtual
//! address, offset in fd) with one fd each. The frontend maps them for its own
//! virtqueue access (vm-memory), keeps the fds to forward to the workers, and
//! translates guest addresses into `(region index, offset)` segments in the
//! same region order that it sends to the workers.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use blkmesh_ipc::ring::Segment;
use blkmesh_proto::ipc::v1::MemRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// Most regions accepted (vhost-user's classic limit is 8; we allow more).
pub const MAX_REGIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} memory regions, at most {MAX_REGIONS}")]
    TooMany(usize),
    #[error("{regions} regions but {fds} fds")]
    FdCount { regions: usize, fds: usize },
    #[error("region {0} is empty or overflows")]
    BadRegion(usize),
    #[error("regions overlap or are otherwise unusable: {0}")]
    Overlap(String),
    #[error("mapping region {index}: {message}")]
    Map { index: usize, message: String },
}

#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    vmm_addr: u64,
    fd_offset: u64,
    file: File,
}

/// A memory table: the mapping for the frontend plus what workers need.
#[derive(Debug)]
pub struct MemTable {
    /// In the VMM's order; the index is the segment's region number.
    regions: Vec<Region>,
    /// Indices into `regions`, sorted by guest address.
    by_gpa: Vec<usize>,
    mem: GuestMemoryMmap<()>,
}

/// One region as the VMM described it.
#[derive(Clone, Copy, Debug)]
pub struct RegionDesc {
    pub gpa: u64,
    pub size: u64,
    pub vmm_addr: u64,
    pub fd_offset: u64,
}

/// Seals a guest-RAM memfd against shrinking, so the VMM cannot truncate it
/// under mappings (ours and the workers'), which would turn our next access
/// into SIGBUS. Adding F_SEAL_SHRINK needs no cooperation from the VMM
/// beyond having created the memfd sealable (QEMU's memory-backend-memfd
/// does, and seals it itself by default). Files that cannot be sealed
/// (hugetlbfs, /dev/shm files, memfds created without sealing) are accepted
/// with a warning: such a VMM must be trusted not to shrink its own RAM.
fn protect_from_shrinking(index: usize, file: &File) {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let shrink = SealFlag::F_SEAL_SHRINK;
    let sealed = match fcntl(file, FcntlArg::F_GET_SEALS) {
        Ok(bits) if SealFlag::from_bits_truncate(bits).contains(shrink) => true,
        Ok(_) => fcntl(file, FcntlArg::F_ADD_SEALS(shrink)).is_ok(),
        Err(_) => false,
    };
    if !sealed {
        tracing::warn!(
            region = index,
            "guest RAM fd cannot be sealed against shrinking; a VMM that truncates it would crash the frontend"
        );
    }
}

impl MemTable {
    pub fn new(descs: &[RegionDesc], files: Vec<File>) -> Result<Self, MemoryError> {
        if descs.len() > MAX_REGIONS {
            return Err(MemoryError::TooMany(descs.len()));
        }
        if descs.len() != files.len() {
            return Err(MemoryError::FdCount {
                regions: descs.len(),
                fds: files.len(),
            });
        }
        let mut regions = Vec::with_capacity(descs.len());
        let mut mmaps = Vec::with_capacity(descs.len());
        for (index, (d, file)) in descs.iter().zip(files).enumerate() {
            if d.size == 0
                || d.gpa.checked_add(d.size).is_none()
                || d.vmm_addr.checked_add(d.size).is_none()
                || d.fd_offset.checked_add(d.size).is_none()
                || usize::try_from(d.size).is_err()
            {
                return Err(MemoryError::BadRegion(index));
            }
            let map_err = |message: String| MemoryError::Map { index, message };
            // vm-memory maps past the end of a file without complaint; the
            // first access there would be SIGBUS for the whole frontend.
            let len = file
                .metadata()
                .map_err(|e| map_err(format!("fd: {e}")))?
                .len();
            if d.fd_offset + d.size > len {
                return Err(map_err(format!(
                    "fd is {len} bytes, region needs {} at offset {}",
                    d.size, d.fd_offset
                )));
            }
            protect_from_shrinking(index, &file);
            let dup = file.try_clone().map_err(|e| map_err(e.to_string()))?;
            let region = MmapRegion::<()>::from_file(
                vm_memory::FileOffset::new(dup, d.fd_offset),
                d.size as usize,
            )
            .map_err(|e| MemoryError::Map {
                index,
                message: e.to_string(),
            })?;
            let guest = GuestRegionMmap::new(region, GuestAddress(d.gpa))
                .ok_or(MemoryError::BadRegion(index))?;
            mmaps.push(guest);
            regions.push(Region {
                gpa: d.gpa,
                size: d.size,
                vmm_addr: d.vmm_addr,
                fd_offset: d.fd_offset,
                file,
            });
        }
        let mem = if mmaps.is_empty() {
            GuestMemoryMmap::default()
        } else {
            // vm-memory wants the regions sorted by guest address.
            mmaps.sort_by_key(|r| r.start_addr());
            GuestMemoryMmap::from_regions(mmaps).map_err(|e| MemoryError::Overlap(e.to_string()))?
        };
        let mut by_gpa: Vec<usize> = (0..regions.len()).collect();
        by_gpa.sort_by_key(|&i| regions[i].gpa);
        Ok(MemTable {
            regions,
            by_gpa,
            mem,
        })
    }

    /// The frontend's own mapping, for virtqueue access.
    pub fn guest_memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Translates a VMM virtual address (as in SET_VRING_ADDR) to a guest address.
    pub fn vmm_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.vmm_addr && va - r.vmm_addr < r.size)
            .map(|r| va - r.vmm_addr + r.gpa)
    }

    /// The table for the workers, with the fds in the same order.
    pub fn for_worker(&self) -> (Vec<MemRegion>, Vec<BorrowedFd<'_>>) {
        let regions = self
            .regions
            .iter()
            .map(|r| MemRegion {
                guest_addr: r.gpa,
                size: r.size,
                fd_offset: r.fd_offset,
            })
            .collect();
        let fds = self.regions.iter().map(|r| r.file.as_fd()).collect();
        (regions, fds)
    }

    /// Appends the segments that `old` (segments of `from`, another table)
    /// covers in this table: the same guest bytes, perhaps in other regions
    /// or split differently. False if some of them are not in this table
    /// any more (the VMM removed memory under an in-flight request).
    pub fn translate_from(&self, from: &MemTable, old: &[Segment], out: &mut Vec<Segment>) -> bool {
        old.iter().all(|s| {
            from.regions
                .get(s.region as usize)
                .and_then(|r| r.gpa.checked_add(s.offset))
                .is_some_and(|gpa| self.segments(gpa, s.len as u64, out))
        })
    }

    /// Appends the segments covering `[gpa, gpa + len)`; a range that leaves
    /// guest memory (or crosses into a gap) is refused.
    pub fn segments(&self, mut gpa: u64, mut len: u64, out: &mut Vec<Segment>) -> bool {
        while len > 0 {
            let Some(&i) = self.by_gpa.iter().find(|&&i| {
                gpa >= self.regions[i].gpa && gpa - self.regions[i].gpa < self.regions[i].size
            }) else {
                return false;
            };
            let r = &self.regions[i];
            let offset = gpa - r.gpa;
            let n = len.min(r.size - offset).min(u32::MAX as u64 & !4095);
            out.push(Segment {
                region: i as u32,
                len: n as u32,
                offset,
            });
            gpa += n;
            len -= n;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_translate_to_a_reordered_table() {
        let a = table();
        let desc = |gpa, vmm_addr| RegionDesc {
            gpa,
            size: 0x10000,
            vmm_addr,
            fd_offset: 0,
        };
        // The same two regions plus a third, in another order.
        let b = MemTable::new(
            &[
                desc(0x20000, 0x8000_0000),
                desc(0, 0x6000_0000),
                desc(0x10000, 0x7000_0000),
            ],
            vec![memfd(0x10000), memfd(0x10000), memfd(0x10000)],
        )
        .unwrap();
        let mut old = Vec::new();
        assert!(a.segments(0xff00, 0x200, &mut old));
        let mut new = Vec::new();
        assert!(b.translate_from(&a, &old, &mut new));
        let mut want = Vec::new();
        assert!(b.segments(0xff00, 0x200, &mut want));
        assert_eq!(new, want);
        assert_eq!((new[0].region, new[1].region), (1, 2));
        // Memory that is gone does not translate.
        let c = MemTable::new(&[desc(0, 0x6000_0000)], vec![memfd(0x10000)]).unwrap();
        assert!(!c.translate_from(&a, &old, &mut Vec::new()));
    }

    fn memfd(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn table() -> MemTable {
        let d = [
            RegionDesc {
                gpa: 0x10000,
                size: 0x10000,
                vmm_addr: 0x7000_0000,
                fd_offset: 0,
            },
            RegionDesc {
                gpa: 0,
                size: 0x10000,
                vmm_addr: 0x6000_0000,
                fd_offset: 0,
            },
        ];
        MemTable::new(&d, vec![memfd(0x10000), memfd(0x10000)]).unwrap()
    }

    #[test]
    fn range_across_adjacent_regions_splits() {
        let t = table();
        let mut segs = vec![];
        assert!(t.segments(0xff00, 0x200, &mut segs));
        assert_eq!(
            segs,
            vec![
                Segment {
                    region: 1,
                    len: 0x100,
                    offset: 0xff00
                },
                Segment {
                    region: 0,
                    len: 0x100,
                    offset: 0
                }
            ]
        );
    }

    #[test]
    fn rejects_range_past_memory_end() {
        let t = table();
        let mut segs = vec![];
        assert!(!t.segments(0x1ff00, 0x200, &mut segs));
        assert!(!t.segments(u64::MAX - 1, 0x10, &mut segs));
    }

    #[test]
    fn translates_vmm_addresses() {
        let t = table();
        assert_eq!(t.vmm_to_gpa(0x7000_0010), Some(0x10010));
        assert_eq!(t.vmm_to_gpa(0x7001_0000), None);
    }

    #[test]
    fn rejects_overlapping_regions() {
        let d = [
            RegionDesc {
                gpa: 0,
                size: 0x10000,
                vmm_addr: 0,
                fd_offset: 0,
            },
            RegionDesc {
                gpa: 0x8000,
                size: 0x10000,
                vmm_addr: 0x100000,
                fd_offset: 0,
            },
        ];
        assert!(MemTable::new(&d, vec![memfd(0x10000), memfd(0x10000)]).is_err());
    }
}
