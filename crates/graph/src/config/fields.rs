//! The API's field names (`node.throttle.limits.iops_total.rate`) as
//! paths in the configuration file (`throttle.iops`).

use blkmesh_proto::v1::NodeSpec;

use crate::error::GraphError;
use crate::kinds::driver_name;

/// Throttle keys: (key, bucket in `ThrottleLimits`, is a burst, counts bytes).
pub(crate) const THROTTLE_KEYS: [(&str, &str, bool, bool); 12] = [
    ("iops", "iops_total", false, false),
    ("iops_burst", "iops_total", true, false),
    ("iops_read", "iops_read", false, false),
    ("iops_read_burst", "iops_read", true, false),
    ("iops_write", "iops_write", false, false),
    ("iops_write_burst", "iops_write", true, false),
    ("bps", "bps_total", false, true),
    ("bps_burst", "bps_total", true, true),
    ("bps_read", "bps_read", false, true),
    ("bps_read_burst", "bps_read", true, true),
    ("bps_write", "bps_write", false, true),
    ("bps_write_burst", "bps_write", true, true),
];

/// An error about a request field, placed in a configuration file by
/// that field ([`Config::node_error`](crate::config::Config::node_error)).
pub trait FieldError {
    /// The API field the error is about (`""`: none) and the problem
    /// without it.
    fn field_and_problem(&self) -> (String, String);
}

impl FieldError for GraphError {
    fn field_and_problem(&self) -> (String, String) {
        graph_error_parts(self)
    }
}

fn graph_error_parts(g: &GraphError) -> (String, String) {
    match g {
        GraphError::InvalidField { field, problem }
        | GraphError::Duplicate { field, problem }
        | GraphError::Precondition { field, problem } => ((*field).to_string(), problem.clone()),
        GraphError::InvalidItem {
            list,
            index,
            field,
            problem,
        } => (format!("{list}[{index}].{field}"), problem.clone()),
        GraphError::NotFound { field, kind, name } => {
            ((*field).to_string(), format!("{kind} {name:?} not found"))
        }
        GraphError::AlreadyExists { field, kind, name } => (
            (*field).to_string(),
            format!("{kind} {name:?} already exists"),
        ),
        GraphError::ChildTaken {
            field,
            child,
            parent,
        } => (
            (*field).to_string(),
            format!("node {child:?} is already the child of node {parent:?}"),
        ),
        GraphError::Cycle { field, path } => (
            (*field).to_string(),
            format!("nodes form a cycle: {}", path.join(" -> ")),
        ),
        GraphError::InUse { .. } => (String::new(), g.to_string()),
    }
}

/// The path in a node's table of an API field (`node.throttle.limits.iops_total.burst`
/// → `throttle.iops_burst`); `""` is the node's table.
pub(crate) fn node_field(spec: &NodeSpec, api: &str) -> String {
    let driver = driver_name(spec);
    match api {
        "node.name" | "name" => return "name".into(),
        "" | "node" | "node.driver" => return String::new(),
        "size" => {
            return match driver {
                "null" | "raw" => format!("{driver}.size"),
                _ => String::new(),
            }
        }
        _ => {}
    }
    let Some(rest) = api.strip_prefix("node.") else {
        return String::new();
    };
    if rest == "null.latency_ns" {
        return "null.latency".into();
    }
    if rest == "throttle.limits" {
        return "throttle".into();
    }
    if let Some(bucket) = rest.strip_prefix("throttle.limits.") {
        let (bucket, part) = bucket.split_once('.').unwrap_or((bucket, "rate"));
        let burst = part == "burst";
        if let Some((key, ..)) = THROTTLE_KEYS
            .iter()
            .find(|(_, b, is_burst, _)| *b == bucket && *is_burst == burst)
        {
            return format!("throttle.{key}");
        }
        return "throttle".into();
    }
    if let Some(item) = rest.strip_prefix("fault_injection.rules[") {
        // `fault_injection.rules[I].FIELD`
        if let Some((index, field)) = item.split_once("].") {
            let key = match field {
                "offset_start" => "start",
                "offset_end" => "end",
                "probability" => "prob",
                "delay_ns" => "delay",
                "action" => "",
                other => other,
            };
            return if key.is_empty() {
                format!("fault_injection.rules[{index}]")
            } else {
                format!("fault_injection.rules[{index}].{key}")
            };
        }
    }
    rest.to_string()
}

/// The path in an export's table of an API field (`export.num_queues` →
/// `num_queues`); `""` is the export's table.
pub(crate) fn export_field(api: &str) -> String {
    match api.strip_prefix("export.") {
        Some(rest) => rest.to_string(),
        None if api == "id" => "id".into(),
        None => String::new(),
    }
}
