//! Opening a `qcow2` node: its image over the file leaf the walk opened,
//! and its backing chain, every layer named by the plan.

use std::collections::HashMap;
use std::path::PathBuf;

use blkmesh_graph::kinds::qcow2::{chain, LayerFormat};
use blkmesh_image::{Format, Image, Layer, PreallocateMode, Source};
use blkmesh_proto::v1::{NodeSpec, Qcow2Options};

use crate::errno::{Errno, OpenError};
use crate::qcow2::{BackingLayer, Qcow2Layer};

/// A `qcow2` node met on the way down.
pub(super) struct Qcow2Mark<'a> {
    pub name: &'a str,
    pub opts: &'a Qcow2Options,
    /// Where its stage goes in the list.
    pub stage: usize,
    /// Its backing chain, top first (empty: none).
    pub backing: Vec<BackingLayer>,
}

/// Resolves the node's chain from the plan (its file must be an io_uring
/// node, which the walk opens next as the leaf).
pub(super) fn mark<'a>(
    nodes: &HashMap<&str, &'a NodeSpec>,
    spec: &'a NodeSpec,
    opts: &'a Qcow2Options,
    stage: usize,
) -> Result<Qcow2Mark<'a>, OpenError> {
    let name = spec.name.as_str();
    let layers = chain(|n| nodes.get(n).copied(), spec)
        .map_err(|e| OpenError::inval(format!("node {name}: {e}")))?;
    let backing = layers
        .into_iter()
        .skip(1)
        .map(|l| BackingLayer {
            format: match l.format {
                LayerFormat::Qcow2 => Format::Qcow2,
                LayerFormat::Raw => Format::Raw,
            },
            path: PathBuf::from(l.path),
            direct: l.direct,
            no_backing: l.no_backing,
        })
        .collect();
    Ok(Qcow2Mark {
        name,
        opts,
        stage,
        backing,
    })
}

/// Opens the image in `file` (the leaf's own descriptor, `path` for
/// messages) over the mark's backing chain.
pub(super) fn open(
    mark: Qcow2Mark<'_>,
    file: std::fs::File,
    path: &str,
    writable: bool,
    direct: bool,
) -> Result<Qcow2Layer, OpenError> {
    let header = file.try_clone().map_err(|e| {
        OpenError::new(
            Errno::of_io(&e),
            format!("node {}: dup of the image file: {e}", mark.name),
        )
    })?;
    let mut layers = vec![Layer {
        format: Format::Qcow2,
        source: Source::File(file, PathBuf::from(path)),
        writable,
        direct,
        no_backing: mark.opts.no_backing,
    }];
    layers.extend(mark.backing.iter().map(|b| b.layer(false)));
    let backed = layers.len() > 1;
    let image = blkmesh_image::open_chain(layers).map_err(|e| {
        let errno = Errno::new(e.errno()).unwrap_or(Errno::EINVAL);
        OpenError::new(errno, format!("node {}: {e}", mark.name))
    })?;
    grow(mark.name, &image, mark.opts.size, writable, backed)?;
    Ok(Qcow2Layer::new(mark.name, image, header, mark.backing))
}

/// Grows `image` to `size` (the node's size option, 0 = as it is) before
/// it serves: ResizeNode set a size the header does not say yet. With a
/// backing image, the new range is made to read as zeroes (else a larger
/// backing image would show through).
fn grow(
    node: &str,
    image: &Image,
    size: u64,
    writable: bool,
    backed: bool,
) -> Result<(), OpenError> {
    let now = image.size();
    if size == 0 || size == now {
        return Ok(());
    }
    if size < now {
        return Err(OpenError::inval(format!(
            "node {node}: size {size} is smaller than the image's {now}; qcow2 images do not shrink"
        )));
    }
    if !writable {
        return Err(OpenError::new(
            Errno::EROFS,
            format!("node {node}: the image is {now} bytes, the node {size}, and it is read-only"),
        ));
    }
    let mode = if backed {
        PreallocateMode::Zero
    } else {
        PreallocateMode::None
    };
    image
        .resize_grow(size, mode)
        .and_then(|()| image.flush())
        .map_err(|e| {
            OpenError::new(
                Errno::of_io(&e),
                format!("node {node}: growing to {size}: {e}"),
            )
        })?;
    tracing::info!(node, from = now, to = size, "qcow2 image grown");
    Ok(())
}
