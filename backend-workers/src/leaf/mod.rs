//! The protocol leaf as one queue sees it: its own libblkio queue
//! ([`BlkioQueue`]) or the null leaf ([`NullQueue`]).
//!
//! The queue loop hands a leaf request's bytes over as [`Data`], safe
//! references to a bounce buffer, to the iovecs of guest buffers, or to
//! guest segments; `leaf/blkio.rs` is the only place that turns them into
//! the raw pointers libblkio takes. Dispatch over the two kinds is a match
//! per request: no allocation, no dynamic dispatch.

mod blkio;
mod null;
mod types;

use std::os::fd::BorrowedFd;
use std::time::Instant;

pub use self::blkio::{guest_iovecs, BlkioQueue};
pub use self::null::NullQueue;
pub use self::types::{AttachError, BufferBits, Data, Issued, LeafCompletion, LeafRequest};
use crate::bounce::BouncePool;
use crate::errno::Errno;
use crate::graph::Leaf;

/// One queue's side of the leaf.
pub enum LeafQueue {
    Blkio(BlkioQueue),
    Null(NullQueue),
}

impl LeafQueue {
    /// Takes this queue's side of the graph's leaf: a libblkio queue (new,
    /// or from the pool of a driver that cannot add queues), or the null
    /// leaf's state. `entries`: the ring's, the most requests in flight.
    pub fn attach(leaf: &Leaf, entries: usize) -> Result<LeafQueue, AttachError> {
        Ok(match leaf {
            Leaf::Blkio {
                blkio,
                pool,
                driver,
                ..
            } => LeafQueue::Blkio(BlkioQueue::attach(blkio, pool.as_ref(), driver, entries)?),
            Leaf::Null { latency } => LeafQueue::Null(NullQueue::new(*latency)),
        })
    }

    pub fn bounce_pool(&mut self) -> &mut BouncePool {
        match self {
            LeafQueue::Blkio(b) => b.bounce_pool(),
            LeafQueue::Null(n) => n.bounce_pool(),
        }
    }

    /// Whether the leaf takes guest buffers as [`Data::Segments`] rather
    /// than [`Data::Iovecs`].
    pub fn takes_segments(&self) -> bool {
        matches!(self, LeafQueue::Null(_))
    }

    /// Hands one request (or part of one) to the leaf; Err for an op the
    /// leaf does not do, or data it cannot reach.
    #[inline]
    pub fn submit(
        &mut self,
        req: &LeafRequest,
        punch_holes: bool,
        data: Data<'_>,
        user_data: usize,
    ) -> Result<Issued, Errno> {
        match self {
            LeafQueue::Blkio(b) => b.submit(req, punch_holes, data, user_data),
            LeafQueue::Null(n) => n.submit(req, data),
        }
    }

    /// Holds a request the leaf finished for the leaf's latency, if it has
    /// one; true when held (its completion comes back through `reap`).
    pub fn hold(&mut self, user_data: usize, result: i32) -> bool {
        match self {
            LeafQueue::Blkio(_) => false,
            LeafQueue::Null(n) => n.hold(user_data, result),
        }
    }

    /// Collects what the leaf finished into `out` (cleared first).
    /// `inflight`: whether anything is at the leaf at all.
    pub fn reap(&mut self, queue: u32, inflight: bool, out: &mut Vec<LeafCompletion>) {
        out.clear();
        match self {
            LeafQueue::Blkio(b) if inflight => b.reap(queue, out),
            LeafQueue::Blkio(_) => {}
            LeafQueue::Null(n) => n.reap(Instant::now(), out),
        }
    }

    /// Whether completions are due, when that is known without asking the
    /// driver (`None`: reap to know).
    pub fn due(&self) -> Option<bool> {
        match self {
            LeafQueue::Blkio(_) => None,
            LeafQueue::Null(n) => Some(n.next_due().is_some_and(|d| d <= Instant::now())),
        }
    }

    /// When the leaf next has a held completion due.
    pub fn next_due(&self) -> Option<Instant> {
        match self {
            LeafQueue::Blkio(_) => None,
            LeafQueue::Null(n) => n.next_due(),
        }
    }

    /// The driver's completion eventfd, enabled, for the loop's epoll set.
    pub fn completion_fd(&mut self) -> Option<BorrowedFd<'_>> {
        match self {
            LeafQueue::Blkio(b) => b.completion_fd(),
            LeafQueue::Null(_) => None,
        }
    }

    /// Clears the driver's completion eventfd after it woke the loop.
    pub fn clear_completion_fd(&mut self) {
        if let LeafQueue::Blkio(b) = self {
            b.clear_completion_fd();
        }
    }
}
