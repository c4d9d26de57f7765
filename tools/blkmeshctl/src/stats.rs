//! `blkmeshctl stats` and `blkmeshctl events`: output of the statistics and
//! the event feed.

use blkmesh_proto::v1::event::Kind;
use blkmesh_proto::v1::{Event, ExportState, GetStatsResponse, IoStats, OpStats};
use serde::Serialize;

use crate::view::{print_json, print_table};
use blkmesh_graph::size::format_size;

#[derive(Debug, Serialize)]
struct HistogramView {
    /// Bucket 0: below 1 µs; bucket i: [2^(i-1), 2^i) µs; the last one
    /// also takes everything longer.
    buckets: Vec<u64>,
    sum_ns: u64,
}

#[derive(Debug, Serialize)]
struct OpView {
    ops: u64,
    bytes: u64,
    errors: u64,
    latency: HistogramView,
}

#[derive(Debug, Serialize)]
struct IoView {
    read: OpView,
    write: OpView,
    flush: OpView,
    discard: OpView,
    write_zeroes: OpView,
    in_flight: u64,
}

#[derive(Debug, Serialize)]
struct QueueView {
    queue: u32,
    io: IoView,
}

#[derive(Debug, Serialize)]
struct ExportStatsView {
    export: String,
    io: IoView,
    queues: Vec<QueueView>,
}

#[derive(Debug, Serialize)]
struct NodeStatsView {
    node: String,
    io: IoView,
}

#[derive(Debug, Serialize)]
struct StatsView {
    exports: Vec<ExportStatsView>,
    nodes: Vec<NodeStatsView>,
}

fn op_view(o: &Option<OpStats>) -> OpView {
    let o = o.clone().unwrap_or_default();
    let h = o.latency.unwrap_or_default();
    OpView {
        ops: o.ops,
        bytes: o.bytes,
        errors: o.errors,
        latency: HistogramView {
            buckets: h.buckets,
            sum_ns: h.sum_ns,
        },
    }
}

fn io_view(io: &Option<IoStats>) -> IoView {
    let io = io.clone().unwrap_or_default();
    IoView {
        read: op_view(&io.read),
        write: op_view(&io.write),
        flush: op_view(&io.flush),
        discard: op_view(&io.discard),
        write_zeroes: op_view(&io.write_zeroes),
        in_flight: io.in_flight,
    }
}

fn stats_view(s: &GetStatsResponse) -> StatsView {
    StatsView {
        exports: s
            .exports
            .iter()
            .map(|e| ExportStatsView {
                export: e.export.clone(),
                io: io_view(&e.io),
                queues: e
                    .queues
                    .iter()
                    .map(|q| QueueView {
                        queue: q.queue,
                        io: io_view(&q.io),
                    })
                    .collect(),
            })
            .collect(),
        nodes: s
            .nodes
            .iter()
            .map(|n| NodeStatsView {
                node: n.node.clone(),
                io: io_view(&n.io),
            })
            .collect(),
    }
}

impl IoView {
    fn ops(&self) -> [(&'static str, &OpView); 5] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("flush", &self.flush),
            ("discard", &self.discard),
            ("write-zeroes", &self.write_zeroes),
        ]
    }
}

/// A duration given in microseconds: `750us`, `12ms`, `3s`.
fn format_us(us: u128) -> String {
    if us < 10_000 {
        format!("{us}us")
    } else if us < 10_000_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{}s", us / 1_000_000)
    }
}

/// Estimated `q`-quantile of a power-of-two histogram: the upper bound of
/// the bucket it falls in (`>X` for the open last bucket), `-` if empty.
pub(crate) fn quantile(buckets: &[u64], q: f64) -> String {
    let total: u128 = buckets.iter().map(|&n| u128::from(n)).sum();
    if total == 0 {
        return "-".into();
    }
    // The rank of the quantile sample, 1-based.
    let rank = ((total as f64 * q).ceil() as u128).clamp(1, total);
    let mut seen: u128 = 0;
    for (i, &n) in buckets.iter().enumerate() {
        seen += u128::from(n);
        if seen >= rank {
            if i + 1 == buckets.len() && i > 0 {
                return format!(">{}", format_us(1u128 << (i - 1).min(120)));
            }
            return if i == 0 {
                "<1us".into()
            } else {
                format!("<{}", format_us(1u128 << i.min(120)))
            };
        }
    }
    "-".into()
}

fn op_row(first: [String; 3], o: &OpView, in_flight: String) -> Vec<String> {
    let [a, b, c] = first;
    vec![
        a,
        b,
        c,
        o.ops.to_string(),
        o.bytes.to_string(),
        o.errors.to_string(),
        in_flight,
        quantile(&o.latency.buckets, 0.5),
        quantile(&o.latency.buckets, 0.99),
    ]
}

/// Prints statistics: tables (only ops with requests or errors; an idle
/// queue gets one `-` row), or the whole response as JSON.
pub(crate) fn print_stats(s: &GetStatsResponse, json: bool, exports: bool, nodes: bool) {
    let v = stats_view(s);
    if json {
        return print_json(&v);
    }
    if exports {
        let mut rows = Vec::new();
        for e in &v.exports {
            for q in &e.queues {
                let mut any = false;
                for (op, o) in q.io.ops() {
                    if o.ops == 0 && o.errors == 0 {
                        continue;
                    }
                    // In-flight requests are per queue: on its first row.
                    let in_flight = if any {
                        String::new()
                    } else {
                        q.io.in_flight.to_string()
                    };
                    any = true;
                    rows.push(op_row(
                        [e.export.clone(), q.queue.to_string(), op.into()],
                        o,
                        in_flight,
                    ));
                }
                if !any {
                    let idle = op_view(&None);
                    rows.push(op_row(
                        [e.export.clone(), q.queue.to_string(), "-".into()],
                        &idle,
                        q.io.in_flight.to_string(),
                    ));
                }
            }
        }
        print_table(
            &[
                "EXPORT",
                "QUEUE",
                "OP",
                "OPS",
                "BYTES",
                "ERRORS",
                "IN-FLIGHT",
                "P50",
                "P99",
            ],
            &rows,
        );
    }
    if exports && nodes {
        println!();
    }
    if nodes {
        let mut rows = Vec::new();
        for n in &v.nodes {
            let mut any = false;
            for (op, o) in n.io.ops() {
                if o.ops == 0 && o.errors == 0 {
                    continue;
                }
                any = true;
                let mut row = op_row([n.node.clone(), op.into(), String::new()], o, String::new());
                // No queue and no in-flight column for nodes.
                row.remove(6);
                row.remove(2);
                rows.push(row);
            }
            if !any {
                rows.push(vec![
                    n.node.clone(),
                    "-".into(),
                    "0".into(),
                    "0".into(),
                    "0".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
        }
        print_table(
            &["NODE", "OP", "OPS", "BYTES", "ERRORS", "P50", "P99"],
            &rows,
        );
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a unix time in milliseconds.
pub(crate) fn format_time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// One event as one line: text, or a compact JSON object.
pub(crate) fn event_line(e: &Event, json: bool) -> String {
    let named = |kind: &str, name: &str| (kind.to_string(), name.to_string());
    let (kind, detail) = match &e.kind {
        Some(Kind::WorkerJoined(n)) => named("worker_joined", n),
        Some(Kind::WorkerLeft(n)) => named("worker_left", n),
        Some(Kind::FrontendJoined(n)) => named("frontend_joined", n),
        Some(Kind::FrontendLeft(n)) => named("frontend_left", n),
        Some(Kind::NodeAdded(n)) => named("node_added", n),
        Some(Kind::NodeRemoved(n)) => named("node_removed", n),
        Some(Kind::ExportAdded(n)) => named("export_added", n),
        Some(Kind::ExportRemoved(n)) => named("export_removed", n),
        Some(Kind::IoError(io)) => {
            if json {
                return serde_json::json!({
                    "time_ms": e.time_ms,
                    "kind": "io_error",
                    "export": io.export,
                    "queue": io.queue,
                    "new_errors": io.new_errors,
                })
                .to_string();
            }
            (
                "io_error".to_string(),
                format!(
                    "export={} queue={} new_errors={}",
                    io.export, io.queue, io.new_errors
                ),
            )
        }
        Some(Kind::NodeUpdated(u)) => {
            if json {
                return serde_json::json!({
                    "time_ms": e.time_ms,
                    "kind": "node_updated",
                    "node": u.node,
                    "changes": u.changes,
                })
                .to_string();
            }
            (
                "node_updated".to_string(),
                format!("node={} changes={:?}", u.node, u.changes.join(", ")),
            )
        }
        Some(Kind::NodeResized(r)) => {
            if json {
                return serde_json::json!({
                    "time_ms": e.time_ms,
                    "kind": "node_resized",
                    "node": r.node,
                    "old_size": r.old_size,
                    "new_size": r.new_size,
                })
                .to_string();
            }
            (
                "node_resized".to_string(),
                format!(
                    "node={} old_size={} new_size={}",
                    r.node,
                    format_size(r.old_size),
                    format_size(r.new_size)
                ),
            )
        }
        Some(Kind::ExportState(st)) => {
            let state = match ExportState::try_from(st.state) {
                Ok(ExportState::Pending) => "PENDING",
                Ok(ExportState::Serving) => "SERVING",
                Ok(ExportState::Failed) => "FAILED",
                Ok(ExportState::VmmRefused) => "VMM_REFUSED",
                Ok(ExportState::Unspecified) | Err(_) => "UNKNOWN",
            };
            if json {
                return serde_json::json!({
                    "time_ms": e.time_ms,
                    "kind": "export_state",
                    "export": st.export,
                    "state": state,
                    "message": st.message,
                })
                .to_string();
            }
            let mut detail = format!("export={} state={state}", st.export);
            if !st.message.is_empty() {
                detail.push_str(&format!(" message={:?}", st.message));
            }
            ("export_state".to_string(), detail)
        }
        None => ("unknown".to_string(), String::new()),
    };
    if json {
        serde_json::json!({ "time_ms": e.time_ms, "kind": kind, "name": detail }).to_string()
    } else {
        format!("{} {kind} {detail}", format_time_ms(e.time_ms))
            .trim_end()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), "-");
        assert_eq!(quantile(&[0, 0], 0.5), "-");
        assert_eq!(quantile(&[1], 0.5), "<1us");
        // [2^(i-1), 2^i) µs: bucket 3 is [4, 8) µs.
        assert_eq!(quantile(&[0, 0, 0, 10, 0], 0.5), "<8us");
        assert_eq!(quantile(&[0, 0, 0, 99, 1], 0.99), "<8us");
        assert_eq!(quantile(&[0, 0, 0, 98, 2], 0.99), ">8us");
        assert_eq!(
            quantile(
                &[0; 15].iter().chain(&[1, 0]).copied().collect::<Vec<_>>(),
                0.5
            ),
            "<32ms"
        );
    }

    fn at(kind: Kind) -> Event {
        Event {
            time_ms: 0,
            kind: Some(kind),
        }
    }

    #[test]
    fn new_event_kinds_as_text_and_json() {
        use blkmesh_proto::v1::{ExportStateEvent, NodeResizedEvent, NodeUpdatedEvent};
        let updated = at(Kind::NodeUpdated(NodeUpdatedEvent {
            node: "f".into(),
            changes: vec!["read-only on".into(), "direct off".into()],
        }));
        assert_eq!(
            event_line(&updated, false),
            "1970-01-01T00:00:00.000Z node_updated node=f changes=\"read-only on, direct off\""
        );
        let v: serde_json::Value = serde_json::from_str(&event_line(&updated, true)).unwrap();
        assert_eq!(v["kind"], "node_updated");
        assert_eq!(v["changes"][1], "direct off");

        let resized = at(Kind::NodeResized(NodeResizedEvent {
            node: "f".into(),
            old_size: 1 << 30,
            new_size: 2 << 30,
        }));
        assert_eq!(
            event_line(&resized, false),
            "1970-01-01T00:00:00.000Z node_resized node=f old_size=1G new_size=2G"
        );
        let v: serde_json::Value = serde_json::from_str(&event_line(&resized, true)).unwrap();
        assert_eq!(v["new_size"], 2u64 << 30);

        let state = at(Kind::ExportState(ExportStateEvent {
            export: "e".into(),
            state: ExportState::Failed as i32,
            message: "no such file".into(),
        }));
        assert_eq!(
            event_line(&state, false),
            "1970-01-01T00:00:00.000Z export_state export=e state=FAILED message=\"no such file\""
        );
        let v: serde_json::Value = serde_json::from_str(&event_line(&state, true)).unwrap();
        assert_eq!(
            (v["state"].as_str(), v["message"].as_str()),
            (Some("FAILED"), Some("no such file"))
        );
        let serving = at(Kind::ExportState(ExportStateEvent {
            export: "e".into(),
            state: ExportState::Serving as i32,
            message: String::new(),
        }));
        assert_eq!(
            event_line(&serving, false),
            "1970-01-01T00:00:00.000Z export_state export=e state=SERVING"
        );
    }

    #[test]
    fn times() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            format_time_ms(1_735_689_599_999),
            "2024-12-31T23:59:59.999Z"
        );
    }
}
