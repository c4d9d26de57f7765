//! `null`: a leaf of a given size that reads zeroes and drops writes,
//! optionally after a fixed latency.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NullOptions;

use crate::error::GraphError;
use crate::fields::SECTOR_SIZE;
use crate::kinds::{other_kind, Grow, NodeKind};
use crate::update::{same_size, Changes};

/// Largest latency a null node may add per request (10 s).
pub const MAX_NULL_LATENCY_NS: u64 = 10_000_000_000;

impl NodeKind for NullOptions {
    fn name(&self) -> &'static str {
        "null"
    }

    fn child_field(&self) -> &'static str {
        "node.null"
    }

    fn summary(&self) -> String {
        format!("null, {} bytes", self.size)
    }

    fn validate(&self, _node: &str) -> Result<(), GraphError> {
        if self.size == 0 || self.size % SECTOR_SIZE != 0 {
            return Err(GraphError::invalid(
                "node.null.size",
                format!(
                    "must be a non-zero multiple of {SECTOR_SIZE} (got {})",
                    self.size
                ),
            ));
        }
        if self.latency_ns > MAX_NULL_LATENCY_NS {
            return Err(GraphError::invalid(
                "node.null.latency_ns",
                format!(
                    "must be at most {MAX_NULL_LATENCY_NS} (10 s) (got {})",
                    self.latency_ns
                ),
            ));
        }
        Ok(())
    }

    fn size(&self, _child_size: u64, _probed: Option<u64>) -> Result<u64, GraphError> {
        Ok(self.size)
    }

    /// Its size option.
    fn grow(&self, size: u64, _child_size: u64, _at: &str) -> Result<Grow, GraphError> {
        Ok(Grow::Options(Driver::Null(NullOptions { size, ..*self })))
    }

    /// The latency changes; the size is ResizeNode's.
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
        let Driver::Null(b) = new else {
            return Err(other_kind(self, new));
        };
        same_size("node.null.size", self.size, b.size)?;
        let mut changes = Changes::default();
        changes.item("latency", self.latency_ns != b.latency_ns);
        Ok(changes.0)
    }
}
