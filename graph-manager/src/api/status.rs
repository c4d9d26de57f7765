//! The status code of every [`ApiError`], at the edge of the gRPC services.

use blkmesh_graph::ErrorClass;

use crate::api::zones::errno_code;
use crate::core::error::ApiError;

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Graph(g) => match g.class() {
                ErrorClass::InvalidArgument => tonic::Status::invalid_argument(msg),
                ErrorClass::NotFound => tonic::Status::not_found(msg),
                ErrorClass::AlreadyExists => tonic::Status::already_exists(msg),
                ErrorClass::FailedPrecondition => tonic::Status::failed_precondition(msg),
            },
            ApiError::Missing(_) => tonic::Status::invalid_argument(msg),
            ApiError::Invalid { .. } => tonic::Status::invalid_argument(msg),
            ApiError::UnknownWorker { .. } => tonic::Status::not_found(msg),
            ApiError::NoLiveWorker => tonic::Status::failed_precondition(msg),
            ApiError::AlreadyRegistered { .. } => tonic::Status::already_exists(msg),
            ApiError::Persist { .. } => tonic::Status::internal(msg),
            ApiError::ShuttingDown => tonic::Status::unavailable(msg),
            ApiError::Internal(_) => tonic::Status::internal(msg),
            ApiError::NotApplied { .. } => tonic::Status::failed_precondition(msg),
            ApiError::Conflict(_) => tonic::Status::aborted(msg),
            ApiError::Unavailable(_) => tonic::Status::unavailable(msg),
            ApiError::ZoneRefused { errno, .. } => tonic::Status::new(errno_code(errno), msg),
            ApiError::Protocol(_) => tonic::Status::invalid_argument(msg),
        }
    }
}
