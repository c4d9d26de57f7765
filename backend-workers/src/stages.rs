//! Filter and format stages of a node graph, applied to each request on its
//! way from the export down to the protocol leaf.
//!
//! A stage sees a request in its own node's coordinates and either passes it
//! on (a `raw` window shifts the offset), fails it (fault injection), has
//! it retried at a time (throttling) or delays it (fault delays); see
//! [`Verdict`], and `pipeline/` for how a queue runs them. The state behind
//! a stage is shared by every queue of the node in this worker; a throttle
//! group's buckets are shared with other workers too (see
//! [`blkmesh_ipc::buckets`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blkmesh_ipc::buckets::{monotonic_ns, BucketSet, BUCKETS};
use blkmesh_ipc::ring::Op;
use blkmesh_proto::v1::{fault_rule::Action, Bucket, FaultRule, IoOp, ThrottleLimits};

use crate::errno::Errno;
use crate::qcow2::Qcow2Layer;
use crate::zoned::ZoneLayer;

/// One stage of a queue's pipeline, top (export) first.
#[derive(Clone, Debug)]
pub enum Stage {
    /// A `raw` node: requests move by `offset` bytes into the child.
    Window {
        offset: u64,
    },
    Throttle(Arc<Throttle>),
    Faults(Arc<Faults>),
    /// The graph's zone layer (an emulated `zoned` node, or a zoned device
    /// leaf): checks and reserves writes, answers zone reports and
    /// management (see `zoned/`).
    Zoned(Arc<ZoneLayer>),
    /// A `qcow2` node: maps a request into its file, or does it itself
    /// (see `qcow2.rs`).
    Qcow2(Arc<Qcow2Layer>),
}

/// What a stage decides for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// On to the next stage.
    Pass,
    /// Fail the request with this errno.
    Fail(Errno),
    /// Done at this stage with this completion result (0 or negative): a
    /// zone report or management request, or a zone rule broken.
    Done(i32),
    /// Not now: try this stage again at this CLOCK_MONOTONIC time (a
    /// throttle, a busy zone).
    RetryAt(u64),
    /// Hold the request until this CLOCK_MONOTONIC time, then pass it on (a
    /// fault-injection delay).
    DelayUntil(u64),
}

// ---------------------------------------------------------------- throttle

const IOPS_TOTAL: usize = 0;
const IOPS_READ: usize = 1;
const IOPS_WRITE: usize = 2;
const BPS_TOTAL: usize = 3;
const BPS_READ: usize = 4;
const BPS_WRITE: usize = 5;

#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    /// Nanoseconds per unit (request or byte), scaled by 2^16 for byte rates.
    per_unit: u64,
    /// How far ahead of now the bucket may run (its burst), in ns.
    tolerance: u64,
}

/// GCRA token buckets for read and write requests.
#[derive(Debug)]
pub struct Throttle {
    node: String,
    rates: [Option<Rate>; BUCKETS],
    buckets: BucketSet,
}

const SCALE: u64 = 1 << 16;
/// Longest burst a bucket holds, in nanoseconds (an hour).
const MAX_TOLERANCE_NS: u128 = 3_600 * 1_000_000_000;

impl Throttle {
    pub fn new(node: &str, limits: &ThrottleLimits, buckets: BucketSet) -> Self {
        let rate = |b: &Option<Bucket>| -> Option<Rate> {
            let b = (*b)?;
            if b.rate == 0 {
                return None;
            }
            let burst = if b.burst == 0 {
                b.rate
            } else {
                b.burst.max(b.rate)
            };
            let per_unit = (1_000_000_000u128 * SCALE as u128 / b.rate as u128) as u64;
            // A burst worth more than an hour is as good as an hour, and
            // keeps every sum below in range.
            let tolerance =
                ((burst as u128 * per_unit as u128) / SCALE as u128).min(MAX_TOLERANCE_NS);
            Some(Rate {
                per_unit,
                tolerance: tolerance as u64,
            })
        };
        Throttle {
            node: node.to_string(),
            rates: [
                rate(&limits.iops_total),
                rate(&limits.iops_read),
                rate(&limits.iops_write),
                rate(&limits.bps_total),
                rate(&limits.bps_read),
                rate(&limits.bps_write),
            ],
            buckets,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn applicable(op: Op) -> Option<[(usize, bool); 4]> {
        // (bucket, counts bytes)
        match op {
            Op::Read => Some([
                (IOPS_TOTAL, false),
                (IOPS_READ, false),
                (BPS_TOTAL, true),
                (BPS_READ, true),
            ]),
            Op::Write | Op::ZoneAppend => Some([
                (IOPS_TOTAL, false),
                (IOPS_WRITE, false),
                (BPS_TOTAL, true),
                (BPS_WRITE, true),
            ]),
            _ => None,
        }
    }

    /// Admits the request now (charging the buckets) or says when to retry.
    pub fn admit(&self, op: Op, len: u64, now: u64) -> Verdict {
        let Some(buckets) = Self::applicable(op) else {
            return Verdict::Pass;
        };
        let mut ready = now;
        for (b, _) in buckets {
            if let Some(r) = self.rates[b] {
                let tat = self.buckets.tat(b).load(Ordering::Acquire);
                if tat > now.saturating_add(r.tolerance) {
                    ready = ready.max(tat - r.tolerance);
                }
            }
        }
        if ready > now {
            return Verdict::RetryAt(ready);
        }
        for (b, bytes) in buckets {
            if let Some(r) = self.rates[b] {
                let units = if bytes { len } else { 1 };
                let cost = ((units as u128 * r.per_unit as u128) / SCALE as u128)
                    .min(u64::MAX as u128) as u64;
                let _ =
                    self.buckets
                        .tat(b)
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                            Some(t.max(now).saturating_add(cost))
                        });
            }
        }
        Verdict::Pass
    }
}

// ---------------------------------------------------------------- faults

fn op_matches(ops: u32, op: Op) -> bool {
    let bit = match op {
        Op::Read => IoOp::Read,
        Op::Write | Op::ZoneAppend => IoOp::Write,
        Op::Flush => IoOp::Flush,
        Op::Discard => IoOp::Discard,
        Op::WriteZeroes => IoOp::WriteZeroes,
        _ => return ops == 0,
    } as u32;
    ops == 0 || ops & (1 << bit) != 0
}

#[derive(Debug)]
struct Rule {
    ops: u32,
    start: u64,
    end: u64,
    skip: AtomicU64,
    remaining: AtomicU64,
    /// Probability scaled to u32::MAX (0 = always).
    threshold: u32,
    action: Verdict,
    delay_ns: u64,
}

/// Fault-injection rules with their counters.
#[derive(Debug)]
pub struct Faults {
    rules: Vec<Rule>,
    rng: AtomicU64,
}

fn decrement(a: &AtomicU64) -> bool {
    a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

impl Faults {
    pub fn new(rules: &[FaultRule], seed: u64) -> Self {
        let rules = rules
            .iter()
            .map(|r| {
                let ops = r
                    .ops
                    .iter()
                    .fold(0u32, |m, &o| m | (1u32 << (o as u32 & 31)));
                let (action, delay_ns) = match r.action {
                    // An errno the guest could not be told becomes EIO (the
                    // manager refuses these; the worker trusts no plan).
                    Some(Action::Errno(e)) if (1..4096).contains(&e) => {
                        (Verdict::Fail(Errno::new(e).unwrap_or(Errno::EIO)), 0)
                    }
                    Some(Action::Errno(_)) => (Verdict::Fail(Errno::EIO), 0),
                    Some(Action::DelayNs(d)) => (Verdict::DelayUntil(0), d),
                    None => (Verdict::Pass, 0),
                };
                Rule {
                    ops,
                    start: r.offset_start,
                    end: if r.offset_end == 0 {
                        u64::MAX
                    } else {
                        r.offset_end
                    },
                    skip: AtomicU64::new(r.skip),
                    remaining: AtomicU64::new(if r.count == 0 { u64::MAX } else { r.count }),
                    threshold: if r.probability > 0.0 && r.probability < 1.0 {
                        (r.probability * u32::MAX as f64) as u32
                    } else {
                        0
                    },
                    action,
                    delay_ns,
                }
            })
            .collect();
        Faults {
            rules,
            rng: AtomicU64::new(seed | 1),
        }
    }

    fn random(&self) -> u32 {
        // xorshift64*, shared; races only reuse a value.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }

    /// The first rule that fires decides; `now` dates a delay.
    pub fn check(&self, op: Op, offset: u64, len: u64, now: u64) -> Verdict {
        let end = offset.saturating_add(len.max(1));
        for r in &self.rules {
            if !op_matches(r.ops, op) || end <= r.start || offset >= r.end {
                continue;
            }
            if decrement(&r.skip) {
                continue;
            }
            if r.threshold != 0 && self.random() > r.threshold {
                continue;
            }
            if !decrement(&r.remaining) {
                continue;
            }
            return match r.action {
                Verdict::DelayUntil(_) => Verdict::DelayUntil(now.saturating_add(r.delay_ns)),
                v => v,
            };
        }
        Verdict::Pass
    }
}

/// Ops that a gate sees (everything but GET_ID).
pub fn gated(op: Op) -> bool {
    !matches!(op, Op::GetId)
}

/// Now, for stages.
pub fn now() -> u64 {
    monotonic_ns()
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::fault_rule;

    fn limits(iops: u64, burst: u64, bps: u64) -> ThrottleLimits {
        ThrottleLimits {
            iops_total: Some(Bucket { rate: iops, burst }),
            bps_total: Some(Bucket {
                rate: bps,
                burst: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn iops_limit_admits_the_burst_then_spaces_requests() {
        let t = Throttle::new("t", &limits(100, 200, 0), BucketSet::private());
        let now = 1_000_000_000;
        let mut admitted = 0;
        while t.admit(Op::Read, 4096, now) == Verdict::Pass {
            admitted += 1;
            assert!(admitted < 1000);
        }
        assert!((200..=201).contains(&admitted), "{admitted}");
        match t.admit(Op::Read, 4096, now) {
            Verdict::RetryAt(at) => assert!(at > now && at <= now + 10_000_000, "{}", at - now),
            v => panic!("{v:?}"),
        }
        // A second later, about 100 more fit.
        let later = now + 1_000_000_000;
        let mut more = 0;
        while t.admit(Op::Write, 512, later) == Verdict::Pass {
            more += 1;
        }
        assert!((99..=101).contains(&more), "{more}");
    }

    #[test]
    fn bps_limit_charges_bytes_and_ignores_flush() {
        let t = Throttle::new("t", &limits(0, 0, 1 << 20), BucketSet::private());
        let now = 5_000_000_000;
        assert_eq!(t.admit(Op::Write, 1 << 20, now), Verdict::Pass);
        assert_eq!(
            t.admit(Op::Write, 1 << 20, now),
            Verdict::Pass,
            "burst of one second"
        );
        assert!(matches!(t.admit(Op::Write, 4096, now), Verdict::RetryAt(_)));
        assert_eq!(t.admit(Op::Flush, 0, now), Verdict::Pass);
    }

    fn rule(
        ops: Vec<IoOp>,
        start: u64,
        end: u64,
        skip: u64,
        count: u64,
        action: fault_rule::Action,
    ) -> FaultRule {
        FaultRule {
            ops: ops.into_iter().map(|o| o as i32).collect(),
            offset_start: start,
            offset_end: end,
            skip,
            count,
            probability: 0.0,
            action: Some(action),
        }
    }

    #[test]
    fn fault_rule_matches_op_and_range_after_skip_for_count() {
        let f = Faults::new(
            &[rule(
                vec![IoOp::Write],
                4096,
                8192,
                1,
                2,
                fault_rule::Action::Errno(5),
            )],
            1,
        );
        assert_eq!(f.check(Op::Read, 4096, 512, 0), Verdict::Pass, "wrong op");
        assert_eq!(
            f.check(Op::Write, 0, 4096, 0),
            Verdict::Pass,
            "outside the range"
        );
        assert_eq!(
            f.check(Op::Write, 4096, 512, 0),
            Verdict::Pass,
            "skipped once"
        );
        assert_eq!(f.check(Op::Write, 4096, 512, 0), Verdict::Fail(Errno::EIO));
        assert_eq!(
            f.check(Op::Write, 0, 8192, 0),
            Verdict::Fail(Errno::EIO),
            "overlap counts"
        );
        assert_eq!(
            f.check(Op::Write, 4096, 512, 0),
            Verdict::Pass,
            "count used up"
        );
    }

    #[test]
    fn delay_rule_holds_from_now() {
        let f = Faults::new(
            &[rule(vec![], 0, 0, 0, 0, fault_rule::Action::DelayNs(1000))],
            1,
        );
        assert_eq!(f.check(Op::Flush, 0, 0, 50), Verdict::DelayUntil(1050));
    }

    #[test]
    fn probability_fires_about_that_often() {
        let mut r = rule(vec![], 0, 0, 0, 0, fault_rule::Action::Errno(5));
        r.probability = 0.25;
        let f = Faults::new(&[r], 42);
        let hits = (0..10_000)
            .filter(|_| f.check(Op::Read, 0, 512, 0) != Verdict::Pass)
            .count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }
}
