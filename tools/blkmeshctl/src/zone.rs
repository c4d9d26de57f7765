//! `zone report|open|close|finish|reset|reset-all`.

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::zone_service_client::ZoneServiceClient;
use blkmesh_proto::v1::{ManageZoneRequest, ReportZonesRequest, ZoneAction};
use clap::{Args, Subcommand};

use crate::failure::Failure;
use crate::view::Output;
use blkmesh_graph::size::parse_size;

#[derive(Debug, Subcommand)]
pub(crate) enum ZoneCmd {
    /// Report the zones of an export: START, LENGTH, CAPACITY, write
    /// pointer, TYPE and CONDITION of each.
    Report {
        /// Export id.
        export: String,
        /// From the zone containing this byte offset (k/M/G/T suffixes).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// At most N zones (0 = up to 4096).
        #[arg(long, value_name = "N", default_value_t = 0)]
        count: u32,
    },
    /// Open a zone explicitly.
    Open(ZoneAt),
    /// Close an open zone.
    Close(ZoneAt),
    /// Make a zone full.
    Finish(ZoneAt),
    /// Reset a zone: empty, write pointer at its start.
    Reset(ZoneAt),
    /// Reset every zone of an export.
    ResetAll {
        /// Export id.
        export: String,
    },
}

/// The zone of an action.
#[derive(Debug, Args)]
pub(crate) struct ZoneAt {
    /// Export id.
    export: String,
    /// Start of the zone in bytes (a multiple of the zone size; k/M/G/T suffixes).
    #[arg(value_parser = parse_size)]
    offset: u64,
}

pub(crate) async fn zone(
    cmd: ZoneCmd,
    channel: ManagerChannel,
    out: Output,
) -> Result<(), Failure> {
    let mut client = ZoneServiceClient::new(channel);
    let (action, name, at) = match cmd {
        ZoneCmd::Report {
            export,
            offset,
            count,
        } => {
            let report = client
                .report_zones(ReportZonesRequest {
                    export: export.clone(),
                    offset,
                    max_zones: count,
                })
                .await?
                .into_inner();
            out.zone_report(&export, &report);
            return Ok(());
        }
        ZoneCmd::Open(at) => (ZoneAction::Open, "open", at),
        ZoneCmd::Close(at) => (ZoneAction::Close, "close", at),
        ZoneCmd::Finish(at) => (ZoneAction::Finish, "finish", at),
        ZoneCmd::Reset(at) => (ZoneAction::Reset, "reset", at),
        ZoneCmd::ResetAll { export } => (
            ZoneAction::ResetAll,
            "reset-all",
            ZoneAt { export, offset: 0 },
        ),
    };
    let zone = client
        .manage_zone(ManageZoneRequest {
            export: at.export.clone(),
            action: action as i32,
            offset: at.offset,
        })
        .await?
        .into_inner()
        .zone;
    out.zone_action(&at.export, name, zone.as_ref());
    Ok(())
}
