//! Worker failure under verified load: a worker killed (or hung and then
//! fenced) costs the guest latency, never an error or a lost write. The
//! processes run under their seccomp filters (`BLKMESH_SECCOMP=enforce`),
//! as deployed.
//! Build the binaries first: `cargo build --bins`.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use blkmesh_testkit::{run_tool, Cluster, ClusterOptions, ExportOpts};

const MIB: u64 = 1 << 20;

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn verify(socket: &Path, seconds: &str) -> Output {
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
            seconds,
            "--bs-max",
            "64k",
        ],
    )
}

/// The `resubmitted` counts of the frontend's "queue moved to a replacement
/// worker" lines: requests that were in flight on the lost worker and went
/// to its replacement.
fn resubmitted(cluster: &Cluster) -> Vec<u64> {
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    log.lines()
        .filter(|l| l.contains("queue moved to a replacement worker"))
        .filter_map(|l| {
            let rest = &l[l.find("resubmitted=")? + "resubmitted=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// At least one move resubmitted requests: the failure really hit requests
/// in flight (else the test proved nothing about them).
fn assert_resubmitted(cluster: &Cluster) {
    let counts = resubmitted(cluster);
    assert!(
        counts.iter().any(|&n| n > 0),
        "no request was in flight and resubmitted when the worker went away \
         (resubmitted counts of the queue moves: {counts:?})"
    );
}

fn assert_clean(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 errors, 0 mismatches"), "{}", text(out));
}

#[test]
fn a_killed_worker_costs_latency_not_errors() {
    let mut cluster = Cluster::start(ClusterOptions::default().workers(1).seccomp_enforce());
    let image = cluster.sparse_image("kill.img", 16 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2))
        .unwrap();
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&socket, "6"));
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(1500));
            cluster.kill_worker(0);
            // The supervisor's part: start it again on the same socket.
            std::thread::sleep(Duration::from_millis(200));
            cluster.start_worker(0);
        }
        load.join().unwrap()
    });
    assert_clean(&out);
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("queue recovered"), "no recovery logged");
    assert_resubmitted(&cluster);
}

#[test]
fn a_hung_worker_is_fenced_and_replaced() {
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .workers(1)
            .seccomp_enforce()
            .env("BLKMESH_WORKER_TIMEOUT_MS", "1000"),
    );
    let image = cluster.sparse_image("hang.img", 16 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2))
        .unwrap();
    let pid = cluster.worker_pid(0).unwrap();
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&socket, "6"));
        std::thread::sleep(Duration::from_millis(1500));
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        // The frontend notices the silence and kills the worker.
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.worker_pid(0).is_some() {
            assert!(Instant::now() < deadline, "hung worker was not fenced");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.start_worker(0);
        load.join().unwrap()
    });
    assert_clean(&out);
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("fenced"), "no fencing logged");
    assert_resubmitted(&cluster);
}
