//! Export views: `export list` and the export a command added or changed.

use blkmesh_proto::v1::{ExportInfo, ExportState};
use serde::Serialize;

use super::table::{list_or_dash, print_json, print_table, yes_no};
use super::Output;
use blkmesh_graph::size::format_size;

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
struct QueueView {
    queue: u32,
    worker: String,
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

impl Output {
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
}
