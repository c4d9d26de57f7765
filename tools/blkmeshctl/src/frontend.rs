//! `frontend list`.

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::frontend_service_client::FrontendServiceClient;
use blkmesh_proto::v1::ListFrontendsRequest;
use clap::Subcommand;

use crate::failure::Failure;
use crate::view::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum FrontendCmd {
    /// List the frontends the manager has seen since it started, and the
    /// exports each serves, waits for or failed to open.
    List,
}

pub(crate) async fn frontend(
    cmd: FrontendCmd,
    channel: ManagerChannel,
    out: Output,
) -> Result<(), Failure> {
    match cmd {
        FrontendCmd::List => {
            let frontends = FrontendServiceClient::new(channel)
                .list_frontends(ListFrontendsRequest {})
                .await?
                .into_inner()
                .frontends;
            out.frontends(&frontends);
            Ok(())
        }
    }
}
