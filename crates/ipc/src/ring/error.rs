//! [`RingError`]: what goes wrong setting a ring up, or with a peer that
//! breaks its protocol.

use thiserror::Error;

use super::entry::{MAX_ENTRIES, MAX_SEGMENTS};
use crate::shm::ShmError;

/// Errors of ring setup and of a peer that broke the ring protocol.
#[derive(Debug, Error)]
pub enum RingError {
    #[error("ring entries must be a power of two in 1..={MAX_ENTRIES} (got {0})")]
    BadEntries(u32),
    #[error("max_segments must be in 1..={MAX_SEGMENTS} (got {0})")]
    BadMaxSegments(u32),
    #[error("shared memory")]
    Shm(#[from] ShmError),
    #[error("ring header does not match: {0}")]
    BadHeader(&'static str),
    #[error("peer index out of range (peer {peer}, ours {ours})")]
    PeerIndex { peer: u32, ours: u32 },
    /// The worker's heartbeat went backwards, or moved by more than one
    /// beat per nanosecond since the last sample: the worker (or its
    /// mapping of the ring) is corrupt.
    #[error("worker heartbeat impossible (was {was}, now {now}, {elapsed_ns} ns later)")]
    Heartbeat { was: u64, now: u64, elapsed_ns: u64 },
    #[error("ring is full")]
    Full,
    #[error("{0} segments do not fit the segment table")]
    TooManySegments(usize),
}
