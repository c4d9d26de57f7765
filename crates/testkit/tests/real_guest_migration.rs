//! Live migration of a real Linux guest (QEMU, TCG) whose disk blkmesh
//! serves: QEMUs on this machine with memfd guest RAM, each destination
//! started with `-incoming`, the source told to `migrate` over QMP while
//! the guest's write-and-verify loop runs on both queues. A destination's
//! vhost-user connection is served while the source's rings still run;
//! the source's rings drain when it stops them; the guest goes on at the
//! destination and its checks pass; the image holds exactly what it
//! wrote. Needs what `real_guest.rs` needs; build the binaries first:
//! `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkmesh_guest_check::plan::Plan;
use blkmesh_guest_check::report::{Report, Verdict, VERDICT as VERDICT_LINE};
use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts, GuestImage, GuestOptions, GuestVm};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const SEED: u64 = 77;
const TIMEOUT: Duration = Duration::from_secs(150);

fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `"key": value` of a QMP reply, as text.
fn field<'a>(reply: &'a str, key: &str) -> Option<&'a str> {
    let at = reply.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = reply[at..].trim_start_matches([':', ' ']);
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// What serves the guest's disk.
enum Server {
    Blkmesh(Box<Cluster>),
    /// qemu-storage-daemon's vhost-user-blk export of the same kind of
    /// image, for the downtime comparison.
    Qsd(std::process::Child, tempfile::TempDir),
}

impl Server {
    fn blkmesh() -> (Server, PathBuf, Vec<PathBuf>) {
        let cluster = Cluster::start(ClusterOptions::default().workers(1));
        let disk = cluster.sparse_image("guest.img", DISK);
        cluster.add_io_uring("disk", &disk, false, false).unwrap();
        let socket = cluster
            .add_export(ExportOpts::new("guest", "disk").writable().queues(2))
            .unwrap();
        // Every QEMU connects to the one socket: a destination's
        // connection is served beside the source's.
        (Server::Blkmesh(Box::new(cluster)), disk, vec![socket])
    }

    /// qemu-storage-daemon serves one connection per export at a time: a
    /// second export of the node, on its own socket, takes the
    /// destinations in turn.
    fn qsd() -> (Server, PathBuf, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("guest.img");
        File::create(&disk).unwrap().set_len(DISK).unwrap();
        let sockets: Vec<PathBuf> = (0..2)
            .map(|i| dir.path().join(format!("qsd{i}.sock")))
            .collect();
        let mut cmd = std::process::Command::new("qemu-storage-daemon");
        cmd.args([
            "--blockdev",
            &format!(
                "driver=file,node-name=file,filename={},aio=io_uring,discard=unmap",
                disk.display()
            ),
            "--blockdev",
            "driver=raw,node-name=disk,file=file,discard=unmap",
        ]);
        for (i, socket) in sockets.iter().enumerate() {
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=exp{i},node-name=disk,writable=on,num-queues=2,\
                 addr.type=unix,addr.path={}",
                socket.display()
            ));
        }
        let child = cmd.spawn().unwrap();
        wait("qemu-storage-daemon to listen", TIMEOUT, || {
            sockets.iter().all(|s| s.exists())
        });
        (Server::Qsd(child, dir), disk, sockets)
    }

    fn dir(&self) -> &Path {
        match self {
            Server::Blkmesh(c) => c.dir(),
            Server::Qsd(_, d) => d.path(),
        }
    }

    fn cluster(&mut self) -> &mut Cluster {
        match self {
            Server::Blkmesh(c) => c,
            Server::Qsd(..) => panic!("not blkmesh"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Qsd(child, _) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A guest on a 64 MiB image, and the QEMU it runs in now.
struct Guest {
    server: Server,
    image: GuestImage,
    disk: PathBuf,
    opts: GuestOptions,
    /// The sockets QEMUs connect to, in turn (one per hop).
    sockets: Vec<PathBuf>,
    vm: GuestVm,
    /// What the QEMUs it left printed of its console.
    console: String,
    hops: u32,
}

impl Guest {
    /// Boots the guest with its loop running for `loop_secs`, and waits
    /// until the loop runs.
    fn start(loop_secs: u64) -> Guest {
        Guest::start_on(Server::blkmesh(), loop_secs)
    }

    fn start_on((server, disk, sockets): (Server, PathBuf, Vec<PathBuf>), loop_secs: u64) -> Guest {
        let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
        let mut opts = GuestOptions::new(&sockets[0])
            .queues(2)
            .param("seed", SEED)
            .param("size", DISK)
            .param("logical_block_size", 512)
            .param("hw_queues", 2)
            .param("loop", loop_secs);
        opts.memory_mib = 256;
        let mut vm = GuestVm::start(&image, opts.clone().dir(&server.dir().join("vm0")))
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("qemu: {}", vm.command_line().join(" "));
        wait("the guest's loop", TIMEOUT, || {
            assert!(vm.pid().is_some(), "QEMU exited:\n{}", vm.console());
            vm.console().contains("CHECK geometry")
        });
        Guest {
            server,
            image,
            disk,
            opts,
            sockets,
            vm,
            console: String::new(),
            hops: 0,
        }
    }

    /// A destination QEMU, listening on its own socket.
    fn destination(&self) -> (GuestVm, PathBuf) {
        let n = self.hops + 1;
        let incoming = self.server.dir().join(format!("migrate{n}.sock"));
        let mut opts = self
            .opts
            .clone()
            .dir(&self.server.dir().join(format!("vm{n}")))
            .incoming(&incoming);
        opts.socket = self.sockets[n as usize % self.sockets.len()].clone();
        let vm = GuestVm::start(&self.image, opts).unwrap_or_else(|e| panic!("{e}"));
        wait("the destination to listen", TIMEOUT, || incoming.exists());
        (vm, incoming)
    }

    /// Starts migrating to `socket` at `bandwidth` bytes/s.
    fn start_migration(&self, socket: &Path, bandwidth: u64) {
        let params = format!(r#"{{"max-bandwidth": {bandwidth}, "downtime-limit": 300}}"#);
        self.vm.qmp("migrate-set-parameters", &params).unwrap();
        let uri = format!(r#"{{"uri": "unix:{}"}}"#, socket.display());
        self.vm.qmp("migrate", &uri).unwrap();
    }

    /// Waits until the migration is `status` (failing on another end);
    /// the last `query-migrate` reply.
    fn migration_ends(&self, status: &str) -> String {
        let mut last = String::new();
        wait(&format!("the migration to be {status}"), TIMEOUT, || {
            last = self.vm.qmp("query-migrate", "").unwrap();
            let now = field(&last, "status").unwrap_or("").to_string();
            let ended = ["completed", "failed", "cancelled"].contains(&now.as_str());
            assert!(
                !ended || now == status,
                "migration {now}, not {status}: {last}"
            );
            now == status
        });
        last
    }

    /// The guest moves to `dst`; the source QEMU goes. Its downtime (ms).
    fn switch_to(&mut self, dst: GuestVm) -> u64 {
        let done = self.migration_ends("completed");
        let downtime = field(&done, "downtime").unwrap().parse().unwrap();
        eprintln!("hop {}: {done}", self.hops + 1);
        let _ = self.vm.qmp("quit", "");
        self.console.push_str(&self.vm.console());
        self.vm = dst;
        self.hops += 1;
        downtime
    }

    /// The guest's verdict, wherever it ended, checked; the image
    /// checked against what it wrote.
    fn finish(self) -> Report {
        self.finish_checked(true)
    }

    /// [`Guest::finish`], the guest's checks required to pass or not
    /// (qemu-storage-daemon's geometry differs from what they expect).
    fn finish_checked(mut self, must_pass: bool) -> Report {
        let mut console = String::new();
        wait("the guest's verdict", TIMEOUT, || {
            // The console first: a guest that passed powers off at once.
            let exited = self.vm.pid().is_none();
            console = format!("{}{}", self.console, self.vm.console());
            let done = console.contains(VERDICT_LINE);
            assert!(done || !exited, "QEMU exited:\n{}", self.vm.console());
            done
        });
        let report = Report::parse(&console);
        if let (Some(Verdict::Fail(_)), Server::Blkmesh(c)) = (&report.verdict, &self.server) {
            c.dump_logs();
        }
        if must_pass {
            assert_eq!(
                report.verdict,
                Some(Verdict::Pass),
                "failed checks: {:?}\n{console}",
                report.failures().collect::<Vec<_>>()
            );
        } else {
            let failed: Vec<_> = report.failures().collect();
            eprintln!("failed checks (not required here): {failed:?}");
            assert!(
                failed.iter().all(|c| c.name != "loop"),
                "the loop failed: {failed:?}"
            );
        }
        assert!(
            report.loop_rounds.iter().all(|&r| r > 0),
            "{:?}",
            report.loop_rounds
        );
        for t in 0..2 {
            eprintln!(
                "loop thread {t}: {:?}, stalls (ms) {:?}",
                report.loop_latency[t], report.loop_stalls_ms[t]
            );
        }
        let _ = self.vm.qmp("quit", "");
        drop(self.vm);
        if must_pass {
            let plan = Plan::new(SEED, DISK).unwrap();
            let file = File::open(&self.disk).unwrap();
            let problems = plan.verify_image(&file, report.loop_rounds);
            assert!(
                problems.is_empty(),
                "image differs from the plan: {problems:#?}"
            );
        }
        report
    }
}

#[test]
fn a_guest_migrates_there_and_back_under_load_through_worker_kills() {
    let mut g = Guest::start(50);
    std::thread::sleep(Duration::from_secs(2));
    let mut downtimes = Vec::new();
    for hop in 0..4 {
        let (dst, socket) = g.destination();
        match hop {
            1 => {
                // The worker dies during the pre-copy (slowed to about
                // 4 s): the source's queues fail over to its replacement,
                // and the switch-over drains them there.
                g.start_migration(&socket, 64 << 20);
                std::thread::sleep(Duration::from_millis(500));
                g.server.cluster().kill_worker(0);
                std::thread::sleep(Duration::from_millis(200));
                g.server.cluster().start_worker(0);
            }
            3 => {
                // The worker dies with the guest's requests in flight and
                // stays gone through a fast pre-copy: the source stops its
                // rings while the worker is lost. The stop must finish
                // those requests on the replacement before it answers; the
                // destination (QEMU 10) never sees them otherwise.
                g.server.cluster().kill_worker(0);
                g.start_migration(&socket, 4 << 30);
                std::thread::sleep(Duration::from_millis(1500));
                g.server.cluster().start_worker(0);
            }
            _ => g.start_migration(&socket, 4 << 30),
        }
        downtimes.push(g.switch_to(dst));
    }
    let log = std::fs::read_to_string(g.server.cluster().log_path("frontend")).unwrap();
    assert!(log.contains("dirty log mapped"), "no source shared its log");
    eprintln!("downtimes (ms): {downtimes:?}");
    g.finish();
}

#[test]
fn a_cancelled_migration_leaves_the_source_running_on_its_disk() {
    let g = Guest::start(12);
    let (mut dst, socket) = g.destination();
    // Slow: 256 MiB at 16 MiB/s, cancelled a second in.
    g.start_migration(&socket, 16 << 20);
    std::thread::sleep(Duration::from_secs(1));
    g.vm.qmp("migrate_cancel", "").unwrap();
    g.migration_ends("cancelled");
    // The destination gave up (or is told to); the guest never left.
    dst.kill();
    drop(dst);
    g.finish();
}

/// One server's leg of [`downtime_against_qemu_storage_daemon`]: a guest
/// migrated `migrations` times.
#[derive(Default)]
struct Leg {
    downtimes: Vec<u64>,
    /// The guest loop's longest request (µs) and its requests ≥ 50 ms.
    longest_us: u64,
    stalls_ms: Vec<u64>,
    /// blkmesh only: each queue stop (µs), and each dirty log's tally.
    stops_us: Vec<u64>,
    tallies: Vec<String>,
}

impl Leg {
    fn run(name: &str, migrations: usize) -> Leg {
        let server = match name {
            "qsd" => Server::qsd(),
            _ => Server::blkmesh(),
        };
        let mut g = Guest::start_on(server, 20 + 6 * migrations as u64);
        std::thread::sleep(Duration::from_secs(2));
        let mut leg = Leg::default();
        for _ in 0..migrations {
            let (dst, socket) = g.destination();
            g.start_migration(&socket, 4 << 30);
            leg.downtimes.push(g.switch_to(dst));
        }
        if let Server::Blkmesh(c) = &g.server {
            let log = std::fs::read_to_string(c.log_path("frontend")).unwrap();
            // What each source's dirty log marked, as its frontend recorded
            // when the log went (frontend-virtio/src/dirty_log.rs).
            leg.tallies = log
                .lines()
                .filter_map(|l| Some(l.split("dirty log released").nth(1)?.trim().to_string()))
                .collect();
            // blkmesh's own share of each downtime: how long each queue
            // took to drain and stop (QEMU stops them with SET_VRING_ENABLE
            // or GET_VRING_BASE).
            leg.stops_us = log
                .lines()
                .filter(|l| l.contains("queue stopped"))
                .filter_map(|l| l.split("stop_us=").nth(1)?.split(' ').next()?.parse().ok())
                .collect();
        }
        let report = g.finish_checked(name == "blkmesh");
        leg.stalls_ms = report.loop_stalls_ms.iter().flatten().copied().collect();
        leg.longest_us = report
            .loop_latency
            .iter()
            .filter_map(|l| l.get("max_us"))
            .max()
            .copied()
            .unwrap_or(0);
        leg
    }
}

/// The switch-over's cost against qemu-storage-daemon, for
/// docs/RELIABILITY.md (a benchmark, not a check: `bench/migration.sh`
/// runs it): the same guest, the same migrations (`$MIGRATIONS` per leg,
/// five by default), on each server, in `$ROUNDS` alternating legs (one
/// by default: the machine drifts, and alternating spreads that over
/// both); QEMU's downtime per migration and the guest loop's stalls.
#[test]
#[ignore = "a benchmark: bench/migration.sh"]
fn downtime_against_qemu_storage_daemon() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(default)
    };
    let (migrations, rounds) = (env("MIGRATIONS", 5), env("ROUNDS", 1));
    let servers = ["qsd", "blkmesh"];
    let mut legs: Vec<Vec<Leg>> = servers.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, name) in servers.iter().enumerate() {
            let leg = Leg::run(name, migrations);
            println!("round {round} {name}: downtimes (ms) {:?}", leg.downtimes);
            legs[i].push(leg);
        }
    }
    println!("| server | migrations | downtime p50 (ms) | p90 | max | per-leg p50 | guest's longest request (ms) | guest's requests ≥ 50 ms (ms) |");
    println!("|---|---:|---:|---:|---:|---|---:|---|");
    for (name, legs) in servers.iter().zip(&legs) {
        let mut all: Vec<u64> = legs.iter().flat_map(|l| l.downtimes.clone()).collect();
        all.sort_unstable();
        // Nearest rank.
        let rank = |v: &[u64], q: usize| v[(v.len() * q).div_ceil(100).max(1) - 1];
        let per_leg: Vec<u64> = legs
            .iter()
            .map(|l| {
                let mut d = l.downtimes.clone();
                d.sort_unstable();
                rank(&d, 50)
            })
            .collect();
        let longest = legs.iter().map(|l| l.longest_us).max().unwrap_or(0) / 1000;
        let stalls: Vec<u64> = legs.iter().flat_map(|l| l.stalls_ms.clone()).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {per_leg:?} | {longest} | {stalls:?} |",
            all.len(),
            rank(&all, 50),
            rank(&all, 90),
            all[all.len() - 1],
        );
    }
    let blkmesh = &legs[1];
    let mut stops: Vec<u64> = blkmesh.iter().flat_map(|l| l.stops_us.clone()).collect();
    stops.sort_unstable();
    if let (Some(min), Some(max)) = (stops.first(), stops.last()) {
        println!(
            "blkmesh queue stops: {} stops, {min}..{max} µs, median {} µs",
            stops.len(),
            stops[stops.len() / 2]
        );
    }
    for t in blkmesh.iter().flat_map(|l| &l.tallies) {
        println!("blkmesh dirty log: {t}");
    }
}
