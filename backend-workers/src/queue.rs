//! One virtqueue's event loop in the worker.
//!
//! The loop takes requests from the ring, validates them against the graph's
//! limits ([`crate::checks`]) and this worker's own mapping of guest RAM,
//! runs them through the graph's stages ([`crate::pipeline`]), submits
//! vectored I/O to its own side of the leaf ([`crate::leaf`]), and posts
//! completions back. A request that breaks the graph's limits reaches the
//! leaf in parts (at most [`crate::split::LANES`] in flight) and is
//! completed once, when all are back; guest buffers that break the buffer
//! alignment go through a bounce buffer (`queue/submit.rs`). When it runs
//! out of work it polls briefly, then sleeps after announcing it on the ring
//! so the frontend knows to kick it; likewise it kicks the frontend only when
//! the frontend has said it sleeps.
//!
//! Every loop iteration beats the ring's heartbeat, and while requests are
//! in flight the loop never sleeps longer than [`HEARTBEAT_INTERVAL`]: the
//! frontend takes a worker for hung only when requests are in flight and
//! the heartbeat stopped, so a request held for long by a throttle or a
//! delay does not get a live worker fenced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::poll::{Poller, Wait};
use blkmesh_ipc::ring::{
    Completion, CompletionSender, Op, QueueRings, Received, Request, RequestReceiver, Segment,
    FLAG_FUA, HEARTBEAT_INTERVAL,
};
use blkmesh_stats::IoCounters;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::checks::check_request;
use crate::errno::Errno;
use crate::graph::OpenedGraph;
use crate::leaf::{guest_iovecs, AttachError, LeafCompletion, LeafQueue};
use crate::memory::RegisteredRam;
use crate::pipeline::Pipeline;
use crate::slot::{InFlight, Slot, SplitProgress, TagBuffers};
use crate::split::SplitLimits;
use crate::stages;
use crate::test_hooks::Corruption;

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

/// What happened to requests outside the limits, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SplitCounters {
    /// Requests cut into parts, and the parts.
    split: u64,
    parts: u64,
    /// Requests that went through a bounce buffer.
    bounced: u64,
}

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
    /// Per tag, the memory its requests reuse.
    buffers: Vec<TagBuffers>,
    inflight: usize,
    done: Vec<Completion>,
    /// What the leaf finished, as [`LeafQueue::reap`] hands it over.
    reaped: Vec<LeafCompletion>,
    errors_logged: u32,
    /// Scratch copy of the current request's segments.
    segs: Vec<Segment>,
    /// What the stages hold, and their scratch space.
    pipeline: Pipeline,
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
            slots: (0..entries).map(|_| Slot::Free).collect(),
            buffers: (0..entries).map(|_| TagBuffers::default()).collect(),
            inflight: 0,
            done: Vec::with_capacity(entries),
            reaped: Vec::with_capacity(entries),
            errors_logged: 0,
            segs: Vec::with_capacity(setup.rings.layout().max_segments() as usize),
            pipeline: Pipeline::new(stages),
            need_kick: false,
            posted: 0,
            corrupted: false,
            poller: Poller::from_env(blkmesh_ipc::poll::DEFAULT_PEER_MAX),
            root_stats,
            leaf_stats,
            _rings: setup.rings,
        }
    }

    fn run(mut self) {
        match blkmesh_ipc::placement::place_queue_thread(self.index) {
            Ok(cpu) => tracing::debug!(queue = self.index, ?cpu, "queue thread placed"),
            Err(e) => tracing::warn!(queue = self.index, "{e}; the queue runs unplaced"),
        }
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
            let wait = Wait::with_inflight(self.inflight);
            if !stopping {
                let mut poller = self.poller;
                let found = poller.poll(wait, || {
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
            self.poller.slept(wait, idle_since.elapsed());
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
        let held = self.pipeline.waiting.next_deadline();
        let leaf = self.leaf.next_due().map(|d| {
            let left = d.saturating_duration_since(Instant::now()).as_nanos() as u64;
            stages::now() + left
        });
        [held, leaf].into_iter().flatten().min()
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
                        if !self.slots[tag as usize].is_busy() {
                            self.done.push(Completion {
                                tag,
                                result: Errno::EINVAL.ring_result(),
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
            if self.slots[req.tag as usize].is_busy() {
                // A tag reused while in flight: the frontend is broken. The
                // original request still owns the slot; drop the duplicate.
                self.log_guest_error(format_args!("tag {} reused while in flight", req.tag));
                continue;
            }
            if let Err(errno) = self.start(&req, &segs, &ram) {
                self.done.push(Completion {
                    tag: req.tag,
                    result: errno.ring_result(),
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

    /// Starts one request; Err(errno) fails it at once (nothing held).
    fn start(
        &mut self,
        req: &Request,
        segs: &[Segment],
        ram: &Arc<RegisteredRam>,
    ) -> Result<(), Errno> {
        check_request(&self.graph, req)?;
        if req.op == Op::GetId {
            let buf = ram.ram().buf(&segs[0]).map_err(|_| Errno::EFAULT)?;
            buf.copy_from(&self.graph.serial);
            self.done.push(Completion {
                tag: req.tag,
                result: 0,
                extra: 0,
            });
            return Ok(());
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
    ) -> Result<(), Errno> {
        let lim = &self.limits;
        let bufs = &mut self.buffers[req.tag as usize];
        bufs.iovs.clear();
        bufs.segs.clear();
        let mut split = false;
        let mut bounce = None;
        match req.op {
            Op::Read | Op::Write | Op::ZoneAppend => {
                let bits = guest_iovecs(ram, segs, &mut bufs.iovs)?;
                bufs.segs.extend_from_slice(segs);
                split = lim.data_needs_split(req.len, segs.len());
                let misaligned = (bits.addr | bits.len) & lim.buf_mask != 0;
                if misaligned || (split && !lim.segments_cuttable(bits.len)) {
                    let mut bb = self
                        .leaf
                        .bounce_pool()
                        .get(req.len as usize)
                        .map_err(|e| Errno::of_blkio(&e))?;
                    if req.op != Op::Read {
                        bb.copy_from_guest(ram, segs)?;
                    }
                    bounce = Some(bb);
                    // One contiguous buffer: only the length can be too much.
                    split = req.len > lim.max_transfer;
                    self.counters.bounced += 1;
                }
            }
            Op::Discard | Op::WriteZeroes => {
                split = lim.max_range(req.op).is_some_and(|max| req.len > max);
            }
            Op::ZoneReport => {
                for s in segs {
                    ram.ram().buf(s).map_err(|_| Errno::EFAULT)?;
                }
                bufs.segs.extend_from_slice(segs);
            }
            _ => {}
        }
        self.slots[req.tag as usize] = Slot::Busy(InFlight {
            op: req.op,
            flags: req.flags,
            len: req.len,
            stage: 0,
            offset: req.offset,
            ram: Arc::clone(ram),
            bounce,
            start: Instant::now(),
            leaf_start: None,
            split,
            parts: SplitProgress::default(),
            extra: 0,
            zone: None,
            qcow2_written: None,
        });
        self.root_stats.started();
        self.inflight += 1;
        Ok(())
    }

    /// Completes a claimed request (at the leaf or before it): copies a
    /// bounced read back to the guest, counts it, and queues its completion.
    fn complete(&mut self, tag: u32, mut result: i32) {
        let Some(mut r) = self.slots[tag as usize].take() else {
            return;
        };
        if let Some(mut bb) = r.bounce.take() {
            if r.op == Op::Read && result == 0 {
                let segs = &self.buffers[tag as usize].segs;
                if let Err(errno) = bb.copy_to_guest(&r.ram, segs) {
                    result = errno.ring_result();
                }
            }
            self.leaf.bounce_pool().put(bb);
        }
        if let Some(z) = &self.graph.zoned {
            // Record a reserved write in the zone state (after its data,
            // never before), and make the zone state durable once the data
            // is: after a FUA write, after the leaf's flush.
            let ok = result == 0;
            let mut recorded = Ok(());
            if let Some(t) = r.zone.take() {
                recorded = z.layer.end_write(&t, ok);
            }
            if ok && (r.flags & FLAG_FUA != 0 || r.op == Op::Flush) {
                recorded = recorded.and_then(|()| z.layer.sync());
            }
            if let Err(e) = recorded {
                if ok {
                    result = e.ring_result();
                }
            }
        }
        if let (0, Some(at)) = (result, r.qcow2_written) {
            if let Some(layer) = self.graph.qcow2() {
                layer.written(at, r.len);
            }
        }
        record(&self.root_stats, &self.leaf_stats, &r, result);
        let extra = if result == 0 { r.extra } else { 0 };
        self.inflight -= 1;
        self.done.push(Completion { tag, result, extra });
    }

    fn post_completions(&mut self) {
        if self.corrupted {
            // The test hook broke the ring: keep it broken.
            self.done.clear();
            return;
        }
        // Metadata the completed requests changed reaches the file before
        // their completions do (qcow2: see `qcow2.rs`).
        if let Err((errno, tags)) = self.pipeline.write_back() {
            tracing::error!(
                queue = self.index,
                "qcow2 metadata write-back failed: {errno:?}"
            );
            for c in self.done.iter_mut().filter(|c| tags.contains(&c.tag)) {
                if c.result == 0 {
                    c.result = errno.ring_result();
                }
            }
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

/// Counts a finished request at the root and, if it got there, the leaf.
fn record(root: &IoCounters, leaf: &Option<Arc<IoCounters>>, r: &InFlight, result: i32) {
    let kind = r.kind();
    let ok = result == 0;
    root.finished(kind, r.len, ok, r.start.elapsed().as_nanos() as u64);
    if let (Some(t), Some(leaf)) = (r.leaf_start, leaf) {
        leaf.finished(kind, r.len, ok, t.elapsed().as_nanos() as u64);
    }
}

mod submit;
#[cfg(test)]
mod tests;
