//! One virtqueue's thread in the frontend.
//!
//! It pops descriptor chains from the guest's avail ring, turns them into ring
//! requests for the worker, and turns the worker's completions into status
//! bytes and used-ring entries. It sleeps only when the avail ring is empty
//! (guest notifications re-enabled, EVENT_IDX style) and the completion ring
//! is empty (after telling the worker to kick us).
//!
//! - [`control`](VringControl): how other threads steer a queue thread.
//! - `guest`: chains in, statuses and used entries out.
//! - `recovery`: requests taken up again on a replacement worker, and the
//!   ones a previous frontend left in flight.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkmesh_ipc::inflight::{InflightQueue, Recovered};
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::poll::{Poller, Wait};
use blkmesh_ipc::ring::Op;
use blkmesh_ipc::ring::{CompletionReceiver, Request, RequestSender, Segment};
use blkmesh_stats::{IoCounters, OpKind};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::memory::MemTable;
use crate::request::{Desc, DeviceInfo, ZoneLimits};

mod control;
mod guest;
mod recovery;

use control::Command;
pub use control::{Drained, QueueControls, VringControl, WorkerEnds};

const EV_KICK: u64 = 0;
const EV_WORKER: u64 = 1;
const EV_CONTROL: u64 = 2;

/// How long a stopping queue waits for the worker to finish in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The memory table shared by an export's queues; swapped only while every
/// queue is paused.
pub type SharedMem = Arc<Mutex<Arc<MemTable>>>;

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
    /// Where the guest pages this queue writes are marked during a live
    /// migration ([`crate::dirty_log`]).
    pub log: Arc<crate::dirty_log::LogSink>,
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
    /// Per head: its device-writable buffers as guest ranges, marked in
    /// the dirty log when it completes (capacity reused).
    writable: Vec<Vec<(u64, u64)>>,
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
        writable: vec![Vec::new(); n],
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
        poller: Poller::from_env(blkmesh_ipc::poll::DEFAULT_GUEST_MAX),
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
        let queue = u32::from(self.s.index);
        match blkmesh_ipc::placement::place_queue_thread(queue) {
            Ok(cpu) => tracing::debug!(queue, ?cpu, "queue thread placed"),
            Err(e) => tracing::warn!(queue, "{e}; the queue runs unplaced"),
        }
        let epoll = match self.epoll() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(queue = self.s.index, "epoll: {e}");
                return;
            }
        };
        let mut events = [EpollEvent::empty(); 4];
        let mut stop_deadline: Option<Instant> = None;
        let mut idle_since: Option<(Instant, Wait)> = None;
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
                // Kicks are seen in the avail ring on resumption.
                self.clear_events(&events[..n]);
                continue;
            }
            if cmd == Command::Run {
                let (_, wait) = *idle_since
                    .get_or_insert_with(|| (Instant::now(), Wait::with_inflight(self.inflight)));
                let gm = mem.guest_memory();
                let completions = &self.s.completions;
                let queue_new = |q: &Self| q.guest_has_new(gm);
                let mut poller = self.poller;
                let found = poller.poll(wait, || completions.has_new() || queue_new(self));
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
            if let Some((t, wait)) = idle_since.take() {
                self.poller.slept(wait, t.elapsed());
            }
            self.clear_events(&events[..n]);
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

    /// Clears the eventfds that woke the thread.
    fn clear_events(&self, events: &[EpollEvent]) {
        for ev in events {
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
