//! The frontend's stateful core in one process: an export served on fake
//! workers (tests/support), driven over its vhost-user socket by the test
//! driver. Queue moves, reopens and fail-overs, with requests in flight.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blkmesh_frontend::export::LiveChangeError;
use blkmesh_frontend::queues::relocation::RelocationError;
use blkmesh_frontend::workers::LinkError;
use blkmesh_vhost_user_client::{
    req, Options, ProtocolFeatures, RawMessage, RequestSpec, Token, VhostUserBlk,
};
use support::{pattern, plan, wait_for, FakeWorker, Harness};

const OK: Option<u8> = Some(0);
const WAIT: Duration = Duration::from_secs(10);

/// Has `worker` hold what it takes, submits four writes of patterns
/// `seed..` on queue 0 and waits until the worker has taken them.
fn submit_held_writes(vmm: &mut VhostUserBlk, worker: &FakeWorker, seed: u8) -> Vec<Token> {
    worker.behaviour.hold.store(true, Ordering::Release);
    let tokens = (0..4u8)
        .map(|i| {
            let spec = RequestSpec::write(i as u64 * 8, &pattern(seed + i, 4096));
            vmm.submit(0, &spec).expect("submit")
        })
        .collect();
    wait_for("the worker to take the requests", || {
        worker.counters.served.load(Ordering::Relaxed) == 4
    });
    tokens
}

/// The writes of [`submit_held_writes`] complete after `replacement`
/// attached with `settle` and did them again.
fn expect_written(vmm: &mut VhostUserBlk, tokens: Vec<Token>, replacement: &FakeWorker, seed: u8) {
    for t in tokens {
        assert_eq!(vmm.wait(0, t, WAIT).expect("completion").status, OK);
    }
    let counters = &replacement.counters;
    assert_eq!(counters.settled_attaches.load(Ordering::Relaxed), 1);
    assert_eq!(counters.served.load(Ordering::Relaxed), 4);
    for i in 0..4u8 {
        let data = vmm.read(0, i as u64 * 8, 4096).expect("read");
        assert_eq!(data, pattern(seed + i, 4096));
    }
}

/// Workers `a` and `b` on one disk, and a one-queue export on `a`.
fn one_queue_on_a_of_two() -> (tempfile::TempDir, [FakeWorker; 2], String, Harness) {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let b = FakeWorker::start("b", &Harness::worker_socket(&dir, "b"), disk.clone());
    let export_socket = Harness::export_socket(&dir);
    let h = Harness::serve(disk, plan(&export_socket, &[&a], 1, 1));
    (dir, [a, b], export_socket, h)
}

#[test]
fn requests_pass_through_a_fake_worker() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let p = plan(&Harness::export_socket(&dir), &[&a], 2, 1);
    let h = Harness::serve(disk, p);
    let mut vmm = h.connect(2, false);
    for q in 0..2u16 {
        let data = pattern(q as u8, 4096);
        vmm.write(q, 8 * q as u64, &data).expect("write");
        assert_eq!(vmm.read(q, 8 * q as u64, 4096).expect("read"), data);
    }
    vmm.flush(0).expect("flush");
    assert_eq!(a.counters.attaches.load(Ordering::Relaxed), 2);
    assert_eq!(&h.disk.lock().unwrap()[..4096], &pattern(0, 4096)[..]);
}

#[test]
fn a_move_drains_in_flight_requests_and_loses_none() {
    let (_dir, [a, b], export_socket, mut h) = one_queue_on_a_of_two();
    let mut vmm = h.connect(1, false);
    // Slow completions: the move must wait for them.
    *a.behaviour.delay.lock().unwrap() = Duration::from_millis(30);
    let tokens: Vec<_> = (0..8u8)
        .map(|i| {
            let spec = RequestSpec::write(i as u64 * 8, &pattern(i, 4096));
            vmm.submit(0, &spec).expect("submit")
        })
        .collect();
    wait_for("the worker to take the requests", || {
        a.counters.served.load(Ordering::Relaxed) == 8
    });
    h.export
        .apply_placement(plan(&export_socket, &[&b], 1, 1))
        .expect("queue moves");
    for t in tokens {
        assert_eq!(vmm.wait(0, t, WAIT).expect("completion").status, OK);
    }
    assert_eq!(a.counters.detaches.load(Ordering::Relaxed), 1);
    assert_eq!(b.counters.attaches.load(Ordering::Relaxed), 1);
    // The same ring, now served by b, which sees a's writes.
    for i in 0..8u8 {
        assert_eq!(
            vmm.read(0, i as u64 * 8, 4096).expect("read"),
            pattern(i, 4096)
        );
    }
    assert_eq!(b.counters.served.load(Ordering::Relaxed), 8);
}

#[test]
fn a_reopen_switches_graphs_live() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let export_socket = Harness::export_socket(&dir);
    let mut h = Harness::serve(disk, plan(&export_socket, &[&a], 2, 1));
    let mut vmm = h.connect(2, false);
    vmm.write(1, 0, &pattern(1, 512)).expect("write");
    h.export
        .reopen(plan(&export_socket, &[&a], 2, 2))
        .expect("reopen");
    // Opened once by the export, once per reopen; each queue attached
    // to the new graph's connection.
    assert_eq!(a.counters.opens.load(Ordering::Relaxed), 2);
    assert_eq!(a.counters.attaches.load(Ordering::Relaxed), 4);
    assert_eq!(vmm.read(1, 0, 512).expect("read"), pattern(1, 512));
}

#[test]
fn a_reopen_whose_graph_does_not_open_keeps_the_old_one() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let export_socket = Harness::export_socket(&dir);
    let mut h = Harness::serve(disk, plan(&export_socket, &[&a], 1, 1));
    let mut vmm = h.connect(1, false);
    *a.behaviour.refuse_generation.lock().unwrap() = Some(2);
    let e = h
        .export
        .reopen(plan(&export_socket, &[&a], 1, 2))
        .expect_err("the new graph does not open");
    let LiveChangeError::Relocation(e) = e else {
        panic!("{e}")
    };
    assert!(
        matches!(*e, RelocationError::Open(LinkError::Refused { .. })),
        "{e}"
    );
    assert!(
        e.to_string().contains("this generation does not open"),
        "{e}"
    );
    assert_eq!(a.counters.detaches.load(Ordering::Relaxed), 0);
    vmm.write(0, 0, &pattern(3, 512))
        .expect("the old graph serves");
}

#[test]
fn a_reopen_that_cannot_attach_rolls_back_to_the_old_graph() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let export_socket = Harness::export_socket(&dir);
    let mut h = Harness::serve(disk, plan(&export_socket, &[&a], 2, 1));
    let mut vmm = h.connect(2, false);
    *a.behaviour.delay.lock().unwrap() = Duration::from_millis(20);
    let pending = vmm
        .submit(0, &RequestSpec::write(0, &pattern(5, 4096)))
        .expect("submit");
    *a.behaviour.refuse_attach_generation.lock().unwrap() = Some(2);
    let e = h
        .export
        .reopen(plan(&export_socket, &[&a], 2, 2))
        .expect_err("the new graph refuses the queues");
    let LiveChangeError::Relocation(e) = e else {
        panic!("{e}")
    };
    assert!(
        matches!(*e, RelocationError::Attach { queue: 0, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("attach refused"), "{e}");
    // Drained, detached, and attached again to the old graph.
    assert_eq!(vmm.wait(0, pending, WAIT).expect("completion").status, OK);
    assert_eq!(a.counters.detaches.load(Ordering::Relaxed), 2 + 2);
    assert_eq!(a.counters.attaches.load(Ordering::Relaxed), 2 + 2);
    *a.behaviour.delay.lock().unwrap() = Duration::ZERO;
    for q in 0..2 {
        assert_eq!(vmm.read(q, 0, 4096).expect("read"), pattern(5, 4096));
    }
}

/// A one-queue export whose worker took four writes (patterns `seed..`)
/// and died before completing them; the disk was wiped since, so only a
/// replacement's writes can put the patterns there.
struct LostWorker {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    disk: support::Disk,
    _export: Harness,
    vmm: VhostUserBlk,
    tokens: Vec<Token>,
}

fn lose_worker_with_writes_in_flight(seed: u8, migrating: bool) -> LostWorker {
    let (dir, disk) = Harness::dir();
    let socket = Harness::worker_socket(&dir, "a");
    let a = FakeWorker::start("a", &socket, disk.clone());
    let export_socket = Harness::export_socket(&dir);
    let h = Harness::serve(disk.clone(), plan(&export_socket, &[&a], 1, 1));
    let mut vmm = if migrating {
        // The VMM shares its dirty log, as a migration's source does.
        let opts = Options {
            protocol_features_wanted: Options::default().protocol_features_wanted
                | ProtocolFeatures::LOG_SHMFD,
            ..Options::default().timeout(WAIT)
        };
        let mut vmm = VhostUserBlk::connect(&h.socket, opts).expect("VMM connects");
        vmm.start_dirty_log().expect("log shared");
        vmm
    } else {
        h.connect(1, false)
    };
    let tokens = submit_held_writes(&mut vmm, &a, seed);
    a.kill();
    disk.lock().expect("disk").fill(0);
    LostWorker {
        _dir: dir,
        socket,
        disk,
        _export: h,
        vmm,
        tokens,
    }
}

#[test]
fn a_lost_workers_requests_are_resubmitted_to_its_replacement() {
    let mut lost = lose_worker_with_writes_in_flight(10, false);
    // Its supervisor restarts it on the same socket.
    let a2 = FakeWorker::start("a", &lost.socket, lost.disk);
    expect_written(&mut lost.vmm, lost.tokens, &a2, 10);
}

#[test]
fn a_new_frontend_resubmits_what_the_old_one_left_in_flight() {
    let (dir, disk) = Harness::dir();
    let a_socket = Harness::worker_socket(&dir, "a");
    let a = FakeWorker::start("a", &a_socket, disk.clone());
    let b = FakeWorker::start("b", &Harness::worker_socket(&dir, "b"), disk.clone());
    let export_socket = Harness::export_socket(&dir);
    let old = Harness::serve(disk.clone(), plan(&export_socket, &[&a], 1, 1));
    let mut vmm = old.connect(1, true);
    assert!(vmm.inflight_region().is_some(), "INFLIGHT_SHMFD negotiated");
    let tokens = submit_held_writes(&mut vmm, &a, 20);
    // The worker dies; once the old frontend tries its replacement (which
    // cannot open the graph) the queue is known lost, and the frontend
    // goes away leaving the requests in flight.
    a.kill();
    let replacement = FakeWorker::start("a", &a_socket, disk.clone());
    *replacement.behaviour.refuse_generation.lock().unwrap() = Some(1);
    wait_for("the failover to try the replacement", || {
        replacement.counters.open_attempts.load(Ordering::Relaxed) > 0
    });
    drop(old);
    disk.lock().unwrap().fill(0);
    // A new frontend on the same socket; the VMM reconnects with its
    // inflight region.
    let new = Harness::serve(disk, plan(&export_socket, &[&b], 1, 1));
    vmm.reconnect().expect("reconnect");
    expect_written(&mut vmm, tokens, &b, 20);
    drop(new);
}

#[test]
fn a_worker_lost_while_its_queue_drains_for_a_move_fails_over_at_once() {
    let (_dir, [a, b], export_socket, mut h) = one_queue_on_a_of_two();
    let mut vmm = h.connect(1, false);
    // The move drains the queue, and these never complete on `a`.
    let tokens = submit_held_writes(&mut vmm, &a, 30);
    let export = &mut h.export;
    let moved = std::thread::scope(|s| {
        let started = Instant::now();
        let mover = s.spawn(|| export.apply_placement(plan(&export_socket, &[&b], 1, 1)));
        // Meant to land while the move waits for the drain; killed before
        // it, the move is a fail-over from the start, and must end alike.
        std::thread::sleep(Duration::from_millis(200));
        a.kill();
        let result = mover.join().expect("mover");
        (result, started.elapsed())
    });
    moved.0.expect("the move turns into a fail-over");
    // Not the drain's 30 s timeout: the loss ends the wait.
    assert!(moved.1 < WAIT, "the move took {:?}", moved.1);
    expect_written(&mut vmm, tokens, &b, 30);
    // The export's failover watcher saw the loss too; the queue was
    // recovered already, so it must not fail it over a second time (and
    // resubmit what `b` has in flight). It retries every 50 ms.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.counters.settled_attaches.load(Ordering::Relaxed), 1);
    assert_eq!(b.counters.attaches.load(Ordering::Relaxed), 1);
}

#[test]
fn a_migrating_queue_stopped_while_its_worker_is_lost_completes_its_requests_first() {
    // The worker died just before a migration's source stops the ring, and
    // its supervisor brings it back while GET_VRING_BASE waits.
    let lost = lose_worker_with_writes_in_flight(40, true);
    let (mut vmm, tokens, disk) = (lost.vmm, lost.tokens, lost.disk);
    let replacement = std::thread::spawn({
        let (socket, disk) = (lost.socket.clone(), disk.clone());
        move || {
            std::thread::sleep(Duration::from_millis(300));
            FakeWorker::start("a", &socket, disk)
        }
    });
    let base = get_vring_base(&mut vmm);
    let a2 = replacement.join().expect("replacement");
    assert_eq!(base, 4, "the base: all four taken");
    // Done by the replacement before the answer: QEMU 10 does not carry the
    // inflight region to a migration's destination, so what is left in
    // flight here is never completed there.
    assert_eq!(vmm.used_idx(0).expect("used index"), 4);
    for t in tokens {
        assert_eq!(vmm.wait(0, t, WAIT).expect("completion").status, OK);
    }
    assert_eq!(a2.counters.settled_attaches.load(Ordering::Relaxed), 1);
    let written = disk.lock().unwrap();
    for i in 0..4usize {
        let at = i * 8 * 512;
        assert_eq!(written[at..at + 4096], pattern(40 + i as u8, 4096));
    }
}

#[test]
fn a_queue_stopped_outside_a_migration_leaves_a_lost_workers_requests_to_the_vmm() {
    // A reset or a VM stop: the VMM hands the inflight region back when it
    // starts the queue again, and waiting for the replacement here would
    // hold its main loop (and its monitor) until the worker is back.
    let lost = lose_worker_with_writes_in_flight(50, false);
    let mut vmm = lost.vmm;
    let started = Instant::now();
    assert_eq!(get_vring_base(&mut vmm), 4);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(vmm.used_idx(0).expect("used index"), 0);
}

/// Stops queue 0 with GET_VRING_BASE; its base.
fn get_vring_base(vmm: &mut VhostUserBlk) -> u32 {
    let reply = vmm
        .raw_request(&RawMessage::vring_state(req::GET_VRING_BASE, 0, 0))
        .expect("GET_VRING_BASE answered")
        .reply
        .expect("a base");
    u32::from_le_bytes(reply.payload[4..8].try_into().expect("vring state"))
}
