//! `throttle`: token buckets (IOPS and bytes per second, total, read and
//! write) over its child, optionally shared by a named group.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{Bucket, ThrottleLimits, ThrottleOptions};

use crate::error::GraphError;
use crate::fields::{validate_child, validate_name};
use crate::kinds::{other_kind, NodeKind};
use crate::update::{cannot_change, same_child, Changes};

/// Largest rate or burst of a throttle bucket (10^15, as QEMU's
/// `THROTTLE_VALUE_MAX`): keeps the workers' token arithmetic far from overflow.
pub const MAX_THROTTLE_VALUE: u64 = 1_000_000_000_000_000;
/// Smallest burst of a bytes-per-second bucket: one 4 KiB block must fit.
pub const MIN_BPS_BURST: u64 = 4096;

impl NodeKind for ThrottleOptions {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn filter_child(&self) -> Option<&str> {
        Some(&self.child)
    }

    fn child_field(&self) -> &'static str {
        "node.throttle.child"
    }

    fn summary(&self) -> String {
        format!("throttle over {}", self.child)
    }

    fn validate(&self, node: &str) -> Result<(), GraphError> {
        validate_throttle(node, self)
    }

    /// Its child's.
    fn size(&self, child_size: u64, _probed: Option<u64>) -> Result<u64, GraphError> {
        Ok(child_size)
    }

    /// The limits change (for the whole group: the manager updates every
    /// member); the child and the group are fixed.
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
        let Driver::Throttle(b) = new else {
            return Err(other_kind(self, new));
        };
        same_child("node.throttle.child", &self.child, &b.child)?;
        if self.group != b.group {
            return Err(cannot_change(
                "node.throttle.group",
                &format!("is {:?}, got {:?}", self.group, b.group),
            ));
        }
        let mut changes = Changes::default();
        changes.item("throttle limits", !same_limits(&self.limits, &b.limits));
        Ok(changes.0)
    }
}

/// What a throttle bucket counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BucketUnit {
    Iops,
    Bps,
}

/// One bucket of [`ThrottleLimits`] with the names of its fields.
struct BucketRef<'a> {
    bucket: Option<&'a Bucket>,
    unit: BucketUnit,
    rate_field: &'static str,
    burst_field: &'static str,
}

fn buckets(l: &ThrottleLimits) -> [BucketRef<'_>; 6] {
    macro_rules! b {
        ($f:ident, $unit:ident) => {
            BucketRef {
                bucket: l.$f.as_ref(),
                unit: BucketUnit::$unit,
                rate_field: concat!("node.throttle.limits.", stringify!($f), ".rate"),
                burst_field: concat!("node.throttle.limits.", stringify!($f), ".burst"),
            }
        };
    }
    [
        b!(iops_total, Iops),
        b!(iops_read, Iops),
        b!(iops_write, Iops),
        b!(bps_total, Bps),
        b!(bps_read, Bps),
        b!(bps_write, Bps),
    ]
}

fn validate_bucket(b: &BucketRef<'_>) -> Result<(), GraphError> {
    let Some(&Bucket { rate, burst }) = b.bucket else {
        return Ok(());
    };
    if rate > MAX_THROTTLE_VALUE {
        return Err(GraphError::invalid(
            b.rate_field,
            format!("must be at most {MAX_THROTTLE_VALUE} (got {rate})"),
        ));
    }
    if burst > MAX_THROTTLE_VALUE {
        return Err(GraphError::invalid(
            b.burst_field,
            format!("must be at most {MAX_THROTTLE_VALUE} (got {burst})"),
        ));
    }
    if rate == 0 {
        if burst != 0 {
            return Err(GraphError::invalid(
                b.burst_field,
                format!("must be 0 when rate is 0 (unlimited) (got {burst})"),
            ));
        }
        return Ok(());
    }
    if burst != 0 && burst < rate {
        return Err(GraphError::invalid(
            b.burst_field,
            format!("must be 0 or >= rate (got {burst} < {rate})"),
        ));
    }
    if b.unit == BucketUnit::Bps {
        if burst != 0 && burst < MIN_BPS_BURST {
            return Err(GraphError::invalid(
                b.burst_field,
                format!("must be 0 or >= {MIN_BPS_BURST} bytes (got {burst})"),
            ));
        }
        if burst == 0 && rate < MIN_BPS_BURST {
            return Err(GraphError::invalid(
                b.rate_field,
                format!(
                    "must be 0 or >= {MIN_BPS_BURST} bytes/s unless burst is set \
                     (one 4 KiB block must fit in the bucket) (got {rate})"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether some bucket of `limits` has a non-zero rate.
pub fn throttle_limits_set(limits: &ThrottleLimits) -> bool {
    buckets(limits)
        .iter()
        .any(|b| b.bucket.is_some_and(|b| b.rate != 0))
}

/// Whether two throttle limits are equivalent (absent buckets are unlimited).
pub fn same_limits(a: &Option<ThrottleLimits>, b: &Option<ThrottleLimits>) -> bool {
    normalize_throttle_limits(&a.unwrap_or_default())
        == normalize_throttle_limits(&b.unwrap_or_default())
}

/// `limits` with absent buckets filled in as unlimited (`rate` 0), so two
/// equivalent limits compare equal.
pub fn normalize_throttle_limits(limits: &ThrottleLimits) -> ThrottleLimits {
    let b = |b: &Option<Bucket>| Some(b.unwrap_or_default());
    ThrottleLimits {
        iops_total: b(&limits.iops_total),
        iops_read: b(&limits.iops_read),
        iops_write: b(&limits.iops_write),
        bps_total: b(&limits.bps_total),
        bps_read: b(&limits.bps_read),
        bps_write: b(&limits.bps_write),
    }
}

fn validate_throttle(node: &str, o: &ThrottleOptions) -> Result<(), GraphError> {
    validate_child("node.throttle.child", &o.child, node)?;
    let limits = o
        .limits
        .as_ref()
        .ok_or_else(|| GraphError::invalid("node.throttle.limits", "must be set"))?;
    for b in &buckets(limits) {
        validate_bucket(b)?;
    }
    if !throttle_limits_set(limits) {
        return Err(GraphError::invalid(
            "node.throttle.limits",
            "throttle with no limit (set a non-zero rate in at least one bucket)",
        ));
    }
    if !o.group.is_empty() {
        validate_name("node.throttle.group", &o.group)?;
    }
    Ok(())
}
