//! Zoned block devices end to end: a `zoned` node (host-managed emulation
//! over an io_uring image) exported by the real manager, worker and
//! frontend, seen by a guest through vhost-user (blkmesh's own driver,
//! which negotiates VIRTIO_BLK_F_ZONED), through `blkmesh-io`, and through
//! the manager's ZoneService. Also: zone requests on a regular export, and
//! `blkmesh-io --driver native` printing what libblkio's driver prints.
//! Build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use blkmesh_proto::v1::event::Kind;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::zone_service_client::ZoneServiceClient;
use blkmesh_proto::v1::{
    ExportState, ManageZoneRequest, NodeSpec, ReportZonesRequest, WatchEventsRequest, ZoneAction,
    ZoneCondition, ZoneModel, ZoneType, ZonedOptions,
};
use blkmesh_testkit::{Cluster, ClusterOptions, ExportOpts};
use blkmesh_vhost_user_client::{
    Error as VuError, Options, RequestSpec, Token, VhostUserBlk, ZoneDescriptor, ZoneState,
    ZoneType as VuZoneType, F_ZONED, S_IOERR, S_UNSUPP, S_ZONE_ACTIVE_RESOURCE, S_ZONE_INVALID_CMD,
    S_ZONE_OPEN_RESOURCE, S_ZONE_UNALIGNED_WP, T_ZONE_CLOSE, T_ZONE_FINISH, T_ZONE_OPEN,
    T_ZONE_REPORT, T_ZONE_RESET, T_ZONE_RESET_ALL,
};

const MIB: u64 = 1 << 20;
/// Zone geometry of the test node.
const ZONE: u64 = MIB;
const ZONE_SECTORS: u64 = ZONE / 512;
const ZONE_CAP: u64 = 768 << 10;
const DISK: u64 = 16 * MIB;
const NR_ZONES: u64 = DISK / ZONE;
const T: Duration = Duration::from_secs(10);
/// VIRTIO_BLK_F_DISCARD.
const F_DISCARD: u32 = 13;

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

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs blkmesh-io on `socket` with `args` then `-c` for each command.
fn io(cluster: &Cluster, socket: &Path, args: &[&str], cmds: &[&str]) -> Output {
    let mut v: Vec<String> = vec![
        "--socket".into(),
        socket.display().to_string(),
        "--timeout".into(),
        "20".into(),
    ];
    v.extend(args.iter().map(|a| a.to_string()));
    for c in cmds {
        v.push("-c".into());
        v.push((*c).into());
    }
    cluster.run_tool("blkmesh-io", v)
}

/// Drops the lines that carry timings (qemu-io style rate lines).
fn without_rates(s: &str) -> String {
    s.lines()
        .filter(|l| !(l.contains(" ops; ") && l.contains("/sec")))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn zoned_spec(cluster: &Cluster, name: &str, child: &str, open: u32, active: u32) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Zoned(ZonedOptions {
            child: child.into(),
            zone_size: ZONE,
            zone_capacity: ZONE_CAP,
            max_open_zones: open,
            max_active_zones: active,
            metadata_path: cluster
                .dir()
                .join(format!("{name}.zones"))
                .display()
                .to_string(),
        })),
    }
}

/// A cluster with export `z`: a zoned node (1 MiB zones of 768 KiB
/// capacity, `open`/`active` limits) over a 16 MiB image.
fn zoned_export(queues: u32, open: u32, active: u32) -> (Cluster, PathBuf) {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("disk.img", DISK);
    cluster.add_io_uring("disk", &image, false, false).unwrap();
    cluster
        .client()
        .add_node(zoned_spec(&cluster, "zoned", "disk", open, active))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("z", "zoned").writable().queues(queues))
        .unwrap();
    (cluster, socket)
}

fn connect(socket: &Path, queues: u16) -> VhostUserBlk {
    VhostUserBlk::connect(socket, Options::default().queues(queues).timeout(T)).unwrap()
}

fn zone_of(blk: &mut VhostUserBlk, zone: u64) -> ZoneDescriptor {
    let z = blk.zone_report(0, zone * ZONE_SECTORS, 1).unwrap();
    assert_eq!(z.len(), 1, "{z:?}");
    assert_eq!(z[0].start, zone * ZONE_SECTORS);
    z[0]
}

fn state(blk: &mut VhostUserBlk, zone: u64) -> ZoneState {
    zone_of(blk, zone).state
}

#[track_caller]
fn fails_with(r: Result<impl std::fmt::Debug, VuError>, status: u8, what: &str) {
    match r {
        Err(e) if e.status() == Some(status) => {}
        other => panic!("{what}: expected status {status}, got {other:?}"),
    }
}

// ===================== regular exports =====================

#[test]
fn zone_requests_on_a_regular_export_are_unsupported() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("plain.img", 16 * MIB);
    cluster.add_io_uring("plain", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("plain", "plain").writable())
        .unwrap();
    {
        let mut blk = connect(&socket, 1);
        assert!(
            !blk.has_feature(F_ZONED),
            "ZONED offered by a regular export"
        );
        assert!(!blk.cached_config().unwrap().is_zoned());
        let specs = [
            RequestSpec::zone_append(0, &[1; 4096]),
            RequestSpec::zone_report(0, 4),
            RequestSpec::zone_mgmt(T_ZONE_OPEN, 0),
            RequestSpec::zone_mgmt(T_ZONE_CLOSE, 0),
            RequestSpec::zone_mgmt(T_ZONE_FINISH, 0),
            RequestSpec::zone_mgmt(T_ZONE_RESET, 0),
            RequestSpec::zone_mgmt(T_ZONE_RESET_ALL, 0),
        ];
        for spec in specs {
            let c = blk.run(0, &spec).unwrap();
            assert_eq!(c.status, Some(S_UNSUPP), "type {}", spec.req_type);
        }
        // The helpers refuse before sending.
        assert!(matches!(
            blk.zone_report(0, 0, 1),
            Err(VuError::Unsupported(_))
        ));
        blk.write(0, 0, &[7; 4096]).unwrap();
        assert!(blk.read(0, 0, 4096).unwrap() == vec![7; 4096]);
    }
    // blkmesh-io picks the native driver for zone commands and shows the
    // device's answer.
    let out = io(
        &cluster,
        &socket,
        &["--keep-going"],
        &["zone_report", "zone_reset_all", "read -P 7 0 4k"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("zone_report failed: EOPNOTSUPP (Operation not supported)"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("zone_reset_all failed: EOPNOTSUPP"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("read 4096/4096 bytes at offset 0"),
        "{}",
        text(&out)
    );
    // libblkio's driver cannot send zone requests: a usage error.
    let out = io(&cluster, &socket, &["--driver", "blkio"], &["zone_report"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("zone commands need --driver native"));
}

#[test]
fn native_driver_prints_what_libblkio_prints() {
    let cluster = Cluster::start(ClusterOptions::default());
    let image = cluster.sparse_image("disk0.img", 16 * MIB);
    cluster.add_io_uring("disk0", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("disk0", "disk0").writable().queues(2))
        .unwrap();
    let scripts: Vec<Vec<&str>> = vec![
        vec!["info"],
        vec![
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "writev -P 0x11 1M 4k 512 3584",
            "readv -P 0x11 1M 512 7680",
            "write -q 1 -P 0x22 2M 1M",
            "read -q 1 -P 0x22 2M 1M",
        ],
        vec![
            "flush",
            "discard 0 64k",
            "read -P 0 0 64k",
            "write_zeroes 1M 8k",
            "read -P 0 1M 8k",
            "write_zeroes -u 1M 8k",
        ],
        // Errors: past the end, a misaligned start, a pattern mismatch.
        vec![
            "read 16M 4k",
            "write 16M 4k",
            "read 100 512",
            "discard 100 512",
            "read 0 4k",
            "read -P 0x99 2M 4k",
        ],
    ];
    for cmds in &scripts {
        let mut outs = Vec::new();
        for driver in ["blkio", "native"] {
            for json in [false, true] {
                let mut args = vec!["--keep-going", "--queues", "2", "--driver", driver];
                if json {
                    args.push("--json");
                }
                let out = io(&cluster, &socket, &args, cmds);
                let mut s = without_rates(&String::from_utf8_lossy(&out.stdout));
                if json {
                    // Timings differ; everything else must not.
                    s = s
                        .lines()
                        .map(|l| {
                            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                            if let Some(o) = v.as_object_mut() {
                                o.remove("elapsed_us");
                            }
                            format!("{v}\n")
                        })
                        .collect();
                }
                s.push_str(&format!(
                    "exit {:?}\n{}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr)
                ));
                outs.push((driver, json, s));
            }
        }
        for json in [false, true] {
            let pick = |d: &str| {
                outs.iter()
                    .find(|(dr, j, _)| *dr == d && *j == json)
                    .map(|(_, _, s)| s.clone())
                    .unwrap()
            };
            assert_eq!(
                pick("blkio"),
                pick("native"),
                "{cmds:?} (json {json}): libblkio's output, then the native driver's"
            );
        }
    }
}

// ===================== zoned exports: the guest's view =====================

#[test]
fn zoned_export_reports_zones_and_moves_the_write_pointer() {
    let (_cluster, socket) = zoned_export(1, 4, 8);
    let mut blk = connect(&socket, 1);
    assert!(blk.has_feature(F_ZONED), "ZONED not negotiated");
    assert!(
        !blk.has_feature(F_DISCARD),
        "DISCARD offered with the host-managed model"
    );
    let cfg = blk.config().unwrap();
    assert_eq!(cfg.zoned_model, blkmesh_vhost_user_client::zone::Z_HM);
    assert_eq!(cfg.zone_sectors as u64, ZONE_SECTORS);
    assert_eq!((cfg.max_open_zones, cfg.max_active_zones), (4, 8));
    assert!(cfg.max_append_sectors > 0 && cfg.max_append_sectors as u64 <= ZONE_SECTORS);
    assert!(cfg.write_granularity >= 512, "{cfg:?}");
    assert_eq!(cfg.capacity_bytes(), DISK);

    let zones = blk.zone_report(0, 0, 64).unwrap();
    assert_eq!(zones.len() as u64, NR_ZONES);
    for (i, z) in zones.iter().enumerate() {
        let start = i as u64 * ZONE_SECTORS;
        assert_eq!(
            (z.start, z.capacity, z.write_pointer),
            (start, ZONE_CAP / 512, start),
            "zone {i}"
        );
        assert_eq!(z.state, ZoneState::Empty, "zone {i}");
        assert_eq!(z.zone_type, VuZoneType::SequentialWriteRequired, "zone {i}");
    }
    // A report from a sector inside a zone starts at that zone.
    let from_mid = blk.zone_report(0, 3 * ZONE_SECTORS + 5, 2).unwrap();
    assert_eq!(from_mid[0].start, 3 * ZONE_SECTORS);
    assert_eq!(from_mid.len(), 2);

    // Write the first sectors of zone 1: its write pointer moves.
    let data = pattern(1, 8192);
    blk.write(0, ZONE_SECTORS, &data).unwrap();
    let z1 = zone_of(&mut blk, 1);
    assert_eq!(z1.write_pointer, ZONE_SECTORS + 16);
    assert_eq!(z1.state, ZoneState::ImplicitOpen);
    assert!(blk.read(0, ZONE_SECTORS, 8192).unwrap() == data);
    blk.write(0, ZONE_SECTORS + 16, &pattern(2, 4096)).unwrap();
    assert_eq!(zone_of(&mut blk, 1).write_pointer, ZONE_SECTORS + 24);
    // Writes not at the write pointer: before it, after it.
    fails_with(
        blk.write(0, ZONE_SECTORS, &[1; 4096]),
        S_ZONE_UNALIGNED_WP,
        "write below the write pointer",
    );
    fails_with(
        blk.write(0, ZONE_SECTORS + 64, &[1; 4096]),
        S_ZONE_UNALIGNED_WP,
        "write past the write pointer",
    );
    // Past the zone capacity.
    fails_with(
        blk.write(0, ZONE_SECTORS + 24, &vec![1; ZONE_CAP as usize]),
        S_ZONE_INVALID_CMD,
        "write past the zone capacity",
    );
    // Filling the zone to its capacity makes it full.
    let rest = ZONE_CAP - 12288;
    blk.write(0, ZONE_SECTORS + 24, &vec![3; rest as usize])
        .unwrap();
    assert_eq!(state(&mut blk, 1), ZoneState::Full);
    fails_with(
        blk.write(0, ZONE_SECTORS, &[1; 4096]),
        S_ZONE_INVALID_CMD,
        "write to a full zone",
    );
    // The report lands where the device says: a buffer for more zones than
    // remain gets the remaining ones.
    let tail = blk
        .zone_report(0, (NR_ZONES - 2) * ZONE_SECTORS, 8)
        .unwrap();
    assert_eq!(tail.len(), 2);
    // A report past the end is refused.
    let c = blk
        .run(0, &RequestSpec::zone_report(DISK / 512, 1))
        .unwrap();
    assert_eq!(c.status, Some(S_ZONE_INVALID_CMD));
    // A report buffer without room for the header.
    let mut small = RequestSpec::new(T_ZONE_REPORT, 0);
    small.in_len = 32;
    assert_eq!(blk.run(0, &small).unwrap().status, Some(S_ZONE_INVALID_CMD));
}

#[test]
fn appends_from_several_queues_land_in_distinct_places() {
    const QUEUES: u16 = 4;
    const PER_QUEUE: u64 = 4;
    const LEN: usize = 16384;
    let (_cluster, socket) = zoned_export(QUEUES as u32, 4, 8);
    let mut blk = connect(&socket, QUEUES);
    let zone = 2 * ZONE_SECTORS;
    // Every queue's appends in flight at once.
    let mut tokens: Vec<(u16, u64, Token)> = Vec::new();
    for i in 0..PER_QUEUE {
        for q in 0..QUEUES {
            let seed = 100 + q as u64 * 10 + i;
            let t = blk
                .submit(q, &RequestSpec::zone_append(zone, &pattern(seed, LEN)))
                .unwrap();
            tokens.push((q, seed, t));
        }
    }
    let mut landed: Vec<(u64, u64)> = Vec::new();
    for (q, seed, t) in tokens {
        let c = blk.wait(q, t, T).unwrap();
        assert!(c.is_ok(), "append {seed} on queue {q}: {c:?}");
        assert_eq!(c.used_len, 9, "append_sector + status");
        let sector = blkmesh_vhost_user_client::zone::parse_append_sector(&c.data).unwrap();
        landed.push((sector, seed));
    }
    landed.sort();
    let sectors: Vec<u64> = landed.iter().map(|l| l.0).collect();
    // Distinct, adjacent, from the zone start: the zone was empty.
    let expected: Vec<u64> = (0..QUEUES as u64 * PER_QUEUE)
        .map(|i| zone + i * LEN as u64 / 512)
        .collect();
    assert_eq!(sectors, expected);
    for (sector, seed) in &landed {
        assert!(
            blk.read(0, *sector, LEN as u32).unwrap() == pattern(*seed, LEN),
            "the data of append {seed} is not where the device said (sector {sector})"
        );
    }
    let z = zone_of(&mut blk, 2);
    assert_eq!(
        z.write_pointer,
        zone + QUEUES as u64 * PER_QUEUE * LEN as u64 / 512
    );
    assert_eq!(z.state, ZoneState::ImplicitOpen);

    // The helper returns the sector too, and a regular write at the write
    // pointer follows the appends.
    let at = blk.zone_append(1, zone, &pattern(7, 4096)).unwrap();
    assert_eq!(at, z.write_pointer);
    blk.write(2, at + 8, &pattern(8, 4096)).unwrap();
    assert!(blk.read(3, at, 8192).unwrap()[4096..] == pattern(8, 4096)[..]);

    // Bad appends: not at a zone start, larger than max_append_sectors,
    // beyond the capacity left, without data.
    let max = blk.cached_config().unwrap().max_append_sectors as usize * 512;
    fails_with(
        blk.zone_append(0, zone + 8, &[1; 4096]),
        S_ZONE_INVALID_CMD,
        "append not at a zone start",
    );
    fails_with(
        blk.zone_append(0, 3 * ZONE_SECTORS, &vec![1; max + 512]),
        S_ZONE_INVALID_CMD,
        "append larger than max_append_sectors",
    );
    let left = ZONE_CAP as usize - (QUEUES as usize * PER_QUEUE as usize * LEN + 8192);
    fails_with(
        blk.zone_append(0, zone, &vec![1; left + 4096]),
        S_ZONE_INVALID_CMD,
        "append beyond the zone capacity",
    );
    let c = blk.run(0, &RequestSpec::zone_append(zone, &[])).unwrap();
    assert_eq!(c.status, Some(S_IOERR), "append without data");
    fails_with(
        blk.zone_append(0, DISK / 512, &[1; 4096]),
        S_ZONE_INVALID_CMD,
        "append past the end",
    );
    // An append with no room for append_sector is malformed.
    let mut spec = RequestSpec::zone_append(zone, &[1; 4096]);
    spec.in_len = 4;
    assert_eq!(blk.run(0, &spec).unwrap().status, Some(S_IOERR));
}

#[test]
fn zone_transitions_and_limits_reach_the_guest() {
    // At most 2 open and 3 active zones.
    let (_cluster, socket) = zoned_export(1, 2, 3);
    let mut blk = connect(&socket, 1);
    let z = |i: u64| i * ZONE_SECTORS;

    // open → EOPEN; close with nothing written → EMPTY.
    blk.zone_open(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::ExplicitOpen);
    blk.zone_open(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::ExplicitOpen, "open twice");
    blk.zone_close(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::Empty);
    // write → IOPEN; close → CLOSED (keeps its write pointer).
    blk.write(0, z(0), &[1; 4096]).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::ImplicitOpen);
    blk.zone_close(0, z(0)).unwrap();
    let closed = zone_of(&mut blk, 0);
    assert_eq!(
        (closed.state, closed.write_pointer),
        (ZoneState::Closed, z(0) + 8)
    );
    blk.zone_close(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::Closed, "close twice");
    // closed → open → EOPEN; finish → FULL; finish again stays FULL.
    blk.zone_open(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::ExplicitOpen);
    blk.zone_finish(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::Full);
    blk.zone_finish(0, z(0)).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::Full);
    // A full zone cannot be opened, closed or written.
    fails_with(
        blk.zone_open(0, z(0)),
        S_ZONE_INVALID_CMD,
        "open a full zone",
    );
    fails_with(
        blk.zone_close(0, z(0)),
        S_ZONE_INVALID_CMD,
        "close a full zone",
    );
    fails_with(
        blk.write(0, z(0) + 8, &[1; 4096]),
        S_ZONE_INVALID_CMD,
        "write a full zone",
    );
    fails_with(
        blk.zone_append(0, z(0), &[1; 4096]),
        S_ZONE_INVALID_CMD,
        "append to a full zone",
    );
    // Closing an empty zone is invalid.
    fails_with(
        blk.zone_close(0, z(5)),
        S_ZONE_INVALID_CMD,
        "close an empty zone",
    );
    // reset → EMPTY at the start; reset an empty zone is fine.
    blk.zone_reset(0, z(0)).unwrap();
    let reset = zone_of(&mut blk, 0);
    assert_eq!((reset.state, reset.write_pointer), (ZoneState::Empty, z(0)));
    blk.zone_reset(0, z(0)).unwrap();
    // Finishing an empty zone makes it full.
    blk.zone_finish(0, z(6)).unwrap();
    assert_eq!(state(&mut blk, 6), ZoneState::Full);
    blk.zone_reset(0, z(6)).unwrap();

    // Zone management needs a zone start inside the device.
    for (what, sector) in [
        ("misaligned", z(1) + 8),
        ("past the end", DISK / 512),
        ("overflowing", u64::MAX / 256),
    ] {
        for t in [T_ZONE_OPEN, T_ZONE_CLOSE, T_ZONE_FINISH, T_ZONE_RESET] {
            let c = blk.run(0, &RequestSpec::zone_mgmt(t, sector)).unwrap();
            assert_eq!(c.status, Some(S_ZONE_INVALID_CMD), "type {t} {what}");
        }
    }

    // Limits. Zone 0 closed (active 1), zones 1 and 2 implicitly open
    // (open 2, active 3).
    blk.write(0, z(0), &[1; 4096]).unwrap();
    blk.zone_close(0, z(0)).unwrap();
    blk.write(0, z(1), &[2; 4096]).unwrap();
    blk.write(0, z(2), &[3; 4096]).unwrap();
    fails_with(
        blk.write(0, z(3), &[4; 4096]),
        S_ZONE_ACTIVE_RESOURCE,
        "a fourth active zone by writing",
    );
    fails_with(
        blk.zone_open(0, z(3)),
        S_ZONE_ACTIVE_RESOURCE,
        "a fourth active zone by opening",
    );
    fails_with(
        blk.zone_append(0, z(3), &[4; 4096]),
        S_ZONE_ACTIVE_RESOURCE,
        "a fourth active zone by appending",
    );
    assert_eq!(state(&mut blk, 3), ZoneState::Empty);
    // Zones 1 and 2 explicitly open: no open slot for zone 0 any more.
    blk.zone_open(0, z(1)).unwrap();
    blk.zone_open(0, z(2)).unwrap();
    fails_with(
        blk.zone_open(0, z(0)),
        S_ZONE_OPEN_RESOURCE,
        "a third open zone by opening",
    );
    fails_with(
        blk.write(0, z(0) + 8, &[1; 4096]),
        S_ZONE_OPEN_RESOURCE,
        "a third open zone by writing",
    );
    assert_eq!(state(&mut blk, 0), ZoneState::Closed);
    let open: Vec<ZoneState> = (0..4).map(|i| state(&mut blk, i)).collect();
    assert_eq!(
        open,
        vec![
            ZoneState::Closed,
            ZoneState::ExplicitOpen,
            ZoneState::ExplicitOpen,
            ZoneState::Empty
        ]
    );
    // Closing one makes room.
    blk.zone_close(0, z(1)).unwrap();
    blk.write(0, z(0) + 8, &[1; 4096]).unwrap();
    assert_eq!(state(&mut blk, 0), ZoneState::ImplicitOpen);
    // Reset-all empties every zone; the limits are free again.
    blk.zone_reset_all(0).unwrap();
    let zones = blk.zone_report(0, 0, 64).unwrap();
    assert!(
        zones
            .iter()
            .all(|z| z.state == ZoneState::Empty && z.write_pointer == z.start),
        "{zones:?}"
    );
    for i in 3..6 {
        blk.write(0, z(i), &[5; 4096]).unwrap();
        if i < 5 {
            blk.zone_close(0, z(i)).unwrap();
        }
    }
    // A driver that does not accept ZONED gets no host-managed disk at
    // all (see a_host_managed_export_refuses_a_driver_without_zoned).
    drop(blk);
    let opts = Options {
        features_wanted: blkmesh_vhost_user_client::DEFAULT_FEATURES & !(1u64 << F_ZONED),
        ..Options::default()
    };
    assert!(VhostUserBlk::connect(&socket, opts).is_err());
}

/// Sequential writes (queue 0) and appends (queue 1) keep going while the
/// worker is killed and restarted: no write fails or is lost. Writes the
/// dead worker applied but did not complete are found below their zone's
/// write pointer and completed by the frontend (resubmitting them would
/// be refused as not at the write pointer). Appends are resubmitted and
/// may land twice (a known limit): each is checked where it says it
/// landed. Each stream cycles over its zones, resetting them, until told
/// to stop.
#[test]
fn a_killed_worker_loses_no_zone_write() {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    const LEN: u64 = 32 << 10;
    const QD: usize = 4;
    const WRITE_ZONES: u64 = 8;
    let (mut cluster, socket) = zoned_export(2, 4, 8);
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let (writes, appends) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let mut blk = connect(&socket, 2);
            let (mut writes, mut appends) = (0u64, 0u64);
            // The current round's completed writes (offset, seed) and
            // appends (sector, seed).
            let mut written: Vec<(u64, u64)> = Vec::new();
            let mut appended: Vec<(u64, u64)> = Vec::new();
            let mut round = 0u64;
            let mut next_write = 0u64;
            let mut in_write: VecDeque<(Token, u64, u64)> = VecDeque::new();
            let mut append_zone = WRITE_ZONES;
            let mut in_append: VecDeque<(Token, u64)> = VecDeque::new();
            let mut seed = 1u64 << 50;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                assert!(std::time::Instant::now() < deadline, "guest stuck");
                let stopping = stop.load(Relaxed);
                while !stopping && in_write.len() < QD && next_write < WRITE_ZONES * ZONE {
                    let s = round << 40 | next_write;
                    let t = blk
                        .submit(
                            0,
                            &RequestSpec::write(next_write / 512, &pattern(s, LEN as usize)),
                        )
                        .unwrap();
                    in_write.push_back((t, next_write, s));
                    next_write += LEN;
                    if next_write % ZONE + LEN > ZONE_CAP {
                        next_write = (next_write / ZONE + 1) * ZONE;
                    }
                }
                while !stopping && in_append.len() < QD && append_zone < NR_ZONES {
                    seed += 1;
                    let spec = RequestSpec::zone_append(
                        append_zone * ZONE_SECTORS,
                        &pattern(seed, LEN as usize),
                    );
                    in_append.push_back((blk.submit(1, &spec).unwrap(), seed));
                }
                if let Some((t, off, s)) = in_write.pop_front() {
                    let c = blk.wait(0, t, T).unwrap();
                    assert!(c.is_ok(), "write at {off} (round {round}): {c:?}");
                    written.push((off, s));
                    writes += 1;
                }
                if let Some((t, seed)) = in_append.pop_front() {
                    let c = blk.wait(1, t, T).unwrap();
                    match c.status {
                        Some(0) => {
                            let at = blkmesh_vhost_user_client::zone::parse_append_sector(&c.data)
                                .unwrap();
                            appended.push((at, seed));
                            appends += 1;
                        }
                        // The zone is full: on to the next one.
                        Some(st) if st == S_ZONE_INVALID_CMD => {
                            append_zone = append_zone.max(
                                appended.last().map_or(WRITE_ZONES, |a| a.0 / ZONE_SECTORS) + 1,
                            )
                        }
                        other => panic!("append {seed}: status {other:?}"),
                    }
                }
                if stopping && in_write.is_empty() && in_append.is_empty() {
                    break;
                }
                // A new round once a stream went through its zones.
                if next_write >= WRITE_ZONES * ZONE && in_write.is_empty() {
                    for z in 0..WRITE_ZONES {
                        blk.zone_reset(0, z * ZONE_SECTORS).unwrap();
                    }
                    written.clear();
                    next_write = 0;
                    round += 1;
                    done.fetch_add(1, Relaxed);
                }
                if append_zone >= NR_ZONES && in_append.is_empty() {
                    for z in WRITE_ZONES..NR_ZONES {
                        blk.zone_reset(1, z * ZONE_SECTORS).unwrap();
                    }
                    appended.clear();
                    append_zone = WRITE_ZONES;
                }
            }
            // Everything of the last round where the device said.
            for (off, s) in &written {
                assert!(
                    blk.read(0, off / 512, LEN as u32).unwrap() == pattern(*s, LEN as usize),
                    "write at {off} lost"
                );
            }
            for (at, seed) in &appended {
                assert!(
                    blk.read(1, *at, LEN as u32).unwrap() == pattern(*seed, LEN as usize),
                    "append {seed} not at sector {at}"
                );
            }
            // The write pointer of the zone being written is where the
            // writes ended; the zones before it are full.
            let end = written.iter().map(|w| w.0 + LEN).max().unwrap_or(0);
            if end > 0 {
                let z = (end - 1) / ZONE;
                for before in 0..z {
                    assert_eq!(state(&mut blk, before), ZoneState::Full, "zone {before}");
                }
                let d = zone_of(&mut blk, z);
                assert!(
                    d.state == ZoneState::Full || d.write_pointer * 512 == end,
                    "zone {z}: {d:?}, writes end at {end}"
                );
            }
            (writes, appends)
        });
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(600));
            cluster.kill_worker(0);
            std::thread::sleep(Duration::from_millis(150));
            cluster.start_worker(0);
        }
        std::thread::sleep(Duration::from_millis(600));
        stop.store(true, Relaxed);
        guest.join().unwrap()
    });
    assert!(
        writes > 0 && appends > 0 && done.load(Relaxed) > 0,
        "{writes} writes, {appends} appends"
    );
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(
        log.contains("queue moved to a replacement worker"),
        "no failover with the guest connected"
    );
}

/// A frontend killed with zone writes in flight: the worker still
/// completes them (they are held 1 s below the zoned node), so when the
/// VMM reconnects to the restarted frontend they are below the zone's
/// write pointer. The frontend completes them instead of resubmitting
/// them, which the zone would refuse as not at its write pointer.
#[test]
fn zone_writes_in_flight_survive_a_frontend_restart() {
    use blkmesh_proto::v1::IoOp;
    let (mut cluster, _image) =
        Cluster::with_delayed_file(DISK, &[IoOp::Write], Duration::from_secs(1));
    cluster
        .client()
        .add_node(zoned_spec(&cluster, "zoned", "slow", 4, 8))
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("z", "zoned").writable())
        .unwrap();
    let opts = Options::default()
        .queues(1)
        .queue_size(64)
        .inflight(true)
        .timeout(Duration::from_secs(20));
    let mut blk = VhostUserBlk::connect(&socket, opts).unwrap();
    assert!(blk.inflight_region().is_some(), "INFLIGHT_SHMFD negotiated");
    let zone = 3 * ZONE_SECTORS;
    let tokens: Vec<(u64, Token)> = (0..4u64)
        .map(|i| {
            let spec = RequestSpec::write(zone + i * 8, &pattern(i, 4096));
            (i, blk.submit(0, &spec).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill_frontend();
    // The worker drops the writes it held for the dead frontend and gives
    // their zone reservations back; the restarted one resubmits them.
    std::thread::sleep(Duration::from_millis(1500));
    cluster.start_frontend();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Err(e) = blk.reconnect() {
        assert!(std::time::Instant::now() < deadline, "reconnect: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, t) in tokens {
        let c = blk.wait(0, t, Duration::from_secs(20)).unwrap();
        assert!(c.is_ok(), "write {i}: {c:?}");
    }
    for i in 0..4u64 {
        assert!(
            blk.read(0, zone + i * 8, 4096).unwrap() == pattern(i, 4096),
            "write {i}"
        );
    }
    let z = zone_of(&mut blk, 3);
    assert_eq!(z.write_pointer, zone + 32);
    blk.write(0, zone + 32, &pattern(9, 4096)).unwrap();
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap_or_default();
    assert!(
        log.contains("resubmitted requests left in flight by the previous frontend"),
        "the restarted frontend did not resume the requests"
    );
}

// ===================== blkmesh-io =====================

#[test]
fn blkmesh_io_zone_commands() {
    let (cluster, socket) = zoned_export(2, 4, 8);
    // The native driver is picked for zone commands.
    let out = ok(&io(
        &cluster,
        &socket,
        &["--queues", "2"],
        &[
            "zone_report 0 2",
            "zone_append -P 0x5a 0 8k",
            "zap -q 1 -P 0x5b 0 4k",
            "read -P 0x5a 0 8k",
            "read -P 0x5b 8k 4k",
            "zrp 0 1",
            "zone_open 1M",
            "zone_report 1M 1",
            "zone_close 1M",
            "zone_finish 2M",
            "zone_report 2M 1",
            "zone_reset 2M",
            "zone_report 15M",
            "zone_reset_all",
            "zone_report 0 1",
        ],
    ));
    let expected = "\
start: 0x0, len 0x100000, cap 0xc0000, wptr 0x0, zcond:1, ztype:2
start: 0x100000, len 0x100000, cap 0xc0000, wptr 0x100000, zcond:1, ztype:2
appended 8192/8192 bytes at offset 0 (sector 0x0) in the zone at offset 0
appended 4096/4096 bytes at offset 8192 (sector 0x10) in the zone at offset 0
read 8192/8192 bytes at offset 0
read 4096/4096 bytes at offset 8192
start: 0x0, len 0x100000, cap 0xc0000, wptr 0x3000, zcond:2, ztype:2
zone_open done at offset 1048576
start: 0x100000, len 0x100000, cap 0xc0000, wptr 0x100000, zcond:3, ztype:2
zone_close done at offset 1048576
zone_finish done at offset 2097152
FULL
zone_reset done at offset 2097152
start: 0xf00000, len 0x100000, cap 0xc0000, wptr 0xf00000, zcond:1, ztype:2
zone_reset_all done
start: 0x0, len 0x100000, cap 0xc0000, wptr 0x0, zcond:1, ztype:2
";
    // The write pointer of a full zone means nothing: not compared.
    let got: String = without_rates(&out)
        .lines()
        .map(|l| {
            if l.starts_with("start: 0x200000, len 0x100000, cap 0xc0000, wptr ")
                && l.ends_with(", zcond:14, ztype:2")
            {
                "FULL\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_eq!(got, expected);

    // A whole report: every zone.
    let out = ok(&io(&cluster, &socket, &[], &["zone_report"]));
    assert_eq!(out.lines().count() as u64, NR_ZONES, "{out}");

    // Errors carry the zone status; ordinary commands with zone rules on
    // the native driver; --keep-going shows the device stays usable.
    let out = io(
        &cluster,
        &socket,
        &["--driver", "native", "--keep-going"],
        &[
            "write -P 1 3M 4k",
            "write -P 1 3M 4k",
            "zone_open 3M",
            "zone_reset 100",
            "zone_close 4M",
            "read -P 1 3M 4k",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let expected = "\
wrote 4096/4096 bytes at offset 3145728
write failed: EIO (Input/output error): ZONE_UNALIGNED_WP (status 4)
zone_open done at offset 3145728
zone_reset failed: EINVAL (Invalid argument): invalid start offset
zone_close failed: EIO (Input/output error): ZONE_INVALID_CMD (status 3)
read 4096/4096 bytes at offset 3145728
";
    assert_eq!(
        without_rates(&String::from_utf8_lossy(&out.stdout)),
        expected
    );

    // info shows the zone geometry (native driver only).
    let out = ok(&io(&cluster, &socket, &["--driver", "native"], &["info"]));
    for line in [
        "zoned-model: host-managed",
        "zone-size: 1048576",
        "nr-zones: 16",
        "max-open-zones: 4",
        "max-active-zones: 8",
    ] {
        assert!(out.contains(line), "{line}\n{out}");
    }
    // JSON: zones and where appends landed.
    let out = ok(&io(
        &cluster,
        &socket,
        &["--json"],
        &["zone_append 5M 4k", "zone_report 5M 1"],
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["landed"], 5 * MIB);
    assert_eq!(lines[0]["sector"], 5 * MIB / 512);
    assert_eq!(lines[1]["zones"][0]["write_pointer"], 5 * MIB + 4096);
    assert_eq!(lines[1]["zones"][0]["condition"], 2);
    // libblkio's driver (0.5) does not accept VIRTIO_BLK_F_ZONED: a
    // host-managed export refuses it rather than pass as an ordinary disk.
    let out = io(
        &cluster,
        &socket,
        &["--driver", "blkio"],
        &["write -P 9 6M 4k", "read -P 9 6M 4k"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("cannot connect"), "{}", text(&out));
    assert!(text(&out).contains("--driver native"), "{}", text(&out));
}

// ===================== the ZoneService =====================

#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    r.unwrap_err().code()
}

fn zone_client(
    cluster: &Cluster,
) -> (
    tokio::runtime::Runtime,
    ZoneServiceClient<blkmesh_proto::client::ManagerChannel>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(cluster.client_config().connect()).unwrap();
    (rt, ZoneServiceClient::new(channel))
}

#[test]
fn zone_service_reports_and_manages_through_the_manager() {
    let (cluster, socket) = zoned_export(1, 4, 8);
    cluster.add_null("plain", 16 * MIB).unwrap();
    cluster
        .add_export(ExportOpts::new("plain", "plain").writable())
        .unwrap();
    let (rt, mut zones) = zone_client(&cluster);
    let report = |zones: &mut ZoneServiceClient<_>, offset: u64, max: u32| {
        rt.block_on(zones.report_zones(ReportZonesRequest {
            export: "z".into(),
            offset,
            max_zones: max,
        }))
    };
    let manage = |zones: &mut ZoneServiceClient<_>, action: ZoneAction, offset: u64| {
        rt.block_on(zones.manage_zone(ManageZoneRequest {
            export: "z".into(),
            action: action as i32,
            offset,
        }))
    };

    let r = report(&mut zones, 0, 0).unwrap().into_inner();
    let info = r.info.unwrap();
    assert_eq!(info.model, ZoneModel::HostManaged as i32);
    assert_eq!((info.zone_size, info.zone_capacity), (ZONE, ZONE_CAP));
    assert_eq!(r.zones.len() as u64, NR_ZONES);
    for (i, z) in r.zones.iter().enumerate() {
        let start = i as u64 * ZONE;
        assert_eq!((z.start, z.length, z.capacity), (start, ZONE, ZONE_CAP));
        assert_eq!(z.write_pointer, start);
        assert_eq!(z.condition, ZoneCondition::Empty as i32);
        assert_eq!(z.r#type, ZoneType::SequentialWriteRequired as i32);
    }

    // The guest writes; the manager sees the write pointer move.
    let mut blk = connect(&socket, 1);
    blk.write(0, ZONE_SECTORS, &pattern(3, 8192)).unwrap();
    let r = report(&mut zones, ZONE + 4096, 1).unwrap().into_inner();
    assert_eq!(r.zones.len(), 1);
    assert_eq!(r.zones[0].start, ZONE);
    assert_eq!(r.zones[0].write_pointer, ZONE + 8192);
    assert_eq!(r.zones[0].condition, ZoneCondition::ImplicitOpen as i32);

    // The manager acts; the guest sees it.
    let z = manage(&mut zones, ZoneAction::Finish, ZONE)
        .unwrap()
        .into_inner()
        .zone
        .unwrap();
    assert_eq!(z.condition, ZoneCondition::Full as i32);
    assert_eq!(state(&mut blk, 1), ZoneState::Full);
    let z = manage(&mut zones, ZoneAction::Open, 2 * ZONE)
        .unwrap()
        .into_inner()
        .zone
        .unwrap();
    assert_eq!(z.condition, ZoneCondition::ExplicitOpen as i32);
    assert_eq!(state(&mut blk, 2), ZoneState::ExplicitOpen);
    manage(&mut zones, ZoneAction::Close, 2 * ZONE).unwrap();
    assert_eq!(state(&mut blk, 2), ZoneState::Empty);
    // And the other way round: the guest acts, the manager sees it.
    blk.zone_open(0, 4 * ZONE_SECTORS).unwrap();
    let r = report(&mut zones, 4 * ZONE, 1).unwrap().into_inner();
    assert_eq!(r.zones[0].condition, ZoneCondition::ExplicitOpen as i32);

    // Refusals.
    assert_eq!(
        code(manage(&mut zones, ZoneAction::Open, ZONE)),
        tonic::Code::FailedPrecondition,
        "open a full zone"
    );
    assert_eq!(
        code(manage(&mut zones, ZoneAction::Reset, ZONE + 4096)),
        tonic::Code::InvalidArgument,
        "misaligned"
    );
    assert_eq!(
        code(report(&mut zones, DISK, 1)),
        tonic::Code::InvalidArgument,
        "past the end"
    );
    let other = |export: &str| {
        rt.block_on(zones.clone().report_zones(ReportZonesRequest {
            export: export.into(),
            offset: 0,
            max_zones: 1,
        }))
    };
    assert_eq!(code(other("nope")), tonic::Code::NotFound);
    assert_eq!(code(other("plain")), tonic::Code::FailedPrecondition);

    // Reset and reset-all.
    let z = manage(&mut zones, ZoneAction::Reset, ZONE)
        .unwrap()
        .into_inner()
        .zone
        .unwrap();
    assert_eq!(
        (z.condition, z.write_pointer),
        (ZoneCondition::Empty as i32, ZONE)
    );
    assert_eq!(state(&mut blk, 1), ZoneState::Empty);
    blk.write(0, 7 * ZONE_SECTORS, &[1; 4096]).unwrap();
    let r = manage(&mut zones, ZoneAction::ResetAll, 0)
        .unwrap()
        .into_inner();
    assert!(r.zone.is_none(), "{r:?}");
    let all = blk.zone_report(0, 0, 64).unwrap();
    assert!(all.iter().all(|z| z.state == ZoneState::Empty), "{all:?}");
    let r = report(&mut zones, 0, 3).unwrap().into_inner();
    assert_eq!(r.zones.len(), 3);
    assert!(r
        .zones
        .iter()
        .all(|z| z.condition == ZoneCondition::Empty as i32));
}

#[test]
fn a_zoned_export_moves_to_another_worker_live() {
    let (cluster, socket) = zoned_export(2, 4, 8);
    let mut blk = connect(&socket, 2);
    blk.write(0, 0, &pattern(1, 8192)).unwrap();
    let landed = blk.zone_append(1, ZONE_SECTORS, &pattern(2, 4096)).unwrap();
    assert_eq!(landed, ZONE_SECTORS);
    let exports = cluster.list_exports().unwrap();
    let from = exports[0].queues[0].worker.clone();
    let to = if from == "worker0" {
        "worker1"
    } else {
        "worker0"
    };
    // Both queues go at once: the zone state is one worker's (its metadata
    // file is locked), so the graph closes there before it opens here.
    let out = cluster.ctl(["node", "move", "zoned", to]);
    assert!(out.status.success(), "{}", text(&out));
    let exports = cluster.list_exports().unwrap();
    assert!(
        exports[0].queues.iter().all(|q| q.worker == to),
        "{exports:?}"
    );
    // Same connection: the zone state came along and I/O goes on.
    assert_eq!(zone_of(&mut blk, 0).write_pointer, 16);
    assert_eq!(zone_of(&mut blk, 1).write_pointer, ZONE_SECTORS + 8);
    blk.write(1, 16, &pattern(3, 4096)).unwrap();
    assert_eq!(blk.read(0, 0, 8192).unwrap(), pattern(1, 8192));
    assert_eq!(blk.read(1, ZONE_SECTORS, 4096).unwrap(), pattern(2, 4096));
    assert_eq!(blk.read(0, 16, 4096).unwrap(), pattern(3, 4096));
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap_or_default();
    assert!(
        !log.contains("restarting the export"),
        "the move was not live"
    );
}

/// The export's state and message as the manager lists them.
fn export_state(cluster: &Cluster, id: &str) -> (ExportState, String) {
    let e = cluster
        .list_exports()
        .unwrap()
        .into_iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == id))
        .expect("export listed");
    (ExportState::try_from(e.state).unwrap(), e.message)
}

/// Waits for the manager to list export `id` in `state`; its message.
fn wait_state(cluster: &Cluster, id: &str, state: ExportState) -> String {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (s, message) = export_state(cluster, id);
        if s == state {
            return message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "export {id} still {s:?} ({message}), waiting for {state:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A host-managed export must not pass as an ordinary disk: a driver that
/// does not accept VIRTIO_BLK_F_ZONED is refused (its SET_FEATURES fails
/// and the connection closes), the frontend logs why, and the export's
/// state (VMM_REFUSED, with the reason) reaches `blkmeshctl export list`
/// and the event feed. A driver that accepts ZONED is served afterwards,
/// and the export is SERVING again.
#[test]
fn a_host_managed_export_refuses_a_driver_without_zoned() {
    let (cluster, socket) = zoned_export(1, 4, 8);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(cluster.client_config().connect()).unwrap();
    let mut events = rt
        .block_on(StatsServiceClient::new(channel).watch_events(WatchEventsRequest {}))
        .unwrap()
        .into_inner();
    let mut next_state = |want: ExportState| -> String {
        loop {
            let ev = rt
                .block_on(async { tokio::time::timeout(T, events.message()).await })
                .unwrap_or_else(|_| panic!("no {want:?} event within {T:?}"))
                .unwrap()
                .expect("event stream open");
            if let Some(Kind::ExportState(st)) = ev.kind {
                if st.export == "z" && st.state == want as i32 {
                    return st.message;
                }
            }
        }
    };

    let defaults = Options::default().queues(1).timeout(T);
    let without_zoned = Options {
        features_wanted: defaults.features_wanted & !(1u64 << F_ZONED),
        ..defaults
    };
    let refused = VhostUserBlk::connect(&socket, without_zoned);
    assert!(
        refused.is_err(),
        "a driver without ZONED was served a host-managed export"
    );

    let why = "did not accept VIRTIO_BLK_F_ZONED";
    let message = wait_state(&cluster, "z", ExportState::VmmRefused);
    assert!(message.contains(why), "{message}");
    let message = next_state(ExportState::VmmRefused);
    assert!(message.contains(why), "{message}");
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("export=z") && l.contains(why)),
        "no error line naming the export and the reason:\n{log}"
    );
    let out = cluster.ctl(["export", "list"]);
    let table = ok(&out);
    assert!(table.contains(" VMM_REFUSED "), "{table}");
    assert!(
        table.contains("z: VMM_REFUSED: host-managed zoned export refused"),
        "{table}"
    );
    let out = cluster.ctl(["--json", "export", "list"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(json[0]["state"], "VMM_REFUSED", "{json}");

    // The export still serves: a driver that accepts ZONED gets the disk.
    let mut blk = connect(&socket, 1);
    assert!(blk.has_feature(F_ZONED));
    blk.write(0, 0, &pattern(1, 4096)).unwrap();
    assert_eq!(wait_state(&cluster, "z", ExportState::Serving), "");
    next_state(ExportState::Serving);
}

/// A regular export serves a driver that does not accept
/// VIRTIO_BLK_F_ZONED (it is not offered); only host-managed exports
/// refuse. (Host-aware exports serve such drivers too, as ordinary disks:
/// see frontend-virtio's device tests; no node emulates host-aware.)
#[test]
fn a_regular_export_serves_a_driver_without_zoned() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.add_null("plain", 16 * MIB).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("plain", "plain").writable())
        .unwrap();
    let defaults = Options::default().queues(1).timeout(T);
    let without_zoned = Options {
        features_wanted: defaults.features_wanted & !(1u64 << F_ZONED),
        ..defaults
    };
    let mut blk = VhostUserBlk::connect(&socket, without_zoned).unwrap();
    blk.write(0, 0, &pattern(2, 4096)).unwrap();
    assert_eq!(export_state(&cluster, "plain").0, ExportState::Serving);
}
