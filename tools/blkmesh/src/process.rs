//! The supervised child processes: spawning with log files, restarting
//! after unexpected exits with a backoff, and the ordered shutdown.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::error::Error;
use crate::signals::Signals;

/// First restart delay after an unexpected exit.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Longest restart delay for a process that keeps crashing.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A process that ran this long before exiting restarts without delay growth.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long each group gets between SIGTERM and SIGKILL on shutdown.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// What a process is; also the shutdown order (frontend, workers, manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Frontend,
    Worker,
    Manager,
}

/// One supervised process.
#[derive(Debug)]
pub struct Supervised {
    pub name: String,
    pub role: Role,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    restarts: u32,
}

impl Supervised {
    pub fn new(
        name: &str,
        role: Role,
        program: &Path,
        args: Vec<OsString>,
        log_dir: &Path,
    ) -> Self {
        Supervised {
            name: name.to_string(),
            role,
            program: program.to_path_buf(),
            args,
            log: log_dir.join(format!("{name}.log")),
            child: None,
            started: Instant::now(),
            backoff: BACKOFF_INITIAL,
            restart_at: None,
            restarts: 0,
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Replaces the arguments used by later (re)starts.
    pub fn set_args(&mut self, args: Vec<OsString>) {
        self.args = args;
    }

    /// Starts the process with stdin closed and stdout + stderr appended to
    /// its log (after a header line).
    pub fn spawn(&mut self) -> Result<(), Error> {
        let log_err = |source| Error::Log {
            path: self.log.clone(),
            source,
        };
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(log_err)?;
        let _ = writeln!(
            out,
            "=== blkmesh: starting {}: {} {}",
            self.name,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let err = out.try_clone().map_err(log_err)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|source| Error::Spawn {
                name: self.name.clone(),
                source,
            })?;
        tracing::info!(process = %self.name, pid = child.id(), "started");
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the process if it has exited, returning its status.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(process = %self.name, "cannot wait for it: {e}");
                None
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.poll_exit();
        self.child.is_some()
    }

    fn signal(&mut self, sig: Signal) {
        if !self.is_running() {
            return;
        }
        let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        if let Err(e) = signal::kill(Pid::from_raw(pid), sig) {
            tracing::warn!(process = %self.name, pid, "cannot send {sig}: {e}");
        }
    }

    /// One supervision step: notices an unexpected exit and schedules a
    /// restart, or performs a restart that is due.
    fn tick(&mut self, now: Instant) {
        if let Some(status) = self.poll_exit() {
            let uptime = now.saturating_duration_since(self.started);
            if uptime >= STABLE_AFTER {
                self.backoff = BACKOFF_INITIAL;
            }
            let delay = self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            self.restart_at = Some(now + delay);
            // No structured fields: they would be printed after the log tail.
            tracing::warn!(
                "{} exited unexpectedly ({status}) after {uptime:.1?}; restarting in {delay:?}. \
                 Its log {} ends with:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 10)
            );
            return;
        }
        if self.child.is_none() {
            let due = self.restart_at.get_or_insert(now);
            if *due <= now {
                self.restarts += 1;
                tracing::info!(process = %self.name, restart = self.restarts, "restarting");
                if let Err(e) = self.spawn() {
                    let delay = self.backoff;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    self.restart_at = Some(now + delay);
                    tracing::error!(process = %self.name, "{e}: {}; retrying in {delay:?}", source_of(&e));
                }
            }
        }
    }
}

fn source_of(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// Every process of the set, in start order (manager, workers, frontend).
#[derive(Debug, Default)]
pub struct ProcessSet {
    pub procs: Vec<Supervised>,
}

impl ProcessSet {
    pub fn push(&mut self, p: Supervised) -> usize {
        self.procs.push(p);
        self.procs.len() - 1
    }

    /// Restarts whatever exited (see [`Supervised::tick`]).
    pub fn tick(&mut self) {
        let now = Instant::now();
        for p in &mut self.procs {
            p.tick(now);
        }
    }

    /// The first process that exited, as a startup error (no restarts
    /// during startup: a process that dies then will likely die again).
    pub fn startup_check(&mut self) -> Result<(), Error> {
        for p in &mut self.procs {
            if let Some(status) = p.poll_exit() {
                return Err(Error::StartupExit {
                    name: p.name.clone(),
                    status,
                    log: p.log.clone(),
                    tail: log_tail(&p.log, 15),
                });
            }
        }
        Ok(())
    }

    /// Stops everything: frontend, then workers, then manager. Each group
    /// gets SIGTERM and up to `grace` to exit, then SIGKILL. A further
    /// signal from `signals` skips the grace period. Returns the names of
    /// the processes that had to be killed.
    pub async fn stop(&mut self, signals: &mut Signals, grace: Duration) -> Vec<String> {
        let mut killed = Vec::new();
        let mut force = false;
        for role in [Role::Frontend, Role::Worker, Role::Manager] {
            let group: Vec<usize> = (0..self.procs.len())
                .filter(|&i| self.procs[i].role == role)
                .collect();
            for &i in &group {
                self.procs[i].restart_at = None;
                self.procs[i].signal(Signal::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while !force
                && Instant::now() < deadline
                && group.iter().any(|&i| self.procs[i].is_running())
            {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    sig = signals.recv() => {
                        tracing::warn!("{sig} again: killing everything now");
                        force = true;
                    }
                }
            }
            for &i in &group {
                let p = &mut self.procs[i];
                if p.is_running() {
                    if !force {
                        tracing::warn!(process = %p.name, "still running after {grace:?}; sending SIGKILL");
                    }
                    p.signal(Signal::SIGKILL);
                    killed.push(p.name.clone());
                }
            }
            let reap_deadline = Instant::now() + Duration::from_secs(2);
            while group.iter().any(|&i| self.procs[i].is_running())
                && Instant::now() < reap_deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for &i in &group {
                let p = &mut self.procs[i];
                if p.is_running() {
                    tracing::error!(process = %p.name, pid = ?p.pid(), "survived SIGKILL");
                } else {
                    tracing::debug!(process = %p.name, "stopped");
                }
            }
        }
        killed
    }
}

/// The last `lines` lines of a log file (reading at most its last 8 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(8192))).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Current length of a file (0 if missing).
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The file's content from byte `from` on (lossy UTF-8).
pub fn read_from(path: &Path, from: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, role: Role, script: &str, dir: &Path) -> Supervised {
        Supervised::new(
            name,
            role,
            Path::new("/bin/sh"),
            vec!["-c".into(), script.into()],
            dir,
        )
    }

    #[test]
    fn log_tail_returns_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(log_tail(&path, 2), "    line 98\n    line 99");
        assert_eq!(log_tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn restarts_crashed_process_after_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sh("crasher", Role::Worker, "echo run; exit 3", dir.path());
        p.spawn().unwrap();
        let t0 = Instant::now();
        while p.child.is_some() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
            p.tick(Instant::now());
        }
        assert!(p.child.is_none());
        let due = p.restart_at.unwrap();
        assert!(due > Instant::now());
        // Not yet due: nothing happens.
        p.tick(Instant::now());
        assert!(p.child.is_none());
        p.tick(due);
        assert_eq!(p.restarts, 1);
        assert!(p.pid().is_some());
        assert_eq!(p.backoff, BACKOFF_INITIAL * 2);
        let _ = p.child.as_mut().unwrap().wait();
        let log = std::fs::read_to_string(p.log()).unwrap();
        assert_eq!(
            log.matches("=== blkmesh: starting crasher").count(),
            2,
            "{log}"
        );
    }

    #[test]
    fn stop_terminates_groups_and_kills_stubborn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut signals = Signals::new().unwrap();
            let mut set = ProcessSet::default();
            set.push(sh("manager", Role::Manager, "exec sleep 30", dir.path()));
            set.push(sh(
                "worker0",
                Role::Worker,
                "trap '' TERM; while :; do sleep 0.05; done",
                dir.path(),
            ));
            set.push(sh("frontend", Role::Frontend, "exec sleep 30", dir.path()));
            for p in &mut set.procs {
                p.spawn().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let killed = set.stop(&mut signals, Duration::from_millis(300)).await;
            assert_eq!(killed, vec!["worker0".to_string()]);
            assert!(set.procs.iter_mut().all(|p| !p.is_running()));
        });
    }
}
