//! Device bring-up while workers are gone: no vhost-user message may fail
//! because a worker is dead. The queue starts detached, takes the guest's
//! requests once a replacement worker is there, and the driver sees
//! latency, never an error. Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::PathBuf;
use std::time::Duration;

use blkmesh_testkit::{sector_pattern as pattern, Cluster, ClusterOptions, ExportOpts};
use blkmesh_vhost_user_client::{Options, RequestSpec, VhostUserBlk};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

fn options() -> Options {
    Options::default()
        .queues(2)
        .queue_size(64)
        .inflight(true)
        .timeout(T)
}

/// A 2-queue export of a 16 MiB image on the cluster's one worker.
fn one_worker_two_queues() -> (Cluster, PathBuf, PathBuf) {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("d.img", 16 * MIB);
    cluster.add_io_uring("file", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "file").writable().queues(2))
        .unwrap();
    (cluster, image, socket)
}

/// The whole handshake (features, memory table, every SET_VRING_*, enable)
/// happens while the export's only worker is dead: every message succeeds,
/// requests submitted meanwhile wait, and complete once the worker is back.
#[test]
fn a_device_comes_up_while_its_worker_is_dead() {
    let (mut cluster, image, socket) = one_worker_two_queues();
    cluster.kill_worker(0);

    let mut blk = match VhostUserBlk::connect(&socket, options()) {
        Ok(b) => b,
        Err(e) => {
            cluster.dump_logs();
            panic!("vhost-user handshake with the worker dead: {e}");
        }
    };
    let data = pattern(7, 8192);
    let write = blk.submit(1, &RequestSpec::write(16, &data)).unwrap();
    // Nothing can complete without a worker.
    assert!(blk.poll_used(1).unwrap().is_empty());

    cluster.start_worker(0);
    let c = blk.wait(1, write, T).unwrap();
    assert!(c.is_ok(), "write after the worker came back: {c:?}");
    assert_eq!(blk.read(0, 16, 8192).unwrap(), data);
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(&on_disk[16 * 512..16 * 512 + 8192], &data[..]);

    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(
        log.contains("queue starts without a worker"),
        "the queues did start detached"
    );
    assert!(!log.contains("vhost-user connection closed"), "{log}");
}

/// A VMM that reconnects (a new handshake on a new connection, as QEMU
/// does after a reset or a frontend restart) while the worker is dead,
/// with a request left in flight from the first connection.
#[test]
fn a_reconnect_while_the_worker_is_dead_resumes_what_was_in_flight() {
    let (mut cluster, _image, socket) = one_worker_two_queues();
    let mut blk = VhostUserBlk::connect(&socket, options()).unwrap();
    blk.write(0, 0, &pattern(1, 4096)).unwrap();

    cluster.kill_worker(0);
    let data = pattern(9, 4096);
    let write = blk.submit(0, &RequestSpec::write(64, &data)).unwrap();
    if let Err(e) = blk.reconnect() {
        cluster.dump_logs();
        panic!("reconnect with the worker dead: {e}");
    }
    cluster.start_worker(0);
    let c = blk.wait(0, write, T).unwrap();
    assert!(c.is_ok(), "write left in flight: {c:?}");
    assert_eq!(blk.read(1, 64, 4096).unwrap(), data);
    assert_eq!(blk.read(0, 0, 4096).unwrap(), pattern(1, 4096));
}
