//! Frontend views: `frontend list`.

use blkmesh_proto::v1::FrontendInfo;
use serde::Serialize;

use super::table::{list_or_dash, print_json, print_table};
use super::Output;

#[derive(Debug, Serialize)]
struct FrontendView<'a> {
    name: &'a str,
    state: &'static str,
    serving: &'a [String],
    pending: &'a [String],
    failed: &'a [String],
    vmm_refused: &'a [String],
}

impl Output {
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
}
