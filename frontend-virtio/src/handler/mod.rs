//! The vhost-user-blk protocol handler: blkmesh's own implementation of
//! the vhost crate's back-end request handler.
//!
//! We implement `VhostUserBackendReqHandlerMut` directly rather than using
//! vhost-user-backend's daemon so that every message is ours to handle:
//! memory-table changes are forwarded with the queues held quiet, each
//! virtqueue runs on its own thread, and inflight tracking
//! (GET/SET_INFLIGHT_FD) is ours. This module knows the protocol only:
//! what runs a queue once it is set up is a [`QueueHost`] (in blkmesh,
//! [`crate::queues::WorkerQueues`]).

mod refusal;

use std::fs::File;
use std::sync::Arc;

use blkmesh_ipc::inflight::InflightRegion;
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
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_ZONED;
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;

use crate::config::{BlkConfig, ZonedCharacteristics};
use crate::dirty_log::{DirtyLog, LogSink};
use crate::memory::{MemTable, RegionDesc, MAX_REGIONS};
use crate::queue_host::{HostError, QueueHost, QueueStart};

pub use refusal::{
    refusal_on_config, refusal_on_features, Refusal, RefusalReporter, ZONED_MODEL_END,
};

/// The largest queue the device takes.
pub const MAX_QUEUE_SIZE: u16 = 1024;

fn internal(msg: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg.to_string()))
}

impl From<HostError> for VuError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Resource { source, .. } => VuError::ReqHandlerError(source),
            e => internal(e),
        }
    }
}

/// A virtqueue as the VMM described it.
#[derive(Default)]
struct VringState {
    size: u16,
    /// desc, avail, used as guest addresses.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
}

/// One VMM connection's device state; `H` runs its queues.
pub struct DeviceHandler<H: QueueHost> {
    export: String,
    cfg: BlkConfig,
    /// Feature bits offered on this connection: fixed when it opens, even
    /// if a reopen changes the config (a guest cannot renegotiate).
    features: u64,
    on_refusal: RefusalReporter,
    owned: bool,
    /// SET_FEATURES was received (the zoned config fields then follow
    /// whether VIRTIO_BLK_F_ZONED was accepted).
    features_set: bool,
    acked_features: u64,
    acked_protocol: u64,
    /// The memory table the host runs the queues on.
    table: Option<Arc<MemTable>>,
    /// The inflight-tracking region the VMM keeps for us (INFLIGHT_SHMFD).
    inflight: Option<InflightRegion>,
    /// The regions behind `table`, kept to rebuild it on ADD/REMOVE_MEM_REGION.
    regions: Vec<(RegionDesc, File)>,
    vrings: Vec<VringState>,
    /// The dirty log a migrating VMM shares ([`crate::dirty_log`]).
    log: Arc<LogSink>,
    host: H,
}

impl<H: QueueHost> DeviceHandler<H> {
    pub fn new(export: String, cfg: BlkConfig, on_refusal: RefusalReporter, host: H) -> Self {
        let n = cfg.num_queues as usize;
        DeviceHandler {
            export,
            features: cfg.features(),
            cfg,
            on_refusal,
            owned: false,
            features_set: false,
            acked_features: 0,
            acked_protocol: 0,
            table: None,
            inflight: None,
            regions: Vec::new(),
            vrings: (0..n).map(|_| VringState::default()).collect(),
            log: Arc::default(),
            host,
        }
    }

    /// What runs the queues.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// What runs the queues, to move them (see [`crate::queues`]).
    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }

    /// Replaces the config space offered to this connection (after a
    /// reopen); the caller notifies the VMM.
    pub fn set_config(&mut self, cfg: BlkConfig) {
        self.host.set_config(&cfg);
        self.cfg = cfg;
    }

    /// Stops everything at once (the VMM went away): what is in flight on
    /// a lost worker stays in the inflight region for the VMM that
    /// reconnects.
    pub fn disconnect(&mut self) {
        for i in 0..self.vrings.len() {
            self.host.halt_queue(i);
        }
    }

    /// Stops every queue, its requests completed (a reset).
    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
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
        let Some(table) = self.table.clone() else {
            return Ok(());
        };
        if self.host.is_running(index) {
            return Ok(());
        }
        let v = &self.vrings[index];
        if !v.enabled || v.kick.is_none() {
            return Ok(());
        }
        let Some((desc, avail, used)) = v.addrs else {
            return Ok(());
        };
        let size = v.size;
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
        let v = &self.vrings[index];
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
        self.host.start_queue(QueueStart {
            index: index as u16,
            queue,
            kick,
            call,
            inflight,
            zoned: self.zoned_acked(),
            log: Arc::clone(&self.log),
        })?;
        tracing::debug!(export = %self.export, queue = index, size, "queue started");
        Ok(())
    }

    /// Stops a queue (draining its in-flight requests) and keeps its next
    /// avail index as the base to restart from.
    fn stop(&mut self, index: usize) {
        let stopping = std::time::Instant::now();
        if let Some(n) = self.host.stop_queue(index) {
            self.vrings[index].base = n;
            // At a migration's switch-over, this is blkmesh's share of the
            // guest's downtime.
            let stop_us = stopping.elapsed().as_micros() as u64;
            tracing::info!(export = %self.export, queue = index, stop_us, "queue stopped");
        }
    }

    /// Installs a new memory table: maps it, has the host put it in place
    /// (the running queues held quiet meanwhile), and starts the queues
    /// that waited for memory.
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
        // Keep the old table on failure: the VMM gets the error and the
        // connection closes, stopping the queues on memory they know.
        self.host.set_memory(Arc::clone(&table))?;
        self.table = Some(table);
        self.regions = regions;
        for i in 0..self.vrings.len() {
            self.maybe_start(i)?;
        }
        Ok(())
    }

    /// Clones the region files but the one at `skip`, for a new table.
    fn cloned_regions(&self, skip: Option<usize>) -> VuResult<Vec<(RegionDesc, File)>> {
        let mut regions = Vec::with_capacity(self.regions.len() + 1);
        for (i, (d, f)) in self.regions.iter().enumerate() {
            if Some(i) != skip {
                regions.push((*d, f.try_clone().map_err(VuError::ReqHandlerError)?));
            }
        }
        Ok(regions)
    }
}

fn region_desc(gpa: u64, size: u64, vmm_addr: u64, fd_offset: u64) -> RegionDesc {
    RegionDesc {
        gpa,
        size,
        vmm_addr,
        fd_offset,
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

impl<H: QueueHost> VhostUserBackendReqHandlerMut for DeviceHandler<H> {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        self.owned = false;
        self.features_set = false;
        self.acked_features = 0;
        self.log.set_logging(false);
        self.acked_protocol = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        for v in &mut self.vrings {
            *v = VringState::default();
        }
        self.features_set = false;
        self.acked_features = 0;
        self.log.set_logging(false);
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits())
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
        // LOG_ALL comes and goes while the rings run (a migration starts,
        // is cancelled): the queues see it at their next completion.
        self.log
            .set_logging(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
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
                region_desc(r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset),
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
        let table = self.table.as_ref().ok_or(VuError::InvalidParam)?;
        let tr = |va| table.vmm_to_gpa(va).ok_or(VuError::InvalidParam);
        let addrs = (tr(descriptor)?, tr(available)?, tr(used)?);
        self.vring(index)?.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        if self.host.is_running(index as usize) {
            return Err(VuError::InvalidOperation("queue is running"));
        }
        self.vring(index)?.base = base as u16;
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
        self.vring(index as u32)?;
        if self.host.is_running(index as usize) {
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
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD)
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
        let mut config = self.cfg.config_space();
        if self.features_set && !self.zoned_acked() {
            // virtio 1.3, 5.2.5.1: zoned characteristics read as zero
            // when VIRTIO_BLK_F_ZONED was not accepted.
            config.zoned = ZonedCharacteristics::default();
        }
        let space = config.as_slice();
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
        let mut regions = self.cloned_regions(None)?;
        regions.push((
            region_desc(
                region.guest_phys_addr,
                region.memory_size,
                region.user_addr,
                region.mmap_offset,
            ),
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
        let regions = self.cloned_regions(Some(pos))?;
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

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        if self.acked_protocol & VhostUserProtocolFeatures::LOG_SHMFD.bits() == 0 {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let map = DirtyLog::map(file, offset, size).map_err(|e| {
            tracing::warn!(export = %self.export, size, offset, "SET_LOG_BASE: {e}");
            VuError::InvalidParam
        })?;
        tracing::info!(export = %self.export, size, covers = map.covers(), "dirty log mapped");
        self.log.set_log(map);
        Ok(())
    }
}

impl<H: QueueHost> Drop for DeviceHandler<H> {
    fn drop(&mut self) {
        self.disconnect();
    }
}

#[cfg(test)]
mod tests;
