//! Output: aligned tables for people, JSON (`--json`) for scripts.
//!
//! [`Output`] has one method per thing a command prints; each resource's
//! views and methods live in a module of their own (`node`, `options`,
//! `export`, `worker`, `frontend`, `zone`, `job`), on top of `table`.

mod export;
mod frontend;
mod job;
mod node;
mod options;
mod table;
mod worker;
mod zone;

pub(crate) use table::{print_json, print_table};

/// Output mode.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
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
