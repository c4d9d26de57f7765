//! What live migration asks of blkmesh's vhost-user side, against the
//! real frontend and worker processes (the real-guest migrations are in
//! real_guest_migration.rs, the fake-worker checks in
//! frontend-virtio/tests/migration.rs):
//!
//! - A second VMM connection on an export whose first one runs, as a
//!   migration's destination makes: the workers serve one connection's
//!   guest memory at a time, so a memory table from a connection whose
//!   queues do not run must not reach them while another's run, or the
//!   running guest's writes would take their data from the other VMM's
//!   memory, and its reads would land there.
//! - The dirty log over the requests only a zoned graph answers: a zone
//!   report (written into the guest's buffer) and a zone append (its
//!   sector written back) mark every page they write, and only those and
//!   the used ring, by the time their completion is visible.
//!
//! Build the binaries first: `cargo build --bins`. Every wait is bounded.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, ZonedOptions};
use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};
use blkmesh_vhost_user_client::zone::{
    APPEND_SECTOR_SIZE, REPORT_HEADER_SIZE, ZONE_DESCRIPTOR_SIZE,
};
use blkmesh_vhost_user_client::{
    log_pages, Options, ProtocolFeatures, RawConnection, RawMessage, VhostUserBlk, S_OK,
    T_ZONE_APPEND, T_ZONE_REPORT,
};

const T: Duration = Duration::from_secs(10);

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

const PAGE: u64 = 0x1000;
const ZONE: u64 = 1 << 20;

#[test]
fn zone_reports_and_appended_sectors_are_logged_before_their_completion() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("disk.img", 16 * ZONE);
    cluster.add_io_uring("disk", &image, false, false).unwrap();
    let zoned = NodeSpec {
        name: "zoned".into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: "disk".into(),
            zone_size: ZONE,
            zone_capacity: ZONE,
            max_open_zones: 0,
            max_active_zones: 0,
            metadata_path: cluster.dir().join("zoned.zones").display().to_string(),
        })),
    };
    cluster.client().add_node(zoned).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("z", "zoned").writable())
        .unwrap();
    let opts = Options {
        protocol_features_wanted: Options::default().protocol_features_wanted
            | ProtocolFeatures::LOG_SHMFD,
        ..Options::default().timeout(T)
    };
    let mut vmm = VhostUserBlk::connect(&socket, opts).unwrap();
    let layout = vmm.ring_layout(0).unwrap();
    let used = log_pages(layout.used, 6 + 8 * u64::from(layout.size));
    vmm.start_dirty_log().unwrap();
    vmm.take_dirty_pages().unwrap();

    // A report of four zones, starting mid-page: it spans two pages.
    let report_len = (REPORT_HEADER_SIZE + 4 * ZONE_DESCRIPTOR_SIZE) as u32;
    let report_at = vmm.alloc(u64::from(report_len) + 2 * PAGE).unwrap() + PAGE - 100;
    // An append whose returned sector straddles a page boundary.
    let sector_at = vmm.alloc(3 * PAGE).unwrap() + PAGE - 4;
    let data = vec![0xa5u8; 4096];
    let cases = [
        (
            "zone report",
            T_ZONE_REPORT,
            0,
            &[][..],
            report_at,
            report_len,
        ),
        (
            "zone append",
            T_ZONE_APPEND,
            2 * ZONE / 512,
            &data[..],
            sector_at,
            APPEND_SECTOR_SIZE,
        ),
    ];
    for (what, kind, sector, out, at, len) in cases {
        let p = vmm.log_probe(kind, sector, out, Some((at, len))).unwrap();
        vmm.run_chain(0, &p.chain).unwrap();
        assert_eq!(vmm.read_mem(p.status, 1).unwrap(), [S_OK], "{what}");
        let marked: BTreeSet<u64> = vmm.take_dirty_pages().unwrap().into_iter().collect();
        if let Err(e) = p.check(&marked, &used) {
            panic!("{what}: {e}");
        }
    }
    // The device did write there: four zones reported, and the append
    // landed at the start of zone 2.
    let report = vmm.read_mem(report_at, 8).unwrap();
    assert_eq!(u64::from_le_bytes(report.try_into().unwrap()), 4);
    let sector = vmm.read_mem(sector_at, 8).unwrap();
    assert_eq!(
        u64::from_le_bytes(sector.try_into().unwrap()),
        2 * ZONE / 512
    );
}
