//! The node kinds: one room per kind (`kinds/*.rs`), each implementing
//! [`NodeKind`] on its options message, and the one table here that maps a
//! `NodeSpec.driver` to its kind.
//!
//! What a kind knows about itself: its driver key (in the API, the
//! configuration file, the state file and the CLI), which of its fields
//! name child nodes, whether its own options make it read-only, the checks
//! of its own fields, and its size from its child's. Everything that treats
//! nodes generically (the [`Graph`](crate::Graph), validation, the
//! manager's sizes) goes through [`kind_of`].
//!
//! Adding a kind: its options message and `oneof driver` case in
//! `nodes.proto`, a room here with its `NodeKind` impl (and any graph rule
//! of its own), a line in [`kind_of`] and [`KIND_NAMES`], and the worker's
//! leaf or stage.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NodeSpec;

use crate::error::GraphError;
use crate::update::cannot_change;

pub mod device;
pub mod fault;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod throttle;
pub mod zoned;

/// What the schema knows about one node kind, implemented by its options
/// message.
pub trait NodeKind {
    /// The driver key: the `NodeSpec.driver` field name (`io_uring`,
    /// `raw`, ...), also the key in the configuration and state files.
    fn name(&self) -> &'static str;

    /// The one child of a filter: a node that passes requests through to
    /// it, at its size, and grows with it (throttle, fault injection). The
    /// defaults of [`children`](Self::children) and [`grow`](Self::grow)
    /// follow from it.
    fn filter_child(&self) -> Option<&str> {
        None
    }

    /// The names of the child nodes, in the order the options list them.
    fn children(&self) -> Vec<&str> {
        self.filter_child().into_iter().collect()
    }

    /// The children that writes to the node reach (all of them, but for a
    /// qcow2 node's backing node, which is only read): a read-only one
    /// makes the node read-only.
    fn written_children(&self) -> Vec<&str> {
        self.children()
    }

    /// The request field naming the children, for errors
    /// (`node.raw.child`); a leaf's is its options (`node.io_uring`).
    fn child_field(&self) -> &'static str;

    /// Whether the node refuses writes by its own option (not its children's).
    fn read_only(&self) -> bool {
        false
    }

    /// The request field of its own read-only option, if it has one.
    fn read_only_field(&self) -> Option<&'static str> {
        None
    }

    /// What the node is, for people: `io_uring on PATH`, `raw over CHILD`.
    fn summary(&self) -> String;

    /// What UpdateNode changes from this node to `new` (a node of the same
    /// kind; both valid), as human-readable items ("read-only on",
    /// "throttle limits", ...), or why it may not: children, paths and
    /// sizes are fixed (sizes change with ResizeNode).
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError>;

    /// How the node grows to `size` bytes (ResizeNode), its child being
    /// `child_size` bytes (0: not known); `at` names the node in errors
    /// (`"w0" (under node "top")`). By default a filter grows with its
    /// child and anything else cannot grow.
    fn grow(&self, size: u64, child_size: u64, at: &str) -> Result<Grow, GraphError> {
        let _ = child_size;
        match self.filter_child() {
            Some(child) => Ok(Grow::Child {
                child: child.to_string(),
                size,
            }),
            None => Err(cannot_grow(self.name(), at)),
        }
    }

    /// Whether one connection holds the node at a time (a leaf that serves
    /// one connection, a zoned node whose state is one worker's): a graph
    /// with such a node is closed before it is opened again, and its
    /// queues move to another worker all at once.
    fn exclusive(&self) -> bool {
        false
    }

    /// The path on the host the node opens, and what it must be there,
    /// for the manager to check when the node is added.
    fn host_path(&self) -> Option<HostPath<'_>> {
        None
    }

    /// Checks the kind's own fields; `node` is the node's name.
    fn validate(&self, node: &str) -> Result<(), GraphError>;

    /// The node's size in bytes given its child's (`child_size`, 0 when it
    /// has none or it is not known yet) and, for a leaf, the size the
    /// manager knows of its file or device (`probed`: found by a look at
    /// the path, or known from before). 0: not known until a worker opens
    /// the node.
    fn size(&self, child_size: u64, probed: Option<u64>) -> Result<u64, GraphError>;
}

/// How a node grows ([`NodeKind::grow`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Grow {
    /// Its own size option becomes the new size: its new options.
    Options(Driver),
    /// It passes the growth down: its child must be `size` bytes.
    Child {
        /// The child.
        child: String,
        /// The child's new size.
        size: u64,
    },
    /// Its file grows (a block device must have grown) to the new size.
    File {
        /// The file or device.
        path: String,
        /// Whether the node is read-only (its file is then not extended).
        read_only: bool,
    },
}

/// What a node's path on the host must be when the node is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A regular file or block device; its size is the node's.
    FileOrBlockDevice,
    /// A character device (NVMe generic device, vhost-vdpa device).
    CharDevice,
    /// A listening unix socket (a vhost-user-blk target).
    Socket,
    /// A regular file, or a missing one whose directory exists (the worker
    /// creates it).
    NewOrRegularFile,
}

/// A path on the host a node opens ([`NodeKind::host_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPath<'a> {
    /// The request field holding it, for errors.
    pub field: &'static str,
    /// The path.
    pub path: &'a str,
    /// What it must be.
    pub kind: PathKind,
}

/// The driver keys of every kind, in the order the configuration file
/// lists them.
pub const KIND_NAMES: [&str; 10] = [
    "io_uring",
    "null",
    "nvme_io_uring",
    "virtio_blk_vhost_user",
    "virtio_blk_vhost_vdpa",
    "raw",
    "zoned",
    "qcow2",
    "throttle",
    "fault_injection",
];

/// The kind of a node's driver: the one table of kinds.
pub fn kind_of(driver: &Driver) -> &dyn NodeKind {
    match driver {
        Driver::IoUring(o) => o,
        Driver::Null(o) => o,
        Driver::NvmeIoUring(o) => o,
        Driver::VirtioBlkVhostUser(o) => o,
        Driver::VirtioBlkVhostVdpa(o) => o,
        Driver::Raw(o) => o,
        Driver::Throttle(o) => o,
        Driver::FaultInjection(o) => o,
        Driver::Zoned(o) => o,
        Driver::Qcow2(o) => o,
    }
}

/// The kind of a node, `None` when its driver is not set.
pub fn kind(spec: &NodeSpec) -> Option<&dyn NodeKind> {
    spec.driver.as_ref().map(kind_of)
}

/// Short driver name of a node (`io_uring`, `null`, `nvme_io_uring`,
/// `virtio_blk_vhost_user`, `virtio_blk_vhost_vdpa`, `raw`, `throttle`,
/// `fault_injection`, `zoned`, `qcow2`: the `NodeSpec.driver` field names), or `none`.
pub fn driver_name(spec: &NodeSpec) -> &'static str {
    kind(spec).map_or("none", |k| k.name())
}

/// The names of the children of a node, in the order its driver lists them.
pub fn children(spec: &NodeSpec) -> Vec<&str> {
    kind(spec).map(|k| k.children()).unwrap_or_default()
}

/// The children of a node that its writes reach ([`NodeKind::written_children`]).
pub fn written_children(spec: &NodeSpec) -> Vec<&str> {
    kind(spec).map(|k| k.written_children()).unwrap_or_default()
}

/// The request field that names a node's children, for error messages.
pub fn child_field(spec: &NodeSpec) -> &'static str {
    kind(spec).map_or("node.driver", |k| k.child_field())
}

/// Whether one connection holds node `spec` at a time ([`NodeKind::exclusive`]).
pub fn exclusive(spec: &NodeSpec) -> bool {
    kind(spec).is_some_and(|k| k.exclusive())
}

/// The path on the host node `spec` opens, if any ([`NodeKind::host_path`]).
pub fn host_path(spec: &NodeSpec) -> Option<HostPath<'_>> {
    kind(spec).and_then(|k| k.host_path())
}

/// The changes `new` makes to `old` (same name), as human-readable items
/// ("read-only on", "throttle limits", ...), or why it may not: the driver,
/// and what each kind fixes ([`NodeKind::update`]), `INVALID_ARGUMENT`
/// naming the field. Both specs must be valid.
pub fn update_changes(old: &NodeSpec, new: &NodeSpec) -> Result<Vec<String>, GraphError> {
    match (&old.driver, &new.driver) {
        (_, None) => Err(GraphError::invalid(
            "node.driver",
            "must be set (the node's current driver)",
        )),
        (Some(a), Some(b)) if kind_of(a).name() == kind_of(b).name() => kind_of(a).update(b),
        _ => Err(cannot_change(
            "node.driver",
            &format!(
                "node {:?} is {}, got {}",
                old.name,
                driver_name(old),
                driver_name(new)
            ),
        )),
    }
}

/// The refusal of `new` by a kind's [`NodeKind::update`] when it is of
/// another kind ([`update_changes`] compares the kinds first).
pub(crate) fn other_kind(old: &dyn NodeKind, new: &Driver) -> GraphError {
    cannot_change(
        "node.driver",
        &format!("is {}, got {}", old.name(), kind_of(new).name()),
    )
}

/// The refusal of ResizeNode for a node `at` of kind `kind` that cannot grow.
pub(crate) fn cannot_grow(kind: &str, at: &str) -> GraphError {
    GraphError::precondition(
        "name",
        format!("node {at} is a {kind} node: it cannot grow"),
    )
}

/// Whether a node refuses writes by its own option (not its children's).
pub(crate) fn own_read_only(spec: &NodeSpec) -> bool {
    kind(spec).is_some_and(|k| k.read_only())
}

/// The request field of a node's own read-only option; `node` when it has
/// none (the node as a whole is meant).
pub fn read_only_field(spec: &NodeSpec) -> &'static str {
    kind(spec)
        .and_then(|k| k.read_only_field())
        .unwrap_or("node")
}

/// The size in bytes of node `spec`, from its child's size (`child_size`
/// looks a name up; 0 = not known) and what a look at its file or device
/// found (`probed`). 0 = not known until a worker opens the node.
pub fn node_size(
    spec: &NodeSpec,
    child_size: impl Fn(&str) -> u64,
    probed: Option<u64>,
) -> Result<u64, GraphError> {
    let kind = kind(spec).ok_or_else(|| GraphError::invalid("node.driver", "must be set"))?;
    let child = kind.children().first().map_or(0, |c| child_size(c));
    kind.size(child, probed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::{
        FaultInjectionOptions, IoUringOptions, NullOptions, NvmeIoUringOptions, Qcow2Options,
        RawOptions, ThrottleOptions, VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions,
        ZonedOptions,
    };

    fn every_kind() -> [Driver; 10] {
        [
            Driver::IoUring(IoUringOptions::default()),
            Driver::Null(NullOptions::default()),
            Driver::NvmeIoUring(NvmeIoUringOptions::default()),
            Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions::default()),
            Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions::default()),
            Driver::Raw(RawOptions::default()),
            Driver::Zoned(ZonedOptions::default()),
            Driver::Qcow2(Qcow2Options::default()),
            Driver::Throttle(ThrottleOptions::default()),
            Driver::FaultInjection(FaultInjectionOptions::default()),
        ]
    }

    #[test]
    fn the_table_names_every_kind_once_in_order() {
        let names: Vec<&str> = every_kind().iter().map(|d| kind_of(d).name()).collect();
        assert_eq!(names, KIND_NAMES);
    }

    #[test]
    fn leaves_have_no_children_filters_one_and_qcow2_its_file() {
        for d in every_kind() {
            let k = kind_of(&d);
            let filter = matches!(k.name(), "raw" | "zoned" | "throttle" | "fault_injection");
            let format = k.name() == "qcow2";
            assert_eq!(
                k.children().len(),
                usize::from(filter || format),
                "{}",
                k.name()
            );
            let want = if format {
                "node.qcow2.file".to_string()
            } else if filter {
                format!("node.{}.child", k.name())
            } else {
                format!("node.{}", k.name())
            };
            assert_eq!(k.child_field(), want);
        }
    }

    #[test]
    fn summaries_and_read_only_fields() {
        let got: Vec<(String, Option<&str>)> = every_kind()
            .iter()
            .map(|d| (kind_of(d).summary(), kind_of(d).read_only_field()))
            .collect();
        let want = [
            ("io_uring on ", Some("node.io_uring.read_only")),
            ("null, 0 bytes", None),
            ("nvme-io_uring on ", Some("node.nvme_io_uring.read_only")),
            (
                "virtio-blk-vhost-user to ",
                Some("node.virtio_blk_vhost_user.read_only"),
            ),
            (
                "virtio-blk-vhost-vdpa on ",
                Some("node.virtio_blk_vhost_vdpa.read_only"),
            ),
            ("raw over ", None),
            ("zoned over ", None),
            ("qcow2 in ", Some("node.qcow2.read_only")),
            ("throttle over ", None),
            ("fault-injection over ", None),
        ];
        let want: Vec<(String, Option<&str>)> =
            want.iter().map(|(s, f)| (s.to_string(), *f)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn host_paths_of_every_kind() {
        let got: Vec<Option<(&str, PathKind)>> = every_kind()
            .iter()
            .map(|d| kind_of(d).host_path().map(|h| (h.field, h.kind)))
            .collect();
        use PathKind::*;
        let want = [
            Some(("node.io_uring.path", FileOrBlockDevice)),
            None,
            Some(("node.nvme_io_uring.path", CharDevice)),
            Some(("node.virtio_blk_vhost_user.path", Socket)),
            Some(("node.virtio_blk_vhost_vdpa.path", CharDevice)),
            None,
            Some(("node.zoned.metadata_path", NewOrRegularFile)),
            None,
            None,
            None,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn an_update_to_another_kind_is_refused() {
        let [_, null, .., fault] = every_kind();
        let e = kind_of(&null).update(&fault).unwrap_err();
        assert_eq!(
            e.to_string(),
            "node.driver: cannot be changed by UpdateNode (is null, got fault_injection); \
             only options can"
        );
        let spec = |driver| NodeSpec {
            name: "n".into(),
            driver,
        };
        let e = update_changes(&spec(Some(null.clone())), &spec(Some(fault))).unwrap_err();
        assert!(
            e.to_string()
                .contains("node \"n\" is null, got fault_injection"),
            "{e}"
        );
        let e = update_changes(&spec(Some(null)), &spec(None)).unwrap_err();
        assert_eq!(e.field(), Some("node.driver"));
    }

    #[test]
    fn how_every_kind_grows() {
        let at = "\"n\"";
        let got: Vec<Result<Grow, String>> = every_kind()
            .iter()
            .map(|d| kind_of(d).grow(4096, 0, at).map_err(|e| e.to_string()))
            .collect();
        let child = |size| {
            Ok(Grow::Child {
                child: String::new(),
                size,
            })
        };
        let cannot = |k: &str| Err(format!("name: node \"n\" is a {k} node: it cannot grow"));
        let want = vec![
            Ok(Grow::File {
                path: String::new(),
                read_only: false,
            }),
            Ok(Grow::Options(Driver::Null(NullOptions {
                size: 4096,
                latency_ns: 0,
            }))),
            cannot("nvme_io_uring"),
            cannot("virtio_blk_vhost_user"),
            cannot("virtio_blk_vhost_vdpa"),
            child(4096),
            Err("name: node \"n\" is zoned: it cannot be resized".to_string()),
            Ok(Grow::Options(Driver::Qcow2(Qcow2Options {
                size: 4096,
                ..Default::default()
            }))),
            child(4096),
            child(4096),
        ];
        assert_eq!(got, want);
        // An explicit raw window grows within its child.
        let raw = RawOptions {
            child: "c".into(),
            offset: 512,
            size: 512,
        };
        assert_eq!(
            raw.grow(1024, 2048, at),
            Ok(Grow::Options(Driver::Raw(RawOptions {
                size: 1024,
                ..raw.clone()
            })))
        );
        let e = raw.grow(4096, 2048, at).unwrap_err().to_string();
        assert!(
            e.contains("window 512+4096 does not fit in child \"c\""),
            "{e}"
        );
        assert!(raw
            .grow(u64::MAX, 0, at)
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }

    #[test]
    fn one_connection_holds_device_connections_and_zoned_nodes() {
        let exclusive: Vec<&str> = every_kind()
            .iter()
            .map(kind_of)
            .filter(|k| k.exclusive())
            .map(|k| k.name())
            .collect();
        assert_eq!(
            exclusive,
            [
                "virtio_blk_vhost_user",
                "virtio_blk_vhost_vdpa",
                "zoned",
                "qcow2"
            ]
        );
    }

    #[test]
    fn a_node_without_driver_has_no_kind() {
        let spec = NodeSpec {
            name: "n".into(),
            driver: None,
        };
        assert_eq!(driver_name(&spec), "none");
        assert!(children(&spec).is_empty());
        assert_eq!(child_field(&spec), "node.driver");
        assert!(!own_read_only(&spec));
        assert_eq!(read_only_field(&spec), "node");
        let e = node_size(&spec, |_| 0, None).unwrap_err();
        assert_eq!(e.to_string(), "node.driver: must be set");
    }
}
