//! `blkmesh.v1.ZoneService`: zone reports and zone actions on an export,
//! forwarded to the frontend serving it.
//!
//! The manager checks what it can (export known, graph zoned, offsets in
//! range and aligned), sends a `zone_command` with a fresh id on the
//! frontend's agent session (`blkmesh.agent.v1`), and waits up to the
//! apply timeout for the `zone_answer` with that id on the same session
//! (UNAVAILABLE otherwise, or at once when the session ends). The
//! frontend runs the command on the worker that owns the graph and answers
//! with the zones or an errno, mapped by [`errno_code`].

use std::sync::Arc;

use blkmesh_graph::GraphError;
use blkmesh_proto::agent::v1::zone_answer::Result as Answer;
use blkmesh_proto::agent::v1::{ZoneCommand, ZoneError};
use blkmesh_proto::v1::zone_service_server::ZoneService;
use blkmesh_proto::v1::{
    ManageZoneRequest, ManageZoneResponse, ReportZonesRequest, ReportZonesResponse, ZoneAction,
};
use tonic::{Code, Request, Response, Status};

use crate::control::hub::Control;
use crate::control::zone_calls::ZoneTarget;
use crate::core::error::ApiError;
use crate::sessions::MAX_REPORT_MESSAGE;

/// Most zones one ReportZones answers (also what `max_zones` 0 means);
/// larger requests are capped: page with `offset`.
pub(crate) const MAX_REPORT_ZONES: u32 = 4096;

// Linux errno values (asm-generic; every architecture the workers run on).
const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EIO: i32 = 5;
const EAGAIN: i32 = 11;
const ENOMEM: i32 = 12;
const EBUSY: i32 = 16;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EPIPE: i32 = 32;
const EBADRQC: i32 = 56;
const EOVERFLOW: i32 = 75;
const EOPNOTSUPP: i32 = 95;
const ECONNRESET: i32 = 104;
const ENOTCONN: i32 = 107;
const ETOOMANYREFS: i32 = 109;
const ETIMEDOUT: i32 = 110;
const ECONNREFUSED: i32 = 111;

/// The status code of a zone command the frontend failed with `errno`:
///
/// - EINVAL (bad offset or request): INVALID_ARGUMENT;
/// - ENOENT: NOT_FOUND (e.g. the frontend does not know the export);
/// - ENOTSUP/EOPNOTSUPP (not zoned), EBADRQC/EPERM/EBUSY (a transition the
///   zone model forbids), ETOOMANYREFS/EOVERFLOW (open/active zone limits),
///   EROFS (read-only graph): FAILED_PRECONDITION;
/// - ETIMEDOUT, EAGAIN and lost-connection errors (the worker did not
///   answer): UNAVAILABLE;
/// - anything else (EIO, ...): INTERNAL.
pub(crate) fn errno_code(errno: i32) -> Code {
    match errno {
        EINVAL => Code::InvalidArgument,
        ENOENT => Code::NotFound,
        EOPNOTSUPP | EBADRQC | ETOOMANYREFS | EOVERFLOW | EPERM | EBUSY | EROFS => {
            Code::FailedPrecondition
        }
        ETIMEDOUT | EAGAIN | ECONNRESET | ECONNREFUSED | ENOTCONN | EPIPE => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// The name of a Linux errno, e.g. `EBADRQC`, or `errno N`.
fn errno_name(errno: i32) -> String {
    let name = match errno {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EIO => "EIO",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EBUSY => "EBUSY",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EROFS => "EROFS",
        EPIPE => "EPIPE",
        EBADRQC => "EBADRQC",
        EOVERFLOW => "EOVERFLOW",
        EOPNOTSUPP => "EOPNOTSUPP",
        ECONNRESET => "ECONNRESET",
        ENOTCONN => "ENOTCONN",
        ETOOMANYREFS => "ETOOMANYREFS",
        ETIMEDOUT => "ETIMEDOUT",
        ECONNREFUSED => "ECONNREFUSED",
        n => return format!("errno {n}"),
    };
    name.to_string()
}

/// `action` as people say it: `open`, `reset-all`, ...
fn action_name(action: ZoneAction) -> &'static str {
    match action {
        ZoneAction::Unspecified => "report",
        ZoneAction::Open => "open",
        ZoneAction::Close => "close",
        ZoneAction::Finish => "finish",
        ZoneAction::Reset => "reset",
        ZoneAction::ResetAll => "reset-all",
    }
}

/// The error of a command the frontend refused.
fn refused(target: &ZoneTarget, what: &str, e: ZoneError) -> ApiError {
    let mut reason = e.message;
    if reason.len() > MAX_REPORT_MESSAGE {
        let mut cut = MAX_REPORT_MESSAGE;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    if reason.is_empty() {
        reason = "refused".into();
    }
    ApiError::ZoneRefused {
        errno: e.errno,
        message: format!(
            "export {:?}: {what}: {reason} ({})",
            target.export,
            errno_name(e.errno)
        ),
    }
}

/// An answer of the wrong kind.
fn unexpected(target: &ZoneTarget, what: &str, got: &str) -> ApiError {
    ApiError::Internal(format!(
        "export {:?}: frontend {:?} answered the {what} with {got}",
        target.export, target.frontend
    ))
}

fn answer_kind(a: &Option<Answer>) -> &'static str {
    match a {
        None => "no result",
        Some(Answer::Report(_)) => "a zone report",
        Some(Answer::Zone(_)) => "a zone",
        Some(Answer::Error(_)) => "an error",
    }
}

fn check_offset(target: &ZoneTarget, offset: u64) -> Result<(), ApiError> {
    // A size of 0 is not known yet: the worker checks.
    if target.size != 0 && offset >= target.size {
        return Err(GraphError::invalid(
            "offset",
            format!(
                "must be less than the size of export {:?} ({} bytes; got {offset})",
                target.export, target.size
            ),
        )
        .into());
    }
    Ok(())
}

/// `blkmesh.v1.ZoneService`.
pub(crate) struct ZoneApi(pub Arc<Control>);

impl ZoneApi {
    async fn report(&self, r: ReportZonesRequest) -> Result<ReportZonesResponse, ApiError> {
        let max_zones = match r.max_zones {
            0 => MAX_REPORT_ZONES,
            n => n.min(MAX_REPORT_ZONES),
        };
        let call = self.0.send_zone_command(&r.export, |target| {
            check_offset(target, r.offset)?;
            Ok(ZoneCommand {
                action: ZoneAction::Unspecified as i32,
                offset: r.offset,
                max_zones,
                ..Default::default()
            })
        })?;
        let target = call.target.clone();
        let what = format!("zone report from offset {}", r.offset);
        match call.answer().await? {
            Some(Answer::Report(mut report)) => {
                report.zones.truncate(max_zones as usize);
                if report.info.is_none() {
                    report.info = Some(target.info);
                }
                tracing::debug!(export = %target.export, offset = r.offset, zones = report.zones.len(), "zones reported");
                Ok(report)
            }
            Some(Answer::Error(e)) => Err(refused(&target, &what, e)),
            other => Err(unexpected(&target, &what, answer_kind(&other))),
        }
    }

    async fn manage(&self, r: ManageZoneRequest) -> Result<ManageZoneResponse, ApiError> {
        let action = match ZoneAction::try_from(r.action) {
            Ok(ZoneAction::Unspecified) | Err(_) => {
                return Err(GraphError::invalid(
                    "action",
                    format!(
                        "must be ZONE_ACTION_OPEN, ZONE_ACTION_CLOSE, ZONE_ACTION_FINISH, \
                         ZONE_ACTION_RESET or ZONE_ACTION_RESET_ALL (got {})",
                        r.action
                    ),
                )
                .into())
            }
            Ok(a) => a,
        };
        let offset = if action == ZoneAction::ResetAll {
            0
        } else {
            r.offset
        };
        let call = self.0.send_zone_command(&r.export, |target| {
            if action != ZoneAction::ResetAll {
                let zs = target.info.zone_size;
                if zs != 0 && offset % zs != 0 {
                    return Err(GraphError::invalid(
                        "offset",
                        format!(
                            "must be the start of a zone: a multiple of the zone size {zs} of \
                             export {:?} (got {offset})",
                            target.export
                        ),
                    )
                    .into());
                }
                check_offset(target, offset)?;
            }
            Ok(ZoneCommand {
                action: action as i32,
                offset,
                ..Default::default()
            })
        })?;
        let target = call.target.clone();
        let what = if action == ZoneAction::ResetAll {
            "zone reset-all".to_string()
        } else {
            format!("zone {} at offset {offset}", action_name(action))
        };
        let zone = match call.answer().await? {
            Some(Answer::Zone(z)) => Some(z),
            None => None,
            Some(Answer::Error(e)) => return Err(refused(&target, &what, e)),
            other @ Some(Answer::Report(_)) => {
                return Err(unexpected(&target, &what, answer_kind(&other)))
            }
        };
        tracing::info!(export = %target.export, action = action_name(action), offset, "zone action");
        // Reset-all acts on no single zone, whatever the frontend sent along.
        let zone = if action == ZoneAction::ResetAll {
            None
        } else {
            zone
        };
        Ok(ManageZoneResponse { zone })
    }
}

#[tonic::async_trait]
impl ZoneService for ZoneApi {
    async fn report_zones(
        &self,
        request: Request<ReportZonesRequest>,
    ) -> Result<Response<ReportZonesResponse>, Status> {
        Ok(Response::new(self.report(request.into_inner()).await?))
    }

    async fn manage_zone(
        &self,
        request: Request<ManageZoneRequest>,
    ) -> Result<Response<ManageZoneResponse>, Status> {
        Ok(Response::new(self.manage(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_code(EINVAL), Code::InvalidArgument);
        assert_eq!(errno_code(ENOENT), Code::NotFound);
        for e in [
            EOPNOTSUPP,
            EBADRQC,
            ETOOMANYREFS,
            EOVERFLOW,
            EPERM,
            EBUSY,
            EROFS,
        ] {
            assert_eq!(errno_code(e), Code::FailedPrecondition, "{e}");
        }
        assert_eq!(errno_code(ETIMEDOUT), Code::Unavailable);
        assert_eq!(errno_code(EIO), Code::Internal);
        assert_eq!(errno_code(0), Code::Internal);
        assert_eq!(errno_code(-5), Code::Internal);
        assert_eq!(errno_name(EBADRQC), "EBADRQC");
        assert_eq!(errno_name(4000), "errno 4000");
    }
}
