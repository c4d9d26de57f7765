//! `ring_entry`: the shared queue rings, frontend and worker ends in one
//! process, with the memfd also mapped a third time as a hostile peer's view.
//!
//! Input format:
//!
//! ```text
//! u8 log2 entries (mod 13), u16 max_segments - 1 (mod 1024)
//! then operations until the input ends, each a u8 code (mod 19):
//!  0 scribble     u32 offset (mod ring size), bytes (<= 256)
//!  1 write entry  u16 slot, u16 tag, u8 op, u8 flags, u16 nseg, u64 offset,
//!                 u64 len, 2 × segment           (a raw request entry)
//!  2 write segs   u16 tag, u16 index, u8 count (mod 8) × segment
//!  3 set word     u8 which (req prod/cons/sleep, cpl prod/cons/sleep),
//!                 bool relative, u32 value (relative: added to the word)
//!  4 worker pop   u8 n-1 (mod 16)
//!  5 worker release
//!  6 worker complete  u16 tag, u8 result kind, u32 result, u64 extra
//!  7 worker publish
//!  8 worker sleep     bool wake afterwards
//!  9 frontend push    u16 tag, u8 op, u8 flags, u8 kind, u64 offset,
//!                     u8 nseg (kind bit 0: nseg up to 255), segments,
//!                     kind bit 1: u64 len instead of the segments' sum
//! 10 frontend publish
//! 11 frontend pop completions  u8 n-1 (mod 16)
//! 12 frontend release
//! 13 frontend sleep   bool wake afterwards
//! 14 re-attach the worker (a live move: the ring indices carry over)
//! 15 re-attach the frontend
//! 16 write completion u16 slot, u16 tag, u32 result, u64 extra
//! 17 write header     u8 field (magic, version, entries, max_segments), u32
//! 18 queries          (has_new, unconsumed)
//! segment: u8 region (mod 3; region 2 does not exist), u8 kind,
//!          offset (kind bit 0: u64, else u16), len (kind bit 1: u32, else u16)
//! ```
//!
//! Checks: no panic. Every request the worker accepts has a tag inside the
//! ring, allowed flags, a segment count within the geometry, lengths that add
//! up and a range that does not wrap; its segments either fail the guest-RAM
//! check or lie inside the worker's mapping (and are read). A refused entry
//! names a tag only if it is inside the ring. Until the first scribble, a
//! model of both rings (indices, segment table, sleeping flags) must agree
//! exactly with what each end sees, including full rings and wake-ups.

use std::fs::File;

use blkmesh_frontend::request::status_of;
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::ring::{
    Completion, CompletionReceiver, CompletionSender, Op, QueueRings, Received, Request,
    RequestReceiver, RequestSender, RingError, RingLayout, Segment, INLINE_SEGMENTS,
};
use blkmesh_ipc::shm::SharedMemory;

use crate::{memfd, touch, Reader, Writer};

// The layout documented in ring.rs and ARCHITECTURE.md.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_ENTRIES: usize = 12;
const OFF_MAX_SEGMENTS: usize = 16;
const OFF_REQ_PROD: usize = 64;
const OFF_REQ_CONS: usize = 128;
const OFF_CPL_PROD: usize = 192;
const OFF_CPL_CONS: usize = 256;
const SLEEP_DELTA: usize = 4;
const OFF_REQ_ENTRIES: usize = 384;

thread_local! {
    /// The worker's guest RAM: two regions, the second at an fd offset that
    /// is not page-aligned (so its mapping starts before the region).
    static RAM: GuestRam = {
        let specs = [
            RegionSpec { guest_addr: 0, size: 0x10000, fd_offset: 0 },
            RegionSpec { guest_addr: 0x10000, size: 0x2000 - 100, fd_offset: 0x1000 + 100 },
        ];
        let files = vec![
            memfd("fuzz-ram0", 0x10000, false),
            memfd("fuzz-ram1", 0x3000, false),
        ];
        GuestRam::map(&specs, files).unwrap()
    };
}

fn segment(r: &mut Reader<'_>) -> Segment {
    let region = (r.u8() % 3) as u32;
    let kind = r.u8();
    let offset = if kind & 1 != 0 {
        r.u64()
    } else {
        r.u16() as u64
    };
    let len = if kind & 2 != 0 {
        r.u32()
    } else {
        r.u16() as u32
    };
    Segment {
        region,
        len,
        offset,
    }
}

/// The fields of a request entry, as pushed (or expected).
#[derive(Clone, Debug)]
struct Entry {
    tag: u32,
    op: u8,
    flags: u8,
    nseg: usize,
    offset: u64,
    len: u64,
    inline: Vec<Segment>,
}

/// What the worker must accept: the ring protocol's rules, restated.
fn acceptable(layout: RingLayout, e: &Entry, segs: &[Segment]) -> bool {
    let Some(op) = Op::from_u8(e.op) else {
        return false;
    };
    let allowed = match op {
        Op::Write | Op::ZoneAppend => 1,
        Op::WriteZeroes => 3,
        _ => 0,
    };
    if e.tag >= layout.entries()
        || e.flags & !allowed != 0
        || e.nseg > layout.max_segments() as usize
    {
        return false;
    }
    let data = matches!(
        op,
        Op::Read | Op::Write | Op::GetId | Op::ZoneReport | Op::ZoneAppend
    );
    if data {
        if segs.is_empty() || segs.iter().any(|s| s.len == 0) {
            return false;
        }
        if segs.iter().map(|s| s.len as u64).sum::<u64>() != e.len {
            return false;
        }
    } else if !segs.is_empty() {
        return false;
    }
    if matches!(op, Op::Discard | Op::WriteZeroes) && e.len == 0 {
        return false;
    }
    e.offset.checked_add(e.len).is_some()
}

/// Both rings as they should be while nobody scribbles.
#[derive(Default)]
struct Model {
    /// Request entries by producer sequence number.
    log: Vec<Entry>,
    /// The segment table, per tag (`max_segments` slots each).
    table: Vec<Vec<Segment>>,
    pushed: u64,
    published: u64,
    popped: u64,
    released: u64,
    worker_sleeping: bool,
    cpl_log: Vec<Completion>,
    cpl_pushed: u64,
    cpl_published: u64,
    cpl_popped: u64,
    cpl_released: u64,
    frontend_sleeping: bool,
}

struct St {
    layout: RingLayout,
    front: QueueRings,
    worker: QueueRings,
    peer: SharedMemory,
    tx: RequestSender,
    crx: CompletionReceiver,
    rx: RequestReceiver,
    ctx: CompletionSender,
    /// A side that saw a corrupt index stops, as the real loops do.
    worker_broken: bool,
    frontend_broken: bool,
    clean: bool,
    m: Model,
}

impl St {
    fn put(&mut self, off: usize, bytes: &[u8]) {
        self.clean = false;
        if let Some(p) = self.peer.ptr_at(off, bytes.len()) {
            // SAFETY: in-bounds (ptr_at) of a live mapping; the ring ends in
            // this thread are not running concurrently.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        }
    }

    fn word(&self, off: usize) -> u32 {
        let p = self.peer.ptr_at(off, 4).unwrap();
        // SAFETY: in-bounds, aligned header word.
        unsafe { p.cast::<u32>().read_volatile() }
    }

    fn req_slot(&self, slot: u32) -> usize {
        OFF_REQ_ENTRIES + (slot & (self.layout.entries() - 1)) as usize * 64
    }

    fn cpl_off(&self) -> usize {
        OFF_REQ_ENTRIES + self.layout.entries() as usize * 64
    }

    fn seg_off(&self) -> usize {
        self.cpl_off() + self.layout.entries() as usize * 16
    }
}

fn raw_entry(e: &Entry) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..4].copy_from_slice(&e.tag.to_le_bytes());
    b[4] = e.op;
    b[5] = e.flags;
    b[6..8].copy_from_slice(&(e.nseg as u16).to_le_bytes());
    b[8..16].copy_from_slice(&e.offset.to_le_bytes());
    b[16..24].copy_from_slice(&e.len.to_le_bytes());
    for (i, s) in e.inline.iter().take(INLINE_SEGMENTS).enumerate() {
        let o = 32 + i * 16;
        b[o..o + 16].copy_from_slice(&seg_bytes(s));
    }
    b
}

fn seg_bytes(s: &Segment) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&s.region.to_le_bytes());
    b[4..8].copy_from_slice(&s.len.to_le_bytes());
    b[8..16].copy_from_slice(&s.offset.to_le_bytes());
    b
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let entries = 1u32 << (r.u8() % 13);
    let max_segments = 1 + (r.u16() % 1024) as u32;
    let layout = RingLayout::new(entries, max_segments).unwrap();
    let front = QueueRings::create("fuzz-ring", layout).unwrap();
    let dup = || File::from(front.fd().try_clone_to_owned().unwrap());
    let worker = QueueRings::attach(dup(), layout).unwrap();
    let peer = SharedMemory::from_peer(dup(), layout.size()).unwrap();
    let (tx, crx) = front.frontend_end();
    let (rx, ctx) = worker.worker_end();
    let mut st = St {
        layout,
        front,
        worker,
        peer,
        tx,
        crx,
        rx,
        ctx,
        worker_broken: false,
        frontend_broken: false,
        clean: true,
        m: Model {
            table: vec![Vec::new(); entries as usize],
            ..Default::default()
        },
    };
    RAM.with(|ram| {
        while !r.is_empty() {
            step(&mut r, &mut st, ram);
        }
    });
}

fn step(r: &mut Reader<'_>, st: &mut St, ram: &GuestRam) {
    let layout = st.layout;
    let entries = layout.entries();
    match r.u8() % 19 {
        0 => {
            let off = r.u32() as usize % layout.size();
            let b = r.bytes(256);
            st.put(off, b);
        }
        1 => {
            let slot = r.u16() as u32;
            let mut e = Entry {
                tag: r.u16() as u32,
                op: r.u8(),
                flags: r.u8(),
                nseg: r.u16() as usize,
                offset: r.u64(),
                len: r.u64(),
                inline: vec![],
            };
            e.inline = vec![segment(r), segment(r)];
            let off = st.req_slot(slot);
            st.put(off, &raw_entry(&e));
        }
        2 => {
            let tag = r.u16() as usize;
            let idx = r.u16() as usize;
            let n = r.u8() % 8;
            for i in 0..n as usize {
                let s = segment(r);
                let off = st.seg_off() + ((tag * max_segs(st)) + idx + i) * 16;
                st.put(off, &seg_bytes(&s));
            }
        }
        3 => {
            let which = [
                OFF_REQ_PROD,
                OFF_REQ_CONS,
                OFF_REQ_CONS + SLEEP_DELTA,
                OFF_CPL_PROD,
                OFF_CPL_CONS,
                OFF_CPL_CONS + SLEEP_DELTA,
            ][r.u8() as usize % 6];
            let rel = r.bool();
            let v = r.u32();
            let v = if rel {
                st.word(which).wrapping_add(v)
            } else {
                v
            };
            st.put(which, &v.to_le_bytes());
        }
        4 => {
            for _ in 0..1 + r.u8() % 16 {
                if !worker_pop(st, ram) {
                    break;
                }
            }
        }
        5 => {
            if !st.worker_broken {
                st.rx.release();
                st.m.released = st.m.popped;
            }
        }
        6 => {
            let tag = r.u16() as u32;
            let result = match r.u8() % 4 {
                0 => 0,
                1 => -libc::EIO,
                2 => -(r.u32() as i32 & 0xfff),
                _ => r.u32() as i32,
            };
            let c = Completion {
                tag,
                result,
                extra: r.u64(),
            };
            if st.worker_broken {
                return;
            }
            let res = st.ctx.push(c);
            if st.clean {
                let full = st.m.cpl_pushed - st.m.cpl_released == entries as u64;
                match res {
                    Ok(()) => {
                        assert!(!full, "completion pushed into a full ring");
                        st.m.cpl_log.truncate(st.m.cpl_pushed as usize);
                        st.m.cpl_log.push(c);
                        st.m.cpl_pushed += 1;
                    }
                    Err(RingError::Full) => assert!(full, "completion ring full too early"),
                    Err(e) => panic!("completion push: {e}"),
                }
            } else if matches!(res, Err(RingError::PeerIndex { .. })) {
                st.worker_broken = true;
            }
        }
        7 => {
            if st.worker_broken {
                return;
            }
            let kick = st.ctx.publish();
            if st.clean {
                st.m.cpl_published = st.m.cpl_pushed;
                assert_eq!(kick, st.m.frontend_sleeping, "completion kick");
            }
        }
        8 => {
            let wake = r.bool();
            if st.worker_broken {
                return;
            }
            let sleeps = st.rx.prepare_sleep();
            if st.clean {
                st.m.released = st.m.popped;
                assert_eq!(sleeps, st.m.published == st.m.popped, "worker sleep");
                st.m.worker_sleeping = sleeps;
            }
            if wake {
                st.rx.woke();
                st.m.worker_sleeping = false;
            }
        }
        9 => frontend_push(r, st),
        10 => {
            if st.frontend_broken {
                return;
            }
            let kick = st.tx.publish();
            if st.clean {
                st.m.published = st.m.pushed;
                assert_eq!(kick, st.m.worker_sleeping, "request kick");
            }
        }
        11 => {
            for _ in 0..1 + r.u8() % 16 {
                if !frontend_pop(st) {
                    break;
                }
            }
        }
        12 => {
            if !st.frontend_broken {
                st.crx.release();
                st.m.cpl_released = st.m.cpl_popped;
            }
        }
        13 => {
            let wake = r.bool();
            if st.frontend_broken {
                return;
            }
            let sleeps = st.crx.prepare_sleep();
            if st.clean {
                st.m.cpl_released = st.m.cpl_popped;
                assert_eq!(
                    sleeps,
                    st.m.cpl_published == st.m.cpl_popped,
                    "frontend sleep"
                );
                st.m.frontend_sleeping = sleeps;
            }
            if wake {
                st.crx.woke();
                st.m.frontend_sleeping = false;
            }
        }
        14 => {
            let fd = File::from(st.front.fd().try_clone_to_owned().unwrap());
            match QueueRings::attach(fd, layout) {
                Ok(w) => {
                    let (rx, ctx) = w.worker_end();
                    st.worker = w;
                    st.rx = rx;
                    st.ctx = ctx;
                    st.worker_broken = false;
                    // Resumes at the released request and the published
                    // completion.
                    st.m.popped = st.m.released;
                    st.m.cpl_pushed = st.m.cpl_published;
                }
                Err(e) => assert!(!st.clean, "re-attach of a clean ring: {e}"),
            }
        }
        15 => {
            let (tx, crx) = st.front.frontend_end();
            st.tx = tx;
            st.crx = crx;
            st.frontend_broken = false;
            st.m.pushed = st.m.published;
            st.m.cpl_popped = st.m.cpl_released;
        }
        16 => {
            let slot = r.u16() as usize & (entries as usize - 1);
            let mut b = [0u8; 16];
            b[0..4].copy_from_slice(&(r.u16() as u32).to_le_bytes());
            b[4..8].copy_from_slice(&r.u32().to_le_bytes());
            b[8..16].copy_from_slice(&r.u64().to_le_bytes());
            let off = st.cpl_off() + slot * 16;
            st.put(off, &b);
        }
        17 => {
            let (off, len) = [
                (OFF_MAGIC, 8),
                (OFF_VERSION, 4),
                (OFF_ENTRIES, 4),
                (OFF_MAX_SEGMENTS, 4),
            ][r.u8() as usize % 4];
            let v = r.u32() as u64;
            st.put(off, &v.to_le_bytes()[..len]);
        }
        _ => {
            let has = st.rx.has_new();
            let chas = st.crx.has_new();
            let unconsumed = st.tx.unconsumed();
            if st.clean && !st.worker_broken && !st.frontend_broken {
                assert_eq!(has, st.m.published != st.m.popped);
                assert_eq!(chas, st.m.cpl_published != st.m.cpl_popped);
                assert_eq!(unconsumed as u64, st.m.published - st.m.released);
            }
        }
    }
}

fn max_segs(st: &St) -> usize {
    st.layout.max_segments() as usize
}

fn frontend_push(r: &mut Reader<'_>, st: &mut St) {
    let entries = st.layout.entries();
    let tag = r.u16() as u32 % (2 * entries);
    let op = Op::from_u8(r.u8() % 17).unwrap_or(Op::Read);
    let flags = r.u8() & 3;
    let kind = r.u8();
    let offset = r.u64();
    let nseg = if kind & 1 != 0 {
        r.u8() as usize
    } else {
        (r.u8() % 4) as usize
    };
    let segs: Vec<Segment> = (0..nseg).map(|_| segment(r)).collect();
    let len = if kind & 2 != 0 {
        r.u64()
    } else {
        segs.iter().map(|s| s.len as u64).sum()
    };
    if st.frontend_broken {
        return;
    }
    let req = Request {
        tag,
        op,
        flags,
        offset,
        len,
    };
    let res = st.tx.push(&req, &segs);
    if !st.clean {
        if matches!(res, Err(RingError::PeerIndex { .. })) {
            st.frontend_broken = true;
        }
        return;
    }
    let spill = segs.len() > INLINE_SEGMENTS;
    let seg_err = spill && (segs.len() > max_segs(st) || tag >= entries);
    if spill && !seg_err {
        // The table is written before the ring is found full.
        let max = max_segs(st);
        st.m.table[tag as usize].resize(max, Segment::default());
        st.m.table[tag as usize][..segs.len()].copy_from_slice(&segs);
    }
    let full = st.m.pushed - st.m.released == entries as u64;
    match res {
        Ok(()) => {
            assert!(!seg_err && !full, "push should have failed");
            let e = Entry {
                tag,
                op: op as u8,
                flags,
                nseg: segs.len(),
                offset,
                len,
                inline: if spill { vec![] } else { segs },
            };
            st.m.log.truncate(st.m.pushed as usize);
            st.m.log.push(e);
            st.m.pushed += 1;
        }
        Err(RingError::TooManySegments(_)) => assert!(seg_err),
        Err(RingError::Full) => assert!(!seg_err && full, "ring full too early"),
        Err(e) => panic!("push: {e}"),
    }
}

/// One pop by the worker; false when there was nothing (or the ring broke).
fn worker_pop(st: &mut St, ram: &GuestRam) -> bool {
    if st.worker_broken {
        return false;
    }
    let layout = st.layout;
    let expected = if st.clean && st.m.popped < st.m.published {
        let e = st.m.log[st.m.popped as usize].clone();
        let segs = if e.nseg <= INLINE_SEGMENTS {
            e.inline.clone()
        } else {
            st.m.table[e.tag as usize][..e.nseg].to_vec()
        };
        Some((e, segs))
    } else {
        None
    };
    let got = match st.rx.pop() {
        Err(e) => {
            assert!(!st.clean, "clean ring reported broken: {e}");
            st.worker_broken = true;
            return false;
        }
        Ok(None) => {
            assert!(expected.is_none(), "published request not received");
            return false;
        }
        Ok(Some(got)) => got,
    };
    if crate::debug() {
        eprintln!("worker popped {got:?} (clean: {})", st.clean);
    }
    if st.clean {
        assert!(expected.is_some(), "received a request nobody published");
        st.m.popped += 1;
    }
    match got {
        Received::Request(req, segs) => {
            check_accepted(layout, &req, segs, ram);
            if let Some((e, esegs)) = expected {
                assert!(acceptable(layout, &e, &esegs), "accepted {e:?}");
                assert_eq!(
                    (req.tag, req.op as u8, req.flags, req.offset, req.len),
                    (e.tag, e.op, e.flags, e.offset, e.len)
                );
                assert_eq!(segs, &esegs[..]);
            }
        }
        Received::Bad(bad) => {
            if let Some(t) = bad.tag {
                assert!(
                    t < layout.entries(),
                    "refusal names tag {t} outside the ring"
                );
            }
            if let Some((e, esegs)) = expected {
                assert!(!acceptable(layout, &e, &esegs), "refused {e:?}: {bad}");
                assert_eq!(bad.tag, (e.tag < layout.entries()).then_some(e.tag));
            }
        }
    }
    true
}

/// What the worker may rely on for an accepted request, and its segments
/// against the worker's guest RAM as queue.rs uses them.
pub(crate) fn check_accepted(layout: RingLayout, req: &Request, segs: &[Segment], ram: &GuestRam) {
    assert!(
        req.tag < layout.entries(),
        "tag {} outside the ring",
        req.tag
    );
    assert!(segs.len() <= layout.max_segments() as usize);
    assert_eq!(req.flags & !req.op.allowed_flags(), 0);
    assert!(req.offset.checked_add(req.len).is_some());
    if req.op.has_data() {
        assert!(!segs.is_empty());
        assert!(segs.iter().all(|s| s.len > 0));
        assert_eq!(segs.iter().map(|s| s.len as u64).sum::<u64>(), req.len);
    } else {
        assert!(segs.is_empty());
    }
    if matches!(req.op, Op::Discard | Op::WriteZeroes) {
        assert!(req.len > 0);
    }
    for s in segs {
        let Ok(b) = ram.buf(s) else { continue };
        let region = &ram.regions()[s.region as usize];
        let (map, map_len, _, _) = region.registration();
        let p = b.as_ptr() as usize;
        assert!(
            p >= map && p + b.len() <= map + map_len,
            "segment {s:?} escapes its region's mapping"
        );
        assert!(s.offset + s.len as u64 <= region.spec().size);
        touch(b.as_ptr());
        touch(b.as_ptr().wrapping_add(b.len() - 1));
    }
}

/// One completion taken by the frontend, handled as vring/ does.
fn frontend_pop(st: &mut St) -> bool {
    if st.frontend_broken {
        return false;
    }
    let expected = (st.clean && st.m.cpl_popped < st.m.cpl_published)
        .then(|| st.m.cpl_log[st.m.cpl_popped as usize]);
    match st.crx.pop() {
        Err(e) => {
            assert!(!st.clean, "clean completion ring reported broken: {e}");
            st.frontend_broken = true;
            false
        }
        Ok(None) => {
            assert!(expected.is_none(), "published completion not received");
            false
        }
        Ok(Some(c)) => {
            if crate::debug() {
                eprintln!("frontend popped {c:?}");
            }
            if st.clean {
                assert_eq!(Some(c), expected, "completion");
                st.m.cpl_popped += 1;
            }
            // vring/: the tag is looked up in the in-flight table (a
            // bounds-checked get), then the result becomes a virtio status.
            if c.result != i32::MIN || crate::strict() {
                let status = status_of(c.result);
                assert!(status.byte() <= 2);
            }
            true
        }
    }
}

// ------------------------------------------------------------------ seeds

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // A clean exchange: read (inline), write with 5 segments (spilled),
    // flush; the worker takes them, completes, the frontend reaps.
    {
        let mut w = Writer::new();
        w.u8(3).u16(7); // 8 entries, 8 segments
        let seg = |w: &mut Writer, region: u8, off: u16, len: u16| {
            w.u8(region).u8(0).u16(off).u16(len);
        };
        w.u8(9)
            .u16(1)
            .u8(Op::Read as u8)
            .u8(0)
            .u8(0)
            .u64(4096)
            .u8(1);
        seg(&mut w, 0, 0x100, 512);
        w.u8(9)
            .u16(2)
            .u8(Op::Write as u8)
            .u8(1)
            .u8(1)
            .u64(8192)
            .u8(5);
        for i in 0..5u16 {
            seg(&mut w, (i % 2) as u8, i * 512, 512);
        }
        w.u8(9).u16(3).u8(Op::Flush as u8).u8(0).u8(0).u64(0).u8(0);
        w.u8(10); // publish
        w.u8(4).u8(15); // worker pops
        w.u8(5);
        for tag in 1..4u16 {
            w.u8(6).u16(tag).u8(0).u64(0);
        }
        w.u8(7).u8(11).u8(15).u8(12).u8(18);
        out.push(("exchange", w.buf));
    }
    // Fill a 4-entry ring, sleep and wake on both sides.
    {
        let mut w = Writer::new();
        w.u8(2).u16(1);
        w.u8(8).u8(0); // worker sleeps
        for tag in 0..5u16 {
            w.u8(9)
                .u16(tag)
                .u8(Op::Discard as u8)
                .u8(0)
                .u8(2)
                .u64(tag as u64 * 512)
                .u8(0)
                .u64(512);
        }
        w.u8(10).u8(4).u8(0).u8(8).u8(1).u8(13).u8(1);
        w.u8(6).u16(0).u8(1).u64(0).u8(7).u8(11).u8(0);
        w.u8(14).u8(15).u8(4).u8(3);
        out.push(("full-ring", w.buf));
    }
    // Hostile: raw entries with bad tags, ops and counts, then a producer
    // index far ahead.
    {
        let mut w = Writer::new();
        w.u8(2).u16(3);
        let raw = |w: &mut Writer, slot: u16, tag: u16, op: u8, nseg: u16, len: u64| {
            w.u8(1)
                .u16(slot)
                .u16(tag)
                .u8(op)
                .u8(0)
                .u16(nseg)
                .u64(0)
                .u64(len);
            w.u8(0).u8(0).u16(0).u16(512);
            w.u8(1).u8(0).u16(0).u16(512);
        };
        raw(&mut w, 0, 1, 1, 2, 1024);
        raw(&mut w, 1, 9, 1, 1, 512);
        raw(&mut w, 2, 2, 99, 0, 0);
        raw(&mut w, 3, 3, 2, 4, 2048);
        w.u8(2).u16(3).u16(2).u8(2);
        w.u8(0).u8(2).u16(0).u32(0xffff_ffff);
        w.u8(1).u8(1).u64(u64::MAX - 100).u16(512);
        w.u8(3).u8(0).bool(false).u32(4);
        w.u8(4).u8(7);
        w.u8(3).u8(0).bool(true).u32(100);
        w.u8(4).u8(0);
        out.push(("hostile-entries", w.buf));
    }
    out
}

/// Known bug (reported): the frontend's `status_of` negates the worker's
/// result, which overflows for `i32::MIN`.
pub fn known() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = Writer::new();
    w.u8(0).u16(0); // one entry
    w.u8(6).u16(0).u8(3).u32(i32::MIN as u32).u64(0); // worker completes tag 0
    w.u8(7).u8(11).u8(0); // publishes; the frontend pops
    vec![("status-of-i32-min", w.buf)]
}
