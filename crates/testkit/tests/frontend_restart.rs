//! A frontend killed with requests in flight: the VMM reconnects to the
//! restarted frontend, hands back the inflight region (INFLIGHT_SHMFD), and
//! gets every request completed. Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::time::{Duration, Instant};

use blkmesh_proto::v1::IoOp;
use blkmesh_testkit::{sector_pattern as pattern, wait_for_path, Cluster, ExportOpts};
use blkmesh_vhost_user_client::{Options, RequestSpec, Token, VhostUserBlk};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

#[test]
fn requests_in_flight_survive_a_frontend_restart() {
    // Reads are held 1.5 s in the worker, so they are in flight when the
    // frontend dies.
    let (mut cluster, _image) =
        Cluster::with_delayed_file(16 * MIB, &[IoOp::Read], Duration::from_millis(1500));
    let socket = cluster
        .add_export(ExportOpts::new("d", "slow").writable())
        .unwrap();
    let opts = Options::default()
        .queues(1)
        .queue_size(64)
        .inflight(true)
        .timeout(T);
    let mut blk = VhostUserBlk::connect(&socket, opts).unwrap();
    assert!(blk.inflight_region().is_some(), "INFLIGHT_SHMFD negotiated");
    for i in 0..8u64 {
        blk.write(0, i * 8, &pattern(i as u8, 4096)).unwrap();
    }
    let tokens: Vec<(u64, Token)> = (0..8u64)
        .map(|i| (i, blk.submit(0, &RequestSpec::read(i * 8, 4096)).unwrap()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    cluster.kill_frontend();
    assert!(wait_for_path(&socket, false, Duration::from_secs(1)) || socket.exists());
    cluster.start_frontend();
    // The restarted frontend serves the export again once registered.
    let deadline = Instant::now() + T;
    loop {
        match blk.reconnect() {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "reconnect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for (i, t) in tokens {
        let c = blk.wait(0, t, T).unwrap();
        assert!(c.is_ok(), "read {i}: {c:?}");
        assert_eq!(c.data, pattern(i as u8, 4096), "read {i}");
    }
    println!(
        "in-flight reads completed {:?} after the frontend was killed",
        started.elapsed()
    );
    // New requests work on the new connection.
    blk.write(0, 100, &pattern(42, 4096)).unwrap();
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap_or_default();
    assert!(
        log.contains("resubmitted requests left in flight by the previous frontend"),
        "the restarted frontend did not resume the requests"
    );
}
