//! The field checks every kind shares: names, paths, sector multiples,
//! child references.

use crate::error::GraphError;

/// Longest node name or export id.
pub const MAX_NAME_LEN: usize = 64;
/// Sector size every size and offset must be a multiple of.
pub const SECTOR_SIZE: u64 = 512;
/// Longest path accepted for a file (PATH_MAX minus the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Checks a node name or export id: 1-64 characters of `[A-Za-z0-9_.-]`,
/// starting with a letter or digit. `field` names the field in errors.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), GraphError> {
    if name.is_empty() {
        return Err(GraphError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(GraphError::invalid(
            field,
            format!(
                "must be at most {MAX_NAME_LEN} characters (got {})",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(GraphError::invalid(
            field,
            format!("must contain only A-Z a-z 0-9 _ . - (got {bad:?} in {name:?})"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(GraphError::invalid(
            field,
            format!("must start with a letter or digit (got {name:?})"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_abs_path(
    field: &'static str,
    path: &str,
    max_len: usize,
) -> Result<(), GraphError> {
    if path.is_empty() {
        return Err(GraphError::invalid(field, "must not be empty"));
    }
    if path.contains('\0') {
        return Err(GraphError::invalid(field, "must not contain NUL bytes"));
    }
    if !path.starts_with('/') {
        return Err(GraphError::invalid(
            field,
            format!("must be an absolute path (got {path:?})"),
        ));
    }
    if path.len() > max_len {
        return Err(GraphError::invalid(
            field,
            format!("must be at most {max_len} bytes (got {})", path.len()),
        ));
    }
    Ok(())
}

/// Checks a unix socket path: absolute, no NUL, at most 107 bytes.
pub fn validate_socket_path(field: &'static str, path: &str) -> Result<(), GraphError> {
    validate_abs_path(field, path, MAX_SOCKET_PATH_LEN)
}

pub(crate) fn validate_sector_multiple(field: &'static str, value: u64) -> Result<(), GraphError> {
    if value % SECTOR_SIZE != 0 {
        return Err(GraphError::invalid(
            field,
            format!("must be a multiple of {SECTOR_SIZE} (got {value})"),
        ));
    }
    Ok(())
}

/// Checks the child reference of a filter or format node.
pub(crate) fn validate_child(
    field: &'static str,
    child: &str,
    node: &str,
) -> Result<(), GraphError> {
    validate_name(field, child)?;
    if child == node {
        return Err(GraphError::invalid(
            field,
            format!("must not be the node itself ({node:?})"),
        ));
    }
    Ok(())
}
