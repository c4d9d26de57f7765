//! A real Linux guest (QEMU, TCG) on a blkmesh export: the guest kernel's
//! virtio-blk driver writes, flushes, discards and zeroes through blkmesh,
//! reads everything back, and the host then finds the same bytes in the
//! image file. Needs qemu-system-x86_64, busybox-static and the Debian
//! cloud kernel package: `scripts/deps.sh` installs them; without them the
//! test fails and says what is missing. Build the binaries first:
//! `cargo build --bins`.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkmesh_guest_check::plan::Plan;
use blkmesh_guest_check::report::Verdict;
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
        out.report
            .checks
            .iter()
            .map(|c| format!(
                "  {} {} {}",
                c.name,
                if c.ok { "ok" } else { "FAIL" },
                c.detail
            ))
            .collect::<Vec<_>>()
            .join("\n")
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
    let cluster = Cluster::start(ClusterOptions::default().workers(2));
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

/// Loop mode under faults: the guest rewrites and verifies its data on
/// both queues for 20 s while each worker is SIGKILLed and restarted in
/// turn. The guest kernel must see neither an error nor a wrong byte (the
/// frontend holds the requests and resubmits them), and the image must
/// hold each thread's last round.
#[test]
fn a_real_guest_rides_out_killed_workers() {
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let (mut cluster, disk, socket) = two_queue_export();
    let seed = 7;
    let opts = GuestOptions::new(&socket)
        .dir(cluster.dir())
        .param("seed", seed)
        .param("loop", 20);
    let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));

    // Wait for the loop to start (the geometry check comes just before).
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
    let status = vm.qmp("query-status", "").unwrap_or_else(|e| panic!("{e}"));
    assert!(status.contains("running"), "{status}");
    for i in 0..2 {
        std::thread::sleep(Duration::from_secs(4));
        cluster.kill_worker(i);
        // The supervisor's part: start it again on the same socket.
        std::thread::sleep(Duration::from_millis(300));
        cluster.start_worker(i);
    }

    let out = vm
        .wait_verdict(VERDICT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "guest: boot {:?}, verdict after {:?}\n{}",
        out.boot,
        out.elapsed,
        summary(&out)
    );
    assert!(out.passed(), "{}", out.console);
    let [r0, r1] = out.report.loop_rounds;
    assert!(r0 > 0 && r1 > 0, "loop rounds {r0}+{r1}");
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("queue recovered"), "no recovery logged");

    drop(vm);
    let plan = Plan::new(seed, 64 * MIB).unwrap();
    let problems = plan.verify_image(&File::open(&disk).unwrap(), out.report.loop_rounds);
    assert!(
        problems.is_empty(),
        "image differs from the plan: {problems:#?}"
    );
}

/// Loop mode across frontend crashes: QEMU (reconnect-ms) reconnects to
/// the restarted frontend and hands back its inflight region; the guest
/// kernel sees stalls, never an error or a wrong byte.
#[test]
fn a_real_guest_rides_out_frontend_restarts() {
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let (mut cluster, disk, socket) = two_queue_export();
    let seed = 11;
    let opts = GuestOptions::new(&socket)
        .dir(cluster.dir())
        .reconnect_ms(200)
        .param("seed", seed)
        .param("loop", 20);
    let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));
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
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(4));
        cluster.kill_frontend();
        std::thread::sleep(Duration::from_millis(300));
        cluster.start_frontend();
    }

    let out = vm
        .wait_verdict(VERDICT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "guest: boot {:?}, verdict after {:?}\n{}",
        out.boot,
        out.elapsed,
        summary(&out)
    );
    assert!(out.passed(), "{}", out.console);
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(
        log.matches("VMM connected").count() >= 3,
        "QEMU did not reconnect twice:\n{log}"
    );

    drop(vm);
    let plan = Plan::new(seed, 64 * MIB).unwrap();
    let problems = plan.verify_image(&File::open(&disk).unwrap(), out.report.loop_rounds);
    assert!(
        problems.is_empty(),
        "image differs from the plan: {problems:#?}"
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
