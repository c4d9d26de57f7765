//! `blkmesh.agent.v1.AgentService` over [`Control`]: the sessions of the
//! workers and frontends (`crate::control::agents`) on tonic's streams.

use std::sync::Arc;

use blkmesh_proto::agent::v1::agent_service_server::AgentService;
use blkmesh_proto::agent::v1::{FrontendDown, FrontendUp, WorkerDown, WorkerUp};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::api::streams::{unbounded, EventStream};
use crate::control::hub::Control;

/// `blkmesh.agent.v1.AgentService`.
pub(crate) struct AgentApi(pub Arc<Control>);

#[tonic::async_trait]
impl AgentService for AgentApi {
    type WorkerSessionStream = EventStream<WorkerDown>;
    type FrontendSessionStream = EventStream<FrontendDown>;

    async fn worker_session(
        &self,
        request: Request<Streaming<WorkerUp>>,
    ) -> Result<Response<Self::WorkerSessionStream>, Status> {
        let up = request.into_inner().map(|m| m.map_err(|s| s.to_string()));
        Ok(Response::new(unbounded(self.0.worker_session(up))))
    }

    async fn frontend_session(
        &self,
        request: Request<Streaming<FrontendUp>>,
    ) -> Result<Response<Self::FrontendSessionStream>, Status> {
        let up = request.into_inner().map(|m| m.map_err(|s| s.to_string()));
        Ok(Response::new(unbounded(self.0.frontend_session(up))))
    }
}
