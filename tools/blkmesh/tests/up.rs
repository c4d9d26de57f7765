//! Runs the real `blkmesh up`; needs the sibling binaries built first
//! (`cargo build --bins`).

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running `blkmesh up`, killed with its children if the test fails.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr_log: PathBuf,
    dir: PathBuf,
}

impl Up {
    /// `blkmesh up --dir <tmp>/run --size 64M --listen 127.0.0.1:0 EXTRA…`
    fn start(tmp: &Path, extra: &[&str]) -> Up {
        let mut args = vec!["--size", "64M"];
        args.extend(extra);
        Up::start_with(tmp, &args)
    }

    /// `blkmesh up --dir <tmp>/run --listen 127.0.0.1:0 ARGS…`
    fn start_with(tmp: &Path, args: &[&str]) -> Up {
        let dir = tmp.join("run");
        let stderr_log = tmp.join(format!("blkmesh.{}.stderr", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_blkmesh"))
            .arg("up")
            .arg("--dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Up {
            child,
            lines,
            stdout: Vec::new(),
            stderr_log,
            dir,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Reads stdout until a line satisfies `f` (bounded).
    fn wait_line(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if f(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no {what} line on stdout; stdout so far:\n{}\nstderr:\n{}",
                    self.stdout.join("\n"),
                    std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
                ),
            }
        }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "blkmesh did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            for (pid, _) in children_of(self.pid()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- blkmesh stderr -----\n{}", self.stderr());
            if let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) {
                for e in entries.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    eprintln!("----- {} -----\n{text}", e.path().display());
                }
            }
        }
    }
}

/// `(pid, cmdline)` of the processes whose parent is `ppid`.
fn children_of(ppid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let parent = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if parent == Some(ppid) {
            let cmdline = std::fs::read(entry.path().join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push((pid, cmdline));
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn up_serves_default_disk_and_stops_everything_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut up = Up::start(tmp.path(), &[]);
    let line = up.wait_line("socket", |l| l.trim_start().starts_with("socket:"));
    let socket = PathBuf::from(line.trim_start().trim_start_matches("socket:").trim());
    up.wait_line("Supervising", |l| l.starts_with("Supervising"));
    let dir = up.dir.canonicalize().unwrap();
    assert_eq!(socket, dir.join("disk0.sock"));
    let text = up.stdout.join("\n");
    assert!(text.contains("blkmesh-io --socket"), "{text}");
    assert!(
        text.contains("vhost-user-blk-pci,chardev=vu0,num-queues=1"),
        "{text}"
    );
    assert!(
        text.contains("blkmeshctl --addr http://127.0.0.1:"),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(dir.join("disk0.img")).unwrap().len(),
        64 << 20
    );
    wait_until("the export socket", Duration::from_secs(10), || {
        socket.exists()
    });

    let children = children_of(up.pid());
    let names: Vec<&str> = children
        .iter()
        .filter_map(|(_, cmd)| cmd.split_whitespace().next())
        .filter_map(|p| p.rsplit('/').next())
        .collect();
    for bin in ["blkmesh-manager", "blkmesh-worker", "blkmesh-frontend"] {
        assert!(names.contains(&bin), "{bin} not among {children:?}");
    }
    assert_eq!(children.len(), 4, "{children:?}");

    up.signal(Signal::SIGTERM);
    let status = up.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}; stderr:\n{}", up.stderr());
    for (pid, cmd) in &children {
        assert!(!alive(*pid), "{cmd} ({pid}) still running");
    }
    for sock in ["disk0.sock", "worker0.sock", "worker1.sock"] {
        assert!(!dir.join(sock).exists(), "{sock} left behind");
    }
}

#[test]
fn up_restarts_killed_worker_and_keeps_state_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut up = Up::start(tmp.path(), &["--workers", "1", "--queues", "2"]);
    up.wait_line("Supervising", |l| l.starts_with("Supervising"));
    let text = up.stdout.join("\n");
    assert!(text.contains("num-queues=2"), "{text}");
    let worker = |up: &Up| {
        children_of(up.pid())
            .into_iter()
            .find(|(_, cmd)| cmd.contains("--name worker0"))
            .map(|(pid, _)| pid)
    };
    let first = worker(&up).expect("worker0 running");
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    wait_until("worker0 to be restarted", Duration::from_secs(10), || {
        worker(&up).is_some_and(|p| p != first)
    });
    up.signal(Signal::SIGINT);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
    assert!(
        up.stderr().contains("worker0 exited unexpectedly"),
        "{}",
        up.stderr()
    );
    drop(up);

    // A second run in the same directory finds disk0 in the saved state and
    // keeps it (2 queues), with a note.
    let mut up = Up::start(tmp.path(), &["--workers", "1"]);
    up.wait_line("Supervising", |l| l.starts_with("Supervising"));
    let text = up.stdout.join("\n");
    assert!(text.contains("num-queues=2"), "{text}");
    assert!(text.contains("exists from an earlier run"), "{text}");
    up.signal(Signal::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn up_fails_cleanly_when_manager_cannot_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_blkmesh"))
        .arg("up")
        .arg("--dir")
        .arg(tmp.path())
        .args(["--size", "1M", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("blkmesh: error: manager exited during startup"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn up_rejects_bad_size_without_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_blkmesh"))
        .arg("up")
        .arg("--dir")
        .arg(tmp.path().join("run"))
        .args(["--size", "12x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
    assert!(!tmp.path().join("run").exists());
}

/// `blkmesh-io` next to `blkmesh`, run to completion (bounded).
fn blkmesh_io(args: &[&str]) -> std::process::Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_blkmesh")).with_file_name("blkmesh-io");
    assert!(
        bin.is_file(),
        "{} not found: build every binary first (cargo build --bins)",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// An io_uring node over an image the manager creates, a throttle over it
/// and a writable export, all under `base`.
fn write_config(base: &Path) -> PathBuf {
    let text = format!(
        r#"# blkmesh up --config, end to end
[[node]]
name = "disk0"
io_uring = {{ path = "{base}/images/disk0.img" }}
create = {{ size = "8M" }}

[[node]]
name = "slow"
throttle = {{ child = "disk0", iops = 20000, bps = "256M" }}

[[export]]
id = "vol"
node = "slow"
socket = "{base}/sockets/vol.sock"
writable = true
num_queues = 2
"#,
        base = base.display()
    );
    let path = base.join("blkmesh.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn up_with_a_config_serves_its_exports_and_keeps_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let config = write_config(&base);
    let socket = base.join("sockets/vol.sock");
    let image = base.join("images/disk0.img");
    let cfg = config.to_str().unwrap();

    let mut up = Up::start_with(tmp.path(), &["--workers", "2", "--config", cfg]);
    up.wait_line("Supervising", |l| l.starts_with("Supervising"));
    let text = up.stdout.join("\n");
    assert!(
        text.starts_with(&format!(
            "blkmesh is up with {cfg}: 1 export served by worker0, worker1."
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  export vol: {} (8 MiB, 2 queues, writable)",
            socket.display()
        )),
        "{text}"
    );
    assert!(!text.contains("not there yet"), "{text}");
    assert!(!text.contains("image:"), "{text}");
    // The manager created the image; no default disk was added.
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
    assert!(!up.dir.join("disk0.img").exists());
    let state = std::fs::read_to_string(up.dir.join("state/state.json")).unwrap();
    assert!(state.contains("\"managed_by_config\": true"), "{state}");

    // Through the frontend, a worker, the throttle and io_uring to the file.
    let sock = socket.to_str().unwrap();
    let out = blkmesh_io(&[
        "--socket",
        sock,
        "--queues",
        "2",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 1M 4k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0xcd 1M 4k",
    ]);
    assert!(
        out.status.success(),
        "blkmesh-io: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&image).unwrap();
    assert!(data[..64 << 10].iter().all(|&b| b == 0xab));
    assert!(data[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0xcd));

    up.signal(Signal::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
    assert!(!socket.exists(), "export socket left behind");
    drop(up);

    // Again with the same file: the image is not created anew, the data is there.
    let mut up = Up::start_with(tmp.path(), &["--workers", "1", "--config", cfg]);
    up.wait_line("Supervising", |l| l.starts_with("Supervising"));
    let out = blkmesh_io(&["--socket", sock, "-c", "read -P 0xab 0 64k"]);
    assert!(
        out.status.success(),
        "blkmesh-io: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    up.signal(Signal::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
    drop(up);

    // A file without the export: the manager keeps it, the banner says so.
    let text = std::fs::read_to_string(&config).unwrap();
    let nodes_only = &text[..text.find("[[export]]").unwrap()];
    let other = base.join("nodes-only.toml");
    std::fs::write(&other, nodes_only).unwrap();
    let mut up = Up::start_with(
        tmp.path(),
        &["--workers", "1", "--config", other.to_str().unwrap()],
    );
    up.wait_line("Supervising", |l| l.starts_with("Supervising"));
    let text = up.stdout.join("\n");
    assert!(text.contains(": 0 exports served by worker0."), "{text}");
    assert!(
        text.contains("note:     export vol is not in the configuration file; kept"),
        "{text}"
    );
    up.signal(Signal::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn up_refuses_a_bad_config_before_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let config = write_config(&base);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("iops = 20000", "iops = 20000, iops_burst = 10");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_blkmesh"))
        .arg("up")
        .arg("--dir")
        .arg(tmp.path().join("run"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:9:58: node[1].throttle.iops_burst: must be 0 or >= rate (got 10 < 20000)",
            config.display()
        )),
        "{stderr}"
    );
    assert!(!tmp.path().join("run").exists());
    assert!(!base.join("images").exists());
    assert!(out.stdout.is_empty());
}
