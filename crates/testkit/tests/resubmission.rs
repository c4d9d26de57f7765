//! Requests resubmitted to a replacement worker reach the same guest bytes
//! they were made for, whatever happened to the memory table meanwhile.
//! Build the binaries first: `cargo build --bins`.

use std::os::fd::AsFd;
use std::time::Duration;

use blkmesh_proto::v1::IoOp;
use blkmesh_testkit::{delay_node, sector_pattern as pattern, Cluster, ClusterOptions, ExportOpts};
use blkmesh_vhost_user_client::raw::{self, RawMessage};
use blkmesh_vhost_user_client::{MemRegion, Options, RequestSpec, VhostUserBlk};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

/// A write in flight when the VMM reorders its memory table (so the
/// write's region index now names another region) and then the worker
/// dies: the replacement must write the guest's data, not the bytes at the
/// same index and offset of the new table.
#[test]
fn a_write_resubmitted_after_a_memory_table_change_writes_the_guest_data() {
    let mut cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("d.img", 16 * MIB);
    cluster.add_io_uring("file", &image, false, false).unwrap();
    // Writes are held 1 s in the worker, so one is in flight throughout.
    cluster
        .client()
        .add_node(delay_node(
            "slow",
            "file",
            &[IoOp::Write],
            Duration::from_secs(1),
        ))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "slow").writable())
        .unwrap();
    let opts = Options::default().queues(1).queue_size(64).timeout(T);
    let mut blk = VhostUserBlk::connect(&socket, opts).unwrap();

    let data = pattern(5, 8192);
    let write = blk.submit(0, &RequestSpec::write(8, &data)).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // The same guest RAM, now second in the table behind a new region of
    // zeroes placed above it: region 0 is the zeroes.
    let ram = blk.mem_region();
    let zeroes = nix::sys::memfd::memfd_create("zeroes", nix::sys::memfd::MFdFlags::empty())
        .map(std::fs::File::from)
        .unwrap();
    zeroes.set_len(ram.size).unwrap();
    let above = MemRegion {
        gpa: ram.size,
        user_addr: ram.user_addr + (1 << 40),
        ..ram
    };
    let msg = RawMessage::mem_table(&[above, ram], &[&zeroes.as_fd(), &blk.guest_ram().fd()])
        .unwrap()
        .flags(raw::FLAG_VERSION | raw::FLAG_NEED_REPLY);
    let out = blk.raw_request(&msg).unwrap();
    assert!(!out.refused() && !out.closed, "SET_MEM_TABLE: {out:?}");

    // The worker dies with the write still held; its replacement gets
    // the new table only.
    cluster.kill_worker(0);
    cluster.start_worker(0);
    let c = blk.wait(0, write, T).unwrap();
    assert!(c.is_ok(), "the write after failover: {c:?}");
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(
        &on_disk[8 * 512..8 * 512 + 8192],
        &data[..],
        "the replacement wrote other bytes than the guest's"
    );
}

/// A frontend dies with a write held in the worker (a fault-injection
/// delay of 3 s). Its restart resubmits the write, which completes at once
/// (the delay was lifted meanwhile); the guest then writes newer data to
/// the same sectors. The old write must never land over the newer one:
/// the worker drops what it held for the dead frontend, and attaches the
/// restarted frontend's queue only after that.
#[test]
fn a_write_held_for_a_dead_frontend_never_lands_over_newer_data() {
    let mut cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("d.img", 16 * MIB);
    cluster.add_io_uring("file", &image, false, false).unwrap();
    let held = Duration::from_secs(3);
    cluster
        .client()
        .add_node(delay_node("slow", "file", &[IoOp::Write], held))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "slow").writable())
        .unwrap();
    let opts = Options::default()
        .queues(1)
        .queue_size(64)
        .inflight(true)
        .timeout(T);
    let mut blk = VhostUserBlk::connect(&socket, opts).unwrap();
    let old = pattern(1, 4096);
    let first = blk.submit(0, &RequestSpec::write(0, &old)).unwrap();
    let submitted = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(200));

    cluster.kill_frontend();
    // Lift the delay while the frontend is down: the restarted frontend
    // opens the graph without it.
    cluster
        .client()
        .update_node(delay_node("slow", "file", &[IoOp::Write], Duration::ZERO))
        .unwrap();
    cluster.start_frontend();
    let deadline = std::time::Instant::now() + T;
    while let Err(e) = blk.reconnect() {
        assert!(std::time::Instant::now() < deadline, "reconnect: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = blk.wait(0, first, T).unwrap();
    assert!(c.is_ok(), "the resubmitted write: {c:?}");
    assert!(
        submitted.elapsed() < held,
        "the delay was not lifted: the test proves nothing"
    );
    // The guest reuses the first write's buffer (a read of zeroes goes
    // there) and writes newer data to the same sectors from another one.
    let reuse = blk.submit(0, &RequestSpec::read(2048, 4096)).unwrap();
    let new = pattern(2, 4096);
    blk.write(0, 0, &new).unwrap();
    assert!(blk.wait(0, reuse, T).unwrap().is_ok());
    // Past the moment the old write would have been let go.
    let until = submitted + held + Duration::from_millis(700);
    std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
    assert_eq!(blk.read(0, 0, 4096).unwrap(), new, "an old write landed");
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(&on_disk[..4096], &new[..], "an old write landed on disk");
}
