//! Job views: block jobs and their progress.

use blkmesh_proto::v1::{Job, JobKind, JobState};

use super::table::{print_json, print_table};
use super::Output;

fn job_state(s: i32) -> String {
    let name = JobState::try_from(s).map_or("UNKNOWN", |s| s.as_str_name());
    name.trim_start_matches("JOB_STATE_").to_lowercase()
}

fn kind_name(k: i32) -> String {
    let name = JobKind::try_from(k).map_or("UNKNOWN", |k| k.as_str_name());
    name.trim_start_matches("JOB_KIND_").to_lowercase()
}

impl Output {
    /// Jobs, one row each.
    pub(crate) fn jobs(&self, jobs: &[Job]) {
        if self.json {
            let rows: Vec<_> = jobs
                .iter()
                .map(|j| {
                    serde_json::json!({
                        "id": j.id, "kind": kind_name(j.kind), "export": j.export,
                        "top": j.top, "base": j.base, "state": job_state(j.state),
                        "done": j.done, "total": j.total, "message": j.message,
                        "restarts": j.restarts,
                    })
                })
                .collect();
            print_json(&rows);
            return;
        }
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                let pct = (j.done as f64 * 100.0) / (j.total.max(1) as f64);
                vec![
                    j.id.clone(),
                    kind_name(j.kind),
                    j.export.clone(),
                    format!("{} -> {}", j.top, j.base),
                    job_state(j.state),
                    format!("{pct:.0}%"),
                    j.restarts.to_string(),
                    j.message.clone(),
                ]
            })
            .collect();
        print_table(
            &[
                "ID", "KIND", "EXPORT", "NODES", "STATE", "DONE", "RESTARTS", "MESSAGE",
            ],
            &rows,
        );
    }
}
