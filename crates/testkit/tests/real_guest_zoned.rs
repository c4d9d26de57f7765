//! QEMU on a host-managed zoned export. QEMU's vhost-user-blk (10.0.2)
//! does not pass VIRTIO_BLK_F_ZONED on to its guest, which would see an
//! ordinary disk whose buffered writes fail with EIO (writes not at a
//! zone's write pointer). The frontend refuses such a VMM instead: QEMU
//! reads a config space too short for the zoned characteristics when the
//! device is realized, the read fails, and QEMU exits before the guest
//! boots; the export's state says why. Needs what `real_guest.rs` needs
//! (`scripts/deps.sh`); build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::time::Duration;

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{ExportState, NodeSpec, ZonedOptions};
use blkmesh_testkit::{
    Cluster, ClusterOptions, ExportOpts, GuestError, GuestImage, GuestOptions, GuestVm,
};

const MIB: u64 = 1 << 20;
/// QEMU gives up within a second; a booted guest (the failure this test
/// guards against) would print its verdict well within this.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(80);

#[test]
fn qemu_gets_no_disk_from_a_host_managed_export() {
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let cluster = Cluster::start(ClusterOptions::default());
    let disk = cluster.sparse_image("disk.img", 64 * MIB);
    cluster.add_io_uring("disk", &disk, false, false).unwrap();
    cluster
        .client()
        .add_node(NodeSpec {
            name: "zoned".into(),
            driver: Some(Driver::Zoned(ZonedOptions {
                child: "disk".into(),
                zone_size: MIB,
                zone_capacity: MIB,
                max_open_zones: 0,
                max_active_zones: 0,
                metadata_path: cluster.dir().join("zoned.zones").display().to_string(),
            })),
        })
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("z", "zoned").writable())
        .unwrap();

    let opts = GuestOptions::new(&socket).dir(cluster.dir()).queues(1);
    let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));
    let qemu = match vm.wait_verdict(VERDICT_TIMEOUT) {
        Err(GuestError::Exited { qemu, console, .. }) => {
            // The guest never ran: no check, no disk to fail on.
            assert!(!console.contains("CHECK"), "the guest ran:\n{console}");
            qemu
        }
        Ok(out) => panic!(
            "the guest got a disk from a host-managed export (verdict {:?}):\n{}",
            out.report.verdict, out.console
        ),
        Err(e) => panic!("expected QEMU to exit, got: {e}"),
    };
    eprintln!("qemu:\n{qemu}");
    // QEMU's own words: realizing the device failed (the config read).
    assert!(qemu.contains("vhost-user-blk-pci"), "{qemu}");
    assert!(qemu.contains("Received bad msg size"), "{qemu}");

    // The operator learns why: the export's state, the CLI, the log.
    let why = "cannot pass VIRTIO_BLK_F_ZONED on to its guest";
    let info = cluster
        .list_exports()
        .unwrap()
        .into_iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == "z"))
        .expect("export listed");
    assert_eq!(
        info.state,
        ExportState::VmmRefused as i32,
        "{}",
        info.message
    );
    assert!(info.message.contains(why), "{}", info.message);
    let out = cluster.ctl(["export", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("z: VMM_REFUSED: host-managed zoned export refused"),
        "{table}"
    );
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("export=z") && l.contains(why)),
        "no error line naming the export and the reason:\n{log}"
    );
}
