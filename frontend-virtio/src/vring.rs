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

use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::poll::Poller;
use blkmesh_ipc::ring::Op;
use blkmesh_ipc::ring::{CompletionReceiver, RequestSender, Segment};
use blkmesh_stats::{IoCounters, OpKind};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::MemTable;
use crate::request::{self, Action, Desc, DeviceInfo};

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

#[derive(Debug)]
struct Ctl {
    command: Command,
    paused: bool,
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

    pub fn stop(&self) {
        self.set(Command::Stop);
    }

    fn command(&self) -> Command {
        self.lock().command
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
    /// This queue's I/O statistics.
    pub stats: Arc<IoCounters>,
    pub control: Arc<VringControl>,
}

#[derive(Clone, Copy)]
struct Pending {
    status: u64,
    used_len: u32,
    kind: Option<OpKind>,
    bytes: u64,
    start: Instant,
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
    inflight: usize,
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
pub fn run(setup: VringSetup) -> Queue {
    let n = setup.queue.size() as usize;
    let mut v = Vring {
        s: setup,
        pending: vec![None; n],
        inflight: 0,
        descs: Vec::with_capacity(n),
        segs: Vec::with_capacity(crate::config::RING_MAX_SEGMENTS as usize),
        parts: Vec::with_capacity(16),
        guest_notify: true,
        poller: Poller::from_env(),
        errors_logged: 0,
    };
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
            let cmd = self.s.control.command();
            let mem = Arc::clone(&self.s.mem.lock().unwrap_or_else(|p| p.into_inner()));
            let mut progress = false;
            if cmd == Command::Run {
                progress |= self.take_guest_requests(&mem);
            }
            progress |= self.finish_completions(&mem);
            match cmd {
                Command::Pause | Command::Drain
                    if self.s.requests.unconsumed() == 0
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
            let timeout = if cmd == Command::Run {
                EpollTimeout::NONE
            } else {
                EpollTimeout::from(10u16)
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
        {
            while let Some(chain) = self.s.queue.pop_descriptor_chain(gm) {
                found = true;
                let head = chain.head_index();
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

    /// Whether the guest has made chains available that we have not popped.
    fn guest_has_new(&self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        self.s
            .queue
            .avail_idx(gm, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|i| i.0 != self.s.queue.next_avail())
    }

    /// Asks the guest to kick us again (before sleeping); false if chains
    /// arrived meanwhile.
    fn arm_guest_notifications(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        self.guest_notify = true;
        match self.s.queue.enable_notification(gm) {
            Ok(more) => !more,
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
                let _ = self.s.queue.add_used(gm, head, 0);
                return true;
            }
        };
        if self.pending.get(head as usize).is_none_or(|p| p.is_some()) {
            self.log_guest_error(format_args!("chain head {head} reused while in flight"));
            return false;
        }
        let parsed = request::parse(
            &self.descs,
            status,
            gm,
            mem,
            &self.s.dev,
            head as u32,
            &mut self.segs,
            &mut self.parts,
        );
        match parsed.action {
            Action::Complete(st) => {
                if st != 0 {
                    self.log_guest_error(format_args!("chain {head}: status {st}"));
                }
                self.complete(gm, head, parsed.status, st, parsed.used_len);
                true
            }
            Action::Submit(req) => match self.s.requests.push(&req, &self.segs) {
                Ok(()) => {
                    self.s.stats.started();
                    self.pending[head as usize] = Some(Pending {
                        status: parsed.status,
                        used_len: parsed.used_len,
                        kind: kind_of(req.op),
                        bytes: req.len,
                        start: Instant::now(),
                    });
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
        st: u8,
        used_len: u32,
    ) {
        let written = match gm.get_slice(GuestAddress(status), 1) {
            Ok(s) => {
                s.copy_from(&[st]);
                true
            }
            Err(_) => false,
        };
        if !written {
            self.log_guest_error(format_args!("status byte of chain {head} not writable"));
        }
        if let Err(e) = self.s.queue.add_used(gm, head, used_len) {
            self.log_guest_error(format_args!("used ring: {e}"));
        }
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
    fn finish_completions(&mut self, mem: &Arc<MemTable>) -> bool {
        let gm = mem.guest_memory();
        let mut any = false;
        loop {
            let c = match self.s.completions.pop() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(
                        queue = self.s.index,
                        "completion ring broken by the worker: {e}"
                    );
                    break;
                }
            };
            let Some(p) = self.pending.get_mut(c.tag as usize).and_then(Option::take) else {
                tracing::error!(
                    queue = self.s.index,
                    tag = c.tag,
                    "completion for a request not in flight"
                );
                continue;
            };
            any = true;
            self.inflight -= 1;
            let st = request::status_of(c.result);
            let used = if st == 0 { p.used_len } else { 1 };
            match p.kind {
                Some(kind) => {
                    let ns = p.start.elapsed().as_nanos() as u64;
                    self.s.stats.finished(kind, p.bytes, st == 0, ns);
                }
                None => self.s.stats.finished(OpKind::Flush, 0, st == 0, 0),
            }
            self.complete(gm, c.tag as u16, p.status, st, used);
        }
        self.s.completions.release();
        if any {
            self.notify_guest(gm);
        }
        any
    }
}

fn signal_eventfd(f: &File) {
    let _ = nix::unistd::write(f, &1u64.to_ne_bytes());
}

fn drain_eventfd(f: &File) {
    let mut buf = [0u8; 8];
    // Non-blocking (set when the queue started): EAGAIN when nothing is pending.
    let _ = nix::unistd::read(f, &mut buf);
}
