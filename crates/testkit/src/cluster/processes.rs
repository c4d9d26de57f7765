//! Process control: starting, stopping, killing and restarting the
//! manager, the workers and the frontend, and waiting for them.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkmesh_proto::v1::{WorkerInfo, WorkerState};

use super::Cluster;
use crate::bins::bin_path;
use crate::client::{BlockingClient, ClientError};
use crate::process::{self, Proc};

/// Marker the manager prints on stdout once it listens.
const LISTENING: &str = "blkmesh-manager listening on ";
/// How long a stopping process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

impl Cluster {
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
    pub(super) fn stop_everything(&mut self) {
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
}
