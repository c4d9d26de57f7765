//! `blkmesh.v1.FrontendService` over [`Control`].

use std::sync::Arc;

use blkmesh_proto::v1::frontend_service_server::FrontendService;
use blkmesh_proto::v1::{
    ExportStatus, FrontendEvent, FrontendHello, ListFrontendsRequest, ListFrontendsResponse,
    ReportExportResponse, ZoneCommandDone, ZoneCommandDoneResponse,
};
use tonic::{Request, Response, Status};

use crate::api::streams::{unbounded, EventStream};
use crate::control::hub::Control;

/// `blkmesh.v1.FrontendService`.
pub(crate) struct FrontendApi(pub Arc<Control>);

#[tonic::async_trait]
impl FrontendService for FrontendApi {
    async fn list_frontends(
        &self,
        _request: Request<ListFrontendsRequest>,
    ) -> Result<Response<ListFrontendsResponse>, Status> {
        Ok(Response::new(self.0.list_frontends()))
    }

    async fn report_export(
        &self,
        request: Request<ExportStatus>,
    ) -> Result<Response<ReportExportResponse>, Status> {
        self.0.report_export(request.into_inner())?;
        Ok(Response::new(ReportExportResponse {}))
    }

    async fn zone_command_done(
        &self,
        request: Request<ZoneCommandDone>,
    ) -> Result<Response<ZoneCommandDoneResponse>, Status> {
        self.0.zone_done(request.into_inner());
        Ok(Response::new(ZoneCommandDoneResponse {}))
    }

    type RegisterStream = EventStream<FrontendEvent>;

    async fn register(
        &self,
        request: Request<FrontendHello>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let events = self.0.register_frontend(request.into_inner())?;
        Ok(Response::new(unbounded(events)))
    }
}
