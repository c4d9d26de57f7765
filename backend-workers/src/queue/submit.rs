//! A claimed request's way from the stages to the leaf and back: the
//! stages run ([`crate::pipeline`]), held requests released or dropped,
//! the request handed to the leaf whole or in parts (at most
//! [`LANES`] in flight, see [`crate::split`]), and the leaf's completions
//! taken back.

use std::time::Instant;

use blkmesh_ipc::ring::Op;

use super::QueueLoop;
use crate::errno::Errno;
use crate::leaf::{Data, Issued, LeafRequest};
use crate::pipeline::Outcome;
use crate::slot::{InFlight, Slot, SplitProgress};
use crate::split::{next_linear, next_vectored, part_offset, LANES};
use crate::stages::{self, Stage, Verdict};

/// libblkio user_data: the tag in the low bits, and above them 0 for a whole
/// request or 1 + lane for a part of a split one.
const LANE_SHIFT: u32 = 16;
const TAG_MASK: usize = (1 << LANE_SHIFT) - 1;
const _: () = assert!(blkmesh_ipc::ring::MAX_ENTRIES as usize <= TAG_MASK + 1);
const _: () = assert!(LANES <= u8::BITS as usize);

fn part_user_data(tag: usize, lane: usize) -> usize {
    tag | (lane + 1) << LANE_SHIFT
}

impl QueueLoop {
    /// Runs a claimed request through the stages from `stage` on, then
    /// submits it to the leaf (or holds it, or completes it).
    pub(super) fn advance(&mut self, tag: u32, stage: usize, offset: u64) {
        let t = tag as usize;
        let Slot::Busy(r) = &mut self.slots[t] else {
            return;
        };
        let segs = &self.buffers[t].segs;
        match self.pipeline.run(&self.graph, tag, r, segs, stage, offset) {
            Outcome::Leaf { offset } => self.submit_leaf(tag, offset),
            Outcome::Complete(result) => self.complete(tag, result),
            Outcome::Waiting => {}
        }
    }

    /// Drops every request held by a delay or a throttle (the frontend is
    /// gone); returns how many.
    pub(super) fn cancel_held(&mut self) -> usize {
        let mut tags = self.pipeline.waiting.drain();
        // Zone writes give their reservations back only last first: drop
        // them from the highest offset down, so each zone's write pointer
        // returns to where the dropped writes began (the restarted
        // frontend resubmits them).
        tags.sort_unstable_by_key(|&t| {
            std::cmp::Reverse(
                self.slots[t as usize]
                    .in_flight()
                    .and_then(|r| r.zone.as_ref())
                    .map(|z| (z.zone, z.offset)),
            )
        });
        for &tag in &tags {
            self.complete(tag, Errno::ECANCELED.ring_result());
        }
        if !tags.is_empty() {
            tracing::info!(
                queue = self.index,
                cancelled = tags.len(),
                "frontend gone: held requests dropped"
            );
        }
        tags.len()
    }

    /// Releases whatever held requests are due; returns how many moved.
    pub(super) fn run_timers(&mut self) -> usize {
        if self.pipeline.waiting.is_empty() {
            return 0;
        }
        let now = stages::now();
        let mut n = 0;
        while let Some(tag) = self.pipeline.waiting.pop_due(now) {
            if let Some(r) = self.slots[tag as usize].in_flight() {
                let (stage, offset) = (r.stage, r.offset);
                self.advance(tag, stage, offset);
                n += 1;
            }
        }
        for stage in 0..self.pipeline.waiting.stages() {
            while let Some(tag) = self.pipeline.waiting.throttled_due(stage, now) {
                let Stage::Throttle(t) = &self.graph.stages[stage] else {
                    break;
                };
                let Some(r) = self.slots[tag as usize].in_flight() else {
                    self.pipeline.waiting.admitted(stage);
                    continue;
                };
                match t.admit(r.op, r.len, now) {
                    Verdict::RetryAt(at) => {
                        self.pipeline.waiting.retry_throttled_at(stage, at);
                        break;
                    }
                    Verdict::Pass
                    | Verdict::Fail(_)
                    | Verdict::Done(_)
                    | Verdict::DelayUntil(_) => {
                        self.pipeline.waiting.admitted(stage);
                        let offset = r.offset;
                        self.advance(tag, stage + 1, offset);
                        n += 1;
                    }
                }
            }
        }
        n
    }

    /// The leaf is done with a request: the null leaf may still hold it for
    /// its latency.
    fn leaf_done(&mut self, tag: u32, result: i32) {
        if !self.leaf.hold(tag as usize, result) {
            self.complete(tag, result);
        }
    }

    /// Hands a request that passed every stage to the protocol leaf.
    fn submit_leaf(&mut self, tag: u32, offset: u64) {
        let t = tag as usize;
        let Slot::Busy(r) = &mut self.slots[t] else {
            return;
        };
        if let Some(leaf) = &self.leaf_stats {
            r.leaf_start = Some(Instant::now());
            leaf.started();
        }
        if r.split {
            self.counters.split += 1;
            r.parts = SplitProgress {
                base: offset,
                ..SplitProgress::default()
            };
            self.pump(tag);
            return;
        }
        let bufs = &self.buffers[t];
        let req = LeafRequest {
            op: r.op,
            flags: r.flags,
            offset,
            len: r.len,
        };
        let data = match &mut r.bounce {
            Some(buf) => {
                let len = buf.len();
                Data::Bounce { buf, at: 0, len }
            }
            None if self.leaf.takes_segments() => Data::Segments(&bufs.segs, &r.ram),
            None => Data::Iovecs(&bufs.iovs),
        };
        let punch = self.graph.discard_punches_holes;
        match self.leaf.submit(&req, punch, data, t) {
            Ok(Issued::InFlight) => {}
            Ok(Issued::Done) => self.leaf_done(tag, 0),
            Err(errno) => self.complete(tag, errno.ring_result()),
        }
    }

    /// Hands out the next parts of a split request while it has free lanes;
    /// completes it once no part is in flight and either all were done or
    /// one failed (the first error wins).
    fn pump(&mut self, tag: u32) {
        let t = tag as usize;
        let lim = self.limits;
        let punch = self.graph.discard_punches_holes;
        let segments = self.leaf.takes_segments();
        let Slot::Busy(r) = &mut self.slots[t] else {
            return;
        };
        let bufs = &mut self.buffers[t];
        let InFlight {
            op,
            flags,
            len,
            ram,
            bounce,
            parts: p,
            ..
        } = r;
        let (op, flags, len) = (*op, *flags, *len);
        while p.result == 0 {
            let Some(lane) = p.free_lane() else {
                break;
            };
            // Cut the next part: out of the bounce buffer, out of the guest
            // segments (iovecs for the driver, segments for the null leaf),
            // or out of a discard / write-zeroes range.
            let cut = match (op, &mut *bounce) {
                (Op::Read | Op::Write, Some(buf)) => next_linear(len, lim.max_transfer, &mut p.cur)
                    .map(|(at, n)| {
                        let (at_byte, bytes) = (at as usize, n as usize);
                        let data = Data::Bounce {
                            buf,
                            at: at_byte,
                            len: bytes,
                        };
                        (at, n, data)
                    }),
                (Op::Read | Op::Write, None) if segments => {
                    let pieces = &mut self.null_segs;
                    next_vectored(&bufs.segs, len, &lim, &mut p.cur, pieces)
                        .map(|(at, n)| (at, n, Data::Segments(pieces, ram)))
                }
                (Op::Read | Op::Write, None) => {
                    let iovs = &mut bufs.lanes[lane];
                    next_vectored(&bufs.iovs, len, &lim, &mut p.cur, iovs)
                        .map(|(at, n)| (at, n, Data::Iovecs(iovs)))
                }
                (Op::Discard | Op::WriteZeroes, _) => {
                    let max = lim.max_range(op).unwrap_or(u64::MAX);
                    next_linear(len, max, &mut p.cur).map(|(at, n)| (at, n, Data::None))
                }
                _ => None,
            };
            let Some((at, n, data)) = cut else {
                break;
            };
            let Some(offset) = part_offset(p.base, at, n) else {
                p.result = Errno::EINVAL.ring_result();
                break;
            };
            self.counters.parts += 1;
            let req = LeafRequest {
                op,
                flags,
                offset,
                len: n,
            };
            // The null leaf does its part at once.
            match self.leaf.submit(&req, punch, data, part_user_data(t, lane)) {
                Ok(Issued::InFlight) => p.busy |= 1 << lane,
                Ok(Issued::Done) => {}
                Err(errno) => p.result = errno.ring_result(),
            }
        }
        if p.busy == 0 {
            let result = p.result;
            self.leaf_done(tag, result);
        }
    }

    /// A part of a split request came back.
    pub(super) fn part_done(&mut self, tag: usize, lane: usize, result: i32) {
        let Slot::Busy(r) = &mut self.slots[tag] else {
            return; // not ours (a confused driver); nothing to complete
        };
        let bit = 1u8 << lane;
        if !r.split || r.parts.busy & bit == 0 {
            return;
        }
        r.parts.busy &= !bit;
        if result != 0 && r.parts.result == 0 {
            r.parts.result = result;
        }
        self.pump(tag as u32);
    }

    /// Whether the driver may have completions to reap (checked without a
    /// syscall where possible).
    pub(super) fn driver_has_completions(&mut self) -> bool {
        match self.leaf.due() {
            Some(due) => due,
            None => self.inflight > 0 && self.reap() > 0,
        }
    }

    /// Collects the leaf's completions; returns how many.
    pub(super) fn reap(&mut self) -> usize {
        let mut reaped = std::mem::take(&mut self.reaped);
        self.leaf.reap(self.index, self.inflight > 0, &mut reaped);
        for c in &reaped {
            let (tag, lane) = (c.user_data & TAG_MASK, c.user_data >> LANE_SHIFT);
            let Some(r) = self.slots.get(tag).and_then(Slot::in_flight) else {
                continue;
            };
            if lane > LANES {
                continue;
            }
            let mut result = c.result;
            if r.op == Op::Discard && result == Errno::EOPNOTSUPP.ring_result() {
                // Discard is a hint: a device that cannot do it still
                // succeeds (as QEMU).
                result = 0;
            }
            if lane == 0 {
                self.complete(tag as u32, result);
            } else {
                self.part_done(tag, lane - 1, result);
            }
        }
        let n = reaped.len();
        self.reaped = reaped;
        n
    }
}
