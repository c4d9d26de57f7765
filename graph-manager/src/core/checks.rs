//! Manager-side field checks that `blkmesh_graph::validate_node` does not
//! (yet) make: the fault-injection limit knobs. Run wherever a node spec is
//! accepted (AddNode, UpdateNode, state file load) next to `validate_node`.

use blkmesh_graph::{GraphError, SECTOR_SIZE};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NodeSpec;

/// Largest `buf_alignment` of a fault-injection node.
pub(crate) const MAX_BUF_ALIGNMENT: u32 = 4096;

/// Checks the limit knobs of a fault-injection node (other nodes pass):
/// `max_transfer` a multiple of 512, `buf_alignment` 0 or a power of two of
/// at most 4096. 0 always means "the child's own limit".
pub(crate) fn validate_node_limits(spec: &NodeSpec) -> Result<(), GraphError> {
    let Some(Driver::FaultInjection(o)) = &spec.driver else {
        return Ok(());
    };
    if o.max_transfer % SECTOR_SIZE != 0 {
        return Err(GraphError::invalid(
            "node.fault_injection.max_transfer",
            format!(
                "must be 0 (the child's limit) or a multiple of {SECTOR_SIZE} (got {})",
                o.max_transfer
            ),
        ));
    }
    if o.buf_alignment != 0
        && !(o.buf_alignment.is_power_of_two() && o.buf_alignment <= MAX_BUF_ALIGNMENT)
    {
        return Err(GraphError::invalid(
            "node.fault_injection.buf_alignment",
            format!(
                "must be 0 (the child's alignment) or a power of two of at most \
                 {MAX_BUF_ALIGNMENT} (got {})",
                o.buf_alignment
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::FaultInjectionOptions;

    fn fi(max_transfer: u64, max_segments: u32, buf_alignment: u32) -> NodeSpec {
        NodeSpec {
            name: "f".into(),
            driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                child: "c".into(),
                rules: vec![],
                max_transfer,
                max_segments,
                buf_alignment,
            })),
        }
    }

    #[test]
    fn accepts_zero_and_good_limits() {
        validate_node_limits(&fi(0, 0, 0)).unwrap();
        validate_node_limits(&fi(4096, 3, 512)).unwrap();
        validate_node_limits(&fi(512, 1, 1)).unwrap();
        validate_node_limits(&fi(1 << 20, u32::MAX, 4096)).unwrap();
    }

    #[test]
    fn rejects_bad_max_transfer_and_alignment() {
        let e = validate_node_limits(&fi(1000, 0, 0)).unwrap_err();
        assert_eq!(e.field(), Some("node.fault_injection.max_transfer"));
        for a in [3, 8192, 100] {
            let e = validate_node_limits(&fi(0, 0, a)).unwrap_err();
            assert_eq!(e.field(), Some("node.fault_injection.buf_alignment"), "{a}");
        }
    }
}
