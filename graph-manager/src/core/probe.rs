//! The filesystem checks of AddNode: what a device leaf's path must be.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;

use blkmesh_graph::kinds::{host_path, PathKind};
use blkmesh_graph::{GraphError, SECTOR_SIZE};
use blkmesh_proto::v1::NodeSpec;

use crate::core::zoned;

/// What a path turned out to be, for error messages.
fn file_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Size in bytes of a regular file or block device, rounded down to whole
/// sectors. Errors name `field`.
fn probe_file_or_block_device(field: &'static str, path: &str) -> Result<u64, GraphError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| GraphError::invalid(field, format!("cannot stat {path:?}: {e}")))?;
    let ft = meta.file_type();
    let size = if ft.is_file() {
        meta.len()
    } else if ft.is_block_device() {
        let mut f = File::open(path)
            .map_err(|e| GraphError::invalid(field, format!("cannot open {path:?}: {e}")))?;
        f.seek(SeekFrom::End(0)).map_err(|e| {
            GraphError::invalid(field, format!("cannot get the size of {path:?}: {e}"))
        })?
    } else {
        return Err(GraphError::invalid(
            field,
            format!(
                "must be a regular file or block device ({path:?} is {})",
                file_kind(&ft)
            ),
        ));
    };
    Ok(size - size % SECTOR_SIZE)
}

/// What the path of a device-backed protocol node must be.
#[derive(Debug, Clone, Copy)]
enum DeviceKind {
    /// A character device (NVMe generic device, vhost-vdpa device).
    CharDevice,
    /// A listening unix socket (a vhost-user-blk target).
    Socket,
}

/// Checks that `path` exists and is a `kind`, without opening it: a
/// vhost-user target may serve a single connection, and opening a device
/// is the worker's job. Errors name `field`.
fn probe_device_path(field: &'static str, path: &str, kind: DeviceKind) -> Result<(), GraphError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| GraphError::invalid(field, format!("cannot stat {path:?}: {e}")))?;
    let ft = meta.file_type();
    let (ok, want) = match kind {
        DeviceKind::CharDevice => (ft.is_char_device(), "a character device"),
        DeviceKind::Socket => (ft.is_socket(), "a unix socket"),
    };
    if ok {
        Ok(())
    } else {
        Err(GraphError::invalid(
            field,
            format!("must be {want} ({path:?} is {})", file_kind(&ft)),
        ))
    }
}

/// The filesystem checks of AddNode, for the path on the host the node's
/// kind opens (`blkmesh_graph::kinds::host_path`): an io_uring path must
/// be a regular file or block device (its size in whole sectors is
/// returned), the other device leaves' paths must exist and be what their
/// driver opens, a zoned node's metadata file must be creatable. Other
/// nodes: `None`.
pub(crate) fn probe_node_paths(spec: &NodeSpec) -> Result<Option<u64>, GraphError> {
    let Some(host) = host_path(spec) else {
        return Ok(None);
    };
    match host.kind {
        PathKind::FileOrBlockDevice => probe_file_or_block_device(host.field, host.path).map(Some),
        PathKind::CharDevice => {
            probe_device_path(host.field, host.path, DeviceKind::CharDevice).map(|()| None)
        }
        PathKind::Socket => {
            probe_device_path(host.field, host.path, DeviceKind::Socket).map(|()| None)
        }
        PathKind::NewOrRegularFile => {
            zoned::probe_metadata_path(host.field, host.path).map(|()| None)
        }
    }
}
