//! Limits end to end: a fault-injection node's blkdebug-style knobs
//! (`max_transfer`, `max_segments`, `buf_alignment`) make the graph's limits
//! stricter; requests that break them are split or bounced by the worker, never
//! failed. Driven through the real processes by `blkmesh-io` (libblkio's
//! virtio-blk-vhost-user driver, i.e. a guest's view). Build the binaries
//! first: `cargo build --bins`.
//!
//! What a client can send: the frontend advertises `seg_max` = 2 and
//! `size_max` = 8 KiB, but both are advice to the driver. libblkio's
//! virtio-blk driver (0.5) enforces neither: it puts one descriptor per iovec
//! (up to the virtqueue's free descriptors) and reports `max-transfer` as
//! `seg_max * size_max` without checking it. The frontend accepts up to 128
//! ring segments per request. So `readv`/`writev` with many iovecs and 1 MiB
//! single-buffer requests do reach the worker beyond its limits, which is what
//! these tests rely on (the worker's own unit tests cover the same paths with
//! hand-made ring entries).

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use blkmesh_proto::v1::{node_spec::Driver, FaultInjectionOptions, NodeSpec};
use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn io(cluster: &Cluster, socket: &Path, cmds: &[String]) -> Output {
    let mut args: Vec<String> = vec![
        "--socket".into(),
        socket.display().to_string(),
        "--timeout".into(),
        "20".into(),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    cluster.run_tool("blkmesh-io", args)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!stdout.contains("failed"), "{stdout}");
    stdout
}

/// A cluster with one worker and a writable export of
/// fault-injection("limited", knobs, no rules) over an io_uring image.
fn limited_export(
    max_transfer: u64,
    max_segments: u32,
    buf_alignment: u32,
) -> (Cluster, std::path::PathBuf, std::path::PathBuf) {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let image = cluster.sparse_image("limits.img", 16 * MIB as u64);
    cluster.add_io_uring("base", &image, false, false).unwrap();
    let added = cluster.client().add_node(NodeSpec {
        name: "limited".into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: "base".into(),
            rules: vec![],
            max_transfer,
            max_segments,
            buf_alignment,
        })),
    });
    if let Err(e) = added {
        cluster.dump_logs();
        panic!("the manager refused the fault-injection limit knobs: {e}");
    }
    let socket = cluster
        .add_export(ExportOpts::new("limited", "limited").writable())
        .unwrap();
    (cluster, socket, image)
}

/// `n` pieces of `len` bytes, as readv/writev length arguments.
fn pieces(n: usize, len: usize) -> String {
    vec![len.to_string(); n].join(" ")
}

/// Byte comparison that reports the first difference, not the buffers.
#[track_caller]
fn all(what: &str, data: &[u8], byte: u8) {
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!(
            "{what}: byte {i} is {:#x}, expected {byte:#x} throughout",
            data[i]
        );
    }
}

/// `s` without ANSI escape sequences (the log may be colored).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What the worker logged about splits and bounces: the sums of every
/// queue's summary line (written when a queue stops, i.e. after blkmesh-io
/// has disconnected). Waits for `queues` such lines.
fn worker_summary(cluster: &Cluster, queues: usize) -> (u64, u64, u64) {
    let path = cluster.log_path("worker0");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = plain(&std::fs::read_to_string(&path).unwrap_or_default());
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("requests split or bounced"))
            .collect();
        if lines.len() >= queues {
            let field = |l: &str, name: &str| -> u64 {
                let key = format!("{name}=");
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key.as_str()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in {l:?}"))
            };
            return lines.iter().fold((0, 0, 0), |(s, p, b), l| {
                (
                    s + field(l, "split"),
                    p + field(l, "parts"),
                    b + field(l, "bounced"),
                )
            });
        }
        if Instant::now() > deadline {
            cluster.dump_logs();
            panic!("the worker did not log {queues} split summaries");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn requests_beyond_the_limits_are_split_and_bounced_not_failed() {
    let (cluster, socket, image) = limited_export(8192, 2, 4096);
    let cmds: Vec<String> = vec![
        "info".into(),
        // One 1 MiB buffer, page-aligned: 128 zero-copy parts cut inside
        // the single segment.
        "write -P 0xab 0 1M".into(),
        "read -P 0xab 0 1M".into(),
        // 64 iovecs of 512 bytes at odd 512-byte offsets: more segments than
        // allowed and misaligned for 4096: bounced, then 4 parts of 8 KiB.
        format!("writev -P 0xcd 1M {}", pieces(64, 512)),
        format!("readv -P 0xcd 1M {}", pieces(64, 512)),
        // Mixed sizes, misaligned too: 32 KiB bounced, 4 parts.
        "writev -P 0x5e 2M 4k 8k 512 3584 16k".into(),
        // Read back through one aligned buffer (4 zero-copy parts) and
        // through many small ones (bounced).
        "read -P 0x5e 2M 32k".into(),
        format!("readv -P 0x5e 2M {}", pieces(16, 2048)),
        // Past the end of what was written: zeroes, also split.
        "read -P 0 3M 64k".into(),
        "flush".into(),
    ];
    let out = ok(&io(&cluster, &socket, &cmds));
    // What the guest was told: at most 2 segments (seg_max), and libblkio's
    // max-transfer of seg_max * size_max.
    assert!(out.contains("max-segments: 2"), "{out}");
    assert!(out.contains("max-transfer: 16384"), "{out}");
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    assert!(out.contains("read 1048576/1048576"), "{out}");

    // The bytes are in the image file, where they belong.
    let data = std::fs::read(&image).unwrap();
    all("1 MiB write", &data[..MIB], 0xab);
    all("writev of 64 pieces", &data[MIB..MIB + 32 * KIB], 0xcd);
    all("untouched after it", &data[MIB + 32 * KIB..2 * MIB], 0);
    all("mixed writev", &data[2 * MIB..2 * MIB + 32 * KIB], 0x5e);
    all("untouched tail", &data[2 * MIB + 32 * KIB..], 0);

    // The worker split every request above the limits and bounced the
    // misaligned ones: 128 + 128 (1 MiB write and read), 4 + 4 (64 x 512),
    // 4 (writev 32k), 4 (read 32k), 4 (readv 16 x 2k), 8 (read 64k).
    let (split, parts, bounced) = worker_summary(&cluster, 1);
    assert_eq!(
        (split, parts, bounced),
        (8, 284, 4),
        "split, parts, bounced"
    );
}

#[test]
fn aligned_fragments_are_grouped_by_segments_without_bouncing() {
    // With 512-byte alignment blkmesh-io's iovecs (512-byte multiples at
    // 512-byte skews) are aligned: the worker groups them two by two and
    // keeps them zero-copy.
    let (cluster, socket, image) = limited_export(8192, 2, 512);
    let cmds: Vec<String> = vec![
        format!("writev -P 0x71 0 {}", pieces(32, 512)),
        format!("readv -P 0x71 0 {}", pieces(8, 2048)),
        // A segment longer than max_transfer among short ones: cut inside.
        "writev -P 0x72 64k 512 20k 1536".into(),
        "read -P 0x72 64k 22k".into(),
        // Write-zeroes and discard within their own limits pass whole.
        "write_zeroes 0 4k".into(),
        "read -P 0 0 4k".into(),
        "discard 64k 4k".into(),
        "read -P 0 64k 4k".into(),
    ];
    ok(&io(&cluster, &socket, &cmds));
    let data = std::fs::read(&image).unwrap();
    all("zeroed", &data[..4 * KIB], 0);
    all("grouped writev", &data[4 * KIB..16 * KIB], 0x71);
    all("discarded", &data[64 * KIB..68 * KIB], 0);
    all("cut segment", &data[68 * KIB..86 * KIB], 0x72);
    all("untouched", &data[86 * KIB..], 0);

    // 32 x 512 in pairs: 16 parts; 8 x 2 KiB in pairs: 4 parts;
    // 512 + 20k + 1536 with 8 KiB parts of at most 2 pieces: 3 parts;
    // read 22k: 3 parts. Nothing bounced.
    let (split, parts, bounced) = worker_summary(&cluster, 1);
    assert_eq!((split, parts, bounced), (4, 26, 0), "split, parts, bounced");
}
