//! The queue host of blkmesh's frontend: each running virtqueue is a
//! thread ([`crate::vring`]) passing requests over a shared-memory ring
//! pair to the worker process that serves it ([`crate::workers`]).
//!
//! [`WorkerQueues`] starts and stops queues for the vhost-user handler
//! ([`crate::handler`], through [`QueueHost`]) and moves them between
//! workers (`relocation`: move, reopen, fail-over).

pub mod owner;
pub mod relocation;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{QueueRings, RingLayout};
use blkmesh_proto::v1::ExportPlan;
use virtio_queue::{Queue, QueueT};

use self::owner::QueueOwner;
use crate::config::{BlkConfig, RING_MAX_SEGMENTS};
use crate::memory::MemTable;
use crate::queue_host::{HostError, QueueHost, QueueStart};
use crate::request::{DeviceInfo, ZoneLimits};
use crate::vring::{
    self, Drained, HangReporter, QueueControls, SharedMem, VringControl, VringSetup, WorkerEnds,
};
use crate::workers::{LinkError, MemRef, WorkerLinks};

/// How long a queue may take to pause or drain.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a stopping queue whose worker is lost looks for the
/// replacement.
const STOP_RETRY: Duration = Duration::from_millis(20);

/// Where a queue goes: the worker the plan names for it.
#[derive(Clone, Copy)]
pub struct Destination<'a> {
    pub worker: &'a str,
    /// The worker's socket.
    pub socket: &'a str,
    pub plan: &'a ExportPlan,
}

impl<'a> Destination<'a> {
    /// Where `plan` places `queue`, if it does.
    pub fn of_queue(plan: &'a ExportPlan, queue: u32) -> Option<Self> {
        let ep = plan.queues.iter().find(|e| e.queue == queue)?;
        Some(Destination {
            worker: &ep.worker,
            socket: &ep.worker_socket,
            plan,
        })
    }
}

/// A queue's ring pair with one worker, and our ends of its doorbells.
struct WorkerRing {
    rings: QueueRings,
    /// Us → worker.
    kick: Doorbell,
    /// Worker → us.
    call: Doorbell,
}

impl WorkerRing {
    fn create(export: &str, queue: usize, layout: RingLayout) -> Result<Self, HostError> {
        let rings = QueueRings::create(&format!("blkmesh-{export}-q{queue}"), layout)
            .map_err(|e| HostError::Backend(Box::new(e)))?;
        let doorbell = || {
            Doorbell::new().map_err(|source| HostError::Resource {
                what: "doorbell",
                source,
            })
        };
        Ok(WorkerRing {
            rings,
            kick: doorbell()?,
            call: doorbell()?,
        })
    }

    /// Hands the ring to the worker `links` point `queue` at. With
    /// `settle`, the worker first waits out a lost worker's I/O.
    fn attach(&self, links: &WorkerLinks, queue: usize, settle: bool) -> Result<(), LinkError> {
        let layout = self.rings.layout();
        let attach = blkmesh_proto::ipc::v1::AttachQueue {
            queue: queue as u32,
            entries: layout.entries(),
            max_segments: layout.max_segments(),
            settle,
        };
        links.attach(attach, self.rings.fd(), &self.kick, &self.call)
    }

    /// The queue thread's ends of the ring.
    fn ends(&self, zones: Option<crate::zones::ZoneOracle>) -> std::io::Result<WorkerEnds> {
        let (requests, completions) = self.rings.frontend_end();
        Ok(WorkerEnds {
            requests,
            completions,
            worker_kick: self.kick.try_clone()?,
            worker_call: self.call.try_clone()?,
            zones,
        })
    }
}

/// A queue whose thread runs.
struct Running {
    control: Arc<VringControl>,
    thread: JoinHandle<Queue>,
    /// Kept to hand to another worker when the queue moves.
    ring: WorkerRing,
}

/// How long a queue waits for another VMM connection's queues to stop
/// before its start is refused.
const OWNER_WAIT: Duration = Duration::from_secs(3);

/// The running queues of one VMM connection, and the workers they use.
pub struct WorkerQueues {
    export: String,
    dev: Arc<DeviceInfo>,
    /// The export's zone geometry, for queues of a connection that
    /// negotiated VIRTIO_BLK_F_ZONED.
    zones: Arc<ZoneLimits>,
    /// The export's graph is zoned (its config space says so).
    zoned_export: bool,
    links: Arc<WorkerLinks>,
    /// The running queues' controls, shared with the failover thread.
    controls: Arc<QueueControls>,
    on_hang: HangReporter,
    mem: Option<SharedMem>,
    running: Vec<Option<Running>>,
    /// The export's queue owner and this connection's id: its queues start
    /// only while no other connection's run (see [`owner`]).
    owner: Option<(Arc<QueueOwner>, u64)>,
    /// The export's plan as the failover thread sees it: where a stopping
    /// queue whose worker is lost finds the replacement.
    plan: Option<Arc<Mutex<ExportPlan>>>,
    /// The connection's dirty log: a stop while it logs is a migration's.
    log: Option<Arc<crate::dirty_log::LogSink>>,
}

impl WorkerQueues {
    pub fn new(
        export: String,
        cfg: &BlkConfig,
        dev: Arc<DeviceInfo>,
        zones: Arc<ZoneLimits>,
        links: Arc<WorkerLinks>,
        controls: Arc<QueueControls>,
        on_hang: HangReporter,
    ) -> Self {
        WorkerQueues {
            export,
            dev,
            zones,
            zoned_export: cfg.is_zoned(),
            links,
            controls,
            on_hang,
            mem: None,
            running: (0..cfg.num_queues).map(|_| None).collect(),
            owner: None,
            plan: None,
            log: None,
        }
    }

    /// Where the queues' replacement workers are found when a stop must
    /// fail a queue over (see [`QueueHost::stop_queue`]).
    pub fn with_plan(mut self, plan: Arc<Mutex<ExportPlan>>) -> Self {
        self.plan = Some(plan);
        self
    }

    /// These are connection `conn`'s queues; `owner` says which connection
    /// of the export may run queues.
    pub fn with_owner(mut self, owner: Arc<QueueOwner>, conn: u64) -> Self {
        self.owner = Some((owner, conn));
        self
    }

    /// Gives the workers `table`, unless another connection's queues run
    /// (see [`QueueOwner::share_table`]): then it waits for this
    /// connection's first queue.
    fn share_table(&self, table: &MemTable) -> Result<(), LinkError> {
        let send = || {
            let (worker_regions, fds) = table.for_worker();
            self.links.set_mem_table(&worker_regions, &fds)
        };
        match &self.owner {
            None => send(),
            Some((owner, conn)) => owner.share_table(*conn, send).unwrap_or_else(|| {
                tracing::info!(export = %self.export, conn, "memory table kept until this connection's queues start (another connection's run)");
                Ok(())
            }),
        }
    }

    /// Starts a queue this connection may run (see [`QueueHost::start_queue`]).
    fn start_claimed(&mut self, start: QueueStart) -> Result<(), HostError> {
        let index = start.index as usize;
        let mem = self.mem.clone().ok_or(HostError::NoMemory)?;
        if index >= self.running.len() {
            return Err(HostError::NoSuchQueue(index));
        }
        if let Some((owner, conn)) = &self.owner {
            if !owner.holds_table(*conn) {
                // Set while another connection ran, or replaced since by
                // one that did.
                let table = Arc::clone(&mem.lock().unwrap_or_else(|p| p.into_inner()));
                self.share_table(&table)
                    .map_err(|e| HostError::Backend(Box::new(e)))?;
            }
        }
        self.log = Some(Arc::clone(&start.log));
        let resubmits = start.resubmits();
        let entries = (start.queue.size() as u32).next_power_of_two();
        let layout = RingLayout::new(entries, RING_MAX_SEGMENTS)
            .map_err(|e| HostError::Backend(Box::new(e)))?;
        let ring = WorkerRing::create(&self.export, index, layout)?;
        // Resubmitting what a previous frontend left in flight: its worker
        // may have died too, with some of it still in the kernel.
        let attached = ring.attach(&self.links, index, resubmits);
        // A worker that is gone (or goes while we ask) must not fail the
        // VMM's message: the queue starts detached and waits for the
        // failover thread to attach it to the replacement, which takes
        // what the guest queued meanwhile. Only a worker that answered
        // with a refusal fails the message.
        let detached = match attached {
            Ok(()) => false,
            Err(e @ (LinkError::Refused { .. } | LinkError::LimitsDiffer)) => {
                return Err(HostError::Backend(Box::new(e)))
            }
            Err(e) => {
                tracing::warn!(export = %self.export, queue = index, "queue starts without a worker ({e}); it waits for the replacement");
                true
            }
        };
        let resource = |what| move |source| HostError::Resource { what, source };
        let ends = ring.ends(None).map_err(resource("doorbell"))?;
        let control = VringControl::new().map_err(resource("queue control"))?;
        if detached {
            control.mark_lost();
        }
        let setup = VringSetup {
            index: start.index,
            queue: start.queue,
            mem,
            kick: start.kick,
            call: start.call,
            requests: ends.requests,
            completions: ends.completions,
            worker_kick: ends.worker_kick,
            worker_call: ends.worker_call,
            dev: Arc::clone(&self.dev),
            zones: start.zoned.then(|| Arc::clone(&self.zones)),
            stats: self
                .dev
                .stats
                .get(index)
                .cloned()
                .unwrap_or_else(|| crate::stats().queue(&self.export, index as u32)),
            control: Arc::clone(&control),
            on_hang: Arc::clone(&self.on_hang),
            inflight: start.inflight,
            recovery_zones: self.zone_oracle(index),
            log: start.log,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vq{index}"))
            .spawn(move || vring::run(setup))
            .map_err(resource("queue thread"))?;
        self.controls.set(index, Some(Arc::clone(&control)));
        self.running[index] = Some(Running {
            control,
            thread,
            ring,
        });
        Ok(())
    }

    fn running(&self, queue: usize) -> Option<&Running> {
        self.running.get(queue).and_then(Option::as_ref)
    }

    /// For a zoned export: where a queue asks which in-flight writes a
    /// lost worker (or frontend) applied.
    fn zone_oracle(&self, queue: usize) -> Option<crate::zones::ZoneOracle> {
        self.zoned_export.then(|| crate::zones::ZoneOracle {
            links: Arc::clone(&self.links),
            queue: queue as u32,
        })
    }

    /// Stops a queue's thread: what is still in flight (the worker lost,
    /// or too slow) stays in the inflight region for a VMM that reconnects.
    fn halt(&mut self, index: usize) -> Option<u16> {
        let running = self.running.get_mut(index)?.take()?;
        self.controls.set(index, None);
        running.control.stop();
        let next = match running.thread.join() {
            Ok(q) => Some(q.next_avail()),
            Err(_) => None,
        };
        if let Err(e) = self.links.detach(index as u32) {
            tracing::warn!(export = %self.export, queue = index, "detach: {e}");
        }
        if let Some((owner, conn)) = &self.owner {
            owner.stopped(*conn);
        }
        next
    }

    /// Drains a queue before it stops. While a migration logs dirty pages,
    /// a lost worker's requests are failed over here, on the vhost-user
    /// thread (the failover thread would need this connection's device,
    /// which the VMM's message holds): QEMU 10 does not carry the inflight
    /// region to the destination. Otherwise they stay in the inflight
    /// region, which the VMM hands back when it starts the queue again (a
    /// reset, a reconnect): waiting here would hold its main loop.
    fn complete_in_flight(&mut self, index: usize) {
        let Some(control) = self.running(index).map(|r| Arc::clone(&r.control)) else {
            return;
        };
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match control.drain(left) {
                Drained::Quiet => return,
                Drained::TimedOut => break,
                Drained::WorkerLost if left.is_zero() => break,
                Drained::WorkerLost => {}
            }
            let migrating = self.log.as_ref().is_some_and(|l| l.active().is_some());
            if !migrating {
                return;
            }
            let Some(plan) = self
                .plan
                .as_ref()
                .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone())
            else {
                break;
            };
            let failed_over = Destination::of_queue(&plan, index as u32)
                .map(|to| self.fail_over(index as u32, to));
            if !matches!(failed_over, Some(Ok(()))) {
                // The replacement is not up yet.
                std::thread::sleep(STOP_RETRY);
            }
        }
        tracing::error!(export = %self.export, queue = index, "requests still in flight as the queue stops; they are left to the VMM");
    }

    /// Runs `f` with the memory table as the workers get it, if any.
    fn with_worker_mem<T>(&mut self, f: impl FnOnce(&mut Self, Option<MemRef<'_>>) -> T) -> T {
        let table: Option<Arc<MemTable>> = self
            .mem
            .as_ref()
            .map(|m| Arc::clone(&m.lock().unwrap_or_else(|p| p.into_inner())));
        let mem = table.as_ref().map(|t| t.for_worker());
        let mem_ref = mem.as_ref().map(|(r, f)| (r.as_slice(), f.as_slice()));
        f(self, mem_ref)
    }
}

impl QueueHost for WorkerQueues {
    fn is_running(&self, index: usize) -> bool {
        self.running(index).is_some()
    }

    fn start_queue(&mut self, start: QueueStart) -> Result<(), HostError> {
        let Some((owner, conn)) = self.owner.clone() else {
            return self.start_claimed(start);
        };
        // Another connection's queues run: a VMM that reconnected while
        // its old connection still winds down, or a migration's source
        // that has not stopped its rings yet. Wait a little.
        let deadline = std::time::Instant::now() + OWNER_WAIT;
        while !owner.claim(conn) {
            if std::time::Instant::now() >= deadline {
                return Err(HostError::Busy);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = self.start_claimed(start);
        if started.is_err() {
            owner.stopped(conn);
        }
        started
    }

    /// Every request the queue took completes first; during a migration,
    /// on a replacement if its worker is lost (see `complete_in_flight`).
    fn stop_queue(&mut self, index: usize) -> Option<u16> {
        self.complete_in_flight(index);
        self.halt(index)
    }

    fn halt_queue(&mut self, index: usize) {
        self.halt(index);
    }

    fn set_memory(&mut self, table: Arc<MemTable>) -> Result<(), HostError> {
        let running: Vec<Arc<VringControl>> = self
            .running
            .iter()
            .flatten()
            .map(|r| Arc::clone(&r.control))
            .collect();
        for c in &running {
            if !c.pause(PAUSE_TIMEOUT) {
                tracing::error!(export = %self.export, "a queue did not pause for a memory-table change");
            }
        }
        let sent = self.share_table(&table);
        if let Err(e) = sent {
            // Keep the old table: the queues go on with memory they know.
            for c in &running {
                c.resume();
            }
            return Err(HostError::Backend(Box::new(e)));
        }
        match &self.mem {
            Some(shared) => *shared.lock().unwrap_or_else(|p| p.into_inner()) = table,
            None => self.mem = Some(Arc::new(Mutex::new(table))),
        }
        for c in &running {
            c.resume();
        }
        Ok(())
    }

    fn set_config(&mut self, cfg: &BlkConfig) {
        self.zoned_export = cfg.is_zoned();
    }
}

/// Kept so that a dropped host never leaves a queue thread behind.
impl Drop for WorkerQueues {
    fn drop(&mut self) {
        for i in 0..self.running.len() {
            self.halt(i);
        }
    }
}
