use std::time::Duration;

use blkmesh_proto::agent::v1::{
    zone_answer, ExportStatus, FrontendHello, WorkerHello, ZoneAnswer, ZoneCommand, ZoneError,
};
use blkmesh_proto::v1::{ExportState, GetStatsRequest, IoStats, NodeStats, OpStats, StatsReport};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::core::fixtures::{null, state, with_export, MIB};
use crate::stats::{aggregate, Filter};

const WAIT: Duration = Duration::from_secs(5);

/// A manager with node `a` exported as `e` and `e2`, worker `w0` known.
fn control(dir: &tempfile::TempDir) -> Arc<Control> {
    let mut s = state(vec![null("a", MIB)], &["w0"]);
    with_export(&mut s, "e", "a", &["w0"], false);
    with_export(&mut s, "e2", "a", &["w0"], false);
    Control::new(
        s,
        dir.path().join("state.json"),
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
}

/// The agent's end of a session.
struct Agent<U, D> {
    up: mpsc::UnboundedSender<Up<U>>,
    down: mpsc::UnboundedReceiver<Down<D>>,
}

impl<U, D> Agent<U, D> {
    fn send(&self, msg: U) {
        self.up.send(Ok(msg)).expect("session reading");
    }

    /// The next message down, or the error that ended the session.
    async fn next(&mut self) -> Down<D> {
        tokio::time::timeout(WAIT, self.down.recv())
            .await
            .expect("a message down in time")
            .expect("the session sent something before ending")
    }

    /// Waits for the session to end (its sending half dropped).
    async fn ended(&mut self) {
        loop {
            match tokio::time::timeout(WAIT, self.down.recv()).await {
                Ok(None) => return,
                Ok(Some(_)) => continue,
                Err(_) => panic!("the session did not end"),
            }
        }
    }
}

fn frontend(control: &Arc<Control>) -> Agent<FrontendUp, FrontendDown> {
    let (up, rx) = mpsc::unbounded_channel();
    let down = control.frontend_session(UnboundedReceiverStream::new(rx));
    Agent { up, down }
}

fn worker(control: &Arc<Control>) -> Agent<WorkerUp, WorkerDown> {
    let (up, rx) = mpsc::unbounded_channel();
    let down = control.worker_session(UnboundedReceiverStream::new(rx));
    Agent { up, down }
}

fn fe_hello(name: &str) -> FrontendUp {
    FrontendUp {
        msg: Some(frontend_up::Msg::Hello(FrontendHello { name: name.into() })),
    }
}

fn w_hello(name: &str) -> WorkerUp {
    WorkerUp {
        msg: Some(worker_up::Msg::Hello(WorkerHello {
            name: name.into(),
            socket: format!("/run/blkmesh/{name}.sock"),
            pid: 7,
        })),
    }
}

fn msg(d: Down<FrontendDown>) -> FrontendMsg {
    d.expect("no error").msg.expect("a message")
}

fn protocol_error<T: std::fmt::Debug>(d: Down<T>) -> String {
    match d {
        Err(e @ ApiError::Protocol(_)) => e.to_string(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// Opens frontend `name`'s session and reads through its snapshot: the
/// export ids it named.
async fn open_frontend(
    control: &Arc<Control>,
    name: &str,
) -> (Agent<FrontendUp, FrontendDown>, Vec<String>) {
    let mut fe = frontend(control);
    fe.send(fe_hello(name));
    assert!(matches!(msg(fe.next().await), FrontendMsg::Accepted(_)));
    let mut ids = Vec::new();
    loop {
        match msg(fe.next().await) {
            FrontendMsg::Upsert(plan) => ids.push(plan.export.expect("export").id),
            FrontendMsg::SnapshotEnd(_) => return (fe, ids),
            other => panic!("unexpected {other:?} in the snapshot"),
        }
    }
}

/// Hands frontend `name`'s session a zone command, as ZoneService does.
fn zone_call(control: &Control, name: &str) -> oneshot::Receiver<crate::sessions::ZoneAnswer> {
    let (answer, rx) = oneshot::channel();
    let inner = control.lock();
    let tx = inner.sessions.frontends[name].tx.as_ref().expect("live");
    let command = ZoneCommand {
        export: "e".into(),
        ..Default::default()
    };
    tx.send(ToFrontend::Zone { command, answer })
        .expect("session open");
    rx
}

fn zone_answer(id: u64, errno: i32) -> FrontendUp {
    FrontendUp {
        msg: Some(frontend_up::Msg::ZoneAnswer(ZoneAnswer {
            id,
            result: Some(zone_answer::Result::Error(ZoneError {
                errno,
                message: format!("errno {errno}"),
            })),
        })),
    }
}

#[tokio::test]
async fn the_snapshot_ends_explicitly_and_changes_follow_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let (mut fe, ids) = open_frontend(&control, "f0").await;
    assert_eq!(ids, ["e", "e2"]);
    // Changes come after the snapshot's end, in the order they were made.
    {
        let mut inner = control.lock();
        inner.sessions.broadcast(FrontendMsg::Remove("e2".into()));
        crate::control::hub::push_plans(&mut inner, &["e"]);
        inner.sessions.broadcast(FrontendMsg::Remove("e".into()));
    }
    assert!(matches!(msg(fe.next().await), FrontendMsg::Remove(id) if id == "e2"));
    assert!(
        matches!(msg(fe.next().await), FrontendMsg::Upsert(p) if p.export.as_ref().unwrap().id == "e")
    );
    assert!(matches!(msg(fe.next().await), FrontendMsg::Remove(id) if id == "e"));
}

#[tokio::test]
async fn an_empty_manager_sends_an_empty_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let control = Control::new(
        state(vec![], &[]),
        dir.path().join("state.json"),
        WAIT,
        WAIT,
    );
    let (_fe, ids) = open_frontend(&control, "f0").await;
    assert!(ids.is_empty());
}

#[tokio::test]
async fn the_first_message_must_be_the_hello() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let mut fe = frontend(&control);
    fe.send(FrontendUp {
        msg: Some(frontend_up::Msg::Stats(StatsReport::default())),
    });
    let e = protocol_error(fe.next().await);
    assert!(e.contains("first message must be hello (got stats)"), "{e}");
    fe.ended().await;
    assert!(control.lock().sessions.frontends.is_empty());

    let mut w = worker(&control);
    w.send(WorkerUp { msg: None });
    let e = protocol_error(w.next().await);
    assert!(
        e.contains("first message must be hello (got an empty message)"),
        "{e}"
    );
    assert!(control.lock().sessions.live_workers.is_empty());

    // A session that ends before its hello.
    let Agent { up, down } = worker(&control);
    drop(up);
    let mut w: Agent<WorkerUp, _> = Agent {
        up: mpsc::unbounded_channel().0,
        down,
    };
    let e = protocol_error(w.next().await);
    assert!(e.contains("ended before its hello"), "{e}");
}

#[tokio::test]
async fn a_second_hello_ends_the_session_and_the_frontend_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let (mut fe, _) = open_frontend(&control, "f0").await;
    assert!(control.lock().sessions.frontend_live("f0"));
    fe.send(fe_hello("f0"));
    let e = protocol_error(fe.next().await);
    assert!(e.contains("hello is not allowed here"), "{e}");
    fe.ended().await;
    assert!(!control.lock().sessions.frontend_live("f0"));
    // The name is free again.
    let (_fe, _) = open_frontend(&control, "f0").await;
}

#[tokio::test]
async fn a_live_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let (_fe, _) = open_frontend(&control, "f0").await;
    let mut again = frontend(&control);
    again.send(fe_hello("f0"));
    assert!(matches!(
        again.next().await,
        Err(ApiError::AlreadyRegistered {
            kind: "frontend",
            ..
        })
    ));
    let mut bad = frontend(&control);
    bad.send(fe_hello("no spaces allowed"));
    assert!(matches!(bad.next().await, Err(ApiError::Graph(_))));
}

#[tokio::test]
async fn zone_answers_are_matched_by_id_and_unknown_ids_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let (mut fe, _) = open_frontend(&control, "f0").await;
    let first = zone_call(&control, "f0");
    let second = zone_call(&control, "f0");
    let ids: Vec<u64> = [fe.next().await, fe.next().await]
        .into_iter()
        .map(|d| match msg(d) {
            FrontendMsg::ZoneCommand(c) => {
                assert_eq!(c.export, "e");
                c.id
            }
            other => panic!("expected a zone command, got {other:?}"),
        })
        .collect();
    assert_eq!(ids, [1, 2]);
    // Answered out of order; an unknown id in between is ignored.
    fe.send(zone_answer(2, 22));
    fe.send(zone_answer(999, 5));
    fe.send(zone_answer(1, 16));
    let errno = |a: crate::sessions::ZoneAnswer| match a {
        Some(zone_answer::Result::Error(e)) => e.errno,
        other => panic!("expected an error answer, got {other:?}"),
    };
    assert_eq!(
        errno(tokio::time::timeout(WAIT, second).await.unwrap().unwrap()),
        22
    );
    assert_eq!(
        errno(tokio::time::timeout(WAIT, first).await.unwrap().unwrap()),
        16
    );
    // A second answer to the same id: ignored too; the session goes on.
    fe.send(zone_answer(1, 16));
    let third = zone_call(&control, "f0");
    assert!(matches!(msg(fe.next().await), FrontendMsg::ZoneCommand(c) if c.id == 3));
    // The session ends: the call waiting for it fails at once.
    drop(fe);
    let gone = tokio::time::timeout(WAIT, third).await.expect("in time");
    assert!(gone.is_err(), "the caller sees the session end");
    assert!(!control.lock().sessions.frontend_live("f0"));
}

#[tokio::test]
async fn export_reports_count_for_the_session_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let (mut fe, _) = open_frontend(&control, "f0").await;
    fe.send(FrontendUp {
        msg: Some(frontend_up::Msg::ExportStatus(ExportStatus {
            id: "e".into(),
            generation: 1,
            state: ExportState::Serving as i32,
            message: String::new(),
            size: MIB,
        })),
    });
    let mut seen = control.watch_reports();
    tokio::time::timeout(WAIT, async {
        loop {
            {
                let inner = control.lock();
                let rec = &inner.state.exports["e"];
                if let Some(r) = inner.sessions.serving_report(rec) {
                    assert_eq!(r.frontend, "f0");
                    return;
                }
            }
            let _ = seen.changed().await;
        }
    })
    .await
    .expect("the report is recorded");
    // A report with a bad state ends the session with the reason.
    fe.send(FrontendUp {
        msg: Some(frontend_up::Msg::ExportStatus(ExportStatus {
            id: "e".into(),
            generation: 1,
            state: 0,
            ..Default::default()
        })),
    });
    match fe.next().await {
        Err(ApiError::Graph(g)) => assert!(g.to_string().contains("EXPORT_STATE_SERVING")),
        other => panic!("expected the report refused, got {other:?}"),
    }
    fe.ended().await;
    let inner = control.lock();
    assert!(inner
        .sessions
        .serving_report(&inner.state.exports["e"])
        .is_none());
}

#[tokio::test]
async fn a_worker_session_is_the_worker_life_and_carries_its_stats() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let mut w = worker(&control);
    w.send(w_hello("w0"));
    assert!(matches!(
        w.next().await,
        Ok(WorkerDown {
            msg: Some(WorkerMsg::Accepted(_))
        })
    ));
    assert!(control.lock().sessions.live_workers.contains_key("w0"));
    let ops = OpStats {
        ops: 3,
        ..Default::default()
    };
    // The source is the session's, whatever the report says.
    w.send(WorkerUp {
        msg: Some(worker_up::Msg::Stats(StatsReport {
            source: "frontend/somebody-else".into(),
            nodes: vec![NodeStats {
                node: "a".into(),
                io: Some(IoStats {
                    read: Some(ops),
                    ..Default::default()
                }),
            }],
            ..Default::default()
        })),
    });
    tokio::time::timeout(WAIT, async {
        loop {
            let cfg = control.stats_config();
            let filter = Filter::from_request(GetStatsRequest::default(), &cfg).unwrap();
            let got = aggregate(&cfg, &control.stats(), &filter);
            let reads = got
                .nodes
                .iter()
                .find(|n| n.node == "a")
                .and_then(|n| n.io.as_ref()?.read.as_ref().map(|r| r.ops));
            if reads == Some(3) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the stats are recorded");
    // The worker goes away: gone, within its grace.
    drop(w);
    tokio::time::timeout(WAIT, async {
        while control.lock().sessions.live_workers.contains_key("w0") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the worker is gone");
    assert!(control.lock().sessions.gone_since.contains_key("w0"));
}

#[tokio::test]
async fn shutdown_ends_the_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    let (mut fe, _) = open_frontend(&control, "f0").await;
    let mut w = worker(&control);
    w.send(w_hello("w0"));
    assert!(w.next().await.is_ok());
    control.begin_shutdown();
    fe.ended().await;
    w.ended().await;
}

#[tokio::test]
async fn a_stopping_manager_does_not_wait_for_a_hello() {
    let dir = tempfile::tempdir().unwrap();
    let control = control(&dir);
    // A session that sends nothing.
    let mut fe = frontend(&control);
    control.begin_shutdown();
    assert!(matches!(fe.next().await, Err(ApiError::ShuttingDown)));
    // One that comes later is refused at once.
    let mut w = worker(&control);
    assert!(matches!(w.next().await, Err(ApiError::ShuttingDown)));
}
