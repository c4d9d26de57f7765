//! The frontend's connections to the workers serving one export.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use blkmesh_ipc::channel::{Channel, ChannelError};
use blkmesh_proto::ipc::v1 as ipc;
use blkmesh_proto::v1::ExportPlan;
use ipc::reply::Result as ReplyResult;

/// How long a worker may take to answer a control message.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("worker {worker}: {source}")]
    Channel {
        worker: String,
        #[source]
        source: ChannelError,
    },
    #[error("worker {worker} refused: {message} (errno {errno})")]
    Refused {
        worker: String,
        errno: i32,
        message: String,
    },
    #[error("worker {worker} sent an unexpected reply")]
    Protocol { worker: String },
    #[error("plan has no worker for queue {0}")]
    NoWorker(u32),
    #[error("workers disagree about the export's limits")]
    LimitsDiffer,
}

struct Link {
    worker: String,
    socket: String,
    channel: Mutex<Channel>,
}

impl Link {
    fn call(
        &self,
        msg: ipc::request::Msg,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ReplyResult, LinkError> {
        let ch = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let err = |source| LinkError::Channel {
            worker: self.worker.clone(),
            source,
        };
        ch.send(&ipc::Request { msg: Some(msg) }, fds)
            .map_err(err)?;
        let (reply, _fds): (ipc::Reply, _) = ch.recv().map_err(err)?;
        match reply.result {
            Some(ReplyResult::Failure(f)) => Err(LinkError::Refused {
                worker: self.worker.clone(),
                errno: f.errno,
                message: f.message,
            }),
            Some(r) => Ok(r),
            None => Err(LinkError::Protocol {
                worker: self.worker.clone(),
            }),
        }
    }

    fn expect_ok(&self, msg: ipc::request::Msg, fds: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        match self.call(msg, fds)? {
            ReplyResult::Ok(_) => Ok(()),
            _ => Err(LinkError::Protocol {
                worker: self.worker.clone(),
            }),
        }
    }
}

/// One control connection per worker that serves a queue of the export.
pub struct WorkerLinks {
    inner: Mutex<Inner>,
}

struct Inner {
    links: Vec<Link>,
    /// Queue index → link index.
    by_queue: Vec<usize>,
}

fn connect(worker: &str, socket: &str) -> Result<Link, LinkError> {
    let err = |source| LinkError::Channel {
        worker: worker.to_string(),
        source,
    };
    let ch = Channel::connect(Path::new(socket)).map_err(err)?;
    ch.set_timeout(Some(CALL_TIMEOUT)).map_err(err)?;
    Ok(Link {
        worker: worker.to_string(),
        socket: socket.to_string(),
        channel: Mutex::new(ch),
    })
}

fn open_on(link: &Link, plan: &ExportPlan) -> Result<ipc::Limits, LinkError> {
    let open = ipc::request::Msg::Open(ipc::OpenExport {
        plan: Some(plan.clone()),
    });
    match link.call(open, &[])? {
        ReplyResult::Opened(o) => Ok(o.limits.unwrap_or_default()),
        _ => Err(LinkError::Protocol {
            worker: link.worker.clone(),
        }),
    }
}

impl WorkerLinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects to every worker of the plan and opens the graph there.
    /// Returns the links and the graph's limits.
    pub fn open(
        plan: &ExportPlan,
        num_queues: u32,
    ) -> Result<(WorkerLinks, ipc::Limits), LinkError> {
        let mut links: Vec<Link> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut by_queue = Vec::with_capacity(num_queues as usize);
        for q in 0..num_queues {
            let ep = plan
                .queues
                .iter()
                .find(|e| e.queue == q)
                .ok_or(LinkError::NoWorker(q))?;
            let i = match index.get(ep.worker_socket.as_str()) {
                Some(&i) => i,
                None => {
                    links.push(connect(&ep.worker, &ep.worker_socket)?);
                    index.insert(ep.worker_socket.as_str(), links.len() - 1);
                    links.len() - 1
                }
            };
            by_queue.push(i);
        }
        let mut limits: Option<ipc::Limits> = None;
        for link in &links {
            let l = open_on(link, plan)?;
            if limits.is_some_and(|prev| prev != l) {
                return Err(LinkError::LimitsDiffer);
            }
            limits = Some(l);
        }
        let limits = limits.ok_or(LinkError::NoWorker(0))?;
        Ok((
            WorkerLinks {
                inner: Mutex::new(Inner { links, by_queue }),
            },
            limits,
        ))
    }

    /// Sends the memory table to every worker.
    pub fn set_mem_table(
        &self,
        regions: &[ipc::MemRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), LinkError> {
        for link in &self.lock().links {
            link.expect_ok(
                ipc::request::Msg::SetMemTable(ipc::SetMemTable {
                    regions: regions.to_vec(),
                }),
                fds,
            )?;
        }
        Ok(())
    }

    /// The socket of the worker serving `queue`.
    pub fn worker_socket(&self, queue: u32) -> Option<String> {
        let inner = self.lock();
        inner
            .by_queue
            .get(queue as usize)
            .map(|&i| inner.links[i].socket.clone())
    }

    /// Points `queue` at the worker listening on `socket`, connecting to it
    /// and opening the graph there (and sending it the memory table, if any)
    /// if this export has no link to it yet. The queue must be detached.
    pub fn retarget(
        &self,
        queue: u32,
        worker: &str,
        socket: &str,
        plan: &ExportPlan,
        mem: Option<(&[ipc::MemRegion], &[BorrowedFd<'_>])>,
    ) -> Result<(), LinkError> {
        let mut inner = self.lock();
        if queue as usize >= inner.by_queue.len() {
            return Err(LinkError::NoWorker(queue));
        }
        let i = match inner.links.iter().position(|l| l.socket == socket) {
            Some(i) => i,
            None => {
                let link = connect(worker, socket)?;
                open_on(&link, plan)?;
                if let Some((regions, fds)) = mem {
                    link.expect_ok(
                        ipc::request::Msg::SetMemTable(ipc::SetMemTable {
                            regions: regions.to_vec(),
                        }),
                        fds,
                    )?;
                }
                inner.links.push(link);
                inner.links.len() - 1
            }
        };
        inner.by_queue[queue as usize] = i;
        Ok(())
    }

    fn with_link<T>(
        &self,
        queue: u32,
        f: impl FnOnce(&Link) -> Result<T, LinkError>,
    ) -> Result<T, LinkError> {
        let inner = self.lock();
        let link = inner
            .by_queue
            .get(queue as usize)
            .map(|&i| &inner.links[i])
            .ok_or(LinkError::NoWorker(queue))?;
        f(link)
    }

    /// Hands a queue's rings and eventfds to its worker.
    pub fn attach(
        &self,
        queue: u32,
        entries: u32,
        max_segments: u32,
        ring: BorrowedFd<'_>,
        kick: &impl AsFd,
        call: &impl AsFd,
    ) -> Result<(), LinkError> {
        self.with_link(queue, |l| {
            l.expect_ok(
                ipc::request::Msg::AttachQueue(ipc::AttachQueue {
                    queue,
                    entries,
                    max_segments,
                }),
                &[ring, kick.as_fd(), call.as_fd()],
            )
        })
    }

    /// Tells a queue's worker to stop serving it.
    pub fn detach(&self, queue: u32) -> Result<(), LinkError> {
        self.with_link(queue, |l| {
            l.expect_ok(
                ipc::request::Msg::DetachQueue(ipc::DetachQueue { queue }),
                &[],
            )
        })
    }
}
