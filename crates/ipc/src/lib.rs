//! Shared-memory IPC between `blkmesh-frontend` and `blkmesh-worker`.
//!
//! This crate is the only place in blkmesh's data path that touches memory
//! shared with another process. Everything unsafe lives here, behind small safe
//! APIs that bounds-check every index, region and length coming from the peer:
//!
//! - [`shm`]: sealed memfds and their mappings.
//! - [`ring`]: the per-virtqueue ring pair (requests frontend → worker,
//!   completions worker → frontend), single-producer/single-consumer, with
//!   notification suppression so a busy queue makes no syscall per request.
//! - [`guest_ram`]: a worker's mapping of guest RAM, turning
//!   (region, offset, length) segments into checked host buffers.
//! - [`notify`]: eventfd doorbells, rung only when the peer sleeps.
//! - [`poll`]: adaptive polling before sleeping.
//! - [`placement`]: one virtqueue's frontend and worker threads on one CPU.
//! - [`buckets`]: token buckets shared by name between workers (throttle groups).
//! - [`inflight`]: vhost-user inflight I/O tracking shared with the VMM.
//! - [`channel`]: the control channel (SOCK_SEQPACKET + SCM_RIGHTS) carrying
//!   `blkmesh.ipc.v1` messages and the file descriptors that go with them.
//! - [`zoned_dev`]: the zone ioctls of Linux zoned block devices.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod buckets;
pub mod channel;
pub mod guest_ram;
pub mod inflight;
pub mod notify;
pub mod placement;
pub mod poll;
pub mod ring;
pub mod shm;
pub mod zoned_dev;
