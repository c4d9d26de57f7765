//! In-process tests: a real manager on 127.0.0.1:0 driven by real tonic clients.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::time::Duration;

use blkmesh_manager::{Manager, ManagerConfig, ManagerError, RunningManager, STATE_FILE};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendEventKind;
use blkmesh_proto::agent::v1::WorkerHello;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::*;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::agent::{FrontendSession, WorkerSession};
use common::client::{add_export, connect, file, get_node, null, raw, within, Clients};

/// How long calls wait for a frontend's report in most tests: the stand-in
/// frontends of the older tests never report.
const APPLY_TIMEOUT: Duration = Duration::from_millis(300);

async fn start(dir: &Path) -> RunningManager {
    start_with(dir, APPLY_TIMEOUT).await
}

async fn start_with(dir: &Path, apply_timeout: Duration) -> RunningManager {
    let config = ManagerConfig::new(dir.to_path_buf())
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_apply_timeout(apply_timeout);
    Manager::bind(config).await.unwrap().spawn()
}

fn export(id: &str, node: &str, socket: &str) -> VhostUserBlkExport {
    VhostUserBlkExport {
        id: id.into(),
        node: node.into(),
        socket: socket.into(),
        ..Default::default()
    }
}

async fn add_node(c: &mut Clients, spec: NodeSpec) -> Result<NodeInfo, tonic::Status> {
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(spec),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().node.unwrap())
}

async fn register_worker(c: &mut Clients, name: &str, socket: &str) -> WorkerSession {
    WorkerSession::open(
        &mut c.agents,
        WorkerHello {
            name: name.into(),
            socket: socket.into(),
            pid: 1234,
        },
    )
    .await
    .unwrap()
}

async fn workers(c: &mut Clients) -> Vec<WorkerInfo> {
    c.workers
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
}

async fn wait_worker_state(c: &mut Clients, name: &str, state: WorkerState) {
    within("worker state", async {
        loop {
            let ws = workers(c).await;
            if ws.iter().any(|w| w.name == name && w.state == state as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn next_event(s: &mut FrontendSession) -> FrontendEventKind {
    s.next().await
}

fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{:?} does not contain {needle:?}",
                s.message()
            );
        }
    }
}

#[tokio::test]
async fn add_list_get_remove_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8192 + 100]).unwrap();
    let m = start(&dir.path().join("state")).await;
    let mut c = connect(&m).await;

    let n = add_node(&mut c, null("n0", 1 << 20)).await.unwrap();
    assert_eq!(n.size, 1 << 20);
    assert!(!n.read_only);
    let f = add_node(&mut c, file("f0", &img, true)).await.unwrap();
    assert_eq!(f.size, 8192, "file size is rounded down to sectors");
    assert!(f.read_only);
    let r = add_node(&mut c, raw("r0", "f0", 1024, 0)).await.unwrap();
    assert_eq!(r.size, 8192 - 1024);
    assert!(r.read_only, "read-only is inherited from the child");

    let list = c
        .nodes
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let names: Vec<_> = list
        .iter()
        .map(|n| n.spec.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["f0", "n0", "r0"]);

    let got = c
        .nodes
        .get_node(GetNodeRequest { name: "f0".into() })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert_eq!(got.used_by, ["r0"]);

    c.nodes
        .remove_node(RemoveNodeRequest { name: "r0".into() })
        .await
        .unwrap();
    c.nodes
        .remove_node(RemoveNodeRequest { name: "f0".into() })
        .await
        .unwrap();
    let left = c
        .nodes
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(left.len(), 1);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn node_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();

    assert_status(
        add_node(&mut c, null("n0", 4096)).await,
        Code::AlreadyExists,
        "node.name",
    );
    assert_status(
        add_node(&mut c, raw("r0", "missing", 0, 0)).await,
        Code::NotFound,
        "node.raw.child: node \"missing\" not found",
    );
    assert_status(
        add_node(&mut c, null("n1", 1000)).await,
        Code::InvalidArgument,
        "node.null.size: must be a non-zero multiple of 512 (got 1000)",
    );
    assert_status(
        add_node(&mut c, file("f0", Path::new("rel.img"), false)).await,
        Code::InvalidArgument,
        "node.io_uring.path: must be an absolute path",
    );
    assert_status(
        add_node(&mut c, file("f0", &dir.path().join("nope.img"), false)).await,
        Code::InvalidArgument,
        "node.io_uring.path: cannot stat",
    );
    assert_status(
        add_node(&mut c, file("f0", dir.path(), false)).await,
        Code::InvalidArgument,
        "is a directory",
    );
    assert_status(
        add_node(&mut c, raw("r0", "n0", 0, 8192)).await,
        Code::InvalidArgument,
        "node.raw.size",
    );
    assert_status(
        add_node(
            &mut c,
            NodeSpec {
                name: "x".into(),
                driver: None,
            },
        )
        .await,
        Code::InvalidArgument,
        "node.driver",
    );
    assert_status(
        c.nodes
            .add_node(AddNodeRequest {
                node: None,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "node: must be set",
    );

    add_node(&mut c, raw("r0", "n0", 0, 0)).await.unwrap();
    assert_status(
        add_node(&mut c, raw("r1", "n0", 0, 0)).await,
        Code::FailedPrecondition,
        "already the child of node \"r0\"",
    );
    assert_status(
        c.nodes
            .remove_node(RemoveNodeRequest { name: "n0".into() })
            .await,
        Code::FailedPrecondition,
        "node \"n0\" is in use by node \"r0\"",
    );
    assert_status(
        c.nodes
            .remove_node(RemoveNodeRequest { name: "zz".into() })
            .await,
        Code::NotFound,
        "zz",
    );
    assert_status(
        c.nodes.get_node(GetNodeRequest { name: "zz".into() }).await,
        Code::NotFound,
        "zz",
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn export_without_live_worker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    assert_status(
        add_export(&mut c, export("e0", "n0", "/tmp/e0.sock")).await,
        Code::FailedPrecondition,
        "no live worker registered; start blkmesh-worker",
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn export_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let m = start(&dir.path().join("state")).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c, "w0", "/tmp/w0.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    add_node(&mut c, null("n1", 4096)).await.unwrap();
    add_node(&mut c, file("ro", &img, true)).await.unwrap();
    add_node(&mut c, raw("over-ro", "ro", 0, 0)).await.unwrap();

    let mut writable = export("e-ro", "over-ro", "/tmp/ro.sock");
    writable.writable = true;
    assert_status(
        add_export(&mut c, writable).await,
        Code::FailedPrecondition,
        "export.writable: node \"over-ro\" is read-only",
    );
    // Read-only exports of read-only nodes are fine.
    add_export(&mut c, export("e-ro", "over-ro", "/tmp/ro.sock"))
        .await
        .unwrap();

    let info = add_export(&mut c, export("e0", "n0", "/tmp/e0.sock"))
        .await
        .unwrap();
    assert_eq!(info.size, 4096);
    assert_status(
        add_export(&mut c, export("e0", "n1", "/tmp/other.sock")).await,
        Code::AlreadyExists,
        "export.id",
    );
    assert_status(
        add_export(&mut c, export("e1", "n1", "/tmp/e0.sock")).await,
        Code::AlreadyExists,
        "export.socket",
    );
    assert_status(
        add_export(&mut c, export("e1", "nope", "/tmp/e1.sock")).await,
        Code::NotFound,
        "export.node",
    );
    assert_status(
        add_export(&mut c, export("e1", "n0", "/tmp/e1.sock")).await,
        Code::FailedPrecondition,
        "already exported by export \"e0\"",
    );
    let mut bad = export("e1", "n1", "/tmp/e1.sock");
    bad.queue_size = 100;
    assert_status(
        add_export(&mut c, bad).await,
        Code::InvalidArgument,
        "export.queue_size",
    );
    assert_status(
        c.nodes
            .remove_node(RemoveNodeRequest { name: "n0".into() })
            .await,
        Code::FailedPrecondition,
        "in use by export \"e0\"",
    );
    assert_status(
        c.exports
            .remove_export(RemoveExportRequest { id: "zz".into() })
            .await,
        Code::NotFound,
        "zz",
    );
    c.exports
        .remove_export(RemoveExportRequest { id: "e0".into() })
        .await
        .unwrap();
    c.nodes
        .remove_node(RemoveNodeRequest { name: "n0".into() })
        .await
        .unwrap();
    m.stop().await.unwrap();
}

#[tokio::test]
async fn worker_alive_then_gone_then_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;

    let stream = register_worker(&mut c, "w0", "/tmp/w0.sock").await;
    wait_worker_state(&mut c, "w0", WorkerState::Alive).await;
    let dup = WorkerSession::open(
        &mut c.agents,
        WorkerHello {
            name: "w0".into(),
            socket: "/tmp/w0.sock".into(),
            pid: 1,
        },
    )
    .await;
    assert_status(dup.map(|_| ()), Code::AlreadyExists, "w0");

    add_node(&mut c, null("n0", 4096)).await.unwrap();
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 3;
    let info = add_export(&mut c, e).await.unwrap();
    assert_eq!(info.queues.len(), 3);
    assert!(info.queues.iter().all(|q| q.worker == "w0"));

    drop(stream);
    wait_worker_state(&mut c, "w0", WorkerState::Gone).await;

    let _again = register_worker(&mut c, "w0", "/tmp/w0.sock").await;
    wait_worker_state(&mut c, "w0", WorkerState::Alive).await;
    let w = workers(&mut c).await;
    assert_eq!(
        w[0].queues,
        ["e0/0", "e0/1", "e0/2"],
        "assignments are kept"
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn export_goes_to_least_loaded_worker() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    for i in 0..3 {
        add_node(&mut c, null(&format!("n{i}"), 4096))
            .await
            .unwrap();
    }
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 2;
    let e0 = add_export(&mut c, e).await.unwrap();
    assert!(
        e0.queues.iter().all(|q| q.worker == "wa"),
        "tie → name order"
    );
    let e1 = add_export(&mut c, export("e1", "n1", "/tmp/e1.sock"))
        .await
        .unwrap();
    assert_eq!(e1.queues[0].worker, "wb");
    let e2 = add_export(&mut c, export("e2", "n2", "/tmp/e2.sock"))
        .await
        .unwrap();
    assert_eq!(e2.queues[0].worker, "wb", "wb has 1 queue, wa has 2");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn frontend_gets_snapshot_then_changes() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0", "/tmp/w0.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    add_node(&mut c, raw("r0", "n0", 512, 0)).await.unwrap();
    add_node(&mut c, null("n1", 4096)).await.unwrap();
    add_export(&mut c, export("e0", "r0", "/tmp/e0.sock"))
        .await
        .unwrap();

    let mut fe = FrontendSession::open(&mut c.agents, "fe0").await.unwrap();
    match fe.message().await.unwrap().unwrap() {
        FrontendEventKind::Upsert(plan) => {
            let e = plan.export.unwrap();
            assert_eq!(e.id, "e0");
            assert_eq!(e.queue_size, 256, "plans carry the normalized export");
            let names: Vec<_> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
            assert_eq!(names, ["r0", "n0"]);
            assert_eq!(plan.queues.len(), 1);
            assert_eq!(plan.queues[0].worker, "w0");
            assert_eq!(plan.queues[0].worker_socket, "/tmp/w0.sock");
        }
        other => panic!("expected upsert, got {other:?}"),
    }
    // The snapshot ends explicitly.
    assert!(matches!(
        fe.message().await.unwrap().unwrap(),
        FrontendEventKind::SnapshotEnd(_)
    ));

    let dup = FrontendSession::open(&mut c.agents, "fe0").await;
    assert_status(dup.map(|_| ()), Code::AlreadyExists, "fe0");

    add_export(&mut c, export("e1", "n1", "/tmp/e1.sock"))
        .await
        .unwrap();
    match next_event(&mut fe).await {
        FrontendEventKind::Upsert(plan) => assert_eq!(plan.export.unwrap().id, "e1"),
        other => panic!("expected upsert, got {other:?}"),
    }

    // A worker back with a new socket: the frontends learn the new endpoint.
    drop(w);
    wait_worker_state(&mut c, "w0", WorkerState::Gone).await;
    let _w = register_worker(&mut c, "w0", "/tmp/w0-new.sock").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        match next_event(&mut fe).await {
            FrontendEventKind::Upsert(plan) => {
                assert_eq!(plan.queues[0].worker_socket, "/tmp/w0-new.sock");
                seen.push(plan.export.unwrap().id);
            }
            other => panic!("expected upsert, got {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, ["e0", "e1"]);

    c.exports
        .remove_export(RemoveExportRequest { id: "e0".into() })
        .await
        .unwrap();
    match next_event(&mut fe).await {
        FrontendEventKind::Remove(id) => assert_eq!(id, "e0"),
        other => panic!("expected remove, got {other:?}"),
    }

    // Once its stream is gone the name can register again.
    drop(fe);
    within("frontend re-register", async {
        loop {
            let r = FrontendSession::open(&mut c.agents, "fe0").await;
            match r {
                Ok(s) => break s,
                Err(s) if s.code() == Code::AlreadyExists => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(s) => panic!("{s}"),
            }
        }
    })
    .await;
    m.stop().await.unwrap();
}

#[tokio::test]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c, "w0", "/tmp/w0.sock").await;
    add_node(&mut c, null("n0", 1 << 20)).await.unwrap();
    add_node(&mut c, raw("r0", "n0", 4096, 8192)).await.unwrap();
    let mut e = export("e0", "r0", "/tmp/e0.sock");
    e.num_queues = 2;
    e.writable = true;
    add_export(&mut c, e).await.unwrap();
    drop(c);
    within("stop", m.stop()).await.unwrap();

    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let nodes = c
        .nodes
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 2);
    let r0 = nodes
        .iter()
        .find(|n| n.spec.as_ref().unwrap().name == "r0")
        .unwrap();
    assert_eq!(r0.size, 8192);
    assert_eq!(r0.used_by, ["e0"]);
    let exports = c
        .exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert_eq!(exports.len(), 1);
    assert!(exports[0].export.as_ref().unwrap().writable);
    assert_eq!(exports[0].queues.len(), 2);
    let w = workers(&mut c).await;
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].state, WorkerState::Gone as i32, "workers start GONE");
    assert_eq!(w[0].queues, ["e0/0", "e0/1"]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn corrupt_state_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, b"{\"version\": 1, \"nodes\": [").unwrap();
    let config =
        ManagerConfig::new(dir.path().to_path_buf()).with_listen("127.0.0.1:0".parse().unwrap());
    let err = Manager::bind(config).await.unwrap_err();
    assert!(matches!(err, ManagerError::CorruptState { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"{\"version\": 1, \"nodes\": ["
    );
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let ch = Channel::from_shared(m.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(ch);
    for service in [
        "",
        "blkmesh.v1.NodeService",
        "blkmesh.v1.FrontendService",
        "blkmesh.v1.ZoneService",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    m.stop().await.unwrap();
}

#[tokio::test]
async fn serves_on_unix_socket_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let config = ManagerConfig::new(dir.path().join("state"))
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_unix(sock.clone());
    let m = Manager::bind(config).await.unwrap().spawn();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let path = sock.clone();
    let ch = within(
        "unix connect",
        tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector(
            tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }),
        ),
    )
    .await
    .unwrap();
    let mut nodes = NodeServiceClient::new(ch);
    nodes
        .add_node(AddNodeRequest {
            node: Some(null("n0", 512)),
            ..Default::default()
        })
        .await
        .unwrap();
    m.stop().await.unwrap();
    assert!(!sock.exists(), "socket removed on shutdown");
}

// ----- device-backed protocol nodes and filters -----

fn nvme(name: &str, path: &Path, read_only: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions {
            path: path.to_str().unwrap().into(),
            read_only,
        })),
    }
}

fn vhost_user(name: &str, path: &Path, read_only: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
            path: path.to_str().unwrap().into(),
            read_only,
        })),
    }
}

fn vdpa(name: &str, path: &Path, read_only: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
            path: path.to_str().unwrap().into(),
            read_only,
        })),
    }
}

fn iops_limits(rate: u64, burst: u64) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: Some(Bucket { rate, burst }),
        ..Default::default()
    }
}

fn throttle(name: &str, child: &str, limits: ThrottleLimits, group: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: child.into(),
            limits: Some(limits),
            group: group.into(),
        })),
    }
}

fn faults(name: &str, child: &str, rules: Vec<FaultRule>) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            rules,
            ..Default::default()
        })),
    }
}

fn errno_rule(errno: i32) -> FaultRule {
    FaultRule {
        action: Some(fault_rule::Action::Errno(errno)),
        ..Default::default()
    }
}

async fn list_nodes(c: &mut Clients) -> Vec<NodeInfo> {
    c.nodes
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

#[tokio::test]
async fn device_protocol_nodes_add_list_info() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let m = start(&dir.path().join("state")).await;
    let mut c = connect(&m).await;

    // /dev/null is a character device: enough for the manager's checks.
    let n = add_node(&mut c, nvme("nvme0", Path::new("/dev/null"), true))
        .await
        .unwrap();
    assert_eq!(n.size, 0, "size is unknown until a worker opens it");
    assert!(n.read_only);
    let v = add_node(&mut c, vhost_user("vu0", &sock, false))
        .await
        .unwrap();
    assert_eq!(v.size, 0);
    assert!(!v.read_only);
    let d = add_node(&mut c, vdpa("vdpa0", Path::new("/dev/null"), false))
        .await
        .unwrap();
    assert_eq!(d.size, 0);

    let names: Vec<String> = list_nodes(&mut c)
        .await
        .iter()
        .map(|n| n.spec.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, ["nvme0", "vdpa0", "vu0"]);
    let got = get_node(&mut c, "vu0").await;
    assert_eq!(got.spec.unwrap(), vhost_user("vu0", &sock, false));

    // Raw over a child of unknown size: no fits-in-child check.
    let r = add_node(&mut c, raw("r0", "nvme0", 4096, 8192))
        .await
        .unwrap();
    assert_eq!(r.size, 8192);
    assert!(r.read_only, "read-only is inherited from the nvme node");
    let r = add_node(&mut c, raw("r1", "vdpa0", 4096, 0)).await.unwrap();
    assert_eq!(r.size, 0, "window to the end of an unknown size is unknown");
    assert_status(
        add_node(&mut c, raw("r2", "vu0", 100, 0)).await,
        Code::InvalidArgument,
        "node.raw.offset",
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn missing_or_wrong_device_paths_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("plain.img");
    std::fs::write(&file_path, b"x").unwrap();
    let missing = dir.path().join("missing");
    let m = start(&dir.path().join("state")).await;
    let mut c = connect(&m).await;

    assert_status(
        add_node(&mut c, nvme("n", &missing, false)).await,
        Code::InvalidArgument,
        "node.nvme_io_uring.path: cannot stat",
    );
    assert_status(
        add_node(&mut c, nvme("n", &file_path, false)).await,
        Code::InvalidArgument,
        "node.nvme_io_uring.path: must be a character device",
    );
    assert_status(
        add_node(&mut c, vdpa("v", &missing, false)).await,
        Code::InvalidArgument,
        "node.virtio_blk_vhost_vdpa.path: cannot stat",
    );
    assert_status(
        add_node(&mut c, vdpa("v", dir.path(), false)).await,
        Code::InvalidArgument,
        "node.virtio_blk_vhost_vdpa.path: must be a character device",
    );
    assert_status(
        add_node(&mut c, vhost_user("u", &missing, false)).await,
        Code::InvalidArgument,
        "node.virtio_blk_vhost_user.path: cannot stat",
    );
    assert_status(
        add_node(&mut c, vhost_user("u", Path::new("/dev/null"), false)).await,
        Code::InvalidArgument,
        "node.virtio_blk_vhost_user.path: must be a unix socket (\"/dev/null\" is a character device)",
    );
    assert_status(
        add_node(&mut c, vhost_user("u", Path::new("rel.sock"), false)).await,
        Code::InvalidArgument,
        "node.virtio_blk_vhost_user.path: must be an absolute path",
    );
    assert!(list_nodes(&mut c).await.is_empty(), "nothing was added");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn filters_take_child_size_and_hold_their_child() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    add_node(&mut c, null("n0", 1 << 20)).await.unwrap();
    let t = add_node(&mut c, throttle("t0", "n0", iops_limits(100, 0), ""))
        .await
        .unwrap();
    assert_eq!(t.size, 1 << 20);
    let f = add_node(
        &mut c,
        faults(
            "f0",
            "t0",
            vec![FaultRule {
                ops: vec![IoOp::Write as i32],
                offset_start: 0,
                offset_end: 4096,
                skip: 1,
                count: 2,
                probability: 0.5,
                action: Some(fault_rule::Action::Errno(28)),
            }],
        ),
    )
    .await
    .unwrap();
    assert_eq!(f.size, 1 << 20);
    assert_eq!(get_node(&mut c, "n0").await.used_by, ["t0"]);
    assert_eq!(get_node(&mut c, "t0").await.used_by, ["f0"]);

    assert_status(
        c.nodes
            .remove_node(RemoveNodeRequest { name: "n0".into() })
            .await,
        Code::FailedPrecondition,
        "node \"n0\" is in use by node \"t0\"",
    );
    assert_status(
        c.nodes
            .remove_node(RemoveNodeRequest { name: "t0".into() })
            .await,
        Code::FailedPrecondition,
        "node \"t0\" is in use by node \"f0\"",
    );
    assert_status(
        add_node(&mut c, faults("f1", "t0", vec![])).await,
        Code::FailedPrecondition,
        "node.fault_injection.child: node \"t0\" is already the child of node \"f0\"",
    );
    assert_status(
        add_node(&mut c, throttle("t1", "nope", iops_limits(1, 0), "")).await,
        Code::NotFound,
        "node.throttle.child: node \"nope\" not found",
    );
    for name in ["f0", "t0", "n0"] {
        c.nodes
            .remove_node(RemoveNodeRequest { name: name.into() })
            .await
            .unwrap();
    }
    m.stop().await.unwrap();
}

#[tokio::test]
async fn read_only_flows_through_filters() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(&dir.path().join("state")).await;
    let mut c = connect(&m).await;
    add_node(&mut c, vdpa("d", Path::new("/dev/null"), true))
        .await
        .unwrap();
    let t = add_node(&mut c, throttle("t", "d", iops_limits(10, 0), ""))
        .await
        .unwrap();
    assert!(t.read_only);
    let f = add_node(&mut c, faults("f", "t", vec![])).await.unwrap();
    assert!(f.read_only);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn throttle_group_limits_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    for n in ["a", "b", "c"] {
        add_node(&mut c, null(n, 1 << 20)).await.unwrap();
    }
    add_node(&mut c, throttle("ta", "a", iops_limits(100, 200), "tenant"))
        .await
        .unwrap();
    add_node(&mut c, throttle("tb", "b", iops_limits(100, 200), "tenant"))
        .await
        .unwrap();
    let s = add_node(&mut c, throttle("tc", "c", iops_limits(100, 300), "tenant"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    assert!(
        s.message().starts_with("node.throttle.limits: ")
            && s.message().contains("throttle group \"tenant\"")
            && s.message().contains("\"ta\"")
            && s.message().contains("\"tc\""),
        "{}",
        s.message()
    );
    // The same limits in another group, or without a group, are fine.
    add_node(&mut c, throttle("tc", "c", iops_limits(100, 300), "other"))
        .await
        .unwrap();
    m.stop().await.unwrap();
}

#[tokio::test]
async fn throttle_and_fault_rule_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    add_node(&mut c, null("n0", 1 << 20)).await.unwrap();

    assert_status(
        add_node(&mut c, throttle("t", "n0", ThrottleLimits::default(), "")).await,
        Code::InvalidArgument,
        "node.throttle.limits: throttle with no limit",
    );
    let mut no_limits = throttle("t", "n0", ThrottleLimits::default(), "");
    if let Some(Driver::Throttle(o)) = &mut no_limits.driver {
        o.limits = None;
    }
    assert_status(
        add_node(&mut c, no_limits).await,
        Code::InvalidArgument,
        "node.throttle.limits: must be set",
    );
    let limits = ThrottleLimits {
        iops_read: Some(Bucket {
            rate: 100,
            burst: 10,
        }),
        ..Default::default()
    };
    assert_status(
        add_node(&mut c, throttle("t", "n0", limits, "")).await,
        Code::InvalidArgument,
        "node.throttle.limits.iops_read.burst: must be 0 or >= rate (got 10 < 100)",
    );
    assert_status(
        add_node(&mut c, throttle("t", "n0", iops_limits(1, 0), "bad group")).await,
        Code::InvalidArgument,
        "node.throttle.group",
    );

    assert_status(
        add_node(
            &mut c,
            faults("f", "n0", vec![errno_rule(5), errno_rule(5), errno_rule(0)]),
        )
        .await,
        Code::InvalidArgument,
        "node.fault_injection.rules[2].errno: must be in 1..=4095",
    );
    assert_status(
        add_node(&mut c, faults("f", "n0", vec![FaultRule::default()])).await,
        Code::InvalidArgument,
        "node.fault_injection.rules[0].action: must be set",
    );
    let delay = FaultRule {
        action: Some(fault_rule::Action::DelayNs(11_000_000_000)),
        ..Default::default()
    };
    assert_status(
        add_node(&mut c, faults("f", "n0", vec![delay])).await,
        Code::InvalidArgument,
        "node.fault_injection.rules[0].delay_ns",
    );
    let prob = FaultRule {
        probability: 2.0,
        ..errno_rule(5)
    };
    assert_status(
        add_node(&mut c, faults("f", "n0", vec![prob])).await,
        Code::InvalidArgument,
        "node.fault_injection.rules[0].probability: must be in [0, 1]",
    );
    let range = FaultRule {
        offset_start: 4096,
        offset_end: 4096,
        ..errno_rule(5)
    };
    assert_status(
        add_node(&mut c, faults("f", "n0", vec![range])).await,
        Code::InvalidArgument,
        "node.fault_injection.rules[0].offset_end",
    );
    let unspecified = FaultRule {
        ops: vec![IoOp::Unspecified as i32],
        ..errno_rule(5)
    };
    assert_status(
        add_node(&mut c, faults("f", "n0", vec![unspecified])).await,
        Code::InvalidArgument,
        "node.fault_injection.rules[0].ops",
    );
    assert_status(
        add_node(&mut c, faults("f", "n0", vec![errno_rule(5); 65])).await,
        Code::InvalidArgument,
        "node.fault_injection.rules: must have at most 64 rules (got 65)",
    );
    assert_eq!(list_nodes(&mut c).await.len(), 1, "nothing was added");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn new_node_kinds_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sock = dir.path().join("vu.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let m = start(&state).await;
    let mut c = connect(&m).await;
    add_node(&mut c, nvme("nvme0", Path::new("/dev/null"), true))
        .await
        .unwrap();
    add_node(&mut c, vhost_user("vu0", &sock, false))
        .await
        .unwrap();
    add_node(&mut c, vdpa("vdpa0", Path::new("/dev/null"), false))
        .await
        .unwrap();
    add_node(&mut c, null("n0", 1 << 20)).await.unwrap();
    add_node(&mut c, throttle("t0", "n0", iops_limits(50, 0), "g"))
        .await
        .unwrap();
    add_node(&mut c, throttle("t1", "vu0", iops_limits(50, 0), "g"))
        .await
        .unwrap();
    let rule = FaultRule {
        ops: vec![IoOp::Read as i32, IoOp::Flush as i32],
        offset_end: 1 << 20,
        probability: 0.5,
        action: Some(fault_rule::Action::DelayNs(1_000_000)),
        ..Default::default()
    };
    add_node(&mut c, faults("f0", "t0", vec![rule, errno_rule(5)]))
        .await
        .unwrap();
    let before = list_nodes(&mut c).await;
    drop(c);
    within("stop", m.stop()).await.unwrap();

    let m = start(&state).await;
    let mut c = connect(&m).await;
    assert_eq!(list_nodes(&mut c).await, before);
    let f0 = get_node(&mut c, "f0").await;
    assert_eq!(f0.size, 1 << 20);
    // The group is still enforced after the restart.
    add_node(&mut c, null("n1", 4096)).await.unwrap();
    assert_status(
        add_node(&mut c, throttle("t2", "n1", iops_limits(51, 0), "g")).await,
        Code::FailedPrecondition,
        "throttle group \"g\"",
    );
    m.stop().await.unwrap();
}

// ----- queue placement: spread, MoveQueue, DrainWorker -----

async fn move_queue(
    c: &mut Clients,
    export: &str,
    queue: u32,
    worker: &str,
) -> Result<ExportInfo, tonic::Status> {
    c.workers
        .move_queue(MoveQueueRequest {
            export: export.into(),
            queue,
            worker: worker.into(),
        })
        .await
        .map(|r| r.into_inner().export.unwrap())
}

async fn drain(c: &mut Clients, worker: &str) -> Result<Vec<MovedQueue>, tonic::Status> {
    c.workers
        .drain_worker(DrainWorkerRequest {
            worker: worker.into(),
        })
        .await
        .map(|r| r.into_inner().moved)
}

fn queue_workers(info: &ExportInfo) -> Vec<&str> {
    info.queues.iter().map(|q| q.worker.as_str()).collect()
}

fn plan_workers(plan: &ExportPlan) -> Vec<(&str, &str)> {
    plan.queues
        .iter()
        .map(|q| (q.worker.as_str(), q.worker_socket.as_str()))
        .collect()
}

async fn frontend(c: &mut Clients) -> FrontendSession {
    FrontendSession::open(&mut c.agents, "fe0").await.unwrap()
}

async fn next_upsert(s: &mut FrontendSession) -> ExportPlan {
    match next_event(s).await {
        FrontendEventKind::Upsert(plan) => plan,
        other => panic!("expected upsert, got {other:?}"),
    }
}

#[tokio::test]
async fn spread_export_goes_round_robin_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    add_node(&mut c, null("n1", 4096)).await.unwrap();
    // wa: 1 queue, so the spread export starts on wb.
    add_export(&mut c, export("e0", "n0", "/tmp/e0.sock"))
        .await
        .unwrap();
    let mut fe = frontend(&mut c).await;
    next_upsert(&mut fe).await;

    let mut e = export("e1", "n1", "/tmp/e1.sock");
    e.num_queues = 5;
    e.spread_queues = true;
    let info = add_export(&mut c, e).await.unwrap();
    assert!(info.export.as_ref().unwrap().spread_queues);
    assert_eq!(queue_workers(&info), ["wb", "wa", "wb", "wa", "wb"]);
    let plan = next_upsert(&mut fe).await;
    assert_eq!(
        plan_workers(&plan),
        [
            ("wb", "/tmp/wb.sock"),
            ("wa", "/tmp/wa.sock"),
            ("wb", "/tmp/wb.sock"),
            ("wa", "/tmp/wa.sock"),
            ("wb", "/tmp/wb.sock"),
        ]
    );
    drop(fe);
    drop(c);
    within("stop", m.stop()).await.unwrap();

    let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(text.contains("\"spread_queues\": true"), "{text}");
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let exports = c
        .exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports;
    let e1 = exports
        .iter()
        .find(|e| e.export.as_ref().unwrap().id == "e1")
        .unwrap();
    assert!(e1.export.as_ref().unwrap().spread_queues);
    assert_eq!(queue_workers(e1), ["wb", "wa", "wb", "wa", "wb"]);
    let e0 = exports
        .iter()
        .find(|e| e.export.as_ref().unwrap().id == "e0")
        .unwrap();
    assert!(!e0.export.as_ref().unwrap().spread_queues);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn spread_is_refused_over_an_ungrouped_throttle() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    add_node(&mut c, throttle("t0", "n0", iops_limits(100, 0), ""))
        .await
        .unwrap();
    add_node(&mut c, raw("r0", "t0", 0, 0)).await.unwrap();
    let mut e = export("e0", "r0", "/tmp/e0.sock");
    e.num_queues = 2;
    e.spread_queues = true;
    assert_status(
        add_export(&mut c, e.clone()).await,
        Code::FailedPrecondition,
        "export.spread_queues: node \"t0\" is a throttle without a group",
    );
    assert!(c
        .exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports
        .is_empty());

    // Not spread: accepted. A grouped throttle can be spread.
    e.spread_queues = false;
    add_export(&mut c, e).await.unwrap();
    add_node(&mut c, null("n1", 4096)).await.unwrap();
    add_node(&mut c, throttle("t1", "n1", iops_limits(100, 0), "g"))
        .await
        .unwrap();
    let mut e = export("e1", "t1", "/tmp/e1.sock");
    e.num_queues = 2;
    e.spread_queues = true;
    let info = add_export(&mut c, e).await.unwrap();
    assert_eq!(queue_workers(&info), ["wb", "wa"]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn move_queue_updates_plan_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 2;
    add_export(&mut c, e).await.unwrap();
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    let mut fe = frontend(&mut c).await;
    next_upsert(&mut fe).await;

    let info = move_queue(&mut c, "e0", 1, "wb").await.unwrap();
    assert_eq!(queue_workers(&info), ["wa", "wb"]);
    assert_eq!(info.size, 4096);
    let plan = next_upsert(&mut fe).await;
    assert_eq!(plan.export.as_ref().unwrap().id, "e0");
    assert_eq!(
        plan_workers(&plan),
        [("wa", "/tmp/wa.sock"), ("wb", "/tmp/wb.sock")]
    );
    let names: Vec<_> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["n0"]);

    // To the current worker: nothing changes, nothing is pushed.
    let same = move_queue(&mut c, "e0", 1, "wb").await.unwrap();
    assert_eq!(queue_workers(&same), ["wa", "wb"]);
    let w = workers(&mut c).await;
    assert_eq!(w[0].queues, ["e0/0"]);
    assert_eq!(w[1].queues, ["e0/1"]);
    // The next event the frontend sees is the next real change.
    move_queue(&mut c, "e0", 0, "wb").await.unwrap();
    let plan = next_upsert(&mut fe).await;
    assert_eq!(
        plan_workers(&plan),
        [("wb", "/tmp/wb.sock"), ("wb", "/tmp/wb.sock")]
    );

    drop(fe);
    drop(c);
    within("stop", m.stop()).await.unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let w = workers(&mut c).await;
    assert_eq!(w[1].name, "wb");
    assert_eq!(w[1].queues, ["e0/0", "e0/1"], "moves are persisted");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn move_queue_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 2;
    add_export(&mut c, e).await.unwrap();

    assert_status(
        move_queue(&mut c, "nope", 0, "wb").await,
        Code::NotFound,
        "export: export \"nope\" not found",
    );
    assert_status(
        move_queue(&mut c, "e0", 2, "wb").await,
        Code::InvalidArgument,
        "queue: export \"e0\" has 2 queues",
    );
    assert_status(
        move_queue(&mut c, "e0", 0, "wz").await,
        Code::NotFound,
        "worker: worker \"wz\" not found",
    );
    drop(a);
    wait_worker_state(&mut c, "wa", WorkerState::Gone).await;
    assert_status(
        move_queue(&mut c, "e0", 0, "wa").await,
        Code::FailedPrecondition,
        "worker: worker \"wa\" is not alive",
    );
    // Nothing changed.
    let w = workers(&mut c).await;
    assert_eq!(w[0].queues, ["e0/0", "e0/1"]);
    assert!(w[1].queues.is_empty());
    m.stop().await.unwrap();
}

#[tokio::test]
async fn drain_worker_moves_everything_least_loaded_first() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    add_node(&mut c, null("n1", 4096)).await.unwrap();
    add_node(&mut c, null("n2", 4096)).await.unwrap();
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 3;
    add_export(&mut c, e).await.unwrap();
    add_export(&mut c, export("e1", "n1", "/tmp/e1.sock"))
        .await
        .unwrap();
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    let _c = register_worker(&mut c, "wc", "/tmp/wc.sock").await;
    // wb gets one queue before the drain.
    add_export(&mut c, export("e2", "n2", "/tmp/e2.sock"))
        .await
        .unwrap();
    let mut fe = frontend(&mut c).await;
    for _ in 0..3 {
        next_upsert(&mut fe).await;
    }

    let moved = drain(&mut c, "wa").await.unwrap();
    let got: Vec<_> = moved
        .iter()
        .map(|m| (m.export.as_str(), m.queue, m.from.as_str(), m.to.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("e0", 0, "wa", "wc"),
            ("e0", 1, "wa", "wb"),
            ("e0", 2, "wa", "wc"),
            ("e1", 0, "wa", "wb"),
        ]
    );
    // One plan per affected export.
    let p0 = next_upsert(&mut fe).await;
    assert_eq!(p0.export.as_ref().unwrap().id, "e0");
    assert_eq!(
        plan_workers(&p0),
        [
            ("wc", "/tmp/wc.sock"),
            ("wb", "/tmp/wb.sock"),
            ("wc", "/tmp/wc.sock")
        ]
    );
    let p1 = next_upsert(&mut fe).await;
    assert_eq!(p1.export.as_ref().unwrap().id, "e1");
    assert_eq!(plan_workers(&p1), [("wb", "/tmp/wb.sock")]);

    let w = workers(&mut c).await;
    assert!(w[0].queues.is_empty(), "{w:?}");
    assert_eq!(w[1].queues.len(), 3);
    assert_eq!(w[2].queues.len(), 2);
    // Draining an empty worker moves nothing.
    assert!(drain(&mut c, "wa").await.unwrap().is_empty());

    // Persisted.
    drop(fe);
    drop(c);
    within("stop", m.stop()).await.unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let w = workers(&mut c).await;
    assert!(w[0].queues.is_empty(), "{w:?}");
    assert_eq!(w[2].queues, ["e0/0", "e0/2"]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn drain_worker_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    assert_status(
        drain(&mut c, "wz").await,
        Code::NotFound,
        "worker: worker \"wz\" not found",
    );
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    // No queues: nothing to move, even with no other worker.
    assert!(drain(&mut c, "wa").await.unwrap().is_empty());
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 2;
    add_export(&mut c, e).await.unwrap();
    assert_status(
        drain(&mut c, "wa").await,
        Code::FailedPrecondition,
        "no other live worker to take the 2 queues of worker \"wa\"",
    );
    // A gone second worker does not count.
    let b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    drop(b);
    wait_worker_state(&mut c, "wb", WorkerState::Gone).await;
    assert_status(
        drain(&mut c, "wa").await,
        Code::FailedPrecondition,
        "no other live worker",
    );
    let w = workers(&mut c).await;
    assert_eq!(w[0].queues, ["e0/0", "e0/1"]);
    m.stop().await.unwrap();
}

// ----- MoveNode -----

async fn move_node(
    c: &mut Clients,
    node: &str,
    worker: &str,
) -> Result<Vec<MovedQueue>, tonic::Status> {
    c.workers
        .move_node(MoveNodeRequest {
            node: node.into(),
            worker: worker.into(),
        })
        .await
        .map(|r| r.into_inner().moved)
}

#[tokio::test]
async fn move_node_moves_every_export_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    add_node(&mut c, null("base", 4096)).await.unwrap();
    add_node(&mut c, raw("r", "base", 0, 0)).await.unwrap();
    add_node(&mut c, null("other", 4096)).await.unwrap();
    let mut e = export("A", "r", "/tmp/a.sock");
    e.num_queues = 3;
    add_export(&mut c, e).await.unwrap();
    add_export(&mut c, export("B", "other", "/tmp/b.sock"))
        .await
        .unwrap();
    let _b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    // A/1 is already on wb: not listed.
    move_queue(&mut c, "A", 1, "wb").await.unwrap();
    let mut fe = frontend(&mut c).await;
    for _ in 0..2 {
        next_upsert(&mut fe).await;
    }

    let moved = move_node(&mut c, "base", "wb").await.unwrap();
    let got: Vec<_> = moved
        .iter()
        .map(|m| (m.export.as_str(), m.queue, m.from.as_str(), m.to.as_str()))
        .collect();
    assert_eq!(got, [("A", 0, "wa", "wb"), ("A", 2, "wa", "wb")]);
    let plan = next_upsert(&mut fe).await;
    assert_eq!(plan.export.as_ref().unwrap().id, "A");
    assert_eq!(plan_workers(&plan), [("wb", "/tmp/wb.sock"); 3]);
    let names: Vec<_> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["r", "base"]);

    // Everything already there: nothing moves, nothing is pushed.
    assert!(move_node(&mut c, "r", "wb").await.unwrap().is_empty());
    // The next event the frontend sees is the next real change (B's).
    let moved = move_node(&mut c, "other", "wb").await.unwrap();
    assert_eq!(moved.len(), 1);
    let plan = next_upsert(&mut fe).await;
    assert_eq!(plan.export.as_ref().unwrap().id, "B");

    drop(fe);
    drop(c);
    within("stop", m.stop()).await.unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let w = workers(&mut c).await;
    assert!(w[0].queues.is_empty(), "{w:?}");
    assert_eq!(w[1].queues, ["A/0", "A/1", "A/2", "B/0"], "persisted");
    m.stop().await.unwrap();
}

#[tokio::test]
async fn move_node_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;
    let _a = register_worker(&mut c, "wa", "/tmp/wa.sock").await;
    let b = register_worker(&mut c, "wb", "/tmp/wb.sock").await;
    add_node(&mut c, null("n0", 4096)).await.unwrap();
    add_node(&mut c, null("free", 4096)).await.unwrap();
    let mut e = export("e0", "n0", "/tmp/e0.sock");
    e.num_queues = 2;
    add_export(&mut c, e).await.unwrap();

    assert_status(
        move_node(&mut c, "nope", "wz").await,
        Code::NotFound,
        "node: node \"nope\" not found",
    );
    assert_status(
        move_node(&mut c, "n0", "wz").await,
        Code::NotFound,
        "worker: worker \"wz\" not found",
    );
    // A node no export uses: success, nothing moved.
    assert!(move_node(&mut c, "free", "wb").await.unwrap().is_empty());
    drop(b);
    wait_worker_state(&mut c, "wb", WorkerState::Gone).await;
    assert_status(
        move_node(&mut c, "n0", "wb").await,
        Code::FailedPrecondition,
        "worker: worker \"wb\" is not alive",
    );
    // Nothing changed.
    let w = workers(&mut c).await;
    assert_eq!(w[0].queues, ["e0/0", "e0/1"]);
    assert!(w[1].queues.is_empty());
    m.stop().await.unwrap();
}

/// An agent session starts with its hello, and only there: anything else
/// ends the call INVALID_ARGUMENT with the reason.
#[tokio::test]
async fn agent_sessions_start_with_the_hello() {
    use blkmesh_proto::agent::v1::{frontend_up, worker_up, FrontendHello, FrontendUp, WorkerUp};
    use tokio_stream::wrappers::UnboundedReceiverStream;

    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut c = connect(&m).await;

    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    up.send(FrontendUp {
        msg: Some(frontend_up::Msg::Stats(StatsReport::default())),
    })
    .unwrap();
    let mut down = c
        .agents
        .frontend_session(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        within("the refusal", down.message()).await,
        Code::InvalidArgument,
        "first message must be hello (got stats)",
    );

    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    up.send(WorkerUp { msg: None }).unwrap();
    let mut down = c
        .agents
        .worker_session(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        within("the refusal", down.message()).await,
        Code::InvalidArgument,
        "first message must be hello (got an empty message)",
    );

    // A second hello ends a session that was accepted; the name is free again.
    let fe = FrontendSession::open(&mut c.agents, "fe0").await.unwrap();
    fe.send(FrontendUp {
        msg: Some(frontend_up::Msg::Hello(FrontendHello {
            name: "fe0".into(),
        })),
    });
    assert_status(
        fe.finish().await,
        Code::InvalidArgument,
        "hello is not allowed here",
    );
    let w = register_worker(&mut c, "w0", "/tmp/w0.sock").await;
    w.send(WorkerUp {
        msg: Some(worker_up::Msg::Hello(WorkerHello::default())),
    });
    assert_status(
        w.finish().await,
        Code::InvalidArgument,
        "hello is not allowed here",
    );
    wait_worker_state(&mut c, "w0", WorkerState::Gone).await;
    let _fe = FrontendSession::open(&mut c.agents, "fe0").await.unwrap();
    m.stop().await.unwrap();
}
