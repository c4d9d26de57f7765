//! Placement: queues spread over workers and moved between them live,
//! under verified load. Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};

const MIB: u64 = 1 << 20;

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn verify(cluster: &Cluster, socket: &Path, queues: &str, seconds: &str) -> Output {
    cluster.run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--queues",
            queues,
            "--timeout",
            "30",
            "verify",
            "--size",
            "32M",
            "--seconds",
            seconds,
            "--bs-max",
            "128k",
        ],
    )
}

fn workers_of(cluster: &Cluster, export: &str) -> Vec<String> {
    let exports = cluster.list_exports().unwrap();
    let e = exports
        .iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == export))
        .unwrap();
    let mut q = e.queues.clone();
    q.sort_by_key(|a| a.queue);
    q.into_iter().map(|a| a.worker).collect()
}

#[test]
fn spread_queues_run_on_two_workers_under_verified_load() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("spread.img", 32 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2).spread())
        .unwrap();
    let w = workers_of(&cluster, "d");
    assert_ne!(w[0], w[1], "queues should be on different workers: {w:?}");
    let out = verify(&cluster, &socket, "2", "2");
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 errors, 0 mismatches"));
}

#[test]
fn queues_move_between_workers_live_without_errors() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("move.img", 32 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2))
        .unwrap();
    let start = workers_of(&cluster, "d");
    assert_eq!(start[0], start[1]);
    let other = if start[0] == "worker0" {
        "worker1"
    } else {
        "worker0"
    };
    let home = start[0].clone();
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&cluster, &socket, "2", "5"));
        // Let the load start, then move each queue away and one back.
        std::thread::sleep(Duration::from_millis(1000));
        for (q, to) in [("1", other), ("0", other), ("1", home.as_str())] {
            let m = cluster.ctl(["worker", "move-queue", "d", q, to]);
            assert!(m.status.success(), "move {q} to {to}: {m:?}");
            std::thread::sleep(Duration::from_millis(700));
        }
        load.join().unwrap()
    });
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 errors, 0 mismatches"), "{stdout}");
    assert_eq!(workers_of(&cluster, "d"), vec![other.to_string(), home]);
}

#[test]
fn draining_a_worker_moves_its_queues_live() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("drain.img", 32 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2))
        .unwrap();
    let from = workers_of(&cluster, "d")[0].clone();
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&cluster, &socket, "2", "3"));
        std::thread::sleep(Duration::from_millis(1000));
        let d = cluster.ctl(["worker", "drain", &from]);
        assert!(d.status.success(), "{d:?}");
        load.join().unwrap()
    });
    assert!(out.status.success(), "{}", text(&out));
    assert!(workers_of(&cluster, "d").iter().all(|w| *w != from));
}

#[test]
fn moving_a_node_moves_its_exports_queues_live() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("node.img", 32 * MIB);
    cluster.add_io_uring("base", &image, false, false).unwrap();
    cluster.add_raw("win", "base", 0, 32 * MIB).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "win").writable().queues(2))
        .unwrap();
    let from = workers_of(&cluster, "d")[0].clone();
    let to = if from == "worker0" {
        "worker1"
    } else {
        "worker0"
    };
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&cluster, &socket, "2", "3"));
        std::thread::sleep(Duration::from_millis(1000));
        let m = cluster.ctl(["node", "move", "base", to]);
        assert!(m.status.success(), "{m:?}");
        load.join().unwrap()
    });
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        workers_of(&cluster, "d"),
        vec![to.to_string(), to.to_string()]
    );
}
