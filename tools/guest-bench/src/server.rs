//! The storage side under test: blkmesh (`blkmesh up`) or
//! qemu-storage-daemon, serving one vhost-user-blk export of the image,
//! in a process group of its own so that its CPU time can be counted
//! whole and the whole group stopped.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{name} exited while starting ({status}); its log: {log}")]
    Exited {
        name: String,
        status: String,
        log: String,
    },
    #[error("{name} did not create {} within {START_TIMEOUT:?}; its log: {log}", socket.display())]
    NoSocket {
        name: String,
        socket: PathBuf,
        log: String,
    },
}

/// What serves the guest's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// qemu-storage-daemon: file (io_uring, host page cache) + raw.
    Qsd { program: PathBuf },
    /// `blkmesh up` of this build, under this label (`blkmesh`, or
    /// `blkmesh-old` for a second build beside it).
    Blkmesh {
        label: String,
        program: PathBuf,
        workers: u32,
        spread: bool,
    },
}

impl Target {
    pub fn label(&self) -> &str {
        match self {
            Target::Qsd { .. } => "qsd",
            Target::Blkmesh { label, .. } => label,
        }
    }

    fn command(&self, image: &Path, socket: &Path, queues: u16, dir: &Path) -> Command {
        match self {
            Target::Qsd { program } => {
                let mut c = Command::new(program);
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={},cache.direct=off,aio=io_uring",
                        image.display()
                    ))
                    .args(["--blockdev", "driver=raw,node-name=raw0,file=file0"])
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=raw0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                        socket.display()
                    ));
                c
            }
            Target::Blkmesh {
                program,
                workers,
                spread,
                ..
            } => {
                let mut c = Command::new(program);
                c.arg("up")
                    .arg("--dir")
                    .arg(dir)
                    // Root like qsd: the image sits in the bench's scratch
                    // directory; the uid makes no difference to the figures.
                    .args(["--worker-user", "root", "--listen", "127.0.0.1:0"])
                    .arg("--workers")
                    .arg(workers.to_string())
                    .arg("--image")
                    .arg(image)
                    .arg("--queues")
                    .arg(queues.to_string())
                    .arg("--socket")
                    .arg(socket);
                if *spread {
                    c.arg("--spread");
                }
                c
            }
        }
    }
}

/// A running server; dropping it stops its whole process group.
pub struct Server {
    child: Child,
    pub socket: PathBuf,
}

impl Server {
    /// Starts `target` on `image` with `queues` queues; files go to `dir`.
    pub fn start(
        target: &Target,
        image: &Path,
        queues: u16,
        dir: &Path,
    ) -> Result<Server, ServerError> {
        let name = target.label().to_string();
        let run = dir.join(&name);
        let _ = fs::remove_dir_all(&run);
        fs::create_dir_all(&run).map_err(|source| ServerError::Spawn {
            program: name.clone(),
            source,
        })?;
        let socket = run.join("disk.sock");
        let log_path = run.join("server.log");
        let log = fs::File::create(&log_path).map_err(|source| ServerError::Spawn {
            program: name.clone(),
            source,
        })?;
        let mut cmd = target.command(image, &socket, queues, &run);
        let err_log = log.try_clone().map_err(|source| ServerError::Spawn {
            program: name.clone(),
            source,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| ServerError::Spawn {
            program: format!("{:?}", cmd.get_program()),
            source,
        })?;
        let mut server = Server { child, socket };
        let deadline = Instant::now() + START_TIMEOUT;
        let read_log = || fs::read_to_string(&log_path).unwrap_or_default();
        while !server.socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(ServerError::Exited {
                    name,
                    status: status.to_string(),
                    log: read_log(),
                });
            }
            if Instant::now() >= deadline {
                return Err(ServerError::NoSocket {
                    name,
                    socket: server.socket.clone(),
                    log: read_log(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// CPU time so far of every thread of every process in the server's
    /// group, in nanoseconds (`/proc/<pid>/task/<tid>/schedstat`).
    pub fn cpu_ns(&self) -> u64 {
        group_cpu_ns(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // SIGTERM the group (the supervisor stops its children), then
        // SIGKILL whatever is left. A group already gone (ESRCH) is what
        // we want, not an error to print.
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The process group of each process in /proc, from `/proc/<pid>/stat`.
fn group_of(stat: &str) -> Option<u32> {
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn group_cpu_ns(group: u32) -> u64 {
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for p in procs.flatten() {
        let path = p.path();
        let in_group = fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|s| group_of(&s))
            == Some(group);
        if !in_group {
            continue;
        }
        let Ok(tasks) = fs::read_dir(path.join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            total += fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_read_past_odd_command_names() {
        assert_eq!(group_of("12 (a b) c) S 1 77 77 0"), Some(77));
        assert_eq!(group_of("garbage"), None);
    }

    #[test]
    fn a_busy_group_counts_cpu_and_an_idle_one_none() {
        let mut child = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = child.id();
        let mut seen = 0;
        while child.try_wait().unwrap().is_none() {
            seen = seen.max(group_cpu_ns(group));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(seen > 0, "a shell loop used no CPU");
        assert_eq!(group_cpu_ns(u32::MAX - 1), 0);
    }
}
