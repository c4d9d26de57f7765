//! `--file`: blkmesh-io on a file through libblkio's io_uring driver, the
//! ceiling `bench/compare.sh` measures servers against.

use std::process::{Command, Output};

fn blkmesh_io(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blkmesh-io"))
        .args(args)
        .output()
        .expect("run blkmesh-io")
}

fn image() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("scratch directory");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(16 << 20))
        .expect("sparse image");
    let path = path.to_str().expect("a UTF-8 path").to_string();
    (dir, path)
}

#[test]
fn commands_and_bench_run_on_a_file() {
    let (_dir, path) = image();
    let out = blkmesh_io(&[
        "--file",
        &path,
        "-c",
        "write -P 0x5a 4096 64k",
        "-c",
        "read -P 0x5a 4096 64k",
    ]);
    assert!(out.status.success(), "{out:?}");
    // What was written is in the file itself.
    let bytes = std::fs::read(&path).expect("read the image");
    assert!(bytes[4096..4096 + 65536].iter().all(|&b| b == 0x5a));
    assert!(bytes[..4096].iter().all(|&b| b == 0));

    let out = blkmesh_io(&[
        "--file",
        &path,
        "bench",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--qd",
        "4",
        "--seconds",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert!(report["ops"].as_u64() > Some(0), "{report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
}

#[test]
fn a_file_that_is_not_there_is_an_error_naming_it() {
    let out = blkmesh_io(&["--file", "/nonexistent/disk.img", "-c", "read 0 4k"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open /nonexistent/disk.img"), "{err}");
    assert!(!err.contains("zoned"), "a socket's hint on a file: {err}");
}

#[test]
fn the_native_driver_needs_an_export() {
    let (_dir, path) = image();
    let out = blkmesh_io(&["--file", &path, "--driver", "native", "-c", "read 0 4k"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give --socket, not --file"), "{err}");
    // A zone command picks the native driver by itself: the same answer.
    let out = blkmesh_io(&["--file", &path, "-c", "zone_report 0 1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
