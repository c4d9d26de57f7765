//! The per-virtqueue ring pair shared by the frontend and one worker.
//!
//! One sealed memfd per virtqueue holds two single-producer/single-consumer
//! rings and a segment table:
//!
//! ```text
//! 0    header: magic, version, entries, max_segments, liveness words
//! 64   request ring producer index          (frontend writes)
//! 128  request ring consumer index, sleeping flag   (worker writes)
//! 192  completion ring producer index       (worker writes)
//! 256  completion ring consumer index, sleeping flag (frontend writes)
//! 320  worker heartbeat, u64                (worker writes)
//! 384  request entries      entries × 64 B
//!      completion entries   entries × 16 B
//!      segment table        entries × max_segments × 16 B (indexed by tag)
//! ```
//!
//! Indices are free-running `u32`s masked on use. A side loads the peer's index
//! with Acquire and publishes its own with Release. Wake-ups go through an
//! eventfd per direction, signalled only when the consumer has said it is about
//! to sleep (a SeqCst fence on both sides orders "publish, then check the flag"
//! against "set the flag, then re-check the index"), so a busy queue makes no
//! syscall per request.
//!
//! The heartbeat is a counter the worker's queue loop bumps on every
//! iteration, and at least every [`HEARTBEAT_INTERVAL`] while it holds
//! requests (a throttle or a fault-injection delay may hold one for seconds).
//! The frontend judges a hang by it, not by the age of a request: requests
//! in flight and a heartbeat that has not moved for the worker timeout mean
//! the worker's loop is stopped (SIGSTOP, deadlock), while a slow request
//! on a live loop does not. It has a line of its own so that the worker's
//! bumps do not evict the lines the frontend polls.
//!
//! Nothing read from the ring is trusted: every entry is copied out of shared
//! memory once and then validated (tag, op, flags, segment count and lengths);
//! guest-memory bounds are checked against the reader's own mapping by
//! [`crate::guest_ram`].
//!
//! The rooms: `entry` (the wire types), `layout` (the header offsets, the
//! geometry and request validation), `mapping` (every raw-pointer access to
//! the memfd: header words, the generic SPSC ring, the heartbeat word, the
//! segment table; the ring's only unsafe code), `heartbeat` (its period and
//! judgement), `queue` ([`QueueRings`]) and `ends` (the four ends).

mod ends;
mod entry;
mod error;
mod heartbeat;
mod layout;
mod mapping;
mod queue;
#[cfg(test)]
mod tests;

pub use ends::{CompletionReceiver, CompletionSender, Received, RequestReceiver, RequestSender};
pub use entry::{
    zone_status, BadRequest, Completion, Op, RawRequest, Request, Segment, FLAG_FUA, FLAG_NO_UNMAP,
    INLINE_SEGMENTS, MAX_ENTRIES, MAX_SEGMENTS,
};
pub use error::RingError;
pub use heartbeat::{judge_heartbeat, HEARTBEAT_INTERVAL};
pub use layout::RingLayout;
pub use queue::QueueRings;
