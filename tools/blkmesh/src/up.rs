//! `blkmesh up`: prepare the directory, start the processes, add the
//! default disk, print how to connect, supervise, stop cleanly.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::banner::Banner;
use crate::cli::UpArgs;
use crate::error::Error;
use crate::process::{self, ProcessSet, Role, Supervised, STOP_GRACE};
use crate::provision::{self, DiskWish};
use crate::signals::Signals;

/// Line the manager prints on stdout once it listens.
const LISTENING: &str = "blkmesh-manager listening on ";
/// Bound on each startup wait.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the frontend to create the export socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor looks for exited processes.
const TICK: Duration = Duration::from_millis(200);
/// Longest unix socket path (sun_path minus the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The sibling binaries.
#[derive(Debug)]
pub struct Binaries {
    pub manager: PathBuf,
    pub worker: PathBuf,
    pub frontend: PathBuf,
    pub io: PathBuf,
    pub ctl: PathBuf,
}

impl Binaries {
    /// Finds the binaries next to this executable (or in `$BLKMESH_BIN_DIR`).
    pub fn locate() -> Result<Binaries, Error> {
        let dir = match std::env::var_os("BLKMESH_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe().map_err(Error::CurrentExe)?;
                exe.parent().map(Path::to_path_buf).unwrap_or_default()
            }
        };
        let required = |name: &'static str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::MissingBinary { name, path })
            }
        };
        Ok(Binaries {
            manager: required("blkmesh-manager")?,
            worker: required("blkmesh-worker")?,
            frontend: required("blkmesh-frontend")?,
            io: dir.join("blkmesh-io"),
            ctl: dir.join("blkmeshctl"),
        })
    }
}

/// The directory and the files in it.
#[derive(Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
    pub image: PathBuf,
    pub image_size: u64,
    pub socket: PathBuf,
    pub worker_sockets: Vec<PathBuf>,
    _lock: Flock<File>,
}

impl Layout {
    /// Creates the directories, takes the directory lock and creates the
    /// image if it is absent.
    pub fn prepare(args: &UpArgs) -> Result<Layout, Error> {
        let dir = absolute(&args.dir)?;
        create_dir(&dir)?;
        let dir = dir.canonicalize().map_err(|source| Error::Path {
            path: dir.clone(),
            source,
        })?;
        let state = dir.join("state");
        let logs = dir.join("logs");
        create_dir(&state)?;
        create_dir(&logs)?;

        let lock_path = dir.join("blkmesh.lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::Lock {
                path: lock_path.clone(),
                source,
            })?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Error::AlreadyRunning { dir: dir.clone() })
            }
            Err((_, errno)) => {
                return Err(Error::Lock {
                    path: lock_path,
                    source: errno.into(),
                })
            }
        };

        let image = match &args.image {
            Some(p) => absolute(p)?,
            None => dir.join("disk0.img"),
        };
        let image_size = if args.null {
            args.size
        } else {
            ensure_image(&image, args.size)?
        };
        let socket = match &args.socket {
            Some(p) => absolute(p)?,
            None => dir.join("disk0.sock"),
        };
        let worker_sockets: Vec<PathBuf> = (0..args.workers)
            .map(|i| dir.join(format!("worker{i}.sock")))
            .collect();
        for s in std::iter::once(&socket).chain(&worker_sockets) {
            check_socket_path(s)?;
        }
        Ok(Layout {
            dir,
            state,
            logs,
            image,
            image_size,
            socket,
            worker_sockets,
            _lock: lock,
        })
    }

    /// Removes the sockets the processes may have left behind.
    fn remove_sockets(&self) {
        for s in std::iter::once(&self.socket).chain(&self.worker_sockets) {
            match std::fs::symlink_metadata(s) {
                Ok(m) if m.file_type().is_socket() => {
                    if let Err(e) = std::fs::remove_file(s) {
                        tracing::warn!("cannot remove {}: {e}", s.display());
                    }
                }
                _ => {}
            }
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(p).map_err(|source| Error::Path {
        path: p.to_path_buf(),
        source,
    })
}

fn create_dir(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p).map_err(|source| Error::CreateDir {
        path: p.to_path_buf(),
        source,
    })
}

/// Creates a sparse image of `size` bytes unless one exists; returns its size.
fn ensure_image(path: &Path, size: u64) -> Result<u64, Error> {
    let err = |source| Error::CreateImage {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return Ok(m.len()),
        Ok(m) if m.file_type().is_block_device() => return Ok(block_device_size(path)),
        Ok(_) => {
            return Err(Error::ImageNotAFile {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    file.set_len(size).map_err(err)?;
    tracing::info!(image = %path.display(), size, "created a sparse image");
    Ok(size)
}

/// A block device's size from seeking to its end (0 if unknown).
fn block_device_size(path: &Path) -> u64 {
    use std::io::{Seek, SeekFrom};
    File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .unwrap_or(0)
}

fn check_socket_path(p: &Path) -> Result<(), Error> {
    let len = p.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::SocketPathTooLong {
            path: p.to_path_buf(),
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    Ok(())
}

/// Arguments of the manager.
fn manager_args(layout: &Layout, listen: SocketAddr) -> Vec<OsString> {
    vec![
        "--state-dir".into(),
        layout.state.clone().into(),
        "--listen".into(),
        listen.to_string().into(),
    ]
}

/// The address in the manager's "listening on" line, if printed.
fn parse_listening(text: &str) -> Option<SocketAddr> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(LISTENING))
        .and_then(|a| a.trim().parse().ok())
}

/// What startup produced.
#[derive(Debug)]
struct Ready {
    manager_url: String,
    provisioned: provision::Provisioned,
    socket: PathBuf,
    socket_ready: bool,
    workers: Vec<String>,
}

/// Starts the manager and reads its address from its log.
async fn start_manager(
    set: &mut ProcessSet,
    idx: usize,
    layout: &Layout,
) -> Result<SocketAddr, Error> {
    let log = set.procs[idx].log().to_path_buf();
    let offset = process::file_len(&log);
    set.procs[idx].spawn()?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(addr) = parse_listening(&process::read_from(&log, offset)) {
            // Restarts must come back on the same address.
            set.procs[idx].set_args(manager_args(layout, addr));
            return Ok(addr);
        }
        set.startup_check()?;
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("the manager to listen (see {})", log.display()),
                timeout: STARTUP_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(
    args: &UpArgs,
    bins: &Binaries,
    layout: &Layout,
    set: &mut ProcessSet,
) -> Result<Ready, Error> {
    let m = set.push(Supervised::new(
        "manager",
        Role::Manager,
        &bins.manager,
        manager_args(layout, args.listen),
        &layout.logs,
    ));
    let addr = start_manager(set, m, layout).await?;
    let manager_url = format!("http://{addr}");
    tracing::info!("manager listening on {addr}");

    let mut workers = Vec::new();
    for (i, sock) in layout.worker_sockets.iter().enumerate() {
        let name = format!("worker{i}");
        let w = set.push(Supervised::new(
            &name,
            Role::Worker,
            &bins.worker,
            vec![
                "--name".into(),
                name.clone().into(),
                "--socket".into(),
                sock.clone().into(),
                "--manager".into(),
                manager_url.clone().into(),
            ],
            &layout.logs,
        ));
        set.procs[w].spawn()?;
        workers.push(name);
    }
    let f = set.push(Supervised::new(
        "frontend",
        Role::Frontend,
        &bins.frontend,
        vec![
            "--manager".into(),
            manager_url.clone().into(),
            "--name".into(),
            "frontend0".into(),
        ],
        &layout.logs,
    ));
    set.procs[f].spawn()?;

    let channel = provision::channel(&manager_url)?;
    provision::wait_workers_alive(&channel, &workers, set, STARTUP_TIMEOUT).await?;
    tracing::info!("workers alive: {}", workers.join(", "));

    let provisioned = provision::ensure_disk(
        &channel,
        &DiskWish {
            image: &layout.image,
            null_size: args.null.then_some(args.size),
            spread: args.spread,
            socket: &layout.socket,
            queues: args.queues,
        },
    )
    .await?;
    let socket = provisioned
        .export
        .export
        .as_ref()
        .map(|e| PathBuf::from(&e.socket))
        .unwrap_or_else(|| layout.socket.clone());

    let deadline = Instant::now() + SOCKET_TIMEOUT;
    let socket_ready = loop {
        if socket.exists() {
            break true;
        }
        set.startup_check()?;
        if Instant::now() >= deadline {
            tracing::warn!(
                "the frontend did not create {} within {SOCKET_TIMEOUT:?}; see {}",
                socket.display(),
                layout.logs.join("frontend.log").display()
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok(Ready {
        manager_url,
        provisioned,
        socket,
        socket_ready,
        workers,
    })
}

/// Runs `blkmesh up` until a termination signal; then stops everything.
pub async fn run(args: UpArgs) -> Result<(), Error> {
    let mut signals = Signals::new()?;
    let bins = Binaries::locate()?;
    let layout = Layout::prepare(&args)?;
    let mut set = ProcessSet::default();

    let started = tokio::select! {
        r = start(&args, &bins, &layout, &mut set) => r.map(Some),
        sig = signals.recv() => {
            tracing::info!("{sig} during startup; stopping");
            Ok(None)
        }
    };
    let ready = match started {
        Ok(Some(ready)) => ready,
        Ok(None) => {
            shutdown(&mut set, &mut signals, &layout).await;
            return Ok(());
        }
        Err(e) => {
            shutdown(&mut set, &mut signals, &layout).await;
            return Err(e);
        }
    };

    let export = ready.provisioned.export.export.clone().unwrap_or_default();
    let banner = Banner {
        socket: &ready.socket,
        socket_ready: ready.socket_ready,
        image: &layout.image,
        size: if ready.provisioned.export.size > 0 {
            ready.provisioned.export.size
        } else {
            layout.image_size
        },
        queues: export.num_queues.max(1),
        writable: export.writable,
        workers: &ready.workers,
        manager_url: &ready.manager_url,
        dir: &layout.dir,
        blkmesh_io: bins.io.clone(),
        blkmeshctl: bins.ctl.clone(),
        notes: &ready.provisioned.notes,
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the supervisor.
        let _ = out.write_all(banner.render().as_bytes());
        let _ = out.flush();
    }

    let sig = loop {
        tokio::select! {
            sig = signals.recv() => break sig,
            () = tokio::time::sleep(TICK) => set.tick(),
        }
    };
    tracing::info!("{sig}: stopping");
    shutdown(&mut set, &mut signals, &layout).await;
    Ok(())
}

async fn shutdown(set: &mut ProcessSet, signals: &mut Signals, layout: &Layout) {
    let killed = set.stop(signals, STOP_GRACE).await;
    layout.remove_sockets();
    if killed.is_empty() {
        tracing::info!("stopped");
    } else {
        tracing::warn!("stopped; killed: {}", killed.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_manager_listening_line() {
        assert_eq!(
            parse_listening("x\nblkmesh-manager listening on 127.0.0.1:5\n"),
            Some("127.0.0.1:5".parse().unwrap())
        );
        assert_eq!(parse_listening("blkmesh-manager listening on"), None);
    }

    #[test]
    fn creates_sparse_image_once() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sub/disk.img");
        assert_eq!(ensure_image(&img, 1 << 20).unwrap(), 1 << 20);
        // An existing image keeps its size.
        assert_eq!(ensure_image(&img, 4 << 20).unwrap(), 1 << 20);
        assert!(matches!(
            ensure_image(dir.path(), 512),
            Err(Error::ImageNotAFile { .. })
        ));
    }

    #[test]
    fn rejects_overlong_socket_path() {
        let long = PathBuf::from(format!("/{}", "a".repeat(120)));
        assert!(matches!(
            check_socket_path(&long),
            Err(Error::SocketPathTooLong { len: 121, .. })
        ));
        assert!(check_socket_path(Path::new("/run/blkmesh/disk0.sock")).is_ok());
    }

    fn up_args(dir: &Path) -> UpArgs {
        UpArgs {
            dir: dir.to_path_buf(),
            image: None,
            size: 1 << 20,
            socket: None,
            workers: 2,
            queues: 1,
            null: false,
            spread: false,
            listen: "127.0.0.1:0".parse().unwrap(),
        }
    }

    #[test]
    fn layout_defaults_live_in_dir_and_lock_it() {
        let tmp = tempfile::tempdir().unwrap();
        let args = up_args(&tmp.path().join("run"));
        let layout = Layout::prepare(&args).unwrap();
        let dir = tmp.path().join("run").canonicalize().unwrap();
        assert_eq!(layout.image, dir.join("disk0.img"));
        assert_eq!(layout.socket, dir.join("disk0.sock"));
        assert_eq!(layout.worker_sockets[1], dir.join("worker1.sock"));
        assert!(layout.state.is_dir() && layout.logs.is_dir());
        assert_eq!(std::fs::metadata(&layout.image).unwrap().len(), 1 << 20);
        assert!(matches!(
            Layout::prepare(&args),
            Err(Error::AlreadyRunning { .. })
        ));
        drop(layout);
        assert!(Layout::prepare(&args).is_ok());
    }
}
