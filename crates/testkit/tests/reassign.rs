//! A worker that dies and stays dead: after the manager's grace its queues
//! move to a live worker, live, under verified load, with no failed request.
//! Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use blkmesh_testkit::{run_tool, Cluster, ClusterOptions, ExportOpts, WorkerState};

const MIB: u64 = 1 << 20;
/// The manager's `--worker-grace-ms` here (default 3000; shorter keeps the
/// test quick while leaving the load plenty to do after the move).
const GRACE_MS: u64 = 1000;

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn verify(socket: &Path) -> Output {
    run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--queues",
            "2",
            "--timeout",
            "60",
            "verify",
            "--size",
            "16M",
            "--seconds",
            "6",
            "--bs-max",
            "64k",
        ],
    )
}

fn queue_workers(cluster: &Cluster, id: &str) -> Vec<String> {
    cluster
        .list_exports()
        .unwrap()
        .into_iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == id))
        .unwrap_or_else(|| panic!("no export {id}"))
        .queues
        .into_iter()
        .map(|q| q.worker)
        .collect()
}

#[test]
fn a_dead_worker_s_queues_move_to_a_live_one_without_errors() {
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .workers(2)
            .worker_grace_ms(GRACE_MS),
    );
    let image = cluster.sparse_image("reassign.img", 16 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2))
        .unwrap();
    assert_eq!(
        queue_workers(&cluster, "d"),
        ["worker0", "worker0"],
        "tie → name order"
    );

    let moved_after = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&socket));
        std::thread::sleep(Duration::from_millis(1500));
        // Taken before the kill: `kill_worker` also reaps the process, and
        // the manager may see the registration end before the reap returns.
        let killed_at = Instant::now();
        cluster.kill_worker(0);
        // Not restarted: the manager has to move the queues, and not before
        // the grace has passed. Watch for the move while the load runs.
        let deadline = killed_at + Duration::from_millis(GRACE_MS) + Duration::from_secs(10);
        let moved_after = loop {
            if queue_workers(&cluster, "d") == ["worker1", "worker1"] {
                break killed_at.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the queues did not move within the grace + 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = load.join().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("0 errors, 0 mismatches"), "{}", text(&out));
        moved_after
    });

    assert_eq!(cluster.worker_pid(0), None, "worker0 stays dead");
    let workers = cluster
        .wait_workers(&["worker0"], WorkerState::Gone, Duration::from_secs(5))
        .unwrap();
    let w1 = workers.iter().find(|w| w.name == "worker1").unwrap();
    assert_eq!(w1.state, WorkerState::Alive as i32);
    assert_eq!(w1.queues, ["d/0", "d/1"]);
    assert_eq!(queue_workers(&cluster, "d"), ["worker1", "worker1"]);
    // The grace counts from when the manager saw the registration end,
    // which is after the kill: an earlier move ignored the grace.
    assert!(
        moved_after >= Duration::from_millis(GRACE_MS),
        "queues moved {moved_after:?} after the kill, before the {GRACE_MS} ms grace"
    );

    let log = std::fs::read_to_string(cluster.log_path("manager")).unwrap();
    assert!(
        log.contains("queue reassigned from a lost worker"),
        "no reassignment logged"
    );
    // And the disk still reads back what was written, through worker1 only.
    let out = run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}
