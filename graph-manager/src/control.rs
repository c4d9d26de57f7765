//! The manager at run time: its state behind one lock ([`hub`]) and the
//! operations of the services on it, one module per kind of object. No
//! transport here: the gRPC adapters are in `crate::api`.

pub(crate) mod agents;
pub(crate) mod backing;
pub(crate) mod exports;
pub(crate) mod frontends;
pub(crate) mod hub;
pub(crate) mod jobs;
pub(crate) mod nodes;
pub(crate) mod snapshots;
pub(crate) mod workers;
pub(crate) mod zone_calls;
