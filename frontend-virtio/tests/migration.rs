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
    req, request::header, Buf, Chain, Options, Part, ProtocolFeatures, RawConnection, RawMessage,
    VhostUserBlk, ID_BYTES, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use support::{plan, FakeWorker, Harness};

const PAGE: u64 = 0x1000;

fn pages(addr: u64, len: u64) -> BTreeSet<u64> {
    (addr / PAGE..=(addr + len - 1) / PAGE).collect()
}

fn connect(h: &Harness) -> VhostUserBlk {
    let opts = Options {
        protocol_features_wanted: Options::default().protocol_features_wanted
            | ProtocolFeatures::LOG_SHMFD,
        ..Options::default().timeout(Duration::from_secs(10))
    };
    VhostUserBlk::connect(&h.socket, opts).expect("VMM connects")
}

/// A request of `kind` at sector 8: header, `data` (readable bytes, or
/// `writable` bytes at a fresh guest address), status at another page.
struct Probe {
    chain: Chain,
    status: u64,
    written: BTreeSet<u64>,
    read_only: BTreeSet<u64>,
}

fn probe(vmm: &mut VhostUserBlk, kind: u32, out: Option<&[u8]>, writable: u32) -> Probe {
    let mut chain = Chain::new().part(Part::readable(&header(kind, 8)));
    let mut written = BTreeSet::new();
    let mut read_only = BTreeSet::new();
    if let Some(data) = out {
        // Written by the driver, only read by the device.
        let at = vmm.alloc_with(data).expect("alloc");
        read_only.extend(pages(at, data.len() as u64));
        chain = chain.part(Part {
            buf: Buf::At {
                addr: at,
                len: data.len() as u32,
            },
            ..Part::readable(&[])
        });
    }
    if writable > 0 {
        // Starts mid-page: its first and last pages are partial.
        let at = vmm.alloc(u64::from(writable) + 2 * PAGE).expect("alloc") + 100;
        written.extend(pages(at, u64::from(writable)));
        chain = chain.part(Part {
            buf: Buf::At {
                addr: at,
                len: writable,
            },
            ..Part::writable(0)
        });
    }
    let status = vmm.alloc(PAGE).expect("alloc") + 7;
    written.extend(pages(status, 1));
    chain = chain.part(Part {
        buf: Buf::At {
            addr: status,
            len: 1,
        },
        ..Part::status()
    });
    read_only.retain(|p| !written.contains(p));
    Probe {
        chain,
        status,
        written,
        read_only,
    }
}

#[test]
fn every_page_the_device_writes_is_logged_before_its_completion() {
    let (dir, disk) = Harness::dir();
    let a = FakeWorker::start("a", &Harness::worker_socket(&dir, "a"), disk.clone());
    let h = Harness::serve(disk, plan(&Harness::export_socket(&dir), &[&a], 1, 1));
    let mut vmm = connect(&h);
    let layout = vmm.ring_layout(0).expect("layout");
    let used = pages(layout.used, 6 + 8 * u64::from(layout.size));
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
        let missing: Vec<_> = p.written.difference(&marked).collect();
        assert!(
            missing.is_empty(),
            "{what}: written, not logged: {missing:x?}"
        );
        assert!(
            used.is_subset(&marked),
            "{what}: the used ring is not logged"
        );
        let stray: Vec<_> = p.read_only.intersection(&marked).collect();
        assert!(stray.is_empty(), "{what}: only read, logged: {stray:x?}");
        let extra: Vec<_> = marked
            .difference(&p.written)
            .filter(|pg| !used.contains(pg))
            .collect();
        assert!(extra.is_empty(), "{what}: logged, not written: {extra:x?}");
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
