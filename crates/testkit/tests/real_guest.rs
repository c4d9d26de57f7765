//! A real Linux guest (QEMU, TCG) on a blkmesh export: the guest kernel's
//! virtio-blk driver writes, flushes, discards and zeroes through blkmesh,
//! reads everything back, and the host then finds the same bytes in the
//! image file. Needs qemu-system-x86_64, busybox-static and the Debian
//! cloud kernel package: `scripts/deps.sh` installs them; without them the
//! test fails and says what is missing. Build the binaries first:
//! `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkmesh_guest_check::plan::Plan;
use blkmesh_guest_check::report::{Verdict, VERDICT as VERDICT_LINE};
use blkmesh_testkit::{
    Cluster, ClusterOptions, ExportOpts, GuestError, GuestImage, GuestOptions, GuestOutcome,
    GuestVm,
};

const MIB: u64 = 1 << 20;
/// Boot is about 5 s and the checks about 10 s under TCG on 2 cores; the
/// rest is headroom for a loaded machine.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(80);
/// The frontend offers two segments less than the ring's 128 (see
/// frontend-virtio's config.rs); the guest must see exactly that.
const MAX_SEGMENTS: u64 = 126;

#[test]
fn a_real_guest_reads_back_what_it_wrote_on_two_queues() {
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let (cluster, disk, socket) = two_queue_export();
    let info = cluster
        .list_exports()
        .unwrap()
        .into_iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == "guest"))
        .expect("export listed");
    let workers: std::collections::BTreeSet<&str> =
        info.queues.iter().map(|q| q.worker.as_str()).collect();
    assert_eq!(workers.len(), 2, "queues not spread: {:?}", info.queues);

    let seed = 42;
    let opts = GuestOptions::new(&socket)
        .dir(cluster.dir())
        .param("seed", seed)
        // The guest checks these itself too.
        .param("size", info.size)
        .param("logical_block_size", 512)
        .param("hw_queues", 2);
    let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("qemu: {}", vm.command_line().join(" "));
    let out = vm
        .wait_verdict(VERDICT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "guest: boot {:?}, verdict after {:?}\n{}",
        out.boot,
        out.elapsed,
        summary(&out)
    );
    assert_eq!(
        out.report.verdict,
        Some(Verdict::Pass),
        "failed checks: {:?}\n{}",
        out.report.failures().collect::<Vec<_>>(),
        out.console
    );

    // The geometry the guest kernel saw is the export's.
    let g = |k: &str| -> u64 {
        out.report
            .geometry
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in GEOMETRY: {:?}", out.report.geometry))
            .parse()
            .unwrap()
    };
    assert_eq!(g("size"), info.size);
    assert_eq!(g("size"), 64 * MIB);
    assert_eq!(g("logical_block_size"), 512);
    assert_eq!(g("hw_queues"), info.queues.len() as u64);
    assert_eq!(g("max_segments"), MAX_SEGMENTS);
    assert!(g("discard_max_bytes") > 0, "{:?}", out.report.geometry);
    assert!(g("write_zeroes_max_bytes") > 0, "{:?}", out.report.geometry);

    // The image holds exactly what the guest wrote, and zeroes elsewhere.
    drop(vm);
    let plan = Plan::new(seed, 64 * MIB).unwrap();
    let problems = plan.verify_image(&File::open(&disk).unwrap(), out.report.loop_rounds);
    assert!(
        problems.is_empty(),
        "image differs from the plan: {problems:#?}"
    );
}

/// A cluster with a 64 MiB image exported on two queues spread over two
/// workers: (cluster, image path, socket).
fn two_queue_export() -> (Cluster, PathBuf, PathBuf) {
    two_queue_export_with(ClusterOptions::default().workers(2))
}

/// [`two_queue_export`] on a cluster started with `opts`.
fn two_queue_export_with(opts: ClusterOptions) -> (Cluster, PathBuf, PathBuf) {
    let cluster = Cluster::start(opts);
    let disk = cluster.sparse_image("guest.img", 64 * MIB);
    cluster.add_io_uring("disk", &disk, false, false).unwrap();
    let socket = cluster
        .add_export(
            ExportOpts::new("guest", "disk")
                .writable()
                .queues(2)
                .spread(),
        )
        .unwrap();
    (cluster, disk, socket)
}

fn summary(out: &GuestOutcome) -> String {
    out.report
        .checks
        .iter()
        .map(|c| {
            format!(
                "  {} {} {}",
                c.name,
                if c.ok { "ok" } else { "FAIL" },
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The harness must report a failing guest as failing: a wrong expected
/// geometry fails the geometry check and the verdict (and nothing else).
#[test]
fn a_wrong_expectation_fails_the_verdict() {
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let (cluster, _disk, socket) = two_queue_export();
    let opts = GuestOptions::new(&socket)
        .dir(cluster.dir())
        .param("size", 32 * MIB);
    let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));
    let out = vm
        .wait_verdict(VERDICT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.report.verdict,
        Some(Verdict::Fail(1)),
        "{}",
        out.console
    );
    let failed: Vec<_> = out.report.failures().collect();
    assert_eq!(failed.len(), 1, "{}", out.console);
    assert_eq!(failed[0].name, "geometry");
    assert!(
        failed[0]
            .detail
            .contains(&format!("size={} (expected {})", 64 * MIB, 32 * MIB)),
        "{:?}",
        failed[0]
    );
}

/// A guest in loop mode on a spread 2-queue export (see
/// [`two_queue_export_with`]) while `faults` runs against the processes.
struct Scenario {
    seed: u64,
    /// Seconds of write-and-verify rounds before the other checks.
    loop_secs: u32,
    cluster: ClusterOptions,
    /// QEMU reconnects this often after losing the socket.
    reconnect_ms: Option<u32>,
}

impl Scenario {
    fn new(seed: u64) -> Scenario {
        Scenario {
            seed,
            loop_secs: 15,
            cluster: ClusterOptions::default().workers(2),
            reconnect_ms: None,
        }
    }

    /// Boots the guest, runs `faults` (from QEMU's start on; it returns
    /// when it is done), then requires what a guest must see whatever the
    /// faults: every check passing (which includes no I/O error in the
    /// guest kernel's log), loop rounds on both queues, and the image
    /// holding exactly what the guest wrote.
    fn run(self, faults: impl FnOnce(&mut Cluster, &mut GuestVm)) -> (Cluster, GuestOutcome) {
        let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
        let (mut cluster, disk, socket) = two_queue_export_with(self.cluster);
        let mut opts = GuestOptions::new(&socket)
            .dir(cluster.dir())
            .param("seed", self.seed)
            .param("loop", self.loop_secs);
        if let Some(ms) = self.reconnect_ms {
            opts = opts.reconnect_ms(ms);
        }
        let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));
        faults(&mut cluster, &mut vm);
        let out = match vm.wait_verdict(VERDICT_TIMEOUT) {
            Ok(out) => out,
            Err(e) => {
                cluster.dump_logs();
                panic!("{e}");
            }
        };
        eprintln!(
            "guest: boot {:?}, verdict after {:?}\n{}",
            out.boot,
            out.elapsed,
            summary(&out)
        );
        if !out.passed() {
            cluster.dump_logs();
            panic!("{}", out.console);
        }
        let [r0, r1] = out.report.loop_rounds;
        assert!(r0 > 0 && r1 > 0, "loop rounds {r0}+{r1}");
        // What the faults cost the guest (docs/RELIABILITY.md).
        for (t, lat) in out.report.loop_latency.iter().enumerate() {
            eprintln!(
                "guest loop thread {t}: rounds {} {lat:?} stalls_ms {:?}",
                out.report.loop_rounds[t], out.report.loop_stalls_ms[t]
            );
        }
        drop(vm);
        let plan = Plan::new(self.seed, 64 * MIB).unwrap();
        let problems = plan.verify_image(&File::open(&disk).unwrap(), out.report.loop_rounds);
        assert!(
            problems.is_empty(),
            "image differs from the plan: {problems:#?}"
        );
        (cluster, out)
    }
}

/// Waits until the guest's checks have started (its disk is up), failing
/// if QEMU exits or nothing starts in time.
fn wait_checks_started(vm: &mut GuestVm) {
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    while !vm.console().contains("CHECK geometry") {
        assert!(
            Instant::now() < deadline,
            "no check started:\n{}",
            vm.console()
        );
        assert!(vm.pid().is_some(), "qemu exited:\n{}", vm.console());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the guest printed its verdict (or QEMU is gone).
fn finished(vm: &mut GuestVm) -> bool {
    vm.pid().is_none() || vm.console().contains(VERDICT_LINE)
}

fn frontend_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.log_path("frontend")).unwrap()
}

/// Loop mode under faults: the guest rewrites and verifies its data on
/// both queues while each worker is SIGKILLed and restarted in turn. The
/// guest kernel must see neither an error nor a wrong byte (the frontend
/// holds the requests and resubmits them), and the image must hold each
/// thread's last round.
#[test]
fn a_real_guest_rides_out_killed_workers() {
    let (cluster, _) = Scenario::new(7).run(|cluster, vm| {
        wait_checks_started(vm);
        let status = vm.qmp("query-status", "").unwrap_or_else(|e| panic!("{e}"));
        assert!(status.contains("running"), "{status}");
        for i in 0..2 {
            std::thread::sleep(Duration::from_secs(4));
            cluster.kill_worker(i);
            // The supervisor's part: start it again on the same socket.
            std::thread::sleep(Duration::from_millis(300));
            cluster.start_worker(i);
        }
    });
    assert!(
        frontend_log(&cluster).contains("queue recovered"),
        "no recovery logged"
    );
}

/// Workers killed over and over from QEMU's start on: while QEMU connects
/// and the guest's driver brings the device up (SET_FEATURES, the memory
/// table, every SET_VRING_*, enable) and all through the guest's I/O. No
/// vhost-user message may fail because a worker is gone: the device comes
/// up, and the guest sees no error.
#[test]
fn a_real_guest_comes_up_and_runs_while_workers_keep_dying() {
    let (cluster, _) = Scenario::new(13).run(|cluster, vm| {
        // Irregular gaps, so kills land on different moments of bring-up.
        let gaps = [250u64, 700, 400, 1100, 300, 900, 550, 1300];
        let mut kills = 0usize;
        while !finished(vm) && kills < 40 {
            let i = kills % 2;
            cluster.kill_worker(i);
            std::thread::sleep(Duration::from_millis(100));
            cluster.start_worker(i);
            std::thread::sleep(Duration::from_millis(gaps[kills % gaps.len()]));
            kills += 1;
        }
        eprintln!("{kills} worker kills");
        assert!(kills >= 10, "the guest finished after {kills} kills");
    });
    let log = frontend_log(&cluster);
    assert!(
        !log.contains("vhost-user connection closed"),
        "a vhost-user message failed:\n{log}"
    );
    assert!(log.contains("queue recovered"), "no recovery logged");
}

/// Loop mode across frontend crashes: QEMU (reconnect-ms) reconnects to
/// the restarted frontend and hands back its inflight region; the guest
/// kernel sees stalls, never an error or a wrong byte.
#[test]
fn a_real_guest_rides_out_frontend_restarts() {
    let mut scenario = Scenario::new(11);
    scenario.reconnect_ms = Some(200);
    let (cluster, _) = scenario.run(|cluster, vm| {
        wait_checks_started(vm);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_secs(3));
            cluster.kill_frontend();
            std::thread::sleep(Duration::from_millis(300));
            cluster.start_frontend();
        }
    });
    let log = frontend_log(&cluster);
    assert!(
        log.matches("VMM connected").count() >= 4,
        "QEMU did not reconnect three times:\n{log}"
    );
}

/// A worker SIGSTOPped during the guest's I/O: its heartbeat stops, the
/// frontend fences it (SIGKILL) and moves its queue to the replacement
/// (started here, as the supervisor would); the guest sees a stall.
#[test]
fn a_real_guest_rides_out_a_hung_worker() {
    let mut scenario = Scenario::new(17);
    scenario.cluster = scenario.cluster.env("BLKMESH_WORKER_TIMEOUT_MS", "1500");
    let (cluster, _) = scenario.run(|cluster, vm| {
        wait_checks_started(vm);
        std::thread::sleep(Duration::from_secs(3));
        let pid = cluster.worker_pid(0).expect("worker 0 runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        // Fenced: the stopped process is killed by the frontend.
        let deadline = Instant::now() + Duration::from_secs(20);
        while cluster.worker_pid(0) == Some(pid) {
            assert!(Instant::now() < deadline, "the hung worker was not fenced");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.start_worker(0);
    });
    assert!(
        frontend_log(&cluster).contains("fenced"),
        "no fencing logged"
    );
}

/// The manager killed and started again during the guest's I/O: the data
/// path never needed it, and the processes register again.
#[test]
fn a_real_guest_rides_out_manager_restarts() {
    let (mut cluster, _) = Scenario::new(19).run(|cluster, vm| {
        wait_checks_started(vm);
        for _ in 0..2 {
            std::thread::sleep(Duration::from_secs(3));
            cluster.kill_manager();
            std::thread::sleep(Duration::from_millis(500));
            cluster.start_manager();
        }
    });
    cluster.wait_workers_alive();
    cluster.wait_frontend_registered();
}

/// The guest reset (QMP system_reset, as a reboot does) in the middle of
/// its I/O while workers die around it: QEMU stops the device (GET_VRING_BASE
/// on every queue), the rebooted guest's driver starts it again, and the
/// checks of the second boot pass.
#[test]
fn a_real_guest_reboots_while_workers_die() {
    let (cluster, out) = Scenario::new(23).run(|cluster, vm| {
        wait_checks_started(vm);
        // A reboot resets the machine instead of ending QEMU (-no-reboot).
        vm.qmp("set-action", r#"{"reboot":"reset"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_secs(2));
        cluster.kill_worker(0);
        vm.qmp("system_reset", "").unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_millis(200));
        cluster.start_worker(0);
        // During the second bring-up.
        std::thread::sleep(Duration::from_millis(1500));
        cluster.kill_worker(1);
        std::thread::sleep(Duration::from_millis(200));
        cluster.start_worker(1);
        // Panics and reboots end QEMU again.
        vm.qmp("set-action", r#"{"reboot":"shutdown"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    assert!(
        out.console.matches("CHECK geometry").count() >= 2,
        "the guest did not boot twice:\n{}",
        out.console
    );
    let log = frontend_log(&cluster);
    assert!(
        !log.contains("vhost-user connection closed"),
        "a vhost-user message failed:\n{log}"
    );
}

/// Nobody listening on the socket: QEMU exits at once, and the harness
/// reports that with QEMU's own message instead of waiting or passing.
#[test]
fn qemu_without_a_disk_server_is_an_error() {
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let mut vm = GuestVm::start(&image, GuestOptions::new(&socket).dir(dir.path()))
        .unwrap_or_else(|e| panic!("{e}"));
    match vm.wait_verdict(VERDICT_TIMEOUT) {
        Err(e @ GuestError::Exited { .. }) => {
            let text = e.to_string();
            assert!(text.contains("nobody.sock"), "{text}");
        }
        other => panic!("expected GuestError::Exited, got {other:?}"),
    }
}
