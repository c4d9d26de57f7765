//! Following the backing file an image header names, for AddNode with
//! `backing_from_header`: only inside the directories the operator
//! allow-listed (`--image-dir`), only with the format the header names
//! (never probed: a guest can write any header into a raw disk), at most
//! [`MAX_CHAIN_DEPTH`] deep. What it finds becomes explicit read-only
//! nodes, so the graph still names every layer.

use std::path::{Path, PathBuf};

use blkmesh_graph::{Graph, GraphError};
use blkmesh_image::{info_as, Format, MAX_CHAIN_DEPTH};
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{IoUringOptions, NodeSpec, Qcow2Options};

/// A backing layer the headers named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderLayer {
    /// Canonical (symlinks resolved).
    pub path: PathBuf,
    pub format: Format,
    /// Virtual size.
    pub size: u64,
    /// The file's length (its io_uring node's size).
    pub file_len: u64,
}

fn refuse(problem: String) -> GraphError {
    GraphError::invalid("backing_from_header", problem)
}

/// `named` (as a header of the image at `image` names it) resolved and
/// checked against `dirs` (canonical).
fn resolve(image: &Path, named: &str, dirs: &[PathBuf]) -> Result<PathBuf, GraphError> {
    let joined = match image.parent() {
        Some(dir) if !named.starts_with('/') => dir.join(named),
        _ => PathBuf::from(named),
    };
    let path = joined.canonicalize().map_err(|e| {
        refuse(format!(
            "{}: its backing file {named:?} ({}): {e}",
            image.display(),
            joined.display()
        ))
    })?;
    if !dirs.iter().any(|d| path.starts_with(d)) {
        return Err(refuse(format!(
            "{}: its backing file {} is outside the image directories the manager \
             allows (--image-dir{})",
            image.display(),
            path.display(),
            if dirs.is_empty() { ": none given" } else { "" }
        )));
    }
    Ok(path)
}

/// The backing chain the header of the qcow2 image at `top` names, top
/// first, every file inside one of `dirs`.
pub(crate) fn follow_header(top: &Path, dirs: &[PathBuf]) -> Result<Vec<HeaderLayer>, GraphError> {
    let dirs: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
    let mut out: Vec<HeaderLayer> = Vec::new();
    let mut at = (top.to_path_buf(), Format::Qcow2);
    loop {
        let info = info_as(&at.0, at.1).map_err(|e| refuse(e.to_string()))?;
        let Some(named) = info.backing_file.filter(|_| at.1 == Format::Qcow2) else {
            break;
        };
        if out.len() + 2 > MAX_CHAIN_DEPTH {
            return Err(refuse(format!(
                "{}: the chain is deeper than {MAX_CHAIN_DEPTH} layers (a loop?)",
                top.display()
            )));
        }
        let path = resolve(&at.0, &named, &dirs)?;
        let format = match info.backing_format.as_deref() {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            other => {
                return Err(refuse(format!(
                    "{}: the header names the backing format {other:?}; blkmesh follows \
                     only a named qcow2 or raw backing file (name the backing node instead)",
                    at.0.display()
                )))
            }
        };
        let size = info_as(&path, format)
            .map_err(|e| refuse(e.to_string()))?
            .virtual_size;
        let file_len = std::fs::metadata(&path)
            .map_err(|e| refuse(format!("{}: {e}", path.display())))?
            .len();
        out.push(HeaderLayer {
            path: path.clone(),
            format,
            size,
            file_len,
        });
        at = (path, format);
    }
    Ok(out)
}

/// The node of `graph` that already holds `layer`'s file as that format:
/// an io_uring node of that path (raw), or a qcow2 node over one (qcow2).
fn existing<'a>(graph: &'a Graph, layer: &HeaderLayer) -> Option<&'a str> {
    let path = layer.path.to_str()?;
    let file_of = |name: &str| match graph.get(name).and_then(|s| s.driver.as_ref()) {
        Some(Driver::IoUring(o)) => o.path == path,
        _ => false,
    };
    graph.iter().find_map(|spec| {
        let found = match (&spec.driver, layer.format) {
            (Some(Driver::IoUring(o)), Format::Raw) => o.path == path,
            (Some(Driver::Qcow2(q)), Format::Qcow2) => file_of(&q.file),
            _ => false,
        };
        found.then_some(spec.name.as_str())
    })
}

/// The nodes that hold the `layers` under qcow2 node `top`, as specs to
/// add with their sizes, deepest first (each one's children before it),
/// and the name of `top`'s backing node. A layer some node already holds
/// ends the walk: that node brings its own chain.
pub(crate) fn backing_nodes(
    graph: &Graph,
    top: &str,
    layers: &[HeaderLayer],
) -> Result<(String, Vec<(NodeSpec, u64)>), GraphError> {
    let mut names = Vec::new();
    let mut add: Vec<(NodeSpec, u64)> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if let Some(name) = existing(graph, layer) {
            names.push(name.to_string());
            break;
        }
        let name = format!("{top}-b{}", i + 1);
        blkmesh_graph::validate_name("node.name", &format!("{name}-file"))?;
        let path = layer
            .path
            .to_str()
            .ok_or_else(|| refuse(format!("{} is not UTF-8", layer.path.display())))?
            .to_string();
        let file = NodeSpec {
            name: match layer.format {
                Format::Raw => name.clone(),
                Format::Qcow2 => format!("{name}-file"),
            },
            driver: Some(Driver::IoUring(IoUringOptions {
                path,
                read_only: true,
                ..Default::default()
            })),
        };
        add.push((file, layer.file_len));
        names.push(name);
    }
    // The qcow2 layers, deepest first, each over the next name down.
    let mut specs: Vec<(NodeSpec, u64)> = Vec::new();
    for (i, layer) in layers.iter().enumerate().take(add.len()).rev() {
        if layer.format == Format::Qcow2 {
            let name = names[i].clone();
            specs.push((
                NodeSpec {
                    name: name.clone(),
                    driver: Some(Driver::Qcow2(Qcow2Options {
                        file: format!("{name}-file"),
                        backing: names.get(i + 1).cloned().unwrap_or_default(),
                        read_only: true,
                        ..Default::default()
                    })),
                },
                layer.size,
            ));
        }
    }
    let mut ordered = add;
    ordered.extend(specs);
    let backing = names.first().cloned().unwrap_or_default();
    Ok((backing, ordered))
}

#[cfg(test)]
mod tests;
