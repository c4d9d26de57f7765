//! A worker process in a thread: it speaks the worker's control protocol
//! (open, memory table, attach, detach) and serves the shared-memory rings
//! against a disk in memory. Several fake workers may share one disk, so a
//! queue that moves finds the data it wrote.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use blkmesh_ipc::channel::{Channel, ChannelError, ChannelListener};
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{Completion, Op, QueueRings, Received, RingLayout};
use blkmesh_proto::ipc::v1 as ipc;
use ipc::reply::Result as Reply;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The bytes behind every fake worker of a test.
pub type Disk = Arc<Mutex<Vec<u8>>>;

pub fn disk(bytes: usize) -> Disk {
    Arc::new(Mutex::new(vec![0; bytes]))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a fake worker behaves; shared with its threads, so a test may
/// change it while the worker runs.
#[derive(Default)]
pub struct Behaviour {
    /// Requests wait this long before they complete.
    pub delay: Mutex<Duration>,
    /// Requests are taken but never completed (a worker about to die).
    pub hold: AtomicBool,
    /// OpenExport of a plan with this generation is refused.
    pub refuse_generation: Mutex<Option<u64>>,
    /// AttachQueue on connections opened with this generation is refused.
    pub refuse_attach_generation: Mutex<Option<u64>>,
}

/// What a fake worker saw.
#[derive(Default)]
pub struct Counters {
    /// OpenExport messages, refused ones included.
    pub open_attempts: AtomicU64,
    /// Graphs opened.
    pub opens: AtomicU64,
    pub attaches: AtomicU64,
    pub settled_attaches: AtomicU64,
    pub detaches: AtomicU64,
    /// Data requests (reads and writes) completed.
    pub served: AtomicU64,
}

pub struct FakeWorker {
    pub name: String,
    pub socket: PathBuf,
    pub behaviour: Arc<Behaviour>,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeWorker {
    /// Listens on `socket` (replacing a stale one) and serves `disk`.
    pub fn start(name: &str, socket: &Path, disk: Disk) -> FakeWorker {
        let _ = std::fs::remove_file(socket);
        let fd = blkmesh_sandbox::SocketPolicy::global()
            .listen_unix(socket, blkmesh_sandbox::UnixSocketKind::SeqPacket, 16)
            .expect("listen");
        let listener = ChannelListener::from_listening(fd);
        let behaviour = Arc::new(Behaviour::default());
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (behaviour, counters, stop) = (
                Arc::clone(&behaviour),
                Arc::clone(&counters),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    if !matches!(poll(&mut fds, PollTimeout::from(10u16)), Ok(n) if n > 0) {
                        continue;
                    }
                    let Ok(ch) = listener.accept() else { continue };
                    let conn = Connection {
                        ch,
                        disk: Arc::clone(&disk),
                        behaviour: Arc::clone(&behaviour),
                        counters: Arc::clone(&counters),
                        stop: Arc::clone(&stop),
                        ram: None,
                        generation: 0,
                        queues: HashMap::new(),
                    };
                    conns.push(std::thread::spawn(move || conn.run()));
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        FakeWorker {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            behaviour,
            counters,
            stop,
            accept: Some(accept),
        }
    }

    pub fn socket_str(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// Dies: stops listening, closes every connection and abandons what
    /// it holds (nothing more completes).
    pub fn kill(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One frontend connection.
struct Connection {
    ch: Channel,
    disk: Disk,
    behaviour: Arc<Behaviour>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    ram: Option<Arc<GuestRam>>,
    /// The generation of the plan this connection opened.
    generation: u64,
    queues: HashMap<u32, (Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Connection {
    fn run(mut self) {
        let _ = self.ch.set_timeout(Some(Duration::from_millis(10)));
        while !self.stop.load(Ordering::Acquire) {
            let (req, fds): (ipc::Request, _) = match self.ch.recv() {
                Ok(m) => m,
                Err(ChannelError::Timeout) => continue,
                Err(_) => break,
            };
            let result = self.handle(req.msg, fds);
            let reply = ipc::Reply {
                result: Some(result),
                id: req.id,
            };
            if self.ch.send(&reply, &[]).is_err() {
                break;
            }
        }
        for (_, (stop, thread)) in self.queues.drain() {
            stop.store(true, Ordering::Release);
            let _ = thread.join();
        }
    }

    fn handle(&mut self, msg: Option<ipc::request::Msg>, fds: Vec<std::fs::File>) -> Reply {
        use ipc::request::Msg;
        let refuse = |message: &str| {
            Reply::Failure(ipc::Failure {
                errno: libc::EIO,
                message: message.to_string(),
            })
        };
        match msg {
            Some(Msg::Open(o)) => {
                self.counters.open_attempts.fetch_add(1, Ordering::Relaxed);
                self.generation = o.plan.as_ref().map_or(0, |p| p.generation);
                if *lock(&self.behaviour.refuse_generation) == Some(self.generation) {
                    return refuse("this generation does not open");
                }
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                Reply::Opened(ipc::Opened {
                    limits: Some(ipc::Limits {
                        size: lock(&self.disk).len() as u64,
                        logical_block_size: 512,
                        physical_block_size: 512,
                        request_alignment: 512,
                        buf_alignment: 1,
                        ..Default::default()
                    }),
                })
            }
            Some(Msg::SetMemTable(t)) => {
                let specs: Vec<RegionSpec> = t.regions.iter().map(RegionSpec::from).collect();
                match GuestRam::map(&specs, fds) {
                    Ok(ram) => {
                        self.ram = Some(Arc::new(ram));
                        Reply::Ok(ipc::Ok {})
                    }
                    Err(e) => refuse(&e.to_string()),
                }
            }
            Some(Msg::AttachQueue(a)) => {
                if *lock(&self.behaviour.refuse_attach_generation) == Some(self.generation) {
                    return refuse("attach refused");
                }
                let Some(ram) = self.ram.clone() else {
                    return refuse("attach before the memory table");
                };
                let Ok([ring, kick, call]) = <[std::fs::File; 3]>::try_from(fds) else {
                    return refuse("attach takes three fds");
                };
                let layout = RingLayout::new(a.entries, a.max_segments).expect("layout");
                let rings = QueueRings::attach(ring, layout).expect("ring");
                let kick = Doorbell::from_peer(kick).expect("kick");
                let call = Doorbell::from_peer(call).expect("call");
                self.counters.attaches.fetch_add(1, Ordering::Relaxed);
                if a.settle {
                    self.counters
                        .settled_attaches
                        .fetch_add(1, Ordering::Relaxed);
                }
                let stop = Arc::new(AtomicBool::new(false));
                let queue = QueueServer {
                    rings,
                    kick,
                    call,
                    ram,
                    disk: Arc::clone(&self.disk),
                    behaviour: Arc::clone(&self.behaviour),
                    counters: Arc::clone(&self.counters),
                    stop: Arc::clone(&stop),
                    dying: Arc::clone(&self.stop),
                };
                let thread = std::thread::spawn(move || queue.run());
                if let Some((old, t)) = self.queues.insert(a.queue, (stop, thread)) {
                    old.store(true, Ordering::Release);
                    let _ = t.join();
                }
                Reply::Ok(ipc::Ok {})
            }
            Some(Msg::DetachQueue(d)) => {
                if let Some((stop, thread)) = self.queues.remove(&d.queue) {
                    stop.store(true, Ordering::Release);
                    let _ = thread.join();
                }
                self.counters.detaches.fetch_add(1, Ordering::Relaxed);
                Reply::Ok(ipc::Ok {})
            }
            Some(Msg::Zone(_) | Msg::Job(_)) | None => refuse("not supported"),
        }
    }
}

/// One attached queue.
struct QueueServer {
    rings: QueueRings,
    kick: Doorbell,
    call: Doorbell,
    ram: Arc<GuestRam>,
    disk: Disk,
    behaviour: Arc<Behaviour>,
    counters: Arc<Counters>,
    /// Detached: finish what is in flight, then stop.
    stop: Arc<AtomicBool>,
    /// The worker died: stop at once, completing nothing.
    dying: Arc<AtomicBool>,
}

impl QueueServer {
    fn run(self) {
        let (mut rx, mut tx) = self.rings.worker_end();
        // Taken requests with when they may complete.
        let mut pending: Vec<(std::time::Instant, Completion)> = Vec::new();
        loop {
            if self.dying.load(Ordering::Acquire) {
                return;
            }
            tx.beat();
            let stopping = self.stop.load(Ordering::Acquire);
            let mut progress = false;
            if !stopping {
                while let Ok(Some(r)) = rx.pop() {
                    progress = true;
                    let c = match r {
                        Received::Request(req, segs) => Completion {
                            tag: req.tag,
                            result: self.serve(req.op, req.offset, segs),
                            extra: 0,
                        },
                        Received::Bad(b) => Completion {
                            tag: b.tag.unwrap_or(0),
                            result: -libc::EINVAL,
                            extra: 0,
                        },
                    };
                    let due = std::time::Instant::now() + *lock(&self.behaviour.delay);
                    pending.push((due, c));
                }
                rx.release();
            }
            if !self.behaviour.hold.load(Ordering::Acquire) {
                let now = std::time::Instant::now();
                pending.retain(|(due, c)| {
                    if *due > now {
                        return true;
                    }
                    tx.push(*c).expect("completion ring");
                    progress = true;
                    false
                });
                if tx.publish() {
                    self.call.ring();
                }
            }
            if stopping && pending.is_empty() {
                return;
            }
            if progress {
                continue;
            }
            if !stopping && !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if !stopping && !rx.prepare_sleep() {
                continue;
            }
            let mut fds = [PollFd::new(self.kick.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(10u16));
            self.kick.clear();
            rx.woke();
        }
    }

    /// Does the I/O at once (the completion may wait); 0 or -errno.
    fn serve(&self, op: Op, offset: u64, segs: &[blkmesh_ipc::ring::Segment]) -> i32 {
        let mut disk = lock(&self.disk);
        let mut at = offset as usize;
        for seg in segs {
            let Ok(buf) = self.ram.buf(seg) else {
                return -libc::EFAULT;
            };
            let Some(range) = disk.get_mut(at..at + buf.len()) else {
                return -libc::EIO;
            };
            match op {
                Op::Read => buf.copy_from(range),
                Op::Write => buf.copy_to(range),
                _ => 0,
            };
            at += buf.len();
        }
        if matches!(op, Op::Read | Op::Write) {
            self.counters.served.fetch_add(1, Ordering::Relaxed);
        }
        0
    }
}
