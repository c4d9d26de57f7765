//! `blkmesh-pause`: does nothing, for as long as it is left running.
//!
//! The first process of a container whose namespaces others join, like
//! Kubernetes' pause container: the blkmesh compose deployment starts it as
//! the `blkmesh` service, and the manager, the workers and the frontend join
//! its network, pid and IPC namespaces (`network_mode`, `pid`, `ipc:
//! service:blkmesh`). Then any of them can restart without taking the
//! namespaces with it: the workers stay in the frontend's pid namespace (so
//! the frontend can fence a hung worker by pid), everything reaches the
//! manager on 127.0.0.1, and throttle groups share /dev/shm.
//!
//! As pid 1 it reaps any orphan that ends up in its namespace and exits 0 on
//! SIGTERM, SIGINT or SIGHUP (pid 1 has no default signal actions, so it has
//! to take them itself).

use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        eprintln!(
            "usage: blkmesh-pause\n\nRuns until SIGTERM, SIGINT or SIGHUP, reaping children; \
             holds a container's namespaces for others to join."
        );
        return ExitCode::from(2);
    }
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("blkmesh-pause: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(_) => return ExitCode::SUCCESS,
            Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("blkmesh-pause: sigwait: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

/// Collects every child that has exited.
fn reap() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
