//! Field validation for nodes: the rules that hold regardless of what else
//! exists. The common part is here; each kind checks its own options in
//! its room (`kinds/*.rs`).

use blkmesh_proto::v1::NodeSpec;

use crate::error::GraphError;
use crate::fields::validate_name;
use crate::kinds::kind_of;

/// Checks a node's own fields (not its relation to other nodes).
pub fn validate_node(spec: &NodeSpec) -> Result<(), GraphError> {
    validate_name("node.name", &spec.name)?;
    match &spec.driver {
        None => Err(GraphError::invalid(
            "node.driver",
            "must be set (one of io_uring, null, nvme_io_uring, virtio_blk_vhost_user, \
             virtio_blk_vhost_vdpa, raw, throttle, fault_injection, zoned)",
        )),
        Some(driver) => kind_of(driver).validate(&spec.name),
    }
}

#[cfg(test)]
mod tests;
