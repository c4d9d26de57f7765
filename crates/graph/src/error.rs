//! Errors of the node-graph model and their classification.

use std::fmt;

/// What kind of object an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A block node.
    Node,
    /// A vhost-user-blk export.
    Export,
    /// A block job (stream, commit).
    Job,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Node => "node",
            ObjectKind::Export => "export",
            ObjectKind::Job => "job",
        })
    }
}

/// How an error should be reported to an API client.
///
/// The manager maps each class to one gRPC status code; keep the mapping
/// exhaustive (no wildcard) so a new class forces a decision there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is malformed (`INVALID_ARGUMENT`).
    InvalidArgument,
    /// The request names something that does not exist (`NOT_FOUND`).
    NotFound,
    /// The request would create something that already exists (`ALREADY_EXISTS`).
    AlreadyExists,
    /// The request is well-formed but the current state forbids it (`FAILED_PRECONDITION`).
    FailedPrecondition,
}

/// A rejected node, export or graph change.
///
/// Every variant names the request field it is about (`node.raw.child`,
/// `export.num_queues`, ...) so a person can act on the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// A field has a value that is never acceptable.
    #[error("{field}: {problem}")]
    InvalidField {
        /// The field, e.g. `node.io_uring.path`.
        field: &'static str,
        /// What is wrong with it, e.g. `must be an absolute path (got "disk.img")`.
        problem: String,
    },
    /// A field of one element of a repeated field has a value that is never
    /// acceptable, e.g. `node.fault_injection.rules[2].errno`.
    #[error("{list}[{index}].{field}: {problem}")]
    InvalidItem {
        /// The repeated field, e.g. `node.fault_injection.rules`.
        list: &'static str,
        /// Index of the element in the list.
        index: usize,
        /// The field inside the element, e.g. `errno`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A referenced object does not exist.
    #[error("{field}: {kind} {name:?} not found")]
    NotFound {
        /// The field holding the reference, e.g. `node.raw.child`.
        field: &'static str,
        /// What was looked up.
        kind: ObjectKind,
        /// The name that was looked up.
        name: String,
    },
    /// An object with this name (or another unique key) already exists.
    #[error("{field}: {kind} {name:?} already exists")]
    AlreadyExists {
        /// The field holding the duplicate key, e.g. `node.name`.
        field: &'static str,
        /// The kind of the existing object.
        kind: ObjectKind,
        /// The duplicate key.
        name: String,
    },
    /// A value that must be unique is already taken (e.g. an export socket path).
    #[error("{field}: {problem}")]
    Duplicate {
        /// The field holding the duplicate value, e.g. `export.socket`.
        field: &'static str,
        /// What it collides with.
        problem: String,
    },
    /// The object cannot be removed because others use it.
    #[error("{kind} {name:?} is in use by {}", users.join(", "))]
    InUse {
        /// The kind of the object.
        kind: ObjectKind,
        /// Its name.
        name: String,
        /// Its users, each as `node NAME` or `export ID`.
        users: Vec<String>,
    },
    /// A node can be the child of at most one other node.
    #[error("{field}: node {child:?} is already the child of node {parent:?}")]
    ChildTaken {
        /// The field naming the child, e.g. `node.raw.child`.
        field: &'static str,
        /// The requested child.
        child: String,
        /// The node already using it.
        parent: String,
    },
    /// The nodes' child references form a cycle.
    #[error("{field}: nodes form a cycle: {}", path.join(" -> "))]
    Cycle {
        /// The field of the reference closing the cycle.
        field: &'static str,
        /// The node names along the cycle, first repeated at the end.
        path: Vec<String>,
    },
    /// The request is valid but conflicts with the current state.
    #[error("{field}: {problem}")]
    Precondition {
        /// The field the conflict is about, e.g. `export.writable`.
        field: &'static str,
        /// What conflicts, e.g. `node "disk0" is read-only`.
        problem: String,
    },
}

impl GraphError {
    /// Shorthand for [`GraphError::InvalidField`].
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        GraphError::InvalidField {
            field,
            problem: problem.into(),
        }
    }

    /// Shorthand for [`GraphError::Precondition`].
    pub fn precondition(field: &'static str, problem: impl Into<String>) -> Self {
        GraphError::Precondition {
            field,
            problem: problem.into(),
        }
    }

    /// How this error should be reported to an API client.
    pub fn class(&self) -> ErrorClass {
        match self {
            GraphError::InvalidField { .. } => ErrorClass::InvalidArgument,
            GraphError::InvalidItem { .. } => ErrorClass::InvalidArgument,
            GraphError::Cycle { .. } => ErrorClass::InvalidArgument,
            GraphError::NotFound { .. } => ErrorClass::NotFound,
            GraphError::AlreadyExists { .. } => ErrorClass::AlreadyExists,
            GraphError::Duplicate { .. } => ErrorClass::AlreadyExists,
            GraphError::InUse { .. } => ErrorClass::FailedPrecondition,
            GraphError::ChildTaken { .. } => ErrorClass::FailedPrecondition,
            GraphError::Precondition { .. } => ErrorClass::FailedPrecondition,
        }
    }

    /// The request field this error is about, if any. For an element of a
    /// repeated field ([`GraphError::InvalidItem`]) this is the repeated
    /// field; the message names the element and its field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            GraphError::InvalidItem { list, .. } => Some(list),
            GraphError::InvalidField { field, .. }
            | GraphError::NotFound { field, .. }
            | GraphError::AlreadyExists { field, .. }
            | GraphError::Duplicate { field, .. }
            | GraphError::ChildTaken { field, .. }
            | GraphError::Cycle { field, .. }
            | GraphError::Precondition { field, .. } => Some(field),
            GraphError::InUse { .. } => None,
        }
    }
}
