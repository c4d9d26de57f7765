//! AddNode with `backing_from_header`: a qcow2 node whose backing chain
//! comes from its image headers, inside the allowed directories
//! ([`crate::core::backing`]), added with its new backing nodes at once.

use std::sync::Arc;

use blkmesh_graph::kinds::qcow2::{ChainLayer, LayerFormat};
use blkmesh_graph::{driver_name, validate_node, validate_node_limits, GraphError};
use blkmesh_image::Format;
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeInfo, NodeSpec};

use crate::control::hub::{probe_blocking, Control};
use crate::core::backing::{backing_nodes, follow_header, HeaderLayer};
use crate::core::error::ApiError;
use crate::core::image::{probe_image, ImageProbe};
use crate::core::nodes::new_node_size;
use crate::core::views::node_info;

fn invalid(problem: &str) -> ApiError {
    GraphError::invalid("backing_from_header", problem.to_string()).into()
}

impl Control {
    /// `AddNode` with `backing_from_header`: see the proto.
    pub(crate) async fn add_node_from_header(
        self: &Arc<Self>,
        mut spec: NodeSpec,
    ) -> Result<NodeInfo, ApiError> {
        validate_node(&spec)?;
        validate_node_limits(&spec)?;
        let (file, size, read_only) = match &spec.driver {
            Some(Driver::Qcow2(q)) if q.backing.is_empty() && !q.no_backing => {
                (q.file.clone(), q.size, q.read_only)
            }
            Some(Driver::Qcow2(_)) => {
                return Err(invalid(
                    "the node names its backing node (or no_backing) already",
                ))
            }
            _ => return Err(invalid("only a qcow2 node follows its header")),
        };
        let (path, direct, writable) = {
            let inner = self.lock();
            inner.state.graph.check_add(&spec)?;
            match inner.state.graph.get(&file).and_then(|s| s.driver.as_ref()) {
                Some(Driver::IoUring(o)) => (o.path.clone(), o.direct, !read_only && !o.read_only),
                _ => return Err(invalid("its file must be an io_uring node")),
            }
        };
        let dirs = self.image_dirs.get().cloned().unwrap_or_default();
        // The headers, then the whole chain opened as the worker will.
        let (layers, top_size) = probe_blocking(move || {
            let layers = follow_header(std::path::Path::new(&path), &dirs)?;
            let mut chain = vec![ChainLayer {
                node: String::new(),
                format: LayerFormat::Qcow2,
                path: path.clone(),
                direct,
                no_backing: false,
            }];
            chain.extend(layers.iter().map(chain_layer));
            let size = probe_image(ImageProbe::new(chain, size, writable))?;
            Ok::<_, GraphError>((layers, size))
        })
        .await?;
        self.run_change(move |control| async move {
            let ticket = control.begin_change().await;
            let (next, added) = {
                let inner = control.lock();
                let (backing, add) = backing_nodes(&inner.state.graph, &spec.name, &layers)?;
                if let Some(Driver::Qcow2(q)) = &mut spec.driver {
                    q.backing = backing;
                }
                let mut next = inner.state.clone();
                let mut added = Vec::new();
                for (node, size) in add {
                    next.graph.add(node.clone())?;
                    next.sizes.insert(node.name.clone(), size);
                    added.push(node.name);
                }
                next.graph.add(spec.clone())?;
                let size = new_node_size(&next, &spec, Some(top_size))?;
                next.sizes.insert(spec.name.clone(), size);
                added.push(spec.name.clone());
                (next, added)
            };
            let inner = control.commit(&ticket, next).await?;
            for name in added {
                tracing::info!(node = %name, "node added (backing from the image header)");
                control.emit(EventKind::NodeAdded(name));
            }
            tracing::info!(node = %spec.name, driver = driver_name(&spec), "node added");
            Ok(node_info(&inner.state, &spec))
        })
        .await
    }
}

fn chain_layer(l: &HeaderLayer) -> ChainLayer {
    ChainLayer {
        node: String::new(),
        format: match l.format {
            Format::Qcow2 => LayerFormat::Qcow2,
            Format::Raw => LayerFormat::Raw,
        },
        path: l.path.to_string_lossy().into_owned(),
        direct: false,
        no_backing: false,
    }
}
