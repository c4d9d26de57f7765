//! qcow2 images end to end, through the real processes and checked with
//! QEMU's own tools: images qemu-img made open in blkmesh, what blkmesh
//! writes passes `qemu-img check` and `qemu-img compare`, backing chains
//! are named explicitly, and damaged images are refused at AddNode.
//! Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blkmesh_proto::v1::{node_spec::Driver, NodeSpec, Qcow2Options};
use blkmesh_testkit::{
    host_tool, output_text, qcow2_overlay, stdout_of, verify_load, Cluster, ClusterOptions,
    ExportOpts,
};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn io(cluster: &Cluster, socket: &Path, queues: u32, cmds: &[&str]) -> Output {
    let q = queues.to_string();
    let mut v = vec![
        "--socket",
        s(socket),
        "--timeout",
        "20",
        "--queues",
        q.as_str(),
    ];
    for c in cmds {
        v.push("-c");
        v.push(c);
    }
    cluster.run_tool("blkmesh-io", v)
}

fn qcow2(name: &str, file: &str, backing: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Qcow2(Qcow2Options {
            file: file.into(),
            backing: backing.into(),
            ..Default::default()
        })),
    }
}

/// Serves the qcow2 image `img` as node `name` (over io_uring node
/// `name-file`) in a writable export `name` of `queues` queues; returns
/// its socket.
fn serve(cluster: &Cluster, name: &str, img: &Path, queues: u32) -> PathBuf {
    let file = format!("{name}-file");
    cluster.add_io_uring(&file, img, false, false).unwrap();
    cluster.client().add_node(qcow2(name, &file, "")).unwrap();
    cluster
        .add_export(ExportOpts::new(name, name).writable().queues(queues))
        .unwrap()
}

/// A thin 16 MiB qcow2 image with 4 KiB clusters: nearly every write of
/// the verifier allocates.
fn small_cluster_image(img: &Path) {
    host_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(img),
            "16M",
        ],
    );
}

fn cluster() -> Cluster {
    Cluster::start(ClusterOptions::default().workers(1).seccomp_enforce())
}

/// The same writes, through blkmesh and onto a raw reference with qemu-io.
const WRITES: [&str; 6] = [
    // Into unallocated clusters: whole, partial, across two clusters.
    "write -P 0x11 0 64k",
    "write -P 0x22 200k 4k",
    "write -P 0x33 60k 8k",
    // Over allocated ones (the direct path to the file).
    "write -P 0x44 4k 4k",
    // Vectored, unaligned segments.
    "writev -P 0x55 3M 4k 512 3584",
    "write_zeroes 8k 4k",
];

#[test]
fn images_from_qemu_img_are_served_and_stay_consistent() {
    let cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let img = dir.join("disk.qcow2");
    let reference = dir.join("reference.raw");
    host_tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    host_tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&reference), "16M"],
    );
    for target in [(&img, "qcow2"), (&reference, "raw")] {
        host_tool(
            "qemu-io",
            &["-f", target.1, "-c", "write -P 0xa5 1M 256k", s(target.0)],
        );
    }
    cluster
        .add_io_uring("disk-file", &img, false, false)
        .unwrap();
    let info = cluster
        .client()
        .add_node(qcow2("disk", "disk-file", ""))
        .unwrap();
    assert_eq!(info.size, 16 * MIB, "the virtual size, from the header");
    let socket = cluster
        .add_export(ExportOpts::new("disk", "disk").writable().queues(2))
        .unwrap();
    let mut cmds = vec!["info", "read -P 0xa5 1M 256k", "read -P 0 0 64k"];
    cmds.extend(WRITES);
    cmds.extend([
        "read -P 0x11 0 4k",
        "read -P 0x44 4k 4k",
        "read -P 0 8k 4k",
        "read -P 0x33 60k 8k",
        "read -q 1 -P 0x22 200k 4k",
        "flush",
    ]);
    let out = stdout_of(&io(&cluster, &socket, 2, &cmds));
    assert!(out.contains("capacity: 16777216"), "{out}");
    for w in WRITES {
        let w = w.replace("write_zeroes", "write -z");
        host_tool("qemu-io", &["-f", "raw", "-c", &w, s(&reference)]);
    }
    // Many concurrent allocating writes from both queues.
    let out = cluster.run_tool(
        "blkmesh-io",
        [
            "--socket",
            s(&socket),
            "--queues",
            "2",
            "verify",
            "--size",
            "4M",
            "--seconds",
            "2",
            "--bs-max",
            "128k",
        ],
    );
    stdout_of(&out);
    cluster.remove_export("disk").unwrap();
    // The worker closed the image: QEMU's checker finds it sound.
    host_tool("qemu-img", &["check", "-q", s(&img)]);
    // What the verifier wrote is in the first 4 MiB; compare the rest.
    let a = format!(
        "driver=raw,offset={},size={},file.driver=qcow2,file.file.filename={}",
        4 * MIB,
        12 * MIB,
        s(&img)
    );
    let b = format!(
        "driver=raw,offset={},size={},file.driver=file,file.filename={}",
        4 * MIB,
        12 * MIB,
        s(&reference)
    );
    host_tool("qemu-img", &["compare", "-q", "--image-opts", &a, &b]);
}

#[test]
fn a_backing_chain_is_named_and_the_base_stays_untouched() {
    let cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    host_tool("qemu-img", &["create", "-q", "-f", "raw", s(&base), "8M"]);
    host_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 8M", s(&base)],
    );
    qcow2_overlay(&top, s(&base), "raw", "");
    cluster.add_io_uring("base", &base, false, true).unwrap();
    cluster
        .add_io_uring("top-file", &top, false, false)
        .unwrap();
    // The header names the base; without it named, AddNode says so.
    let e = cluster
        .client()
        .add_node(qcow2("top", "top-file", ""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("names the backing file") && e.contains("base.raw"),
        "{e}"
    );
    cluster
        .client()
        .add_node(qcow2("top", "top-file", "base"))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("top", "top").writable())
        .unwrap();
    stdout_of(&io(
        &cluster,
        &socket,
        1,
        &[
            "read -P 0x77 0 1M",
            // A partial cluster: the rest is copied up from the base.
            "write -P 0x01 68k 4k",
            "read -P 0x77 64k 4k",
            "read -P 0x01 68k 4k",
            "read -P 0x77 72k 56k",
            "discard 1M 64k",
            "read -P 0 1M 64k",
            "flush",
        ],
    ));
    cluster.remove_export("top").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&top)]);
    let data = std::fs::read(&base).unwrap();
    assert!(data.iter().all(|&b| b == 0x77), "the base was written");
    // QEMU reads the overlay over its base as blkmesh served it.
    host_tool(
        "qemu-io",
        &[
            "-c",
            "read -P 0x01 68k 4k",
            "-c",
            "read -P 0x77 72k 4k",
            "-c",
            "read -P 0 1M 64k",
            s(&top),
        ],
    );
}

fn damaged(dir: &Path, name: &str, at: u64, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let img = dir.join(name);
    host_tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(bytes, at).unwrap();
    img
}

#[test]
fn damaged_images_are_refused_at_add_node() {
    let cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let cases = [
        ("size", 24, u64::MAX.to_be_bytes().to_vec(), "virtual size"),
        ("l1", 40, (1u64 << 50).to_be_bytes().to_vec(), "L1 table"),
        (
            "feature",
            72,
            (1u64 << 40).to_be_bytes().to_vec(),
            "incompatible",
        ),
        ("cluster", 20, 40u32.to_be_bytes().to_vec(), "cluster size"),
    ];
    for (name, at, bytes, why) in cases {
        let img = damaged(&dir, name, at, &bytes);
        let file = format!("{name}-file");
        cluster.add_io_uring(&file, &img, false, false).unwrap();
        let e = cluster
            .client()
            .add_node(qcow2(name, &file, ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains(why) && e.contains(s(&img)), "{name}: {e}");
        assert!(e.contains("node.qcow2.file"), "{name}: {e}");
    }
    // A qcow2 node's file must be an io_uring node.
    cluster.add_null("nothing", MIB).unwrap();
    let e = cluster
        .client()
        .add_node(qcow2("over-null", "nothing", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be an io_uring node"), "{e}");
}

#[test]
fn a_killed_worker_loses_no_allocating_write_and_leaves_the_image_sound() {
    let mut cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let img = dir.join("crash.qcow2");
    // Small clusters: nearly every verifier write allocates.
    small_cluster_image(&img);
    let socket = serve(&cluster, "crash", &img, 2);
    let out = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify_load(&socket, "6"));
        for _ in 0..2 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            cluster.kill_worker(0);
            std::thread::sleep(std::time::Duration::from_millis(200));
            cluster.start_worker(0);
        }
        load.join().unwrap()
    });
    // Every write the verifier saw complete read back as written, across
    // both kills (it checks each stripe against what it wrote last).
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains("0 errors, 0 mismatches"),
        "{}",
        output_text(&out)
    );
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("queue recovered"), "no recovery logged");
    cluster.remove_export("crash").unwrap();
    // Leaked clusters are allowed (exit status 3), corruption is not.
    let check = Command::new("qemu-img")
        .args(["check", "--output=json", s(&img)])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "qemu-img check: {}",
        output_text(&check)
    );
    assert!(!report.contains("\"corruptions\""), "{report}");
}

#[test]
fn a_live_snapshot_under_verified_load_keeps_every_write() {
    let cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let img = dir.join("live.qcow2");
    host_tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let socket = serve(&cluster, "live", &img, 2);
    let snap = dir.join("snap1.qcow2");
    let (load, switched) = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify_load(&socket, "5"));
        std::thread::sleep(std::time::Duration::from_millis(2000));
        let switched = cluster.ctl([
            "export",
            "snapshot",
            "live",
            "--image",
            s(&snap),
            "--name",
            "snap1",
        ]);
        (load.join().unwrap(), switched)
    });
    stdout_of(&switched);
    let stdout = stdout_of(&load);
    assert!(
        stdout.contains("0 errors, 0 mismatches"),
        "{}",
        output_text(&load)
    );
    // The chain as the graph names it: the overlay, then the old top.
    let info = stdout_of(&cluster.ctl(["--json", "image", "info", "--node", "snap1"]));
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(chain[0]["node"], "snap1", "{info}");
    assert_eq!(chain[1]["node"], "live", "{info}");
    assert_eq!(chain[0]["backing_file"], s(&img), "{info}");
    assert!(
        chain[0]["allocated"].as_u64().unwrap() > 0,
        "nothing written after: {info}"
    );
    // The frontend reopened the graph; the VMM stayed connected.
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("graph reopened"), "no live reopen logged");
    // A bad overlay is refused with the reason.
    let refused = cluster.ctl(["export", "snapshot", "live", "--overlay", "live-file"]);
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("must be a qcow2 node whose backing node is"),
        "{}",
        output_text(&refused)
    );
    cluster.remove_export("live").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&img)]);
    host_tool("qemu-img", &["check", "-q", s(&snap)]);
}

#[test]
fn compressed_clusters_read_and_are_rewritten() {
    let cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let raw = dir.join("source.raw");
    let img = dir.join("packed.qcow2");
    host_tool("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "4M"]);
    host_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 0 4M", s(&raw)],
    );
    host_tool(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&img),
        ],
    );
    let map = host_tool("qemu-img", &["map", "--output=json", s(&img)]);
    assert!(
        map.contains("\"compressed\": true"),
        "not compressed: {map}"
    );
    let socket = serve(&cluster, "packed", &img, 1);
    stdout_of(&io(
        &cluster,
        &socket,
        1,
        &[
            "read -P 0x3c 0 4M",
            // Into a compressed cluster: the rest of it is unpacked around.
            "write -P 0x4d 68k 4k",
            "read -P 0x3c 64k 4k",
            "read -P 0x4d 68k 4k",
            "read -P 0x3c 72k 56k",
            "flush",
        ],
    ));
    cluster.remove_export("packed").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&img)]);
    host_tool(
        "qemu-io",
        &[
            "-c",
            "read -P 0x4d 68k 4k",
            "-c",
            "read -P 0x3c 72k 56k",
            s(&img),
        ],
    );
}

#[test]
fn external_data_files_are_refused_with_a_reason() {
    let cluster = cluster();
    let dir = cluster.dir().to_path_buf();
    let img = dir.join("ext.qcow2");
    let data = dir.join("ext.data");
    host_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&data)),
            s(&img),
            "1M",
        ],
    );
    cluster
        .add_io_uring("ext-file", &img, false, false)
        .unwrap();
    let e = cluster
        .client()
        .add_node(qcow2("ext", "ext-file", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains(s(&img)) && e.contains("node.qcow2.file"), "{e}");
}

#[test]
fn a_live_move_to_another_worker_hands_the_image_over_under_load() {
    let cluster = Cluster::start(ClusterOptions::default().workers(2).seccomp_enforce());
    let dir = cluster.dir().to_path_buf();
    let img = dir.join("moved.qcow2");
    small_cluster_image(&img);
    let socket = serve(&cluster, "moved", &img, 2);
    let workers = || {
        let exports = cluster.list_exports().unwrap();
        let e = exports
            .into_iter()
            .find(|e| e.export.as_ref().is_some_and(|x| x.id == "moved"))
            .unwrap();
        let mut w: Vec<String> = e.queues.into_iter().map(|a| a.worker).collect();
        w.dedup();
        w
    };
    let from = workers();
    assert_eq!(
        from.len(),
        1,
        "a writable qcow2 export on one worker: {from:?}"
    );
    let to = if from[0] == "worker0" {
        "worker1"
    } else {
        "worker0"
    };
    let (load, moved) = std::thread::scope(|scope| {
        let load = scope.spawn(|| verify_load(&socket, "5"));
        std::thread::sleep(std::time::Duration::from_millis(2000));
        let moved = cluster.ctl(["node", "move", "moved", to]);
        (load.join().unwrap(), moved)
    });
    stdout_of(&moved);
    let stdout = stdout_of(&load);
    assert!(
        stdout.contains("0 errors, 0 mismatches"),
        "{}",
        output_text(&load)
    );
    assert_eq!(workers(), [to.to_string()]);
    cluster.remove_export("moved").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&img)]);
}

#[test]
fn a_qcow2_node_grows_live_and_never_shrinks() {
    let cluster = cluster();
    let img = cluster.dir().join("grow.qcow2");
    host_tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let socket = serve(&cluster, "grow", &img, 1);
    stdout_of(&io(&cluster, &socket, 1, &["write -P 0x61 15M 1M"]));
    stdout_of(&cluster.ctl(["node", "resize", "grow", "32M"]));
    // The worker grew the header when it reopened the graph; a client
    // connecting now sees the new size, the old data and the new range.
    let out = stdout_of(&io(
        &cluster,
        &socket,
        1,
        &[
            "info",
            "read -P 0x61 15M 1M",
            "read -P 0 16M 1M",
            "write -P 0x62 24M 64k",
            "read -P 0x62 24M 64k",
            "flush",
        ],
    ));
    assert!(out.contains("capacity: 33554432"), "{out}");
    let refused = cluster.ctl(["node", "resize", "grow", "8M"]);
    assert!(!refused.status.success(), "{}", output_text(&refused));
    cluster.remove_export("grow").unwrap();
    let info = host_tool("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    host_tool("qemu-img", &["check", "-q", s(&img)]);
    // A size below the header's is refused at AddNode.
    let small = cluster.dir().join("small.qcow2");
    host_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&small), "16M"],
    );
    cluster
        .add_io_uring("small-file", &small, false, false)
        .unwrap();
    let e = cluster
        .client()
        .add_node(NodeSpec {
            name: "small".into(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: "small-file".into(),
                size: 8 << 20,
                ..Default::default()
            })),
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node.qcow2.size") && e.contains("do not shrink"),
        "{e}"
    );
}

#[test]
fn backing_files_named_in_headers_are_followed_inside_the_allowed_directory_only() {
    let images = tempfile::tempdir().unwrap();
    let d = images.path();
    let cluster = Cluster::start(
        ClusterOptions::default()
            .workers(1)
            .seccomp_enforce()
            .manager_arg("--image-dir")
            .manager_arg(d.as_os_str()),
    );
    let base = d.join("base.raw");
    host_tool("qemu-img", &["create", "-q", "-f", "raw", s(&base), "4M"]);
    host_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 4M", s(&base)],
    );
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    let other = d.join("other.qcow2");
    for (img, backing, fmt) in [
        (&mid, "base.raw", "raw"),
        (&top, "mid.qcow2", "qcow2"),
        (&other, "base.raw", "raw"),
    ] {
        qcow2_overlay(img, backing, fmt, "");
    }
    host_tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 1M 64k", s(&mid)],
    );
    let add = |name: &str, img: &Path| {
        let file = format!("{name}-f");
        cluster.add_io_uring(&file, img, false, false).unwrap();
        cluster.ctl([
            "node",
            "add-qcow2",
            name,
            "--file",
            &file,
            "--backing-from-header",
        ])
    };
    stdout_of(&add("top", &top));
    // The chain became read-only nodes, as the headers name it.
    let info = stdout_of(&cluster.ctl(["--json", "image", "info", "--node", "top"]));
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    let nodes: Vec<&str> = (0..3).map(|i| chain[i]["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["top", "top-b1", "top-b2"], "{info}");
    // A second overlay of the same base uses the base's node.
    stdout_of(&add("other", &other));
    let info = stdout_of(&cluster.ctl(["--json", "image", "info", "--node", "other"]));
    assert!(info.contains("\"node\": \"top-b2\""), "{info}");
    // The data shows through: the base, and the middle layer's write.
    let socket = cluster
        .add_export(ExportOpts::new("top", "top").writable())
        .unwrap();
    stdout_of(&io(
        &cluster,
        &socket,
        1,
        &[
            "read -P 0x5a 0 64k",
            "read -P 0x11 1M 64k",
            "write -P 0x22 0 4k",
        ],
    ));
    cluster.remove_export("top").unwrap();
    host_tool("qemu-img", &["check", "-q", s(&top)]);
    // Outside the allowed directory: refused, naming the file.
    let outside = cluster.dir().join("outside.qcow2");
    qcow2_overlay(&outside, s(&cluster.dir().join("x.raw")), "raw", "4M");
    std::fs::write(cluster.dir().join("x.raw"), vec![0u8; 4 << 20]).unwrap();
    let refused = add("outside", &outside);
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("outside the image directories"),
        "{}",
        output_text(&refused)
    );
}

#[test]
fn an_image_left_dirty_serves_read_only_and_is_refused_for_writing() {
    let cluster = cluster();
    let img = cluster.dir().join("dirty.qcow2");
    host_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            s(&img),
            "4M",
        ],
    );
    // qemu-io's `abort` ends it as a crash would: the dirty bit stays.
    let _ = Command::new("qemu-io")
        .args(["-c", "write -P 0x42 0 64k", "-c", "abort", s(&img)])
        .output()
        .unwrap();
    cluster
        .add_io_uring("dirty-file", &img, false, false)
        .unwrap();
    let e = cluster
        .client()
        .add_node(qcow2("dirty", "dirty-file", ""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dirty bit") && e.contains("qemu-img check -r all"),
        "{e}"
    );
    // Read-only, as QEMU opens it: served.
    cluster.add_io_uring("ro-file", &img, false, true).unwrap();
    let mut spec = qcow2("ro", "ro-file", "");
    if let Some(Driver::Qcow2(q)) = &mut spec.driver {
        q.read_only = true;
    }
    cluster.client().add_node(spec).unwrap();
    let socket = cluster.add_export(ExportOpts::new("ro", "ro")).unwrap();
    let out = cluster.run_tool(
        "blkmesh-io",
        [
            "--socket",
            s(&socket),
            "--read-only",
            "-c",
            "read -P 0x42 0 64k",
        ],
    );
    stdout_of(&out);
}
