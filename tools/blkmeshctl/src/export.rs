//! `export add|remove|list`.

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::{
    AddExportRequest, ListExportsRequest, RemoveExportRequest, VhostUserBlkExport,
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
    let mut client = ExportServiceClient::new(channel);
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
