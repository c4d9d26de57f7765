//! The frontend's connections to the workers serving one export.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::sockopt;

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
    #[error("worker {worker} is gone")]
    Dead { worker: String },
    #[error("workers disagree about the export's limits")]
    LimitsDiffer,
}

struct Link {
    /// Unique in this process, so a link can be named after the set changed.
    id: u64,
    worker: String,
    socket: String,
    /// The channel and the id of the next request on it.
    channel: Mutex<(Channel, u64)>,
    /// A duplicate of the channel's fd, polled for hang-ups without the
    /// channel's lock.
    watch: Arc<OwnedFd>,
    /// The worker's pid as the kernel saw it connect (0 when it lives in
    /// another pid namespace): what fencing a hung worker kills.
    peer_pid: i32,
    /// The worker died, was fenced, or the link fell out of step (a
    /// timeout, a reply to another request): nothing is sent to it any
    /// more.
    dead: AtomicBool,
    /// The failover watcher has taken note of `dead` (see [`WorkerLinks::watched`]).
    reported: AtomicBool,
}

/// A link as the failover watcher sees it.
#[derive(Clone)]
pub struct Watched {
    pub id: u64,
    pub worker: String,
    pub fd: Arc<OwnedFd>,
    /// Already found dead by a call: its queues are lost without waiting
    /// for the hang-up.
    pub dead: bool,
}

impl Link {
    /// Sends one request and waits for its reply. Any failure of the
    /// exchange (not a refusal by the worker) leaves the link dead: after a
    /// timeout or a reply to some other request the two ends are out of
    /// step, and a late reply must never be taken for a later request's.
    /// A worker that timed out is fenced, so nothing it still does can
    /// reach the disk or guest memory once its queues fail over.
    fn call(
        &self,
        msg: ipc::request::Msg,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ReplyResult, LinkError> {
        if self.dead.load(Ordering::Acquire) {
            return Err(LinkError::Dead {
                worker: self.worker.clone(),
            });
        }
        let mut ch = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let id = ch.1;
        ch.1 += 1;
        let fail = |source: ChannelError| {
            if !matches!(
                source,
                ChannelError::TooLarge(_) | ChannelError::TooManyFds(_)
            ) {
                self.dead.store(true, Ordering::Release);
            }
            if matches!(source, ChannelError::Timeout) {
                self.fence();
            }
            LinkError::Channel {
                worker: self.worker.clone(),
                source,
            }
        };
        ch.0.send(&ipc::Request { msg: Some(msg), id }, fds)
            .map_err(fail)?;
        let (reply, _fds): (ipc::Reply, _) = ch.0.recv().map_err(fail)?;
        if reply.id != id {
            self.dead.store(true, Ordering::Release);
            tracing::error!(worker = %self.worker, sent = id, got = reply.id, "reply to another request: link dropped");
            return Err(LinkError::Protocol {
                worker: self.worker.clone(),
            });
        }
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

    /// Kills the worker (it stopped answering) and marks the link dead.
    /// False if its pid is not known to us (another pid namespace).
    fn fence(&self) -> bool {
        self.dead.store(true, Ordering::Release);
        if self.peer_pid <= 0 {
            return false;
        }
        let pid = nix::unistd::Pid::from_raw(self.peer_pid);
        match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
            Ok(()) => {
                tracing::error!(worker = %self.worker, pid = self.peer_pid, "worker fenced (SIGKILL): hung or corrupt");
                true
            }
            Err(e) => {
                tracing::error!(worker = %self.worker, pid = self.peer_pid, "cannot fence the worker: {e}");
                false
            }
        }
    }
}

/// One control connection per worker that serves a queue of the export.
pub struct WorkerLinks {
    inner: Mutex<Inner>,
}

/// Worker connections with the graph open, not (yet, or no longer) in use.
pub struct StagedLinks(Inner);

impl StagedLinks {
    /// No connections: a queue pointed at them has no worker.
    pub fn empty() -> Self {
        StagedLinks(Inner {
            links: Vec::new(),
            by_queue: Vec::new(),
        })
    }
}

/// A memory table as the workers get it: regions and their fds.
pub type MemRef<'a> = (&'a [ipc::MemRegion], &'a [BorrowedFd<'a>]);

struct Inner {
    /// Shared so a long call (a zone command) can run without the lock.
    links: Vec<Arc<Link>>,
    /// Queue index → link index.
    by_queue: Vec<usize>,
}

fn connect(worker: &str, socket: &str) -> Result<Link, LinkError> {
    let ch = Channel::connect(Path::new(socket)).map_err(|source| LinkError::Channel {
        worker: worker.to_string(),
        source,
    })?;
    let peer_pid = nix::sys::socket::getsockopt(&ch.as_fd(), sockopt::PeerCredentials)
        .map(|c| c.pid())
        .unwrap_or(0);
    Link::over(worker, socket, ch, CALL_TIMEOUT, peer_pid)
}

impl Link {
    /// A link over a connected channel to the worker `peer_pid` (0: not
    /// known, never fenced).
    fn over(
        worker: &str,
        socket: &str,
        ch: Channel,
        timeout: Duration,
        peer_pid: i32,
    ) -> Result<Link, LinkError> {
        let err = |source| LinkError::Channel {
            worker: worker.to_string(),
            source,
        };
        ch.set_timeout(Some(timeout)).map_err(err)?;
        let io = |e: std::io::Error| LinkError::Channel {
            worker: worker.to_string(),
            source: ChannelError::Socket {
                op: "dup",
                source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            },
        };
        let watch = Arc::new(ch.as_fd().try_clone_to_owned().map_err(io)?);
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Link {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            worker: worker.to_string(),
            socket: socket.to_string(),
            channel: Mutex::new((ch, 1)),
            watch,
            peer_pid,
            dead: AtomicBool::new(false),
            reported: AtomicBool::new(false),
        })
    }
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
        let mut links: Vec<Arc<Link>> = Vec::new();
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
                    links.push(Arc::new(connect(&ep.worker, &ep.worker_socket)?));
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
            let sent = link.expect_ok(
                ipc::request::Msg::SetMemTable(ipc::SetMemTable {
                    regions: regions.to_vec(),
                }),
                fds,
            );
            match sent {
                // A dead worker's queues get the table from their
                // replacement's link when they fail over.
                Err(_) if link.dead.load(Ordering::Acquire) => {}
                r => r?,
            }
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

    /// Every link the failover watcher has not yet seen die: the live ones
    /// to poll for a hang-up, and those a call found dead (flagged).
    pub fn watched(&self) -> Vec<Watched> {
        self.lock()
            .links
            .iter()
            .filter(|l| !l.reported.load(Ordering::Acquire))
            .map(|l| Watched {
                id: l.id,
                worker: l.worker.clone(),
                fd: Arc::clone(&l.watch),
                dead: l.dead.load(Ordering::Acquire),
            })
            .collect()
    }

    /// Marks link `id` dead (and seen so by the watcher); returns the
    /// queues it served.
    pub fn mark_dead(&self, id: u64) -> Vec<u32> {
        let inner = self.lock();
        let Some(i) = inner.links.iter().position(|l| l.id == id) else {
            return Vec::new();
        };
        inner.links[i].dead.store(true, Ordering::Release);
        inner.links[i].reported.store(true, Ordering::Release);
        (0..inner.by_queue.len() as u32)
            .filter(|&q| inner.by_queue[q as usize] == i)
            .collect()
    }

    /// The link serving `queue`, if any.
    pub fn link_of(&self, queue: u32) -> Option<u64> {
        let inner = self.lock();
        inner
            .by_queue
            .get(queue as usize)
            .map(|&i| inner.links[i].id)
    }

    /// Whether the link serving `queue` is dead (false if none serves it).
    pub fn serves_dead(&self, queue: u32) -> bool {
        let inner = self.lock();
        inner
            .by_queue
            .get(queue as usize)
            .is_some_and(|&i| inner.links[i].dead.load(Ordering::Acquire))
    }

    /// Fences the worker behind link `id` after it stopped answering or
    /// broke a ring: kills
    /// it, so nothing it still holds can reach the disk once its requests
    /// are resubmitted elsewhere. False if its pid is not known to us (it
    /// lives in another pid namespace).
    pub fn fence(&self, id: u64) -> bool {
        let inner = self.lock();
        inner
            .links
            .iter()
            .find(|l| l.id == id)
            .is_some_and(|l| l.fence())
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
        let live = |l: &Arc<Link>| l.socket == socket && !l.dead.load(Ordering::Acquire);
        let i = match inner.links.iter().position(live) {
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
                inner.links.push(Arc::new(link));
                inner.links.len() - 1
            }
        };
        inner.by_queue[queue as usize] = i;
        Ok(())
    }

    /// Opens `plan` on fresh connections to the workers it names, with the
    /// memory table if one is given, without touching the links in use:
    /// the first half of a live reopen. Dropping the result closes them.
    pub fn stage(
        plan: &ExportPlan,
        num_queues: u32,
        mem: Option<MemRef<'_>>,
    ) -> Result<(StagedLinks, ipc::Limits), LinkError> {
        let (staged, limits) = WorkerLinks::open(plan, num_queues)?;
        if let Some((regions, fds)) = mem {
            staged.set_mem_table(regions, fds)?;
        }
        Ok((
            StagedLinks(staged.inner.into_inner().unwrap_or_else(|p| p.into_inner())),
            limits,
        ))
    }

    /// Puts staged links in place of the current ones, returning the old
    /// ones (closed when dropped). The queues must be detached.
    pub fn swap(&self, staged: StagedLinks) -> StagedLinks {
        StagedLinks(std::mem::replace(&mut *self.lock(), staged.0))
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

    /// Hands a queue's rings and eventfds to the worker of `attach.queue`.
    /// With `attach.settle` (requests of a lost worker are about to be
    /// resubmitted) the worker first waits out the I/O that worker may
    /// still have in the kernel.
    pub fn attach(
        &self,
        attach: ipc::AttachQueue,
        ring: BorrowedFd<'_>,
        kick: &impl AsFd,
        call: &impl AsFd,
    ) -> Result<(), LinkError> {
        self.with_link(attach.queue, |l| {
            l.expect_ok(
                ipc::request::Msg::AttachQueue(attach),
                &[ring, kick.as_fd(), call.as_fd()],
            )
        })
    }

    /// Runs a zone report (`action` UNSPECIFIED) or a zone action on the
    /// export's graph, on the worker of `queue` (every worker of the
    /// export has the same graph open; the zoned node keeps its state in
    /// its metadata file). Does not hold the links' lock during the call.
    /// A worker that is gone is waited for (up to `wait`) while the
    /// failover thread reconnects the queue.
    pub fn zone(
        &self,
        queue: u32,
        request: ipc::ZoneRequest,
        wait: Duration,
    ) -> Result<Vec<blkmesh_proto::v1::Zone>, LinkError> {
        self.ask(
            queue,
            wait,
            || ipc::request::Msg::Zone(request),
            |r| match r {
                ReplyResult::Zones(z) => Some(z.zones),
                _ => None,
            },
        )
    }

    /// Runs a job request on the worker of `queue` (waiting up to `wait`
    /// for one being replaced).
    pub fn job(
        &self,
        queue: u32,
        request: ipc::JobRequest,
        wait: Duration,
    ) -> Result<ipc::JobStatus, LinkError> {
        self.ask(
            queue,
            wait,
            || ipc::request::Msg::Job(request.clone()),
            |r| match r {
                ReplyResult::Job(status) => Some(status),
                _ => None,
            },
        )
    }

    /// Sends `msg()` to the worker of `queue` and takes its answer with
    /// `answer` (`None`: a reply of the wrong kind, a protocol error). A
    /// worker that is gone is waited for (up to `wait`) while the failover
    /// thread reconnects the queue. The links' lock is not held during the
    /// call.
    fn ask<T>(
        &self,
        queue: u32,
        wait: Duration,
        msg: impl Fn() -> ipc::request::Msg,
        answer: impl Fn(ReplyResult) -> Option<T>,
    ) -> Result<T, LinkError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let link = {
                let inner = self.lock();
                inner
                    .by_queue
                    .get(queue as usize)
                    .map(|&i| Arc::clone(&inner.links[i]))
                    .ok_or(LinkError::NoWorker(queue))?
            };
            match link.call(msg(), &[]) {
                Ok(r) => {
                    return answer(r).ok_or_else(|| LinkError::Protocol {
                        worker: link.worker.clone(),
                    })
                }
                Err(LinkError::Dead { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn detach() -> ipc::request::Msg {
        ipc::request::Msg::DetachQueue(ipc::DetachQueue { queue: 0 })
    }

    fn ok(id: u64) -> ipc::Reply {
        ipc::Reply {
            result: Some(ReplyResult::Ok(ipc::Ok {})),
            id,
        }
    }

    /// A link whose worker end the test plays, with a short timeout.
    fn link() -> (Link, Channel) {
        let (ours, theirs) = Channel::pair().unwrap();
        let link = Link::over("w", "s", ours, Duration::from_millis(200), 0).unwrap();
        (link, theirs)
    }

    #[test]
    fn replies_are_matched_to_their_request() {
        let (link, worker) = link();
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                let (req, _): (ipc::Request, _) = worker.recv().unwrap();
                worker.send(&ok(req.id), &[]).unwrap();
            }
            worker
        });
        link.expect_ok(detach(), &[]).unwrap();
        link.expect_ok(detach(), &[]).unwrap();
        drop(t.join().unwrap());
        assert!(!link.dead.load(Ordering::Acquire));
    }

    #[test]
    fn a_reply_to_another_request_kills_the_link() {
        let (link, worker) = link();
        let t = std::thread::spawn(move || {
            let (req, _): (ipc::Request, _) = worker.recv().unwrap();
            worker.send(&ok(req.id + 1), &[]).unwrap();
            worker
        });
        let e = link.expect_ok(detach(), &[]).unwrap_err();
        assert!(matches!(e, LinkError::Protocol { .. }), "{e}");
        let _worker = t.join().unwrap();
        // Never reused out of step: the next call fails at once.
        assert!(matches!(
            link.expect_ok(detach(), &[]),
            Err(LinkError::Dead { .. })
        ));
    }

    #[test]
    fn a_late_reply_is_never_taken_for_the_next_request() {
        let (link, worker) = link();
        // The worker answers only after the caller gave up.
        let e = link.expect_ok(detach(), &[]).unwrap_err();
        assert!(
            matches!(
                e,
                LinkError::Channel {
                    source: ChannelError::Timeout,
                    ..
                }
            ),
            "{e}"
        );
        let (req, _): (ipc::Request, _) = worker.recv().unwrap();
        worker.send(&ok(req.id), &[]).unwrap();
        assert!(matches!(
            link.expect_ok(detach(), &[]),
            Err(LinkError::Dead { .. })
        ));
    }

    #[test]
    fn a_refusal_keeps_the_link() {
        let (link, worker) = link();
        let t = std::thread::spawn(move || {
            let (req, _): (ipc::Request, _) = worker.recv().unwrap();
            let reply = ipc::Reply {
                result: Some(ReplyResult::Failure(ipc::Failure {
                    errno: libc::EINVAL,
                    message: "no".into(),
                })),
                id: req.id,
            };
            worker.send(&reply, &[]).unwrap();
            worker
        });
        let e = link.expect_ok(detach(), &[]).unwrap_err();
        assert!(matches!(e, LinkError::Refused { errno, .. } if errno == libc::EINVAL));
        let _worker = t.join().unwrap();
        assert!(!link.dead.load(Ordering::Acquire));
    }
}
