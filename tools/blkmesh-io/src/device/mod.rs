//! The device, its queues and its I/O buffers: the only module with `unsafe`
//! (in `open`, `pool` and `queue`; `shared` and `error` have none).
//!
//! libblkio's `virtio-blk-vhost-user` driver takes raw buffer pointers from
//! safe functions and hands them to the vhost-user back-end, which can only
//! reach memory we registered with `map_mem_region`. This module makes that
//! sound by construction:
//!
//! * all I/O memory is one memory region allocated from libblkio and mapped
//!   into the device when the [`Device`] is opened;
//! * a [`BufferPool`] carves that region into disjoint [`Buffer`]s; only a
//!   `Buffer` can produce a pointer for a request;
//! * submitting a request *moves* its buffers into the [`Queue`], which hands
//!   them back in the [`Completed`] entry, so no code can touch a buffer the
//!   device may be accessing;
//! * every `Buffer` and `Queue` holds an `Arc` on the `Blkio` instance, so the
//!   region stays mapped for as long as a pointer into it can exist.
//!
//! The region is shared memory (the back-end maps the same memfd), so data
//! is only ever copied in and out with raw copies; no `&[u8]` into it is
//! ever created.

mod error;
#[allow(unsafe_code)]
mod open;
#[allow(unsafe_code)]
mod pool;
#[allow(unsafe_code)]
mod queue;
mod shared;

pub use error::{DeviceError, PoolError};
pub use open::{Device, DeviceConfig, DeviceInfo, DeviceTarget, PropValue};
pub use pool::{Buffer, BufferPool, CHUNK_ALIGN};
pub use queue::{Bufs, Completed, IoError, Queue, Request};
