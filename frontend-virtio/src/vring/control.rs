//! How the vhost-user thread and the failover thread steer a queue
//! thread: pause, drain, resume, stop, and a lost worker's replacement.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{CompletionReceiver, RequestSender};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Command {
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

/// How waiting for a queue to drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every request in flight completed; the queue thread is parked.
    Quiet,
    /// The worker was lost meanwhile: what is in flight now waits for a
    /// replacement ring and will not complete on this one.
    WorkerLost,
    /// Requests were still in flight at the timeout.
    TimedOut,
}

/// Lets the vhost-user thread pause, resume and stop a queue thread.
#[derive(Debug)]
pub struct VringControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    pub(super) event: Doorbell,
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
        // A lost worker's queue parks at once (nothing is read from its
        // ring), so a pause never ends in `WorkerLost`.
        self.quiesce(Command::Pause, timeout) == Drained::Quiet
    }

    /// Stops taking guest requests and waits until every request in flight
    /// has completed, or the worker is lost (its requests then wait for a
    /// replacement, not for this wait).
    pub fn drain(&self, timeout: Duration) -> Drained {
        self.quiesce(Command::Drain, timeout)
    }

    fn quiesce(&self, how: Command, timeout: Duration) -> Drained {
        self.set(how);
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.paused {
            if how == Command::Drain && g.worker_lost {
                return Drained::WorkerLost;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Drained::TimedOut;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Drained::Quiet
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

    pub(super) fn take_replacement(&self) -> Option<WorkerEnds> {
        self.lock().replacement.take()
    }

    pub fn stop(&self) {
        self.set(Command::Stop);
    }

    pub(super) fn state(&self) -> (Command, bool) {
        let g = self.lock();
        (g.command, g.worker_lost)
    }

    /// Called by the queue thread once quiet: wait until resumed or stopped.
    pub(super) fn park(&self) -> Command {
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
