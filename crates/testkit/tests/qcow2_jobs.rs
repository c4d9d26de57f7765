//! Block jobs end to end (the two that delete a snapshot): stream and
//! commit, started, watched, cancelled and completed with blkmeshctl
//! while a verifier writes and reads back on the export, with the
//! worker killed in the middle, and the images checked with qemu-img.
//! Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use blkmesh_proto::v1::{node_spec::Driver, NodeSpec, Qcow2Options};
use blkmesh_testkit::{
    host_tool, output_text, qcow2_overlay, run_tool, stdout_of, Cluster, ClusterOptions, ExportOpts,
};

const MIB: u64 = 1 << 20;
/// What the base image holds in its upper half, which the verifier never
/// writes: after a stream, the top image must hold it alone.
const BASE_BYTE: &str = "0x5a";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn cluster() -> Cluster {
    Cluster::start(ClusterOptions::default().workers(1).seccomp_enforce())
}

/// A 32 MiB raw base full of [`BASE_BYTE`] and a qcow2 top over it, as
/// nodes `base` (over `base`'s file) and `top`, exported writable as
/// `vm`; returns the export's socket and the two paths.
fn chain(cluster: &Cluster) -> (PathBuf, PathBuf, PathBuf) {
    let dir = cluster.dir().to_path_buf();
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    host_tool("qemu-img", &["create", "-q", "-f", "raw", s(&base), "32M"]);
    let fill = format!("write -P {BASE_BYTE} 0 32M");
    host_tool("qemu-io", &["-f", "raw", "-c", &fill, s(&base)]);
    qcow2_overlay(&top, s(&base), "raw", "");
    cluster.add_io_uring("base", &base, false, false).unwrap();
    cluster
        .add_io_uring("top-file", &top, false, false)
        .unwrap();
    cluster
        .client()
        .add_node(NodeSpec {
            name: "top".into(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: "top-file".into(),
                backing: "base".into(),
                ..Default::default()
            })),
        })
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("vm", "top").writable().queues(2))
        .unwrap();
    (socket, base, top)
}

/// The verifier on the lower 16 MiB for `seconds`: it writes, reads back,
/// and at the end reads every sector against the last write to it.
fn verify(socket: &Path, seconds: &str) -> Output {
    run_tool(
        "blkmesh-io",
        [
            "--socket",
            s(socket),
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

fn clean(load: &Output) {
    let stdout = stdout_of(load);
    assert!(
        stdout.contains("0 errors, 0 mismatches"),
        "{}",
        output_text(load)
    );
}

fn job_json(cluster: &Cluster, id: &str) -> serde_json::Value {
    let out = stdout_of(&cluster.ctl(["--json", "job", "show", id]));
    serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
}

fn wait(cluster: &Cluster, id: &str, state: &str) {
    stdout_of(&cluster.ctl(["job", "wait", id, "--state", state, "--timeout", "60"]));
}

#[test]
fn a_stream_under_load_copies_the_base_in_and_drops_it() {
    let cluster = cluster();
    let (socket, base, top) = chain(&cluster);
    let load = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify(&socket, "5"));
        std::thread::sleep(Duration::from_millis(1000));
        // 32 MiB at 16 MiB/s: the stream runs while the verifier does.
        stdout_of(&cluster.ctl(["job", "stream", "s1", "vm", "--speed", "16M"]));
        let job = job_json(&cluster, "s1");
        assert_eq!(job["state"], "running", "{job}");
        assert_eq!(
            (job["top"].as_str(), job["base"].as_str()),
            (Some("top"), Some("base"))
        );
        wait(&cluster, "s1", "completed");
        load.join().unwrap()
    });
    clean(&load);
    let job = job_json(&cluster, "s1");
    assert_eq!(job["done"].as_u64(), Some(32 * MIB), "{job}");
    // The node has no backing node any more; the header no backing file.
    let info = stdout_of(&cluster.ctl(["--json", "image", "info", "--node", "top"]));
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 1, "{info}");
    assert_eq!(chain[0]["backing_file"], "", "{info}");
    cluster.remove_export("vm").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&top)]);
    // The top image alone holds the base's data (the base is gone).
    std::fs::remove_file(&base).unwrap();
    let read = format!("read -P {BASE_BYTE} 16M 16M");
    host_tool("qemu-io", &["-r", "-f", "qcow2", "-c", &read, s(&top)]);
}

#[test]
fn a_commit_under_load_follows_writes_and_completes_onto_the_base() {
    let cluster = cluster();
    let (socket, base, top) = chain(&cluster);
    let load = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify(&socket, "6"));
        std::thread::sleep(Duration::from_millis(1000));
        stdout_of(&cluster.ctl(["job", "commit", "c1", "vm"]));
        wait(&cluster, "c1", "ready");
        // Writes go on while it is ready; completing switches the export
        // over with them all in the base.
        std::thread::sleep(Duration::from_millis(1500));
        let done = stdout_of(&cluster.ctl(["job", "complete", "c1"]));
        assert!(done.contains("completed"), "{done}");
        load.join().unwrap()
    });
    // Every sector read back as last written, before and after the switch.
    clean(&load);
    let exports = stdout_of(&cluster.ctl(["--json", "export", "list"]));
    assert!(exports.contains("\"node\": \"base\""), "{exports}");
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("graph reopened"), "no live reopen logged");
    cluster.remove_export("vm").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&top)]);
    // A finished job is forgotten on cancel; an unknown one is refused.
    stdout_of(&cluster.ctl(["job", "cancel", "c1"]));
    let gone = cluster.ctl(["job", "show", "c1"]);
    assert!(
        output_text(&gone).contains("NOT_FOUND"),
        "{}",
        output_text(&gone)
    );
    // The base kept its upper half, which nobody wrote.
    let read = format!("read -P {BASE_BYTE} 16M 16M");
    host_tool("qemu-io", &["-r", "-f", "raw", "-c", &read, s(&base)]);
}

#[test]
fn a_job_survives_a_worker_kill_and_can_be_cancelled() {
    let mut cluster = cluster();
    let (socket, _base, top) = chain(&cluster);
    let load = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify(&socket, "6"));
        let cluster = &mut cluster;
        std::thread::sleep(Duration::from_millis(500));
        // 32 MiB at 8 MiB/s: about 4 s, with the worker killed after 1.
        stdout_of(&cluster.ctl(["job", "stream", "k1", "vm", "--speed", "8M"]));
        std::thread::sleep(Duration::from_millis(1000));
        cluster.kill_worker(0);
        std::thread::sleep(Duration::from_millis(200));
        cluster.start_worker(0);
        wait(cluster, "k1", "completed");
        load.join().unwrap()
    });
    clean(&load);
    let job = job_json(&cluster, "k1");
    assert!(job["restarts"].as_u64().unwrap() >= 1, "{job}");
    let info = stdout_of(&cluster.ctl(["--json", "image", "info", "--node", "top"]));
    assert!(info.contains("\"backing_file\": \"\""), "{info}");
    // Bad requests: a second job on the export, an unknown export, a job
    // on a node without backing (the stream dropped it), a commit that is
    // not ready.
    let refused = |args: &[&str], why: &str| {
        let out = cluster.ctl(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            output_text(&out).contains(why),
            "{args:?}: {}",
            output_text(&out)
        );
    };
    refused(&["job", "stream", "k2", "nope"], "nope");
    refused(
        &["job", "commit", "k2", "vm"],
        "not a qcow2 node with a backing node",
    );
    refused(&["job", "complete", "k1"], "only a READY commit completes");
    refused(&["job", "stream", "bad id!", "vm"], "id");
    refused(&["job", "show", "nope"], "NOT_FOUND");
    cluster.remove_export("vm").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&top)]);
}

#[test]
fn a_cancelled_commit_leaves_the_chain_as_it_was() {
    let cluster = cluster();
    let (socket, base, top) = chain(&cluster);
    host_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 16M", s(&base)],
    );
    let load = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify(&socket, "4"));
        std::thread::sleep(Duration::from_millis(1000));
        stdout_of(&cluster.ctl(["job", "commit", "c2", "vm", "--speed", "4M"]));
        std::thread::sleep(Duration::from_millis(500));
        let job = stdout_of(&cluster.ctl(["job", "cancel", "c2"]));
        assert!(job.contains("c2"), "{job}");
        wait(&cluster, "c2", "cancelled");
        load.join().unwrap()
    });
    clean(&load);
    // The export stays on its top node, and reads as before.
    let exports = stdout_of(&cluster.ctl(["--json", "export", "list"]));
    assert!(exports.contains("\"node\": \"top\""), "{exports}");
    cluster.remove_export("vm").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&top)]);
    let read = format!("read -P {BASE_BYTE} 16M 16M");
    host_tool("qemu-io", &["-r", "-f", "qcow2", "-c", &read, s(&top)]);
}
