//! `blkmesh.v1.FrontendService` over [`Control`].

use std::sync::Arc;

use blkmesh_proto::v1::frontend_service_server::FrontendService;
use blkmesh_proto::v1::{ListFrontendsRequest, ListFrontendsResponse};
use tonic::{Request, Response, Status};

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
}
