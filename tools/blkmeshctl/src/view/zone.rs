//! Zone views: a node's zone geometry, zone reports and zone actions.

use blkmesh_proto::v1::{ReportZonesResponse, Zone, ZoneCondition, ZoneInfo, ZoneModel, ZoneType};
use serde::Serialize;

use super::table::{print_json, print_table};
use super::Output;
use blkmesh_graph::size::format_size;

/// `NodeInfo.zones` / `ReportZonesResponse.info`.
#[derive(Debug, Serialize)]
pub(super) struct ZonesView {
    /// HOST_MANAGED, HOST_AWARE or NONE.
    pub(super) model: &'static str,
    pub(super) nr_zones: u32,
    pub(super) zone_size: u64,
    pub(super) zone_capacity: u64,
    /// 0 = no limit.
    pub(super) max_open_zones: u32,
    /// 0 = no limit.
    pub(super) max_active_zones: u32,
    pub(super) write_granularity: u32,
    /// 0 = no zone append.
    pub(super) max_append: u64,
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

pub(super) fn zones_view(z: &ZoneInfo) -> ZonesView {
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
pub(super) fn zones_text(z: &ZonesView) -> String {
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
pub(super) fn limit_text(n: u32) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

/// Bytes for `node info`: `4M (4194304 bytes)`.
pub(super) fn bytes_text(n: u64) -> String {
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

impl Output {
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
}
