//! The multi-process fault-isolation suite: two exports, A and B, served
//! by different workers under verified mixed read/write load. A's worker is
//! killed at random moments, then hung; the manager is killed; A's disk
//! fails (injected EIO, then ENOSPC from a full filesystem). Throughout, B
//! sees no error and no stall beyond a bound, A sees no error but the
//! injected ones, and the final read-back of every sector finds no lost
//! write. Recovery times are printed (`--no-capture`) and recorded in
//! docs/RELIABILITY.md. Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{fault_rule, FaultInjectionOptions, FaultRule, IoOp, NodeSpec};
use blkmesh_testkit::{run_tool, Cluster, ClusterOptions, ExportOpts};

const MIB: u64 = 1 << 20;
/// B's slowest request may not exceed this while A fails (a generous bound
/// for a shared, noisy 2-core machine; B's worker is never touched).
const B_LATENCY_BOUND_US: u64 = 2_000_000;

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn verify(socket: &Path, seconds: u64, seed: u64) -> Output {
    run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--queues",
            "2",
            "--timeout",
            "60",
            "verify",
            "--size",
            "16M",
            "--seconds",
            &seconds.to_string(),
            "--bs-max",
            "64k",
            "--seed",
            &seed.to_string(),
        ],
    )
}

fn io(socket: &Path, cmds: &[&str]) -> Output {
    let mut args = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--timeout".into(),
        "30".into(),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    run_tool("blkmesh-io", args)
}

/// Asserts a clean verify run and returns its max latency in µs.
fn clean(what: &str, out: &Output) -> u64 {
    assert!(out.status.success(), "{what}: {}", text(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(", 0 errors, 0 mismatches") && stdout.contains("final read-back"),
        "{what}: {}",
        text(out)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("verify: max latency "))
        .and_then(|l| l.trim_end_matches(" us").parse().ok())
        .unwrap_or(0)
}

/// A small deterministic generator for "random moments" (the seed is
/// printed so a failure can be replayed).
struct Moments(u64);

impl Moments {
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo))
    }
}

fn workers_of(cluster: &Cluster, export: &str) -> Vec<String> {
    let exports = cluster.list_exports().unwrap();
    let e = exports
        .iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == export))
        .unwrap();
    e.queues.iter().map(|a| a.worker.clone()).collect()
}

fn faults(rules: Vec<FaultRule>) -> NodeSpec {
    NodeSpec {
        name: "a".into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: "a-file".into(),
            rules,
            ..Default::default()
        })),
    }
}

/// A small tmpfs for the ENOSPC phase, if this process may mount one.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "blkmesh-test"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn recovery_times(cluster: &Cluster) -> Vec<u64> {
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("queue recovered"))
        .filter_map(|l| {
            let at = l.find("recovery_ms=")? + "recovery_ms=".len();
            l[at..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn one_failing_export_never_disturbs_the_other() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("fault isolation: seed {seed}");
    let mut moments = Moments(seed);
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .workers(2)
            .env("BLKMESH_WORKER_TIMEOUT_MS", "1500"),
    );
    // A's image lives on a small filesystem when we can mount one, so that
    // it can be filled up later.
    let small = SmallFs::mount(&cluster.dir().join("small"), "48M");
    let a_image = match &small {
        Some(fs) => {
            let p = fs.0.join("a.img");
            std::fs::File::create(&p)
                .unwrap()
                .set_len(64 * MIB)
                .unwrap();
            p
        }
        None => cluster.sparse_image("a.img", 64 * MIB),
    };
    let b_image = cluster.sparse_image("b.img", 64 * MIB);
    cluster
        .add_io_uring("a-file", &a_image, false, false)
        .unwrap();
    cluster.client().add_node(faults(vec![])).unwrap();
    cluster.add_io_uring("b", &b_image, false, false).unwrap();
    let a = cluster
        .add_export(ExportOpts::new("A", "a").writable().queues(2))
        .unwrap();
    let b = cluster
        .add_export(ExportOpts::new("B", "b").writable().queues(2))
        .unwrap();
    let wa = workers_of(&cluster, "A");
    let wb = workers_of(&cluster, "B");
    assert!(
        wa.iter().all(|w| !wb.contains(w)),
        "A {wa:?} and B {wb:?} should be on different workers"
    );
    let a_worker: usize = wa[0].trim_start_matches("worker").parse().unwrap();

    let total = Instant::now();
    let (b_out, a_latencies) = std::thread::scope(|s| {
        let b_load = s.spawn(|| verify(&b, 34, 7));
        let mut lat = Vec::new();

        // 1. kill -9 A's worker at random moments, three times; its
        // supervisor (here: the test) starts it again.
        let phase = Instant::now();
        let out = std::thread::scope(|s2| {
            let load = s2.spawn(|| verify(&a, 9, 1));
            for _ in 0..3 {
                std::thread::sleep(moments.ms(800, 2200));
                cluster.kill_worker(a_worker);
                std::thread::sleep(moments.ms(50, 400));
                cluster.start_worker(a_worker);
            }
            load.join().unwrap()
        });
        lat.push(("kill -9 worker x3", clean("A, worker kills", &out)));
        println!("phase 1 (worker kills) took {:?}", phase.elapsed());

        // 2. SIGSTOP A's worker: detected by the timeout, fenced, replaced.
        let out = std::thread::scope(|s2| {
            let load = s2.spawn(|| verify(&a, 6, 2));
            std::thread::sleep(moments.ms(500, 1500));
            let pid = cluster.worker_pid(a_worker).expect("A's worker runs");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            while cluster.worker_pid(a_worker).is_some() {
                assert!(Instant::now() < deadline, "hung worker not fenced");
                std::thread::sleep(Duration::from_millis(50));
            }
            cluster.start_worker(a_worker);
            load.join().unwrap()
        });
        lat.push(("SIGSTOP worker", clean("A, hung worker", &out)));

        // 3. kill -9 the manager; I/O goes on; it comes back with its state.
        let out = std::thread::scope(|s2| {
            let load = s2.spawn(|| verify(&a, 5, 3));
            std::thread::sleep(moments.ms(500, 1500));
            cluster.kill_manager();
            std::thread::sleep(Duration::from_millis(1000));
            cluster.start_manager();
            load.join().unwrap()
        });
        lat.push(("kill -9 manager", clean("A, manager restart", &out)));
        let exports = cluster.list_exports().unwrap();
        assert_eq!(exports.len(), 2, "state after the manager restart");

        // 4. A's disk fails: injected EIO on writes to its second MiB.
        let eio = FaultRule {
            ops: vec![IoOp::Write as i32],
            offset_start: MIB,
            offset_end: 2 * MIB,
            action: Some(fault_rule::Action::Errno(libc::EIO)),
            ..Default::default()
        };
        cluster.client().update_node(faults(vec![eio])).unwrap();
        let out = io(&a, &["write -P 1 1M 4k"]);
        assert!(!out.status.success(), "injected EIO: {}", text(&out));
        let out = io(&a, &["write -P 2 4M 4k", "read -P 2 4M 4k"]);
        assert!(out.status.success(), "A outside the rule: {}", text(&out));
        cluster.client().update_node(faults(vec![])).unwrap();
        let out = io(&a, &["write -P 3 1M 4k", "read -P 3 1M 4k"]);
        assert!(out.status.success(), "A after the rule: {}", text(&out));

        // 5. A's filesystem fills up: ENOSPC for writes into holes.
        match &small {
            Some(fs) => {
                let filler = fs.0.join("filler");
                let _ = Command::new("dd")
                    .args(["if=/dev/zero", "bs=1M", "count=64"])
                    .arg(format!("of={}", filler.display()))
                    .output();
                let out = io(&a, &["write -P 4 40M 1M"]);
                assert!(!out.status.success(), "ENOSPC expected: {}", text(&out));
                std::fs::remove_file(&filler).unwrap();
                let out = io(&a, &["write -P 5 40M 1M", "read -P 5 40M 1M"]);
                assert!(out.status.success(), "A after ENOSPC: {}", text(&out));
            }
            None => panic!(
                "phase 5 (ENOSPC) cannot run: mounting a tmpfs failed (the CI runs as \
                 root and can mount one); not skipping"
            ),
        }
        (b_load.join().unwrap(), lat)
    });
    let b_latency = clean("B", &b_out);
    println!("fault isolation: all phases in {:?}", total.elapsed());
    for (what, us) in &a_latencies {
        println!("  A, {what}: slowest request {} ms", us / 1000);
    }
    println!("  B throughout: slowest request {} ms", b_latency / 1000);
    let rec = recovery_times(&cluster);
    println!("  queue recovery times (ms): {rec:?}");
    assert!(
        b_latency < B_LATENCY_BOUND_US,
        "B stalled {b_latency} us while A failed"
    );
    assert!(!rec.is_empty(), "no queue recovery logged");
}
