//! `blkmesh-vhost-user-client`: a small virtio-blk driver that talks
//! vhost-user to a device directly, as a VMM would, for tests and tools.
//!
//! ```no_run
//! use blkmesh_vhost_user_client::{Options, VhostUserBlk};
//!
//! let mut blk = VhostUserBlk::connect("/run/blkmesh/disk0.sock", Options::default())?;
//! println!("{} bytes", blk.config()?.capacity_bytes());
//! blk.write(0, 0, &[0xab; 4096])?;
//! assert_eq!(blk.read(0, 0, 4096)?, vec![0xab; 4096]);
//! # Ok::<(), blkmesh_vhost_user_client::Error>(())
//! ```
//!
//! # What it does
//!
//! - Guest RAM is a memfd mapped with vm-memory and shared with the device
//!   by SET_MEM_TABLE ([`GuestRam`]). The split virtqueues (descriptor
//!   table, avail ring, used ring, see [`layout`]) lie at its start; data
//!   buffers are allocated from the rest.
//! - [`VhostUserBlk::connect`] negotiates virtio features (VERSION_1,
//!   SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, MQ, RO, ZONED,
//!   INDIRECT_DESC...; EVENT_IDX on request) and protocol features (MQ,
//!   CONFIG, REPLY_ACK, CONFIGURE_MEM_SLOTS, and INFLIGHT_SHMFD with
//!   [`Options::inflight`]), then sets up every vring. With REPLY_ACK every
//!   message asks for an ack.
//! - Requests: [`VhostUserBlk::read`], `write`, `flush`, `discard`,
//!   `write_zeroes`, `get_id`, the zoned-device calls
//!   ([`VhostUserBlk::zone_report`], `zone_open`, `zone_close`,
//!   `zone_finish`, `zone_reset`, `zone_reset_all`, `zone_append`; see
//!   [`zone`]), or [`VhostUserBlk::submit`] a
//!   [`RequestSpec`] and [`VhostUserBlk::wait`] for its token; many
//!   requests may be in flight per queue. [`VhostUserBlk::poll_used`]
//!   returns whatever completed.
//!
//! # Hostile input (tests only)
//!
//! A [`Chain`] is a list of [`Part`]s, one descriptor each; a test bends a
//! well-formed request's chain before submitting it:
//!
//! ```no_run
//! # use blkmesh_vhost_user_client::*;
//! # let mut blk = VhostUserBlk::connect("s", Options::default())?;
//! // A read whose data buffer lies past the end of guest RAM.
//! let end = blk.mem_size();
//! let c = blk.run_chain(0, &RequestSpec::read(0, 512).chain()
//!     .map_part(1, |_| Part::at(end, 512, true)))?;
//! assert_eq!(c.status, Some(S_IOERR));
//! // A chain looping back to its first descriptor.
//! let t = blk.submit_chain(0, &RequestSpec::read(0, 512).chain().looped())?;
//! // SET_VRING_NUM for a queue that does not exist.
//! let out = blk.raw_request(&RawMessage::vring_state(req::SET_VRING_NUM, 99, 128))?;
//! assert!(out.refused());
//! # Ok::<(), Error>(())
//! ```
//!
//! Lower still: [`VhostUserBlk::write_desc`] and
//! [`VhostUserBlk::publish_head`] put any descriptor and any head in the
//! rings, [`VhostUserBlk::set_avail_idx`] moves the avail index anywhere,
//! [`RawMessage`] builds any vhost-user message (sizes that lie, any fds),
//! and [`VhostUserBlk::frontend`] gives the vhost crate's front-end.
//!
//! The crate has no `unsafe` code.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod alloc;
pub mod config;
mod device;
pub mod guest;
pub mod layout;
mod queue;
pub mod raw;
pub mod request;
pub mod zone;

use std::time::Duration;

pub use alloc::Allocator;
pub use config::{BlkConfig, CONFIG_SIZE};
pub use device::{
    InflightRegion, Options, ProtocolFeatures, VhostUserBlk, DEFAULT_FEATURES, F_PROTOCOL_FEATURES,
};
pub use guest::GuestRam;
pub use layout::{
    Descriptor, RingLayout, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
pub use raw::{req, MemRegion, RawConnection, RawMessage, RawOutcome, RawReply};
pub use request::{
    Buf, Chain, Completion, Part, RequestSpec, Target, Token, ID_BYTES, SECTOR, STATUS_UNTOUCHED,
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
pub use zone::{
    status_name, ZoneDescriptor, ZoneState, ZoneType, F_ZONED, S_ZONE_ACTIVE_RESOURCE,
    S_ZONE_INVALID_CMD, S_ZONE_OPEN_RESOURCE, S_ZONE_UNALIGNED_WP, T_ZONE_APPEND, T_ZONE_CLOSE,
    T_ZONE_FINISH, T_ZONE_OPEN, T_ZONE_REPORT, T_ZONE_RESET, T_ZONE_RESET_ALL,
};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A vhost-user exchange through the vhost crate failed (a refusal
    /// with REPLY_ACK shows up here too).
    #[error("vhost-user: {0}")]
    Vhost(String),
    /// The device refused a message the driver sent itself.
    #[error("the device refused {0}")]
    Refused(String),
    /// The device closed the connection.
    #[error("the device closed the connection")]
    Closed,
    /// No connection is open.
    #[error("not connected")]
    NotConnected,
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A parameter makes no sense.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A queue index past the ones set up.
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// Not enough free descriptors.
    #[error("queue full: {wanted} descriptors wanted, {free} free")]
    QueueFull {
        /// Descriptors wanted.
        wanted: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The data area of guest RAM is exhausted.
    #[error("guest memory exhausted ({0} bytes wanted)")]
    OutOfGuestMemory(u64),
    /// The device did not answer in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// For how long.
        timeout: Duration,
    },
    /// A request completed with this status (not `VIRTIO_BLK_S_OK`;
    /// [`STATUS_UNTOUCHED`] if the device did not write it): `S_IOERR`,
    /// `S_UNSUPP`, or for zoned devices one of the `S_ZONE_*` statuses
    /// (see [`status_name`]).
    #[error("request failed with status {0} ({name})", name = status_name(*.0))]
    Status(u8),
    /// A feature this call needs was not negotiated.
    #[error("not negotiated: {0}")]
    Unsupported(&'static str),
}

impl Error {
    /// The status byte of a request that failed with one.
    pub fn status(&self) -> Option<u8> {
        match self {
            Error::Status(s) => Some(*s),
            _ => None,
        }
    }
}
