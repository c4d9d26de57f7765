use super::*;
use blkmesh_graph::ErrorClass;
use blkmesh_proto::v1::node_spec::Driver;

use crate::core::fixtures::{faults, raw, sized_state as state, throttle};
use blkmesh_proto::v1::{IoUringOptions, NullOptions, NvmeIoUringOptions};

fn null(name: &str, size: u64, latency_ns: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Null(NullOptions { size, latency_ns })),
    }
}

fn file(name: &str, path: &str, read_only: bool, direct: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: path.into(),
            direct,
            read_only,
        })),
    }
}

#[test]
fn update_changes_lists_option_changes() {
    assert_eq!(
        update_changes(&file("f", "/a", false, false), &file("f", "/a", true, true)).unwrap(),
        ["read-only on", "direct on"]
    );
    assert_eq!(
        update_changes(&null("n", 512, 0), &null("n", 512, 5)).unwrap(),
        ["latency"]
    );
    assert_eq!(
        update_changes(&throttle("t", "c", 1, ""), &throttle("t", "c", 2, "")).unwrap(),
        ["throttle limits"]
    );
    assert_eq!(
        update_changes(&faults("x", "c", 0), &faults("x", "c", 4096)).unwrap(),
        ["max transfer"]
    );
    assert!(update_changes(&null("n", 512, 0), &null("n", 512, 0))
        .unwrap()
        .is_empty());
}

#[test]
fn update_refuses_fixed_fields() {
    let field = |old: NodeSpec, new: NodeSpec| {
        let e = update_changes(&old, &new).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidArgument, "{e}");
        e.field()
    };
    assert_eq!(
        field(file("f", "/a", false, false), file("f", "/b", false, false)),
        Some("node.io_uring.path")
    );
    assert_eq!(
        field(file("f", "/a", false, false), null("f", 512, 0)),
        Some("node.driver")
    );
    assert_eq!(
        field(null("n", 512, 0), null("n", 1024, 0)),
        Some("node.null.size")
    );
    assert_eq!(
        field(raw("r", "a", 0, 0), raw("r", "b", 0, 0)),
        Some("node.raw.child")
    );
    assert_eq!(
        field(raw("r", "a", 0, 0), raw("r", "a", 512, 0)),
        Some("node.raw.offset")
    );
    assert_eq!(
        field(throttle("t", "c", 1, "g"), throttle("t", "c", 1, "h")),
        Some("node.throttle.group")
    );
    assert_eq!(
        field(faults("x", "c", 0), faults("x", "d", 0)),
        Some("node.fault_injection.child")
    );
    let nvme = |p: &str| NodeSpec {
        name: "n".into(),
        driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions {
            path: p.into(),
            read_only: false,
        })),
    };
    assert_eq!(
        field(nvme("/dev/ng0n1"), nvme("/dev/ng1n1")),
        Some("node.nvme_io_uring.path")
    );
}

#[test]
fn resize_walks_down_filters_and_open_raw_windows() {
    let s = state(
        vec![
            file("f", "/img", false, false),
            raw("r", "f", 4096, 0),
            throttle("t", "r", 10, ""),
            faults("x", "t", 0),
        ],
        &[
            ("f", 1 << 20),
            ("r", (1 << 20) - 4096),
            ("t", (1 << 20) - 4096),
            ("x", (1 << 20) - 4096),
        ],
    );
    let plan = plan_resize(&s, "x", 2 << 20).unwrap().unwrap();
    assert!(plan.specs.is_empty());
    assert_eq!(plan.bottom, "f");
    let leaf = plan.leaf.unwrap();
    assert_eq!((leaf.node.as_str(), leaf.size), ("f", (2 << 20) + 4096));
    assert_eq!(plan.old_size, (1 << 20) - 4096);

    assert_eq!(plan_resize(&s, "x", (1 << 20) - 4096).unwrap(), None);
    let e = plan_resize(&s, "x", 4096).unwrap_err();
    assert_eq!(e.class(), ErrorClass::FailedPrecondition);
    assert_eq!(
        plan_resize(&s, "nope", 4096).unwrap_err().class(),
        ErrorClass::NotFound
    );
}

#[test]
fn resize_sets_null_and_explicit_raw_sizes() {
    let mut s = state(
        vec![
            null("n", 1 << 20, 0),
            raw("r", "n", 512, 4096),
            throttle("t", "r", 10, ""),
        ],
        &[("n", 1 << 20), ("r", 4096), ("t", 4096)],
    );
    let plan = plan_resize(&s, "t", 8192).unwrap().unwrap();
    assert_eq!(plan.specs.len(), 1);
    assert_eq!(plan.specs[0].1, raw("r", "n", 512, 8192));
    assert_eq!(plan.bottom, "r");
    let e = plan_resize(&s, "t", 1 << 20).unwrap_err();
    assert_eq!(e.class(), ErrorClass::FailedPrecondition);
    assert!(e.to_string().contains("does not fit"), "{e}");

    let plan = plan_resize(&s, "n", 2 << 20).unwrap().unwrap();
    assert_eq!(plan.specs[0].1, null("n", 2 << 20, 0));
    // Apply it and recompute: the explicit raw window keeps its size.
    let mut replace = BTreeMap::new();
    replace.insert("n".to_string(), plan.specs[0].1.clone());
    s.graph = replace_specs(&s.graph, &replace).unwrap();
    let changed = recompute_sizes(&mut s, "n").unwrap();
    assert_eq!(changed, [("n".to_string(), 1 << 20, 2 << 20)]);
}

#[test]
fn recompute_sizes_walks_up_open_windows() {
    let mut s = state(
        vec![
            null("n", 2 << 20, 0),
            raw("r", "n", 1024, 0),
            faults("x", "r", 0),
        ],
        &[
            ("n", 1 << 20),
            ("r", (1 << 20) - 1024),
            ("x", (1 << 20) - 1024),
        ],
    );
    let changed = recompute_sizes(&mut s, "n").unwrap();
    assert_eq!(
        changed,
        [
            ("n".to_string(), 1 << 20, 2 << 20),
            ("r".to_string(), (1 << 20) - 1024, (2 << 20) - 1024),
            ("x".to_string(), (1 << 20) - 1024, (2 << 20) - 1024),
        ]
    );
}

#[test]
fn device_leaves_cannot_grow() {
    let s = state(
        vec![
            NodeSpec {
                name: "nv".into(),
                driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions {
                    path: "/dev/ng0n1".into(),
                    read_only: false,
                })),
            },
            throttle("t", "nv", 5, ""),
        ],
        &[("nv", 4096), ("t", 4096)],
    );
    let e = plan_resize(&s, "t", 8192).unwrap_err();
    assert_eq!(e.class(), ErrorClass::FailedPrecondition);
    assert!(e.to_string().contains("cannot grow"), "{e}");
}

#[test]
fn grows_regular_files_and_refuses_read_only_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let leaf = LeafGrow {
        node: "f".into(),
        path: path.to_str().unwrap().into(),
        read_only: false,
        size: 1 << 20,
    };
    assert_eq!(grow_io_uring_path(&leaf).unwrap(), 1 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    let ro = LeafGrow {
        read_only: true,
        size: 2 << 20,
        ..leaf.clone()
    };
    let e = grow_io_uring_path(&ro).unwrap_err();
    assert_eq!(e.class(), ErrorClass::FailedPrecondition);
    // Already big enough: nothing to write, even when read-only.
    let ro_small = LeafGrow {
        read_only: true,
        size: 4096,
        ..leaf
    };
    assert_eq!(grow_io_uring_path(&ro_small).unwrap(), 1 << 20);
}
