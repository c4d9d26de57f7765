//! The Prometheus endpoint (`--metrics ADDR`): plain HTTP/1.1, `GET /metrics`
//! (or `HEAD`) in the text exposition format 0.0.4; any other path is 404.
//!
//! One request per connection (`Connection: close`). The request head is
//! read with a size bound ([`MAX_HEAD`]) and a timeout; only the request
//! line is looked at. At most [`MAX_CONNECTIONS`] connections are served at
//! once; more are closed at once.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use blkmesh_proto::v1::{GetStatsResponse, IoStats, OpStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::control::hub::{Control, WorkerCounts};
use crate::stats::{self, Filter};

/// Largest accepted request head (request line and headers).
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// Serves `/metrics` until shutdown begins.
pub(crate) async fn serve(listener: TcpListener, control: Arc<Control>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropping the set (at shutdown) aborts connections still open.
    let mut conns = JoinSet::new();
    let shutdown = control.shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        tracing::debug!(%peer, "metrics: too many connections; closing");
                        continue;
                    };
                    let control = control.clone();
                    conns.spawn(async move {
                        handle(stream, &control).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Closed before sending anything: nothing to answer.
    Closed,
    /// Longer than [`MAX_HEAD`].
    TooLarge,
    /// Closed mid-head or not HTTP.
    Malformed,
}

/// Reads up to the blank line that ends the head; returns the request line.
async fn read_head(stream: &mut TcpStream) -> Result<String, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Malformed)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Malformed
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
    if buf.len() > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| HeadError::Malformed)?;
    Ok(line.trim_end_matches('\r').to_string())
}

/// Offset of the end of the head (`\r\n\r\n` or `\n\n`), if complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// A response: status line, content type, body.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
    extra: &'static str,
}

impl Reply {
    fn text(status: &'static str, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            extra: "",
        }
    }
}

/// Answers the request line: `METHOD TARGET HTTP/1.x`.
fn route(line: &str, control: &Control) -> (Reply, bool) {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Reply::text("400 Bad Request", "bad request line"), false);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return (Reply::text("400 Bad Request", "bad request line"), false);
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Reply::text("405 Method Not Allowed", "only GET and HEAD");
            r.extra = "Allow: GET, HEAD\r\n";
            return (r, false);
        }
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return (
            Reply::text("404 Not Found", "not found; try /metrics"),
            head,
        );
    }
    let body = render(control);
    (
        Reply {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body,
            extra: "",
        },
        head,
    )
}

async fn handle(mut stream: TcpStream, control: &Control) {
    let (reply, head_only) = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await
    {
        Err(_) => (Reply::text("408 Request Timeout", "request timeout"), false),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => (
            Reply::text(
                "431 Request Header Fields Too Large",
                "request head too large",
            ),
            false,
        ),
        Ok(Err(HeadError::Malformed)) => (Reply::text("400 Bad Request", "bad request"), false),
        Ok(Ok(line)) => route(&line, control),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.extra
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(reply.body.as_bytes());
    }
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!("metrics: cannot send the response: {e}");
    }
}

// ----- the exposition -----

/// Renders every metric.
pub(crate) fn render(control: &Control) -> String {
    let cfg = control.stats_config();
    let workers = control.worker_counts();
    let stats = {
        let store = control.stats();
        stats::aggregate(&cfg, &store, &Filter::default())
    };
    render_stats(&stats, workers, cfg.exports.len(), cfg.nodes.len())
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `name="value",...` with values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// The five ops of `io` with their metric names; absent ones are zero.
fn ops(io: &IoStats) -> [(&'static str, OpStats); 5] {
    let get = |o: &Option<OpStats>| o.clone().unwrap_or_default();
    [
        (OPS[0], get(&io.read)),
        (OPS[1], get(&io.write)),
        (OPS[2], get(&io.flush)),
        (OPS[3], get(&io.discard)),
        (OPS[4], get(&io.write_zeroes)),
    ]
}

/// Upper bound of histogram bucket `i` in seconds: 2^i µs, written exactly.
pub(crate) fn bucket_le(i: usize) -> String {
    let us: u128 = 1u128 << i.min(120);
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text of `stats` and the gauges.
pub(crate) fn render_stats(
    stats: &GetStatsResponse,
    workers: WorkerCounts,
    exports: usize,
    nodes: usize,
) -> String {
    let mut out = String::new();
    type Field = fn(&OpStats) -> u64;
    let counters: [(&str, &str, Field); 3] = [
        ("ops", "Requests completed", |o| o.ops),
        ("bytes", "Bytes transferred", |o| o.bytes),
        ("errors", "Requests failed", |o| o.errors),
    ];

    for (what, help, field) in counters {
        let name = format!("blkmesh_export_{what}_total");
        family(
            &mut out,
            &name,
            "counter",
            &format!("{help}, per export, queue and op (as seen by the frontend)."),
        );
        for e in &stats.exports {
            for q in &e.queues {
                let io = q.io.clone().unwrap_or_default();
                let queue = q.queue.to_string();
                for (op, s) in ops(&io) {
                    let l = labels(&[("export", &e.export), ("queue", &queue), ("op", op)]);
                    let _ = writeln!(out, "{name}{{{l}}} {}", field(&s));
                }
            }
        }
    }
    family(
        &mut out,
        "blkmesh_export_in_flight",
        "gauge",
        "Requests in flight per export and queue.",
    );
    for e in &stats.exports {
        for q in &e.queues {
            let queue = q.queue.to_string();
            let l = labels(&[("export", &e.export), ("queue", &queue)]);
            let in_flight = q.io.as_ref().map_or(0, |io| io.in_flight);
            let _ = writeln!(out, "blkmesh_export_in_flight{{{l}}} {in_flight}");
        }
    }
    let name = "blkmesh_export_latency_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Request latency per export and op (power-of-two microsecond buckets).",
    );
    for e in &stats.exports {
        let io = e.io.clone().unwrap_or_default();
        for (op, s) in ops(&io) {
            let h = s.latency.unwrap_or_default();
            let l = labels(&[("export", &e.export), ("op", op)]);
            // The last bucket also holds everything longer: it has no bound
            // of its own and only shows in +Inf.
            let bounded = h.buckets.len().saturating_sub(1);
            let mut cumulative: u64 = 0;
            for (i, n) in h.buckets.iter().take(bounded).enumerate() {
                cumulative = cumulative.saturating_add(*n);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{l},le=\"{}\"}} {cumulative}",
                    bucket_le(i)
                );
            }
            let count = h.buckets.iter().fold(0u64, |a, n| a.saturating_add(*n));
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum_ns as f64 / 1e9);
            let _ = writeln!(out, "{name}_count{{{l}}} {count}");
        }
    }

    for (what, help, field) in counters {
        let name = format!("blkmesh_node_{what}_total");
        family(
            &mut out,
            &name,
            "counter",
            &format!("{help}, per node and op (summed over the workers)."),
        );
        for n in &stats.nodes {
            let io = n.io.clone().unwrap_or_default();
            for (op, s) in ops(&io) {
                let l = labels(&[("node", &n.node), ("op", op)]);
                let _ = writeln!(out, "{name}{{{l}}} {}", field(&s));
            }
        }
    }

    family(
        &mut out,
        "blkmesh_workers",
        "gauge",
        "Known workers by state.",
    );
    let _ = writeln!(out, "blkmesh_workers{{state=\"alive\"}} {}", workers.alive);
    let _ = writeln!(out, "blkmesh_workers{{state=\"gone\"}} {}", workers.gone);
    family(&mut out, "blkmesh_exports", "gauge", "Configured exports.");
    let _ = writeln!(out, "blkmesh_exports {exports}");
    family(&mut out, "blkmesh_nodes", "gauge", "Configured nodes.");
    let _ = writeln!(out, "blkmesh_nodes {nodes}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::{ExportStats, LatencyHistogram, QueueStats};

    #[test]
    fn bucket_bounds() {
        assert_eq!(bucket_le(0), "0.000001");
        assert_eq!(bucket_le(1), "0.000002");
        assert_eq!(bucket_le(4), "0.000016");
        assert_eq!(bucket_le(20), "1.048576");
        assert_eq!(bucket_le(63), "9223372036854.775808");
    }

    #[test]
    fn label_escaping() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(labels(&[("x", "y"), ("z", "\"")]), "x=\"y\",z=\"\\\"\"");
    }

    #[test]
    fn head_parsing() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn histogram_lines() {
        let io = IoStats {
            read: Some(OpStats {
                ops: 6,
                bytes: 0,
                errors: 0,
                latency: Some(LatencyHistogram {
                    buckets: vec![1, 2, 3],
                    sum_ns: 1_500_000_000,
                }),
            }),
            ..Default::default()
        };
        let stats = GetStatsResponse {
            exports: vec![ExportStats {
                export: "e".into(),
                io: Some(io.clone()),
                queues: vec![QueueStats {
                    export: "e".into(),
                    queue: 0,
                    io: Some(io),
                }],
            }],
            nodes: vec![],
        };
        let text = render_stats(&stats, WorkerCounts::default(), 1, 0);
        for line in [
            "blkmesh_export_ops_total{export=\"e\",queue=\"0\",op=\"read\"} 6",
            "blkmesh_export_latency_seconds_bucket{export=\"e\",op=\"read\",le=\"0.000001\"} 1",
            "blkmesh_export_latency_seconds_bucket{export=\"e\",op=\"read\",le=\"0.000002\"} 3",
            "blkmesh_export_latency_seconds_bucket{export=\"e\",op=\"read\",le=\"+Inf\"} 6",
            "blkmesh_export_latency_seconds_sum{export=\"e\",op=\"read\"} 1.5",
            "blkmesh_export_latency_seconds_count{export=\"e\",op=\"read\"} 6",
            "blkmesh_export_latency_seconds_count{export=\"e\",op=\"write\"} 0",
            "blkmesh_exports 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("le=\"0.000004\""), "{text}");
    }
}
