#[test]
fn created_images_go_to_the_owner_asked_for() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // Ours: the directory we just made.
    let d = std::fs::metadata(dir.path()).unwrap();
    let me = (d.uid(), d.gid());
    let path = dir.path().join("sub/a.img");
    create_image(&path, 1 << 20, Some(me)).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((m.uid(), m.gid(), m.len()), (me.0, me.1, 1 << 20));
    // An existing file is never taken over.
    assert!(create_image(&path, 1 << 20, Some(me)).is_err());
    if me.0 != 0 {
        // Giving it away needs CAP_CHOWN: refused, and nothing is left.
        let other = dir.path().join("b.img");
        assert!(create_image(&other, 1 << 20, Some((me.0 + 1, me.1))).is_err());
        assert!(!other.exists());
    }
}

use super::*;
use blkmesh_proto::v1::{Bucket, NullOptions, RawOptions, ThrottleLimits, ThrottleOptions};

fn null(size: u64, latency_ns: u64) -> NodeSpec {
    NodeSpec {
        name: "n".into(),
        driver: Some(Driver::Null(NullOptions { size, latency_ns })),
    }
}

fn raw(size: u64) -> NodeSpec {
    NodeSpec {
        name: "r".into(),
        driver: Some(Driver::Raw(RawOptions {
            child: "n".into(),
            offset: 0,
            size,
        })),
    }
}

fn throttle(limits: ThrottleLimits) -> NodeSpec {
    NodeSpec {
        name: "t".into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: "n".into(),
            limits: Some(limits),
            group: String::new(),
        })),
    }
}

#[test]
fn same_settings_change_nothing() {
    assert_eq!(plan_change(&null(512, 0), &null(512, 0)).unwrap(), None);
    // Absent buckets and unlimited ones are the same limits.
    let a = ThrottleLimits {
        iops_total: Some(Bucket { rate: 5, burst: 0 }),
        bps_read: Some(Bucket { rate: 0, burst: 0 }),
        ..Default::default()
    };
    let b = ThrottleLimits {
        iops_total: Some(Bucket { rate: 5, burst: 0 }),
        ..Default::default()
    };
    assert_eq!(plan_change(&throttle(a), &throttle(b)).unwrap(), None);
}

#[test]
fn options_update_and_sizes_resize() {
    let c = plan_change(&null(512, 0), &null(1024, 7)).unwrap().unwrap();
    assert_eq!(c.resize, Some(1024));
    let (spec, changes) = c.update.unwrap();
    // The update keeps the current size; the resize makes the new one.
    assert_eq!(spec, null(512, 7));
    assert_eq!(changes, ["latency"]);
    let c = plan_change(&raw(4096), &raw(8192)).unwrap().unwrap();
    assert_eq!((c.update, c.resize), (None, Some(8192)));
    let c = plan_change(
        &throttle(ThrottleLimits {
            iops_total: Some(Bucket { rate: 5, burst: 0 }),
            ..Default::default()
        }),
        &throttle(ThrottleLimits {
            iops_total: Some(Bucket { rate: 6, burst: 0 }),
            ..Default::default()
        }),
    )
    .unwrap()
    .unwrap();
    assert_eq!(c.update.unwrap().1, ["throttle limits"]);
}

#[test]
fn what_cannot_change_live_is_refused() {
    // A window to the end of its child and an explicit one differ in kind.
    let e = plan_change(&raw(0), &raw(4096)).unwrap_err().to_string();
    assert!(e.contains("node.raw.size: cannot change live"), "{e}");
    let e = plan_change(&null(512, 0), &raw(512))
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.driver"), "{e}");
    let e = not_live(plan_change(&raw(0), &raw(4096)).unwrap_err(), "node", "r");
    let (field, problem) = e.field_and_problem();
    assert_eq!(field, "node.raw.size");
    assert!(
        problem.ends_with(
            ": remove node \"r\" first (start the manager without --config and run \
                 `blkmeshctl node remove r`), or give the file's node another name"
        ),
        "{problem}"
    );
}
