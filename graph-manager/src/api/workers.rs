//! `blkmesh.v1.WorkerService` over [`Control`].

use std::sync::Arc;

use blkmesh_proto::v1::worker_service_server::WorkerService;
use blkmesh_proto::v1::{
    DrainWorkerRequest, DrainWorkerResponse, ListWorkersRequest, ListWorkersResponse,
    MoveNodeRequest, MoveNodeResponse, MoveQueueRequest, MoveQueueResponse,
};
use tonic::{Request, Response, Status};

use crate::control::hub::Control;

/// `blkmesh.v1.WorkerService`.
pub(crate) struct WorkerApi(pub Arc<Control>);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self.0.list_workers();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn move_queue(
        &self,
        request: Request<MoveQueueRequest>,
    ) -> Result<Response<MoveQueueResponse>, Status> {
        let r = request.into_inner();
        let info = self.0.move_queue(&r.export, r.queue, &r.worker).await?;
        Ok(Response::new(MoveQueueResponse { export: Some(info) }))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        let moved = self.0.drain_worker(&request.into_inner().worker).await?;
        Ok(Response::new(DrainWorkerResponse { moved }))
    }

    async fn move_node(
        &self,
        request: Request<MoveNodeRequest>,
    ) -> Result<Response<MoveNodeResponse>, Status> {
        let r = request.into_inner();
        let moved = self.0.move_node(&r.node, &r.worker).await?;
        Ok(Response::new(MoveNodeResponse { moved }))
    }
}
