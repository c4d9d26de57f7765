//! Zoned nodes and the ZoneService, against a real manager in-process.
//! Workers and frontends are played by the tests: a fake frontend opens its
//! agent session, reports SERVING for every plan, and answers each
//! `zone_command` with a `zone_answer` as its policy says.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkmesh_manager::{Manager, ManagerConfig, RunningManager};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendEventKind;
use blkmesh_proto::agent::v1::frontend_up::Msg as Up;
use blkmesh_proto::agent::v1::zone_answer::Result as Answer;
use blkmesh_proto::agent::v1::{
    ExportStatus, FrontendUp, WorkerHello, ZoneAnswer, ZoneCommand, ZoneError,
};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;

mod common;
use common::agent::{FrontendSession, WorkerSession};
use common::client::{add_export, connect, get_node, null, raw, within, Clients, WAIT};

const APPLY: Duration = Duration::from_millis(2000);
const MIB: u64 = 1 << 20;

async fn start(dir: &Path, apply: Duration) -> RunningManager {
    start_with(dir, apply, Duration::from_secs(3)).await
}

async fn start_with(dir: &Path, apply: Duration, grace: Duration) -> RunningManager {
    let config = ManagerConfig::new(dir.to_path_buf())
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_apply_timeout(apply)
        .with_worker_grace(grace);
    Manager::bind(config).await.unwrap().spawn()
}

fn throttle(name: &str, child: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: child.into(),
            limits: Some(ThrottleLimits {
                iops_total: Some(Bucket {
                    rate: 1000,
                    burst: 0,
                }),
                ..Default::default()
            }),
            group: String::new(),
        })),
    }
}

fn faults(name: &str, child: &str, max_transfer: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            max_transfer,
            ..Default::default()
        })),
    }
}

/// A zoned node: 4 MiB zones of 3 MiB capacity, at most 4 open and 8 active.
fn zoned(name: &str, child: &str, meta: &Path) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: child.into(),
            zone_size: 4 * MIB,
            zone_capacity: 3 * MIB,
            max_open_zones: 4,
            max_active_zones: 8,
            metadata_path: meta.to_str().unwrap().into(),
        })),
    }
}

fn zoned_opts(spec: &mut NodeSpec) -> &mut ZonedOptions {
    match &mut spec.driver {
        Some(Driver::Zoned(o)) => o,
        _ => panic!("not a zoned node"),
    }
}

fn export(id: &str, node: &str, num_queues: u32) -> VhostUserBlkExport {
    VhostUserBlkExport {
        id: id.into(),
        node: node.into(),
        socket: format!("/tmp/{id}.sock"),
        num_queues,
        writable: true,
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

async fn exports(c: &mut Clients) -> Vec<ExportInfo> {
    c.exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports
}

fn queue_workers(info: &ExportInfo) -> Vec<String> {
    info.queues.iter().map(|q| q.worker.clone()).collect()
}

async fn workers_of(c: &mut Clients, id: &str) -> Vec<String> {
    let e = exports(c)
        .await
        .into_iter()
        .find(|e| e.export.as_ref().unwrap().id == id)
        .unwrap_or_else(|| panic!("export {id} not listed"));
    queue_workers(&e)
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

async fn report(
    c: &mut Clients,
    export: &str,
    offset: u64,
    max_zones: u32,
) -> Result<ReportZonesResponse, tonic::Status> {
    c.zones
        .report_zones(ReportZonesRequest {
            export: export.into(),
            offset,
            max_zones,
        })
        .await
        .map(|r| r.into_inner())
}

async fn manage(
    c: &mut Clients,
    export: &str,
    action: ZoneAction,
    offset: u64,
) -> Result<ManageZoneResponse, tonic::Status> {
    c.zones
        .manage_zone(ManageZoneRequest {
            export: export.into(),
            action: action as i32,
            offset,
        })
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
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

/// How a fake frontend answers a zone command: `None` = it does not.
type ZonePolicy = Arc<dyn Fn(&ZoneCommand) -> Option<Option<Answer>> + Send + Sync>;

/// A test frontend: registered, reporting SERVING for every plan,
/// answering zone commands by its policy and forwarding them to `commands`.
/// Dropping it closes its session.
struct FakeFrontend {
    commands: mpsc::UnboundedReceiver<ZoneCommand>,
    up: mpsc::UnboundedSender<FrontendUp>,
    task: JoinHandle<()>,
}

impl Drop for FakeFrontend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeFrontend {
    async fn start(c: &Clients, name: &str, serve: bool, policy: ZonePolicy) -> FakeFrontend {
        let mut client = c.agents.clone();
        let mut session = FrontendSession::open(&mut client, name).await.unwrap();
        let up = session.sender();
        let (tx, commands) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(Some(ev)) = session.down.message().await {
                match ev.msg {
                    Some(FrontendEventKind::Upsert(plan)) if serve => {
                        session.report(ExportStatus {
                            id: plan.export.as_ref().unwrap().id.clone(),
                            generation: plan.generation,
                            state: ExportState::Serving as i32,
                            message: String::new(),
                            size: 0,
                        });
                    }
                    Some(FrontendEventKind::ZoneCommand(cmd)) => {
                        if let Some(result) = policy(&cmd) {
                            session.answer(ZoneAnswer { id: cmd.id, result });
                        }
                        let _ = tx.send(cmd);
                    }
                    _ => {}
                }
            }
        });
        FakeFrontend { commands, up, task }
    }

    /// Answers on the session, whatever the policy.
    fn answer(&self, answer: ZoneAnswer) {
        let _ = self.up.send(FrontendUp {
            msg: Some(Up::ZoneAnswer(answer)),
        });
    }

    async fn next_command(&mut self) -> ZoneCommand {
        within("zone command", self.commands.recv())
            .await
            .expect("fake frontend ended")
    }
}

fn zone(start: u64, wp: u64, cond: ZoneCondition) -> Zone {
    Zone {
        start,
        length: 4 * MIB,
        capacity: 3 * MIB,
        write_pointer: wp,
        r#type: ZoneType::SequentialWriteRequired as i32,
        condition: cond as i32,
    }
}

/// Answers reports with `max_zones` zones (at most 3) from the offset's
/// zone, and actions with the zone at the offset, explicitly open.
fn answering() -> ZonePolicy {
    Arc::new(|cmd: &ZoneCommand| {
        let first = cmd.offset / (4 * MIB) * (4 * MIB);
        Some(Some(match ZoneAction::try_from(cmd.action).unwrap() {
            ZoneAction::Unspecified => Answer::Report(ReportZonesResponse {
                info: None,
                zones: (0..cmd.max_zones.min(3) as u64)
                    .map(|i| {
                        zone(
                            first + i * 4 * MIB,
                            first + i * 4 * MIB,
                            ZoneCondition::Empty,
                        )
                    })
                    .collect(),
            }),
            _ => Answer::Zone(zone(first, first + 4096, ZoneCondition::ExplicitOpen)),
        }))
    })
}

fn failing(errno: i32, message: &'static str) -> ZonePolicy {
    Arc::new(move |_: &ZoneCommand| {
        Some(Some(Answer::Error(ZoneError {
            errno,
            message: message.into(),
        })))
    })
}

fn silent() -> ZonePolicy {
    Arc::new(|_: &ZoneCommand| None)
}

/// null "n" (66 MiB) ← zoned "z" ← raw "r" (zones 1..=14) ← throttle "t".
async fn zoned_graph(c: &mut Clients, dir: &Path) {
    add_node(c, null("n", 66 * MIB)).await.unwrap();
    add_node(c, zoned("z", "n", &dir.join("z.zones")))
        .await
        .unwrap();
    add_node(c, raw("r", "z", 4 * MIB, 56 * MIB)).await.unwrap();
    add_node(c, throttle("t", "r")).await.unwrap();
}

// ----- zoned nodes -----

#[tokio::test]
async fn zoned_node_sizes_and_zone_info() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    zoned_graph(&mut c, dir.path()).await;

    let z = get_node(&mut c, "z").await;
    // 66 MiB in whole 4 MiB zones.
    assert_eq!(z.size, 64 * MIB);
    let info = z.zones.unwrap();
    assert_eq!(info.model, ZoneModel::HostManaged as i32);
    assert_eq!(
        (info.zone_size, info.zone_capacity, info.nr_zones),
        (4 * MIB, 3 * MIB, 16)
    );
    assert_eq!((info.max_open_zones, info.max_active_zones), (4, 8));
    assert_eq!((info.write_granularity, info.max_append), (512, MIB));
    assert_eq!(get_node(&mut c, "n").await.zones, None);

    let r = get_node(&mut c, "r").await;
    assert_eq!(r.size, 56 * MIB);
    assert_eq!(r.zones.unwrap().nr_zones, 14);
    let t = get_node(&mut c, "t").await;
    assert_eq!(t.zones, r.zones);
    // A fault-injection node narrows max append to its max transfer.
    add_node(&mut c, faults("x", "t", 256 << 10)).await.unwrap();
    let x = get_node(&mut c, "x").await.zones.unwrap();
    assert_eq!((x.nr_zones, x.max_append), (14, 256 << 10));
    // Listing shows the same.
    let listed = c
        .nodes
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let zoned_nodes: Vec<&str> = listed
        .iter()
        .filter(|n| n.zones.is_some())
        .map(|n| n.spec.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(zoned_nodes, ["r", "t", "x", "z"]);

    // Capacity 0 means the zone size; over a child of unknown size, the
    // node has no size and no zone count yet.
    let sock = dir.path().join("target.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
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
    .await
    .unwrap();
    let mut spec = zoned("z2", "vu", &dir.path().join("z2.zones"));
    zoned_opts(&mut spec).zone_capacity = 0;
    let z2 = add_node(&mut c, spec).await.unwrap();
    assert_eq!(z2.size, 0);
    let info = z2.zones.unwrap();
    assert_eq!((info.zone_capacity, info.nr_zones), (4 * MIB, 0));
    m.stop().await.unwrap();
}

#[tokio::test]
async fn zoned_node_rules() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    zoned_graph(&mut c, dir.path()).await;
    add_node(&mut c, null("n2", 64 * MIB)).await.unwrap();
    let meta2 = dir.path().join("z2.zones");

    // Validation (crates/graph).
    let mut spec = zoned("z2", "n2", &meta2);
    zoned_opts(&mut spec).zone_size = 3 * MIB;
    assert_status(
        add_node(&mut c, spec).await,
        Code::InvalidArgument,
        &["node.zoned.zone_size"],
    );
    let mut spec = zoned("z2", "n2", &meta2);
    zoned_opts(&mut spec).metadata_path = "zones".into();
    assert_status(
        add_node(&mut c, spec).await,
        Code::InvalidArgument,
        &["node.zoned.metadata_path"],
    );
    // The child must exist, be free, and not be zoned itself.
    assert_status(
        add_node(&mut c, zoned("z2", "nope", &meta2)).await,
        Code::NotFound,
        &["node.zoned.child", "\"nope\""],
    );
    assert_status(
        add_node(&mut c, zoned("z2", "n", &meta2)).await,
        Code::FailedPrecondition,
        &["node.zoned.child", "already the child"],
    );
    add_node(&mut c, null("n3", 64 * MIB)).await.unwrap();
    assert_status(
        add_node(&mut c, zoned("z2", "t", &meta2)).await,
        Code::InvalidArgument,
        &[
            "node.zoned.child",
            "over zoned node \"z\"",
            "cannot be stacked on another zoned node",
        ],
    );
    add_node(&mut c, zoned("z3", "n3", &dir.path().join("z3.zones")))
        .await
        .unwrap();
    assert_status(
        add_node(&mut c, zoned("z2", "z3", &meta2)).await,
        Code::InvalidArgument,
        &["node.zoned.child", "node \"z3\" is zoned"],
    );
    // One metadata file per node, and never an io_uring node's file.
    assert_status(
        add_node(&mut c, zoned("z2", "n2", &dir.path().join("z.zones"))).await,
        Code::AlreadyExists,
        &["node.zoned.metadata_path", "zoned node \"z\""],
    );
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    add_node(
        &mut c,
        NodeSpec {
            name: "f".into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: img.to_str().unwrap().into(),
                direct: false,
                read_only: false,
            })),
        },
    )
    .await
    .unwrap();
    assert_status(
        add_node(&mut c, zoned("z2", "n2", &img)).await,
        Code::AlreadyExists,
        &["node.zoned.metadata_path", "io_uring node \"f\""],
    );
    // The metadata file's directory must exist; the path must not be a directory.
    assert_status(
        add_node(&mut c, zoned("z2", "n2", &dir.path().join("no/z2.zones"))).await,
        Code::InvalidArgument,
        &["node.zoned.metadata_path"],
    );
    assert_status(
        add_node(&mut c, zoned("z2", "n2", dir.path())).await,
        Code::InvalidArgument,
        &["node.zoned.metadata_path", "not a regular file"],
    );
    // At least one zone.
    add_node(&mut c, null("tiny", MIB)).await.unwrap();
    assert_status(
        add_node(&mut c, zoned("z2", "tiny", &meta2)).await,
        Code::InvalidArgument,
        &["node.zoned.zone_size", "no zone"],
    );

    // Raw windows over zoned nodes cover whole zones.
    add_node(&mut c, null("n4", 64 * MIB)).await.unwrap();
    add_node(&mut c, zoned("z4", "n4", &dir.path().join("z4.zones")))
        .await
        .unwrap();
    add_node(&mut c, faults("x4", "z4", 0)).await.unwrap();
    assert_status(
        add_node(&mut c, raw("r4", "x4", 4096, 0)).await,
        Code::InvalidArgument,
        &["node.raw.offset", "zone size 4194304", "\"z4\""],
    );
    assert_status(
        add_node(&mut c, raw("r4", "x4", 4 * MIB, 5 * MIB)).await,
        Code::InvalidArgument,
        &["node.raw.size", "zone size 4194304"],
    );
    let r4 = add_node(&mut c, raw("r4", "x4", 8 * MIB, 0)).await.unwrap();
    assert_eq!(r4.size, 56 * MIB);
    assert_eq!(r4.zones.unwrap().nr_zones, 14);
    // Nested windows keep the rule.
    assert_status(
        add_node(&mut c, raw("r5", "r4", MIB, 0)).await,
        Code::InvalidArgument,
        &["node.raw.offset"],
    );
    // Unaligned windows over regular nodes are fine as before.
    add_node(&mut c, raw("r6", "n2", 4096, 0)).await.unwrap();

    // A removed zoned node frees its metadata path.
    c.nodes
        .remove_node(RemoveNodeRequest { name: "z3".into() })
        .await
        .unwrap();
    add_node(&mut c, zoned("z5", "n3", &dir.path().join("z3.zones")))
        .await
        .unwrap();
    m.stop().await.unwrap();
}

#[tokio::test]
async fn zoned_layout_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    zoned_graph(&mut c, dir.path()).await;
    let base = zoned("z", "n", &dir.path().join("z.zones"));
    let update = |spec: NodeSpec| {
        let mut nodes = c.nodes.clone();
        async move {
            nodes
                .update_node(UpdateNodeRequest { node: Some(spec) })
                .await
                .map(|r| r.into_inner().node.unwrap())
        }
    };
    // The same spec changes nothing.
    let info = update(base.clone()).await.unwrap();
    assert_eq!(info.size, 64 * MIB);
    type Edit = fn(&mut ZonedOptions);
    let edits: [(&str, Edit); 6] = [
        ("node.zoned.child", |o| o.child = "r".into()),
        ("node.zoned.zone_size", |o| o.zone_size = 8 * MIB),
        ("node.zoned.zone_capacity", |o| o.zone_capacity = 2 * MIB),
        ("node.zoned.max_open_zones", |o| o.max_open_zones = 2),
        ("node.zoned.max_active_zones", |o| o.max_active_zones = 16),
        ("node.zoned.metadata_path", |o| {
            o.metadata_path = "/tmp/other.zones".into()
        }),
    ];
    for (field, edit) in edits {
        let mut spec = base.clone();
        edit(zoned_opts(&mut spec));
        assert_status(
            update(spec).await,
            Code::InvalidArgument,
            &[field, "zone layout"],
        );
    }
    // The nodes over a zoned node keep their live options.
    let mut t = throttle("t", "r");
    if let Some(Driver::Throttle(o)) = &mut t.driver {
        o.limits.as_mut().unwrap().iops_total = Some(Bucket { rate: 5, burst: 0 });
    }
    update(t).await.unwrap();

    // No resize in a zoned graph: not the zoned node, nor under or over it.
    for (node, needle) in [
        ("z", "is zoned"),
        ("n", "under zoned node \"z\""),
        ("r", "over zoned node \"z\""),
        ("t", "over zoned node \"z\""),
    ] {
        assert_status(
            c.nodes
                .resize_node(ResizeNodeRequest {
                    name: node.into(),
                    size: 128 * MIB,
                })
                .await,
            Code::FailedPrecondition,
            &["name", needle, "zoned"],
        );
    }
    assert_eq!(get_node(&mut c, "z").await.size, 64 * MIB);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn zoned_nodes_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let m = start(&state, APPLY).await;
    let mut c = connect(&m).await;
    zoned_graph(&mut c, dir.path()).await;
    let mut before = Vec::new();
    for n in ["n", "z", "r", "t"] {
        before.push(get_node(&mut c, n).await);
    }
    drop(c);
    m.stop().await.unwrap();

    let m = start(&state, APPLY).await;
    let mut c = connect(&m).await;
    for b in before {
        let name = b.spec.as_ref().unwrap().name.clone();
        assert_eq!(get_node(&mut c, &name).await, b, "{name}");
    }
    // The rules hold after the restart too.
    assert_status(
        add_node(&mut c, zoned("z2", "t", &dir.path().join("z2.zones"))).await,
        Code::InvalidArgument,
        &["node.zoned.child"],
    );
    m.stop().await.unwrap();
}

// ----- placement -----

#[tokio::test]
async fn zoned_exports_keep_their_queues_together() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(&dir.path().join("state"), APPLY).await;
    let mut c = connect(&m).await;
    let _a = register_worker(&mut c, "wa").await;
    let _b = register_worker(&mut c, "wb").await;
    zoned_graph(&mut c, dir.path()).await;

    let mut e = export("ez", "t", 2);
    e.spread_queues = true;
    assert_status(
        add_export(&mut c, e.clone()).await,
        Code::FailedPrecondition,
        &["export.spread_queues", "node \"z\" is zoned"],
    );
    e.spread_queues = false;
    let info = add_export(&mut c, e).await.unwrap();
    assert_eq!(queue_workers(&info), ["wa", "wa"]);
    assert_eq!(info.size, 56 * MIB);

    // No other export over the same zoned graph, above or below.
    for node in ["z", "n"] {
        assert_status(
            add_export(&mut c, export("e2", node, 1)).await,
            Code::FailedPrecondition,
            &["export.node", "export \"ez\"", "zoned node \"z\""],
        );
    }

    // One queue cannot leave the others.
    assert_status(
        c.workers
            .move_queue(MoveQueueRequest {
                export: "ez".into(),
                queue: 1,
                worker: "wb".into(),
            })
            .await,
        Code::FailedPrecondition,
        &[
            "queue",
            "zoned node \"z\"",
            "queue 0 is on \"wa\"",
            "node move t wb",
        ],
    );
    assert_eq!(workers_of(&mut c, "ez").await, ["wa", "wa"]);
    // MoveNode moves them all.
    let moved = c
        .workers
        .move_node(MoveNodeRequest {
            node: "z".into(),
            worker: "wb".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .moved;
    assert_eq!(moved.len(), 2);
    assert_eq!(workers_of(&mut c, "ez").await, ["wb", "wb"]);

    // Drain: the zoned export goes whole to one worker even when
    // least-loaded-first would split it.
    let _c = register_worker(&mut c, "wc").await;
    add_node(&mut c, null("plain", MIB)).await.unwrap();
    let mut p = export("plain", "plain", 1);
    p.writable = false;
    add_export(&mut c, p).await.unwrap();
    // plain went to wa (0 queues); wa and wc now have 1 and 0.
    let moved = c
        .workers
        .drain_worker(DrainWorkerRequest {
            worker: "wb".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .moved;
    assert_eq!(moved.len(), 2);
    let w = workers_of(&mut c, "ez").await;
    assert_eq!(w[0], w[1], "{w:?}");
    assert_eq!(w[0], "wc");

    // A single-queue zoned export moves with MoveQueue as any other.
    add_node(&mut c, null("n1", 64 * MIB)).await.unwrap();
    add_node(&mut c, zoned("z1", "n1", &dir.path().join("z1.zones")))
        .await
        .unwrap();
    add_export(&mut c, export("e1", "z1", 1)).await.unwrap();
    assert_eq!(workers_of(&mut c, "e1").await, ["wb"]);
    c.workers
        .move_queue(MoveQueueRequest {
            export: "e1".into(),
            queue: 0,
            worker: "wa".into(),
        })
        .await
        .unwrap();
    assert_eq!(workers_of(&mut c, "e1").await, ["wa"]);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn lost_worker_queues_of_a_zoned_export_move_together() {
    let dir = tempfile::tempdir().unwrap();
    let m = start_with(&dir.path().join("state"), APPLY, Duration::from_millis(200)).await;
    let mut c = connect(&m).await;
    let a = register_worker(&mut c, "wa").await;
    zoned_graph(&mut c, dir.path()).await;
    add_export(&mut c, export("ez", "t", 4)).await.unwrap();
    let _b = register_worker(&mut c, "wb").await;
    let _c = register_worker(&mut c, "wc").await;
    drop(a);
    let deadline = Instant::now() + WAIT;
    loop {
        let w = workers_of(&mut c, "ez").await;
        if !w.contains(&"wa".to_string()) {
            assert!(w.iter().all(|x| *x == w[0]), "{w:?}");
            break;
        }
        assert!(Instant::now() < deadline, "queues never reassigned: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.stop().await.unwrap();
}

// ----- ZoneService -----

/// A manager with workers, the zoned graph exported as "ez" over "t" and
/// a plain export "plain".
async fn zone_setup(dir: &Path, apply: Duration) -> (RunningManager, Clients, WorkerSession) {
    let m = start(&dir.join("state"), apply).await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0").await;
    zoned_graph(&mut c, dir).await;
    add_export(&mut c, export("ez", "t", 2)).await.unwrap();
    add_node(&mut c, null("plain", MIB)).await.unwrap();
    add_export(&mut c, export("plain", "plain", 1))
        .await
        .unwrap();
    (m, c, w)
}

#[tokio::test]
async fn report_and_manage_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (m, mut c, _w) = zone_setup(dir.path(), APPLY).await;
    let mut fe = FakeFrontend::start(&c, "fe", true, answering()).await;
    // The frontend serves "ez" once it has reported on it.
    let deadline = Instant::now() + WAIT;
    let r = loop {
        match report(&mut c, "ez", 0, 0).await {
            Ok(r) => break r,
            Err(s) if s.code() == Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    // Refused tries sent nothing: one command, for the call that worked.
    let cmd = fe.next_command().await;
    assert_eq!(
        (cmd.export.as_str(), cmd.offset, cmd.max_zones),
        ("ez", 0, 4096)
    );
    // max_zones 0 = up to 4096; the manager fills in the info the frontend left out.
    assert_eq!(r.zones.len(), 3);
    let info = r.info.unwrap();
    assert_eq!((info.zone_size, info.nr_zones), (4 * MIB, 14));

    let r = report(&mut c, "ez", 9 * MIB, 2).await.unwrap();
    let cmd = fe.next_command().await;
    assert_eq!(
        (cmd.export.as_str(), cmd.action, cmd.offset, cmd.max_zones),
        ("ez", ZoneAction::Unspecified as i32, 9 * MIB, 2)
    );
    assert_eq!(r.zones.len(), 2);
    assert_eq!(r.zones[0].start, 8 * MIB);
    // Capped at 4096.
    report(&mut c, "ez", 0, 100_000).await.unwrap();
    assert_eq!(fe.next_command().await.max_zones, 4096);

    let z = manage(&mut c, "ez", ZoneAction::Open, 8 * MIB)
        .await
        .unwrap();
    let cmd = fe.next_command().await;
    assert_eq!((cmd.action, cmd.offset), (ZoneAction::Open as i32, 8 * MIB));
    let zone = z.zone.unwrap();
    assert_eq!(zone.start, 8 * MIB);
    assert_eq!(zone.condition, ZoneCondition::ExplicitOpen as i32);
    for action in [ZoneAction::Close, ZoneAction::Finish, ZoneAction::Reset] {
        manage(&mut c, "ez", action, 0).await.unwrap();
        assert_eq!(fe.next_command().await.action, action as i32);
    }
    // Reset-all ignores the offset and returns no zone.
    let z = manage(&mut c, "ez", ZoneAction::ResetAll, 12345)
        .await
        .unwrap();
    let cmd = fe.next_command().await;
    assert_eq!((cmd.action, cmd.offset), (ZoneAction::ResetAll as i32, 0));
    assert_eq!(z.zone, None);
    // Request ids are fresh.
    let a = {
        report(&mut c, "ez", 0, 1).await.unwrap();
        fe.next_command().await.id
    };
    let b = {
        report(&mut c, "ez", 0, 1).await.unwrap();
        fe.next_command().await.id
    };
    assert_ne!(a, b);
    drop(fe);
    m.stop().await.unwrap();
}

/// Waits until `fe` serves "ez" (a report goes through, answered by the
/// policy), draining the command it saw.
async fn wait_serving(c: &mut Clients, fe: &mut FakeFrontend) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = manage(c, "ez", ZoneAction::ResetAll, 0).await;
        match r {
            Err(s)
                if s.code() == Code::FailedPrecondition
                    && s.message().contains("no frontend serves") =>
            {
                assert!(Instant::now() < deadline, "frontend never served ez");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => {
                fe.next_command().await;
                return;
            }
        }
    }
}

#[tokio::test]
async fn zone_call_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (m, mut c, _w) = zone_setup(dir.path(), APPLY).await;

    assert_status(
        report(&mut c, "nope", 0, 0).await,
        Code::NotFound,
        &["export", "\"nope\""],
    );
    assert_status(
        manage(&mut c, "nope", ZoneAction::Open, 0).await,
        Code::NotFound,
        &["export", "\"nope\""],
    );
    assert_status(
        report(&mut c, "plain", 0, 0).await,
        Code::FailedPrecondition,
        &["export \"plain\" is not zoned"],
    );
    assert_status(
        manage(&mut c, "ez", ZoneAction::Unspecified, 0).await,
        Code::InvalidArgument,
        &["action"],
    );
    assert_status(
        c.zones
            .manage_zone(ManageZoneRequest {
                export: "ez".into(),
                action: 42,
                offset: 0,
            })
            .await,
        Code::InvalidArgument,
        &["action", "42"],
    );
    assert_status(
        manage(&mut c, "ez", ZoneAction::Open, 4096).await,
        Code::InvalidArgument,
        &["offset", "multiple of the zone size 4194304"],
    );
    // "ez" is 56 MiB.
    assert_status(
        manage(&mut c, "ez", ZoneAction::Finish, 56 * MIB).await,
        Code::InvalidArgument,
        &["offset", "58720256"],
    );
    assert_status(
        report(&mut c, "ez", 56 * MIB, 0).await,
        Code::InvalidArgument,
        &["offset"],
    );
    // No frontend at all, then one that does not serve the export.
    assert_status(
        report(&mut c, "ez", 0, 0).await,
        Code::FailedPrecondition,
        &["no frontend serves export \"ez\""],
    );
    let fe = FakeFrontend::start(&c, "lazy", false, answering()).await;
    assert_status(
        manage(&mut c, "ez", ZoneAction::ResetAll, 0).await,
        Code::FailedPrecondition,
        &["no frontend serves export \"ez\""],
    );
    drop(fe);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn frontend_errnos_map_to_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (m, mut c, _w) = zone_setup(dir.path(), APPLY).await;
    let cases = [
        (libc_errno::EINVAL, Code::InvalidArgument, "EINVAL"),
        (libc_errno::ENOENT, Code::NotFound, "ENOENT"),
        (
            libc_errno::EOPNOTSUPP,
            Code::FailedPrecondition,
            "EOPNOTSUPP",
        ),
        (libc_errno::EBADRQC, Code::FailedPrecondition, "EBADRQC"),
        (
            libc_errno::ETOOMANYREFS,
            Code::FailedPrecondition,
            "ETOOMANYREFS",
        ),
        (libc_errno::EOVERFLOW, Code::FailedPrecondition, "EOVERFLOW"),
        (libc_errno::EIO, Code::Internal, "EIO"),
        (4000, Code::Internal, "errno 4000"),
    ];
    for (i, (errno, code, name)) in cases.into_iter().enumerate() {
        let mut fe = FakeFrontend::start(
            &c,
            &format!("fe{i}"),
            true,
            failing(errno, "the zone model says no"),
        )
        .await;
        wait_serving(&mut c, &mut fe).await;
        assert_status(
            manage(&mut c, "ez", ZoneAction::Open, 0).await,
            code,
            &[
                "export \"ez\"",
                "zone open at offset 0",
                "the zone model says no",
                name,
            ],
        );
        assert_status(
            report(&mut c, "ez", 0, 0).await,
            code,
            &["zone report from offset 0", name],
        );
        drop(fe);
        // Gone: the next frontend reports afresh.
        let deadline = Instant::now() + WAIT;
        loop {
            match report(&mut c, "ez", 0, 0).await {
                Err(s) if s.message().contains("no frontend serves") => break,
                _ => {
                    assert!(Instant::now() < deadline, "frontend fe{i} never left");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    // A wrong kind of answer is the frontend's bug: INTERNAL.
    let mut fe = FakeFrontend::start(
        &c,
        "odd",
        true,
        Arc::new(|cmd: &ZoneCommand| {
            Some(match ZoneAction::try_from(cmd.action).unwrap() {
                ZoneAction::Unspecified => Some(Answer::Zone(Zone::default())),
                ZoneAction::ResetAll => None,
                _ => Some(Answer::Report(ReportZonesResponse::default())),
            })
        }),
    )
    .await;
    wait_serving(&mut c, &mut fe).await;
    assert_status(
        report(&mut c, "ez", 0, 0).await,
        Code::Internal,
        &["a zone"],
    );
    assert_status(
        manage(&mut c, "ez", ZoneAction::Close, 0).await,
        Code::Internal,
        &["a zone report"],
    );
    drop(fe);
    m.stop().await.unwrap();
}

/// Linux errno values the tests send (the manager has its own table).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EBADRQC: i32 = 56;
    pub const EOVERFLOW: i32 = 75;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ETOOMANYREFS: i32 = 109;
}

#[tokio::test]
async fn silent_frontend_times_out_and_late_answers_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let apply = Duration::from_millis(1000);
    let (m, mut c, _w) = zone_setup(dir.path(), apply).await;
    let mut fe = FakeFrontend::start(&c, "fe", true, silent()).await;
    let deadline = Instant::now() + WAIT;
    let started = loop {
        let t = Instant::now();
        match report(&mut c, "ez", 0, 0).await {
            Err(s) if s.code() == Code::FailedPrecondition => {
                assert!(Instant::now() < deadline, "frontend never served ez");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => {
                assert_status(
                    r,
                    Code::Unavailable,
                    &["no answer from frontend \"fe\"", "1000 ms"],
                );
                break t;
            }
        }
    };
    assert!(started.elapsed() >= apply);
    let cmd = fe.next_command().await;
    // Answering now, too late: ignored. So are unknown ids; the session
    // goes on.
    let answer = |id: u64| ZoneAnswer {
        id,
        result: Some(Answer::Zone(Zone::default())),
    };
    fe.answer(answer(cmd.id));
    fe.answer(answer(999_999));

    // An answer from another frontend than the one asked does not count.
    let mut zones = c.zones.clone();
    let call = tokio::spawn(async move {
        zones
            .manage_zone(ManageZoneRequest {
                export: "ez".into(),
                action: ZoneAction::Open as i32,
                offset: 0,
            })
            .await
    });
    let cmd = fe.next_command().await;
    let other = FakeFrontend::start(&c, "other", false, silent()).await;
    other.answer(answer(cmd.id));
    assert_status(call.await.unwrap(), Code::Unavailable, &["no answer"]);

    // The right answer in time goes through.
    let mut zones = c.zones.clone();
    let call = tokio::spawn(async move {
        zones
            .manage_zone(ManageZoneRequest {
                export: "ez".into(),
                action: ZoneAction::Open as i32,
                offset: 4 * MIB,
            })
            .await
    });
    let cmd = fe.next_command().await;
    let mut done = answer(cmd.id);
    done.result = Some(Answer::Zone(zone(
        4 * MIB,
        4 * MIB,
        ZoneCondition::ExplicitOpen,
    )));
    fe.answer(done);
    let z = call.await.unwrap().unwrap().into_inner().zone.unwrap();
    assert_eq!(z.start, 4 * MIB);
    drop(fe);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn frontend_leaving_fails_its_calls_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A long timeout: the call must not wait for it.
    let (m, mut c, _w) = zone_setup(dir.path(), Duration::from_secs(30)).await;
    let mut fe = FakeFrontend::start(&c, "fe", true, silent()).await;
    let deadline = Instant::now() + WAIT;
    loop {
        // Wait for the report on "ez" without sending a command: list its state.
        let e = exports(&mut c)
            .await
            .into_iter()
            .find(|e| e.export.as_ref().unwrap().id == "ez")
            .unwrap();
        if e.state == ExportState::Serving as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "ez never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut zones = c.zones.clone();
    let call = tokio::spawn(async move {
        zones
            .report_zones(ReportZonesRequest {
                export: "ez".into(),
                offset: 0,
                max_zones: 0,
            })
            .await
    });
    fe.next_command().await;
    let t = Instant::now();
    drop(fe);
    let r = within("the call to fail", call).await.unwrap();
    assert_status(r, Code::Unavailable, &["frontend \"fe\" went away"]);
    assert!(t.elapsed() < Duration::from_secs(10));
    m.stop().await.unwrap();
}
