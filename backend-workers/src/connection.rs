//! One frontend connection: the control messages of one export.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use blkmesh_ipc::channel::{Channel, ChannelError};
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{QueueRings, RingLayout};
use blkmesh_proto::ipc::v1 as ipc;
use ipc::reply::Result as ReplyResult;
use ipc::request::Msg;

use crate::graph::{self, OpenedGraph};
use crate::memory::RegisteredRam;
use crate::queue::{self, QueueHandle, QueueSetup, SharedRam};

struct Conn {
    graph: Option<OpenedGraph>,
    ram: SharedRam,
    queues: HashMap<u32, QueueHandle>,
}

/// Serves one frontend connection until it closes. Closing (or the frontend
/// dying) stops every queue of the connection once its in-flight requests
/// have completed.
pub fn serve(channel: Channel, worker: &str) {
    let mut conn = Conn {
        graph: None,
        ram: Arc::new(Mutex::new(Arc::new(RegisteredRam::empty()))),
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
        let reply = conn.handle(req, fds);
        if let Err(e) = channel.send(&reply, &[]) {
            tracing::warn!(worker, "replying: {e}");
            break;
        }
    }
    for (_, q) in conn.queues.drain() {
        q.stop();
    }
    tracing::info!(worker, "frontend connection closed");
}

fn failure(errno: i32, message: impl Into<String>) -> ipc::Reply {
    ipc::Reply {
        result: Some(ReplyResult::Failure(ipc::Failure {
            errno,
            message: message.into(),
        })),
    }
}

fn ok() -> ipc::Reply {
    ipc::Reply {
        result: Some(ReplyResult::Ok(ipc::Ok {})),
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
                match graph::open(&plan) {
                    Ok(g) => {
                        let limits = g.limits;
                        tracing::info!(
                            export = plan.export.as_ref().map(|e| e.id.as_str()).unwrap_or(""),
                            size = limits.size,
                            "export opened"
                        );
                        self.graph = Some(g);
                        ipc::Reply {
                            result: Some(ReplyResult::Opened(ipc::Opened {
                                limits: Some(limits),
                            })),
                        }
                    }
                    Err(e) => failure(e.errno, e.message),
                }
            }
            Some(Msg::SetMemTable(table)) => {
                let Some(graph) = &self.graph else {
                    return failure(libc::EINVAL, "memory table before open");
                };
                let specs: Vec<RegionSpec> = table
                    .regions
                    .iter()
                    .map(|r| RegionSpec {
                        guest_addr: r.guest_addr,
                        size: r.size,
                        fd_offset: r.fd_offset,
                    })
                    .collect();
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
            Some(Msg::DetachQueue(d)) => match self.queues.remove(&d.queue) {
                Some(q) => {
                    q.stop();
                    ok()
                }
                None => failure(libc::ENOENT, format!("queue {} is not attached", d.queue)),
            },
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
        let setup = QueueSetup {
            index: a.queue,
            rings,
            kick,
            call,
            graph: graph.clone(),
            ram: Arc::clone(&self.ram),
        };
        match queue::spawn(setup) {
            Ok(h) => {
                self.queues.insert(a.queue, h);
                ok()
            }
            Err(e) => failure(libc::EIO, e.to_string()),
        }
    }
}
