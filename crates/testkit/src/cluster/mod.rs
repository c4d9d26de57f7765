//! A running set of blkmesh processes in a temporary directory.
//!
//! The rooms: `options` (how to start a cluster, how to export a node),
//! `processes` (starting, stopping and waiting for the manager, workers
//! and frontend), `access` (reaching the manager: gRPC client, TLS, token,
//! tools) and `nodes` (node and export shortcuts). This module keeps the
//! [`Cluster`] itself: its start, its directory and logs, and its drop.

mod access;
mod nodes;
mod options;
mod processes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::bins::bin_path;
use crate::client::BlockingClient;
use crate::process::{self, Proc};

pub use options::{ClusterOptions, ExportOpts};

/// Set (non-empty, not "0") to keep cluster directories after the test.
pub const KEEP_ENV: &str = "BLKMESH_TEST_KEEP";

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
}
