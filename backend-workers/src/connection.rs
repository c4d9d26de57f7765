//! One frontend connection: the control messages of one export.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkmesh_ipc::channel::{Channel, ChannelError, MAX_MESSAGE};
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{QueueRings, RingLayout};
use blkmesh_proto::ipc::v1 as ipc;
use blkmesh_proto::v1::{Zone, ZoneAction};
use ipc::reply::Result as ReplyResult;
use ipc::request::Msg;

use crate::graph::{self, OpenedGraph, MAX_REPORT_ZONES};
use crate::handover::{self, Claim, Peer};
use crate::memory::RegisteredRam;
use crate::queue::{self, QueueHandle, QueueSetup, SharedRam};
use crate::zoned::{Action, ZoneView};

struct Conn {
    graph: Option<OpenedGraph>,
    /// The export the graph was opened for.
    export: String,
    /// The paths of the leaves with claims: what a queue that takes over a
    /// lost worker's requests settles first (see [`crate::claim`]).
    leaves: Vec<std::path::PathBuf>,
    ram: SharedRam,
    /// This connection, as the other connections of the export see it.
    peer: Option<Peer>,
    queues: HashMap<u32, Attached>,
}

/// A queue this connection serves, and its claim on the export's queue
/// (released once the loop has stopped: the fields drop in this order).
struct Attached {
    queue: QueueHandle,
    _claim: Claim,
}

/// How long an attach waits for the queue of a frontend that is gone to
/// finish (its held requests are dropped; requests in the kernel complete).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one frontend connection until it closes. Closing (or the frontend
/// dying) stops every queue of the connection: requests held by a delay or
/// a throttle are dropped, those at the leaf complete (see [`handover`]).
pub fn serve(channel: Channel, worker: &str) {
    let peer = Peer::new(channel.as_fd())
        .map_err(|e| tracing::warn!(worker, "cannot watch the connection: {e}"))
        .ok();
    let mut conn = Conn {
        graph: None,
        export: String::new(),
        leaves: Vec::new(),
        ram: Arc::new(Mutex::new(Arc::new(RegisteredRam::empty()))),
        peer,
        queues: HashMap::new(),
    };
    loop {
        let (req, fds) = match channel.recv::<ipc::Request>() {
            Ok(m) => m,
            Err(ChannelError::Closed) => break,
            Err(e @ (ChannelError::Decode(_) | ChannelError::Truncated)) => {
                tracing::warn!(worker, "bad control message: {e}");
                if channel
                    .send(&failure(libc::EINVAL, e.to_string()), &[])
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(worker, "control channel: {e}");
                break;
            }
        };
        let id = req.id;
        let mut reply = conn.handle(req, fds);
        // Echoed so the frontend can tell this reply from a late one.
        reply.id = id;
        if let Err(e) = channel.send(&reply, &[]) {
            tracing::warn!(worker, "replying: {e}");
            break;
        }
    }
    // The frontend is gone (or closed the connection): nothing may run
    // for it any more once a new connection takes its queues over.
    for (_, a) in conn.queues.drain() {
        a.queue.abandon();
    }
    tracing::info!(worker, "frontend connection closed");
}

fn failure(errno: i32, message: impl Into<String>) -> ipc::Reply {
    ipc::Reply {
        result: Some(ReplyResult::Failure(ipc::Failure {
            errno,
            message: message.into(),
        })),
        id: 0,
    }
}

fn ok() -> ipc::Reply {
    ipc::Reply {
        result: Some(ReplyResult::Ok(ipc::Ok {})),
        id: 0,
    }
}

impl Conn {
    fn handle(&mut self, req: ipc::Request, fds: Vec<File>) -> ipc::Reply {
        match req.msg {
            None => failure(libc::EINVAL, "empty request"),
            Some(Msg::Open(open)) => {
                if self.graph.is_some() {
                    return failure(libc::EBUSY, "export already open on this connection");
                }
                let Some(plan) = open.plan else {
                    return failure(libc::EINVAL, "open without a plan");
                };
                for node in &plan.nodes {
                    if let Some(blkmesh_proto::v1::node_spec::Driver::Qcow2(_)) = node.driver {
                        if let Err(e) = crate::jobs::release_node(&node.name) {
                            return failure(e.errno.get(), e.message);
                        }
                    }
                }
                if !plan.commit_finish.is_empty() {
                    if let Err(e) = crate::jobs::finish_commit(&plan.commit_finish) {
                        return failure(e.errno.get(), e.message);
                    }
                }
                match graph::open(&plan) {
                    Ok(g) => {
                        let limits = g.limits;
                        tracing::info!(
                            export = plan.export.as_ref().map(|e| e.id.as_str()).unwrap_or(""),
                            size = limits.size,
                            "export opened"
                        );
                        self.graph = Some(g);
                        self.leaves = claimed_leaves(&plan);
                        self.export = plan.export.map(|e| e.id).unwrap_or_default();
                        ipc::Reply {
                            result: Some(ReplyResult::Opened(ipc::Opened {
                                limits: Some(limits),
                            })),
                            id: 0,
                        }
                    }
                    Err(e) => failure(e.errno.get(), e.message),
                }
            }
            Some(Msg::SetMemTable(table)) => {
                let Some(graph) = &self.graph else {
                    return failure(libc::EINVAL, "memory table before open");
                };
                let specs: Vec<RegionSpec> = table.regions.iter().map(RegionSpec::from).collect();
                let ram = match GuestRam::map(&specs, fds) {
                    Ok(r) => r,
                    Err(e) => return failure(libc::EINVAL, format!("memory table: {e}")),
                };
                match RegisteredRam::register(ram, &graph.leaf) {
                    Ok(r) => {
                        *self.ram.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(r);
                        ok()
                    }
                    Err(e) => failure(
                        e.errno().raw_os_error(),
                        format!("registering guest memory: {}", e.message()),
                    ),
                }
            }
            Some(Msg::AttachQueue(a)) => self.attach(a, fds),
            Some(Msg::Zone(z)) => self.zone(z),
            Some(Msg::Job(j)) => {
                let graph = self.graph.as_ref();
                let read_only = graph.is_some_and(|g| g.read_only());
                match crate::jobs::request(graph.and_then(|g| g.qcow2()), read_only, &j) {
                    Ok(status) => ipc::Reply {
                        result: Some(ReplyResult::Job(status)),
                        id: 0,
                    },
                    Err(e) => failure(e.errno.get(), e.message),
                }
            }
            Some(Msg::DetachQueue(d)) => match self.queues.remove(&d.queue) {
                Some(a) => {
                    a.queue.stop();
                    ok()
                }
                None => failure(libc::ENOENT, format!("queue {} is not attached", d.queue)),
            },
        }
    }

    /// A zone report or action on the graph (the gRPC ZoneService), in the
    /// export's coordinates.
    fn zone(&self, req: ipc::ZoneRequest) -> ipc::Reply {
        let Some(graph) = &self.graph else {
            return failure(libc::EINVAL, "zone request before open");
        };
        let Some(access) = &graph.zoned else {
            return failure(libc::ENOTSUP, "the export's graph is not zoned");
        };
        let layer = &access.layer;
        let zs = layer.geometry().zone_size;
        let size = graph.limits.size;
        let Ok(action) = ZoneAction::try_from(req.action) else {
            return failure(libc::EINVAL, format!("unknown zone action {}", req.action));
        };
        let zone_failure = |e: crate::zoned::ZoneError| {
            failure(e.errno().get(), format!("zone at byte {}: {e}", req.offset))
        };
        if action != ZoneAction::Unspecified && graph.read_only() {
            return failure(libc::EROFS, "the export is read-only");
        }
        let action = match action {
            ZoneAction::Unspecified => {
                if req.offset >= size {
                    return failure(
                        libc::EINVAL,
                        format!("offset {} is beyond the export's {size} bytes", req.offset),
                    );
                }
                let max = match req.max_zones {
                    0 => MAX_REPORT_ZONES,
                    n => n.min(MAX_REPORT_ZONES),
                };
                let first = access.first + (req.offset / zs) as u32;
                let mut views = Vec::new();
                if let Err(e) = layer.report(first, access.zones().end, max as usize, &mut views) {
                    return zone_failure(e);
                }
                // As many as one message carries; the caller asks again
                // from the next zone for the rest.
                let mut room = MAX_MESSAGE - 16;
                let mut zones = Vec::with_capacity(views.len());
                for v in &views {
                    let z = zone_proto(v, access.shift);
                    let n = zone_encoded_len(&z);
                    if n > room {
                        break;
                    }
                    room -= n;
                    zones.push(z);
                }
                return zones_reply(zones);
            }
            ZoneAction::ResetAll => {
                return match layer.reset_all(access.zones()) {
                    Ok(()) => zones_reply(Vec::new()),
                    Err(e) => zone_failure(e),
                };
            }
            ZoneAction::Open => Action::Open,
            ZoneAction::Close => Action::Close,
            ZoneAction::Finish => Action::Finish,
            ZoneAction::Reset => Action::Reset,
        };
        if req.offset % zs != 0 || req.offset >= size {
            return failure(
                libc::EINVAL,
                format!(
                    "offset {} is not the start of a zone (a multiple of {zs} below {size})",
                    req.offset
                ),
            );
        }
        match layer.manage(action, req.offset + access.shift) {
            Ok(v) => zones_reply(vec![zone_proto(&v, access.shift)]),
            Err(e) => zone_failure(e),
        }
    }

    fn attach(&mut self, a: ipc::AttachQueue, fds: Vec<File>) -> ipc::Reply {
        let Some(graph) = &self.graph else {
            return failure(libc::EINVAL, "attach before open");
        };
        if self.queues.contains_key(&a.queue) {
            return failure(
                libc::EBUSY,
                format!("queue {} is already attached", a.queue),
            );
        }
        let Ok::<[File; 3], _>([ring, kick, call]) = fds.try_into() else {
            return failure(libc::EINVAL, "attach needs exactly 3 fds: ring, kick, call");
        };
        let layout = match RingLayout::new(a.entries, a.max_segments) {
            Ok(l) => l,
            Err(e) => return failure(libc::EINVAL, e.to_string()),
        };
        let rings = match QueueRings::attach(ring, layout) {
            Ok(r) => r,
            Err(e) => return failure(libc::EINVAL, format!("ring: {e}")),
        };
        let (kick, call) = match (Doorbell::from_peer(kick), Doorbell::from_peer(call)) {
            (Ok(k), Ok(c)) => (k, c),
            _ => return failure(libc::EINVAL, "kick and call must be eventfds"),
        };
        let Some(peer) = &self.peer else {
            return failure(libc::EIO, "the connection cannot be watched");
        };
        // After the queues of a frontend that is gone, never beside them.
        let claim = match handover::claim(&self.export, a.queue, peer, HANDOVER_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return failure(libc::EBUSY, e.to_string());
            }
        };
        if a.settle {
            self.settle(a.queue);
        }
        let setup = QueueSetup {
            index: a.queue,
            rings,
            kick,
            call,
            graph: graph.clone(),
            ram: Arc::clone(&self.ram),
        };
        match queue::spawn(setup) {
            Ok(queue) => {
                self.queues.insert(
                    a.queue,
                    Attached {
                        queue,
                        _claim: claim,
                    },
                );
                ok()
            }
            Err(e) => failure(libc::EIO, e.to_string()),
        }
    }
}

impl Conn {
    /// Waits out the I/O a lost worker may still have in the kernel on
    /// this graph's leaves before `queue` takes its requests over
    /// ([`crate::claim`]). A leaf that cannot be settled within
    /// [`SETTLE_LIMIT`] is logged, and the queue goes on: the guest must
    /// get its disk back, and the frontend's call would time out first.
    fn settle(&self, queue: u32) {
        for path in &self.leaves {
            let t = std::time::Instant::now();
            match crate::claim::settle(path, SETTLE_LIMIT) {
                Ok(found) => tracing::info!(
                    export = %self.export,
                    queue,
                    path = %path.display(),
                    lost_workers = found.lost,
                    waited_ms = t.elapsed().as_millis() as u64,
                    "settled the I/O of the lost worker"
                ),
                Err(e) => tracing::error!(export = %self.export, queue, "{e}"),
            }
        }
    }
}

/// How long a replacement waits for a lost worker's requests to leave the
/// kernel: less than the frontend's control-call timeout (30 s).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The paths of the plan's leaves that carry claims (crate::claim).
fn claimed_leaves(plan: &blkmesh_proto::v1::ExportPlan) -> Vec<std::path::PathBuf> {
    use blkmesh_proto::v1::node_spec::Driver;
    plan.nodes
        .iter()
        .filter_map(|n| match &n.driver {
            Some(Driver::IoUring(o)) => Some(std::path::PathBuf::from(&o.path)),
            Some(Driver::NvmeIoUring(o)) => Some(std::path::PathBuf::from(&o.path)),
            _ => None,
        })
        .collect()
}

fn zones_reply(zones: Vec<Zone>) -> ipc::Reply {
    ipc::Reply {
        result: Some(ReplyResult::Zones(ipc::Zones { zones })),
        id: 0,
    }
}

/// A zone as the API has it, in the export's coordinates.
fn zone_proto(v: &ZoneView, shift: u64) -> Zone {
    Zone {
        start: v.start - shift,
        length: v.len,
        capacity: v.capacity,
        write_pointer: v.wp.saturating_sub(shift),
        r#type: v.zone_type as i32,
        condition: v.cond as i32,
    }
}

/// Bytes `z` takes as an element of a repeated field.
fn zone_encoded_len(z: &Zone) -> usize {
    fn varint(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }
    let field = |v: u64| if v == 0 { 0 } else { 1 + varint(v) };
    let body = field(z.start)
        + field(z.length)
        + field(z.capacity)
        + field(z.write_pointer)
        + field(z.r#type as u64)
        + field(z.condition as u64);
    1 + varint(body as u64) + body
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::{
        node_spec::Driver, ExportPlan, NodeSpec, NullOptions, RawOptions, VhostUserBlkExport,
        ZoneCondition, ZonedOptions,
    };

    const ZS: u64 = 64 * 1024;

    fn conn() -> Conn {
        Conn {
            graph: None,
            export: String::new(),
            leaves: Vec::new(),
            ram: Arc::new(Mutex::new(Arc::new(RegisteredRam::empty()))),
            peer: None,
            queues: HashMap::new(),
        }
    }

    fn plan(dir: &tempfile::TempDir, root: &str, zones: u64, writable: bool) -> ExportPlan {
        ExportPlan {
            commit_finish: String::new(),
            export: Some(VhostUserBlkExport {
                id: "e".into(),
                node: root.into(),
                socket: "/tmp/x".into(),
                writable,
                ..Default::default()
            }),
            nodes: vec![
                NodeSpec {
                    name: "w".into(),
                    driver: Some(Driver::Raw(RawOptions {
                        child: "z".into(),
                        offset: ZS,
                        size: 0,
                    })),
                },
                NodeSpec {
                    name: "z".into(),
                    driver: Some(Driver::Zoned(ZonedOptions {
                        child: "n".into(),
                        zone_size: ZS,
                        zone_capacity: 0,
                        max_open_zones: 1,
                        max_active_zones: 0,
                        metadata_path: dir.path().join("zones").display().to_string(),
                    })),
                },
                NodeSpec {
                    name: "n".into(),
                    driver: Some(Driver::Null(NullOptions {
                        size: zones * ZS,
                        latency_ns: 0,
                    })),
                },
            ],
            queues: vec![],
            generation: 0,
        }
    }

    fn open(c: &mut Conn, plan: ExportPlan) -> ipc::Limits {
        let r = c.handle(
            ipc::Request {
                msg: Some(Msg::Open(ipc::OpenExport { plan: Some(plan) })),
                id: 1,
            },
            vec![],
        );
        match r.result {
            Some(ReplyResult::Opened(o)) => o.limits.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn zone(
        c: &mut Conn,
        action: ZoneAction,
        offset: u64,
        max_zones: u32,
    ) -> Result<Vec<Zone>, (i32, String)> {
        let r = c.handle(
            ipc::Request {
                msg: Some(Msg::Zone(ipc::ZoneRequest {
                    action: action as i32,
                    offset,
                    max_zones,
                })),
                id: 1,
            },
            vec![],
        );
        match r.result {
            Some(ReplyResult::Zones(z)) => Ok(z.zones),
            Some(ReplyResult::Failure(f)) => Err((f.errno, f.message)),
            other => panic!("{other:?}"),
        }
    }

    fn cond(z: &Zone) -> ZoneCondition {
        ZoneCondition::try_from(z.condition).unwrap()
    }

    #[test]
    fn zone_requests_report_and_act_in_export_coordinates() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = conn();
        let limits = open(&mut c, plan(&dir, "w", 8, true));
        let info = limits.zones.unwrap();
        assert_eq!(info.nr_zones, 7, "the window hides the first zone");

        let all = zone(&mut c, ZoneAction::Unspecified, 0, 0).unwrap();
        assert_eq!(all.len(), 7);
        assert_eq!((all[0].start, all[6].start), (0, 6 * ZS));
        assert!(all.iter().all(|z| cond(z) == ZoneCondition::Empty
            && z.write_pointer == z.start
            && z.length == ZS
            && z.capacity == ZS
            && z.r#type == 2));
        let some = zone(&mut c, ZoneAction::Unspecified, 2 * ZS + 7, 2).unwrap();
        assert_eq!(
            some.iter().map(|z| z.start).collect::<Vec<_>>(),
            [2 * ZS, 3 * ZS]
        );

        let z = zone(&mut c, ZoneAction::Open, ZS, 0).unwrap();
        assert_eq!(
            (z.len(), z[0].start, cond(&z[0])),
            (1, ZS, ZoneCondition::ExplicitOpen)
        );
        // max_open_zones 1, held by an explicitly open zone.
        let e = zone(&mut c, ZoneAction::Open, 2 * ZS, 0).unwrap_err();
        assert_eq!(e.0, libc::ETOOMANYREFS, "{}", e.1);
        let z = zone(&mut c, ZoneAction::Finish, ZS, 0).unwrap();
        assert_eq!(
            (cond(&z[0]), z[0].write_pointer),
            (ZoneCondition::Full, 2 * ZS)
        );
        let e = zone(&mut c, ZoneAction::Open, ZS, 0).unwrap_err();
        assert_eq!(e.0, libc::EBADRQC, "{}", e.1);
        let e = zone(&mut c, ZoneAction::Close, 3 * ZS, 0).unwrap_err();
        assert_eq!(e.0, libc::EBADRQC, "closing an empty zone: {}", e.1);
        let z = zone(&mut c, ZoneAction::Reset, ZS, 0).unwrap();
        assert_eq!(cond(&z[0]), ZoneCondition::Empty);
        zone(&mut c, ZoneAction::Finish, 6 * ZS, 0).unwrap();
        assert_eq!(
            zone(&mut c, ZoneAction::ResetAll, 12345, 0).unwrap(),
            vec![]
        );
        let all = zone(&mut c, ZoneAction::Unspecified, 0, 0).unwrap();
        assert!(all.iter().all(|z| cond(z) == ZoneCondition::Empty));

        // Bad offsets.
        for (a, off) in [
            (ZoneAction::Open, 512),
            (ZoneAction::Reset, 7 * ZS),
            (ZoneAction::Unspecified, 7 * ZS),
        ] {
            let e = zone(&mut c, a, off, 0).unwrap_err();
            assert_eq!(e.0, libc::EINVAL, "{a:?} {off}: {}", e.1);
        }
        let r = c.handle(
            ipc::Request {
                msg: Some(Msg::Zone(ipc::ZoneRequest {
                    action: 99,
                    offset: 0,
                    max_zones: 0,
                })),
                id: 1,
            },
            vec![],
        );
        assert!(matches!(r.result, Some(ReplyResult::Failure(f)) if f.errno == libc::EINVAL));
    }

    #[test]
    fn zone_requests_need_a_zoned_writable_graph() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = conn();
        let e = zone(&mut c, ZoneAction::Unspecified, 0, 0).unwrap_err();
        assert_eq!(e.0, libc::EINVAL, "before open");
        let limits = open(&mut c, plan(&dir, "n", 8, true));
        assert_eq!(limits.zones.unwrap().model, 0);
        let e = zone(&mut c, ZoneAction::Unspecified, 0, 0).unwrap_err();
        assert_eq!(e.0, libc::ENOTSUP, "{}", e.1);

        let mut c = conn();
        open(&mut c, plan(&dir, "z", 8, false));
        assert_eq!(
            zone(&mut c, ZoneAction::Unspecified, 0, 0).unwrap().len(),
            8
        );
        let e = zone(&mut c, ZoneAction::Open, 0, 0).unwrap_err();
        assert_eq!(e.0, libc::EROFS);
    }

    #[test]
    fn a_long_report_fits_one_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = conn();
        // 5000 zones, write pointers moved so every field is set.
        open(&mut c, plan(&dir, "z", 5000, true));
        let layer = Arc::clone(&c.graph.as_ref().unwrap().zoned.as_ref().unwrap().layer);
        for z in 0..5000u64 {
            let t = layer
                .begin_write(crate::zoned::WriteKind::Write, z * ZS, 4096)
                .unwrap();
            layer.end_write(&t, true).unwrap();
        }
        let zones = zone(&mut c, ZoneAction::Unspecified, 0, 0).unwrap();
        assert!(zones.len() > 1000 && zones.len() < 4096, "{}", zones.len());
        let reply = zones_reply(zones.clone());
        assert!(prost::Message::encoded_len(&reply) < MAX_MESSAGE);
        // The next page starts where this one stopped.
        let next = zone(&mut c, ZoneAction::Unspecified, zones.len() as u64 * ZS, 3).unwrap();
        assert_eq!(next[0].start, zones.len() as u64 * ZS);
        assert_eq!(next.len(), 3);
        // The estimate of each zone's size is exact.
        for z in &zones[..10] {
            assert_eq!(
                zone_encoded_len(z),
                prost::Message::encoded_len(&ipc::Zones { zones: vec![*z] })
            );
        }
    }
}
