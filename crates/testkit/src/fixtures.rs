//! Test data and node specs that tests share.

/// Test data that differs per 512-byte sector and per `seed`, so a write
/// that lands in the wrong place, or an old one over a new one, shows.
pub fn sector_pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

/// A fault-injection node `name` over `child` that holds every request of
/// `ops` for `delay` (none when `delay` is zero): requests in flight for a
/// test to act on.
pub fn delay_node(
    name: &str,
    child: &str,
    ops: &[blkmesh_proto::v1::IoOp],
    delay: std::time::Duration,
) -> blkmesh_proto::v1::NodeSpec {
    use blkmesh_proto::v1::{fault_rule, node_spec::Driver, FaultInjectionOptions, FaultRule};
    let rules = if delay.is_zero() {
        Vec::new()
    } else {
        vec![FaultRule {
            ops: ops.iter().map(|&o| o as i32).collect(),
            action: Some(fault_rule::Action::DelayNs(delay.as_nanos() as u64)),
            ..Default::default()
        }]
    };
    blkmesh_proto::v1::NodeSpec {
        name: name.into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            rules,
            ..Default::default()
        })),
    }
}
