//! `fault_injection`: rules that fail or delay matching requests to its
//! child, and limits (transfer size, segments, alignment) it imposes on
//! the graph above.

use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{FaultInjectionOptions, FaultRule, IoOp, NodeSpec};

use crate::error::GraphError;
use crate::fields::{validate_child, SECTOR_SIZE};
use crate::kinds::{other_kind, NodeKind};
use crate::update::{same_child, Changes};

/// Most rules of a fault-injection node.
pub const MAX_FAULT_RULES: usize = 64;
/// Largest errno a fault rule may inject (Linux's `MAX_ERRNO`).
pub const MAX_FAULT_ERRNO: i32 = 4095;
/// Largest delay a fault rule may add to a request (10 s).
pub const MAX_FAULT_DELAY_NS: u64 = 10_000_000_000;
/// Largest `buf_alignment` of a fault-injection node.
pub const MAX_BUF_ALIGNMENT: u32 = 4096;

impl NodeKind for FaultInjectionOptions {
    fn name(&self) -> &'static str {
        "fault_injection"
    }

    fn filter_child(&self) -> Option<&str> {
        Some(&self.child)
    }

    fn child_field(&self) -> &'static str {
        "node.fault_injection.child"
    }

    fn summary(&self) -> String {
        format!("fault-injection over {}", self.child)
    }

    fn validate(&self, node: &str) -> Result<(), GraphError> {
        validate_fault_injection(node, self)
    }

    /// Its child's.
    fn size(&self, child_size: u64, _probed: Option<u64>) -> Result<u64, GraphError> {
        Ok(child_size)
    }

    /// The rules and the limits change; the child is fixed.
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
        let Driver::FaultInjection(b) = new else {
            return Err(other_kind(self, new));
        };
        same_child("node.fault_injection.child", &self.child, &b.child)?;
        let mut changes = Changes::default();
        changes.item("fault rules", self.rules != b.rules);
        changes.item("max transfer", self.max_transfer != b.max_transfer);
        changes.item("max segments", self.max_segments != b.max_segments);
        changes.item("buf alignment", self.buf_alignment != b.buf_alignment);
        Ok(changes.0)
    }
}

fn validate_fault_rule(index: usize, r: &FaultRule) -> Result<(), GraphError> {
    let bad = |field: &'static str, problem: String| GraphError::InvalidItem {
        list: "node.fault_injection.rules",
        index,
        field,
        problem,
    };
    for &op in &r.ops {
        match IoOp::try_from(op) {
            Ok(IoOp::Unspecified) => {
                return Err(bad("ops", "must not contain IO_OP_UNSPECIFIED".into()))
            }
            Ok(_) => {}
            Err(_) => return Err(bad("ops", format!("unknown op {op}"))),
        }
    }
    if r.offset_end != 0 && r.offset_end <= r.offset_start {
        return Err(bad(
            "offset_end",
            format!(
                "must be 0 (to the end) or > offset_start (got {} <= {})",
                r.offset_end, r.offset_start
            ),
        ));
    }
    if !(r.probability.is_finite() && (0.0..=1.0).contains(&r.probability)) {
        return Err(bad(
            "probability",
            format!("must be in [0, 1] (got {})", r.probability),
        ));
    }
    match r.action {
        None => Err(bad("action", "must be set (errno or delay_ns)".into())),
        Some(Action::Errno(e)) if !(1..=MAX_FAULT_ERRNO).contains(&e) => Err(bad(
            "errno",
            format!("must be in 1..={MAX_FAULT_ERRNO} (got {e})"),
        )),
        Some(Action::Errno(_)) => Ok(()),
        Some(Action::DelayNs(d)) if d > MAX_FAULT_DELAY_NS => Err(bad(
            "delay_ns",
            format!("must be at most {MAX_FAULT_DELAY_NS} (10 s) (got {d})"),
        )),
        Some(Action::DelayNs(_)) => Ok(()),
    }
}

fn validate_fault_injection(node: &str, o: &FaultInjectionOptions) -> Result<(), GraphError> {
    validate_child("node.fault_injection.child", &o.child, node)?;
    if o.rules.len() > MAX_FAULT_RULES {
        return Err(GraphError::invalid(
            "node.fault_injection.rules",
            format!(
                "must have at most {MAX_FAULT_RULES} rules (got {})",
                o.rules.len()
            ),
        ));
    }
    for (i, r) in o.rules.iter().enumerate() {
        validate_fault_rule(i, r)?;
    }
    Ok(())
}

/// Checks the limit knobs of a fault-injection node (other nodes pass):
/// `max_transfer` a multiple of 512, `buf_alignment` 0 or a power of two of
/// at most 4096. 0 always means "the child's own limit". Run wherever a
/// node spec is accepted (AddNode, UpdateNode, state file load) next to
/// [`validate_node`](crate::validate_node).
pub fn validate_node_limits(spec: &NodeSpec) -> Result<(), GraphError> {
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
