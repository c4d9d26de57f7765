//! Output: aligned tables for people, JSON (`--json`) for scripts.

use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, ExportInfo, ExportState, FaultRule, FrontendInfo, MovedQueue, NodeInfo,
    ReportZonesResponse, ThrottleLimits, WorkerInfo, WorkerState, Zone, ZoneCondition, ZoneInfo,
    ZoneModel, ZoneType,
};
use serde::Serialize;

use crate::rule::{errno_name, format_rule, op_name};
use crate::size::format_size;

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

/// `NodeInfo.zones` / `ReportZonesResponse.info`.
#[derive(Debug, Serialize)]
struct ZonesView {
    /// HOST_MANAGED, HOST_AWARE or NONE.
    model: &'static str,
    nr_zones: u32,
    zone_size: u64,
    zone_capacity: u64,
    /// 0 = no limit.
    max_open_zones: u32,
    /// 0 = no limit.
    max_active_zones: u32,
    write_granularity: u32,
    /// 0 = no zone append.
    max_append: u64,
}

#[derive(Debug, Serialize)]
struct ZoneView {
    start: u64,
    length: u64,
    capacity: u64,
    write_pointer: u64,
    /// CONVENTIONAL, SEQ_WRITE_REQUIRED, SEQ_WRITE_PREFERRED or UNKNOWN.
    #[serde(rename = "type")]
    kind: &'static str,
    /// EMPTY, IMPLICIT_OPEN, EXPLICIT_OPEN, CLOSED, FULL, READ_ONLY,
    /// OFFLINE, NOT_WRITE_POINTER or UNKNOWN.
    condition: &'static str,
}

#[derive(Debug, Serialize)]
struct ZoneReportView {
    export: String,
    info: Option<ZonesView>,
    zones: Vec<ZoneView>,
}

fn zone_model(model: i32) -> &'static str {
    match ZoneModel::try_from(model) {
        Ok(ZoneModel::None) => "NONE",
        Ok(ZoneModel::HostAware) => "HOST_AWARE",
        Ok(ZoneModel::HostManaged) => "HOST_MANAGED",
        Err(_) => "UNKNOWN",
    }
}

fn zone_type(t: i32) -> &'static str {
    match ZoneType::try_from(t) {
        Ok(ZoneType::Conventional) => "CONVENTIONAL",
        Ok(ZoneType::SequentialWriteRequired) => "SEQ_WRITE_REQUIRED",
        Ok(ZoneType::SequentialWritePreferred) => "SEQ_WRITE_PREFERRED",
        Ok(ZoneType::Unspecified) | Err(_) => "UNKNOWN",
    }
}

fn zone_condition(c: i32) -> &'static str {
    match ZoneCondition::try_from(c) {
        Ok(ZoneCondition::NotWritePointer) => "NOT_WRITE_POINTER",
        Ok(ZoneCondition::Empty) => "EMPTY",
        Ok(ZoneCondition::ImplicitOpen) => "IMPLICIT_OPEN",
        Ok(ZoneCondition::ExplicitOpen) => "EXPLICIT_OPEN",
        Ok(ZoneCondition::Closed) => "CLOSED",
        Ok(ZoneCondition::ReadOnly) => "READ_ONLY",
        Ok(ZoneCondition::Full) => "FULL",
        Ok(ZoneCondition::Offline) => "OFFLINE",
        Err(_) => "UNKNOWN",
    }
}

fn zones_view(z: &ZoneInfo) -> ZonesView {
    ZonesView {
        model: zone_model(z.model),
        nr_zones: z.nr_zones,
        zone_size: z.zone_size,
        zone_capacity: z.zone_capacity,
        max_open_zones: z.max_open_zones,
        max_active_zones: z.max_active_zones,
        write_granularity: z.write_granularity,
        max_append: z.max_append,
    }
}

fn zone_view(z: &Zone) -> ZoneView {
    ZoneView {
        start: z.start,
        length: z.length,
        capacity: z.capacity,
        write_pointer: z.write_pointer,
        kind: zone_type(z.r#type),
        condition: zone_condition(z.condition),
    }
}

/// `HOST_MANAGED 16x4M cap=3M open=4 active=8` for the node list (limits
/// only when set).
fn zones_text(z: &ZonesView) -> String {
    let mut s = format!(
        "{} {}x{} cap={}",
        z.model,
        z.nr_zones,
        format_size(z.zone_size),
        format_size(z.zone_capacity)
    );
    if z.max_open_zones != 0 {
        s.push_str(&format!(" open={}", z.max_open_zones));
    }
    if z.max_active_zones != 0 {
        s.push_str(&format!(" active={}", z.max_active_zones));
    }
    s
}

/// A zone limit for `node info`: the number, or `unlimited`.
fn limit_text(n: u32) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

/// Bytes for `node info`: `4M (4194304 bytes)`.
fn bytes_text(n: u64) -> String {
    format!("{} ({n} bytes)", format_size(n))
}

fn zone_row(z: &ZoneView) -> Vec<String> {
    // The write pointer means nothing for a conventional zone.
    let wp = if z.kind == "CONVENTIONAL" || z.condition == "NOT_WRITE_POINTER" {
        "-".to_string()
    } else {
        format_size(z.write_pointer)
    };
    vec![
        format_size(z.start),
        format_size(z.length),
        format_size(z.capacity),
        wp,
        z.kind.to_string(),
        z.condition.to_string(),
    ]
}

const ZONE_HEADERS: [&str; 6] = ["START", "LENGTH", "CAPACITY", "WP", "TYPE", "CONDITION"];

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum OptionsView {
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
}

/// All six buckets; rate 0 = unlimited, burst 0 = the rate.
#[derive(Debug, Serialize)]
struct LimitsView {
    iops_total: BucketView,
    iops_read: BucketView,
    iops_write: BucketView,
    bps_total: BucketView,
    bps_read: BucketView,
    bps_write: BucketView,
}

#[derive(Debug, Serialize)]
struct BucketView {
    rate: u64,
    burst: u64,
}

#[derive(Debug, Serialize)]
struct RuleView {
    /// Op names (empty = all ops).
    ops: Vec<String>,
    offset_start: u64,
    offset_end: u64,
    skip: u64,
    count: u64,
    probability: f64,
    /// Set for an error rule.
    errno: Option<i32>,
    /// Name of `errno`, e.g. EIO.
    errno_name: Option<String>,
    /// Set for a delay rule.
    delay_ns: Option<u64>,
    /// The rule as `--rule` text.
    text: String,
}

fn bucket_view(b: &Option<Bucket>) -> BucketView {
    let b = b.unwrap_or_default();
    BucketView {
        rate: b.rate,
        burst: b.burst,
    }
}

fn limits_view(l: &ThrottleLimits) -> LimitsView {
    LimitsView {
        iops_total: bucket_view(&l.iops_total),
        iops_read: bucket_view(&l.iops_read),
        iops_write: bucket_view(&l.iops_write),
        bps_total: bucket_view(&l.bps_total),
        bps_read: bucket_view(&l.bps_read),
        bps_write: bucket_view(&l.bps_write),
    }
}

fn rule_view(r: &FaultRule) -> RuleView {
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

#[derive(Debug, Serialize)]
struct ExportView {
    id: String,
    node: String,
    socket: String,
    /// PENDING, SERVING or FAILED (as the frontend reported it).
    state: &'static str,
    /// Why the export is pending or failed (empty when serving).
    message: String,
    size: u64,
    num_queues: u32,
    queue_size: u32,
    logical_block_size: u32,
    writable: bool,
    serial: String,
    spread_queues: bool,
    queues: Vec<QueueView>,
}

#[derive(Debug, Serialize)]
struct MovedView {
    export: String,
    queue: u32,
    from: String,
    to: String,
}

#[derive(Debug, Serialize)]
struct QueueView {
    queue: u32,
    worker: String,
}

#[derive(Debug, Serialize)]
struct WorkerView {
    name: String,
    socket: String,
    pid: u32,
    state: &'static str,
    queues: Vec<String>,
}

#[derive(Debug, Serialize)]
struct FrontendView<'a> {
    name: &'a str,
    state: &'static str,
    serving: &'a [String],
    pending: &'a [String],
    failed: &'a [String],
    vmm_refused: &'a [String],
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

fn export_view(e: &ExportInfo) -> ExportView {
    let x = e.export.clone().unwrap_or_default();
    ExportView {
        id: x.id,
        node: x.node,
        socket: x.socket,
        state: export_state(e.state),
        message: e.message.clone(),
        size: e.size,
        num_queues: x.num_queues,
        queue_size: x.queue_size,
        logical_block_size: x.logical_block_size,
        writable: x.writable,
        serial: x.serial,
        spread_queues: x.spread_queues,
        queues: e
            .queues
            .iter()
            .map(|q| QueueView {
                queue: q.queue,
                worker: q.worker.clone(),
            })
            .collect(),
    }
}

fn export_state(state: i32) -> &'static str {
    match ExportState::try_from(state) {
        Ok(ExportState::Pending) => "PENDING",
        Ok(ExportState::Serving) => "SERVING",
        Ok(ExportState::Failed) => "FAILED",
        Ok(ExportState::VmmRefused) => "VMM_REFUSED",
        Ok(ExportState::Unspecified) | Err(_) => "UNKNOWN",
    }
}

fn worker_state(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Alive) => "ALIVE",
        Ok(WorkerState::Gone) => "GONE",
        Ok(WorkerState::Unspecified) | Err(_) => "UNKNOWN",
    }
}

fn options_text(o: &OptionsView) -> String {
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
        OptionsView::None {} => String::new(),
    }
}

/// One bucket for `node info`: `100/s, burst 200`, or `unlimited`.
fn bucket_text(b: &BucketView, bytes: bool) -> String {
    let fmt = |n: u64| if bytes { format_size(n) } else { n.to_string() };
    match (b.rate, b.burst) {
        (0, _) => "unlimited".into(),
        (rate, 0) => format!("{}/s", fmt(rate)),
        (rate, burst) => format!("{}/s, burst {}", fmt(rate), fmt(burst)),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// Prints rows under headers, columns padded to their widest cell.
pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub(crate) fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

/// Output mode.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
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

    pub fn exports(&self, exports: &[ExportInfo]) {
        let views: Vec<ExportView> = exports.iter().map(export_view).collect();
        if self.json {
            return print_json(&views);
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                // Each worker once, in queue order.
                let mut workers: Vec<String> = Vec::new();
                for q in &v.queues {
                    if !workers.contains(&q.worker) {
                        workers.push(q.worker.clone());
                    }
                }
                vec![
                    v.id.clone(),
                    v.node.clone(),
                    v.state.to_string(),
                    format_size(v.size),
                    v.num_queues.to_string(),
                    v.queue_size.to_string(),
                    v.logical_block_size.to_string(),
                    yes_no(v.writable).to_string(),
                    v.serial.clone(),
                    list_or_dash(&workers),
                    v.socket.clone(),
                ]
            })
            .collect();
        print_table(
            &[
                "ID", "NODE", "STATE", "SIZE", "QUEUES", "QSIZE", "BS", "WRITABLE", "SERIAL",
                "WORKERS", "SOCKET",
            ],
            &rows,
        );
        // Why an export is not simply serving, below the table (a column
        // would be too wide).
        for v in views.iter().filter(|v| !v.message.is_empty()) {
            println!("{}: {}: {}", v.id, v.state, v.message);
        }
    }

    pub fn export(&self, export: &ExportInfo) {
        if self.json {
            return print_json(&export_view(export));
        }
        self.exports(std::slice::from_ref(export));
    }

    pub fn workers(&self, workers: &[WorkerInfo]) {
        let views: Vec<WorkerView> = workers
            .iter()
            .map(|w| WorkerView {
                name: w.name.clone(),
                socket: w.socket.clone(),
                pid: w.pid,
                state: worker_state(w.state),
                queues: w.queues.clone(),
            })
            .collect();
        if self.json {
            return print_json(&views);
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.state.to_string(),
                    v.pid.to_string(),
                    v.queues.len().to_string(),
                    v.socket.clone(),
                ]
            })
            .collect();
        print_table(&["NAME", "STATE", "PID", "QUEUES", "SOCKET"], &rows);
    }

    pub fn frontends(&self, frontends: &[FrontendInfo]) {
        let views: Vec<FrontendView> = frontends
            .iter()
            .map(|f| FrontendView {
                name: &f.name,
                state: if f.connected { "CONNECTED" } else { "GONE" },
                serving: &f.serving,
                pending: &f.pending,
                failed: &f.failed,
                vmm_refused: &f.vmm_refused,
            })
            .collect();
        if self.json {
            return print_json(&views);
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                vec![
                    v.name.to_string(),
                    v.state.to_string(),
                    list_or_dash(v.serving),
                    list_or_dash(v.pending),
                    list_or_dash(v.failed),
                    list_or_dash(v.vmm_refused),
                ]
            })
            .collect();
        print_table(
            &[
                "NAME",
                "STATE",
                "SERVING",
                "PENDING",
                "FAILED",
                "VMM_REFUSED",
            ],
            &rows,
        );
    }

    /// The result of `worker drain` and `node move`: the queues a move changed; `nothing` is printed when there are none.
    pub fn moved(&self, moved: &[MovedQueue], nothing: &str) {
        let views: Vec<MovedView> = moved
            .iter()
            .map(|m| MovedView {
                export: m.export.clone(),
                queue: m.queue,
                from: m.from.clone(),
                to: m.to.clone(),
            })
            .collect();
        if self.json {
            return print_json(&views);
        }
        if views.is_empty() {
            println!("{nothing}");
            return;
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                vec![
                    v.export.clone(),
                    v.queue.to_string(),
                    v.from.clone(),
                    v.to.clone(),
                ]
            })
            .collect();
        print_table(&["EXPORT", "QUEUE", "FROM", "TO"], &rows);
    }

    /// The result of `zone report`.
    pub fn zone_report(&self, export: &str, report: &ReportZonesResponse) {
        let zones: Vec<ZoneView> = report.zones.iter().map(zone_view).collect();
        if self.json {
            return print_json(&ZoneReportView {
                export: export.to_string(),
                info: report.info.as_ref().map(zones_view),
                zones,
            });
        }
        let rows: Vec<Vec<String>> = zones.iter().map(zone_row).collect();
        print_table(&ZONE_HEADERS, &rows);
    }

    /// The result of a zone action: the zone afterwards (none for reset-all).
    pub fn zone_action(&self, export: &str, action: &str, zone: Option<&Zone>) {
        match (zone, self.json) {
            (Some(z), true) => print_json(&zone_view(z)),
            (Some(z), false) => print_table(&ZONE_HEADERS, &[zone_row(&zone_view(z))]),
            (None, true) => print_json(&serde_json::json!({ "export": export, "action": action })),
            (None, false) if action == "reset-all" => {
                println!("reset every zone of export {export}")
            }
            (None, false) => println!("zone {action} done on export {export}"),
        }
    }

    pub fn removed(&self, kind: &str, name: &str) {
        if self.json {
            print_json(&serde_json::json!({ "removed": kind, "name": name }));
        } else {
            println!("removed {kind} {name}");
        }
    }

    pub fn health(&self, service: &str, status: &str) {
        if self.json {
            print_json(&serde_json::json!({ "service": service, "status": status }));
        } else {
            println!("{status}");
        }
    }
}
