//! The blkmesh protobuf API.
//!
//! - [`v1`]: the public, versioned gRPC management API (`blkmesh.v1`), served by
//!   `blkmesh-manager` and used by operators and `blkmeshctl`.
//! - [`agent::v1`]: the agent protocol (`blkmesh.agent.v1`): one two-way
//!   session stream per worker and frontend; internal.
//! - [`ipc::v1`]: control messages between the frontend and the workers
//!   (`blkmesh.ipc.v1`); internal, carried over SOCK_SEQPACKET with SCM_RIGHTS.
//! - [`client`]: how every client connects to the manager (TLS, bearer
//!   token, unix sockets); [`session`]: how the agents keep their session.

#![forbid(unsafe_code)]

pub mod client;
pub mod session;

/// `blkmesh.v1`: the management API.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("blkmesh.v1");
    // serde in the protobuf JSON mapping (pbjson), for the state file.
    include!(concat!(env!("OUT_DIR"), "/blkmesh.v1.serde.rs"));
}

/// The manager ↔ agent (worker, frontend) sessions.
#[allow(clippy::all)]
pub mod agent {
    /// `blkmesh.agent.v1`.
    pub mod v1 {
        tonic::include_proto!("blkmesh.agent.v1");
    }
}

/// Internal frontend ↔ worker messages.
#[allow(clippy::all)]
pub mod ipc {
    /// `blkmesh.ipc.v1`.
    pub mod v1 {
        tonic::include_proto!("blkmesh.ipc.v1");
    }
}
