//! Reopen and resize: node options changed live under verified load, a node
//! grown while a VMM is connected (which hears of it on its back-end
//! channel), and the new size seen by a client that reconnects.
//! Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    fault_rule, Bucket, FaultInjectionOptions, FaultRule, IoOp, NodeSpec, ThrottleLimits,
    ThrottleOptions,
};
use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const MIB: u64 = 1 << 20;

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn io(cluster: &Cluster, socket: &Path, cmds: &[&str]) -> Output {
    io_with(cluster, socket, &[], cmds)
}

fn io_with(cluster: &Cluster, socket: &Path, flags: &[&str], cmds: &[&str]) -> Output {
    let mut args = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--timeout".into(),
        "30".into(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    cluster.run_tool("blkmesh-io", args)
}

fn verify(cluster: &Cluster, socket: &Path, seconds: &str) -> Output {
    cluster.run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--queues",
            "2",
            "--timeout",
            "30",
            "verify",
            "--size",
            "16M",
            "--seconds",
            seconds,
            "--bs-max",
            "64k",
        ],
    )
}

/// A VMM stand-in: negotiates CONFIG and BACKEND_REQ, hands over a
/// back-end channel, and reads the config space. No queues.
struct ConfigWatcher {
    frontend: Frontend,
    channel: UnixStream,
}

impl ConfigWatcher {
    fn connect(socket: &Path) -> ConfigWatcher {
        let mut frontend = Frontend::connect(socket, 2).expect("connect");
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let offered = frontend.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ;
        assert!(offered.contains(want), "offered {offered:?}");
        frontend.set_protocol_features(want).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        frontend.set_backend_request_fd(&theirs).unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        ConfigWatcher {
            frontend,
            channel: ours,
        }
    }

    /// Capacity in 512-byte sectors, from the config space.
    fn capacity(&mut self) -> u64 {
        let (_, payload) = self
            .frontend
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .unwrap();
        u64::from_le_bytes(payload[..8].try_into().unwrap())
    }

    /// Waits for the back-end's next message; returns its request code.
    fn next_backend_request(&mut self) -> u32 {
        let mut hdr = [0u8; 12];
        self.channel
            .read_exact(&mut hdr)
            .expect("a message on the back-end channel");
        u32::from_le_bytes(hdr[..4].try_into().unwrap())
    }
}

#[test]
fn resize_grows_the_disk_live_and_the_vmm_hears_of_it() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("grow.img", 32 * MIB);
    cluster.add_io_uring("disk", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "disk").writable())
        .unwrap();

    let mut vmm = ConfigWatcher::connect(&socket);
    assert_eq!(vmm.capacity(), 32 * MIB / 512);
    let info = cluster.client().resize_node("disk", 48 * MIB).unwrap();
    assert_eq!(info.size, 48 * MIB);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 48 * MIB);
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, then the new capacity.
    assert_eq!(vmm.next_backend_request(), 2);
    assert_eq!(vmm.capacity(), 48 * MIB / 512);
    drop(vmm);

    // A client that connects now sees the new size and can use it.
    let out = io(
        &cluster,
        &socket,
        &["info", "write -P 0x5a 40M 1M", "read -P 0x5a 40M 1M"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("capacity: {} bytes", 48 * MIB)),
        "{stdout}"
    );

    // Shrinking is refused; the size stays.
    let err = cluster.client().resize_node("disk", 16 * MIB).unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 48 * MIB);
}

#[test]
fn resize_of_a_null_node_under_a_filter_reaches_a_reconnected_client() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    cluster.add_null("zero", 8 * MIB).unwrap();
    cluster
        .client()
        .add_node(NodeSpec {
            name: "faulty".into(),
            driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                child: "zero".into(),
                ..Default::default()
            })),
        })
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("n", "faulty").writable())
        .unwrap();
    // Resizing the filter grows its child.
    cluster.client().resize_node("faulty", 24 * MIB).unwrap();
    assert_eq!(cluster.client().get_node("zero").unwrap().size, 24 * MIB);
    let out = io(&cluster, &socket, &["info", "read 20M 64k"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("capacity: {} bytes", 24 * MIB)),
        "{}",
        text(&out)
    );
}

fn throttle(iops: u64) -> NodeSpec {
    NodeSpec {
        name: "limit".into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: "disk".into(),
            limits: Some(ThrottleLimits {
                iops_total: Some(Bucket {
                    rate: iops,
                    burst: 0,
                }),
                ..Default::default()
            }),
            group: String::new(),
        })),
    }
}

fn faults(rules: Vec<FaultRule>) -> NodeSpec {
    NodeSpec {
        name: "faults".into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: "limit".into(),
            rules,
            ..Default::default()
        })),
    }
}

#[test]
fn options_change_live_under_verified_load() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("live.img", 16 * MIB);
    cluster.add_io_uring("disk", &image, false, false).unwrap();
    cluster.client().add_node(throttle(1_000_000)).unwrap();
    cluster.client().add_node(faults(vec![])).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "faults").writable().queues(2))
        .unwrap();

    // Throttle limits and fault rules (delays) change while verified
    // random I/O runs: no error, no mismatch, no reconnect.
    let delay = FaultRule {
        probability: 0.2,
        action: Some(fault_rule::Action::DelayNs(2_000_000)),
        ..Default::default()
    };
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| verify(&cluster, &socket, "4"));
        std::thread::sleep(Duration::from_millis(800));
        for spec in [
            throttle(2000),
            faults(vec![delay.clone()]),
            throttle(500),
            faults(vec![]),
            throttle(1_000_000),
        ] {
            cluster.client().update_node(spec).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        load.join().unwrap()
    });
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 errors, 0 mismatches"), "{stdout}");

    // A fault rule added live reaches the client as an I/O error...
    let eio = FaultRule {
        ops: vec![IoOp::Write as i32],
        action: Some(fault_rule::Action::Errno(libc::EIO)),
        ..Default::default()
    };
    cluster.client().update_node(faults(vec![eio])).unwrap();
    let out = io(&cluster, &socket, &["write -P 1 0 4k"]);
    assert!(!out.status.success(), "{}", text(&out));
    // ...and removing it heals the export.
    cluster.client().update_node(faults(vec![])).unwrap();
    let out = io(&cluster, &socket, &["write -P 1 0 4k", "read -P 1 0 4k"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn read_only_switches_live() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("ro.img", 8 * MIB);
    cluster.add_io_uring("disk", &image, false, false).unwrap();
    let socket = cluster.add_export(ExportOpts::new("d", "disk")).unwrap();
    let ro = |on: bool| NodeSpec {
        name: "disk".into(),
        driver: Some(Driver::IoUring(blkmesh_proto::v1::IoUringOptions {
            path: image.display().to_string(),
            direct: false,
            read_only: on,
        })),
    };
    // The export is read-only itself, so its node may become read-only.
    cluster.client().update_node(ro(true)).unwrap();
    let out = io_with(&cluster, &socket, &["--read-only"], &["read 0 4k"]);
    assert!(out.status.success(), "{}", text(&out));
    cluster.client().update_node(ro(false)).unwrap();
    let out = io_with(&cluster, &socket, &["--read-only"], &["read 0 4k"]);
    assert!(out.status.success(), "{}", text(&out));

    // A node under a writable export cannot become read-only.
    cluster.remove_export("d").unwrap();
    cluster
        .add_export(ExportOpts::new("w", "disk").writable())
        .unwrap();
    let err = cluster.client().update_node(ro(true)).unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
}

#[test]
fn an_export_whose_graph_cannot_open_is_refused() {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("gone.img", 8 * MIB);
    cluster.add_io_uring("disk", &image, false, false).unwrap();
    // The manager checked the file at AddNode; it goes away before the
    // export is added, so the worker cannot open it.
    std::fs::remove_file(&image).unwrap();
    let err = cluster
        .add_export(ExportOpts::new("d", "disk").writable())
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("gone.img"), "{err}");
    assert!(cluster.list_exports().unwrap().is_empty());
}
