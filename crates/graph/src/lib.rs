//! The blkmesh schema: what a node, an export and a configuration file
//! are, shared by the manager, the workers and the tools.
//!
//! Pure logic, no I/O but reading a configuration file:
//!
//! - the node kinds ([`kinds`]): one room per kind with its driver key,
//!   children, own checks and size, and the one table mapping a
//!   `NodeSpec.driver` to its kind;
//! - field validation of nodes ([`validate_node`]) and exports
//!   ([`validate_export`], which also applies defaults), and the checks of
//!   a new export against the others ([`check_new_export`]);
//! - the [`Graph`] of named nodes with its invariants (children exist, at
//!   most one parent per node, no cycles);
//! - the text forms the tools and the configuration file share: sizes
//!   ([`size`]) and fault rules ([`rule`]);
//! - the configuration file ([`config`]): parsing, with every error
//!   located by line, column and field, and the offline check
//!   (`blkmeshctl config check`).
//!
//! Every rejection is a [`GraphError`] naming the request field and the
//! problem; [`GraphError::class`] tells the API layer which status code to
//! answer with.

#![forbid(unsafe_code)]

pub mod config;
mod error;
mod export;
mod fields;
mod graph;
pub mod kinds;
pub mod rule;
pub mod size;
mod update;
mod validate;

pub use error::{ErrorClass, GraphError, ObjectKind};
pub use export::{
    check_new_export, validate_export, DEFAULT_LOGICAL_BLOCK_SIZE, DEFAULT_NUM_QUEUES,
    DEFAULT_QUEUE_SIZE, MAX_NUM_QUEUES, MAX_QUEUE_SIZE, MAX_SERIAL_LEN, MIN_QUEUE_SIZE,
};
pub use fields::{
    validate_name, validate_socket_path, MAX_NAME_LEN, MAX_PATH_LEN, MAX_SOCKET_PATH_LEN,
    SECTOR_SIZE,
};
pub use graph::Graph;
pub use kinds::fault::{
    validate_node_limits, MAX_BUF_ALIGNMENT, MAX_FAULT_DELAY_NS, MAX_FAULT_ERRNO, MAX_FAULT_RULES,
};
pub use kinds::null::MAX_NULL_LATENCY_NS;
pub use kinds::raw::raw_window_size;
pub use kinds::throttle::{
    normalize_throttle_limits, throttle_limits_set, MAX_THROTTLE_VALUE, MIN_BPS_BURST,
};
pub use kinds::{children, driver_name, node_size, update_changes};
pub use validate::validate_node;
