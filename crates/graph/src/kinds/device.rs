//! The leaves over a file or a device: `io_uring` (a file or block
//! device), `nvme_io_uring` (an NVMe char device), `virtio_blk_vhost_user`
//! (a vhost-user-blk socket) and `virtio_blk_vhost_vdpa` (a vDPA device).
//! Each has a path and a read-only option; its size is what the manager
//! knows of the file (an io_uring file's is probed by AddNode), else it is
//! known when a worker opens it.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    IoUringOptions, NvmeIoUringOptions, VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions,
};

use crate::error::GraphError;
use crate::fields::{validate_abs_path, validate_socket_path, MAX_PATH_LEN};
use crate::kinds::{cannot_grow, other_kind, Grow, HostPath, NodeKind, PathKind};
use crate::update::{same_path, Changes};

/// A file or device path: absolute, at most `PATH_MAX` bytes.
fn file_path(field: &'static str, path: &str) -> Result<(), GraphError> {
    validate_abs_path(field, path, MAX_PATH_LEN)
}

/// A device leaf `$options` (`Driver::$variant`) with driver key `$name`
/// whose `path` passes `$check` and must be a `$path_kind` on the host;
/// whether its file grows (ResizeNode), whether it serves one connection
/// at a time ([`NodeKind::exclusive`]), and what it does with the path
/// (`$what PATH`); `$flag` is an option besides read-only that UpdateNode
/// changes.
macro_rules! device_leaf {
    (
        $options:ty,
        $variant:ident,
        $name:literal,
        $check:path,
        $path_kind:ident,
        $file_grows:literal,
        $exclusive:literal,
        $what:literal
        $(, $flag:literal => $field:ident)?
    ) => {
        impl NodeKind for $options {
            fn name(&self) -> &'static str {
                $name
            }

            fn child_field(&self) -> &'static str {
                concat!("node.", $name)
            }

            fn read_only(&self) -> bool {
                self.read_only
            }

            fn exclusive(&self) -> bool {
                $exclusive
            }

            fn read_only_field(&self) -> Option<&'static str> {
                Some(concat!("node.", $name, ".read_only"))
            }

            fn summary(&self) -> String {
                format!(concat!($what, " {}"), self.path)
            }

            fn host_path(&self) -> Option<HostPath<'_>> {
                Some(HostPath {
                    field: concat!("node.", $name, ".path"),
                    path: &self.path,
                    kind: PathKind::$path_kind,
                })
            }

            fn validate(&self, _node: &str) -> Result<(), GraphError> {
                $check(concat!("node.", $name, ".path"), &self.path)
            }

            fn size(&self, _child_size: u64, probed: Option<u64>) -> Result<u64, GraphError> {
                Ok(probed.unwrap_or(0))
            }

            /// A file (io_uring) grows; a device does not.
            fn grow(&self, _size: u64, _child_size: u64, at: &str) -> Result<Grow, GraphError> {
                if !$file_grows {
                    return Err(cannot_grow($name, at));
                }
                Ok(Grow::File {
                    path: self.path.clone(),
                    read_only: self.read_only,
                })
            }

            /// The path is fixed; the read-only option (and `$flag`) change.
            fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
                let Driver::$variant(b) = new else {
                    return Err(other_kind(self, new));
                };
                same_path(concat!("node.", $name, ".path"), &self.path, &b.path)?;
                let mut changes = Changes::default();
                changes.flag("read-only", self.read_only, b.read_only);
                $(changes.flag($flag, self.$field, b.$field);)?
                Ok(changes.0)
            }
        }
    };
}

device_leaf!(
    IoUringOptions,
    IoUring,
    "io_uring",
    file_path,
    FileOrBlockDevice,
    true,
    false,
    "io_uring on",
    "direct" => direct
);
device_leaf!(
    NvmeIoUringOptions,
    NvmeIoUring,
    "nvme_io_uring",
    file_path,
    CharDevice,
    false,
    false,
    "nvme-io_uring on"
);
// libblkio connect()s to the socket, so the sun_path limit applies.
device_leaf!(
    VirtioBlkVhostUserOptions,
    VirtioBlkVhostUser,
    "virtio_blk_vhost_user",
    validate_socket_path,
    Socket,
    false,
    true,
    "virtio-blk-vhost-user to"
);
device_leaf!(
    VirtioBlkVhostVdpaOptions,
    VirtioBlkVhostVdpa,
    "virtio_blk_vhost_vdpa",
    file_path,
    CharDevice,
    false,
    true,
    "virtio-blk-vhost-vdpa on"
);
