//! The data path end to end: manager, workers and frontend as real
//! processes, driven through vhost-user by `blkmesh-io` (libblkio's
//! virtio-blk-vhost-user driver, i.e. a guest's view). Build the binaries
//! first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::Output;

use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};

const MIB: u64 = 1 << 20;

fn io(cluster: &Cluster, socket: &Path, queues: u16, cmds: &[&str]) -> Output {
    let mut args: Vec<String> = vec![
        "--socket".into(),
        socket.display().to_string(),
        "--queues".into(),
        queues.to_string(),
        "--timeout".into(),
        "20".into(),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    cluster.run_tool("blkmesh-io", args)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn fails_with_io_error(out: &Output) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert!(text(out).contains("EIO"), "{}", text(out));
}

/// A cluster with one writable io_uring export of `size` bytes.
fn file_export(queues: u32, size: u64) -> (Cluster, PathBuf, PathBuf) {
    let cluster = Cluster::start(options());
    let image = cluster.sparse_image("disk0.img", size);
    cluster.add_io_uring("disk0", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("disk0", "disk0").writable().queues(queues))
        .unwrap();
    (cluster, socket, image)
}

/// Every cluster here runs under the processes' seccomp filters
/// (`BLKMESH_SECCOMP=enforce`), as deployed: a system call missing from an
/// allow-list kills the process and fails the test.
fn options() -> ClusterOptions {
    ClusterOptions::default().seccomp_enforce()
}

#[test]
fn pattern_round_trips_from_512_bytes_to_1_mib_including_scatter_gather() {
    let (cluster, socket, image) = file_export(1, 64 * MIB);
    let mut cmds = Vec::new();
    let mut off = 0u64;
    for (i, len) in [512u64, 4096, 65536, 1 << 20].iter().enumerate() {
        let p = 0x10 + i;
        cmds.push(format!("write -P {p:#x} {off} {len}"));
        cmds.push(format!("read -P {p:#x} {off} {len}"));
        off += len;
    }
    cmds.push("writev -P 0x5a 8M 4k 512 3584 64k".into());
    cmds.push("readv -P 0x5a 8M 512 7680 64k".into());
    cmds.push("read -P 0x5a 8M 72k".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = ok(&io(&cluster, &socket, 1, &refs));
    assert!(out.contains("wrote 1048576/1048576"), "{out}");

    // The bytes are really in the image file, at the right place.
    let data = std::fs::read(&image).unwrap();
    assert!(data[..512].iter().all(|&b| b == 0x10));
    assert!(data[512..4608].iter().all(|&b| b == 0x11));
    assert!(data[8 << 20..(8 << 20) + 73728].iter().all(|&b| b == 0x5a));
}

#[test]
fn pattern_mismatch_is_detected() {
    let (cluster, socket, _) = file_export(1, 16 * MIB);
    let out = io(
        &cluster,
        &socket,
        1,
        &["write -P 0x01 0 4k", "read -P 0x02 0 4k"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn four_queues_verify_concurrently() {
    let (cluster, socket, _) = file_export(4, 64 * MIB);
    let out = cluster.run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--queues",
            "4",
            "--timeout",
            "20",
            "verify",
            "--size",
            "64M",
            "--seconds",
            "2",
            "--bs-max",
            "256k",
        ],
    );
    let stdout = ok(&out);
    assert!(stdout.contains("0 errors, 0 mismatches"), "{stdout}");
    for q in 0..4 {
        assert!(stdout.contains(&format!("queue {q}:")), "{stdout}");
    }
}

#[test]
fn flush_discard_and_write_zeroes() {
    let (cluster, socket, image) = file_export(1, 16 * MIB);
    ok(&io(
        &cluster,
        &socket,
        1,
        &[
            "write -P 0x77 0 2M",
            "flush",
            "discard 0 1M",
            "read -P 0 0 1M",
            "write_zeroes 1M 64k",
            "read -P 0 1M 64k",
            "write_zeroes -u 1088k 64k",
            "read -P 0 1088k 64k",
            "read -P 0x77 1152k 64k",
            "flush",
        ],
    ));
    // The discarded megabyte is a hole in the image again.
    let used = std::fs::metadata(&image).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(used.unwrap() < 2 * MIB, "discard should deallocate");
}

#[test]
fn read_only_export_is_offered_read_only_and_keeps_its_data() {
    let cluster = Cluster::start(options().workers(1));
    let image = cluster.sparse_image("ro.img", 8 * MIB);
    std::fs::write(&image, vec![0x42u8; 8 * MIB as usize]).unwrap();
    cluster.add_io_uring("ro", &image, false, true).unwrap();
    let socket = cluster.add_export(ExportOpts::new("ro", "ro")).unwrap();
    let ro = |cmds: &[&str]| {
        let mut args = vec![
            "--socket",
            socket.to_str().unwrap(),
            "--read-only",
            "--timeout",
            "20",
        ];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        cluster.run_tool("blkmesh-io", args)
    };
    // The device offers VIRTIO_BLK_F_RO: a read-write open is refused.
    let rw = io(&cluster, &socket, 1, &["info"]);
    assert_eq!(rw.status.code(), Some(1), "{}", text(&rw));
    assert!(text(&rw).contains("read-only"), "{}", text(&rw));
    let info = ok(&ro(&["info", "read -P 0x42 0 1M"]));
    assert!(info.contains("read-only: true"), "{info}");
    let write = ro(&["write -P 1 0 4k"]);
    assert_eq!(write.status.code(), Some(1), "{}", text(&write));
    ok(&ro(&["read -P 0x42 0 8M"]));
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0x42));
}

#[test]
fn requests_past_capacity_fail_and_the_device_stays_usable() {
    let (cluster, socket, _) = file_export(1, 16 * MIB);
    // One connection: the failing requests get EIO, the ones after them
    // still work on the same queue.
    let out = cluster.run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--keep-going",
            "-c",
            "read 15M 2M",
            "-c",
            "write -P 3 15M 1M",
            "-c",
            "write 16M 4k",
            "-c",
            "read -P 3 15M 1M",
        ],
    );
    fails_with_io_error(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("failed: EIO").count(), 2, "{stdout}");
    assert!(
        stdout.contains("wrote 1048576/1048576 bytes at offset 15728640"),
        "{stdout}"
    );
    assert!(
        stdout.contains("read 1048576/1048576 bytes at offset 15728640"),
        "{stdout}"
    );
}

#[test]
fn client_reconnects_and_sees_earlier_writes() {
    let (cluster, socket, _) = file_export(2, 16 * MIB);
    for round in 0..3u8 {
        let p = format!("{:#x}", 0x20 + round);
        let w = format!("write -P {p} {}k 64k", 64 * round as u32);
        ok(&io(&cluster, &socket, 2, &[w.as_str()]));
    }
    ok(&io(
        &cluster,
        &socket,
        1,
        &[
            "read -P 0x20 0 64k",
            "read -P 0x21 64k 64k",
            "read -P 0x22 128k 64k",
        ],
    ));
}

#[test]
fn null_and_raw_window_nodes_serve_their_bytes() {
    let cluster = Cluster::start(options());
    let image = cluster.sparse_image("base.img", 16 * MIB);
    cluster.add_io_uring("base", &image, false, false).unwrap();
    cluster.add_raw("win", "base", 4 * MIB, 2 * MIB).unwrap();
    cluster.add_null("nul", 32 * MIB).unwrap();
    let win = cluster
        .add_export(ExportOpts::new("win", "win").writable())
        .unwrap();
    let nul = cluster
        .add_export(ExportOpts::new("nul", "nul").writable())
        .unwrap();

    let info = ok(&io(&cluster, &win, 1, &["info", "write -P 0x66 0 2M"]));
    assert!(info.contains("capacity: 2097152"), "{info}");
    fails_with_io_error(&io(&cluster, &win, 1, &["read 2M 4k"]));
    let data = std::fs::read(&image).unwrap();
    assert!(data[..4 << 20].iter().all(|&b| b == 0));
    assert!(data[4 << 20..6 << 20].iter().all(|&b| b == 0x66));
    assert!(data[6 << 20..].iter().all(|&b| b == 0));

    ok(&io(
        &cluster,
        &nul,
        1,
        &["write -P 9 0 1M", "read -P 0 0 1M", "flush"],
    ));
}

#[test]
fn exports_on_two_workers_are_independent() {
    let cluster = Cluster::start(options());
    let a = cluster.sparse_image("a.img", 8 * MIB);
    let b = cluster.sparse_image("b.img", 8 * MIB);
    cluster.add_io_uring("a", &a, false, false).unwrap();
    cluster.add_io_uring("b", &b, false, false).unwrap();
    let sa = cluster
        .add_export(ExportOpts::new("a", "a").writable())
        .unwrap();
    let sb = cluster
        .add_export(ExportOpts::new("b", "b").writable())
        .unwrap();
    let exports = cluster.list_exports().unwrap();
    let worker_of = |id: &str| {
        exports
            .iter()
            .find(|e| e.export.as_ref().is_some_and(|x| x.id == id))
            .map(|e| e.queues[0].worker.clone())
            .unwrap()
    };
    assert_ne!(worker_of("a"), worker_of("b"), "least-loaded placement");
    ok(&io(&cluster, &sa, 1, &["write -P 0xa 0 1M"]));
    ok(&io(&cluster, &sb, 1, &["write -P 0xb 0 1M"]));
    ok(&io(&cluster, &sa, 1, &["read -P 0xa 0 1M"]));
    ok(&io(&cluster, &sb, 1, &["read -P 0xb 0 1M"]));
}

#[test]
fn removed_export_closes_its_socket() {
    let (cluster, socket, _) = file_export(1, 8 * MIB);
    cluster.remove_export("disk0").unwrap();
    assert!(blkmesh_testkit::wait_for_path(
        &socket,
        false,
        std::time::Duration::from_secs(10)
    ));
    let out = io(&cluster, &socket, 1, &["info"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn grpc_refuses_bad_requests_with_clear_codes() {
    let cluster = Cluster::start(options().workers(1));
    let image = cluster.sparse_image("x.img", MIB);
    cluster.add_io_uring("x", &image, false, false).unwrap();
    let dup = cluster.add_io_uring("x", &image, false, false).unwrap_err();
    assert_eq!(dup.code(), Some(tonic::Code::AlreadyExists), "{dup}");
    let missing = cluster.add_raw("r", "nope", 0, 0).unwrap_err();
    assert_eq!(missing.code(), Some(tonic::Code::NotFound), "{missing}");
    let bad = cluster.add_null("n", 1000).unwrap_err();
    assert_eq!(bad.code(), Some(tonic::Code::InvalidArgument), "{bad}");
    assert!(bad.to_string().contains("node.null.size"), "{bad}");
    let nofile = cluster
        .add_io_uring("y", Path::new("/nonexistent/disk.img"), false, false)
        .unwrap_err();
    assert_eq!(
        nofile.code(),
        Some(tonic::Code::InvalidArgument),
        "{nofile}"
    );
    let out = cluster.ctl(["node", "remove", "ghost"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"),
        "{out:?}"
    );
}

#[test]
fn frontend_retries_an_export_until_its_worker_listens() {
    let mut cluster = Cluster::start(options().workers(1));
    let image = cluster.sparse_image("d.img", 8 * MIB);
    cluster.add_io_uring("d", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable())
        .unwrap();
    ok(&io(&cluster, &socket, 1, &["write -P 0x31 0 64k"]));
    // The frontend comes up while the worker is away (a restart, or a
    // supervisor starting processes in another order).
    cluster.stop_worker(0);
    cluster.restart_frontend();
    // The export cannot be served without its worker (the socket, if still
    // there, is a stale one that refuses connections).
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(io(&cluster, &socket, 1, &["info"]).status.code(), Some(1));
    cluster.start_worker(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = io(&cluster, &socket, 1, &["read -P 0x31 0 64k"]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "export did not come back once its worker listened: {}",
            text(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
