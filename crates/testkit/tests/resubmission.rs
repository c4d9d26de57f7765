//! Requests resubmitted to a replacement worker reach the same guest bytes
//! they were made for, whatever happened to the memory table meanwhile.
//! Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

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
    // Writes are held 1 s in the worker, so one is in flight throughout.
    let (mut cluster, image) =
        Cluster::with_delayed_file(16 * MIB, &[IoOp::Write], Duration::from_secs(1));
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
    let held = Duration::from_secs(3);
    let (mut cluster, image) = Cluster::with_delayed_file(16 * MIB, &[IoOp::Write], held);
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

/// A blkio cgroup (v1) whose writes to the block device holding `file`
/// are throttled to `bps`: what a slow disk does to O_DIRECT writes, made
/// on purpose. Removed on drop (once its processes are gone).
struct Throttle {
    dir: std::path::PathBuf,
}

impl Throttle {
    const ROOT: &'static str = "/sys/fs/cgroup/blkio";

    /// Throttles the disk that holds `file`.
    fn new(file: &std::path::Path, bps: u64) -> Throttle {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(file).unwrap().dev();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        // Throttling applies to whole disks: a partition's parent.
        let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let disk = if sys.join("partition").exists() {
            std::fs::read_to_string(sys.join("../dev")).unwrap()
        } else {
            format!("{major}:{minor}")
        };
        Throttle::disk(disk.trim(), bps)
    }

    /// Throttles the disk numbered `disk` ("major:minor").
    fn disk(disk: &str, bps: u64) -> Throttle {
        assert!(
            std::path::Path::new(Self::ROOT)
                .join("blkio.throttle.write_bps_device")
                .exists(),
            "this test needs cgroup v1's blkio throttling at {} (and root)",
            Self::ROOT
        );
        let dir = std::path::Path::new(Self::ROOT).join(format!(
            "blkmesh-test-{}-{}",
            std::process::id(),
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .unwrap()
                .tv_nsec()
        ));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("blkio.throttle.write_bps_device"),
            format!("{disk} {bps}"),
        )
        .unwrap();
        Throttle { dir }
    }

    /// Moves process `pid` (all its threads) in.
    fn enter(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Bytes of writes its processes have submitted to the disk.
    fn submitted(&self) -> u64 {
        let text =
            std::fs::read_to_string(self.dir.join("blkio.throttle.io_service_bytes")).unwrap();
        text.lines()
            .filter_map(|l| l.split_once(" Write "))
            .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A worker dies with a write still in the kernel, held by the block
/// layer's throttle as a slow disk holds it: the process is gone long
/// before the write lands. The guest's driver then reuses the write's
/// buffer (a read goes there; the original, zero-copy, writes whatever
/// that buffer holds when it lands) and writes newer data to the same
/// sectors from another one. Returns the cluster, the client and the
/// newer data, once the resubmission and the newer write have completed.
fn kill_the_worker_under_a_held_write(
    leaf: &std::path::Path,
    throttle: impl FnOnce() -> Throttle,
) -> (Cluster, VhostUserBlk, Vec<u8>) {
    let mut cluster = Cluster::start(ClusterOptions::default().workers(1));
    cluster.add_io_uring("leaf", leaf, true, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "leaf").writable())
        .unwrap();
    let opts = Options::default().queues(1).queue_size(64).timeout(T);
    let mut blk = VhostUserBlk::connect(&socket, opts).unwrap();
    blk.write(0, 0, &pattern(1, 4096)).unwrap();

    // 16 KiB at 4 KiB/s: the write stays in the kernel for about 4 s.
    let throttle = throttle();
    throttle.enter(cluster.worker_pid(0).unwrap());
    let old = pattern(2, 16384);
    let first = blk.submit(0, &RequestSpec::write(0, &old)).unwrap();
    let deadline = std::time::Instant::now() + T;
    while throttle.submitted() < 16384 {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never reached the disk's queue"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.kill_worker(0);
    cluster.start_worker(0);
    let c = blk.wait(0, first, T).unwrap();
    assert!(c.is_ok(), "the resubmitted write: {c:?}");
    let reuse = blk.submit(0, &RequestSpec::read(4096, 16384)).unwrap();
    let new = pattern(3, 16384);
    blk.write(0, 0, &new).unwrap();
    assert!(blk.wait(0, reuse, T).unwrap().is_ok());
    let log = std::fs::read_to_string(cluster.log_path("worker0")).unwrap();
    assert!(log.contains("settled the I/O of the lost worker"), "{log}");
    (cluster, blk, new)
}

/// On an image file: the replacement waits until the dead worker's claim
/// on the file has gone with the last of its requests
/// (backend-workers/src/claim.rs).
#[test]
fn a_write_still_in_the_kernel_when_its_worker_dies_never_lands_over_newer_data() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let (_cluster, mut blk, new) =
        kill_the_worker_under_a_held_write(&image, || Throttle::new(&image, 4096));
    // Everything in flight on the file has landed once the filesystem
    // lets an allocation through (it drains the file's direct I/O first).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 4096).unwrap();
    let mut on_disk = vec![0u8; 16384];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0).unwrap();
    assert!(on_disk == new, "the original write landed over newer data");
    assert_eq!(blk.read(0, 0, 16384).unwrap(), new);
}

/// A loop device: a block device this machine can make without a disk.
/// Detached on drop.
struct LoopDevice {
    path: std::path::PathBuf,
}

impl LoopDevice {
    fn attach(file: &std::path::Path) -> LoopDevice {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("this test needs losetup (util-linux): {e}"));
        assert!(
            out.status.success(),
            "this test needs a loop device (root, the loop driver): losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8(out.stdout).unwrap().trim().into();
        LoopDevice { path }
    }

    /// "major:minor".
    fn number(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&self.path).unwrap().rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        format!("{major}:{minor}")
    }

    /// Sectors of writes the device has completed.
    fn sectors_written(&self) -> u64 {
        let name = self.path.file_name().unwrap().to_str().unwrap();
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        stat.split_whitespace().nth(6).unwrap().parse().unwrap()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

/// The same on a block device, which has no filesystem to drain.
#[test]
fn a_write_still_in_a_block_device_when_its_worker_dies_never_lands_over_newer_data() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let dev = LoopDevice::attach(&backing);
    let before = dev.sectors_written();
    let (_cluster, mut blk, new) =
        kill_the_worker_under_a_held_write(&dev.path, || Throttle::disk(&dev.number(), 4096));
    // Four writes reached the device: the first, the held one, its
    // resubmission and the newer one. Once all have completed, the device
    // holds whichever came last.
    let deadline = std::time::Instant::now() + T;
    while dev.sectors_written() < before + 8 + 3 * 32 {
        assert!(
            std::time::Instant::now() < deadline,
            "the device completed {} of 104 sectors",
            dev.sectors_written() - before
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        blk.read(0, 0, 16384).unwrap() == new,
        "the original write landed over newer data"
    );
}
