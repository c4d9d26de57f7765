//! The configuration file (`--config`) against a real manager in-process:
//! a fresh start applies it, a restart with the same file changes nothing,
//! live-changeable differences are applied live, others stop the start with
//! the located error, pruning, and exports waiting for the first worker.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::PathBuf;
use std::time::Duration;

use blkmesh_manager::{Manager, ManagerConfig, ManagerError, RunningManager, STATE_FILE};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendEventKind;
use blkmesh_proto::agent::v1::WorkerHello;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::*;
use tonic::Code;

mod common;
use common::agent::{FrontendSession, WorkerSession};
use common::client::{connect, within, Clients};

/// A state directory, a directory for images and sockets, and the
/// configuration file.
struct Setup {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    files: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let files = tmp.path().join("files");
        let config = tmp.path().join("blkmesh.toml");
        Setup {
            state,
            files,
            config,
            _tmp: tmp,
        }
    }

    /// Writes the configuration file; `{files}` stands for the files directory.
    fn write(&self, text: &str) {
        let text = text.replace("{files}", self.files.to_str().unwrap());
        std::fs::write(&self.config, text).unwrap();
    }

    fn manager_config(&self, prune: bool) -> ManagerConfig {
        ManagerConfig::new(self.state.clone())
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_apply_timeout(Duration::from_millis(500))
            .with_config(self.config.clone(), prune)
    }

    async fn start(&self) -> RunningManager {
        self.start_with(false).await
    }

    async fn start_with(&self, prune: bool) -> RunningManager {
        match Manager::bind(self.manager_config(prune)).await {
            Ok(m) => m.spawn(),
            Err(e) => panic!("manager did not start: {e}"),
        }
    }

    /// Starts the manager without a configuration file.
    async fn start_plain(&self) -> RunningManager {
        let config = ManagerConfig::new(self.state.clone())
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_apply_timeout(Duration::from_millis(500));
        Manager::bind(config).await.unwrap().spawn()
    }

    /// The start's error, which must be a configuration error.
    async fn refused(&self) -> String {
        match Manager::bind(self.manager_config(false)).await {
            Ok(_) => panic!("the manager started"),
            Err(e @ ManagerError::Config { .. }) => e.to_string(),
            Err(e) => panic!("not a configuration error: {e}"),
        }
    }

    fn state_text(&self) -> String {
        std::fs::read_to_string(self.state.join(STATE_FILE)).unwrap_or_default()
    }

    fn state_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.state_text()).unwrap()
    }
}

/// The object named `name` in the state file's `nodes` or `exports`.
fn entry<'a>(v: &'a serde_json::Value, list: &str, key: &str, name: &str) -> &'a serde_json::Value {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        // The API's object is the entry's `spec` (nodes) or `export`.
        .find(|n| n["spec"][key] == name || n["export"][key] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}: {v:#}"))
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

async fn list_exports(c: &mut Clients) -> Vec<ExportInfo> {
    c.exports
        .list_exports(ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports
}

async fn export_info(c: &mut Clients, id: &str) -> ExportInfo {
    list_exports(c)
        .await
        .into_iter()
        .find(|e| e.export.as_ref().unwrap().id == id)
        .unwrap_or_else(|| panic!("export {id} not listed"))
}

async fn node(c: &mut Clients, name: &str) -> NodeInfo {
    c.nodes
        .get_node(GetNodeRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap()
}

/// Polls until export `id` has its queues placed.
async fn wait_placed(c: &mut Clients, id: &str) -> ExportInfo {
    within("the export to be placed", async {
        loop {
            let e = export_info(c, id).await;
            if !e.queues.is_empty() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The first plan a newly registered frontend gets for export `id`.
async fn plan_of(c: &mut Clients, id: &str) -> ExportPlan {
    let mut fe = FrontendSession::open(&mut c.agents, "fe-test")
        .await
        .unwrap();
    within("the plan", async {
        loop {
            if let FrontendEventKind::Upsert(plan) = fe.next().await {
                if plan.export.as_ref().unwrap().id == id {
                    return plan;
                }
            }
        }
    })
    .await
}

fn limits_of(spec: &NodeSpec) -> ThrottleLimits {
    match &spec.driver {
        Some(Driver::Throttle(o)) => o.limits.unwrap(),
        other => panic!("not a throttle: {other:?}"),
    }
}

/// An io_uring node with `create`, a throttle over it, a null node with a
/// raw window and an export of the throttle.
const BASE: &str = r#"
[[node]]
name = "disk0"
io_uring = { path = "{files}/images/disk0.img" }
create = { size = "8M" }

[[node]]
name = "slow"
throttle = { child = "disk0", iops = 5000, bps = "200M", group = "tenant1" }

[[node]]
name = "zero"
null = { size = "64M" }

[[node]]
name = "win"
raw = { child = "zero", offset = "1M", size = "16M" }

[[export]]
id = "disk0"
node = "slow"
socket = "{files}/disk0.sock"
writable = true
num_queues = 2
"#;

#[tokio::test]
async fn fresh_start_applies_the_file_and_exports_wait_for_a_worker() {
    let s = Setup::new();
    s.write(BASE);
    let m = s.start().await;
    let mut c = connect(&m).await;

    // The image was created, sparse, with its directory.
    let img = s.files.join("images/disk0.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 8 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 8 << 20, "not sparse");

    assert_eq!(node(&mut c, "disk0").await.size, 8 << 20);
    assert_eq!(node(&mut c, "slow").await.size, 8 << 20);
    assert_eq!(node(&mut c, "win").await.size, 16 << 20);
    let slow = node(&mut c, "slow").await.spec.unwrap();
    let l = limits_of(&slow);
    assert_eq!(
        l.iops_total,
        Some(Bucket {
            rate: 5000,
            burst: 0
        })
    );
    assert_eq!(
        l.bps_total,
        Some(Bucket {
            rate: 200 << 20,
            burst: 0
        })
    );

    // No worker yet: the export waits, listed as PENDING.
    let e = export_info(&mut c, "disk0").await;
    assert_eq!(e.state, ExportState::Pending as i32);
    assert!(e.queues.is_empty());
    assert!(e.message.contains("waiting for a worker"), "{}", e.message);
    assert_eq!(e.export.as_ref().unwrap().num_queues, 2);
    let json = s.state_json();
    assert!(json["exports"].as_array().unwrap().is_empty(), "{json:#}");
    for n in ["disk0", "slow", "zero", "win"] {
        assert_eq!(entry(&json, "nodes", "name", n)["managed_by_config"], true);
    }

    // While it waits, the API cannot take its socket, id or node, nor
    // remove its node.
    let taken = c
        .exports
        .add_export(AddExportRequest {
            export: Some(VhostUserBlkExport {
                id: "other".into(),
                node: "win".into(),
                socket: s.files.join("disk0.sock").to_str().unwrap().into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{}", taken.message());
    assert!(
        taken.message().contains("waiting for a worker"),
        "{}",
        taken.message()
    );
    let in_use = c
        .nodes
        .remove_node(RemoveNodeRequest {
            name: "slow".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert!(
        in_use.message().contains("export \"disk0\""),
        "{}",
        in_use.message()
    );

    // The first worker to register takes it.
    let _w = register_worker(&mut c, "w0").await;
    let e = wait_placed(&mut c, "disk0").await;
    let workers: Vec<&str> = e.queues.iter().map(|q| q.worker.as_str()).collect();
    assert_eq!(workers, ["w0", "w0"]);
    assert_eq!(e.size, 8 << 20);
    let json = s.state_json();
    let export = entry(&json, "exports", "id", "disk0");
    assert_eq!(export["managed_by_config"], true);
    assert_eq!(export["generation"], 1);
    // The API's own objects carry no mark.
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(NodeSpec {
                name: "api".into(),
                driver: Some(Driver::Null(NullOptions {
                    size: 1 << 20,
                    latency_ns: 0,
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let json = s.state_json();
    assert!(entry(&json, "nodes", "name", "api")
        .get("managed_by_config")
        .is_none());
    m.stop().await.unwrap();
}

#[tokio::test]
async fn restart_with_the_same_file_changes_nothing() {
    let s = Setup::new();
    s.write(BASE);
    let m = s.start().await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0").await;
    wait_placed(&mut c, "disk0").await;
    drop(w);
    m.stop().await.unwrap();
    let before = s.state_text();
    let img = s.files.join("images/disk0.img");
    // Data written to the image must survive: it is not created again.
    std::fs::write(&img, vec![7u8; 4096]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mtime = std::fs::metadata(s.state.join(STATE_FILE))
        .unwrap()
        .modified()
        .unwrap();

    for _ in 0..2 {
        let m = s.start().await;
        let mut c = connect(&m).await;
        assert_eq!(s.state_text(), before, "state.json changed");
        let plan = plan_of(&mut c, "disk0").await;
        assert_eq!(plan.generation, 1);
        // Placed, so nothing waits for a worker.
        assert!(!export_info(&mut c, "disk0").await.queues.is_empty());
        m.stop().await.unwrap();
    }
    assert_eq!(s.state_text(), before);
    assert_eq!(
        std::fs::metadata(s.state.join(STATE_FILE))
            .unwrap()
            .modified()
            .unwrap(),
        mtime,
        "state.json was rewritten"
    );
    assert_eq!(&std::fs::read(&img).unwrap()[..4096], &[7u8; 4096][..]);
}

#[tokio::test]
async fn changed_options_are_applied_live() {
    let s = Setup::new();
    // A second member of the throttle group, added through the API later.
    s.write(BASE);
    let m = s.start().await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0").await;
    wait_placed(&mut c, "disk0").await;
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(NodeSpec {
                name: "slow2".into(),
                driver: Some(Driver::Throttle(ThrottleOptions {
                    child: "win".into(),
                    limits: Some(ThrottleLimits {
                        iops_total: Some(Bucket {
                            rate: 5000,
                            burst: 0,
                        }),
                        bps_total: Some(Bucket {
                            rate: 200 << 20,
                            burst: 0,
                        }),
                        ..Default::default()
                    }),
                    group: "tenant1".into(),
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(w);
    m.stop().await.unwrap();

    // New limits, a null node grown, a raw window grown.
    s.write(
        &BASE
            .replace("iops = 5000", "iops = 2000, iops_burst = 4000")
            .replace("size = \"64M\"", "size = \"128M\"")
            .replace("size = \"16M\"", "size = \"32M\""),
    );
    let m = s.start().await;
    let mut c = connect(&m).await;
    let l = limits_of(&node(&mut c, "slow").await.spec.unwrap());
    assert_eq!(
        l.iops_total,
        Some(Bucket {
            rate: 2000,
            burst: 4000
        })
    );
    // The whole group changes, as UpdateNode does.
    let l2 = limits_of(&node(&mut c, "slow2").await.spec.unwrap());
    assert_eq!(l2.iops_total, l.iops_total);
    assert_eq!(node(&mut c, "zero").await.size, 128 << 20);
    assert_eq!(node(&mut c, "win").await.size, 32 << 20);
    // The export's plan has a new generation: its frontend reopens it live.
    let plan = plan_of(&mut c, "disk0").await;
    assert_eq!(plan.generation, 2);
    let slow = plan.nodes.iter().find(|n| n.name == "slow").unwrap();
    assert_eq!(limits_of(slow).iops_total.unwrap().rate, 2000);
    // Same queues, same workers.
    let e = export_info(&mut c, "disk0").await;
    assert_eq!(e.queues.len(), 2);
    m.stop().await.unwrap();

    // And again: nothing more changes.
    let before = s.state_text();
    let m = s.start().await;
    assert_eq!(s.state_text(), before);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn incompatible_changes_stop_the_start_with_the_located_error() {
    let s = Setup::new();
    s.write(BASE);
    let m = s.start().await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0").await;
    wait_placed(&mut c, "disk0").await;
    drop(w);
    m.stop().await.unwrap();
    let before = s.state_text();

    let cases: [(&str, &str, &str, &str); 6] = [
        (
            "images/disk0.img",
            "images/other.img",
            "node[0].io_uring.path",
            "cannot change live (is \"",
        ),
        (
            "group = \"tenant1\"",
            "group = \"tenant2\"",
            "node[1].throttle.group",
            "cannot change live (is \"tenant1\", the file says \"tenant2\")",
        ),
        (
            "size = \"64M\"",
            "size = \"32M\"",
            "node[2].null.size",
            "it can only grow (the file says 33554432)",
        ),
        (
            "size = \"16M\" }",
            "size = 0 }",
            "node[3].raw.size",
            "cannot change live (is 16777216, the file says 0;",
        ),
        (
            "num_queues = 2",
            "num_queues = 4",
            "export[0].num_queues",
            "cannot change live (is 2, the file says 4)",
        ),
        (
            "node = \"slow\"",
            "node = \"win\"",
            "export[0].node",
            "cannot change live (is \"slow\", the file says \"win\")",
        ),
    ];
    for (from, to, field, needle) in cases {
        let text = BASE.replace(from, to);
        s.write(&text);
        let e = s.refused().await;
        let line = text
            .replace("{files}", s.files.to_str().unwrap())
            .lines()
            .position(|l| l.contains(to))
            .unwrap()
            + 1;
        let file = s.config.display().to_string();
        assert!(
            e.contains(&format!("{file}:{line}:")),
            "{from} -> {to}: no {file}:{line}: in {e}"
        );
        assert!(e.contains(&format!(": {field}: ")), "{field} not in {e}");
        assert!(e.contains(needle), "{needle:?} not in {e}");
        assert!(
            e.contains("first (start the manager without --config and run `blkmeshctl "),
            "no hint in {e}"
        );
        assert_eq!(s.state_text(), before, "state changed by a refused start");
    }

    // Read-only under the file's own writable export: the file contradicts
    // itself.
    let text = BASE.replace("disk0.img\" }", "disk0.img\", read_only = true }");
    s.write(&text);
    let e = s.refused().await;
    assert!(
        e.contains(":23:12: export[0].writable: node \"slow\" is read-only"),
        "{e}"
    );
    assert_eq!(s.state_text(), before);

    // A file with a plain error is refused before anything else, too.
    s.write(&BASE.replace("iops = 5000", "iops = \"many\""));
    let e = s.refused().await;
    assert!(
        e.contains("node[1].throttle.iops: expected an integer"),
        "{e}"
    );
    // The state is intact: the original file still applies.
    s.write(BASE);
    let m = s.start().await;
    m.stop().await.unwrap();
    assert_eq!(s.state_text(), before);
}

#[tokio::test]
async fn what_the_file_does_not_name_is_kept_or_pruned() {
    let s = Setup::new();
    s.write(BASE);
    let m = s.start().await;
    let mut c = connect(&m).await;
    let w = register_worker(&mut c, "w0").await;
    wait_placed(&mut c, "disk0").await;
    // An object of the API: a node and an export over it.
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(NodeSpec {
                name: "api".into(),
                driver: Some(Driver::Null(NullOptions {
                    size: 1 << 20,
                    latency_ns: 0,
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    c.exports
        .add_export(AddExportRequest {
            export: Some(VhostUserBlkExport {
                id: "api".into(),
                node: "api".into(),
                socket: "/tmp/api.sock".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    drop(w);
    m.stop().await.unwrap();

    // A file without the raw window and its null node: kept, still marked.
    let smaller = BASE.replace(
        "[[node]]\nname = \"zero\"\nnull = { size = \"64M\" }\n\n[[node]]\nname = \"win\"\nraw = { child = \"zero\", offset = \"1M\", size = \"16M\" }\n",
        "",
    );
    assert!(!smaller.contains("zero"));
    s.write(&smaller);
    let before = s.state_text();
    let m = s.start().await;
    m.stop().await.unwrap();
    assert_eq!(s.state_text(), before, "kept objects changed the state");
    let json = s.state_json();
    assert_eq!(
        entry(&json, "nodes", "name", "win")["managed_by_config"],
        true
    );
    assert!(entry(&json, "nodes", "name", "api")
        .get("managed_by_config")
        .is_none());

    // --config-prune removes them all, exports first.
    let m = s.start_with(true).await;
    let mut c = connect(&m).await;
    let ids: Vec<String> = list_exports(&mut c)
        .await
        .into_iter()
        .map(|e| e.export.unwrap().id)
        .collect();
    assert_eq!(ids, ["disk0"]);
    let names: Vec<String> = c
        .nodes
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.spec.unwrap().name)
        .collect();
    assert_eq!(names, ["disk0", "slow"]);
    m.stop().await.unwrap();
    // The worker known from earlier runs stays.
    let json = s.state_json();
    assert_eq!(json["workers"].as_array().unwrap().len(), 1);

    // Without --config, the marks stay and nothing changes.
    let before = s.state_text();
    let m = s.start_plain().await;
    m.stop().await.unwrap();
    assert_eq!(s.state_text(), before);
}

#[tokio::test]
async fn file_objects_removed_through_the_api_come_back_at_the_next_start() {
    let s = Setup::new();
    s.write(BASE);
    let m = s.start().await;
    let mut c = connect(&m).await;
    // Removing a waiting export takes it off the queue.
    c.exports
        .remove_export(RemoveExportRequest { id: "disk0".into() })
        .await
        .unwrap();
    assert!(list_exports(&mut c).await.is_empty());
    let _w = register_worker(&mut c, "w0").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(list_exports(&mut c).await.is_empty());
    c.nodes
        .remove_node(RemoveNodeRequest { name: "win".into() })
        .await
        .unwrap();
    let json = s.state_json();
    assert!(json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["spec"]["name"] != "win"));
    m.stop().await.unwrap();

    let m = s.start().await;
    let mut c = connect(&m).await;
    assert_eq!(node(&mut c, "win").await.size, 16 << 20);
    let _w = register_worker(&mut c, "w0").await;
    wait_placed(&mut c, "disk0").await;
    m.stop().await.unwrap();
}

#[tokio::test]
async fn state_conflicts_are_located_too() {
    let s = Setup::new();
    // Through the API first: an export on the file's socket, and a node
    // using the file's null node as its child.
    std::fs::create_dir_all(&s.state).unwrap();
    let m = s.start_plain().await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c, "w0").await;
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(NodeSpec {
                name: "zero".into(),
                driver: Some(Driver::Null(NullOptions {
                    size: 64 << 20,
                    latency_ns: 0,
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    c.nodes
        .add_node(AddNodeRequest {
            node: Some(NodeSpec {
                name: "api-window".into(),
                driver: Some(Driver::Raw(RawOptions {
                    child: "zero".into(),
                    offset: 0,
                    size: 0,
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    c.exports
        .add_export(AddExportRequest {
            export: Some(VhostUserBlkExport {
                id: "api".into(),
                node: "api-window".into(),
                socket: s.files.join("disk0.sock").to_str().unwrap().into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    m.stop().await.unwrap();

    s.write(BASE);
    let before = s.state_text();
    let e = s.refused().await;
    assert!(
        e.contains("node[3].raw.child: node \"zero\" is already the child of node \"api-window\""),
        "{e}"
    );
    assert!(
        e.contains("export[0].socket: socket ") && e.contains("is already used by export \"api\""),
        "{e}"
    );
    assert_eq!(s.state_text(), before);
    // The image planned for creation was not created.
    assert!(!s.files.join("images/disk0.img").exists());
    // Pruning first removes what is in the way.
    let m = s.start_with(true).await;
    m.stop().await.unwrap();
    let json = s.state_json();
    assert!(json["exports"].as_array().unwrap().is_empty());
    assert!(json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["spec"]["name"] != "api-window"));
}

#[tokio::test]
async fn the_file_is_checked_on_its_own_before_the_state() {
    // Two members of a throttle group, then new limits that disagree: applied
    // one by one as UpdateNode, the last would win; the file is refused.
    let s = Setup::new();
    let group = r#"
[[node]]
name = "a"
null = { size = "1M" }

[[node]]
name = "b"
null = { size = "1M" }

[[node]]
name = "ta"
throttle = { child = "a", iops = 10, group = "g" }

[[node]]
name = "tb"
throttle = { child = "b", iops = 10, group = "g" }
"#;
    s.write(group);
    let m = s.start().await;
    m.stop().await.unwrap();
    let before = s.state_text();
    s.write(
        &group
            .replacen("iops = 10", "iops = 20", 1)
            .replacen("iops = 10", "iops = 30", 1),
    );
    let e = s.refused().await;
    assert!(
        e.contains(":16:12: node[3].throttle: node \"tb\" has other limits than node \"ta\""),
        "{e}"
    );
    assert_eq!(s.state_text(), before);
}

#[tokio::test]
async fn read_only_under_an_api_export_is_refused_as_update_node_would() {
    let s = Setup::new();
    let file = "[[node]]\nname = \"f\"\nio_uring = { path = \"{files}/f.img\" }\ncreate = { size = \"1M\" }\n";
    s.write(file);
    let m = s.start().await;
    let mut c = connect(&m).await;
    let _w = register_worker(&mut c, "w0").await;
    c.exports
        .add_export(AddExportRequest {
            export: Some(VhostUserBlkExport {
                id: "api".into(),
                node: "f".into(),
                socket: "/tmp/api-f.sock".into(),
                writable: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    m.stop().await.unwrap();
    let before = s.state_text();
    s.write(&file.replace(".img\" }", ".img\", read_only = true }"));
    let e = s.refused().await;
    // At the value of read_only (after the path, whose length varies).
    let line = format!(
        "io_uring = {{ path = \"{}/f.img\", read_only = true }}",
        s.files.display()
    );
    let col = line.find("true").unwrap() + 1;
    assert!(
        e.contains(&format!(
            ":3:{col}: node[0].io_uring.read_only: writable export \"api\" is over node \"f\", \
             which would become read-only"
        )),
        "{e}"
    );
    assert_eq!(s.state_text(), before);
}

#[tokio::test]
async fn missing_files_without_create_are_refused_with_a_hint() {
    let s = Setup::new();
    s.write(&BASE.replace("create = { size = \"8M\" }\n", ""));
    let e = s.refused().await;
    assert!(e.contains(":4:21: node[0].io_uring.path: "), "{e}");
    assert!(e.contains("does not exist (add `create = { size"), "{e}");
    assert!(!s.state.join(STATE_FILE).exists());
}

/// Runs the real binary.
fn manager_bin(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_blkmesh-manager"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_binary_exits_2_with_every_located_error() {
    let s = Setup::new();
    s.write(
        &BASE
            .replace("bps = \"200M\"", "bps = \"200X\"")
            .replace("num_queues = 2", "num_queues = 2\nspread = true"),
    );
    let out = manager_bin(&[
        "--state-dir".as_ref(),
        s.state.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--config".as_ref(),
        s.config.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = s.config.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:9:50: node[1].throttle.bps: unknown size suffix 'X'"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}:25:1: export[0].spread: unknown key")),
        "{stderr}"
    );
    assert!(stderr.contains("the manager did not start"), "{stderr}");
    assert!(!s.state.join(STATE_FILE).exists());

    // $BLKMESH_CONFIG works as --config, and --config-prune needs it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkmesh-manager"))
        .args([
            "--state-dir",
            s.state.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("BLKMESH_CONFIG", &s.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("throttle.bps"));
    let out = manager_bin(&[
        "--state-dir".as_ref(),
        s.state.as_os_str(),
        "--config-prune".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    // An empty $BLKMESH_CONFIG is no file at all (compose's way to turn its
    // default off), so --config-prune still has nothing to prune by.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blkmesh-manager"))
        .args(["--state-dir", s.state.to_str().unwrap(), "--config-prune"])
        .env("BLKMESH_CONFIG", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--config-prune needs a configuration file"),
        "{stderr}"
    );
}
