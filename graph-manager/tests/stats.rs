//! StatsService, the event feed and the Prometheus endpoint: a real manager
//! on 127.0.0.1:0, real tonic clients and real TCP connections.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use blkmesh_manager::{Manager, ManagerConfig, RunningManager};
use blkmesh_proto::agent::v1::WorkerHello;
use blkmesh_proto::v1::event::Kind;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::{Code, Streaming};

mod common;
use common::agent::{FrontendSession, WorkerSession};
use common::client::{connect, within, Clients};

async fn start(dir: &Path) -> RunningManager {
    let config = ManagerConfig::new(dir.to_path_buf())
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_metrics("127.0.0.1:0".parse().unwrap());
    Manager::bind(config).await.unwrap().spawn()
}

async fn add_null(c: &mut Clients, name: &str) {
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(NodeSpec {
                name: name.into(),
                driver: Some(Driver::Null(NullOptions {
                    size: 1 << 20,
                    latency_ns: 0,
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn add_export(c: &mut Clients, id: &str, node: &str, queues: u32) {
    c.exports
        .add_export(AddExportRequest {
            export: Some(VhostUserBlkExport {
                id: id.into(),
                node: node.into(),
                socket: format!("/tmp/{id}.sock"),
                num_queues: queues,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

async fn register_worker(c: &mut Clients, name: &str) -> WorkerSession {
    WorkerSession::open(
        &mut c.agents,
        WorkerHello {
            name: name.into(),
            socket: format!("/tmp/{name}.sock"),
            pid: 1,
        },
    )
    .await
    .unwrap()
}

fn op(ops: u64, errors: u64, buckets: &[u64]) -> Option<OpStats> {
    Some(OpStats {
        ops,
        bytes: ops * 512,
        errors,
        latency: Some(LatencyHistogram {
            buckets: buckets.to_vec(),
            sum_ns: ops * 1000,
        }),
    })
}

fn queue(export: &str, q: u32, read: Option<OpStats>, in_flight: u64) -> QueueStats {
    QueueStats {
        export: export.into(),
        queue: q,
        io: Some(IoStats {
            read,
            in_flight,
            ..Default::default()
        }),
    }
}

fn node(name: &str, read: Option<OpStats>, write: Option<OpStats>) -> NodeStats {
    NodeStats {
        node: name.into(),
        io: Some(IoStats {
            read,
            write,
            ..Default::default()
        }),
    }
}

async fn report(
    c: &mut Clients,
    source: &str,
    queues: Vec<QueueStats>,
    nodes: Vec<NodeStats>,
) -> Result<(), tonic::Status> {
    report_once(
        c,
        StatsReport {
            source: source.into(),
            queues,
            nodes,
        },
    )
    .await
}

/// Sends `r` on a session of its own for its source ("worker/<name>" or
/// "frontend/<name>", not connected otherwise), and waits until the
/// manager took it (the session ends quietly) or refused it (the session
/// ends with the status).
async fn report_once(c: &mut Clients, r: StatsReport) -> Result<(), tonic::Status> {
    let (kind, name) = r.source.split_once('/').expect("kind/name");
    let name = name.to_string();
    match kind {
        "worker" => {
            let hello = WorkerHello {
                socket: format!("/tmp/{name}.sock"),
                name,
                pid: 1,
            };
            let w = WorkerSession::open(&mut c.agents, hello).await?;
            w.stats(r);
            w.finish().await
        }
        "frontend" => {
            let fe = FrontendSession::open(&mut c.agents, &name).await?;
            fe.stats(r);
            fe.finish().await
        }
        other => panic!("no agent kind {other:?}"),
    }
}

async fn get_stats(
    c: &mut Clients,
    exports: &[&str],
    nodes: &[&str],
) -> Result<GetStatsResponse, tonic::Status> {
    c.stats
        .get_stats(GetStatsRequest {
            exports: exports.iter().map(|s| s.to_string()).collect(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .map(|r| r.into_inner())
}

fn read_of(io: &Option<IoStats>) -> OpStats {
    io.as_ref().unwrap().read.clone().unwrap()
}

/// Sends raw bytes over a new connection and returns the whole response.
async fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = within("metrics connect", TcpStream::connect(addr))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    within("metrics response", s.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn get_stats_sums_sources_and_metrics_show_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0").await;
    add_null(&mut c, "n0").await;
    add_null(&mut c, "n1").await;
    add_export(&mut c, "e", "n0", 2).await;

    // Nothing reported yet: configured exports and nodes, all zero.
    let s = get_stats(&mut c, &[], &[]).await.unwrap();
    assert_eq!(s.exports.len(), 1);
    assert_eq!(s.exports[0].queues.len(), 2);
    assert_eq!(read_of(&s.exports[0].io).ops, 0);
    assert_eq!(s.nodes.len(), 2);

    // Two frontends report the same queue: summed, histograms padded.
    report(
        &mut c,
        "frontend/f1",
        vec![queue("e", 0, op(4, 1, &[1, 3]), 2)],
        vec![],
    )
    .await
    .unwrap();
    report(
        &mut c,
        "frontend/f2",
        vec![
            queue("e", 0, op(6, 0, &[0, 0, 6]), 1),
            queue("e", 1, op(1, 0, &[1]), 0),
            // Not a queue of "e", not an export: ignored.
            queue("e", 7, op(100, 0, &[]), 0),
            queue("gone", 0, op(100, 0, &[]), 0),
        ],
        // Node entries of a frontend are ignored.
        vec![node("n0", op(1000, 0, &[]), None)],
    )
    .await
    .unwrap();
    // Two workers report the same node, on their sessions.
    let w1 = register_worker(&mut c, "w1").await;
    w.stats(StatsReport {
        source: String::new(),
        queues: vec![queue("e", 0, op(1000, 0, &[]), 0)], // ignored
        nodes: vec![node("n0", op(5, 0, &[5]), None)],
    });
    w1.stats(StatsReport {
        source: String::new(),
        queues: vec![],
        nodes: vec![
            node("n0", op(7, 2, &[0, 7]), None),
            node("n1", None, op(3, 0, &[3])),
        ],
    });
    // Reports have no answer: wait until both count.
    within("the workers' reports", async {
        loop {
            let s = get_stats(&mut c, &[], &["n0", "n1"]).await.unwrap();
            let n1 = s.nodes[1].io.as_ref().unwrap().write.clone().unwrap();
            if read_of(&s.nodes[0].io).ops == 12 && n1.ops == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let s = get_stats(&mut c, &[], &[]).await.unwrap();
    let e = &s.exports[0];
    assert_eq!(e.export, "e");
    let q0 = read_of(&e.queues[0].io);
    assert_eq!((q0.ops, q0.bytes, q0.errors), (10, 5120, 1));
    let h = q0.latency.unwrap();
    assert_eq!(h.buckets, vec![1, 3, 6]);
    assert_eq!(h.sum_ns, 10_000);
    assert_eq!(e.queues[0].io.as_ref().unwrap().in_flight, 3);
    assert_eq!(read_of(&e.queues[1].io).ops, 1);
    let total = read_of(&e.io);
    assert_eq!((total.ops, total.errors), (11, 1));
    assert_eq!(total.latency.unwrap().buckets, vec![2, 3, 6]);
    assert_eq!(e.io.as_ref().unwrap().in_flight, 3);

    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.nodes[0].node, "n0");
    let n0 = read_of(&s.nodes[0].io);
    assert_eq!((n0.ops, n0.errors), (12, 2));
    assert_eq!(n0.latency.unwrap().buckets, vec![5, 7]);
    let n1 = s.nodes[1].io.as_ref().unwrap().write.clone().unwrap();
    assert_eq!(n1.ops, 3);

    // A source's newer report replaces its older one.
    report(
        &mut c,
        "frontend/f1",
        vec![queue("e", 0, op(5, 1, &[1, 4]), 0)],
        vec![],
    )
    .await
    .unwrap();
    let s = get_stats(&mut c, &["e"], &[]).await.unwrap();
    assert_eq!(read_of(&s.exports[0].queues[0].io).ops, 11);

    // Filters: per list, empty = all; unknown names are NOT_FOUND.
    let s = get_stats(&mut c, &["e"], &["n1"]).await.unwrap();
    assert_eq!(s.exports.len(), 1);
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(s.nodes[0].node, "n1");
    let s = get_stats(&mut c, &[], &["n0"]).await.unwrap();
    assert_eq!((s.exports.len(), s.nodes.len()), (1, 1));
    let err = get_stats(&mut c, &["nope"], &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("exports"), "{err:?}");
    let err = get_stats(&mut c, &[], &["nope"]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Prometheus text over a real connection.
    let addr = m.metrics_addr().expect("metrics enabled");
    let resp = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in [
        "# TYPE blkmesh_export_ops_total counter",
        "blkmesh_export_ops_total{export=\"e\",queue=\"0\",op=\"read\"} 11",
        "blkmesh_export_ops_total{export=\"e\",queue=\"1\",op=\"read\"} 1",
        "blkmesh_export_ops_total{export=\"e\",queue=\"0\",op=\"write\"} 0",
        "blkmesh_export_bytes_total{export=\"e\",queue=\"0\",op=\"read\"} 5632",
        "blkmesh_export_errors_total{export=\"e\",queue=\"0\",op=\"read\"} 1",
        "blkmesh_export_in_flight{export=\"e\",queue=\"0\"} 1",
        "# TYPE blkmesh_export_latency_seconds histogram",
        "blkmesh_export_latency_seconds_bucket{export=\"e\",op=\"read\",le=\"0.000001\"} 2",
        "blkmesh_export_latency_seconds_bucket{export=\"e\",op=\"read\",le=\"0.000002\"} 6",
        "blkmesh_export_latency_seconds_bucket{export=\"e\",op=\"read\",le=\"+Inf\"} 12",
        "blkmesh_export_latency_seconds_count{export=\"e\",op=\"read\"} 12",
        "blkmesh_export_latency_seconds_sum{export=\"e\",op=\"read\"} 0.000012",
        "blkmesh_node_ops_total{node=\"n0\",op=\"read\"} 12",
        "blkmesh_node_errors_total{node=\"n0\",op=\"read\"} 2",
        "blkmesh_node_bytes_total{node=\"n1\",op=\"write\"} 1536",
        "blkmesh_workers{state=\"alive\"} 2",
        "blkmesh_workers{state=\"gone\"} 0",
        "blkmesh_exports 1",
        "blkmesh_nodes 2",
    ] {
        assert!(body.lines().any(|l| l == line), "{line:?} missing:\n{body}");
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, body.len());

    // Query strings are ignored; HEAD has no body.
    assert!(http(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 200 OK"));
    let resp = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200 OK") && resp.ends_with("\r\n\r\n"));
    // Other paths, methods, garbage, oversized heads.
    assert!(http(addr, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 404 "));
    assert!(http(addr, b"GET /metricsx HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 404 "));
    assert!(http(addr, b"POST /metrics HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 405 "));
    assert!(http(addr, b"\x00\xff garbage \x01\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 400 "));
    assert!(http(addr, b"GET /metrics\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 400 "));
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 10_000));
    assert!(http(addr, &big).await.starts_with("HTTP/1.1 431 "));
    // Closed mid-head: no answer, no harm.
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = within("half request", s.read_to_end(&mut out)).await;
    }
    // Still serving.
    assert!(http(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .contains("blkmesh_exports 1"));
    // gRPC too.
    get_stats(&mut c, &[], &[]).await.unwrap();

    drop(c);
    m.stop().await.unwrap();
    // The metrics listener is gone with the manager.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn bad_reports_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;

    let hist = |n: usize| {
        Some(OpStats {
            latency: Some(LatencyHistogram {
                buckets: vec![1; n],
                sum_ns: 0,
            }),
            ..Default::default()
        })
    };
    // The source is the session's (the manager sets it): only what the
    // report itself holds can be wrong.
    let cases: Vec<(StatsReport, &str)> = vec![
        (
            StatsReport {
                source: "frontend/f0".into(),
                queues: vec![queue("e", 0, None, 0); 4097],
                ..Default::default()
            },
            "queues: must have at most 4096 entries",
        ),
        (
            StatsReport {
                source: "worker/w0".into(),
                nodes: vec![node("n", None, None); 4097],
                ..Default::default()
            },
            "nodes: must have at most 4096 entries",
        ),
        (
            StatsReport {
                source: "frontend/f0".into(),
                queues: vec![queue("e", 0, None, 0), queue("e", 1, hist(65), 0)],
                ..Default::default()
            },
            "queues[1].io.read.latency.buckets: must have at most 64 buckets",
        ),
        (
            StatsReport {
                source: "worker/w0".into(),
                nodes: vec![node("n", None, hist(65))],
                ..Default::default()
            },
            "nodes[0].io.write.latency.buckets",
        ),
        (
            StatsReport {
                source: "frontend/f0".into(),
                queues: vec![queue("", 0, None, 0)],
                ..Default::default()
            },
            "queues[0].export: must not be empty",
        ),
        (
            StatsReport {
                source: "worker/w0".into(),
                nodes: vec![node("a\"b", None, None)],
                ..Default::default()
            },
            "nodes[0].node: must contain only",
        ),
    ];
    for (r, needle) in cases {
        // A refused report ends the session with the reason.
        let err = report_once(&mut c, r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{err:?} lacks {needle:?}");
    }
    // Limits themselves are fine.
    report_once(
        &mut c,
        StatsReport {
            source: format!("worker/{}", "w".repeat(64)),
            nodes: vec![node("n", hist(64), None); 4096],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    m.stop().await.unwrap();
}

async fn next_kind(s: &mut Streaming<Event>) -> Kind {
    let ev = within("event", s.message())
        .await
        .unwrap()
        .expect("event stream ended");
    assert!(ev.time_ms > 1_600_000_000_000, "{ev:?}");
    ev.kind.expect("event kind")
}

#[tokio::test]
async fn watch_events_sees_changes_and_new_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let mut events = c
        .stats
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    let worker = register_worker(&mut c, "w0").await;
    assert_eq!(
        next_kind(&mut events).await,
        Kind::WorkerJoined("w0".into())
    );
    add_null(&mut c, "n0").await;
    assert_eq!(next_kind(&mut events).await, Kind::NodeAdded("n0".into()));
    add_export(&mut c, "e", "n0", 2).await;
    assert_eq!(next_kind(&mut events).await, Kind::ExportAdded("e".into()));

    let fe = FrontendSession::open(&mut c.agents, "f0").await.unwrap();
    assert_eq!(
        next_kind(&mut events).await,
        Kind::FrontendJoined("f0".into())
    );

    // First report sets the baseline; growing errors raise io_error with
    // the increase (summed over ops); unchanged errors raise nothing.
    let errs = |read: u64, write: u64| QueueStats {
        export: "e".into(),
        queue: 1,
        io: Some(IoStats {
            read: op(10, read, &[]),
            write: op(10, write, &[]),
            ..Default::default()
        }),
    };
    // On the agents' own sessions, in order.
    let stats = |queues, nodes| StatsReport {
        source: String::new(),
        queues,
        nodes,
    };
    fe.stats(stats(vec![errs(1, 0)], vec![]));
    fe.stats(stats(vec![errs(3, 2)], vec![]));
    assert_eq!(
        next_kind(&mut events).await,
        Kind::IoError(IoErrorEvent {
            export: "e".into(),
            queue: 1,
            new_errors: 4,
        })
    );
    fe.stats(stats(vec![errs(3, 2)], vec![]));
    // Worker reports never raise io_error.
    worker.stats(stats(
        vec![errs(100, 100)],
        vec![node("n0", op(1, 1, &[]), None)],
    ));
    // A queue new in a later report counts from zero.
    fe.stats(stats(
        vec![errs(3, 2), queue("e", 0, op(1, 1, &[]), 0)],
        vec![],
    ));
    assert_eq!(
        next_kind(&mut events).await,
        Kind::IoError(IoErrorEvent {
            export: "e".into(),
            queue: 0,
            new_errors: 1,
        })
    );

    drop(fe);
    assert_eq!(
        next_kind(&mut events).await,
        Kind::FrontendLeft("f0".into())
    );
    c.exports
        .remove_export(RemoveExportRequest { id: "e".into() })
        .await
        .unwrap();
    assert_eq!(
        next_kind(&mut events).await,
        Kind::ExportRemoved("e".into())
    );
    c.nodes
        .remove_node(RemoveNodeRequest { name: "n0".into() })
        .await
        .unwrap();
    assert_eq!(next_kind(&mut events).await, Kind::NodeRemoved("n0".into()));
    drop(worker);
    assert_eq!(next_kind(&mut events).await, Kind::WorkerLeft("w0".into()));

    // A second subscriber sees only what happens after it subscribed.
    let mut late = c
        .stats
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    add_null(&mut c, "n1").await;
    assert_eq!(next_kind(&mut late).await, Kind::NodeAdded("n1".into()));
    assert_eq!(next_kind(&mut events).await, Kind::NodeAdded("n1".into()));

    // Stopping the manager ends the streams.
    drop(c);
    within("stop", m.stop()).await.unwrap();
    assert!(!matches!(events.message().await, Ok(Some(_))));
}

#[tokio::test]
async fn slow_subscriber_skips_lost_events_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let mut events = c
        .stats
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    // Far more events than the channel (and the HTTP/2 windows) hold,
    // none read meanwhile: every report raises 4096 io_error events.
    let queues = |errors: u64| -> Vec<QueueStats> {
        (0..4096)
            .map(|q| queue("e", q, op(1, errors, &[]), 0))
            .collect()
    };
    const REPORTS: u64 = 40;
    for i in 0..=REPORTS {
        report(&mut c, "frontend/f0", queues(i), vec![])
            .await
            .unwrap();
    }
    add_null(&mut c, "last").await;
    // The stream goes on and eventually delivers the last event.
    let mut seen = 0;
    loop {
        seen += 1;
        if next_kind(&mut events).await == Kind::NodeAdded("last".into()) {
            break;
        }
    }
    assert!(
        seen < REPORTS * 4096,
        "some events were skipped ({seen} seen)"
    );
    m.stop().await.unwrap();
}
