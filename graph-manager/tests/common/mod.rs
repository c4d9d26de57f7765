//! Helpers shared by the integration tests. Each test binary uses a part of
//! them, hence the allowance for the rest.
#![allow(dead_code)]

pub mod agent;
pub mod client;
pub mod pki;
