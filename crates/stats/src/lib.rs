//! I/O statistics of the data path and their reporting to the manager.
//!
//! Each queue thread counts into its own [`IoCounters`]: a single writer,
//! so an update is a relaxed load and store (no locked instruction, no
//! shared cache line between queues). A [`Registry`] knows every live
//! counter set of the process and sums those with the same name; the
//! process's agent session sends its [`Registry::report`] to the manager
//! every [`REPORT_INTERVAL`]. The manager being away costs nothing but the
//! report.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use blkmesh_proto::v1::{IoStats, LatencyHistogram, NodeStats, OpStats, QueueStats, StatsReport};

/// Histogram buckets: <1 µs, then powers of two up to ~2^30 µs.
pub const BUCKETS: usize = 32;

/// Request kinds counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
}

const KINDS: usize = 5;

#[derive(Debug)]
struct OpCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    sum_ns: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The histogram bucket of a latency.
pub fn bucket_of(latency_ns: u64) -> usize {
    let us = latency_ns / 1000;
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

impl OpCounters {
    fn snapshot(&self) -> OpStats {
        OpStats {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: Some(LatencyHistogram {
                buckets: self
                    .latency
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
                sum_ns: self.sum_ns.load(Ordering::Relaxed),
            }),
        }
    }
}

/// Adds to a counter that only one thread writes.
fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// Counters of one queue, or of one queue thread's view of a node. One
/// thread writes them (readers may see a slightly stale snapshot).
#[derive(Debug, Default)]
pub struct IoCounters {
    ops: [OpCounters; KINDS],
    in_flight: AtomicU64,
}

impl IoCounters {
    /// A request started.
    pub fn started(&self) {
        bump(&self.in_flight, 1);
    }

    /// A request finished (`started` was called for it).
    pub fn finished(&self, kind: OpKind, bytes: u64, ok: bool, latency_ns: u64) {
        let f = self.in_flight.load(Ordering::Relaxed);
        self.in_flight.store(f.saturating_sub(1), Ordering::Relaxed);
        let c = &self.ops[kind as usize];
        bump(&c.ops, 1);
        if ok {
            bump(&c.bytes, bytes);
        } else {
            bump(&c.errors, 1);
        }
        bump(&c.sum_ns, latency_ns);
        bump(&c.latency[bucket_of(latency_ns)], 1);
    }

    pub fn snapshot(&self) -> IoStats {
        IoStats {
            read: Some(self.ops[OpKind::Read as usize].snapshot()),
            write: Some(self.ops[OpKind::Write as usize].snapshot()),
            flush: Some(self.ops[OpKind::Flush as usize].snapshot()),
            discard: Some(self.ops[OpKind::Discard as usize].snapshot()),
            write_zeroes: Some(self.ops[OpKind::WriteZeroes as usize].snapshot()),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Entries {
    queues: Vec<(String, u32, Weak<IoCounters>)>,
    nodes: Vec<(String, Weak<IoCounters>)>,
    /// Totals of node counter sets whose queue thread has ended.
    retired: Vec<(String, IoStats)>,
}

/// Every live counter set of this process.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Entries>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters for one export queue (frontend side). Counting stops being
    /// reported when the returned Arc is dropped... unless another holder
    /// registered the same queue, whose counters are then reported.
    pub fn queue(&self, export: &str, queue: u32) -> Arc<IoCounters> {
        let mut e = self.lock();
        if let Some(c) = e
            .queues
            .iter()
            .find(|(x, q, _)| x == export && *q == queue)
            .and_then(|(_, _, w)| w.upgrade())
        {
            return c;
        }
        let c = Arc::new(IoCounters::default());
        e.queues
            .retain(|(x, q, w)| w.strong_count() > 0 && !(x == export && *q == queue));
        e.queues
            .push((export.to_string(), queue, Arc::downgrade(&c)));
        c
    }

    /// A new counter set for `node` (worker side), for one queue thread;
    /// the report sums every live set of the same node. The counts of a set
    /// that is dropped leave the report.
    pub fn node(&self, node: &str) -> Arc<IoCounters> {
        let mut e = self.lock();
        let c = Arc::new(IoCounters::default());
        e.nodes.retain(|(_, w)| w.strong_count() > 0);
        e.nodes.push((node.to_string(), Arc::downgrade(&c)));
        c
    }

    /// Folds a node counter set that is going away into the node's totals,
    /// so the node's counters never go backwards.
    pub fn retire(&self, node: &str, counters: &IoCounters) {
        let mut snap = counters.snapshot();
        snap.in_flight = 0;
        let mut e = self.lock();
        match e.retired.iter_mut().find(|(n, _)| n == node) {
            Some((_, total)) => *total = add(std::mem::take(total), snap),
            None => e.retired.push((node.to_string(), snap)),
        }
    }

    /// A report of every live counter set.
    pub fn report(&self, source: &str) -> StatsReport {
        let mut e = self.lock();
        e.queues.retain(|(_, _, w)| w.strong_count() > 0);
        e.nodes.retain(|(_, w)| w.strong_count() > 0);
        StatsReport {
            source: source.to_string(),
            queues: e
                .queues
                .iter()
                .filter_map(|(x, q, w)| {
                    w.upgrade().map(|c| QueueStats {
                        export: x.clone(),
                        queue: *q,
                        io: Some(c.snapshot()),
                    })
                })
                .collect(),
            nodes: {
                let mut out: Vec<NodeStats> = Vec::new();
                let live = e
                    .nodes
                    .iter()
                    .filter_map(|(n, w)| w.upgrade().map(|c| (n.clone(), c.snapshot())));
                let retired = e.retired.iter().map(|(n, s)| (n.clone(), s.clone()));
                for (n, snap) in live.chain(retired).collect::<Vec<_>>() {
                    let n = &n;
                    match out.iter_mut().find(|s| &s.node == n) {
                        Some(s) => s.io = Some(add(s.io.take().unwrap_or_default(), snap)),
                        None => out.push(NodeStats {
                            node: n.clone(),
                            io: Some(snap),
                        }),
                    }
                }
                out
            },
        }
    }
}

fn add_op(a: Option<OpStats>, b: Option<OpStats>) -> Option<OpStats> {
    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
    let (la, lb) = (a.latency.unwrap_or_default(), b.latency.unwrap_or_default());
    let n = la.buckets.len().max(lb.buckets.len());
    let buckets = (0..n)
        .map(|i| la.buckets.get(i).copied().unwrap_or(0) + lb.buckets.get(i).copied().unwrap_or(0))
        .collect();
    Some(OpStats {
        ops: a.ops + b.ops,
        bytes: a.bytes + b.bytes,
        errors: a.errors + b.errors,
        latency: Some(LatencyHistogram {
            buckets,
            sum_ns: la.sum_ns + lb.sum_ns,
        }),
    })
}

/// Sums two snapshots.
pub fn add(a: IoStats, b: IoStats) -> IoStats {
    IoStats {
        read: add_op(a.read, b.read),
        write: add_op(a.write, b.write),
        flush: add_op(a.flush, b.flush),
        discard: add_op(a.discard, b.discard),
        write_zeroes: add_op(a.write_zeroes, b.write_zeroes),
        in_flight: a.in_flight + b.in_flight,
    }
}

/// How often the agents send their reports.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_in_microseconds() {
        assert_eq!(bucket_of(500), 0);
        assert_eq!(bucket_of(1_000), 1);
        assert_eq!(bucket_of(1_999), 1);
        assert_eq!(bucket_of(2_000), 2);
        assert_eq!(bucket_of(100_000), 7);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn counts_ops_bytes_errors_and_in_flight() {
        let r = Registry::default();
        let c = r.queue("e", 1);
        c.started();
        c.started();
        c.finished(OpKind::Read, 4096, true, 3_000);
        let rep = r.report("frontend/x");
        let io = rep.queues[0].io.clone().unwrap();
        assert_eq!(io.in_flight, 1);
        let read = io.read.unwrap();
        assert_eq!((read.ops, read.bytes, read.errors), (1, 4096, 0));
        assert_eq!(read.latency.unwrap().buckets[2], 1);
        c.finished(OpKind::Write, 4096, false, 10);
        let w = r.report("s").queues[0].io.clone().unwrap().write.unwrap();
        assert_eq!((w.ops, w.bytes, w.errors), (1, 0, 1));
    }

    #[test]
    fn node_sets_are_summed_by_name_and_leave_when_dropped() {
        let r = Registry::default();
        let a = r.node("n");
        let b = r.node("n");
        a.started();
        a.finished(OpKind::Read, 512, true, 1000);
        b.started();
        b.finished(OpKind::Read, 1024, true, 1000);
        let rep = r.report("s");
        assert_eq!(rep.nodes.len(), 1);
        let read = rep.nodes[0].io.clone().unwrap().read.unwrap();
        assert_eq!((read.ops, read.bytes), (2, 1536));
        r.retire("n", &a);
        drop((a, b));
        let rep = r.report("s");
        let read = rep.nodes[0].io.clone().unwrap().read.unwrap();
        assert_eq!((read.ops, read.bytes), (1, 512), "retired counts stay");
    }
}
