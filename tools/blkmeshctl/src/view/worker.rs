//! Worker views: `worker list`, and the queues a move or a drain changed.

use blkmesh_proto::v1::{MovedQueue, WorkerInfo, WorkerState};
use serde::Serialize;

use super::table::{print_json, print_table};
use super::Output;

#[derive(Debug, Serialize)]
struct WorkerView {
    name: String,
    socket: String,
    pid: u32,
    state: &'static str,
    queues: Vec<String>,
}

#[derive(Debug, Serialize)]
struct MovedView {
    export: String,
    queue: u32,
    from: String,
    to: String,
}

fn worker_state(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Alive) => "ALIVE",
        Ok(WorkerState::Gone) => "GONE",
        Ok(WorkerState::Unspecified) | Err(_) => "UNKNOWN",
    }
}

impl Output {
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
}
