//! The vhost-user-blk device: blkmesh's own implementation of the vhost
//! crate's back-end request handler.
//!
//! We implement `VhostUserBackendReqHandlerMut` directly rather than using
//! vhost-user-backend's daemon so that every message is ours to handle:
//! memory-table changes are forwarded to the workers with the queues held
//! quiet, each virtqueue runs on its own thread with the worker's completion
//! eventfd in the same epoll set, and inflight tracking (GET/SET_INFLIGHT_FD)
//! can be added here without replacing the server.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use blkmesh_ipc::inflight::InflightRegion;
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{QueueRings, RingLayout};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_ZONED, VIRTIO_BLK_Z_HM};
use virtio_queue::{Queue, QueueT};

use crate::config::{BlkConfig, RING_MAX_SEGMENTS, ZONED_OFFSET};
use crate::memory::{MemTable, RegionDesc, MAX_REGIONS};
use crate::request::{DeviceInfo, ZoneLimits};
use crate::vring::{
    self, HangReporter, QueueControls, SharedMem, VringControl, VringSetup, WorkerEnds,
};
use crate::workers::{LinkError, MemRef, StagedLinks, WorkerLinks};

const MAX_QUEUE_SIZE: u16 = 1024;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

fn internal(msg: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg.to_string()))
}

/// Why a VMM connection is refused: it cannot use the device the export
/// is. vhost-user gives the back-end no FEATURES_OK veto, so the refusal
/// comes at the first message that shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A pre-negotiation config read that stops before the zoned
    /// characteristics: the VMM's own config space has no room for them,
    /// so it cannot pass VIRTIO_BLK_F_ZONED on to its guest (QEMU's
    /// vhost-user-blk reads 57 bytes when it starts).
    #[error(
        "host-managed zoned export refused: the VMM's virtio-blk config space ends at byte \
         {end}, before the zoned characteristics (bytes {ZONED_OFFSET}..{ZONED_MODEL_END}), so it \
         cannot pass VIRTIO_BLK_F_ZONED on to its guest, which would see an ordinary disk whose \
         writes fail (QEMU's vhost-user-blk is such a VMM; use one that passes zoned devices \
         through, e.g. a libblkio-based one)"
    )]
    ZonedConfigTooShort { end: u64 },
    /// The driver negotiated without VIRTIO_BLK_F_ZONED: a host-managed
    /// device must then fail FEATURES_OK (virtio 1.3, 5.2.3.1).
    #[error(
        "host-managed zoned export refused: the driver did not accept VIRTIO_BLK_F_ZONED \
         (features {features:#x}), so it would see an ordinary disk whose writes fail \
         (writes must be at a zone's write pointer)"
    )]
    ZonedNotAccepted { features: u64 },
}

/// Told of a refusal (`Some`) and of a VMM whose features were accepted
/// (`None`, which ends an earlier refusal).
pub type RefusalReporter = Arc<dyn Fn(Option<&Refusal>) + Send + Sync>;

/// Who a connection's device tells of what goes wrong.
#[derive(Clone)]
pub struct Reporters {
    /// A queue's worker hung or broke a ring.
    pub on_hang: HangReporter,
    /// The VMM was refused, or accepted.
    pub on_refusal: RefusalReporter,
}

/// The end of the zoned characteristics' `model` byte in the config space:
/// a config space shorter than this cannot describe a zoned device.
pub const ZONED_MODEL_END: usize = ZONED_OFFSET + 21;

/// Whether SET_FEATURES with `acked` must be refused for a device that
/// offered `offered` with zoned model `model` (`VIRTIO_BLK_Z_*`): a
/// host-managed device whose driver did not accept VIRTIO_BLK_F_ZONED.
/// A host-aware device serves such a driver as an ordinary disk (writes
/// anywhere are allowed), and a device that is not zoned never needs it.
pub fn refusal_on_features(offered: u64, model: u8, acked: u64) -> Option<Refusal> {
    let zoned = 1u64 << VIRTIO_BLK_F_ZONED;
    (offered & zoned != 0 && acked & zoned == 0 && model == VIRTIO_BLK_Z_HM as u8)
        .then_some(Refusal::ZonedNotAccepted { features: acked })
}

/// Whether a GET_CONFIG of `size` bytes at `offset`, before SET_FEATURES,
/// must be refused: for a host-managed device, a read that ends before
/// the zoned model byte is a VMM whose config space cannot carry it.
pub fn refusal_on_config(offered: u64, model: u8, offset: u32, size: u32) -> Option<Refusal> {
    let end = offset as u64 + size as u64;
    let zoned = offered & (1u64 << VIRTIO_BLK_F_ZONED) != 0;
    (zoned && model == VIRTIO_BLK_Z_HM as u8 && end < ZONED_MODEL_END as u64)
        .then_some(Refusal::ZonedConfigTooShort { end })
}

struct Running {
    control: Arc<VringControl>,
    thread: JoinHandle<Queue>,
    rings: QueueRings,
    /// Our ends of the worker's doorbells, to hand to another worker when
    /// the queue moves.
    worker_kick: Doorbell,
    worker_call: Doorbell,
}

#[derive(Default)]
struct VringState {
    size: u16,
    /// desc, avail, used as guest addresses.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    running: Option<Running>,
}

/// One VMM connection's device state.
pub struct BlkDevice {
    export: String,
    cfg: BlkConfig,
    /// Feature bits offered on this connection: fixed when it opens, even
    /// if a reopen changes the config (a guest cannot renegotiate).
    features: u64,
    dev: Arc<DeviceInfo>,
    /// The export's zone geometry, for queues of a connection that
    /// negotiated VIRTIO_BLK_F_ZONED.
    zones: Arc<ZoneLimits>,
    links: Arc<WorkerLinks>,
    /// The running queues' controls, shared with the failover thread.
    controls: Arc<QueueControls>,
    on_hang: HangReporter,
    on_refusal: RefusalReporter,
    owned: bool,
    /// SET_FEATURES was received (the zoned config fields then follow
    /// whether VIRTIO_BLK_F_ZONED was accepted).
    features_set: bool,
    acked_features: u64,
    acked_protocol: u64,
    mem: Option<SharedMem>,
    /// The inflight-tracking region the VMM keeps for us (INFLIGHT_SHMFD).
    inflight: Option<InflightRegion>,
    /// The regions behind `mem`, kept to rebuild the table on ADD/REMOVE_MEM_REGION.
    regions: Vec<(RegionDesc, File)>,
    vrings: Vec<VringState>,
}

impl BlkDevice {
    pub fn new(
        export: String,
        cfg: BlkConfig,
        dev: Arc<DeviceInfo>,
        zones: Arc<ZoneLimits>,
        links: Arc<WorkerLinks>,
        controls: Arc<QueueControls>,
        reporters: Reporters,
    ) -> Self {
        let n = cfg.num_queues as usize;
        BlkDevice {
            on_hang: reporters.on_hang,
            on_refusal: reporters.on_refusal,
            controls,
            export,
            features: cfg.features(),
            cfg,
            dev,
            zones,
            links,
            owned: false,
            features_set: false,
            acked_features: 0,
            acked_protocol: 0,
            mem: None,
            inflight: None,
            regions: Vec::new(),
            vrings: (0..n).map(|_| VringState::default()).collect(),
        }
    }

    /// Logs and reports a refusal; the error fails the VMM's message.
    fn refuse(&self, r: Refusal) -> VuError {
        tracing::error!(export = %self.export, reason = %r, "VMM refused");
        (self.on_refusal)(Some(&r));
        VuError::InvalidOperation("the VMM cannot use this export (see the frontend's log)")
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Whether the driver accepted VIRTIO_BLK_F_ZONED.
    fn zoned_acked(&self) -> bool {
        self.acked_features & (1 << VIRTIO_BLK_F_ZONED) != 0
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut VringState> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    /// Starts a queue once it has everything: kick, addresses, memory, enabled.
    fn maybe_start(&mut self, index: usize) -> VuResult<()> {
        let event_idx =
            self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let v = &mut self.vrings[index];
        if v.running.is_some() || !v.enabled || v.kick.is_none() {
            return Ok(());
        }
        let Some((desc, avail, used)) = v.addrs else {
            return Ok(());
        };
        let size = v.size;
        let table = Arc::clone(&mem.lock().unwrap_or_else(|p| p.into_inner()));
        let gm = table.guest_memory();
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(internal)?;
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_next_avail(v.base);
        queue.set_ready(true);
        if !queue.is_valid(gm) {
            tracing::warn!(export = %self.export, queue = index, "vring addresses or size invalid");
            return Err(VuError::InvalidParam);
        }
        let used_idx = queue
            .used_idx(gm, std::sync::atomic::Ordering::Acquire)
            .map_err(internal)?;
        queue.set_next_used(used_idx.0);
        // With inflight tracking, the region says what the previous
        // frontend took and never completed: the avail ring is past those
        // (and past everything completed), whatever base the VMM restored.
        let inflight = match &self.inflight {
            Some(region) => match region.queue(index as u16, size) {
                Some(tracker) => {
                    let recovered = tracker.start(used_idx.0);
                    if !recovered.heads.is_empty() {
                        tracing::info!(export = %self.export, queue = index, heads = recovered.heads.len(), "resuming requests left in flight");
                        queue.set_next_avail(used_idx.0.wrapping_add(recovered.heads.len() as u16));
                    }
                    Some((tracker, recovered))
                }
                None => {
                    tracing::warn!(export = %self.export, queue = index, "inflight region does not cover this queue");
                    None
                }
            },
            None => None,
        };

        let entries = (size as u32).next_power_of_two();
        let layout = RingLayout::new(entries, RING_MAX_SEGMENTS).map_err(internal)?;
        let rings = QueueRings::create(&format!("blkmesh-{}-q{index}", self.export), layout)
            .map_err(internal)?;
        let worker_kick = Doorbell::new().map_err(VuError::ReqHandlerError)?;
        let worker_call = Doorbell::new().map_err(VuError::ReqHandlerError)?;
        // Resubmitting what a previous frontend left in flight: its worker
        // may have died too, with some of it still in the kernel.
        let resubmits = inflight
            .as_ref()
            .is_some_and(|(_, recovered)| !recovered.heads.is_empty());
        let attached = self.links.attach(
            index as u32,
            entries,
            RING_MAX_SEGMENTS,
            rings.fd(),
            &worker_kick,
            &worker_call,
            resubmits,
        );
        // A worker that is gone (or goes while we ask) must not fail the
        // VMM's message: the queue starts detached and waits for the
        // failover thread to attach it to the replacement, which takes
        // what the guest queued meanwhile. Only a worker that answered
        // with a refusal fails the message.
        let detached = match attached {
            Ok(()) => false,
            Err(e @ (LinkError::Refused { .. } | LinkError::LimitsDiffer)) => {
                return Err(internal(e))
            }
            Err(e) => {
                tracing::warn!(export = %self.export, queue = index, "queue starts without a worker ({e}); it waits for the replacement");
                true
            }
        };
        let (requests, completions) = rings.frontend_end();
        let kick_copy = worker_kick.try_clone().map_err(VuError::ReqHandlerError)?;
        let call_copy = worker_call.try_clone().map_err(VuError::ReqHandlerError)?;
        let v = &mut self.vrings[index];
        let kick = v
            .kick
            .as_ref()
            .ok_or(VuError::InvalidParam)?
            .try_clone()
            .map_err(VuError::ReqHandlerError)?;
        set_nonblocking(&kick)?;
        let call = match &v.call {
            Some(c) => Some(c.try_clone().map_err(VuError::ReqHandlerError)?),
            None => None,
        };
        let control = VringControl::new().map_err(VuError::ReqHandlerError)?;
        if detached {
            control.mark_lost();
        }
        let zones =
            (self.acked_features & (1 << VIRTIO_BLK_F_ZONED) != 0).then(|| Arc::clone(&self.zones));
        let setup = VringSetup {
            index: index as u16,
            queue,
            mem,
            kick,
            call,
            requests,
            completions,
            worker_kick,
            worker_call,
            dev: Arc::clone(&self.dev),
            zones,
            stats: self
                .dev
                .stats
                .get(index)
                .cloned()
                .unwrap_or_else(|| crate::stats().queue(&self.export, index as u32)),
            control: Arc::clone(&control),
            on_hang: Arc::clone(&self.on_hang),
            inflight,
            recovery_zones: self.cfg.is_zoned().then(|| crate::zones::ZoneOracle {
                links: Arc::clone(&self.links),
                queue: index as u32,
            }),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vq{index}"))
            .spawn(move || vring::run(setup))
            .map_err(VuError::ReqHandlerError)?;
        self.controls.set(index, Some(Arc::clone(&control)));
        v.running = Some(Running {
            control,
            thread,
            rings,
            worker_kick: kick_copy,
            worker_call: call_copy,
        });
        tracing::debug!(export = %self.export, queue = index, size, "queue started");
        Ok(())
    }

    /// Stops a queue (draining its in-flight requests) and returns the next
    /// avail index.
    fn stop(&mut self, index: usize) -> Option<u16> {
        let running = self.vrings[index].running.take()?;
        self.controls.set(index, None);
        running.control.stop();
        let next = match running.thread.join() {
            Ok(q) => Some(q.next_avail()),
            Err(_) => None,
        };
        if let Err(e) = self.links.detach(index as u32) {
            tracing::warn!(export = %self.export, queue = index, "detach: {e}");
        }
        if let Some(n) = next {
            self.vrings[index].base = n;
        }
        next
    }

    /// Installs a new memory table: maps it, quiets the running queues so no
    /// ring entry refers to the old table, sends it to the workers, swaps it
    /// in and resumes.
    fn apply_regions(&mut self, regions: Vec<(RegionDesc, File)>) -> VuResult<()> {
        let descs: Vec<RegionDesc> = regions.iter().map(|(d, _)| *d).collect();
        let mut files = Vec::with_capacity(regions.len());
        for (_, f) in &regions {
            files.push(f.try_clone().map_err(VuError::ReqHandlerError)?);
        }
        let table = Arc::new(MemTable::new(&descs, files).map_err(|e| {
            tracing::warn!(export = %self.export, "bad memory table {descs:x?}: {e}");
            VuError::InvalidParam
        })?);
        let running: Vec<Arc<VringControl>> = self
            .vrings
            .iter()
            .filter_map(|v| v.running.as_ref().map(|r| Arc::clone(&r.control)))
            .collect();
        for c in &running {
            if !c.pause(PAUSE_TIMEOUT) {
                tracing::error!(export = %self.export, "a queue did not pause for a memory-table change");
            }
        }
        let (worker_regions, fds) = table.for_worker();
        let sent = self.links.set_mem_table(&worker_regions, &fds);
        drop(fds);
        if let Err(e) = sent {
            // Keep the old table: the VMM gets the error and the
            // connection closes, stopping the queues on memory they know.
            for c in &running {
                c.resume();
            }
            return Err(internal(e));
        }
        match &self.mem {
            Some(shared) => *shared.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&table),
            None => self.mem = Some(Arc::new(Mutex::new(Arc::clone(&table)))),
        }
        self.regions = regions;
        for c in &running {
            c.resume();
        }
        for i in 0..self.vrings.len() {
            self.maybe_start(i)?;
        }
        Ok(())
    }

    /// Moves a queue to the worker on `socket`, live: the queue thread stops
    /// taking guest requests and waits for the in-flight ones, the old
    /// worker detaches, the new one opens the graph (if it had no queue of
    /// this export yet), gets the memory table, and attaches the same ring;
    /// then the queue resumes. No request fails.
    pub fn move_queue(
        &mut self,
        queue: u32,
        worker: &str,
        socket: &str,
        plan: &blkmesh_proto::v1::ExportPlan,
    ) -> Result<(), String> {
        let table = self
            .mem
            .as_ref()
            .map(|m| Arc::clone(&m.lock().unwrap_or_else(|p| p.into_inner())));
        let mem = table.as_ref().map(|t| t.for_worker());
        let mem_ref = mem.as_ref().map(|(r, f)| (r.as_slice(), f.as_slice()));
        let Some(running) = self
            .vrings
            .get(queue as usize)
            .and_then(|v| v.running.as_ref())
        else {
            // Not running: the next start attaches to the new worker.
            return self
                .links
                .retarget(queue, worker, socket, plan, mem_ref)
                .map_err(|e| e.to_string());
        };
        if running.control.worker_lost() {
            // Its worker is gone: nothing to drain, resubmit instead.
            return self.fail_over(queue, worker, socket, plan);
        }
        if !running.control.drain(PAUSE_TIMEOUT) {
            running.control.resume();
            return Err(format!("queue {queue} did not drain"));
        }
        let result = (|| {
            self.links.detach(queue).map_err(|e| e.to_string())?;
            self.links
                .retarget(queue, worker, socket, plan, mem_ref)
                .map_err(|e| e.to_string())?;
            let layout = running.rings.layout();
            self.links
                .attach(
                    queue,
                    layout.entries(),
                    layout.max_segments(),
                    running.rings.fd(),
                    &running.worker_kick,
                    &running.worker_call,
                    false,
                )
                .map_err(|e| e.to_string())
        })();
        if result.is_err() {
            // Put the queue back on whichever worker the links point at
            // (the old one if the new one could not be reached).
            let layout = running.rings.layout();
            if let Err(e) = self.links.attach(
                queue,
                layout.entries(),
                layout.max_segments(),
                running.rings.fd(),
                &running.worker_kick,
                &running.worker_call,
                false,
            ) {
                tracing::error!(export = %self.export, queue, "re-attach after a failed move: {e}");
            }
        }
        running.control.resume();
        // Wake the new worker for anything published meanwhile.
        running.worker_kick.ring();
        result
    }

    /// Puts the graph opened by `open` in place of the current one, live:
    /// every running queue stops taking guest requests and drains, detaches
    /// from the old workers, attaches to the new ones, and resumes once
    /// `apply` has run (it updates what the queues check requests
    /// against). `open` gets the memory table and, when `close_first` is
    /// set (leaves that take one connection at a time, like a vhost-user
    /// target), is called only after the old graph has been closed; if it
    /// fails then, `reopen_old` opens the old graph again. On any failure
    /// the queues go back to the old graph and no request fails.
    pub fn reopen(
        &mut self,
        close_first: bool,
        open: &dyn Fn(Option<MemRef<'_>>) -> Result<StagedLinks, String>,
        reopen_old: &dyn Fn(Option<MemRef<'_>>) -> Result<StagedLinks, String>,
        apply: impl FnOnce(),
    ) -> Result<(), String> {
        let table = self
            .mem
            .as_ref()
            .map(|m| Arc::clone(&m.lock().unwrap_or_else(|p| p.into_inner())));
        let mem = table.as_ref().map(|t| t.for_worker());
        let mem_ref = mem.as_ref().map(|(r, f)| (r.as_slice(), f.as_slice()));
        let staged = if close_first {
            None
        } else {
            Some(open(mem_ref)?)
        };

        let running: Vec<usize> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].running.is_some())
            .collect();
        let control = |i: usize| self.vrings[i].running.as_ref().map(|r| &r.control);
        let resume_all = |this: &Self| {
            for &i in &running {
                if let Some(r) = this.vrings[i].running.as_ref() {
                    r.control.resume();
                    r.worker_kick.ring();
                }
            }
        };
        for &i in &running {
            if !control(i).is_some_and(|c| c.drain(PAUSE_TIMEOUT)) {
                resume_all(self);
                return Err(format!("queue {i} did not drain"));
            }
        }
        for &i in &running {
            if let Err(e) = self.links.detach(i as u32) {
                // The old worker may be gone; the queue is quiet either way.
                tracing::warn!(export = %self.export, queue = i, "detach for reopen: {e}");
            }
        }
        let (staged, mut result) = match staged {
            Some(s) => (s, Ok(())),
            None => {
                drop(self.links.swap(StagedLinks::empty()));
                match open(mem_ref) {
                    Ok(s) => (s, Ok(())),
                    Err(e) => match reopen_old(mem_ref) {
                        Ok(old) => (old, Err(e)),
                        Err(e2) => {
                            tracing::error!(export = %self.export, "reopening the old graph failed too: {e2}");
                            return Err(format!("{e}; reopening the old graph: {e2}"));
                        }
                    },
                }
            }
        };
        let old = self.links.swap(staged);
        let attach_all = |this: &Self| -> Result<(), String> {
            for &i in &running {
                if let Some(r) = this.vrings[i].running.as_ref() {
                    let layout = r.rings.layout();
                    this.links
                        .attach(
                            i as u32,
                            layout.entries(),
                            layout.max_segments(),
                            r.rings.fd(),
                            &r.worker_kick,
                            &r.worker_call,
                            false,
                        )
                        .map_err(|e| format!("queue {i}: {e}"))?;
                }
            }
            Ok(())
        };
        if let Err(e) = attach_all(self) {
            tracing::warn!(export = %self.export, "attach after reopen: {e}; going back");
            for &i in &running {
                let _ = self.links.detach(i as u32);
            }
            drop(self.links.swap(old));
            if let Err(e) = attach_all(self) {
                tracing::error!(export = %self.export, "re-attach to the old graph: {e}");
            }
            resume_all(self);
            return Err(e);
        }
        if result.is_ok() {
            apply();
        } else {
            result = result.map_err(|e| format!("{e} (the old graph was reopened)"));
        }
        resume_all(self);
        drop(old);
        result
    }

    /// Replaces the config space offered to this connection (after a
    /// reopen); the caller notifies the VMM.
    pub fn set_config(&mut self, cfg: BlkConfig) {
        self.cfg = cfg;
    }

    /// Whether `queue` waits for a replacement worker.
    pub fn worker_lost(&self, queue: u32) -> bool {
        self.vrings
            .get(queue as usize)
            .and_then(|v| v.running.as_ref())
            .is_some_and(|r| r.control.worker_lost())
    }

    /// Moves a queue whose worker was lost to the worker on `socket`: opens
    /// the graph there with the memory table, attaches a fresh ring pair
    /// (the old one may hold anything the dead worker left), and hands it
    /// to the queue thread, which resubmits every in-flight request. On
    /// failure the queue keeps waiting; the caller tries again.
    pub fn fail_over(
        &mut self,
        queue: u32,
        worker: &str,
        socket: &str,
        plan: &blkmesh_proto::v1::ExportPlan,
    ) -> Result<(), String> {
        let table = self
            .mem
            .as_ref()
            .map(|m| Arc::clone(&m.lock().unwrap_or_else(|p| p.into_inner())));
        let mem = table.as_ref().map(|t| t.for_worker());
        let mem_ref = mem.as_ref().map(|(r, f)| (r.as_slice(), f.as_slice()));
        self.links
            .retarget(queue, worker, socket, plan, mem_ref)
            .map_err(|e| e.to_string())?;
        let export = self.export.clone();
        let Some(running) = self
            .vrings
            .get_mut(queue as usize)
            .and_then(|v| v.running.as_mut())
        else {
            // Not running: the next start attaches to the new link.
            return Ok(());
        };
        let layout = running.rings.layout();
        let rings = QueueRings::create(&format!("blkmesh-{export}-q{queue}"), layout)
            .map_err(|e| e.to_string())?;
        let kick = Doorbell::new().map_err(|e| e.to_string())?;
        let call = Doorbell::new().map_err(|e| e.to_string())?;
        // Its requests are resubmitted: the lost worker's I/O still in the
        // kernel must finish first.
        self.links
            .attach(
                queue,
                layout.entries(),
                layout.max_segments(),
                rings.fd(),
                &kick,
                &call,
                true,
            )
            .map_err(|e| e.to_string())?;
        // A zoned export: which in-flight writes the lost worker applied.
        let zones = self.cfg.is_zoned().then(|| crate::zones::ZoneOracle {
            links: Arc::clone(&self.links),
            queue,
        });
        let (requests, completions) = rings.frontend_end();
        let ends = WorkerEnds {
            zones,
            requests,
            completions,
            worker_kick: kick.try_clone().map_err(|e| e.to_string())?,
            worker_call: call.try_clone().map_err(|e| e.to_string())?,
        };
        running.rings = rings;
        running.worker_kick = kick;
        running.worker_call = call;
        running.control.replace_worker(ends);
        tracing::info!(export = %export, queue, worker, "queue failed over");
        Ok(())
    }

    /// Stops everything (the VMM went away).
    pub fn disconnect(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }
}

/// Kick and call fds must be eventfds: anything else would make the queue
/// thread's epoll fail (and the queue stop answering) or have it write
/// into some file.
fn check_eventfd(export: &str, what: &str, f: &File) -> VuResult<()> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()));
    match link {
        Ok(p) if p.as_os_str() == "anon_inode:[eventfd]" => Ok(()),
        other => {
            tracing::warn!(
                export,
                "vring {what} fd refused: not an eventfd ({other:?})"
            );
            Err(VuError::InvalidParam)
        }
    }
}

fn set_nonblocking(f: &File) -> VuResult<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(f, FcntlArg::F_GETFL).map_err(internal)?;
    fcntl(
        f,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(internal)?;
    Ok(())
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        self.owned = false;
        self.features_set = false;
        self.acked_features = 0;
        self.acked_protocol = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        for v in &mut self.vrings {
            *v = VringState::default();
        }
        self.features_set = false;
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.get_features()? != 0 {
            return Err(VuError::InvalidParam);
        }
        tracing::debug!(export = %self.export, features = format_args!("{features:#x}"), "SET_FEATURES");
        if let Some(r) = refusal_on_features(self.features, self.cfg.zoned_model(), features) {
            return Err(self.refuse(r));
        }
        self.acked_features = features;
        self.features_set = true;
        (self.on_refusal)(None);
        if !self.protocol_features_acked() {
            // Without protocol features, rings are enabled from the start.
            for i in 0..self.vrings.len() {
                self.vrings[i].enabled = true;
                self.maybe_start(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(files) {
            regions.push((
                RegionDesc {
                    gpa: r.guest_phys_addr,
                    size: r.memory_size,
                    vmm_addr: r.user_addr,
                    fd_offset: r.mmap_offset,
                },
                f,
            ));
        }
        if regions.len() != ctx.len() {
            return Err(VuError::InvalidParam);
        }
        self.apply_regions(regions)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.cfg.queue_size.min(MAX_QUEUE_SIZE);
        if num == 0 || num > max as u32 || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let mem = self.mem.clone().ok_or(VuError::InvalidParam)?;
        let table = Arc::clone(&mem.lock().unwrap_or_else(|p| p.into_inner()));
        let tr = |va| table.vmm_to_gpa(va).ok_or(VuError::InvalidParam);
        let addrs = (tr(descriptor)?, tr(available)?, tr(used)?);
        self.vring(index)?.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.running.is_some() {
            return Err(VuError::InvalidOperation("queue is running"));
        }
        v.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        if index as usize >= self.vrings.len() {
            return Err(VuError::InvalidParam);
        }
        self.stop(index as usize);
        let protocol = self.protocol_features_acked();
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        v.call = None;
        if protocol {
            v.enabled = false;
        }
        Ok(VhostUserVringState::new(index, v.base as u32))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        if let Some(f) = &fd {
            check_eventfd(&self.export, "kick", f)?;
        }
        let v = self.vring(index as u32)?;
        v.kick = fd;
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        if let Some(f) = &fd {
            check_eventfd(&self.export, "call", f)?;
        }
        let running = self.vring(index as u32)?.running.is_some();
        if running {
            // The thread holds its own copy; restart the queue to pick it up.
            self.stop(index as usize);
            self.vrings[index as usize].call = fd;
            return self.maybe_start(index as usize);
        }
        self.vrings[index as usize].call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_protocol_features()?.bits();
        if features & !offered != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.protocol_features_acked() {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop(index as usize);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        tracing::debug!(export = %self.export, offset, size, features_set = self.features_set, "GET_CONFIG");
        if !self.features_set {
            if let Some(r) = refusal_on_config(self.features, self.cfg.zoned_model(), offset, size)
            {
                return Err(self.refuse(r));
            }
        }
        let mut space = self.cfg.config_space();
        if self.features_set && !self.zoned_acked() {
            // virtio 1.3, 5.2.5.1: zoned characteristics read as zero
            // when VIRTIO_BLK_F_ZONED was not accepted.
            space[crate::config::ZONED_OFFSET..].fill(0);
        }
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(VuError::InvalidParam)?;
        if end > space.len() {
            // Beyond what we implement reads as zeroes, like QEMU.
            let mut out = vec![0u8; size as usize];
            if start < space.len() {
                out[..space.len() - start].copy_from_slice(&space[start..]);
            }
            return Ok(out);
        }
        Ok(space[start..end].to_vec())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // The writeback field is the only writable one; we always flush as asked.
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("shared objects not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let region = InflightRegion::create(inflight.num_queues, inflight.queue_size).map_err(|e| {
            let (n, qs) = (inflight.num_queues, inflight.queue_size);
            tracing::warn!(export = %self.export, queues = n, queue_size = qs, "GET_INFLIGHT_FD: {e}");
            VuError::InvalidParam
        })?;
        let file = File::from(
            region
                .fd()
                .try_clone_to_owned()
                .map_err(VuError::ReqHandlerError)?,
        );
        let reply = VhostUserInflight {
            mmap_size: region.size(),
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::from_peer(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| {
            let (n, qs) = (inflight.num_queues, inflight.queue_size);
            tracing::warn!(export = %self.export, queues = n, queue_size = qs, "SET_INFLIGHT_FD: {e}");
            VuError::InvalidParam
        })?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy not supported"));
        }
        if self.regions.len() >= MAX_REGIONS {
            return Err(VuError::InvalidParam);
        }
        let mut regions = Vec::with_capacity(self.regions.len() + 1);
        for (d, f) in &self.regions {
            regions.push((*d, f.try_clone().map_err(VuError::ReqHandlerError)?));
        }
        regions.push((
            RegionDesc {
                gpa: region.guest_phys_addr,
                size: region.memory_size,
                vmm_addr: region.user_addr,
                fd_offset: region.mmap_offset,
            },
            fd,
        ));
        self.apply_regions(regions)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let pos = self
            .regions
            .iter()
            .position(|(d, _)| d.gpa == region.guest_phys_addr && d.size == region.memory_size)
            .ok_or(VuError::InvalidParam)?;
        let mut regions = Vec::with_capacity(self.regions.len());
        for (i, (d, f)) in self.regions.iter().enumerate() {
            if i != pos {
                regions.push((*d, f.try_clone().map_err(VuError::ReqHandlerError)?));
            }
        }
        self.apply_regions(regions)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging not supported"))
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        self.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_Z_HA, VIRTIO_BLK_Z_NONE};

    const ZONED: u64 = 1 << VIRTIO_BLK_F_ZONED;
    const BASE: u64 = 1 << 32 | 1 << 30 | 1 << 9;
    const HM: u8 = VIRTIO_BLK_Z_HM as u8;
    const HA: u8 = VIRTIO_BLK_Z_HA as u8;
    const NONE: u8 = VIRTIO_BLK_Z_NONE as u8;

    #[test]
    fn host_managed_needs_a_driver_that_accepts_zoned() {
        assert_eq!(
            refusal_on_features(BASE | ZONED, HM, BASE),
            Some(Refusal::ZonedNotAccepted { features: BASE })
        );
        assert_eq!(refusal_on_features(BASE | ZONED, HM, BASE | ZONED), None);
    }

    #[test]
    fn host_aware_and_regular_devices_serve_drivers_without_zoned() {
        assert_eq!(refusal_on_features(BASE | ZONED, HA, BASE), None);
        assert_eq!(refusal_on_features(BASE, NONE, BASE), None);
        // Not offered (no valid zone geometry): nothing to refuse.
        assert_eq!(refusal_on_features(BASE, HM, BASE), None);
    }

    #[test]
    fn a_config_space_without_the_zoned_model_is_refused_for_host_managed() {
        // QEMU's vhost-user-blk reads 57 bytes when it starts.
        assert_eq!(
            refusal_on_config(BASE | ZONED, HM, 0, 57),
            Some(Refusal::ZonedConfigTooShort { end: 57 })
        );
        assert!(refusal_on_config(BASE | ZONED, HM, 0, ZONED_MODEL_END as u32).is_none());
        assert!(refusal_on_config(BASE | ZONED, HM, 0, 96).is_none());
        assert!(refusal_on_config(BASE | ZONED, HA, 0, 57).is_none());
        assert!(refusal_on_config(BASE, NONE, 0, 57).is_none());
        // Offsets do not overflow.
        assert!(refusal_on_config(BASE | ZONED, HM, u32::MAX, u32::MAX).is_none());
    }

    #[test]
    fn refusals_name_the_reason() {
        let r = Refusal::ZonedConfigTooShort { end: 57 }.to_string();
        assert!(r.contains("VIRTIO_BLK_F_ZONED") && r.contains("57"), "{r}");
        let r = Refusal::ZonedNotAccepted { features: BASE }.to_string();
        assert!(r.contains("did not accept VIRTIO_BLK_F_ZONED"), "{r}");
    }
}
