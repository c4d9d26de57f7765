//! A second VMM connection on an export whose first one runs, as a live
//! migration's destination makes, against the real frontend and worker
//! processes. The workers serve one connection's guest memory at a time:
//! a memory table from a connection whose queues do not run must not
//! reach them while another connection's queues run, or the running
//! guest's writes would take their data from the other VMM's memory, and
//! its reads would land there.
//!
//! Build the binaries first: `cargo build --bins`. Every wait is bounded.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::time::Duration;

use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};
use blkmesh_vhost_user_client::*;

const T: Duration = Duration::from_secs(5);

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(29))
        .collect()
}

#[test]
fn a_waiting_vmms_memory_table_does_not_reach_the_running_vmms_workers() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let img = cluster.sparse_image("d.img", 16 << 20);
    cluster.add_io_uring("d", &img, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable())
        .unwrap();
    let mut source = VhostUserBlk::connect(&socket, Options::default().timeout(T)).unwrap();
    let before = pattern(1, 8192);
    source.write(0, 8, &before).unwrap();

    // The destination sets up its device, memory table included, while the
    // source's rings run. Its memory is another VMM's: all zeroes.
    let mut dest = RawConnection::connect(&socket, T).unwrap();
    dest.negotiate(0).unwrap();
    let ram = tempfile::tempfile().unwrap();
    let region = source.mem_region();
    ram.set_len(region.size).unwrap();
    let table = RawMessage::mem_table(&[region], &[&ram]).unwrap();
    let sent = dest.request(&table).unwrap();
    assert!(
        !sent.closed,
        "the destination's table was refused: {sent:?}"
    );

    // The source goes on with its own memory: what it writes is its data,
    // what it reads arrives in its buffers.
    let after = pattern(2, 8192);
    source.write(0, 64, &after).unwrap();
    assert_eq!(source.read(0, 64, 8192).unwrap(), after);
    assert_eq!(source.read(0, 8, 8192).unwrap(), before);
    let mut on_disk = vec![0u8; 8192];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&img).unwrap(),
        &mut on_disk,
        64 * 512,
    )
    .unwrap();
    assert_eq!(on_disk, after, "the image holds another VMM's memory");

    // The source leaves; a destination that starts its rings gets its own
    // memory served.
    source.disconnect();
    drop(dest);
    let mut dest = VhostUserBlk::connect(&socket, Options::default().timeout(T)).unwrap();
    assert_eq!(dest.read(0, 64, 8192).unwrap(), after);
}
