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
mod error;
pub mod guest;
pub mod layout;
mod queue;
pub mod raw;
pub mod request;
mod status;
pub mod zone;

pub use alloc::Allocator;
pub use config::{BlkConfig, CONFIG_SIZE};
pub use device::log_probe::{log_pages, LogProbe};
pub use device::{
    InflightRegion, Options, ProtocolFeatures, VhostUserBlk, DEFAULT_FEATURES, F_PROTOCOL_FEATURES,
};
pub use error::Error;
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
