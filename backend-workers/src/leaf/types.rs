//! What goes between a queue and its leaf: requests, their data, and
//! completions.

use blkmesh_ipc::ring::{Op, Segment};

use crate::bounce::BounceBuf;
use crate::memory::RegisteredRam;

/// Why a queue could not get its side of the leaf.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("creating the libblkio queue: {0}")]
    Blkio(String),
    #[error("no libblkio queue left for this virtqueue")]
    NoQueue,
}

/// What a leaf request asks for: the op, its flags (FUA, NO_UNMAP), where,
/// and how many bytes.
#[derive(Clone, Copy, Debug)]
pub struct LeafRequest {
    pub op: Op,
    pub flags: u8,
    pub offset: u64,
    pub len: u64,
}

/// Where the bytes of one leaf request (or part of one) are.
pub enum Data<'a> {
    /// No data (flush, discard, write-zeroes).
    None,
    /// `len` bytes of a bounce buffer from byte `at`.
    Bounce {
        buf: &'a mut BounceBuf,
        at: usize,
        len: usize,
    },
    /// Guest buffers as iovecs over this worker's mapping of guest RAM,
    /// valid while the request holds that mapping.
    Iovecs(&'a [libc::iovec]),
    /// Guest buffers as segments of `ram` (for a leaf that touches them
    /// itself, the null leaf).
    Segments(&'a [Segment], &'a RegisteredRam),
}

/// What became of a submitted leaf request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Issued {
    /// At the driver: its completion comes back through `LeafQueue::reap`.
    InFlight,
    /// Done already, successfully (the null leaf).
    Done,
}

/// A completion from the leaf: the user data it was submitted with, and
/// the result as the driver gives it (0 or a negative errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafCompletion {
    pub user_data: usize,
    pub result: i32,
}

/// The guest buffers of a request as the alignment checks see them: every
/// address ORed, and every length, so one mask test covers them all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferBits {
    pub addr: usize,
    pub len: usize,
}
