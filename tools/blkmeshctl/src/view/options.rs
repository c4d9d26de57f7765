//! Views of a node's driver options: the options themselves, throttle
//! limits and fault rules, as a line for `node list` and rows for
//! `node info`.

use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{Bucket, FaultRule, NodeSpec, ThrottleLimits};
use serde::Serialize;

use blkmesh_graph::kinds::kind_of;
use blkmesh_graph::rule::{errno_name, format_rule, op_name};
use blkmesh_graph::size::format_size;

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum OptionsView {
    IoUring {
        path: String,
        direct: bool,
        read_only: bool,
    },
    Null {
        size: u64,
        latency_ns: u64,
    },
    /// nvme_io_uring, virtio_blk_vhost_user, virtio_blk_vhost_vdpa.
    Device {
        path: String,
        read_only: bool,
    },
    Raw {
        child: String,
        offset: u64,
        size: u64,
    },
    Throttle {
        child: String,
        group: String,
        limits: LimitsView,
    },
    FaultInjection {
        child: String,
        rules: Vec<RuleView>,
        /// Largest request in bytes (0 = the child's).
        max_transfer: u64,
        /// Most memory segments per request (0 = the child's).
        max_segments: u32,
        /// Buffer alignment in bytes (0 = the child's).
        buf_alignment: u32,
    },
    Zoned {
        child: String,
        zone_size: u64,
        /// 0 = the zone size.
        zone_capacity: u64,
        /// 0 = no limit.
        max_open_zones: u32,
        /// 0 = no limit.
        max_active_zones: u32,
        metadata_path: String,
    },
    None {},
    /// A kind without a view of its own: its options as the API's JSON
    /// (protobuf JSON mapping, .proto field names).
    Other(serde_json::Map<String, serde_json::Value>),
}

impl OptionsView {
    /// The view of `driver`'s options for a kind without a view of its own.
    pub(super) fn other(driver: Driver) -> (&'static str, OptionsView) {
        let name = kind_of(&driver).name();
        let spec = NodeSpec {
            name: String::new(),
            driver: Some(driver),
        };
        let options = match serde_json::to_value(&spec) {
            Ok(serde_json::Value::Object(mut m)) => match m.remove(name) {
                Some(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            },
            _ => serde_json::Map::new(),
        };
        (name, OptionsView::Other(options))
    }

    /// `key=value` per option of [`OptionsView::Other`], strings bare.
    pub(super) fn other_pairs(
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Vec<(String, String)> {
        options
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                (k.clone(), v)
            })
            .collect()
    }
}

/// All six buckets; rate 0 = unlimited, burst 0 = the rate.
#[derive(Debug, Serialize)]
pub(super) struct LimitsView {
    pub(super) iops_total: BucketView,
    pub(super) iops_read: BucketView,
    pub(super) iops_write: BucketView,
    pub(super) bps_total: BucketView,
    pub(super) bps_read: BucketView,
    pub(super) bps_write: BucketView,
}

#[derive(Debug, Serialize)]
pub(super) struct BucketView {
    rate: u64,
    burst: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct RuleView {
    /// Op names (empty = all ops).
    pub(super) ops: Vec<String>,
    pub(super) offset_start: u64,
    pub(super) offset_end: u64,
    pub(super) skip: u64,
    pub(super) count: u64,
    pub(super) probability: f64,
    /// Set for an error rule.
    pub(super) errno: Option<i32>,
    /// Name of `errno`, e.g. EIO.
    pub(super) errno_name: Option<String>,
    /// Set for a delay rule.
    pub(super) delay_ns: Option<u64>,
    /// The rule as `--rule` text.
    pub(super) text: String,
}

fn bucket_view(b: &Option<Bucket>) -> BucketView {
    let b = b.unwrap_or_default();
    BucketView {
        rate: b.rate,
        burst: b.burst,
    }
}

pub(super) fn limits_view(l: &ThrottleLimits) -> LimitsView {
    LimitsView {
        iops_total: bucket_view(&l.iops_total),
        iops_read: bucket_view(&l.iops_read),
        iops_write: bucket_view(&l.iops_write),
        bps_total: bucket_view(&l.bps_total),
        bps_read: bucket_view(&l.bps_read),
        bps_write: bucket_view(&l.bps_write),
    }
}

pub(super) fn rule_view(r: &FaultRule) -> RuleView {
    let (errno, delay_ns) = match r.action {
        Some(Action::Errno(e)) => (Some(e), None),
        Some(Action::DelayNs(d)) => (None, Some(d)),
        None => (None, None),
    };
    RuleView {
        ops: r.ops.iter().map(|&op| op_name(op)).collect(),
        offset_start: r.offset_start,
        offset_end: r.offset_end,
        skip: r.skip,
        count: r.count,
        probability: r.probability,
        errno,
        errno_name: errno.map(errno_name),
        delay_ns,
        text: format_rule(r),
    }
}

/// The limits as `add-throttle` flags without dashes, e.g.
/// `iops=100 iops-burst=200 bps-read=1M`; unlimited buckets left out.
fn limits_text(l: &LimitsView) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |name: &str, b: &BucketView, bytes: bool| {
        let fmt = |n: u64| if bytes { format_size(n) } else { n.to_string() };
        if b.rate != 0 {
            out.push(format!("{name}={}", fmt(b.rate)));
        }
        if b.burst != 0 {
            out.push(format!("{name}-burst={}", fmt(b.burst)));
        }
    };
    push("iops", &l.iops_total, false);
    push("iops-read", &l.iops_read, false);
    push("iops-write", &l.iops_write, false);
    push("bps", &l.bps_total, true);
    push("bps-read", &l.bps_read, true);
    push("bps-write", &l.bps_write, true);
    out
}

pub(super) fn options_text(o: &OptionsView) -> String {
    match o {
        OptionsView::IoUring {
            path,
            direct,
            read_only,
        } => {
            let mut s = format!("path={path}");
            if *direct {
                s.push_str(" direct");
            }
            if *read_only {
                s.push_str(" read-only");
            }
            s
        }
        OptionsView::Null { latency_ns, .. } => {
            if *latency_ns == 0 {
                String::new()
            } else {
                format!("latency={}us", latency_ns / 1000)
            }
        }
        OptionsView::Raw {
            child,
            offset,
            size,
        } => {
            let size = if *size == 0 {
                "end".to_string()
            } else {
                format_size(*size)
            };
            format!("child={child} offset={} size={size}", format_size(*offset))
        }
        OptionsView::Device { path, read_only } => {
            let mut s = format!("path={path}");
            if *read_only {
                s.push_str(" read-only");
            }
            s
        }
        OptionsView::Throttle {
            child,
            group,
            limits,
        } => {
            let mut parts = vec![format!("child={child}")];
            if !group.is_empty() {
                parts.push(format!("group={group}"));
            }
            parts.extend(limits_text(limits));
            parts.join(" ")
        }
        OptionsView::FaultInjection {
            child,
            rules,
            max_transfer,
            max_segments,
            buf_alignment,
        } => {
            let mut s = format!("child={child} rules={}", rules.len());
            if *max_transfer != 0 {
                s.push_str(&format!(" max-transfer={}", format_size(*max_transfer)));
            }
            if *max_segments != 0 {
                s.push_str(&format!(" max-segments={max_segments}"));
            }
            if *buf_alignment != 0 {
                s.push_str(&format!(" buf-alignment={buf_alignment}"));
            }
            s
        }
        // The geometry is in the ZONES column.
        OptionsView::Zoned {
            child,
            metadata_path,
            ..
        } => format!("child={child} metadata={metadata_path}"),
        OptionsView::Other(options) => OptionsView::other_pairs(options)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        OptionsView::None {} => String::new(),
    }
}

/// One bucket for `node info`: `100/s, burst 200`, or `unlimited`.
pub(super) fn bucket_text(b: &BucketView, bytes: bool) -> String {
    let fmt = |n: u64| if bytes { format_size(n) } else { n.to_string() };
    match (b.rate, b.burst) {
        (0, _) => "unlimited".into(),
        (rate, 0) => format!("{}/s", fmt(rate)),
        (rate, burst) => format!("{}/s, burst {}", fmt(rate), fmt(burst)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::RawOptions;

    /// The generic view a kind without a view of its own gets (shown here
    /// with a kind that has one).
    #[test]
    fn other_kinds_show_their_api_options() {
        let (name, view) = OptionsView::other(Driver::Raw(RawOptions {
            child: "c".into(),
            offset: 512,
            size: 0,
        }));
        assert_eq!(name, "raw");
        let OptionsView::Other(options) = &view else {
            panic!("{view:?}");
        };
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            serde_json::json!({"child": "c", "offset": "512"})
        );
        assert_eq!(
            OptionsView::other_pairs(options),
            [
                ("child".to_string(), "c".to_string()),
                ("offset".to_string(), "512".to_string())
            ]
        );
        assert_eq!(options_text(&view), "child=c offset=512");
    }
}
