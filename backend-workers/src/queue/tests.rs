//! The loop driven by hand on the test's thread, over real rings, a
//! guest RAM file mapped twice (the worker's mapping and the test's) and
//! a real libblkio io_uring leaf on a temporary file.

use std::time::Duration;

use super::*;
use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::ring::zone_status;
use blkmesh_ipc::ring::{CompletionReceiver, RequestSender, RingLayout};
use blkmesh_proto::v1::{
    node_spec::Driver, ExportPlan, FaultInjectionOptions, IoUringOptions, NodeSpec, NullOptions,
    VhostUserBlkExport,
};

const RAM: u64 = 4 << 20;
const DISK: u64 = 8 << 20;
const KIB: u64 = 1024;

struct Harness {
    lp: QueueLoop,
    tx: RequestSender,
    rx: CompletionReceiver,
    /// The test's own view of guest RAM.
    ram: GuestRam,
    image: Option<tempfile::NamedTempFile>,
    _ram_file: std::fs::File,
    /// Holds a zoned node's metadata.
    dir: Option<tempfile::TempDir>,
}

fn knobs(child: &str, max_transfer: u64, max_segments: u32, align: u32) -> NodeSpec {
    NodeSpec {
        name: "f".into(),
        driver: Some(Driver::FaultInjection(FaultInjectionOptions {
            child: child.into(),
            rules: vec![],
            max_transfer,
            max_segments,
            buf_alignment: align,
        })),
    }
}

fn open(nodes: Vec<NodeSpec>) -> OpenedGraph {
    crate::graph::open(&ExportPlan {
        commit_finish: String::new(),
        export: Some(VhostUserBlkExport {
            id: "e".into(),
            node: "f".into(),
            socket: "/tmp/x".into(),
            writable: true,
            ..Default::default()
        }),
        nodes,
        queues: vec![],
        generation: 0,
    })
    .unwrap()
}

/// fault-injection "f" with these knobs over an io_uring file "file".
fn file_graph(max_transfer: u64, max_segments: u32, align: u32) -> Harness {
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(DISK).unwrap();
    let leaf = NodeSpec {
        name: "file".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: image.path().display().to_string(),
            direct: false,
            read_only: false,
        })),
    };
    let g = open(vec![knobs("file", max_transfer, max_segments, align), leaf]);
    let mut h = harness(g);
    h.image = Some(image);
    h
}

/// fault-injection "f" with these knobs over a null leaf.
fn null_graph(max_transfer: u64, max_segments: u32, align: u32, latency_ns: u64) -> Harness {
    let leaf = NodeSpec {
        name: "n".into(),
        driver: Some(Driver::Null(NullOptions {
            size: DISK,
            latency_ns,
        })),
    };
    harness(open(vec![
        knobs("n", max_transfer, max_segments, align),
        leaf,
    ]))
}

fn harness(graph: OpenedGraph) -> Harness {
    let layout = RingLayout::new(16, 128).unwrap();
    let rings = QueueRings::create("limits-test", layout).unwrap();
    let (tx, rx) = rings.frontend_end();
    let file = tempfile::tempfile().unwrap();
    file.set_len(RAM).unwrap();
    let spec = RegionSpec {
        guest_addr: 0,
        size: RAM,
        fd_offset: 0,
    };
    let worker_ram = GuestRam::map(&[spec], vec![file.try_clone().unwrap()]).unwrap();
    let ram = GuestRam::map(&[spec], vec![file.try_clone().unwrap()]).unwrap();
    let registered = RegisteredRam::register(worker_ram, &graph.leaf).unwrap();
    let io = LeafQueue::attach(&graph.leaf, 16).unwrap();
    let setup = QueueSetup {
        index: 0,
        rings,
        kick: Doorbell::new().unwrap(),
        call: Doorbell::new().unwrap(),
        graph,
        ram: Arc::new(Mutex::new(Arc::new(registered))),
    };
    let stop_fd = Doorbell::new().unwrap();
    let lp = QueueLoop::new(setup, io, Arc::new(AtomicBool::new(false)), stop_fd);
    Harness {
        lp,
        tx,
        rx,
        ram,
        image: None,
        _ram_file: file,
        dir: None,
    }
}

fn seg(offset: u64, len: u32) -> Segment {
    Segment {
        region: 0,
        len,
        offset,
    }
}

impl Harness {
    fn put(&self, s: &Segment, data: &[u8]) {
        assert_eq!(self.ram.buf(s).unwrap().copy_from(data), data.len());
    }

    fn get(&self, s: &Segment) -> Vec<u8> {
        let mut v = vec![0u8; s.len as usize];
        self.ram.buf(s).unwrap().copy_to(&mut v);
        v
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.image.as_ref().unwrap().path()).unwrap()
    }

    fn submit(&mut self, tag: u32, op: Op, offset: u64, len: u64, segs: &[Segment]) {
        let req = Request {
            tag,
            op,
            flags: 0,
            offset,
            len,
        };
        self.tx.push(&req, segs).unwrap();
        self.tx.publish();
    }

    /// Runs the loop until `n` completions came back through the ring.
    fn complete(&mut self, n: usize) -> Vec<Completion> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(Instant::now() < deadline, "timed out: {out:?}");
            self.lp.take_requests().unwrap();
            self.lp.run_timers();
            self.lp.reap();
            self.lp.post_completions();
            while let Some(c) = self.rx.pop().unwrap() {
                out.push(c);
            }
            self.rx.release();
        }
        assert_eq!(self.lp.inflight, 0);
        out
    }

    /// Submits one request and returns its result.
    fn run(&mut self, op: Op, offset: u64, segs: &[Segment]) -> i32 {
        let len = segs.iter().map(|s| s.len as u64).sum();
        self.submit(1, op, offset, len, segs);
        let c = self.complete(1);
        assert_eq!(c[0].tag, 1);
        c[0].result
    }

    fn range(&mut self, op: Op, offset: u64, len: u64) -> i32 {
        self.submit(2, op, offset, len, &[]);
        self.complete(1)[0].result
    }

    fn counters(&self) -> (u64, u64, u64) {
        let c = self.lp.counters;
        (c.split, c.parts, c.bounced)
    }
}

/// Byte comparison that reports the first difference, not the buffers.
#[track_caller]
fn same(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {i} is {:#x}, expected {:#x}",
            actual[i], expected[i]
        );
    }
}

#[track_caller]
fn zeroes(what: &str, actual: &[u8]) {
    same(what, actual, &vec![0u8; actual.len()]);
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

#[test]
fn within_the_limits_a_request_goes_whole() {
    let mut h = file_graph(64 * KIB, 4, 4096);
    let data = pattern(1, 64 * KIB as usize);
    h.put(&seg(0, 64 * 1024), &data);
    assert_eq!(
        h.run(
            Op::Write,
            0,
            &[seg(0, 32 * 1024), seg(32 * 1024, 32 * 1024)]
        ),
        0
    );
    assert_eq!(h.counters(), (0, 0, 0));
    same("disk", &h.disk()[..data.len()], &data);
}

#[test]
fn oversized_fragmented_and_misaligned_requests_succeed() {
    // Limits as in the issue: 8 KiB, 2 segments, 4 KiB buffer alignment.
    let mut h = file_graph(8192, 2, 4096);
    assert_eq!(h.lp.limits.max_transfer, 8192);

    // 64 KiB from one segment: cut inside it into 8 zero-copy parts.
    let a = pattern(0x10, 64 * 1024);
    h.put(&seg(0x10000, 64 * 1024), &a);
    assert_eq!(h.run(Op::Write, 0, &[seg(0x10000, 64 * 1024)]), 0);
    assert_eq!(h.counters(), (1, 8, 0));

    // 32 KiB from 8 aligned pages scattered backwards: 4 parts of 2.
    let b = pattern(0x40, 32 * 1024);
    let pages: Vec<Segment> = (0..8u64)
        .map(|i| seg(0x100000 - i * 0x3000, 4096))
        .collect();
    for (i, s) in pages.iter().enumerate() {
        h.put(s, &b[i * 4096..(i + 1) * 4096]);
    }
    assert_eq!(h.run(Op::Write, 64 * KIB, &pages), 0);
    assert_eq!(h.counters(), (2, 12, 0));

    // 12 KiB from 24 misaligned 512-byte pieces: bounced, then cut by
    // length (8 KiB + 4 KiB).
    let c = pattern(0x80, 12 * 1024);
    let pieces: Vec<Segment> = (0..24u64)
        .map(|i| seg(0x200000 + i * 1536 + 512, 512))
        .collect();
    for (i, s) in pieces.iter().enumerate() {
        h.put(s, &c[i * 512..(i + 1) * 512]);
    }
    assert_eq!(h.run(Op::Write, 96 * KIB, &pieces), 0);
    assert_eq!(h.counters(), (3, 14, 1));

    // The bytes are on the disk, in order.
    let disk = h.disk();
    same("a", &disk[..64 * 1024], &a);
    same("b", &disk[64 * 1024..96 * 1024], &b);
    same("c", &disk[96 * 1024..108 * 1024], &c);

    // Read it all back in one request of 27 pages: 14 parts.
    let pages: Vec<Segment> = (0..27u64).map(|i| seg(0x300000 + i * 8192, 4096)).collect();
    assert_eq!(h.run(Op::Read, 0, &pages), 0);
    let back: Vec<u8> = pages.iter().flat_map(|s| h.get(s)).collect();
    same("read back", &back, &disk[..108 * 1024]);
    assert_eq!(h.counters(), (4, 28, 1));

    // And through misaligned pieces again (bounced, 2 parts).
    let pieces: Vec<Segment> = (0..24u64)
        .map(|i| seg(0x200000 + i * 1536 + 1024, 512))
        .collect();
    assert_eq!(h.run(Op::Read, 96 * KIB, &pieces), 0);
    let back: Vec<u8> = pieces.iter().flat_map(|s| h.get(s)).collect();
    same("bounced read", &back, &c);
    assert_eq!(h.counters(), (5, 30, 2));

    // Each request was counted once, at the root and at the leaf.
    for stats in [
        h.lp.root_stats.snapshot(),
        h.lp.leaf_stats.as_ref().unwrap().snapshot(),
    ] {
        let (w, r) = (stats.write.unwrap(), stats.read.unwrap());
        assert_eq!((w.ops, w.bytes, w.errors), (3, 108 * KIB, 0));
        assert_eq!((r.ops, r.bytes, r.errors), (2, 120 * KIB, 0));
        assert_eq!(stats.in_flight, 0);
    }
}

#[test]
fn segments_that_cannot_be_cut_on_blocks_are_bounced() {
    // No alignment asked, but 2 segments at most: pieces of 100 and 412
    // bytes cannot be grouped into whole sectors.
    let mut h = file_graph(0, 2, 0);
    let data = pattern(7, 4096);
    let segs = [
        seg(0x1000, 100),
        seg(0x2000, 412),
        seg(0x3000, 1536),
        seg(0x4000, 2048),
    ];
    let mut at = 0;
    for s in &segs {
        h.put(s, &data[at..at + s.len as usize]);
        at += s.len as usize;
    }
    assert_eq!(h.run(Op::Write, 4096, &segs), 0);
    assert_eq!(
        h.counters(),
        (0, 0, 1),
        "bounced into one buffer, then whole"
    );
    same("disk", &h.disk()[4096..8192], &data);

    // Whole sectors are grouped instead: 3 parts, no bounce.
    let segs = [
        seg(0x1000, 512),
        seg(0x2000, 1024),
        seg(0x3000, 512),
        seg(0x4000, 2048),
    ];
    assert_eq!(h.run(Op::Read, 4096, &segs), 0);
    let back: Vec<u8> = segs.iter().flat_map(|s| h.get(s)).collect();
    same("grouped read", &back, &data);
    assert_eq!(h.counters(), (1, 2, 1));
}

#[test]
fn write_zeroes_and_discard_beyond_their_maximum_are_split() {
    let mut h = file_graph(0, 0, 0);
    h.lp.graph.limits.max_write_zeroes = 16 * KIB;
    h.lp.graph.limits.max_discard = 8 * KIB;
    h.lp.limits = SplitLimits::new(&h.lp.graph.limits, h.lp.graph.discard_punches_holes);
    let data = pattern(3, 256 * 1024);
    h.put(&seg(0, 256 * 1024), &data);
    assert_eq!(h.run(Op::Write, 0, &[seg(0, 256 * 1024)]), 0);
    assert_eq!(h.counters(), (0, 0, 0));

    assert_eq!(h.range(Op::WriteZeroes, 4 * KIB, 64 * KIB), 0);
    assert_eq!(h.counters(), (1, 4, 0));
    assert_eq!(h.range(Op::Discard, 128 * KIB, 20 * KIB), 0);
    assert_eq!(h.counters(), (2, 7, 0), "8 + 8 + 4 KiB");
    let disk = h.disk();
    same("before", &disk[..4096], &data[..4096]);
    zeroes("write-zeroes", &disk[4096..68 * 1024]);
    same(
        "between",
        &disk[68 * 1024..128 * 1024],
        &data[68 * 1024..128 * 1024],
    );
    zeroes("discard", &disk[128 * 1024..148 * 1024]);
    same("after", &disk[148 * 1024..256 * 1024], &data[148 * 1024..]);
}

#[test]
fn the_first_failed_part_decides_and_the_request_completes_once() {
    let mut h = file_graph(8192, 0, 0);
    // 128 KiB: 16 parts, 8 in flight at first.
    h.put(&seg(0, 128 * 1024), &pattern(9, 128 * 1024));
    h.submit(5, Op::Write, 0, 128 * KIB, &[seg(0, 128 * 1024)]);
    h.lp.take_requests().unwrap();
    assert_eq!(h.counters(), (1, 8, 0));
    assert_eq!(h.lp.slots[5].in_flight().map(|r| r.parts.busy), Some(0xff));
    // Two lanes fail (as a driver would report it) before any other
    // part is back: the first error wins, no further part starts.
    h.lp.part_done(5, 2, -libc::EIO);
    h.lp.part_done(5, 6, -libc::ENOSPC);
    // A completion for a lane already done is ignored.
    h.lp.part_done(5, 2, 0);
    let c = h.complete(1);
    assert_eq!(
        c,
        vec![Completion {
            tag: 5,
            result: -libc::EIO,
            extra: 0
        }]
    );
    assert_eq!(h.counters(), (1, 8, 0));
    let w = h.lp.root_stats.snapshot().write.unwrap();
    assert_eq!((w.ops, w.errors), (1, 1));
    assert!(!h.lp.slots[5].is_busy());
    // The slot is fine for the next request.
    assert_eq!(h.run(Op::Read, 0, &[seg(0, 16 * 1024)]), 0);
    assert_eq!(h.counters(), (2, 10, 0));
}

#[test]
fn null_leaf_splits_and_bounces_too() {
    let mut h = null_graph(8192, 2, 4096, 0);
    let ones = vec![0xffu8; 64 * 1024];
    h.put(&seg(0x10000, 64 * 1024), &ones);
    assert_eq!(h.run(Op::Read, 0, &[seg(0x10000, 64 * 1024)]), 0);
    zeroes("null read", &h.get(&seg(0x10000, 64 * 1024)));
    assert_eq!(h.counters(), (1, 8, 0));

    let pieces: Vec<Segment> = (0..8u64)
        .map(|i| seg(0x40000 + i * 1024 + 512, 512))
        .collect();
    for s in &pieces {
        h.put(s, &[0xff; 512]);
    }
    assert_eq!(h.run(Op::Read, 0, &pieces), 0);
    assert!(pieces.iter().all(|s| h.get(s).iter().all(|&b| b == 0)));
    assert_eq!(
        h.counters(),
        (1, 8, 1),
        "4 KiB bounced, within max_transfer"
    );
    assert_eq!(h.run(Op::Write, 0, &pieces), 0);
    assert_eq!(h.counters(), (1, 8, 2));
}

#[test]
fn null_leaf_latency_applies_once_to_a_split_request() {
    let mut h = null_graph(4096, 0, 0, 2_000_000);
    let t = Instant::now();
    assert_eq!(h.run(Op::Read, 0, &[seg(0, 64 * 1024)]), 0);
    assert!(t.elapsed() >= Duration::from_millis(2));
    assert_eq!(h.counters(), (1, 16, 0));
    let r = h.lp.root_stats.snapshot().read.unwrap();
    assert_eq!((r.ops, r.bytes), (1, 64 * KIB));
}

// ------------------------------------------------------------ zones

use crate::zoned::{Cond, WriteKind};
use blkmesh_proto::v1::{fault_rule, FaultRule, IoOp, RawOptions, ZonedOptions};

const ZONE: u64 = 1 << 20;
/// Where reports land in guest RAM.
const REPORT_AT: u64 = 0x30_0000;

fn open_root(root: &str, nodes: Vec<NodeSpec>) -> OpenedGraph {
    crate::graph::open(&ExportPlan {
        commit_finish: String::new(),
        export: Some(VhostUserBlkExport {
            id: "e".into(),
            node: root.into(),
            socket: "/tmp/x".into(),
            writable: true,
            ..Default::default()
        }),
        nodes,
        queues: vec![],
        generation: 0,
    })
    .unwrap()
}

fn zoned_node(name: &str, child: &str, dir: &tempfile::TempDir, cap: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: child.into(),
            zone_size: ZONE,
            zone_capacity: cap,
            max_open_zones: 0,
            max_active_zones: 0,
            metadata_path: dir.path().join("zones").display().to_string(),
        })),
    }
}

fn file_leaf(image: &tempfile::NamedTempFile) -> NodeSpec {
    NodeSpec {
        name: "file".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: image.path().display().to_string(),
            direct: false,
            read_only: false,
        })),
    }
}

/// Zoned graph rooted at "f" whose nodes `more` builds over the file
/// leaf "file" (8 zones of 1 MiB).
fn zoned_harness(more: impl FnOnce(&tempfile::TempDir) -> Vec<NodeSpec>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(DISK).unwrap();
    let mut nodes = more(&dir);
    nodes.push(file_leaf(&image));
    let mut h = harness(open_root("f", nodes));
    h.image = Some(image);
    h.dir = Some(dir);
    h
}

/// One zone descriptor of a report: (capacity, start, wp) in bytes,
/// type, state.
type Desc = (u64, u64, u64, u8, u8);

impl Harness {
    fn zrun(&mut self, op: Op, offset: u64, segs: &[Segment]) -> Completion {
        let len = segs.iter().map(|s| s.len as u64).sum();
        self.submit(1, op, offset, len, segs);
        let c = self.complete(1);
        c[0]
    }

    fn zop(&mut self, op: Op, offset: u64) -> i32 {
        self.range(op, offset, 0)
    }

    /// A zone report from `offset` into a buffer with room for `room`
    /// descriptors.
    fn report(&mut self, offset: u64, room: u32) -> Vec<Desc> {
        let buf = seg(REPORT_AT, 64 + 64 * room);
        self.put(&buf, &vec![0xee; buf.len as usize]);
        let c = self.zrun(Op::ZoneReport, offset, &[buf]);
        assert_eq!(c.result, 0);
        let data = self.get(&buf);
        let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        assert_eq!(c.extra, 64 + 64 * n as u64);
        assert!(data[8..64].iter().all(|&b| b == 0));
        (0..n)
            .map(|i| {
                let d = &data[64 + 64 * i..128 + 64 * i];
                let word = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap()) * 512;
                (word(0), word(8), word(16), d[24], d[25])
            })
            .collect()
    }

    fn zone_state(&mut self, offset: u64) -> (u64, u8) {
        let d = self.report(offset, 1)[0];
        (d.2, d.4)
    }
}

#[test]
fn zone_ops_on_a_regular_graph_are_not_supported() {
    let mut h = null_graph(0, 0, 0, 0);
    assert_eq!(h.lp.graph.limits.zones.unwrap().model, 0);
    for op in [
        Op::ZoneOpen,
        Op::ZoneClose,
        Op::ZoneFinish,
        Op::ZoneReset,
        Op::ZoneResetAll,
    ] {
        assert_eq!(h.zop(op, 0), -libc::EOPNOTSUPP, "{op:?}");
    }
    assert_eq!(
        h.zrun(Op::ZoneReport, 0, &[seg(REPORT_AT, 4096)]).result,
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        h.zrun(Op::ZoneAppend, 0, &[seg(0, 4096)]).result,
        -libc::EOPNOTSUPP
    );
}

#[test]
fn zoned_writes_appends_reports_and_management_through_the_ring() {
    let cap = 768 * KIB;
    let mut h = zoned_harness(|d| vec![zoned_node("f", "file", d, cap)]);
    assert_eq!(h.lp.graph.limits.size, DISK);

    // A fresh device: 8 empty zones.
    let r = h.report(0, 16);
    assert_eq!(r.len(), 8);
    for (i, d) in r.iter().enumerate() {
        let start = i as u64 * ZONE;
        assert_eq!(*d, (cap, start, start, 2, Cond::Empty as u8));
    }

    // A write at the write pointer, then one that is not.
    let a = pattern(0x11, 8192);
    h.put(&seg(0, 8192), &a);
    assert_eq!(h.run(Op::Write, 0, &[seg(0, 8192)]), 0);
    assert_eq!(
        h.run(Op::Write, 4096, &[seg(0, 4096)]),
        zone_status::UNALIGNED_WP
    );
    // Not a multiple of the write granularity (virtio 1.4: UNALIGNED_WP).
    assert_eq!(
        h.run(Op::Write, ZONE, &[seg(0, 512), seg(4096, 100)]),
        zone_status::UNALIGNED_WP
    );

    // Appends say where they landed.
    let b = pattern(0x22, 4096);
    h.put(&seg(0x10000, 4096), &b);
    let c = h.zrun(Op::ZoneAppend, 0, &[seg(0x10000, 4096)]);
    assert_eq!((c.result, c.extra), (0, 8192));
    let c = h.zrun(Op::ZoneAppend, 2 * ZONE, &[seg(0x10000, 4096)]);
    assert_eq!((c.result, c.extra), (0, 2 * ZONE));
    // Not a zone start, or more than max_append.
    let c = h.zrun(Op::ZoneAppend, 512, &[seg(0x10000, 4096)]);
    assert_eq!(c.result, zone_status::INVALID_CMD);
    let big = h.lp.graph.limits.zones.unwrap().max_append + 4096;
    let c = h.zrun(Op::ZoneAppend, 3 * ZONE, &[seg(0, big as u32)]);
    assert_eq!(c.result, zone_status::INVALID_CMD);
    let disk = h.disk();
    same("write", &disk[..8192], &a);
    same("append", &disk[8192..12288], &b);
    same("append 2", &disk[2 * ZONE as usize..][..4096], &b);

    // A report from inside zone 1 with room for two zones.
    let r = h.report(ZONE + 512, 2);
    assert_eq!(
        r,
        vec![
            (cap, ZONE, ZONE, 2, Cond::Empty as u8),
            (cap, 2 * ZONE, 2 * ZONE + 4096, 2, Cond::ImplicitOpen as u8),
        ]
    );

    // Management: finish, reset, open, close, reset-all.
    assert_eq!(h.zop(Op::ZoneFinish, 0), 0);
    assert_eq!(h.zone_state(0), (ZONE, Cond::Full as u8));
    assert_eq!(
        h.run(Op::Write, 12288, &[seg(0, 4096)]),
        zone_status::INVALID_CMD
    );
    assert_eq!(h.zop(Op::ZoneOpen, 0), zone_status::INVALID_CMD);
    assert_eq!(h.zop(Op::ZoneReset, 0), 0);
    assert_eq!(h.zone_state(0), (0, Cond::Empty as u8));
    assert_eq!(h.zop(Op::ZoneOpen, 3 * ZONE), 0);
    assert_eq!(h.zone_state(3 * ZONE).1, Cond::ExplicitOpen as u8);
    assert_eq!(h.zop(Op::ZoneClose, 3 * ZONE), 0);
    assert_eq!(h.zone_state(3 * ZONE).1, Cond::Empty as u8);
    assert_eq!(h.zop(Op::ZoneClose, 3 * ZONE), zone_status::INVALID_CMD);
    assert_eq!(h.zop(Op::ZoneOpen, 512), zone_status::INVALID_CMD);
    assert_eq!(h.zop(Op::ZoneOpen, DISK), zone_status::INVALID_CMD);
    assert_eq!(h.zop(Op::ZoneReset, u64::MAX / 2), zone_status::INVALID_CMD);
    let c = h.zrun(Op::ZoneAppend, DISK, &[seg(0, 4096)]);
    assert_eq!(c.result, zone_status::INVALID_CMD);
    let c = h.zrun(Op::ZoneReport, DISK, &[seg(REPORT_AT, 4096)]);
    assert_eq!(c.result, zone_status::INVALID_CMD);
    assert_eq!(h.zop(Op::ZoneResetAll, 0), 0);
    assert!(h
        .report(0, 8)
        .iter()
        .all(|d| d.4 == Cond::Empty as u8 && d.1 == d.2));

    // Reads go anywhere (past the capacity too); discard does not.
    assert_eq!(h.run(Op::Read, 4 * ZONE + cap, &[seg(0, 8192)]), 0);
    assert_eq!(h.range(Op::Discard, 0, 4096), -libc::EOPNOTSUPP);
    // Write-zeroes follows the write pointer.
    assert_eq!(h.range(Op::WriteZeroes, 5 * ZONE, 4096), 0);
    assert_eq!(
        h.range(Op::WriteZeroes, 5 * ZONE, 4096),
        zone_status::UNALIGNED_WP
    );
    // A report buffer must hold the header.
    assert_eq!(
        h.zrun(Op::ZoneReport, 0, &[seg(REPORT_AT, 32)]).result,
        zone_status::INVALID_CMD
    );
    // A flush syncs the metadata once the leaf flushed; so does a FUA write.
    let unsynced = |h: &Harness| match &*h.lp.graph.zoned.as_ref().unwrap().layer {
        crate::zoned::ZoneLayer::Emulated(s) => s.unsynced(),
        crate::zoned::ZoneLayer::Device(_) => unreachable!(),
    };
    assert!(unsynced(&h) > 0);
    assert_eq!(h.range(Op::Flush, 0, 0), 0);
    assert_eq!(unsynced(&h), 0);
    assert_eq!(h.run(Op::Write, 5 * ZONE + 4096, &[seg(0, 4096)]), 0);
    assert!(unsynced(&h) > 0);
    let fua = Request {
        tag: 3,
        op: Op::Write,
        flags: FLAG_FUA,
        offset: 5 * ZONE + 8192,
        len: 4096,
    };
    h.tx.push(&fua, &[seg(0, 4096)]).unwrap();
    h.tx.publish();
    assert_eq!(h.complete(1)[0].result, 0);
    assert_eq!(unsynced(&h), 0);

    // What completed is in the metadata file.
    let meta = std::fs::read(h.dir.as_ref().unwrap().path().join("zones")).unwrap();
    let rec = &meta[crate::zoned::HEADER_SIZE as usize + 5 * 32..][..32];
    assert_eq!(rec[0], Cond::ImplicitOpen as u8);
    assert_eq!(u64::from_le_bytes(rec[8..16].try_into().unwrap()), 12288);
}

#[test]
fn appends_from_two_queues_get_distinct_ranges() {
    let mut a = zoned_harness(|d| vec![zoned_node("f", "file", d, 0)]);
    let mut b = harness(a.lp.graph.clone());
    // 8 appends of 4 KiB on each queue, all in flight at once, each
    // with its own pattern.
    for (q, h) in [&mut a, &mut b].into_iter().enumerate() {
        for tag in 0..8u32 {
            let s = seg(0x10000 * (tag as u64 + 1), 4096);
            h.put(&s, &pattern((q * 8) as u8 + tag as u8, 4096));
            let req = Request {
                tag,
                op: Op::ZoneAppend,
                flags: 0,
                offset: ZONE,
                len: 4096,
            };
            h.tx.push(&req, &[s]).unwrap();
        }
        h.tx.publish();
        h.lp.take_requests().unwrap();
    }
    let mut landed = Vec::new();
    for (q, h) in [&mut a, &mut b].into_iter().enumerate() {
        for c in h.complete(8) {
            assert_eq!(c.result, 0);
            landed.push((c.extra, (q * 8) as u8 + c.tag as u8));
        }
    }
    landed.sort_unstable();
    let offsets: Vec<u64> = landed.iter().map(|l| l.0).collect();
    let want: Vec<u64> = (0..16).map(|i| ZONE + i * 4096).collect();
    assert_eq!(offsets, want);
    let disk = a.disk();
    for (at, seed) in landed {
        same(
            "appended",
            &disk[at as usize..][..4096],
            &pattern(seed, 4096),
        );
    }
    assert_eq!(
        a.zone_state(ZONE),
        (ZONE + 16 * 4096, Cond::ImplicitOpen as u8)
    );
}

#[test]
fn a_failed_write_below_the_zone_layer_gives_its_range_back() {
    let mut h = zoned_harness(|d| {
        vec![
            zoned_node("f", "inj", d, 0),
            NodeSpec {
                name: "inj".into(),
                driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                    child: "file".into(),
                    rules: vec![FaultRule {
                        ops: vec![IoOp::Write as i32],
                        count: 1,
                        action: Some(fault_rule::Action::Errno(libc::EIO)),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            },
        ]
    });
    assert_eq!(h.run(Op::Write, 0, &[seg(0, 4096)]), -libc::EIO);
    assert_eq!(h.zone_state(0), (0, Cond::Empty as u8));
    assert_eq!(h.run(Op::Write, 0, &[seg(0, 4096)]), 0);
    assert_eq!(h.zone_state(0), (4096, Cond::ImplicitOpen as u8));
}

#[test]
fn a_window_over_a_zoned_node_shows_its_zones_only() {
    let mut h = zoned_harness(|d| {
        vec![
            NodeSpec {
                name: "f".into(),
                driver: Some(Driver::Raw(RawOptions {
                    child: "z".into(),
                    offset: 2 * ZONE,
                    size: 4 * ZONE,
                })),
            },
            zoned_node("z", "file", d, 0),
        ]
    });
    assert_eq!(h.lp.graph.limits.size, 4 * ZONE);
    // Zone 0 of the layer (outside the window) is written directly.
    let layer = Arc::clone(&h.lp.graph.zoned.as_ref().unwrap().layer);
    let t = layer.begin_write(WriteKind::Write, 0, 4096).unwrap();
    layer.end_write(&t, true).unwrap();

    let r = h.report(0, 16);
    assert_eq!(r.len(), 4, "only the window's zones");
    assert_eq!(r[1].1, ZONE);
    let data = pattern(0x33, 4096);
    h.put(&seg(0, 4096), &data);
    let c = h.zrun(Op::ZoneAppend, ZONE, &[seg(0, 4096)]);
    assert_eq!((c.result, c.extra), (0, ZONE), "export coordinates");
    same("append", &h.disk()[3 * ZONE as usize..][..4096], &data);
    assert_eq!(h.zone_state(ZONE), (ZONE + 4096, Cond::ImplicitOpen as u8));
    // Reset-all leaves the zones outside the window alone.
    assert_eq!(h.zop(Op::ZoneResetAll, 0), 0);
    assert_eq!(h.zone_state(ZONE), (ZONE, Cond::Empty as u8));
    let mut v = Vec::new();
    layer.report(0, 1, 1, &mut v).unwrap();
    assert_eq!(v[0].cond, Cond::ImplicitOpen);
}

#[test]
fn zoned_over_a_slow_null_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let g = open_root(
        "f",
        vec![
            zoned_node("f", "n", &dir, 0),
            NodeSpec {
                name: "n".into(),
                driver: Some(Driver::Null(NullOptions {
                    size: DISK,
                    latency_ns: 1_000_000,
                })),
            },
        ],
    );
    let mut h = harness(g);
    h.dir = Some(dir);
    let c = h.zrun(Op::ZoneAppend, 4 * ZONE, &[seg(0, 8192)]);
    assert_eq!((c.result, c.extra), (0, 4 * ZONE));
    let c = h.zrun(Op::ZoneAppend, 4 * ZONE, &[seg(0, 4096)]);
    assert_eq!((c.result, c.extra), (0, 4 * ZONE + 8192));
}

#[test]
fn zone_state_survives_the_graph() {
    let mut h = zoned_harness(|d| vec![zoned_node("f", "file", d, 0)]);
    assert_eq!(h.run(Op::Write, 0, &[seg(0, 4096)]), 0);
    assert_eq!(h.zop(Op::ZoneFinish, ZONE), 0);
    assert_eq!(h.zop(Op::ZoneOpen, 2 * ZONE), 0);
    let g = h.lp.graph.clone();
    let (image, dir) = (h.image.take().unwrap(), h.dir.take().unwrap());
    drop(h);
    drop(g);
    // Opened again (a restarted worker reads the metadata file).
    let mut h = harness(open_root(
        "f",
        vec![zoned_node("f", "file", &dir, 0), file_leaf(&image)],
    ));
    let r = h.report(0, 3);
    assert_eq!((r[0].2, r[0].4), (4096, Cond::ImplicitOpen as u8));
    assert_eq!((r[1].2, r[1].4), (2 * ZONE, Cond::Full as u8));
    assert_eq!((r[2].2, r[2].4), (2 * ZONE, Cond::ExplicitOpen as u8));
    assert_eq!(h.run(Op::Write, 4096, &[seg(0, 4096)]), 0);
}

/// A zoned block device to test the pass-through on: the one
/// `BLKMESH_TEST_ZONED_DEV` names (the test writes and resets its first
/// zones: use a scratch device), a zoned null_blk device, or one loaded
/// with `modprobe null_blk zoned=1` (unloaded afterwards). Err says why
/// there is none.
fn zoned_test_device() -> Result<(String, bool), String> {
    if let Ok(dev) = std::env::var("BLKMESH_TEST_ZONED_DEV") {
        return Ok((dev, false));
    }
    let find = || -> Option<String> {
        let sys = std::path::Path::new("/sys");
        for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dev = format!("/dev/{name}");
            if name.starts_with("nullb")
                && crate::zoned::probe_block_device(sys, std::path::Path::new(&dev)).is_some()
            {
                return Some(dev);
            }
        }
        None
    };
    if let Some(dev) = find() {
        return Ok((dev, false));
    }
    let modprobe = ["/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(modprobe) = modprobe else {
        return Err("no zoned null_blk device and no modprobe to load one \
                    (set BLKMESH_TEST_ZONED_DEV to a scratch zoned device)"
            .into());
    };
    if std::path::Path::new("/sys/module/null_blk").exists() {
        return Err("null_blk is loaded without a zoned device".into());
    }
    let loaded = std::process::Command::new(modprobe)
        .args([
            "null_blk",
            "nr_devices=1",
            "zoned=1",
            "zone_size=4",
            "gb=1",
            "memory_backed=1",
            "zone_nr_conv=0",
        ])
        .status()
        .map_err(|e| format!("{modprobe}: {e}"))?;
    if !loaded.success() {
        return Err(format!("modprobe null_blk zoned=1 failed ({loaded})"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(dev) = find() {
            return Ok((dev, true));
        }
        if Instant::now() > deadline {
            let _ = std::process::Command::new(modprobe)
                .args(["-r", "null_blk"])
                .status();
            return Err("null_blk loaded but no zoned device appeared".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_zoned_block_device_passes_through() {
    let (dev, loaded) = match zoned_test_device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: no zoned block device to test on: {why}");
            return;
        }
    };
    let result = std::panic::catch_unwind(|| {
        let g = open_root(
            "f",
            vec![NodeSpec {
                name: "f".into(),
                driver: Some(Driver::IoUring(IoUringOptions {
                    path: dev.clone(),
                    direct: true,
                    read_only: false,
                })),
            }],
        );
        let info = g.limits.zones.unwrap();
        assert_ne!(info.model, 0, "{dev} is zoned");
        let zs = info.zone_size;
        let mut h = harness(g);
        // A conventional zone at the start is skipped.
        let first = h
            .report(0, 64)
            .iter()
            .find(|d| d.3 != crate::zoned::TYPE_CONVENTIONAL)
            .map(|d| d.1)
            .expect("a sequential zone among the first 64");
        assert_eq!(h.zop(Op::ZoneReset, first), 0);
        assert_eq!(h.zone_state(first), (first, Cond::Empty as u8));
        let a = pattern(0x5a, 8192);
        h.put(&seg(0, 8192), &a);
        assert_eq!(h.run(Op::Write, first, &[seg(0, 4096)]), 0);
        assert_eq!(
            h.run(Op::Write, first, &[seg(0, 4096)]),
            zone_status::UNALIGNED_WP
        );
        let c = h.zrun(Op::ZoneAppend, first, &[seg(4096, 4096)]);
        assert_eq!((c.result, c.extra), (0, first + 4096));
        assert_eq!(h.zone_state(first).0, first + 8192);
        assert_eq!(h.run(Op::Read, first, &[seg(0x10000, 8192)]), 0);
        same("read back", &h.get(&seg(0x10000, 8192)), &a);
        assert_eq!(h.zop(Op::ZoneFinish, first), 0);
        assert_eq!(h.zone_state(first).1, Cond::Full as u8);
        assert_eq!(
            h.run(Op::Write, first + 8192, &[seg(0, 4096)]),
            zone_status::INVALID_CMD
        );
        assert_eq!(h.zop(Op::ZoneReset, first), 0);
        assert_eq!(h.zone_state(first), (first, Cond::Empty as u8));
        assert_eq!(h.zop(Op::ZoneOpen, first + zs), 0);
        assert_eq!(h.zone_state(first + zs).1, Cond::ExplicitOpen as u8);
        assert_eq!(h.zop(Op::ZoneClose, first + zs), 0);
    });
    if loaded {
        for m in ["/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe"] {
            if std::path::Path::new(m).exists() {
                let _ = std::process::Command::new(m)
                    .args(["-r", "null_blk"])
                    .status();
                break;
            }
        }
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
