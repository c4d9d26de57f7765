//! The narrow interface between the vhost-user protocol handler
//! ([`crate::handler`]) and whatever runs its virtqueues.
//!
//! The handler speaks the protocol: features, the memory table, vring
//! addresses, kick and call eventfds, inflight tracking, the config space.
//! Once a queue has everything it needs, the handler builds the guest-side
//! queue and hands it over as a [`QueueStart`]; from then on the host runs
//! it (in blkmesh: a queue thread and a worker on the other side of a
//! shared-memory ring, see [`crate::queues`]) until the handler stops it.
//! The handler never sees a worker.
//!
//! Like rust-vmm's vhost-user-backend separates its `handler.rs` from the
//! device behind `VhostUserBackend`, but without dynamic dispatch: the
//! handler is generic over its host.

use std::fs::File;
use std::sync::Arc;

use blkmesh_ipc::inflight::{InflightQueue, Recovered};
use virtio_queue::Queue;

use crate::config::BlkConfig;
use crate::memory::MemTable;

/// A guest queue ready to run, as the handler set it up.
pub struct QueueStart {
    pub index: u16,
    /// Addresses, size, next avail and next used set and checked against
    /// the memory table.
    pub queue: Queue,
    /// Guest → device notifications (non-blocking).
    pub kick: File,
    /// Device → guest interrupts, if the VMM gave one.
    pub call: Option<File>,
    /// Inflight tracking, and the heads a previous back-end left in
    /// flight (resubmitted first).
    pub inflight: Option<(InflightQueue, Recovered)>,
    /// The driver negotiated VIRTIO_BLK_F_ZONED.
    pub zoned: bool,
    /// The connection's dirty log (live migration): the pages the queue
    /// writes are marked there while logging is on.
    pub log: Arc<crate::dirty_log::LogSink>,
}

impl QueueStart {
    /// Whether requests a previous back-end left in flight are resubmitted.
    pub fn resubmits(&self) -> bool {
        self.inflight
            .as_ref()
            .is_some_and(|(_, recovered)| !recovered.heads.is_empty())
    }
}

/// Why the host could not start a queue or take a memory table. Each
/// fails the VMM's message that asked for it.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no memory table yet")]
    NoMemory,
    #[error("no queue {0}")]
    NoSuchQueue(usize),
    /// Another VMM connection of the export runs its queues (a migration's
    /// destination starting too early).
    #[error("another VMM connection runs this export's queues")]
    Busy,
    /// What serves the queues refused, or could not set them up.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// A resource for the queue (eventfd, thread) could not be made.
    #[error("{what}: {source}")]
    Resource {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the virtqueues a vhost-user handler sets up.
pub trait QueueHost {
    /// Whether queue `index` runs.
    fn is_running(&self, index: usize) -> bool;

    /// Starts a queue. The host owns it until [`QueueHost::stop_queue`].
    fn start_queue(&mut self, start: QueueStart) -> Result<(), HostError>;

    /// Stops queue `index` once its in-flight requests have completed (on
    /// a replacement worker if its worker is lost while a migration logs
    /// dirty pages), and returns its next avail index (`None` if it did
    /// not run, or its state was lost). For a VMM that asks.
    fn stop_queue(&mut self, index: usize) -> Option<u16>;

    /// Stops queue `index` without waiting for a lost worker's
    /// replacement: the VMM went away, and what is left in flight stays in
    /// the inflight region for one that reconnects.
    fn halt_queue(&mut self, index: usize);

    /// Puts `table` in place of the current memory table: the running
    /// queues are held quiet so that nothing in flight refers to the old
    /// one. On error the old table stays.
    fn set_memory(&mut self, table: Arc<MemTable>) -> Result<(), HostError>;

    /// The config space offered changed (a reopen).
    fn set_config(&mut self, cfg: &BlkConfig);
}
