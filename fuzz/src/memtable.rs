//! `mem_table`: the frontend's vhost-user memory table (`memory.rs`), as a
//! VMM's SET_MEM_TABLE builds it: region descriptors and one fd each.
//!
//! Input format:
//!
//! ```text
//! u8 regions (mod 8; 7 = 65, over the limit), u8 fd count delta (0: equal,
//! 1: one more, 2: one less), per region:
//!   u8 kind: bits 0-1 placement of gpa (0 after the previous region,
//!            1 u32 pages, 2 raw u64, 3 top of the address space - u16),
//!            bits 2-3 size (0 u8 pages+1, 1 u16 bytes+1, 2 raw u64, 3 0),
//!            bit 4 fd_offset u8 pages, bit 5 raw u64 fd_offset,
//!            bit 6 file shorter than fd_offset + size by u16 bytes
//!   then the fields the kind asks for: size, gpa, fd_offset (bit 4, then
//!   bit 5), shortfall, and always a u64 vmm_addr
//! then u8 count (mod 32) × probe { u8 kind, u64 address, u32 len }: kind
//!   bit 0 clear: the address is relative to region (kind >> 1), else raw;
//!   bit 1: also translate it as a VMM address
//! ```
//!
//! Checks: no panic. An accepted table has non-empty, non-overlapping
//! regions that do not wrap, each backed by enough file (else touching it
//! would kill the frontend with SIGBUS); `segments` covers exactly the bytes
//! asked for, inside regions, or refuses a range that leaves guest memory;
//! `vmm_to_gpa` agrees with the descriptors; `for_worker` describes the same
//! regions, which a worker's `GuestRam::map` accepts.

use std::fs::File;

use blkmesh_frontend::memory::{MemTable, RegionDesc, MAX_REGIONS};
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::ring::Segment;
use vm_memory::{Bytes, GuestAddress};

use crate::{memfd, Reader, Writer};

const PAGE: u64 = 4096;

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let n = match r.u8() % 8 {
        7 => MAX_REGIONS + 1,
        n => n as usize,
    };
    let fd_delta = r.u8() % 3;
    let mut descs = Vec::with_capacity(n);
    let mut file_lens = Vec::with_capacity(n);
    let mut next = 0u64;
    for _ in 0..n {
        let kind = r.u8();
        let gpa_of = |r: &mut Reader<'_>, size: u64| match kind & 3 {
            0 => next,
            1 => r.u32() as u64 * PAGE,
            2 => r.u64(),
            _ => u64::MAX.wrapping_sub(size).wrapping_sub(r.u16() as u64),
        };
        let size = match (kind >> 2) & 3 {
            0 => (1 + r.u8() as u64) * PAGE,
            1 => 1 + r.u16() as u64,
            2 => r.u64(),
            _ => 0,
        };
        let gpa = gpa_of(&mut r, size);
        let mut fd_offset = 0;
        if kind & 16 != 0 {
            fd_offset = r.u8() as u64 * PAGE;
        }
        if kind & 32 != 0 {
            fd_offset = r.u64();
        }
        let short = if kind & 64 != 0 { r.u16() as u64 } else { 0 };
        let vmm_addr = r.u64();
        next = gpa.wrapping_add(size);
        descs.push(RegionDesc {
            gpa,
            size,
            vmm_addr,
            fd_offset,
        });
        // Back only what a test machine can: past 1 GiB the table must be
        // refused or the file is short anyway.
        let want = fd_offset.saturating_add(size).saturating_sub(short);
        file_lens.push(want.min(1 << 30));
    }
    let nfds = match fd_delta {
        0 => n,
        1 => n + 1,
        _ => n.saturating_sub(1),
    };
    let files: Vec<File> = (0..nfds)
        .map(|i| memfd("fuzz-mt", file_lens.get(i).copied().unwrap_or(PAGE), false))
        .collect();
    let table = match MemTable::new(&descs, files) {
        Ok(t) => t,
        Err(e) => {
            if crate::debug() {
                eprintln!("refused {descs:?}: {e}");
            }
            return;
        }
    };
    if crate::debug() {
        eprintln!("accepted {descs:?}");
    }

    // Accepted: the descriptors must make sense.
    assert!(n <= MAX_REGIONS && nfds == n);
    for (i, d) in descs.iter().enumerate() {
        assert!(d.size > 0);
        assert!(d.gpa.checked_add(d.size).is_some());
        assert!(d.vmm_addr.checked_add(d.size).is_some());
        assert!(d.fd_offset.checked_add(d.size).is_some());
        for e in &descs[..i] {
            assert!(
                d.gpa + d.size <= e.gpa || e.gpa + e.size <= d.gpa,
                "overlapping regions accepted: {d:?} {e:?}"
            );
        }
        assert!(
            file_lens[i] >= d.fd_offset + d.size,
            "region {i} {d:?} accepted with a {}-byte fd: touching its end raises SIGBUS",
            file_lens[i]
        );
    }
    let gm = table.guest_memory();
    for d in &descs {
        let mut b = [0u8; 1];
        gm.read_slice(&mut b, GuestAddress(d.gpa)).unwrap();
        gm.read_slice(&mut b, GuestAddress(d.gpa + d.size - 1))
            .unwrap();
    }

    let (specs, fds) = table.for_worker();
    assert_eq!(specs.len(), n);
    assert_eq!(fds.len(), n);
    for (s, d) in specs.iter().zip(&descs) {
        assert_eq!(
            (s.guest_addr, s.size, s.fd_offset),
            (d.gpa, d.size, d.fd_offset)
        );
    }
    let worker_specs: Vec<RegionSpec> = specs
        .iter()
        .map(|s| RegionSpec {
            guest_addr: s.guest_addr,
            size: s.size,
            fd_offset: s.fd_offset,
        })
        .collect();
    let worker_files = fds
        .iter()
        .map(|f| File::from(f.try_clone_to_owned().unwrap()))
        .collect();
    let ram = GuestRam::map(&worker_specs, worker_files)
        .unwrap_or_else(|e| panic!("worker refuses a table the frontend accepted: {e}"));

    let mut segs = Vec::new();
    for _ in 0..r.u8() % 32 {
        let kind = r.u8();
        let raw = r.u64();
        let len = r.u32() as u64;
        let addr = if n > 0 && kind & 1 == 0 {
            let d = descs[(kind >> 1) as usize % n];
            d.gpa
                .wrapping_add(raw % (d.size + 1 + PAGE))
                .wrapping_sub(PAGE.min(raw >> 60))
        } else {
            raw
        };
        if kind & 2 != 0 {
            // vmm_to_gpa: the first region (VMM order) holding the address.
            let want = descs
                .iter()
                .find(|d| addr >= d.vmm_addr && addr - d.vmm_addr < d.size)
                .map(|d| addr - d.vmm_addr + d.gpa);
            assert_eq!(table.vmm_to_gpa(addr), want);
        }
        segs.clear();
        let ok = table.segments(addr, len, &mut segs);
        let covered = covered(&descs, addr, len);
        assert_eq!(ok, covered, "segments({addr:#x}, {len:#x})");
        if !ok {
            continue;
        }
        let mut at = addr;
        for s in &segs {
            let d = descs[s.region as usize];
            assert!(s.len > 0);
            assert!(s.offset + s.len as u64 <= d.size, "{s:?} leaves {d:?}");
            assert_eq!(d.gpa + s.offset, at, "segments out of order");
            at += s.len as u64;
            let b = ram
                .buf(&Segment {
                    region: s.region,
                    len: s.len,
                    offset: s.offset,
                })
                .expect("worker refuses a frontend segment");
            crate::touch(b.as_ptr());
        }
        assert_eq!(at - addr, len);
    }
}

/// Whether every byte of `[addr, addr + len)` lies in some region.
fn covered(descs: &[RegionDesc], mut addr: u64, mut len: u64) -> bool {
    while len > 0 {
        let Some(d) = descs
            .iter()
            .find(|d| addr >= d.gpa && addr - d.gpa < d.size)
        else {
            return false;
        };
        let n = len.min(d.gpa + d.size - addr);
        len -= n;
        addr += n;
    }
    true
}

// ------------------------------------------------------------------ seeds

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // QEMU-like: low RAM below a hole, high RAM above 4 GiB, one memfd each.
    {
        let mut w = Writer::new();
        w.u8(2).u8(0);
        w.u8(0).u8(255).u64(0x7f00_0000_0000); // 1 MiB at 0
        w.u8(1 | 16)
            .u8(16)
            .u32(0x10_0000)
            .u8(1)
            .u64(0x7f10_0000_0000); // 64 KiB at 4 GiB, fd offset 4 KiB
        w.u8(4);
        w.u8(0).u64(0x1000).u32(0x2000);
        w.u8(0).u64(0xff000).u32(0x2000); // runs off the end of low RAM
        w.u8(3).u64(0x7f00_0000_1000).u32(16);
        w.u8(1).u64(0x1_0000_0000).u32(0x10000);
        out.push(("two-regions", w.buf));
    }
    // Adjacent regions, a range across both.
    {
        let mut w = Writer::new();
        w.u8(2).u8(0);
        w.u8(0).u8(0).u64(0x1000_0000);
        w.u8(0).u8(0).u64(0x2000_0000);
        w.u8(1).u8(0).u64(0xf00).u32(0x200);
        out.push(("adjacent", w.buf));
    }
    // Refusals: overlap, empty region, overflow, fd count, too many.
    {
        let mut w = Writer::new();
        w.u8(2).u8(0);
        w.u8(1).u8(3).u32(0).u64(0);
        w.u8(1).u8(3).u32(2).u64(0x10000);
        out.push(("overlap", w.buf));
        let mut w = Writer::new();
        w.u8(1).u8(0).u8(3 << 2).u64(0);
        out.push(("empty-region", w.buf));
        let mut w = Writer::new();
        w.u8(1).u8(0).u8(2 | 2 << 2).u64(u64::MAX).u64(16).u64(0);
        out.push(("wrapping-region", w.buf));
        let mut w = Writer::new();
        w.u8(1).u8(1).u8(0).u8(0).u64(0);
        out.push(("fd-count", w.buf));
        let mut w = Writer::new();
        w.u8(7).u8(0);
        out.push(("too-many", w.buf));
    }
    // The top of the guest address space.
    {
        let mut w = Writer::new();
        w.u8(1).u8(0).u8(3).u8(0).u16(0).u64(0);
        w.u8(2).u8(1).u64(u64::MAX - 4096).u32(4096);
        w.u8(1).u64(u64::MAX - 4096).u32(4097);
        out.push(("top-of-memory", w.buf));
    }
    out
}

/// Inputs of bugs found here and fixed since: a region larger than its fd
/// was accepted, and touching its end raised SIGBUS (fixed in 00ae516).
pub fn regressions() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = Writer::new();
    // One 4 KiB region at 0 whose memfd is 4 KiB short (0 bytes).
    w.u8(1).u8(0).u8(64).u8(0).u16(4096).u64(0);
    vec![("region-past-fd-end", w.buf)]
}
