//! One export: its vhost-user socket, its worker links, and the VMM
//! connection it serves (one at a time; a VMM may disconnect and reconnect).

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use blkmesh_proto::v1::ExportPlan;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::BackendReqHandler;

use crate::config::BlkConfig;
use crate::device::BlkDevice;
use crate::request::{DeviceInfo, ID_BYTES};
use crate::workers::{LinkError, WorkerLinks};

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

/// A served export.
pub struct ExportServer {
    pub plan: ExportPlan,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    /// The device of the connected VMM, if any.
    device: CurrentDevice,
    links: Arc<WorkerLinks>,
    thread: Option<JoinHandle<()>>,
}

type CurrentDevice = Arc<Mutex<Option<Arc<Mutex<BlkDevice>>>>>;

impl ExportServer {
    /// Opens the graph on the workers and starts listening for the VMM.
    pub fn start(plan: ExportPlan) -> Result<ExportServer, ExportError> {
        let e = plan.export.clone().ok_or(ExportError::NoExport)?;
        let num_queues = e.num_queues.clamp(1, 64);
        let (links, limits) = WorkerLinks::open(&plan, num_queues).map_err(ExportError::Workers)?;
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
            capacity: limits.size,
            writable: !cfg.read_only(),
            max_discard_sectors: cfg.max_discard_sectors(),
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors(),
            max_segments: crate::config::RING_MAX_SEGMENTS as usize,
            serial,
            stats: (0..num_queues)
                .map(|q| crate::stats().queue(&e.id, q))
                .collect(),
        });
        let socket = PathBuf::from(&e.socket);
        let _ = std::fs::remove_file(&socket);
        let listen_err = |source| ExportError::Listen {
            path: e.socket.clone(),
            source,
        };
        let listener = UnixListener::bind(&socket).map_err(listen_err)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let links = Arc::new(links);
        let device: CurrentDevice = Arc::new(Mutex::new(None));
        let thread = {
            let stop = Arc::clone(&stop);
            let conn = Arc::clone(&conn);
            let device = Arc::clone(&device);
            let links = Arc::clone(&links);
            let id = e.id.clone();
            std::thread::Builder::new()
                .name(format!("vu-{id}"))
                .spawn(move || serve(listener, id, cfg, dev, links, stop, conn, device))
                .map_err(listen_err)?
        };
        tracing::info!(export = %e.id, socket = %e.socket, size = limits.size, "export listening");
        Ok(ExportServer {
            plan,
            socket,
            stop,
            conn,
            device,
            links,
            thread: Some(thread),
        })
    }

    /// Whether `new` differs from the served plan only in where queues run.
    pub fn only_placement_changed(&self, new: &ExportPlan) -> bool {
        self.plan.export == new.export
            && self.plan.nodes == new.nodes
            && self.plan.queues != new.queues
    }

    /// Moves the queues whose worker changed in `new`, live.
    pub fn apply_placement(&mut self, new: ExportPlan) -> Result<(), String> {
        let device = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ep in &new.queues {
            if self.links.worker_socket(ep.queue).as_deref() == Some(ep.worker_socket.as_str()) {
                continue;
            }
            let moved = match &device {
                Some(d) => d.lock().unwrap_or_else(|p| p.into_inner()).move_queue(
                    ep.queue,
                    &ep.worker,
                    &ep.worker_socket,
                    &new,
                ),
                None => self
                    .links
                    .retarget(ep.queue, &ep.worker, &ep.worker_socket, &new, None)
                    .map_err(|e| e.to_string()),
            };
            moved.map_err(|e| format!("queue {} to {}: {e}", ep.queue, ep.worker))?;
            tracing::info!(queue = ep.queue, worker = %ep.worker, "queue moved");
        }
        self.plan = new;
        Ok(())
    }

    /// Stops serving: disconnects the VMM, stops the queues, removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
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

#[allow(clippy::too_many_arguments)]
fn serve(
    listener: UnixListener,
    id: String,
    cfg: BlkConfig,
    dev: Arc<DeviceInfo>,
    links: Arc<WorkerLinks>,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    current: CurrentDevice,
) {
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::from(200u16)), Ok(n) if n > 0) {
            continue;
        }
        let stream = match listener.accept() {
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
        tracing::info!(export = %id, "VMM connected");
        *conn.lock().unwrap_or_else(|p| p.into_inner()) = stream.try_clone().ok();
        let device = Arc::new(Mutex::new(BlkDevice::new(
            id.clone(),
            cfg.clone(),
            Arc::clone(&dev),
            Arc::clone(&links),
        )));
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&device));
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&device));
        loop {
            if let Err(e) = handler.handle_request() {
                match e {
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage => {
                        tracing::info!(export = %id, "VMM disconnected")
                    }
                    e => tracing::warn!(export = %id, "vhost-user connection closed: {e}"),
                }
                break;
            }
        }
        drop(handler);
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .disconnect();
        *conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
