//! Field validation for nodes and exports: the rules that hold regardless of
//! what else exists.

use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoOp, NodeSpec, RawOptions, ThrottleLimits,
    ThrottleOptions, VhostUserBlkExport,
};

use crate::GraphError;

/// Longest node name or export id.
pub const MAX_NAME_LEN: usize = 64;
/// Sector size every size and offset must be a multiple of.
pub const SECTOR_SIZE: u64 = 512;
/// Longest path accepted for a file (PATH_MAX minus the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// Largest latency a null node may add per request (10 s).
pub const MAX_NULL_LATENCY_NS: u64 = 10_000_000_000;
/// Largest rate or burst of a throttle bucket (10^15, as QEMU's
/// `THROTTLE_VALUE_MAX`): keeps the workers' token arithmetic far from overflow.
pub const MAX_THROTTLE_VALUE: u64 = 1_000_000_000_000_000;
/// Smallest burst of a bytes-per-second bucket: one 4 KiB block must fit.
pub const MIN_BPS_BURST: u64 = 4096;
/// Most rules of a fault-injection node.
pub const MAX_FAULT_RULES: usize = 64;
/// Largest errno a fault rule may inject (Linux's `MAX_ERRNO`).
pub const MAX_FAULT_ERRNO: i32 = 4095;
/// Largest delay a fault rule may add to a request (10 s).
pub const MAX_FAULT_DELAY_NS: u64 = 10_000_000_000;
/// Most virtqueues per export.
pub const MAX_NUM_QUEUES: u32 = 64;
/// Default number of virtqueues.
pub const DEFAULT_NUM_QUEUES: u32 = 1;
/// Smallest virtqueue size.
pub const MIN_QUEUE_SIZE: u32 = 64;
/// Largest virtqueue size.
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// Default virtqueue size.
pub const DEFAULT_QUEUE_SIZE: u32 = 256;
/// Default logical block size.
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 512;
/// Longest GET_ID serial (virtio-blk `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

/// Checks a node name or export id: 1-64 characters of `[A-Za-z0-9_.-]`,
/// starting with a letter or digit. `field` names the field in errors.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), GraphError> {
    if name.is_empty() {
        return Err(GraphError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(GraphError::invalid(
            field,
            format!(
                "must be at most {MAX_NAME_LEN} characters (got {})",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(GraphError::invalid(
            field,
            format!("must contain only A-Z a-z 0-9 _ . - (got {bad:?} in {name:?})"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(GraphError::invalid(
            field,
            format!("must start with a letter or digit (got {name:?})"),
        ));
    }
    Ok(())
}

fn validate_abs_path(field: &'static str, path: &str, max_len: usize) -> Result<(), GraphError> {
    if path.is_empty() {
        return Err(GraphError::invalid(field, "must not be empty"));
    }
    if path.contains('\0') {
        return Err(GraphError::invalid(field, "must not contain NUL bytes"));
    }
    if !path.starts_with('/') {
        return Err(GraphError::invalid(
            field,
            format!("must be an absolute path (got {path:?})"),
        ));
    }
    if path.len() > max_len {
        return Err(GraphError::invalid(
            field,
            format!("must be at most {max_len} bytes (got {})", path.len()),
        ));
    }
    Ok(())
}

/// Checks a unix socket path: absolute, no NUL, at most 107 bytes.
pub fn validate_socket_path(field: &'static str, path: &str) -> Result<(), GraphError> {
    validate_abs_path(field, path, MAX_SOCKET_PATH_LEN)
}

fn validate_sector_multiple(field: &'static str, value: u64) -> Result<(), GraphError> {
    if value % SECTOR_SIZE != 0 {
        return Err(GraphError::invalid(
            field,
            format!("must be a multiple of {SECTOR_SIZE} (got {value})"),
        ));
    }
    Ok(())
}

/// Checks the child reference of a filter or format node.
fn validate_child(field: &'static str, child: &str, node: &str) -> Result<(), GraphError> {
    validate_name(field, child)?;
    if child == node {
        return Err(GraphError::invalid(
            field,
            format!("must not be the node itself ({node:?})"),
        ));
    }
    Ok(())
}

/// Checks a node's own fields (not its relation to other nodes).
pub fn validate_node(spec: &NodeSpec) -> Result<(), GraphError> {
    validate_name("node.name", &spec.name)?;
    match &spec.driver {
        None => Err(GraphError::invalid(
            "node.driver",
            "must be set (one of io_uring, null, nvme_io_uring, virtio_blk_vhost_user, \
             virtio_blk_vhost_vdpa, raw, throttle, fault_injection, zoned)",
        )),
        Some(Driver::IoUring(o)) => validate_abs_path("node.io_uring.path", &o.path, MAX_PATH_LEN),
        Some(Driver::NvmeIoUring(o)) => {
            validate_abs_path("node.nvme_io_uring.path", &o.path, MAX_PATH_LEN)
        }
        // libblkio connect()s to the socket, so the sun_path limit applies.
        Some(Driver::VirtioBlkVhostUser(o)) => {
            validate_socket_path("node.virtio_blk_vhost_user.path", &o.path)
        }
        Some(Driver::VirtioBlkVhostVdpa(o)) => {
            validate_abs_path("node.virtio_blk_vhost_vdpa.path", &o.path, MAX_PATH_LEN)
        }
        Some(Driver::Throttle(o)) => validate_throttle(&spec.name, o),
        Some(Driver::Zoned(o)) => validate_zoned(&spec.name, o),
        Some(Driver::FaultInjection(o)) => validate_fault_injection(&spec.name, o),
        Some(Driver::Null(o)) => {
            if o.size == 0 || o.size % SECTOR_SIZE != 0 {
                return Err(GraphError::invalid(
                    "node.null.size",
                    format!(
                        "must be a non-zero multiple of {SECTOR_SIZE} (got {})",
                        o.size
                    ),
                ));
            }
            if o.latency_ns > MAX_NULL_LATENCY_NS {
                return Err(GraphError::invalid(
                    "node.null.latency_ns",
                    format!(
                        "must be at most {MAX_NULL_LATENCY_NS} (10 s) (got {})",
                        o.latency_ns
                    ),
                ));
            }
            Ok(())
        }
        Some(Driver::Raw(o)) => {
            validate_child("node.raw.child", &o.child, &spec.name)?;
            validate_sector_multiple("node.raw.offset", o.offset)?;
            validate_sector_multiple("node.raw.size", o.size)?;
            if o.offset.checked_add(o.size).is_none() {
                return Err(GraphError::invalid(
                    "node.raw.size",
                    format!("offset {} + size {} overflows", o.offset, o.size),
                ));
            }
            Ok(())
        }
    }
}

/// Smallest emulated zone.
pub const MIN_ZONE_SIZE: u64 = 64 * 1024;

fn validate_zoned(node: &str, o: &blkmesh_proto::v1::ZonedOptions) -> Result<(), GraphError> {
    validate_child("node.zoned.child", &o.child, node)?;
    if o.zone_size < MIN_ZONE_SIZE || !o.zone_size.is_power_of_two() {
        return Err(GraphError::invalid(
            "node.zoned.zone_size",
            format!(
                "must be a power of two of at least {MIN_ZONE_SIZE} bytes (got {})",
                o.zone_size
            ),
        ));
    }
    if o.zone_capacity % 4096 != 0 || o.zone_capacity > o.zone_size {
        return Err(GraphError::invalid(
            "node.zoned.zone_capacity",
            format!(
                "must be a multiple of 4096 of at most zone_size {} (got {}; 0 = zone_size)",
                o.zone_size, o.zone_capacity
            ),
        ));
    }
    if o.max_active_zones != 0 && o.max_open_zones > o.max_active_zones {
        return Err(GraphError::invalid(
            "node.zoned.max_open_zones",
            format!(
                "must not exceed max_active_zones {} (got {})",
                o.max_active_zones, o.max_open_zones
            ),
        ));
    }
    if o.max_open_zones == 0 && o.max_active_zones != 0 {
        return Err(GraphError::invalid(
            "node.zoned.max_open_zones",
            "must be set (at most max_active_zones) when max_active_zones is",
        ));
    }
    validate_abs_path("node.zoned.metadata_path", &o.metadata_path, MAX_PATH_LEN)
}

/// What a throttle bucket counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BucketUnit {
    Iops,
    Bps,
}

/// One bucket of [`ThrottleLimits`] with the names of its fields.
struct BucketRef<'a> {
    bucket: Option<&'a Bucket>,
    unit: BucketUnit,
    rate_field: &'static str,
    burst_field: &'static str,
}

fn buckets(l: &ThrottleLimits) -> [BucketRef<'_>; 6] {
    macro_rules! b {
        ($f:ident, $unit:ident) => {
            BucketRef {
                bucket: l.$f.as_ref(),
                unit: BucketUnit::$unit,
                rate_field: concat!("node.throttle.limits.", stringify!($f), ".rate"),
                burst_field: concat!("node.throttle.limits.", stringify!($f), ".burst"),
            }
        };
    }
    [
        b!(iops_total, Iops),
        b!(iops_read, Iops),
        b!(iops_write, Iops),
        b!(bps_total, Bps),
        b!(bps_read, Bps),
        b!(bps_write, Bps),
    ]
}

fn validate_bucket(b: &BucketRef<'_>) -> Result<(), GraphError> {
    let Some(&Bucket { rate, burst }) = b.bucket else {
        return Ok(());
    };
    if rate > MAX_THROTTLE_VALUE {
        return Err(GraphError::invalid(
            b.rate_field,
            format!("must be at most {MAX_THROTTLE_VALUE} (got {rate})"),
        ));
    }
    if burst > MAX_THROTTLE_VALUE {
        return Err(GraphError::invalid(
            b.burst_field,
            format!("must be at most {MAX_THROTTLE_VALUE} (got {burst})"),
        ));
    }
    if rate == 0 {
        if burst != 0 {
            return Err(GraphError::invalid(
                b.burst_field,
                format!("must be 0 when rate is 0 (unlimited) (got {burst})"),
            ));
        }
        return Ok(());
    }
    if burst != 0 && burst < rate {
        return Err(GraphError::invalid(
            b.burst_field,
            format!("must be 0 or >= rate (got {burst} < {rate})"),
        ));
    }
    if b.unit == BucketUnit::Bps {
        if burst != 0 && burst < MIN_BPS_BURST {
            return Err(GraphError::invalid(
                b.burst_field,
                format!("must be 0 or >= {MIN_BPS_BURST} bytes (got {burst})"),
            ));
        }
        if burst == 0 && rate < MIN_BPS_BURST {
            return Err(GraphError::invalid(
                b.rate_field,
                format!(
                    "must be 0 or >= {MIN_BPS_BURST} bytes/s unless burst is set \
                     (one 4 KiB block must fit in the bucket) (got {rate})"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether some bucket of `limits` has a non-zero rate.
pub fn throttle_limits_set(limits: &ThrottleLimits) -> bool {
    buckets(limits)
        .iter()
        .any(|b| b.bucket.is_some_and(|b| b.rate != 0))
}

/// `limits` with absent buckets filled in as unlimited (`rate` 0), so two
/// equivalent limits compare equal.
pub fn normalize_throttle_limits(limits: &ThrottleLimits) -> ThrottleLimits {
    let b = |b: &Option<Bucket>| Some(b.unwrap_or_default());
    ThrottleLimits {
        iops_total: b(&limits.iops_total),
        iops_read: b(&limits.iops_read),
        iops_write: b(&limits.iops_write),
        bps_total: b(&limits.bps_total),
        bps_read: b(&limits.bps_read),
        bps_write: b(&limits.bps_write),
    }
}

fn validate_throttle(node: &str, o: &ThrottleOptions) -> Result<(), GraphError> {
    validate_child("node.throttle.child", &o.child, node)?;
    let limits = o
        .limits
        .as_ref()
        .ok_or_else(|| GraphError::invalid("node.throttle.limits", "must be set"))?;
    for b in &buckets(limits) {
        validate_bucket(b)?;
    }
    if !throttle_limits_set(limits) {
        return Err(GraphError::invalid(
            "node.throttle.limits",
            "throttle with no limit (set a non-zero rate in at least one bucket)",
        ));
    }
    if !o.group.is_empty() {
        validate_name("node.throttle.group", &o.group)?;
    }
    Ok(())
}

fn validate_fault_rule(index: usize, r: &FaultRule) -> Result<(), GraphError> {
    let bad = |field: &'static str, problem: String| GraphError::InvalidItem {
        list: "node.fault_injection.rules",
        index,
        field,
        problem,
    };
    for &op in &r.ops {
        match IoOp::try_from(op) {
            Ok(IoOp::Unspecified) => {
                return Err(bad("ops", "must not contain IO_OP_UNSPECIFIED".into()))
            }
            Ok(_) => {}
            Err(_) => return Err(bad("ops", format!("unknown op {op}"))),
        }
    }
    if r.offset_end != 0 && r.offset_end <= r.offset_start {
        return Err(bad(
            "offset_end",
            format!(
                "must be 0 (to the end) or > offset_start (got {} <= {})",
                r.offset_end, r.offset_start
            ),
        ));
    }
    if !(r.probability.is_finite() && (0.0..=1.0).contains(&r.probability)) {
        return Err(bad(
            "probability",
            format!("must be in [0, 1] (got {})", r.probability),
        ));
    }
    match r.action {
        None => Err(bad("action", "must be set (errno or delay_ns)".into())),
        Some(Action::Errno(e)) if !(1..=MAX_FAULT_ERRNO).contains(&e) => Err(bad(
            "errno",
            format!("must be in 1..={MAX_FAULT_ERRNO} (got {e})"),
        )),
        Some(Action::Errno(_)) => Ok(()),
        Some(Action::DelayNs(d)) if d > MAX_FAULT_DELAY_NS => Err(bad(
            "delay_ns",
            format!("must be at most {MAX_FAULT_DELAY_NS} (10 s) (got {d})"),
        )),
        Some(Action::DelayNs(_)) => Ok(()),
    }
}

fn validate_fault_injection(node: &str, o: &FaultInjectionOptions) -> Result<(), GraphError> {
    validate_child("node.fault_injection.child", &o.child, node)?;
    if o.rules.len() > MAX_FAULT_RULES {
        return Err(GraphError::invalid(
            "node.fault_injection.rules",
            format!(
                "must have at most {MAX_FAULT_RULES} rules (got {})",
                o.rules.len()
            ),
        ));
    }
    for (i, r) in o.rules.iter().enumerate() {
        validate_fault_rule(i, r)?;
    }
    Ok(())
}

/// Size of a raw node's window over a child of `child_size` bytes.
///
/// A window size of 0 means "up to the end of the child". Errors when the
/// window does not fit in the child or would be empty.
pub fn raw_window_size(opts: &RawOptions, child_size: u64) -> Result<u64, GraphError> {
    if opts.offset > child_size {
        return Err(GraphError::invalid(
            "node.raw.offset",
            format!(
                "must not be past the end of child {:?} (got {}, child size {child_size})",
                opts.child, opts.offset
            ),
        ));
    }
    let room = child_size - opts.offset;
    let size = if opts.size == 0 { room } else { opts.size };
    if size > room {
        return Err(GraphError::invalid(
            "node.raw.size",
            format!(
                "window {}+{} does not fit in child {:?} of {child_size} bytes",
                opts.offset, opts.size, opts.child
            ),
        ));
    }
    if size == 0 {
        return Err(GraphError::invalid(
            "node.raw.size",
            format!(
                "window at offset {} over child {:?} of {child_size} bytes is empty",
                opts.offset, opts.child
            ),
        ));
    }
    Ok(size)
}

/// Checks an export's fields and returns it with defaults applied:
/// `num_queues` 0 → 1, `queue_size` 0 → 256, `logical_block_size` 0 → 512,
/// empty `serial` → the export id (cut to 20 bytes).
pub fn validate_export(e: &VhostUserBlkExport) -> Result<VhostUserBlkExport, GraphError> {
    validate_name("export.id", &e.id)?;
    validate_name("export.node", &e.node)?;
    validate_socket_path("export.socket", &e.socket)?;

    let num_queues = match e.num_queues {
        0 => DEFAULT_NUM_QUEUES,
        n if n <= MAX_NUM_QUEUES => n,
        n => {
            return Err(GraphError::invalid(
                "export.num_queues",
                format!("must be 1-{MAX_NUM_QUEUES} (got {n})"),
            ))
        }
    };
    let queue_size = match e.queue_size {
        0 => DEFAULT_QUEUE_SIZE,
        n if n.is_power_of_two() && (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&n) => n,
        n => {
            return Err(GraphError::invalid(
                "export.queue_size",
                format!("must be a power of two in {MIN_QUEUE_SIZE}..={MAX_QUEUE_SIZE} (got {n})"),
            ))
        }
    };
    let logical_block_size = match e.logical_block_size {
        0 => DEFAULT_LOGICAL_BLOCK_SIZE,
        n @ (512 | 4096) => n,
        n => {
            return Err(GraphError::invalid(
                "export.logical_block_size",
                format!("must be 512 or 4096 (got {n})"),
            ))
        }
    };
    let serial = if e.serial.is_empty() {
        // The id is ASCII (validated above), so any byte index is a char boundary.
        e.id[..e.id.len().min(MAX_SERIAL_LEN)].to_string()
    } else {
        if e.serial.len() > MAX_SERIAL_LEN {
            return Err(GraphError::invalid(
                "export.serial",
                format!(
                    "must be at most {MAX_SERIAL_LEN} bytes (got {})",
                    e.serial.len()
                ),
            ));
        }
        if let Some(bad) = e.serial.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(GraphError::invalid(
                "export.serial",
                format!("must be printable ASCII (got {bad:?})"),
            ));
        }
        e.serial.clone()
    };
    Ok(VhostUserBlkExport {
        id: e.id.clone(),
        node: e.node.clone(),
        socket: e.socket.clone(),
        num_queues,
        queue_size,
        logical_block_size,
        writable: e.writable,
        serial,
        spread_queues: e.spread_queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
