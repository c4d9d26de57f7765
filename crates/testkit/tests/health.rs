//! `blkmesh-health` (the container health probe) and `blkmeshctl frontend
//! list` against real processes: healthy, unhealthy and usage errors.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkmesh_testkit::{bin_path, Cluster, ClusterOptions, ExportOpts};

/// Runs blkmesh-health against `manager` with `args`, bounded.
fn health(manager: &str, args: &[&str]) -> Output {
    let mut child = Command::new(bin_path("blkmesh-health"))
        .arg("--manager")
        .arg(manager)
        .args(["--timeout-ms", "2000"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blkmesh-health");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("blkmesh-health {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn expect(o: &Output, code: i32, needle: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    assert!(text(o).contains(needle), "want {needle:?} in {}", text(o));
}

#[test]
fn health_probe_checks_manager_workers_and_frontends() {
    let mut cluster = Cluster::start(ClusterOptions::default().workers(1));
    let url = cluster.manager_url();

    expect(&health(&url, &[]), 0, "healthy: manager SERVING");
    expect(
        &health(&url, &["--worker", "worker0", "--frontend", "frontend0"]),
        0,
        "frontend frontend0 connected (0 exports serving)",
    );
    expect(
        &health(&url, &["--worker", "worker9"]),
        1,
        "worker worker9 is not registered",
    );
    expect(
        &health(&url, &["--frontend", "frontend9"]),
        1,
        "frontend frontend9 is not registered",
    );

    // An export: the frontend serves it, and the CLI lists it.
    cluster.add_null("n0", 1 << 20).unwrap();
    cluster
        .add_export(ExportOpts::new("e0", "n0").writable())
        .unwrap();
    expect(
        &health(&url, &["--frontend", "frontend0"]),
        0,
        "frontend frontend0 connected (1 exports serving)",
    );
    let out = cluster.ctl(["frontend", "list"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    let row = table.lines().nth(1).unwrap_or_default();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["frontend0", "CONNECTED", "e0", "-", "-", "-"],
        "{table}"
    );
    let out = cluster.ctl(["--json", "frontend", "list"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json[0]["name"], "frontend0");
    assert_eq!(json[0]["state"], "CONNECTED");
    assert_eq!(json[0]["serving"][0], "e0");

    // A killed frontend: GONE, and the probe says so.
    cluster.kill_frontend();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = health(&url, &["--frontend", "frontend0"]);
        if o.status.code() == Some(1) {
            expect(&o, 1, "frontend frontend0 is gone");
            break;
        }
        assert!(Instant::now() < deadline, "still healthy: {}", text(&o));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cluster.ctl(["frontend", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("GONE"),
        "{out:?}"
    );

    // Usage errors exit 2; an unreachable manager is unhealthy.
    assert_eq!(health(&url, &["--frontend"]).status.code(), Some(2));
    assert_eq!(health(&url, &["--no-such-flag"]).status.code(), Some(2));
    cluster.kill_manager();
    expect(&health(&url, &[]), 1, "unhealthy:");
}
