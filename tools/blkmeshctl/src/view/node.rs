//! Node views: `node list` and `node info` (and every command that prints
//! the node it changed).

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NodeInfo;
use serde::Serialize;

use super::options::{bucket_text, limits_view, options_text, rule_view, OptionsView};
use super::table::{list_or_dash, print_json, print_table, yes_no};
use super::zone::{bytes_text, limit_text, zones_text, zones_view, ZonesView};
use super::Output;
use blkmesh_graph::size::format_size;

#[derive(Debug, Serialize)]
struct NodeView {
    name: String,
    driver: &'static str,
    size: u64,
    read_only: bool,
    used_by: Vec<String>,
    options: OptionsView,
    /// Zone geometry (null when the node is not zoned).
    zones: Option<ZonesView>,
}

fn node_view(n: &NodeInfo) -> NodeView {
    let spec = n.spec.clone().unwrap_or_default();
    let (driver, options) = match spec.driver {
        None => ("none", OptionsView::None {}),
        Some(Driver::IoUring(o)) => (
            "io_uring",
            OptionsView::IoUring {
                path: o.path,
                direct: o.direct,
                read_only: o.read_only,
            },
        ),
        Some(Driver::Null(o)) => (
            "null",
            OptionsView::Null {
                size: o.size,
                latency_ns: o.latency_ns,
            },
        ),
        Some(Driver::NvmeIoUring(o)) => (
            "nvme_io_uring",
            OptionsView::Device {
                path: o.path,
                read_only: o.read_only,
            },
        ),
        Some(Driver::VirtioBlkVhostUser(o)) => (
            "virtio_blk_vhost_user",
            OptionsView::Device {
                path: o.path,
                read_only: o.read_only,
            },
        ),
        Some(Driver::VirtioBlkVhostVdpa(o)) => (
            "virtio_blk_vhost_vdpa",
            OptionsView::Device {
                path: o.path,
                read_only: o.read_only,
            },
        ),
        Some(Driver::Raw(o)) => (
            "raw",
            OptionsView::Raw {
                child: o.child,
                offset: o.offset,
                size: o.size,
            },
        ),
        Some(Driver::Throttle(o)) => (
            "throttle",
            OptionsView::Throttle {
                child: o.child,
                group: o.group,
                limits: limits_view(&o.limits.unwrap_or_default()),
            },
        ),
        Some(Driver::FaultInjection(o)) => (
            "fault_injection",
            OptionsView::FaultInjection {
                child: o.child,
                rules: o.rules.iter().map(rule_view).collect(),
                max_transfer: o.max_transfer,
                max_segments: o.max_segments,
                buf_alignment: o.buf_alignment,
            },
        ),
        Some(Driver::Zoned(o)) => (
            "zoned",
            OptionsView::Zoned {
                child: o.child,
                zone_size: o.zone_size,
                zone_capacity: o.zone_capacity,
                max_open_zones: o.max_open_zones,
                max_active_zones: o.max_active_zones,
                metadata_path: o.metadata_path,
            },
        ),
        // A kind added without a view of its own shows its options as the
        // API's JSON has them.
        #[allow(unreachable_patterns)]
        Some(other) => OptionsView::other(other),
    };
    NodeView {
        name: spec.name,
        driver,
        size: n.size,
        read_only: n.read_only,
        used_by: n.used_by.clone(),
        options,
        zones: n.zones.as_ref().map(zones_view),
    }
}

impl Output {
    pub fn nodes(&self, nodes: &[NodeInfo]) {
        let views: Vec<NodeView> = nodes.iter().map(node_view).collect();
        if self.json {
            return print_json(&views);
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.driver.to_string(),
                    format_size(v.size),
                    yes_no(v.read_only).to_string(),
                    list_or_dash(&v.used_by),
                    v.zones.as_ref().map_or("-".to_string(), zones_text),
                    options_text(&v.options),
                ]
            })
            .collect();
        print_table(
            &[
                "NAME",
                "DRIVER",
                "SIZE",
                "READ-ONLY",
                "USED-BY",
                "ZONES",
                "OPTIONS",
            ],
            &rows,
        );
    }

    pub fn node(&self, node: &NodeInfo) {
        let v = node_view(node);
        if self.json {
            return print_json(&v);
        }
        let mut rows = vec![
            ("name", v.name.clone()),
            ("driver", v.driver.to_string()),
            (
                "size",
                format!("{} ({} bytes)", format_size(v.size), v.size),
            ),
            ("read-only", yes_no(v.read_only).to_string()),
            ("used-by", list_or_dash(&v.used_by)),
        ];
        let mut rule_rows: Vec<(String, String)> = Vec::new();
        match &v.options {
            OptionsView::IoUring {
                path,
                direct,
                read_only,
            } => {
                rows.push(("path", path.clone()));
                rows.push(("direct", yes_no(*direct).to_string()));
                rows.push(("open-read-only", yes_no(*read_only).to_string()));
            }
            OptionsView::Null { latency_ns, .. } => {
                rows.push(("latency", format!("{} us", latency_ns / 1000)));
            }
            OptionsView::Raw {
                child,
                offset,
                size,
            } => {
                rows.push(("child", child.clone()));
                rows.push((
                    "offset",
                    format!("{} ({offset} bytes)", format_size(*offset)),
                ));
                let size = if *size == 0 {
                    "to the end of the child".to_string()
                } else {
                    format!("{} ({size} bytes)", format_size(*size))
                };
                rows.push(("window", size));
            }
            OptionsView::Device { path, read_only } => {
                rows.push(("path", path.clone()));
                rows.push(("open-read-only", yes_no(*read_only).to_string()));
            }
            OptionsView::Throttle {
                child,
                group,
                limits,
            } => {
                rows.push(("child", child.clone()));
                rows.push((
                    "group",
                    if group.is_empty() {
                        "-".to_string()
                    } else {
                        group.clone()
                    },
                ));
                let buckets = [
                    ("iops", &limits.iops_total, false),
                    ("iops-read", &limits.iops_read, false),
                    ("iops-write", &limits.iops_write, false),
                    ("bps", &limits.bps_total, true),
                    ("bps-read", &limits.bps_read, true),
                    ("bps-write", &limits.bps_write, true),
                ];
                for (name, b, bytes) in buckets {
                    rows.push((name, bucket_text(b, bytes)));
                }
            }
            OptionsView::FaultInjection {
                child,
                rules,
                max_transfer,
                max_segments,
                buf_alignment,
            } => {
                rows.push(("child", child.clone()));
                // The limits only when set, so plain fault nodes look as before.
                if *max_transfer != 0 {
                    rows.push((
                        "max-transfer",
                        format!("{} ({max_transfer} bytes)", format_size(*max_transfer)),
                    ));
                }
                if *max_segments != 0 {
                    rows.push(("max-segments", max_segments.to_string()));
                }
                if *buf_alignment != 0 {
                    rows.push(("buf-alignment", format!("{buf_alignment} bytes")));
                }
                rows.push(("rules", rules.len().to_string()));
                for (i, r) in rules.iter().enumerate() {
                    rule_rows.push((format!("rule[{i}]"), r.text.clone()));
                }
            }
            // The geometry follows (from the node's zone info).
            OptionsView::Zoned {
                child,
                metadata_path,
                ..
            } => {
                rows.push(("child", child.clone()));
                rows.push(("metadata", metadata_path.clone()));
            }
            OptionsView::Other(options) => {
                for (k, v) in OptionsView::other_pairs(options) {
                    rule_rows.push((k, v));
                }
            }
            OptionsView::None {} => {}
        }
        if let Some(z) = &v.zones {
            rows.push(("zone-model", z.model.to_string()));
            rows.push(("zones", z.nr_zones.to_string()));
            rows.push(("zone-size", bytes_text(z.zone_size)));
            rows.push(("zone-capacity", bytes_text(z.zone_capacity)));
            rows.push(("max-open-zones", limit_text(z.max_open_zones)));
            rows.push(("max-active-zones", limit_text(z.max_active_zones)));
            rows.push((
                "write-granularity",
                format!("{} bytes", z.write_granularity),
            ));
            rows.push(("max-append", bytes_text(z.max_append)));
        }
        let rows: Vec<(String, String)> = rows
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(rule_rows)
            .collect();
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        for (k, val) in rows {
            println!("{:<width$} {val}", format!("{k}:"));
        }
    }
}
