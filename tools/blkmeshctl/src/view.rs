//! Output: aligned tables for people, JSON (`--json`) for scripts.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{ExportInfo, NodeInfo, WorkerInfo, WorkerState};
use serde::Serialize;

use crate::size::format_size;

#[derive(Debug, Serialize)]
struct NodeView {
    name: String,
    driver: &'static str,
    size: u64,
    read_only: bool,
    used_by: Vec<String>,
    options: OptionsView,
}

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
    Raw {
        child: String,
        offset: u64,
        size: u64,
    },
    None {},
}

#[derive(Debug, Serialize)]
struct ExportView {
    id: String,
    node: String,
    socket: String,
    size: u64,
    num_queues: u32,
    queue_size: u32,
    logical_block_size: u32,
    writable: bool,
    serial: String,
    queues: Vec<QueueView>,
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
        Some(Driver::Raw(o)) => (
            "raw",
            OptionsView::Raw {
                child: o.child,
                offset: o.offset,
                size: o.size,
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
    }
}

fn export_view(e: &ExportInfo) -> ExportView {
    let x = e.export.clone().unwrap_or_default();
    ExportView {
        id: x.id,
        node: x.node,
        socket: x.socket,
        size: e.size,
        num_queues: x.num_queues,
        queue_size: x.queue_size,
        logical_block_size: x.logical_block_size,
        writable: x.writable,
        serial: x.serial,
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
        OptionsView::None {} => String::new(),
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
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
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

fn print_json<T: Serialize>(value: &T) {
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
                    options_text(&v.options),
                ]
            })
            .collect();
        print_table(
            &["NAME", "DRIVER", "SIZE", "READ-ONLY", "USED-BY", "OPTIONS"],
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
            OptionsView::None {} => {}
        }
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
                let mut workers: Vec<String> = v.queues.iter().map(|q| q.worker.clone()).collect();
                workers.dedup();
                vec![
                    v.id.clone(),
                    v.node.clone(),
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
                "ID", "NODE", "SIZE", "QUEUES", "QSIZE", "BS", "WRITABLE", "SERIAL", "WORKERS",
                "SOCKET",
            ],
            &rows,
        );
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
