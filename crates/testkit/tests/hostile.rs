//! Hostile guests and VMMs against a running frontend, through
//! `blkmesh-vhost-user-client`.
//!
//! Every test starts its own cluster (one worker, two writable io_uring
//! exports `d` and `e` served by the same frontend), damages export `d`
//! one way, and then checks that
//!
//! - the frontend answered the damaged request with IOERR / UNSUPP, or
//!   returned a chain it cannot answer unused, or (vhost-user message
//!   damage) refused the message or closed that one connection;
//! - the frontend process is still alive;
//! - correct I/O works on `d`: on the same connection after request-level
//!   damage, on a new one after connection-level damage;
//! - export `e`, whose connection stays open throughout, is unaffected.
//!
//! Build the binaries first: `cargo build --bins`. Every wait is bounded.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};
use blkmesh_vhost_user_client::raw::{FLAG_VERSION, VRING_NOFD_MASK};
use blkmesh_vhost_user_client::*;

const MIB: u64 = 1 << 20;
/// Size of export `d`'s image.
const D_SIZE: u64 = 64 * MIB;
/// Bound on each wait for the frontend.
const T: Duration = Duration::from_secs(5);
/// How long a chain the frontend cannot answer gets to show up anyway.
const QUIET: Duration = Duration::from_millis(300);
/// Queues of export `d` and of the driver.
const QUEUES: u16 = 2;
/// The driver's queue size (the frontend's maximum): room for long chains.
const QSIZE: u16 = 256;
const WRITE_ZEROES_UNMAP: u32 = request::WRITE_ZEROES_FLAG_UNMAP;

struct Fx {
    /// A connection to export `e`, open for the whole test. Dropped before
    /// the cluster.
    other: VhostUserBlk,
    other_pattern: Vec<u8>,
    d: PathBuf,
    cluster: Cluster,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn opts() -> Options {
    Options::default()
        .queues(QUEUES)
        .queue_size(QSIZE)
        .timeout(T)
}

fn fixture() -> Fx {
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    eprintln!("cluster in {}", cluster.dir().display());
    let d_img = cluster.sparse_image("d.img", D_SIZE);
    let e_img = cluster.sparse_image("e.img", 16 * MIB);
    cluster.add_io_uring("d", &d_img, false, false).unwrap();
    cluster.add_io_uring("e", &e_img, false, false).unwrap();
    let d = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(QUEUES as u32))
        .unwrap();
    let e = cluster
        .add_export(ExportOpts::new("e", "e").writable())
        .unwrap();
    let mut other =
        VhostUserBlk::connect(&e, Options::default().timeout(T)).expect("connect to export e");
    let other_pattern = pattern(0xe, 8192);
    other
        .write(0, 8, &other_pattern)
        .expect("write to export e");
    Fx {
        other,
        other_pattern,
        d,
        cluster,
    }
}

impl Fx {
    fn connect(&self) -> VhostUserBlk {
        VhostUserBlk::connect(&self.d, opts()).unwrap_or_else(|e| {
            panic!(
                "connect to export d: {e}\n{}",
                self.log_tail("frontend", 40)
            )
        })
    }

    fn log(&self, process: &str) -> String {
        std::fs::read_to_string(self.cluster.log_path(process)).unwrap_or_default()
    }

    fn log_tail(&self, process: &str, lines: usize) -> String {
        let log = self.log(process);
        let all: Vec<&str> = log.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- last {lines} lines of {process}.log ---\n{}",
            all[from..].join("\n")
        )
    }

    /// Waits (bounded) until the frontend log contains `needle`.
    fn logged(&self, needle: &str) {
        let deadline = Instant::now() + T;
        while !self.log("frontend").contains(needle) {
            if Instant::now() >= deadline {
                panic!(
                    "frontend never logged {needle:?}\n{}",
                    self.log_tail("frontend", 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_alive(&mut self, what: &str) {
        if self.cluster.frontend_pid().is_none() {
            panic!(
                "the frontend died after {what}\n{}",
                self.log_tail("frontend", 60)
            );
        }
    }

    /// Correct I/O on `blk` (both queues), the frontend alive, export `e`
    /// unaffected.
    fn assert_healthy(&mut self, blk: &mut VhostUserBlk, what: &str) {
        self.assert_alive(what);
        for q in 0..QUEUES {
            let data = pattern(q as u64 + 100, 16384);
            let sector = 1024 + q as u64 * 64;
            blk.write(q, sector, &data).unwrap_or_else(|e| {
                panic!(
                    "write on queue {q} after {what}: {e}\n{}",
                    self.log_tail("frontend", 40)
                )
            });
            let back = blk.read(q, sector, data.len() as u32).unwrap_or_else(|e| {
                panic!(
                    "read on queue {q} after {what}: {e}\n{}",
                    self.log_tail("frontend", 40)
                )
            });
            assert!(back == data, "queue {q} read back other data after {what}");
        }
        self.assert_other_unaffected(what);
        self.assert_alive(what);
    }

    /// A new connection to `d` works, and so does everything else.
    fn assert_healthy_after_reconnect(&mut self, what: &str) {
        let mut blk = self.connect();
        self.assert_healthy(&mut blk, what);
    }

    fn assert_other_unaffected(&mut self, what: &str) {
        let back = self
            .other
            .read(0, 8, self.other_pattern.len() as u32)
            .unwrap_or_else(|e| panic!("export e after {what}: {e}"));
        assert!(
            back == self.other_pattern,
            "export e read back other data after {what}"
        );
        let fresh = pattern(0xee, 4096);
        self.other
            .write(0, 512, &fresh)
            .unwrap_or_else(|e| panic!("export e write after {what}: {e}"));
        assert_eq!(self.other.read(0, 512, 4096).unwrap(), fresh);
    }

    /// A bare connection to `d` that went through feature negotiation and
    /// SET_OWNER, with REPLY_ACK.
    fn raw(&self) -> RawConnection {
        let mut c = RawConnection::connect(&self.d, T).expect("raw connect");
        c.negotiate(
            (ProtocolFeatures::MQ
                | ProtocolFeatures::CONFIG
                | ProtocolFeatures::REPLY_ACK
                | ProtocolFeatures::CONFIGURE_MEM_SLOTS)
                .bits(),
        )
        .expect("negotiate");
        c
    }
}

/// The chain came back unused: used length 0, status byte untouched (the
/// frontend found no status byte it may write).
fn assert_unused(c: &Completion, what: &str) {
    assert!(c.token.is_some(), "{what}: unexpected used id {}", c.head);
    assert_eq!(c.used_len, 0, "{what}: {c:?}");
    assert!(
        c.status.is_none() || c.status == Some(STATUS_UNTOUCHED),
        "{what}: status written: {c:?}"
    );
}

fn assert_status(c: &Completion, status: u8, what: &str) {
    assert_eq!(c.status, Some(status), "{what}: {c:?}");
    assert_eq!(c.used_len, 1, "{what}: used length {c:?}");
}

/// Publishes the hand-written descriptor `d` as a one-descriptor chain
/// and waits for it.
fn run_raw_head(blk: &mut VhostUserBlk, d: Descriptor) -> Completion {
    let head = blk.alloc_descs(0, 1).unwrap()[0];
    blk.write_desc(0, head, d).unwrap();
    let t = blk.publish_head(0, head, None).unwrap();
    let c = blk
        .wait(0, t, T)
        .expect("completion of a hand-written chain");
    blk.free_descs(0, &[head]).unwrap();
    c
}

/// A valid indirect table for a read of `len` bytes at sector 0:
/// (table address, entries, status address).
fn read_table(blk: &mut VhostUserBlk, len: u32) -> (u64, u32, u64) {
    let hdr = blk.alloc_with(&RequestSpec::read(0, len).header()).unwrap();
    let data = blk.alloc(len as u64).unwrap();
    let status = blk.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let descs = [
        Descriptor::new(hdr, 16, VRING_DESC_F_NEXT, 1),
        Descriptor::new(data, len, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        Descriptor::new(status, 1, VRING_DESC_F_WRITE, 0),
    ];
    (blk.alloc_table(&descs).unwrap(), 3, status)
}

// ===================== positive control =====================

#[test]
fn well_formed_requests_work() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let cfg = blk.cached_config().cloned().expect("config space");
    assert_eq!(cfg.capacity_bytes(), D_SIZE);
    assert_eq!(cfg.num_queues, QUEUES);
    assert_eq!(&blk.get_id(0).unwrap()[..2], b"d\0");
    // Many requests in flight on both queues at once.
    let mut tokens = Vec::new();
    for i in 0..32u64 {
        let q = (i % 2) as u16;
        let t = blk
            .submit(q, &RequestSpec::write(i * 8, &pattern(i, 4096)))
            .unwrap();
        tokens.push((q, t));
    }
    for (q, t) in tokens {
        assert!(blk.wait(q, t, T).unwrap().is_ok());
    }
    let reads: Vec<(u64, Token)> = (0..32u64)
        .map(|i| (i, blk.submit(0, &RequestSpec::read(i * 8, 4096)).unwrap()))
        .collect();
    for (i, t) in reads {
        let c = blk.wait(0, t, T).unwrap();
        assert!(c.is_ok());
        assert_eq!(c.used_len, 4097);
        assert!(c.data == pattern(i, 4096), "read {i}");
    }
    blk.flush(1).unwrap();
    blk.write_zeroes(0, 0, 8, false).unwrap();
    assert_eq!(blk.read(0, 0, 4096).unwrap(), vec![0; 4096]);
    blk.discard(1, 8, 8).unwrap();
    // An indirect chain, and a header split over two descriptors.
    let data = pattern(7, 8192);
    let c = blk
        .run_chain(0, &RequestSpec::write(256, &data).chain().indirect())
        .unwrap();
    assert_status(&c, S_OK, "indirect write");
    let h = RequestSpec::read(256, 8192).header();
    let split = Chain::new()
        .part(Part::readable(&h[..8]))
        .part(Part::readable(&h[8..]))
        .part(Part::writable(8192))
        .part(Part::status());
    let c = blk.run_chain(0, &split).unwrap();
    assert!(c.is_ok(), "{c:?}");
    assert!(c.data == data);
    fx.assert_healthy(&mut blk, "well-formed requests");
    // The same with EVENT_IDX: interrupts only where the driver asks.
    drop(blk);
    let mut blk = VhostUserBlk::connect(&fx.d, opts().event_idx(true)).unwrap();
    assert!(blk.has_feature(29), "EVENT_IDX not negotiated");
    // Sectors 16.. still hold the patterns written above.
    let tokens: Vec<(u64, Token)> = (2..32u64)
        .map(|i| (i, blk.submit(1, &RequestSpec::read(i * 8, 4096)).unwrap()))
        .collect();
    for (i, t) in tokens {
        let c = blk.wait(1, t, T).unwrap();
        assert!(c.is_ok() && c.data == pattern(i, 4096), "read {i}: {c:?}");
    }
    fx.assert_healthy(&mut blk, "well-formed requests with EVENT_IDX");
}

#[test]
fn reconnect_keeps_guest_memory_and_rings() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    blk.write(0, 0, &pattern(1, 4096)).unwrap();
    let tokens: Vec<Token> = (0..16)
        .map(|i| blk.submit(1, &RequestSpec::read(i * 8, 4096)).unwrap())
        .collect();
    blk.reconnect().unwrap();
    // Requests in flight at the disconnect complete (drained by the
    // frontend, or seen again from the used index on).
    for t in tokens {
        blk.wait(1, t, T).unwrap();
    }
    assert_eq!(blk.read(0, 0, 4096).unwrap(), pattern(1, 4096));
    fx.assert_healthy(&mut blk, "a reconnection");
}

// ===================== request-level damage =====================

#[test]
fn unknown_request_types_are_unsupported() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    // Unknown, GET_LIFETIME, secure erase, zoned (ZONED not negotiated:
    // append, report, reset-all), garbage.
    for t in [0x77, 10, 14, 15, 16, 26, u32::MAX] {
        let c = blk.run(0, &RequestSpec::new(t, 0)).unwrap();
        assert_status(&c, S_UNSUPP, &format!("type {t:#x}"));
    }
    fx.logged("status 2");
    fx.assert_healthy(&mut blk, "unknown request types");
}

#[test]
fn sectors_past_capacity_or_overflowing_are_ioerr() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let cap = D_SIZE / SECTOR;
    let cases: Vec<(&str, RequestSpec)> = vec![
        ("read at capacity", RequestSpec::read(cap, 512)),
        ("read straddling the end", RequestSpec::read(cap - 1, 1024)),
        ("write at capacity", RequestSpec::write(cap, &[1; 512])),
        ("write straddling", RequestSpec::write(cap - 1, &[1; 1024])),
        ("read at u64::MAX", RequestSpec::read(u64::MAX, 512)),
        (
            "sector × 512 overflows",
            RequestSpec::read(u64::MAX / 512 + 1, 512),
        ),
        (
            "offset + len overflows",
            RequestSpec::read(u64::MAX / 512, 4096),
        ),
        ("write at u64::MAX", RequestSpec::write(u64::MAX, &[1; 512])),
        ("misaligned read length", RequestSpec::read(0, 100)),
        ("misaligned write length", RequestSpec::write(0, &[1; 513])),
    ];
    for (what, spec) in cases {
        let c = blk.run(0, &spec).unwrap();
        assert_status(&c, S_IOERR, what);
    }
    fx.logged("status 1");
    fx.assert_healthy(&mut blk, "out-of-range sectors");
}

#[test]
fn bad_discard_and_write_zeroes_ranges_are_refused() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let cap = D_SIZE / SECTOR;
    let range = |t: u32, s: u64, n: u32, f: u32| RequestSpec {
        out: request::range_segment(s, n, f).to_vec(),
        ..RequestSpec::new(t, 0)
    };
    let cases: Vec<(&str, RequestSpec, u8)> = vec![
        (
            "discard past capacity",
            RequestSpec::discard(cap, 8),
            S_IOERR,
        ),
        (
            "discard straddling",
            RequestSpec::discard(cap - 4, 8),
            S_IOERR,
        ),
        ("discard of 0 sectors", RequestSpec::discard(0, 0), S_IOERR),
        (
            "discard at u64::MAX",
            RequestSpec::discard(u64::MAX, 8),
            S_IOERR,
        ),
        (
            "write-zeroes at u64::MAX / 512",
            RequestSpec::write_zeroes(u64::MAX / 512, 8, true),
            S_IOERR,
        ),
        (
            "write-zeroes past capacity",
            RequestSpec::write_zeroes(cap, 1, false),
            S_IOERR,
        ),
        (
            "discard with the unmap flag",
            range(T_DISCARD, 0, 8, WRITE_ZEROES_UNMAP),
            S_UNSUPP,
        ),
        (
            "write-zeroes with unknown flags",
            range(T_WRITE_ZEROES, 0, 8, 0x80),
            S_UNSUPP,
        ),
        (
            "two ranges (max_discard_seg is 1)",
            RequestSpec {
                out: [
                    request::range_segment(0, 8, 0),
                    request::range_segment(64, 8, 0),
                ]
                .concat(),
                ..RequestSpec::new(T_DISCARD, 0)
            },
            S_IOERR,
        ),
        (
            "half a range",
            RequestSpec {
                out: vec![0; 8],
                ..RequestSpec::new(T_WRITE_ZEROES, 0)
            },
            S_IOERR,
        ),
        ("no range at all", RequestSpec::new(T_DISCARD, 0), S_IOERR),
    ];
    for (what, spec, st) in cases {
        let c = blk.run(0, &spec).unwrap();
        assert_status(&c, st, what);
    }
    fx.assert_healthy(&mut blk, "bad discard / write-zeroes ranges");
}

#[test]
fn data_descriptors_outside_guest_memory_are_ioerr() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let end = blk.mem_size();
    let bad: Vec<(&str, u64, u32)> = vec![
        ("just past the end", end, 512),
        ("crossing the end", end - 256, 512),
        ("far away", 1 << 40, 4096),
        ("at the top of the address space", u64::MAX - 511, 512),
        ("wrapping around", u64::MAX - 255, 512),
        ("huge length", 0x10_0000, 0xffff_fe00),
    ];
    for (what, addr, len) in bad {
        let read = RequestSpec::read(0, len)
            .chain()
            .map_part(1, |_| Part::at(addr, len, true));
        let c = blk.run_chain(0, &read).unwrap();
        assert_status(&c, S_IOERR, &format!("read into {what}"));
        let write = RequestSpec::write(0, &[0; 512])
            .chain()
            .map_part(1, |_| Part::at(addr, len, false));
        let c = blk.run_chain(1, &write).unwrap();
        assert_status(&c, S_IOERR, &format!("write from {what}"));
    }
    // GET_ID's buffer outside memory.
    let c = blk
        .run_chain(
            0,
            &RequestSpec::get_id()
                .chain()
                .map_part(1, |_| Part::at(end, 20, true)),
        )
        .unwrap();
    assert_status(&c, S_IOERR, "GET_ID into nowhere");
    fx.assert_healthy(&mut blk, "data outside guest memory");
}

#[test]
fn damaged_headers_are_ioerr() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let end = blk.mem_size();
    let h = RequestSpec::read(0, 512).header();
    let cases: Vec<(&str, Chain)> = vec![
        (
            "an 8-byte header",
            Chain::new()
                .part(Part::readable(&h[..8]))
                .part(Part::writable(512))
                .part(Part::status()),
        ),
        (
            "a header outside guest memory",
            RequestSpec::read(0, 512)
                .chain()
                .map_part(0, |_| Part::at(end + 4096, 16, false)),
        ),
        (
            "a header crossing the end of guest memory",
            RequestSpec::read(0, 512)
                .chain()
                .map_part(0, |_| Part::at(end - 8, 16, false)),
        ),
        (
            "a device-writable header",
            RequestSpec::read(0, 512)
                .chain()
                .map_part(0, |p| p.with_writable(true)),
        ),
        (
            "no header, only a status",
            Chain::new().part(Part::status()),
        ),
    ];
    for (what, chain) in cases {
        let c = blk.run_chain(0, &chain).unwrap();
        assert_status(&c, S_IOERR, what);
    }
    fx.assert_healthy(&mut blk, "damaged headers");
}

#[test]
fn chains_without_a_writable_status_come_back_unused() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let cases: Vec<(&str, Chain)> = vec![
        (
            "a device-readable status",
            RequestSpec::read(0, 512)
                .chain()
                .map_part(2, |p| p.with_writable(false)),
        ),
        (
            "a zero-length status",
            RequestSpec::read(0, 512)
                .chain()
                .map_part(2, |_| Part::writable(0)),
        ),
        (
            "a readable descriptor after a writable one",
            Chain::new()
                .part(Part::readable(&RequestSpec::write(0, &[]).header()))
                .part(Part::writable(512))
                .part(Part::readable(&[7; 512]))
                .part(Part::status()),
        ),
        (
            "a header only, device-readable",
            Chain::new().part(Part::readable(&RequestSpec::flush().header())),
        ),
    ];
    for (what, chain) in cases {
        let c = blk.run_chain(0, &chain).unwrap();
        assert_unused(&c, what);
    }
    fx.logged("no writable status byte");
    fx.logged("readable descriptor after a writable one");
    // A status byte outside guest memory: the request is answered (the
    // used element comes back), the status cannot be written.
    let end = blk.mem_size();
    let c = blk
        .run_chain(
            0,
            &RequestSpec::read(0, 512)
                .chain()
                .map_part(2, |_| Part::at(end + 100, 1, true)),
        )
        .unwrap();
    eprintln!("status byte outside guest memory: {c:?}");
    assert_eq!(c.status, None);
    fx.assert_healthy(&mut blk, "chains without a usable status");
}

#[test]
fn looping_and_dangling_chains_come_back_unused() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let read = RequestSpec::read(0, 512).chain();
    let cases: Vec<(&str, Chain)> = vec![
        (
            "the last descriptor back to the first",
            read.clone().looped(),
        ),
        (
            "a descriptor pointing at itself",
            read.clone().link(1, Target::Part(1)),
        ),
        (
            "next past the descriptor table",
            read.clone().link(1, Target::Index(QSIZE + 10)),
        ),
        (
            "next = 0xffff",
            read.clone().link(2, Target::Index(u16::MAX)),
        ),
        (
            "lengths adding up past 4 GiB",
            Chain::new()
                .part(Part::readable(&RequestSpec::write(0, &[]).header()))
                .part(Part::at(0x10_0000, 0xffff_0000, false))
                .part(Part::at(0x10_0000, 0xffff_0000, false))
                .part(Part::status()),
        ),
    ];
    for (what, chain) in cases {
        let c = blk.run_chain(0, &chain).unwrap();
        assert_unused(&c, what);
    }
    fx.logged("descriptor chain cut short");
    fx.assert_healthy(&mut blk, "looping and dangling chains");
}

#[test]
fn over_long_chains_are_ioerr() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let seg_max = blk.cached_config().unwrap().seg_max;
    // More data descriptors than the frontend takes (seg_max, and its
    // ring's 128 segments).
    let mut chain = Chain::new().part(Part::readable(&RequestSpec::read(0, 0).header()));
    for _ in 0..(seg_max + 10) {
        chain = chain.part(Part::writable(512));
    }
    let chain = chain.part(Part::status());
    let c = blk.run_chain(0, &chain).unwrap();
    assert_status(&c, S_IOERR, "a direct chain over seg_max");
    let c = blk.run_chain(1, &chain.clone().indirect()).unwrap();
    assert_status(&c, S_IOERR, "an indirect chain over seg_max");
    // An indirect table longer than the queue.
    let mut long = Chain::new()
        .part(Part::readable(&RequestSpec::read(0, 0).header()))
        .indirect();
    for _ in 0..(QSIZE as u32 + 100) {
        long = long.part(Part::writable(512));
    }
    let c = blk.run_chain(0, &long.part(Part::status())).unwrap();
    eprintln!("an indirect table longer than the queue: {c:?}");
    assert!(
        c.status == Some(S_IOERR) || c.used_len == 0,
        "an indirect table longer than the queue: {c:?}"
    );
    fx.assert_healthy(&mut blk, "over-long chains");
}

#[test]
fn damaged_indirect_tables_are_refused() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let end = blk.mem_size();
    let ind = VRING_DESC_F_INDIRECT;
    // The table outside guest memory, crossing its end, of a length that
    // is not a multiple of 16, empty, or claiming 65536 entries.
    let (table, n, _) = read_table(&mut blk, 512);
    let cases = [
        (
            "a table outside guest memory",
            Descriptor::new(end + 4096, 48, ind, 0),
        ),
        (
            "a table crossing the end",
            Descriptor::new(end - 16, 48, ind, 0),
        ),
        ("a table of 40 bytes", Descriptor::new(table, 40, ind, 0)),
        ("an empty table", Descriptor::new(table, 0, ind, 0)),
        (
            "a table of 65536 entries",
            Descriptor::new(table, 16 << 16, ind, 0),
        ),
    ];
    for (what, d) in cases {
        let c = run_raw_head(&mut blk, d);
        assert_eq!(c.used_len, 0, "{what}: {c:?}");
    }
    fx.logged("empty or unreadable descriptor chain");
    // A loop inside the table.
    let c = blk
        .run_chain(0, &RequestSpec::read(0, 512).chain().indirect().looped())
        .unwrap();
    assert_unused(&c, "a loop inside an indirect table");
    // A nested indirect descriptor inside the table.
    let nested = RequestSpec::read(0, 512)
        .chain()
        .map_part(1, |_| Part::at(table, 16 * n, false).with_flags(ind))
        .indirect();
    let c = blk.run_chain(0, &nested).unwrap();
    assert_unused(&c, "a nested indirect table");
    // INDIRECT together with NEXT, or WRITE, on the ring descriptor: the
    // frontend may follow the table or refuse, but must answer.
    for (what, flags) in [
        ("INDIRECT | NEXT", ind | VRING_DESC_F_NEXT),
        ("INDIRECT | WRITE", ind | VRING_DESC_F_WRITE),
    ] {
        let (table, n, _) = read_table(&mut blk, 512);
        let c = run_raw_head(&mut blk, Descriptor::new(table, 16 * n, flags, 0));
        assert!(c.token.is_some(), "{what}: {c:?}");
    }
    fx.assert_healthy(&mut blk, "damaged indirect tables");
}

#[test]
fn heads_past_the_queue_are_dropped() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    for head in [QSIZE, QSIZE + 1, u16::MAX] {
        blk.publish_head(0, head, None).unwrap();
        // There is no descriptor to answer with: nothing comes back.
        let got = blk.wait_used(0, QUIET).unwrap();
        assert!(got.is_empty(), "head {head}: {got:?}");
    }
    fx.logged("empty or unreadable descriptor chain");
    fx.assert_healthy(&mut blk, "heads past the queue");
}

#[test]
fn a_head_made_available_twice_is_answered_once() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let (table, n, status) = read_table(&mut blk, 4096);
    let head = blk.alloc_descs(0, 1).unwrap()[0];
    blk.write_desc(
        0,
        head,
        Descriptor::new(table, 16 * n, VRING_DESC_F_INDIRECT, 0),
    )
    .unwrap();
    // Both reach the device with one index update.
    let t = blk.push_avail(0, head, Some(status)).unwrap();
    blk.push_avail(0, head, Some(status)).unwrap();
    blk.restore_avail_idx(0).unwrap();
    let c = blk.wait(0, t, T).unwrap();
    assert!(c.is_ok(), "{c:?}");
    // The second copy was refused while the first was in flight, or (if
    // the frontend took them in two rounds) answered as a new request.
    let more = blk.wait_used(0, QUIET).unwrap();
    eprintln!("used elements for the second copy: {more:?}");
    assert!(more.len() <= 1, "{more:?}");
    blk.free_descs(0, &[head]).unwrap();
    fx.assert_healthy(&mut blk, "a head made available twice");
}

/// CPU time (user + system, clock ticks) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    at(11) + at(12)
}

/// Sets the avail index to `idx` for 0.6 s and reports the frontend's CPU
/// use in the last 0.5 s (clock ticks, 100 per second); fails if the
/// frontend flooded its log meanwhile.
fn bogus_avail_idx(fx: &mut Fx, blk: &mut VhostUserBlk, idx: u16) -> u64 {
    let pid = fx.cluster.frontend_pid().expect("frontend running");
    blk.set_avail_idx(0, idx).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(pid) - before;
    let got = blk.poll_used(0).unwrap();
    assert!(got.is_empty(), "avail idx {idx}: {got:?}");
    blk.restore_avail_idx(0).unwrap();
    let log = fx.log("frontend");
    let lines = log.lines().count();
    eprintln!(
        "frontend log: {lines} lines, {} bytes; first lines after the damage:\n{}",
        log.len(),
        log.lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        lines < 1000,
        "the frontend logged {lines} lines for one bogus avail index"
    );
    used
}

#[test]
fn avail_index_far_ahead_is_ignored_until_fixed() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    blk.write(0, 0, &[1; 512]).unwrap();
    let now = blk.avail_idx(0).unwrap();
    let ticks = bogus_avail_idx(&mut fx, &mut blk, now.wrapping_add(QSIZE + 1));
    eprintln!("frontend CPU with the avail index far ahead: {ticks} ticks in 0.5 s");
    fx.assert_healthy(&mut blk, "an avail index more than a queue ahead");
    assert!(
        ticks < 20,
        "the frontend burnt {ticks} ticks (of 50) in 0.5 s on a bogus avail index"
    );
}

#[test]
fn avail_index_moved_backwards_is_ignored_until_fixed() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    for i in 0..10 {
        blk.write(0, i * 8, &[2; 4096]).unwrap();
    }
    let now = blk.avail_idx(0).unwrap();
    let ticks = bogus_avail_idx(&mut fx, &mut blk, now.wrapping_sub(5));
    eprintln!("frontend CPU with the avail index moved back: {ticks} ticks in 0.5 s");
    fx.assert_healthy(&mut blk, "an avail index moved backwards");
    assert!(
        ticks < 20,
        "the frontend burnt {ticks} ticks (of 50) in 0.5 s on a bogus avail index"
    );
}

// ===================== vhost-user message damage =====================

/// Sends `msg` on a connected driver and checks the frontend refused it
/// (non-zero ack, or the connection closed).
fn expect_refused(fx: &mut Fx, blk: &mut VhostUserBlk, msg: &RawMessage, what: &str) -> RawOutcome {
    let out = blk.raw_request(msg).expect("send");
    eprintln!("{what}: {}", describe(&out));
    assert!(out.refused(), "{what} was accepted: {out:?}");
    fx.assert_alive(what);
    out
}

/// How the frontend took a message, for the test output.
fn describe(out: &RawOutcome) -> String {
    let reply = match (&out.reply, out.is_ack) {
        (None, _) => "no reply".to_string(),
        (Some(r), true) => format!("ack {:?}", r.ack()),
        (Some(r), false) => format!("answer of {} bytes", r.payload.len()),
    };
    format!(
        "{reply}, connection {}",
        if out.closed { "closed" } else { "open" }
    )
}

/// A fresh memfd of `size` bytes (a multiple of 4096).
fn memfd(size: u64) -> GuestRam {
    GuestRam::new(size).unwrap()
}

#[test]
fn bad_memory_tables_are_refused() {
    let mut fx = fixture();
    let extra = memfd(MIB);
    let pipe = nix::unistd::pipe().unwrap();
    let read_only = File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&extra.fd())
    ))
    .unwrap();
    type Build = Box<dyn Fn(&VhostUserBlk) -> RawMessage>;
    let cases: Vec<(&str, Build)> = vec![
        (
            "overlapping regions",
            Box::new(|b: &VhostUserBlk| {
                let r = b.mem_region();
                let r2 = MemRegion {
                    gpa: r.size / 2,
                    user_addr: r.user_addr + (1 << 32),
                    ..r
                };
                RawMessage::mem_table(&[r, r2], &[&b.guest_ram().fd(), &b.guest_ram().fd()])
                    .unwrap()
            }),
        ),
        (
            "a zero-size region",
            Box::new(|b: &VhostUserBlk| {
                let r = MemRegion {
                    size: 0,
                    ..b.mem_region()
                };
                RawMessage::mem_table(&[r], &[&b.guest_ram().fd()]).unwrap()
            }),
        ),
        (
            "a region whose guest address range overflows",
            Box::new(|b: &VhostUserBlk| {
                let r = MemRegion {
                    gpa: u64::MAX - 4095,
                    ..b.mem_region()
                };
                RawMessage::mem_table(&[r], &[&b.guest_ram().fd()]).unwrap()
            }),
        ),
        (
            "a region whose VMM address range overflows",
            Box::new(|b: &VhostUserBlk| {
                let r = MemRegion {
                    user_addr: u64::MAX - 4095,
                    ..b.mem_region()
                };
                RawMessage::mem_table(&[r], &[&b.guest_ram().fd()]).unwrap()
            }),
        ),
        (
            "an fd offset that overflows",
            Box::new(|b: &VhostUserBlk| {
                let r = MemRegion {
                    mmap_offset: u64::MAX - 4095,
                    ..b.mem_region()
                };
                RawMessage::mem_table(&[r], &[&b.guest_ram().fd()]).unwrap()
            }),
        ),
        (
            "two regions, one fd",
            Box::new(|b: &VhostUserBlk| {
                let r = b.mem_region();
                let r2 = MemRegion {
                    gpa: 1 << 40,
                    user_addr: r.user_addr + (1 << 40),
                    ..r
                };
                RawMessage::mem_table(&[r, r2], &[&b.guest_ram().fd()]).unwrap()
            }),
        ),
        (
            "a count of 3 with one region",
            Box::new(|b: &VhostUserBlk| {
                RawMessage::mem_table_counted(3, &[b.mem_region()], &[&b.guest_ram().fd()]).unwrap()
            }),
        ),
        (
            "a count of 1000",
            Box::new(|b: &VhostUserBlk| {
                RawMessage::mem_table_counted(1000, &[b.mem_region()], &[&b.guest_ram().fd()])
                    .unwrap()
            }),
        ),
        (
            "a region without an fd",
            Box::new(|b: &VhostUserBlk| RawMessage::mem_table(&[b.mem_region()], &[]).unwrap()),
        ),
        (
            "a region backed by a pipe",
            Box::new(move |b: &VhostUserBlk| {
                let r = MemRegion {
                    size: 4096,
                    ..b.mem_region()
                };
                RawMessage::mem_table(&[r], &[&pipe.0.as_fd()]).unwrap()
            }),
        ),
        (
            "a region backed by a read-only fd",
            Box::new(move |b: &VhostUserBlk| {
                let r = MemRegion {
                    size: MIB,
                    ..b.mem_region()
                };
                RawMessage::mem_table(&[r], &[&read_only.as_fd()]).unwrap()
            }),
        ),
        (
            "33 regions (more fds than a message may carry)",
            Box::new(|b: &VhostUserBlk| {
                let r = b.mem_region();
                let regions: Vec<MemRegion> = (0..33)
                    .map(|i| MemRegion {
                        gpa: i << 40,
                        user_addr: r.user_addr + (i << 40),
                        ..r
                    })
                    .collect();
                let fd = b.guest_ram().fd();
                let fds: Vec<&dyn AsFd> = (0..33).map(|_| &fd as &dyn AsFd).collect();
                RawMessage::mem_table(&regions, &fds).unwrap()
            }),
        ),
    ];
    for (what, build) in cases {
        let mut blk = fx.connect();
        let msg = build(&blk);
        expect_refused(&mut fx, &mut blk, &msg, what);
        drop(blk);
        fx.assert_healthy_after_reconnect(what);
    }
}

#[test]
fn a_memory_table_past_the_end_of_its_fd_is_refused_before_any_ring() {
    let mut fx = fixture();
    let mut c = fx.raw();
    let ram = GuestRam::new(MIB).unwrap();
    for (what, region) in [
        (
            "offset at the end of the fd",
            MemRegion {
                gpa: 0,
                size: MIB,
                user_addr: ram.user_addr(0),
                mmap_offset: MIB,
            },
        ),
        (
            "size past the end of the fd",
            MemRegion {
                gpa: 0,
                size: 64 * MIB,
                user_addr: ram.user_addr(0),
                mmap_offset: 0,
            },
        ),
    ] {
        let out = c
            .request(&RawMessage::mem_table(&[region], &[&ram.fd()]).unwrap())
            .unwrap();
        eprintln!("{what}: {}", describe(&out));
        assert!(out.refused(), "{what} accepted: {out:?}");
        fx.assert_alive(what);
        c = fx.raw();
    }
    drop(c);
    fx.assert_healthy_after_reconnect("memory tables past the end of their fd");
}

#[test]
fn a_memory_table_past_the_end_of_its_fd_under_running_rings_is_refused() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    blk.write(0, 0, &[3; 4096]).unwrap();
    // The same guest addresses, now backed by a 4 KiB memfd mapped for
    // the whole size: every ring lies past the end of the file.
    let small = memfd(4096);
    let r = MemRegion {
        mmap_offset: 0,
        ..blk.mem_region()
    };
    let msg = RawMessage::mem_table(&[r], &[&small.fd()]).unwrap();
    expect_refused(
        &mut fx,
        &mut blk,
        &msg,
        "a too-small fd under running rings",
    );
    // Give the queue threads time to touch the rings.
    let _ = blk.kick(0);
    std::thread::sleep(QUIET);
    fx.assert_alive("a too-small fd under running rings");
    drop(blk);
    fx.assert_healthy_after_reconnect("a memory table past the end of its fd");
}

#[test]
fn an_empty_memory_table_under_running_rings_does_not_crash() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let out = blk
        .raw_request(&RawMessage::mem_table(&[], &[]).unwrap())
        .unwrap();
    eprintln!("an empty memory table: {}", describe(&out));
    // Accepting it is allowed (memory unplugged); the queues then find no
    // memory for the rings. Requests may not complete meanwhile.
    let t = blk.submit(0, &RequestSpec::read(0, 512)).unwrap();
    std::thread::sleep(QUIET);
    fx.assert_alive("an empty memory table");
    if !out.refused() {
        // Plugging the memory back in revives the queues.
        let good = RawMessage::mem_table(&[blk.mem_region()], &[&blk.guest_ram().fd()]).unwrap();
        let back = blk.raw_request(&good).unwrap();
        if !back.refused() {
            blk.wait(0, t, T).unwrap();
            fx.assert_healthy(&mut blk, "an empty memory table, then the old one");
        }
    }
    drop(blk);
    fx.assert_healthy_after_reconnect("an empty memory table");
}

#[test]
fn removing_the_rings_memory_region_does_not_crash() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    assert!(blk
        .protocol_features()
        .contains(ProtocolFeatures::CONFIGURE_MEM_SLOTS));
    let r = blk.mem_region();
    let out = blk
        .raw_request(&RawMessage::mem_region(req::REM_MEM_REG, &r, None).unwrap())
        .unwrap();
    eprintln!("REM_MEM_REG of the rings' region: {}", describe(&out));
    let t = blk.submit(0, &RequestSpec::read(0, 512)).unwrap();
    std::thread::sleep(QUIET);
    fx.assert_alive("REM_MEM_REG of the rings' region");
    if !out.refused() {
        let fd = blk.guest_ram().fd().try_clone_to_owned().unwrap();
        let back = blk
            .raw_request(&RawMessage::mem_region(req::ADD_MEM_REG, &r, Some(&fd)).unwrap())
            .unwrap();
        assert!(!back.refused(), "re-adding the region: {back:?}");
        blk.wait(0, t, T).unwrap();
        fx.assert_healthy(&mut blk, "the rings' region removed and re-added");
    }
    // Removing a region that is not there.
    let missing = MemRegion { gpa: 1 << 40, ..r };
    expect_refused(
        &mut fx,
        &mut blk,
        &RawMessage::mem_region(req::REM_MEM_REG, &missing, None).unwrap(),
        "REM_MEM_REG of a region that is not there",
    );
    drop(blk);
    let mut blk = fx.connect();
    // Adding a region overlapping the existing one.
    let fd = blk.guest_ram().fd().try_clone_to_owned().unwrap();
    let overlap = MemRegion {
        gpa: r.size / 2,
        user_addr: r.user_addr + (1 << 40),
        ..r
    };
    expect_refused(
        &mut fx,
        &mut blk,
        &RawMessage::mem_region(req::ADD_MEM_REG, &overlap, Some(&fd)).unwrap(),
        "ADD_MEM_REG overlapping",
    );
    drop(blk);
    fx.assert_healthy_after_reconnect("memory region changes");
}

#[test]
fn vring_messages_for_queues_that_do_not_exist_are_refused() {
    let mut fx = fixture();
    let ev = nix::sys::eventfd::EventFd::new().unwrap();
    for index in [QUEUES as u32, 63, 255, 0xffff, u32::MAX] {
        let i8 = (index & 0xff) as u64;
        type Build<'a> = Box<dyn Fn(&VhostUserBlk) -> RawMessage + 'a>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "SET_VRING_NUM",
                Box::new(|_| RawMessage::vring_state(req::SET_VRING_NUM, index, 128)),
            ),
            (
                "SET_VRING_BASE",
                Box::new(|_| RawMessage::vring_state(req::SET_VRING_BASE, index, 0)),
            ),
            (
                "SET_VRING_ENABLE",
                Box::new(|_| RawMessage::vring_state(req::SET_VRING_ENABLE, index, 1)),
            ),
            (
                "GET_VRING_BASE",
                Box::new(|_| RawMessage::vring_state(req::GET_VRING_BASE, index, 0)),
            ),
            (
                "SET_VRING_ADDR",
                Box::new(|b: &VhostUserBlk| {
                    let l = b.ring_layout(0).unwrap();
                    RawMessage::vring_addr(
                        index,
                        0,
                        b.user_addr(l.desc),
                        b.user_addr(l.used),
                        b.user_addr(l.avail),
                        0,
                    )
                }),
            ),
            (
                "SET_VRING_KICK",
                Box::new(|_| RawMessage::vring_fd(req::SET_VRING_KICK, i8, Some(&ev)).unwrap()),
            ),
            (
                "SET_VRING_CALL",
                Box::new(|_| RawMessage::vring_fd(req::SET_VRING_CALL, i8, Some(&ev)).unwrap()),
            ),
            (
                "SET_VRING_ERR",
                Box::new(|_| RawMessage::vring_fd(req::SET_VRING_ERR, i8, Some(&ev)).unwrap()),
            ),
        ];
        for (name, build) in cases {
            if matches!(name, "SET_VRING_KICK" | "SET_VRING_CALL" | "SET_VRING_ERR") && index > 0xff
            {
                // Their payload holds only 8 bits of index.
                continue;
            }
            let what = format!("{name} for queue {index}");
            let mut blk = fx.connect();
            let msg = build(&blk);
            expect_refused(&mut fx, &mut blk, &msg, &what);
        }
    }
    fx.assert_healthy_after_reconnect("vring messages for missing queues");
}

#[test]
fn bad_vring_sizes_bases_and_fds_are_refused() {
    let mut fx = fixture();
    let pipe = nix::unistd::pipe().unwrap();
    let cases: Vec<(&str, RawMessage)> = vec![
        ("size 0", RawMessage::vring_state(req::SET_VRING_NUM, 0, 0)),
        ("size 3", RawMessage::vring_state(req::SET_VRING_NUM, 0, 3)),
        (
            "size 65535",
            RawMessage::vring_state(req::SET_VRING_NUM, 0, 0xffff),
        ),
        (
            "size 2^31",
            RawMessage::vring_state(req::SET_VRING_NUM, 0, 1 << 31),
        ),
        (
            "size 2048",
            RawMessage::vring_state(req::SET_VRING_NUM, 0, 2048),
        ),
        (
            "SET_VRING_BASE on a running queue",
            RawMessage::vring_state(req::SET_VRING_BASE, 0, 7),
        ),
        (
            "SET_VRING_KICK claiming an fd, sending none",
            RawMessage::u64(req::SET_VRING_KICK, 0),
        ),
        (
            "SET_VRING_CALL saying no fd, sending one",
            RawMessage::vring_fd(req::SET_VRING_CALL, VRING_NOFD_MASK, Some(&pipe.1)).unwrap(),
        ),
        (
            "SET_VRING_KICK with two fds",
            RawMessage::vring_fd(req::SET_VRING_KICK, 0, Some(&pipe.0))
                .unwrap()
                .fd(&pipe.1)
                .unwrap(),
        ),
    ];
    for (what, msg) in cases {
        let mut blk = fx.connect();
        expect_refused(&mut fx, &mut blk, &msg, what);
        drop(blk);
        fx.assert_healthy_after_reconnect(what);
    }
}

#[test]
fn vring_fds_that_are_not_eventfds_do_not_crash() {
    let mut fx = fixture();
    let regular = memfd(4096);
    let regular = regular.fd();
    let dir = File::open("/").unwrap();
    let ev = nix::sys::eventfd::EventFd::new().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let cases: [(&str, &dyn AsFd, &dyn AsFd); 4] = [
        ("a memfd as kick", &regular, &ev),
        ("a directory as kick", &dir, &ev),
        ("a memfd as call", &ev, &regular),
        ("a pipe's ends as kick and call", &r, &w),
    ];
    for (what, kick, call) in cases {
        let mut blk = fx.connect();
        // Stop queue 0, hand it the odd fds, start it again.
        let _ = blk.raw_request(&RawMessage::vring_state(req::GET_VRING_BASE, 0, 0));
        let _ = blk.raw_request(&RawMessage::vring_fd(req::SET_VRING_KICK, 0, Some(kick)).unwrap());
        let _ = blk.raw_request(&RawMessage::vring_fd(req::SET_VRING_CALL, 0, Some(call)).unwrap());
        let _ = blk.raw_request(&RawMessage::vring_state(req::SET_VRING_ENABLE, 0, 1));
        let t = blk.submit(0, &RequestSpec::read(0, 512)).unwrap();
        let done = blk.wait(0, t, QUIET);
        eprintln!("{what}: a request on that queue: {done:?}");
        fx.assert_alive(what);
        drop(blk);
        fx.assert_healthy_after_reconnect(what);
    }
}

#[test]
fn vring_addresses_outside_memory_are_refused() {
    let mut fx = fixture();
    let ram = GuestRam::new(MIB).unwrap();
    let region = MemRegion {
        gpa: 0,
        size: MIB,
        user_addr: ram.user_addr(0),
        mmap_offset: 0,
    };
    let ua = |gpa: u64| ram.user_addr(gpa);
    let l = RingLayout::at(0x1000, QSIZE).unwrap();
    // (what, [desc, used, avail], must be refused)
    let cases: Vec<(&str, [u64; 3], bool)> = vec![
        (
            "a descriptor table outside memory",
            [ua(2 * MIB), ua(l.used), ua(l.avail)],
            true,
        ),
        (
            "a used ring outside memory",
            [ua(l.desc), 0x10, ua(l.avail)],
            true,
        ),
        (
            "an avail ring outside memory",
            [ua(l.desc), ua(l.used), u64::MAX],
            true,
        ),
        (
            "a descriptor table crossing the end",
            [ua(MIB - 16), ua(l.used), ua(l.avail)],
            true,
        ),
        (
            "a used ring crossing the end",
            [ua(l.desc), ua(MIB - 64), ua(l.avail)],
            true,
        ),
        (
            "misaligned rings",
            [ua(l.desc + 1), ua(l.used + 1), ua(l.avail + 1)],
            true,
        ),
        // Legal, if odd: the frontend may take or refuse it.
        (
            "every ring at guest address 0",
            [ua(0), ua(0), ua(0)],
            false,
        ),
    ];
    for (what, [desc, used, avail], must_refuse) in cases {
        let mut c = fx.raw();
        let out = c
            .request(&RawMessage::mem_table(&[region], &[&ram.fd()]).unwrap())
            .unwrap();
        assert!(!out.refused(), "good table refused: {out:?}");
        let kick = nix::sys::eventfd::EventFd::new().unwrap();
        let call = nix::sys::eventfd::EventFd::new().unwrap();
        let msgs = vec![
            RawMessage::vring_state(req::SET_VRING_NUM, 0, QSIZE as u32),
            RawMessage::vring_state(req::SET_VRING_BASE, 0, 0),
            RawMessage::vring_addr(0, 0, desc, used, avail, 0),
            RawMessage::vring_fd(req::SET_VRING_KICK, 0, Some(&kick)).unwrap(),
            RawMessage::vring_fd(req::SET_VRING_CALL, 0, Some(&call)).unwrap(),
            RawMessage::vring_state(req::SET_VRING_ENABLE, 0, 1),
        ];
        let mut refused = false;
        for m in &msgs {
            let out = c.request(m).unwrap();
            if out.refused() {
                eprintln!("{what}: request {} refused: {}", m.request, describe(&out));
                refused = true;
                break;
            }
        }
        fx.assert_alive(what);
        if !refused {
            eprintln!("{what}: every vring message accepted");
            // Kicking the accepted queue must not hurt.
            kick.write(1).unwrap();
            std::thread::sleep(QUIET);
            fx.assert_alive(what);
            assert!(!must_refuse, "{what}: every vring message accepted");
        }
        drop(c);
        fx.assert_healthy_after_reconnect(what);
    }
}

#[test]
fn vring_messages_before_the_memory_table_are_refused() {
    let mut fx = fixture();
    let mut c = fx.raw();
    let out = c
        .request(&RawMessage::vring_addr(0, 0, 0x1000, 0x3000, 0x2000, 0))
        .unwrap();
    assert!(
        out.refused(),
        "SET_VRING_ADDR before SET_MEM_TABLE: {out:?}"
    );
    fx.assert_alive("SET_VRING_ADDR before SET_MEM_TABLE");
    drop(c);
    fx.assert_healthy_after_reconnect("SET_VRING_ADDR before SET_MEM_TABLE");
}

#[test]
fn malformed_messages_close_the_connection() {
    let mut fx = fixture();
    let ev = nix::sys::eventfd::EventFd::new().unwrap();
    let cases: Vec<(&str, RawMessage)> = vec![
        (
            "a header claiming more payload than sent",
            RawMessage::u64(req::SET_FEATURES, 0).claim_size(40),
        ),
        (
            "a header claiming 4 GiB of payload",
            RawMessage::new(req::SET_VRING_NUM).claim_size(u32::MAX),
        ),
        (
            "a payload of the wrong size",
            RawMessage::new(req::SET_VRING_NUM).payload(&[1, 2, 3]),
        ),
        ("an unknown request", RawMessage::u64(999, 0)),
        ("request 0", RawMessage::new(0)),
        (
            "a reply flag from the front-end",
            RawMessage::new(req::GET_FEATURES).flags(FLAG_VERSION | raw::FLAG_REPLY),
        ),
        ("version 0", RawMessage::new(req::GET_FEATURES).flags(0)),
        (
            "an fd on GET_FEATURES",
            RawMessage::new(req::GET_FEATURES).fd(&ev).unwrap(),
        ),
        (
            "SET_FEATURES with bits not offered",
            RawMessage::u64(req::SET_FEATURES, u64::MAX),
        ),
        (
            "SET_PROTOCOL_FEATURES with bits not offered",
            RawMessage::u64(req::SET_PROTOCOL_FEATURES, u64::MAX),
        ),
        (
            "SET_INFLIGHT_FD (not negotiated)",
            RawMessage::new(req::SET_INFLIGHT_FD)
                .payload(&[0; 24])
                .fd(&ev)
                .unwrap(),
        ),
        ("SET_OWNER twice", RawMessage::new(req::SET_OWNER)),
        (
            "SET_LOG_BASE (LOG_SHMFD not negotiated)",
            RawMessage::new(req::SET_LOG_BASE)
                .payload(&[0; 16])
                .fd(&ev)
                .unwrap(),
        ),
    ];
    for (what, msg) in cases {
        let mut blk = fx.connect();
        let out = blk.raw_request(&msg).unwrap();
        eprintln!("{what}: {}", describe(&out));
        if !out.refused() && out.reply.is_some() {
            // Answered as a request it understood: allowed (e.g. a lenient
            // parse); the connection must still work.
            fx.assert_healthy(&mut blk, what);
        } else {
            assert!(out.refused() || out.closed, "{what}: {out:?}");
        }
        fx.assert_alive(what);
        drop(blk);
        fx.assert_healthy_after_reconnect(what);
    }
}

#[test]
fn truncated_messages_close_the_connection() {
    let mut fx = fixture();
    let whole = RawMessage::vring_addr(0, 0, 1, 2, 3, 4).to_bytes();
    for (what, cut) in [
        ("half a header", 6),
        ("a header without its payload", 12),
        ("half a payload", 32),
    ] {
        let mut blk = fx.connect();
        blk.send_bytes(&whole[..cut], &[]).unwrap();
        blk.shutdown_write().unwrap();
        assert!(blk.wait_closed(T), "{what}: the connection stayed open");
        fx.assert_alive(what);
        drop(blk);
        fx.assert_healthy_after_reconnect(what);
    }
    // A truncated message left hanging (no end of stream) holds only its
    // own connection: the other export keeps working meanwhile.
    let mut blk = fx.connect();
    blk.send_bytes(&whole[..20], &[]).unwrap();
    std::thread::sleep(QUIET);
    fx.assert_alive("a hanging truncated message");
    fx.assert_other_unaffected("a hanging truncated message");
    drop(blk);
    fx.assert_healthy_after_reconnect("a hanging truncated message");
}

#[test]
fn config_reads_past_the_config_space_do_not_crash() {
    let mut fx = fixture();
    // Writing garbage over the config space changes nothing.
    let mut blk = fx.connect();
    let before = blk.config().unwrap();
    let out = blk
        .raw_request(&RawMessage::config(req::SET_CONFIG, 0, 96, &[0xff; 96]))
        .unwrap();
    eprintln!("SET_CONFIG of 96 bytes of 0xff: {}", describe(&out));
    if !out.refused() {
        assert_eq!(blk.config().unwrap(), before);
        fx.assert_healthy(&mut blk, "SET_CONFIG garbage");
    }
    drop(blk);
    for (what, offset, size) in [
        ("past the end", 200, 56),
        ("straddling the end", 64, 200),
        ("the whole vhost-user range", 0, 4096 - 256),
        ("size 0", 0, 0),
        ("offset overflowing", u32::MAX - 4, 16),
    ] {
        let mut blk = fx.connect();
        let msg = RawMessage::config(req::GET_CONFIG, offset, size, &vec![0; size as usize]);
        let out = blk.raw_request(&msg).unwrap();
        eprintln!("GET_CONFIG {what}: {}", describe(&out));
        fx.assert_alive(what);
        if !out.refused() {
            fx.assert_healthy(&mut blk, what);
        }
        drop(blk);
        fx.assert_healthy_after_reconnect(what);
    }
}

#[test]
fn guest_ram_shrunk_under_running_rings_does_not_crash() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    blk.write(0, 0, &[4; 4096]).unwrap();
    // A hostile VMM tries to truncate the memfd behind guest RAM: the
    // frontend sealed it against shrinking when it mapped it.
    let shrunk = blk.guest_ram().file().set_len(0);
    assert!(
        shrunk.is_err(),
        "guest RAM should be sealed against shrinking"
    );
    for q in 0..QUEUES {
        blk.kick(q).unwrap();
    }
    std::thread::sleep(QUIET);
    fx.assert_alive("guest RAM truncated to 0 under running rings");
    blk.disconnect();
    std::mem::forget(blk);
    fx.assert_healthy_after_reconnect("guest RAM truncated under running rings");
}

#[test]
fn adding_regions_past_the_slot_limit_is_refused() {
    let mut fx = fixture();
    let mut blk = fx.connect();
    let slots = blk.max_mem_slots().expect("CONFIGURE_MEM_SLOTS negotiated");
    let extra = memfd(MIB);
    let r0 = blk.mem_region();
    let mut refused_at = None;
    // Region 0 is guest RAM; slots - 1 more fit.
    for i in 1..=slots {
        let r = MemRegion {
            gpa: i << 32,
            size: MIB,
            user_addr: r0.user_addr + (i << 32),
            mmap_offset: 0,
        };
        let msg = RawMessage::mem_region(req::ADD_MEM_REG, &r, Some(&extra.fd())).unwrap();
        let out = blk.raw_request(&msg).unwrap();
        if out.refused() {
            eprintln!(
                "ADD_MEM_REG number {i} of {slots} slots: {}",
                describe(&out)
            );
            refused_at = Some(i);
            break;
        }
    }
    assert_eq!(refused_at, Some(slots), "slots: {slots}");
    fx.assert_alive("ADD_MEM_REG past the slot limit");
    drop(blk);
    fx.assert_healthy_after_reconnect("ADD_MEM_REG past the slot limit");
}

#[test]
fn inflight_tracking_when_offered() {
    let mut fx = fixture();
    let mut blk = VhostUserBlk::connect(&fx.d, opts().inflight(true)).unwrap();
    assert!(
        blk.offered_protocol_features()
            .contains(ProtocolFeatures::INFLIGHT_SHMFD),
        "the frontend must offer INFLIGHT_SHMFD (frontend restarts depend on it)"
    );
    let region = blk.inflight_region().expect("GET_INFLIGHT_FD answered");
    assert!(region.mmap_size > 0);
    blk.write(0, 0, &pattern(9, 4096)).unwrap();
    let tokens: Vec<Token> = (0..16)
        .map(|_| blk.submit(0, &RequestSpec::read(0, 4096)).unwrap())
        .collect();
    blk.reconnect().unwrap();
    for t in tokens {
        let c = blk.wait(0, t, T).unwrap();
        assert!(c.is_ok() && c.data == pattern(9, 4096), "{c:?}");
    }
    fx.assert_healthy(&mut blk, "a reconnection with inflight tracking");
}

/// SET_INFLIGHT_FD with an offset off the page size would put the
/// region's atomics off their alignment: refused, and the connection
/// stays usable with an aligned one.
#[test]
fn unaligned_inflight_offset_is_refused() {
    let mut fx = fixture();
    let mut blk = VhostUserBlk::connect(&fx.d, opts().inflight(true)).unwrap();
    let region = blk.inflight_region().expect("GET_INFLIGHT_FD answered");
    let (size, queues, queue_size) = (region.mmap_size, region.num_queues, region.queue_size);
    // A region of our own, big enough at any of the offsets tried, and
    // sealed against resizing as the frontend requires.
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let file = File::from(memfd_create("inflight", MFdFlags::MFD_ALLOW_SEALING).unwrap());
    file.set_len(size + 8192).unwrap();
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
    )
    .unwrap();
    let message = |offset: u64| {
        let mut p = Vec::with_capacity(24);
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&queues.to_le_bytes());
        p.extend_from_slice(&queue_size.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        RawMessage::new(req::SET_INFLIGHT_FD)
            .flags(FLAG_VERSION | raw::FLAG_NEED_REPLY)
            .payload(&p)
            .fd(&file)
            .unwrap()
    };
    for offset in [1u64, 8, 4095] {
        let out = blk.raw_request(&message(offset)).unwrap();
        assert!(
            out.refused() || out.closed,
            "offset {offset}: {}",
            describe(&out)
        );
        fx.assert_alive("SET_INFLIGHT_FD at an unaligned offset");
        blk.reconnect().unwrap();
    }
    let out = blk.raw_request(&message(4096)).unwrap();
    assert!(!out.refused() && !out.closed, "{}", describe(&out));
    fx.assert_healthy(&mut blk, "SET_INFLIGHT_FD at a page-aligned offset");
}
