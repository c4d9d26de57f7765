//! What live migration needs of the frontend, with fake workers
//! (tests/support) in this process. Dirty logging, checked page by page:
//! with a log shared and LOG_ALL on, every guest page the device writes
//! for a request (read data, an id, the status byte, the used ring) is
//! marked by the time the request's completion is visible, and pages it
//! only reads are not. And the destination's connection: served while
//! the source runs, its rings started only once the source's stopped.

#[allow(
    dead_code,
    reason = "the support module serves in_process.rs too; this binary uses part of it"
)]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use blkmesh_vhost_user_client::{
    log_pages, req, LogProbe, Options, ProtocolFeatures, RawConnection, RawMessage, VhostUserBlk,
    ID_BYTES, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use support::{plan, FakeWorker, Harness};

const PAGE: u64 = 0x1000;

fn connect(h: &Harness) -> VhostUserBlk {
    let opts = Options {
        protocol_features_wanted: Options::default().protocol_features_wanted
            | ProtocolFeatures::LOG_SHMFD,
        ..Options::default().timeout(Duration::from_secs(10))
    };
    VhostUserBlk::connect(&h.socket, opts).expect("VMM connects")
}

/// A request of `kind` at sector 8: `out` for the device to read, and
/// `writable` bytes for it to write at a fresh guest address that starts
/// mid-page (so its first and last pages are partial).
fn probe(vmm: &mut VhostUserBlk, kind: u32, out: Option<&[u8]>, writable: u32) -> LogProbe {
    let at =
        (writable > 0).then(|| vmm.alloc(u64::from(writable) + 2 * PAGE).expect("alloc") + 100);
    vmm.log_probe(kind, 8, out.unwrap_or(&[]), at.map(|a| (a, writable)))
        .expect("probe")
}

#[test]
fn every_page_the_device_writes_is_logged_before_its_completion() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let h = Harness::serve(disk, plan(&Harness::export_socket(&dir), &[&a], 1, 1));
    let mut vmm = connect(&h);
    let layout = vmm.ring_layout(0).expect("layout");
    let used = log_pages(layout.used, 6 + 8 * u64::from(layout.size));
    vmm.start_dirty_log().expect("log shared");
    vmm.take_dirty_pages().expect("log");

    let data = vec![0x5au8; 3 * PAGE as usize];
    // (what, type, data out, bytes the device writes, status)
    type Case<'a> = (&'a str, u32, Option<&'a [u8]>, u32, u8);
    let cases: Vec<Case<'_>> = vec![
        ("write", T_OUT, Some(&data), 0, S_OK),
        ("read", T_IN, None, 3 * PAGE as u32, S_OK),
        ("get id", T_GET_ID, None, ID_BYTES as u32, S_OK),
        ("flush", T_FLUSH, None, 0, S_OK),
        ("unknown type", 99, None, 0, S_UNSUPP),
    ];
    for (what, kind, out, writable, status) in cases {
        let p = probe(&mut vmm, kind, out, writable);
        vmm.run_chain(0, &p.chain).expect(what);
        assert_eq!(
            vmm.read_mem(p.status, 1).expect("status"),
            [status],
            "{what}"
        );
        let marked: BTreeSet<u64> = vmm.take_dirty_pages().expect("log").into_iter().collect();
        assert!(
            used.is_subset(&marked),
            "{what}: the used ring is not logged"
        );
        if let Err(e) = p.check(&marked, &used) {
            panic!("{what}: {e}");
        }
    }

    // A read's data reached the guest, and its pages were logged.
    vmm.write(0, 16, &data).expect("write");
    vmm.take_dirty_pages().expect("log");
    assert_eq!(vmm.read(0, 16, data.len() as u32).expect("read"), data);
    assert!(!vmm.take_dirty_pages().expect("log").is_empty());

    // A new log while the guest runs: marking goes on in it.
    vmm.start_dirty_log().expect("second log");
    let p = probe(&mut vmm, T_IN, None, PAGE as u32);
    vmm.run_chain(0, &p.chain).expect("read");
    let marked: BTreeSet<u64> = vmm.take_dirty_pages().expect("log").into_iter().collect();
    assert!(p.written.is_subset(&marked));

    // LOG_ALL off (a cancelled migration): nothing is marked.
    vmm.stop_dirty_log().expect("log off");
    // (The queue may still have marked the used ring as it re-armed
    // notifications after the last completion.)
    vmm.take_dirty_pages().expect("log");
    let p = probe(&mut vmm, T_IN, None, PAGE as u32);
    vmm.run_chain(0, &p.chain).expect("read");
    assert!(vmm.take_dirty_pages().expect("log").is_empty());
}

#[test]
fn a_log_without_the_protocol_feature_or_of_a_bad_size_is_refused() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let h = Harness::serve(disk, plan(&Harness::export_socket(&dir), &[&a], 1, 1));
    // The client refuses to share a log LOG_SHMFD was not negotiated for.
    let mut plain = h.connect(1, false);
    assert!(plain.start_dirty_log().is_err());
    drop(plain);
    // The device refuses a log of size 0, and the connection ends; the
    // next VMM is served as before.
    let mut vmm = connect(&h);
    let log = tempfile::tempfile().expect("log file");
    log.set_len(4096).expect("log size");
    let bad = RawMessage::new(req::SET_LOG_BASE)
        .payload(&[0u8; 16])
        .fd(&log)
        .expect("fd");
    let refused = vmm.raw_request(&bad);
    assert!(
        matches!(&refused, Ok(o) if o.refused()) || refused.is_err(),
        "a log of size 0 was taken: {refused:?}"
    );
    let mut vmm = connect(&h);
    assert_eq!(vmm.read(0, 0, 512).expect("read").len(), 512);
}

#[test]
fn a_second_vmm_is_served_while_the_first_runs_and_takes_over_once_it_stopped() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let h = Harness::serve(disk, plan(&Harness::export_socket(&dir), &[&a], 1, 1));
    let mut source = connect(&h);
    let data = vec![0x3cu8; 4096];
    source.write(0, 8, &data).expect("write");
    // A migration's destination connects and sets up while the source
    // runs: its messages are answered (they used to wait for the source
    // to go away, so the destination QEMU never started).
    let mut dest = RawConnection::connect(&h.socket, Duration::from_secs(5)).expect("connect");
    let features = dest
        .request(&RawMessage::new(req::GET_FEATURES))
        .expect("GET_FEATURES answered while the source runs");
    assert!(features.reply.is_some(), "{features:?}");
    drop(dest);
    // Its rings may not start while the source's run: only one side
    // writes at a time.
    assert!(
        VhostUserBlk::connect(
            &h.socket,
            Options::default().timeout(Duration::from_secs(5))
        )
        .is_err(),
        "a second VMM started its rings while the first ran"
    );
    assert_eq!(source.read(0, 8, 4096).expect("the source goes on"), data);
    // The source stops (its rings drained, its connection closed): the
    // destination starts and reads what the source wrote.
    source.disconnect();
    let mut dest = connect(&h);
    assert_eq!(dest.read(0, 8, 4096).expect("read"), data);
}
