//! The image checks of AddNode: a qcow2 node's image (and its backing
//! chain, as the graph names it) must open, and its virtual size is the
//! node's. A damaged or hostile image is refused here, naming the file and
//! what is wrong, before any worker opens it.

use blkmesh_graph::kinds::qcow2::{chain, ChainLayer, LayerFormat};
use blkmesh_graph::{Graph, GraphError};
use blkmesh_image::{open_chain, Format, Layer, Source};
use blkmesh_proto::v1::{node_spec::Driver, NodeSpec};

/// What to open for a qcow2 node: its chain, and the size it asks for (0:
/// the header's).
pub(crate) struct ImageProbe {
    layers: Vec<ChainLayer>,
    size: u64,
    /// The node writes its image: one left dirty or marked corrupt is
    /// refused (it opens read-only only).
    writable: bool,
}

impl ImageProbe {
    /// The chain `layers` (top first), the top asking for `size`.
    pub(crate) fn new(layers: Vec<ChainLayer>, size: u64, writable: bool) -> ImageProbe {
        ImageProbe {
            layers,
            size,
            writable,
        }
    }
}

/// The chain to open for node `spec` if it is a qcow2 node (its children
/// looked up in `graph`), else `None`.
pub(crate) fn image_chain(
    graph: &Graph,
    spec: &NodeSpec,
) -> Result<Option<ImageProbe>, GraphError> {
    match &spec.driver {
        Some(Driver::Qcow2(q)) => {
            let file_read_only = match graph.get(&q.file).and_then(|f| f.driver.as_ref()) {
                Some(Driver::IoUring(o)) => o.read_only,
                _ => true,
            };
            Ok(Some(ImageProbe {
                layers: chain(|n| graph.get(n), spec)?,
                size: q.size,
                writable: !q.read_only && !file_read_only,
            }))
        }
        _ => Ok(None),
    }
}

/// Opens the chain read-only and returns the top image's virtual size;
/// a size option smaller than it is refused (images do not shrink).
pub(crate) fn probe_image(probe: ImageProbe) -> Result<u64, GraphError> {
    let ImageProbe {
        layers,
        size,
        writable,
    } = probe;
    if let (true, Some(top)) = (writable, layers.first()) {
        blkmesh_image::check_writable(std::path::Path::new(&top.path)).map_err(|e| {
            GraphError::invalid("node.qcow2.file", format!("cannot write the image: {e}"))
        })?;
    }
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
    let header = image.size();
    if size != 0 && size < header {
        return Err(GraphError::invalid(
            "node.qcow2.size",
            format!(
                "{size} is smaller than the image's virtual size {header}; images do not shrink"
            ),
        ));
    }
    Ok(header)
}
