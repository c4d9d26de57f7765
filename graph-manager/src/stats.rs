//! The counters behind `blkmesh.v1.StatsService`: pushed by frontends and
//! workers, aggregated per export, queue and node; and the event feed's
//! channel. The service itself is `crate::api::stats`.
//!
//! Reports live in memory only (never in `state.json`). The latest report of
//! every source is kept until the same source reports again — a restarted
//! process starts its counters from zero, and its first report simply
//! replaces the old one. Reports are not dropped when an agent session
//! ends: the counters of a process that went away stay visible. To bound memory, at most [`MAX_SOURCES`]
//! sources are kept; a new source beyond that evicts the one that reported
//! least recently.
//!
//! Aggregation (`GetStats`, `/metrics`): exports and nodes are the ones the
//! manager knows (configured), each listed even without reports (zeros).
//! Queue entries count only from `frontend/...` sources and only for queues
//! `0..num_queues` of a known export; node entries count only from
//! `worker/...` sources and only for known nodes. Everything else reported
//! (e.g. a just-removed export) is kept but not shown.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use blkmesh_graph::{validate_name, GraphError, ObjectKind};
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::{
    Event, ExportStats, GetStatsRequest, GetStatsResponse, IoErrorEvent, IoStats, LatencyHistogram,
    NodeStats, OpStats, QueueStats, StatsReport,
};
use tokio::sync::broadcast;

use crate::core::error::ApiError;

/// Longest accepted `StatsReport.source`, in bytes.
pub(crate) const MAX_SOURCE_LEN: usize = 128;
/// Most queue entries and most node entries in one report.
pub(crate) const MAX_ENTRIES: usize = 4096;
/// Most buckets in one latency histogram.
pub(crate) const MAX_BUCKETS: usize = 64;
/// Most sources whose latest report is kept.
pub(crate) const MAX_SOURCES: usize = 1024;
/// Capacity of the event broadcast channel; a subscriber further behind
/// than this loses the oldest events.
pub(crate) const EVENT_CAPACITY: usize = 1024;

/// What kind of process sent a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    Frontend,
    Worker,
}

fn source_kind(source: &str) -> Option<SourceKind> {
    if source.starts_with("frontend/") {
        Some(SourceKind::Frontend)
    } else if source.starts_with("worker/") {
        Some(SourceKind::Worker)
    } else {
        None
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An event stamped with the current time.
pub(crate) fn event(kind: EventKind) -> Event {
    Event {
        time_ms: now_ms(),
        kind: Some(kind),
    }
}

/// The event feed: a broadcast channel; sending never blocks.
pub(crate) fn event_channel() -> broadcast::Sender<Event> {
    broadcast::channel(EVENT_CAPACITY).0
}

// ----- validation -----

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// `validate_name` with a field path built at run time.
fn check_name(field: impl FnOnce() -> String, name: &str) -> Result<(), ApiError> {
    validate_name("name", name).map_err(|e| {
        let msg = e.to_string();
        let problem = msg.strip_prefix("name: ").unwrap_or(&msg).to_string();
        invalid(field(), problem)
    })
}

fn check_io(field: &str, io: &Option<IoStats>) -> Result<(), ApiError> {
    let Some(io) = io else { return Ok(()) };
    let ops = [
        ("read", &io.read),
        ("write", &io.write),
        ("flush", &io.flush),
        ("discard", &io.discard),
        ("write_zeroes", &io.write_zeroes),
    ];
    for (name, op) in ops {
        let n = op
            .as_ref()
            .and_then(|o| o.latency.as_ref())
            .map_or(0, |h| h.buckets.len());
        if n > MAX_BUCKETS {
            return Err(invalid(
                format!("{field}.io.{name}.latency.buckets"),
                format!("must have at most {MAX_BUCKETS} buckets (got {n})"),
            ));
        }
    }
    Ok(())
}

/// Checks a report; every message names the offending field.
pub(crate) fn validate_report(r: &StatsReport) -> Result<SourceKind, ApiError> {
    if r.source.is_empty() {
        return Err(invalid("source", "must not be empty"));
    }
    if r.source.len() > MAX_SOURCE_LEN {
        return Err(invalid(
            "source",
            format!(
                "must be at most {MAX_SOURCE_LEN} bytes (got {})",
                r.source.len()
            ),
        ));
    }
    let kind = source_kind(&r.source).ok_or_else(|| {
        invalid(
            "source",
            format!(
                "must be \"frontend/<name>\" or \"worker/<name>\" (got {:?})",
                r.source
            ),
        )
    })?;
    let name = r.source.split_once('/').map_or("", |(_, n)| n);
    check_name(|| "source".to_string(), name)?;
    if r.queues.len() > MAX_ENTRIES {
        return Err(invalid(
            "queues",
            format!(
                "must have at most {MAX_ENTRIES} entries (got {})",
                r.queues.len()
            ),
        ));
    }
    if r.nodes.len() > MAX_ENTRIES {
        return Err(invalid(
            "nodes",
            format!(
                "must have at most {MAX_ENTRIES} entries (got {})",
                r.nodes.len()
            ),
        ));
    }
    for (i, q) in r.queues.iter().enumerate() {
        check_name(|| format!("queues[{i}].export"), &q.export)?;
        check_io(&format!("queues[{i}]"), &q.io)?;
    }
    for (i, n) in r.nodes.iter().enumerate() {
        check_name(|| format!("nodes[{i}].node"), &n.node)?;
        check_io(&format!("nodes[{i}]"), &n.io)?;
    }
    Ok(kind)
}

// ----- summing -----

/// All five ops present, each with a (possibly empty) histogram.
pub(crate) fn zero_io() -> IoStats {
    let op = || {
        Some(OpStats {
            latency: Some(LatencyHistogram::default()),
            ..Default::default()
        })
    };
    IoStats {
        read: op(),
        write: op(),
        flush: op(),
        discard: op(),
        write_zeroes: op(),
        in_flight: 0,
    }
}

fn add_histogram(acc: &mut LatencyHistogram, x: &LatencyHistogram) {
    if acc.buckets.len() < x.buckets.len() {
        acc.buckets.resize(x.buckets.len(), 0);
    }
    for (a, b) in acc.buckets.iter_mut().zip(&x.buckets) {
        *a = a.saturating_add(*b);
    }
    acc.sum_ns = acc.sum_ns.saturating_add(x.sum_ns);
}

fn add_op(acc: &mut Option<OpStats>, x: &Option<OpStats>) {
    let Some(x) = x else { return };
    let acc = acc.get_or_insert_with(OpStats::default);
    acc.ops = acc.ops.saturating_add(x.ops);
    acc.bytes = acc.bytes.saturating_add(x.bytes);
    acc.errors = acc.errors.saturating_add(x.errors);
    if let Some(h) = &x.latency {
        add_histogram(acc.latency.get_or_insert_with(Default::default), h);
    }
}

/// `acc += x`: counters, histogram buckets element-wise (the shorter one
/// padded with zeros), sums and in-flight requests; saturating.
pub(crate) fn add_io(acc: &mut IoStats, x: &IoStats) {
    add_op(&mut acc.read, &x.read);
    add_op(&mut acc.write, &x.write);
    add_op(&mut acc.flush, &x.flush);
    add_op(&mut acc.discard, &x.discard);
    add_op(&mut acc.write_zeroes, &x.write_zeroes);
    acc.in_flight = acc.in_flight.saturating_add(x.in_flight);
}

/// Errors summed over all ops.
fn total_errors(io: &Option<IoStats>) -> u64 {
    let Some(io) = io else { return 0 };
    [
        &io.read,
        &io.write,
        &io.flush,
        &io.discard,
        &io.write_zeroes,
    ]
    .into_iter()
    .flatten()
    .fold(0u64, |acc, op| acc.saturating_add(op.errors))
}

/// Errors per (export, queue) of a frontend report, duplicates summed.
fn queue_errors(r: &StatsReport) -> BTreeMap<(&str, u32), u64> {
    let mut m: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    for q in &r.queues {
        let e = m.entry((q.export.as_str(), q.queue)).or_insert(0);
        *e = e.saturating_add(total_errors(&q.io));
    }
    m
}

// ----- the store -----

struct Stored {
    report: StatsReport,
    kind: SourceKind,
    /// When it arrived, in report order (for eviction).
    seq: u64,
}

/// The latest report of every source.
#[derive(Default)]
pub(crate) struct StatsStore {
    reports: BTreeMap<String, Stored>,
    seq: u64,
}

impl StatsStore {
    /// Keeps `report` as its source's latest and returns the io_error
    /// events it implies: a frontend queue whose errors (summed over ops)
    /// grew since the source's previous report. The first report of a
    /// source (after a manager restart, say) sets the baseline and raises
    /// nothing; a queue new in a later report counts from zero; counters
    /// that went down (restarted process) become the new baseline.
    pub(crate) fn insert(&mut self, report: StatsReport, kind: SourceKind) -> Vec<IoErrorEvent> {
        let mut events = Vec::new();
        if kind == SourceKind::Frontend {
            if let Some(prev) = self.reports.get(&report.source) {
                let before = queue_errors(&prev.report);
                for ((export, queue), now) in queue_errors(&report) {
                    let was = before.get(&(export, queue)).copied().unwrap_or(0);
                    if now > was {
                        events.push(IoErrorEvent {
                            export: export.to_string(),
                            queue,
                            new_errors: now - was,
                        });
                    }
                }
            }
        }
        self.seq += 1;
        if !self.reports.contains_key(&report.source) && self.reports.len() >= MAX_SOURCES {
            let oldest = self
                .reports
                .iter()
                .min_by_key(|(_, s)| s.seq)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                tracing::warn!(source = %oldest, "too many stats sources; forgetting the stalest");
                self.reports.remove(&oldest);
            }
        }
        self.reports.insert(
            report.source.clone(),
            Stored {
                report,
                kind,
                seq: self.seq,
            },
        );
        events
    }
}

/// What aggregation needs to know of the configuration.
#[derive(Debug, Default, Clone)]
pub(crate) struct Config {
    /// Export id → number of queues.
    pub exports: BTreeMap<String, u32>,
    pub nodes: BTreeSet<String>,
}

/// Which exports and nodes to aggregate (`None` = all).
#[derive(Debug, Default)]
pub(crate) struct Filter {
    pub exports: Option<BTreeSet<String>>,
    pub nodes: Option<BTreeSet<String>>,
}

impl Filter {
    /// Per list, empty = all (as in the proto). Names the manager does not
    /// know are NOT_FOUND.
    pub(crate) fn from_request(req: GetStatsRequest, cfg: &Config) -> Result<Filter, ApiError> {
        for e in &req.exports {
            if !cfg.exports.contains_key(e) {
                return Err(GraphError::NotFound {
                    field: "exports",
                    kind: ObjectKind::Export,
                    name: e.clone(),
                }
                .into());
            }
        }
        for n in &req.nodes {
            if !cfg.nodes.contains(n) {
                return Err(GraphError::NotFound {
                    field: "nodes",
                    kind: ObjectKind::Node,
                    name: n.clone(),
                }
                .into());
            }
        }
        let set = |v: Vec<String>| (!v.is_empty()).then(|| v.into_iter().collect());
        Ok(Filter {
            exports: set(req.exports),
            nodes: set(req.nodes),
        })
    }

    fn export(&self, id: &str) -> bool {
        self.exports.as_ref().is_none_or(|s| s.contains(id))
    }

    fn node(&self, name: &str) -> bool {
        self.nodes.as_ref().is_none_or(|s| s.contains(name))
    }
}

/// Sums the stored reports for the configured exports and nodes.
pub(crate) fn aggregate(cfg: &Config, store: &StatsStore, filter: &Filter) -> GetStatsResponse {
    let mut queues: BTreeMap<&str, Vec<IoStats>> = cfg
        .exports
        .iter()
        .filter(|(id, _)| filter.export(id))
        .map(|(id, &n)| (id.as_str(), vec![zero_io(); n as usize]))
        .collect();
    let mut nodes: BTreeMap<&str, IoStats> = cfg
        .nodes
        .iter()
        .filter(|n| filter.node(n))
        .map(|n| (n.as_str(), zero_io()))
        .collect();
    for stored in store.reports.values() {
        match stored.kind {
            SourceKind::Frontend => {
                for q in &stored.report.queues {
                    let (Some(per_queue), Some(io)) = (queues.get_mut(q.export.as_str()), &q.io)
                    else {
                        continue;
                    };
                    if let Some(acc) = per_queue.get_mut(q.queue as usize) {
                        add_io(acc, io);
                    }
                }
            }
            SourceKind::Worker => {
                for n in &stored.report.nodes {
                    if let (Some(acc), Some(io)) = (nodes.get_mut(n.node.as_str()), &n.io) {
                        add_io(acc, io);
                    }
                }
            }
        }
    }
    GetStatsResponse {
        exports: queues
            .into_iter()
            .map(|(id, per_queue)| {
                let mut io = zero_io();
                for q in &per_queue {
                    add_io(&mut io, q);
                }
                ExportStats {
                    export: id.to_string(),
                    io: Some(io),
                    queues: per_queue
                        .into_iter()
                        .enumerate()
                        .map(|(i, io)| QueueStats {
                            export: id.to_string(),
                            queue: i as u32,
                            io: Some(io),
                        })
                        .collect(),
                }
            })
            .collect(),
        nodes: nodes
            .into_iter()
            .map(|(name, io)| NodeStats {
                node: name.to_string(),
                io: Some(io),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(ops: u64, errors: u64, buckets: &[u64]) -> Option<OpStats> {
        Some(OpStats {
            ops,
            bytes: ops.saturating_mul(512),
            errors,
            latency: Some(LatencyHistogram {
                buckets: buckets.to_vec(),
                sum_ns: 10,
            }),
        })
    }

    #[test]
    fn histograms_pad_to_the_longer() {
        let mut acc = IoStats {
            read: op(1, 0, &[1, 2]),
            ..Default::default()
        };
        add_io(
            &mut acc,
            &IoStats {
                read: op(2, 1, &[1, 1, 5]),
                write: op(3, 0, &[]),
                in_flight: 4,
                ..Default::default()
            },
        );
        let r = acc.read.unwrap();
        assert_eq!((r.ops, r.bytes, r.errors), (3, 1536, 1));
        assert_eq!(r.latency.as_ref().unwrap().buckets, vec![2, 3, 5]);
        assert_eq!(r.latency.unwrap().sum_ns, 20);
        assert_eq!(acc.write.unwrap().ops, 3);
        assert_eq!(acc.in_flight, 4);
    }

    #[test]
    fn sums_saturate() {
        let mut acc = IoStats {
            read: op(u64::MAX, 0, &[u64::MAX]),
            ..Default::default()
        };
        add_io(
            &mut acc,
            &IoStats {
                read: op(5, 0, &[5]),
                ..Default::default()
            },
        );
        let r = acc.read.unwrap();
        assert_eq!(r.ops, u64::MAX);
        assert_eq!(r.latency.unwrap().buckets, vec![u64::MAX]);
    }

    #[test]
    fn sources_are_bounded() {
        let mut store = StatsStore::default();
        for i in 0..MAX_SOURCES + 5 {
            store.insert(
                StatsReport {
                    source: format!("worker/w{i}"),
                    ..Default::default()
                },
                SourceKind::Worker,
            );
        }
        assert_eq!(store.reports.len(), MAX_SOURCES);
        assert!(!store.reports.contains_key("worker/w0"));
        assert!(store
            .reports
            .contains_key(&format!("worker/w{}", MAX_SOURCES + 4)));
    }

    #[test]
    fn source_validation() {
        let r = |s: &str| StatsReport {
            source: s.into(),
            ..Default::default()
        };
        assert!(validate_report(&r("frontend/f0")).is_ok());
        assert!(validate_report(&r("worker/w-1")).is_ok());
        for bad in ["", "w0", "worker/", "worker/a b", "other/x"] {
            assert!(validate_report(&r(bad)).is_err(), "{bad:?}");
        }
        assert!(validate_report(&r(&format!("worker/{}", "a".repeat(130)))).is_err());
    }
}
