//! Tenants stay apart: a worker cannot read the frontend through /proc, and
//! no socket can be reached with a looser mode than its final one.
//!
//! Needs root (the CI runs as root): the processes are started as other
//! users. Starts the real processes: build them first with `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts, WorkerState};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// The frontend's user in these tests (any uid but root's will do).
const FRONTEND_UID: u32 = 64056;
/// The workers' user: the default of `blkmesh up --worker-user` and of the
/// deployments in deploy/.
const WORKER_UID: u32 = 64055;

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "tests/tenants.rs starts processes as other users and must run as root \
         (the CI does); it is not skipped"
    );
}

/// Opens `path` for reading as `uid`:`gid` (no supplementary groups) in a
/// child shell: Ok, or the shell's error message.
fn open_as(uid: u32, gid: u32, path: &Path) -> Result<(), String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3<"$1" && echo opened"#)
        .arg("sh")
        .arg(path)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh as {uid}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("opened") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Lists `dir` as `uid`:`gid`: Ok, or the error.
fn list_as(uid: u32, gid: u32, dir: &Path) -> Result<(), String> {
    let out = Command::new("ls")
        .arg(dir)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ls as {uid}: {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn refused(r: Result<(), String>, what: &str) {
    match r {
        Ok(()) => panic!("{what}: succeeded, but must be refused"),
        Err(e) => assert!(
            e.contains("Permission denied") || e.contains("Operation not permitted"),
            "{what}: expected EACCES or EPERM, got {e:?}"
        ),
    }
}

#[test]
fn a_worker_uid_can_read_neither_fds_nor_memory_of_the_frontend() {
    require_root();
    // The frontend runs as its own user, started as that user the way a
    // container's `user:` starts it; the workers start as root, bind their
    // sockets and switch to their own user.
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .workers(1)
            .frontend_uid(FRONTEND_UID, FRONTEND_UID)
            .worker_user(&format!("{WORKER_UID}:{WORKER_UID}")),
    );
    cluster.add_null("null0", 64 << 20).unwrap();
    // The frontend connects to the worker (as another uid) for the export.
    let socket = cluster
        .add_export(ExportOpts::new("disk0", "null0").writable())
        .unwrap();
    assert!(socket.exists());
    let pid = cluster.frontend_pid().expect("the frontend runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:")
            && l.split_whitespace().nth(1) == Some(&FRONTEND_UID.to_string())),
        "the frontend does not run as {FRONTEND_UID}:\n{status}"
    );
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // Descriptors to try: its log (stdout, a plain file that anyone could
    // otherwise reopen) and every memfd it holds.
    let mut fds = vec![proc_dir.join("fd/1")];
    for entry in std::fs::read_dir(proc_dir.join("fd")).unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:") {
            fds.push(entry.path());
        }
    }
    // The shell itself works as these users.
    open_as(WORKER_UID, WORKER_UID, Path::new("/dev/null")).unwrap();
    // A worker's uid, and the frontend's own uid: the uid that every
    // worker shared with the frontend in the deployments until now, and
    // what any other process of that user has.
    for (uid, who) in [(WORKER_UID, "worker uid"), (FRONTEND_UID, "frontend uid")] {
        refused(
            list_as(uid, uid, &proc_dir.join("fd")),
            &format!("{who} {uid} listing /proc/<frontend>/fd"),
        );
        for fd in &fds {
            refused(
                open_as(uid, uid, fd),
                &format!("{who} {uid} opening {}", fd.display()),
            );
        }
        refused(
            open_as(uid, uid, &proc_dir.join("mem")),
            &format!("{who} {uid} opening /proc/<frontend>/mem"),
        );
    }
    // Still serving.
    let workers = cluster
        .wait_workers(&["worker0"], WorkerState::Alive, Duration::from_secs(5))
        .unwrap();
    assert_eq!(workers.len(), 1);
}

/// What an inotify watch saw of one name.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Mode (permission bits) at the first event, if it could be read.
    first_mode: Option<u32>,
    /// Whether it was a socket then.
    socket: bool,
    events: Vec<AddWatchFlags>,
}

/// Watches directories and records, per name, the events and the mode at
/// the first event (read at once).
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<HashMap<PathBuf, Seen>>>,
}

impl Watcher {
    fn start(dirs: &[PathBuf]) -> Watcher {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        let mut wds = HashMap::new();
        for d in dirs {
            let wd = inotify
                .add_watch(
                    d.as_path(),
                    AddWatchFlags::IN_CREATE
                        | AddWatchFlags::IN_ATTRIB
                        | AddWatchFlags::IN_MOVED_TO,
                )
                .unwrap();
            wds.insert(wd, d.clone());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
            loop {
                let done = flag.load(Ordering::Relaxed);
                match inotify.read_events() {
                    Ok(events) => {
                        for ev in events {
                            let (Some(dir), Some(name)) = (wds.get(&ev.wd), ev.name) else {
                                continue;
                            };
                            let path = dir.join::<&OsString>(&name);
                            let entry = seen.entry(path.clone()).or_default();
                            if entry.events.is_empty() {
                                if let Ok(m) = std::fs::symlink_metadata(&path) {
                                    entry.first_mode = Some(m.permissions().mode() & 0o7777);
                                    entry.socket = m.file_type().is_socket();
                                }
                            }
                            entry.events.push(ev.mask);
                        }
                    }
                    Err(nix::Error::EAGAIN) if done => return seen,
                    Err(nix::Error::EAGAIN) => std::thread::sleep(Duration::from_micros(200)),
                    Err(e) => panic!("inotify: {e}"),
                }
            }
        });
        Watcher {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> HashMap<PathBuf, Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The socket at `path` appeared with mode 0600 and was never changed
/// afterwards: no window in which a looser mode let anyone connect.
fn check_socket(seen: &HashMap<PathBuf, Seen>, path: &Path) {
    let s = seen
        .get(path)
        .unwrap_or_else(|| panic!("{} never appeared; saw {seen:#?}", path.display()));
    // Bound in place, the file is created with 0777 & !umask (0777 here)
    // and fixed by a later chmod: both show as events on the final name.
    for ev in &s.events {
        assert!(
            !ev.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ATTRIB),
            "{} was created or changed in place ({ev:?}; all: {:?}): it existed \
             with another mode first",
            path.display(),
            s.events
        );
    }
    assert!(s.socket, "{} was no socket at first: {s:?}", path.display());
    assert_eq!(
        s.first_mode,
        Some(0o600),
        "{}: mode at first sight",
        path.display()
    );
    let now = std::fs::symlink_metadata(path).unwrap();
    assert_eq!(now.permissions().mode() & 0o777, 0o600);
}

#[test]
fn sockets_have_their_final_mode_before_anyone_can_reach_them() {
    require_root();
    let manager_dir = tempfile::tempdir().unwrap();
    let manager_sock = manager_dir.path().join("manager.sock");
    let watcher = Watcher::start(&[manager_dir.path().to_path_buf()]);
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .workers(1)
            .umask(0)
            .manager_arg("--unix")
            .manager_arg(manager_sock.clone()),
    );
    let manager_seen = watcher.finish();
    check_socket(&manager_seen, &manager_sock);

    // The worker's socket: start it again under the watch.
    let watcher = Watcher::start(&[cluster.run_dir()]);
    cluster.stop_worker(0);
    let worker_sock = cluster.worker_socket(0);
    let _ = std::fs::remove_file(&worker_sock);
    cluster.start_worker(0);
    cluster
        .wait_workers(&["worker0"], WorkerState::Alive, Duration::from_secs(15))
        .unwrap();
    // An export's socket, bound by the frontend at run time.
    cluster.add_null("null0", 64 << 20).unwrap();
    let export_sock = cluster
        .add_export(ExportOpts::new("disk0", "null0"))
        .unwrap();
    let seen = watcher.finish();
    check_socket(&seen, &worker_sock);
    check_socket(&seen, &export_sock);
    // No private bind directory is left behind.
    let left: Vec<_> = std::fs::read_dir(cluster.run_dir())
        .unwrap()
        .chain(std::fs::read_dir(manager_dir.path()).unwrap())
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
