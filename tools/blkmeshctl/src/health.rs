//! `health`: the manager's gRPC health check.

use blkmesh_proto::client::ManagerChannel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::failure::Failure;
use crate::view::Output;

/// Checks `service` ("" = the whole server); an error unless it is SERVING.
pub(crate) async fn health(
    channel: ManagerChannel,
    out: Output,
    service: String,
) -> Result<(), Failure> {
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(resp.status).unwrap_or(ServingStatus::Unknown);
    out.health(&service, status.as_str_name());
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(Failure {
            code: "UNAVAILABLE",
            message: format!("service {service:?} is {}", status.as_str_name()),
        })
    }
}
