//! `export add|snapshot|remove|list`.

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::get_image_info_request::Target;
use blkmesh_proto::v1::image_service_client::ImageServiceClient;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    AddExportRequest, AddNodeRequest, CreateImageRequest, GetImageInfoRequest, ImageFormat,
    IoUringOptions, ListExportsRequest, NodeSpec, Qcow2Options, RemoveExportRequest,
    SnapshotExportRequest, VhostUserBlkExport,
};
use clap::Subcommand;

use crate::failure::Failure;
use crate::view::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum ExportCmd {
    /// Add a vhost-user-blk export.
    Add {
        id: String,
        /// Root node of the export.
        #[arg(long)]
        node: String,
        /// Absolute path of the vhost-user socket.
        #[arg(long)]
        socket: String,
        /// Number of virtqueues (default 1).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        num_queues: u32,
        /// Virtqueue size (default 256).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        queue_size: u32,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Accept writes.
        #[arg(long)]
        writable: bool,
        /// GET_ID serial (default: the export id).
        #[arg(long, default_value = "")]
        serial: String,
        /// Spread the queues over the live workers (round robin) instead of
        /// placing them all on one. Refused over a throttle without a group
        /// and over a zoned node.
        #[arg(long)]
        spread: bool,
    },
    /// Live external snapshot: the export switches to an overlay of its
    /// node while the guest runs (QEMU's blockdev-snapshot). With --image,
    /// the overlay is made first: a qcow2 image backed by the export's
    /// image, its io_uring node (NAME-file) and qcow2 node (NAME).
    Snapshot {
        id: String,
        /// An existing qcow2 node whose backing node is the export's node.
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        overlay: Option<String>,
        /// Absolute path of the overlay image to create.
        #[arg(long, requires = "name")]
        image: Option<String>,
        /// Name of the overlay node to add (with --image).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an export.
    Remove { id: String },
    /// List exports.
    List,
}

pub(crate) async fn export(
    cmd: ExportCmd,
    channel: ManagerChannel,
    out: Output,
) -> Result<(), Failure> {
    let mut client = ExportServiceClient::new(channel.clone());
    match cmd {
        ExportCmd::Add {
            id,
            node,
            socket,
            num_queues,
            queue_size,
            block_size,
            writable,
            serial,
            spread,
        } => {
            let export = VhostUserBlkExport {
                id,
                node,
                socket,
                num_queues,
                queue_size,
                logical_block_size: block_size,
                writable,
                serial,
                spread_queues: spread,
            };
            let info = client
                .add_export(AddExportRequest {
                    export: Some(export),
                })
                .await?
                .into_inner()
                .export
                .unwrap_or_default();
            out.export(&info);
        }
        ExportCmd::Snapshot {
            id,
            overlay,
            image,
            name,
        } => {
            let overlay = match (overlay, image, name) {
                (Some(o), _, _) => o,
                (None, Some(image), Some(name)) => {
                    make_overlay(&channel, &mut client, &id, &image, &name).await?
                }
                _ => unreachable!("clap requires --overlay or --image with --name"),
            };
            let info = client
                .snapshot_export(SnapshotExportRequest { id, overlay })
                .await?
                .into_inner()
                .export
                .unwrap_or_default();
            out.export(&info);
        }
        ExportCmd::Remove { id } => {
            client
                .remove_export(RemoveExportRequest { id: id.clone() })
                .await?;
            out.removed("export", &id);
        }
        ExportCmd::List => {
            let exports = client
                .list_exports(ListExportsRequest {})
                .await?
                .into_inner()
                .exports;
            out.exports(&exports);
        }
    }
    Ok(())
}

/// Makes the overlay of export `id`'s node for `export snapshot --image`:
/// a qcow2 image at `image` backed by the node's top image, its io_uring
/// node `NAME-file` and its qcow2 node `name`. Returns `name`.
async fn make_overlay(
    channel: &ManagerChannel,
    exports: &mut ExportServiceClient<ManagerChannel>,
    id: &str,
    image: &str,
    name: &str,
) -> Result<String, Failure> {
    let listed = exports
        .list_exports(ListExportsRequest {})
        .await?
        .into_inner()
        .exports;
    let node = listed
        .iter()
        .filter_map(|e| e.export.as_ref())
        .find(|e| e.id == id)
        .map(|e| e.node.clone())
        .ok_or_else(|| Failure {
            code: "NOT_FOUND",
            message: format!("id: export {id:?} not found"),
        })?;
    let mut images = ImageServiceClient::new(channel.clone());
    let chain = images
        .get_image_info(GetImageInfoRequest {
            target: Some(Target::Node(node.clone())),
        })
        .await?
        .into_inner()
        .chain;
    let top = chain.first().ok_or_else(|| Failure {
        code: "FAILED_PRECONDITION",
        message: format!("node {node:?} has no image"),
    })?;
    images
        .create_image(CreateImageRequest {
            path: image.to_string(),
            format: ImageFormat::Qcow2 as i32,
            size: top.virtual_size,
            backing_file: top.path.clone(),
            backing_format: top.format,
            ..Default::default()
        })
        .await?;
    let mut nodes = NodeServiceClient::new(channel.clone());
    let file = format!("{name}-file");
    for spec in [
        NodeSpec {
            name: file.clone(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: image.to_string(),
                ..Default::default()
            })),
        },
        NodeSpec {
            name: name.to_string(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: file.clone(),
                backing: node.clone(),
                ..Default::default()
            })),
        },
    ] {
        nodes
            .add_node(AddNodeRequest {
                node: Some(spec),
                ..Default::default()
            })
            .await?;
    }
    Ok(name.to_string())
}
