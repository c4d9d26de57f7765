//! Per-tag state of a queue: a request in flight, or nothing.
//!
//! A tag's [`Slot`] is [`Slot::Busy`] from the moment the request is
//! claimed until its completion is queued, and holds everything the request
//! owns meanwhile. The memory a request only borrows for its life (iovec
//! arrays, segment lists) lives apart, in the tag's [`TagBuffers`], so that
//! it is reused from one request to the next and the hot path allocates
//! nothing once the arrays have grown to their size.

use std::sync::Arc;
use std::time::Instant;

use blkmesh_ipc::ring::{Op, Segment};
use blkmesh_stats::OpKind;

use crate::bounce::BounceBuf;
use crate::memory::RegisteredRam;
use crate::split::{Cursor, LANES};
use crate::zoned::Ticket;

/// One tag of a queue.
// Slots are allocated once per ring entry, so a free one being as large as
// a busy one costs nothing; boxing the request would cost an allocation per
// request.
#[allow(clippy::large_enum_variant)]
#[derive(Default)]
pub enum Slot {
    #[default]
    Free,
    Busy(InFlight),
}

impl Slot {
    pub fn is_busy(&self) -> bool {
        matches!(self, Slot::Busy(_))
    }

    pub fn in_flight(&self) -> Option<&InFlight> {
        match self {
            Slot::Busy(r) => Some(r),
            Slot::Free => None,
        }
    }

    /// Frees the slot; the request that was in it, if any.
    pub fn take(&mut self) -> Option<InFlight> {
        match std::mem::take(self) {
            Slot::Busy(r) => Some(r),
            Slot::Free => None,
        }
    }
}

/// A request in flight.
pub struct InFlight {
    /// The op as it reaches the leaf (a zone append becomes a write once
    /// the zone layer placed it).
    pub op: Op,
    pub flags: u8,
    pub len: u64,
    /// Where the request is in the graph: next stage and offset there.
    pub stage: usize,
    pub offset: u64,
    /// Keeps the guest mapping alive while the driver holds our iovecs.
    pub ram: Arc<RegisteredRam>,
    /// Set when the guest buffers break the driver's alignment (or cannot be
    /// cut where a split needs it).
    pub bounce: Option<BounceBuf>,
    /// When the request arrived, and when it reached the leaf.
    pub start: Instant,
    pub leaf_start: Option<Instant>,
    /// The request breaks the graph's limits: it goes to the leaf in parts.
    pub split: bool,
    pub parts: SplitProgress,
    /// The completion's `extra`: where a zone append landed, the bytes of
    /// a zone report.
    pub extra: u64,
    /// A write reserved in the graph's zone layer, handed back on completion.
    pub zone: Option<Ticket>,
    /// Where a write, write-zeroes or discard landed in the graph's qcow2
    /// image: marked for a commit job once it completed (see `qcow2.rs`).
    pub qcow2_written: Option<u64>,
}

impl InFlight {
    /// What the statistics count the request as.
    pub fn kind(&self) -> OpKind {
        match self.op {
            Op::Read => OpKind::Read,
            Op::Write | Op::ZoneAppend => OpKind::Write,
            Op::Discard => OpKind::Discard,
            Op::WriteZeroes => OpKind::WriteZeroes,
            _ => OpKind::Flush,
        }
    }
}

/// Progress of a split request.
#[derive(Clone, Copy, Debug, Default)]
pub struct SplitProgress {
    /// The next byte to hand out.
    pub cur: Cursor,
    /// Leaf offset of the request's first byte.
    pub base: u64,
    /// Lanes with a part in flight (bit i: lane i).
    pub busy: u8,
    /// The first error of a part (0: none yet); no new part starts after it.
    pub result: i32,
}

impl SplitProgress {
    /// The lowest free lane.
    pub fn free_lane(&self) -> Option<usize> {
        let free = !self.busy;
        (free != 0).then(|| free.trailing_zeros() as usize)
    }
}

/// A tag's reusable memory.
#[derive(Default)]
pub struct TagBuffers {
    /// The iovec array handed to libblkio; stable until completion.
    pub iovs: Vec<libc::iovec>,
    /// Data ops and zone reports: the guest segments (for bounce copies,
    /// null reads and reports).
    pub segs: Vec<Segment>,
    /// Per lane of a split request, the iovecs of its part, stable until the
    /// part completes.
    pub lanes: [Vec<libc::iovec>; LANES],
}

// SAFETY: the iovecs point into guest RAM that the tag's request keeps
// mapped (`InFlight::ram`) while the driver may use them; the buffers move
// only with the queue thread that owns them.
unsafe impl Send for TagBuffers {}
