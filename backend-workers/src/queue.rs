//! One virtqueue's event loop in the worker.
//!
//! The loop takes requests from the ring, validates them against the graph's
//! limits and this worker's own mapping of guest RAM, submits vectored I/O to
//! its own libblkio queue, and posts completions back. It sleeps only when the
//! ring is empty and nothing has completed, after announcing it on the ring so
//! that the frontend knows to kick it; likewise it kicks the frontend only when
//! the frontend has said it sleeps.

use std::collections::VecDeque;
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
use crate::graph::{Leaf, OpenedGraph};
use crate::memory::RegisteredRam;

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
        self.stop.store(true, Ordering::Release);
        self.stop_fd.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.stop_fd.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("creating the libblkio queue: {0}")]
    Blkio(String),
    #[error("event loop setup")]
    Io(#[source] std::io::Error),
}

/// Starts the event loop of one queue on its own thread.
pub fn spawn(setup: QueueSetup) -> Result<QueueHandle, QueueError> {
    let io = match &setup.graph.leaf {
        Leaf::IoUring(b) => {
            let q = b
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add_queue(false)
                .map_err(|e| QueueError::Blkio(e.message().to_string()))?;
            Backend::IoUring {
                q,
                bounce: BouncePool::new(Arc::clone(b)),
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
    IoUring {
        q: blkio::Blkioq,
        bounce: BouncePool,
    },
    Null {
        latency: Duration,
        pending: VecDeque<(Instant, Completion)>,
    },
}

/// Per-tag state of an in-flight request.
#[derive(Default)]
struct Slot {
    busy: bool,
    /// Discard is a hint: a device that cannot do it still succeeds (as QEMU).
    discard: bool,
    /// Keeps the guest mapping alive while the driver holds our iovecs.
    ram: Option<Arc<RegisteredRam>>,
    /// The iovec array handed to libblkio; stable until completion.
    iovs: Vec<libc::iovec>,
    /// For bounced reads: where to copy the data back.
    bounce: Option<(BounceBuf, bool)>,
    segs: Vec<Segment>,
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
    /// Completions were published while the frontend slept.
    need_kick: bool,
    poller: Poller,
    _rings: QueueRings,
}

// SAFETY: Blkioq is Send (its driver queue is Send + Sync); the rest are owned
// values. The loop is moved once into its thread.
unsafe impl Send for QueueLoop {}

impl QueueLoop {
    fn new(setup: QueueSetup, io: Backend, stop: Arc<AtomicBool>, stop_fd: Doorbell) -> Self {
        let (rx, tx) = setup.rings.worker_end();
        let entries = setup.rings.layout().entries() as usize;
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
            need_kick: false,
            poller: Poller::from_env(),
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
                let found = poller.poll(|| self.rx.has_new() || self.driver_has_completions());
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
                        if let Backend::IoUring { q, .. } = &self.io {
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
        tracing::debug!(queue = self.index, "queue loop stopped");
    }

    fn epoll(&mut self) -> nix::Result<Epoll> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&self.kick, EpollEvent::new(EpollFlags::EPOLLIN, EV_KICK))?;
        epoll.add(&self.stop_fd, EpollEvent::new(EpollFlags::EPOLLIN, EV_STOP))?;
        if let Backend::IoUring { q, .. } = &mut self.io {
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

    fn next_timer(&self) -> EpollTimeout {
        match &self.io {
            Backend::Null { pending, .. } => match pending.front() {
                Some((deadline, _)) => {
                    let ms = deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(1000) as u16;
                    EpollTimeout::from(ms.max(if pending.is_empty() { 0 } else { 1 }))
                }
                None => EpollTimeout::NONE,
            },
            Backend::IoUring { .. } => EpollTimeout::NONE,
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

    fn check_range(&self, req: &Request) -> Result<u64, i32> {
        let l = &self.graph.limits;
        let end = req.offset.checked_add(req.len).ok_or(libc::EINVAL)?;
        if end > l.size {
            return Err(libc::EINVAL);
        }
        let align = l.request_alignment.max(1) as u64;
        if req.offset % align != 0 || req.len % align != 0 {
            return Err(libc::EINVAL);
        }
        Ok(self.graph.base + req.offset)
    }

    /// Starts one request; Err(errno) fails it at once.
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
                Ok(())
            }
            Op::Read | Op::Write => {
                let start = self.check_range(req)?;
                self.submit_rw(req, start, segs, ram)
            }
            Op::Flush => self.submit_simple(req, |q, tag| q.flush(tag, blkio::ReqFlags::empty())),
            Op::Discard => {
                let start = self.check_range(req)?;
                let len = req.len;
                if self.graph.discard_punches_holes {
                    // Write-zeroes that may unmap: a hole punch on files.
                    self.submit_simple(req, |q, tag| {
                        q.write_zeroes(start, len, tag, blkio::ReqFlags::empty())
                    })
                } else {
                    self.submit_simple(req, |q, tag| {
                        q.discard(start, len, tag, blkio::ReqFlags::empty())
                    })
                }
            }
            Op::WriteZeroes => {
                let start = self.check_range(req)?;
                let len = req.len;
                let mut flags = blkio::ReqFlags::empty();
                if req.flags & FLAG_NO_UNMAP != 0 {
                    flags |= blkio::ReqFlags::NO_UNMAP;
                }
                if req.flags & FLAG_FUA != 0 {
                    flags |= blkio::ReqFlags::FUA;
                }
                self.submit_simple(req, |q, tag| q.write_zeroes(start, len, tag, flags))
            }
            Op::ZoneReport
            | Op::ZoneOpen
            | Op::ZoneClose
            | Op::ZoneFinish
            | Op::ZoneReset
            | Op::ZoneResetAll
            | Op::ZoneAppend => Err(libc::EOPNOTSUPP),
        }
    }

    /// Ops without data: straight to the driver (or done for null).
    fn submit_simple(
        &mut self,
        req: &Request,
        f: impl FnOnce(&mut blkio::Blkioq, usize),
    ) -> Result<(), i32> {
        match &mut self.io {
            Backend::IoUring { q, .. } => {
                self.slots[req.tag as usize].busy = true;
                self.slots[req.tag as usize].discard = req.op == Op::Discard;
                self.inflight += 1;
                f(q, req.tag as usize);
            }
            Backend::Null { latency, pending } => {
                let c = Completion {
                    tag: req.tag,
                    result: 0,
                    extra: 0,
                };
                if latency.is_zero() {
                    self.done.push(c);
                } else {
                    self.slots[req.tag as usize].busy = true;
                    self.inflight += 1;
                    pending.push_back((Instant::now() + *latency, c));
                }
            }
        }
        Ok(())
    }

    fn submit_rw(
        &mut self,
        req: &Request,
        start: u64,
        segs: &[Segment],
        ram: &Arc<RegisteredRam>,
    ) -> Result<(), i32> {
        let tag = req.tag as usize;
        let is_read = req.op == Op::Read;
        let buf_align = self.graph.limits.buf_alignment.max(1) as usize;
        let slot = &mut self.slots[tag];
        slot.iovs.clear();
        let mut aligned = true;
        for s in segs {
            let b = ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
            aligned &= (b.as_ptr() as usize) % buf_align == 0 && b.len() % buf_align == 0;
            slot.iovs.push(b.iovec());
        }
        match &mut self.io {
            Backend::Null { latency, pending } => {
                if is_read {
                    zero_fill(ram, segs)?;
                }
                let c = Completion {
                    tag: req.tag,
                    result: 0,
                    extra: 0,
                };
                if latency.is_zero() {
                    self.done.push(c);
                } else {
                    slot.busy = true;
                    self.inflight += 1;
                    pending.push_back((Instant::now() + *latency, c));
                }
                Ok(())
            }
            Backend::IoUring { q, bounce } => {
                let flags = if req.flags & FLAG_FUA != 0 {
                    blkio::ReqFlags::FUA
                } else {
                    blkio::ReqFlags::empty()
                };
                if aligned {
                    let (ptr, n) = (slot.iovs.as_ptr(), slot.iovs.len() as u32);
                    if is_read {
                        q.readv(start, ptr, n, tag, flags);
                    } else {
                        q.writev(start, ptr, n, tag, flags);
                    }
                } else {
                    let mut bb = bounce
                        .get(req.len as usize)
                        .map_err(|e| e.errno().raw_os_error())?;
                    if !is_read {
                        let dst = bb.bytes_mut();
                        let mut at = 0;
                        for s in segs {
                            let b = ram.ram().buf(s).map_err(|_| libc::EFAULT)?;
                            at += b.copy_to(&mut dst[at..]);
                        }
                    }
                    let (ptr, len) = (bb.as_ptr(), bb.len());
                    if is_read {
                        q.read(start, ptr, len, tag, flags);
                    } else {
                        q.write(start, ptr, len, tag, flags);
                    }
                    slot.segs.clear();
                    slot.segs.extend_from_slice(segs);
                    slot.bounce = Some((bb, is_read));
                }
                slot.busy = true;
                slot.ram = Some(Arc::clone(ram));
                self.inflight += 1;
                Ok(())
            }
        }
    }

    /// Whether the driver may have completions to reap (checked without a
    /// syscall where possible).
    fn driver_has_completions(&mut self) -> bool {
        match &self.io {
            Backend::IoUring { .. } => self.inflight > 0 && self.reap_peek(),
            Backend::Null { pending, .. } => {
                pending.front().is_some_and(|(d, _)| *d <= Instant::now())
            }
        }
    }

    /// Reaps io_uring completions into `done` (no syscall when nothing is
    /// to be submitted); true if any.
    fn reap_peek(&mut self) -> bool {
        self.reap() > 0
    }

    /// Collects driver completions; returns how many.
    fn reap(&mut self) -> usize {
        match &mut self.io {
            Backend::IoUring { q, bounce } => {
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
                    let Some(slot) = self.slots.get_mut(tag) else {
                        continue;
                    };
                    let mut result = c.ret;
                    tracing::trace!(queue = self.index, tag, result, "completion");
                    if slot.discard && result == -libc::EOPNOTSUPP {
                        result = 0;
                    }
                    slot.discard = false;
                    if let Some((mut bb, is_read)) = slot.bounce.take() {
                        if is_read && result == 0 {
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
            Backend::Null { pending, .. } => {
                let now = Instant::now();
                let mut n = 0;
                while pending.front().is_some_and(|(d, _)| *d <= now) {
                    let Some((_, c)) = pending.pop_front() else {
                        break;
                    };
                    self.slots[c.tag as usize].busy = false;
                    self.inflight -= 1;
                    self.done.push(c);
                    n += 1;
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
