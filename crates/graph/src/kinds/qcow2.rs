//! `qcow2`: a qcow2 image in its `file` child, optionally over a `backing`
//! node, so that a graph is a tree: QEMU's `blockdev-add` with `file=` and
//! `backing=`.
//!
//! The backing file an image's header names is never opened from that
//! path: the backing node is named explicitly (or `no_backing` says to read
//! unallocated clusters as zeroes). Its size is the image's virtual size,
//! which the manager reads from the header when the node is added.
//!
//! A writable qcow2 node's metadata cache is one worker's, so one
//! connection holds it at a time ([`NodeKind::exclusive`]); a read-only one
//! (a base shared by several overlays) may be opened by many.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{NodeSpec, Qcow2Options};

use crate::error::GraphError;
use crate::fields::{validate_child, validate_sector_multiple};
use crate::kinds::{other_kind, Grow, NodeKind};
use crate::update::{cannot_change, same_child, same_size, Changes};

impl NodeKind for Qcow2Options {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    /// The file, then the backing node if there is one.
    fn children(&self) -> Vec<&str> {
        let mut c = vec![self.file.as_str()];
        if !self.backing.is_empty() {
            c.push(self.backing.as_str());
        }
        c
    }

    /// Writes go to the file only; the backing node is read.
    fn written_children(&self) -> Vec<&str> {
        vec![self.file.as_str()]
    }

    fn child_field(&self) -> &'static str {
        "node.qcow2.file"
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_only_field(&self) -> Option<&'static str> {
        Some("node.qcow2.read_only")
    }

    fn summary(&self) -> String {
        match self.backing.as_str() {
            "" => format!("qcow2 in {}", self.file),
            b => format!("qcow2 in {} over {b}", self.file),
        }
    }

    fn validate(&self, node: &str) -> Result<(), GraphError> {
        validate_child("node.qcow2.file", &self.file, node)?;
        validate_sector_multiple("node.qcow2.size", self.size)?;
        if self.backing.is_empty() {
            return Ok(());
        }
        validate_child("node.qcow2.backing", &self.backing, node)?;
        if self.backing == self.file {
            return Err(GraphError::invalid(
                "node.qcow2.backing",
                format!("must not be the image's own file node ({:?})", self.file),
            ));
        }
        if self.no_backing {
            return Err(GraphError::invalid(
                "node.qcow2.no_backing",
                "must not be set together with node.qcow2.backing",
            ));
        }
        Ok(())
    }

    /// Its size option once ResizeNode set it, else the virtual size the
    /// manager read from the image header (0 until then).
    fn size(&self, _child_size: u64, probed: Option<u64>) -> Result<u64, GraphError> {
        Ok(match self.size {
            0 => probed.unwrap_or(0),
            n => n,
        })
    }

    /// A writable image grows: the worker that opens it next grows the
    /// header to the new size.
    fn grow(&self, size: u64, _child_size: u64, at: &str) -> Result<Grow, GraphError> {
        if self.read_only {
            return Err(GraphError::precondition(
                "name",
                format!("qcow2 node {at} is read-only: it cannot grow"),
            ));
        }
        Ok(Grow::Options(Driver::Qcow2(Qcow2Options {
            size,
            ..self.clone()
        })))
    }

    /// A writable image's metadata is cached by the one worker that opened
    /// it.
    fn exclusive(&self) -> bool {
        !self.read_only
    }

    /// The read-only option changes; the file and backing nodes are fixed,
    /// the size is ResizeNode's.
    fn update(&self, new: &Driver) -> Result<Vec<String>, GraphError> {
        let Driver::Qcow2(b) = new else {
            return Err(other_kind(self, new));
        };
        same_child("node.qcow2.file", &self.file, &b.file)?;
        same_child("node.qcow2.backing", &self.backing, &b.backing)?;
        if self.no_backing != b.no_backing {
            return Err(cannot_change(
                "node.qcow2.no_backing",
                &format!("is {}, got {}", self.no_backing, b.no_backing),
            ));
        }
        same_size("node.qcow2.size", self.size, b.size)?;
        let mut changes = Changes::default();
        changes.flag("read-only", self.read_only, b.read_only);
        Ok(changes.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(file: &str, backing: &str) -> Qcow2Options {
        Qcow2Options {
            file: file.into(),
            backing: backing.into(),
            ..Default::default()
        }
    }

    #[test]
    fn children_are_the_file_then_the_backing_node() {
        assert_eq!(q("f", "").children(), ["f"]);
        assert_eq!(q("f", "b").children(), ["f", "b"]);
        assert_eq!(q("f", "b").summary(), "qcow2 in f over b");
        assert_eq!(q("f", "b").written_children(), ["f"]);
    }

    #[test]
    fn bad_children_are_refused_naming_the_field() {
        let field = |o: Qcow2Options| o.validate("top").unwrap_err().field();
        assert_eq!(field(q("", "")), Some("node.qcow2.file"));
        assert_eq!(field(q("top", "")), Some("node.qcow2.file"));
        assert_eq!(field(q("f", "top")), Some("node.qcow2.backing"));
        assert_eq!(field(q("f", "f")), Some("node.qcow2.backing"));
        assert_eq!(field(q("f", "bad name")), Some("node.qcow2.backing"));
        let both = Qcow2Options {
            no_backing: true,
            ..q("f", "b")
        };
        assert_eq!(field(both), Some("node.qcow2.no_backing"));
        q("f", "b").validate("top").unwrap();
    }

    #[test]
    fn only_read_only_changes() {
        let a = q("f", "b");
        let ro = Driver::Qcow2(Qcow2Options {
            read_only: true,
            ..a.clone()
        });
        assert_eq!(a.update(&ro).unwrap(), ["read-only on"]);
        let other = Driver::Qcow2(q("f", "c"));
        assert_eq!(
            a.update(&other).unwrap_err().field(),
            Some("node.qcow2.backing")
        );
    }

    #[test]
    fn a_writable_image_is_one_workers() {
        assert!(q("f", "").exclusive());
        let ro = Qcow2Options {
            read_only: true,
            ..q("f", "")
        };
        assert!(!ro.exclusive());
    }
}

/// The first writable qcow2 node in the graph rooted at `root`, if any:
/// its metadata cache is one worker's, so the export's queues stay on one
/// worker (no spreading, no splitting by MoveQueue).
pub fn writable_qcow2_in_graph<'a>(graph: &'a crate::Graph, root: &str) -> Option<&'a str> {
    let mut stack = vec![root];
    let mut steps = 0;
    while let Some(name) = stack.pop() {
        steps += 1;
        if steps > graph.len() + 1 {
            return None;
        }
        let spec = graph.get(name)?;
        if matches!(&spec.driver, Some(Driver::Qcow2(q)) if !q.read_only) {
            return Some(&spec.name);
        }
        stack.extend(graph.children_of(name));
    }
    None
}

/// The nodes of the graph rooted at `root` that its writes reach, and
/// those it only reads (a qcow2 node's backing chain).
fn written_and_read<'a>(
    graph: &'a crate::Graph,
    root: &'a str,
) -> (
    std::collections::BTreeSet<&'a str>,
    std::collections::BTreeSet<&'a str>,
) {
    let (mut written, mut read) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let mut stack = vec![(root, true)];
    let mut steps = 0;
    while let Some((name, writes)) = stack.pop() {
        steps += 1;
        if steps > 4 * graph.len() + 4 {
            break;
        }
        let Some(spec) = graph.get(name) else {
            continue;
        };
        if writes {
            written.insert(spec.name.as_str());
        } else {
            read.insert(spec.name.as_str());
        }
        let reached = crate::kinds::written_children(spec);
        for child in crate::kinds::children(spec) {
            stack.push((child, writes && reached.contains(&child)));
        }
    }
    (written, read)
}

/// Another export (than `except`) whose graph reads as a backing image a
/// node that the export of `root` would write, or writes a node it would
/// read: (that export, the node). Its reader's cache would go stale under
/// the writer. A writable export's node becomes an overlay's backing only
/// through SnapshotExport, which moves the export itself.
pub fn backing_conflict<'a>(
    graph: &'a crate::Graph,
    exports: &[&'a blkmesh_proto::v1::VhostUserBlkExport],
    root: &'a str,
    writable: bool,
    except: &str,
) -> Option<(&'a str, &'a str)> {
    let (written, read) = written_and_read(graph, root);
    for e in exports.iter().filter(|e| e.id != except) {
        let (their_written, their_read) = written_and_read(graph, &e.node);
        if writable {
            if let Some(n) = written.intersection(&their_read).next() {
                return Some((&e.id, n));
            }
        }
        if e.writable {
            if let Some(n) = read.intersection(&their_written).next() {
                return Some((&e.id, n));
            }
        }
    }
    None
}

/// How a layer of an image chain is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    Qcow2,
    Raw,
}

/// One layer of a qcow2 node's chain, as the graph names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// The node: a qcow2 node, or an io_uring node holding a raw image.
    pub node: String,
    pub format: LayerFormat,
    /// The file the image is in, and how it is opened.
    pub path: String,
    pub direct: bool,
    /// The qcow2 node reads without a backing image.
    pub no_backing: bool,
}

/// Most layers of a chain: blkmesh-image's limit, and a guard against a
/// loop in a hostile plan.
pub const MAX_CHAIN_LAYERS: usize = 16;

/// The chain of qcow2 node `top`, top first: each qcow2 node in its file
/// (an io_uring node), then its backing node, down to one without; `get`
/// looks nodes up. Errors name the field at fault.
pub fn chain<'a>(
    get: impl Fn(&str) -> Option<&'a NodeSpec>,
    top: &'a NodeSpec,
) -> Result<Vec<ChainLayer>, GraphError> {
    let mut out: Vec<ChainLayer> = Vec::new();
    let mut node = top;
    loop {
        if out.len() == MAX_CHAIN_LAYERS {
            return Err(GraphError::invalid(
                "node.qcow2.backing",
                format!(
                    "the chain of {:?} is deeper than {MAX_CHAIN_LAYERS}",
                    top.name
                ),
            ));
        }
        match &node.driver {
            Some(Driver::IoUring(o)) if !out.is_empty() => {
                out.push(ChainLayer {
                    node: node.name.clone(),
                    format: LayerFormat::Raw,
                    path: o.path.clone(),
                    direct: o.direct,
                    no_backing: false,
                });
                return Ok(out);
            }
            Some(Driver::Qcow2(q)) => {
                let file = match get(&q.file).and_then(|f| f.driver.as_ref()) {
                    Some(Driver::IoUring(o)) => o,
                    None => {
                        return Err(GraphError::invalid(
                            "node.qcow2.file",
                            format!("node {:?} names no node {:?}", node.name, q.file),
                        ))
                    }
                    Some(_) => {
                        return Err(GraphError::invalid(
                            "node.qcow2.file",
                            format!(
                            "the file of qcow2 node {:?} must be an io_uring node ({:?} is not)",
                            node.name, q.file
                        ),
                        ))
                    }
                };
                out.push(ChainLayer {
                    node: node.name.clone(),
                    format: LayerFormat::Qcow2,
                    path: file.path.clone(),
                    direct: file.direct,
                    no_backing: q.no_backing,
                });
                if q.backing.is_empty() {
                    return Ok(out);
                }
                node = get(&q.backing).ok_or_else(|| {
                    GraphError::invalid(
                        "node.qcow2.backing",
                        format!("node {:?} names no node {:?}", node.name, q.backing),
                    )
                })?;
            }
            _ => {
                return Err(GraphError::invalid(
                    "node.qcow2.backing",
                    format!(
                        "backing node {:?} must be an io_uring node (a raw image) or a qcow2 node",
                        node.name
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use blkmesh_proto::v1::{IoUringOptions, NodeSpec, NullOptions};

    fn file(name: &str, path: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: path.into(),
                ..Default::default()
            })),
        }
    }

    fn qcow2(name: &str, file: &str, backing: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: file.into(),
                backing: backing.into(),
                ..Default::default()
            })),
        }
    }

    fn chain_of(nodes: &[NodeSpec], top: &str) -> Result<Vec<ChainLayer>, GraphError> {
        let get = |n: &str| nodes.iter().find(|s| s.name == n);
        chain(get, get(top).unwrap())
    }

    #[test]
    fn a_chain_down_to_a_raw_base() {
        let nodes = [
            file("f-top", "/top"),
            file("f-mid", "/mid"),
            file("base", "/base"),
            qcow2("top", "f-top", "mid"),
            qcow2("mid", "f-mid", "base"),
        ];
        let got = chain_of(&nodes, "top").unwrap();
        let summary: Vec<(&str, LayerFormat, &str)> = got
            .iter()
            .map(|l| (l.node.as_str(), l.format, l.path.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("top", LayerFormat::Qcow2, "/top"),
                ("mid", LayerFormat::Qcow2, "/mid"),
                ("base", LayerFormat::Raw, "/base"),
            ]
        );
    }

    #[test]
    fn a_base_is_shared_by_overlays_but_never_written_through_another_parent() {
        use crate::{Graph, GraphError};
        let base = file("base", "/base");
        let shared = [
            base.clone(),
            file("f1", "/1"),
            file("f2", "/2"),
            qcow2("o1", "f1", "base"),
            qcow2("o2", "f2", "base"),
        ];
        let g = Graph::from_specs(shared.clone()).unwrap();
        // A third overlay, added later, too.
        let mut g2 = g.clone();
        g2.add(file("f3", "/3")).unwrap();
        g2.add(qcow2("o3", "f3", "base")).unwrap();
        // Writing the base through a raw window is refused, both ways.
        let window = NodeSpec {
            name: "w".into(),
            driver: Some(Driver::Raw(blkmesh_proto::v1::RawOptions {
                child: "base".into(),
                ..Default::default()
            })),
        };
        let e = g.clone().add(window.clone()).unwrap_err();
        assert!(matches!(e, GraphError::ChildTaken { .. }), "{e}");
        let mut specs = shared.to_vec();
        specs.push(window);
        let e = Graph::from_specs(specs).unwrap_err();
        assert!(matches!(e, GraphError::ChildTaken { .. }), "{e}");
        // An image file is one overlay's only.
        let e = g.clone().add(qcow2("o4", "f1", "")).unwrap_err();
        assert!(matches!(e, GraphError::ChildTaken { .. }), "{e}");
        // A backing loop is a cycle.
        let looped = [
            file("fa", "/a"),
            file("fb", "/b"),
            qcow2("a", "fa", "b"),
            qcow2("b", "fb", "a"),
        ];
        let e = Graph::from_specs(looped).unwrap_err();
        assert!(matches!(e, GraphError::Cycle { .. }), "{e}");
    }

    #[test]
    fn a_writable_image_keeps_its_exports_queues_on_one_worker() {
        use crate::export::check_new_export;
        use crate::Graph;
        let ro_top = NodeSpec {
            name: "ro".into(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: "f2".into(),
                read_only: true,
                ..Default::default()
            })),
        };
        let g = Graph::from_specs([
            file("f", "/f"),
            file("f2", "/f2"),
            qcow2("top", "f", ""),
            ro_top,
        ])
        .unwrap();
        assert_eq!(writable_qcow2_in_graph(&g, "top"), Some("top"));
        assert_eq!(writable_qcow2_in_graph(&g, "ro"), None);
        let export = |node: &str| blkmesh_proto::v1::VhostUserBlkExport {
            id: "e".into(),
            node: node.into(),
            socket: "/run/e.sock".into(),
            num_queues: 2,
            spread_queues: true,
            ..Default::default()
        };
        let e = check_new_export(&g, &[], &export("top")).unwrap_err();
        assert_eq!(e.field(), Some("export.spread_queues"));
        assert!(e.to_string().contains("metadata cache"), "{e}");
        check_new_export(&g, &[], &export("ro")).unwrap();
    }

    #[test]
    fn an_image_written_by_one_export_is_no_backing_of_another() {
        use crate::Graph;
        use blkmesh_proto::v1::VhostUserBlkExport;
        let g = Graph::from_specs([
            file("f-top", "/top"),
            file("f-ov", "/ov"),
            qcow2("top", "f-top", ""),
            qcow2("ov", "f-ov", "top"),
        ])
        .unwrap();
        let export = |id: &str, node: &str, writable: bool| VhostUserBlkExport {
            id: id.into(),
            node: node.into(),
            writable,
            ..Default::default()
        };
        let a = export("a", "top", true);
        // The overlay exported while the top is written elsewhere.
        let conflict = backing_conflict(&g, &[&a], "ov", false, "b");
        assert!(
            matches!(conflict, Some(("a", "top" | "f-top"))),
            "{conflict:?}"
        );
        // The top exported writable while the overlay reads it.
        let b = export("b", "ov", false);
        let conflict = backing_conflict(&g, &[&b], "top", true, "a");
        assert!(
            matches!(conflict, Some(("b", "top" | "f-top"))),
            "{conflict:?}"
        );
        // Read-only both: fine; and an export is never in conflict with itself.
        assert_eq!(backing_conflict(&g, &[&b], "top", false, "a"), None);
        assert_eq!(backing_conflict(&g, &[&a], "ov", true, "a"), None);
    }

    #[test]
    fn loops_missing_nodes_and_wrong_kinds_are_refused() {
        let looped = [
            file("fa", "/a"),
            file("fb", "/b"),
            qcow2("a", "fa", "b"),
            qcow2("b", "fb", "a"),
        ];
        let e = chain_of(&looped, "a").unwrap_err();
        assert!(e.to_string().contains("deeper than 16"), "{e}");
        let missing = [file("fa", "/a"), qcow2("a", "fa", "gone")];
        assert!(chain_of(&missing, "a")
            .unwrap_err()
            .to_string()
            .contains("\"gone\""));
        let null = NodeSpec {
            name: "n".into(),
            driver: Some(Driver::Null(NullOptions::default())),
        };
        let wrong_file = [null.clone(), qcow2("a", "n", "")];
        assert_eq!(
            chain_of(&wrong_file, "a").unwrap_err().field(),
            Some("node.qcow2.file")
        );
        let wrong_backing = [null, file("fa", "/a"), qcow2("a", "fa", "n")];
        assert_eq!(
            chain_of(&wrong_backing, "a").unwrap_err().field(),
            Some("node.qcow2.backing")
        );
    }
}
