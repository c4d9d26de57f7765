//! `blkmesh-frontend`: the virtio-blk device front of blkmesh.
//!
//! A note on words: in the vhost-user protocol the VMM is the *front-end* and
//! the device server is the *back-end*. This crate is blkmesh's virtio device
//! front, and therefore a vhost-user **back-end**: it listens on one
//! vhost-user-blk socket per export, receives guest RAM as memfds, parses the
//! virtqueues, and passes requests over shared-memory rings to the worker
//! processes that do the I/O ([`blkmesh_ipc`]).
//!
//! - [`handler`]: the vhost-user message handler (our own implementation of the
//!   vhost crate's back-end handler trait); it knows the protocol only.
//! - [`queue_host`]: the narrow interface between the handler and what runs
//!   its queues.
//! - [`queues`]: the queue host: queue threads on worker rings, moved
//!   between workers live (move, reopen, fail-over).
//! - [`vring`]: one thread per virtqueue, guest ring ⇄ worker rings.
//! - [`request`]: descriptor chain → ring request, with every check.
//! - [`memory`]: the guest memory table and address translation.
//! - [`config`]: feature bits and config space.
//! - [`workers`]: control connections to the workers.
//! - [`export`]: socket, accept loop, one VMM connection at a time.
//! - [`manager`]: registration with the manager and export reconciliation.
//! - [`zones`]: zone commands from the manager, run on the workers.

pub mod backend_channel;
pub mod config;
pub mod connections;
pub mod dirty_log;
pub mod export;
pub mod handler;
pub mod jobs;
pub mod manager;
pub mod memory;
pub mod queue_host;
pub mod queues;
pub mod request;
pub mod vring;
pub mod workers;
pub mod zones;

/// This process's I/O statistics, reported to the manager.
pub fn stats() -> &'static blkmesh_stats::Registry {
    static REGISTRY: std::sync::OnceLock<blkmesh_stats::Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(blkmesh_stats::Registry::default)
}

/// "error: cause: cause" for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
