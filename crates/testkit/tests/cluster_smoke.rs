//! Starts the real processes: build them first with `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::time::Duration;

use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts, WorkerState};

#[test]
fn cluster_serves_null_export_and_sees_killed_worker_gone() {
    let mut cluster = Cluster::start(ClusterOptions::default());

    let workers = cluster.list_workers().unwrap();
    let mut alive: Vec<&str> = workers
        .iter()
        .filter(|w| w.state == WorkerState::Alive as i32)
        .map(|w| w.name.as_str())
        .collect();
    alive.sort_unstable();
    assert_eq!(alive, ["worker0", "worker1"]);

    let node = cluster.add_null("null0", 64 << 20).unwrap();
    assert_eq!(node.size, 64 << 20);
    let socket = cluster
        .add_export(ExportOpts::new("disk0", "null0").writable().queues(2))
        .unwrap();
    assert_eq!(socket, cluster.run_dir().join("disk0.sock"));
    assert!(socket.exists());
    let exports = cluster.list_exports().unwrap();
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].queues.len(), 2);

    cluster.kill_worker(1);
    assert_eq!(cluster.worker_pid(1), None);
    let workers = cluster
        .wait_workers(&["worker1"], WorkerState::Gone, Duration::from_secs(10))
        .unwrap();
    let w0 = workers.iter().find(|w| w.name == "worker0").unwrap();
    assert_eq!(w0.state, WorkerState::Alive as i32);
}

#[test]
fn export_without_node_is_not_found_and_ctl_reaches_manager() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let err = cluster
        .add_export(ExportOpts::new("disk0", "missing"))
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    let out = cluster.ctl(["worker", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("worker0"),
        "{out:?}"
    );
}

#[test]
fn restarted_manager_keeps_state_and_workers_reregister() {
    let mut cluster = Cluster::start(ClusterOptions::default().workers(1).frontend(false));
    cluster.add_null("null0", 1 << 20).unwrap();
    let addr = cluster.manager_addr();
    cluster.restart_manager();
    assert_eq!(cluster.manager_addr(), addr);
    let nodes = cluster.client().list_nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].spec.as_ref().unwrap().name, "null0");
}
