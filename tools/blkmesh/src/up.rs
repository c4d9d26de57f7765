//! `blkmesh up`: prepare the directory, start the processes, add the
//! default disk (or let the manager apply a configuration file), print how
//! to connect, supervise, stop cleanly.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use blkmesh_graph::config::Config;

use crate::banner::{Banner, BannerExport};
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

/// A configuration file, checked.
#[derive(Debug)]
pub struct ConfigFile {
    /// Absolute path, as given to the manager.
    pub path: PathBuf,
    pub config: Config,
}

impl ConfigFile {
    /// Reads and checks the file as `blkmeshctl config check` does.
    pub fn load(path: &Path) -> Result<ConfigFile, Error> {
        let config = blkmesh_graph::config::check(path).map_err(|errors| Error::Config {
            file: path.display().to_string(),
            errors,
        })?;
        Ok(ConfigFile {
            path: absolute(path)?,
            config,
        })
    }

    /// The export sockets of the file.
    fn sockets(&self) -> Vec<PathBuf> {
        self.config
            .exports()
            .iter()
            .map(|e| PathBuf::from(&e.export.socket))
            .collect()
    }
}

/// The directory and the files in it.
#[derive(Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
    /// The default disk's image (not created with a configuration file).
    pub image: PathBuf,
    pub image_size: u64,
    /// The default disk's socket.
    pub socket: PathBuf,
    /// Every export socket: the default disk's, or the configuration file's.
    pub export_sockets: Vec<PathBuf>,
    pub worker_sockets: Vec<PathBuf>,
    _lock: Flock<File>,
}

impl Layout {
    /// Creates the directories, takes the directory lock and creates the
    /// image if it is absent (with a configuration file: the directories of
    /// its export sockets instead; the manager creates its images).
    pub fn prepare(args: &UpArgs, config: Option<&ConfigFile>) -> Result<Layout, Error> {
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
        let socket = match &args.socket {
            Some(p) => absolute(p)?,
            None => dir.join("disk0.sock"),
        };
        let (image_size, export_sockets) = match config {
            Some(c) => {
                // The frontend creates the sockets, not their directories.
                let sockets = c.sockets();
                for s in &sockets {
                    if let Some(parent) = s.parent() {
                        create_dir(parent)?;
                    }
                }
                (0, sockets)
            }
            None if args.null => (args.size, vec![socket.clone()]),
            None => (ensure_image(&image, args.size)?, vec![socket.clone()]),
        };
        let worker_sockets: Vec<PathBuf> = (0..args.workers)
            .map(|i| dir.join(format!("worker{i}.sock")))
            .collect();
        for s in export_sockets.iter().chain(&worker_sockets) {
            check_socket_path(s)?;
        }
        Ok(Layout {
            dir,
            state,
            logs,
            image,
            image_size,
            socket,
            export_sockets,
            worker_sockets,
            _lock: lock,
        })
    }

    /// Removes the sockets the processes may have left behind.
    fn remove_sockets(&self) {
        for s in self.export_sockets.iter().chain(&self.worker_sockets) {
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

/// The workers' user: `--worker-user` when blkmesh runs as root (and it is
/// not root itself), else none.
fn worker_identity(args: &UpArgs) -> Result<Option<blkmesh_sandbox::Identity>, Error> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    let id = blkmesh_sandbox::resolve_identity(&args.worker_user).map_err(Error::WorkerUser)?;
    Ok((!id.uid.is_root()).then_some(id))
}

/// Makes the images the workers open accessible to their user: the ones
/// blkmesh creates (the default disk, a configuration's `create` images,
/// made by the root manager) are given to it; any other must already be
/// readable (and writable, unless read-only) by it.
fn give_images_to_worker(
    args: &UpArgs,
    layout: &Layout,
    config: Option<&ConfigFile>,
    id: &blkmesh_sandbox::Identity,
) -> Result<(), Error> {
    use blkmesh_proto::v1::node_spec::Driver;
    let mut images: Vec<(PathBuf, bool, bool)> = Vec::new(); // path, ours, read-only
    match config {
        Some(c) => {
            for n in c.config.nodes() {
                if let Some(Driver::IoUring(o)) = &n.spec.driver {
                    images.push((PathBuf::from(&o.path), n.create.is_some(), o.read_only));
                }
            }
        }
        None if args.null => {}
        None => images.push((layout.image.clone(), args.image.is_none(), false)),
    }
    for (path, ours, read_only) in images {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // The manager reports a missing image.
        };
        if let Some(dir) = closed_ancestor(&path, id) {
            return Err(Error::WorkerCannotReach {
                path,
                dir,
                user: id.name.clone(),
            });
        }
        if ours && meta.is_file() && meta.uid() == 0 {
            std::os::unix::fs::chown(&path, Some(id.uid.as_raw()), Some(id.gid.as_raw())).map_err(
                |source| Error::GiveToWorker {
                    path: path.clone(),
                    user: id.name.clone(),
                    source,
                },
            )?;
            continue;
        }
        let bits = bits_for(&meta, id) & 0o6;
        let need = if read_only { 0o4 } else { 0o6 };
        if bits & need != need {
            return Err(Error::NotForWorker {
                path,
                user: id.name.clone(),
                need: if read_only {
                    "readable"
                } else {
                    "readable and writable"
                },
            });
        }
    }
    Ok(())
}

/// The permission bits (`rwx`, low three bits) `meta` grants `id`.
fn bits_for(meta: &std::fs::Metadata, id: &blkmesh_sandbox::Identity) -> u32 {
    (if meta.uid() == id.uid.as_raw() {
        meta.mode() >> 6
    } else if meta.gid() == id.gid.as_raw() {
        meta.mode() >> 3
    } else {
        meta.mode()
    }) & 0o7
}

/// The first directory above `path` that `id` may not search (a checkout
/// under root's 0700 home, say): the worker could not open the image.
fn closed_ancestor(path: &Path, id: &blkmesh_sandbox::Identity) -> Option<PathBuf> {
    path.ancestors().skip(1).find_map(|dir| {
        let meta = std::fs::metadata(dir).ok()?;
        (bits_for(&meta, id) & 0o1 == 0).then(|| dir.to_path_buf())
    })
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

/// TLS and token options of the whole process set (absolute paths).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Manager certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA the clients verify the manager with.
    pub ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl Security {
    fn from_args(args: &UpArgs) -> Result<Security, Error> {
        let abs = |p: &Option<PathBuf>| p.as_deref().map(absolute).transpose();
        let cert = abs(&args.tls_cert)?;
        let key = abs(&args.tls_key)?;
        let tls = cert.zip(key);
        let ca = match abs(&args.tls_ca)? {
            Some(ca) => Some(ca),
            // A self-signed certificate is its own CA.
            None => tls.as_ref().map(|(cert, _)| cert.clone()),
        };
        Ok(Security {
            tls,
            ca,
            token_file: abs(&args.token_file)?,
        })
    }

    /// `http://` or `https://`.
    fn url(&self, addr: SocketAddr) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    }

    /// Extra arguments of the manager.
    fn manager_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        if let Some((cert, key)) = &self.tls {
            v.extend([
                "--tls-cert".into(),
                cert.into(),
                "--tls-key".into(),
                key.into(),
            ]);
        }
        if let Some(t) = &self.token_file {
            v.extend(["--token-file".into(), t.into()]);
        }
        v
    }

    /// Extra arguments of the workers and the frontend.
    fn client_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        if let Some(ca) = &self.ca {
            v.extend(["--manager-ca".into(), ca.into()]);
        }
        if let Some(t) = &self.token_file {
            v.extend(["--token-file".into(), t.into()]);
        }
        v
    }

    /// The same options in blkmeshctl's spelling, for the banner.
    fn ctl_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(ca) = &self.ca {
            v.extend(["--ca".to_string(), ca.display().to_string()]);
        }
        if let Some(t) = &self.token_file {
            v.extend(["--token-file".to_string(), t.display().to_string()]);
        }
        v
    }

    /// The supervisor's own connection to the manager at `url`.
    fn client_config(&self, url: &str) -> blkmesh_proto::client::ClientConfig {
        blkmesh_proto::client::ClientConfig {
            url: url.to_string(),
            ca_file: self.ca.clone(),
            token_file: self.token_file.clone(),
            ..Default::default()
        }
    }
}

/// Where the manager's nodes and exports come from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// The default disk, added through the API.
    Default,
    /// A configuration file the manager applies at every start.
    Config { file: &'a ConfigFile, prune: bool },
}

/// Arguments of the manager.
fn manager_args(
    layout: &Layout,
    listen: SocketAddr,
    security: &Security,
    source: Source<'_>,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "--state-dir".into(),
        layout.state.clone().into(),
        "--listen".into(),
        listen.to_string().into(),
    ];
    if let Source::Config { file, prune } = source {
        v.extend(["--config".into(), file.path.clone().into()]);
        if prune {
            v.push("--config-prune".into());
        }
    }
    v.extend(security.manager_args());
    v
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
    security: Security,
    exports: Vec<BannerExport>,
    notes: Vec<String>,
    workers: Vec<String>,
}

/// Starts the manager and reads its address from its log.
async fn start_manager(
    set: &mut ProcessSet,
    idx: usize,
    layout: &Layout,
    security: &Security,
    source: Source<'_>,
) -> Result<SocketAddr, Error> {
    let log = set.procs[idx].log().to_path_buf();
    let offset = process::file_len(&log);
    set.procs[idx].spawn()?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(addr) = parse_listening(&process::read_from(&log, offset)) {
            // Restarts must come back on the same address.
            set.procs[idx].set_args(manager_args(layout, addr, security, source));
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

/// A BannerExport of what the manager lists.
fn banner_export(info: &blkmesh_proto::v1::ExportInfo) -> BannerExport {
    let e = info.export.clone().unwrap_or_default();
    BannerExport {
        id: e.id,
        socket: PathBuf::from(e.socket),
        ready: false,
        size: info.size,
        queues: e.num_queues.max(1),
        writable: e.writable,
    }
}

/// Waits (at most [`SOCKET_TIMEOUT`] in all) for the frontend to create
/// every export's socket, marking the ones that appear.
async fn wait_sockets(
    exports: &mut [BannerExport],
    set: &mut ProcessSet,
    layout: &Layout,
) -> Result<(), Error> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        for e in exports.iter_mut() {
            e.ready = e.ready || e.socket.exists();
        }
        if exports.iter().all(|e| e.ready) {
            return Ok(());
        }
        set.startup_check()?;
        if Instant::now() >= deadline {
            for e in exports.iter().filter(|e| !e.ready) {
                tracing::warn!(
                    "the frontend did not create {} within {SOCKET_TIMEOUT:?}; see {}",
                    e.socket.display(),
                    layout.logs.join("frontend.log").display()
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(
    args: &UpArgs,
    bins: &Binaries,
    layout: &Layout,
    set: &mut ProcessSet,
    config: Option<&ConfigFile>,
) -> Result<Ready, Error> {
    let source = match config {
        Some(file) => Source::Config {
            file,
            prune: args.config_prune,
        },
        None => Source::Default,
    };
    let security = Security::from_args(args)?;
    // Fail on an unreadable CA or token file before starting anything.
    security
        .client_config(&security.url(args.listen))
        .check()
        .map_err(|source| Error::Endpoint {
            addr: security.url(args.listen),
            source,
        })?;
    let m = set.push(Supervised::new(
        "manager",
        Role::Manager,
        &bins.manager,
        manager_args(layout, args.listen, &security, source),
        &layout.logs,
    ));
    let addr = start_manager(set, m, layout, &security, source).await?;
    let manager_url = security.url(addr);
    tracing::info!("manager listening on {addr}");

    let worker_user = worker_identity(args)?;
    if let Some(id) = &worker_user {
        give_images_to_worker(args, layout, config, id)?;
    }
    let mut workers = Vec::new();
    for (i, sock) in layout.worker_sockets.iter().enumerate() {
        let name = format!("worker{i}");
        let mut worker_args: Vec<OsString> = vec![
            "--name".into(),
            name.clone().into(),
            "--socket".into(),
            sock.clone().into(),
            "--manager".into(),
            manager_url.clone().into(),
        ];
        worker_args.extend(security.client_args());
        if let Some(id) = &worker_user {
            // Bound as root (0600, root's: only the frontend connects),
            // then the worker switches.
            worker_args.extend(["--user".into(), format!("{}:{}", id.uid, id.gid).into()]);
        }
        let w = set.push(Supervised::new(
            &name,
            Role::Worker,
            &bins.worker,
            worker_args,
            &layout.logs,
        ));
        set.procs[w].spawn()?;
        workers.push(name);
    }
    let mut frontend_args: Vec<OsString> = vec![
        "--manager".into(),
        manager_url.clone().into(),
        "--name".into(),
        "frontend0".into(),
    ];
    frontend_args.extend(security.client_args());
    let f = set.push(Supervised::new(
        "frontend",
        Role::Frontend,
        &bins.frontend,
        frontend_args,
        &layout.logs,
    ));
    set.procs[f].spawn()?;

    let channel = provision::channel(security.client_config(&manager_url))?;
    provision::wait_workers_alive(&channel, &workers, set, STARTUP_TIMEOUT).await?;
    tracing::info!("workers alive: {}", workers.join(", "));

    let (mut exports, notes) = match config {
        Some(file) => {
            let ids: Vec<String> = file
                .config
                .exports()
                .iter()
                .map(|e| e.export.id.clone())
                .collect();
            let listed =
                provision::wait_config_exports(&channel, &ids, set, STARTUP_TIMEOUT).await?;
            tracing::info!("exports of {}: {}", file.path.display(), ids.join(", "));
            let notes = listed
                .others
                .iter()
                .map(|id| {
                    format!(
                        "export {id} is not in the configuration file; kept from an earlier \
                         run (--config-prune removes it)"
                    )
                })
                .collect();
            (listed.exports.iter().map(banner_export).collect(), notes)
        }
        None => {
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
            let mut export = banner_export(&provisioned.export);
            if export.socket.as_os_str().is_empty() {
                export.socket = layout.socket.clone();
            }
            if export.size == 0 {
                export.size = layout.image_size;
            }
            (vec![export], provisioned.notes)
        }
    };
    wait_sockets(&mut exports, set, layout).await?;
    Ok(Ready {
        manager_url,
        security,
        exports,
        notes,
        workers,
    })
}

/// Runs `blkmesh up` until a termination signal; then stops everything.
pub async fn run(args: UpArgs) -> Result<(), Error> {
    // A configuration file is checked before anything is created or started.
    let config = args.config.as_deref().map(ConfigFile::load).transpose()?;
    let mut signals = Signals::new()?;
    let bins = Binaries::locate()?;
    let layout = Layout::prepare(&args, config.as_ref())?;
    let mut set = ProcessSet::default();

    let started = tokio::select! {
        r = start(&args, &bins, &layout, &mut set, config.as_ref()) => r.map(Some),
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

    let ctl_args = ready.security.ctl_args();
    let banner = Banner {
        exports: &ready.exports,
        config: config.as_ref().map(|c| c.path.as_path()),
        image: config.is_none().then_some(layout.image.as_path()),
        workers: &ready.workers,
        manager_url: &ready.manager_url,
        ctl_args: &ctl_args,
        dir: &layout.dir,
        blkmesh_io: bins.io.clone(),
        blkmeshctl: bins.ctl.clone(),
        notes: &ready.notes,
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
            config: None,
            config_prune: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            token_file: None,
            worker_user: crate::cli::DEFAULT_WORKER_USER.to_string(),
        }
    }

    #[test]
    fn images_go_to_the_worker_user_or_are_refused() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "needs root (as the CI runs): it changes file owners"
        );
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut args = up_args(tmp.path());
        let id = worker_identity(&args)
            .unwrap()
            .expect("root gets a worker user");
        // A directory the workers cannot search (a checkout in root's
        // home): refused up front, naming it.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let layout = Layout::prepare(&args, None).unwrap();
        match give_images_to_worker(&args, &layout, None, &id) {
            Err(Error::WorkerCannotReach { dir, .. }) => assert_eq!(dir, tmp.path()),
            other => panic!("a 0700 directory: {other:?}"),
        }
        drop(layout);
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!((id.uid.as_raw(), id.gid.as_raw()), (64055, 64055));
        // The default image, created by blkmesh: given to the workers.
        let layout = Layout::prepare(&args, None).unwrap();
        give_images_to_worker(&args, &layout, None, &id).unwrap();
        let meta = std::fs::metadata(&layout.image).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (64055, 64055));
        drop(layout);
        // Somebody else's image is not taken over but refused.
        let theirs = tmp.path().join("theirs.img");
        std::fs::write(&theirs, [0u8; 512]).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o644)).unwrap();
        args.image = Some(theirs.clone());
        let layout = Layout::prepare(&args, None).unwrap();
        assert!(matches!(
            give_images_to_worker(&args, &layout, None, &id),
            Err(Error::NotForWorker { .. })
        ));
        assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 0);
        // `--worker-user root` keeps the workers root.
        args.worker_user = "root".into();
        assert!(worker_identity(&args).unwrap().is_none());
    }

    #[test]
    fn security_options_reach_every_process() {
        let tmp = tempfile::tempdir().unwrap();
        let mut args = up_args(tmp.path());
        let none = Security::from_args(&args).unwrap();
        let addr: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(none.url(addr), "http://127.0.0.1:5");
        assert!(none.manager_args().is_empty() && none.client_args().is_empty());

        args.tls_cert = Some(PathBuf::from("/k/cert.pem"));
        args.tls_key = Some(PathBuf::from("/k/key.pem"));
        args.token_file = Some(PathBuf::from("/k/token"));
        let sec = Security::from_args(&args).unwrap();
        assert_eq!(sec.url(addr), "https://127.0.0.1:5");
        let strs = |v: Vec<OsString>| -> Vec<String> {
            v.into_iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            strs(sec.manager_args()),
            [
                "--tls-cert",
                "/k/cert.pem",
                "--tls-key",
                "/k/key.pem",
                "--token-file",
                "/k/token"
            ]
        );
        // A self-signed certificate is its own CA.
        assert_eq!(
            strs(sec.client_args()),
            ["--manager-ca", "/k/cert.pem", "--token-file", "/k/token"]
        );
        assert_eq!(
            sec.ctl_args(),
            ["--ca", "/k/cert.pem", "--token-file", "/k/token"]
        );
        args.tls_ca = Some(PathBuf::from("/k/ca.pem"));
        let sec = Security::from_args(&args).unwrap();
        assert_eq!(strs(sec.client_args())[1], "/k/ca.pem");
        let cfg = sec.client_config("https://127.0.0.1:5");
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/k/ca.pem")));
        assert_eq!(cfg.token_file, Some(PathBuf::from("/k/token")));
    }

    #[test]
    fn a_config_replaces_the_default_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let path = base.join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[[node]]\nname = \"n\"\nnull = {{ size = \"1M\" }}\n\
                 [[export]]\nid = \"e\"\nnode = \"n\"\nsocket = \"{}/socks/e.sock\"\n",
                base.display()
            ),
        )
        .unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let mut args = up_args(&base.join("run"));
        args.config = Some(path.clone());
        let layout = Layout::prepare(&args, Some(&file)).unwrap();
        // The sockets' directory exists; no default image was made.
        assert!(base.join("socks").is_dir());
        assert!(!layout.image.exists());
        assert_eq!(layout.export_sockets, [base.join("socks/e.sock")]);
        let strs = |v: Vec<OsString>| -> Vec<String> {
            v.into_iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        };
        let addr: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let sec = Security::default();
        let with = strs(manager_args(
            &layout,
            addr,
            &sec,
            Source::Config {
                file: &file,
                prune: true,
            },
        ));
        let path = path.display().to_string();
        assert_eq!(with[4..], ["--config", path.as_str(), "--config-prune"]);
        let without = strs(manager_args(&layout, addr, &sec, Source::Default));
        assert_eq!(without.len(), 4);

        // A broken file is an error naming its line and field.
        std::fs::write(base.join("bad.toml"), "[[node]]\nname = 1\n").unwrap();
        let e = ConfigFile::load(&base.join("bad.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("bad.toml:2:8: node[0].name"), "{e}");
    }

    #[test]
    fn layout_defaults_live_in_dir_and_lock_it() {
        let tmp = tempfile::tempdir().unwrap();
        let args = up_args(&tmp.path().join("run"));
        let layout = Layout::prepare(&args, None).unwrap();
        let dir = tmp.path().join("run").canonicalize().unwrap();
        assert_eq!(layout.image, dir.join("disk0.img"));
        assert_eq!(layout.socket, dir.join("disk0.sock"));
        assert_eq!(layout.worker_sockets[1], dir.join("worker1.sock"));
        assert!(layout.state.is_dir() && layout.logs.is_dir());
        assert_eq!(std::fs::metadata(&layout.image).unwrap().len(), 1 << 20);
        assert!(matches!(
            Layout::prepare(&args, None),
            Err(Error::AlreadyRunning { .. })
        ));
        drop(layout);
        assert!(Layout::prepare(&args, None).is_ok());
    }
}
