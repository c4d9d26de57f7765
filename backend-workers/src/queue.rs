//! One virtqueue's event loop in the worker.
//!
//! The loop takes requests from the ring, validates them against the graph's
//! limits and this worker's own mapping of guest RAM, runs them through the
//! graph's stages (windows, fault injection, throttling), submits vectored
//! I/O to its own libblkio queue, and posts completions back. When it runs
//! out of work it polls briefly, then sleeps after announcing it on the ring
//! so the frontend knows to kick it; likewise it kicks the frontend only when
//! the frontend has said it sleeps.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::poll::Poller;
use blkmesh_ipc::ring::{
    Completion, CompletionSender, Op, QueueRings, Received, Request, RequestReceiver, Segment,
    FLAG_FUA, FLAG_NO_UNMAP,
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::bounce::{BounceBuf, BouncePool};
use crate::graph::{Leaf, OpenedGraph, QueuePool};
use crate::memory::RegisteredRam;
use crate::stages::{self, Stage, Verdict};
use blkmesh_stats::{IoCounters, OpKind};

const EV_KICK: u64 = 0;
const EV_IO: u64 = 1;
const EV_STOP: u64 = 2;

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
    stop_fd: Doorbell,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QueueHandle {
    /// Stops the loop once its in-flight requests have completed and waits
    /// for it.
    pub fn stop(mut self) {
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
    #[error("creating the libblkio queue: {0}")]
    Blkio(String),
    #[error("no libblkio queue left for this virtqueue")]
    NoQueue,
    #[error("event loop setup")]
    Io(#[source] std::io::Error),
}

/// Starts the event loop of one queue on its own thread.
pub fn spawn(setup: QueueSetup) -> Result<QueueHandle, QueueError> {
    let io = match &setup.graph.leaf {
        Leaf::Blkio { blkio, pool, .. } => {
            let q = match pool {
                Some(pool) => pool
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop()
                    .ok_or(QueueError::NoQueue)?,
                None => blkio
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add_queue(false)
                    .map_err(|e| QueueError::Blkio(e.message().to_string()))?,
            };
            Backend::Blkio {
                q: Some(q),
                pool: pool.clone(),
                bounce: BouncePool::new(Arc::clone(blkio)),
            }
        }
        Leaf::Null { latency } => Backend::Null {
            latency: *latency,
            pending: VecDeque::new(),
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stop_fd = Doorbell::new().map_err(QueueError::Io)?;
    let lp = QueueLoop::new(
        setup,
        io,
        Arc::clone(&stop),
        stop_fd.try_clone().map_err(QueueError::Io)?,
    );
    let thread = std::thread::Builder::new()
        .name(format!("q{}", lp.index))
        .spawn(move || lp.run())
        .map_err(QueueError::Io)?;
    Ok(QueueHandle {
        stop,
        stop_fd,
        thread: Some(thread),
    })
}

enum Backend {
    Blkio {
        /// Always `Some` while the loop runs; taken back into the pool.
        q: Option<blkio::Blkioq>,
        pool: Option<QueuePool>,
        bounce: BouncePool,
    },
    Null {
        latency: Duration,
        pending: VecDeque<(Instant, Completion)>,
    },
}

impl Drop for Backend {
    fn drop(&mut self) {
        // A driver that cannot add queues gets its queue back for the next
        // attach of this virtqueue.
        if let Backend::Blkio {
            q,
            pool: Some(pool),
            ..
        } = self
        {
            if let Some(q) = q.take() {
                pool.lock().unwrap_or_else(|p| p.into_inner()).push(q);
            }
        }
    }
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
    /// Set when the guest buffers break the driver's alignment.
    bounce: Option<BounceBuf>,
    /// When the request arrived, and when it reached the leaf.
    start: Option<Instant>,
    leaf_start: Option<Instant>,
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
    shared_ram: SharedRam,
    io: Backend,
    stop: Arc<AtomicBool>,
    stop_fd: Doorbell,
    slots: Vec<Slot>,
    inflight: usize,
    done: Vec<Completion>,
    blkio_done: Vec<MaybeUninit<blkio::Completion>>,
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
    poller: Poller,
    /// This thread's counters at the root node and the leaf (`None` when
    /// the root is the leaf).
    root_stats: Arc<IoCounters>,
    leaf_stats: Option<Arc<IoCounters>>,
    _rings: QueueRings,
}

// SAFETY: Blkioq is Send (its driver queue is Send + Sync); the rest are owned
// values. The loop is moved once into its thread.
unsafe impl Send for QueueLoop {}

impl QueueLoop {
    fn new(setup: QueueSetup, io: Backend, stop: Arc<AtomicBool>, stop_fd: Doorbell) -> Self {
        let (rx, tx) = setup.rings.worker_end();
        let entries = setup.rings.layout().entries() as usize;
        let stages = setup.graph.stages.len();
        let root_stats = crate::stats().node(&setup.graph.root_node);
        let leaf_stats = (setup.graph.root_node != setup.graph.leaf_node)
            .then(|| crate::stats().node(&setup.graph.leaf_node));
        QueueLoop {
            index: setup.index,
            rx,
            tx,
            kick: setup.kick,
            call: setup.call,
            graph: setup.graph,
            shared_ram: setup.ram,
            io,
            stop,
            stop_fd,
            slots: (0..entries).map(|_| Slot::default()).collect(),
            inflight: 0,
            done: Vec::with_capacity(entries),
            blkio_done: (0..entries).map(|_| MaybeUninit::uninit()).collect(),
            errors_logged: 0,
            segs: Vec::with_capacity(setup.rings.layout().max_segments() as usize),
            held: BinaryHeap::new(),
            throttled: (0..stages).map(|_| (VecDeque::new(), 0)).collect(),
            need_kick: false,
            poller: Poller::from_env(),
            root_stats,
            leaf_stats,
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
                    EV_IO => {
                        if let Backend::Blkio { q: Some(q), .. } = &self.io {
                            if let Some(fd) = q.get_completion_fd() {
                                let mut buf = [0u8; 8];
                                // SAFETY: reading 8 bytes into a local buffer
                                // from the libblkio queue's non-blocking eventfd.
                                unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
                            }
                        }
                    }
                    _ => {
                        self.stop_fd.clear();
                    }
                }
            }
        }
        self.kick_frontend();
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
        if let Backend::Blkio { q: Some(q), .. } = &mut self.io {
            q.set_completion_fd_enabled(true);
            if let Some(fd) = q.get_completion_fd() {
                // SAFETY: the fd belongs to the libblkio queue, which lives as
                // long as this loop (and so as long as the epoll set).
                let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
                epoll.add(bfd, EpollEvent::new(EpollFlags::EPOLLIN, EV_IO))?;
            }
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
        let null = match &self.io {
            Backend::Null { pending, .. } => pending.front().map(|(d, _)| {
                let left = d.saturating_duration_since(Instant::now()).as_nanos() as u64;
                stages::now() + left
            }),
            Backend::Blkio { .. } => None,
        };
        [held, throttled, null].into_iter().flatten().min()
    }

    fn timer_due(&self) -> bool {
        self.next_deadline().is_some_and(|d| d <= stages::now())
    }

    fn next_timer(&self) -> EpollTimeout {
        match self.next_deadline() {
            None => EpollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_sub(stages::now());
                // Round up so we do not wake just before the deadline.
                let ms = left.div_ceil(1_000_000).min(1000) as u16;
                EpollTimeout::from(ms)
            }
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

    /// Starts one request; Err(errno) fails it at once (nothing held).
    fn start(
        &mut self,
        req: &Request,
        segs: &[Segment],
        ram: &Arc<RegisteredRam>,
    ) -> Result<(), i32> {
        let writes = matches!(
            req.op,
            Op::Write | Op::Discard | Op::WriteZeroes | Op::ZoneAppend
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
            | Op::ZoneAppend => return Err(libc::EOPNOTSUPP),
        }
        self.prepare(req, segs, ram)?;
        self.advance(req.tag, 0, req.offset);
        Ok(())
    }

    /// Claims the slot and turns data segments into iovecs over guest RAM
    /// now, while `ram` is the table the segments refer to.
    fn prepare(
        &mut self,
        req: &Request,
        segs: &[Segment],
        ram: &Arc<RegisteredRam>,
    ) -> Result<(), i32> {
        let buf_align = self.graph.limits.buf_alignment.max(1) as usize;
        let bounce_pool = match &mut self.io {
            Backend::Blkio { bounce, .. } => Some(bounce),
            Backend::Null { .. } => None,
        };
        let slot = &mut self.slots[req.tag as usize];
        slot.iovs.clear();
        slot.segs.clear();
        if matches!(req.op, Op::Read | Op::Write) {
            let mut aligned = true;
            for s in segs {
                let b = ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
                aligned &= (b.as_ptr() as usize) % buf_align == 0 && b.len() % buf_align == 0;
                slot.iovs.push(b.iovec());
            }
            slot.segs.extend_from_slice(segs);
            if !aligned {
                if let Some(pool) = bounce_pool {
                    let mut bb = pool
                        .get(req.len as usize)
                        .map_err(|e| e.errno().raw_os_error())?;
                    if req.op == Op::Write {
                        let dst = bb.bytes_mut();
                        let mut at = 0;
                        for s in segs {
                            let b = ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
                            at += b.copy_to(&mut dst[at..]);
                        }
                    }
                    slot.bounce = Some(bb);
                }
            }
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
            };
            match verdict {
                Verdict::Pass => stage += 1,
                Verdict::Fail(errno) => {
                    self.finish(tag, -errno);
                    return;
                }
                Verdict::HoldUntil(at) => {
                    let slot = &mut self.slots[tag as usize];
                    slot.offset = offset;
                    if matches!(self.graph.stages[stage], Stage::Throttle(_)) {
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
                    Verdict::Pass | Verdict::Fail(_) => {
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

    /// Completes a claimed request without the driver.
    fn finish(&mut self, tag: u32, result: i32) {
        self.record(tag, result);
        let slot = &mut self.slots[tag as usize];
        if let (Some(bb), Backend::Blkio { bounce, .. }) = (slot.bounce.take(), &mut self.io) {
            bounce.put(bb);
        }
        slot.busy = false;
        slot.ram = None;
        self.inflight -= 1;
        self.done.push(Completion {
            tag,
            result,
            extra: 0,
        });
    }

    fn record(&self, tag: u32, result: i32) {
        record(
            &self.root_stats,
            &self.leaf_stats,
            &self.slots[tag as usize],
            result,
        );
    }

    /// Hands a request that passed every stage to the protocol leaf.
    fn submit_leaf(&mut self, tag: u32, offset: u64) {
        let t = tag as usize;
        if let Some(leaf) = &self.leaf_stats {
            self.slots[t].leaf_start = Some(Instant::now());
            leaf.started();
        }
        let (op, flags, len) = {
            let s = &self.slots[t];
            (s.op.unwrap_or(Op::Flush), s.flags, s.len)
        };
        let fua = if flags & FLAG_FUA != 0 {
            blkio::ReqFlags::FUA
        } else {
            blkio::ReqFlags::empty()
        };
        match &mut self.io {
            Backend::Null { latency, pending } => {
                let mut result = 0;
                if op == Op::Read {
                    let slot = &self.slots[t];
                    if let Some(ram) = &slot.ram {
                        if zero_fill(ram, &slot.segs).is_err() {
                            result = -libc::EFAULT;
                        }
                    }
                }
                if latency.is_zero() || result != 0 {
                    self.finish(tag, result);
                } else {
                    pending.push_back((
                        Instant::now() + *latency,
                        Completion {
                            tag,
                            result: 0,
                            extra: 0,
                        },
                    ));
                }
            }
            Backend::Blkio { q: Some(q), .. } => {
                let slot = &self.slots[t];
                match op {
                    Op::Read | Op::Write => match &slot.bounce {
                        None => {
                            let (ptr, n) = (slot.iovs.as_ptr(), slot.iovs.len() as u32);
                            if op == Op::Read {
                                q.readv(offset, ptr, n, t, fua);
                            } else {
                                q.writev(offset, ptr, n, t, fua);
                            }
                        }
                        Some(bb) => {
                            if op == Op::Read {
                                q.read(offset, bb.as_ptr(), bb.len(), t, fua);
                            } else {
                                q.write(offset, bb.as_ptr(), bb.len(), t, fua);
                            }
                        }
                    },
                    Op::Flush => q.flush(t, blkio::ReqFlags::empty()),
                    Op::Discard if self.graph.discard_punches_holes => {
                        // Write-zeroes that may unmap: a hole punch on files.
                        q.write_zeroes(offset, len, t, blkio::ReqFlags::empty())
                    }
                    Op::Discard => q.discard(offset, len, t, blkio::ReqFlags::empty()),
                    Op::WriteZeroes => {
                        let mut f = fua;
                        if flags & FLAG_NO_UNMAP != 0 {
                            f |= blkio::ReqFlags::NO_UNMAP;
                        }
                        q.write_zeroes(offset, len, t, f)
                    }
                    _ => {
                        self.finish(tag, -libc::EOPNOTSUPP);
                    }
                }
            }
            Backend::Blkio { q: None, .. } => self.finish(tag, -libc::EIO),
        }
    }

    /// Whether the driver may have completions to reap (checked without a
    /// syscall where possible).
    fn driver_has_completions(&mut self) -> bool {
        match &self.io {
            Backend::Blkio { .. } => self.inflight > 0 && self.reap() > 0,
            Backend::Null { pending, .. } => {
                pending.front().is_some_and(|(d, _)| *d <= Instant::now())
            }
        }
    }

    /// Collects driver completions; returns how many.
    fn reap(&mut self) -> usize {
        match &mut self.io {
            Backend::Blkio {
                q: Some(q), bounce, ..
            } => {
                if self.inflight == 0 {
                    return 0;
                }
                let n = match q.do_io(&mut self.blkio_done, 0, None, None) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(queue = self.index, "libblkio do_io: {}", e.message());
                        0
                    }
                };
                for c in &self.blkio_done[..n] {
                    // SAFETY: do_io initialized the first n entries.
                    let c = unsafe { c.assume_init_read() };
                    let tag = c.user_data;
                    if tag >= self.slots.len() {
                        continue;
                    }
                    let mut result = c.ret;
                    if self.slots[tag].op == Some(Op::Discard) && result == -libc::EOPNOTSUPP {
                        // Discard is a hint: a device that cannot do it
                        // still succeeds (as QEMU).
                        result = 0;
                    }
                    record(&self.root_stats, &self.leaf_stats, &self.slots[tag], result);
                    let slot = &mut self.slots[tag];
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
                        bounce.put(bb);
                    }
                    slot.busy = false;
                    slot.ram = None;
                    self.inflight -= 1;
                    self.done.push(Completion {
                        tag: tag as u32,
                        result,
                        extra: 0,
                    });
                }
                n
            }
            Backend::Blkio { q: None, .. } => 0,
            Backend::Null { pending, .. } => {
                let now = Instant::now();
                let mut due = Vec::new();
                while pending.front().is_some_and(|(d, _)| *d <= now) {
                    if let Some((_, c)) = pending.pop_front() {
                        due.push(c);
                    }
                }
                let n = due.len();
                for c in due {
                    self.finish(c.tag, c.result);
                }
                n
            }
        }
    }

    fn post_completions(&mut self) {
        for c in self.done.drain(..) {
            if let Err(e) = self.tx.push(c) {
                tracing::error!(queue = self.index, "completion ring: {e}");
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

fn zero_fill(ram: &RegisteredRam, segs: &[Segment]) -> Result<(), i32> {
    static ZEROES: [u8; 4096] = [0; 4096];
    for s in segs {
        let mut seg = *s;
        while seg.len > 0 {
            let chunk = seg.len.min(ZEROES.len() as u32);
            let b = ram
                .ram()
                .buf(&Segment { len: chunk, ..seg })
                .map_err(|_| libc::EFAULT)?;
            b.copy_from(&ZEROES[..chunk as usize]);
            seg.offset += chunk as u64;
            seg.len -= chunk;
        }
    }
    Ok(())
}
