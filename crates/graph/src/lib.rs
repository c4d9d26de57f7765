//! The blkmesh node-graph model, shared by the manager and the workers.
//!
//! Pure logic, no I/O: field validation of nodes ([`validate_node`]) and
//! exports ([`validate_export`], which also applies defaults), and the
//! [`Graph`] of named nodes with its invariants (children exist, at most one
//! parent per node, no cycles). Every rejection is a [`GraphError`] naming
//! the request field and the problem; [`GraphError::class`] tells the API
//! layer which status code to answer with.

#![forbid(unsafe_code)]

mod error;
mod graph;
mod validate;

pub use error::{ErrorClass, GraphError, ObjectKind};
pub use graph::{children, driver_name, Graph};
pub use validate::{
    normalize_throttle_limits, raw_window_size, throttle_limits_set, validate_export,
    validate_name, validate_node, validate_socket_path, DEFAULT_LOGICAL_BLOCK_SIZE,
    DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE, MAX_FAULT_DELAY_NS, MAX_FAULT_ERRNO, MAX_FAULT_RULES,
    MAX_NAME_LEN, MAX_NULL_LATENCY_NS, MAX_NUM_QUEUES, MAX_PATH_LEN, MAX_QUEUE_SIZE,
    MAX_SERIAL_LEN, MAX_SOCKET_PATH_LEN, MAX_THROTTLE_VALUE, MIN_BPS_BURST, MIN_QUEUE_SIZE,
    SECTOR_SIZE,
};
