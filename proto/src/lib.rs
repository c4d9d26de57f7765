//! The blkmesh protobuf API.
//!
//! - [`v1`]: the public, versioned gRPC management API (`blkmesh.v1`), served by
//!   `blkmesh-manager` and used by `blkmeshctl`, the frontend and the workers.
//! - [`ipc::v1`]: control messages between the frontend and the workers
//!   (`blkmesh.ipc.v1`); internal, carried over SOCK_SEQPACKET with SCM_RIGHTS.
//! - [`client`]: how every client connects to the manager (TLS, bearer
//!   token, unix sockets).

#![forbid(unsafe_code)]

pub mod client;

/// `blkmesh.v1`: the management API.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("blkmesh.v1");
    // serde in the protobuf JSON mapping (pbjson), for the state file.
    include!(concat!(env!("OUT_DIR"), "/blkmesh.v1.serde.rs"));
}

/// Internal frontend ↔ worker messages.
#[allow(clippy::all)]
pub mod ipc {
    /// `blkmesh.ipc.v1`.
    pub mod v1 {
        tonic::include_proto!("blkmesh.ipc.v1");
    }
}
