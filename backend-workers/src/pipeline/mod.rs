//! The stage pipeline: a claimed request goes through its graph's stages
//! (windows, fault injection, throttles, the zone layer, qcow2), top first, and
//! each stage's [`Verdict`] says what becomes of it: pass it on, fail it,
//! it is done here, retry this stage at a time, or delay it and then pass
//! it on. What passes every stage goes to the leaf.
//!
//! Requests a stage holds wait in [`Waiting`]: on a timer (delays, busy
//! zones), or in order behind a throttle. The pipeline runs on the queue's
//! thread, over the request's own slot: no lock of its own, and its queues
//! stop growing once they have held as many requests as the ring has.

mod qcow2;
mod zone;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use blkmesh_ipc::ring::Segment;

use self::qcow2::Qcow2Scratch;
use self::zone::ZoneScratch;
use crate::graph::OpenedGraph;
use crate::slot::InFlight;
use crate::stages::{self, Stage, Verdict};

/// Where a request is once the stages are through with it for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed every stage: to the leaf at this offset.
    Leaf { offset: u64 },
    /// Finished at a stage with this ring result (0, a negative errno or a
    /// zone status).
    Complete(i32),
    /// Held in [`Waiting`]; it comes back through [`Waiting::pop_due`] or
    /// [`Waiting::throttled_due`].
    Waiting,
}

/// Requests the stages hold.
#[derive(Debug, Default)]
pub struct Waiting {
    /// Held until a time, by that time: (time, tag). The request's slot
    /// says where it goes on.
    timers: BinaryHeap<Reverse<(u64, u32)>>,
    /// Per stage: requests waiting for a throttle, in order, and when the
    /// head may be admitted.
    throttled: Vec<(VecDeque<u32>, u64)>,
}

impl Waiting {
    pub fn new(stages: usize) -> Waiting {
        Waiting {
            timers: BinaryHeap::new(),
            throttled: (0..stages).map(|_| (VecDeque::new(), 0)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.timers.is_empty() && self.throttled.iter().all(|(q, _)| q.is_empty())
    }

    /// The earliest time something held is due (CLOCK_MONOTONIC ns).
    pub fn next_deadline(&self) -> Option<u64> {
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let throttled = self
            .throttled
            .iter()
            .filter(|(q, _)| !q.is_empty())
            .map(|(_, t)| *t)
            .min();
        [timer, throttled].into_iter().flatten().min()
    }

    /// A request whose timer is due at `now`, taken out.
    pub fn pop_due(&mut self, now: u64) -> Option<u32> {
        match self.timers.peek() {
            Some(Reverse((at, tag))) if *at <= now => {
                let tag = *tag;
                self.timers.pop();
                Some(tag)
            }
            _ => None,
        }
    }

    /// How many stages may have throttled requests.
    pub fn stages(&self) -> usize {
        self.throttled.len()
    }

    /// The first request waiting at throttle `stage`, if it may be tried
    /// at `now` (it stays first until [`Waiting::admitted`]).
    pub fn throttled_due(&self, stage: usize, now: u64) -> Option<u32> {
        let (q, retry) = &self.throttled[stage];
        q.front().copied().filter(|_| *retry <= now)
    }

    /// The throttle at `stage` admitted its first request.
    pub fn admitted(&mut self, stage: usize) {
        self.throttled[stage].0.pop_front();
    }

    /// The throttle at `stage` admits its first request at `at` only.
    pub fn retry_throttled_at(&mut self, stage: usize, at: u64) {
        self.throttled[stage].1 = at;
    }

    /// Takes every held request out (the frontend is gone).
    pub fn drain(&mut self) -> Vec<u32> {
        let mut tags: Vec<u32> = self.timers.drain().map(|Reverse((_, t))| t).collect();
        for (q, _) in &mut self.throttled {
            tags.extend(q.drain(..));
        }
        tags
    }

    fn hold_until(&mut self, at: u64, tag: u32) {
        self.timers.push(Reverse((at, tag)));
    }

    fn throttle(&mut self, stage: usize, at: u64, tag: u32) {
        let (q, retry) = &mut self.throttled[stage];
        if q.is_empty() {
            *retry = at;
        }
        q.push_back(tag);
    }
}

/// The stages' side of a queue: what they hold, and their scratch space.
#[derive(Debug)]
pub struct Pipeline {
    pub waiting: Waiting,
    scratch: ZoneScratch,
    qcow2: Qcow2Scratch,
}

impl Pipeline {
    pub fn new(stages: usize) -> Pipeline {
        Pipeline {
            waiting: Waiting::new(stages),
            scratch: ZoneScratch::default(),
            qcow2: Qcow2Scratch::default(),
        }
    }

    /// Writes back what the stages changed for requests whose completions
    /// are about to be published; on failure, the tags that must fail.
    pub fn write_back(&mut self) -> Result<(), (crate::errno::Errno, Vec<u32>)> {
        self.qcow2.write_back()
    }

    /// Runs request `tag` (`r`, its guest segments `segs`) through the
    /// graph's stages from `stage` on, at `offset` in that stage's
    /// coordinates.
    pub fn run(
        &mut self,
        graph: &OpenedGraph,
        tag: u32,
        r: &mut InFlight,
        segs: &[Segment],
        mut stage: usize,
        mut offset: u64,
    ) -> Outcome {
        let waiting = &mut self.waiting;
        let mut now = 0u64;
        while stage < graph.stages.len() {
            let verdict = match &graph.stages[stage] {
                Stage::Window { offset: o } => {
                    offset += o;
                    Verdict::Pass
                }
                Stage::Faults(f) => {
                    if now == 0 {
                        now = stages::now();
                    }
                    f.check(r.op, offset, r.len, now)
                }
                Stage::Throttle(t) => {
                    let (queue, retry) = &waiting.throttled[stage];
                    if !queue.is_empty() {
                        // Keep order behind those already waiting.
                        Verdict::RetryAt(*retry)
                    } else {
                        if now == 0 {
                            now = stages::now();
                        }
                        t.admit(r.op, r.len, now)
                    }
                }
                Stage::Zoned(layer) => {
                    let access = graph.zoned.as_ref();
                    zone::step(layer, access, r, segs, &mut offset, &mut self.scratch)
                }
                Stage::Qcow2(layer) => {
                    qcow2::step(layer, tag, r, segs, &mut offset, &mut self.qcow2)
                }
            };
            match verdict {
                Verdict::Pass => stage += 1,
                Verdict::Fail(errno) => return Outcome::Complete(errno.ring_result()),
                Verdict::Done(result) => return Outcome::Complete(result),
                Verdict::RetryAt(at) => {
                    r.stage = stage;
                    r.offset = offset;
                    match graph.stages[stage] {
                        Stage::Throttle(_) => waiting.throttle(stage, at, tag),
                        _ => waiting.hold_until(at, tag),
                    }
                    return Outcome::Waiting;
                }
                Verdict::DelayUntil(at) => {
                    r.stage = stage + 1;
                    r.offset = offset;
                    waiting.hold_until(at, tag);
                    return Outcome::Waiting;
                }
            }
        }
        Outcome::Leaf { offset }
    }
}

#[cfg(test)]
mod tests;
