//! Turning a virtio-blk descriptor chain into a ring request.
//!
//! Everything here reads guest-controlled bytes, so nothing is trusted: a
//! chain that the virtqueue iterator cut short (too long, out-of-range `next`,
//! bad indirect table) is malformed and refused, readable descriptors must
//! precede writable ones, every address range is translated through the
//! memory table, and sector ranges are checked against the capacity.

use blkmesh_ipc::ring::{Op, Request, Segment, FLAG_NO_UNMAP};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::MemTable;

const SECTOR: u64 = 512;
const HEADER: u64 = 16;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// What the device offers, for request checks.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub capacity: u64,
    pub writable: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Most ring segments one request may use.
    pub max_segments: usize,
    pub serial: [u8; ID_BYTES],
    /// Per-queue statistics, kept for the export's lifetime so counts
    /// survive VMM reconnects.
    pub stats: Vec<std::sync::Arc<blkmesh_stats::IoCounters>>,
}

/// A descriptor as the chain yielded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
    pub has_next: bool,
}

/// Why a chain cannot even be answered (no place for a status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("empty or unreadable descriptor chain")]
    Empty,
    #[error("descriptor chain cut short (loop, bad next index, bad indirect table or too long)")]
    Truncated,
    #[error("readable descriptor after a writable one")]
    Order,
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
}

/// The outcome of parsing one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Guest address of the status byte.
    pub status: u64,
    /// Bytes written into the chain on success (data + status).
    pub used_len: u32,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward to the worker; its segments were appended to the caller's vec.
    Submit(Request),
    /// Answer now with this status (already handled, or refused).
    Complete(u8),
}

/// Checks the shape of a chain. `descs` is what the chain iterator yielded.
pub fn check_chain(descs: &[Desc]) -> Result<u64, ChainError> {
    let last = descs.last().ok_or(ChainError::Empty)?;
    if last.has_next {
        return Err(ChainError::Truncated);
    }
    let mut seen_writable = false;
    for d in descs {
        if !d.writable && seen_writable {
            return Err(ChainError::Order);
        }
        seen_writable |= d.writable;
    }
    if !last.writable || last.len == 0 {
        return Err(ChainError::NoStatus);
    }
    last.addr
        .checked_add(last.len as u64 - 1)
        .ok_or(ChainError::NoStatus)
}

/// Byte ranges `[skip, skip + take)` of the concatenation of `descs`.
fn ranges(
    descs: impl Iterator<Item = (u64, u64)>,
    mut skip: u64,
    mut take: u64,
    out: &mut Vec<(u64, u64)>,
) {
    for (addr, len) in descs {
        if take == 0 {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push((addr + skip, n));
        take -= n;
        skip = 0;
    }
}

fn read_exact<M: GuestMemoryBackend>(mem: &M, parts: &[(u64, u64)], buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for &(addr, len) in parts {
        let n = len as usize;
        if at + n > buf.len() {
            return false;
        }
        let dst = &mut buf[at..at + n];
        // Fast path: the range lies in one region (always, in practice);
        // the general path walks regions.
        let done = match mem.get_slice(GuestAddress(addr), n) {
            Ok(s) => s.copy_to(dst) == n,
            Err(_) => mem.read_slice(dst, GuestAddress(addr)).is_ok(),
        };
        if !done {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

/// Parses a well-shaped chain (see [`check_chain`]) into an action. Data
/// segments go into `segs` (cleared first).
#[allow(clippy::too_many_arguments)]
pub fn parse<M: GuestMemoryBackend>(
    descs: &[Desc],
    status: u64,
    mem: &M,
    table: &MemTable,
    dev: &DeviceInfo,
    tag: u32,
    segs: &mut Vec<Segment>,
    parts: &mut Vec<(u64, u64)>,
) -> Parsed {
    segs.clear();
    parts.clear();
    let complete = |s: u32| Parsed {
        status,
        used_len: 1,
        action: Action::Complete(s as u8),
    };
    let readable = || {
        descs
            .iter()
            .filter(|d| !d.writable)
            .map(|d| (d.addr, d.len as u64))
    };
    let readable_len: u64 = readable().map(|(_, l)| l).sum();
    // Writable bytes excluding the status byte.
    let writable_len: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| d.len as u64)
        .sum::<u64>()
        - 1;
    let writable = || {
        descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| (d.addr, d.len as u64))
    };

    ranges(readable(), 0, HEADER, parts);
    let mut hdr = [0u8; HEADER as usize];
    if readable_len < HEADER || !read_exact(mem, parts, &mut hdr) {
        return complete(VIRTIO_BLK_S_IOERR);
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
    parts.clear();

    let in_range = |offset: u64, len: u64| {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= dev.capacity)
    };

    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = kind == VIRTIO_BLK_T_IN;
            let len = if is_read {
                writable_len
            } else {
                readable_len - HEADER
            };
            let Some(offset) = sector.checked_mul(SECTOR) else {
                return complete(VIRTIO_BLK_S_IOERR);
            };
            if len % SECTOR != 0 || !in_range(offset, len) || len > u32::MAX as u64 {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            if !is_read && !dev.writable {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            if len == 0 {
                return complete(VIRTIO_BLK_S_OK);
            }
            if is_read {
                ranges(writable(), 0, len, parts);
            } else {
                ranges(readable(), HEADER, len, parts);
            }
            for &(addr, n) in parts.iter() {
                if !table.segments(addr, n, segs) {
                    segs.clear();
                    return complete(VIRTIO_BLK_S_IOERR);
                }
            }
            if segs.len() > dev.max_segments {
                segs.clear();
                return complete(VIRTIO_BLK_S_IOERR);
            }
            Parsed {
                status,
                used_len: if is_read { len as u32 + 1 } else { 1 },
                action: Action::Submit(Request {
                    tag,
                    op: if is_read { Op::Read } else { Op::Write },
                    flags: 0,
                    offset,
                    len,
                }),
            }
        }
        VIRTIO_BLK_T_FLUSH => Parsed {
            status,
            used_len: 1,
            action: Action::Submit(Request {
                tag,
                op: Op::Flush,
                flags: 0,
                offset: 0,
                len: 0,
            }),
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = writable_len.min(ID_BYTES as u64);
            ranges(writable(), 0, n, parts);
            let mut at = 0usize;
            for &(addr, len) in parts.iter() {
                let bytes = &dev.serial[at..at + len as usize];
                if mem.write_slice(bytes, GuestAddress(addr)).is_err() {
                    return complete(VIRTIO_BLK_S_IOERR);
                }
                at += len as usize;
            }
            Parsed {
                status,
                used_len: n as u32 + 1,
                action: Action::Complete(VIRTIO_BLK_S_OK as u8),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = kind == VIRTIO_BLK_T_DISCARD;
            // One 16-byte range per request: we offer max_*_seg = 1.
            if readable_len - HEADER != 16 {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            ranges(readable(), HEADER, 16, parts);
            let mut seg = [0u8; 16];
            if !read_exact(mem, parts, &mut seg) {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let allowed = if is_discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return complete(VIRTIO_BLK_S_UNSUPP);
            }
            let max = if is_discard {
                dev.max_discard_sectors
            } else {
                dev.max_write_zeroes_sectors
            };
            let (Some(offset), len) = (start.checked_mul(SECTOR), num as u64 * SECTOR) else {
                return complete(VIRTIO_BLK_S_IOERR);
            };
            if !dev.writable || num == 0 || num > max || !in_range(offset, len) {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            Parsed {
                status,
                used_len: 1,
                action: Action::Submit(Request {
                    tag,
                    op: if is_discard {
                        Op::Discard
                    } else {
                        Op::WriteZeroes
                    },
                    flags: if !is_discard && !unmap {
                        FLAG_NO_UNMAP
                    } else {
                        0
                    },
                    offset,
                    len,
                }),
            }
        }
        _ => complete(VIRTIO_BLK_S_UNSUPP),
    }
}

/// The virtio status for a worker's result (0 or -errno).
pub fn status_of(result: i32) -> u8 {
    match -result {
        0 => VIRTIO_BLK_S_OK as u8,
        libc::EOPNOTSUPP => VIRTIO_BLK_S_UNSUPP as u8,
        _ => VIRTIO_BLK_S_IOERR as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionDesc;
    use std::fs::File;

    const MEM: u64 = 1 << 20;

    fn setup() -> MemTable {
        let f: File = tempfile::tempfile().unwrap();
        f.set_len(MEM).unwrap();
        MemTable::new(
            &[RegionDesc {
                gpa: 0,
                size: MEM,
                vmm_addr: 0x1000_0000,
                fd_offset: 0,
            }],
            vec![f],
        )
        .unwrap()
    }

    fn dev() -> DeviceInfo {
        DeviceInfo {
            capacity: 1 << 20,
            writable: true,
            max_discard_sectors: 2048,
            max_write_zeroes_sectors: 2048,
            max_segments: 8,
            serial: *b"serial-0123456789abc",
            stats: vec![],
        }
    }

    fn d(addr: u64, len: u32, writable: bool, has_next: bool) -> Desc {
        Desc {
            addr,
            len,
            writable,
            has_next,
        }
    }

    fn header(t: &MemTable, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        t.guest_memory().write_slice(&h, GuestAddress(0)).unwrap();
    }

    fn run(t: &MemTable, descs: &[Desc]) -> (Parsed, Vec<Segment>) {
        let status = check_chain(descs).unwrap();
        let mut segs = vec![];
        let p = parse(
            descs,
            status,
            t.guest_memory(),
            t,
            &dev(),
            7,
            &mut segs,
            &mut vec![],
        );
        (p, segs)
    }

    #[test]
    fn read_becomes_one_segment_per_data_descriptor() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 8);
        let (p, segs) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 4096, true, true),
                d(0x3000, 512, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.used_len, 4096 + 512 + 1);
        assert_eq!(
            p.action,
            Action::Submit(Request {
                tag: 7,
                op: Op::Read,
                flags: 0,
                offset: 4096,
                len: 4608
            })
        );
        assert_eq!(segs.len(), 2);
        assert_eq!(p.status, 100);
    }

    #[test]
    fn header_and_data_may_share_a_descriptor() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_OUT, 0);
        let (p, segs) = run(&t, &[d(0, 16 + 512, false, true), d(600, 1, true, false)]);
        assert!(matches!(
            p.action,
            Action::Submit(Request {
                op: Op::Write,
                len: 512,
                ..
            })
        ));
        assert_eq!(segs[0].offset, 16);
    }

    #[test]
    fn rejects_truncated_chain() {
        assert_eq!(
            check_chain(&[d(0, 16, false, true)]),
            Err(ChainError::Truncated)
        );
        assert_eq!(check_chain(&[]), Err(ChainError::Empty));
    }

    #[test]
    fn rejects_readable_after_writable() {
        assert_eq!(
            check_chain(&[
                d(0, 16, false, true),
                d(16, 512, true, true),
                d(600, 1, false, false)
            ]),
            Err(ChainError::Order)
        );
    }

    #[test]
    fn rejects_chain_without_status() {
        assert_eq!(
            check_chain(&[d(0, 16, false, false)]),
            Err(ChainError::NoStatus)
        );
    }

    #[test]
    fn read_past_capacity_is_ioerr() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 2047);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 1024, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
        header(&t, VIRTIO_BLK_T_IN, u64::MAX / 256);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 512, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn writes_to_read_only_device_are_ioerr() {
        let t = setup();
        let mut ro = dev();
        ro.writable = false;
        for kind in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&t, kind, 0);
            let descs = [d(0, 32, false, true), d(100, 1, true, false)];
            let status = check_chain(&descs).unwrap();
            let p = parse(
                &descs,
                status,
                t.guest_memory(),
                &t,
                &ro,
                1,
                &mut vec![],
                &mut vec![],
            );
            assert_eq!(
                p.action,
                Action::Complete(VIRTIO_BLK_S_IOERR as u8),
                "type {kind}"
            );
        }
    }

    #[test]
    fn misaligned_length_is_ioerr() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 0);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 100, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 0);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(MEM - 256, 512, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let t = setup();
        header(&t, 0x77, 0);
        let (p, _) = run(&t, &[d(0, 16, false, true), d(100, 1, true, false)]);
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_UNSUPP as u8));
    }

    #[test]
    fn get_id_writes_the_serial() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_GET_ID, 0);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 20, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(0));
        let mut id = [0u8; 20];
        t.guest_memory()
            .read_slice(&mut id, GuestAddress(4096))
            .unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
    }

    #[test]
    fn write_zeroes_carries_unmap_choice() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        t.guest_memory()
            .write_slice(&seg, GuestAddress(16))
            .unwrap();
        let (p, _) = run(&t, &[d(0, 32, false, true), d(100, 1, true, false)]);
        assert_eq!(
            p.action,
            Action::Submit(Request {
                tag: 7,
                op: Op::WriteZeroes,
                flags: FLAG_NO_UNMAP,
                offset: 4096,
                len: 8192
            })
        );
        seg[12..16].copy_from_slice(&0x80u32.to_le_bytes());
        t.guest_memory()
            .write_slice(&seg, GuestAddress(16))
            .unwrap();
        let (p, _) = run(&t, &[d(0, 32, false, true), d(100, 1, true, false)]);
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_UNSUPP as u8));
    }

    #[test]
    fn maps_errno_to_status() {
        assert_eq!(status_of(0), 0);
        assert_eq!(status_of(-libc::EOPNOTSUPP), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(status_of(-libc::EIO), VIRTIO_BLK_S_IOERR as u8);
    }
}
