//! The set of nodes and the child relation between them.

use std::collections::{BTreeMap, BTreeSet};

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NodeSpec;

use crate::error::{GraphError, ObjectKind};
use crate::kinds::throttle::normalize_throttle_limits;
use crate::kinds::{child_field, children, own_read_only, written_children};
use crate::validate::validate_node;

/// A set of uniquely named, validated nodes forming a forest: every child
/// exists, no node has more than one parent, and there are no cycles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    nodes: BTreeMap<String, NodeSpec>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a graph from untrusted specs (a persisted state, an export
    /// plan), checking every rule [`Graph::add`] checks, in any order, plus
    /// cycles.
    pub fn from_specs(specs: impl IntoIterator<Item = NodeSpec>) -> Result<Self, GraphError> {
        let mut nodes = BTreeMap::new();
        for spec in specs {
            validate_node(&spec)?;
            if nodes.contains_key(&spec.name) {
                return Err(GraphError::AlreadyExists {
                    field: "node.name",
                    kind: ObjectKind::Node,
                    name: spec.name,
                });
            }
            nodes.insert(spec.name.clone(), spec);
        }
        let graph = Graph { nodes };
        for spec in graph.nodes.values() {
            for child in children(spec) {
                if !graph.nodes.contains_key(child) {
                    return Err(GraphError::NotFound {
                        field: child_field(spec),
                        kind: ObjectKind::Node,
                        name: child.to_string(),
                    });
                }
            }
        }
        for spec in graph.nodes.values() {
            graph.check_parents(spec, |user| user != spec.name)?;
            graph.check_throttle_group(spec)?;
        }
        graph.check_acyclic()?;
        Ok(graph)
    }

    /// Adds a validated node. Its children must exist, and those its writes
    /// reach must not be another node's child (a backing node may be shared
    /// by several qcow2 nodes, which only read it).
    pub fn add(&mut self, spec: NodeSpec) -> Result<(), GraphError> {
        self.check_add(&spec)?;
        self.nodes.insert(spec.name.clone(), spec);
        Ok(())
    }

    /// The parent rule for `spec`'s children, against the other nodes
    /// (`other` says which users count): a child that `spec` writes has no
    /// other parent; a child `spec` only reads (a qcow2 backing node) has
    /// no parent that writes it. So a base image may be shared by many
    /// overlays, and nothing written is ever someone's backing.
    fn check_parents(
        &self,
        spec: &NodeSpec,
        other: impl Fn(&str) -> bool,
    ) -> Result<(), GraphError> {
        let written = written_children(spec);
        for child in children(spec) {
            let writes = written.contains(&child);
            for user in self.users_of(child).into_iter().filter(|u| other(u)) {
                let Some(user_spec) = self.nodes.get(user) else {
                    continue;
                };
                let user_writes = written_children(user_spec).contains(&child);
                if writes || user_writes {
                    return Err(GraphError::ChildTaken {
                        field: child_field(spec),
                        child: child.to_string(),
                        parent: user.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Fails on a cycle of child references (depth-first, every node).
    fn check_acyclic(&self) -> Result<(), GraphError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
        for start in self.nodes.keys() {
            if marks.contains_key(start.as_str()) {
                continue;
            }
            // (node, index of the next child to visit)
            let mut stack: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
            marks.insert(start, Mark::Open);
            while let Some((name, next)) = stack.last().copied() {
                let kids = self.children_of(name);
                let Some(&child) = kids.get(next) else {
                    marks.insert(name, Mark::Done);
                    stack.pop();
                    continue;
                };
                if let Some(top) = stack.last_mut() {
                    top.1 += 1;
                }
                match marks.get(child) {
                    Some(Mark::Open) => {
                        let from = stack.iter().position(|(n, _)| *n == child).unwrap_or(0);
                        let mut path: Vec<String> =
                            stack[from..].iter().map(|(n, _)| n.to_string()).collect();
                        path.push(child.to_string());
                        let field = self.nodes.get(name).map_or("node", child_field);
                        return Err(GraphError::Cycle { field, path });
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(child, Mark::Open);
                        stack.push((child, 0));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that a throttle node in a group carries the same limits as
    /// every other node of that group (absent buckets count as unlimited).
    /// Other nodes, and throttle nodes without a group, always pass.
    pub fn check_throttle_group(&self, spec: &NodeSpec) -> Result<(), GraphError> {
        let Some(Driver::Throttle(o)) = &spec.driver else {
            return Ok(());
        };
        if o.group.is_empty() {
            return Ok(());
        }
        let mine = normalize_throttle_limits(&o.limits.unwrap_or_default());
        for other in self.throttle_group(&o.group) {
            if other.name == spec.name {
                continue;
            }
            let Some(Driver::Throttle(theirs)) = &other.driver else {
                continue;
            };
            if normalize_throttle_limits(&theirs.limits.unwrap_or_default()) != mine {
                return Err(GraphError::precondition(
                    "node.throttle.limits",
                    format!(
                        "node {:?} has other limits than node {:?} of throttle group {:?}; \
                         all nodes of a group must carry identical limits",
                        spec.name, other.name, o.group
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The throttle nodes of group `group`, by name.
    pub fn throttle_group<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a NodeSpec> + 'a {
        self.nodes.values().filter(move |spec| {
            matches!(&spec.driver, Some(Driver::Throttle(o)) if !group.is_empty() && o.group == group)
        })
    }

    /// Checks what [`Graph::add`] would check, without adding.
    pub fn check_add(&self, spec: &NodeSpec) -> Result<(), GraphError> {
        validate_node(spec)?;
        if self.nodes.contains_key(&spec.name) {
            return Err(GraphError::AlreadyExists {
                field: "node.name",
                kind: ObjectKind::Node,
                name: spec.name.clone(),
            });
        }
        for child in children(spec) {
            if !self.nodes.contains_key(child) {
                return Err(GraphError::NotFound {
                    field: child_field(spec),
                    kind: ObjectKind::Node,
                    name: child.to_string(),
                });
            }
        }
        self.check_parents(spec, |_| true)?;
        self.check_throttle_group(spec)
    }

    /// Removes a node that no other node uses, returning its spec.
    pub fn remove(&mut self, name: &str) -> Result<NodeSpec, GraphError> {
        if !self.nodes.contains_key(name) {
            return Err(GraphError::NotFound {
                field: "name",
                kind: ObjectKind::Node,
                name: name.to_string(),
            });
        }
        let users = self.users_of(name);
        if !users.is_empty() {
            return Err(GraphError::InUse {
                kind: ObjectKind::Node,
                name: name.to_string(),
                users: users.iter().map(|u| format!("node {u:?}")).collect(),
            });
        }
        self.nodes.remove(name).ok_or_else(|| GraphError::NotFound {
            field: "name",
            kind: ObjectKind::Node,
            name: name.to_string(),
        })
    }

    /// The node called `name`.
    pub fn get(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.get(name)
    }

    /// Whether a node called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// All nodes, by name.
    pub fn iter(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.values()
    }

    /// The children of `name` (empty for a leaf or an unknown node).
    pub fn children_of(&self, name: &str) -> Vec<&str> {
        self.nodes.get(name).map(children).unwrap_or_default()
    }

    /// The nodes that have `name` as a child, by name.
    pub fn users_of(&self, name: &str) -> Vec<&str> {
        self.nodes
            .values()
            .filter(|spec| children(spec).contains(&name))
            .map(|spec| spec.name.as_str())
            .collect()
    }

    /// `root` and all its descendants, root first (depth-first pre-order).
    pub fn subtree(&self, root: &str) -> Result<Vec<NodeSpec>, GraphError> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![(root.to_string(), "node")];
        while let Some((name, field)) = stack.pop() {
            let spec = self.nodes.get(&name).ok_or_else(|| GraphError::NotFound {
                field,
                kind: ObjectKind::Node,
                name: name.clone(),
            })?;
            if !seen.insert(name.clone()) {
                return Err(GraphError::Cycle {
                    field: child_field(spec),
                    path: vec![root.to_string(), name],
                });
            }
            let field = child_field(spec);
            for child in children(spec).into_iter().rev() {
                stack.push((child.to_string(), field));
            }
            out.push(spec.clone());
        }
        Ok(out)
    }

    /// Whether `name` refuses writes: its own option, or that of any
    /// descendant writes reach (a qcow2 node's backing node is only read).
    pub fn is_read_only(&self, name: &str) -> Result<bool, GraphError> {
        // Every name below exists and there is no cycle.
        self.subtree(name)?;
        let mut stack = vec![name];
        while let Some(n) = stack.pop() {
            let Some(spec) = self.nodes.get(n) else {
                continue;
            };
            if own_read_only(spec) {
                return Ok(true);
            }
            stack.extend(written_children(spec));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::driver_name;
    use crate::ErrorClass;
    use blkmesh_proto::v1::{
        Bucket, FaultInjectionOptions, IoUringOptions, NullOptions, NvmeIoUringOptions, RawOptions,
        ThrottleLimits, ThrottleOptions, VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions,
    };

    fn null(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Null(NullOptions {
                size: 1 << 20,
                latency_ns: 0,
            })),
        }
    }

    fn file(name: &str, read_only: bool) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: "/dev/null".into(),
                direct: false,
                read_only,
            })),
        }
    }

    fn raw(name: &str, child: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Raw(RawOptions {
                child: child.into(),
                offset: 0,
                size: 0,
            })),
        }
    }

    fn names(specs: &[NodeSpec]) -> Vec<&str> {
        specs.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn add_and_get() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        assert!(g.contains("a"));
        assert_eq!(g.get("a"), Some(&null("a")));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn rejects_duplicate_node_name() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        let e = g.add(null("a")).unwrap_err();
        assert_eq!(e.class(), ErrorClass::AlreadyExists);
        assert_eq!(e.field(), Some("node.name"));
    }

    #[test]
    fn rejects_invalid_node_on_add() {
        let mut g = Graph::new();
        let e = g.add(null("bad name")).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
    }

    #[test]
    fn rejects_unknown_child() {
        let mut g = Graph::new();
        let e = g.add(raw("r", "missing")).unwrap_err();
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(e.to_string(), "node.raw.child: node \"missing\" not found");
    }

    #[test]
    fn rejects_second_parent() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(raw("r1", "a")).unwrap();
        let e = g.add(raw("r2", "a")).unwrap_err();
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
        assert!(e.to_string().contains("\"r1\""), "{e}");
    }

    #[test]
    fn children_and_users() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(raw("r", "a")).unwrap();
        assert_eq!(g.children_of("r"), vec!["a"]);
        assert!(g.children_of("a").is_empty());
        assert_eq!(g.users_of("a"), vec!["r"]);
        assert!(g.users_of("r").is_empty());
    }

    #[test]
    fn rejects_removing_used_node() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(raw("r", "a")).unwrap();
        let e = g.remove("a").unwrap_err();
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
        assert_eq!(e.to_string(), "node \"a\" is in use by node \"r\"");
        g.remove("r").unwrap();
        g.remove("a").unwrap();
        assert!(g.is_empty());
    }

    #[test]
    fn rejects_removing_unknown_node() {
        let mut g = Graph::new();
        assert_eq!(g.remove("x").unwrap_err().class(), ErrorClass::NotFound);
    }

    #[test]
    fn subtree_is_root_first() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(raw("r1", "a")).unwrap();
        g.add(raw("r2", "r1")).unwrap();
        g.add(null("other")).unwrap();
        assert_eq!(names(&g.subtree("r2").unwrap()), vec!["r2", "r1", "a"]);
        assert_eq!(names(&g.subtree("a").unwrap()), vec!["a"]);
        assert_eq!(g.subtree("nope").unwrap_err().class(), ErrorClass::NotFound);
    }

    #[test]
    fn read_only_is_inherited_from_child() {
        let mut g = Graph::new();
        g.add(file("ro", true)).unwrap();
        g.add(file("rw", false)).unwrap();
        g.add(raw("over-ro", "ro")).unwrap();
        g.add(raw("over-rw", "rw")).unwrap();
        g.add(null("n")).unwrap();
        assert!(g.is_read_only("ro").unwrap());
        assert!(g.is_read_only("over-ro").unwrap());
        assert!(!g.is_read_only("over-rw").unwrap());
        assert!(!g.is_read_only("n").unwrap());
    }

    #[test]
    fn from_specs_accepts_any_order() {
        let g = Graph::from_specs([raw("r2", "r1"), null("a"), raw("r1", "a")]).unwrap();
        assert_eq!(names(&g.subtree("r2").unwrap()), vec!["r2", "r1", "a"]);
    }

    #[test]
    fn from_specs_rejects_cycle() {
        let e = Graph::from_specs([raw("x", "y"), raw("y", "x")]).unwrap_err();
        assert!(matches!(e, GraphError::Cycle { .. }), "{e:?}");
        assert!(e.to_string().contains("cycle"), "{e}");
    }

    #[test]
    fn from_specs_rejects_unknown_child() {
        let e = Graph::from_specs([raw("x", "y")]).unwrap_err();
        assert_eq!(e.class(), ErrorClass::NotFound);
    }

    #[test]
    fn from_specs_rejects_duplicate_names() {
        let e = Graph::from_specs([null("a"), null("a")]).unwrap_err();
        assert_eq!(e.class(), ErrorClass::AlreadyExists);
    }

    #[test]
    fn from_specs_rejects_shared_child() {
        let e = Graph::from_specs([null("a"), raw("r1", "a"), raw("r2", "a")]).unwrap_err();
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
    }

    #[test]
    fn from_specs_rejects_invalid_spec() {
        let e = Graph::from_specs([NodeSpec {
            name: "x".into(),
            driver: None,
        }])
        .unwrap_err();
        assert_eq!(e.field(), Some("node.driver"));
    }

    fn throttle(name: &str, child: &str, group: &str, iops: u64) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Throttle(ThrottleOptions {
                child: child.into(),
                limits: Some(ThrottleLimits {
                    iops_total: Some(Bucket {
                        rate: iops,
                        burst: 0,
                    }),
                    ..Default::default()
                }),
                group: group.into(),
            })),
        }
    }

    fn faults(name: &str, child: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                child: child.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn filters_have_their_child() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(throttle("t", "a", "", 10)).unwrap();
        g.add(faults("f", "t")).unwrap();
        assert_eq!(g.children_of("t"), vec!["a"]);
        assert_eq!(g.children_of("f"), vec!["t"]);
        assert_eq!(g.users_of("a"), vec!["t"]);
        assert_eq!(names(&g.subtree("f").unwrap()), vec!["f", "t", "a"]);
        assert_eq!(driver_name(g.get("t").unwrap()), "throttle");
        assert_eq!(driver_name(g.get("f").unwrap()), "fault_injection");
    }

    #[test]
    fn rejects_filter_over_unknown_child() {
        let g = Graph::new();
        let e = g.check_add(&throttle("t", "missing", "", 10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "node.throttle.child: node \"missing\" not found"
        );
        let e = g.check_add(&faults("f", "missing")).unwrap_err();
        assert_eq!(e.field(), Some("node.fault_injection.child"));
    }

    #[test]
    fn rejects_filter_over_taken_child() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(raw("r", "a")).unwrap();
        let e = g.add(throttle("t", "a", "", 10)).unwrap_err();
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
        assert_eq!(e.field(), Some("node.throttle.child"));
    }

    #[test]
    fn rejects_removing_child_of_filter() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(faults("f", "a")).unwrap();
        let e = g.remove("a").unwrap_err();
        assert_eq!(e.to_string(), "node \"a\" is in use by node \"f\"");
    }

    #[test]
    fn new_protocol_leaves_carry_their_read_only_option() {
        let mut g = Graph::new();
        g.add(NodeSpec {
            name: "nvme".into(),
            driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions {
                path: "/dev/ng0n1".into(),
                read_only: true,
            })),
        })
        .unwrap();
        g.add(NodeSpec {
            name: "vu".into(),
            driver: Some(Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                path: "/run/vu.sock".into(),
                read_only: false,
            })),
        })
        .unwrap();
        g.add(NodeSpec {
            name: "vdpa".into(),
            driver: Some(Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
                path: "/dev/vhost-vdpa-0".into(),
                read_only: true,
            })),
        })
        .unwrap();
        assert!(g.is_read_only("nvme").unwrap());
        assert!(!g.is_read_only("vu").unwrap());
        assert!(g.is_read_only("vdpa").unwrap());
        assert!(g.children_of("nvme").is_empty());
        assert_eq!(driver_name(g.get("vu").unwrap()), "virtio_blk_vhost_user");
    }

    #[test]
    fn read_only_is_inherited_through_filters() {
        let mut g = Graph::new();
        g.add(file("ro", true)).unwrap();
        g.add(throttle("t", "ro", "", 10)).unwrap();
        g.add(faults("f", "t")).unwrap();
        g.add(file("rw", false)).unwrap();
        g.add(faults("f2", "rw")).unwrap();
        assert!(g.is_read_only("t").unwrap());
        assert!(g.is_read_only("f").unwrap());
        assert!(!g.is_read_only("f2").unwrap());
    }

    #[test]
    fn throttle_group_members_must_share_limits() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(null("b")).unwrap();
        g.add(null("c")).unwrap();
        g.add(throttle("t1", "a", "g", 100)).unwrap();
        g.add(throttle("t2", "b", "g", 100)).unwrap();
        let e = g.add(throttle("t3", "c", "g", 200)).unwrap_err();
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
        assert_eq!(e.field(), Some("node.throttle.limits"));
        let msg = e.to_string();
        assert!(
            msg.contains("\"g\"") && msg.contains("\"t1\"") && msg.contains("\"t3\""),
            "{msg}"
        );
        // Other groups and ungrouped nodes are independent.
        g.add(throttle("t3", "c", "h", 200)).unwrap();
        assert_eq!(
            names(&g.throttle_group("g").cloned().collect::<Vec<_>>()),
            ["t1", "t2"]
        );
    }

    #[test]
    fn throttle_group_ignores_absent_versus_zero_buckets() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(null("b")).unwrap();
        g.add(throttle("t1", "a", "g", 100)).unwrap();
        let mut t2 = throttle("t2", "b", "g", 100);
        if let Some(Driver::Throttle(o)) = &mut t2.driver {
            if let Some(l) = &mut o.limits {
                l.bps_read = Some(Bucket { rate: 0, burst: 0 });
            }
        }
        g.add(t2).unwrap();
    }

    #[test]
    fn ungrouped_throttles_may_differ() {
        let mut g = Graph::new();
        g.add(null("a")).unwrap();
        g.add(null("b")).unwrap();
        g.add(throttle("t1", "a", "", 100)).unwrap();
        g.add(throttle("t2", "b", "", 200)).unwrap();
    }

    #[test]
    fn from_specs_rejects_throttle_group_mismatch() {
        let e = Graph::from_specs([
            null("a"),
            null("b"),
            throttle("t1", "a", "g", 1),
            throttle("t2", "b", "g", 2),
        ])
        .unwrap_err();
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
    }

    #[test]
    fn from_specs_reports_filter_cycle_on_its_field() {
        let e = Graph::from_specs([throttle("x", "y", "", 1), faults("y", "x")]).unwrap_err();
        assert!(matches!(e, GraphError::Cycle { .. }), "{e:?}");
        assert!(
            matches!(
                e.field(),
                Some("node.throttle.child" | "node.fault_injection.child")
            ),
            "{e}"
        );
    }
}
