//! Turning a virtio-blk descriptor chain into a ring request.
//!
//! Everything here reads guest-controlled bytes, so nothing is trusted: a
//! chain that the virtqueue iterator cut short (too long, out-of-range `next`,
//! bad indirect table) is malformed and refused, readable descriptors must
//! precede writable ones, every address range is translated through the
//! memory table, and sector ranges are checked against the capacity.
//!
//! - `chain`: a chain's shape and its bytes in guest memory.
//! - [`wire`]: the request header, request types and statuses as the guest
//!   writes and reads them.
//! - `parse`: the header names the kind; `kinds`: one function per kind.
//! - `limits`: what requests are checked against.
//! - `walk`: a chain walked from its head, for inflight recovery.
//!
//! This module only gathers them: its submodules depend on each other,
//! never on it.
//!
//! Zoned devices (VIRTIO_BLK_F_ZONED): [`parse_with_zones`] also takes zone
//! reports, zone management and zone appends; [`zoned_status_of`] turns the
//! ring's zone results into virtio-blk's zone statuses.

mod chain;
mod kinds;
mod limits;
mod parse;
mod walk;
pub mod wire;

pub use chain::{byte_ranges, check_chain, ChainError, Desc};
pub use kinds::{Action, Parsed};
pub use limits::{
    DeviceInfo, ZoneLimits, APPEND_SECTOR_BYTES, ID_BYTES, MAX_REQUEST_BYTES, ZONE_REPORT_HEADER,
};
pub use parse::{parse, parse_with_zones, peek_header};
pub use walk::{walk_chain, WalkError};
pub use wire::{status_of, zoned_status_of, DiscardRange, RequestHeader, RequestType, Status};

#[cfg(test)]
mod tests;
