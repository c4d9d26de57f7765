//! The per-virtqueue ring pair shared by the frontend and one worker.
//!
//! One sealed memfd per virtqueue holds two single-producer/single-consumer
//! rings and a segment table:
//!
//! ```text
//! 0    header: magic, version, entries, max_segments, liveness words
//! 64   request ring producer index          (frontend writes)
//! 128  request ring consumer index, sleeping flag   (worker writes)
//! 192  completion ring producer index       (worker writes)
//! 256  completion ring consumer index, sleeping flag (frontend writes)
//! 320  worker heartbeat, u64                (worker writes)
//! 384  request entries      entries × 64 B
//!      completion entries   entries × 16 B
//!      segment table        entries × max_segments × 16 B (indexed by tag)
//! ```
//!
//! Indices are free-running `u32`s masked on use. A side loads the peer's index
//! with Acquire and publishes its own with Release. Wake-ups go through an
//! eventfd per direction, signalled only when the consumer has said it is about
//! to sleep (a SeqCst fence on both sides orders "publish, then check the flag"
//! against "set the flag, then re-check the index"), so a busy queue makes no
//! syscall per request.
//!
//! The heartbeat is a counter the worker's queue loop bumps on every
//! iteration, and at least every [`HEARTBEAT_INTERVAL`] while it holds
//! requests (a throttle or a fault-injection delay may hold one for seconds).
//! The frontend judges a hang by it, not by the age of a request: requests
//! in flight and a heartbeat that has not moved for the worker timeout mean
//! the worker's loop is stopped (SIGSTOP, deadlock), while a slow request
//! on a live loop does not. It has a line of its own so that the worker's
//! bumps do not evict the lines the frontend polls.
//!
//! Nothing read from the ring is trusted: every entry is copied out of shared
//! memory once and then validated (tag, op, flags, segment count and lengths);
//! guest-memory bounds are checked against the reader's own mapping by
//! [`crate::guest_ram`].

use std::fs::File;
use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::shm::{SharedMemory, ShmError};

const MAGIC: u64 = u64::from_le_bytes(*b"BLKMRING");
/// 2: the heartbeat line at 320 (entries moved from 320 to 384).
const VERSION: u32 = 2;
const LINE: usize = 64;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_ENTRIES: usize = 12;
const OFF_MAX_SEGMENTS: usize = 16;
const OFF_FRONTEND_STATE: usize = 24;
const OFF_WORKER_STATE: usize = 28;
const OFF_REQ_PROD: usize = LINE;
const OFF_REQ_CONS: usize = 2 * LINE;
const OFF_CPL_PROD: usize = 3 * LINE;
const OFF_CPL_CONS: usize = 4 * LINE;
/// The sleeping flag sits after the consumer index, on the consumer's line.
const SLEEP_DELTA: usize = 4;
/// The worker's heartbeat (u64), alone on its line.
const OFF_HEARTBEAT: usize = 5 * LINE;
const OFF_ENTRIES_START: usize = 6 * LINE;
// The heartbeat has its line to itself: nothing else before the entries.
const _: () = assert!(OFF_HEARTBEAT % LINE == 0 && OFF_HEARTBEAT + LINE == OFF_ENTRIES_START);

/// Longest a worker's queue loop sleeps while it has requests in flight, so
/// that its heartbeat keeps moving while a request is held.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// Slack on the "absurd jump" bound of the heartbeat: a loop iteration
/// takes far more than a nanosecond, so the heartbeat cannot move by more
/// than the nanoseconds elapsed between two samples, plus this.
const HEARTBEAT_SLACK: u64 = 1_000_000;

/// Largest ring (and so largest virtqueue) supported.
pub const MAX_ENTRIES: u32 = 4096;
/// Largest scatter-gather list of one request.
pub const MAX_SEGMENTS: u32 = 1024;
/// Segments carried inside the request entry itself.
pub const INLINE_SEGMENTS: usize = 2;

const STATE_ALIVE: u32 = 1;
const STATE_CLOSED: u32 = 2;

/// Errors of ring setup and of a peer that broke the ring protocol.
#[derive(Debug, Error)]
pub enum RingError {
    #[error("ring entries must be a power of two in 1..={MAX_ENTRIES} (got {0})")]
    BadEntries(u32),
    #[error("max_segments must be in 1..={MAX_SEGMENTS} (got {0})")]
    BadMaxSegments(u32),
    #[error("shared memory")]
    Shm(#[from] ShmError),
    #[error("ring header does not match: {0}")]
    BadHeader(&'static str),
    #[error("peer index out of range (peer {peer}, ours {ours})")]
    PeerIndex { peer: u32, ours: u32 },
    /// The worker's heartbeat went backwards, or moved by more than one
    /// beat per nanosecond since the last sample: the worker (or its
    /// mapping of the ring) is corrupt.
    #[error("worker heartbeat impossible (was {was}, now {now}, {elapsed_ns} ns later)")]
    Heartbeat { was: u64, now: u64, elapsed_ns: u64 },
    #[error("ring is full")]
    Full,
    #[error("{0} segments do not fit the segment table")]
    TooManySegments(usize),
}

/// Operations carried by the request ring: the whole virtio-blk op set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Discard = 4,
    WriteZeroes = 5,
    /// Device id string into the data segments.
    GetId = 6,
    /// Report zones from the one containing `offset` into the data
    /// segments, in virtio-blk's format (struct virtio_blk_zone_report:
    /// nr_zones and 56 reserved bytes, then 64-byte descriptors, all in
    /// 512-byte sectors); the completion's `extra` is the bytes written.
    ZoneReport = 10,
    ZoneOpen = 11,
    ZoneClose = 12,
    ZoneFinish = 13,
    ZoneReset = 14,
    ZoneResetAll = 15,
    /// Append to the zone at `offset`; the completion's `extra` is the byte
    /// offset where the data landed.
    ZoneAppend = 16,
}

impl Op {
    /// Decodes an op byte from the ring.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::GetId,
            10 => Op::ZoneReport,
            11 => Op::ZoneOpen,
            12 => Op::ZoneClose,
            13 => Op::ZoneFinish,
            14 => Op::ZoneReset,
            15 => Op::ZoneResetAll,
            16 => Op::ZoneAppend,
            _ => return None,
        })
    }

    /// Whether the op moves data through segments (and so needs at least one).
    pub fn has_data(self) -> bool {
        matches!(
            self,
            Op::Read | Op::Write | Op::GetId | Op::ZoneReport | Op::ZoneAppend
        )
    }

    /// Flags this op may carry.
    pub fn allowed_flags(self) -> u8 {
        match self {
            Op::Write | Op::ZoneAppend => FLAG_FUA,
            Op::WriteZeroes => FLAG_FUA | FLAG_NO_UNMAP,
            Op::Read
            | Op::Flush
            | Op::Discard
            | Op::GetId
            | Op::ZoneReport
            | Op::ZoneOpen
            | Op::ZoneClose
            | Op::ZoneFinish
            | Op::ZoneReset
            | Op::ZoneResetAll => 0,
        }
    }
}

/// Completion results for zone errors: negated errnos chosen for the ring
/// protocol, which the frontend turns into virtio-blk's zone statuses.
/// Any other negative result is a plain I/O error.
pub mod zone_status {
    /// VIRTIO_BLK_S_ZONE_INVALID_CMD: the zone's condition or type forbids
    /// the operation (writing a full zone, opening an offline one...).
    pub const INVALID_CMD: i32 = -libc::EBADRQC;
    /// VIRTIO_BLK_S_ZONE_UNALIGNED_WP: a write not at the write pointer.
    pub const UNALIGNED_WP: i32 = -libc::EILSEQ;
    /// VIRTIO_BLK_S_ZONE_OPEN_RESOURCE: too many open zones.
    pub const OPEN_RESOURCE: i32 = -libc::ETOOMANYREFS;
    /// VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE: too many active zones.
    pub const ACTIVE_RESOURCE: i32 = -libc::EOVERFLOW;
}

/// Force unit access: complete only once the data is on stable storage.
pub const FLAG_FUA: u8 = 1 << 0;
/// Write-zeroes must not deallocate.
pub const FLAG_NO_UNMAP: u8 = 1 << 1;

/// A piece of a scatter-gather list: `len` bytes at `offset` inside guest
/// memory region `region` (an index into the memory table both sides share).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Segment {
    pub region: u32,
    pub len: u32,
    pub offset: u64,
}

/// The request entry exactly as it lies in shared memory.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RawRequest {
    pub tag: u32,
    pub op: u8,
    pub flags: u8,
    pub nseg: u16,
    pub offset: u64,
    pub len: u64,
    pub reserved: u64,
    pub inline: [Segment; INLINE_SEGMENTS],
}

/// The completion entry exactly as it lies in shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Completion {
    /// The request's tag.
    pub tag: u32,
    /// 0 on success, or a negative errno.
    pub result: i32,
    /// Op-specific value: the byte offset where a zone append landed, the
    /// bytes a zone report wrote.
    pub extra: u64,
}

const _: () = assert!(std::mem::size_of::<RawRequest>() == 64);
const _: () = assert!(std::mem::size_of::<Completion>() == 16);
const _: () = assert!(std::mem::size_of::<Segment>() == 16);

/// A validated request (its segments are returned separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub tag: u32,
    pub op: Op,
    pub flags: u8,
    /// Byte offset on the device.
    pub offset: u64,
    /// Byte length: the sum of the segments for data ops, the range length
    /// for discard / write-zeroes, 0 otherwise.
    pub len: u64,
}

/// Why a request entry was refused. `tag` is set when the tag itself was
/// valid, so the request can be failed back to the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("bad request entry (tag {tag:?}): {reason}")]
pub struct BadRequest {
    pub tag: Option<u32>,
    pub reason: &'static str,
}

/// Ring geometry, from which every offset follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    entries: u32,
    max_segments: u32,
}

impl RingLayout {
    pub fn new(entries: u32, max_segments: u32) -> Result<Self, RingError> {
        if entries == 0 || entries > MAX_ENTRIES || !entries.is_power_of_two() {
            return Err(RingError::BadEntries(entries));
        }
        if max_segments == 0 || max_segments > MAX_SEGMENTS {
            return Err(RingError::BadMaxSegments(max_segments));
        }
        Ok(RingLayout {
            entries,
            max_segments,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn max_segments(&self) -> u32 {
        self.max_segments
    }

    fn req_entries_off(&self) -> usize {
        OFF_ENTRIES_START
    }

    fn cpl_entries_off(&self) -> usize {
        self.req_entries_off() + self.entries as usize * std::mem::size_of::<RawRequest>()
    }

    fn segments_off(&self) -> usize {
        self.cpl_entries_off() + self.entries as usize * std::mem::size_of::<Completion>()
    }

    /// Total bytes of the memfd.
    pub fn size(&self) -> usize {
        let segs =
            self.entries as usize * self.max_segments as usize * std::mem::size_of::<Segment>();
        (self.segments_off() + segs).next_multiple_of(4096)
    }

    /// Checks a request copied out of the ring. Segment lengths are summed
    /// and compared with `len`; guest-memory bounds are not checked here.
    pub fn validate(&self, raw: &RawRequest, segs: &[Segment]) -> Result<Request, BadRequest> {
        if raw.tag >= self.entries {
            return Err(BadRequest {
                tag: None,
                reason: "tag out of range",
            });
        }
        let bad = |reason| BadRequest {
            tag: Some(raw.tag),
            reason,
        };
        let op = Op::from_u8(raw.op).ok_or(bad("unknown op"))?;
        if raw.flags & !op.allowed_flags() != 0 {
            return Err(bad("flag not allowed for this op"));
        }
        if raw.nseg as u32 > self.max_segments || raw.nseg as usize != segs.len() {
            return Err(bad("segment count out of range"));
        }
        if op.has_data() {
            if segs.is_empty() {
                return Err(bad("data op without segments"));
            }
            let mut total: u64 = 0;
            for s in segs {
                if s.len == 0 {
                    return Err(bad("empty segment"));
                }
                total += s.len as u64;
            }
            if total != raw.len {
                return Err(bad("length does not match segments"));
            }
        } else if !segs.is_empty() {
            return Err(bad("segments on an op without data"));
        }
        if matches!(op, Op::Discard | Op::WriteZeroes) && raw.len == 0 {
            return Err(bad("empty range"));
        }
        if raw.offset.checked_add(raw.len).is_none() {
            return Err(bad("offset + length overflows"));
        }
        Ok(Request {
            tag: raw.tag,
            op,
            flags: raw.flags,
            offset: raw.offset,
            len: raw.len,
        })
    }
}

/// The memfd of one queue's rings, mapped.
#[derive(Debug, Clone)]
pub struct QueueRings {
    shm: Arc<SharedMemory>,
    layout: RingLayout,
}

impl QueueRings {
    /// Creates and initializes a queue's rings (the frontend's side).
    pub fn create(name: &str, layout: RingLayout) -> Result<Self, RingError> {
        let shm = SharedMemory::create(name, layout.size())?;
        let rings = QueueRings {
            shm: Arc::new(shm),
            layout,
        };
        // SAFETY: the header offsets are inside the mapping (size() > OFF_ENTRIES_START) and
        // aligned; nobody else has the memfd yet.
        unsafe {
            let p = rings
                .shm
                .ptr_at(0, OFF_ENTRIES_START)
                .ok_or(RingError::Full)?;
            p.add(OFF_MAGIC).cast::<u64>().write_volatile(MAGIC);
            p.add(OFF_VERSION).cast::<u32>().write_volatile(VERSION);
            p.add(OFF_ENTRIES)
                .cast::<u32>()
                .write_volatile(layout.entries);
            p.add(OFF_MAX_SEGMENTS)
                .cast::<u32>()
                .write_volatile(layout.max_segments);
        }
        rings
            .state_word(OFF_FRONTEND_STATE)
            .store(STATE_ALIVE, Ordering::Release);
        Ok(rings)
    }

    /// Maps a queue's rings received from the frontend (the worker's side),
    /// checking the header against the geometry announced in the control
    /// message.
    pub fn attach(file: File, layout: RingLayout) -> Result<Self, RingError> {
        let shm = SharedMemory::from_peer(file, layout.size())?;
        let rings = QueueRings {
            shm: Arc::new(shm),
            layout,
        };
        // SAFETY: header offsets are in bounds (checked by ptr_at) and aligned.
        let (magic, version, entries, max_segments) = unsafe {
            let p = rings
                .shm
                .ptr_at(0, OFF_ENTRIES_START)
                .ok_or(RingError::Full)?;
            (
                p.add(OFF_MAGIC).cast::<u64>().read_volatile(),
                p.add(OFF_VERSION).cast::<u32>().read_volatile(),
                p.add(OFF_ENTRIES).cast::<u32>().read_volatile(),
                p.add(OFF_MAX_SEGMENTS).cast::<u32>().read_volatile(),
            )
        };
        if magic != MAGIC {
            return Err(RingError::BadHeader("magic"));
        }
        if version != VERSION {
            return Err(RingError::BadHeader("version"));
        }
        if entries != layout.entries || max_segments != layout.max_segments {
            return Err(RingError::BadHeader("geometry"));
        }
        rings
            .state_word(OFF_WORKER_STATE)
            .store(STATE_ALIVE, Ordering::Release);
        Ok(rings)
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The memfd, to pass to the worker.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shm.fd()
    }

    fn word(&self, off: usize) -> *const AtomicU32 {
        // Offsets passed here are constants inside the header lines.
        self.shm
            .ptr_at(off, 4)
            .map(|p| p.cast::<AtomicU32>().cast_const())
            .unwrap_or(std::ptr::null())
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            _shm: Arc::clone(&self.shm),
            word: self
                .shm
                .ptr_at(OFF_HEARTBEAT, 8)
                .map(|p| p.cast::<AtomicU64>().cast_const())
                .unwrap_or(std::ptr::null()),
        }
    }

    fn state_word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `word` returns an aligned, in-bounds pointer for header
        // offsets, valid as long as `self.shm`; AtomicU32 tolerates concurrent
        // writes by the peer.
        unsafe { &*self.word(off) }
    }

    /// Marks the frontend's end closed (a clean detach).
    pub fn close_frontend(&self) {
        self.state_word(OFF_FRONTEND_STATE)
            .store(STATE_CLOSED, Ordering::Release);
    }

    /// Marks the worker's end closed (a clean detach).
    pub fn close_worker(&self) {
        self.state_word(OFF_WORKER_STATE)
            .store(STATE_CLOSED, Ordering::Release);
    }

    /// Whether the frontend has closed its end.
    pub fn frontend_closed(&self) -> bool {
        self.state_word(OFF_FRONTEND_STATE).load(Ordering::Acquire) == STATE_CLOSED
    }

    fn spsc<T: Copy>(&self, prod: usize, cons: usize, slots: usize) -> Spsc<T> {
        let slots = self
            .shm
            .ptr_at(
                slots,
                self.layout.entries as usize * std::mem::size_of::<T>(),
            )
            .map(|p| p.cast::<T>())
            .unwrap_or(std::ptr::null_mut());
        Spsc {
            _shm: Arc::clone(&self.shm),
            slots,
            entries: self.layout.entries,
            prod: self.word(prod),
            cons: self.word(cons),
            sleeping: self.word(cons + SLEEP_DELTA),
            local: 0,
            cached_peer: 0,
            broken: None,
            _t: PhantomData,
        }
    }

    fn segment_table(&self) -> SegmentTable {
        let per_tag = self.layout.max_segments as usize;
        let n = self.layout.entries as usize * per_tag;
        SegmentTable {
            _shm: Arc::clone(&self.shm),
            base: self
                .shm
                .ptr_at(
                    self.layout.segments_off(),
                    n * std::mem::size_of::<Segment>(),
                )
                .map(|p| p.cast::<Segment>())
                .unwrap_or(std::ptr::null_mut()),
            entries: self.layout.entries,
            per_tag: self.layout.max_segments,
        }
    }

    /// The frontend's two ends. Take them once per attach.
    pub fn frontend_end(&self) -> (RequestSender, CompletionReceiver) {
        let mut req =
            self.spsc::<RawRequest>(OFF_REQ_PROD, OFF_REQ_CONS, self.layout.req_entries_off());
        // Resume where the indices are (a re-attach of a used ring).
        req.local = req.prod_word().load(Ordering::Acquire);
        req.cached_peer = req.cons_word().load(Ordering::Acquire);
        let mut cpl =
            self.spsc::<Completion>(OFF_CPL_PROD, OFF_CPL_CONS, self.layout.cpl_entries_off());
        cpl.local = cpl.cons_word().load(Ordering::Acquire);
        cpl.cached_peer = cpl.local;
        let heartbeat = self.heartbeat();
        let seen = heartbeat.word().load(Ordering::Relaxed);
        (
            RequestSender {
                ring: req,
                segments: self.segment_table(),
            },
            CompletionReceiver {
                ring: cpl,
                heartbeat,
                seen,
                seen_at: Instant::now(),
            },
        )
    }

    /// The worker's two ends.
    pub fn worker_end(&self) -> (RequestReceiver, CompletionSender) {
        let mut req =
            self.spsc::<RawRequest>(OFF_REQ_PROD, OFF_REQ_CONS, self.layout.req_entries_off());
        req.local = req.cons_word().load(Ordering::Acquire);
        req.cached_peer = req.local;
        let mut cpl =
            self.spsc::<Completion>(OFF_CPL_PROD, OFF_CPL_CONS, self.layout.cpl_entries_off());
        cpl.local = cpl.prod_word().load(Ordering::Acquire);
        cpl.cached_peer = cpl.cons_word().load(Ordering::Acquire);
        (
            RequestReceiver {
                ring: req,
                segments: self.segment_table(),
                layout: self.layout,
                scratch: Vec::with_capacity(self.layout.max_segments as usize),
            },
            CompletionSender {
                ring: cpl,
                heartbeat: self.heartbeat(),
            },
        )
    }
}

/// One direction: a single-producer/single-consumer ring of `T` in shared
/// memory. `local` is our own free-running index (producer or consumer),
/// `cached_peer` the last value of the peer's we loaded.
struct Spsc<T> {
    /// Keeps the mapping alive for the raw pointers below.
    _shm: Arc<SharedMemory>,
    slots: *mut T,
    entries: u32,
    prod: *const AtomicU32,
    cons: *const AtomicU32,
    sleeping: *const AtomicU32,
    local: u32,
    cached_peer: u32,
    /// Consumer side: the producer published an impossible index (peer,
    /// ours); latched.
    broken: Option<(u32, u32)>,
    _t: PhantomData<T>,
}

// SAFETY: the raw pointers point into `shm`, which is Send + Sync and kept
// alive by the Arc; a Spsc is used by one thread at a time (&mut self).
unsafe impl<T: Send> Send for Spsc<T> {}

impl<T: Copy> Spsc<T> {
    fn prod_word(&self) -> &AtomicU32 {
        // SAFETY: in-bounds, aligned header word kept alive by self.shm.
        unsafe { &*self.prod }
    }

    fn cons_word(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.cons }
    }

    fn sleeping_word(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.sleeping }
    }

    fn slot(&self, idx: u32) -> *mut T {
        let i = (idx & (self.entries - 1)) as usize;
        // SAFETY: i < entries and `slots` spans `entries` elements.
        unsafe { self.slots.add(i) }
    }

    // ---- producer side ----

    fn push(&mut self, item: T) -> Result<(), RingError> {
        let mut used = self.local.wrapping_sub(self.cached_peer);
        if used >= self.entries {
            self.cached_peer = self.cons_word().load(Ordering::Acquire);
            used = self.local.wrapping_sub(self.cached_peer);
            if used > self.entries {
                return Err(RingError::PeerIndex {
                    peer: self.cached_peer,
                    ours: self.local,
                });
            }
            if used == self.entries {
                return Err(RingError::Full);
            }
        }
        // SAFETY: the slot is inside the ring and not visible to the consumer
        // until we publish `local + 1`.
        unsafe { self.slot(self.local).write_volatile(item) };
        self.local = self.local.wrapping_add(1);
        Ok(())
    }

    /// Publishes pushed entries; true when the consumer is (about to be)
    /// asleep and must be woken.
    fn publish(&mut self) -> bool {
        self.prod_word().store(self.local, Ordering::Release);
        fence(Ordering::SeqCst);
        self.sleeping_word().load(Ordering::Relaxed) != 0
    }

    // ---- consumer side ----

    /// Takes the next entry. A producer index more than a ring ahead is
    /// latched: this and every later call fail with the same error, so no
    /// slot is ever read on the word of a producer caught lying.
    fn pop(&mut self) -> Result<Option<T>, RingError> {
        if let Some((peer, ours)) = self.broken {
            return Err(RingError::PeerIndex { peer, ours });
        }
        if self.local == self.cached_peer {
            self.cached_peer = self.prod_word().load(Ordering::Acquire);
            if self.local == self.cached_peer {
                return Ok(None);
            }
            if self.cached_peer.wrapping_sub(self.local) > self.entries {
                self.broken = Some((self.cached_peer, self.local));
                return Err(RingError::PeerIndex {
                    peer: self.cached_peer,
                    ours: self.local,
                });
            }
        }
        // SAFETY: the producer published this slot (Acquire above pairs with
        // its Release) and will not reuse it until we release our index.
        let item = unsafe { self.slot(self.local).read_volatile() };
        self.local = self.local.wrapping_add(1);
        Ok(Some(item))
    }

    fn release(&mut self) {
        self.cons_word().store(self.local, Ordering::Release);
    }

    fn prepare_sleep(&mut self) -> bool {
        self.release();
        self.sleeping_word().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.prod_word().load(Ordering::Acquire) != self.local {
            self.sleeping_word().store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn woke(&mut self) {
        self.sleeping_word().store(0, Ordering::Relaxed);
    }

    /// Consumer side: whether the producer has published entries we have
    /// not taken yet (one Acquire load, no syscall: for polling).
    fn has_new(&self) -> bool {
        self.prod_word().load(Ordering::Acquire) != self.local
    }

    fn pending(&self) -> u32 {
        self.prod_word()
            .load(Ordering::Acquire)
            .wrapping_sub(self.cons_word().load(Ordering::Acquire))
    }
}

/// The worker's heartbeat word.
struct Heartbeat {
    /// Keeps the mapping alive for `word`.
    _shm: Arc<SharedMemory>,
    word: *const AtomicU64,
}

// SAFETY: a pointer into the Arc'd mapping, only used as an atomic.
unsafe impl Send for Heartbeat {}

impl Heartbeat {
    fn word(&self) -> &AtomicU64 {
        // SAFETY: OFF_HEARTBEAT is 64-byte aligned inside the header, which
        // every ring mapping covers (size() > OFF_ENTRIES_START), so the
        // pointer is valid and aligned for as long as `_shm` lives; the peer
        // only ever changes the word, which an AtomicU64 tolerates.
        unsafe { &*self.word }
    }
}

/// Judges a heartbeat sample: `Ok(true)` if it moved since `was`,
/// `Ok(false)` if it did not, `Err` if the move is impossible for a sane
/// worker: backwards (the counter is a u64 bumped by one, so it does not
/// wrap in practice), or by more than one beat per nanosecond of `elapsed`
/// (plus [`HEARTBEAT_SLACK`]).
pub fn judge_heartbeat(was: u64, now: u64, elapsed: Duration) -> Result<bool, RingError> {
    let elapsed_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    let bad = || RingError::Heartbeat {
        was,
        now,
        elapsed_ns,
    };
    match now.checked_sub(was) {
        None => Err(bad()),
        Some(0) => Ok(false),
        Some(d) if d > elapsed_ns.saturating_add(HEARTBEAT_SLACK) => Err(bad()),
        Some(_) => Ok(true),
    }
}

/// Spill space for long scatter-gather lists, `per_tag` segments per tag.
struct SegmentTable {
    /// Keeps the mapping alive for `base`.
    _shm: Arc<SharedMemory>,
    base: *mut Segment,
    entries: u32,
    per_tag: u32,
}

// SAFETY: pointer into the Arc'd mapping, used through &mut self only.
unsafe impl Send for SegmentTable {}

impl SegmentTable {
    fn slot(&self, tag: u32, i: usize) -> Option<*mut Segment> {
        if tag >= self.entries || i >= self.per_tag as usize || self.base.is_null() {
            return None;
        }
        let idx = tag as usize * self.per_tag as usize + i;
        // SAFETY: idx < entries * per_tag, the table's length.
        Some(unsafe { self.base.add(idx) })
    }

    fn write(&mut self, tag: u32, segs: &[Segment]) -> Result<(), RingError> {
        if segs.len() > self.per_tag as usize || tag >= self.entries {
            return Err(RingError::TooManySegments(segs.len()));
        }
        for (i, s) in segs.iter().enumerate() {
            let p = self
                .slot(tag, i)
                .ok_or(RingError::TooManySegments(segs.len()))?;
            // SAFETY: in-bounds slot owned by this in-flight tag.
            unsafe { p.write_volatile(*s) };
        }
        Ok(())
    }

    fn read(&self, tag: u32, n: usize, out: &mut Vec<Segment>) -> bool {
        for i in 0..n {
            let Some(p) = self.slot(tag, i) else {
                return false;
            };
            // SAFETY: in-bounds slot; a racing peer can only change values,
            // which we copy once and validate afterwards.
            out.push(unsafe { p.read_volatile() });
        }
        true
    }
}

/// Frontend → worker: submits requests.
pub struct RequestSender {
    ring: Spsc<RawRequest>,
    segments: SegmentTable,
}

impl RequestSender {
    /// Queues a request (not yet visible to the worker: call [`Self::publish`]).
    /// The caller guarantees `req.tag` is not in flight.
    pub fn push(&mut self, req: &Request, segs: &[Segment]) -> Result<(), RingError> {
        let mut raw = RawRequest {
            tag: req.tag,
            op: req.op as u8,
            flags: req.flags,
            nseg: u16::try_from(segs.len()).map_err(|_| RingError::TooManySegments(segs.len()))?,
            offset: req.offset,
            len: req.len,
            reserved: 0,
            inline: [Segment::default(); INLINE_SEGMENTS],
        };
        if segs.len() <= INLINE_SEGMENTS {
            raw.inline[..segs.len()].copy_from_slice(segs);
        } else {
            self.segments.write(req.tag, segs)?;
        }
        self.ring.push(raw)
    }

    /// Makes pushed requests visible; true if the worker must be kicked.
    pub fn publish(&mut self) -> bool {
        self.ring.publish()
    }

    /// Requests pushed and not yet taken by the worker.
    pub fn unconsumed(&self) -> u32 {
        self.ring.pending()
    }
}

/// Worker side: takes requests.
pub struct RequestReceiver {
    ring: Spsc<RawRequest>,
    segments: SegmentTable,
    layout: RingLayout,
    scratch: Vec<Segment>,
}

/// What [`RequestReceiver::pop`] yields.
#[derive(Debug)]
pub enum Received<'a> {
    /// A valid request and its segments.
    Request(Request, &'a [Segment]),
    /// A malformed entry: fail it back if it has a tag, otherwise drop it.
    Bad(BadRequest),
}

impl RequestReceiver {
    /// Takes the next request, copied out of shared memory and validated.
    /// `Err` means the peer broke the ring itself (treat the queue as broken).
    pub fn pop(&mut self) -> Result<Option<Received<'_>>, RingError> {
        let Some(raw) = self.ring.pop()? else {
            return Ok(None);
        };
        self.scratch.clear();
        let n = raw.nseg as usize;
        if n <= INLINE_SEGMENTS {
            self.scratch.extend_from_slice(&raw.inline[..n]);
        } else if n > self.layout.max_segments as usize
            || !self.segments.read(raw.tag, n, &mut self.scratch)
        {
            return Ok(Some(Received::Bad(BadRequest {
                tag: (raw.tag < self.layout.entries).then_some(raw.tag),
                reason: "segment count out of range",
            })));
        }
        Ok(Some(match self.layout.validate(&raw, &self.scratch) {
            Ok(req) => Received::Request(req, &self.scratch),
            Err(bad) => Received::Bad(bad),
        }))
    }

    /// Returns consumed slots to the frontend.
    pub fn release(&mut self) {
        self.ring.release();
    }

    /// Whether requests are waiting (for polling).
    pub fn has_new(&self) -> bool {
        self.ring.has_new()
    }

    /// Announces we are going to sleep; false if requests arrived meanwhile
    /// (then keep working).
    pub fn prepare_sleep(&mut self) -> bool {
        self.ring.prepare_sleep()
    }

    /// Clears the sleeping flag after a wake-up.
    pub fn woke(&mut self) {
        self.ring.woke();
    }
}

/// Worker → frontend: posts completions, and beats the heartbeat.
pub struct CompletionSender {
    ring: Spsc<Completion>,
    heartbeat: Heartbeat,
}

impl CompletionSender {
    /// Queues a completion. The ring holds as many entries as there can be
    /// requests in flight, so this fails only if the frontend broke the ring.
    pub fn push(&mut self, c: Completion) -> Result<(), RingError> {
        self.ring.push(c)
    }

    /// Makes pushed completions visible; true if the frontend must be kicked.
    pub fn publish(&mut self) -> bool {
        self.ring.publish()
    }

    /// One beat of the heartbeat: the queue loop is alive. An atomic add,
    /// not a store of a private count, so that the counter only ever moves
    /// forward even if a queue moving between workers briefly has two
    /// (the old one about to stop).
    pub fn beat(&self) {
        self.heartbeat.word().fetch_add(1, Ordering::Relaxed);
    }

    /// Test hook, for the frontend's handling of a corrupt worker: publishes
    /// a producer index more than a ring ahead of the consumer's. Only the
    /// worker's debug-build fault hook calls it (see `backend-workers`);
    /// nothing a guest sends can reach it.
    #[doc(hidden)]
    pub fn publish_corrupt_index(&mut self) {
        let bad = self
            .ring
            .cons_word()
            .load(Ordering::Acquire)
            .wrapping_add(self.ring.entries)
            .wrapping_add(1);
        self.ring.local = bad;
        self.ring.publish();
    }
}

/// Frontend side: takes completions, and samples the worker's heartbeat.
pub struct CompletionReceiver {
    ring: Spsc<Completion>,
    heartbeat: Heartbeat,
    /// The heartbeat at the last sample, and when that was.
    seen: u64,
    seen_at: Instant,
}

impl CompletionReceiver {
    /// Next completion, copied out of shared memory. The caller must check
    /// the tag against its own in-flight table.
    pub fn pop(&mut self) -> Result<Option<Completion>, RingError> {
        self.ring.pop()
    }

    pub fn release(&mut self) {
        self.ring.release();
    }

    /// Whether completions are waiting (for polling).
    pub fn has_new(&self) -> bool {
        self.ring.has_new()
    }

    pub fn prepare_sleep(&mut self) -> bool {
        self.ring.prepare_sleep()
    }

    pub fn woke(&mut self) {
        self.ring.woke();
    }

    /// Samples the worker's heartbeat: `Ok(true)` if it moved since the
    /// last sample (or since this end was taken), `Ok(false)` if not, and
    /// [`RingError::Heartbeat`] if it moved in a way a sane worker cannot
    /// (see [`judge_heartbeat`]); the caller must then stop trusting the
    /// worker. One Relaxed load of a line the worker owns: sample it only
    /// while requests are in flight, and not on every loop iteration.
    pub fn heartbeat(&mut self, now: Instant) -> Result<bool, RingError> {
        let value = self.heartbeat.word().load(Ordering::Relaxed);
        let moved = judge_heartbeat(
            self.seen,
            value,
            now.saturating_duration_since(self.seen_at),
        )?;
        self.seen = value;
        self.seen_at = now;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(entries: u32) -> (QueueRings, QueueRings) {
        let layout = RingLayout::new(entries, 8).unwrap();
        let f = QueueRings::create("t", layout).unwrap();
        let file = f.shm_file();
        let w = QueueRings::attach(file, layout).unwrap();
        (f, w)
    }

    impl QueueRings {
        fn shm_file(&self) -> File {
            let fd = self.fd().try_clone_to_owned().unwrap();
            File::from(fd)
        }
    }

    fn rw(tag: u32, op: Op, offset: u64, segs: &[Segment]) -> Request {
        Request {
            tag,
            op,
            flags: 0,
            offset,
            len: segs.iter().map(|s| s.len as u64).sum(),
        }
    }

    fn seg(region: u32, offset: u64, len: u32) -> Segment {
        Segment {
            region,
            len,
            offset,
        }
    }

    #[test]
    fn requests_and_completions_round_trip() {
        let (f, w) = pair(8);
        let (mut tx, mut rx_cpl) = f.frontend_end();
        let (mut rx, mut tx_cpl) = w.worker_end();
        let short = [seg(0, 4096, 512)];
        let long: Vec<_> = (0..5).map(|i| seg(1, i * 4096, 4096)).collect();
        tx.push(&rw(3, Op::Read, 0, &short), &short).unwrap();
        tx.push(&rw(5, Op::Write, 8192, &long), &long).unwrap();
        tx.publish();
        match rx.pop().unwrap().unwrap() {
            Received::Request(r, s) => {
                assert_eq!((r.tag, r.op, r.len), (3, Op::Read, 512));
                assert_eq!(s, &short);
            }
            Received::Bad(b) => panic!("{b}"),
        }
        match rx.pop().unwrap().unwrap() {
            Received::Request(r, s) => {
                assert_eq!((r.tag, r.op, r.offset), (5, Op::Write, 8192));
                assert_eq!(s, &long[..]);
            }
            Received::Bad(b) => panic!("{b}"),
        }
        assert!(rx.pop().unwrap().is_none());
        rx.release();
        tx_cpl
            .push(Completion {
                tag: 5,
                result: -5,
                extra: 0,
            })
            .unwrap();
        tx_cpl.publish();
        assert_eq!(rx_cpl.pop().unwrap().unwrap().result, -5);
        assert!(rx_cpl.pop().unwrap().is_none());
    }

    #[test]
    fn producer_sees_full_ring_until_consumer_releases() {
        let (f, w) = pair(4);
        let (mut tx, _) = f.frontend_end();
        let (mut rx, _) = w.worker_end();
        let s = [seg(0, 0, 512)];
        for t in 0..4 {
            tx.push(&rw(t, Op::Read, 0, &s), &s).unwrap();
        }
        assert!(matches!(
            tx.push(&rw(0, Op::Read, 0, &s), &s),
            Err(RingError::Full)
        ));
        tx.publish();
        assert!(rx.pop().unwrap().is_some());
        rx.release();
        tx.push(&rw(0, Op::Read, 0, &s), &s).unwrap();
    }

    #[test]
    fn wakeup_requested_only_when_consumer_sleeps() {
        let (f, w) = pair(4);
        let (mut tx, _) = f.frontend_end();
        let (mut rx, _) = w.worker_end();
        let s = [seg(0, 0, 512)];
        tx.push(&rw(0, Op::Read, 0, &s), &s).unwrap();
        assert!(!tx.publish(), "busy consumer needs no kick");
        assert!(
            !rx.prepare_sleep(),
            "pending entry must keep the consumer awake"
        );
        assert!(rx.pop().unwrap().is_some());
        assert!(rx.prepare_sleep());
        tx.push(&rw(1, Op::Read, 0, &s), &s).unwrap();
        assert!(tx.publish(), "sleeping consumer must be kicked");
        rx.woke();
    }

    #[test]
    fn rejects_corrupt_producer_index() {
        let (f, w) = pair(4);
        let (mut rx, _) = w.worker_end();
        // A hostile frontend claims 100 entries in a ring of 4.
        f.word_for_test(OFF_REQ_PROD).store(100, Ordering::Release);
        assert!(matches!(rx.pop(), Err(RingError::PeerIndex { .. })));
    }

    impl QueueRings {
        fn word_for_test(&self, off: usize) -> &AtomicU32 {
            self.state_word(off)
        }
    }

    #[test]
    fn rejects_corrupt_completion_index() {
        let (f, w) = pair(4);
        let (_, mut rx_cpl) = f.frontend_end();
        let (_, mut tx_cpl) = w.worker_end();
        tx_cpl
            .push(Completion {
                tag: 1,
                result: 0,
                extra: 0,
            })
            .unwrap();
        tx_cpl.publish();
        assert_eq!(rx_cpl.pop().unwrap().unwrap().tag, 1);
        rx_cpl.release();
        // Exactly a ring ahead is a full ring, not corruption.
        f.word_for_test(OFF_CPL_PROD)
            .store(1 + 4, Ordering::Release);
        assert!(rx_cpl.pop().unwrap().is_some());
        // A worker that claims more than a ring of completions is corrupt,
        // and stays so on every later look.
        let (_, mut rx_cpl) = f.frontend_end();
        tx_cpl.publish_corrupt_index();
        for _ in 0..2 {
            assert!(matches!(rx_cpl.pop(), Err(RingError::PeerIndex { .. })));
        }
    }

    #[test]
    fn heartbeat_is_on_its_own_line_and_counts_beats() {
        let (f, w) = pair(4);
        let (_, mut rx_cpl) = f.frontend_end();
        let (_, tx_cpl) = w.worker_end();
        for off in [OFF_REQ_PROD, OFF_REQ_CONS, OFF_CPL_PROD, OFF_CPL_CONS] {
            assert_ne!(off / LINE, OFF_HEARTBEAT / LINE);
        }
        let t0 = Instant::now();
        assert!(!rx_cpl.heartbeat(t0).unwrap(), "no beat yet");
        tx_cpl.beat();
        tx_cpl.beat();
        let t1 = t0 + Duration::from_millis(100);
        assert!(rx_cpl.heartbeat(t1).unwrap());
        assert!(!rx_cpl.heartbeat(t1 + Duration::from_millis(100)).unwrap());
        // A re-attached end continues the count; it never restarts at 0.
        let (_, tx_again) = w.worker_end();
        tx_again.beat();
        assert!(rx_cpl.heartbeat(t1 + Duration::from_millis(200)).unwrap());
    }

    #[test]
    fn impossible_heartbeats_are_corrupt() {
        let ms = Duration::from_millis;
        assert!(!judge_heartbeat(7, 7, ms(500)).unwrap());
        assert!(judge_heartbeat(7, 8, Duration::ZERO).unwrap());
        assert!(judge_heartbeat(0, 1_000_000, ms(1)).unwrap());
        // Backwards.
        assert!(matches!(
            judge_heartbeat(8, 7, ms(500)),
            Err(RingError::Heartbeat { was: 8, now: 7, .. })
        ));
        // More than one beat per nanosecond (plus the slack).
        assert!(judge_heartbeat(0, 3 * HEARTBEAT_SLACK, ms(1)).is_err());
        assert!(judge_heartbeat(5, u64::MAX, ms(500)).is_err());
        // Through the ring: a worker scribbling the word.
        let (f, _w) = pair(4);
        let (_, mut rx_cpl) = f.frontend_end();
        let t0 = Instant::now();
        f.heartbeat().word().store(u64::MAX / 2, Ordering::Relaxed);
        assert!(matches!(
            rx_cpl.heartbeat(t0 + ms(100)),
            Err(RingError::Heartbeat { .. })
        ));
    }

    #[test]
    fn bad_entries_are_reported_with_their_tag() {
        let layout = RingLayout::new(8, 4).unwrap();
        let raw = |tag, op, flags, nseg, len| RawRequest {
            tag,
            op,
            flags,
            nseg,
            offset: 0,
            len,
            reserved: 0,
            inline: [Segment::default(); 2],
        };
        let one = [seg(0, 0, 512)];
        assert_eq!(
            layout
                .validate(&raw(9, 1, 0, 1, 512), &one)
                .unwrap_err()
                .tag,
            None
        );
        assert_eq!(
            layout
                .validate(&raw(1, 99, 0, 1, 512), &one)
                .unwrap_err()
                .reason,
            "unknown op"
        );
        assert!(layout
            .validate(&raw(1, Op::Read as u8, FLAG_FUA, 1, 512), &one)
            .is_err());
        assert!(layout
            .validate(&raw(1, Op::Read as u8, 0, 1, 1024), &one)
            .is_err());
        assert!(layout
            .validate(&raw(1, Op::Flush as u8, 0, 1, 512), &one)
            .is_err());
        assert!(layout
            .validate(&raw(1, Op::Discard as u8, 0, 0, 0), &[])
            .is_err());
        let mut over = raw(1, Op::Read as u8, 0, 1, 512);
        over.offset = u64::MAX - 10;
        assert!(layout.validate(&over, &one).is_err());
        assert!(layout
            .validate(&raw(1, Op::Read as u8, 0, 1, 512), &one)
            .is_ok());
    }

    #[test]
    fn attach_rejects_mismatched_geometry() {
        let layout = RingLayout::new(8, 4).unwrap();
        let f = QueueRings::create("t", layout).unwrap();
        let other = RingLayout::new(8, 2).unwrap();
        assert!(QueueRings::attach(f.shm_file(), other).is_err());
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(RingLayout::new(0, 1).is_err());
        assert!(RingLayout::new(3, 1).is_err());
        assert!(RingLayout::new(8192, 1).is_err());
        assert!(RingLayout::new(8, 0).is_err());
    }

    #[test]
    fn cross_thread_stream_keeps_order() {
        let (f, w) = pair(64);
        let (mut tx, _) = f.frontend_end();
        let (mut rx, _) = w.worker_end();
        const N: u32 = 200_000;
        let t = std::thread::spawn(move || {
            let mut next = 0u32;
            while next < N {
                match rx.pop().unwrap() {
                    Some(Received::Request(r, _)) => {
                        assert_eq!(r.offset, next as u64);
                        next += 1;
                    }
                    Some(Received::Bad(b)) => panic!("{b}"),
                    None => {
                        rx.release();
                        std::hint::spin_loop();
                    }
                }
            }
        });
        let s = [seg(0, 0, 512)];
        let mut i = 0u32;
        while i < N {
            let r = Request {
                tag: i % 64,
                op: Op::Read,
                flags: 0,
                offset: i as u64,
                len: 512,
            };
            match tx.push(&r, &s) {
                Ok(()) => i += 1,
                Err(RingError::Full) => {
                    tx.publish();
                    std::hint::spin_loop();
                }
                Err(e) => panic!("{e}"),
            }
            if i % 16 == 0 {
                tx.publish();
            }
        }
        tx.publish();
        t.join().unwrap();
    }
}
