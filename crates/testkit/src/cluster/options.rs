//! How to start a [`Cluster`](super::Cluster) ([`ClusterOptions`]) and
//! how to export a node from it ([`ExportOpts`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to start a [`Cluster`](super::Cluster).
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

/// An export to add with [`Cluster::add_export`](super::Cluster::add_export). Zero fields take the
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

#[cfg(test)]
mod tests {
    use super::*;

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
