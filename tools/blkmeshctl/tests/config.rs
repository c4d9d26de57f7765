//! `blkmeshctl config check`: the manager's configuration checks, offline.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::{Command, Output};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blkmeshctl"))
        .args(args)
        // Nothing listens here: the check must not need a manager.
        .env("BLKMESH_ADDR", "http://127.0.0.1:1")
        .output()
        .expect("run blkmeshctl")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const GOOD: &str = r#"
[[node]]
name = "disk0"
io_uring = { path = "/var/lib/blkmesh/images/disk0.img" }
create = { size = "1G" }

[[node]]
name = "slow"
throttle = { child = "disk0", iops = 5000, bps = "200M", group = "tenant1" }

[[export]]
id = "disk0"
node = "slow"
socket = "/run/blkmesh/disk0.sock"
writable = true
num_queues = 2
"#;

#[test]
fn a_valid_file_passes_without_a_manager() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "good.toml", GOOD);
    let out = ctl(&["config", "check", &file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, format!("{file}: valid: 2 nodes, 1 export\n"));
    assert!(out.stderr.is_empty(), "{out:?}");

    let out = ctl(&["--json", "config", "check", &file]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["nodes"], serde_json::json!(["disk0", "slow"]));
    assert_eq!(v["exports"][0]["socket"], "/run/blkmesh/disk0.sock");

    // The documented example is valid.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/config/blkmesh.toml"
    );
    let out = ctl(&["config", "check", example]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn every_error_is_printed_located_with_exit_status_2() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = GOOD
        .replace("bps = \"200M\"", "bps = \"200X\"")
        .replace("num_queues = 2", "num_queues = 2\nspread = true");
    let file = write(tmp.path(), "bad.toml", &bad);
    let out = ctl(&["config", "check", &file]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{file}:9:50: node[1].throttle.bps: unknown size suffix 'X' in \"200X\" (use k, M, G or T)"),
            format!("{file}:17:1: export[0].spread: unknown key \"spread\" (expected one of: id, node, socket, num_queues, queue_size, logical_block_size, writable, serial, spread_queues)"),
        ],
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // Semantic errors too: the API's validation, in the file's words.
    let file = write(
        tmp.path(),
        "semantic.toml",
        &GOOD.replace("child = \"disk0\"", "child = \"disk9\""),
    );
    let out = ctl(&["config", "check", &file]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{file}:9:22: node[1].throttle.child: node \"disk9\" is not defined in this file"
        )),
        "{stderr}"
    );

    // With --json, the errors are on stdout as well.
    let out = ctl(&["--json", "config", "check", &file]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], 9);
    assert_eq!(v["errors"][0]["column"], 22);
    assert_eq!(v["errors"][0]["field"], "node[1].throttle.child");

    // A missing file.
    let out = ctl(&["config", "check", "/nonexistent/blkmesh.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("/nonexistent/blkmesh.toml: cannot read the configuration file"));
}
