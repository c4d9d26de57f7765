//! [`Failure`]: a failed command, and the gRPC code name it is printed with.

use blkmesh_proto::client::ClientError;

/// A failed command, printed as `error: CODE: message`.
pub(crate) struct Failure {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        // A connection that failed at the first call (a refused client
        // certificate) says why.
        Failure {
            code: code_name(s.code()),
            message: blkmesh_proto::client::status_message(&s),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connect { .. } => "UNAVAILABLE",
            ClientError::Url { .. }
            | ClientError::ReadFile { .. }
            | ClientError::Token(_)
            | ClientError::TlsOptions { .. }
            | ClientError::Tls { .. } => "INVALID_ARGUMENT",
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
