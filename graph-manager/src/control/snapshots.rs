//! `SnapshotExport`: a live external snapshot, as QEMU's
//! blockdev-snapshot. The overlay (a qcow2 node whose backing node is the
//! export's node) was added before; here the export's root becomes the
//! overlay, and the frontend reopens the graph live, queue by queue, with
//! no request failed. If the frontend cannot open the new graph, the
//! export goes back to its node.

use std::sync::Arc;

use blkmesh_graph::kinds::qcow2::backing_conflict;
use blkmesh_graph::{GraphError, ObjectKind};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::ExportInfo;

use crate::control::hub::{export_info, Applied, Control};
use crate::core::error::ApiError;
use crate::core::state::State;

/// Why export `id` may not switch to `overlay` in `state` (the checks of
/// SnapshotExport); `Ok` with the export's current node.
fn check_overlay(state: &State, id: &str, overlay: &str) -> Result<String, GraphError> {
    let rec = state.exports.get(id).ok_or_else(|| GraphError::NotFound {
        field: "id",
        kind: ObjectKind::Export,
        name: id.to_string(),
    })?;
    let spec = state
        .graph
        .get(overlay)
        .ok_or_else(|| GraphError::NotFound {
            field: "overlay",
            kind: ObjectKind::Node,
            name: overlay.to_string(),
        })?;
    let current = rec.export.node.clone();
    match &spec.driver {
        Some(Driver::Qcow2(q)) if q.backing == current => {}
        _ => {
            return Err(GraphError::precondition(
                "overlay",
                format!(
                    "node {overlay:?} must be a qcow2 node whose backing node is the export's \
                     node {current:?}"
                ),
            ))
        }
    }
    if rec.export.writable && state.graph.is_read_only(overlay)? {
        return Err(GraphError::precondition(
            "overlay",
            format!("node {overlay:?} is read-only and export {id:?} is writable"),
        ));
    }
    let exports: Vec<_> = state.exports.values().map(|r| &r.export).collect();
    if let Some((other, node)) =
        backing_conflict(&state.graph, &exports, overlay, rec.export.writable, id)
    {
        return Err(GraphError::precondition(
            "overlay",
            format!(
                "export {other:?} also uses node {node:?}, which the overlay reads as its \
                 backing or writes"
            ),
        ));
    }
    let size = |n: &str| state.sizes.get(n).copied().unwrap_or(0);
    if size(overlay) != size(&current) {
        return Err(GraphError::precondition(
            "overlay",
            format!(
                "node {overlay:?} is {} bytes and the export's node {current:?} {}; \
                 the guest's disk would change size",
                size(overlay),
                size(&current)
            ),
        ));
    }
    Ok(current)
}

impl Control {
    pub(crate) async fn snapshot_export(
        self: &Arc<Self>,
        id: &str,
        overlay: &str,
    ) -> Result<ExportInfo, ApiError> {
        let rx = self.watch_reports();
        let (i, o) = (id.to_string(), overlay.to_string());
        let (before, targets) = self
            .run_change(move |control| async move { control.switch_node(&i, &o, true).await })
            .await?;
        let outcomes = self.wait_applied(&targets, rx).await;
        if let Some(reason) = outcomes.into_values().find_map(|a| match a {
            Applied::Failed(reason) => Some(reason),
            _ => None,
        }) {
            tracing::warn!(export = %id, %reason, "frontend could not switch to the overlay; switching back");
            let (i, b) = (id.to_string(), before.clone());
            let undone = match self
                .run_change(move |control| async move { control.switch_node(&i, &b, false).await })
                .await
            {
                Ok(_) => format!("the export is back on node {before:?}"),
                Err(e) => format!("switching back failed too: {e}"),
            };
            return Err(ApiError::NotApplied {
                export: id.to_string(),
                what: format!("switch to the overlay {overlay:?}"),
                reason,
                undone,
            });
        }
        let inner = self.lock();
        let rec = inner
            .state
            .exports
            .get(id)
            .ok_or_else(|| GraphError::NotFound {
                field: "id",
                kind: ObjectKind::Export,
                name: id.to_string(),
            })?;
        Ok(export_info(&inner, rec))
    }

    /// Makes `node` the root of export `id` (checked as an overlay when
    /// `snapshot`), commits and pushes the plan; returns the node it had
    /// and the generation to wait for.
    async fn switch_node(
        &self,
        id: &str,
        node: &str,
        snapshot: bool,
    ) -> Result<(String, Vec<(String, u64)>), ApiError> {
        let ticket = self.begin_change().await;
        let (next, before) = {
            let inner = self.lock();
            let before = match snapshot {
                true => check_overlay(&inner.state, id, node)?,
                false => inner
                    .state
                    .exports
                    .get(id)
                    .map(|r| r.export.node.clone())
                    .unwrap_or_default(),
            };
            let mut next = inner.state.clone();
            if let Some(rec) = next.exports.get_mut(id) {
                rec.export.node = node.to_string();
            }
            (next, before)
        };
        let exports = vec![id.to_string()];
        let (mut inner, targets) = self.commit_bumped(&ticket, next, &exports).await?;
        tracing::info!(export = %id, from = %before, to = %node, "export switched to a new top node");
        self.announce(&mut inner, &exports);
        Ok((before, targets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{null, state, with_export, MIB};
    use blkmesh_proto::v1::{IoUringOptions, NodeSpec, Qcow2Options};

    fn file(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: format!("/images/{name}"),
                ..Default::default()
            })),
        }
    }

    fn qcow2(name: &str, file: &str, backing: &str, read_only: bool) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: file.into(),
                backing: backing.into(),
                read_only,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn an_overlay_must_be_a_writable_qcow2_node_over_the_exports_node_of_its_size() {
        let mut s = state(
            vec![
                null("base", MIB),
                file("f1"),
                file("f2"),
                file("f3"),
                file("f4"),
                qcow2("good", "f1", "base", false),
                qcow2("elsewhere", "f2", "", false),
                qcow2("ro", "f3", "base", true),
                qcow2("small", "f4", "base", false),
            ],
            &["w0"],
        );
        for (n, size) in [
            ("good", MIB),
            ("elsewhere", MIB),
            ("ro", MIB),
            ("small", MIB / 2),
        ] {
            s.sizes.insert(n.into(), size);
        }
        with_export(&mut s, "e", "base", &["w0"], false);
        s.exports.get_mut("e").unwrap().export.writable = true;
        assert_eq!(check_overlay(&s, "e", "good").unwrap(), "base");
        let why = |o: &str| check_overlay(&s, "e", o).unwrap_err().to_string();
        assert!(
            why("elsewhere").contains("whose backing node is"),
            "{}",
            why("elsewhere")
        );
        assert!(why("f1").contains("must be a qcow2 node"), "{}", why("f1"));
        assert!(why("ro").contains("read-only"), "{}", why("ro"));
        assert!(why("small").contains("change size"), "{}", why("small"));
        assert!(why("nope").contains("nope"), "{}", why("nope"));
        let e = check_overlay(&s, "gone", "good").unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
