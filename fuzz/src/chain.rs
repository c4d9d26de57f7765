//! `descriptor_chain`: the frontend's virtio-blk request parsing.
//!
//! Input format (all fields via [`Reader`]):
//!
//! ```text
//! layout   u8 n-1 (1..=4 regions), then per region:
//!            u8 placement (0 adjacent, 1 gap u16 pages, 2 at u64, 3 at the top
//!            of the address space minus u16), u8 size in 256-byte units - 1
//! device   u8 capacity kind (0 1 MiB, 1 u64, 2 u32 sectors, 3 u64::MAX),
//!          bool writable, u32 max discard sectors, u32 max write-zeroes
//!          sectors, u8 max segments - 1 (mod 128)
//! memory   u8 count (mod 16) × { addr, bytes (<= 512) }  written into guest RAM
//! mode     u8 (mod 3): 0 a descriptor list, 1 a virtqueue, 2 a chain walked
//!          from its head as the in-flight resubmission does
//!   list   u16 head, u8 count (mod 64) × { addr, len, u8 flags (1 write, 2 next) }
//!   queue  u8 log2 size (mod 11), addr desc table, addr avail, addr used,
//!          u16 next_avail, bool event_idx, u8 chains to pop - 1
//!   walk   u8 log2 size (mod 11), addr desc table, u16 head
//! addr     u8 kind: 0 region[u8] + u16, 1 end of region[u8] - 1 - u8,
//!          2 raw u64, 3 region[u8] + u32
//! len      u8 kind: 0 u8, 1 u16, 2 u32, 3 u8 sectors
//! ```
//!
//! Checks: no panic; a walked chain ends with its only descriptor without
//! NEXT; a chain's status address is its last byte; a submitted
//! request is in range, aligned, within the device's limits, and its segments
//! lie inside guest memory, cover exactly the data bytes of the chain in
//! order, survive a trip through a queue ring unchanged and are accepted by
//! a worker's own mapping of the same memory table.

use std::cell::RefCell;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use blkmesh_frontend::memory::{MemTable, RegionDesc};
use blkmesh_frontend::request::{
    check_chain, parse, walk_chain, Action, ChainError, Desc, DeviceInfo, WalkError,
    MAX_REQUEST_BYTES,
};
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::ring::{
    Op, QueueRings, Received, Request, RequestReceiver, RequestSender, RingLayout, Segment,
    FLAG_NO_UNMAP,
};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{memfd, touch, Reader, Writer};

const HEADER: u64 = 16;
const SECTOR: u64 = 512;
/// The frontend's queue size limit and ring geometry (handler/mod.rs, config/mod.rs).
const MAX_QUEUE_SIZE: u16 = 1024;
const RING_MAX_SEGMENTS: u32 = 128;

#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    size: u64,
}

struct Ring {
    _rings: (QueueRings, QueueRings),
    tx: RequestSender,
    rx: RequestReceiver,
}

thread_local! {
    /// One ring pair for the whole run, as a queue keeps its ring: every
    /// iteration pushes and pops, so it is empty in between.
    static RING: RefCell<Ring> = RefCell::new({
        let layout = RingLayout::new(MAX_QUEUE_SIZE as u32, RING_MAX_SEGMENTS).unwrap();
        let f = QueueRings::create("fuzz-chain", layout).unwrap();
        let fd = File::from(f.fd().try_clone_to_owned().unwrap());
        let w = QueueRings::attach(fd, layout).unwrap();
        let (tx, _) = f.frontend_end();
        let (rx, _) = w.worker_end();
        Ring { _rings: (f, w), tx, rx }
    });
}

fn addr(r: &mut Reader<'_>, regions: &[Region]) -> u64 {
    let kind = r.u8() % 4;
    if kind == 2 {
        return r.u64();
    }
    let reg = regions[r.u8() as usize % regions.len()];
    match kind {
        0 => reg.gpa + r.u16() as u64 % reg.size,
        1 => (reg.gpa + reg.size).wrapping_sub(1 + r.u8() as u64),
        _ => reg.gpa.wrapping_add(r.u32() as u64),
    }
}

fn len(r: &mut Reader<'_>) -> u32 {
    match r.u8() % 4 {
        0 => r.u8() as u32,
        1 => r.u16() as u32,
        2 => r.u32(),
        _ => r.u8() as u32 * SECTOR as u32,
    }
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);

    // Guest memory: 1..=4 regions, each its own memfd.
    let n = 1 + (r.u8() % 4) as usize;
    let mut regions = Vec::with_capacity(n);
    let mut next = 0u64;
    for _ in 0..n {
        let place = r.u8() % 4;
        let size = (1 + r.u8() as u64) * 256;
        let gpa = match place {
            0 => next,
            1 => next.wrapping_add((1 + r.u16() as u64) * 4096),
            2 => r.u64(),
            _ => u64::MAX - size - r.u16() as u64,
        };
        next = gpa.wrapping_add(size);
        regions.push(Region { gpa, size });
    }
    let descs: Vec<RegionDesc> = regions
        .iter()
        .enumerate()
        .map(|(i, g)| RegionDesc {
            gpa: g.gpa,
            size: g.size,
            vmm_addr: 0x7f00_0000_0000 + ((i as u64) << 32),
            fd_offset: 0,
        })
        .collect();
    let files = regions
        .iter()
        .map(|g| memfd("fuzz-guest", g.size, false))
        .collect();
    // Overlapping or overflowing layouts are the mem_table target's business.
    let table = match MemTable::new(&descs, files) {
        Ok(t) => t,
        Err(e) => {
            if crate::debug() {
                eprintln!("memory table refused: {e}");
            }
            return;
        }
    };
    let gm = table.guest_memory();

    let capacity = match r.u8() % 4 {
        0 => 1 << 20,
        1 => r.u64(),
        2 => r.u32() as u64 * SECTOR,
        _ => u64::MAX,
    };
    let dev = DeviceInfo {
        capacity: AtomicU64::new(capacity),
        writable: AtomicBool::new(r.bool()),
        max_discard_sectors: AtomicU32::new(r.u32()),
        max_write_zeroes_sectors: AtomicU32::new(r.u32()),
        max_segments: 1 + (r.u8() as usize % RING_MAX_SEGMENTS as usize),
        serial: *b"fuzz-serial-01234567",
        stats: vec![],
    };

    for _ in 0..r.u8() % 16 {
        let at = addr(&mut r, &regions);
        let bytes = r.bytes(512);
        let _ = gm.write_slice(bytes, GuestAddress(at));
    }

    let mut cx = Ctx {
        regions: &regions,
        table: &table,
        dev: &dev,
        descs: Vec::new(),
        segs: Vec::new(),
        parts: Vec::new(),
        worker_ram: None,
    };
    let mode = r.u8() % 3;
    if mode == 0 {
        let head = r.u16() % MAX_QUEUE_SIZE;
        for _ in 0..r.u8() % 64 {
            let a = addr(&mut r, &regions);
            let l = len(&mut r);
            let flags = r.u8();
            cx.descs.push(Desc {
                addr: a,
                len: l,
                writable: flags & 1 != 0,
                has_next: flags & 2 != 0,
            });
        }
        cx.handle(head);
    } else if mode == 1 {
        run_queue(&mut r, &mut cx);
    } else {
        resubmit(&mut r, &mut cx);
    }
}

/// Walks a chain named by the VMM's inflight region, as vring/ does when
/// it resubmits in-flight requests after a reconnect (`walk_chain`).
fn resubmit(r: &mut Reader<'_>, cx: &mut Ctx<'_>) {
    let size = 1u16 << (r.u8() % 11);
    let table = addr(r, cx.regions);
    let head = r.u16();
    let walked = walk_chain(cx.table.guest_memory(), table, size, head, &mut cx.descs);
    if crate::debug() {
        eprintln!(
            "walk {head} of {size} at {table:#x}: {walked:?} {:?}",
            cx.descs
        );
    }
    match walked {
        Ok(()) => {
            assert!(head < size);
            let (last, rest) = cx.descs.split_last().expect("empty walked chain");
            assert!(!last.has_next && rest.iter().all(|d| d.has_next));
            cx.handle(head);
        }
        Err(
            WalkError::Index(_) | WalkError::Unreadable | WalkError::Indirect | WalkError::Loop,
        ) => {}
    }
}

/// Pops chains from a virtqueue in fuzzed guest memory, as vring/ does.
fn run_queue(r: &mut Reader<'_>, cx: &mut Ctx<'_>) {
    let gm = cx.table.guest_memory();
    let size = 1u16 << (r.u8() % 11);
    let desc = addr(r, cx.regions);
    let avail = addr(r, cx.regions);
    let used = addr(r, cx.regions);
    let mut queue = Queue::new(MAX_QUEUE_SIZE).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(r.bool());
    queue.set_next_avail(r.u16());
    let rounds = 1 + r.u8() as usize;
    queue.set_ready(true);
    if !queue.is_valid(gm) {
        if crate::debug() {
            eprintln!("virtqueue invalid: {queue:?}");
        }
        return;
    }
    let Ok(used_idx) = queue.used_idx(gm, Ordering::Acquire) else {
        return;
    };
    queue.set_next_used(used_idx.0);
    let _ = queue.disable_notification(gm);
    for _ in 0..rounds {
        let Some(chain) = queue.pop_descriptor_chain(gm) else {
            break;
        };
        let head = chain.head_index();
        cx.descs.clear();
        for d in chain {
            cx.descs.push(Desc {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
                has_next: d.has_next(),
            });
        }
        // vring/: a head outside the queue has no pending slot and is
        // dropped; our ring's tags cover every head of the largest queue.
        if head >= size {
            continue;
        }
        let (status, used_len) = match cx.handle(head) {
            Some(done) => done,
            None => {
                let _ = queue.add_used(gm, head, 0);
                continue;
            }
        };
        if let Ok(s) = gm.get_slice(GuestAddress(status), 1) {
            s.copy_from(&[0u8]);
        }
        let _ = queue.add_used(gm, head, used_len);
    }
    let _ = queue.needs_notification(gm);
    let _ = queue.enable_notification(gm);
}

struct Ctx<'a> {
    regions: &'a [Region],
    table: &'a MemTable,
    dev: &'a DeviceInfo,
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    parts: Vec<(u64, u64)>,
    worker_ram: Option<GuestRam>,
}

impl Ctx<'_> {
    /// Checks and parses `self.descs`; returns the status address and the
    /// used length to complete with (a submitted request completes with
    /// success here), or None for a chain refused outright.
    fn handle(&mut self, head: u16) -> Option<(u64, u32)> {
        let descs = &self.descs;
        let status = match check_chain(descs) {
            Ok(s) => s,
            Err(e) => {
                if crate::debug() {
                    eprintln!("chain {head}: {descs:?} refused: {e}");
                }
                check_refusal(descs, e);
                return None;
            }
        };
        let last = descs[descs.len() - 1];
        assert!(last.writable && !last.has_next && last.len > 0);
        assert_eq!(status, last.addr + (last.len as u64 - 1));
        let first_w = descs.iter().position(|d| d.writable).unwrap();
        assert!(descs[first_w..].iter().all(|d| d.writable), "order");

        let p = parse(
            descs,
            status,
            self.table.guest_memory(),
            self.table,
            self.dev,
            head as u32,
            &mut self.segs,
            &mut self.parts,
        );
        assert_eq!(p.status, status);
        if crate::debug() {
            eprintln!("chain {head}: {descs:?} -> {p:?}, segments {:?}", self.segs);
        }
        match p.action {
            Action::Complete(st) => {
                assert!(
                    [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP]
                        .contains(&(st as u32)),
                    "status {st:?}"
                );
                assert!(p.used_len >= 1);
                // At most the 20-byte id plus the status byte.
                assert!(p.used_len <= 21, "used_len {}", p.used_len);
                Some((status, p.used_len))
            }
            Action::Submit(req) => {
                self.check_submit(&req, p.used_len, head);
                Some((status, p.used_len))
            }
        }
    }

    fn check_submit(&mut self, req: &Request, used_len: u32, head: u16) {
        let dev = self.dev;
        let capacity = dev.capacity.load(Ordering::Relaxed);
        let writable = dev.writable.load(Ordering::Relaxed);
        assert_eq!(req.tag, head as u32);
        let in_range = req
            .offset
            .checked_add(req.len)
            .is_some_and(|e| e <= capacity);
        let descs = &self.descs;
        match req.op {
            Op::Read | Op::Write => {
                assert!(req.len > 0 && req.len % SECTOR == 0 && req.offset % SECTOR == 0);
                assert!(req.len <= MAX_REQUEST_BYTES);
                assert!(in_range, "{req:?} beyond capacity {capacity}");
                assert_eq!(req.flags, 0);
                assert!(!self.segs.is_empty() && self.segs.len() <= dev.max_segments);
                let data: Vec<(u64, u64)> = if req.op == Op::Read {
                    assert_eq!(used_len as u64, req.len + 1);
                    stream(descs.iter().filter(|d| d.writable), 0, req.len)
                } else {
                    assert!(writable, "write to a read-only device");
                    assert_eq!(used_len, 1);
                    stream(descs.iter().filter(|d| !d.writable), HEADER, req.len)
                };
                let mut got = Vec::with_capacity(self.segs.len());
                for s in &self.segs {
                    assert!(s.len > 0, "empty segment");
                    let reg = self.regions[s.region as usize];
                    assert!(
                        s.offset
                            .checked_add(s.len as u64)
                            .is_some_and(|e| e <= reg.size),
                        "segment {s:?} leaves region {reg:?}"
                    );
                    got.push((reg.gpa + s.offset, s.len as u64));
                }
                assert_eq!(
                    coalesce(&got),
                    coalesce(&data),
                    "segments do not cover the chain's data bytes"
                );
            }
            Op::Flush => {
                assert_eq!((req.offset, req.len, req.flags), (0, 0, 0));
                assert!(self.segs.is_empty());
            }
            Op::Discard | Op::WriteZeroes => {
                assert!(writable, "discard/write-zeroes on a read-only device");
                assert!(self.segs.is_empty());
                assert!(req.len > 0 && req.len % SECTOR == 0 && req.offset % SECTOR == 0);
                assert!(in_range, "{req:?} beyond capacity {capacity}");
                let max = if req.op == Op::Discard {
                    assert_eq!(req.flags, 0);
                    dev.max_discard_sectors.load(Ordering::Relaxed)
                } else {
                    assert_eq!(req.flags & !FLAG_NO_UNMAP, 0);
                    dev.max_write_zeroes_sectors.load(Ordering::Relaxed)
                };
                assert!(req.len / SECTOR <= max as u64);
                assert_eq!(used_len, 1);
            }
            op => panic!("the frontend submitted {op:?}"),
        }
        self.round_trip(req);
    }

    /// The request as the worker receives it: through the ring, then its
    /// segments against the worker's own mapping of the memory table.
    fn round_trip(&mut self, req: &Request) {
        RING.with(|ring| {
            let ring = &mut *ring.borrow_mut();
            ring.tx
                .push(req, &self.segs)
                .expect("a parsed request must fit the ring");
            ring.tx.publish();
            match ring.rx.pop().expect("ring broken") {
                Some(Received::Request(got, segs)) => {
                    assert_eq!(&got, req);
                    assert_eq!(segs, &self.segs[..]);
                }
                Some(Received::Bad(b)) => panic!("worker refused a parsed request: {b}"),
                None => panic!("pushed request not received"),
            }
            assert!(ring.rx.pop().unwrap().is_none());
            ring.rx.release();
        });
        if self.segs.is_empty() {
            return;
        }
        let ram = self.worker_ram.get_or_insert_with(|| {
            let (specs, fds) = self.table.for_worker();
            let specs: Vec<RegionSpec> = specs.iter().map(RegionSpec::from).collect();
            let files = fds
                .iter()
                .map(|f| File::from(f.try_clone_to_owned().unwrap()))
                .collect();
            GuestRam::map(&specs, files).expect("worker refused the frontend's memory table")
        });
        for s in &self.segs {
            let b = ram
                .buf(s)
                .unwrap_or_else(|e| panic!("worker refused segment {s:?}: {e}"));
            touch(b.as_ptr());
            touch(b.as_ptr().wrapping_add(b.len() - 1));
        }
    }
}

/// What check_chain refuses must really be wrong.
fn check_refusal(descs: &[Desc], e: ChainError) {
    match e {
        ChainError::Empty => assert!(descs.is_empty()),
        ChainError::Truncated => assert!(descs.last().unwrap().has_next),
        ChainError::Order => {
            let first_w = descs.iter().position(|d| d.writable).unwrap();
            assert!(descs[first_w..].iter().any(|d| !d.writable));
        }
        ChainError::NoStatus => {
            let last = descs.last().unwrap();
            assert!(
                !last.writable
                    || last.len == 0
                    || last.addr.checked_add(last.len as u64 - 1).is_none()
            );
        }
    }
}

/// Bytes `[skip, skip + take)` of the concatenated descriptors, as guest
/// address ranges (a reference implementation of request/chain.rs's `byte_ranges`).
fn stream<'a>(descs: impl Iterator<Item = &'a Desc>, skip: u64, take: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0u64; // stream offset of the descriptor's first byte
    let end = skip + take;
    for d in descs {
        let (a, b) = (pos, pos + d.len as u64);
        pos = b;
        let lo = a.max(skip);
        let hi = b.min(end);
        if lo < hi {
            out.push((d.addr + (lo - a), hi - lo));
        }
    }
    let total: u64 = out.iter().map(|&(_, l)| l).sum();
    assert_eq!(total, take, "chain shorter than the request");
    out
}

/// Merges touching ranges, so that two descriptions of the same bytes in the
/// same order compare equal however they are cut.
fn coalesce(v: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(a, l) in v {
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some((pa, pl)) if pa.checked_add(*pl) == Some(a) => *pl += l,
            _ => out.push((a, l)),
        }
    }
    out
}

// ------------------------------------------------------------------ seeds

/// Seed inputs: valid requests of every type over a one-region memory, a
/// split-region read, and a small virtqueue with two chains.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use virtio_bindings::virtio_blk::*;
    let mut out = Vec::new();
    // One 64 KiB region at 0, 1 MiB device, writable, generous limits.
    let one_region = |w: &mut Writer| {
        w.u8(0).u8(0).u8(255);
        w.u8(0).bool(true).u32(2048).u32(2048).u8(127);
    };
    let header = |kind: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    // addr kind 0: region[0] + u16
    let at = |w: &mut Writer, off: u16| {
        w.u8(0).u8(0).u16(off);
    };
    let desc = |w: &mut Writer, off: u16, len: u16, flags: u8| {
        at(w, off);
        w.u8(1).u16(len).u8(flags);
    };
    let simple = |kind: u32, sector: u64, extra: &[u8], data: &[(u16, u16, u8)]| {
        let mut w = Writer::new();
        one_region(&mut w);
        let mut body = header(kind, sector).to_vec();
        body.extend_from_slice(extra);
        w.u8(1);
        at(&mut w, 0);
        w.bytes(&body);
        w.u8(0).u16(3).u8(data.len() as u8);
        for &(off, len, flags) in data {
            desc(&mut w, off, len, flags);
        }
        w.buf
    };
    out.push((
        "read",
        simple(
            VIRTIO_BLK_T_IN,
            8,
            &[],
            &[(0, 16, 2), (4096, 4096, 3), (0x3000, 512, 3), (100, 1, 1)],
        ),
    ));
    out.push((
        "write",
        simple(VIRTIO_BLK_T_OUT, 1, &[], &[(0, 16 + 1024, 2), (2000, 1, 1)]),
    ));
    out.push((
        "write-split-header",
        simple(
            VIRTIO_BLK_T_OUT,
            2,
            &[],
            &[(0, 8, 2), (8, 8, 2), (8192, 512, 2), (100, 1, 1)],
        ),
    ));
    out.push((
        "flush",
        simple(VIRTIO_BLK_T_FLUSH, 0, &[], &[(0, 16, 2), (100, 1, 1)]),
    ));
    out.push((
        "get-id",
        simple(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[],
            &[(0, 16, 2), (4096, 20, 3), (100, 1, 1)],
        ),
    ));
    let mut range = [0u8; 16];
    range[0..8].copy_from_slice(&8u64.to_le_bytes());
    range[8..12].copy_from_slice(&16u32.to_le_bytes());
    out.push((
        "discard",
        simple(VIRTIO_BLK_T_DISCARD, 0, &range, &[(0, 32, 2), (100, 1, 1)]),
    ));
    range[12..16].copy_from_slice(&VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
    out.push((
        "write-zeroes",
        simple(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &range,
            &[(0, 32, 2), (100, 1, 1)],
        ),
    ));
    out.push((
        "read-past-capacity",
        simple(
            VIRTIO_BLK_T_IN,
            2047,
            &[],
            &[(0, 16, 2), (4096, 1024, 3), (100, 1, 1)],
        ),
    ));

    // Two adjacent regions; a read whose buffer crosses the boundary.
    {
        let mut w = Writer::new();
        w.u8(1).u8(0).u8(15).u8(0).u8(15); // 4 KiB at 0, 4 KiB at 4 KiB
        w.u8(0).bool(true).u32(2048).u32(2048).u8(127);
        w.u8(1);
        at(&mut w, 0);
        w.bytes(&header(VIRTIO_BLK_T_IN, 0));
        w.u8(0).u16(5).u8(3);
        desc(&mut w, 0, 16, 2);
        at(&mut w, 2048);
        w.u8(1).u16(4096).u8(3);
        desc(&mut w, 100, 1, 1);
        out.push(("read-across-regions", w.buf));
    }

    // A virtqueue of 8 entries: descriptor table at 0x1000, avail at 0x2000,
    // used at 0x3000; three chains (a read, a flush, an indirect read).
    {
        let mut mem = vec![0u8; 0x4000];
        let mut d = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
            let o = 0x1000 + i * 16;
            mem[o..o + 8].copy_from_slice(&addr.to_le_bytes());
            mem[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
            mem[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
            mem[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
        };
        // VIRTQ_DESC_F_NEXT = 1, VIRTQ_DESC_F_WRITE = 2
        d(0, 0x100, 16, 1, 1);
        d(1, 0x8000, 4096, 3, 2);
        d(2, 0x200, 1, 2, 0);
        d(3, 0x300, 16, 1, 4);
        d(4, 0x400, 1, 2, 0);
        // VIRTQ_DESC_F_INDIRECT = 4: a table of three at 0x1800.
        d(5, 0x1800, 48, 4, 0);
        for (i, (addr, len, flags, next)) in [
            (0x500u64, 16u32, 1u16, 1u16),
            (0xa000, 512, 3, 2),
            (0x600, 1, 2, 0),
        ]
        .into_iter()
        .enumerate()
        {
            d(0x80 + i, addr, len, flags, next); // 0x1000 + 0x80 * 16 = 0x1800
        }
        mem[0x100..0x110].copy_from_slice(&header(VIRTIO_BLK_T_IN, 16));
        mem[0x300..0x310].copy_from_slice(&header(VIRTIO_BLK_T_FLUSH, 0));
        mem[0x500..0x510].copy_from_slice(&header(VIRTIO_BLK_T_IN, 0));
        // avail: flags 0, idx 3, ring [0, 3, 5]
        mem[0x2002..0x2004].copy_from_slice(&3u16.to_le_bytes());
        mem[0x2004..0x2006].copy_from_slice(&0u16.to_le_bytes());
        mem[0x2006..0x2008].copy_from_slice(&3u16.to_le_bytes());
        mem[0x2008..0x200a].copy_from_slice(&5u16.to_le_bytes());
        let mut w = Writer::new();
        one_region(&mut w);
        let chunks: Vec<_> = mem
            .chunks(512)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|&b| b != 0))
            .collect();
        w.u8(chunks.len() as u8);
        for (i, c) in chunks {
            at(&mut w, (i * 512) as u16);
            w.bytes(c);
        }
        let prefix = w.buf.clone();
        w.u8(1).u8(3); // queue of 8
        at(&mut w, 0x1000);
        at(&mut w, 0x2000);
        at(&mut w, 0x3000);
        w.u16(0).bool(false).u8(7);
        out.push(("virtqueue", w.buf));
        // The same table walked from heads 0 and 5 (indirect), as after a
        // reconnect.
        for (name, head) in [("inflight-walk", 0u16), ("inflight-walk-indirect", 5)] {
            let mut w = Writer {
                buf: prefix.clone(),
            };
            w.u8(2).u8(3);
            at(&mut w, 0x1000);
            w.u16(head);
            out.push((name, w.buf));
        }
    }
    out
}
