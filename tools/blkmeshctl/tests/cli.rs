//! End-to-end: the real `blkmesh-manager` binary on an ephemeral port,
//! driven by the real `blkmeshctl` binary.
//!
//! The manager binary belongs to another package, so cargo does not build it
//! for this test: run `cargo build --bins` (or `cargo build -p blkmesh-manager`)
//! first. The test looks for it next to this test binary's target directory.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn manager_binary() -> PathBuf {
    // target/<profile>/deps/cli-HASH → target/<profile>/blkmesh-manager
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps");
    let bin = profile_dir.join("blkmesh-manager");
    assert!(
        bin.is_file(),
        "blkmesh-manager binary not found at {}; build it first with `cargo build --bins` \
         (or `cargo build -p blkmesh-manager`)",
        bin.display()
    );
    bin
}

/// A running manager process, killed on drop.
struct ManagerProc {
    child: Child,
    url: String,
    /// The `--metrics` address, when asked for.
    metrics: Option<String>,
}

impl ManagerProc {
    fn start(state_dir: &Path, extra: &[&str]) -> ManagerProc {
        let mut child = Command::new(manager_binary())
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn blkmesh-manager");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = if extra.contains(&"--metrics") { 2 } else { 1 };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            for _ in 0..lines {
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let _ = tx.send(line);
            }
        });
        let mut proc = ManagerProc {
            child,
            url: String::new(),
            metrics: None,
        };
        let line = rx
            .recv_timeout(WAIT)
            .expect("blkmesh-manager did not print its address in time");
        let addr = line
            .trim()
            .strip_prefix("blkmesh-manager listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from blkmesh-manager: {line:?}"));
        proc.url = format!("http://{addr}");
        if lines == 2 {
            let line = rx
                .recv_timeout(WAIT)
                .expect("blkmesh-manager did not print its metrics address in time");
            let addr = line
                .trim()
                .strip_prefix("blkmesh-manager metrics on ")
                .unwrap_or_else(|| panic!("unexpected second line from blkmesh-manager: {line:?}"));
            proc.metrics = Some(addr.to_string());
        }
        proc
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "blkmesh-manager did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion with a bounded wait (killed on timeout).
fn run_bounded(cmd: &mut Command, what: &str) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what} timed out");
        }
    }
}

/// Runs blkmeshctl against `addr`.
fn ctl(addr: &str, args: &[&str]) -> Output {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_blkmeshctl"))
            .arg("--addr")
            .arg(addr)
            .args(args)
            .env_remove("BLKMESH_ADDR"),
        &format!("blkmeshctl {args:?}"),
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(addr: &str, args: &[&str]) -> String {
    let o = ctl(addr, args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "blkmeshctl {args:?}: stdout {:?} stderr {:?}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

#[track_caller]
fn fails(addr: &str, args: &[&str], exit: i32, needle: &str) -> String {
    let o = ctl(addr, args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(exit), "blkmeshctl {args:?}: {err:?}");
    assert!(
        err.contains(needle),
        "blkmeshctl {args:?}: {err:?} lacks {needle:?}"
    );
    err
}

#[test]
fn node_lifecycle_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img = img.to_str().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &[]);
    let a = m.url.as_str();

    assert_eq!(ok(a, &["health"]).trim(), "SERVING");

    let out = ok(
        a,
        &[
            "node",
            "add-null",
            "n0",
            "--size",
            "1G",
            "--latency-us",
            "5",
        ],
    );
    assert!(
        out.contains("size:") && out.contains("1G (1073741824 bytes)"),
        "{out}"
    );
    ok(
        a,
        &["node", "add-io-uring", "f0", "--path", img, "--read-only"],
    );
    ok(
        a,
        &[
            "node", "add-raw", "r0", "--child", "f0", "--offset", "4k", "--size", "8k",
        ],
    );

    let list = ok(a, &["node", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 4, "{list}");
    assert!(lines[0].starts_with("NAME"), "{list}");
    assert!(
        lines[1].starts_with("f0 ") && lines[1].contains("1M"),
        "{list}"
    );
    assert!(
        lines[2].starts_with("n0 ") && lines[2].contains("latency=5us"),
        "{list}"
    );
    assert!(
        lines[3].starts_with("r0 ") && lines[3].contains("8k"),
        "{list}"
    );
    // Columns are aligned: DRIVER starts at the same offset on every line.
    let col = lines[0].find("DRIVER").unwrap();
    for l in &lines[1..] {
        assert_ne!(&l[col..=col], " ", "{list}");
        assert_eq!(&l[col - 1..col], " ", "{list}");
    }

    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "list"])).unwrap();
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[0]["name"], "f0");
    assert_eq!(arr[0]["read_only"], true);
    assert_eq!(arr[0]["used_by"][0], "r0");
    assert_eq!(arr[2]["options"]["child"], "f0");
    assert_eq!(arr[2]["size"], 8192);

    let info = ok(a, &["node", "info", "r0"]);
    assert!(info.contains("child:") && info.contains("f0"), "{info}");
    assert!(info.contains("read-only: yes"), "{info}");

    // Error paths: gRPC errors exit 1 with `error: CODE: message`.
    fails(
        a,
        &["node", "add-null", "bad", "--size", "1000"],
        1,
        "error: INVALID_ARGUMENT: node.null.size: must be a non-zero multiple of 512 (got 1000)",
    );
    fails(
        a,
        &["node", "add-null", "n0", "--size", "1G"],
        1,
        "error: ALREADY_EXISTS: node.name",
    );
    fails(
        a,
        &["node", "add-raw", "r1", "--child", "nope"],
        1,
        "error: NOT_FOUND: node.raw.child",
    );
    fails(
        a,
        &["node", "add-io-uring", "x", "--path", "relative.img"],
        1,
        "error: INVALID_ARGUMENT: node.io_uring.path: must be an absolute path",
    );
    fails(
        a,
        &["node", "remove", "f0"],
        1,
        "error: FAILED_PRECONDITION: node \"f0\" is in use by node \"r0\"",
    );
    fails(a, &["node", "info", "nope"], 1, "error: NOT_FOUND");
    fails(
        a,
        &[
            "export",
            "add",
            "e0",
            "--node",
            "n0",
            "--socket",
            "/tmp/e0.sock",
        ],
        1,
        "error: FAILED_PRECONDITION: no live worker registered",
    );
    // Usage errors exit 2.
    fails(a, &["node", "add-null", "y"], 2, "--size");
    fails(
        a,
        &["node", "add-null", "y", "--size", "1X"],
        2,
        "unknown size suffix",
    );
    fails(a, &["node", "frobnicate"], 2, "unrecognized subcommand");

    assert!(ok(a, &["node", "remove", "r0"]).contains("removed node r0"));
    ok(a, &["node", "remove", "f0"]);
    ok(a, &["node", "remove", "n0"]);
    assert_eq!(ok(a, &["node", "list"]).lines().count(), 1);
    assert_eq!(ok(a, &["--json", "node", "list"]).trim(), "[]");

    assert!(m.terminate().success(), "manager exits 0 on SIGTERM");
}

#[test]
fn exports_and_workers_with_a_registered_worker() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mgr.sock");
    let m = ManagerProc::start(
        &dir.path().join("state"),
        &["--unix", sock.to_str().unwrap()],
    );
    let a = m.url.clone();
    let a = a.as_str();

    // A stand-in worker holding its session open.
    let (rt, stream) = stand_in_worker(a, "w0");

    let workers = ok(a, &["worker", "list"]);
    assert!(
        workers.contains("w0") && workers.contains("ALIVE") && workers.contains("4242"),
        "{workers}"
    );

    ok(a, &["node", "add-null", "n0", "--size", "64M"]);
    let out = ok(
        a,
        &[
            "export",
            "add",
            "e0",
            "--node",
            "n0",
            "--socket",
            "/tmp/e0.sock",
            "--num-queues",
            "4",
            "--writable",
        ],
    );
    assert!(
        out.contains("e0") && out.contains("64M") && out.contains("w0"),
        "{out}"
    );
    fails(
        a,
        &[
            "export",
            "add",
            "e0",
            "--node",
            "n0",
            "--socket",
            "/tmp/e1.sock",
        ],
        1,
        "error: ALREADY_EXISTS: export.id",
    );
    fails(
        a,
        &[
            "export",
            "add",
            "e1",
            "--node",
            "n0",
            "--socket",
            "/tmp/e1.sock",
            "--block-size",
            "1024",
        ],
        1,
        "error: INVALID_ARGUMENT: export.logical_block_size",
    );

    // Same manager over its unix socket.
    let unix = format!("unix:{}", sock.display());
    let json: serde_json::Value =
        serde_json::from_str(&ok(&unix, &["--json", "export", "list"])).unwrap();
    let e = &json.as_array().unwrap()[0];
    assert_eq!(e["id"], "e0");
    assert_eq!(e["num_queues"], 4);
    assert_eq!(e["queue_size"], 256);
    assert_eq!(e["writable"], true);
    assert_eq!(e["serial"], "e0");
    assert_eq!(e["queues"].as_array().unwrap().len(), 4);

    let wj: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "worker", "list"])).unwrap();
    assert_eq!(wj[0]["queues"].as_array().unwrap().len(), 4);

    fails(
        a,
        &["node", "remove", "n0"],
        1,
        "error: FAILED_PRECONDITION: node \"n0\" is in use by export \"e0\"",
    );
    assert!(ok(a, &["export", "remove", "e0"]).contains("removed export e0"));
    fails(a, &["export", "remove", "e0"], 1, "error: NOT_FOUND");
    ok(a, &["node", "remove", "n0"]);

    // The worker goes away: GONE.
    drop(stream);
    drop(rt);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let w = ok(a, &["worker", "list"]);
        if w.contains("GONE") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker never GONE: {w}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn state_survives_manager_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let m = ManagerProc::start(&state, &[]);
    ok(&m.url, &["node", "add-null", "keep", "--size", "1M"]);
    assert!(m.terminate().success());

    let m = ManagerProc::start(&state, &[]);
    let list = ok(&m.url, &["node", "list"]);
    assert!(list.contains("keep"), "{list}");
}

#[test]
fn unreachable_manager_is_an_error() {
    // Port 1 on localhost: nothing listens there.
    fails(
        "http://127.0.0.1:1",
        &["node", "list"],
        1,
        "error: UNAVAILABLE",
    );
}

#[test]
fn corrupt_state_file_stops_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.json"), "garbage").unwrap();
    let out = run_bounded(
        Command::new(manager_binary())
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path()),
        "blkmesh-manager",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt state file") && err.contains("state.json"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state.json")).unwrap(),
        "garbage"
    );
}

#[test]
fn device_nodes_throttle_and_fault_injection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let sock = sock.to_str().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &[]);
    let a = m.url.as_str();

    // Device-backed protocol nodes: /dev/null passes as a character device.
    let out = ok(
        a,
        &[
            "node",
            "add-nvme-io-uring",
            "nvme0",
            "--path",
            "/dev/null",
            "--read-only",
        ],
    );
    assert!(
        out.contains("driver:") && out.contains("nvme_io_uring"),
        "{out}"
    );
    assert!(out.contains("open-read-only: yes"), "{out}");
    ok(a, &["node", "add-vhost-user", "vu0", "--path", sock]);
    ok(a, &["node", "add-vdpa", "vdpa0", "--path", "/dev/null"]);

    // Filters.
    ok(a, &["node", "add-null", "n0", "--size", "1M"]);
    let out = ok(
        a,
        &[
            "node",
            "add-throttle",
            "t0",
            "--child",
            "n0",
            "--group",
            "g",
            "--iops",
            "100",
            "--iops-burst",
            "200",
            "--bps-read",
            "1M",
        ],
    );
    assert!(out.contains("group:") && out.contains(" g"), "{out}");
    assert!(out.contains("100/s, burst 200"), "{out}");
    assert!(out.contains("1M/s"), "{out}");
    assert!(
        out.contains("size:") && out.contains("1M (1048576 bytes)"),
        "{out}"
    );
    let out = ok(
        a,
        &[
            "node",
            "add-fault-injection",
            "f0",
            "--child",
            "t0",
            "--rule",
            "ops=read+write,start=0,end=1M,skip=2,count=1,prob=0.5,errno=EIO",
            "--rule",
            "delay=10ms",
        ],
    );
    assert!(
        out.contains("rule[0]:")
            && out.contains("ops=read+write,end=1M,skip=2,count=1,prob=0.5,errno=EIO"),
        "{out}"
    );
    assert!(
        out.contains("rule[1]:") && out.contains("delay=10ms"),
        "{out}"
    );

    let list = ok(a, &["node", "list"]);
    let line = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {list}"))
            .to_string()
    };
    assert!(line("nvme0").contains("nvme_io_uring"), "{list}");
    assert!(line("nvme0").contains("path=/dev/null read-only"), "{list}");
    assert!(line("vu0").contains("virtio_blk_vhost_user"), "{list}");
    assert!(line("vdpa0").contains("virtio_blk_vhost_vdpa"), "{list}");
    assert!(
        line("t0").contains("throttle")
            && line("t0").contains("child=n0 group=g iops=100 iops-burst=200 bps-read=1M"),
        "{list}"
    );
    assert!(
        line("f0").contains("fault_injection") && line("f0").contains("child=t0 rules=2"),
        "{list}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "list"])).unwrap();
    let node = |name: &str| {
        json.as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {json}"))
            .clone()
    };
    assert_eq!(node("vu0")["driver"], "virtio_blk_vhost_user");
    assert_eq!(node("vu0")["options"]["path"], sock);
    assert_eq!(node("vu0")["size"], 0);
    assert_eq!(node("nvme0")["read_only"], true);
    let t0 = node("t0");
    assert_eq!(t0["options"]["group"], "g");
    assert_eq!(t0["options"]["limits"]["iops_total"]["rate"], 100);
    assert_eq!(t0["options"]["limits"]["iops_total"]["burst"], 200);
    assert_eq!(t0["options"]["limits"]["bps_read"]["rate"], 1 << 20);
    assert_eq!(t0["options"]["limits"]["bps_write"]["rate"], 0);
    let f0 = node("f0");
    assert_eq!(f0["size"], 1 << 20);
    let rules = f0["options"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0]["ops"], serde_json::json!(["read", "write"]));
    assert_eq!(rules[0]["errno"], 5);
    assert_eq!(rules[0]["errno_name"], "EIO");
    assert_eq!(rules[0]["probability"], 0.5);
    assert_eq!(rules[1]["delay_ns"], 10_000_000);
    let info: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "info", "f0"])).unwrap();
    assert_eq!(info["options"]["child"], "t0");

    // Manager errors: exit 1.
    fails(
        a,
        &["node", "add-nvme-io-uring", "x", "--path", missing],
        1,
        "error: INVALID_ARGUMENT: node.nvme_io_uring.path: cannot stat",
    );
    fails(
        a,
        &["node", "add-vhost-user", "x", "--path", "/dev/null"],
        1,
        "error: INVALID_ARGUMENT: node.virtio_blk_vhost_user.path: must be a unix socket",
    );
    fails(
        a,
        &["node", "add-vdpa", "x", "--path", "relative"],
        1,
        "error: INVALID_ARGUMENT: node.virtio_blk_vhost_vdpa.path: must be an absolute path",
    );
    ok(a, &["node", "add-null", "n1", "--size", "1M"]);
    fails(
        a,
        &["node", "add-throttle", "t1", "--child", "n1"],
        1,
        "error: INVALID_ARGUMENT: node.throttle.limits: throttle with no limit",
    );
    fails(
        a,
        &[
            "node",
            "add-throttle",
            "t1",
            "--child",
            "n1",
            "--iops-read",
            "100",
            "--iops-read-burst",
            "10",
        ],
        1,
        "error: INVALID_ARGUMENT: node.throttle.limits.iops_read.burst: must be 0 or >= rate (got 10 < 100)",
    );
    fails(
        a,
        &[
            "node", "add-throttle", "t1", "--child", "n1", "--group", "g", "--iops", "100",
        ],
        1,
        "error: FAILED_PRECONDITION: node.throttle.limits: node \"t1\" has other limits than node \"t0\" of throttle group \"g\"",
    );
    fails(
        a,
        &[
            "node",
            "add-fault-injection",
            "f1",
            "--child",
            "n1",
            "--rule",
            "errno=5,start=4k,end=4k",
        ],
        1,
        "error: INVALID_ARGUMENT: node.fault_injection.rules[0].offset_end",
    );
    fails(
        a,
        &[
            "node",
            "add-fault-injection",
            "f1",
            "--child",
            "n1",
            "--rule",
            "delay=11s",
        ],
        1,
        "error: INVALID_ARGUMENT: node.fault_injection.rules[0].delay_ns",
    );
    fails(
        a,
        &["node", "remove", "t0"],
        1,
        "error: FAILED_PRECONDITION: node \"t0\" is in use by node \"f0\"",
    );

    // Usage errors: exit 2, naming the bad key.
    for (rule, needle) in [
        ("frob=1,errno=5", "key \"frob\": unknown key"),
        ("errno=EFROB", "key \"errno\": unknown errno"),
        ("errno=0", "key \"errno\": must be in 1..=4095"),
        ("delay=10", "key \"delay\": invalid duration"),
        ("ops=read+frob,errno=5", "key \"ops\": unknown op"),
        ("prob=2,errno=5", "key \"prob\""),
        ("errno=5,delay=1ms", "key \"delay\": a rule has one action"),
        ("ops=read", "needs an action"),
    ] {
        fails(
            a,
            &[
                "node",
                "add-fault-injection",
                "f1",
                "--child",
                "n1",
                "--rule",
                rule,
            ],
            2,
            needle,
        );
    }
    // No rule: the node passes everything through until rules are set.
    let out = ok(
        a,
        &["node", "add-fault-injection", "f-none", "--child", "n1"],
    );
    assert!(out.contains("rules:     0"), "{out}");
    fails(
        a,
        &["node", "add-throttle", "t1", "--child", "n1", "--bps", "1X"],
        2,
        "unknown size suffix",
    );
    fails(a, &["node", "add-vdpa", "x"], 2, "--path");

    ok(a, &["node", "remove", "f0"]);
    ok(a, &["node", "remove", "t0"]);
    assert!(m.terminate().success());
}

#[test]
fn stats_on_an_empty_manager_and_metrics_endpoint() {
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &["--metrics", "127.0.0.1:0"]);
    let a = m.url.as_str();

    let out = ok(a, &["stats"]);
    assert!(
        out.contains("EXPORT") && out.contains("P99") && out.contains("NODE"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(a, &["--json", "stats"])).unwrap();
    assert_eq!(json, serde_json::json!({ "exports": [], "nodes": [] }));
    fails(
        a,
        &["stats", "--export", "nope"],
        1,
        "error: NOT_FOUND: exports",
    );

    ok(a, &["node", "add-null", "n0", "--size", "1M"]);
    let out = ok(a, &["stats", "--node", "n0"]);
    assert!(out.contains("n0") && !out.contains("EXPORT"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(a, &["--json", "stats"])).unwrap();
    assert_eq!(json["nodes"][0]["node"], "n0");
    assert_eq!(json["nodes"][0]["io"]["read"]["ops"], 0);

    // The Prometheus endpoint of the real binary.
    let addr = m.metrics.clone().expect("metrics address");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(resp.contains("\nblkmesh_nodes 1\n"), "{resp}");
    assert!(
        resp.contains("blkmesh_node_ops_total{node=\"n0\",op=\"read\"} 0"),
        "{resp}"
    );

    assert!(m.terminate().success());
}

/// Runs `blkmeshctl events --count 1` and adds nodes until it prints.
fn one_event(a: &str, json: bool, prefix: &str) -> String {
    let mut args = vec!["--addr", a];
    if json {
        args.push("--json");
    }
    args.extend(["events", "--count", "1"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_blkmeshctl"))
        .args(&args)
        .env_remove("BLKMESH_ADDR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blkmeshctl events");
    // The watcher subscribes at some point after it starts: keep making
    // events until it has seen one.
    let deadline = std::time::Instant::now() + WAIT;
    let mut i = 0;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("blkmeshctl events --count 1 did not finish");
        }
        ok(
            a,
            &["node", "add-null", &format!("{prefix}{i}"), "--size", "1M"],
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    text
}

#[test]
fn events_count_stops_after_n_events() {
    let dir = tempfile::tempdir().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &[]);
    let a = m.url.as_str();

    let line = one_event(a, false, "ev");
    // e.g. 2025-01-01T00:00:00.000Z node_added ev0
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{line}");
    assert!(parts[0].ends_with('Z') && parts[0].contains('T'), "{line}");
    assert_eq!(parts[1], "node_added", "{line}");
    assert!(parts[2].starts_with("ev"), "{line}");

    let json: serde_json::Value = serde_json::from_str(one_event(a, true, "js").trim()).unwrap();
    assert_eq!(json["kind"], "node_added");
    assert!(json["name"].as_str().unwrap().starts_with("js"), "{json}");
    assert!(json["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
}

/// A stand-in worker holding its agent session open, on its own
/// runtime (drop both to make it leave).
fn stand_in_worker(url: &str, name: &str) -> (tokio::runtime::Runtime, StandInSession) {
    use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
    use blkmesh_proto::agent::v1::{worker_up, WorkerHello, WorkerUp};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = url.to_string();
    let name = name.to_string();
    let session = rt.block_on(async move {
        let mut client = tokio::time::timeout(WAIT, AgentServiceClient::connect(url))
            .await
            .expect("connect timeout")
            .expect("connect");
        let (up, rx) = tokio::sync::mpsc::unbounded_channel();
        up.send(WorkerUp {
            msg: Some(worker_up::Msg::Hello(WorkerHello {
                socket: format!("/tmp/{name}.sock"),
                name,
                pid: 4242,
            })),
        })
        .unwrap();
        let mut s = client
            .worker_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        tokio::time::timeout(WAIT, s.message())
            .await
            .expect("accepted timeout")
            .expect("accepted")
            .expect("accepted, not the end");
        (up, s)
    });
    (rt, session)
}

/// A stand-in worker's session: the sending half and the stream down.
type StandInSession = (
    tokio::sync::mpsc::UnboundedSender<blkmesh_proto::agent::v1::WorkerUp>,
    tonic::Streaming<blkmesh_proto::agent::v1::WorkerDown>,
);

#[test]
fn spread_move_queue_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &[]);
    let a = m.url.as_str();
    let _w0 = stand_in_worker(a, "w0");
    let w1 = stand_in_worker(a, "w1");

    ok(a, &["node", "add-null", "n0", "--size", "1M"]);
    ok(a, &["node", "add-null", "n1", "--size", "1M"]);
    ok(
        a,
        &[
            "node",
            "add-throttle",
            "t1",
            "--child",
            "n1",
            "--iops",
            "100",
        ],
    );
    let add = |id: &str, node: &str| {
        vec![
            "export".to_string(),
            "add".into(),
            id.into(),
            "--node".into(),
            node.into(),
            "--socket".into(),
            format!("/tmp/{id}.sock"),
            "--num-queues".into(),
            "4".into(),
            "--spread".into(),
        ]
    };
    let args = add("e1", "t1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(
        a,
        &args,
        1,
        "error: FAILED_PRECONDITION: export.spread_queues: node \"t1\" is a throttle without a group",
    );

    let args = add("e0", "n0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(a, &args);
    assert!(out.contains("w0,w1"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "export", "list"])).unwrap();
    let e = &json[0];
    assert_eq!(e["spread_queues"], true);
    let workers: Vec<&str> = e["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["worker"].as_str().unwrap())
        .collect();
    assert_eq!(workers, ["w0", "w1", "w0", "w1"]);

    // move-queue: happy path (table and JSON), then every error.
    let out = ok(a, &["worker", "move-queue", "e0", "1", "w0"]);
    assert!(out.contains("e0"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "worker", "move-queue", "e0", "3", "w0"])).unwrap();
    assert_eq!(json["queues"][3]["worker"], "w0");
    assert_eq!(json["queues"][2]["worker"], "w0");
    fails(
        a,
        &["worker", "move-queue", "nope", "0", "w0"],
        1,
        "error: NOT_FOUND: export: export \"nope\" not found",
    );
    fails(
        a,
        &["worker", "move-queue", "e0", "4", "w0"],
        1,
        "error: INVALID_ARGUMENT: queue:",
    );
    fails(
        a,
        &["worker", "move-queue", "e0", "0", "wz"],
        1,
        "error: NOT_FOUND: worker: worker \"wz\" not found",
    );
    fails(a, &["worker", "move-queue", "e0", "x", "w0"], 2, "QUEUE");
    fails(a, &["worker", "move-queue", "e0"], 2, "QUEUE");

    // drain: everything to w1.
    let out = ok(a, &["worker", "drain", "w0"]);
    assert!(
        out.contains("EXPORT") && out.contains("FROM") && out.contains("w1"),
        "{out}"
    );
    let moved: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "worker", "drain", "w0"])).unwrap();
    assert_eq!(moved, serde_json::json!([]));
    let out = ok(a, &["worker", "drain", "w0"]);
    assert!(out.contains("nothing moved"), "{out}");
    fails(
        a,
        &["worker", "drain", "wz"],
        1,
        "error: NOT_FOUND: worker: worker \"wz\" not found",
    );
    // w0 is now the only live worker other than w1; w1 holds all 4 queues.
    ok(a, &["worker", "move-queue", "e0", "0", "w0"]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "worker", "drain", "w1"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3, "{json}");
    assert_eq!(json[0]["from"], "w1");
    assert_eq!(json[0]["to"], "w0");

    // w1 gone: no other worker alive for w0's queues, and w1 is no destination.
    drop(w1);
    let deadline = std::time::Instant::now() + WAIT;
    while !ok(a, &["worker", "list"]).contains("GONE") {
        assert!(std::time::Instant::now() < deadline, "w1 never GONE");
        std::thread::sleep(Duration::from_millis(50));
    }
    fails(
        a,
        &["worker", "move-queue", "e0", "0", "w1"],
        1,
        "error: FAILED_PRECONDITION: worker: worker \"w1\" is not alive",
    );
    fails(
        a,
        &["worker", "drain", "w0"],
        1,
        "error: FAILED_PRECONDITION: worker: no other live worker",
    );
}

#[test]
fn node_move_moves_exports_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &[]);
    let a = m.url.as_str();
    let _w0 = stand_in_worker(a, "w0");
    ok(a, &["node", "add-null", "base", "--size", "1M"]);
    ok(a, &["node", "add-raw", "r", "--child", "base"]);
    ok(
        a,
        &[
            "export",
            "add",
            "e0",
            "--node",
            "r",
            "--socket",
            "/tmp/e0.sock",
            "--num-queues",
            "2",
        ],
    );
    let _w1 = stand_in_worker(a, "w1");

    let out = ok(a, &["node", "move", "base", "w1"]);
    assert!(
        out.contains("EXPORT") && out.contains("FROM") && out.contains("w0") && out.contains("w1"),
        "{out}"
    );
    let moved: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "move", "r", "w1"])).unwrap();
    assert_eq!(moved, serde_json::json!([]));
    let out = ok(a, &["node", "move", "r", "w1"]);
    assert!(out.contains("no queue to move"), "{out}");
    let moved: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "move", "r", "w0"])).unwrap();
    assert_eq!(moved.as_array().unwrap().len(), 2, "{moved}");
    assert_eq!(moved[1]["export"], "e0");
    assert_eq!(moved[1]["queue"], 1);
    assert_eq!(moved[1]["from"], "w1");
    assert_eq!(moved[1]["to"], "w0");

    fails(
        a,
        &["node", "move", "nope", "w1"],
        1,
        "error: NOT_FOUND: node: node \"nope\" not found",
    );
    fails(
        a,
        &["node", "move", "base", "wz"],
        1,
        "error: NOT_FOUND: worker: worker \"wz\" not found",
    );
    fails(a, &["node", "move", "base"], 2, "WORKER");
}

/// Starts `blkmeshctl [--json] events --count 1`, then calls `make(i)` for
/// i = 0, 1, ... until the watcher has printed its line; returns the line.
fn first_event(a: &str, json: bool, mut make: impl FnMut(usize)) -> String {
    let mut args = vec!["--addr", a];
    if json {
        args.push("--json");
    }
    args.extend(["events", "--count", "1"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_blkmeshctl"))
        .args(&args)
        .env_remove("BLKMESH_ADDR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blkmeshctl events");
    let deadline = std::time::Instant::now() + WAIT;
    let mut i = 0;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("blkmeshctl events --count 1 did not finish");
        }
        make(i);
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

#[test]
fn node_update_and_resize_commands() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img_s = img.to_str().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &["--apply-timeout-ms", "200"]);
    let a = m.url.as_str();
    let _w0 = stand_in_worker(a, "w0");

    // Fault injection with limit knobs, then changed live.
    ok(a, &["node", "add-null", "n0", "--size", "1M"]);
    let info = ok(
        a,
        &[
            "node",
            "add-fault-injection",
            "x",
            "--child",
            "n0",
            "--rule",
            "delay=1ms",
            "--max-transfer",
            "64k",
            "--max-segments",
            "4",
            "--buf-alignment",
            "4k",
        ],
    );
    assert!(info.contains("max-transfer:  64k (65536 bytes)"), "{info}");
    assert!(info.contains("max-segments:  4"), "{info}");
    assert!(info.contains("buf-alignment: 4096 bytes"), "{info}");
    let info = ok(a, &["node", "set-faults", "x", "--max-transfer", "128k"]);
    assert!(info.contains("128k (131072 bytes)"), "{info}");
    assert!(info.contains("rules:         1"), "{info}");
    assert!(info.contains("max-segments:  4"), "{info}");
    let info = ok(
        a,
        &[
            "node",
            "set-faults",
            "x",
            "--rule",
            "errno=EIO",
            "--rule",
            "delay=2ms",
        ],
    );
    assert!(
        info.contains("rule[1]:") && info.contains("delay=2ms"),
        "{info}"
    );
    let info = ok(
        a,
        &[
            "node",
            "set-faults",
            "x",
            "--clear-rules",
            "--max-segments",
            "0",
        ],
    );
    assert!(info.contains("rules:         0"), "{info}");
    assert!(!info.contains("max-segments"), "{info}");
    let list = ok(a, &["node", "list"]);
    assert!(
        list.contains("child=n0 rules=0 max-transfer=128k buf-alignment=4096"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "info", "x"])).unwrap();
    assert_eq!(json["options"]["max_transfer"], 131072);
    assert_eq!(json["options"]["buf_alignment"], 4096);
    fails(a, &["node", "set-faults", "x"], 2, "required");
    fails(
        a,
        &["node", "set-faults", "x", "--max-transfer", "1000"],
        1,
        "error: INVALID_ARGUMENT: node.fault_injection.max_transfer",
    );
    fails(
        a,
        &["node", "set-faults", "n0", "--clear-rules"],
        1,
        "error: INVALID_ARGUMENT: node n0 is a null node; set-faults applies to fault-injection nodes",
    );
    fails(
        a,
        &[
            "node",
            "add-fault-injection",
            "y",
            "--child",
            "x",
            "--rule",
            "delay=1ms",
            "--buf-alignment",
            "3",
        ],
        1,
        "error: INVALID_ARGUMENT: node.fault_injection.buf_alignment",
    );

    // Latency of a null node.
    let info = ok(a, &["node", "set-latency", "n0", "5ms"]);
    assert!(
        info.contains("latency:") && info.contains("5000 us"),
        "{info}"
    );
    fails(
        a,
        &["node", "set-latency", "n0", "5"],
        2,
        "invalid duration",
    );

    // Throttle groups: new limits apply to the whole group.
    ok(a, &["node", "add-io-uring", "f0", "--path", img_s]);
    ok(a, &["node", "add-null", "n1", "--size", "1M"]);
    ok(
        a,
        &[
            "node",
            "add-throttle",
            "t",
            "--child",
            "f0",
            "--iops",
            "100",
            "--group",
            "g",
        ],
    );
    ok(
        a,
        &[
            "node",
            "add-throttle",
            "t2",
            "--child",
            "n1",
            "--iops",
            "100",
            "--group",
            "g",
        ],
    );
    let info = ok(
        a,
        &["node", "set-throttle", "t", "--iops", "500", "--bps", "1M"],
    );
    assert!(info.contains("iops:       500/s"), "{info}");
    let info = ok(a, &["node", "info", "t2"]);
    assert!(
        info.contains("iops:       500/s") && info.contains("bps:        1M/s"),
        "{info}"
    );

    // read-only and direct of an io_uring node.
    let info = ok(a, &["node", "set-read-only", "f0", "on"]);
    assert!(info.contains("read-only:      yes"), "{info}");
    let info = ok(a, &["node", "set-direct", "f0", "on"]);
    assert!(info.contains("direct:         yes"), "{info}");
    ok(a, &["node", "set-read-only", "f0", "off"]);
    fails(
        a,
        &["node", "set-read-only", "f0", "maybe"],
        2,
        "expected on or off",
    );
    fails(
        a,
        &["node", "set-direct", "n0", "on"],
        1,
        "set-direct applies to io_uring nodes",
    );
    fails(
        a,
        &["node", "set-read-only", "nope", "on"],
        1,
        "error: NOT_FOUND",
    );

    // Exports show their state: no frontend, so PENDING.
    let out = ok(
        a,
        &[
            "export",
            "add",
            "e0",
            "--node",
            "t",
            "--socket",
            "/tmp/e0.sock",
            "--writable",
        ],
    );
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("ID  ") && header.contains(" STATE "),
        "{out}"
    );
    assert!(out.lines().nth(1).unwrap().contains(" PENDING "), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "export", "list"])).unwrap();
    assert_eq!(json[0]["state"], "PENDING");
    assert_eq!(json[0]["message"], "no frontend connected");
    fails(
        a,
        &["node", "set-read-only", "f0", "on"],
        1,
        "error: FAILED_PRECONDITION: node.io_uring.read_only: writable export \"e0\"",
    );

    // Resize: the file grows; smaller is refused.
    let info = ok(a, &["node", "resize", "f0", "4M"]);
    assert!(info.contains("4M (4194304 bytes)"), "{info}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
    let info = ok(a, &["node", "info", "t"]);
    assert!(info.contains("size:       4M"), "{info}");
    let list = ok(a, &["export", "list"]);
    assert!(list.contains(" 4M "), "{list}");
    fails(
        a,
        &["node", "resize", "f0", "1M"],
        1,
        "error: FAILED_PRECONDITION: size: node \"f0\" is 4194304 bytes; it can only grow",
    );
    fails(
        a,
        &["node", "resize", "f0", "1000"],
        1,
        "error: INVALID_ARGUMENT: size",
    );
    fails(a, &["node", "resize", "f0", "lots"], 2, "invalid value");

    // The new event kinds.
    let mut size = 4u64 << 20;
    let line = first_event(a, false, |_| {
        size += 1 << 20;
        ok(a, &["node", "resize", "n1", &size.to_string()]);
    });
    assert!(line.contains(" node_resized node=n1 old_size="), "{line}");
    let mut on = false;
    let line = first_event(a, true, |_| {
        on = !on;
        ok(
            a,
            &["node", "set-direct", "f0", if on { "off" } else { "on" }],
        );
    });
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["kind"], "node_updated", "{json}");
    assert_eq!(json["node"], "f0", "{json}");
    assert!(
        json["changes"][0].as_str().unwrap().starts_with("direct "),
        "{json}"
    );
    assert!(m.terminate().success());
}

/// A stand-in frontend on its own runtime (drop the runtime to make it
/// leave): it reports SERVING for every plan and answers zone commands —
/// reports with two zones from the asked offset's zone, actions at 8M with
/// EBADRQC, other actions with the zone explicitly open.
fn stand_in_frontend(url: &str) -> tokio::runtime::Runtime {
    use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
    use blkmesh_proto::agent::v1::frontend_down::Msg as Event;
    use blkmesh_proto::agent::v1::frontend_up::Msg as Up;
    use blkmesh_proto::agent::v1::zone_answer::Result as Answer;
    use blkmesh_proto::agent::v1::{
        ExportStatus, FrontendHello, FrontendUp, ZoneAnswer, ZoneError,
    };
    use blkmesh_proto::v1::*;

    const MIB: u64 = 1 << 20;
    let zone = |start: u64, wp: u64, condition: ZoneCondition| Zone {
        start,
        length: 4 * MIB,
        capacity: 3 * MIB,
        write_pointer: wp,
        r#type: ZoneType::SequentialWriteRequired as i32,
        condition: condition as i32,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = url.to_string();
    let mut client = rt.block_on(async move {
        tokio::time::timeout(WAIT, AgentServiceClient::connect(url))
            .await
            .expect("connect timeout")
            .expect("connect")
    });
    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    let send = move |msg| {
        let _ = up.send(FrontendUp { msg: Some(msg) });
    };
    send(Up::Hello(FrontendHello { name: "fe".into() }));
    let mut stream = rt
        .block_on(client.frontend_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
        .expect("session")
        .into_inner();
    rt.spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            match ev.msg {
                Some(Event::Upsert(plan)) => send(Up::ExportStatus(ExportStatus {
                    id: plan.export.unwrap_or_default().id,
                    generation: plan.generation,
                    state: ExportState::Serving as i32,
                    message: String::new(),
                    size: 0,
                })),
                Some(Event::ZoneCommand(cmd)) => {
                    let first = cmd.offset / (4 * MIB) * (4 * MIB);
                    let result = match ZoneAction::try_from(cmd.action) {
                        Ok(ZoneAction::Unspecified) => Answer::Report(ReportZonesResponse {
                            info: None,
                            zones: [
                                zone(first, first, ZoneCondition::Empty),
                                zone(
                                    first + 4 * MIB,
                                    first + 5 * MIB,
                                    ZoneCondition::ImplicitOpen,
                                ),
                            ]
                            .into_iter()
                            .take(cmd.max_zones as usize)
                            .collect(),
                        }),
                        _ if cmd.offset == 8 * MIB => Answer::Error(ZoneError {
                            errno: 56,
                            message: "zone 2 is full".into(),
                        }),
                        _ => Answer::Zone(zone(first, first, ZoneCondition::ExplicitOpen)),
                    };
                    send(Up::ZoneAnswer(ZoneAnswer {
                        id: cmd.id,
                        result: Some(result),
                    }));
                }
                _ => {}
            }
        }
    });
    rt
}

#[test]
fn zoned_nodes_and_zone_commands() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("z.zones");
    let meta = meta.to_str().unwrap();
    let m = ManagerProc::start(&dir.path().join("state"), &["--apply-timeout-ms", "2000"]);
    let a = m.url.as_str();

    ok(a, &["node", "add-null", "n", "--size", "66M"]);
    let info = ok(
        a,
        &[
            "node",
            "add-zoned",
            "z",
            "--child",
            "n",
            "--zone-size",
            "4M",
            "--zone-capacity",
            "3M",
            "--max-open",
            "4",
            "--max-active",
            "8",
            "--metadata",
            meta,
        ],
    );
    for needle in [
        "driver:            zoned",
        "size:              64M (67108864 bytes)",
        "child:             n",
        &format!("metadata:          {meta}"),
        "zone-model:        HOST_MANAGED",
        "zones:             16",
        "zone-size:         4M (4194304 bytes)",
        "zone-capacity:     3M (3145728 bytes)",
        "max-open-zones:    4",
        "max-active-zones:  8",
        "write-granularity: 512 bytes",
        "max-append:        1M (1048576 bytes)",
    ] {
        assert!(info.contains(needle), "{needle:?} not in {info}");
    }
    // A raw window over it shows its own zones; limits 0 are unlimited.
    ok(a, &["node", "add-null", "n2", "--size", "64M"]);
    let info = ok(
        a,
        &[
            "node",
            "add-zoned",
            "z2",
            "--child",
            "n2",
            "--zone-size",
            "1M",
            "--metadata",
            &format!("{meta}2"),
        ],
    );
    assert!(info.contains("max-open-zones:    unlimited"), "{info}");
    assert!(info.contains("zone-capacity:     1M"), "{info}");
    let info = ok(
        a,
        &["node", "add-raw", "r2", "--child", "z2", "--offset", "8M"],
    );
    assert!(info.contains("zones:             56"), "{info}");

    let list = ok(a, &["node", "list"]);
    let header = list.lines().next().unwrap();
    assert!(
        header.contains("USED-BY") && header.contains("ZONES"),
        "{list}"
    );
    assert!(
        list.contains("HOST_MANAGED 16x4M cap=3M open=4 active=8"),
        "{list}"
    );
    assert!(list.contains("HOST_MANAGED 56x1M cap=1M"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "info", "z"])).unwrap();
    assert_eq!(json["driver"], "zoned");
    assert_eq!(json["zones"]["model"], "HOST_MANAGED");
    assert_eq!(json["zones"]["nr_zones"], 16);
    assert_eq!(json["zones"]["zone_capacity"], 3 << 20);
    assert_eq!(json["options"]["zone_size"], 4 << 20);
    assert_eq!(json["options"]["metadata_path"], meta);
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "node", "info", "n"])).unwrap();
    assert!(json["zones"].is_null(), "{json}");

    // The manager's rules.
    fails(
        a,
        &[
            "node",
            "add-zoned",
            "zz",
            "--child",
            "r2",
            "--zone-size",
            "1M",
            "--metadata",
            "/tmp/zz.zones",
        ],
        1,
        "error: INVALID_ARGUMENT: node.zoned.child",
    );
    ok(a, &["node", "add-null", "n3", "--size", "64M"]);
    fails(
        a,
        &[
            "node",
            "add-zoned",
            "zz",
            "--child",
            "n3",
            "--zone-size",
            "3M",
            "--metadata",
            "/tmp/zz.zones",
        ],
        1,
        "error: INVALID_ARGUMENT: node.zoned.zone_size",
    );
    fails(
        a,
        &[
            "node",
            "add-zoned",
            "zz",
            "--child",
            "n3",
            "--zone-size",
            "1M",
            "--metadata",
            meta,
        ],
        1,
        "error: ALREADY_EXISTS: node.zoned.metadata_path",
    );
    fails(
        a,
        &["node", "add-raw", "rz", "--child", "z", "--offset", "4k"],
        1,
        "error: INVALID_ARGUMENT: node.raw.offset",
    );
    fails(
        a,
        &["node", "resize", "z", "128M"],
        1,
        "error: FAILED_PRECONDITION: name: node \"z\" is zoned",
    );

    // Zone commands: no frontend yet.
    let _w = stand_in_worker(a, "w0");
    ok(
        a,
        &[
            "export",
            "add",
            "ez",
            "--node",
            "z",
            "--socket",
            "/tmp/ez.sock",
            "--writable",
        ],
    );
    ok(a, &["node", "add-null", "plain", "--size", "1M"]);
    ok(
        a,
        &[
            "export",
            "add",
            "plain",
            "--node",
            "plain",
            "--socket",
            "/tmp/plain.sock",
        ],
    );
    let no_frontend = "error: FAILED_PRECONDITION: export: no frontend serves export \"ez\"";
    fails(a, &["zone", "report", "ez"], 1, no_frontend);
    fails(a, &["zone", "open", "ez", "4M"], 1, no_frontend);
    fails(a, &["zone", "reset-all", "ez"], 1, no_frontend);
    fails(
        a,
        &["zone", "report", "nope"],
        1,
        "error: NOT_FOUND: export: export \"nope\" not found",
    );
    fails(
        a,
        &["zone", "report", "plain"],
        1,
        "error: FAILED_PRECONDITION: export: export \"plain\" is not zoned",
    );
    fails(
        a,
        &["zone", "close", "ez", "4k"],
        1,
        "error: INVALID_ARGUMENT: offset: must be the start of a zone",
    );
    fails(
        a,
        &["zone", "report", "ez", "--offset", "1G"],
        1,
        "error: INVALID_ARGUMENT: offset",
    );
    fails(a, &["zone", "open", "ez"], 2, "OFFSET");

    // With a frontend serving the export.
    let _fe = stand_in_frontend(a);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = ok(a, &["export", "list"]);
        if list
            .lines()
            .any(|l| l.starts_with("ez ") && l.contains("SERVING"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ez never served: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = ok(a, &["zone", "report", "ez"]);
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["START", "LENGTH", "CAPACITY", "WP", "TYPE", "CONDITION"],
        "{report}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", "4M", "3M", "0", "SEQ_WRITE_REQUIRED", "EMPTY"],
        "{report}"
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        [
            "4M",
            "4M",
            "3M",
            "5M",
            "SEQ_WRITE_REQUIRED",
            "IMPLICIT_OPEN"
        ],
        "{report}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(
        a,
        &[
            "--json", "zone", "report", "ez", "--offset", "9M", "--count", "1",
        ],
    ))
    .unwrap();
    assert_eq!(json["export"], "ez");
    assert_eq!(json["info"]["nr_zones"], 16);
    let zones = json["zones"].as_array().unwrap();
    assert_eq!(zones.len(), 1);
    assert_eq!(zones[0]["start"], 8 << 20);
    assert_eq!(zones[0]["write_pointer"], 8 << 20);
    assert_eq!(zones[0]["type"], "SEQ_WRITE_REQUIRED");
    assert_eq!(zones[0]["condition"], "EMPTY");

    let out = ok(a, &["zone", "open", "ez", "4M"]);
    assert!(
        out.lines().nth(1).unwrap().contains("EXPLICIT_OPEN"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(a, &["--json", "zone", "finish", "ez", "12M"])).unwrap();
    assert_eq!(json["start"], 12 << 20);
    for verb in ["close", "reset"] {
        ok(a, &["zone", verb, "ez", "0"]);
    }
    assert_eq!(
        ok(a, &["zone", "reset-all", "ez"]).trim(),
        "reset every zone of export ez"
    );
    fails(
        a,
        &["zone", "open", "ez", "8M"],
        1,
        "error: FAILED_PRECONDITION: export \"ez\": zone open at offset 8388608: zone 2 is \
         full (EBADRQC)",
    );
}
