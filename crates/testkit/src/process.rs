//! One child process with its output in a log file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How often exits are polled.
const POLL: Duration = Duration::from_millis(10);

/// A spawned process whose stdout and stderr go to a log file.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to `log`
    /// (after a header line naming the command). With `die_with_parent` the
    /// child gets SIGKILL when the spawning thread dies (PR_SET_PDEATHSIG),
    /// so a killed test run leaves no orphans.
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        die_with_parent: bool,
    ) -> io::Result<Proc> {
        let mut out = OpenOptions::new().create(true).append(true).open(log)?;
        writeln!(out, "=== blkmesh-testkit: starting {name}: {cmd:?}")?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if die_with_parent {
            // SAFETY: the closure runs in the forked child before exec and
            // only makes the prctl(2) system call, which is async-signal-safe;
            // it allocates nothing and touches no lock.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
                });
            }
        }
        let child = cmd.spawn()?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            status: None,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Process id while it has not been reaped.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the process if it has exited; returns its status then.
    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    self.child = None;
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("blkmesh-testkit: waiting for {}: {e}", self.name);
                }
            }
        }
        self.status
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.try_wait().is_none() && self.child.is_some()
    }

    /// Sends `sig` if the process has not been reaped.
    pub(crate) fn signal(&mut self, sig: Signal) {
        if !self.is_running() {
            return;
        }
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            if let Err(e) = signal::kill(Pid::from_raw(pid), sig) {
                eprintln!("blkmesh-testkit: {sig} to {} ({pid}): {e}", self.name);
            }
        }
    }

    /// Waits until the process exits or `timeout` passes; true if it exited.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        if !self.wait_timeout(Duration::from_secs(5)) {
            eprintln!("blkmesh-testkit: {} survived SIGKILL for 5 s", self.name);
        }
    }
}

/// Stops every process: SIGTERM to all, up to `grace` for them to exit,
/// then SIGKILL for the rest. Returns the names of those that needed SIGKILL.
pub(crate) fn stop_all(procs: &mut [&mut Proc], grace: Duration) -> Vec<String> {
    for p in procs.iter_mut() {
        p.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while procs.iter_mut().any(|p| p.is_running()) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    let mut killed = Vec::new();
    for p in procs.iter_mut() {
        if p.is_running() {
            killed.push(p.name().to_string());
            p.kill();
        }
    }
    killed
}

/// Prints a log file to stderr (through `eprint!`, so the test harness
/// shows it with the failing test's output), framed with its name.
pub(crate) fn dump_log(name: &str, log: &Path) {
    let text = match std::fs::read(log) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    };
    eprintln!(
        "----- {name} log ({}) -----\n{}\n----- end of {name} log -----",
        log.display(),
        text.trim_end()
    );
}

/// Current length of a file (0 if missing), to find output written after it.
pub(crate) fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Reads `path` from byte `from` on (lossy UTF-8).
pub(crate) fn read_from(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let _ = f.read_to_end(&mut text);
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn output_goes_to_log_after_header() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("p.log");
        let mut p = Proc::spawn("p", sh("echo out; echo err >&2"), &log, true).unwrap();
        assert!(p.wait_timeout(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.starts_with("=== blkmesh-testkit: starting p:"),
            "{text}"
        );
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
    }

    #[test]
    fn stop_all_kills_process_ignoring_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut stubborn = Proc::spawn(
            "stubborn",
            sh("trap '' TERM; while :; do sleep 0.05; done"),
            &dir.path().join("s.log"),
            true,
        )
        .unwrap();
        let mut polite = Proc::spawn(
            "polite",
            sh("exec sleep 30"),
            &dir.path().join("p.log"),
            true,
        )
        .unwrap();
        // Give the shell time to install its trap.
        std::thread::sleep(Duration::from_millis(200));
        let killed = stop_all(
            &mut [&mut stubborn, &mut polite],
            Duration::from_millis(300),
        );
        assert_eq!(killed, vec!["stubborn".to_string()]);
        assert!(!stubborn.is_running());
        assert!(!polite.is_running());
    }

    #[test]
    fn read_from_returns_only_new_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "old\n").unwrap();
        let len = file_len(&path);
        std::fs::write(&path, "old\nnew\n").unwrap();
        assert_eq!(read_from(&path, len), "new\n");
        assert_eq!(file_len(&dir.path().join("missing")), 0);
    }
}
