//! A real `blkmesh-worker` process serving an emulated zoned node, killed
//! with SIGKILL in the middle of a stream of zone appends and restarted:
//! the zone state it loads never has a write pointer past data that was
//! not written, every append that was acknowledged is below it, zone
//! conditions are kept, and the last acknowledged write of a zone may be
//! resubmitted (as the frontend does after a worker dies).
//!
//! The test plays the frontend: it speaks the control protocol on the
//! worker socket and drives a ring of its own, over a guest-RAM file.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkmesh_ipc::channel::Channel;
use blkmesh_ipc::notify::Doorbell;
use blkmesh_ipc::ring::{
    Completion, CompletionReceiver, Op, QueueRings, Request, RequestSender, RingLayout, Segment,
};
use blkmesh_proto::ipc::v1 as ipc;
use blkmesh_proto::v1::{
    node_spec::Driver, ExportPlan, IoUringOptions, NodeSpec, VhostUserBlkExport, Zone, ZoneAction,
    ZoneCondition, ZonedOptions,
};
use ipc::reply::Result as ReplyResult;
use ipc::request::Msg;

const ZONE: u64 = 1 << 20;
const ZONES: u64 = 8;
const BLOCK: u64 = 4096;
const ENTRIES: u32 = 64;
const RAM: u64 = ENTRIES as u64 * BLOCK;
const MAGIC: &[u8; 8] = b"ZTSTBLK!";

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    ram: File,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        File::create(&image).unwrap().set_len(ZONES * ZONE).unwrap();
        let ram = tempfile::tempfile().unwrap();
        ram.set_len(RAM).unwrap();
        Setup { dir, image, ram }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("worker.sock")
    }

    fn plan(&self) -> ExportPlan {
        ExportPlan {
            commit_finish: String::new(),
            export: Some(VhostUserBlkExport {
                id: "zdisk".into(),
                node: "z".into(),
                socket: self.dir.path().join("vhost.sock").display().to_string(),
                writable: true,
                num_queues: 1,
                ..Default::default()
            }),
            nodes: vec![
                NodeSpec {
                    name: "z".into(),
                    driver: Some(Driver::Zoned(ZonedOptions {
                        child: "file".into(),
                        zone_size: ZONE,
                        zone_capacity: 0,
                        max_open_zones: 0,
                        max_active_zones: 0,
                        metadata_path: self.dir.path().join("zones.meta").display().to_string(),
                    })),
                },
                NodeSpec {
                    name: "file".into(),
                    driver: Some(Driver::IoUring(IoUringOptions {
                        path: self.image.display().to_string(),
                        direct: false,
                        read_only: false,
                    })),
                },
            ],
            queues: vec![],
            generation: 0,
        }
    }

    fn spawn(&self) -> Child {
        let _ = std::fs::remove_file(self.socket());
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("worker.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_blkmesh-worker"))
            .args(["--name", "zw", "--socket"])
            .arg(self.socket())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket().exists() {
            assert!(Instant::now() < deadline, "worker socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }
}

/// One frontend connection to the worker, with the export open.
struct Conn {
    ch: Channel,
}

impl Conn {
    fn open(s: &Setup) -> Conn {
        // The socket file appears at bind(), before listen(): retry a
        // refused connection for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let ch = loop {
            match Channel::connect(&s.socket()) {
                Ok(ch) => break ch,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connecting to the worker: {e}\n{}", s.log()),
            }
        };
        ch.set_timeout(Some(Duration::from_secs(10))).unwrap();
        let c = Conn { ch };
        match c.call(
            Msg::Open(ipc::OpenExport {
                plan: Some(s.plan()),
            }),
            &[],
        ) {
            ReplyResult::Opened(o) => {
                let z = o.limits.unwrap().zones.unwrap();
                assert_eq!((z.zone_size, z.nr_zones), (ZONE, ZONES as u32));
            }
            other => panic!("open: {other:?}\n{}", s.log()),
        }
        c
    }

    fn call(&self, msg: Msg, fds: &[std::os::fd::BorrowedFd<'_>]) -> ReplyResult {
        self.ch
            .send(
                &ipc::Request {
                    msg: Some(msg),
                    id: 1,
                },
                fds,
            )
            .unwrap();
        let (reply, _): (ipc::Reply, _) = self.ch.recv().unwrap();
        reply.result.unwrap()
    }

    fn zones(&self, action: ZoneAction, offset: u64) -> Vec<Zone> {
        let msg = Msg::Zone(ipc::ZoneRequest {
            action: action as i32,
            offset,
            max_zones: 0,
        });
        match self.call(msg, &[]) {
            ReplyResult::Zones(z) => z.zones,
            other => panic!("zone {action:?} at {offset}: {other:?}"),
        }
    }

    /// Maps guest RAM and attaches queue 0.
    fn attach(&self, s: &Setup) -> Queue {
        let table = ipc::SetMemTable {
            regions: vec![ipc::MemRegion {
                guest_addr: 0,
                size: RAM,
                fd_offset: 0,
            }],
        };
        assert!(matches!(
            self.call(Msg::SetMemTable(table), &[s.ram.as_fd()]),
            ReplyResult::Ok(_)
        ));
        let layout = RingLayout::new(ENTRIES, 4).unwrap();
        let rings = QueueRings::create("zoned-restart", layout).unwrap();
        let (kick, call) = (Doorbell::new().unwrap(), Doorbell::new().unwrap());
        let attach = Msg::AttachQueue(ipc::AttachQueue {
            queue: 0,
            entries: ENTRIES,
            max_segments: 4,
            settle: false,
        });
        let reply = self.call(attach, &[rings.fd(), kick.as_fd(), call.as_fd()]);
        assert!(matches!(reply, ReplyResult::Ok(_)), "{reply:?}");
        let (tx, rx) = rings.frontend_end();
        Queue {
            _rings: rings,
            tx,
            rx,
            kick,
            _call: call,
        }
    }
}

struct Queue {
    _rings: QueueRings,
    tx: RequestSender,
    rx: CompletionReceiver,
    kick: Doorbell,
    _call: Doorbell,
}

impl Queue {
    fn push(&mut self, tag: u32, op: Op, offset: u64) {
        let seg = Segment {
            region: 0,
            len: BLOCK as u32,
            offset: tag as u64 * BLOCK,
        };
        let req = Request {
            tag,
            op,
            flags: 0,
            offset,
            len: BLOCK,
        };
        self.tx.push(&req, &[seg]).unwrap();
    }

    fn publish(&mut self) {
        self.tx.publish();
        self.kick.ring();
    }

    /// Completions already posted.
    fn drain(&mut self) -> Vec<Completion> {
        let mut out = Vec::new();
        while let Some(c) = self.rx.pop().unwrap() {
            out.push(c);
        }
        self.rx.release();
        out
    }

    fn wait(&mut self, n: usize) -> Vec<Completion> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(Instant::now() < deadline, "timed out: {out:?}");
            let got = self.drain();
            if got.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
            }
            out.extend(got);
        }
        out
    }
}

/// The block an append of sequence number `seq` to `zone` carries.
fn block(zone: u64, seq: u32) -> Vec<u8> {
    let mut b = vec![(seq % 251) as u8; BLOCK as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&zone.to_le_bytes());
    b[16..20].copy_from_slice(&seq.to_le_bytes());
    b
}

/// Checks the zones against the image: every block below a zone's write
/// pointer is one of ours for that zone, each at most once, and every
/// acknowledged block lies below it.
fn verify(s: &Setup, zones: &[Zone], acked: &[(u64, u32)], round: usize) {
    let image = std::fs::read(&s.image).unwrap();
    let mut seen = std::collections::HashSet::new();
    for (z, zone) in zones.iter().enumerate().take(4) {
        let wp = zone.write_pointer - zone.start;
        assert_eq!(wp % BLOCK, 0);
        for b in 0..wp / BLOCK {
            let at = (zone.start + b * BLOCK) as usize;
            let data = &image[at..at + BLOCK as usize];
            assert_eq!(
                &data[..8],
                MAGIC,
                "round {round}: zone {z} block {b} below the write pointer {wp} was never written"
            );
            let seq = u32::from_le_bytes(data[16..20].try_into().unwrap());
            assert_eq!(
                data,
                block(z as u64, seq),
                "round {round}: zone {z} block {b}"
            );
            assert!(
                seen.insert(seq),
                "round {round}: block {seq} appended twice"
            );
        }
    }
    for &(at, seq) in acked {
        let z = (at / ZONE) as usize;
        assert!(
            at + BLOCK <= zones[z].write_pointer,
            "round {round}: acknowledged append {seq} at {at} is past the write pointer {}",
            zones[z].write_pointer
        );
        assert_eq!(
            &image[at as usize..(at + BLOCK) as usize],
            block(z as u64, seq).as_slice()
        );
    }
}

#[test]
fn zone_state_survives_sigkill_of_the_worker() {
    let s = Setup::new();
    let mut seq = 0u32;
    // (landed at, sequence number) of every acknowledged append.
    let mut acked: Vec<(u64, u32)> = Vec::new();
    // Sequence numbers by tag of the requests in flight.
    let mut tags = [0u32; ENTRIES as usize];
    let mut append = |q: &mut Queue, tag: u32, tags: &mut [u32]| {
        let zone = seq as u64 % 4;
        s.ram
            .write_all_at(&block(zone, seq), tag as u64 * BLOCK)
            .unwrap();
        tags[tag as usize] = seq;
        q.push(tag, Op::ZoneAppend, zone * ZONE);
        seq += 1;
    };

    // Head starts the worker gets before it is killed, in µs.
    let delays = [50, 100, 200, 300, 400, 600, 1000, 2000];
    for (round, delay) in delays.into_iter().enumerate() {
        let mut worker = s.spawn();
        let conn = Conn::open(&s);
        let zones = conn.zones(ZoneAction::Unspecified, 0);
        assert_eq!(zones.len(), ZONES as usize);
        verify(&s, &zones, &acked, round);
        let mut q = conn.attach(&s);

        // Steady: a batch of appends, all acknowledged.
        for tag in 0..48 {
            append(&mut q, tag, &mut tags);
        }
        q.publish();
        for c in q.wait(48) {
            assert_eq!(c.result, 0, "{c:?}\n{}", s.log());
            acked.push((c.extra, tags[c.tag as usize]));
        }
        // A full ring of appends, and the worker dies while it works on
        // them (after a different head start each round).
        for tag in 0..ENTRIES {
            append(&mut q, tag, &mut tags);
        }
        q.publish();
        std::thread::sleep(Duration::from_micros(delay));
        worker.kill().unwrap();
        worker.wait().unwrap();
        let late = q.drain();
        eprintln!(
            "round {round}: {} of {ENTRIES} acknowledged before the kill",
            late.len()
        );
        for c in late {
            assert_eq!(c.result, 0, "{c:?}");
            acked.push((c.extra, tags[c.tag as usize]));
        }
        let landed: std::collections::HashSet<u64> = acked.iter().map(|a| a.0).collect();
        assert_eq!(
            landed.len(),
            acked.len(),
            "two appends landed at one offset"
        );
    }

    // Zone conditions and the last write of a zone across a restart.
    let mut worker = s.spawn();
    let conn = Conn::open(&s);
    let zones = conn.zones(ZoneAction::Unspecified, 0);
    verify(&s, &zones, &acked, delays.len());
    assert_eq!(
        conn.zones(ZoneAction::Open, 5 * ZONE)[0].condition,
        ZoneCondition::ExplicitOpen as i32
    );
    assert_eq!(
        conn.zones(ZoneAction::Finish, 6 * ZONE)[0].condition,
        ZoneCondition::Full as i32
    );
    let mut q = conn.attach(&s);
    s.ram.write_all_at(&block(4, 1000), 0).unwrap();
    s.ram.write_all_at(&block(4, 1001), BLOCK).unwrap();
    q.push(0, Op::Write, 4 * ZONE);
    q.publish();
    assert_eq!(q.wait(1)[0].result, 0);
    q.push(1, Op::Write, 4 * ZONE + BLOCK);
    q.publish();
    assert_eq!(q.wait(1)[0].result, 0);
    worker.kill().unwrap();
    worker.wait().unwrap();

    let mut worker = s.spawn();
    let conn = Conn::open(&s);
    let zones = conn.zones(ZoneAction::Unspecified, 0);
    let state = |z: usize| (zones[z].write_pointer - zones[z].start, zones[z].condition);
    assert_eq!(state(4), (2 * BLOCK, ZoneCondition::ImplicitOpen as i32));
    assert_eq!(state(5), (0, ZoneCondition::ExplicitOpen as i32));
    assert_eq!(state(6), (ZONE, ZoneCondition::Full as i32));
    assert_eq!(state(7), (0, ZoneCondition::Empty as i32));
    // The frontend resubmits the last write (its completion was lost with
    // the worker): accepted once, then the zone goes on.
    let mut q = conn.attach(&s);
    q.push(1, Op::Write, 4 * ZONE + BLOCK);
    q.publish();
    assert_eq!(q.wait(1)[0].result, 0);
    q.push(1, Op::Write, 4 * ZONE + BLOCK);
    q.publish();
    assert_eq!(
        q.wait(1)[0].result,
        blkmesh_ipc::ring::zone_status::UNALIGNED_WP
    );
    q.push(2, Op::Write, 4 * ZONE + 2 * BLOCK);
    q.publish();
    assert_eq!(q.wait(1)[0].result, 0);
    let z4 = &conn.zones(ZoneAction::Unspecified, 4 * ZONE)[0];
    assert_eq!(z4.write_pointer, 4 * ZONE + 3 * BLOCK);
    worker.kill().unwrap();
    worker.wait().unwrap();
}
