//! `raw`: a window (offset, size) over its child.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::RawOptions;

use crate::error::GraphError;
use crate::fields::{validate_child, validate_sector_multiple};
use crate::kinds::{other_kind, Grow, NodeKind};
use crate::update::{cannot_change, same_child, same_size};

impl NodeKind for RawOptions {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn children(&self) -> Vec<&str> {
        vec![self.child.as_str()]
    }

    fn child_field(&self) -> &'static str {
        "node.raw.child"
    }

    fn summary(&self) -> String {
        format!("raw over {}", self.child)
    }

    fn validate(&self, node: &str) -> Result<(), GraphError> {
        validate_child("node.raw.child", &self.child, node)?;
        validate_sector_multiple("node.raw.offset", self.offset)?;
        validate_sector_multiple("node.raw.size", self.size)?;
        if self.offset.checked_add(self.size).is_none() {
            return Err(GraphError::invalid(
                "node.raw.size",
                format!("offset {} + size {} overflows", self.offset, self.size),
            ));
        }
        Ok(())
    }

    /// The window over a child of known size; with the child's size not
    /// known yet, the window's own size (the worker checks that the window
    /// fits when it opens the child).
    fn size(&self, child_size: u64, _probed: Option<u64>) -> Result<u64, GraphError> {
        match child_size {
            0 => Ok(self.size),
            n => raw_window_size(self, n),
        }
    }

    /// An explicit window grows (within its child); a window to the end of
    /// its child grows with the child.
    fn grow(&self, size: u64, child_size: u64, at: &str) -> Result<Grow, GraphError> {
        let end = self.offset.checked_add(size).ok_or_else(|| {
            GraphError::invalid(
                "size",
                format!("offset {} + size {size} overflows", self.offset),
            )
        })?;
        if self.size == 0 {
            return Ok(Grow::Child {
                child: self.child.clone(),
                size: end,
            });
        }
        // A child of unknown size (0) is checked by the worker when it opens it.
        if child_size != 0 && end > child_size {
            return Err(GraphError::precondition(
                "size",
                format!(
                    "raw node {at}: window {}+{size} does not fit in child {:?} of \
                     {child_size} bytes; resize the child first",
                    self.offset, self.child
                ),
            ));
        }
        Ok(Grow::Options(Driver::Raw(RawOptions {
            size,
            ..self.clone()
        })))
    }

    /// Nothing changes: the child and offset are fixed, the size is
    /// ResizeNode's.
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
        let Driver::Raw(b) = new else {
            return Err(other_kind(self, new));
        };
        same_child("node.raw.child", &self.child, &b.child)?;
        if self.offset != b.offset {
            return Err(cannot_change(
                "node.raw.offset",
                &format!("is {}, got {}", self.offset, b.offset),
            ));
        }
        same_size("node.raw.size", self.size, b.size)?;
        Ok(Vec::new())
    }
}

/// Size of a raw node's window over a child of `child_size` bytes.
///
/// A window size of 0 means "up to the end of the child". Errors when the
/// window does not fit in the child or would be empty.
pub fn raw_window_size(opts: &RawOptions, child_size: u64) -> Result<u64, GraphError> {
    if opts.offset > child_size {
        return Err(GraphError::invalid(
            "node.raw.offset",
            format!(
                "must not be past the end of child {:?} (got {}, child size {child_size})",
                opts.child, opts.offset
            ),
        ));
    }
    let room = child_size - opts.offset;
    let size = if opts.size == 0 { room } else { opts.size };
    if size > room {
        return Err(GraphError::invalid(
            "node.raw.size",
            format!(
                "window {}+{} does not fit in child {:?} of {child_size} bytes",
                opts.offset, opts.size, opts.child
            ),
        ));
    }
    if size == 0 {
        return Err(GraphError::invalid(
            "node.raw.size",
            format!(
                "window at offset {} over child {:?} of {child_size} bytes is empty",
                opts.offset, opts.child
            ),
        ));
    }
    Ok(size)
}
