//! Zoned block devices: the zone layer of a graph.
//!
//! A graph has at most one zone layer, a [`ZoneLayer`] in a
//! [`Stage::Zoned`](crate::stages::Stage::Zoned):
//!
//! - [`ZonedState`]: a `zoned` format node that emulates a host-managed
//!   zoned device over a regular child, with zone conditions and write
//!   pointers kept in a metadata file;
//! - [`ZonedDevice`]: an `io_uring` leaf on a Linux zoned block device,
//!   whose zones are the device's own (reports and zone management through
//!   the block layer's ioctls, zone append emulated by writes at the write
//!   pointer).
//!
//! Raw windows and filters above the layer pass zone operations through;
//! windows must be zone-aligned (checked at open, see `graph/zones.rs`).
//!
//! # The emulation's state machine
//!
//! ZBC/ZNS rules, as null_blk implements them: a write must start at the
//! zone's write pointer (`UNALIGNED_WP`), be a multiple of the write
//! granularity (`UNALIGNED_WP`) and not cross the zone capacity
//! (`INVALID_CMD`); writing a full, read-only or offline zone is
//! `INVALID_CMD`. Writes and appends implicitly open an empty or closed zone;
//! when `max_open_zones` are open the least recently written implicitly open
//! zone is closed to make room, and only explicitly open zones left is
//! `OPEN_RESOURCE`; an empty zone needs an active slot (`ACTIVE_RESOURCE`).
//! Open (explicit) takes empty, implicitly open and closed zones; close
//! takes open zones (to CLOSED, or EMPTY when nothing was written), a closed
//! zone is left as it is, an empty or full one is `INVALID_CMD`; finish
//! makes any writable zone FULL with the write pointer at the zone end;
//! reset makes it EMPTY (the data is left in place). Reads go anywhere.
//!
//! # Concurrency
//!
//! One [`ZonedState`] per node per worker process (see [`open_emulated`]),
//! shared by every queue thread of every export that uses the node. All zone
//! state sits behind one mutex, held for a few hundred nanoseconds per
//! request (reserve at submission, record at completion), never across I/O.
//! A write or append reserves its range at submission: the in-memory write
//! pointer moves at once, so appends from several queues get distinct,
//! adjacent ranges, and a write is accepted while earlier ones are in
//! flight only when it starts exactly at the reserved end. Each zone keeps
//! the ranges in flight in submission order; the write pointer that is
//! persisted is the end of the prefix of them that has completed.
//!
//! A failed write that is still the zone's last reservation gives its range
//! back (the write pointer returns to its start). A failed write with later
//! writes already reserved behind it cannot be undone without invalidating
//! those: its range counts as written with undefined content.
//!
//! # Persistence and crash consistency
//!
//! The metadata file (`ZonedOptions.metadata_path`) is a 4096-byte header
//! (magic `BLKMZONE`, version, record size, zone size, zone capacity,
//! number of zones; a file of another geometry is refused unless empty)
//! followed by one 32-byte record per zone: condition (the virtio `z_state`
//! number; 0 reads as EMPTY), the persisted write pointer (bytes from the
//! zone start), and the last completed write ending there (start, length).
//!
//! A record is rewritten with `pwrite` (under the state's mutex, so records
//! reach the page cache in the order the state changed) whenever what it
//! would say changes: after a write's data completed, never before, and
//! with a write pointer that never passes a range still in flight (while
//! writes are in flight the record holds the completed prefix, and a zone
//! those writes made FULL is recorded as still open). The page cache
//! survives a `kill -9` of the worker, so a restarted worker never finds a
//! write pointer past data that was not written. Once the leaf completed a
//! flush from the guest, or a FUA write, the metadata file is `fdatasync`ed
//! (when a record changed since the last sync), so the zone state is on
//! stable storage after the data it describes. Against power loss that is
//! the guarantee: state up to the last completed flush; records written
//! since may have been written back by the kernel ahead of their data (the
//! page cache writes the two files back independently). Records are 32-byte
//! aligned within a sector, which the storage writes whole.
//!
//! On open the state is loaded as it was: open zones stay open (explicitly
//! or implicitly) and keep their write pointer, so a worker that restarts
//! under a running guest changes nothing the guest can see. That is the
//! failover case: the frontend resubmits the requests that were in flight
//! when the worker died. A write whose data and record reached the file
//! but whose completion did not reach the frontend comes back as a write
//! below the write pointer; the first write to a zone after a load that
//! matches the zone's recorded last write exactly is therefore accepted
//! again (rewritten in place, write pointer unchanged). Resubmitted appends
//! append again (the first copy stays in the zone as unreferenced data).
//!
//! Reset and finish abandon the ranges still in flight in the zone: their
//! completions no longer move anything.

mod device;
mod emulated;
mod layer;
mod metadata;
mod types;

pub use device::{nvme_generic_is_zoned, probe_block_device, probe_queue, SysZoned, ZonedDevice};
pub use emulated::{ZonedState, MAX_ZONES};
pub use layer::{encode_report, open_emulated, ZoneLayer};
pub use metadata::{HEADER_SIZE, RECORD_SIZE};
pub use types::{
    Action, Cond, Geometry, Ticket, WriteKind, ZoneError, ZoneLimits, ZoneView, TYPE_CONVENTIONAL,
    TYPE_SEQ_PREFERRED, TYPE_SEQ_REQUIRED,
};

#[cfg(test)]
mod tests;
