//! End-to-end tests of the `blkmesh-io` binary against
//! qemu-storage-daemon's vhost-user-blk export. qemu-storage-daemon must be
//! installed (scripts/deps.sh does): without it the tests fail, they do not
//! skip. Every wait is bounded.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const QSD: &str = "qemu-storage-daemon";
const IMAGE_SIZE: u64 = 64 << 20;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A running qemu-storage-daemon, killed on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qsd {
    /// Starts qsd exporting a fresh sparse image with two queues, or
    /// panics if qsd is not installed (never `None` then: the CI has it).
    fn start(test: &str) -> Option<Qsd> {
        // scripts/deps.sh installs it: its absence fails the test.
        let Some(qsd) = find_in_path(QSD) else {
            panic!("{test}: {QSD} not found in PATH (scripts/deps.sh installs it); not skipping");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
        let socket = dir.path().join("vhost.sock");
        let log = File::create(dir.path().join("qsd.log")).expect("qsd log");
        let child = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,aio=io_uring,discard=unmap",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=raw0,file=file0,discard=unmap")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=raw0,addr.type=unix,addr.path={},\
                 writable=on,num-queues=2",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut qsd = Qsd { child, socket, dir };
        qsd.wait_for_socket();
        Some(qsd)
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{QSD} exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{QSD} did not create its socket within 10 s: {}",
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }

    /// What to print when a request failed: qemu-storage-daemon's log and
    /// the free space where its image lives (a full disk turns writes into
    /// EIO and can leave blkmesh-io unable to write its own stderr).
    fn diagnostics(&self) -> String {
        let df = Command::new("df")
            .arg("-h")
            .arg(self.dir.path())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("df: {e}"));
        format!("qsd log:\n{}\nfree space:\n{df}", self.log())
    }

    /// Runs blkmesh-io with `--socket` and `args`, bounded by RUN_TIMEOUT.
    fn run(&self, args: &[&str]) -> Output {
        run_tool(&self.socket, args, self.dir.path())
    }
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run_tool(socket: &Path, args: &[&str], scratch: &Path) -> Output {
    // Output goes to files so a chatty child can never block on a pipe.
    let tag = format!("{:?}", Instant::now()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let out_path = scratch.join(format!("out-{tag}"));
    let err_path = scratch.join(format!("err-{tag}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_blkmesh-io"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn blkmesh-io");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blkmesh-io {args:?} did not finish within {RUN_TIMEOUT:?}");
        }
        sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(err_path).unwrap_or_default(),
    }
}

/// `-c CMD` for each command.
fn commands<'a>(cmds: &[&'a str]) -> Vec<&'a str> {
    cmds.iter().flat_map(|c| ["-c", *c]).collect()
}

#[test]
fn commands_round_trip_through_qsd() {
    let Some(qsd) = Qsd::start("commands_round_trip_through_qsd") else {
        return;
    };
    let mut args = vec!["--queues", "2"];
    let cmds = commands(&[
        "info",
        // Plain write, read back plain and scattered.
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "readv -P 0xab 0 4k 512 3584 56k",
        // Scattered write, read back plain and scattered differently.
        "writev -P 0x5c 1M 512 7680 8k",
        "read -P 0x5c 1M 16k",
        "readv -P 0x5c 1M 12k 4k",
        // The second queue sees the first queue's data.
        "read -q 1 -P 0xab 0 64k",
        "write -q 1 -P 0x77 2M 128k",
        "flush -q 1",
        "read -P 0x77 2M 128k",
        "flush",
        // Discard and both write-zeroes flavours read back as zeroes.
        "write -P 0x11 4M 1M",
        "discard 4M 1M",
        "read -P 0 4M 1M",
        "write -P 0x22 6M 256k",
        "write_zeroes 6M 256k",
        "read -P 0 6M 256k",
        "write -P 0x33 7M 256k",
        "write_zeroes -u -q 1 7M 256k",
        "readv -P 0 7M 128k 64k 64k",
        // Default write pattern is 0xcd; a big request.
        "write 8M 8M",
        "read -P 0xcd 8M 8M",
    ]);
    args.extend(cmds);
    let out = qsd.run(&args);
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        &format!(
            "capacity: {IMAGE_SIZE} bytes ({} sectors)",
            IMAGE_SIZE / 512
        ),
        "request-alignment: 512",
        "num-queues: 2",
        "wrote 65536/65536 bytes at offset 0",
        "read 65536/65536 bytes at offset 0",
        "wrote 16384/16384 bytes at offset 1048576",
        "read 16384/16384 bytes at offset 1048576",
        "flush done",
        "discard 1048576/1048576 bytes at offset 4194304",
        "wrote 262144/262144 bytes at offset 6291456",
        "read 8388608/8388608 bytes at offset 8388608",
    ] {
        assert!(out.stdout.contains(line), "missing '{line}' in {out:?}");
    }
    assert!(!out.stdout.contains("failed"), "{out:?}");
}

#[test]
fn pattern_mismatch_fails_and_stops() {
    let Some(qsd) = Qsd::start("pattern_mismatch_fails_and_stops") else {
        return;
    };
    let out = qsd.run(&commands(&[
        "write -P 0xab 0 8k",
        "write -P 0xac 4608 512",
        "readv -P 0xab 0 4k 4k",
        "write -P 0xee 0 8k",
    ]));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains(
            "Pattern verification failed at offset 4608: expected 0xab, got 0xac (8192 bytes checked)"
        ),
        "{out:?}"
    );
    // Stopped at the failure: the last write never ran.
    assert_eq!(out.stdout.matches("wrote").count(), 2, "{out:?}");
    let after = qsd.run(&commands(&["read -P 0xab 0 4k"]));
    assert_eq!(after.code, 0, "{after:?}");
}

#[test]
fn bad_commands_exit_2_before_any_io() {
    let Some(qsd) = Qsd::start("bad_commands_exit_2_before_any_io") else {
        return;
    };
    for (cmd, msg) in [
        ("frobnicate 0 4k", "unknown command 'frobnicate'"),
        ("read 0 4q", "invalid length '4q'"),
        ("write -P 0x100 0 4k", "is not a byte"),
        ("read 0", "missing argument LEN"),
        ("readv -P 1", "missing argument OFF"),
        ("discard -u 0 4k", "unknown option '-u'"),
        ("read -q 2 0 4k", "queue 2 does not exist"),
    ] {
        // A valid write first: it must not run either.
        let out = qsd.run(&commands(&["write -P 0x99 0 4k", cmd]));
        assert_eq!(out.code, 2, "{cmd}: {out:?}");
        assert!(out.stderr.contains(msg), "{cmd}: want '{msg}' in {out:?}");
        assert!(out.stdout.is_empty(), "{cmd}: {out:?}");
    }
    let out = qsd.run(&commands(&["read -P 0 0 4k"]));
    assert_eq!(out.code, 0, "earlier write ran: {out:?}");
    // No commands at all, or a bad bench argument: usage errors too.
    assert_eq!(qsd.run(&[]).code, 2);
    assert_eq!(qsd.run(&["bench", "--rw", "read", "--bs", "4z"]).code, 2);
}

#[test]
fn io_errors_exit_1() {
    let Some(qsd) = Qsd::start("io_errors_exit_1") else {
        return;
    };
    let out = qsd.run(&commands(&["read 64M 4k", "write 0 4k"]));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.starts_with("read failed: "), "{out:?}");
    assert!(!out.stdout.contains("wrote"), "{out:?}");
    let out = qsd.run(&commands(&["read 1 4k"]));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("read failed: EINVAL"), "{out:?}");

    let missing = run_tool(
        &qsd.dir.path().join("no-such.sock"),
        &commands(&["info"]),
        qsd.dir.path(),
    );
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("cannot connect"), "{missing:?}");
}

#[test]
fn verify_passes_on_two_queues() {
    let Some(qsd) = Qsd::start("verify_passes_on_two_queues") else {
        return;
    };
    let out = qsd.run(&[
        "--queues",
        "2",
        "verify",
        "--size",
        "16M",
        "--seconds",
        "1",
        "--bs-max",
        "256k",
        "--seed",
        "7",
    ]);
    assert_eq!(out.code, 0, "{out:?}\n{}", qsd.diagnostics());
    assert!(out.stdout.contains("verify: queue 0:"), "{out:?}");
    assert!(out.stdout.contains("verify: queue 1:"), "{out:?}");
    assert!(out.stdout.contains(" 0 errors, 0 mismatches"), "{out:?}");
}

#[test]
fn bench_reports_json() {
    let Some(qsd) = Qsd::start("bench_reports_json") else {
        return;
    };
    for rw in ["randread", "randrw", "write"] {
        let out = qsd.run(&[
            "--queues",
            "2",
            "bench",
            "--rw",
            rw,
            "--qd",
            "4",
            "--seconds",
            "0.3",
            "--warmup",
            "0.1",
            "--json",
        ]);
        assert_eq!(out.code, 0, "{out:?}\n{}", qsd.diagnostics());
        let v: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).expect("one JSON object");
        assert_eq!(v["rw"], rw);
        assert_eq!(v["queues"], 2);
        assert_eq!(v["errors"], 0);
        assert!(v["iops"].as_f64().unwrap() > 0.0, "{out:?}");
        let p50 = v["lat_p50_us"].as_f64().unwrap();
        let p99 = v["lat_p99_us"].as_f64().unwrap();
        assert!(p50 > 0.0 && p99 >= p50, "{out:?}");
    }
}

#[test]
fn json_command_output() {
    let Some(qsd) = Qsd::start("json_command_output") else {
        return;
    };
    let out = qsd.run(&[
        "--json",
        "-c",
        "write -P 1 0 4k",
        "-c",
        "info",
        "-c",
        "read -P 2 0 4k",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[1]["properties"]["capacity"], IMAGE_SIZE);
    assert_eq!(lines[2]["ok"], false);
    assert_eq!(lines[2]["mismatch"]["offset"], 0);
    assert_eq!(lines[2]["mismatch"]["actual"], 1);
}

/// Drops qemu-io style rate lines (timings) and JSON timings.
fn comparable(s: &str) -> String {
    s.lines()
        .filter(|l| !(l.contains(" ops; ") && l.contains("/sec")))
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.remove("elapsed_us");
                }
                format!("{v}\n")
            }
            Err(_) => format!("{l}\n"),
        })
        .collect()
}

#[test]
fn native_driver_prints_what_libblkio_prints() {
    let Some(qsd) = Qsd::start("native_driver_prints_what_libblkio_prints") else {
        return;
    };
    let scripts: [&[&str]; 3] = [
        &["info"],
        &[
            "write -P 0xab 0 64k",
            "readv -P 0xab 0 4k 512 3584 56k",
            "writev -q 1 -P 0x5c 1M 512 7680 8k",
            "read -P 0x5c 1M 16k",
            "flush",
            "discard 0 64k",
            "read -P 0 0 64k",
            "write_zeroes -u 1M 8k",
            "read -P 0 1M 8k",
        ],
        &[
            "read 64M 4k",
            "read 100 512",
            "write_zeroes 1 512",
            "read -P 0x12 2M 4k",
            "read 0 4k",
        ],
    ];
    for cmds in scripts {
        for json in [false, true] {
            let mut outs = Vec::new();
            for driver in ["blkio", "native"] {
                let mut args = vec!["--queues", "2", "--keep-going", "--driver", driver];
                if json {
                    args.push("--json");
                }
                args.extend(commands(cmds));
                let out = qsd.run(&args);
                outs.push(format!(
                    "exit {}\n{}{}",
                    out.code,
                    comparable(&out.stdout),
                    out.stderr
                ));
            }
            assert_eq!(
                outs[0], outs[1],
                "{cmds:?} (json {json}): libblkio's output, then the native driver's"
            );
        }
    }
    // qsd's export is not zoned: zone requests are refused.
    let out = qsd.run(&commands(&["zone_report"]));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("zone_report failed: EOPNOTSUPP"),
        "{out:?}"
    );
}

#[test]
fn driver_choice_is_checked() {
    let Some(qsd) = Qsd::start("driver_choice_is_checked") else {
        return;
    };
    for args in [
        &["--driver", "blkio", "-c", "zone_report"][..],
        &["--driver", "native", "--poll", "-c", "info"],
        &["--driver", "native", "verify", "--seconds", "0.1"],
    ] {
        let out = qsd.run(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
}
