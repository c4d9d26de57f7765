//! The four ends of a queue's ring pair: the frontend's request sender and
//! completion receiver, the worker's request receiver and completion sender.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::entry::{BadRequest, Completion, RawRequest, Request, Segment, INLINE_SEGMENTS};
use super::error::RingError;
use super::heartbeat::judge_heartbeat;
use super::layout::RingLayout;
use super::mapping::{Heartbeat, SegmentTable, Spsc};

/// Frontend → worker: submits requests.
pub struct RequestSender {
    pub(super) ring: Spsc<RawRequest>,
    pub(super) segments: SegmentTable,
}

impl RequestSender {
    /// Queues a request (not yet visible to the worker: call [`Self::publish`]).
    /// The caller guarantees `req.tag` is not in flight.
    pub fn push(&mut self, req: &Request, segs: &[Segment]) -> Result<(), RingError> {
        let mut raw = RawRequest {
            tag: req.tag,
            op: req.op as u8,
            flags: req.flags,
            nseg: u16::try_from(segs.len()).map_err(|_| RingError::TooManySegments(segs.len()))?,
            offset: req.offset,
            len: req.len,
            reserved: 0,
            inline: [Segment::default(); INLINE_SEGMENTS],
        };
        if segs.len() <= INLINE_SEGMENTS {
            raw.inline[..segs.len()].copy_from_slice(segs);
        } else {
            self.segments.write(req.tag, segs)?;
        }
        self.ring.push(raw)
    }

    /// Makes pushed requests visible; true if the worker must be kicked.
    pub fn publish(&mut self) -> bool {
        self.ring.publish()
    }

    /// Requests pushed and not yet taken by the worker.
    pub fn unconsumed(&self) -> u32 {
        self.ring.pending()
    }
}

/// Worker side: takes requests.
pub struct RequestReceiver {
    pub(super) ring: Spsc<RawRequest>,
    pub(super) segments: SegmentTable,
    pub(super) layout: RingLayout,
    pub(super) scratch: Vec<Segment>,
}

/// What [`RequestReceiver::pop`] yields.
#[derive(Debug)]
pub enum Received<'a> {
    /// A valid request and its segments.
    Request(Request, &'a [Segment]),
    /// A malformed entry: fail it back if it has a tag, otherwise drop it.
    Bad(BadRequest),
}

impl RequestReceiver {
    /// Takes the next request, copied out of shared memory and validated.
    /// `Err` means the peer broke the ring itself (treat the queue as broken).
    pub fn pop(&mut self) -> Result<Option<Received<'_>>, RingError> {
        let Some(raw) = self.ring.pop()? else {
            return Ok(None);
        };
        self.scratch.clear();
        let n = raw.nseg as usize;
        if n <= INLINE_SEGMENTS {
            self.scratch.extend_from_slice(&raw.inline[..n]);
        } else if n > self.layout.max_segments() as usize
            || !self.segments.read(raw.tag, n, &mut self.scratch)
        {
            return Ok(Some(Received::Bad(BadRequest {
                tag: (raw.tag < self.layout.entries()).then_some(raw.tag),
                reason: "segment count out of range",
            })));
        }
        Ok(Some(match self.layout.validate(&raw, &self.scratch) {
            Ok(req) => Received::Request(req, &self.scratch),
            Err(bad) => Received::Bad(bad),
        }))
    }

    /// Returns consumed slots to the frontend.
    pub fn release(&mut self) {
        self.ring.release();
    }

    /// Whether requests are waiting (for polling).
    pub fn has_new(&self) -> bool {
        self.ring.has_new()
    }

    /// Announces we are going to sleep; false if requests arrived meanwhile
    /// (then keep working).
    pub fn prepare_sleep(&mut self) -> bool {
        self.ring.prepare_sleep()
    }

    /// Clears the sleeping flag after a wake-up.
    pub fn woke(&mut self) {
        self.ring.woke();
    }
}

/// Worker → frontend: posts completions, and beats the heartbeat.
pub struct CompletionSender {
    pub(super) ring: Spsc<Completion>,
    pub(super) heartbeat: Heartbeat,
}

impl CompletionSender {
    /// Queues a completion. The ring holds as many entries as there can be
    /// requests in flight, so this fails only if the frontend broke the ring.
    pub fn push(&mut self, c: Completion) -> Result<(), RingError> {
        self.ring.push(c)
    }

    /// Makes pushed completions visible; true if the frontend must be kicked.
    pub fn publish(&mut self) -> bool {
        self.ring.publish()
    }

    /// One beat of the heartbeat: the queue loop is alive. An atomic add,
    /// not a store of a private count, so that the counter only ever moves
    /// forward even if a queue moving between workers briefly has two
    /// (the old one about to stop).
    pub fn beat(&self) {
        self.heartbeat.word().fetch_add(1, Ordering::Relaxed);
    }

    /// Test hook, for the frontend's handling of a corrupt worker: publishes
    /// a producer index more than a ring ahead of the consumer's. Only the
    /// worker's debug-build fault hook calls it (see `backend-workers`);
    /// nothing a guest sends can reach it.
    #[doc(hidden)]
    pub fn publish_corrupt_index(&mut self) {
        let bad = self
            .ring
            .cons_word()
            .load(Ordering::Acquire)
            .wrapping_add(self.ring.entries)
            .wrapping_add(1);
        self.ring.local = bad;
        self.ring.publish();
    }
}

/// Frontend side: takes completions, and samples the worker's heartbeat.
pub struct CompletionReceiver {
    pub(super) ring: Spsc<Completion>,
    pub(super) heartbeat: Heartbeat,
    /// The heartbeat at the last sample, and when that was.
    pub(super) seen: u64,
    pub(super) seen_at: Instant,
}

impl CompletionReceiver {
    /// Next completion, copied out of shared memory. The caller must check
    /// the tag against its own in-flight table.
    pub fn pop(&mut self) -> Result<Option<Completion>, RingError> {
        self.ring.pop()
    }

    pub fn release(&mut self) {
        self.ring.release();
    }

    /// Whether completions are waiting (for polling).
    pub fn has_new(&self) -> bool {
        self.ring.has_new()
    }

    pub fn prepare_sleep(&mut self) -> bool {
        self.ring.prepare_sleep()
    }

    pub fn woke(&mut self) {
        self.ring.woke();
    }

    /// Samples the worker's heartbeat: `Ok(true)` if it moved since the
    /// last sample (or since this end was taken), `Ok(false)` if not, and
    /// [`RingError::Heartbeat`] if it moved in a way a sane worker cannot
    /// (see [`judge_heartbeat`]); the caller must then stop trusting the
    /// worker. One Relaxed load of a line the worker owns: sample it only
    /// while requests are in flight, and not on every loop iteration.
    pub fn heartbeat(&mut self, now: Instant) -> Result<bool, RingError> {
        let value = self.heartbeat.word().load(Ordering::Relaxed);
        let moved = judge_heartbeat(
            self.seen,
            value,
            now.saturating_duration_since(self.seen_at),
        )?;
        self.seen = value;
        self.seen_at = now;
        Ok(moved)
    }
}
