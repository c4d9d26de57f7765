use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::stages::Stage;
use blkmesh_proto::v1::{FaultInjectionOptions, ZonedOptions};
use blkmesh_proto::v1::{IoUringOptions, NullOptions, RawOptions, VhostUserBlkExport, ZoneModel};

fn plan(root: &str, nodes: Vec<NodeSpec>, writable: bool) -> ExportPlan {
    ExportPlan {
        commit_finish: String::new(),
        export: Some(VhostUserBlkExport {
            id: "e".into(),
            node: root.into(),
            socket: "/tmp/x".into(),
            writable,
            ..Default::default()
        }),
        nodes,
        queues: vec![],
        generation: 0,
    }
}

fn null(name: &str, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Null(NullOptions {
            size,
            latency_ns: 0,
        })),
    }
}

fn raw(name: &str, child: &str, offset: u64, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Raw(RawOptions {
            child: child.into(),
            offset,
            size,
        })),
    }
}

#[test]
fn raw_windows_compose() {
    let g = open(&plan(
        "outer",
        vec![
            raw("outer", "inner", 4096, 8192),
            raw("inner", "n", 1 << 20, 0),
            null("n", 4 << 20),
        ],
        true,
    ))
    .unwrap();
    let shift: u64 = g
        .stages
        .iter()
        .map(|s| match s {
            Stage::Window { offset } => *offset,
            _ => 0,
        })
        .sum();
    assert_eq!(shift, (1 << 20) + 4096);
    assert_eq!(g.limits.size, 8192);
    assert!(!g.read_only());
}

#[test]
fn rejects_window_larger_than_child() {
    let e = open(&plan(
        "r",
        vec![raw("r", "n", 0, 1 << 30), null("n", 1 << 20)],
        true,
    ))
    .unwrap_err();
    assert_eq!(e.errno.get(), libc::EINVAL);
}

#[test]
fn rejects_cycles() {
    let e = open(&plan(
        "a",
        vec![raw("a", "b", 0, 0), raw("b", "a", 0, 0)],
        true,
    ))
    .unwrap_err();
    assert!(e.message.contains("cycle"), "{}", e.message);
}

#[test]
fn rejects_missing_node() {
    assert!(open(&plan("a", vec![raw("a", "zz", 0, 0)], true)).is_err());
}

#[test]
fn io_uring_reports_file_size_and_read_only() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(3 << 20).unwrap();
    let n = NodeSpec {
        name: "f".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: f.path().display().to_string(),
            direct: false,
            read_only: true,
        })),
    };
    let g = open(&plan("f", vec![n], false)).unwrap();
    assert_eq!(g.limits.size, 3 << 20);
    assert!(g.read_only());
}

#[test]
fn io_uring_missing_file_is_enoent() {
    let n = NodeSpec {
        name: "f".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: "/nonexistent/blkmesh.img".into(),
            direct: false,
            read_only: false,
        })),
    };
    let e = open(&plan("f", vec![n], true)).unwrap_err();
    assert_eq!(e.errno.get(), libc::ENOENT, "{}", e.message);
}

fn faulty(name: &str, child: &str, mt: u64, segs: u32, align: u32) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            rules: vec![],
            max_transfer: mt,
            max_segments: segs,
            buf_alignment: align,
        })),
    }
}

#[test]
fn fault_injection_knobs_merge_strictest_wins() {
    // Outer node: 64 KiB and alignment 512; inner: 8 KiB, 2 segments,
    // alignment 4096. The window in between changes nothing.
    let g = open(&plan(
        "outer",
        vec![
            faulty("outer", "win", 64 << 10, 0, 512),
            raw("win", "inner", 4096, 0),
            faulty("inner", "n", 8192, 2, 4096),
            null("n", 1 << 20),
        ],
        true,
    ))
    .unwrap();
    assert_eq!(g.limits.max_transfer, 8192);
    assert_eq!(g.limits.max_segments, 2);
    assert_eq!(g.limits.buf_alignment, 4096);
    assert_eq!(g.limits.size, (1 << 20) - 4096);
    assert_eq!(g.stages.len(), 3);

    // Knobs at 0 keep the leaf's own limits.
    let g = open(&plan(
        "f",
        vec![faulty("f", "n", 0, 0, 0), null("n", 1 << 20)],
        true,
    ))
    .unwrap();
    assert_eq!(g.limits.max_transfer, 0);
    assert_eq!(g.limits.max_segments, 0);
    assert_eq!(g.limits.buf_alignment, 1);
}

#[test]
fn fault_injection_knobs_tighten_a_libblkio_leaf() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let leaf = NodeSpec {
        name: "file".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: f.path().display().to_string(),
            direct: false,
            read_only: false,
        })),
    };
    let plain = open(&plan("file", vec![leaf.clone()], true)).unwrap();
    let g = open(&plan(
        "f",
        vec![faulty("f", "file", 8192, 2, 4096), leaf],
        true,
    ))
    .unwrap();
    assert_eq!(g.limits.max_transfer, 8192);
    assert_eq!(g.limits.max_segments, 2);
    assert_eq!(g.limits.buf_alignment, 4096);
    // What the knobs do not touch stays the leaf's.
    assert_eq!(g.limits.size, plain.limits.size);
    assert_eq!(g.limits.request_alignment, plain.limits.request_alignment);
    assert_eq!(g.limits.max_discard, plain.limits.max_discard);
    assert!(plain.limits.buf_alignment.is_power_of_two());
}

#[test]
fn bad_fault_injection_knobs_are_refused() {
    for (mt, align) in [(1000, 0), (0, 3000), (0, 8192)] {
        let e = open(&plan(
            "f",
            vec![faulty("f", "n", mt, 0, align), null("n", 1 << 20)],
            true,
        ))
        .unwrap_err();
        assert_eq!(e.errno.get(), libc::EINVAL, "{}", e.message);
        assert!(e.message.contains("node f"), "{}", e.message);
    }
}

fn zoned(name: &str, child: &str, meta: &Path, zone_size: u64, cap: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: child.into(),
            zone_size,
            zone_capacity: cap,
            max_open_zones: 4,
            max_active_zones: 6,
            metadata_path: meta.display().to_string(),
        })),
    }
}

fn throttle(name: &str, child: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Throttle(blkmesh_proto::v1::ThrottleOptions {
            child: child.into(),
            limits: Some(blkmesh_proto::v1::ThrottleLimits {
                iops_total: Some(blkmesh_proto::v1::Bucket {
                    rate: 1_000_000,
                    burst: 0,
                }),
                ..Default::default()
            }),
            group: String::new(),
        })),
    }
}

const ZS: u64 = 1 << 20;

#[test]
fn a_regular_graph_reports_no_zones() {
    let g = open(&plan("n", vec![null("n", 1 << 20)], true)).unwrap();
    let z = g.limits.zones.unwrap();
    assert_eq!(z.model, ZoneModel::None as i32);
    assert!(g.zoned.is_none());
    assert!(g.limits.max_discard > 0);
}

#[test]
fn zoned_node_emulates_whole_zones_of_its_child() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("zones");
    // 10.5 zones of child: the half zone is not exposed.
    let g = open(&plan(
        "z",
        vec![
            zoned("z", "n", &meta, ZS, 768 << 10),
            null("n", 10 * ZS + ZS / 2),
        ],
        true,
    ))
    .unwrap();
    let z = g.limits.zones.unwrap();
    assert_eq!(z.model, ZoneModel::HostManaged as i32);
    assert_eq!(
        (z.zone_size, z.zone_capacity, z.nr_zones),
        (ZS, 768 << 10, 10)
    );
    assert_eq!((z.max_open_zones, z.max_active_zones), (4, 6));
    assert_eq!(z.write_granularity, 512);
    assert_eq!(z.max_append, 768 << 10, "capacity below the 1 MiB default");
    assert_eq!(g.limits.size, 10 * ZS);
    assert_eq!(g.limits.max_discard, 0);
    let a = g.zoned.as_ref().unwrap();
    assert_eq!((a.shift, a.first, a.count, a.stage), (0, 0, 10, 0));
    assert!(matches!(g.stages[0], Stage::Zoned(_)));
    assert!(meta.is_file());
}

#[test]
fn zone_info_passes_through_windows_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("zones");
    // throttle -> raw (zones 2..6) -> faults (64 KiB transfers) ->
    // zoned -> raw below (any alignment) -> null.
    let g = open(&plan(
        "t",
        vec![
            throttle("t", "w"),
            raw("w", "f", 2 * ZS, 4 * ZS),
            faulty("f", "z", 64 << 10, 0, 0),
            zoned("z", "below", &meta, ZS, 0),
            raw("below", "n", 4096, 0),
            null("n", 16 * ZS),
        ],
        true,
    ))
    .unwrap();
    let z = g.limits.zones.unwrap();
    assert_eq!(z.nr_zones, 4);
    assert_eq!(z.max_append, 64 << 10, "bounded by the max transfer");
    assert_eq!(g.limits.size, 4 * ZS);
    let a = g.zoned.as_ref().unwrap();
    assert_eq!((a.shift, a.first, a.count), (2 * ZS, 2, 4));
    // Stages: throttle, window, faults, zoned, window below.
    assert_eq!(a.stage, 3);
    assert!(matches!(g.stages[3], Stage::Zoned(_)));
    assert!(matches!(g.stages[4], Stage::Window { offset: 4096 }));
    // The layer has the child's 15 whole zones (16 MiB - 4 KiB).
    assert_eq!(a.layer.geometry().nr_zones, 15);
}

#[test]
fn windows_over_zones_must_be_zone_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("zones");
    for (offset, size) in [(4096, 0), (0, ZS + 4096), (ZS / 2, ZS / 2)] {
        let e = open(&plan(
            "w",
            vec![
                raw("w", "z", offset, size),
                zoned("z", "n", &meta, ZS, 0),
                null("n", 8 * ZS),
            ],
            true,
        ))
        .unwrap_err();
        assert_eq!(e.errno.get(), libc::EINVAL);
        assert!(
            e.message.contains("node w") && e.message.contains("zone size"),
            "{}",
            e.message
        );
    }
}

#[test]
fn bad_zoned_graphs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("zones");
    // Zoned over zoned.
    let e = open(&plan(
        "a",
        vec![
            zoned("a", "b", &meta, ZS, 0),
            zoned("b", "n", &dir.path().join("b"), ZS, 0),
            null("n", 8 * ZS),
        ],
        true,
    ))
    .unwrap_err();
    assert!(e.message.contains("regular child"), "{}", e.message);
    // A child smaller than a zone.
    let e = open(&plan(
        "a",
        vec![zoned("a", "n", &meta, ZS, 0), null("n", ZS / 2)],
        true,
    ))
    .unwrap_err();
    assert!(e.message.contains("less than one zone"), "{}", e.message);
    // Metadata of another geometry.
    open(&plan(
        "a",
        vec![zoned("a", "n", &meta, ZS, 0), null("n", 4 * ZS)],
        true,
    ))
    .unwrap();
    let e = open(&plan(
        "a",
        vec![zoned("a", "n", &meta, ZS, 0), null("n", 5 * ZS)],
        true,
    ))
    .unwrap_err();
    assert!(e.message.contains("remove the file"), "{}", e.message);
    // Metadata in a missing directory.
    let e = open(&plan(
        "a",
        vec![
            zoned("a", "n", &dir.path().join("no/such/dir"), ZS, 0),
            null("n", 4 * ZS),
        ],
        true,
    ))
    .unwrap_err();
    assert_eq!(e.errno.get(), libc::ENOENT, "{}", e.message);
}

#[test]
fn graphs_of_one_zoned_node_share_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("zones");
    let p = plan(
        "z",
        vec![zoned("z", "n", &meta, ZS, 0), null("n", 4 * ZS)],
        true,
    );
    let a = open(&p).unwrap();
    let b = open(&p).unwrap();
    let (la, lb) = (
        &a.zoned.as_ref().unwrap().layer,
        &b.zoned.as_ref().unwrap().layer,
    );
    assert!(Arc::ptr_eq(la, lb));
    // A graph over a window of the same node shares it too, and may
    // narrow the open limit (a reopen).
    let mut nodes = p.nodes.clone();
    if let Some(Driver::Zoned(o)) = &mut nodes[0].driver {
        o.max_open_zones = 2;
    }
    let c = open(&plan("z", nodes, true)).unwrap();
    assert!(Arc::ptr_eq(la, &c.zoned.as_ref().unwrap().layer));
    assert_eq!(la.limits().max_open, 2);
    // Once all are closed, the file can be opened afresh.
    drop((c, b, a));
    let d = open(&p).unwrap();
    assert_eq!(d.limits.zones.unwrap().nr_zones, 4);
}

#[test]
fn zoned_over_a_file_reports_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("img");
    std::fs::write(&f, b"").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(8 * ZS)
        .unwrap();
    let leaf = NodeSpec {
        name: "file".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: f.display().to_string(),
            direct: false,
            read_only: false,
        })),
    };
    let mut p = plan(
        "z",
        vec![zoned("z", "file", &dir.path().join("zones"), ZS, 0), leaf],
        true,
    );
    p.export.as_mut().unwrap().logical_block_size = 4096;
    let g = open(&p).unwrap();
    let z = g.limits.zones.unwrap();
    assert_eq!((z.nr_zones, z.write_granularity), (8, 4096));
    assert!(z.max_append >= 4096 && z.max_append <= DEFAULT_MAX_APPEND);
    assert_eq!(z.max_append % 4096, 0);
    assert!(!g.discard_punches_holes || g.limits.max_discard == 0);
}

#[test]
fn max_append_is_whole_granules() {
    assert_eq!(max_append(ZS, 0, 512), DEFAULT_MAX_APPEND);
    assert_eq!(max_append(ZS, 12 * 1024 + 512, 4096), 12 * 1024);
    assert_eq!(max_append(ZS, 1024, 4096), 4096);
    assert_eq!(max_append(64 << 10, 0, 512), 64 << 10);
}

#[test]
fn serial_is_padded_and_printable() {
    assert_eq!(&serial("", "disk0")[..6], b"disk0\0");
    assert_eq!(serial("a\u{1}b", "x")[..3], *b"ab\0");
}
