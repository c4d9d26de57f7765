//! Nodes: adding, removing, updating and resizing them; an update or a
//! resize waits for the frontends to apply it and is undone when one
//! cannot.

use std::collections::BTreeMap;
use std::sync::{Arc, MutexGuard};

use blkmesh_graph::kinds::qcow2::{chain, ChainLayer, LayerFormat};
use blkmesh_graph::{
    driver_name, validate_node, validate_node_limits, GraphError, ObjectKind, SECTOR_SIZE,
};
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeInfo, NodeResizedEvent, NodeSpec, NodeUpdatedEvent};
use tokio::sync::watch;

use crate::control::hub::{probe_blocking, push_plans, Applied, Control, Inner};
use crate::core::error::ApiError;
use crate::core::image::{image_chain, probe_image};
use crate::core::nodes::{
    bump_generations, check_writable_exports, group_change, group_members_with, new_node_size,
    NodeChange,
};
use crate::core::probe::probe_node_paths;
use crate::core::reopen::{self, exports_over, replace_specs, ResizePlan};
use crate::core::state::State;
use crate::core::views::node_info;
use crate::core::zoned;
use crate::store::writer::WriteTicket;

impl Control {
    /// Bumps the generation of `exports` in `next`, commits it and pushes
    /// their plans (the caller then emits its events and [`Control::announce`]s
    /// the exports, now pending). Returns each export with its new generation.
    pub(super) async fn commit_bumped(
        &self,
        ticket: &WriteTicket<'_>,
        mut next: State,
        exports: &[String],
    ) -> Result<(MutexGuard<'_, Inner>, Vec<(String, u64)>), ApiError> {
        let targets = bump_generations(&mut next, exports);
        let mut inner = self.commit(ticket, next).await?;
        let ids: Vec<&str> = exports.iter().map(String::as_str).collect();
        push_plans(&mut inner, &ids);
        Ok((inner, targets))
    }

    /// Waits for the frontends to apply `change`; if one reports FAILED,
    /// undoes it and fails with the frontend's reason. Pending exports and
    /// timeouts do not fail.
    async fn settle(
        self: &Arc<Self>,
        rx: watch::Receiver<u64>,
        change: &NodeChange,
        what: String,
    ) -> Result<(), ApiError> {
        if change.targets.is_empty() {
            return Ok(());
        }
        let outcomes = self.wait_applied(&change.targets, rx).await;
        let failed = outcomes.into_iter().find_map(|(id, a)| match a {
            Applied::Failed(reason) => Some((id, reason)),
            _ => None,
        });
        let Some((export, reason)) = failed else {
            return Ok(());
        };
        tracing::warn!(%export, %reason, "frontend could not apply a node change; rolling back");
        let undone = match self.undo(change).await {
            Ok(()) => "the change was rolled back".to_string(),
            Err(e) => format!("rolling the change back failed too: {e}"),
        };
        Err(ApiError::NotApplied {
            export,
            what,
            reason,
            undone,
        })
    }

    /// Restores the specs and sizes `change` replaced (those nobody changed
    /// since), bumping, pushing and persisting like the change itself.
    async fn undo(self: &Arc<Self>, change: &NodeChange) -> Result<(), ApiError> {
        let change = change.clone();
        self.run_change(move |control| async move { control.undo_now(&change).await })
            .await
    }

    async fn undo_now(&self, change: &NodeChange) -> Result<(), ApiError> {
        let ticket = self.begin_change().await;
        let (next, replace, sizes) = {
            let inner = self.lock();
            let replace: BTreeMap<String, NodeSpec> = change
                .specs
                .iter()
                .filter(|(_, after)| inner.state.graph.get(&after.name) == Some(after))
                .map(|(before, _)| (before.name.clone(), before.clone()))
                .collect();
            let mut next = inner.state.clone();
            next.graph = replace_specs(&next.graph, &replace)?;
            let mut sizes = Vec::new();
            for (name, before, after) in &change.sizes {
                if next.sizes.get(name) == Some(after) {
                    next.sizes.insert(name.clone(), *before);
                    sizes.push((name.clone(), *after, *before));
                }
            }
            (next, replace, sizes)
        };
        if replace.is_empty() && sizes.is_empty() {
            return Ok(());
        }
        if let Some(rec) = next
            .exports
            .values()
            .find(|r| r.export.writable && next.graph.is_read_only(&r.export.node).unwrap_or(false))
        {
            return Err(ApiError::Conflict(format!(
                "writable export {:?} was added meanwhile over a node the rollback would \
                 make read-only",
                rec.export.id
            )));
        }
        let touched = replace
            .keys()
            .map(String::as_str)
            .chain(sizes.iter().map(|(n, _, _)| n.as_str()));
        let exports = exports_over(&next, touched);
        let (mut inner, _) = self.commit_bumped(&ticket, next, &exports).await?;
        for node in replace.keys() {
            tracing::info!(%node, "node change rolled back");
            self.emit(EventKind::NodeUpdated(NodeUpdatedEvent {
                node: node.clone(),
                changes: vec!["rolled back".to_string()],
            }));
        }
        for (node, old, new) in sizes {
            self.emit(EventKind::NodeResized(NodeResizedEvent {
                node,
                old_size: old,
                new_size: new,
            }));
        }
        self.announce(&mut inner, &exports);
        Ok(())
    }

    /// `AddNode`: checks the node, probes its path outside the lock and
    /// commits it with its size.
    pub(crate) async fn add_node(self: &Arc<Self>, spec: NodeSpec) -> Result<NodeInfo, ApiError> {
        validate_node(&spec)?;
        validate_node_limits(&spec)?;
        let image = {
            let inner = self.lock();
            inner.state.graph.check_add(&spec)?;
            image_chain(&inner.state.graph, &spec)?
        };
        // Filesystem and image checks run before the lock is taken again;
        // the graph rules are checked once more under it.
        let probed = {
            let spec = spec.clone();
            probe_blocking(move || match image {
                Some(layers) => probe_image(layers).map(Some),
                None => probe_node_paths(&spec),
            })
            .await?
        };
        self.run_change(move |control| async move { control.add_node_now(spec, probed).await })
            .await
    }

    async fn add_node_now(
        &self,
        spec: NodeSpec,
        probed: Option<u64>,
    ) -> Result<NodeInfo, ApiError> {
        let ticket = self.begin_change().await;
        let (next, size) = {
            let inner = self.lock();
            let mut next = inner.state.clone();
            next.graph.add(spec.clone())?;
            zoned::check_add(&inner.state, &spec)?;
            let size = new_node_size(&next, &spec, probed)?;
            next.sizes.insert(spec.name.clone(), size);
            (next, size)
        };
        let inner = self.commit(&ticket, next).await?;
        tracing::info!(node = %spec.name, driver = driver_name(&spec), size, "node added");
        self.emit(EventKind::NodeAdded(spec.name.clone()));
        Ok(node_info(&inner.state, &spec))
    }

    /// The image layers of node `name`, top first: a qcow2 node's chain as
    /// the graph names it, or an io_uring node's file as a raw image.
    pub(crate) fn image_layers(&self, name: &str) -> Result<Vec<ChainLayer>, ApiError> {
        let inner = self.lock();
        let graph = &inner.state.graph;
        let spec = graph.get(name).ok_or_else(|| GraphError::NotFound {
            field: "node",
            kind: ObjectKind::Node,
            name: name.to_string(),
        })?;
        match &spec.driver {
            Some(Driver::Qcow2(_)) => Ok(chain(|n| graph.get(n), spec)?),
            Some(Driver::IoUring(o)) => Ok(vec![ChainLayer {
                node: name.to_string(),
                format: LayerFormat::Raw,
                path: o.path.clone(),
                direct: o.direct,
                no_backing: false,
            }]),
            _ => Err(GraphError::invalid(
                "node",
                format!("node {name:?} is neither a qcow2 nor an io_uring node"),
            )
            .into()),
        }
    }

    /// `RemoveNode`: refused while a node or an export uses it.
    pub(crate) async fn remove_node(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let name = name.to_string();
        self.run_change(move |control| async move { control.remove_node_now(&name).await })
            .await
    }

    async fn remove_node_now(&self, name: &str) -> Result<(), ApiError> {
        let ticket = self.begin_change().await;
        let (next, from_config) = {
            let inner = self.lock();
            if !inner.state.graph.contains(name) {
                return Err(GraphError::NotFound {
                    field: "name",
                    kind: ObjectKind::Node,
                    name: name.to_string(),
                }
                .into());
            }
            let mut users: Vec<String> = inner
                .state
                .graph
                .users_of(name)
                .iter()
                .map(|u| format!("node {u:?}"))
                .collect();
            users.extend(
                inner
                    .state
                    .exports_of_node(name)
                    .map(|e| format!("export {e:?}")),
            );
            users.extend(
                inner
                    .config_waiting
                    .iter()
                    .filter(|e| e.node == name)
                    .map(|e| {
                        format!(
                            "export {:?} (from the configuration file, waiting for a worker)",
                            e.id
                        )
                    }),
            );
            if !users.is_empty() {
                return Err(GraphError::InUse {
                    kind: ObjectKind::Node,
                    name: name.to_string(),
                    users,
                }
                .into());
            }
            let mut next = inner.state.clone();
            next.graph.remove(name)?;
            next.sizes.remove(name);
            let from_config = next.config_nodes.remove(name);
            (next, from_config)
        };
        // Held to the end: the change is announced under the lock.
        let _inner = self.commit(&ticket, next).await?;
        if from_config {
            tracing::info!(node = %name, "node removed (it came from the configuration file: a start with that file adds it again)");
        } else {
            tracing::info!(node = %name, "node removed");
        }
        self.emit(EventKind::NodeRemoved(name.to_string()));
        Ok(())
    }

    /// `UpdateNode`: see the proto. New throttle limits of a node in a
    /// group apply to every node of the group (a group has one set of limits).
    pub(crate) async fn update_node(
        self: &Arc<Self>,
        spec: NodeSpec,
    ) -> Result<NodeInfo, ApiError> {
        validate_node(&spec)?;
        validate_node_limits(&spec)?;
        let rx = self.watch_reports();
        let (change, info) = {
            let spec = spec.clone();
            self.run_change(move |control| async move { control.commit_update(&spec).await })
                .await?
        };
        if let Some(change) = change {
            let what = format!("apply the update of node {:?}", spec.name);
            self.settle(rx, &change, what).await?;
        }
        Ok(info)
    }

    /// The committed part of `update_node`: checks, commits, pushes and announces
    /// the change (`None`: nothing changes).
    async fn commit_update(
        &self,
        spec: &NodeSpec,
    ) -> Result<(Option<NodeChange>, NodeInfo), ApiError> {
        let ticket = self.begin_change().await;
        let (next, specs, described, exports) =
            {
                let inner = self.lock();
                let current = inner.state.graph.get(&spec.name).cloned().ok_or_else(|| {
                    GraphError::NotFound {
                        field: "node.name",
                        kind: ObjectKind::Node,
                        name: spec.name.clone(),
                    }
                })?;
                let changes = reopen::update_changes(&current, spec)?;
                if changes.is_empty() {
                    return Ok((None, node_info(&inner.state, &current)));
                }
                let limits_changed = changes.iter().any(|c| c == "throttle limits");
                let mut specs = vec![(current, spec.clone())];
                let mut described = vec![(spec.name.clone(), changes)];
                if limits_changed {
                    for (before, after) in group_members_with(&inner.state, spec) {
                        described.push((after.name.clone(), vec![group_change(spec)]));
                        specs.push((before, after));
                    }
                }
                let replace: BTreeMap<String, NodeSpec> = specs
                    .iter()
                    .map(|(_, new)| (new.name.clone(), new.clone()))
                    .collect();
                let mut next = inner.state.clone();
                next.graph = replace_specs(&next.graph, &replace)?;
                check_writable_exports(&next, spec)?;
                let exports = exports_over(&next, replace.keys().map(String::as_str));
                (next, specs, described, exports)
            };
        let (mut inner, targets) = self.commit_bumped(&ticket, next, &exports).await?;
        for (node, changes) in described {
            tracing::info!(%node, ?changes, exports = ?exports, "node updated");
            self.emit(EventKind::NodeUpdated(NodeUpdatedEvent { node, changes }));
        }
        self.announce(&mut inner, &exports);
        let info = inner
            .state
            .graph
            .get(&spec.name)
            .map(|s| node_info(&inner.state, s))
            .unwrap_or_default();
        let change = NodeChange {
            specs,
            sizes: Vec::new(),
            targets,
        };
        Ok((Some(change), info))
    }

    /// `ResizeNode`: see the proto and [`reopen::plan_resize`].
    pub(crate) async fn resize_node(
        self: &Arc<Self>,
        name: &str,
        size: u64,
    ) -> Result<NodeInfo, ApiError> {
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(GraphError::invalid(
                "size",
                format!("must be a non-zero multiple of {SECTOR_SIZE} (got {size})"),
            )
            .into());
        }
        let plan: ResizePlan = {
            let inner = self.lock();
            match reopen::plan_resize(&inner.state, name, size)? {
                Some(plan) => plan,
                None => {
                    let spec = inner.state.graph.get(name).ok_or_else(|| {
                        ApiError::Conflict(format!("node {name:?} was removed meanwhile"))
                    })?;
                    return Ok(node_info(&inner.state, spec));
                }
            }
        };
        // The file is extended (or the device re-read) outside the lock.
        let leaf_size = match &plan.leaf {
            Some(leaf) => {
                let leaf = leaf.clone();
                Some(probe_blocking(move || reopen::grow_io_uring_path(&leaf)).await?)
            }
            None => None,
        };
        let rx = self.watch_reports();
        let (change, info) = {
            let name = name.to_string();
            self.run_change(move |control| async move {
                control.commit_resize(&name, size, plan, leaf_size).await
            })
            .await?
        };
        self.settle(rx, &change, format!("apply the resize of node {name:?}"))
            .await?;
        Ok(info)
    }

    /// The locked part of `resize_node`: checks that `plan` still holds,
    /// commits, pushes and announces the resize.
    async fn commit_resize(
        &self,
        name: &str,
        size: u64,
        plan: ResizePlan,
        leaf_size: Option<u64>,
    ) -> Result<(NodeChange, NodeInfo), ApiError> {
        let ticket = self.begin_change().await;
        let (next, sizes, exports, new_size) = {
            let inner = self.lock();
            if reopen::plan_resize(&inner.state, name, size)?.as_ref() != Some(&plan) {
                return Err(ApiError::Conflict(format!(
                    "node {name:?} or a node below it changed while it was being resized; retry"
                )));
            }
            let replace: BTreeMap<String, NodeSpec> = plan
                .specs
                .iter()
                .map(|(_, new)| (new.name.clone(), new.clone()))
                .collect();
            let mut next = inner.state.clone();
            next.graph = replace_specs(&next.graph, &replace)?;
            let mut sizes = Vec::new();
            if let (Some(leaf), Some(new)) = (&plan.leaf, leaf_size) {
                let old = next.sizes.insert(leaf.node.clone(), new).unwrap_or(0);
                if old != new {
                    sizes.push((leaf.node.clone(), old, new));
                }
            }
            sizes.extend(reopen::recompute_sizes(&mut next, &plan.bottom)?);
            let touched = sizes
                .iter()
                .map(|(n, _, _)| n.as_str())
                .chain(replace.keys().map(String::as_str));
            let exports = exports_over(&next, touched);
            let new_size = next.sizes.get(name).copied().unwrap_or(0);
            (next, sizes, exports, new_size)
        };
        {
            let (mut inner, targets) = self.commit_bumped(&ticket, next, &exports).await?;
            tracing::info!(node = %name, old = plan.old_size, new = new_size, exports = ?exports, "node resized");
            // The node asked for first, then the others that grew with it.
            self.emit(EventKind::NodeResized(NodeResizedEvent {
                node: name.to_string(),
                old_size: plan.old_size,
                new_size,
            }));
            for (node, old, new) in &sizes {
                if node != name {
                    self.emit(EventKind::NodeResized(NodeResizedEvent {
                        node: node.clone(),
                        old_size: *old,
                        new_size: *new,
                    }));
                }
            }
            self.announce(&mut inner, &exports);
            let info = inner
                .state
                .graph
                .get(name)
                .map(|s| node_info(&inner.state, s))
                .unwrap_or_default();
            let change = NodeChange {
                specs: plan.specs,
                sizes,
                targets,
            };
            Ok((change, info))
        }
    }

    /// Every node.
    pub(crate) fn list_nodes(&self) -> Vec<NodeInfo> {
        let inner = self.lock();
        inner
            .state
            .graph
            .iter()
            .map(|spec| node_info(&inner.state, spec))
            .collect()
    }

    /// Node `name`.
    pub(crate) fn get_node(&self, name: &str) -> Result<NodeInfo, ApiError> {
        let inner = self.lock();
        let spec = inner
            .state
            .graph
            .get(name)
            .ok_or_else(|| GraphError::NotFound {
                field: "name",
                kind: ObjectKind::Node,
                name: name.to_string(),
            })?;
        Ok(node_info(&inner.state, spec))
    }
}
