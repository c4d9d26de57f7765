//! One export: its vhost-user socket, its worker links, and the VMM
//! connections it serves (see [`crate::connections`]: one VMM, or two
//! while a VM migrates; a VMM may disconnect and reconnect).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use blkmesh_proto::v1::{ExportPlan, ExportState, VhostUserBlkExport};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::BackendReqHandler;

use crate::backend_channel;
use crate::config::BlkConfig;
use crate::connections::Connections;
use crate::handler::{DeviceHandler, Refusal, RefusalReporter};
use crate::queues::relocation::RelocationError;
use crate::queues::{Destination, WorkerQueues};
use crate::request::{DeviceInfo, ZoneLimits, ID_BYTES};
use crate::vring::{HangReporter, QueueControls, WorkerFault};
use crate::workers::{LinkError, MemRef, StagedLinks, WorkerLinks};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("plan has no export")]
    NoExport,
    #[error("opening the graph on the workers")]
    Workers(#[source] LinkError),
    #[error("listening on {path}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a live change of a served export (a reopen, a queue move) failed;
/// the export keeps serving as it did.
#[derive(Debug, thiserror::Error)]
pub enum LiveChangeError {
    /// The queues could not switch (see [`RelocationError`]).
    #[error(transparent)]
    Relocation(Box<RelocationError>),
    /// No VMM is connected, and the new graph did not open.
    #[error("{}", crate::error_chain(.0))]
    Open(LinkError),
    /// A queue could not move to the worker the plan names.
    #[error("queue {queue} to {worker}: {source}")]
    Move {
        queue: u32,
        worker: String,
        #[source]
        source: Box<RelocationError>,
    },
}

impl From<RelocationError> for LiveChangeError {
    fn from(e: RelocationError) -> Self {
        LiveChangeError::Relocation(Box::new(e))
    }
}

/// Where an export's state changes after it started go (the manager's
/// reports): the plan served, the new state, why, and the size served.
pub type StatusSink = Arc<dyn Fn(&ExportPlan, ExportState, String, u64) + Send + Sync>;

/// A served export.
pub struct ExportServer {
    pub plan: ExportPlan,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// The connected VMMs, and which one runs the queues.
    vmms: Arc<Connections>,
    links: Arc<WorkerLinks>,
    /// What a newly connected VMM is offered (changes on reopen).
    cfg: Arc<Mutex<BlkConfig>>,
    dev: Arc<DeviceInfo>,
    zones: Arc<ZoneLimits>,
    num_queues: u32,
    /// The plan, as the failover thread reads it.
    shared_plan: Arc<Mutex<ExportPlan>>,
    /// Why the last VMM was refused (see [`Refusal`]); cleared when a VMM's
    /// features are accepted.
    refusal: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
    failover: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Graphs that one connection holds at a time: leaves that serve one
/// connection (vhost-user, vDPA) and zoned nodes (their state is one
/// worker's, its metadata file locked). A reopen must close the old graph
/// before it opens the new one, and moving such a graph to another worker
/// moves all its queues at once, the same way.
fn exclusive_graph(plan: &ExportPlan) -> bool {
    plan.nodes.iter().any(blkmesh_graph::kinds::exclusive)
}

/// How long a reopen of an exclusive graph waits for the old worker to
/// let go of it (it closes the graph when its connection drops).
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Opens `plan` on the workers ([`WorkerLinks::stage`]); for an exclusive
/// graph whose old connections were just dropped, a worker that still
/// holds it (EBUSY: the zone metadata lock) is asked again until it let go.
fn stage_when_free(
    plan: &ExportPlan,
    num_queues: u32,
    mem: Option<MemRef<'_>>,
    exclusive: bool,
) -> Result<(StagedLinks, blkmesh_proto::ipc::v1::Limits), LinkError> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match WorkerLinks::stage(plan, num_queues, mem) {
            Err(LinkError::Refused { errno, .. })
                if exclusive && errno == libc::EBUSY && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

impl DeviceInfo {
    /// What the queues check requests against, for `cfg`.
    fn update(&self, cfg: &BlkConfig) {
        use std::sync::atomic::Ordering::Relaxed;
        self.capacity.store(cfg.limits.size, Relaxed);
        self.writable.store(!cfg.read_only(), Relaxed);
        self.max_discard_sectors
            .store(cfg.max_discard_sectors(), Relaxed);
        self.max_write_zeroes_sectors
            .store(cfg.max_write_zeroes_sectors(), Relaxed);
    }
}

impl ExportServer {
    /// Opens the graph on the workers and starts listening for the VMM.
    pub fn start(plan: ExportPlan, sink: StatusSink) -> Result<ExportServer, ExportError> {
        let e = plan.export.clone().ok_or(ExportError::NoExport)?;
        let num_queues = e.num_queues.clamp(1, 64);
        let (links, limits) = WorkerLinks::open(&plan, num_queues).map_err(ExportError::Workers)?;
        // One-shot: a later open (a lost worker's queues, a reopen) must
        // not ask for the commit's final copy again.
        let mut plan = plan;
        plan.commit_finish.clear();
        let cfg = BlkConfig {
            num_queues: num_queues as u16,
            queue_size: match e.queue_size {
                0 => 256,
                q => q.clamp(64, 1024) as u16,
            },
            logical_block_size: if e.logical_block_size == 0 {
                512
            } else {
                e.logical_block_size
            },
            writable: e.writable,
            limits,
        };
        let mut serial = [0u8; ID_BYTES];
        let s = if e.serial.is_empty() {
            &e.id
        } else {
            &e.serial
        };
        for (o, c) in serial.iter_mut().zip(s.bytes()) {
            *o = c;
        }
        let dev = Arc::new(DeviceInfo {
            capacity: Default::default(),
            writable: Default::default(),
            max_discard_sectors: Default::default(),
            max_write_zeroes_sectors: Default::default(),
            max_segments: crate::config::RING_MAX_SEGMENTS as usize,
            serial,
            stats: (0..num_queues)
                .map(|q| crate::stats().queue(&e.id, q))
                .collect(),
        });
        dev.update(&cfg);
        let zones = Arc::new(ZoneLimits::default());
        zones.update(&cfg);
        let socket = PathBuf::from(&e.socket);
        let listen_err = |source| ExportError::Listen {
            path: e.socket.clone(),
            source,
        };
        // The socket has the policy's mode before its path exists (a stale
        // socket there is replaced; anything else is refused).
        let listener = blkmesh_sandbox::SocketPolicy::global()
            .listen_unix(&socket, blkmesh_sandbox::UnixSocketKind::Stream, 128)
            .map(UnixListener::from)
            .map_err(|e| listen_err(std::io::Error::other(e)))?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let links = Arc::new(links);
        let vmms = Arc::new(Connections::default());
        let cfg = Arc::new(Mutex::new(cfg));
        let shared_plan = Arc::new(Mutex::new(plan.clone()));
        let (hang_tx, hang_rx) = std::sync::mpsc::channel::<(u16, WorkerFault)>();
        let hang_tx = Mutex::new(hang_tx);
        let on_hang: HangReporter = Arc::new(move |q, why| {
            let _ = lock(&hang_tx).send((q, why));
        });
        let controls = Arc::new(QueueControls::default());
        let refusal = Arc::new(Mutex::new(None::<String>));
        let on_refusal: RefusalReporter = {
            let refusal = Arc::clone(&refusal);
            let plan = Arc::clone(&shared_plan);
            let cfg = Arc::clone(&cfg);
            Arc::new(move |r: Option<&Refusal>| {
                let message = r.map(|r| r.to_string());
                {
                    let mut current = lock(&refusal);
                    if *current == message {
                        return;
                    }
                    current.clone_from(&message);
                }
                let plan = lock(&plan).clone();
                let size = lock(&cfg).limits.size;
                match message {
                    Some(m) => sink(&plan, ExportState::VmmRefused, m, size),
                    None => {
                        tracing::info!(export = %plan.export.as_ref().map_or("", |e| e.id.as_str()), "VMM accepted; the earlier refusal is over");
                        sink(&plan, ExportState::Serving, String::new(), size)
                    }
                }
            })
        };
        let failover = {
            let f = Failover {
                id: e.id.clone(),
                links: Arc::clone(&links),
                current: Arc::clone(&vmms),
                controls: Arc::clone(&controls),
                plan: Arc::clone(&shared_plan),
                stop: Arc::clone(&stop),
                hangs: hang_rx,
            };
            std::thread::Builder::new()
                .name(format!("failover-{}", e.id))
                .spawn(move || f.run())
                .map_err(listen_err)?
        };
        let thread = {
            let serve = Serve {
                listener,
                stop: Arc::clone(&stop),
                conn: ConnCtx {
                    id: e.id.clone(),
                    cfg: Arc::clone(&cfg),
                    dev: Arc::clone(&dev),
                    zones: Arc::clone(&zones),
                    links: Arc::clone(&links),
                    vmms: Arc::clone(&vmms),
                    controls,
                    plan: Arc::clone(&shared_plan),
                    on_hang,
                    on_refusal,
                },
            };
            std::thread::Builder::new()
                .name(format!("vu-{}", e.id))
                .spawn(move || serve.run())
                .map_err(listen_err)?
        };
        tracing::info!(export = %e.id, socket = %e.socket, size = limits.size, "export listening");
        Ok(ExportServer {
            plan,
            socket,
            stop,
            vmms,
            links,
            cfg,
            dev,
            zones,
            num_queues,
            shared_plan,
            refusal,
            thread: Some(thread),
            failover: Some(failover),
        })
    }

    /// Why the last VMM that connected was refused, if it was (and no VMM
    /// was accepted since).
    pub fn vmm_refusal(&self) -> Option<String> {
        lock(&self.refusal).clone()
    }

    /// The size in bytes the export serves.
    pub fn size(&self) -> u64 {
        lock(&self.cfg).limits.size
    }

    /// The links to the workers serving the export's queues (a job
    /// request goes to queue 0's).
    pub fn links(&self) -> Arc<WorkerLinks> {
        Arc::clone(&self.links)
    }

    /// What a zone command runs against; `None` when the graph is not
    /// zoned.
    pub fn zone_target(&self) -> Option<crate::zones::ZoneTarget> {
        let cfg = lock(&self.cfg);
        if !cfg.is_zoned() {
            return None;
        }
        Some(crate::zones::ZoneTarget {
            links: Arc::clone(&self.links),
            info: cfg.limits.zones.unwrap_or_default(),
            capacity: cfg.limits.size,
        })
    }

    /// Whether `new` differs from the served plan only in its graph (node
    /// options, sizes, its root node after a snapshot: a new generation),
    /// so it can be reopened live.
    pub fn can_reopen(&self, new: &ExportPlan) -> bool {
        let same_but_root =
            |a: &Option<VhostUserBlkExport>, b: &Option<VhostUserBlkExport>| match (a, b) {
                (Some(a), Some(b)) => {
                    a == &VhostUserBlkExport {
                        node: a.node.clone(),
                        ..b.clone()
                    }
                }
                _ => a == b,
            };
        same_but_root(&self.plan.export, &new.export)
            && self.plan.queues == new.queues
            && (self.plan.nodes != new.nodes || self.plan.generation != new.generation)
    }

    /// Reopens the graph with `new`'s nodes, live, like QEMU's
    /// blockdev-reopen: the new graph is opened on the workers, the queues
    /// drain and switch over, the device takes the new limits, and a VMM
    /// that gave us its back-end channel is told when the config space
    /// (the capacity) changed. On failure the old graph keeps serving.
    pub fn reopen(&mut self, new: ExportPlan) -> Result<(), LiveChangeError> {
        let nq = self.num_queues;
        let close_first = exclusive_graph(&self.plan) || exclusive_graph(&new);
        let limits = std::cell::Cell::new(None);
        let open = |mem: Option<MemRef<'_>>| {
            stage_when_free(&new, nq, mem, close_first).map(|(staged, l)| {
                limits.set(Some(l));
                staged
            })
        };
        let old_plan = &self.plan;
        let reopen_old = |mem: Option<MemRef<'_>>| {
            stage_when_free(old_plan, nq, mem, close_first).map(|(staged, _)| staged)
        };
        let old_cfg = lock(&self.cfg).clone();
        let new_cfg = |l| BlkConfig {
            limits: l,
            ..old_cfg.clone()
        };
        let device = self.vmms.current();
        let applied = match &device {
            Some(d) => {
                let mut d = lock(d);
                d.host_mut().reopen(close_first, &open, &reopen_old, || {
                    if let Some(l) = limits.get() {
                        let cfg = new_cfg(l);
                        self.dev.update(&cfg);
                        self.zones.update(&cfg);
                    }
                })?;
                let cfg = new_cfg(limits.get().unwrap_or(old_cfg.limits));
                d.set_config(cfg.clone());
                cfg
            }
            None => {
                // No VMM: nothing is in flight.
                if close_first {
                    drop(self.links.swap(StagedLinks::empty()));
                }
                match open(None) {
                    Ok(staged) => drop(self.links.swap(staged)),
                    Err(e) => {
                        if close_first {
                            let old = reopen_old(None).map_err(LiveChangeError::Open)?;
                            drop(self.links.swap(old));
                        }
                        return Err(LiveChangeError::Open(e));
                    }
                }
                let cfg = new_cfg(limits.get().unwrap_or(old_cfg.limits));
                self.dev.update(&cfg);
                self.zones.update(&cfg);
                cfg
            }
        };
        let changed = applied.config_space() != old_cfg.config_space();
        let mut new = new;
        new.commit_finish.clear();
        *lock(&self.cfg) = applied;
        *lock(&self.shared_plan) = new.clone();
        self.plan = new;
        if changed {
            if let Some(chan) = self.vmms.backend() {
                match backend_channel::notify_config_change(&chan) {
                    Ok(()) => tracing::info!(export = %self.id(), "VMM told of the config change"),
                    Err(e) => {
                        tracing::warn!(export = %self.id(), "config-change notification: {e}")
                    }
                }
            }
        }
        Ok(())
    }

    fn id(&self) -> &str {
        self.plan.export.as_ref().map_or("", |e| e.id.as_str())
    }

    /// Whether `new` differs from the served plan only in where queues run.
    pub fn only_placement_changed(&self, new: &ExportPlan) -> bool {
        self.plan.export == new.export
            && self.plan.nodes == new.nodes
            && self.plan.queues != new.queues
    }

    /// Moves the queues whose worker changed in `new`, live.
    pub fn apply_placement(&mut self, new: ExportPlan) -> Result<(), LiveChangeError> {
        let device = self.vmms.current();
        // An exclusive graph cannot be open on two workers at once: all its
        // queues drain and move together (unless a queue's worker is gone,
        // which the per-queue failover below handles: the old worker, dead,
        // holds nothing any more).
        let any_lost = device.as_ref().is_some_and(|d| {
            let d = lock(d);
            (0..self.num_queues).any(|q| d.host().worker_lost(q))
        });
        if exclusive_graph(&new) && !any_lost {
            return self.reopen(new);
        }
        for ep in &new.queues {
            if self.links.worker_socket(ep.queue).as_deref() == Some(ep.worker_socket.as_str()) {
                continue;
            }
            let moved = match &device {
                Some(d) => lock(d).host_mut().move_queue(
                    ep.queue,
                    Destination {
                        worker: &ep.worker,
                        socket: &ep.worker_socket,
                        plan: &new,
                    },
                ),
                None => self
                    .links
                    .retarget(ep.queue, &ep.worker, &ep.worker_socket, &new, None)
                    .map_err(RelocationError::Link),
            };
            moved.map_err(|source| LiveChangeError::Move {
                queue: ep.queue,
                worker: ep.worker.clone(),
                source: Box::new(source),
            })?;
            tracing::info!(queue = ep.queue, worker = %ep.worker, "queue moved");
        }
        let mut new = new;
        new.commit_finish.clear();
        *lock(&self.shared_plan) = new.clone();
        self.plan = new;
        Ok(())
    }

    /// Stops serving: disconnects the VMM, stops the queues, removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.vmms.shutdown_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.failover.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for ExportServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The export's accept loop: each VMM connection is served on a thread
/// of its own ([`ConnCtx::serve`]).
struct Serve {
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    conn: ConnCtx,
}

/// What a VMM connection is served with.
#[derive(Clone)]
struct ConnCtx {
    id: String,
    cfg: Arc<Mutex<BlkConfig>>,
    dev: Arc<DeviceInfo>,
    zones: Arc<ZoneLimits>,
    links: Arc<WorkerLinks>,
    vmms: Arc<Connections>,
    controls: Arc<QueueControls>,
    /// The export's plan, shared with the failover thread.
    plan: Arc<Mutex<ExportPlan>>,
    on_hang: HangReporter,
    on_refusal: RefusalReporter,
}

impl Serve {
    fn run(self) {
        let id = &self.conn.id;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            threads.retain(|t| !t.is_finished());
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, PollTimeout::from(200u16)), Ok(n) if n > 0) {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!(export = %id, "accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if let Err(e) = stream.set_nonblocking(false) {
                tracing::warn!(export = %id, "socket mode: {e}");
                continue;
            }
            let ctx = self.conn.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vmm-{id}"))
                .spawn(move || ctx.serve(stream));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(export = %id, "cannot serve a VMM connection: {e}"),
            }
        }
        // The export stops: its connections were shut down.
        for t in threads {
            let _ = t.join();
        }
    }
}

impl ConnCtx {
    /// Serves one VMM connection until it ends.
    fn serve(self, stream: UnixStream) {
        let id = &self.id;
        let Ok(kept) = stream.try_clone() else {
            tracing::warn!(export = %id, "cannot keep the VMM's socket");
            return;
        };
        let conn = self.vmms.next_id();
        let others = self.vmms.count();
        tracing::info!(export = %id, conn, others, "VMM connected");
        let cfg = lock(&self.cfg).clone();
        let queues = WorkerQueues::new(
            id.clone(),
            &cfg,
            Arc::clone(&self.dev),
            Arc::clone(&self.zones),
            Arc::clone(&self.links),
            Arc::clone(&self.controls),
            Arc::clone(&self.on_hang),
        )
        .with_owner(self.vmms.owner(), conn)
        .with_plan(Arc::clone(&self.plan));
        let device = Arc::new(Mutex::new(DeviceHandler::new(
            id.clone(),
            cfg,
            Arc::clone(&self.on_refusal),
            queues,
        )));
        self.vmms.add(conn, Arc::clone(&device), kept);
        let peek = stream.try_clone();
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&device));
        loop {
            // SET_BACKEND_REQ_FD is ours to take (see backend_channel).
            match peek.as_ref().map(backend_channel::take) {
                Ok(Ok(Some(chan))) => {
                    tracing::debug!(export = %id, conn, "VMM gave its back-end channel");
                    self.vmms.set_backend(conn, chan);
                    continue;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(export = %id, conn, "vhost-user connection closed: {e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!(export = %id, conn, "cannot watch the vhost-user socket: {e}");
                    break;
                }
            }
            if let Err(e) = handler.handle_request() {
                match e {
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage => {
                        tracing::info!(export = %id, conn, "VMM disconnected")
                    }
                    e => tracing::warn!(export = %id, conn, "vhost-user connection closed: {e}"),
                }
                break;
            }
        }
        drop(handler);
        lock(&device).disconnect();
        self.vmms.remove(conn);
    }
}

/// How often a queue whose worker was lost tries its replacement again.
const FAILOVER_RETRY: Duration = Duration::from_millis(50);

/// Watches an export's worker links and moves the queues of a worker that
/// died (its link hung up), hung (a queue saw requests in flight and no
/// completion nor heartbeat within the worker timeout) or broke a ring (a
/// queue distrusts it) — the last two fenced first — to the worker the plan
/// names for them: the same one once its supervisor restarted it, or the
/// one the manager reassigned them to. In-flight requests are resubmitted;
/// the guest sees latency, not errors.
struct Failover {
    id: String,
    links: Arc<WorkerLinks>,
    current: Arc<Connections>,
    /// Where a lost worker's queues are stopped at once, without the
    /// device's lock (the vhost-user thread may hold it, waiting for them).
    controls: Arc<QueueControls>,
    plan: Arc<Mutex<ExportPlan>>,
    stop: Arc<AtomicBool>,
    hangs: std::sync::mpsc::Receiver<(u16, WorkerFault)>,
}

impl Failover {
    fn run(self) {
        let id = &self.id;
        // Queue → when its worker was lost.
        let mut lost: std::collections::BTreeMap<u32, std::time::Instant> = Default::default();
        let mut next_try = std::time::Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let watched = self.links.watched();
            // Links a call already found dead need no poll.
            let (mut hung_up, watched): (Vec<_>, Vec<_>) =
                watched.into_iter().partition(|w| w.dead);
            // Look more often while queues wait for their replacement.
            let wait_ms: u16 = match (hung_up.is_empty(), lost.is_empty()) {
                (false, _) => 0,
                (true, true) => 100,
                (true, false) => 20,
            };
            if watched.is_empty() {
                std::thread::sleep(Duration::from_millis(wait_ms.into()));
            } else {
                let mut fds: Vec<PollFd> = watched
                    .iter()
                    .map(|w| PollFd::new(w.fd.as_fd(), PollFlags::empty()))
                    .collect();
                if poll(&mut fds, PollTimeout::from(wait_ms)).is_ok_and(|n| n > 0) {
                    let bad = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
                    for (w, fd) in watched.iter().zip(&fds) {
                        if fd.revents().is_some_and(|r| r.intersects(bad)) {
                            hung_up.push(w.clone());
                        }
                    }
                }
            }
            while let Ok((q, why)) = self.hangs.try_recv() {
                match self.links.link_of(q as u32) {
                    // Killing it makes its link hang up: the next round
                    // fails its queues over. A corrupt worker goes the same
                    // way: it may still write guest memory, so its
                    // requests are resubmitted only once it is dead.
                    Some(link) if self.links.fence(link) => {}
                    Some(_) => {
                        tracing::error!(export = %id, queue = q, ?why, "worker cannot be fenced (pid unknown); its queues wait")
                    }
                    None => {}
                }
            }
            for w in hung_up {
                let queues = self.links.mark_dead(w.id);
                tracing::warn!(export = %id, worker = %w.worker, ?queues, "worker lost");
                for &q in &queues {
                    self.controls.mark_lost(q);
                }
                let now = std::time::Instant::now();
                for q in queues {
                    lost.entry(q).or_insert(now);
                }
                next_try = now;
            }
            if lost.is_empty() || std::time::Instant::now() < next_try {
                continue;
            }
            next_try = std::time::Instant::now() + FAILOVER_RETRY;
            let plan = lock(&self.plan).clone();
            let device = self.current.current();
            lost.retain(|&q, since| {
                let Some(to) = Destination::of_queue(&plan, q) else {
                    return true;
                };
                // A move of the queue (a new placement) may have failed it
                // over already; a second fail-over would resubmit requests
                // that its new worker is doing. Checked under the device's
                // lock, which a move holds.
                let moved = match &device {
                    Some(d) => {
                        let mut d = lock(d);
                        if !self.links.serves_dead(q) && !d.host().worker_lost(q) {
                            Ok(())
                        } else {
                            d.host_mut().fail_over(q, to).map_err(|e| e.to_string())
                        }
                    }
                    None if !self.links.serves_dead(q) => Ok(()),
                    None => self
                        .links
                        .retarget(q, to.worker, to.socket, to.plan, None)
                        .map_err(|e| e.to_string()),
                };
                match moved {
                    Ok(()) => {
                        tracing::info!(
                            export = %id,
                            queue = q,
                            worker = %to.worker,
                            recovery_ms = since.elapsed().as_millis() as u64,
                            "queue recovered"
                        );
                        false
                    }
                    Err(e) => {
                        tracing::debug!(export = %id, queue = q, "failover not yet possible: {e}");
                        true
                    }
                }
            });
        }
    }
}
