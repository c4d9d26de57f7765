//! `node ...`: adds nodes, changes them in place (fetch, edit, update),
//! resizes, moves, lists and removes them.

mod args;

pub(crate) use args::NodeCmd;

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{
    AddNodeRequest, FaultInjectionOptions, GetNodeRequest, IoUringOptions, ListNodesRequest,
    MoveNodeRequest, NodeInfo, NodeSpec, NullOptions, NvmeIoUringOptions, Qcow2Options, RawOptions,
    RemoveNodeRequest, ResizeNodeRequest, ThrottleOptions, UpdateNodeRequest,
    VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions, ZonedOptions,
};

use crate::failure::Failure;
use crate::view::Output;

pub(crate) async fn node(
    cmd: NodeCmd,
    channel: ManagerChannel,
    out: Output,
) -> Result<(), Failure> {
    let mut client = NodeServiceClient::new(channel.clone());
    let mut from_header = false;
    let spec = match cmd {
        NodeCmd::AddIoUring {
            name,
            path,
            direct,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::IoUring(IoUringOptions {
                path,
                direct,
                read_only,
            })),
        },
        NodeCmd::AddNull {
            name,
            size,
            latency_us,
        } => NodeSpec {
            name,
            driver: Some(Driver::Null(NullOptions {
                size,
                latency_ns: latency_us.checked_mul(1000).ok_or_else(|| Failure {
                    code: "INVALID_ARGUMENT",
                    message: format!("--latency-us {latency_us} is too large"),
                })?,
            })),
        },
        NodeCmd::AddRaw {
            name,
            child,
            offset,
            size,
        } => NodeSpec {
            name,
            driver: Some(Driver::Raw(RawOptions {
                child,
                offset,
                size,
            })),
        },
        NodeCmd::AddQcow2 {
            name,
            file,
            backing,
            backing_from_header,
            no_backing,
            read_only,
        } => {
            from_header = backing_from_header;
            NodeSpec {
                name,
                driver: Some(Driver::Qcow2(Qcow2Options {
                    file,
                    backing: backing.unwrap_or_default(),
                    no_backing,
                    read_only,
                    size: 0,
                })),
            }
        }
        NodeCmd::AddNvmeIoUring {
            name,
            path,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions { path, read_only })),
        },
        NodeCmd::AddVhostUser {
            name,
            path,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                path,
                read_only,
            })),
        },
        NodeCmd::AddVdpa {
            name,
            path,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
                path,
                read_only,
            })),
        },
        NodeCmd::AddThrottle {
            name,
            child,
            group,
            limits,
        } => NodeSpec {
            name,
            driver: Some(Driver::Throttle(ThrottleOptions {
                child,
                limits: Some(limits.limits()),
                group,
            })),
        },
        NodeCmd::AddFaultInjection {
            name,
            child,
            rules,
            knobs,
        } => {
            let mut o = FaultInjectionOptions {
                child,
                rules,
                ..Default::default()
            };
            knobs.apply(&mut o);
            NodeSpec {
                name,
                driver: Some(Driver::FaultInjection(o)),
            }
        }
        NodeCmd::AddZoned {
            name,
            child,
            zone_size,
            zone_capacity,
            max_open,
            max_active,
            metadata,
        } => NodeSpec {
            name,
            driver: Some(Driver::Zoned(ZonedOptions {
                child,
                zone_size,
                zone_capacity,
                max_open_zones: max_open,
                max_active_zones: max_active,
                metadata_path: metadata,
            })),
        },
        NodeCmd::Resize { name, size } => {
            let node = client
                .resize_node(ResizeNodeRequest { name, size })
                .await?
                .into_inner()
                .node
                .unwrap_or_default();
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetThrottle { name, limits } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::Throttle(o)) => {
                    o.limits = Some(limits.limits());
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-throttle", "throttle nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetFaults {
            name,
            rules,
            clear_rules,
            knobs,
        } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::FaultInjection(o)) => {
                    if clear_rules {
                        o.rules.clear();
                    } else if !rules.is_empty() {
                        o.rules = rules;
                    }
                    knobs.apply(o);
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-faults", "fault-injection nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetReadOnly { name, value } => {
            let node = modify(&mut client, name, |spec| {
                match &mut spec.driver {
                    Some(Driver::IoUring(o)) => o.read_only = value,
                    Some(Driver::NvmeIoUring(o)) => o.read_only = value,
                    Some(Driver::VirtioBlkVhostUser(o)) => o.read_only = value,
                    Some(Driver::VirtioBlkVhostVdpa(o)) => o.read_only = value,
                    _ => {
                        return Err(wrong_kind(
                            spec,
                            "set-read-only",
                            "io_uring, nvme_io_uring, virtio_blk_vhost_user and \
                             virtio_blk_vhost_vdpa nodes",
                        ))
                    }
                }
                Ok(())
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetDirect { name, value } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::IoUring(o)) => {
                    o.direct = value;
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-direct", "io_uring nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetLatency { name, latency } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::Null(o)) => {
                    o.latency_ns = latency;
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-latency", "null nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::Remove { name } => {
            client
                .remove_node(RemoveNodeRequest { name: name.clone() })
                .await?;
            out.removed("node", &name);
            return Ok(());
        }
        NodeCmd::List => {
            let nodes = client
                .list_nodes(ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            out.nodes(&nodes);
            return Ok(());
        }
        NodeCmd::Info { name } => {
            let node = client
                .get_node(GetNodeRequest { name })
                .await?
                .into_inner()
                .node
                .unwrap_or_default();
            out.node(&node);
            return Ok(());
        }
        NodeCmd::Move { node, worker } => {
            let moved = WorkerServiceClient::new(channel)
                .move_node(MoveNodeRequest {
                    node: node.clone(),
                    worker: worker.clone(),
                })
                .await?
                .into_inner()
                .moved;
            out.moved(
                &moved,
                &format!(
                    "no queue to move: no export over node {node} has one off worker {worker}"
                ),
            );
            return Ok(());
        }
    };
    let node = client
        .add_node(AddNodeRequest {
            node: Some(spec),
            backing_from_header: from_header,
        })
        .await?
        .into_inner()
        .node
        .unwrap_or_default();
    out.node(&node);
    Ok(())
}

/// Fetches node `name`, lets `edit` change its spec and sends it back with
/// UpdateNode; returns the updated node.
async fn modify(
    client: &mut NodeServiceClient<ManagerChannel>,
    name: String,
    edit: impl FnOnce(&mut NodeSpec) -> Result<(), Failure>,
) -> Result<NodeInfo, Failure> {
    let mut spec = client
        .get_node(GetNodeRequest { name: name.clone() })
        .await?
        .into_inner()
        .node
        .and_then(|n| n.spec)
        .ok_or_else(|| Failure {
            code: "INTERNAL",
            message: format!("the manager sent node {name} without its spec"),
        })?;
    edit(&mut spec)?;
    Ok(client
        .update_node(UpdateNodeRequest { node: Some(spec) })
        .await?
        .into_inner()
        .node
        .unwrap_or_default())
}

/// A command applied to a node of the wrong kind.
fn wrong_kind(spec: &NodeSpec, command: &str, applies_to: &str) -> Failure {
    let driver = blkmesh_graph::driver_name(spec);
    Failure {
        code: "INVALID_ARGUMENT",
        message: format!(
            "node {} is a {driver} node; {command} applies to {applies_to}",
            spec.name
        ),
    }
}
