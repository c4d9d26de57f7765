//! What UpdateNode may change of a node: the helpers each kind's
//! [`NodeKind::update`](crate::kinds::NodeKind::update) is written with.

use crate::error::GraphError;

/// The refusal of a change to a field UpdateNode does not change.
pub(crate) fn cannot_change(field: &'static str, what: &str) -> GraphError {
    GraphError::invalid(
        field,
        format!("cannot be changed by UpdateNode ({what}); only options can"),
    )
}

/// Refuses another path.
pub(crate) fn same_path(field: &'static str, a: &str, b: &str) -> Result<(), GraphError> {
    if a == b {
        Ok(())
    } else {
        Err(cannot_change(field, &format!("is {a:?}, got {b:?}")))
    }
}

/// Refuses another child.
pub(crate) fn same_child(field: &'static str, a: &str, b: &str) -> Result<(), GraphError> {
    if a == b {
        Ok(())
    } else {
        Err(cannot_change(
            field,
            &format!("child is {a:?}, got {b:?}; add a new node instead"),
        ))
    }
}

/// Refuses a size change, which is ResizeNode's.
pub(crate) fn same_size(field: &'static str, a: u64, b: u64) -> Result<(), GraphError> {
    if a == b {
        Ok(())
    } else {
        Err(GraphError::invalid(
            field,
            format!("is changed with ResizeNode, not UpdateNode (is {a}, got {b})"),
        ))
    }
}

/// The changes an update makes, as human-readable items ("read-only on",
/// "throttle limits", ...).
#[derive(Debug, Default)]
pub(crate) struct Changes(pub Vec<String>);

impl Changes {
    /// `what on` or `what off` when the flag changes.
    pub(crate) fn flag(&mut self, what: &str, a: bool, b: bool) {
        if a != b {
            self.0
                .push(format!("{what} {}", if b { "on" } else { "off" }));
        }
    }

    /// `what` when `changed`.
    pub(crate) fn item(&mut self, what: &str, changed: bool) {
        if changed {
            self.0.push(what.to_string());
        }
    }
}
