use super::*;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::memory::MemTable;
use blkmesh_ipc::ring::{zone_status, Op, Request, Segment, FLAG_NO_UNMAP};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
use crate::memory::RegionDesc;
use std::fs::File;

const MEM: u64 = 1 << 20;

fn setup() -> MemTable {
    let f: File = tempfile::tempfile().unwrap();
    f.set_len(MEM).unwrap();
    MemTable::new(
        &[RegionDesc {
            gpa: 0,
            size: MEM,
            vmm_addr: 0x1000_0000,
            fd_offset: 0,
        }],
        vec![f],
    )
    .unwrap()
}

fn dev() -> DeviceInfo {
    DeviceInfo {
        capacity: AtomicU64::new(1 << 20),
        writable: AtomicBool::new(true),
        max_discard_sectors: AtomicU32::new(2048),
        max_write_zeroes_sectors: AtomicU32::new(2048),
        max_segments: 8,
        serial: *b"serial-0123456789abc",
        stats: vec![],
    }
}

fn d(addr: u64, len: u32, writable: bool, has_next: bool) -> Desc {
    Desc {
        addr,
        len,
        writable,
        has_next,
    }
}

fn header(t: &MemTable, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    t.guest_memory().write_slice(&h, GuestAddress(0)).unwrap();
}

fn run(t: &MemTable, descs: &[Desc]) -> (Parsed, Vec<Segment>) {
    let status = check_chain(descs).unwrap();
    let mut segs = vec![];
    let p = parse(
        descs,
        status,
        t.guest_memory(),
        t,
        &dev(),
        7,
        &mut segs,
        &mut vec![],
    );
    (p, segs)
}

#[test]
fn read_becomes_one_segment_per_data_descriptor() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_IN, 8);
    let (p, segs) = run(
        &t,
        &[
            d(0, 16, false, true),
            d(4096, 4096, true, true),
            d(0x3000, 512, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.used_len, 4096 + 512 + 1);
    assert_eq!(
        p.action,
        Action::Submit(Request {
            tag: 7,
            op: Op::Read,
            flags: 0,
            offset: 4096,
            len: 4608
        })
    );
    assert_eq!(segs.len(), 2);
    assert_eq!(p.status, 100);
}

#[test]
fn header_and_data_may_share_a_descriptor() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_OUT, 0);
    let (p, segs) = run(&t, &[d(0, 16 + 512, false, true), d(600, 1, true, false)]);
    assert!(matches!(
        p.action,
        Action::Submit(Request {
            op: Op::Write,
            len: 512,
            ..
        })
    ));
    assert_eq!(segs[0].offset, 16);
}

#[test]
fn rejects_truncated_chain() {
    assert_eq!(
        check_chain(&[d(0, 16, false, true)]),
        Err(ChainError::Truncated)
    );
    assert_eq!(check_chain(&[]), Err(ChainError::Empty));
}

#[test]
fn rejects_readable_after_writable() {
    assert_eq!(
        check_chain(&[
            d(0, 16, false, true),
            d(16, 512, true, true),
            d(600, 1, false, false)
        ]),
        Err(ChainError::Order)
    );
}

#[test]
fn rejects_chain_without_status() {
    assert_eq!(
        check_chain(&[d(0, 16, false, false)]),
        Err(ChainError::NoStatus)
    );
}

#[test]
fn read_past_capacity_is_ioerr() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_IN, 2047);
    let (p, _) = run(
        &t,
        &[
            d(0, 16, false, true),
            d(4096, 1024, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
    header(&t, VIRTIO_BLK_T_IN, u64::MAX / 256);
    let (p, _) = run(
        &t,
        &[
            d(0, 16, false, true),
            d(4096, 512, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
}

#[test]
fn writes_to_read_only_device_are_ioerr() {
    let t = setup();
    let ro = dev();
    ro.writable.store(false, Relaxed);
    for kind in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        header(&t, kind, 0);
        let descs = [d(0, 32, false, true), d(100, 1, true, false)];
        let status = check_chain(&descs).unwrap();
        let p = parse(
            &descs,
            status,
            t.guest_memory(),
            &t,
            &ro,
            1,
            &mut vec![],
            &mut vec![],
        );
        assert_eq!(
            p.action,
            Action::Complete(status_code(VIRTIO_BLK_S_IOERR)),
            "type {kind}"
        );
    }
}

#[test]
fn misaligned_length_is_ioerr() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_IN, 0);
    let (p, _) = run(
        &t,
        &[
            d(0, 16, false, true),
            d(4096, 100, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
}

#[test]
fn data_outside_guest_memory_is_ioerr() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_IN, 0);
    let (p, _) = run(
        &t,
        &[
            d(0, 16, false, true),
            d(MEM - 256, 512, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
}

#[test]
fn unknown_type_is_unsupported() {
    let t = setup();
    header(&t, 0x77, 0);
    let (p, _) = run(&t, &[d(0, 16, false, true), d(100, 1, true, false)]);
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_UNSUPP)));
}

#[test]
fn get_id_writes_the_serial() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_GET_ID, 0);
    let (p, _) = run(
        &t,
        &[
            d(0, 16, false, true),
            d(4096, 20, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, Action::Complete(Status::Ok));
    let mut id = [0u8; 20];
    t.guest_memory()
        .read_slice(&mut id, GuestAddress(4096))
        .unwrap();
    assert_eq!(&id, b"serial-0123456789abc");
}

#[test]
fn write_zeroes_carries_unmap_choice() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&16u32.to_le_bytes());
    t.guest_memory()
        .write_slice(&seg, GuestAddress(16))
        .unwrap();
    let (p, _) = run(&t, &[d(0, 32, false, true), d(100, 1, true, false)]);
    assert_eq!(
        p.action,
        Action::Submit(Request {
            tag: 7,
            op: Op::WriteZeroes,
            flags: FLAG_NO_UNMAP,
            offset: 4096,
            len: 8192
        })
    );
    seg[12..16].copy_from_slice(&0x80u32.to_le_bytes());
    t.guest_memory()
        .write_slice(&seg, GuestAddress(16))
        .unwrap();
    let (p, _) = run(&t, &[d(0, 32, false, true), d(100, 1, true, false)]);
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_UNSUPP)));
}

#[test]
fn maps_errno_to_status() {
    assert_eq!(status_of(0), Status::Ok);
    assert_eq!(
        status_of(-libc::EOPNOTSUPP),
        status_code(VIRTIO_BLK_S_UNSUPP)
    );
    assert_eq!(status_of(-libc::EIO), status_code(VIRTIO_BLK_S_IOERR));
}

const ZONE: u64 = 64 << 10;

fn zones(max_append_sectors: u32) -> ZoneLimits {
    ZoneLimits {
        zone_size: AtomicU64::new(ZONE),
        max_append_sectors: AtomicU32::new(max_append_sectors),
    }
}

fn run_zoned(
    t: &MemTable,
    dev: &DeviceInfo,
    z: Option<&ZoneLimits>,
    descs: &[Desc],
) -> (Parsed, Vec<Segment>) {
    let status = check_chain(descs).unwrap();
    let mut segs = vec![];
    let p = parse_with_zones(
        descs,
        status,
        t.guest_memory(),
        t,
        dev,
        z,
        3,
        &mut segs,
        &mut vec![],
    );
    (p, segs)
}

fn submitted(op: Op, offset: u64, len: u64) -> Action {
    Action::Submit(Request {
        tag: 3,
        op,
        flags: 0,
        offset,
        len,
    })
}

const ZONE_TYPES: [u32; 7] = [
    VIRTIO_BLK_T_ZONE_APPEND,
    VIRTIO_BLK_T_ZONE_REPORT,
    VIRTIO_BLK_T_ZONE_OPEN,
    VIRTIO_BLK_T_ZONE_CLOSE,
    VIRTIO_BLK_T_ZONE_FINISH,
    VIRTIO_BLK_T_ZONE_RESET,
    VIRTIO_BLK_T_ZONE_RESET_ALL,
];

#[test]
fn zone_requests_are_unsupported_without_zoned() {
    let t = setup();
    let not_zoned = ZoneLimits::default();
    for kind in ZONE_TYPES {
        header(&t, kind, 0);
        let descs = [
            d(0, 16, false, true),
            d(4096, 512, false, true),
            d(8192, 4096, true, true),
            d(100, 1, true, false),
        ];
        // ZONED not negotiated, or negotiated with a graph that is not
        // (or no longer) zoned.
        for z in [None, Some(&not_zoned)] {
            let (p, segs) = run_zoned(&t, &dev(), z, &descs);
            assert_eq!(
                p.action,
                Action::Complete(status_code(VIRTIO_BLK_S_UNSUPP)),
                "type {kind}"
            );
            assert!(segs.is_empty());
        }
        assert!(RequestType::from_code(kind).is_some_and(RequestType::is_zone_request));
    }
    assert!(!RequestType::GetId.is_zone_request());
}

#[test]
fn zone_report_fills_the_writable_buffer() {
    let t = setup();
    let z = zones(128);
    // Any sector inside the first zone to report.
    header(&t, VIRTIO_BLK_T_ZONE_REPORT, 130);
    let (p, segs) = run_zoned(
        &t,
        &dev(),
        Some(&z),
        &[
            d(0, 16, false, true),
            d(4096, 4096, true, true),
            d(0x3000, 64, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, submitted(Op::ZoneReport, 130 * 512, 4160));
    assert_eq!(p.used_len, 4161);
    assert_eq!(segs.len(), 2);
    assert_eq!(p.request_type, Some(RequestType::ZoneReport));
    // No room for the report header.
    let (p, _) = run_zoned(
        &t,
        &dev(),
        Some(&z),
        &[
            d(0, 16, false, true),
            d(4096, 63, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(
        p.action,
        Action::Complete(status_code(VIRTIO_BLK_S_ZONE_INVALID_CMD))
    );
    // Past the end, or overflowing.
    for sector in [2048, u64::MAX / 256] {
        header(&t, VIRTIO_BLK_T_ZONE_REPORT, sector);
        let (p, _) = run_zoned(
            &t,
            &dev(),
            Some(&z),
            &[
                d(0, 16, false, true),
                d(4096, 4096, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(
            p.action,
            Action::Complete(status_code(VIRTIO_BLK_S_ZONE_INVALID_CMD)),
            "sector {sector}"
        );
    }
    // A buffer outside guest memory.
    header(&t, VIRTIO_BLK_T_ZONE_REPORT, 0);
    let (p, _) = run_zoned(
        &t,
        &dev(),
        Some(&z),
        &[
            d(0, 16, false, true),
            d(MEM - 32, 4096, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
}

#[test]
fn zone_append_takes_readable_data_and_returns_a_sector() {
    let t = setup();
    let z = zones(16);
    let append = |data: u32, tail: u32| {
        vec![
            d(0, 16, false, true),
            d(4096, data, false, true),
            d(8192, tail, true, false),
        ]
    };
    header(&t, VIRTIO_BLK_T_ZONE_APPEND, ZONE / 512);
    let (p, segs) = run_zoned(&t, &dev(), Some(&z), &append(4096, 9));
    assert_eq!(p.action, submitted(Op::ZoneAppend, ZONE, 4096));
    assert_eq!(p.used_len, 9);
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].len, 4096);
    // append_sector and status may be split across descriptors.
    let (p, _) = run_zoned(
        &t,
        &dev(),
        Some(&z),
        &[
            d(0, 16 + 512, false, true),
            d(8192, 4, true, true),
            d(9000, 5, true, false),
        ],
    );
    assert_eq!(p.action, submitted(Op::ZoneAppend, ZONE, 512));
    let cases: Vec<(&str, u64, Vec<Desc>, u32)> = vec![
        (
            "not a zone start",
            ZONE / 512 + 8,
            append(4096, 9),
            VIRTIO_BLK_S_ZONE_INVALID_CMD,
        ),
        (
            "past the end",
            MEM / 512,
            append(4096, 9),
            VIRTIO_BLK_S_ZONE_INVALID_CMD,
        ),
        (
            "sector overflows",
            u64::MAX / 256,
            append(4096, 9),
            VIRTIO_BLK_S_ZONE_INVALID_CMD,
        ),
        (
            "more than max_append_sectors",
            0,
            append(8192 + 512, 9),
            VIRTIO_BLK_S_ZONE_INVALID_CMD,
        ),
        ("no data", 0, append(0, 9), VIRTIO_BLK_S_IOERR),
        ("partial sector", 0, append(100, 9), VIRTIO_BLK_S_IOERR),
        (
            "no room for append_sector",
            0,
            append(4096, 1),
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "data in the writable part",
            0,
            append(4096, 4096 + 9),
            VIRTIO_BLK_S_IOERR,
        ),
    ];
    for (what, sector, descs, st) in cases {
        header(&t, VIRTIO_BLK_T_ZONE_APPEND, sector);
        let descs: Vec<Desc> = descs.into_iter().filter(|d| d.len > 0).collect();
        let (p, segs) = run_zoned(&t, &dev(), Some(&z), &descs);
        assert_eq!(p.action, Action::Complete(status_code(st)), "{what}");
        assert!(segs.is_empty(), "{what}");
    }
    // A device without appends: UNSUPP.
    header(&t, VIRTIO_BLK_T_ZONE_APPEND, 0);
    let (p, _) = run_zoned(&t, &dev(), Some(&zones(0)), &append(4096, 9));
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_UNSUPP)));
    // A read-only device: IOERR.
    let ro = dev();
    ro.writable.store(false, Relaxed);
    let (p, _) = run_zoned(&t, &ro, Some(&z), &append(4096, 9));
    assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
}

#[test]
fn zone_management_acts_on_zone_starts() {
    let t = setup();
    let z = zones(16);
    let descs = [d(0, 16, false, true), d(100, 1, true, false)];
    for (kind, op) in [
        (VIRTIO_BLK_T_ZONE_OPEN, Op::ZoneOpen),
        (VIRTIO_BLK_T_ZONE_CLOSE, Op::ZoneClose),
        (VIRTIO_BLK_T_ZONE_FINISH, Op::ZoneFinish),
        (VIRTIO_BLK_T_ZONE_RESET, Op::ZoneReset),
    ] {
        header(&t, kind, 3 * ZONE / 512);
        let (p, segs) = run_zoned(&t, &dev(), Some(&z), &descs);
        assert_eq!(p.action, submitted(op, 3 * ZONE, 0), "type {kind}");
        assert_eq!(p.used_len, 1);
        assert!(segs.is_empty());
        for bad in [3 * ZONE / 512 + 1, MEM / 512, u64::MAX / 256] {
            header(&t, kind, bad);
            let (p, _) = run_zoned(&t, &dev(), Some(&z), &descs);
            assert_eq!(
                p.action,
                Action::Complete(status_code(VIRTIO_BLK_S_ZONE_INVALID_CMD)),
                "type {kind} sector {bad}"
            );
        }
    }
    // Reset-all ignores the sector.
    header(&t, VIRTIO_BLK_T_ZONE_RESET_ALL, 12345);
    let (p, _) = run_zoned(&t, &dev(), Some(&z), &descs);
    assert_eq!(p.action, submitted(Op::ZoneResetAll, 0, 0));
    // Changing zones is writing: not on a read-only device.
    let ro = dev();
    ro.writable.store(false, Relaxed);
    for kind in [VIRTIO_BLK_T_ZONE_OPEN, VIRTIO_BLK_T_ZONE_RESET_ALL] {
        header(&t, kind, 0);
        let (p, _) = run_zoned(&t, &ro, Some(&z), &descs);
        assert_eq!(p.action, Action::Complete(status_code(VIRTIO_BLK_S_IOERR)));
    }
    // A report still works there.
    header(&t, VIRTIO_BLK_T_ZONE_REPORT, 0);
    let (p, _) = run_zoned(
        &t,
        &ro,
        Some(&z),
        &[
            d(0, 16, false, true),
            d(4096, 128, true, true),
            d(100, 1, true, false),
        ],
    );
    assert_eq!(p.action, submitted(Op::ZoneReport, 0, 128));
}

#[test]
fn peeks_at_headers() {
    let t = setup();
    header(&t, VIRTIO_BLK_T_OUT, 77);
    let descs = [
        d(0, 8, false, true),
        d(8, 8 + 512, false, true),
        d(100, 1, true, false),
    ];
    assert_eq!(
        peek_header(&descs, t.guest_memory()).map(|h| (h.request_type(), h.sector())),
        Some((Some(RequestType::Out), 77))
    );
    assert_eq!(
        peek_header(&[d(100, 1, true, false)], t.guest_memory()),
        None
    );
}

#[test]
fn zone_results_map_to_zone_statuses_only_when_negotiated() {
    let cases = [
        (zone_status::INVALID_CMD, VIRTIO_BLK_S_ZONE_INVALID_CMD),
        (zone_status::UNALIGNED_WP, VIRTIO_BLK_S_ZONE_UNALIGNED_WP),
        (zone_status::OPEN_RESOURCE, VIRTIO_BLK_S_ZONE_OPEN_RESOURCE),
        (
            zone_status::ACTIVE_RESOURCE,
            VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
        ),
    ];
    for (result, st) in cases {
        assert_eq!(zoned_status_of(result), status_code(st));
        assert_eq!(status_of(result), status_code(VIRTIO_BLK_S_IOERR));
    }
    assert_eq!(zoned_status_of(0), Status::Ok);
    assert_eq!(zoned_status_of(-libc::EIO), status_code(VIRTIO_BLK_S_IOERR));
    assert_eq!(
        zoned_status_of(-libc::EOPNOTSUPP),
        status_code(VIRTIO_BLK_S_UNSUPP)
    );
    assert_eq!(zoned_status_of(i32::MIN), status_code(VIRTIO_BLK_S_IOERR));
    assert_eq!(
        RequestType::ZoneAppend.op_kind(),
        Some(blkmesh_stats::OpKind::Write)
    );
    assert_eq!(RequestType::ZoneReset.op_kind(), None);
}

fn put_desc(t: &MemTable, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    t.guest_memory()
        .write_slice(&raw, GuestAddress(table + i as u64 * 16))
        .unwrap();
}

#[test]
fn walks_direct_and_indirect_chains() {
    let t = setup();
    let gm = t.guest_memory();
    let mut out = Vec::new();
    // head 2 -> 5 -> 1 (last writable)
    put_desc(&t, 0x1000, 2, 0x8000, 16, VIRTQ_DESC_F_NEXT, 5);
    put_desc(
        &t,
        0x1000,
        5,
        0x9000,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        1,
    );
    put_desc(&t, 0x1000, 1, 0xa000, 1, VIRTQ_DESC_F_WRITE, 0);
    walk_chain(gm, 0x1000, 8, 2, &mut out).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[1], d(0x9000, 512, true, true));
    assert_eq!(out[2], d(0xa000, 1, true, false));
    // head 3 is an indirect table of two entries.
    put_desc(&t, 0x1000, 3, 0x2000, 32, VIRTQ_DESC_F_INDIRECT, 0);
    put_desc(&t, 0x2000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(&t, 0x2000, 1, 0xa000, 1, VIRTQ_DESC_F_WRITE, 0);
    walk_chain(gm, 0x1000, 8, 3, &mut out).unwrap();
    assert_eq!(
        out,
        vec![d(0x8000, 16, false, true), d(0xa000, 1, true, false)]
    );
}

#[test]
fn refuses_broken_chains() {
    let t = setup();
    let gm = t.guest_memory();
    let mut out = Vec::new();
    assert_eq!(
        walk_chain(gm, 0x1000, 8, 8, &mut out),
        Err(WalkError::Index(8))
    );
    // A loop: 0 -> 1 -> 0.
    put_desc(&t, 0x1000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(&t, 0x1000, 1, 0x8000, 16, VIRTQ_DESC_F_NEXT, 0);
    assert_eq!(walk_chain(gm, 0x1000, 8, 0, &mut out), Err(WalkError::Loop));
    // next out of the table.
    put_desc(&t, 0x1000, 2, 0x8000, 16, VIRTQ_DESC_F_NEXT, 9);
    assert_eq!(
        walk_chain(gm, 0x1000, 8, 2, &mut out),
        Err(WalkError::Index(9))
    );
    // Indirect with NEXT, nested, or of a partial length.
    put_desc(
        &t,
        0x1000,
        3,
        0x2000,
        32,
        VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
        0,
    );
    assert_eq!(
        walk_chain(gm, 0x1000, 8, 3, &mut out),
        Err(WalkError::Indirect)
    );
    put_desc(&t, 0x1000, 4, 0x2000, 20, VIRTQ_DESC_F_INDIRECT, 0);
    assert_eq!(
        walk_chain(gm, 0x1000, 8, 4, &mut out),
        Err(WalkError::Indirect)
    );
    put_desc(&t, 0x1000, 5, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    put_desc(&t, 0x3000, 0, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    assert_eq!(
        walk_chain(gm, 0x1000, 8, 5, &mut out),
        Err(WalkError::Indirect)
    );
    // Table outside guest memory.
    assert_eq!(
        walk_chain(gm, MEM - 8, 8, 0, &mut out),
        Err(WalkError::Unreadable)
    );
    assert_eq!(
        walk_chain(gm, u64::MAX - 8, 8, 1, &mut out),
        Err(WalkError::Unreadable)
    );
}

/// The status a virtio status code names.
fn status_code(code: u32) -> Status {
    Status::from_code(code as u8).unwrap()
}
