//! One virtqueue's event loop in the worker.
//!
//! The loop takes requests from the ring, validates them against the graph's
//! limits and this worker's own mapping of guest RAM, runs them through the
//! graph's stages (windows, fault injection, throttling), submits vectored
//! I/O to its own libblkio queue, and posts completions back. A request that
//! breaks the graph's limits reaches the leaf in parts (at most [`LANES`] in
//! flight) and is completed once, when all are back; guest buffers that break
//! the buffer alignment go through a bounce buffer. When it runs
//! out of work it polls briefly, then sleeps after announcing it on the ring
//! so the frontend knows to kick it; likewise it kicks the frontend only when
//! the frontend has said it sleeps.
//!
//! Every loop iteration beats the ring's heartbeat, and while requests are
//! in flight the loop never sleeps longer than [`HEARTBEAT_INTERVAL`]: the
//! frontend takes a worker for hung only when requests are in flight and
//! the heartbeat stopped, so a request held for long by a throttle or a
//! delay does not get a live worker fenced.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::poll::Poller;
use blkmesh_ipc::ring::{
    zone_status, Completion, CompletionSender, Op, QueueRings, Received, Request, RequestReceiver,
    Segment, FLAG_FUA, HEARTBEAT_INTERVAL,
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::bounce::BounceBuf;
use crate::graph::{OpenedGraph, ZoneAccess};
use crate::leaf::{AttachError, Data, Issued, LeafCompletion, LeafQueue, LeafRequest};
use crate::memory::RegisteredRam;
use crate::split::{next_linear, next_vectored, part_offset, Cursor, SplitLimits, LANES};
use crate::stages::{self, Stage, Verdict};
use crate::test_hooks::Corruption;
use crate::zoned::{self, Action, Ticket, WriteKind, ZoneError, ZoneLayer, ZoneView};
use blkmesh_stats::{IoCounters, OpKind};

const EV_KICK: u64 = 0;
const EV_IO: u64 = 1;
const EV_STOP: u64 = 2;

/// libblkio user_data: the tag in the low bits, and above them 0 for a whole
/// request or 1 + lane for a part of a split one.
const LANE_SHIFT: u32 = 16;
const TAG_MASK: usize = (1 << LANE_SHIFT) - 1;
const _: () = assert!(blkmesh_ipc::ring::MAX_ENTRIES as usize <= TAG_MASK + 1);
const _: () = assert!(LANES <= u8::BITS as usize);

fn part_user_data(tag: usize, lane: usize) -> usize {
    tag | (lane + 1) << LANE_SHIFT
}

/// The current memory table of a connection, swapped by the control thread
/// while the frontend holds the rings quiet.
pub type SharedRam = Arc<Mutex<Arc<RegisteredRam>>>;

/// Everything a queue thread needs.
pub struct QueueSetup {
    pub index: u32,
    pub rings: QueueRings,
    /// Signalled by the frontend when it has published requests.
    pub kick: Doorbell,
    /// Signalled by us when we have published completions.
    pub call: Doorbell,
    pub graph: OpenedGraph,
    pub ram: SharedRam,
}

/// Handle to stop a running queue thread.
pub struct QueueHandle {
    stop: Arc<AtomicBool>,
    abandon: Arc<AtomicBool>,
    stop_fd: Doorbell,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QueueHandle {
    /// Stops the loop once its in-flight requests have completed and waits
    /// for it.
    pub fn stop(mut self) {
        self.halt();
    }

    /// Stops the loop for a frontend that is gone: requests still held by
    /// a delay or a throttle are dropped (their completions would reach
    /// nobody, and the restarted frontend resubmits them), those already
    /// at the leaf complete; then waits for it. After this nothing of the
    /// queue's requests runs any more.
    pub fn abandon(mut self) {
        self.abandon.store(true, Ordering::Release);
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.stop_fd.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Leaf(#[from] AttachError),
    #[error("event loop setup")]
    Io(#[source] std::io::Error),
}

/// Starts the event loop of one queue on its own thread.
pub fn spawn(setup: QueueSetup) -> Result<QueueHandle, QueueError> {
    let entries = setup.rings.layout().entries() as usize;
    let leaf = LeafQueue::attach(&setup.graph.leaf, entries)?;
    let stop = Arc::new(AtomicBool::new(false));
    let abandon = Arc::new(AtomicBool::new(false));
    let stop_fd = Doorbell::new().map_err(QueueError::Io)?;
    let mut lp = QueueLoop::new(
        setup,
        leaf,
        Arc::clone(&stop),
        stop_fd.try_clone().map_err(QueueError::Io)?,
    );
    lp.abandon = Arc::clone(&abandon);
    let thread = std::thread::Builder::new()
        .name(format!("q{}", lp.index))
        .spawn(move || lp.run())
        .map_err(QueueError::Io)?;
    Ok(QueueHandle {
        stop,
        abandon,
        stop_fd,
        thread: Some(thread),
    })
}

/// Per-tag state of an in-flight request.
#[derive(Default)]
struct Slot {
    busy: bool,
    op: Option<Op>,
    flags: u8,
    len: u64,
    /// Where the request is in the graph: next stage and offset there.
    stage: usize,
    offset: u64,
    /// Keeps the guest mapping alive while the driver holds our iovecs.
    ram: Option<Arc<RegisteredRam>>,
    /// The iovec array handed to libblkio; stable until completion.
    iovs: Vec<libc::iovec>,
    /// Data ops: the guest segments (for bounce copies and null reads).
    segs: Vec<Segment>,
    /// Set when the guest buffers break the driver's alignment (or cannot be
    /// cut where a split needs it).
    bounce: Option<BounceBuf>,
    /// When the request arrived, and when it reached the leaf.
    start: Option<Instant>,
    leaf_start: Option<Instant>,
    /// The request breaks the graph's limits: it goes to the leaf in parts.
    split: bool,
    parts: Parts,
    /// The completion's `extra`: where a zone append landed, the bytes of
    /// a zone report.
    extra: u64,
    /// A write reserved in the graph's zone layer, handed back on completion.
    zone: Option<Ticket>,
}

/// Progress of a split request. Lives in its slot and is reused, so a split
/// allocates nothing once each lane's iovec array has grown to its size.
#[derive(Default)]
struct Parts {
    /// The next byte to hand out.
    cur: Cursor,
    /// Leaf offset of the request's first byte.
    base: u64,
    /// Lanes with a part in flight (bit i: lane i).
    busy: u8,
    /// The first error of a part (0: none yet); no new part starts after it.
    result: i32,
    /// Per lane, the iovecs of its part, stable until the part completes.
    iovs: [Vec<libc::iovec>; LANES],
}

/// The lowest free lane.
fn free_lane(busy: u8) -> Option<usize> {
    let free = !busy;
    (free != 0).then(|| free.trailing_zeros() as usize)
}

/// What happened to requests outside the limits, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SplitCounters {
    /// Requests cut into parts, and the parts.
    split: u64,
    parts: u64,
    /// Requests that went through a bounce buffer.
    bounced: u64,
}

fn kind_of(op: Op) -> OpKind {
    match op {
        Op::Read => OpKind::Read,
        Op::Write | Op::ZoneAppend => OpKind::Write,
        Op::Discard => OpKind::Discard,
        Op::WriteZeroes => OpKind::WriteZeroes,
        _ => OpKind::Flush,
    }
}

// SAFETY: the iovecs point into guest RAM kept alive by `ram`; the slot moves
// with the queue thread that owns it.
unsafe impl Send for Slot {}

struct QueueLoop {
    index: u32,
    rx: RequestReceiver,
    tx: CompletionSender,
    kick: Doorbell,
    call: Doorbell,
    graph: OpenedGraph,
    /// The graph's limits as the loop checks them.
    limits: SplitLimits,
    counters: SplitCounters,
    /// Scratch pieces of a null-leaf part.
    null_segs: Vec<Segment>,
    shared_ram: SharedRam,
    leaf: LeafQueue,
    stop: Arc<AtomicBool>,
    /// Set with `stop` when the frontend is gone (see [`QueueHandle::abandon`]).
    abandon: Arc<AtomicBool>,
    stop_fd: Doorbell,
    slots: Vec<Slot>,
    inflight: usize,
    done: Vec<Completion>,
    /// What the leaf finished, as [`LeafQueue::reap`] hands it over.
    reaped: Vec<LeafCompletion>,
    errors_logged: u32,
    /// Scratch copy of the current request's segments.
    segs: Vec<Segment>,
    /// Requests held by a delay, by wake-up time.
    held: BinaryHeap<Reverse<(u64, u32)>>,
    /// Per stage: requests waiting for a throttle, in order, and when the
    /// head may be admitted.
    throttled: Vec<(VecDeque<u32>, u64)>,
    /// Completions were published while the frontend slept.
    need_kick: bool,
    /// Completions posted so far, and whether the test fault hook broke
    /// the completion ring (see [`crate::test_hooks`]).
    posted: u64,
    corrupted: bool,
    poller: Poller,
    /// This thread's counters at the root node and the leaf (`None` when
    /// the root is the leaf).
    root_stats: Arc<IoCounters>,
    leaf_stats: Option<Arc<IoCounters>>,
    /// Scratch space of zone reports.
    zone_views: Vec<ZoneView>,
    report_buf: Vec<u8>,
    _rings: QueueRings,
}

impl QueueLoop {
    fn new(setup: QueueSetup, leaf: LeafQueue, stop: Arc<AtomicBool>, stop_fd: Doorbell) -> Self {
        let (rx, tx) = setup.rings.worker_end();
        let entries = setup.rings.layout().entries() as usize;
        let stages = setup.graph.stages.len();
        let root_stats = crate::stats().node(&setup.graph.root_node);
        let leaf_stats = (setup.graph.root_node != setup.graph.leaf_node)
            .then(|| crate::stats().node(&setup.graph.leaf_node));
        let limits = SplitLimits::new(&setup.graph.limits, setup.graph.discard_punches_holes);
        QueueLoop {
            index: setup.index,
            rx,
            tx,
            kick: setup.kick,
            call: setup.call,
            graph: setup.graph,
            limits,
            counters: SplitCounters::default(),
            null_segs: Vec::new(),
            shared_ram: setup.ram,
            leaf,
            stop,
            abandon: Arc::new(AtomicBool::new(false)),
            stop_fd,
            slots: (0..entries).map(|_| Slot::default()).collect(),
            inflight: 0,
            done: Vec::with_capacity(entries),
            reaped: Vec::with_capacity(entries),
            errors_logged: 0,
            segs: Vec::with_capacity(setup.rings.layout().max_segments() as usize),
            held: BinaryHeap::new(),
            throttled: (0..stages).map(|_| (VecDeque::new(), 0)).collect(),
            need_kick: false,
            posted: 0,
            corrupted: false,
            poller: Poller::from_env(),
            root_stats,
            leaf_stats,
            zone_views: Vec::new(),
            report_buf: Vec::new(),
            _rings: setup.rings,
        }
    }

    fn run(mut self) {
        let epoll = match self.epoll() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(queue = self.index, "epoll setup: {e}");
                return;
            }
        };
        let mut events = [EpollEvent::empty(); 4];
        loop {
            // Alive: the frontend judges hangs by this, not by how long a
            // request has been held.
            self.tx.beat();
            let stopping = self.stop.load(Ordering::Acquire);
            let mut progress = 0usize;
            if !stopping {
                match self.take_requests() {
                    Ok(n) => progress += n,
                    Err(e) => {
                        tracing::error!(
                            queue = self.index,
                            "ring broken by the frontend: {e}; detaching"
                        );
                        self.stop.store(true, Ordering::Release);
                    }
                }
            }
            if stopping && self.abandon.load(Ordering::Acquire) {
                progress += self.cancel_held();
            }
            progress += self.run_timers();
            progress += self.reap();
            if !self.done.is_empty() {
                self.post_completions();
            }
            if stopping && self.inflight == 0 {
                break;
            }
            if progress > 0 {
                continue;
            }
            // Idle: now wake the frontend if it asked (deferred to here so a
            // busy loop is not interrupted by its own doorbell), poll a
            // little, then announce sleep (unless requests raced in) and wait.
            self.kick_frontend();
            let idle_since = Instant::now();
            if !stopping {
                let mut poller = self.poller;
                let found = poller.poll(|| {
                    self.rx.has_new() || self.driver_has_completions() || self.timer_due()
                });
                self.poller = poller;
                if found {
                    continue;
                }
            }
            if !stopping && !self.rx.prepare_sleep() {
                continue;
            }
            let timeout = self.next_timer();
            let n = epoll.wait(&mut events, timeout).unwrap_or(0);
            self.rx.woke();
            self.poller.slept(idle_since.elapsed());
            for ev in &events[..n] {
                match ev.data() {
                    EV_KICK => {
                        self.kick.clear();
                    }
                    EV_IO => self.leaf.clear_completion_fd(),
                    _ => {
                        self.stop_fd.clear();
                    }
                }
            }
        }
        self.kick_frontend();
        let c = self.counters;
        if c != SplitCounters::default() {
            tracing::info!(
                queue = self.index,
                split = c.split,
                parts = c.parts,
                bounced = c.bounced,
                "requests split or bounced to fit the graph's limits"
            );
        }
        crate::stats().retire(&self.graph.root_node, &self.root_stats);
        if let Some(leaf) = &self.leaf_stats {
            crate::stats().retire(&self.graph.leaf_node, leaf);
        }
        tracing::debug!(queue = self.index, "queue loop stopped");
    }

    fn epoll(&mut self) -> nix::Result<Epoll> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&self.kick, EpollEvent::new(EpollFlags::EPOLLIN, EV_KICK))?;
        epoll.add(&self.stop_fd, EpollEvent::new(EpollFlags::EPOLLIN, EV_STOP))?;
        // The fd lives as long as the leaf queue, and so as this loop and
        // its epoll set.
        if let Some(fd) = self.leaf.completion_fd() {
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, EV_IO))?;
        }
        Ok(epoll)
    }

    /// The earliest time something held (delay, throttle, null latency) is
    /// due, in CLOCK_MONOTONIC ns.
    fn next_deadline(&self) -> Option<u64> {
        let held = self.held.peek().map(|Reverse((t, _))| *t);
        let throttled = self
            .throttled
            .iter()
            .filter(|(q, _)| !q.is_empty())
            .map(|(_, t)| *t)
            .min();
        let null = self.leaf.next_due().map(|d| {
            let left = d.saturating_duration_since(Instant::now()).as_nanos() as u64;
            stages::now() + left
        });
        [held, throttled, null].into_iter().flatten().min()
    }

    fn timer_due(&self) -> bool {
        self.next_deadline().is_some_and(|d| d <= stages::now())
    }

    /// How long the loop may sleep: until the next held request is due,
    /// and, while requests are in flight, at most [`HEARTBEAT_INTERVAL`],
    /// so the heartbeat keeps moving while a throttle or a delay holds a
    /// request (or the device is slow) and the frontend does not take the
    /// worker for hung. With nothing in flight it sleeps until woken.
    fn next_timer(&self) -> EpollTimeout {
        let beat = (self.inflight > 0).then(|| HEARTBEAT_INTERVAL.as_millis() as u64);
        let due = self.next_deadline().map(|d| {
            let left = d.saturating_sub(stages::now());
            // Round up so we do not wake just before the deadline.
            left.div_ceil(1_000_000).min(1000)
        });
        match [beat, due].into_iter().flatten().min() {
            None => EpollTimeout::NONE,
            Some(ms) => EpollTimeout::from(ms as u16),
        }
    }

    /// Takes every published request; returns how many.
    fn take_requests(&mut self) -> Result<usize, blkmesh_ipc::ring::RingError> {
        let ram = Arc::clone(&self.shared_ram.lock().unwrap_or_else(|p| p.into_inner()));
        let mut segs = std::mem::take(&mut self.segs);
        let mut n = 0;
        let result = loop {
            let req = match self.rx.pop() {
                Err(e) => break Err(e),
                Ok(None) => break Ok(n),
                Ok(Some(Received::Bad(bad))) => {
                    n += 1;
                    self.log_guest_error(format_args!("{bad}"));
                    if let Some(tag) = bad.tag {
                        if !self.slots[tag as usize].busy {
                            self.done.push(Completion {
                                tag,
                                result: -libc::EINVAL,
                                extra: 0,
                            });
                        }
                    }
                    continue;
                }
                Ok(Some(Received::Request(req, s))) => {
                    segs.clear();
                    segs.extend_from_slice(s);
                    req
                }
            };
            n += 1;
            if self.slots[req.tag as usize].busy {
                // A tag reused while in flight: the frontend is broken. The
                // original request still owns the slot; drop the duplicate.
                self.log_guest_error(format_args!("tag {} reused while in flight", req.tag));
                continue;
            }
            if let Err(errno) = self.start(&req, &segs, &ram) {
                self.done.push(Completion {
                    tag: req.tag,
                    result: -errno,
                    extra: 0,
                });
            }
        };
        self.rx.release();
        self.segs = segs;
        result
    }

    fn log_guest_error(&mut self, msg: std::fmt::Arguments<'_>) {
        // Rate-limited: a hostile peer must not flood the log.
        if self.errors_logged < 16 {
            self.errors_logged += 1;
            tracing::warn!(queue = self.index, "refused request: {msg}");
        }
    }

    fn check_range(&self, req: &Request) -> Result<(), i32> {
        let l = &self.graph.limits;
        let end = req.offset.checked_add(req.len).ok_or(libc::EINVAL)?;
        if end > l.size {
            return Err(libc::EINVAL);
        }
        let align = l.request_alignment.max(1) as u64;
        if req.offset % align != 0 || req.len % align != 0 {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Checks a zone request against the graph: zoned at all (else
    /// EOPNOTSUPP), offset inside and a report buffer that holds at least
    /// the header (else ZONE_INVALID_CMD, as virtio-blk has it).
    fn check_zone_op(&self, req: &Request) -> Result<(), i32> {
        if self.graph.zoned.is_none() {
            return Err(libc::EOPNOTSUPP);
        }
        let l = &self.graph.limits;
        let invalid = -zone_status::INVALID_CMD;
        match req.op {
            Op::ZoneResetAll => Ok(()),
            _ if req.offset >= l.size => Err(invalid),
            Op::ZoneReport if req.len < 64 => Err(invalid),
            Op::ZoneAppend if req.len % l.request_alignment.max(1) as u64 != 0 => Err(libc::EINVAL),
            _ => Ok(()),
        }
    }

    /// Starts one request; Err(errno) fails it at once (nothing held).
    fn start(
        &mut self,
        req: &Request,
        segs: &[Segment],
        ram: &Arc<RegisteredRam>,
    ) -> Result<(), i32> {
        let writes = matches!(
            req.op,
            Op::Write
                | Op::Discard
                | Op::WriteZeroes
                | Op::ZoneAppend
                | Op::ZoneOpen
                | Op::ZoneClose
                | Op::ZoneFinish
                | Op::ZoneReset
                | Op::ZoneResetAll
        );
        if writes && self.graph.read_only() {
            return Err(libc::EROFS);
        }
        match req.op {
            Op::GetId => {
                let buf = ram.ram().buf(&segs[0]).map_err(|_| libc::EFAULT)?;
                buf.copy_from(&self.graph.serial);
                self.done.push(Completion {
                    tag: req.tag,
                    result: 0,
                    extra: 0,
                });
                return Ok(());
            }
            Op::Read | Op::Write | Op::Discard | Op::WriteZeroes => self.check_range(req)?,
            Op::Flush => {}
            Op::ZoneReport
            | Op::ZoneOpen
            | Op::ZoneClose
            | Op::ZoneFinish
            | Op::ZoneReset
            | Op::ZoneResetAll
            | Op::ZoneAppend => self.check_zone_op(req)?,
        }
        self.prepare(req, segs, ram)?;
        self.advance(req.tag, 0, req.offset);
        Ok(())
    }

    /// Claims the slot and turns data segments into iovecs over guest RAM
    /// now, while `ram` is the table the segments refer to. Decides whether
    /// the request must be bounced (buffers that break the alignment) or
    /// split (beyond the limits).
    fn prepare(
        &mut self,
        req: &Request,
        segs: &[Segment],
        ram: &Arc<RegisteredRam>,
    ) -> Result<(), i32> {
        let lim = &self.limits;
        let slot = &mut self.slots[req.tag as usize];
        slot.iovs.clear();
        slot.segs.clear();
        slot.split = false;
        slot.extra = 0;
        slot.zone = None;
        match req.op {
            Op::Read | Op::Write | Op::ZoneAppend => {
                // Every address and length ORed: one mask test for all.
                let (mut addr_bits, mut len_bits) = (0usize, 0usize);
                for s in segs {
                    let b = ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
                    addr_bits |= b.as_ptr() as usize;
                    len_bits |= b.len();
                    slot.iovs.push(b.iovec());
                }
                slot.segs.extend_from_slice(segs);
                let split = lim.data_needs_split(req.len, segs.len());
                let misaligned = (addr_bits | len_bits) & lim.buf_mask != 0;
                if misaligned || (split && !lim.segments_cuttable(len_bits)) {
                    let mut bb = self
                        .leaf
                        .bounce_pool()
                        .get(req.len as usize)
                        .map_err(|e| e.errno().raw_os_error())?;
                    if req.op != Op::Read {
                        let dst = bb.bytes_mut();
                        let mut at = 0;
                        for s in segs {
                            let b = ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
                            at += b.copy_to(&mut dst[at..]);
                        }
                    }
                    slot.bounce = Some(bb);
                    // One contiguous buffer: only the length can be too much.
                    slot.split = req.len > lim.max_transfer;
                    self.counters.bounced += 1;
                } else {
                    slot.split = split;
                }
            }
            Op::Discard | Op::WriteZeroes => {
                slot.split = lim.max_range(req.op).is_some_and(|max| req.len > max);
            }
            Op::ZoneReport => {
                for s in segs {
                    ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
                }
                slot.segs.extend_from_slice(segs);
            }
            _ => {}
        }
        slot.busy = true;
        slot.op = Some(req.op);
        slot.flags = req.flags;
        slot.len = req.len;
        slot.ram = Some(Arc::clone(ram));
        slot.start = Some(Instant::now());
        slot.leaf_start = None;
        self.root_stats.started();
        self.inflight += 1;
        Ok(())
    }

    /// Runs a claimed request through the stages from `stage` on, then
    /// submits it to the leaf (or holds it, or fails it).
    fn advance(&mut self, tag: u32, mut stage: usize, mut offset: u64) {
        let (op, len) = {
            let s = &self.slots[tag as usize];
            (s.op.unwrap_or(Op::Flush), s.len)
        };
        let mut now = 0u64;
        while stage < self.graph.stages.len() {
            let verdict = match &self.graph.stages[stage] {
                Stage::Window { offset: o } => {
                    offset += o;
                    Verdict::Pass
                }
                Stage::Faults(f) => {
                    if now == 0 {
                        now = stages::now();
                    }
                    f.check(op, offset, len, now)
                }
                Stage::Throttle(t) => {
                    if !self.throttled[stage].0.is_empty() {
                        // Keep order behind those already waiting.
                        Verdict::HoldUntil(self.throttled[stage].1)
                    } else {
                        if now == 0 {
                            now = stages::now();
                        }
                        t.admit(op, len, now)
                    }
                }
                Stage::Zoned(layer) => zone_step(
                    layer,
                    self.graph.zoned.as_ref(),
                    &mut self.slots[tag as usize],
                    &mut offset,
                    &mut self.zone_views,
                    &mut self.report_buf,
                ),
            };
            match verdict {
                Verdict::Pass => stage += 1,
                Verdict::Fail(errno) => {
                    self.complete(tag, -errno);
                    return;
                }
                Verdict::Done(result) => {
                    self.complete(tag, result);
                    return;
                }
                Verdict::HoldUntil(at) => {
                    let slot = &mut self.slots[tag as usize];
                    slot.offset = offset;
                    if matches!(self.graph.stages[stage], Stage::Zoned(_)) {
                        // A busy zone: retried at this stage.
                        slot.stage = stage;
                        self.held.push(Reverse((at, tag)));
                    } else if matches!(self.graph.stages[stage], Stage::Throttle(_)) {
                        // Retried at this stage.
                        slot.stage = stage;
                        let (q, retry) = &mut self.throttled[stage];
                        if q.is_empty() {
                            *retry = at;
                        }
                        q.push_back(tag);
                    } else {
                        // A delay: continue after this stage.
                        slot.stage = stage + 1;
                        self.held.push(Reverse((at, tag)));
                    }
                    return;
                }
            }
        }
        self.submit_leaf(tag, offset);
    }

    /// Drops every request held by a delay or a throttle (the frontend is
    /// gone); returns how many.
    fn cancel_held(&mut self) -> usize {
        let mut tags: Vec<u32> = self.held.drain().map(|Reverse((_, t))| t).collect();
        for (q, _) in &mut self.throttled {
            tags.extend(q.drain(..));
        }
        // Zone writes give their reservations back only last first: drop
        // them from the highest offset down, so each zone's write pointer
        // returns to where the dropped writes began (the restarted
        // frontend resubmits them).
        tags.sort_unstable_by_key(|&t| {
            std::cmp::Reverse(
                self.slots[t as usize]
                    .zone
                    .as_ref()
                    .map(|z| (z.zone, z.offset)),
            )
        });
        for &tag in &tags {
            self.complete(tag, -libc::ECANCELED);
        }
        if !tags.is_empty() {
            tracing::info!(
                queue = self.index,
                cancelled = tags.len(),
                "frontend gone: held requests dropped"
            );
        }
        tags.len()
    }

    /// Releases whatever held requests are due; returns how many moved.
    fn run_timers(&mut self) -> usize {
        if self.held.is_empty() && self.throttled.iter().all(|(q, _)| q.is_empty()) {
            return 0;
        }
        let now = stages::now();
        let mut n = 0;
        while let Some(Reverse((at, tag))) = self.held.peek().copied() {
            if at > now {
                break;
            }
            self.held.pop();
            let (stage, offset) = (
                self.slots[tag as usize].stage,
                self.slots[tag as usize].offset,
            );
            self.advance(tag, stage, offset);
            n += 1;
        }
        for stage in 0..self.throttled.len() {
            while let Some(&tag) = self.throttled[stage].0.front() {
                if self.throttled[stage].1 > now {
                    break;
                }
                let Stage::Throttle(t) = &self.graph.stages[stage] else {
                    break;
                };
                let s = &self.slots[tag as usize];
                match t.admit(s.op.unwrap_or(Op::Flush), s.len, now) {
                    Verdict::HoldUntil(at) => {
                        self.throttled[stage].1 = at;
                        break;
                    }
                    Verdict::Pass | Verdict::Fail(_) | Verdict::Done(_) => {
                        self.throttled[stage].0.pop_front();
                        let offset = self.slots[tag as usize].offset;
                        self.advance(tag, stage + 1, offset);
                        n += 1;
                    }
                }
            }
        }
        n
    }

    /// Completes a claimed request (at the leaf or before it): copies a
    /// bounced read back to the guest, counts it, and queues its completion.
    fn complete(&mut self, tag: u32, mut result: i32) {
        let pool = self.leaf.bounce_pool();
        let slot = &mut self.slots[tag as usize];
        if let Some(mut bb) = slot.bounce.take() {
            if slot.op == Some(Op::Read) && result == 0 {
                if let Some(ram) = &slot.ram {
                    let src = bb.bytes_mut();
                    let mut at = 0;
                    for s in &slot.segs {
                        match ram.ram().buf(s) {
                            Ok(b) => at += b.copy_from(&src[at..]),
                            Err(_) => result = -libc::EFAULT,
                        }
                    }
                }
            }
            pool.put(bb);
        }
        if let Some(z) = &self.graph.zoned {
            // Record a reserved write in the zone state (after its data,
            // never before), and make the zone state durable once the data
            // is: after a FUA write, after the leaf's flush.
            let ok = result == 0;
            let mut recorded = Ok(());
            if let Some(t) = slot.zone.take() {
                recorded = z.layer.end_write(&t, ok);
            }
            if ok && (slot.flags & FLAG_FUA != 0 || slot.op == Some(Op::Flush)) {
                recorded = recorded.and_then(|()| z.layer.sync());
            }
            if let Err(e) = recorded {
                if ok {
                    result = e.ring_result();
                }
            }
        }
        record(&self.root_stats, &self.leaf_stats, slot, result);
        slot.busy = false;
        slot.split = false;
        slot.ram = None;
        let extra = if result == 0 { slot.extra } else { 0 };
        self.inflight -= 1;
        self.done.push(Completion { tag, result, extra });
    }

    /// The leaf is done with a request: the null leaf may still hold it for
    /// its latency.
    fn leaf_done(&mut self, tag: u32, result: i32) {
        if !self.leaf.hold(tag as usize, result) {
            self.complete(tag, result);
        }
    }

    /// Hands a request that passed every stage to the protocol leaf.
    fn submit_leaf(&mut self, tag: u32, offset: u64) {
        let t = tag as usize;
        if let Some(leaf) = &self.leaf_stats {
            self.slots[t].leaf_start = Some(Instant::now());
            leaf.started();
        }
        if self.slots[t].split {
            self.counters.split += 1;
            let p = &mut self.slots[t].parts;
            p.cur = Cursor::default();
            p.base = offset;
            p.busy = 0;
            p.result = 0;
            self.pump(tag);
            return;
        }
        let slot = &mut self.slots[t];
        let req = LeafRequest {
            op: slot.op.unwrap_or(Op::Flush),
            flags: slot.flags,
            offset,
            len: slot.len,
        };
        let data = match (&mut slot.bounce, &slot.ram) {
            (Some(buf), _) => {
                let len = buf.len();
                Data::Bounce { buf, at: 0, len }
            }
            (None, Some(ram)) if self.leaf.takes_segments() => Data::Segments(&slot.segs, ram),
            (None, _) => Data::Iovecs(&slot.iovs),
        };
        let punch = self.graph.discard_punches_holes;
        match self.leaf.submit(&req, punch, data, t) {
            Ok(Issued::InFlight) => {}
            Ok(Issued::Done) => self.leaf_done(tag, 0),
            Err(errno) => self.complete(tag, errno.ring_result()),
        }
    }

    /// Hands out the next parts of a split request while it has free lanes;
    /// completes it once no part is in flight and either all were done or
    /// one failed (the first error wins).
    fn pump(&mut self, tag: u32) {
        let t = tag as usize;
        let lim = self.limits;
        let punch = self.graph.discard_punches_holes;
        let segments = self.leaf.takes_segments();
        loop {
            let slot = &mut self.slots[t];
            let op = slot.op.unwrap_or(Op::Flush);
            let p = &mut slot.parts;
            if p.result != 0 {
                break;
            }
            let Some(lane) = free_lane(p.busy) else {
                break;
            };
            // Cut the next part: out of the bounce buffer, out of the guest
            // segments (iovecs for the driver, segments for the null leaf),
            // or out of a discard / write-zeroes range.
            let cut = match (op, &mut slot.bounce, &slot.ram) {
                (Op::Read | Op::Write, Some(buf), _) => {
                    next_linear(slot.len, lim.max_transfer, &mut p.cur).map(|(at, n)| {
                        let (at, len) = (at as usize, n as usize);
                        (at as u64, n, Data::Bounce { buf, at, len })
                    })
                }
                (Op::Read | Op::Write, None, Some(ram)) if segments => {
                    let pieces = &mut self.null_segs;
                    next_vectored(&slot.segs, slot.len, &lim, &mut p.cur, pieces)
                        .map(|(at, n)| (at, n, Data::Segments(pieces, ram)))
                }
                (Op::Read | Op::Write, None, _) => {
                    let iovs = &mut p.iovs[lane];
                    next_vectored(&slot.iovs, slot.len, &lim, &mut p.cur, iovs)
                        .map(|(at, n)| (at, n, Data::Iovecs(iovs)))
                }
                (Op::Discard | Op::WriteZeroes, _, _) => {
                    let max = lim.max_range(op).unwrap_or(u64::MAX);
                    next_linear(slot.len, max, &mut p.cur).map(|(at, n)| (at, n, Data::None))
                }
                _ => None,
            };
            let Some((at, n, data)) = cut else {
                break;
            };
            let Some(offset) = part_offset(p.base, at, n) else {
                p.result = -libc::EINVAL;
                break;
            };
            self.counters.parts += 1;
            let req = LeafRequest {
                op,
                flags: slot.flags,
                offset,
                len: n,
            };
            // The null leaf does its part at once.
            match self.leaf.submit(&req, punch, data, part_user_data(t, lane)) {
                Ok(Issued::InFlight) => p.busy |= 1 << lane,
                Ok(Issued::Done) => {}
                Err(errno) => p.result = errno.ring_result(),
            }
        }
        let p = &self.slots[t].parts;
        if p.busy == 0 {
            let result = p.result;
            self.leaf_done(tag, result);
        }
    }

    /// A part of a split request came back.
    fn part_done(&mut self, tag: usize, lane: usize, result: i32) {
        let slot = &mut self.slots[tag];
        let bit = 1u8 << lane;
        if !slot.busy || !slot.split || slot.parts.busy & bit == 0 {
            return; // not ours (a confused driver); nothing to complete
        }
        slot.parts.busy &= !bit;
        if result != 0 && slot.parts.result == 0 {
            slot.parts.result = result;
        }
        self.pump(tag as u32);
    }

    /// Whether the driver may have completions to reap (checked without a
    /// syscall where possible).
    fn driver_has_completions(&mut self) -> bool {
        match self.leaf.due() {
            Some(due) => due,
            None => self.inflight > 0 && self.reap() > 0,
        }
    }

    /// Collects the leaf's completions; returns how many.
    fn reap(&mut self) -> usize {
        let mut reaped = std::mem::take(&mut self.reaped);
        self.leaf.reap(self.index, self.inflight > 0, &mut reaped);
        for c in &reaped {
            let (tag, lane) = (c.user_data & TAG_MASK, c.user_data >> LANE_SHIFT);
            if tag >= self.slots.len() || !self.slots[tag].busy || lane > LANES {
                continue;
            }
            let mut result = c.result;
            if self.slots[tag].op == Some(Op::Discard) && result == -libc::EOPNOTSUPP {
                // Discard is a hint: a device that cannot do it still
                // succeeds (as QEMU).
                result = 0;
            }
            if lane == 0 {
                self.complete(tag as u32, result);
            } else {
                self.part_done(tag, lane - 1, result);
            }
        }
        let n = reaped.len();
        self.reaped = reaped;
        n
    }

    fn post_completions(&mut self) {
        if self.corrupted {
            // The test hook broke the ring: keep it broken.
            self.done.clear();
            return;
        }
        self.posted += self.done.len() as u64;
        let last = self.done.last().copied();
        for c in self.done.drain(..) {
            if let Err(e) = self.tx.push(c) {
                tracing::error!(queue = self.index, "completion ring: {e}");
            }
        }
        match crate::test_hooks::corruption_due(self.posted) {
            None => {}
            Some(Corruption::Index) => {
                tracing::warn!(
                    queue = self.index,
                    "test fault hook: corrupt completion index"
                );
                self.tx.publish_corrupt_index();
                self.corrupted = true;
                self.need_kick = true;
                return;
            }
            Some(Corruption::Tag) => {
                if let Some(c) = last {
                    tracing::warn!(
                        queue = self.index,
                        tag = c.tag,
                        "test fault hook: completion repeated"
                    );
                    let _ = self.tx.push(c);
                }
            }
        }
        self.need_kick |= self.tx.publish();
    }

    fn kick_frontend(&mut self) {
        if std::mem::take(&mut self.need_kick) {
            self.call.ring();
        }
    }
}

/// How soon a write to a busy zone of a zoned device is tried again.
const ZONE_RETRY_NS: u64 = 20_000;

/// The zone layer's part of a request at its stage: reserve a write (an
/// append learns where it lands and becomes a write there), answer a report
/// or a management request.
fn zone_step(
    layer: &ZoneLayer,
    access: Option<&ZoneAccess>,
    slot: &mut Slot,
    offset: &mut u64,
    views: &mut Vec<ZoneView>,
    buf: &mut Vec<u8>,
) -> Verdict {
    let Some(access) = access else {
        return Verdict::Fail(libc::EIO);
    };
    let op = slot.op.unwrap_or(Op::Flush);
    let done =
        |r: Result<(), ZoneError>| Verdict::Done(r.map_or_else(ZoneError::ring_result, |()| 0));
    match op {
        // A flush syncs the zone state once the leaf flushed (`complete`).
        Op::Read | Op::GetId | Op::Flush => Verdict::Pass,
        Op::Discard => Verdict::Fail(libc::EOPNOTSUPP),
        Op::Write | Op::WriteZeroes | Op::ZoneAppend => {
            let kind = if op == Op::ZoneAppend {
                WriteKind::Append
            } else {
                WriteKind::Write
            };
            match layer.begin_write(kind, *offset, slot.len) {
                Ok(t) => {
                    *offset = t.offset;
                    if op == Op::ZoneAppend {
                        slot.op = Some(Op::Write);
                        slot.extra = t.offset - access.shift;
                    }
                    slot.zone = Some(t);
                    Verdict::Pass
                }
                Err(ZoneError::Busy) => Verdict::HoldUntil(stages::now() + ZONE_RETRY_NS),
                Err(e) => Verdict::Done(e.ring_result()),
            }
        }
        Op::ZoneReport => {
            let zone = (*offset / layer.geometry().zone_size) as u32;
            let room = usize::try_from(slot.len).unwrap_or(usize::MAX);
            views.clear();
            let end = access.first + access.count;
            if let Err(e) = layer.report(zone, end, room.saturating_sub(64) / 64, views) {
                return Verdict::Done(e.ring_result());
            }
            let n = zoned::encode_report(views, access.shift, room, buf);
            let Some(ram) = &slot.ram else {
                return Verdict::Fail(libc::EFAULT);
            };
            let mut at = 0;
            for s in &slot.segs {
                if at == n {
                    break;
                }
                match ram.ram().buf(s) {
                    Ok(b) => at += b.copy_from(&buf[at..n]),
                    Err(_) => return Verdict::Fail(libc::EFAULT),
                }
            }
            slot.extra = n as u64;
            Verdict::Done(0)
        }
        Op::ZoneOpen | Op::ZoneClose | Op::ZoneFinish | Op::ZoneReset => {
            let action = match op {
                Op::ZoneOpen => Action::Open,
                Op::ZoneClose => Action::Close,
                Op::ZoneFinish => Action::Finish,
                _ => Action::Reset,
            };
            done(layer.manage(action, *offset).map(|_| ()))
        }
        Op::ZoneResetAll => done(layer.reset_all(access.zones())),
    }
}

/// Counts a finished request at the root and, if it got there, the leaf.
fn record(root: &IoCounters, leaf: &Option<Arc<IoCounters>>, slot: &Slot, result: i32) {
    let kind = kind_of(slot.op.unwrap_or(Op::Flush));
    let ok = result == 0;
    if let Some(t) = slot.start {
        root.finished(kind, slot.len, ok, t.elapsed().as_nanos() as u64);
    }
    if let (Some(t), Some(leaf)) = (slot.leaf_start, leaf) {
        leaf.finished(kind, slot.len, ok, t.elapsed().as_nanos() as u64);
    }
}

#[cfg(test)]
mod tests;
