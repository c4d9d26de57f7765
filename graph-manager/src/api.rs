//! The gRPC services: thin adapters from `blkmesh.v1` requests (and the
//! `blkmesh.agent.v1` sessions) to
//! [`crate::control`] and back, with the status code of every error
//! ([`status`]).

pub(crate) mod agents;
pub(crate) mod exports;
pub(crate) mod frontends;
pub(crate) mod images;
pub(crate) mod jobs;
pub(crate) mod nodes;
pub(crate) mod stats;
pub(crate) mod status;
pub(crate) mod streams;
pub(crate) mod workers;
pub(crate) mod zones;
