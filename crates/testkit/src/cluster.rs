//! A running set of blkmesh processes in a temporary directory.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use blkmesh_proto::client::ClientConfig;
use blkmesh_proto::v1::{ExportInfo, NodeInfo, VhostUserBlkExport, WorkerInfo, WorkerState};
use tempfile::TempDir;

use crate::client::{BlockingClient, ClientError};
use crate::process::{self, Proc};
use crate::{bin_path, tool};

/// Marker the manager prints on stdout once it listens.
const LISTENING: &str = "blkmesh-manager listening on ";
/// How long a stopping process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Set (non-empty, not "0") to keep cluster directories after the test.
pub const KEEP_ENV: &str = "BLKMESH_TEST_KEEP";
/// How long [`Cluster::add_export`] waits for the socket file.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of workers, named `worker0`, `worker1`, … (default 2).
    pub workers: usize,
    /// Start the frontend (default true).
    pub frontend: bool,
    /// `RUST_LOG` for every process (default: the test's `$RUST_LOG`, else `info`).
    pub rust_log: String,
    /// Bound on each startup wait: the manager's address, workers ALIVE (default 15 s).
    pub startup_timeout: Duration,
    /// Children get SIGKILL when the thread that spawned them exits
    /// (PR_SET_PDEATHSIG), so an aborted test run leaves no orphans. Turn it
    /// off to share a cluster between threads (default true).
    pub die_with_parent: bool,
    /// Extra environment for every process (e.g. `BLKMESH_WORKER_TIMEOUT_MS`).
    pub env: Vec<(String, String)>,
    /// The manager's `--worker-grace-ms` (default: none given, the
    /// manager's own default of 3 s).
    pub worker_grace_ms: Option<u64>,
    /// The manager serves TLS with this certificate (PEM) and `tls_key`;
    /// every process and the clients then use `https://` (default: none).
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA certificate the processes and clients verify the manager with
    /// (default: `tls_cert` itself, for a self-signed certificate).
    pub tls_ca: Option<PathBuf>,
    /// The manager requires client certificates signed by this CA (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Client certificate (PEM) every process and client presents.
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Bearer token the manager requires; written to `<dir>/token` and
    /// given to every process and client (default: none).
    pub token: Option<String>,
    /// Every process starts with this umask (default: the test's own).
    pub umask: Option<u32>,
    /// Start the frontend directly as this `(uid, gid)` (no supplementary
    /// groups), the way a container's `user:` does, instead of as the
    /// test's user. The cluster directory becomes traversable (0711),
    /// `run/` is given to that uid, and the workers get `--socket-owner UID`
    /// so that the frontend can connect to them (default: none).
    pub frontend_uid: Option<(u32, u32)>,
    /// The workers' `--user USER[:GROUP]`: they start as the test's user,
    /// bind their socket and switch (default: none).
    pub worker_user: Option<String>,
    /// Extra arguments of the manager (e.g. `--unix PATH`).
    pub manager_args: Vec<OsString>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: 2,
            frontend: true,
            rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string()),
            startup_timeout: Duration::from_secs(15),
            die_with_parent: true,
            env: Vec::new(),
            worker_grace_ms: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_client_ca: None,
            client_cert: None,
            client_key: None,
            token: None,
            umask: None,
            frontend_uid: None,
            worker_user: None,
            manager_args: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// Sets the number of workers.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Starts (or not) the frontend.
    pub fn frontend(mut self, on: bool) -> Self {
        self.frontend = on;
        self
    }

    /// Sets an environment variable for every process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the manager's `--worker-grace-ms`.
    pub fn worker_grace_ms(mut self, ms: u64) -> Self {
        self.worker_grace_ms = Some(ms);
        self
    }

    /// Serves the manager over TLS with `cert` and `key`; everyone verifies
    /// it with `ca` (PEM files).
    pub fn tls(mut self, cert: &Path, key: &Path, ca: &Path) -> Self {
        self.tls_cert = Some(cert.to_path_buf());
        self.tls_key = Some(key.to_path_buf());
        self.tls_ca = Some(ca.to_path_buf());
        self
    }

    /// Requires client certificates signed by `client_ca`; every process
    /// and client presents `cert` and `key`. Needs [`ClusterOptions::tls`].
    pub fn mutual_tls(mut self, client_ca: &Path, cert: &Path, key: &Path) -> Self {
        self.tls_client_ca = Some(client_ca.to_path_buf());
        self.client_cert = Some(cert.to_path_buf());
        self.client_key = Some(key.to_path_buf());
        self
    }

    /// Requires the bearer token `token` on every manager call.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// Starts every process with umask `mask`.
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Starts the frontend as `uid`:`gid` (see [`ClusterOptions::frontend_uid`]).
    pub fn frontend_uid(mut self, uid: u32, gid: u32) -> Self {
        self.frontend_uid = Some((uid, gid));
        self
    }

    /// Gives the workers `--user spec`.
    pub fn worker_user(mut self, spec: &str) -> Self {
        self.worker_user = Some(spec.to_string());
        self
    }

    /// Adds an argument of the manager.
    pub fn manager_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.manager_args.push(arg.into());
        self
    }

    /// Runs every process under `BLKMESH_SECCOMP=enforce`: a system call
    /// outside its allow-list kills it (as in the deployments).
    pub fn seccomp_enforce(self) -> Self {
        self.env("BLKMESH_SECCOMP", "enforce")
    }
}

/// An export to add with [`Cluster::add_export`]. Zero fields take the
/// manager's defaults.
#[derive(Debug, Clone, Default)]
pub struct ExportOpts {
    pub id: String,
    pub node: String,
    /// Socket path (default `<cluster dir>/run/<id>.sock`).
    pub socket: Option<PathBuf>,
    pub num_queues: u32,
    pub queue_size: u32,
    pub writable: bool,
    pub logical_block_size: u32,
    pub serial: String,
    /// Spread the queues over the workers.
    pub spread_queues: bool,
}

impl ExportOpts {
    /// A read-only, single-queue export of `node` with defaults.
    pub fn new(id: &str, node: &str) -> Self {
        ExportOpts {
            id: id.to_string(),
            node: node.to_string(),
            ..ExportOpts::default()
        }
    }

    /// Spreads the queues over the workers.
    pub fn spread(mut self) -> Self {
        self.spread_queues = true;
        self
    }

    /// Makes the export writable.
    pub fn writable(mut self) -> Self {
        self.writable = true;
        self
    }

    /// Sets the number of queues.
    pub fn queues(mut self, n: u32) -> Self {
        self.num_queues = n;
        self
    }
}

/// The manager, `workers` workers and (optionally) the frontend, started from
/// the real binaries in a temporary directory:
///
/// ```text
/// <dir>/state/     manager state (state.json)
/// <dir>/run/       worker<i>.sock, export sockets
/// <dir>/logs/      <process>.log: stdout + stderr of every incarnation
/// ```
///
/// Dropping it stops every process (frontend, then workers, then manager:
/// SIGTERM, up to 2 s each, then SIGKILL) and removes the directory. When
/// dropped during a panic it prints every log to stderr first.
#[derive(Debug)]
pub struct Cluster {
    opts: ClusterOptions,
    manager_addr: Option<SocketAddr>,
    manager: Option<Proc>,
    workers: Vec<Option<Proc>>,
    frontend: Option<Proc>,
    client: Option<BlockingClient>,
    // Dropped last: the processes must be stopped before their dir goes.
    dir: TempDir,
}

impl Cluster {
    /// Starts the processes and waits (bounded) until the manager listens
    /// and every worker is ALIVE.
    ///
    /// # Panics
    ///
    /// On any startup failure, after printing the logs.
    pub fn start(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("blkmesh-test.")
            .tempdir()
            .unwrap_or_else(|e| panic!("blkmesh-testkit: cannot create a temp dir: {e}"));
        for sub in ["state", "run", "logs"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap_or_else(|e| {
                panic!(
                    "blkmesh-testkit: cannot create {}: {e}",
                    dir.path().join(sub).display()
                )
            });
        }
        if let Some((uid, _)) = opts.frontend_uid {
            // The frontend (not root) must reach run/ and bind its export
            // sockets there; nothing else in the directory is opened to it.
            let give = || -> std::io::Result<()> {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
                std::os::unix::fs::chown(dir.path().join("run"), Some(uid), None)
            };
            give().unwrap_or_else(|e| {
                panic!("blkmesh-testkit: cannot open the cluster directory to uid {uid}: {e}")
            });
        }
        if let Some(token) = &opts.token {
            let path = dir.path().join("token");
            write_private(&path, token.as_bytes()).unwrap_or_else(|e| {
                panic!("blkmesh-testkit: cannot write {}: {e}", path.display())
            });
        }
        // Resolve every binary before starting anything.
        bin_path("blkmesh-manager");
        if opts.workers > 0 {
            bin_path("blkmesh-worker");
        }
        if opts.frontend {
            bin_path("blkmesh-frontend");
        }
        let mut cluster = Cluster {
            workers: (0..opts.workers).map(|_| None).collect(),
            opts,
            manager_addr: None,
            manager: None,
            frontend: None,
            client: None,
            dir,
        };
        // Failures panic; Drop then dumps the logs and stops what started.
        cluster.start_manager();
        for i in 0..cluster.workers.len() {
            cluster.start_worker(i);
        }
        if cluster.opts.frontend {
            cluster.start_frontend();
        }
        cluster.wait_workers_alive();
        if cluster.opts.frontend {
            cluster.wait_frontend_registered();
        }
        cluster
    }

    /// Waits (startup timeout) until the manager has logged the frontend's
    /// registration, so that AddExport right after start waits for the
    /// frontend's report instead of finding no frontend.
    ///
    /// # Panics
    ///
    /// On timeout.
    pub fn wait_frontend_registered(&self) {
        let deadline = std::time::Instant::now() + self.opts.startup_timeout;
        let log = self.log_path("manager");
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("frontend registered") {
                return;
            }
            if std::time::Instant::now() >= deadline {
                self.dump_logs();
                panic!("blkmesh-testkit: the frontend did not register with the manager");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    // ----- paths -----

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/run`: worker and export sockets.
    pub fn run_dir(&self) -> PathBuf {
        self.dir().join("run")
    }

    /// `<dir>/state`: the manager's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// Log file of a process: `"manager"`, `"frontend"` or `"worker<i>"`.
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir().join("logs").join(format!("{process}.log"))
    }

    /// Every log file that exists, with its process name.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        let mut names = vec!["manager".to_string(), "frontend".to_string()];
        names.extend(self.worker_names());
        names
            .into_iter()
            .map(|n| {
                let p = self.log_path(&n);
                (n, p)
            })
            .filter(|(_, p)| p.exists())
            .collect()
    }

    /// Prints every log to stderr.
    pub fn dump_logs(&self) {
        for (name, path) in self.logs() {
            process::dump_log(&name, &path);
        }
    }

    /// Creates a sparse file `<dir>/<name>` of `size` bytes.
    ///
    /// # Panics
    ///
    /// If the file cannot be created.
    pub fn sparse_image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir().join(name);
        let file = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("blkmesh-testkit: create {}: {e}", path.display()));
        file.set_len(size)
            .unwrap_or_else(|e| panic!("blkmesh-testkit: truncate {}: {e}", path.display()));
        path
    }

    // ----- manager -----

    /// The manager's TCP address.
    pub fn manager_addr(&self) -> SocketAddr {
        self.manager_addr
            .unwrap_or_else(|| panic!("blkmesh-testkit: the manager has not started"))
    }

    /// `http://ADDR` of the manager (`https://ADDR` with TLS).
    pub fn manager_url(&self) -> String {
        let scheme = if self.opts.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.manager_addr())
    }

    /// `<dir>/token`, the bearer token file, when the cluster has a token.
    pub fn token_file(&self) -> Option<PathBuf> {
        self.opts.token.as_ref().map(|_| self.dir().join("token"))
    }

    /// How to reach the manager with the cluster's TLS and token options.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            url: self.manager_url(),
            ca_file: self.tls_ca(),
            cert_file: self.opts.client_cert.clone(),
            key_file: self.opts.client_key.clone(),
            token_file: self.token_file(),
            ..ClientConfig::default()
        }
    }

    fn tls_ca(&self) -> Option<PathBuf> {
        self.opts
            .tls_ca
            .clone()
            .or_else(|| self.opts.tls_cert.clone())
    }

    /// `--manager-ca`, `--manager-cert`/`--manager-key` and `--token-file`
    /// for the workers and the frontend.
    fn client_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        if let (Some(_), Some(ca)) = (&self.opts.tls_cert, self.tls_ca()) {
            v.extend(["--manager-ca".into(), ca.into()]);
        }
        if let (Some(cert), Some(key)) = (&self.opts.client_cert, &self.opts.client_key) {
            v.extend([
                "--manager-cert".into(),
                cert.into(),
                "--manager-key".into(),
                key.into(),
            ]);
        }
        if let Some(t) = self.token_file() {
            v.extend(["--token-file".into(), t.into()]);
        }
        v
    }

    /// The blocking gRPC client (reconnected by each manager start).
    pub fn client(&self) -> &BlockingClient {
        self.client.as_ref().unwrap_or_else(|| {
            panic!("blkmesh-testkit: the manager is not running (start_manager() first)")
        })
    }

    /// Pid of the running manager.
    pub fn manager_pid(&mut self) -> Option<u32> {
        running_pid(&mut self.manager)
    }

    /// Starts the manager if it is not running: on 127.0.0.1:0 the first
    /// time, on the same address afterwards (so the other processes find it
    /// again). Waits for its "listening on" line.
    ///
    /// # Panics
    ///
    /// If it exits or prints no address within the startup timeout.
    pub fn start_manager(&mut self) {
        if self.manager.as_mut().is_some_and(Proc::is_running) {
            return;
        }
        let listen = self
            .manager_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let log = self.log_path("manager");
        let offset = process::file_len(&log);
        let mut cmd = self.command("blkmesh-manager");
        cmd.arg("--state-dir")
            .arg(self.state_dir())
            .arg("--listen")
            .arg(listen.to_string());
        if let Some(ms) = self.opts.worker_grace_ms {
            cmd.arg("--worker-grace-ms").arg(ms.to_string());
        }
        if let (Some(cert), Some(key)) = (&self.opts.tls_cert, &self.opts.tls_key) {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            if let Some(ca) = &self.opts.tls_client_ca {
                cmd.arg("--tls-client-ca").arg(ca);
            }
        }
        if let Some(t) = self.token_file() {
            cmd.arg("--token-file").arg(t);
        }
        cmd.args(&self.opts.manager_args);
        self.manager = Some(self.spawn("manager", cmd));
        let addr = self.wait_manager_addr(&log, offset);
        self.manager_addr = Some(addr);
        self.client = Some(
            BlockingClient::with_config(self.client_config())
                .unwrap_or_else(|e| panic!("blkmesh-testkit: gRPC client: {e}")),
        );
    }

    fn wait_manager_addr(&mut self, log: &Path, offset: u64) -> SocketAddr {
        let deadline = Instant::now() + self.opts.startup_timeout;
        loop {
            let text = process::read_from(log, offset);
            if let Some(addr) = parse_listening(&text) {
                return addr;
            }
            if let Some(status) = self.manager.as_mut().and_then(Proc::try_wait) {
                panic!("blkmesh-testkit: the manager exited during startup ({status})");
            }
            if Instant::now() >= deadline {
                panic!(
                    "blkmesh-testkit: the manager printed no {LISTENING:?} line within {:?}",
                    self.opts.startup_timeout
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the manager (a crash).
    pub fn kill_manager(&mut self) {
        self.client = None;
        if let Some(p) = &mut self.manager {
            p.kill();
        }
    }

    /// Stops the manager gracefully (SIGTERM; SIGKILL after 2 s), starts it
    /// again on the same address and waits until every running worker has
    /// re-registered (ALIVE).
    pub fn restart_manager(&mut self) {
        // The client's idle connection would hold up the manager's graceful
        // shutdown (nothing drives it between calls): close it first.
        self.client = None;
        if let Some(p) = &mut self.manager {
            process::stop_all(&mut [p], STOP_GRACE);
        }
        self.start_manager();
        self.wait_workers_alive();
    }

    // ----- workers -----

    /// Names of the cluster's workers, by index.
    pub fn worker_names(&self) -> Vec<String> {
        (0..self.workers.len()).map(worker_name).collect()
    }

    /// Socket path of worker `i`.
    pub fn worker_socket(&self, i: usize) -> PathBuf {
        self.run_dir().join(format!("{}.sock", worker_name(i)))
    }

    /// Pid of worker `i` while it runs.
    pub fn worker_pid(&mut self, i: usize) -> Option<u32> {
        running_pid(self.worker_slot(i))
    }

    /// Starts worker `i` if it is not running (no waiting; see
    /// [`Cluster::wait_workers`]).
    pub fn start_worker(&mut self, i: usize) {
        if self.worker_slot(i).as_mut().is_some_and(Proc::is_running) {
            return;
        }
        let name = worker_name(i);
        let mut cmd = self.command("blkmesh-worker");
        cmd.arg("--name")
            .arg(&name)
            .arg("--socket")
            .arg(self.worker_socket(i))
            .arg("--manager")
            .arg(self.manager_url())
            .args(self.client_args());
        if let Some(user) = &self.opts.worker_user {
            cmd.arg("--user").arg(user);
        }
        if let Some((uid, _)) = self.opts.frontend_uid {
            cmd.arg("--socket-owner").arg(uid.to_string());
        }
        let proc = self.spawn(&name, cmd);
        *self.worker_slot(i) = Some(proc);
    }

    /// SIGKILLs worker `i` (a crash) and reaps it. Its socket file stays.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(p) = self.worker_slot(i) {
            p.kill();
        }
    }

    /// Stops worker `i` gracefully (SIGTERM; SIGKILL after 2 s).
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(p) = self.worker_slot(i) {
            process::stop_all(&mut [p], STOP_GRACE);
        }
    }

    /// SIGKILLs worker `i`, starts it again and waits until it is ALIVE.
    pub fn restart_worker(&mut self, i: usize) {
        self.kill_worker(i);
        self.start_worker(i);
        let name = worker_name(i);
        self.expect_workers(&[name.as_str()], WorkerState::Alive);
    }

    fn worker_slot(&mut self, i: usize) -> &mut Option<Proc> {
        let n = self.workers.len();
        self.workers
            .get_mut(i)
            .unwrap_or_else(|| panic!("blkmesh-testkit: no worker {i} (the cluster has {n})"))
    }

    /// Waits (startup timeout) until every running worker is ALIVE.
    ///
    /// # Panics
    ///
    /// On timeout.
    pub fn wait_workers_alive(&mut self) {
        let names: Vec<String> = (0..self.workers.len())
            .filter(|&i| self.workers[i].as_mut().is_some_and(Proc::is_running))
            .map(worker_name)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.expect_workers(&names, WorkerState::Alive);
    }

    /// Waits until every worker in `names` is in `state`.
    pub fn wait_workers(
        &self,
        names: &[&str],
        state: WorkerState,
        timeout: Duration,
    ) -> Result<Vec<WorkerInfo>, ClientError> {
        self.client().wait_workers(names, state, timeout)
    }

    fn expect_workers(&self, names: &[&str], state: WorkerState) {
        if let Err(e) = self.wait_workers(names, state, self.opts.startup_timeout) {
            panic!("blkmesh-testkit: {e}");
        }
    }

    // ----- frontend -----

    /// Pid of the running frontend.
    pub fn frontend_pid(&mut self) -> Option<u32> {
        running_pid(&mut self.frontend)
    }

    /// Starts the frontend (`frontend0`) if it is not running.
    pub fn start_frontend(&mut self) {
        if self.frontend.as_mut().is_some_and(Proc::is_running) {
            return;
        }
        let mut cmd = self.command("blkmesh-frontend");
        cmd.arg("--manager")
            .arg(self.manager_url())
            .arg("--name")
            .arg("frontend0")
            .args(self.client_args());
        if let Some((uid, gid)) = self.opts.frontend_uid {
            // std drops the supplementary groups when root sets a uid.
            cmd.uid(uid).gid(gid);
        }
        self.frontend = Some(self.spawn("frontend", cmd));
    }

    /// SIGKILLs the frontend (a crash).
    pub fn kill_frontend(&mut self) {
        if let Some(p) = &mut self.frontend {
            p.kill();
        }
    }

    /// Stops the frontend gracefully (SIGTERM; SIGKILL after 2 s).
    pub fn stop_frontend(&mut self) {
        if let Some(p) = &mut self.frontend {
            process::stop_all(&mut [p], STOP_GRACE);
        }
    }

    /// SIGKILLs the frontend and starts it again.
    pub fn restart_frontend(&mut self) {
        self.kill_frontend();
        self.start_frontend();
    }

    // ----- gRPC shortcuts -----

    /// See [`BlockingClient::add_io_uring`].
    pub fn add_io_uring(
        &self,
        name: &str,
        path: &Path,
        direct: bool,
        read_only: bool,
    ) -> Result<NodeInfo, ClientError> {
        self.client().add_io_uring(name, path, direct, read_only)
    }

    /// One worker serving a sparse image of `size` bytes as node `file`,
    /// under node `slow` that holds every request of `ops` for `delay`
    /// ([`crate::delay_node`]): requests in flight for a test to act on.
    /// Returns the cluster and the image path.
    pub fn with_delayed_file(
        size: u64,
        ops: &[blkmesh_proto::v1::IoOp],
        delay: Duration,
    ) -> (Cluster, PathBuf) {
        let cluster = Cluster::start(ClusterOptions::default().workers(1));
        let image = cluster.sparse_image("d.img", size);
        cluster.add_io_uring("file", &image, false, false).unwrap();
        cluster
            .client()
            .add_node(crate::delay_node("slow", "file", ops, delay))
            .unwrap();
        (cluster, image)
    }

    /// See [`BlockingClient::add_null`].
    pub fn add_null(&self, name: &str, size: u64) -> Result<NodeInfo, ClientError> {
        self.client().add_null(name, size)
    }

    /// See [`BlockingClient::add_raw`].
    pub fn add_raw(
        &self,
        name: &str,
        child: &str,
        offset: u64,
        size: u64,
    ) -> Result<NodeInfo, ClientError> {
        self.client().add_raw(name, child, offset, size)
    }

    /// Adds an export and waits (10 s) until its socket file exists. Only
    /// the file is checked: the frontend serves one vhost-user connection
    /// at a time, so a probe connection could get in a test's way.
    pub fn add_export(&self, opts: ExportOpts) -> Result<PathBuf, ClientError> {
        let socket = opts
            .socket
            .unwrap_or_else(|| self.run_dir().join(format!("{}.sock", opts.id)));
        self.client().add_export(VhostUserBlkExport {
            id: opts.id.clone(),
            node: opts.node,
            socket: socket.display().to_string(),
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            logical_block_size: opts.logical_block_size,
            writable: opts.writable,
            serial: opts.serial,
            spread_queues: opts.spread_queues,
        })?;
        if wait_for_path(&socket, true, SOCKET_TIMEOUT) {
            Ok(socket)
        } else {
            Err(ClientError::Timeout {
                what: format!(
                    "the frontend to create export {:?}'s socket {}",
                    opts.id,
                    socket.display()
                ),
                timeout: SOCKET_TIMEOUT,
            })
        }
    }

    /// Removes an export (no waiting for its socket to go).
    pub fn remove_export(&self, id: &str) -> Result<(), ClientError> {
        self.client().remove_export(id)
    }

    /// See [`BlockingClient::list_exports`].
    pub fn list_exports(&self) -> Result<Vec<ExportInfo>, ClientError> {
        self.client().list_exports()
    }

    /// See [`BlockingClient::list_workers`].
    pub fn list_workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        self.client().list_workers()
    }

    // ----- tools -----

    /// Runs a workspace binary (e.g. `blkmesh-io`) to completion, killing
    /// it after [`tool::DEFAULT_TOOL_TIMEOUT`]; see [`tool::run_tool`].
    pub fn run_tool<I, S>(&self, bin: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        tool::run_tool(bin, args)
    }

    /// Runs `blkmeshctl --addr <manager> ARGS…` (with `--ca`, `--cert`,
    /// `--key` and `--token-file` when the cluster has them).
    pub fn ctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let url = self.manager_url();
        let mut all: Vec<std::ffi::OsString> = vec!["--addr".into(), url.into()];
        if let (Some(_), Some(ca)) = (&self.opts.tls_cert, self.tls_ca()) {
            all.extend(["--ca".into(), ca.into()]);
        }
        if let (Some(cert), Some(key)) = (&self.opts.client_cert, &self.opts.client_key) {
            all.extend(["--cert".into(), cert.into(), "--key".into(), key.into()]);
        }
        if let Some(t) = self.token_file() {
            all.extend(["--token-file".into(), t.into()]);
        }
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        tool::run_tool("blkmeshctl", all)
    }

    // ----- internals -----

    fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(bin_path(bin));
        cmd.env("RUST_LOG", &self.opts.rust_log)
            .env("NO_COLOR", "1")
            // The cluster's own options decide TLS and token, not the test's environment.
            .env_remove(blkmesh_proto::client::TOKEN_FILE_ENV)
            .env_remove(blkmesh_proto::client::MANAGER_CA_ENV)
            .env_remove(blkmesh_proto::client::CLIENT_CERT_ENV)
            .env_remove(blkmesh_proto::client::CLIENT_KEY_ENV)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir());
        if let Some(mask) = self.opts.umask {
            let mask = nix::sys::stat::Mode::from_bits_truncate(mask);
            // SAFETY: the closure runs in the forked child before exec and
            // only makes the umask(2) system call, which is async-signal-safe;
            // it allocates nothing and touches no lock.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::stat::umask(mask);
                    Ok(())
                });
            }
        }
        cmd
    }

    fn spawn(&self, name: &str, cmd: Command) -> Proc {
        let log = self.log_path(name);
        Proc::spawn(name, cmd, &log, self.opts.die_with_parent)
            .unwrap_or_else(|e| panic!("blkmesh-testkit: cannot start {name}: {e}"))
    }

    /// Stops everything: frontend, then workers, then manager.
    fn stop_everything(&mut self) {
        self.client = None;
        let mut groups: Vec<Vec<&mut Proc>> = vec![
            self.frontend.iter_mut().collect(),
            self.workers.iter_mut().flatten().collect(),
            self.manager.iter_mut().collect(),
        ];
        for group in &mut groups {
            let killed = process::stop_all(group, STOP_GRACE);
            for name in killed {
                eprintln!("blkmesh-testkit: {name} ignored SIGTERM for {STOP_GRACE:?}; killed");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_everything();
        let keep = std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        if std::thread::panicking() {
            eprintln!(
                "blkmesh-testkit: test failed; logs of the cluster in {} ({}):",
                self.dir().display(),
                if keep {
                    "kept"
                } else {
                    "removed now; set BLKMESH_TEST_KEEP=1 to keep it"
                }
            );
            self.dump_logs();
        }
        if keep {
            self.dir.disable_cleanup(true);
        }
    }
}

/// Writes `data` to a new file only its owner can read.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

fn worker_name(i: usize) -> String {
    format!("worker{i}")
}

fn running_pid(slot: &mut Option<Proc>) -> Option<u32> {
    let p = slot.as_mut()?;
    if p.is_running() {
        p.pid()
    } else {
        None
    }
}

/// The address in the manager's "listening on ADDR" line, if printed.
fn parse_listening(text: &str) -> Option<SocketAddr> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(LISTENING))
        .and_then(|a| a.trim().parse().ok())
}

/// Polls (every 20 ms, up to `timeout`) until `path` exists (`exists`) or
/// does not; true if it got there.
pub fn wait_for_path(path: &Path, exists: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() == exists {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_line_among_other_output() {
        let text = "=== blkmesh-testkit: starting manager\n\
                    2024 INFO state loaded\n\
                    blkmesh-manager listening on 127.0.0.1:41234\n";
        assert_eq!(
            parse_listening(text),
            Some("127.0.0.1:41234".parse().unwrap())
        );
    }

    #[test]
    fn ignores_incomplete_listening_line() {
        assert_eq!(
            parse_listening("blkmesh-manager listening on 127.0.0"),
            None
        );
        assert_eq!(parse_listening("INFO serving addr=127.0.0.1:5"), None);
    }

    #[test]
    fn wait_for_path_sees_file_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        assert!(!wait_for_path(&path, true, Duration::from_millis(50)));
        let p = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            std::fs::write(&p, b"").unwrap();
        });
        assert!(wait_for_path(&path, true, Duration::from_secs(5)));
        t.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(wait_for_path(&path, false, Duration::from_millis(50)));
    }

    #[test]
    fn export_opts_defaults_to_manager_defaults() {
        let o = ExportOpts::new("e", "n").writable().queues(4);
        assert_eq!((o.id.as_str(), o.node.as_str()), ("e", "n"));
        assert!(o.writable);
        assert_eq!(o.num_queues, 4);
        assert_eq!((o.queue_size, o.logical_block_size), (0, 0));
        assert!(o.socket.is_none());
    }
}
