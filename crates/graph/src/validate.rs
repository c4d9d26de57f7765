//! Field validation for nodes and exports: the rules that hold regardless of
//! what else exists.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, RawOptions, VhostUserBlkExport};

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

/// Checks a node's own fields (not its relation to other nodes).
pub fn validate_node(spec: &NodeSpec) -> Result<(), GraphError> {
    validate_name("node.name", &spec.name)?;
    match &spec.driver {
        None => Err(GraphError::invalid(
            "node.driver",
            "must be set (one of io_uring, null, raw)",
        )),
        Some(Driver::IoUring(o)) => validate_abs_path("node.io_uring.path", &o.path, MAX_PATH_LEN),
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
            validate_name("node.raw.child", &o.child)?;
            if o.child == spec.name {
                return Err(GraphError::invalid(
                    "node.raw.child",
                    format!("must not be the node itself ({:?})", spec.name),
                ));
            }
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
}
