use super::*;
use blkmesh_graph::kinds::zoned::{update_conflict, zone_source, zoned_size};
use blkmesh_graph::ErrorClass;

use crate::core::fixtures::{faults, raw, sized_state as state};
use blkmesh_proto::v1::{IoUringOptions, NullOptions, ThrottleOptions};

const MIB: u64 = 1 << 20;

fn null(name: &str, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Null(NullOptions {
            size,
            latency_ns: 0,
        })),
    }
}

fn zoned(name: &str, child: &str, zone_size: u64, cap: u64, meta: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: child.into(),
            zone_size,
            zone_capacity: cap,
            max_open_zones: 4,
            max_active_zones: 8,
            metadata_path: meta.into(),
        })),
    }
}

fn throttle(name: &str, child: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: child.into(),
            limits: Some(blkmesh_proto::v1::ThrottleLimits {
                iops_total: Some(blkmesh_proto::v1::Bucket { rate: 10, burst: 0 }),
                ..Default::default()
            }),
            group: String::new(),
        })),
    }
}

fn file(name: &str, path: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: path.into(),
            direct: false,
            read_only: false,
        })),
    }
}

#[test]
fn size_is_whole_zones() {
    let Some(Driver::Zoned(o)) = zoned("z", "n", MIB, 0, "/m").driver else {
        unreachable!()
    };
    assert_eq!(zoned_size(&o, 10 * MIB + 4096), 10 * MIB);
    assert_eq!(zoned_size(&o, 0), 0);
    assert_eq!(zone_capacity(&o), MIB);
}

#[test]
fn info_of_zoned_node_and_its_parents() {
    let s = state(
        vec![
            null("n", 64 * MIB),
            zoned("z", "n", 4 * MIB, 3 * MIB, "/m"),
            raw("r", "z", 8 * MIB, 16 * MIB),
            faults("x", "r", 256 << 10),
            throttle("t", "x"),
        ],
        &[
            ("n", 64 * MIB),
            ("z", 64 * MIB),
            ("r", 16 * MIB),
            ("x", 16 * MIB),
            ("t", 16 * MIB),
        ],
    );
    let z = zone_info(&s.graph, &s.sizes, "z").unwrap();
    assert_eq!(z.model, ZoneModel::HostManaged as i32);
    assert_eq!(
        (z.zone_size, z.zone_capacity, z.nr_zones),
        (4 * MIB, 3 * MIB, 16)
    );
    assert_eq!((z.max_open_zones, z.max_active_zones), (4, 8));
    assert_eq!((z.write_granularity, z.max_append), (512, MIB));
    let r = zone_info(&s.graph, &s.sizes, "r").unwrap();
    assert_eq!(r.nr_zones, 4);
    let x = zone_info(&s.graph, &s.sizes, "x").unwrap();
    assert_eq!((x.nr_zones, x.max_append), (4, 256 << 10));
    assert_eq!(zone_info(&s.graph, &s.sizes, "t").unwrap(), x);
    assert_eq!(zone_info(&s.graph, &s.sizes, "n"), None);
    assert_eq!(zone_source(&s.graph, "t").unwrap().name, "z");
    assert_eq!(zoned_in_graph(&s.graph, "t"), Some("z"));
    assert_eq!(zoned_in_graph(&s.graph, "n"), None);
}

#[test]
fn max_append_is_clamped_to_a_small_capacity() {
    let s = state(
        vec![
            null("n", 64 * MIB),
            zoned("z", "n", 64 << 10, 16 << 10, "/m"),
        ],
        &[("n", 64 * MIB), ("z", 64 * MIB)],
    );
    let z = zone_info(&s.graph, &s.sizes, "z").unwrap();
    assert_eq!(
        (z.zone_capacity, z.max_append, z.nr_zones),
        (16 << 10, 16 << 10, 1024)
    );
    // Unknown child size: no zones counted yet.
    let s = state(
        vec![null("n", 64 * MIB), zoned("z", "n", MIB, 0, "/m")],
        &[],
    );
    assert_eq!(zone_info(&s.graph, &s.sizes, "z").unwrap().nr_zones, 0);
}

#[test]
fn structure_rules() {
    let s = state(
        vec![
            null("n", 64 * MIB),
            zoned("z", "n", MIB, 0, "/m"),
            throttle("t", "z"),
            null("n2", 64 * MIB),
            file("f", "/img"),
        ],
        &[("n", 64 * MIB), ("z", 64 * MIB), ("t", 64 * MIB)],
    );
    let e = check_add(&s, &zoned("zz", "z", MIB, 0, "/m2")).unwrap_err();
    assert_eq!(e.field(), Some("node.zoned.child"));
    assert!(e.to_string().contains("node \"z\" is zoned"), "{e}");
    let e = check_add(&s, &zoned("zz", "t", MIB, 0, "/m2")).unwrap_err();
    assert!(e.to_string().contains("over zoned node \"z\""), "{e}");
    let e = check_add(&s, &zoned("zz", "n2", MIB, 0, "/m")).unwrap_err();
    assert_eq!(e.class(), ErrorClass::AlreadyExists);
    assert_eq!(e.field(), Some("node.zoned.metadata_path"));
    let e = check_add(&s, &zoned("zz", "n2", MIB, 0, "//img")).unwrap_err();
    assert_eq!(e.field(), Some("node.zoned.metadata_path"));
    let e = check_add(&s, &file("g", "/./m")).unwrap_err();
    assert_eq!(e.field(), Some("node.io_uring.path"));
    check_add(&s, &zoned("zz", "n2", MIB, 0, "/m2")).unwrap();

    let e = check_add(&s, &raw("r", "t", 4096, 0)).unwrap_err();
    assert_eq!(e.field(), Some("node.raw.offset"));
    let e = check_add(&s, &raw("r", "t", MIB, MIB + 4096)).unwrap_err();
    assert_eq!(e.field(), Some("node.raw.size"));
    check_add(&s, &raw("r", "t", MIB, 2 * MIB)).unwrap();
    check_add(&s, &raw("r", "n2", 4096, 0)).unwrap();
}

#[test]
fn zone_count_limits_at_add() {
    let s = state(vec![null("n", 64 * MIB)], &[("n", 64 * MIB)]);
    let e = check_add(&s, &zoned("z", "n", 128 * MIB, 0, "/m")).unwrap_err();
    assert_eq!(e.field(), Some("node.zoned.zone_size"));
    let s = state(vec![null("n", 64 * MIB)], &[("n", u64::MAX - 511)]);
    let e = check_add(&s, &zoned("z", "n", 64 << 10, 0, "/m")).unwrap_err();
    assert!(e.to_string().contains("more than 1048576 zones"), "{e}");
    let s = state(vec![null("n", 64 * MIB)], &[("n", (1 << 20) * (64 << 10))]);
    check_add(&s, &zoned("z", "n", 64 << 10, 0, "/m")).unwrap();
    let s = state(
        vec![null("n", 64 * MIB)],
        &[("n", ((1 << 20) + 1) * (64 << 10))],
    );
    check_add(&s, &zoned("z", "n", 64 << 10, 0, "/m")).unwrap_err();
}

#[test]
fn resize_conflicts() {
    let s = state(
        vec![
            null("n", 64 * MIB),
            raw("below", "n", 0, 0),
            zoned("z", "below", MIB, 0, "/m"),
            throttle("t", "z"),
            null("free", MIB),
        ],
        &[],
    );
    assert!(resize_conflict(&s.graph, "z").unwrap().contains("is zoned"));
    assert!(resize_conflict(&s.graph, "t")
        .unwrap()
        .contains("over zoned node \"z\""));
    assert!(resize_conflict(&s.graph, "below")
        .unwrap()
        .contains("under zoned node \"z\""));
    assert!(resize_conflict(&s.graph, "n")
        .unwrap()
        .contains("under zoned node \"z\""));
    assert_eq!(resize_conflict(&s.graph, "free"), None);
}

#[test]
fn every_zoned_option_is_fixed() {
    let Some(Driver::Zoned(a)) = zoned("z", "n", MIB, 0, "/m").driver else {
        unreachable!()
    };
    update_conflict(&a, &a).unwrap();
    type Edit = fn(&mut ZonedOptions);
    let cases: [(&str, Edit); 6] = [
        ("node.zoned.child", |o| o.child = "m".into()),
        ("node.zoned.zone_size", |o| o.zone_size *= 2),
        ("node.zoned.zone_capacity", |o| o.zone_capacity = 4096),
        ("node.zoned.max_open_zones", |o| o.max_open_zones = 1),
        ("node.zoned.max_active_zones", |o| o.max_active_zones = 9),
        ("node.zoned.metadata_path", |o| {
            o.metadata_path = "/x".into()
        }),
    ];
    for (field, edit) in cases {
        let mut b = a.clone();
        edit(&mut b);
        let e = update_conflict(&a, &b).unwrap_err();
        assert_eq!(e.field(), Some(field));
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
    }
}

#[test]
fn metadata_path_probe() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("zones.meta");
    probe_metadata_path("node.zoned.metadata_path", ok.to_str().unwrap()).unwrap();
    std::fs::write(&ok, b"").unwrap();
    probe_metadata_path("node.zoned.metadata_path", ok.to_str().unwrap()).unwrap();
    let e =
        probe_metadata_path("node.zoned.metadata_path", dir.path().to_str().unwrap()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let missing = dir.path().join("nope/zones.meta");
    let e = probe_metadata_path("node.zoned.metadata_path", missing.to_str().unwrap()).unwrap_err();
    assert_eq!(e.field(), Some("node.zoned.metadata_path"));
}
