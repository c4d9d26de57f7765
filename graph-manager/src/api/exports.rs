//! `blkmesh.v1.ExportService` over [`Control`].

use std::sync::Arc;

use blkmesh_proto::v1::export_service_server::ExportService;
use blkmesh_proto::v1::{
    AddExportRequest, AddExportResponse, ListExportsRequest, ListExportsResponse,
    RemoveExportRequest, RemoveExportResponse, SnapshotExportRequest, SnapshotExportResponse,
};
use tonic::{Request, Response, Status};

use crate::control::hub::Control;
use crate::core::error::ApiError;

/// `blkmesh.v1.ExportService`.
pub(crate) struct ExportApi(pub Arc<Control>);

#[tonic::async_trait]
impl ExportService for ExportApi {
    async fn add_export(
        &self,
        request: Request<AddExportRequest>,
    ) -> Result<Response<AddExportResponse>, Status> {
        let export = request
            .into_inner()
            .export
            .ok_or(ApiError::Missing("export"))?;
        let info = self.0.add_export_and_wait(export).await?;
        Ok(Response::new(AddExportResponse { export: Some(info) }))
    }

    async fn remove_export(
        &self,
        request: Request<RemoveExportRequest>,
    ) -> Result<Response<RemoveExportResponse>, Status> {
        self.0.remove_export(&request.into_inner().id).await?;
        Ok(Response::new(RemoveExportResponse {}))
    }

    async fn snapshot_export(
        &self,
        request: Request<SnapshotExportRequest>,
    ) -> Result<Response<SnapshotExportResponse>, Status> {
        let r = request.into_inner();
        let info = self.0.snapshot_export(&r.id, &r.overlay).await?;
        Ok(Response::new(SnapshotExportResponse { export: Some(info) }))
    }

    async fn list_exports(
        &self,
        _request: Request<ListExportsRequest>,
    ) -> Result<Response<ListExportsResponse>, Status> {
        let exports = self.0.list_exports();
        Ok(Response::new(ListExportsResponse { exports }))
    }
}
