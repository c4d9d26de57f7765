//! The protocol handler on a fake queue host: which messages start and
//! stop queues, with what, and what a refused memory table leaves.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use blkmesh_ipc::notify::Doorbell;
use blkmesh_proto::ipc::v1::Limits;
use vhost::vhost_user::message::{
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use virtio_queue::QueueT;

use super::DeviceHandler;
use crate::config::BlkConfig;
use crate::memory::MemTable;
use crate::queue_host::{HostError, QueueHost, QueueStart};

/// A queue as the fake host got it.
#[derive(Debug, PartialEq, Eq)]
struct Started {
    index: u16,
    size: u16,
    next_avail: u16,
    zoned: bool,
    has_call: bool,
}

#[derive(Default)]
struct FakeHost {
    running: Vec<bool>,
    started: Vec<Started>,
    tables: usize,
    refuse_memory: bool,
    /// What a stopped queue reports as its next avail index.
    stopped_at: u16,
    /// Queues stopped at once (the VMM went away), in order.
    halted: Vec<usize>,
}

impl QueueHost for FakeHost {
    fn is_running(&self, index: usize) -> bool {
        self.running.get(index).copied().unwrap_or(false)
    }

    fn start_queue(&mut self, start: QueueStart) -> Result<(), HostError> {
        self.running[start.index as usize] = true;
        self.started.push(Started {
            index: start.index,
            size: start.queue.size(),
            next_avail: start.queue.next_avail(),
            zoned: start.zoned,
            has_call: start.call.is_some(),
        });
        Ok(())
    }

    fn stop_queue(&mut self, index: usize) -> Option<u16> {
        std::mem::replace(&mut self.running[index], false).then_some(self.stopped_at)
    }

    fn halt_queue(&mut self, index: usize) {
        if std::mem::replace(&mut self.running[index], false) {
            self.halted.push(index);
        }
    }

    fn set_memory(&mut self, _table: Arc<MemTable>) -> Result<(), HostError> {
        if self.refuse_memory {
            return Err(HostError::NoMemory);
        }
        self.tables += 1;
        Ok(())
    }

    fn set_config(&mut self, _cfg: &BlkConfig) {}
}

const MEM: u64 = 1 << 20;
/// Where the VMM has guest memory mapped.
const VMM_BASE: u64 = 0x7f00_0000_0000;

fn handler(queues: u16) -> DeviceHandler<FakeHost> {
    let cfg = BlkConfig {
        num_queues: queues,
        queue_size: 256,
        logical_block_size: 512,
        writable: true,
        limits: Limits {
            size: 1 << 30,
            logical_block_size: 512,
            physical_block_size: 512,
            ..Default::default()
        },
    };
    let host = FakeHost {
        running: vec![false; queues as usize],
        stopped_at: 42,
        ..Default::default()
    };
    DeviceHandler::new("test".into(), cfg, Arc::new(|_| {}), host)
}

fn memory(h: &mut DeviceHandler<FakeHost>) -> vhost::vhost_user::Result<()> {
    let f: File = tempfile::tempfile().unwrap();
    f.set_len(MEM).unwrap();
    let region = VhostUserMemoryRegion::new(0, MEM, VMM_BASE, 0);
    h.set_mem_table(&[region], vec![f], None).map(|_| ())
}

fn eventfd() -> File {
    File::from(
        Doorbell::new()
            .unwrap()
            .as_fd()
            .try_clone_to_owned()
            .unwrap(),
    )
}

/// Negotiates with protocol features (rings start disabled).
fn negotiate(h: &mut DeviceHandler<FakeHost>) {
    h.set_owner().unwrap();
    let features =
        h.get_features().unwrap() & !(1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_ZONED);
    h.set_features(features).unwrap();
    assert!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    let protocol = h.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    h.set_protocol_features(protocol.bits()).unwrap();
}

/// Describes queue `q` fully but for enabling it.
fn describe(h: &mut DeviceHandler<FakeHost>, q: u32, base: u32) {
    let at = 0x1000 * (1 + 4 * q as u64);
    h.set_vring_num(q, 128).unwrap();
    h.set_vring_addr(
        q,
        VhostUserVringAddrFlags::empty(),
        VMM_BASE + at,
        VMM_BASE + at + 0x2000,
        VMM_BASE + at + 0x1000,
        0,
    )
    .unwrap();
    h.set_vring_base(q, base).unwrap();
    h.set_vring_kick(q as u8, Some(eventfd())).unwrap();
    h.set_vring_call(q as u8, Some(eventfd())).unwrap();
}

#[test]
fn a_queue_starts_once_enabled_with_memory_addresses_and_kick() {
    let mut h = handler(2);
    negotiate(&mut h);
    memory(&mut h).unwrap();
    describe(&mut h, 1, 7);
    assert!(h.host().started.is_empty(), "not enabled yet");
    h.set_vring_enable(1, true).unwrap();
    assert_eq!(
        h.host().started,
        [Started {
            index: 1,
            size: 128,
            next_avail: 7,
            zoned: false,
            has_call: true,
        }]
    );
    // A running queue's base is not the VMM's to change.
    assert!(h.set_vring_base(1, 3).is_err());
}

#[test]
fn get_vring_base_stops_the_queue_where_the_host_left_it() {
    let mut h = handler(1);
    negotiate(&mut h);
    memory(&mut h).unwrap();
    describe(&mut h, 0, 0);
    h.set_vring_enable(0, true).unwrap();
    assert!(h.host().is_running(0));
    let state = h.get_vring_base(0).unwrap();
    assert!(!h.host().is_running(0));
    let (index, num) = (state.index, state.num);
    assert_eq!((index, num), (0, 42));
    // Kick and call went with it: enabling again does not start it.
    h.set_vring_enable(0, true).unwrap();
    assert_eq!(h.host().started.len(), 1);
}

#[test]
fn a_reset_completes_what_is_in_flight_and_a_vanished_vmm_leaves_it() {
    let mut h = handler(2);
    negotiate(&mut h);
    memory(&mut h).unwrap();
    for q in 0..2 {
        describe(&mut h, q, 0);
        h.set_vring_enable(q, true).unwrap();
    }
    // A reset is the VMM's own request: the queues stop drained.
    h.reset_device().unwrap();
    assert!(!h.host().is_running(0) && !h.host().is_running(1));
    assert!(h.host().halted.is_empty(), "{:?}", h.host().halted);
    // The VMM goes away: nobody waits for the answer, and what a lost
    // worker left in flight is the next VMM's to resubmit.
    let mut h = handler(2);
    negotiate(&mut h);
    memory(&mut h).unwrap();
    describe(&mut h, 1, 0);
    h.set_vring_enable(1, true).unwrap();
    h.disconnect();
    assert_eq!(h.host().halted, [1]);
}

#[test]
fn a_new_call_fd_restarts_a_running_queue() {
    let mut h = handler(1);
    negotiate(&mut h);
    memory(&mut h).unwrap();
    describe(&mut h, 0, 5);
    h.set_vring_enable(0, true).unwrap();
    h.set_vring_call(0, None).unwrap();
    let started = &h.host().started;
    assert_eq!(started.len(), 2);
    assert_eq!((started[1].next_avail, started[1].has_call), (42, false));
}

#[test]
fn without_protocol_features_rings_start_enabled() {
    let mut h = handler(1);
    h.set_owner().unwrap();
    memory(&mut h).unwrap();
    describe(&mut h, 0, 0);
    assert!(h.host().started.is_empty(), "features not set yet");
    let features = h.get_features().unwrap() & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    h.set_features(features).unwrap();
    assert_eq!(h.host().started.len(), 1);
    assert!(
        h.set_vring_enable(0, false).is_err(),
        "no SET_VRING_ENABLE without protocol features"
    );
}

#[test]
fn a_refused_memory_table_keeps_the_old_one() {
    let mut h = handler(1);
    negotiate(&mut h);
    memory(&mut h).unwrap();
    h.host_mut().refuse_memory = true;
    let f: File = tempfile::tempfile().unwrap();
    f.set_len(MEM).unwrap();
    let moved = VhostUserMemoryRegion::new(0, MEM, 0x1000_0000, 0);
    assert!(h.set_mem_table(&[moved], vec![f], None).is_err());
    assert_eq!(h.host().tables, 1);
    // Addresses still translate through the old table, not the refused one.
    describe(&mut h, 0, 0);
    h.set_vring_enable(0, true).unwrap();
    assert_eq!(h.host().started.len(), 1);
}

#[test]
fn vring_addresses_outside_guest_memory_are_refused() {
    let mut h = handler(1);
    negotiate(&mut h);
    let outside = VMM_BASE + MEM;
    let flags = VhostUserVringAddrFlags::empty;
    assert!(
        h.set_vring_addr(0, flags(), outside, outside, outside, 0)
            .is_err(),
        "no memory table yet"
    );
    memory(&mut h).unwrap();
    assert!(h
        .set_vring_addr(0, flags(), outside, outside, outside, 0)
        .is_err());
    assert!(h.set_vring_num(0, 100).is_err(), "not a power of two");
    assert!(h.set_vring_num(1, 128).is_err(), "no such queue");
}
