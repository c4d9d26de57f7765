//! Node kinds end to end: the protocol leaves beyond io_uring, and the
//! filters, driven through the real processes. Build the binaries first:
//! `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkmesh_proto::v1::{
    fault_rule, node_spec::Driver, Bucket, FaultInjectionOptions, FaultRule, IoOp, NodeSpec,
    ThrottleLimits, ThrottleOptions, VirtioBlkVhostUserOptions,
};
use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};

const MIB: u64 = 1 << 20;

fn io(cluster: &Cluster, socket: &Path, args: &[&str]) -> Output {
    let mut v = vec!["--socket", socket.to_str().unwrap(), "--timeout", "20"];
    v.extend_from_slice(args);
    cluster.run_tool("blkmesh-io", v)
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

fn node(name: &str, driver: Driver) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(driver),
    }
}

/// qemu-storage-daemon exporting `image` over vhost-user-blk; killed on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Qsd {
    fn start(dir: &Path, image: &Path) -> Option<Qsd> {
        let socket = dir.join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!(
                    "driver=file,node-name=f0,filename={},cache.direct=off,aio=io_uring",
                    image.display()
                ),
                "--blockdev",
                "driver=raw,node-name=r0,file=f0,discard=unmap",
                "--export",
                &format!(
                    "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={},writable=on,num-queues=2",
                    socket.display()
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Qsd { child, socket })
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn virtio_blk_vhost_user_leaf_chains_to_qemu_storage_daemon() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("behind-qsd.img", 16 * MIB);
    // qemu-storage-daemon comes with scripts/deps.sh; its absence fails.
    let qsd = Qsd::start(cluster.dir(), &image).unwrap_or_else(|| {
        panic!("qemu-storage-daemon did not start (is it installed? scripts/deps.sh installs it)")
    });
    let info = cluster
        .client()
        .add_node(node(
            "chain",
            Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                path: qsd.socket.display().to_string(),
                read_only: false,
            }),
        ))
        .unwrap();
    assert_eq!(info.spec.unwrap().name, "chain");
    let socket = cluster
        .add_export(ExportOpts::new("chain", "chain").writable().queues(2))
        .unwrap();
    let out = ok(&io(
        &cluster,
        &socket,
        &[
            "--queues",
            "2",
            "-c",
            "info",
            "-c",
            "write -P 0x5c 1M 256k",
            "-c",
            "read -q 1 -P 0x5c 1M 256k",
            "-c",
            "writev -P 0x6d 4M 4k 512 3584",
            "-c",
            "flush",
        ],
    ));
    assert!(out.contains("capacity: 16777216"), "{out}");
    // The bytes went through blkmesh into qsd and onto qsd's image.
    let data = std::fs::read(&image).unwrap();
    assert!(data[MIB as usize..(MIB + 256 * 1024) as usize]
        .iter()
        .all(|&b| b == 0x5c));
    assert!(data[4 * MIB as usize..(4 * MIB + 8192) as usize]
        .iter()
        .all(|&b| b == 0x6d));
}

fn fault_rule(ops: &[IoOp], start: u64, end: u64, count: u64, errno: i32) -> FaultRule {
    FaultRule {
        ops: ops.iter().map(|o| *o as i32).collect(),
        offset_start: start,
        offset_end: end,
        skip: 0,
        count,
        probability: 0.0,
        action: Some(fault_rule::Action::Errno(errno)),
    }
}

#[test]
fn fault_injection_fails_matching_requests_only() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("f.img", 8 * MIB);
    cluster.add_io_uring("base", &image, false, false).unwrap();
    cluster
        .client()
        .add_node(node(
            "faulty",
            Driver::FaultInjection(FaultInjectionOptions {
                child: "base".into(),
                rules: vec![
                    // Writes into the second MiB fail twice with EIO.
                    fault_rule(&[IoOp::Write], MIB, 2 * MIB, 2, libc::EIO),
                    // Reads of the last MiB always fail with ENODATA.
                    fault_rule(&[IoOp::Read], 7 * MIB, 0, 0, libc::ENODATA),
                ],
                ..Default::default()
            }),
        ))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("faulty", "faulty").writable())
        .unwrap();
    let out = io(
        &cluster,
        &socket,
        &[
            "--keep-going",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 4k",
            "-c",
            "write -P 2 1M 4k",
            "-c",
            "write -P 2 1M 4k",
            "-c",
            "read -P 2 1M 4k",
            "-c",
            "read 7M 4k",
            "-c",
            "read -P 1 0 64k",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Two injected write errors, then the third write succeeds; the read of
    // the last MiB gets an I/O error (virtio has no ENODATA: EIO).
    assert_eq!(stdout.matches("write failed").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("read failed").count(), 1, "{stdout}");
    assert!(
        stdout.contains("read 4096/4096 bytes at offset 1048576"),
        "{stdout}"
    );
    assert!(
        stdout.contains("read 65536/65536 bytes at offset 0"),
        "{stdout}"
    );
}

#[test]
fn delay_rule_adds_latency() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    cluster.add_null("nul", 64 * MIB).unwrap();
    let mut rule = fault_rule(&[IoOp::Read], 0, 0, 0, 0);
    rule.action = Some(fault_rule::Action::DelayNs(20_000_000));
    cluster
        .client()
        .add_node(node(
            "slow",
            Driver::FaultInjection(FaultInjectionOptions {
                child: "nul".into(),
                rules: vec![rule],
                ..Default::default()
            }),
        ))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("slow", "slow").writable())
        .unwrap();
    let t = Instant::now();
    ok(&io(
        &cluster,
        &socket,
        &["-c", "read 0 4k", "-c", "read 4k 4k", "-c", "write 0 4k"],
    ));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(40),
        "two 20 ms delays, took {took:?}"
    );
}

fn bench_iops(cluster: &Cluster, socket: &Path, rw: &str, seconds: &str) -> f64 {
    let out = ok(&io(
        cluster,
        socket,
        &[
            "bench",
            "--rw",
            rw,
            "--bs",
            "4k",
            "--qd",
            "8",
            "--seconds",
            seconds,
            "--warmup",
            "0",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap();
    v["iops"].as_f64().unwrap()
}

fn throttle(name: &str, child: &str, iops: u64, group: &str) -> NodeSpec {
    node(
        name,
        Driver::Throttle(ThrottleOptions {
            child: child.into(),
            limits: Some(ThrottleLimits {
                iops_total: Some(Bucket {
                    rate: iops,
                    burst: 0,
                }),
                ..Default::default()
            }),
            group: group.into(),
        }),
    )
}

#[test]
fn throttle_holds_its_iops_rate() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    cluster.add_null("nul", 64 * MIB).unwrap();
    cluster
        .client()
        .add_node(throttle("slow", "nul", 500, ""))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("slow", "slow").writable())
        .unwrap();
    // The first second is the burst (one second's worth); over 3 s the
    // average is (3 + 1) * 500 / 3 at most.
    let iops = bench_iops(&cluster, &socket, "randread", "3");
    assert!(
        (400.0..=750.0).contains(&iops),
        "{iops} IOPS against a 500 IOPS limit"
    );
}

#[test]
fn throttle_group_is_shared_by_its_nodes() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.add_null("n1", 64 * MIB).unwrap();
    cluster.add_null("n2", 64 * MIB).unwrap();
    let group = format!("g{}", std::process::id());
    cluster
        .client()
        .add_node(throttle("t1", "n1", 400, &group))
        .unwrap();
    cluster
        .client()
        .add_node(throttle("t2", "n2", 400, &group))
        .unwrap();
    let s1 = cluster
        .add_export(ExportOpts::new("t1", "t1").writable())
        .unwrap();
    let s2 = cluster
        .add_export(ExportOpts::new("t2", "t2").writable())
        .unwrap();
    // The two exports land on different workers; run them at once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| bench_iops(&cluster, &s1, "randread", "3"));
        let b = s.spawn(|| bench_iops(&cluster, &s2, "randwrite", "3"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let _ = std::fs::remove_file(format!("/dev/shm/blkmesh-throttle-{group}"));
    assert!(
        (300.0..=650.0).contains(&(a + b)),
        "{a} + {b} IOPS against a shared 400 IOPS limit"
    );
}

#[test]
fn statistics_reach_the_manager_from_frontend_and_worker() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    cluster.add_null("nul", 64 * MIB).unwrap();
    let mut rule = fault_rule(&[IoOp::Write], 0, 0, 1, libc::EIO);
    rule.skip = 0;
    cluster
        .client()
        .add_node(node(
            "faulty",
            Driver::FaultInjection(FaultInjectionOptions {
                child: "nul".into(),
                rules: vec![rule],
                ..Default::default()
            }),
        ))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("st", "faulty").writable().queues(2))
        .unwrap();
    let out = io(
        &cluster,
        &socket,
        &[
            "--queues",
            "2",
            "--keep-going",
            "-c",
            "write 0 4k",
            "-c",
            "read 0 64k",
            "-c",
            "read -q 1 0 64k",
            "-c",
            "write 0 4k",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Reports arrive about once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.ctl(["--json", "stats"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let export = &v["exports"][0]["io"];
        let node = v["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == "faulty"))
            .cloned()
            .unwrap_or_default();
        let reads = export["read"]["ops"].as_u64().unwrap_or(0);
        let read_bytes = export["read"]["bytes"].as_u64().unwrap_or(0);
        let writes = export["write"]["ops"].as_u64().unwrap_or(0);
        let write_errors = export["write"]["errors"].as_u64().unwrap_or(0);
        let node_reads = node["io"]["read"]["ops"].as_u64().unwrap_or(0);
        if reads == 2 && writes == 2 && node_reads == 2 {
            assert_eq!(read_bytes, 2 * 65536, "{v}");
            assert_eq!(write_errors, 1, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "stats never arrived: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn absent_nvme_and_vdpa_hardware_fails_clearly_without_hanging() {
    use blkmesh_proto::v1::{NvmeIoUringOptions, VirtioBlkVhostVdpaOptions};
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    // Character devices that are not NVMe or vDPA devices.
    let client = cluster.client();
    client
        .add_node(node(
            "nv",
            Driver::NvmeIoUring(NvmeIoUringOptions {
                path: "/dev/null".into(),
                read_only: false,
            }),
        ))
        .unwrap();
    client
        .add_node(node(
            "vd",
            Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
                path: "/dev/zero".into(),
                read_only: false,
            }),
        ))
        .unwrap();
    // A path that does not exist is refused at once by the manager.
    let missing = client
        .add_node(node(
            "gone",
            Driver::NvmeIoUring(NvmeIoUringOptions {
                path: "/dev/ng-does-not-exist".into(),
                read_only: false,
            }),
        ))
        .unwrap_err();
    assert_eq!(
        missing.code(),
        Some(tonic::Code::InvalidArgument),
        "{missing}"
    );
    // AddExport fails at once with the driver's reason from the worker, and
    // the export is not kept.
    for (id, path) in [("nv", "/dev/null"), ("vd", "/dev/zero")] {
        let err = client
            .add_export(blkmesh_proto::v1::VhostUserBlkExport {
                id: id.into(),
                node: id.into(),
                socket: cluster
                    .run_dir()
                    .join(format!("{id}.sock"))
                    .display()
                    .to_string(),
                writable: true,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
        assert!(
            err.to_string().contains(&format!("node {id}: open {path}")),
            "{err}"
        );
    }
    assert!(cluster.list_exports().unwrap().is_empty());
    // The worker is still healthy: a good export next to them works.
    cluster.add_null("ok", 8 * MIB).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("ok", "ok").writable())
        .unwrap();
    ok(&io(
        &cluster,
        &socket,
        &["-c", "write 0 4k", "-c", "read -P 0 0 4k"],
    ));
}
