//! `control_message`: the frontend ↔ worker control channel.
//!
//! Datagrams (with file descriptors in SCM_RIGHTS) go through a real
//! SOCK_SEQPACKET pair into `Channel::recv`, decoded as
//! `blkmesh.ipc.v1.Request` (the worker's side) or `Reply` (the frontend's).
//! Requests are then handled as `backend-workers/src/connection.rs` does
//! (its `Conn::handle` is private, so its steps are repeated here with the
//! worker's public pieces): `graph::open` for plans whose leaves open no file
//! (null, raw, fault injection, throttle without a shared group), guest RAM
//! mapping, ring attach with doorbell checks, detach. Requests can then be
//! run through the opened graph's stages as the queue loop does, popped
//! from attached rings, and guest-RAM segments checked. Replies become the
//! frontend's feature bits and config space.
//!
//! Input format:
//!
//! ```text
//! operations until the input ends, each a u8 code (mod 4):
//!  0 datagram   u8 flags (bit 0: decode as Reply; bits 1-2: fd count;
//!               bit 3: pad past the channel's size limit), fds, bytes (<= 8 KiB)
//!               (the whole datagram: version byte 1, then the protobuf)
//!  1 segments   u8 count (mod 16) × segment, against the current guest RAM
//!  2 pop        u8 n (mod 8) requests from every attached ring
//!  3 requests   u8 count (mod 8) × { u8 op, u64 offset, u32 len, u8 shift
//!               (mod 11) of len } through the opened graph's stages
//! fd: u8 kind (mod 6): 0 ring memfd (u8 log2 entries mod 9, u8 max_segments-1
//!     mod 64, u8 count mod 4 × { u32 offset, bytes <= 64 } scribbled),
//!     1 sealed memfd (u32 size mod 1 MiB), 2 unsealed memfd (u32 size mod
//!     1 MiB), 3 eventfd, 4 pipe, 5 sealed memfd of (u8 + 1) pages
//! segment: u8 region, u8 kind, offset (kind bit 0: u64, else u16),
//!     len (kind bit 1: u32, else u16)
//! ```
//!
//! Checks: no panic; an opened graph's limits are coherent (block size,
//! size a non-zero multiple of it, alignments powers of two); accepted
//! segments lie inside the worker's mapping; ring entries as in `ring`.

use std::collections::HashMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use blkmesh_ipc::channel::{Channel, MAX_MESSAGE};
use blkmesh_ipc::guest_ram::RegionSpec;
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{Op, QueueRings, Received, RequestReceiver, RingLayout, Segment};
use blkmesh_ipc::shm::SharedMemory;
use blkmesh_proto::ipc::v1 as ipc;
use blkmesh_proto::v1::{fault_rule, node_spec::Driver, ExportPlan};
use blkmesh_worker::graph::{self, Leaf, OpenedGraph};
use blkmesh_worker::jobs;
use blkmesh_worker::memory::RegisteredRam;
use blkmesh_worker::split::SplitLimits;
use blkmesh_worker::stages::{self, Stage, Verdict};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use prost::Message;

use crate::{memfd, touch, Reader, Writer};

mod reply;
use reply::frontend_reply;

thread_local! {
    static PAIR: (Channel, Channel) = Channel::pair().unwrap();
}

/// The worker connection's state (connection.rs `Conn`), minus the queue
/// threads: an attached ring is kept with its receiving end.
#[derive(Default)]
struct Conn {
    graph: Option<OpenedGraph>,
    /// The plan holds values that overflow the stages' arithmetic (known
    /// bugs, see [`known`]): its requests are not run unless strict.
    overflows: bool,
    ram: Option<RegisteredRam>,
    queues: HashMap<u32, (QueueRings, RequestReceiver)>,
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut conn = Conn::default();
    PAIR.with(|(tx, rx)| {
        while !r.is_empty() {
            match r.u8() % 4 {
                0 => datagram(&mut r, tx, rx, &mut conn),
                1 => segments(&mut r, &conn),
                2 => pop(&mut r, &mut conn),
                _ => requests(&mut r, &conn),
            }
        }
    });
}

fn make_fd(r: &mut Reader<'_>) -> OwnedFd {
    match r.u8() % 6 {
        0 => {
            let entries = 1u32 << (r.u8() % 9);
            let max_segments = 1 + (r.u8() % 64) as u32;
            let layout = RingLayout::new(entries, max_segments).unwrap();
            let rings = QueueRings::create("fuzz-ctl-ring", layout).unwrap();
            let fd = rings.fd().try_clone_to_owned().unwrap();
            let peer = SharedMemory::from_peer(File::from(fd.try_clone().unwrap()), layout.size())
                .unwrap();
            for _ in 0..r.u8() % 4 {
                let off = r.u32() as usize % layout.size();
                let b = r.bytes(64);
                if let Some(p) = peer.ptr_at(off, b.len()) {
                    // SAFETY: in-bounds of our own mapping, single thread.
                    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len()) };
                }
            }
            fd
        }
        1 => memfd("fuzz-ctl", (r.u32() % (1 << 20)) as u64, true).into(),
        2 => memfd("fuzz-ctl", (r.u32() % (1 << 20)) as u64, false).into(),
        3 => nix::sys::eventfd::EventFd::new().unwrap().into(),
        4 => nix::unistd::pipe().unwrap().0,
        _ => memfd("fuzz-ctl", (1 + r.u8() as u64) * 4096, true).into(),
    }
}

fn datagram(r: &mut Reader<'_>, tx: &Channel, rx: &Channel, conn: &mut Conn) {
    let flags = r.u8();
    let nfds = (flags >> 1) & 3;
    let fds: Vec<OwnedFd> = (0..nfds).map(|_| make_fd(r)).collect();
    let mut payload = r.bytes(8192).to_vec();
    if flags & 8 != 0 {
        payload.resize(MAX_MESSAGE + 2, 0);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(&payload)];
    if sendmsg::<()>(tx.as_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).is_err() {
        return;
    }
    drop(fds);
    if flags & 1 != 0 {
        let got = rx.recv::<ipc::Reply>();
        if crate::debug() {
            eprintln!("reply: {got:?}");
        }
        if let Ok((reply, _fds)) = got {
            frontend_reply(r, reply);
        }
    } else {
        let got = rx.recv::<ipc::Request>();
        if crate::debug() {
            eprintln!("request: {got:?}");
        }
        if let Ok((req, fds)) = got {
            conn.handle(req, fds);
        }
    }
}

/// Plans whose leaves open nothing outside the process.
fn in_process(plan: &ExportPlan) -> bool {
    plan.nodes.iter().all(|n| match &n.driver {
        None | Some(Driver::Null(_) | Driver::Raw(_) | Driver::FaultInjection(_)) => true,
        Some(Driver::Throttle(t)) => t.group.is_empty(),
        Some(_) => false,
    })
}

impl Conn {
    fn handle(&mut self, req: ipc::Request, fds: Vec<File>) {
        use ipc::request::Msg;
        match req.msg {
            // Zone requests need a zoned graph (a metadata file): not run here.
            None | Some(Msg::Zone(_)) => {}
            // No in-process graph has a qcow2 node: any job request is answered.
            Some(Msg::Job(j)) => {
                let g = self.graph.as_ref();
                let _ = jobs::request(
                    g.and_then(|g| g.qcow2()),
                    g.is_some_and(|g| g.read_only()),
                    &j,
                );
            }
            Some(Msg::Open(open)) => {
                if self.graph.is_some() {
                    return;
                }
                let Some(plan) = open.plan else { return };
                let finish = &plan.commit_finish;
                assert!(finish.is_empty() || jobs::finish_commit(finish).is_err());
                if !in_process(&plan) {
                    return;
                }
                let opened = graph::open(&plan);
                if crate::debug() {
                    eprintln!("open: {opened:?}");
                }
                if let Ok(g) = opened {
                    check_graph(&g);
                    self.graph = Some(g);
                    self.overflows = !crate::strict() && known_overflow(&plan);
                }
            }
            Some(Msg::SetMemTable(table)) => {
                let Some(g) = &self.graph else { return };
                let specs: Vec<RegionSpec> = table
                    .regions
                    .iter()
                    .map(|r| RegionSpec {
                        guest_addr: r.guest_addr,
                        size: r.size,
                        fd_offset: r.fd_offset,
                    })
                    .collect();
                let mapped = blkmesh_ipc::guest_ram::GuestRam::map(&specs, fds);
                if crate::debug() {
                    eprintln!("guest RAM: {mapped:?}");
                }
                let Ok(ram) = mapped else {
                    return;
                };
                for (region, spec) in ram.regions().iter().zip(&specs) {
                    assert_eq!(region.spec(), *spec);
                    let (addr, len, _, fd_offset) = region.registration();
                    assert_eq!(addr % 4096, 0);
                    assert_eq!(len % 4096, 0);
                    assert!(fd_offset <= spec.fd_offset && fd_offset % 4096 == 0);
                    assert!(spec.fd_offset - fd_offset + spec.size <= len as u64);
                }
                if let Ok(reg) = RegisteredRam::register(ram, &g.leaf) {
                    self.ram = Some(reg);
                }
            }
            Some(Msg::AttachQueue(a)) => {
                if self.graph.is_none() || self.queues.contains_key(&a.queue) {
                    return;
                }
                let Ok::<[File; 3], _>([ring, kick, call]) = fds.try_into() else {
                    return;
                };
                let Ok(layout) = RingLayout::new(a.entries, a.max_segments) else {
                    return;
                };
                let attached = QueueRings::attach(ring, layout);
                let bells = (Doorbell::from_peer(kick), Doorbell::from_peer(call));
                if crate::debug() {
                    eprintln!("attach: {:?}, doorbells {bells:?}", attached.as_ref().err());
                }
                let (Ok(rings), (Ok(_kick), Ok(_call))) = (attached, bells) else {
                    return;
                };
                let (rx, _) = rings.worker_end();
                self.queues.insert(a.queue, (rings, rx));
            }
            Some(Msg::DetachQueue(d)) => {
                self.queues.remove(&d.queue);
            }
        }
    }
}

/// Whether a plan holds one of the known overflows of the worker's stages.
fn known_overflow(plan: &ExportPlan) -> bool {
    plan.nodes.iter().any(|n| match &n.driver {
        Some(Driver::FaultInjection(f)) => f.rules.iter().any(|r| match r.action {
            Some(fault_rule::Action::DelayNs(d)) => d > u64::MAX / 4,
            Some(fault_rule::Action::Errno(e)) => e == i32::MIN,
            None => false,
        }),
        Some(Driver::Throttle(t)) => t.limits.iter().any(|l| {
            [
                l.iops_total,
                l.iops_read,
                l.iops_write,
                l.bps_total,
                l.bps_read,
                l.bps_write,
            ]
            .iter()
            .flatten()
            .any(|b| {
                // stages.rs Throttle::new: burst / rate seconds in ns.
                b.rate != 0
                    && b.burst.max(b.rate) as u128 * 1_000_000_000 / b.rate as u128 >= 1 << 62
            })
        }),
        _ => false,
    })
}

fn check_graph(g: &OpenedGraph) {
    let l = &g.limits;
    assert!(
        l.logical_block_size == 512 || l.logical_block_size == 4096,
        "{l:?}"
    );
    assert!(
        l.size > 0 && l.size % l.logical_block_size as u64 == 0,
        "{l:?}"
    );
    assert!(
        l.buf_alignment >= 1 && l.buf_alignment.is_power_of_two(),
        "{l:?}"
    );
    assert!(l.request_alignment >= 1, "{l:?}");
    assert!(l.max_transfer % 512 == 0, "{l:?}");
    assert!(g.stages.len() <= 16);
    assert!(matches!(g.leaf, Leaf::Null { .. }));
    let s = SplitLimits::new(l, g.discard_punches_holes);
    assert!(s.unit.is_power_of_two() && s.unit >= 512);
    assert!(s.max_transfer >= s.unit && s.max_segments >= 1);
}

/// Requests through the graph's stages, as the queue loop's `start` and
/// `advance` take them (the null leaf then completes them).
fn requests(r: &mut Reader<'_>, conn: &Conn) {
    let n = r.u8() % 8;
    let Some(g) = &conn.graph else { return };
    if conn.overflows {
        return;
    }
    let now = stages::now();
    for _ in 0..n {
        let op = Op::from_u8(r.u8() % 17).unwrap_or(Op::Read);
        let offset = r.u64();
        // Data requests reach 1024 segments of up to 4 GiB.
        let len = (r.u32() as u64) << (r.u8() % 11);
        // checks.rs check_range
        let l = &g.limits;
        let align = l.request_alignment.max(1) as u64;
        if offset.checked_add(len).is_none_or(|e| e > l.size)
            || offset % align != 0
            || len % align != 0
        {
            continue;
        }
        let mut at = offset;
        if crate::debug() {
            eprintln!("request {op:?} {offset}+{len} through {:?}", g.stages);
        }
        for stage in &g.stages {
            match stage {
                Stage::Window { offset: o } => {
                    at = at.checked_add(*o).expect("window offset overflows");
                }
                Stage::Faults(f) => match f.check(op, at, len, now) {
                    Verdict::Fail(errno) => {
                        // The pipeline completes with errno.ring_result(),
                        // which the frontend turns into a status.
                        let result = errno.ring_result();
                        assert!(result < 0, "a failure is a negative result");
                        blkmesh_frontend::request::status_of(result);
                        break;
                    }
                    Verdict::RetryAt(_) | Verdict::DelayUntil(_) | Verdict::Pass => {}
                    Verdict::Done(_) => break,
                },
                // Graphs opened here have no zone layer (no metadata file).
                Stage::Zoned(_) => {}
                Stage::Throttle(t) => {
                    let _ = t.admit(op, len, now);
                }
                // A qcow2 node's file must be a file leaf; graphs opened
                // here have a null leaf (checked in `check_graph`).
                Stage::Qcow2(_) => unreachable!("a qcow2 stage over a null leaf"),
            }
        }
    }
}

fn segment(r: &mut Reader<'_>) -> Segment {
    let region = r.u8() as u32;
    let kind = r.u8();
    let offset = if kind & 1 != 0 {
        r.u64()
    } else {
        r.u16() as u64
    };
    let len = if kind & 2 != 0 {
        r.u32()
    } else {
        r.u16() as u32
    };
    Segment {
        region,
        len,
        offset,
    }
}

fn segments(r: &mut Reader<'_>, conn: &Conn) {
    for _ in 0..r.u8() % 16 {
        let s = segment(r);
        let Some(ram) = &conn.ram else { continue };
        let ram = ram.ram();
        let got = ram.buf(&s);
        if crate::debug() {
            eprintln!("segment {s:?}: {got:?}");
        }
        let Ok(b) = got else {
            continue;
        };
        let region = &ram.regions()[s.region as usize];
        let (map, map_len, _, _) = region.registration();
        let p = b.as_ptr() as usize;
        assert!(p >= map && p + b.len() <= map + map_len, "{s:?} escapes");
        assert!(s.offset + s.len as u64 <= region.spec().size);
        if !b.is_empty() {
            touch(b.as_ptr());
            touch(b.as_ptr().wrapping_add(b.len() - 1));
        }
    }
}

fn pop(r: &mut Reader<'_>, conn: &mut Conn) {
    let n = r.u8() % 8;
    let empty = blkmesh_ipc::guest_ram::GuestRam::default();
    for (rings, rx) in conn.queues.values_mut() {
        let layout = rings.layout();
        for _ in 0..n {
            let got = rx.pop();
            if crate::debug() {
                eprintln!("popped: {got:?}");
            }
            match got {
                Ok(Some(Received::Request(req, segs))) => {
                    let ram = conn.ram.as_ref().map_or(&empty, |r| r.ram());
                    crate::ring::check_accepted(layout, &req, segs, ram);
                }
                Ok(Some(Received::Bad(b))) => {
                    if let Some(t) = b.tag {
                        assert!(t < layout.entries());
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        rx.release();
    }
}

// ------------------------------------------------------------------ seeds

fn datagram_seed(w: &mut Writer, reply: bool, fds: &[&dyn Fn(&mut Writer)], msg: &[u8]) {
    w.u8(0).u8(reply as u8 | (fds.len() as u8) << 1);
    for f in fds {
        f(w);
    }
    let mut b = vec![1u8];
    b.extend_from_slice(msg);
    w.bytes(&b);
}

fn open_msg() -> Vec<u8> {
    use blkmesh_proto::v1::*;
    let node = |name: &str, d: node_spec::Driver| NodeSpec {
        name: name.into(),
        driver: Some(d),
    };
    let plan = ExportPlan {
        commit_finish: String::new(),
        export: Some(VhostUserBlkExport {
            id: "e".into(),
            node: "faults".into(),
            socket: "/tmp/unused".into(),
            num_queues: 1,
            writable: true,
            ..Default::default()
        }),
        nodes: vec![
            node(
                "faults",
                Driver::FaultInjection(FaultInjectionOptions {
                    child: "limit".into(),
                    rules: vec![
                        FaultRule {
                            ops: vec![IoOp::Write as i32],
                            offset_start: 4096,
                            count: 1,
                            action: Some(fault_rule::Action::Errno(5)),
                            ..Default::default()
                        },
                        FaultRule {
                            probability: 0.5,
                            action: Some(fault_rule::Action::DelayNs(1000)),
                            ..Default::default()
                        },
                    ],
                    max_transfer: 65536,
                    max_segments: 4,
                    buf_alignment: 512,
                }),
            ),
            node(
                "limit",
                Driver::Throttle(ThrottleOptions {
                    child: "win".into(),
                    limits: Some(ThrottleLimits {
                        iops_total: Some(Bucket {
                            rate: 1000,
                            burst: 10,
                        }),
                        bps_write: Some(Bucket {
                            rate: 1 << 20,
                            burst: 0,
                        }),
                        ..Default::default()
                    }),
                    group: String::new(),
                }),
            ),
            node(
                "win",
                Driver::Raw(RawOptions {
                    child: "null".into(),
                    offset: 1 << 20,
                    size: 4 << 20,
                }),
            ),
            node(
                "null",
                Driver::Null(NullOptions {
                    size: 8 << 20,
                    latency_ns: 0,
                }),
            ),
        ],
        queues: vec![],
        generation: 1,
    };
    ipc::Request {
        msg: Some(ipc::request::Msg::Open(ipc::OpenExport {
            plan: Some(plan),
        })),
        id: 1,
    }
    .encode_to_vec()
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mem_table = ipc::Request {
        msg: Some(ipc::request::Msg::SetMemTable(ipc::SetMemTable {
            regions: vec![ipc::MemRegion {
                guest_addr: 0,
                size: 0x10000 - 100,
                fd_offset: 100,
            }],
        })),
        id: 1,
    }
    .encode_to_vec();
    let attach = ipc::Request {
        msg: Some(ipc::request::Msg::AttachQueue(ipc::AttachQueue {
            queue: 0,
            entries: 8,
            max_segments: 4,
            settle: true,
        })),
        id: 1,
    }
    .encode_to_vec();
    let detach = ipc::Request {
        msg: Some(ipc::request::Msg::DetachQueue(ipc::DetachQueue {
            queue: 0,
        })),
        id: 1,
    }
    .encode_to_vec();
    // Open, memory table, segments, attach (ring with a read entry), pop,
    // stage requests, detach.
    {
        let mut w = Writer::new();
        datagram_seed(&mut w, false, &[], &open_msg());
        datagram_seed(
            &mut w,
            false,
            &[&|w| {
                w.u8(5).u8(15);
            }],
            &mem_table,
        );
        w.u8(1).u8(3);
        w.u8(0).u8(0).u16(0).u16(4096);
        w.u8(0).u8(1).u64(0x10000 - 200).u16(100);
        w.u8(0).u8(1).u64(0x10000 - 200).u16(101);
        let ring = |w: &mut Writer| {
            w.u8(0).u8(3).u8(3).u8(2);
            // request producer index 1, entry 0: tag 0 read of 512 bytes.
            w.u32(64).bytes(&1u32.to_le_bytes());
            let mut e = [0u8; 48];
            e[4] = Op::Read as u8;
            e[6] = 1;
            e[16..24].copy_from_slice(&512u64.to_le_bytes());
            e[36..40].copy_from_slice(&512u32.to_le_bytes());
            e[40..48].copy_from_slice(&1024u64.to_le_bytes());
            w.u32(384).bytes(&e);
        };
        let efd = |w: &mut Writer| {
            w.u8(3);
        };
        datagram_seed(&mut w, false, &[&ring, &efd, &efd], &attach);
        w.u8(2).u8(4);
        w.u8(3).u8(4);
        w.u8(2).u64(4096).u32(4096).u8(0);
        w.u8(1).u64(0).u32(512).u8(0);
        w.u8(3).u64(0).u32(0).u8(0);
        w.u8(4).u64(8192).u32(1 << 10).u8(10);
        datagram_seed(&mut w, false, &[], &detach);
        out.push(("worker-session", w.buf));
    }
    // Replies as the frontend reads them.
    {
        let mut w = Writer::new();
        let opened = ipc::Reply {
            result: Some(ipc::reply::Result::Opened(ipc::Opened {
                limits: Some(ipc::Limits {
                    size: 1 << 30,
                    logical_block_size: 512,
                    physical_block_size: 4096,
                    request_alignment: 512,
                    buf_alignment: 512,
                    optimal_io_size: 65536,
                    max_transfer: 1 << 20,
                    max_segments: 64,
                    max_discard: 1 << 30,
                    max_write_zeroes: 1 << 30,
                    read_only: false,
                    zones: None,
                }),
            })),
            id: 1,
        };
        datagram_seed(&mut w, true, &[], &opened.encode_to_vec());
        w.u8(2).u8(3).bool(true);
        let failure = ipc::Reply {
            result: Some(ipc::reply::Result::Failure(ipc::Failure {
                errno: 22,
                message: "no such node".into(),
            })),
            id: 1,
        };
        datagram_seed(&mut w, true, &[], &failure.encode_to_vec());
        let ok = ipc::Reply {
            result: Some(ipc::reply::Result::Ok(ipc::Ok {})),
            id: 1,
        };
        datagram_seed(&mut w, true, &[], &ok.encode_to_vec());
        out.push(("frontend-replies", w.buf));
    }
    // Framing: wrong version byte, garbage, an empty datagram, oversize,
    // and fds the worker must refuse (unsealed ring, pipe for eventfd).
    {
        let mut w = Writer::new();
        w.u8(0).u8(0).bytes(&[2, 0x22, 0]);
        w.u8(0).u8(0).bytes(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        w.u8(0).u8(0).bytes(&[]);
        w.u8(0).u8(8).bytes(&[1]);
        datagram_seed(&mut w, false, &[], &open_msg());
        datagram_seed(
            &mut w,
            false,
            &[
                &|w| {
                    w.u8(2).u32(8192);
                },
                &|w| {
                    w.u8(4);
                },
                &|w| {
                    w.u8(3);
                },
            ],
            &attach,
        );
        out.push(("framing-and-fds", w.buf));
    }
    // A fault rule whose errno and delay are at the edges of their types.
    {
        let mut m = ipc::Request::decode(&open_msg()[..]).unwrap();
        if let Some(ipc::request::Msg::Open(o)) = &mut m.msg {
            if let Some(Driver::FaultInjection(f)) = &mut o.plan.as_mut().unwrap().nodes[0].driver {
                f.rules[0].action = Some(fault_rule::Action::Errno(-5));
                f.rules[1].probability = 0.0;
                f.rules[1].action = Some(fault_rule::Action::DelayNs(u64::MAX / 2));
            }
        }
        let mut w = Writer::new();
        datagram_seed(&mut w, false, &[], &m.encode_to_vec());
        w.u8(3).u8(2);
        w.u8(2).u64(4096).u32(512).u8(0);
        w.u8(1).u64(0).u32(512).u8(0);
        out.push(("fault-edges", w.buf));
    }
    out
}

fn open_with(edit: impl FnOnce(&mut ExportPlan)) -> Vec<u8> {
    let mut m = ipc::Request::decode(&open_msg()[..]).unwrap();
    if let Some(ipc::request::Msg::Open(o)) = &mut m.msg {
        edit(o.plan.as_mut().unwrap());
    }
    m.encode_to_vec()
}

/// Inputs for the known bugs (crash with `BLKMESH_FUZZ_KNOWN=1`, pass
/// otherwise): plans the worker opens without re-validating and then
/// overflows on. The manager refuses the first two; it accepts the third.
pub fn known() -> Vec<(&'static str, Vec<u8>)> {
    use blkmesh_proto::v1::Bucket;
    let mut out = Vec::new();
    let with_request = |msg: Vec<u8>, op: Op| {
        let mut w = Writer::new();
        datagram_seed(&mut w, false, &[], &msg);
        w.u8(3).u8(1).u8(op as u8).u64(8192).u32(512).u8(0);
        w.buf
    };
    let faults = |p: &mut ExportPlan| match &mut p.nodes[0].driver {
        Some(Driver::FaultInjection(f)) => f.rules.truncate(1),
        _ => unreachable!(),
    };
    // stages.rs Faults::check: `now + r.delay_ns`.
    out.push((
        "fault-delay-overflow",
        with_request(
            open_with(|p| {
                faults(p);
                if let Some(Driver::FaultInjection(f)) = &mut p.nodes[0].driver {
                    f.rules[0].action = Some(fault_rule::Action::DelayNs(u64::MAX));
                }
            }),
            Op::Write,
        ),
    ));
    // pipeline::Pipeline::run: `Outcome::Complete(errno.ring_result())`.
    out.push((
        "fault-errno-min",
        with_request(
            open_with(|p| {
                faults(p);
                if let Some(Driver::FaultInjection(f)) = &mut p.nodes[0].driver {
                    f.rules[0].action = Some(fault_rule::Action::Errno(i32::MIN));
                }
            }),
            Op::Write,
        ),
    ));
    // stages.rs Throttle::admit: `now + r.tolerance`, with a bucket the
    // manager accepts (rate 1/s, burst 18446744073 <= 10^15): the tolerance,
    // burst / rate seconds in ns, is u64::MAX - 709551615.
    out.push((
        "throttle-burst-overflow",
        with_request(
            open_with(|p| {
                faults(p);
                if let Some(Driver::FaultInjection(f)) = &mut p.nodes[0].driver {
                    f.rules[0].ops = vec![blkmesh_proto::v1::IoOp::Flush as i32];
                }
                if let Some(Driver::Throttle(t)) = &mut p.nodes[1].driver {
                    t.limits.as_mut().unwrap().iops_total = Some(Bucket {
                        rate: 1,
                        burst: 18_446_744_073,
                    });
                }
            }),
            Op::Read,
        ),
    ));
    out
}
