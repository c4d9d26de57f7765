//! UpdateNode, ResizeNode, plan generations and export states, against a
//! real manager in-process. Frontends are played by the tests: they open a
//! frontend agent session and answer plans with export statuses.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use blkmesh_manager::{Manager, ManagerConfig, RunningManager, STATE_FILE};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendEventKind;
use blkmesh_proto::agent::v1::frontend_up::Msg as Up;
use blkmesh_proto::agent::v1::{ExportStatus, FrontendUp, WorkerHello};
use blkmesh_proto::v1::event::Kind;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Code, Streaming};

mod common;
use common::agent::{FrontendSession, WorkerSession};
use common::client::{add_export, connect, file, get_node, null, raw, within, Clients, WAIT};

/// Apply timeout of most tests: long enough for an in-process fake
/// frontend to answer, short enough when nobody does.
const APPLY: Duration = Duration::from_millis(2000);

async fn start(dir: &Path, apply: Duration) -> RunningManager {
    let config = ManagerConfig::new(dir.to_path_buf())
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_apply_timeout(apply);
    Manager::bind(config).await.unwrap().spawn()
}

fn iops(rate: u64) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: Some(Bucket { rate, burst: 0 }),
        ..Default::default()
    }
}

fn throttle(name: &str, child: &str, rate: u64, group: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: child.into(),
            limits: Some(iops(rate)),
            group: group.into(),
        })),
    }
}

fn faults(name: &str, child: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            rules: vec![],
            ..Default::default()
        })),
    }
}

fn export(id: &str, node: &str, writable: bool) -> VhostUserBlkExport {
    VhostUserBlkExport {
        id: id.into(),
        node: node.into(),
        socket: format!("/tmp/{id}.sock"),
        writable,
        ..Default::default()
    }
}

async fn add_node(c: &mut Clients, spec: NodeSpec) -> NodeInfo {
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(spec),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap()
}

async fn update(c: &mut Clients, spec: NodeSpec) -> Result<NodeInfo, tonic::Status> {
    c.nodes
        .update_node(UpdateNodeRequest { node: Some(spec) })
        .await
        .map(|r| r.into_inner().node.unwrap())
}

async fn resize(c: &mut Clients, name: &str, size: u64) -> Result<NodeInfo, tonic::Status> {
    c.nodes
        .resize_node(ResizeNodeRequest {
            name: name.into(),
            size,
        })
        .await
        .map(|r| r.into_inner().node.unwrap())
}

async fn list_exports(c: &mut Clients) -> Vec<ExportInfo> {
    c.exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports
}

async fn export_state(c: &mut Clients, id: &str) -> (ExportState, String) {
    let e = list_exports(c)
        .await
        .into_iter()
        .find(|e| e.export.as_ref().unwrap().id == id)
        .unwrap_or_else(|| panic!("export {id} not listed"));
    (ExportState::try_from(e.state).unwrap(), e.message)
}

async fn register_worker(c: &mut Clients) -> WorkerSession {
    WorkerSession::open(
        &mut c.agents,
        WorkerHello {
            name: "w0".into(),
            socket: "/tmp/w0.sock".into(),
            pid: 1,
        },
    )
    .await
    .unwrap()
}

/// Polls until export `id` is in `state` with `message` (reports travel
/// on the frontend's session, without an answer).
async fn wait_export_state(c: &mut Clients, id: &str, state: ExportState, message: &str) {
    within("the export state", async {
        loop {
            let (s, m) = export_state(c, id).await;
            if s == state && m == message {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needles: &[&str]) {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            for needle in needles {
                assert!(
                    s.message().contains(needle),
                    "{:?} does not contain {needle:?}",
                    s.message()
                );
            }
        }
    }
}

/// How a fake frontend answers a plan: `None` = no report.
type Policy = Box<dyn Fn(&ExportPlan) -> Option<(ExportState, String)> + Send>;

/// A test frontend: registered, answering every upserted plan by `policy`
/// and forwarding every event but `snapshot_end` to `events`. Dropping it
/// closes its session.
struct FakeFrontend {
    events: mpsc::UnboundedReceiver<FrontendEventKind>,
    up: mpsc::UnboundedSender<FrontendUp>,
    task: JoinHandle<()>,
}

impl Drop for FakeFrontend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeFrontend {
    async fn start(c: &Clients, name: &str, policy: Policy) -> FakeFrontend {
        let mut client = c.agents.clone();
        let mut session = FrontendSession::open(&mut client, name).await.unwrap();
        let up = session.sender();
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(Some(ev)) = session.down.message().await {
                let Some(ev) = ev.msg else { continue };
                if let FrontendEventKind::SnapshotEnd(_) = ev {
                    continue;
                }
                if let FrontendEventKind::Upsert(plan) = &ev {
                    if let Some((state, message)) = policy(plan) {
                        session.report(ExportStatus {
                            id: plan.export.as_ref().unwrap().id.clone(),
                            generation: plan.generation,
                            state: state as i32,
                            message,
                            size: 0,
                        });
                    }
                }
                let _ = tx.send(ev);
            }
        });
        FakeFrontend { events, up, task }
    }

    /// Sends a report on the session.
    fn report(&self, status: ExportStatus) {
        let _ = self.up.send(FrontendUp {
            msg: Some(Up::ExportStatus(status)),
        });
    }

    async fn next(&mut self) -> FrontendEventKind {
        within("frontend event", self.events.recv())
            .await
            .expect("fake frontend ended")
    }

    async fn next_upsert(&mut self) -> ExportPlan {
        match self.next().await {
            FrontendEventKind::Upsert(plan) => plan,
            other => panic!("expected upsert, got {other:?}"),
        }
    }
}

fn serving() -> Policy {
    Box::new(|_| Some((ExportState::Serving, String::new())))
}

fn silent() -> Policy {
    Box::new(|_| None)
}

async fn watch(c: &mut Clients) -> Streaming<Event> {
    c.stats
        .watch_events(WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The next event for which `pick` returns something, skipping others.
async fn wait_event<T>(s: &mut Streaming<Event>, mut pick: impl FnMut(&Kind) -> Option<T>) -> T {
    within("event", async {
        loop {
            let ev = s.message().await.unwrap().expect("event stream ended");
            if let Some(t) = ev.kind.as_ref().and_then(&mut pick) {
                return t;
            }
        }
    })
    .await
}

fn spec_of(plan: &ExportPlan, node: &str) -> NodeSpec {
    plan.nodes
        .iter()
        .find(|n| n.name == node)
        .cloned()
        .unwrap_or_else(|| panic!("node {node} not in plan"))
}

// ----- UpdateNode -----

#[tokio::test]
async fn update_node_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    let img2 = dir.path().join("b.img");
    std::fs::write(&img, vec![0u8; 1 << 16]).unwrap();
    std::fs::write(&img2, vec![0u8; 1 << 16]).unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, file("f", &img, false)).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, null("n2", 1 << 20)).await;
    add_node(&mut c, raw("r", "n", 0, 0)).await;
    add_node(&mut c, throttle("t", "r", 10, "g")).await;
    add_node(&mut c, faults("x", "n2")).await;
    add_export(&mut c, export("e", "f", true)).await.unwrap();

    assert_status(
        update(&mut c, null("nope", 512)).await,
        Code::NotFound,
        &["node.name", "\"nope\""],
    );
    assert_status(
        c.nodes
            .update_node(UpdateNodeRequest { node: None })
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        &["node: must be set"],
    );
    // Same validation as AddNode.
    assert_status(
        update(&mut c, null("n", 1000)).await,
        Code::InvalidArgument,
        &["node.null.size"],
    );
    // Fixed parts.
    assert_status(
        update(&mut c, null("f", 1 << 16)).await,
        Code::InvalidArgument,
        &["node.driver", "io_uring", "null"],
    );
    assert_status(
        update(&mut c, file("f", &img2, false)).await,
        Code::InvalidArgument,
        &["node.io_uring.path"],
    );
    assert_status(
        update(&mut c, raw("r", "n2", 0, 0)).await,
        Code::InvalidArgument,
        &["node.raw.child"],
    );
    assert_status(
        update(&mut c, raw("r", "n", 512, 0)).await,
        Code::InvalidArgument,
        &["node.raw.offset"],
    );
    assert_status(
        update(&mut c, throttle("t", "r", 10, "h")).await,
        Code::InvalidArgument,
        &["node.throttle.group"],
    );
    assert_status(
        update(&mut c, throttle("t", "r", 10, "")).await,
        Code::InvalidArgument,
        &["node.throttle.group"],
    );
    assert_status(
        update(&mut c, null("n", 2 << 20)).await,
        Code::InvalidArgument,
        &["node.null.size", "ResizeNode"],
    );
    // The new fault-injection knobs are validated.
    let mut x = faults("x", "n2");
    if let Some(Driver::FaultInjection(o)) = &mut x.driver {
        o.buf_alignment = 3;
    }
    assert_status(
        update(&mut c, x.clone()).await,
        Code::InvalidArgument,
        &["node.fault_injection.buf_alignment"],
    );
    if let Some(Driver::FaultInjection(o)) = &mut x.driver {
        o.buf_alignment = 0;
        o.max_transfer = 1000;
    }
    assert_status(
        update(&mut c, x).await,
        Code::InvalidArgument,
        &["node.fault_injection.max_transfer"],
    );
    // Read-only under a writable export.
    assert_status(
        update(&mut c, file("f", &img, true)).await,
        Code::FailedPrecondition,
        &["node.io_uring.read_only", "\"e\""],
    );
    // Nothing changed by any of it.
    assert_eq!(
        get_node(&mut c, "f").await.spec.unwrap(),
        file("f", &img, false)
    );
    assert_eq!(list_exports(&mut c).await.len(), 1);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn update_bumps_generation_and_pushes_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, faults("x", "n")).await;
    add_node(&mut c, null("other", 1 << 20)).await;
    add_export(&mut c, export("o", "other", false))
        .await
        .unwrap();
    let mut fe = FakeFrontend::start(&c, "fe0", serving()).await;
    assert_eq!(fe.next_upsert().await.generation, 1, "snapshot");

    let info = add_export(&mut c, export("e", "x", true)).await.unwrap();
    assert_eq!(info.state, ExportState::Serving as i32, "{info:?}");
    assert_eq!(info.message, "");
    let plan = fe.next_upsert().await;
    assert_eq!(plan.generation, 1);

    // A null node's latency: the export over it gets generation 2.
    let mut n = null("n", 1 << 20);
    if let Some(Driver::Null(o)) = &mut n.driver {
        o.latency_ns = 50_000;
    }
    let got = update(&mut c, n.clone()).await.unwrap();
    assert_eq!(got.spec.as_ref().unwrap(), &n);
    assert_eq!(got.used_by, ["x"]);
    let plan = fe.next_upsert().await;
    assert_eq!(plan.export.as_ref().unwrap().id, "e");
    assert_eq!(plan.generation, 2);
    assert_eq!(spec_of(&plan, "n"), n);
    let changes = wait_event(&mut events, |k| match k {
        Kind::NodeUpdated(u) if u.node == "n" => Some(u.changes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(changes, ["latency"]);

    // Fault rules and the new knobs.
    let mut x = faults("x", "n");
    if let Some(Driver::FaultInjection(o)) = &mut x.driver {
        o.max_transfer = 64 << 10;
        o.max_segments = 2;
        o.buf_alignment = 4096;
        o.rules = vec![FaultRule {
            action: Some(fault_rule::Action::Errno(5)),
            ..Default::default()
        }];
    }
    update(&mut c, x.clone()).await.unwrap();
    let plan = fe.next_upsert().await;
    assert_eq!(plan.generation, 3);
    assert_eq!(spec_of(&plan, "x"), x);
    let changes = wait_event(&mut events, |k| match k {
        Kind::NodeUpdated(u) if u.node == "x" => Some(u.changes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        changes,
        [
            "fault rules",
            "max transfer",
            "max segments",
            "buf alignment"
        ]
    );

    // The same spec again changes nothing: no push, no new generation.
    update(&mut c, x).await.unwrap();
    assert_eq!(export_state(&mut c, "e").await.0, ExportState::Serving);
    // Only "e" was pushed: the next event is the one for a new export.
    add_export(&mut c, export("e2", "n2-missing", false))
        .await
        .unwrap_err();
    add_node(&mut c, null("n2", 4096)).await;
    add_export(&mut c, export("e2", "n2", false)).await.unwrap();
    let plan = fe.next_upsert().await;
    assert_eq!(plan.export.as_ref().unwrap().id, "e2");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn update_of_read_only_and_direct_flags() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 16]).unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, file("f", &img, false)).await;
    add_export(&mut c, export("e", "f", false)).await.unwrap();
    // A read-only export over it: the node may become read-only.
    let mut f = file("f", &img, true);
    if let Some(Driver::IoUring(o)) = &mut f.driver {
        o.direct = true;
    }
    let got = update(&mut c, f).await.unwrap();
    assert!(got.read_only);
    let changes = wait_event(&mut events, |k| match k {
        Kind::NodeUpdated(u) => Some(u.changes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(changes, ["read-only on", "direct on"]);
    // Now a writable export over it is refused as before.
    c.exports
        .remove_export(RemoveExportRequest { id: "e".into() })
        .await
        .unwrap();
    assert_status(
        add_export(&mut c, export("e", "f", true)).await,
        Code::FailedPrecondition,
        &["export.writable"],
    );
    let got = update(&mut c, file("f", &img, false)).await.unwrap();
    assert!(!got.read_only);
    let changes = wait_event(&mut events, |k| match k {
        Kind::NodeUpdated(u) => Some(u.changes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(changes, ["read-only off", "direct off"]);
    add_export(&mut c, export("e", "f", true)).await.unwrap();
    m.stop().await.unwrap();
}

#[tokio::test]
async fn update_of_a_grouped_throttle_updates_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("a", 1 << 20)).await;
    add_node(&mut c, null("b", 1 << 20)).await;
    add_node(&mut c, null("c", 1 << 20)).await;
    add_node(&mut c, throttle("ta", "a", 100, "g")).await;
    add_node(&mut c, throttle("tb", "b", 100, "g")).await;
    add_node(&mut c, throttle("tc", "c", 100, "")).await;
    add_export(&mut c, export("eb", "tb", false)).await.unwrap();
    let mut fe = FakeFrontend::start(&c, "fe0", serving()).await;
    assert_eq!(fe.next_upsert().await.generation, 1);

    update(&mut c, throttle("ta", "a", 500, "g")).await.unwrap();
    for name in ["ta", "tb"] {
        let spec = get_node(&mut c, name).await.spec.unwrap();
        assert_eq!(spec, throttle(name, &name[1..], 500, "g"), "{name}");
    }
    // The export over the other member was reopened.
    let plan = fe.next_upsert().await;
    assert_eq!(plan.export.as_ref().unwrap().id, "eb");
    assert_eq!(plan.generation, 2);
    assert_eq!(spec_of(&plan, "tb"), throttle("tb", "b", 500, "g"));
    // Ungrouped throttles are independent.
    update(&mut c, throttle("tc", "c", 7, "")).await.unwrap();
    assert_eq!(
        get_node(&mut c, "tb").await.spec.unwrap(),
        throttle("tb", "b", 500, "g")
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn failed_update_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, throttle("t", "n", 100, "")).await;
    // Generation 2 (the update) fails, everything else serves.
    let policy: Policy = Box::new(|plan| {
        if plan.generation == 2 {
            Some((ExportState::Failed, "worker w0: cannot open: EBUSY".into()))
        } else {
            Some((ExportState::Serving, String::new()))
        }
    });
    let mut fe = FakeFrontend::start(&c, "fe0", policy).await;
    let info = add_export(&mut c, export("e", "t", true)).await.unwrap();
    assert_eq!(info.state, ExportState::Serving as i32);
    fe.next_upsert().await;

    assert_status(
        update(&mut c, throttle("t", "n", 5, "")).await,
        Code::FailedPrecondition,
        &["\"e\"", "cannot open: EBUSY", "rolled back"],
    );
    // Pushed: the update, then the restored spec at a newer generation.
    let plan = fe.next_upsert().await;
    assert_eq!(
        (plan.generation, spec_of(&plan, "t")),
        (2, throttle("t", "n", 5, ""))
    );
    let plan = fe.next_upsert().await;
    assert_eq!(
        (plan.generation, spec_of(&plan, "t")),
        (3, throttle("t", "n", 100, ""))
    );
    assert_eq!(
        get_node(&mut c, "t").await.spec.unwrap(),
        throttle("t", "n", 100, "")
    );
    within("serving again", async {
        while export_state(&mut c, "e").await.0 != ExportState::Serving {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let changes = wait_event(&mut events, |k| match k {
        Kind::NodeUpdated(u) if u.changes == ["rolled back"] => Some(u.node.clone()),
        _ => None,
    })
    .await;
    assert_eq!(changes, "t");
    // The rollback is persisted.
    drop(fe);
    drop(c);
    m.stop().await.unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    assert_eq!(
        get_node(&mut c, "t").await.spec.unwrap(),
        throttle("t", "n", 100, "")
    );
    let mut fe = FakeFrontend::start(&c, "fe0", silent()).await;
    assert_eq!(fe.next_upsert().await.generation, 3);
    m.stop().await.unwrap();
}

// ----- ResizeNode -----

#[tokio::test]
async fn resize_grows_a_file_and_refuses_shrinking() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, vec![0u8; 1 << 20]).unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, file("f", &img, false)).await;
    add_node(&mut c, file("ro", &ro, true)).await;
    add_node(
        &mut c,
        NodeSpec {
            name: "nv".into(),
            driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions {
                path: "/dev/null".into(),
                read_only: false,
            })),
        },
    )
    .await;
    add_export(&mut c, export("e", "f", true)).await.unwrap();
    let mut fe = FakeFrontend::start(&c, "fe0", serving()).await;
    assert_eq!(fe.next_upsert().await.generation, 1);

    let got = resize(&mut c, "f", 4 << 20).await.unwrap();
    assert_eq!(got.size, 4 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
    let plan = fe.next_upsert().await;
    assert_eq!(plan.generation, 2);
    let ev = wait_event(&mut events, |k| match k {
        Kind::NodeResized(r) => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        ev,
        NodeResizedEvent {
            node: "f".into(),
            old_size: 1 << 20,
            new_size: 4 << 20
        }
    );
    assert_eq!(
        list_exports(&mut c).await[0].size,
        4 << 20,
        "export size follows"
    );

    // Same size: nothing to do, no new generation.
    assert_eq!(resize(&mut c, "f", 4 << 20).await.unwrap().size, 4 << 20);
    assert_status(
        resize(&mut c, "f", 2 << 20).await,
        Code::FailedPrecondition,
        &["size", "only grow"],
    );
    assert_status(
        resize(&mut c, "f", (8 << 20) + 100).await,
        Code::InvalidArgument,
        &["size", "multiple of 512"],
    );
    assert_status(
        resize(&mut c, "nope", 8 << 20).await,
        Code::NotFound,
        &["\"nope\""],
    );
    assert_status(
        resize(&mut c, "nv", 8 << 20).await,
        Code::FailedPrecondition,
        &["cannot grow"],
    );
    assert_status(
        resize(&mut c, "ro", 8 << 20).await,
        Code::FailedPrecondition,
        &["read-only"],
    );
    assert_eq!(std::fs::metadata(&ro).unwrap().len(), 1 << 20);
    // The next push is for a new export, not a repeat for "e".
    add_node(&mut c, null("n2", 4096)).await;
    add_export(&mut c, export("e2", "n2", false)).await.unwrap();
    assert_eq!(
        fe.next_upsert().await.export.unwrap().id,
        "e2",
        "no-op and refused resizes push nothing"
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn resize_recurses_through_raw_windows_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    // file ← raw(offset 4k, to the end) ← throttle ← fault injection
    add_node(&mut c, file("f", &img, false)).await;
    add_node(&mut c, raw("r", "f", 4096, 0)).await;
    add_node(&mut c, throttle("t", "r", 100, "")).await;
    add_node(&mut c, faults("x", "t")).await;
    add_export(&mut c, export("e", "x", true)).await.unwrap();
    let got = resize(&mut c, "x", 2 << 20).await.unwrap();
    assert_eq!(got.size, 2 << 20);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        (2 << 20) + 4096,
        "the file grows to offset + size"
    );
    for (name, size) in [("f", (2 << 20) + 4096), ("r", 2 << 20), ("t", 2 << 20)] {
        assert_eq!(get_node(&mut c, name).await.size, size, "{name}");
    }

    // null ← raw(offset 512, explicit 4k) ← throttle: the window grows,
    // within the child only.
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, raw("w", "n", 512, 4096)).await;
    add_node(&mut c, throttle("tw", "w", 100, "")).await;
    let got = resize(&mut c, "tw", 8192).await.unwrap();
    assert_eq!(got.size, 8192);
    assert_eq!(
        get_node(&mut c, "w").await.spec.unwrap(),
        raw("w", "n", 512, 8192)
    );
    assert_eq!(get_node(&mut c, "n").await.size, 1 << 20, "child untouched");
    assert_status(
        resize(&mut c, "tw", 1 << 20).await,
        Code::FailedPrecondition,
        &["does not fit", "\"n\""],
    );
    // Growing the null child first makes room.
    let got = resize(&mut c, "n", 2 << 20).await.unwrap();
    assert_eq!(got.spec.unwrap(), null("n", 2 << 20));
    assert_eq!(resize(&mut c, "tw", 1 << 20).await.unwrap().size, 1 << 20);

    // Generations and sizes survive a restart.
    let before = list_exports(&mut c).await;
    drop(c);
    m.stop().await.unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let after = list_exports(&mut c).await;
    assert_eq!(after[0].size, before[0].size);
    assert_eq!(get_node(&mut c, "w").await.size, 1 << 20);
    let mut fe = FakeFrontend::start(&c, "fe0", silent()).await;
    assert_eq!(fe.next_upsert().await.generation, 2);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn failed_resize_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, raw("r", "n", 0, 0)).await;
    let policy: Policy = Box::new(|plan| {
        if plan.generation == 2 {
            Some((ExportState::Failed, "size mismatch".into()))
        } else {
            Some((ExportState::Serving, String::new()))
        }
    });
    let mut fe = FakeFrontend::start(&c, "fe0", policy).await;
    add_export(&mut c, export("e", "r", false)).await.unwrap();
    fe.next_upsert().await;
    assert_status(
        resize(&mut c, "r", 2 << 20).await,
        Code::FailedPrecondition,
        &["\"e\"", "size mismatch", "rolled back"],
    );
    assert_eq!(
        get_node(&mut c, "n").await.spec.unwrap(),
        null("n", 1 << 20)
    );
    assert_eq!(get_node(&mut c, "r").await.size, 1 << 20);
    assert_eq!(fe.next_upsert().await.generation, 2);
    let plan = fe.next_upsert().await;
    assert_eq!(
        (plan.generation, spec_of(&plan, "n")),
        (3, null("n", 1 << 20))
    );
    m.stop().await.unwrap();
}

// ----- export states, export statuses, AddExport waiting -----

#[tokio::test]
async fn add_export_without_frontend_is_pending_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_secs(30)).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    let t = Instant::now();
    let info = add_export(&mut c, export("e", "n", false)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(info.state, ExportState::Pending as i32);
    assert_eq!(info.message, "no frontend connected");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn add_export_returns_serving_and_frontend_loss_makes_it_pending() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_secs(30)).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    let fe = FakeFrontend::start(&c, "fe0", serving()).await;
    let t = Instant::now();
    let info = add_export(&mut c, export("e", "n", false)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "did not wait the timeout out"
    );
    assert_eq!(info.state, ExportState::Serving as i32, "{info:?}");
    assert_eq!(export_state(&mut c, "e").await.0, ExportState::Serving);
    let ev = wait_event(&mut events, |k| match k {
        Kind::ExportState(s) => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (ev.export.as_str(), ev.state),
        ("e", ExportState::Serving as i32)
    );

    drop(fe);
    let ev = wait_event(&mut events, |k| match k {
        Kind::ExportState(s) => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (ev.export.as_str(), ev.state),
        ("e", ExportState::Pending as i32)
    );
    assert_eq!(
        export_state(&mut c, "e").await,
        (ExportState::Pending, "no frontend connected".into())
    );
    // A frontend back, not reporting yet: still pending.
    let _fe = FakeFrontend::start(&c, "fe0", silent()).await;
    let (state, message) = export_state(&mut c, "e").await;
    assert_eq!(state, ExportState::Pending);
    assert!(message.contains("generation 1"), "{message}");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn add_export_fails_and_is_removed_when_the_frontend_fails() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_secs(30)).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    let policy: Policy = Box::new(|_| {
        Some((
            ExportState::Failed,
            "worker w0: cannot open /nope: No such file".into(),
        ))
    });
    let mut fe = FakeFrontend::start(&c, "fe0", policy).await;
    assert_status(
        add_export(&mut c, export("e", "n", false)).await,
        Code::FailedPrecondition,
        &["\"e\"", "cannot open /nope: No such file", "removed"],
    );
    assert!(list_exports(&mut c).await.is_empty());
    assert!(get_node(&mut c, "n").await.used_by.is_empty());
    fe.next_upsert().await;
    match fe.next().await {
        FrontendEventKind::Remove(id) => assert_eq!(id, "e"),
        other => panic!("expected remove, got {other:?}"),
    }
    let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(!text.contains("\"e\""), "{text}");
    let ev = wait_event(&mut events, |k| match k {
        Kind::ExportState(s) => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(ev.state, ExportState::Failed as i32);
    assert!(ev.message.contains("No such file"), "{ev:?}");
    wait_event(&mut events, |k| match k {
        Kind::ExportRemoved(id) if id == "e" => Some(()),
        _ => None,
    })
    .await;
    // The id is free again.
    drop(fe);
    let _fe = FakeFrontend::start(&c, "fe1", serving()).await;
    let info = add_export(&mut c, export("e", "n", false)).await.unwrap();
    assert_eq!(info.state, ExportState::Serving as i32);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn add_export_pending_report_or_timeout_returns_pending() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(300)).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, null("n2", 1 << 20)).await;
    let policy: Policy = Box::new(|plan| {
        (plan.export.as_ref().unwrap().id == "e")
            .then(|| (ExportState::Pending, "worker w0 not reachable yet".into()))
    });
    let _fe = FakeFrontend::start(&c, "fe0", policy).await;
    let info = add_export(&mut c, export("e", "n", false)).await.unwrap();
    assert_eq!(info.state, ExportState::Pending as i32);
    assert_eq!(info.message, "worker w0 not reachable yet");
    // No report at all: the call returns after the apply timeout.
    let info = add_export(&mut c, export("e2", "n2", false)).await.unwrap();
    assert_eq!(info.state, ExportState::Pending as i32);
    assert!(info.message.contains("300 ms"), "{info:?}");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn report_export_ignores_unknown_and_stale_reports() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(300)).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    let fe = FakeFrontend::start(&c, "fe0", silent()).await;
    add_export(&mut c, export("e", "n", false)).await.unwrap();
    let status = |id: &str, generation: u64, state: ExportState| ExportStatus {
        id: id.into(),
        generation,
        state: state as i32,
        message: String::new(),
        size: 1 << 20,
    };
    // Unknown export, another generation: ignored.
    fe.report(status("nope", 1, ExportState::Serving));
    fe.report(status("e", 7, ExportState::Serving));
    assert_eq!(export_state(&mut c, "e").await.0, ExportState::Pending);
    // The current generation counts (after those: the session went on);
    // a long message is cut.
    let mut failed = status("e", 1, ExportState::Failed);
    failed.message = "x".repeat(5000);
    fe.report(failed);
    let cut = format!("{}…", "x".repeat(1024));
    wait_export_state(&mut c, "e", ExportState::Failed, &cut).await;
    fe.report(status("e", 1, ExportState::Serving));
    wait_export_state(&mut c, "e", ExportState::Serving, "").await;
    // Bad fields end the session that sent them.
    let mut bad = status("e", 1, ExportState::Serving);
    bad.state = 42;
    for (name, st) in [
        ("fe1", status("e", 1, ExportState::Unspecified)),
        ("fe2", bad),
    ] {
        let other = FrontendSession::open(&mut c.agents, name).await.unwrap();
        other.report(st);
        assert_status(other.finish().await, Code::InvalidArgument, &["state"]);
    }
    m.stop().await.unwrap();
}

/// VMM_REFUSED: the frontend serves the export but refused its VMM. The
/// state and reason show in ExportInfo, an event and ListFrontends; the
/// export still counts as applied (AddExport does not roll it back) and a
/// later SERVING report ends it.
#[tokio::test]
async fn a_refused_vmm_shows_and_the_export_stays() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(300)).await;
    let mut c = connect(&m).await;
    let mut events = watch(&mut c).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    let fe = FakeFrontend::start(&c, "fe0", silent()).await;
    add_export(&mut c, export("e", "n", false)).await.unwrap();
    let status = |state: ExportState, message: &str| ExportStatus {
        id: "e".into(),
        generation: 1,
        state: state as i32,
        message: message.into(),
        size: 1 << 20,
    };
    let why = "host-managed zoned export refused: the driver did not accept VIRTIO_BLK_F_ZONED";
    fe.report(status(ExportState::VmmRefused, why));
    wait_export_state(&mut c, "e", ExportState::VmmRefused, why).await;
    let ev = wait_event(&mut events, |k| match k {
        Kind::ExportState(s) if s.state == ExportState::VmmRefused as i32 => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!((ev.export.as_str(), ev.message.as_str()), ("e", why));
    let list = list_frontends(&mut c).await;
    assert_eq!(list[0].vmm_refused, ["e"], "{list:?}");
    assert!(list[0].failed.is_empty() && list[0].serving.is_empty());

    fe.report(status(ExportState::Serving, ""));
    wait_export_state(&mut c, "e", ExportState::Serving, "").await;
    let ev = wait_event(&mut events, |k| match k {
        Kind::ExportState(s) if s.export == "e" => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(ev.state, ExportState::Serving as i32);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn generation_persists_so_a_restart_does_not_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), Duration::from_millis(300)).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    add_node(&mut c, faults("x", "n")).await;
    add_export(&mut c, export("e", "x", false)).await.unwrap();
    let mut x = faults("x", "n");
    if let Some(Driver::FaultInjection(o)) = &mut x.driver {
        o.max_transfer = 128 << 10;
        o.max_segments = 8;
        o.buf_alignment = 512;
    }
    update(&mut c, x.clone()).await.unwrap();
    let mut n = null("n", 1 << 20);
    if let Some(Driver::Null(o)) = &mut n.driver {
        o.latency_ns = 1000;
    }
    update(&mut c, n).await.unwrap();
    drop(c);
    m.stop().await.unwrap();
    let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(text.contains("\"generation\": 3"), "{text}");
    assert!(text.contains("\"max_transfer\": \"131072\""), "{text}");

    let m = start(dir.path(), Duration::from_millis(300)).await;
    let mut c = connect(&m).await;
    assert_eq!(get_node(&mut c, "x").await.spec.unwrap(), x);
    let mut fe = FakeFrontend::start(&c, "fe0", silent()).await;
    let plan = fe.next_upsert().await;
    assert_eq!(
        plan.generation, 3,
        "the snapshot carries the persisted generation"
    );
    assert_eq!(spec_of(&plan, "x"), x);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn add_node_checks_fault_injection_knobs() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    add_node(&mut c, null("n", 1 << 20)).await;
    for (mt, align, field) in [
        (1000, 0, "node.fault_injection.max_transfer"),
        (0, 8192, "node.fault_injection.buf_alignment"),
        (0, 48, "node.fault_injection.buf_alignment"),
    ] {
        let mut x = faults("x", "n");
        if let Some(Driver::FaultInjection(o)) = &mut x.driver {
            o.max_transfer = mt;
            o.buf_alignment = align;
        }
        let r = c
            .nodes
            .add_node(AddNodeRequest {
                node: Some(x),
                ..Default::default()
            })
            .await;
        assert_status(r.map(|_| ()), Code::InvalidArgument, &[field]);
    }
    let mut x = faults("x", "n");
    if let Some(Driver::FaultInjection(o)) = &mut x.driver {
        o.max_transfer = 4096;
        o.max_segments = 1;
        o.buf_alignment = 4096;
    }
    assert_eq!(add_node(&mut c, x.clone()).await.spec.unwrap(), x);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn device_export_size_comes_from_the_serving_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c).await;
    add_node(
        &mut c,
        NodeSpec {
            name: "vu".into(),
            driver: Some(Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                path: sock.to_str().unwrap().into(),
                read_only: false,
            })),
        },
    )
    .await;
    let info = add_export(&mut c, export("e", "vu", false)).await.unwrap();
    assert_eq!(info.size, 0, "unknown until a frontend serves it");
    let fe = FakeFrontend::start(&c, "fe0", silent()).await;
    fe.report(ExportStatus {
        id: "e".into(),
        generation: 1,
        state: ExportState::Serving as i32,
        message: String::new(),
        size: 8 << 20,
    });
    wait_export_state(&mut c, "e", ExportState::Serving, "").await;
    let e = &list_exports(&mut c).await[0];
    assert_eq!((e.state, e.size), (ExportState::Serving as i32, 8 << 20));
    assert_status(
        resize(&mut c, "vu", 16 << 20).await,
        Code::FailedPrecondition,
        &["cannot grow"],
    );
    m.stop().await.unwrap();
}

async fn list_frontends(c: &mut Clients) -> Vec<FrontendInfo> {
    c.frontends
        .list_frontends(ListFrontendsRequest {})
        .await
        .unwrap()
        .into_inner()
        .frontends
}

/// Polls ListFrontends until `pick` is satisfied (reports arrive after the
/// upserts the fake frontend sees).
async fn wait_frontends(
    c: &mut Clients,
    pick: impl Fn(&[FrontendInfo]) -> bool,
) -> Vec<FrontendInfo> {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = list_frontends(c).await;
        if pick(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "ListFrontends never matched: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn list_frontends_shows_who_serves_what() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), APPLY).await;
    let mut c = connect(&m).await;
    assert!(list_frontends(&mut c).await.is_empty(), "none seen yet");
    let _w = register_worker(&mut c).await;
    add_node(&mut c, null("a", 1 << 20)).await;
    add_node(&mut c, null("b", 1 << 20)).await;
    add_node(&mut c, null("c", 1 << 20)).await;
    // fe0 serves "a" and fails "b"; fe1 answers nothing.
    let fe0 = FakeFrontend::start(
        &c,
        "fe0",
        Box::new(|plan| {
            let state = match plan.export.as_ref().unwrap().id.as_str() {
                "b" => ExportState::Failed,
                _ => ExportState::Serving,
            };
            Some((state, String::new()))
        }),
    )
    .await;
    let fe1 = FakeFrontend::start(&c, "fe1", silent()).await;
    add_export(&mut c, export("a", "a", true)).await.unwrap();
    add_export(&mut c, export("b", "b", true))
        .await
        .unwrap_err();
    let list = wait_frontends(&mut c, |l| l.len() == 2 && !l[0].serving.is_empty()).await;
    assert_eq!(
        list,
        [
            FrontendInfo {
                name: "fe0".into(),
                connected: true,
                serving: vec!["a".into()],
                ..Default::default()
            },
            FrontendInfo {
                name: "fe1".into(),
                connected: true,
                ..Default::default()
            },
        ]
    );
    // A failed AddExport removed "b": nothing reports on it any more.
    assert!(list[0].failed.is_empty());

    // Gone frontends stay listed as disconnected, with nothing served.
    drop(fe0);
    let list = wait_frontends(&mut c, |l| !l[0].connected).await;
    assert_eq!(list[0].name, "fe0");
    assert!(list[0].serving.is_empty(), "{list:?}");
    assert!(list[1].connected, "{list:?}");
    // A frontend that cannot open the export it is handed at registration
    // reports it FAILED, and is listed so.
    let _fe2 = FakeFrontend::start(
        &c,
        "fe2",
        Box::new(|_| Some((ExportState::Failed, "no such file".into()))),
    )
    .await;
    let list = wait_frontends(&mut c, |l| l.len() == 3 && !l[2].failed.is_empty()).await;
    assert_eq!(list[2].failed, ["a"], "{list:?}");
    assert!(list[2].serving.is_empty() && list[2].pending.is_empty());
    drop(fe1);
    m.stop().await.unwrap();
}
