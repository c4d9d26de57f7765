//! Tests of the ring pair: wire format, index protocol, heartbeat.

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::heartbeat::HEARTBEAT_SLACK;
use super::layout::{LINE, OFF_CPL_CONS, OFF_CPL_PROD, OFF_HEARTBEAT, OFF_REQ_CONS, OFF_REQ_PROD};
use super::*;

fn pair(entries: u32) -> (QueueRings, QueueRings) {
    let layout = RingLayout::new(entries, 8).unwrap();
    let f = QueueRings::create("t", layout).unwrap();
    let file = f.shm_file();
    let w = QueueRings::attach(file, layout).unwrap();
    (f, w)
}

impl QueueRings {
    fn shm_file(&self) -> File {
        let fd = self.fd().try_clone_to_owned().unwrap();
        File::from(fd)
    }
}

fn rw(tag: u32, op: Op, offset: u64, segs: &[Segment]) -> Request {
    Request {
        tag,
        op,
        flags: 0,
        offset,
        len: segs.iter().map(|s| s.len as u64).sum(),
    }
}

fn seg(region: u32, offset: u64, len: u32) -> Segment {
    Segment {
        region,
        len,
        offset,
    }
}

#[test]
fn requests_and_completions_round_trip() {
    let (f, w) = pair(8);
    let (mut tx, mut rx_cpl) = f.frontend_end();
    let (mut rx, mut tx_cpl) = w.worker_end();
    let short = [seg(0, 4096, 512)];
    let long: Vec<_> = (0..5).map(|i| seg(1, i * 4096, 4096)).collect();
    tx.push(&rw(3, Op::Read, 0, &short), &short).unwrap();
    tx.push(&rw(5, Op::Write, 8192, &long), &long).unwrap();
    tx.publish();
    match rx.pop().unwrap().unwrap() {
        Received::Request(r, s) => {
            assert_eq!((r.tag, r.op, r.len), (3, Op::Read, 512));
            assert_eq!(s, &short);
        }
        Received::Bad(b) => panic!("{b}"),
    }
    match rx.pop().unwrap().unwrap() {
        Received::Request(r, s) => {
            assert_eq!((r.tag, r.op, r.offset), (5, Op::Write, 8192));
            assert_eq!(s, &long[..]);
        }
        Received::Bad(b) => panic!("{b}"),
    }
    assert!(rx.pop().unwrap().is_none());
    rx.release();
    tx_cpl
        .push(Completion {
            tag: 5,
            result: -5,
            extra: 0,
        })
        .unwrap();
    tx_cpl.publish();
    assert_eq!(rx_cpl.pop().unwrap().unwrap().result, -5);
    assert!(rx_cpl.pop().unwrap().is_none());
}

#[test]
fn producer_sees_full_ring_until_consumer_releases() {
    let (f, w) = pair(4);
    let (mut tx, _) = f.frontend_end();
    let (mut rx, _) = w.worker_end();
    let s = [seg(0, 0, 512)];
    for t in 0..4 {
        tx.push(&rw(t, Op::Read, 0, &s), &s).unwrap();
    }
    assert!(matches!(
        tx.push(&rw(0, Op::Read, 0, &s), &s),
        Err(RingError::Full)
    ));
    tx.publish();
    assert!(rx.pop().unwrap().is_some());
    rx.release();
    tx.push(&rw(0, Op::Read, 0, &s), &s).unwrap();
}

#[test]
fn wakeup_requested_only_when_consumer_sleeps() {
    let (f, w) = pair(4);
    let (mut tx, _) = f.frontend_end();
    let (mut rx, _) = w.worker_end();
    let s = [seg(0, 0, 512)];
    tx.push(&rw(0, Op::Read, 0, &s), &s).unwrap();
    assert!(!tx.publish(), "busy consumer needs no kick");
    assert!(
        !rx.prepare_sleep(),
        "pending entry must keep the consumer awake"
    );
    assert!(rx.pop().unwrap().is_some());
    assert!(rx.prepare_sleep());
    tx.push(&rw(1, Op::Read, 0, &s), &s).unwrap();
    assert!(tx.publish(), "sleeping consumer must be kicked");
    rx.woke();
}

#[test]
fn rejects_corrupt_producer_index() {
    let (f, w) = pair(4);
    let (mut rx, _) = w.worker_end();
    // A hostile frontend claims 100 entries in a ring of 4.
    f.word_for_test(OFF_REQ_PROD).store(100, Ordering::Release);
    assert!(matches!(rx.pop(), Err(RingError::PeerIndex { .. })));
}

impl QueueRings {
    fn word_for_test(&self, off: usize) -> &AtomicU32 {
        self.state_word(off)
    }
}

#[test]
fn rejects_corrupt_completion_index() {
    let (f, w) = pair(4);
    let (_, mut rx_cpl) = f.frontend_end();
    let (_, mut tx_cpl) = w.worker_end();
    tx_cpl
        .push(Completion {
            tag: 1,
            result: 0,
            extra: 0,
        })
        .unwrap();
    tx_cpl.publish();
    assert_eq!(rx_cpl.pop().unwrap().unwrap().tag, 1);
    rx_cpl.release();
    // Exactly a ring ahead is a full ring, not corruption.
    f.word_for_test(OFF_CPL_PROD)
        .store(1 + 4, Ordering::Release);
    assert!(rx_cpl.pop().unwrap().is_some());
    // A worker that claims more than a ring of completions is corrupt,
    // and stays so on every later look.
    let (_, mut rx_cpl) = f.frontend_end();
    tx_cpl.publish_corrupt_index();
    for _ in 0..2 {
        assert!(matches!(rx_cpl.pop(), Err(RingError::PeerIndex { .. })));
    }
}

#[test]
fn heartbeat_is_on_its_own_line_and_counts_beats() {
    let (f, w) = pair(4);
    let (_, mut rx_cpl) = f.frontend_end();
    let (_, tx_cpl) = w.worker_end();
    for off in [OFF_REQ_PROD, OFF_REQ_CONS, OFF_CPL_PROD, OFF_CPL_CONS] {
        assert_ne!(off / LINE, OFF_HEARTBEAT / LINE);
    }
    let t0 = Instant::now();
    assert!(!rx_cpl.heartbeat(t0).unwrap(), "no beat yet");
    tx_cpl.beat();
    tx_cpl.beat();
    let t1 = t0 + Duration::from_millis(100);
    assert!(rx_cpl.heartbeat(t1).unwrap());
    assert!(!rx_cpl.heartbeat(t1 + Duration::from_millis(100)).unwrap());
    // A re-attached end continues the count; it never restarts at 0.
    let (_, tx_again) = w.worker_end();
    tx_again.beat();
    assert!(rx_cpl.heartbeat(t1 + Duration::from_millis(200)).unwrap());
}

#[test]
fn impossible_heartbeats_are_corrupt() {
    let ms = Duration::from_millis;
    assert!(!judge_heartbeat(7, 7, ms(500)).unwrap());
    assert!(judge_heartbeat(7, 8, Duration::ZERO).unwrap());
    assert!(judge_heartbeat(0, 1_000_000, ms(1)).unwrap());
    // Backwards.
    assert!(matches!(
        judge_heartbeat(8, 7, ms(500)),
        Err(RingError::Heartbeat { was: 8, now: 7, .. })
    ));
    // More than one beat per nanosecond (plus the slack).
    assert!(judge_heartbeat(0, 3 * HEARTBEAT_SLACK, ms(1)).is_err());
    assert!(judge_heartbeat(5, u64::MAX, ms(500)).is_err());
    // Through the ring: a worker scribbling the word.
    let (f, _w) = pair(4);
    let (_, mut rx_cpl) = f.frontend_end();
    let t0 = Instant::now();
    f.heartbeat().word().store(u64::MAX / 2, Ordering::Relaxed);
    assert!(matches!(
        rx_cpl.heartbeat(t0 + ms(100)),
        Err(RingError::Heartbeat { .. })
    ));
}

#[test]
fn bad_entries_are_reported_with_their_tag() {
    let layout = RingLayout::new(8, 4).unwrap();
    let raw = |tag, op, flags, nseg, len| RawRequest {
        tag,
        op,
        flags,
        nseg,
        offset: 0,
        len,
        reserved: 0,
        inline: [Segment::default(); 2],
    };
    let one = [seg(0, 0, 512)];
    assert_eq!(
        layout
            .validate(&raw(9, 1, 0, 1, 512), &one)
            .unwrap_err()
            .tag,
        None
    );
    assert_eq!(
        layout
            .validate(&raw(1, 99, 0, 1, 512), &one)
            .unwrap_err()
            .reason,
        "unknown op"
    );
    assert!(layout
        .validate(&raw(1, Op::Read as u8, FLAG_FUA, 1, 512), &one)
        .is_err());
    assert!(layout
        .validate(&raw(1, Op::Read as u8, 0, 1, 1024), &one)
        .is_err());
    assert!(layout
        .validate(&raw(1, Op::Flush as u8, 0, 1, 512), &one)
        .is_err());
    assert!(layout
        .validate(&raw(1, Op::Discard as u8, 0, 0, 0), &[])
        .is_err());
    let mut over = raw(1, Op::Read as u8, 0, 1, 512);
    over.offset = u64::MAX - 10;
    assert!(layout.validate(&over, &one).is_err());
    assert!(layout
        .validate(&raw(1, Op::Read as u8, 0, 1, 512), &one)
        .is_ok());
}

#[test]
fn attach_rejects_mismatched_geometry() {
    let layout = RingLayout::new(8, 4).unwrap();
    let f = QueueRings::create("t", layout).unwrap();
    let other = RingLayout::new(8, 2).unwrap();
    assert!(QueueRings::attach(f.shm_file(), other).is_err());
}

#[test]
fn rejects_bad_layouts() {
    assert!(RingLayout::new(0, 1).is_err());
    assert!(RingLayout::new(3, 1).is_err());
    assert!(RingLayout::new(8192, 1).is_err());
    assert!(RingLayout::new(8, 0).is_err());
}

#[test]
fn cross_thread_stream_keeps_order() {
    let (f, w) = pair(64);
    let (mut tx, _) = f.frontend_end();
    let (mut rx, _) = w.worker_end();
    const N: u32 = 200_000;
    let t = std::thread::spawn(move || {
        let mut next = 0u32;
        while next < N {
            match rx.pop().unwrap() {
                Some(Received::Request(r, _)) => {
                    assert_eq!(r.offset, next as u64);
                    next += 1;
                }
                Some(Received::Bad(b)) => panic!("{b}"),
                None => {
                    rx.release();
                    std::hint::spin_loop();
                }
            }
        }
    });
    let s = [seg(0, 0, 512)];
    let mut i = 0u32;
    while i < N {
        let r = Request {
            tag: i % 64,
            op: Op::Read,
            flags: 0,
            offset: i as u64,
            len: 512,
        };
        match tx.push(&r, &s) {
            Ok(()) => i += 1,
            Err(RingError::Full) => {
                tx.publish();
                std::hint::spin_loop();
            }
            Err(e) => panic!("{e}"),
        }
        if i % 16 == 0 {
            tx.publish();
        }
    }
    tx.publish();
    t.join().unwrap();
}
