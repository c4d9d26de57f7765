//! Worker loss: after `worker_grace` without a new registration, a lost
//! worker's queues move to the live workers (in-process manager, stand-in
//! workers and frontends over the real gRPC API).

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use blkmesh_manager::{Manager, ManagerConfig, RunningManager};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendEventKind;
use blkmesh_proto::agent::v1::WorkerHello;
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::*;

mod common;
use common::agent::{FrontendSession, WorkerSession};
use common::client::{connect, within, Clients};

async fn start(dir: &Path, grace: Duration) -> RunningManager {
    let config = ManagerConfig::new(dir.to_path_buf())
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_apply_timeout(Duration::from_millis(100))
        .with_worker_grace(grace);
    Manager::bind(config).await.unwrap().spawn()
}

fn sock(worker: &str) -> String {
    format!("/tmp/{worker}.sock")
}

async fn register(c: &mut Clients, name: &str) -> WorkerSession {
    WorkerSession::open(
        &mut c.agents,
        WorkerHello {
            name: name.into(),
            socket: sock(name),
            pid: 1,
        },
    )
    .await
    .unwrap()
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

async fn add_export(c: &mut Clients, id: &str, node: &str, queues: u32, spread: bool) {
    c.exports
        .add_export(AddExportRequest {
            export: Some(VhostUserBlkExport {
                id: id.into(),
                node: node.into(),
                socket: format!("/tmp/{id}.sock"),
                num_queues: queues,
                spread_queues: spread,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// Queue → worker of every export, by id.
async fn placement(c: &mut Clients) -> Vec<(String, Vec<String>)> {
    c.exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports
        .into_iter()
        .map(|e| {
            (
                e.export.unwrap().id,
                e.queues.into_iter().map(|q| q.worker).collect(),
            )
        })
        .collect()
}

async fn queues_of(c: &mut Clients, id: &str) -> Vec<String> {
    placement(c)
        .await
        .into_iter()
        .find(|(e, _)| e == id)
        .unwrap_or_else(|| panic!("no export {id}"))
        .1
}

async fn worker_state(c: &mut Clients, name: &str) -> WorkerState {
    let ws = c
        .workers
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    ws.iter()
        .find(|w| w.name == name)
        .map(|w| WorkerState::try_from(w.state).unwrap())
        .unwrap_or(WorkerState::Unspecified)
}

async fn wait_gone(c: &mut Clients, name: &str) {
    within("worker gone", async {
        while worker_state(c, name).await != WorkerState::Gone {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

async fn frontend(c: &mut Clients) -> FrontendSession {
    FrontendSession::open(&mut c.agents, "fe0").await.unwrap()
}

async fn next_upsert(s: &mut FrontendSession) -> ExportPlan {
    match s.next().await {
        FrontendEventKind::Upsert(plan) => plan,
        other => panic!("expected upsert, got {other:?}"),
    }
}

/// Fails if the frontend gets any event within `d`.
async fn no_event_for(s: &mut FrontendSession, d: Duration) {
    s.quiet_for(d).await;
}

fn plan_workers(plan: &ExportPlan) -> Vec<(String, String)> {
    plan.queues
        .iter()
        .map(|q| (q.worker.clone(), q.worker_socket.clone()))
        .collect()
}

#[tokio::test]
async fn lost_worker_queues_move_after_the_grace_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(400);
    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    let wa = register(&mut c, "wa").await;
    add_null(&mut c, "n0").await;
    add_export(&mut c, "e0", "n0", 2, false).await;
    let _wb = register(&mut c, "wb").await;
    let mut fe = frontend(&mut c).await;
    next_upsert(&mut fe).await;
    let mut events = c
        .stats
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    drop(wa);
    let lost_at = Instant::now();
    wait_gone(&mut c, "wa").await;
    // Within the grace nothing moves.
    assert_eq!(queues_of(&mut c, "e0").await, ["wa", "wa"]);

    let plan = next_upsert(&mut fe).await;
    let waited = lost_at.elapsed();
    assert!(waited >= grace, "moved after {waited:?}, before the grace");
    assert_eq!(plan.export.as_ref().unwrap().id, "e0");
    assert_eq!(
        plan_workers(&plan),
        [("wb".into(), sock("wb")), ("wb".into(), sock("wb"))]
    );
    assert_eq!(queues_of(&mut c, "e0").await, ["wb", "wb"]);
    assert_eq!(
        plan.generation, 1,
        "a placement change keeps the generation"
    );

    // The event feed saw the worker leave.
    let ev = within("event", events.message()).await.unwrap().unwrap();
    assert_eq!(ev.kind, Some(EventKind::WorkerLeft("wa".into())));

    // Persisted: a restarted manager has the new placement.
    drop(fe);
    drop(events);
    drop(c);
    within("stop", m.stop()).await.unwrap();
    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    assert_eq!(queues_of(&mut c, "e0").await, ["wb", "wb"]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn worker_back_within_the_grace_keeps_its_queues() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(600)).await;
    let mut c = connect(&m).await;
    let wa = register(&mut c, "wa").await;
    add_null(&mut c, "n0").await;
    add_export(&mut c, "e0", "n0", 2, false).await;
    let _wb = register(&mut c, "wb").await;
    let mut fe = frontend(&mut c).await;
    next_upsert(&mut fe).await;

    drop(wa);
    wait_gone(&mut c, "wa").await;
    let _wa = register(&mut c, "wa").await;
    // Well past the grace: nothing moved, nothing was pushed.
    no_event_for(&mut fe, Duration::from_millis(1200)).await;
    assert_eq!(queues_of(&mut c, "e0").await, ["wa", "wa"]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn a_timer_of_an_earlier_loss_does_not_cut_a_later_grace_short() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(1500);
    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    let wa = register(&mut c, "wa").await;
    add_null(&mut c, "n0").await;
    add_export(&mut c, "e0", "n0", 1, false).await;
    let _wb = register(&mut c, "wb").await;

    // Lost at t0, back at ~t0+100 ms, lost again at ~t0+1 s: the first
    // timer (t0+1.5 s) must not move anything; the second (t0+2.5 s) does.
    drop(wa);
    let t0 = Instant::now();
    wait_gone(&mut c, "wa").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let wa = register(&mut c, "wa").await;
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(t0.elapsed())).await;
    drop(wa);
    let second = Instant::now();
    wait_gone(&mut c, "wa").await;
    tokio::time::sleep(Duration::from_millis(1800).saturating_sub(t0.elapsed())).await;
    assert_eq!(
        queues_of(&mut c, "e0").await,
        ["wa"],
        "moved by the first loss's timer"
    );
    within("reassignment", async {
        while queues_of(&mut c, "e0").await != ["wb"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(second.elapsed() >= grace);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn with_no_live_worker_the_move_waits_for_the_next_registration() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(200)).await;
    let mut c = connect(&m).await;
    let wa = register(&mut c, "wa").await;
    add_null(&mut c, "n0").await;
    add_export(&mut c, "e0", "n0", 3, false).await;
    let mut fe = frontend(&mut c).await;
    next_upsert(&mut fe).await;

    drop(wa);
    wait_gone(&mut c, "wa").await;
    // Past the grace with nobody to take the queues: they stay.
    no_event_for(&mut fe, Duration::from_millis(600)).await;
    assert_eq!(queues_of(&mut c, "e0").await, ["wa"; 3]);

    // The first worker to register takes them at once.
    let _wb = register(&mut c, "wb").await;
    let plan = next_upsert(&mut fe).await;
    assert_eq!(plan_workers(&plan), vec![("wb".into(), sock("wb")); 3]);
    assert_eq!(queues_of(&mut c, "e0").await, ["wb"; 3]);

    // wa coming back later gets nothing back.
    let _wa = register(&mut c, "wa").await;
    no_event_for(&mut fe, Duration::from_millis(500)).await;
    assert_eq!(queues_of(&mut c, "e0").await, ["wb"; 3]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn placement_is_least_loaded_and_keeps_unspread_exports_together() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(200)).await;
    let mut c = connect(&m).await;
    for n in ["n0", "n1", "n2", "n3"] {
        add_null(&mut c, n).await;
    }
    let wa = register(&mut c, "wa").await;
    // e0: 3 queues on wa, not spread.
    add_export(&mut c, "e0", "n0", 3, false).await;
    let _wb = register(&mut c, "wb").await;
    let _wc = register(&mut c, "wc").await;
    // wb and wc have 0 queues: e1 goes to wb (name order), e2 to wc.
    add_export(&mut c, "e1", "n1", 1, false).await;
    add_export(&mut c, "e2", "n2", 2, false).await;
    // e3 spread over wa (3), wb (1), wc (2): starts at the least loaded.
    add_export(&mut c, "e3", "n3", 4, true).await;
    let before = placement(&mut c).await;
    assert_eq!(
        before,
        [
            ("e0".to_string(), vec!["wa".to_string(); 3]),
            ("e1".to_string(), vec!["wb".to_string()]),
            ("e2".to_string(), vec!["wc".to_string(); 2]),
            (
                "e3".to_string(),
                ["wb", "wc", "wa", "wb"].map(String::from).to_vec()
            ),
        ]
    );
    // Loads: wa 4, wb 3, wc 3.

    drop(wa);
    wait_gone(&mut c, "wa").await;
    within("reassignment", async {
        loop {
            let p = placement(&mut c).await;
            if p.iter().all(|(_, q)| !q.iter().any(|w| w == "wa")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // e0 (all 3 queues together) → wb (3 queues, ties by name) → wb 6;
    // e3's queue 2 (spread: queue by queue) → the least loaded, wc (3).
    assert_eq!(
        placement(&mut c).await,
        [
            ("e0".to_string(), vec!["wb".to_string(); 3]),
            ("e1".to_string(), vec!["wb".to_string()]),
            ("e2".to_string(), vec!["wc".to_string(); 2]),
            (
                "e3".to_string(),
                ["wb", "wc", "wc", "wb"].map(String::from).to_vec()
            ),
        ]
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn an_unspread_export_follows_its_queues_on_a_live_worker() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(200)).await;
    let mut c = connect(&m).await;
    add_null(&mut c, "n0").await;
    add_null(&mut c, "big").await;
    let wa = register(&mut c, "wa").await;
    add_export(&mut c, "e0", "n0", 2, false).await;
    let _wb = register(&mut c, "wb").await;
    let _wc = register(&mut c, "wc").await;
    // e0's queue 1 lives on wb: queue 0 follows it there, even though wc
    // ends up idle.
    c.workers
        .move_queue(MoveQueueRequest {
            export: "e0".into(),
            queue: 1,
            worker: "wb".into(),
        })
        .await
        .unwrap();
    add_export(&mut c, "big", "big", 4, false).await;
    let big = queues_of(&mut c, "big").await;
    assert_eq!(big, ["wc"; 4]);
    c.workers
        .drain_worker(DrainWorkerRequest {
            worker: "wc".into(),
        })
        .await
        .unwrap();
    // The drain alternates: big is [wa, wb, wa, wb]; wa 3, wb 3, wc 0 now.
    assert_eq!(queues_of(&mut c, "big").await, ["wa", "wb", "wa", "wb"]);
    drop(wa);
    wait_gone(&mut c, "wa").await;
    within("reassignment", async {
        while queues_of(&mut c, "e0").await != ["wb", "wb"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Not to the idle wc: each export stays on one worker.
    assert_eq!(queues_of(&mut c, "big").await, ["wb"; 4]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn workers_that_never_return_after_a_manager_restart_lose_their_queues() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(500);
    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    let wa = register(&mut c, "wa").await;
    add_null(&mut c, "n0").await;
    add_export(&mut c, "e0", "n0", 2, false).await;
    let wb = register(&mut c, "wb").await;
    drop((wa, wb));
    drop(c);
    within("stop", m.stop()).await.unwrap();

    // Restarted: wb comes back, wa never does.
    let started = Instant::now();
    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    let _wb = register(&mut c, "wb").await;
    assert_eq!(queues_of(&mut c, "e0").await, ["wa", "wa"]);
    within("reassignment", async {
        while queues_of(&mut c, "e0").await != ["wb", "wb"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(started.elapsed() >= grace);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn workers_back_after_a_manager_restart_keep_their_queues() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(800);
    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    let wa = register(&mut c, "wa").await;
    add_null(&mut c, "n0").await;
    add_export(&mut c, "e0", "n0", 2, false).await;
    let wb = register(&mut c, "wb").await;
    drop((wa, wb));
    drop(c);
    within("stop", m.stop()).await.unwrap();

    let m = start(dir.path(), grace).await;
    let mut c = connect(&m).await;
    let _wb = register(&mut c, "wb").await;
    let _wa = register(&mut c, "wa").await;
    tokio::time::sleep(grace * 2).await;
    assert_eq!(queues_of(&mut c, "e0").await, ["wa", "wa"]);
    m.stop().await.unwrap();
}
