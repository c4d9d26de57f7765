//! The manager's state and the rules over it, without a transport or a
//! runtime (no tonic, no tokio): the state in memory ([`state`]), the checks
//! a change must pass, the pure transitions that compute the next state,
//! and the views the services show. Everything here is plain data in,
//! plain data out, so it is unit-tested here.

pub(crate) mod backing;
pub(crate) mod error;
pub(crate) mod exports;
pub(crate) mod image;
pub(crate) mod jobs;
pub(crate) mod nodes;
pub(crate) mod probe;
pub(crate) mod queues;
pub(crate) mod reopen;
pub(crate) mod state;
pub(crate) mod views;
pub(crate) mod zoned;

#[cfg(test)]
pub(crate) mod fixtures;
