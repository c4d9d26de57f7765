//! Field validation of every kind and of exports.

use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoOp, NodeSpec, RawOptions, ThrottleLimits,
    ThrottleOptions, VhostUserBlkExport,
};

use crate::*;
use blkmesh_proto::v1::{IoUringOptions, NullOptions};

fn field_of(r: Result<(), GraphError>) -> &'static str {
    match r {
        Err(GraphError::InvalidField { field, .. }) => field,
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

fn io_uring(path: &str) -> NodeSpec {
    NodeSpec {
        name: "disk0".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: path.into(),
            direct: false,
            read_only: false,
        })),
    }
}

fn null(size: u64) -> NodeSpec {
    NodeSpec {
        name: "null0".into(),
        driver: Some(Driver::Null(NullOptions {
            size,
            latency_ns: 0,
        })),
    }
}

fn raw(child: &str, offset: u64, size: u64) -> NodeSpec {
    NodeSpec {
        name: "raw0".into(),
        driver: Some(Driver::Raw(RawOptions {
            child: child.into(),
            offset,
            size,
        })),
    }
}

fn export() -> VhostUserBlkExport {
    VhostUserBlkExport {
        id: "vm1".into(),
        node: "disk0".into(),
        socket: "/run/blkmesh/vm1.sock".into(),
        ..Default::default()
    }
}

#[test]
fn accepts_valid_names() {
    for n in ["a", "disk0", "0disk", "a.b-c_d", &"x".repeat(64)] {
        validate_name("node.name", n).unwrap();
    }
}

#[test]
fn rejects_empty_name() {
    assert_eq!(field_of(validate_name("node.name", "")), "node.name");
}

#[test]
fn rejects_name_longer_than_64() {
    let e = validate_name("node.name", &"x".repeat(65)).unwrap_err();
    assert!(e.to_string().contains("at most 64"), "{e}");
}

#[test]
fn rejects_name_with_bad_character() {
    for n in ["a b", "a/b", "ä", "a\0", "a:b"] {
        assert!(validate_name("export.id", n).is_err(), "{n:?}");
    }
}

#[test]
fn rejects_name_starting_with_punctuation() {
    for n in [".a", "-a", "_a"] {
        let e = validate_name("node.name", n).unwrap_err();
        assert!(e.to_string().contains("must start with"), "{e}");
    }
}

#[test]
fn rejects_node_without_driver() {
    let spec = NodeSpec {
        name: "n".into(),
        driver: None,
    };
    assert_eq!(field_of(validate_node(&spec)), "node.driver");
}

#[test]
fn rejects_bad_node_name() {
    let mut spec = null(512);
    spec.name = "bad name".into();
    assert_eq!(field_of(validate_node(&spec)), "node.name");
}

#[test]
fn accepts_absolute_io_uring_path() {
    validate_node(&io_uring("/var/lib/disk.img")).unwrap();
}

#[test]
fn rejects_relative_io_uring_path() {
    let e = validate_node(&io_uring("disk.img")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.io_uring.path: must be an absolute path (got \"disk.img\")"
    );
}

#[test]
fn rejects_empty_io_uring_path() {
    assert_eq!(field_of(validate_node(&io_uring(""))), "node.io_uring.path");
}

#[test]
fn rejects_io_uring_path_with_nul() {
    let e = validate_node(&io_uring("/a\0b")).unwrap_err();
    assert!(e.to_string().contains("NUL"), "{e}");
}

#[test]
fn rejects_overlong_io_uring_path() {
    let p = format!("/{}", "a".repeat(MAX_PATH_LEN));
    assert_eq!(field_of(validate_node(&io_uring(&p))), "node.io_uring.path");
}

#[test]
fn accepts_null_size_multiple_of_512() {
    validate_node(&null(1 << 30)).unwrap();
}

#[test]
fn rejects_zero_null_size() {
    assert_eq!(field_of(validate_node(&null(0))), "node.null.size");
}

#[test]
fn rejects_unaligned_null_size() {
    let e = validate_node(&null(1000)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.null.size: must be a non-zero multiple of 512 (got 1000)"
    );
}

#[test]
fn rejects_huge_null_latency() {
    let mut spec = null(512);
    if let Some(Driver::Null(o)) = &mut spec.driver {
        o.latency_ns = MAX_NULL_LATENCY_NS + 1;
    }
    assert_eq!(field_of(validate_node(&spec)), "node.null.latency_ns");
}

#[test]
fn accepts_aligned_raw_window() {
    validate_node(&raw("disk0", 4096, 1 << 20)).unwrap();
}

#[test]
fn rejects_unaligned_raw_offset() {
    assert_eq!(
        field_of(validate_node(&raw("disk0", 100, 0))),
        "node.raw.offset"
    );
}

#[test]
fn rejects_unaligned_raw_size() {
    assert_eq!(
        field_of(validate_node(&raw("disk0", 0, 513))),
        "node.raw.size"
    );
}

#[test]
fn rejects_overflowing_raw_window() {
    let off = u64::MAX - 511;
    assert_eq!(
        field_of(validate_node(&raw("disk0", off, 1024))),
        "node.raw.size"
    );
}

#[test]
fn rejects_invalid_raw_child_name() {
    assert_eq!(field_of(validate_node(&raw("", 0, 0))), "node.raw.child");
    assert_eq!(field_of(validate_node(&raw("a b", 0, 0))), "node.raw.child");
}

#[test]
fn rejects_raw_child_naming_itself() {
    assert_eq!(
        field_of(validate_node(&raw("raw0", 0, 0))),
        "node.raw.child"
    );
}

#[test]
fn raw_window_defaults_to_rest_of_child() {
    let o = RawOptions {
        child: "c".into(),
        offset: 1024,
        size: 0,
    };
    assert_eq!(raw_window_size(&o, 4096).unwrap(), 3072);
}

#[test]
fn rejects_raw_window_past_child_end() {
    let o = RawOptions {
        child: "c".into(),
        offset: 1024,
        size: 4096,
    };
    let e = raw_window_size(&o, 4096).unwrap_err();
    assert_eq!(e.field(), Some("node.raw.size"));
    let o = RawOptions {
        child: "c".into(),
        offset: 8192,
        size: 0,
    };
    assert_eq!(
        raw_window_size(&o, 4096).unwrap_err().field(),
        Some("node.raw.offset")
    );
}

#[test]
fn rejects_empty_raw_window() {
    let o = RawOptions {
        child: "c".into(),
        offset: 4096,
        size: 0,
    };
    assert!(raw_window_size(&o, 4096).is_err());
}

#[test]
fn export_defaults_are_applied() {
    let n = validate_export(&export()).unwrap();
    assert_eq!(n.num_queues, 1);
    assert_eq!(n.queue_size, 256);
    assert_eq!(n.logical_block_size, 512);
    assert_eq!(n.serial, "vm1");
}

#[test]
fn export_default_serial_is_cut_to_20_bytes() {
    let mut e = export();
    e.id = "a".repeat(30);
    assert_eq!(validate_export(&e).unwrap().serial, "a".repeat(20));
}

#[test]
fn export_explicit_values_are_kept() {
    let mut e = export();
    e.num_queues = 64;
    e.queue_size = 1024;
    e.logical_block_size = 4096;
    e.serial = "SER 1~".into();
    e.writable = true;
    let n = validate_export(&e).unwrap();
    assert_eq!(
        (n.num_queues, n.queue_size, n.logical_block_size),
        (64, 1024, 4096)
    );
    assert_eq!(n.serial, "SER 1~");
    assert!(n.writable);
}

fn export_field(e: VhostUserBlkExport) -> &'static str {
    field_of(validate_export(&e).map(|_| ()))
}

#[test]
fn rejects_bad_export_id() {
    let mut e = export();
    e.id = "-x".into();
    assert_eq!(export_field(e), "export.id");
}

#[test]
fn rejects_bad_export_node() {
    let mut e = export();
    e.node = String::new();
    assert_eq!(export_field(e), "export.node");
}

#[test]
fn rejects_relative_export_socket() {
    let mut e = export();
    e.socket = "vm1.sock".into();
    assert_eq!(export_field(e), "export.socket");
}

#[test]
fn rejects_overlong_export_socket() {
    let mut e = export();
    e.socket = format!("/{}", "s".repeat(MAX_SOCKET_PATH_LEN));
    assert_eq!(export_field(e), "export.socket");
}

#[test]
fn rejects_too_many_queues() {
    let mut e = export();
    e.num_queues = 65;
    assert_eq!(export_field(e), "export.num_queues");
}

#[test]
fn rejects_bad_queue_size() {
    for qs in [32, 100, 2048, 3] {
        let mut e = export();
        e.queue_size = qs;
        assert_eq!(export_field(e), "export.queue_size", "{qs}");
    }
}

#[test]
fn rejects_bad_logical_block_size() {
    for bs in [1024, 520, 8192] {
        let mut e = export();
        e.logical_block_size = bs;
        assert_eq!(export_field(e), "export.logical_block_size", "{bs}");
    }
}

#[test]
fn rejects_long_serial() {
    let mut e = export();
    e.serial = "s".repeat(21);
    assert_eq!(export_field(e), "export.serial");
}

#[test]
fn rejects_non_printable_serial() {
    for s in ["a\tb", "é", "a\x7f"] {
        let mut e = export();
        e.serial = s.into();
        assert_eq!(export_field(e), "export.serial", "{s:?}");
    }
}

// ----- nvme_io_uring, virtio_blk_vhost_user, virtio_blk_vhost_vdpa -----

fn nvme(path: &str) -> NodeSpec {
    NodeSpec {
        name: "nvme0".into(),
        driver: Some(Driver::NvmeIoUring(blkmesh_proto::v1::NvmeIoUringOptions {
            path: path.into(),
            read_only: false,
        })),
    }
}

fn vhost_user(path: &str) -> NodeSpec {
    NodeSpec {
        name: "vu0".into(),
        driver: Some(Driver::VirtioBlkVhostUser(
            blkmesh_proto::v1::VirtioBlkVhostUserOptions {
                path: path.into(),
                read_only: true,
            },
        )),
    }
}

fn vdpa(path: &str) -> NodeSpec {
    NodeSpec {
        name: "vdpa0".into(),
        driver: Some(Driver::VirtioBlkVhostVdpa(
            blkmesh_proto::v1::VirtioBlkVhostVdpaOptions {
                path: path.into(),
                read_only: false,
            },
        )),
    }
}

#[test]
fn accepts_absolute_device_paths() {
    validate_node(&nvme("/dev/ng0n1")).unwrap();
    validate_node(&vhost_user("/run/qsd/vhost.sock")).unwrap();
    validate_node(&vdpa("/dev/vhost-vdpa-0")).unwrap();
}

#[test]
fn rejects_relative_nvme_path() {
    let e = validate_node(&nvme("ng0n1")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.nvme_io_uring.path: must be an absolute path (got \"ng0n1\")"
    );
}

#[test]
fn rejects_empty_device_paths() {
    assert_eq!(
        field_of(validate_node(&nvme(""))),
        "node.nvme_io_uring.path"
    );
    assert_eq!(
        field_of(validate_node(&vhost_user(""))),
        "node.virtio_blk_vhost_user.path"
    );
    assert_eq!(
        field_of(validate_node(&vdpa(""))),
        "node.virtio_blk_vhost_vdpa.path"
    );
}

#[test]
fn rejects_device_paths_with_nul() {
    for spec in [nvme("/dev/a\0b"), vhost_user("/a\0b"), vdpa("/dev/a\0b")] {
        let e = validate_node(&spec).unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }
}

#[test]
fn rejects_overlong_nvme_and_vdpa_paths() {
    let p = format!("/{}", "a".repeat(MAX_PATH_LEN));
    assert_eq!(
        field_of(validate_node(&nvme(&p))),
        "node.nvme_io_uring.path"
    );
    assert_eq!(
        field_of(validate_node(&vdpa(&p))),
        "node.virtio_blk_vhost_vdpa.path"
    );
    let max = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
    validate_node(&nvme(&max)).unwrap();
}

#[test]
fn rejects_vhost_user_path_longer_than_sun_path() {
    let p = format!("/{}", "s".repeat(MAX_SOCKET_PATH_LEN));
    let e = validate_node(&vhost_user(&p)).unwrap_err();
    assert_eq!(e.field(), Some("node.virtio_blk_vhost_user.path"));
    assert!(e.to_string().contains("at most 107 bytes"), "{e}");
}

// ----- throttle -----

fn bucket(rate: u64, burst: u64) -> Option<Bucket> {
    Some(Bucket { rate, burst })
}

fn throttle(limits: Option<ThrottleLimits>, group: &str) -> NodeSpec {
    NodeSpec {
        name: "thr0".into(),
        driver: Some(Driver::Throttle(ThrottleOptions {
            child: "disk0".into(),
            limits,
            group: group.into(),
        })),
    }
}

fn iops_read(rate: u64, burst: u64) -> NodeSpec {
    throttle(
        Some(ThrottleLimits {
            iops_read: bucket(rate, burst),
            ..Default::default()
        }),
        "",
    )
}

fn bps_write(rate: u64, burst: u64) -> NodeSpec {
    throttle(
        Some(ThrottleLimits {
            bps_write: bucket(rate, burst),
            ..Default::default()
        }),
        "",
    )
}

#[test]
fn accepts_throttle_with_one_limit() {
    validate_node(&iops_read(100, 0)).unwrap();
    validate_node(&iops_read(100, 100)).unwrap();
    validate_node(&iops_read(100, 1000)).unwrap();
    validate_node(&bps_write(1 << 20, 0)).unwrap();
    validate_node(&bps_write(1000, 4096)).unwrap();
}

#[test]
fn accepts_throttle_with_all_limits_and_group() {
    let limits = ThrottleLimits {
        iops_total: bucket(1000, 2000),
        iops_read: bucket(500, 0),
        iops_write: bucket(500, 0),
        bps_total: bucket(100 << 20, 200 << 20),
        bps_read: bucket(50 << 20, 0),
        bps_write: bucket(50 << 20, 0),
    };
    validate_node(&throttle(Some(limits), "tenant-a")).unwrap();
}

#[test]
fn rejects_throttle_without_limits() {
    let e = validate_node(&throttle(None, "")).unwrap_err();
    assert_eq!(e.to_string(), "node.throttle.limits: must be set");
}

#[test]
fn rejects_throttle_with_no_limit() {
    for limits in [
        ThrottleLimits::default(),
        ThrottleLimits {
            iops_total: bucket(0, 0),
            bps_read: bucket(0, 0),
            ..Default::default()
        },
    ] {
        let e = validate_node(&throttle(Some(limits), "")).unwrap_err();
        assert_eq!(e.field(), Some("node.throttle.limits"));
        assert!(e.to_string().contains("throttle with no limit"), "{e}");
    }
}

#[test]
fn rejects_iops_burst_below_rate() {
    let e = validate_node(&iops_read(100, 10)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.throttle.limits.iops_read.burst: must be 0 or >= rate (got 10 < 100)"
    );
}

#[test]
fn rejects_burst_without_rate() {
    let e = validate_node(&iops_read(0, 10)).unwrap_err();
    assert_eq!(e.field(), Some("node.throttle.limits.iops_read.burst"));
    assert!(e.to_string().contains("must be 0 when rate is 0"), "{e}");
}

#[test]
fn rejects_bps_burst_below_rate() {
    let e = validate_node(&bps_write(1 << 20, 8192)).unwrap_err();
    assert_eq!(e.field(), Some("node.throttle.limits.bps_write.burst"));
    assert!(e.to_string().contains("must be 0 or >= rate"), "{e}");
}

#[test]
fn rejects_bps_burst_below_one_block() {
    let e = validate_node(&bps_write(1000, 2048)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.throttle.limits.bps_write.burst: must be 0 or >= 4096 bytes (got 2048)"
    );
}

#[test]
fn rejects_small_bps_rate_without_burst() {
    let e = validate_node(&bps_write(1000, 0)).unwrap_err();
    assert_eq!(e.field(), Some("node.throttle.limits.bps_write.rate"));
}

#[test]
fn rejects_huge_throttle_values() {
    assert_eq!(
        field_of(validate_node(&iops_read(MAX_THROTTLE_VALUE + 1, 0))),
        "node.throttle.limits.iops_read.rate"
    );
    assert_eq!(
        field_of(validate_node(&iops_read(1, u64::MAX))),
        "node.throttle.limits.iops_read.burst"
    );
    validate_node(&iops_read(MAX_THROTTLE_VALUE, MAX_THROTTLE_VALUE)).unwrap();
}

#[test]
fn every_bucket_is_checked_under_its_own_name() {
    type BucketOf = fn(&mut ThrottleLimits) -> &mut Option<Bucket>;
    let cases: [(BucketOf, &str); 6] = [
        (|l| &mut l.iops_total, "iops_total"),
        (|l| &mut l.iops_read, "iops_read"),
        (|l| &mut l.iops_write, "iops_write"),
        (|l| &mut l.bps_total, "bps_total"),
        (|l| &mut l.bps_read, "bps_read"),
        (|l| &mut l.bps_write, "bps_write"),
    ];
    for (get, name) in cases {
        let mut limits = ThrottleLimits::default();
        *get(&mut limits) = bucket(1 << 20, 1);
        let e = validate_node(&throttle(Some(limits), "")).unwrap_err();
        assert_eq!(
            e.field().unwrap(),
            format!("node.throttle.limits.{name}.burst")
        );
    }
}

#[test]
fn rejects_bad_throttle_group() {
    let limits = ThrottleLimits {
        iops_total: bucket(10, 0),
        ..Default::default()
    };
    for g in ["a b", "-g", &"g".repeat(65)] {
        assert_eq!(
            field_of(validate_node(&throttle(Some(limits), g))),
            "node.throttle.group",
            "{g:?}"
        );
    }
}

#[test]
fn rejects_bad_throttle_child() {
    let mut spec = iops_read(10, 0);
    if let Some(Driver::Throttle(o)) = &mut spec.driver {
        o.child = "thr0".into();
    }
    assert_eq!(field_of(validate_node(&spec)), "node.throttle.child");
    if let Some(Driver::Throttle(o)) = &mut spec.driver {
        o.child = String::new();
    }
    assert_eq!(field_of(validate_node(&spec)), "node.throttle.child");
}

#[test]
fn normalized_limits_treat_absent_bucket_as_unlimited() {
    let a = ThrottleLimits {
        iops_total: bucket(10, 0),
        ..Default::default()
    };
    let b = ThrottleLimits {
        iops_total: bucket(10, 0),
        bps_read: bucket(0, 0),
        ..Default::default()
    };
    assert_ne!(a, b);
    assert_eq!(normalize_throttle_limits(&a), normalize_throttle_limits(&b));
}

// ----- fault_injection -----

fn rule(action: Action) -> FaultRule {
    FaultRule {
        action: Some(action),
        ..Default::default()
    }
}

fn faults(rules: Vec<FaultRule>) -> NodeSpec {
    NodeSpec {
        name: "fi0".into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: "disk0".into(),
            rules,
            ..Default::default()
        })),
    }
}

fn fault_err(rules: Vec<FaultRule>) -> String {
    validate_node(&faults(rules)).unwrap_err().to_string()
}

#[test]
fn accepts_fault_rules() {
    validate_node(&faults(vec![])).unwrap();
    validate_node(&faults(vec![
        FaultRule {
            ops: vec![IoOp::Read as i32, IoOp::Write as i32],
            offset_start: 0,
            offset_end: 1 << 20,
            skip: 2,
            count: 1,
            probability: 0.5,
            action: Some(Action::Errno(5)),
        },
        rule(Action::DelayNs(MAX_FAULT_DELAY_NS)),
        rule(Action::Errno(MAX_FAULT_ERRNO)),
        FaultRule {
            probability: 1.0,
            ..rule(Action::Errno(28))
        },
    ]))
    .unwrap();
}

#[test]
fn rejects_more_than_64_fault_rules() {
    let rules = vec![rule(Action::Errno(5)); MAX_FAULT_RULES + 1];
    let e = validate_node(&faults(rules)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.fault_injection.rules: must have at most 64 rules (got 65)"
    );
    validate_node(&faults(vec![rule(Action::Errno(5)); MAX_FAULT_RULES])).unwrap();
}

#[test]
fn rejects_fault_rule_without_action() {
    let r = FaultRule::default();
    assert_eq!(
        fault_err(vec![r]),
        "node.fault_injection.rules[0].action: must be set (errno or delay_ns)"
    );
}

#[test]
fn rejects_fault_errno_out_of_range() {
    for errno in [0, -5, 4096, i32::MAX] {
        let rules = vec![
            rule(Action::DelayNs(1)),
            rule(Action::DelayNs(2)),
            rule(Action::Errno(errno)),
        ];
        assert_eq!(
            fault_err(rules),
            format!("node.fault_injection.rules[2].errno: must be in 1..=4095 (got {errno})")
        );
    }
}

#[test]
fn rejects_fault_delay_over_10s() {
    let e = fault_err(vec![rule(Action::DelayNs(MAX_FAULT_DELAY_NS + 1))]);
    assert!(
        e.starts_with("node.fault_injection.rules[0].delay_ns: must be at most"),
        "{e}"
    );
}

#[test]
fn rejects_fault_probability_outside_0_1() {
    for p in [-0.1, 1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let r = FaultRule {
            probability: p,
            ..rule(Action::Errno(5))
        };
        let e = fault_err(vec![r]);
        assert!(
            e.starts_with("node.fault_injection.rules[0].probability: must be in [0, 1]"),
            "{p}: {e}"
        );
    }
}

#[test]
fn rejects_fault_offset_end_not_after_start() {
    for (start, end) in [(4096, 4096), (4096, 512)] {
        let r = FaultRule {
            offset_start: start,
            offset_end: end,
            ..rule(Action::Errno(5))
        };
        let e = fault_err(vec![r]);
        assert!(
            e.starts_with("node.fault_injection.rules[0].offset_end: must be 0"),
            "{e}"
        );
    }
    let open_ended = FaultRule {
        offset_start: 4096,
        offset_end: 0,
        ..rule(Action::Errno(5))
    };
    validate_node(&faults(vec![open_ended])).unwrap();
}

#[test]
fn rejects_fault_unspecified_or_unknown_op() {
    let r = FaultRule {
        ops: vec![IoOp::Read as i32, IoOp::Unspecified as i32],
        ..rule(Action::Errno(5))
    };
    assert_eq!(
        fault_err(vec![r]),
        "node.fault_injection.rules[0].ops: must not contain IO_OP_UNSPECIFIED"
    );
    let r = FaultRule {
        ops: vec![99],
        ..rule(Action::Errno(5))
    };
    assert_eq!(
        fault_err(vec![r]),
        "node.fault_injection.rules[0].ops: unknown op 99"
    );
}

#[test]
fn fault_rule_error_is_invalid_argument_on_rules_field() {
    let e = validate_node(&faults(vec![FaultRule::default()])).unwrap_err();
    assert_eq!(e.class(), crate::ErrorClass::InvalidArgument);
    assert_eq!(e.field(), Some("node.fault_injection.rules"));
}

#[test]
fn rejects_bad_fault_injection_child() {
    let mut spec = faults(vec![]);
    if let Some(Driver::FaultInjection(o)) = &mut spec.driver {
        o.child = "fi0".into();
    }
    assert_eq!(field_of(validate_node(&spec)), "node.fault_injection.child");
}
