//! One virtqueue's thread in the frontend.
//!
//! It pops descriptor chains from the guest's avail ring, turns them into ring
//! requests for the worker, and turns the worker's completions into status
//! bytes and used-ring entries. It sleeps only when the avail ring is empty
//! (guest notifications re-enabled, EVENT_IDX style) and the completion ring
//! is empty (after telling the worker to kick us).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blkmesh_ipc::inflight::{InflightQueue, Recovered};
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::poll::Poller;
use blkmesh_ipc::ring::Op;
use blkmesh_ipc::ring::{CompletionReceiver, Request, RequestSender, Segment};
use blkmesh_stats::{IoCounters, OpKind};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::MemTable;
use crate::request::{self, Action, Desc, DeviceInfo, RequestType, Status, ZoneLimits};

const EV_KICK: u64 = 0;
const EV_WORKER: u64 = 1;
const EV_CONTROL: u64 = 2;

/// How long a stopping queue waits for the worker to finish in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The memory table shared by an export's queues; swapped only while every
/// queue is paused.
pub type SharedMem = Arc<Mutex<Arc<MemTable>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Run,
    /// Stop taking guest requests until the worker has taken the ring's.
    Pause,
    /// Stop taking guest requests until every in-flight one has completed
    /// (before the queue moves to another worker).
    Drain,
    Stop,
}

struct Ctl {
    command: Command,
    paused: bool,
    /// The worker died or was fenced: its in-flight requests wait for a
    /// replacement ring, and no new guest request is taken meanwhile.
    worker_lost: bool,
    /// The rings of the replacement worker, for the queue thread to take.
    replacement: Option<WorkerEnds>,
}

impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctl")
            .field("command", &self.command)
            .field("paused", &self.paused)
            .field("worker_lost", &self.worker_lost)
            .finish_non_exhaustive()
    }
}

/// The frontend's ends of a queue's rings and doorbells with one worker.
pub struct WorkerEnds {
    pub requests: RequestSender,
    pub completions: CompletionReceiver,
    /// Us → worker.
    pub worker_kick: Doorbell,
    /// Worker → us.
    pub worker_call: Doorbell,
    /// For a replacement worker of a zoned export: where to ask for the
    /// write pointers of the zones with writes in flight. Writes that lie
    /// below them were applied by the lost worker (a zoned node moves a
    /// write pointer only past written data) and complete at once instead
    /// of being resubmitted, which the zone would refuse as not at its
    /// write pointer.
    pub zones: Option<crate::zones::ZoneOracle>,
}

/// Lets the vhost-user thread pause, resume and stop a queue thread.
#[derive(Debug)]
pub struct VringControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    event: Doorbell,
}

impl VringControl {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VringControl {
            ctl: Mutex::new(Ctl {
                command: Command::Run,
                paused: false,
                worker_lost: false,
                replacement: None,
            }),
            cv: Condvar::new(),
            event: Doorbell::new()?,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, c: Command) {
        self.lock().command = c;
        self.cv.notify_all();
        self.event.ring();
    }

    /// Stops taking guest requests and waits until the worker has taken every
    /// request already on the ring. False on timeout.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.quiesce(Command::Pause, timeout)
    }

    /// Stops taking guest requests and waits until every request in flight
    /// has completed. False on timeout.
    pub fn drain(&self, timeout: Duration) -> bool {
        self.quiesce(Command::Drain, timeout)
    }

    fn quiesce(&self, how: Command, timeout: Duration) -> bool {
        self.set(how);
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.paused {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    pub fn resume(&self) {
        self.set(Command::Run);
    }

    pub fn worker_lost(&self) -> bool {
        self.lock().worker_lost
    }

    /// Marks the queue's worker gone without waiting: the thread stops
    /// taking guest requests and keeps what is in flight for the
    /// replacement ([`Self::replace_worker`]). Safe to call before the
    /// thread runs (a queue started while its worker is gone).
    pub fn mark_lost(&self) {
        self.lock().worker_lost = true;
        self.cv.notify_all();
        self.event.ring();
    }

    /// Hands a queue whose worker was lost the rings of its replacement:
    /// the thread resubmits every in-flight request there and resumes.
    pub fn replace_worker(&self, ends: WorkerEnds) {
        {
            let mut g = self.lock();
            g.replacement = Some(ends);
            g.worker_lost = false;
        }
        self.set(Command::Run);
    }

    fn take_replacement(&self) -> Option<WorkerEnds> {
        self.lock().replacement.take()
    }

    pub fn stop(&self) {
        self.set(Command::Stop);
    }

    fn state(&self) -> (Command, bool) {
        let g = self.lock();
        (g.command, g.worker_lost)
    }

    /// Called by the queue thread once quiet: wait until resumed or stopped.
    fn park(&self) -> Command {
        let mut g = self.lock();
        g.paused = true;
        self.cv.notify_all();
        while matches!(g.command, Command::Pause | Command::Drain) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.paused = false;
        g.command
    }
}

/// The controls of an export's running queues, by queue index. Shared by
/// the vhost-user thread, which starts and stops queues, and the failover
/// thread, which marks a queue's worker lost at once: it must not wait for
/// the vhost-user thread, which may be in a message that waits for that
/// very queue (a memory-table change pausing it).
#[derive(Debug, Default)]
pub struct QueueControls(Mutex<Vec<Option<Arc<VringControl>>>>);

impl QueueControls {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<VringControl>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or, with `None`, forgets) the control of a running queue.
    pub fn set(&self, queue: usize, control: Option<Arc<VringControl>>) {
        let mut v = self.lock();
        if v.len() <= queue {
            v.resize(queue + 1, None);
        }
        v[queue] = control;
    }

    /// Marks the worker of `queue` lost if the queue runs (see
    /// [`VringControl::mark_lost`]); a queue that does not run attaches to
    /// whatever worker its link points at when it starts.
    pub fn mark_lost(&self, queue: u32) {
        if let Some(Some(c)) = self.lock().get(queue as usize) {
            c.mark_lost();
        }
    }
}

/// Everything a queue thread owns.
pub struct VringSetup {
    pub index: u16,
    pub queue: Queue,
    pub mem: SharedMem,
    /// Guest → us notifications.
    pub kick: File,
    /// Us → guest interrupts.
    pub call: Option<File>,
    pub requests: RequestSender,
    pub completions: CompletionReceiver,
    /// Us → worker.
    pub worker_kick: Doorbell,
    /// Worker → us.
    pub worker_call: Doorbell,
    pub dev: Arc<DeviceInfo>,
    /// The export's zone geometry when this connection negotiated
    /// VIRTIO_BLK_F_ZONED (zone requests are taken, zone errors get their
    /// own statuses); `None` otherwise.
    pub zones: Option<Arc<ZoneLimits>>,
    /// This queue's I/O statistics.
    pub stats: Arc<IoCounters>,
    pub control: Arc<VringControl>,
    /// Told (once per episode) when requests are in flight and the
    /// worker's heartbeat has not moved for [`worker_timeout`], or when the
    /// worker broke the completion ring.
    pub on_hang: HangReporter,
    /// Inflight tracking, and the heads a previous frontend left in flight
    /// (resubmitted before anything else).
    pub inflight: Option<(InflightQueue, Recovered)>,
    /// For a zoned export: where to ask which of the writes a previous
    /// frontend left in flight were applied (see [`WorkerEnds::zones`]).
    pub recovery_zones: Option<crate::zones::ZoneOracle>,
}

/// Why a queue gave up on its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerFault {
    /// Requests in flight, and the worker's event loop showed no sign of
    /// life (no completion, no heartbeat) for [`worker_timeout`].
    Hung,
    /// The worker broke the ring protocol: a completion index more than a
    /// ring ahead, a completion for a head not in flight, or an impossible
    /// heartbeat. The queue reads nothing more from that ring.
    Corrupt,
}

/// Receives a queue's "my worker stopped answering" (or "my worker is
/// corrupt") reports. Either way the worker must be fenced before the
/// queue's requests go elsewhere.
pub type HangReporter = Arc<dyn Fn(u16, WorkerFault) + Send + Sync>;

/// How often a queue with requests in flight samples its worker's
/// heartbeat (a load of a line the worker writes: not on every loop).
const HEARTBEAT_SAMPLE: Duration = Duration::from_millis(100);

/// How long a worker's event loop may show no sign of life (no completion,
/// and a heartbeat that did not move: see [`blkmesh_ipc::ring`]) while
/// requests are in flight before it is considered hung
/// (`BLKMESH_WORKER_TIMEOUT_MS`, default 5000). It is not a bound on a
/// request's age: a throttle or a fault-injection delay may hold a request
/// far longer, on a worker whose loop keeps beating.
pub fn worker_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let ms = std::env::var("BLKMESH_WORKER_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&v| v > 0)
            .unwrap_or(5000);
        Duration::from_millis(ms)
    })
}

#[derive(Clone, Copy)]
struct Pending {
    /// The request as sent, for resubmission to a replacement worker (its
    /// segments are in `Vring::saved`).
    req: Request,
    status: u64,
    used_len: u32,
    kind: Option<OpKind>,
    bytes: u64,
    start: Instant,
    /// Submission order, kept when requests are resubmitted: writes to a
    /// zone must reach a replacement worker in the order the guest gave
    /// them.
    seq: u64,
    /// The memory table its segments were translated against (see
    /// [`Tables`]).
    epoch: u32,
}

/// The memory tables that requests in flight were translated against.
/// Segments name regions by their index in one table; a replacement worker
/// only knows the current one, so requests from before a memory-table
/// change are translated again before they are resubmitted. Nothing is
/// done per request: a table is noticed when it changes.
struct Tables {
    current: Arc<MemTable>,
    epoch: u32,
    /// Older tables with requests in flight against them, by epoch.
    older: Vec<(u32, Arc<MemTable>)>,
}

impl Tables {
    /// Notes the table the queue works with now; forgets older tables once
    /// nothing is in flight.
    fn see(&mut self, mem: &Arc<MemTable>, inflight: usize) {
        if inflight == 0 {
            self.older.clear();
        }
        if !Arc::ptr_eq(&self.current, mem) {
            let old = std::mem::replace(&mut self.current, Arc::clone(mem));
            if inflight > 0 {
                self.older.push((self.epoch, old));
            }
            self.epoch = self.epoch.wrapping_add(1);
        }
    }

    fn of(&self, epoch: u32) -> Option<&Arc<MemTable>> {
        if epoch == self.epoch {
            return Some(&self.current);
        }
        self.older.iter().find(|(e, _)| *e == epoch).map(|(_, t)| t)
    }
}

fn kind_of(op: Op) -> Option<OpKind> {
    match op {
        Op::Read => Some(OpKind::Read),
        Op::Write | Op::ZoneAppend => Some(OpKind::Write),
        Op::Flush => Some(OpKind::Flush),
        Op::Discard => Some(OpKind::Discard),
        Op::WriteZeroes => Some(OpKind::WriteZeroes),
        _ => None,
    }
}

struct Vring {
    s: VringSetup,
    pending: Vec<Option<Pending>>,
    /// Per head: the segments of the request in flight (capacity reused).
    saved: Vec<Vec<Segment>>,
    /// Per head, for a zone append in flight: where its `append_sector`
    /// goes in guest memory (the first 8 device-writable bytes).
    append_at: Vec<Vec<(u64, u64)>>,
    /// Sequence number of the next request submitted.
    next_seq: u64,
    tables: Tables,
    /// While resubmitting what a previous frontend left in flight on a
    /// zoned export: the zones' write pointers; writes below them were
    /// applied and complete at once.
    already_written: Option<crate::zones::ZoneMap>,
    inflight: usize,
    /// When the worker last showed progress: a completion, a heartbeat
    /// that moved, or the queue going from idle to busy. The hang clock.
    last_progress: Instant,
    /// When the heartbeat was last sampled.
    heartbeat_sampled: Instant,
    hang_reported: bool,
    /// The worker broke the completion ring (or its heartbeat): nothing
    /// more is read from that ring, no guest request is taken, and the
    /// worker was reported to be fenced. Latched until a replacement ring
    /// arrives.
    distrusted: bool,
    /// The guest's avail index was last seen broken (logged once).
    bad_avail: bool,
    /// Inflight tracking shared with the VMM, and the next submission number.
    tracker: Option<InflightQueue>,
    counter: u64,
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    /// Scratch for request parsing.
    parts: Vec<(u64, u64)>,
    /// Guest notifications are enabled (we are about to sleep or asleep).
    guest_notify: bool,
    poller: Poller,
    errors_logged: u32,
}

/// Runs the queue until stopped; returns the virtqueue (for GET_VRING_BASE).
pub fn run(mut setup: VringSetup) -> Queue {
    let n = setup.queue.size() as usize;
    let (tracker, recovered) = match setup.inflight.take() {
        Some((t, r)) => (Some(t), r),
        None => (None, Recovered::default()),
    };
    let current = Arc::clone(&setup.mem.lock().unwrap_or_else(|p| p.into_inner()));
    let mut v = Vring {
        tracker,
        counter: recovered.next_counter,
        s: setup,
        pending: vec![None; n],
        saved: vec![Vec::new(); n],
        append_at: vec![Vec::new(); n],
        next_seq: 0,
        tables: Tables {
            current,
            epoch: 0,
            older: Vec::new(),
        },
        already_written: None,
        inflight: 0,
        last_progress: Instant::now(),
        heartbeat_sampled: Instant::now(),
        hang_reported: false,
        distrusted: false,
        bad_avail: false,
        descs: Vec::with_capacity(n),
        segs: Vec::with_capacity(crate::config::RING_MAX_SEGMENTS as usize),
        parts: Vec::with_capacity(16),
        guest_notify: true,
        poller: Poller::from_env(),
        errors_logged: 0,
    };
    v.resubmit_recovered(&recovered.heads);
    v.run();
    v.s.queue
}

impl Vring {
    fn log_guest_error(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.errors_logged < 16 {
            self.errors_logged += 1;
            tracing::warn!(queue = self.s.index, "guest request refused: {msg}");
        }
    }

    fn run(&mut self) {
        let epoll = match self.epoll() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(queue = self.s.index, "epoll: {e}");
                return;
            }
        };
        let mut events = [EpollEvent::empty(); 4];
        let mut stop_deadline: Option<Instant> = None;
        let mut idle_since: Option<Instant> = None;
        loop {
            if let Some(ends) = self.s.control.take_replacement() {
                self.replace_worker(ends, &epoll);
            }
            let (cmd, lost) = self.s.control.state();
            // A distrusted worker is as good as lost: its ring is not read
            // and nothing new goes to it while it is fenced and replaced.
            let lost = lost || self.distrusted;
            let mem = Arc::clone(&self.s.mem.lock().unwrap_or_else(|p| p.into_inner()));
            self.tables.see(&mem, self.inflight);
            let mut progress = false;
            if cmd == Command::Run && !lost {
                progress |= self.take_guest_requests(&mem);
            }
            progress |= self.finish_completions(&mem);
            if cmd == Command::Run && !lost {
                self.check_hang();
            }
            match cmd {
                // A lost worker will never take what is on its ring: the
                // ring is replaced, so the queue is quiet already.
                Command::Pause | Command::Drain
                    if (lost || self.s.requests.unconsumed() == 0)
                        && (cmd == Command::Pause || self.inflight == 0) =>
                {
                    if self.s.control.park() == Command::Stop {
                        continue;
                    }
                    // Resumed, perhaps with a new memory table: look again.
                    continue;
                }
                Command::Stop => {
                    let deadline =
                        *stop_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                    if self.inflight == 0 {
                        return;
                    }
                    if lost {
                        tracing::warn!(
                            queue = self.s.index,
                            inflight = self.inflight,
                            "stopping with the worker lost; in-flight requests are left to the VMM"
                        );
                        return;
                    }
                    if Instant::now() >= deadline {
                        tracing::error!(
                            queue = self.s.index,
                            inflight = self.inflight,
                            "worker did not finish in-flight requests; stopping anyway"
                        );
                        return;
                    }
                }
                _ => {}
            }
            if progress {
                idle_since = None;
                continue;
            }
            if lost {
                // Nothing to do until the replacement arrives (a control
                // event); guest kicks wait in the eventfd.
                let n = epoll
                    .wait(&mut events, EpollTimeout::from(100u16))
                    .unwrap_or(0);
                for ev in &events[..n] {
                    match ev.data() {
                        // Kicks are seen in the avail ring on resumption.
                        EV_KICK => drain_eventfd(&self.s.kick),
                        EV_WORKER => {
                            self.s.worker_call.clear();
                        }
                        _ => {
                            self.s.control.event.clear();
                        }
                    }
                }
                continue;
            }
            if cmd == Command::Run {
                idle_since.get_or_insert_with(Instant::now);
                let gm = mem.guest_memory();
                let completions = &self.s.completions;
                let queue_new = |q: &Self| q.guest_has_new(gm);
                let mut poller = self.poller;
                let found = poller.poll(|| completions.has_new() || queue_new(self));
                self.poller = poller;
                if found {
                    idle_since = None;
                    continue;
                }
                if !self.arm_guest_notifications(gm) {
                    continue;
                }
            }
            if !self.s.completions.prepare_sleep() {
                continue;
            }
            let timeout = if cmd != Command::Run {
                EpollTimeout::from(10u16)
            } else if self.inflight > 0 && !lost {
                // Wake up to notice a worker that stopped answering.
                EpollTimeout::from(500u16)
            } else {
                EpollTimeout::NONE
            };
            let n = epoll.wait(&mut events, timeout).unwrap_or(0);
            self.s.completions.woke();
            if let Some(t) = idle_since.take() {
                self.poller.slept(t.elapsed());
            }
            for ev in &events[..n] {
                match ev.data() {
                    EV_KICK => drain_eventfd(&self.s.kick),
                    EV_WORKER => {
                        self.s.worker_call.clear();
                    }
                    _ => {
                        self.s.control.event.clear();
                    }
                }
            }
        }
    }

    /// Reports the worker once if requests are in flight and its event
    /// loop showed no sign of life for the worker timeout: no completion,
    /// and a heartbeat that did not move. A request held for long (a
    /// throttle, a fault-injection delay, a slow device) on a worker that
    /// keeps beating is not a hang. A heartbeat that moves impossibly
    /// (backwards, absurdly far) makes the worker distrusted instead.
    fn check_hang(&mut self) {
        if self.inflight == 0 || self.hang_reported || self.distrusted {
            return;
        }
        let now = Instant::now();
        if now.saturating_duration_since(self.heartbeat_sampled) >= HEARTBEAT_SAMPLE {
            self.heartbeat_sampled = now;
            match self.s.completions.heartbeat(now) {
                Ok(true) => self.last_progress = now,
                Ok(false) => {}
                Err(e) => {
                    self.distrust_worker(format_args!("{e}"));
                    return;
                }
            }
        }
        let quiet = now.saturating_duration_since(self.last_progress);
        if quiet >= worker_timeout() {
            self.hang_reported = true;
            tracing::error!(
                queue = self.s.index,
                inflight = self.inflight,
                quiet_ms = quiet.as_millis() as u64,
                "worker stopped: requests in flight and no heartbeat"
            );
            (self.s.on_hang)(self.s.index, WorkerFault::Hung);
        }
    }

    /// The worker broke the completion ring: stop trusting it, for good
    /// (until a replacement ring arrives). Nothing more is read from the
    /// ring, no guest request is taken, and the worker is reported so the
    /// failover thread fences it (it may still hold our requests and write
    /// guest memory: it must be dead before they are resubmitted) and
    /// moves the queue, with its requests in flight, to the replacement.
    fn distrust_worker(&mut self, why: std::fmt::Arguments<'_>) {
        if self.distrusted {
            return;
        }
        self.distrusted = true;
        self.hang_reported = true;
        tracing::error!(
            queue = self.s.index,
            inflight = self.inflight,
            "worker broke the completion ring: {why}; ring no longer read, worker to be fenced"
        );
        (self.s.on_hang)(self.s.index, WorkerFault::Corrupt);
    }

    /// Moves to a replacement worker's rings and resubmits every request
    /// that was in flight with the lost one, in their submission order (a
    /// write may thus be applied twice, with the same data; none is lost).
    ///
    /// Zoned devices: a write the lost worker already applied is below
    /// its zone's write pointer now, and would be refused: given the
    /// replacement's write pointers ([`WorkerEnds::zones`]), such writes
    /// complete at once instead. A resubmitted zone append cannot be
    /// told from a new one: it appends again, and the guest is told the
    /// second place (the first copy stays in the zone, unreferenced, and
    /// takes zone capacity). Known limit; a fix needs an idempotency key
    /// carried in the ring entry and remembered by the zoned node.
    fn replace_worker(&mut self, ends: WorkerEnds, epoll: &Epoll) {
        let writes = self
            .pending
            .iter()
            .flatten()
            .filter(|p| p.req.op == Op::Write)
            .map(|p| p.req.offset);
        let zones = ends.zones.as_ref().map(|o| o.map(writes));
        let _ = epoll.delete(&self.s.worker_call);
        self.s.requests = ends.requests;
        self.s.completions = ends.completions;
        self.s.worker_kick = ends.worker_kick;
        self.s.worker_call = ends.worker_call;
        if let Err(e) = epoll.add(
            &self.s.worker_call,
            EpollEvent::new(EpollFlags::EPOLLIN, EV_WORKER),
        ) {
            tracing::error!(queue = self.s.index, "epoll: {e}");
        }
        let mut resubmitted = 0;
        let mut applied = 0;
        let mut failed = 0;
        let mem = Arc::clone(&self.s.mem.lock().unwrap_or_else(|p| p.into_inner()));
        self.tables.see(&mem, self.inflight);
        // In the order they were first submitted (not by head): a zoned
        // device takes writes to a zone only in write-pointer order.
        let mut order: Vec<(u64, usize)> = (0..self.pending.len())
            .filter_map(|h| self.pending[h].map(|p| (p.seq, h)))
            .collect();
        order.sort_unstable();
        for (_, head) in order {
            let Some(p) = self.pending[head] else {
                continue;
            };
            let done = p.req.op == Op::Write
                && zones
                    .as_ref()
                    .is_some_and(|z| z.written(p.req.offset, p.req.len));
            if done {
                self.pending[head] = None;
                self.inflight -= 1;
                if let Some(kind) = p.kind {
                    let ns = p.start.elapsed().as_nanos() as u64;
                    self.s.stats.finished(kind, p.bytes, true, ns);
                }
                self.complete(
                    mem.guest_memory(),
                    head as u16,
                    p.status,
                    Status::Ok,
                    p.used_len,
                );
                applied += 1;
                continue;
            }
            // Memory-table changes since it was translated: translate
            // again; its memory may have left the table meanwhile.
            let translated = p.epoch == self.tables.epoch || self.translate_again(head, p.epoch);
            let pushed = translated
                && match self.s.requests.push(&p.req, &self.saved[head]) {
                    Ok(()) => true,
                    // The ring holds a whole virtqueue: only more segments
                    // than a ring entry takes (after translating again).
                    Err(e) => {
                        tracing::error!(queue = self.s.index, head, "resubmit: {e}");
                        false
                    }
                };
            if pushed {
                resubmitted += 1;
                continue;
            }
            self.pending[head] = None;
            self.inflight -= 1;
            if let Some(kind) = p.kind {
                self.s.stats.finished(kind, p.bytes, false, 0);
            }
            let status = request::status_of(-libc::EFAULT);
            self.complete(mem.guest_memory(), head as u16, p.status, status, 1);
            failed += 1;
        }
        if resubmitted > 0 {
            self.s.requests.publish();
            self.s.worker_kick.ring();
        }
        if applied + failed > 0 {
            self.notify_guest(mem.guest_memory());
        }
        self.last_progress = Instant::now();
        self.heartbeat_sampled = self.last_progress;
        self.hang_reported = false;
        self.distrusted = false;
        tracing::info!(
            queue = self.s.index,
            resubmitted,
            applied,
            failed,
            "queue moved to a replacement worker"
        );
    }

    /// Translates the segments of the request on `head`, made against the
    /// table of `epoch`, into the current table. False if they are not all
    /// in it (or that table is unknown, which cannot happen).
    fn translate_again(&mut self, head: usize, epoch: u32) -> bool {
        let Some(old) = self.tables.of(epoch) else {
            return false;
        };
        self.segs.clear();
        if !self
            .tables
            .current
            .translate_from(old, &self.saved[head], &mut self.segs)
        {
            return false;
        }
        let saved = &mut self.saved[head];
        saved.clear();
        saved.extend_from_slice(&self.segs);
        true
    }

    fn epoll(&self) -> nix::Result<Epoll> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            self.s.kick.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, EV_KICK),
        )?;
        epoll.add(
            &self.s.worker_call,
            EpollEvent::new(EpollFlags::EPOLLIN, EV_WORKER),
        )?;
        epoll.add(
            &self.s.control.event,
            EpollEvent::new(EpollFlags::EPOLLIN, EV_CONTROL),
        )?;
        Ok(epoll)
    }

    /// Pops every available chain; returns whether any was found.
    fn take_guest_requests(&mut self, mem: &Arc<MemTable>) -> bool {
        let gm = mem.guest_memory();
        let mut found = false;
        let mut used = false;
        if self.guest_notify {
            if let Err(e) = self.s.queue.disable_notification(gm) {
                self.log_guest_error(format_args!("avail ring: {e}"));
                return found;
            }
            self.guest_notify = false;
        }
        if !self.avail_index_sane(gm) {
            return found;
        }
        {
            while let Some(chain) = self.s.queue.pop_descriptor_chain(gm) {
                found = true;
                let head = chain.head_index();
                if let Some(t) = &self.tracker {
                    t.taken(head, self.counter);
                    self.counter = self.counter.wrapping_add(1);
                }
                self.descs.clear();
                for d in chain {
                    self.descs.push(Desc {
                        addr: d.addr().0,
                        len: d.len(),
                        writable: d.is_write_only(),
                        has_next: d.has_next(),
                    });
                }
                used |= self.handle_chain(head, mem);
            }
        }
        if found && self.s.requests.publish() {
            self.s.worker_kick.ring();
        }
        if used {
            self.notify_guest(gm);
        }
        found
    }

    /// Chains the guest has made available that we have not popped, or
    /// `None` when its avail index is more than a ring ahead of us (a broken
    /// or hostile driver).
    fn guest_pending(&self, gm: &vm_memory::GuestMemoryMmap<()>) -> Option<u16> {
        let avail = self
            .s
            .queue
            .avail_idx(gm, std::sync::atomic::Ordering::Acquire)
            .ok()?;
        let n = avail.0.wrapping_sub(self.s.queue.next_avail());
        (n <= self.s.queue.size()).then_some(n)
    }

    /// Whether the guest has made chains available that we have not popped
    /// (never for a broken avail index: that waits for the next kick).
    fn guest_has_new(&self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        self.guest_pending(gm).is_some_and(|n| n > 0)
    }

    /// False (logged once per episode) when the avail index cannot be
    /// right; the queue then takes nothing until the guest fixes it.
    fn avail_index_sane(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        let sane = self.guest_pending(gm).is_some();
        if !sane && !self.bad_avail {
            self.log_guest_error(format_args!(
                "avail index more than a ring ahead of the device (next {}); ignored until fixed",
                self.s.queue.next_avail()
            ));
        }
        self.bad_avail = !sane;
        sane
    }

    /// Asks the guest to kick us again (before sleeping); false if chains
    /// arrived meanwhile.
    fn arm_guest_notifications(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        self.guest_notify = true;
        match self.s.queue.enable_notification(gm) {
            // A broken avail index is not work: sleep until the next kick.
            Ok(more) => !more || !self.avail_index_sane(gm),
            Err(e) => {
                self.log_guest_error(format_args!("avail ring: {e}"));
                true
            }
        }
    }

    /// Returns true if the chain was completed at once (used ring touched).
    fn handle_chain(&mut self, head: u16, mem: &Arc<MemTable>) -> bool {
        let gm = mem.guest_memory();
        let status = match request::check_chain(&self.descs) {
            Ok(s) => s,
            Err(e) => {
                self.log_guest_error(format_args!("chain {head}: {e}"));
                // No status byte we may write: return the chain unused.
                self.put_used(gm, head, 0);
                return true;
            }
        };
        if self.pending.get(head as usize).is_none_or(|p| p.is_some()) {
            self.log_guest_error(format_args!("chain head {head} reused while in flight"));
            return false;
        }
        let parsed = request::parse_with_zones(
            &self.descs,
            status,
            gm,
            mem,
            &self.s.dev,
            self.s.zones.as_deref(),
            head as u32,
            &mut self.segs,
            &mut self.parts,
        );
        match parsed.action {
            Action::Complete(st) => {
                if st != Status::Ok {
                    self.log_guest_error(format_args!("chain {head}: status {}", st.byte()));
                }
                // Answered here (refused, or nothing to move): count it
                // with its kind so refusals show up as errors.
                if let Some(kind) = parsed.request_type.and_then(RequestType::op_kind) {
                    self.s.stats.started();
                    self.s.stats.finished(kind, 0, st == Status::Ok, 0);
                }
                self.complete(gm, head, parsed.status, st, parsed.used_len);
                true
            }
            Action::Submit(req)
                if req.op == Op::Write
                    && self
                        .already_written
                        .as_ref()
                        .is_some_and(|z| z.written(req.offset, req.len)) =>
            {
                // Applied before a frontend restart: below its zone's
                // write pointer, where the zone would refuse it again.
                self.s.stats.started();
                self.s.stats.finished(OpKind::Write, req.len, true, 0);
                self.complete(gm, head, parsed.status, Status::Ok, parsed.used_len);
                true
            }
            Action::Submit(req) => match self.s.requests.push(&req, &self.segs) {
                Ok(()) => {
                    let kind = kind_of(req.op);
                    if kind.is_some() {
                        self.s.stats.started();
                    }
                    if self.inflight == 0 {
                        self.last_progress = Instant::now();
                    }
                    let saved = &mut self.saved[head as usize];
                    saved.clear();
                    saved.extend_from_slice(&self.segs);
                    let append_at = &mut self.append_at[head as usize];
                    append_at.clear();
                    if req.op == Op::ZoneAppend {
                        let writable = self
                            .descs
                            .iter()
                            .filter(|d| d.writable)
                            .map(|d| (d.addr, d.len as u64));
                        request::byte_ranges(writable, 0, request::APPEND_SECTOR_BYTES, append_at);
                    }
                    self.pending[head as usize] = Some(Pending {
                        req,
                        status: parsed.status,
                        used_len: parsed.used_len,
                        kind,
                        bytes: req.len,
                        start: Instant::now(),
                        seq: self.next_seq,
                        epoch: self.tables.epoch,
                    });
                    self.next_seq += 1;
                    self.inflight += 1;
                    false
                }
                Err(e) => {
                    self.log_guest_error(format_args!("ring: {e}"));
                    self.complete(gm, head, parsed.status, request::status_of(-libc::EIO), 1);
                    true
                }
            },
        }
    }

    fn complete(
        &mut self,
        gm: &vm_memory::GuestMemoryMmap<()>,
        head: u16,
        status: u64,
        st: Status,
        used_len: u32,
    ) {
        let written = match gm.get_slice(GuestAddress(status), 1) {
            Ok(s) => {
                s.copy_from(&[st.byte()]);
                true
            }
            Err(_) => false,
        };
        if !written {
            self.log_guest_error(format_args!("status byte of chain {head} not writable"));
        }
        // Without a status byte written, nothing the guest may trust was.
        self.put_used(gm, head, if written { used_len } else { 0 });
    }

    /// Puts `head` on the used ring, keeping the inflight record in step.
    fn put_used(&mut self, gm: &vm_memory::GuestMemoryMmap<()>, head: u16, used_len: u32) {
        if let Some(t) = &self.tracker {
            t.completing(head);
        }
        if let Err(e) = self.s.queue.add_used(gm, head, used_len) {
            self.log_guest_error(format_args!("used ring: {e}"));
        }
        if let Some(t) = &self.tracker {
            t.completed(head, self.s.queue.next_used());
        }
    }

    /// Processes again the heads a previous frontend took from the avail
    /// ring and never completed (found in the inflight region), oldest
    /// first, as if just popped.
    fn resubmit_recovered(&mut self, heads: &[u16]) {
        if heads.is_empty() {
            return;
        }
        let mem = Arc::clone(&self.s.mem.lock().unwrap_or_else(|p| p.into_inner()));
        let gm = mem.guest_memory();
        let (table, size) = (self.s.queue.desc_table(), self.s.queue.size());
        if let Some(oracle) = self.s.recovery_zones.take() {
            let mut writes = Vec::new();
            for &head in heads {
                if request::walk_chain(gm, table, size, head, &mut self.descs).is_ok() {
                    if let Some(header) = request::peek_header(&self.descs, gm)
                        .filter(|h| h.request_type() == Some(RequestType::Out))
                    {
                        writes.extend(header.sector().checked_mul(512));
                    }
                }
            }
            if !writes.is_empty() {
                self.already_written = Some(oracle.map(writes));
            }
        }
        let mut used = false;
        for &head in heads {
            if let Err(e) = request::walk_chain(gm, table, size, head, &mut self.descs) {
                self.log_guest_error(format_args!("in-flight chain {head}: {e}"));
                self.put_used(gm, head, 0);
                used = true;
                continue;
            }
            used |= self.handle_chain(head, &mem);
        }
        self.already_written = None;
        if self.s.requests.publish() {
            self.s.worker_kick.ring();
        }
        if used {
            self.notify_guest(gm);
        }
        tracing::info!(
            queue = self.s.index,
            requests = heads.len(),
            "resubmitted requests left in flight by the previous frontend"
        );
    }

    fn notify_guest(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) {
        match self.s.queue.needs_notification(gm) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Some(call) = &self.s.call {
                    signal_eventfd(call);
                }
            }
        }
    }

    /// Applies the worker's completions; returns whether there were any.
    /// A completion index more than a ring ahead, or a completion for a
    /// head not in flight, makes the worker distrusted: the ring is not
    /// read again (completions applied before it stand: their heads were
    /// in flight).
    fn finish_completions(&mut self, mem: &Arc<MemTable>) -> bool {
        if self.distrusted {
            return false;
        }
        let gm = mem.guest_memory();
        let mut any = false;
        loop {
            let c = match self.s.completions.pop() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.distrust_worker(format_args!("{e}"));
                    break;
                }
            };
            let Some(p) = self.pending.get_mut(c.tag as usize).and_then(Option::take) else {
                self.distrust_worker(format_args!("completion for tag {}, not in flight", c.tag));
                break;
            };
            any = true;
            self.inflight -= 1;
            self.last_progress = Instant::now();
            self.hang_reported = false;
            let mut st = if self.s.zones.is_some() {
                request::zoned_status_of(c.result)
            } else {
                request::status_of(c.result)
            };
            let mut used = if st == Status::Ok { p.used_len } else { 1 };
            if st == Status::Ok {
                match p.req.op {
                    // What the worker wrote (it is not trusted: at most
                    // the buffer).
                    Op::ZoneReport => used = c.extra.min(p.req.len) as u32 + 1,
                    Op::ZoneAppend => {
                        let sector = (c.extra / 512).to_le_bytes();
                        let at = &self.append_at[c.tag as usize];
                        if !write_ranges(gm, at, &sector) {
                            self.log_guest_error(format_args!(
                                "append_sector of chain {} not writable",
                                c.tag
                            ));
                            st = request::status_of(-libc::EIO);
                            used = 1;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(kind) = p.kind {
                let ns = p.start.elapsed().as_nanos() as u64;
                self.s.stats.finished(kind, p.bytes, st == Status::Ok, ns);
            }
            self.complete(gm, c.tag as u16, p.status, st, used);
        }
        if !self.distrusted {
            self.s.completions.release();
        }
        if any {
            self.notify_guest(gm);
        }
        any
    }
}

/// Writes `bytes` across the guest ranges `at` (which cover exactly them).
fn write_ranges(gm: &vm_memory::GuestMemoryMmap<()>, at: &[(u64, u64)], bytes: &[u8]) -> bool {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for &(addr, len) in at {
        let Some(chunk) = bytes.get(done..done + len as usize) else {
            return false;
        };
        if gm.write_slice(chunk, GuestAddress(addr)).is_err() {
            return false;
        }
        done += len as usize;
    }
    done == bytes.len()
}

fn signal_eventfd(f: &File) {
    let _ = nix::unistd::write(f, &1u64.to_ne_bytes());
}

fn drain_eventfd(f: &File) {
    let mut buf = [0u8; 8];
    // Non-blocking (set when the queue started): EAGAIN when nothing is pending.
    let _ = nix::unistd::read(f, &mut buf);
}
