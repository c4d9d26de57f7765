//! The image checks of AddNode: a qcow2 node's image (and its backing
//! chain, as the graph names it) must open, and its virtual size is the
//! node's. A damaged or hostile image is refused here, naming the file and
//! what is wrong, before any worker opens it.

use blkmesh_graph::kinds::qcow2::{chain, ChainLayer, LayerFormat};
use blkmesh_graph::{Graph, GraphError};
use blkmesh_image::{open_chain, Format, Layer, Source};
use blkmesh_proto::v1::{node_spec::Driver, NodeSpec};

/// The chain to open for node `spec` if it is a qcow2 node (its children
/// looked up in `graph`), else `None`.
pub(crate) fn image_chain(
    graph: &Graph,
    spec: &NodeSpec,
) -> Result<Option<Vec<ChainLayer>>, GraphError> {
    match &spec.driver {
        Some(Driver::Qcow2(_)) => chain(|n| graph.get(n), spec).map(Some),
        _ => Ok(None),
    }
}

/// Opens the chain read-only and returns the top image's virtual size.
pub(crate) fn probe_image(layers: Vec<ChainLayer>) -> Result<u64, GraphError> {
    let layers = layers
        .into_iter()
        .map(|l| Layer {
            format: match l.format {
                LayerFormat::Qcow2 => Format::Qcow2,
                LayerFormat::Raw => Format::Raw,
            },
            source: Source::Path(l.path.into()),
            writable: false,
            direct: false,
            no_backing: l.no_backing,
        })
        .collect();
    let image = open_chain(layers).map_err(|e| {
        GraphError::invalid("node.qcow2.file", format!("cannot open the image: {e}"))
    })?;
    Ok(image.size())
}
