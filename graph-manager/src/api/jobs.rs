//! `blkmesh.v1.JobService`: block jobs on an export's qcow2 chain
//! (see [`crate::control::jobs`]).

use std::sync::Arc;

use blkmesh_proto::v1::job_service_server::JobService;
use blkmesh_proto::v1::{
    CancelJobRequest, CancelJobResponse, CompleteJobRequest, CompleteJobResponse, GetJobRequest,
    GetJobResponse, JobKind, ListJobsRequest, ListJobsResponse, StartJobRequest, StartJobResponse,
};
use tonic::{Request, Response, Status};

use crate::control::hub::Control;
use crate::core::error::ApiError;

/// `blkmesh.v1.JobService`.
pub(crate) struct JobApi(pub Arc<Control>);

#[tonic::async_trait]
impl JobService for JobApi {
    async fn start_job(
        &self,
        request: Request<StartJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        let r = request.into_inner();
        let kind = JobKind::try_from(r.kind).map_err(|_| {
            Status::from(ApiError::from(blkmesh_graph::GraphError::invalid(
                "kind",
                format!("unknown job kind {}", r.kind),
            )))
        })?;
        let job = self.0.start_job(&r.id, kind, &r.export, r.speed).await?;
        Ok(Response::new(StartJobResponse { job: Some(job) }))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        let job = self.0.get_job(&request.into_inner().id)?;
        Ok(Response::new(GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse {
            jobs: self.0.list_jobs(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let job = self.0.cancel_job(&request.into_inner().id).await?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
    }

    async fn complete_job(
        &self,
        request: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let job = self.0.complete_job(&request.into_inner().id).await?;
        Ok(Response::new(CompleteJobResponse { job: Some(job) }))
    }
}
