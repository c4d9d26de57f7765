use super::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::zoned::metadata::le64;
use crate::zoned::{ZoneLayer, HEADER_SIZE, RECORD_SIZE};

const ZS: u64 = 64 * 1024;

fn geo(cap: u64, nr: u32) -> Geometry {
    Geometry {
        zone_size: ZS,
        capacity: cap,
        nr_zones: nr,
    }
}

fn limits(max_open: u32, max_active: u32) -> ZoneLimits {
    ZoneLimits {
        granularity: 512,
        max_append: 32 * 1024,
        max_open,
        max_active,
    }
}

struct T {
    dir: tempfile::TempDir,
    s: Option<ZonedState>,
    geo: Geometry,
    limits: ZoneLimits,
}

impl T {
    fn new(geo: Geometry, limits: ZoneLimits) -> T {
        let dir = tempfile::tempdir().unwrap();
        let s = ZonedState::open(&dir.path().join("meta"), geo, limits).unwrap();
        T {
            dir,
            s: Some(s),
            geo,
            limits,
        }
    }

    fn s(&self) -> &ZonedState {
        self.s.as_ref().unwrap()
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("meta")
    }

    /// Closes and loads the metadata again (as a restarted worker).
    fn reload(&mut self) {
        self.s = None;
        self.s = Some(ZonedState::open(&self.path(), self.geo, self.limits).unwrap());
    }

    fn cond(&self, z: usize) -> Cond {
        self.s().lock().zones[z].cond
    }

    fn wp(&self, z: usize) -> u64 {
        self.s().lock().zones[z].wp
    }

    /// Writes and completes at once.
    fn write(&self, offset: u64, len: u64) -> Result<(), ZoneError> {
        let t = self.s().begin_write(WriteKind::Write, offset, len)?;
        self.s().end_write(&t, true)
    }

    fn append(&self, zone: u64, len: u64) -> Result<u64, ZoneError> {
        let t = self.s().begin_write(WriteKind::Append, zone * ZS, len)?;
        self.s().end_write(&t, true)?;
        Ok(t.offset)
    }

    fn act(&self, a: Action, zone: u64) -> Result<Cond, ZoneError> {
        self.s().manage(a, zone as usize).map(|v| v.cond)
    }

    /// The record of zone z as it is in the file: (cond, wp, last start, last len).
    fn record(&self, z: usize) -> (u8, u64, u64, u64) {
        let data = std::fs::read(self.path()).unwrap();
        let r = &data[HEADER_SIZE as usize + z * RECORD_SIZE..][..RECORD_SIZE];
        (r[0], le64(&r[8..]), le64(&r[16..]), le64(&r[24..]))
    }

    fn counts(&self) -> (u32, u32) {
        let g = self.s().lock();
        (g.n_open, g.n_active)
    }
}

#[test]
fn writes_follow_the_write_pointer() {
    let t = T::new(geo(ZS, 4), limits(0, 0));
    assert_eq!(t.cond(0), Cond::Empty);
    t.write(0, 4096).unwrap();
    assert_eq!((t.cond(0), t.wp(0)), (Cond::ImplicitOpen, 4096));
    // Not at the write pointer: before, after, or in another zone's middle.
    assert_eq!(t.write(0, 4096), Err(ZoneError::UnalignedWp));
    assert_eq!(t.write(8192, 4096), Err(ZoneError::UnalignedWp));
    assert_eq!(t.write(ZS + 512, 512), Err(ZoneError::UnalignedWp));
    // Granularity.
    assert_eq!(t.write(4096, 100), Err(ZoneError::UnalignedWp));
    t.write(4096, 512).unwrap();
    // Crossing the zone end.
    assert_eq!(t.write(4608, ZS), Err(ZoneError::InvalidCmd));
    // Filling the zone makes it full; then writes are refused.
    t.write(4608, ZS - 4608).unwrap();
    assert_eq!((t.cond(0), t.wp(0)), (Cond::Full, ZS));
    assert_eq!(t.write(ZS - 512, 512), Err(ZoneError::InvalidCmd));
    assert_eq!(t.counts(), (0, 0));
    // Beyond the last zone.
    assert_eq!(t.write(4 * ZS, 512), Err(ZoneError::BadOffset));
}

#[test]
fn writing_a_full_zone_is_invalid() {
    let t = T::new(geo(ZS, 2), limits(0, 0));
    t.act(Action::Finish, 1).unwrap();
    assert_eq!(t.write(ZS, 512), Err(ZoneError::InvalidCmd));
    assert_eq!(t.append(1, 512), Err(ZoneError::InvalidCmd));
}

#[test]
fn capacity_below_zone_size() {
    let cap = 48 * 1024;
    let t = T::new(geo(cap, 2), limits(0, 0));
    assert_eq!(t.write(0, cap + 512), Err(ZoneError::InvalidCmd));
    t.write(0, cap).unwrap();
    assert_eq!((t.cond(0), t.wp(0)), (Cond::Full, cap));
    // Between capacity and zone size nothing is writable.
    assert_eq!(t.write(cap, 512), Err(ZoneError::InvalidCmd));
    let v = t.s().report_one_for_test(0);
    assert_eq!((v.capacity, v.len, v.wp), (cap, ZS, cap));
    // Appends stop at the capacity too.
    assert_eq!(t.append(1, 32 * 1024).unwrap(), ZS);
    assert_eq!(t.append(1, 32 * 1024), Err(ZoneError::InvalidCmd));
    assert_eq!(t.append(1, 16 * 1024).unwrap(), ZS + 32 * 1024);
    assert_eq!(t.cond(1), Cond::Full);
}

impl ZonedState {
    fn report_one_for_test(&self, z: usize) -> ZoneView {
        let mut v = Vec::new();
        self.report(z as u32, z as u32 + 1, 1, &mut v);
        v[0]
    }
}

#[test]
fn appends_land_at_the_write_pointer() {
    let t = T::new(geo(ZS, 2), limits(0, 0));
    assert_eq!(t.append(0, 4096).unwrap(), 0);
    assert_eq!(t.append(0, 512).unwrap(), 4096);
    t.write(4608, 512).unwrap();
    assert_eq!(t.append(0, 1024).unwrap(), 5120);
    // Append goes to a zone start, within max_append and granularity.
    assert_eq!(
        t.s().begin_write(WriteKind::Append, 512, 512),
        Err(ZoneError::BadOffset)
    );
    assert_eq!(t.append(1, 64 * 1024), Err(ZoneError::InvalidCmd));
    assert_eq!(t.append(1, 100), Err(ZoneError::UnalignedWp));
}

#[test]
fn open_close_finish_reset_transitions() {
    let t = T::new(geo(ZS, 4), limits(0, 0));
    // EMPTY -> EXPLICIT OPEN -> (close, nothing written) EMPTY.
    assert_eq!(t.act(Action::Open, 0), Ok(Cond::ExplicitOpen));
    assert_eq!(t.act(Action::Open, 0), Ok(Cond::ExplicitOpen), "idempotent");
    assert_eq!(t.counts(), (1, 1));
    assert_eq!(t.act(Action::Close, 0), Ok(Cond::Empty));
    assert_eq!(t.counts(), (0, 0));
    // Close and finish of an empty zone; close of a full one.
    assert_eq!(t.act(Action::Close, 0), Err(ZoneError::InvalidCmd));
    // IMPLICIT OPEN -> EXPLICIT OPEN -> CLOSED -> EXPLICIT OPEN.
    t.write(0, 4096).unwrap();
    assert_eq!(t.cond(0), Cond::ImplicitOpen);
    assert_eq!(t.act(Action::Open, 0), Ok(Cond::ExplicitOpen));
    assert_eq!(t.act(Action::Close, 0), Ok(Cond::Closed));
    assert_eq!(t.counts(), (0, 1));
    assert_eq!(t.act(Action::Close, 0), Ok(Cond::Closed), "closing closed");
    // A write to a closed zone opens it implicitly.
    t.write(4096, 512).unwrap();
    assert_eq!(t.cond(0), Cond::ImplicitOpen);
    assert_eq!(t.act(Action::Close, 0), Ok(Cond::Closed));
    assert_eq!(t.act(Action::Open, 0), Ok(Cond::ExplicitOpen));
    // Finish: FULL with the write pointer at the zone end.
    let v = t.s().manage(Action::Finish, 0).unwrap();
    assert_eq!((v.cond, v.wp), (Cond::Full, ZS));
    assert_eq!(t.counts(), (0, 0));
    assert_eq!(t.act(Action::Finish, 0), Ok(Cond::Full), "finishing full");
    assert_eq!(t.act(Action::Open, 0), Err(ZoneError::InvalidCmd));
    assert_eq!(t.act(Action::Close, 0), Err(ZoneError::InvalidCmd));
    // Finish of an empty zone, of a closed one.
    assert_eq!(t.act(Action::Finish, 1), Ok(Cond::Full));
    t.write(2 * ZS, 512).unwrap();
    t.act(Action::Close, 2).unwrap();
    assert_eq!(t.act(Action::Finish, 2), Ok(Cond::Full));
    // Reset: EMPTY, write pointer at the start, from any condition.
    for z in [0, 1, 2] {
        let v = t.s().manage(Action::Reset, z).unwrap();
        assert_eq!((v.cond, v.wp), (Cond::Empty, z as u64 * ZS));
    }
    assert_eq!(t.act(Action::Reset, 3), Ok(Cond::Empty), "resetting empty");
    t.write(0, 512).unwrap();
    assert_eq!(t.act(Action::Reset, 0), Ok(Cond::Empty));
    assert_eq!(t.counts(), (0, 0));
}

#[test]
fn management_needs_a_zone_start() {
    let dir = tempfile::tempdir().unwrap();
    let layer = ZoneLayer::Emulated(
        ZonedState::open(&dir.path().join("m"), geo(ZS, 2), limits(0, 0)).unwrap(),
    );
    assert_eq!(layer.manage(Action::Open, 512), Err(ZoneError::BadOffset));
    assert_eq!(
        layer.manage(Action::Open, 2 * ZS),
        Err(ZoneError::BadOffset)
    );
    assert_eq!(
        layer.manage(Action::Open, ZS).unwrap().cond,
        Cond::ExplicitOpen
    );
}

#[test]
fn read_only_and_offline_zones_refuse_everything() {
    let t = T::new(geo(ZS, 3), limits(0, 0));
    t.s().force_condition(1, Cond::ReadOnly);
    t.s().force_condition(2, Cond::Offline);
    for z in [1u64, 2] {
        assert_eq!(t.write(z * ZS, 512), Err(ZoneError::InvalidCmd));
        assert_eq!(t.append(z, 512), Err(ZoneError::InvalidCmd));
        for a in [Action::Open, Action::Close, Action::Finish, Action::Reset] {
            assert_eq!(t.act(a, z), Err(ZoneError::InvalidCmd), "{a:?}");
        }
    }
    t.s().reset_all(0..3).unwrap();
    assert_eq!(t.cond(1), Cond::ReadOnly);
    assert_eq!(t.cond(2), Cond::Offline);
}

#[test]
fn implicit_open_zones_are_evicted_least_recent_first() {
    let t = T::new(geo(ZS, 6), limits(2, 0));
    t.write(0, 512).unwrap();
    t.write(ZS, 512).unwrap();
    t.write(512, 512).unwrap(); // zone 0 is now the most recent
    assert_eq!(t.counts(), (2, 2));
    // A third zone: zone 1 (least recently written) is closed.
    t.write(2 * ZS, 512).unwrap();
    assert_eq!(t.cond(1), Cond::Closed);
    assert_eq!(
        (t.cond(0), t.cond(2)),
        (Cond::ImplicitOpen, Cond::ImplicitOpen)
    );
    assert_eq!(t.counts(), (2, 3));
    // The eviction is in the file.
    assert_eq!(t.record(1).0, Cond::Closed as u8);
    // An explicit open evicts an implicit one too.
    assert_eq!(t.act(Action::Open, 3), Ok(Cond::ExplicitOpen));
    assert_eq!(t.cond(0), Cond::Closed);
    // With only explicitly open zones, no room: OPEN_RESOURCE.
    assert_eq!(t.act(Action::Open, 4), Ok(Cond::ExplicitOpen));
    assert_eq!(t.cond(2), Cond::Closed);
    assert_eq!(t.write(5 * ZS, 512), Err(ZoneError::OpenResource));
    assert_eq!(
        t.write(ZS + 512, 512),
        Err(ZoneError::OpenResource),
        "closed zone"
    );
    assert_eq!(t.act(Action::Open, 5), Err(ZoneError::OpenResource));
    assert_eq!(t.cond(5), Cond::Empty, "a refused write changes nothing");
    // Writes to the explicitly open zones still go, and keep them so.
    t.write(3 * ZS, 512).unwrap();
    assert_eq!(t.cond(3), Cond::ExplicitOpen);
    t.write(3 * ZS + 512, 512).unwrap();
    assert_eq!(t.cond(3), Cond::ExplicitOpen);
    assert_eq!(t.append(3, 512).unwrap(), 3 * ZS + 1024);
    assert_eq!(t.cond(3), Cond::ExplicitOpen);
    t.act(Action::Close, 4).unwrap();
    t.write(5 * ZS, 512).unwrap();
    assert_eq!(t.counts(), (2, 6 - 1));
}

#[test]
fn active_limit() {
    let t = T::new(geo(ZS, 4), limits(2, 2));
    t.write(0, 512).unwrap();
    t.write(ZS, 512).unwrap();
    // Evicting an implicitly open zone keeps it active: no help.
    assert_eq!(t.write(2 * ZS, 512), Err(ZoneError::ActiveResource));
    assert_eq!(t.act(Action::Open, 2), Err(ZoneError::ActiveResource));
    assert_eq!(t.act(Action::Finish, 2), Err(ZoneError::ActiveResource));
    // Closed zones stay active...
    t.act(Action::Close, 0).unwrap();
    assert_eq!(t.write(2 * ZS, 512), Err(ZoneError::ActiveResource));
    // ...full and empty ones are not.
    t.act(Action::Finish, 0).unwrap();
    t.write(2 * ZS, 512).unwrap();
    t.act(Action::Reset, 1).unwrap();
    assert_eq!(t.act(Action::Open, 3), Ok(Cond::ExplicitOpen));
    assert_eq!(t.counts(), (2, 2));
}

#[test]
fn reset_all_resets_the_range_only() {
    let t = T::new(geo(ZS, 4), limits(0, 0));
    for z in 0..4 {
        t.write(z * ZS, 512).unwrap();
    }
    t.act(Action::Finish, 1).unwrap();
    t.act(Action::Close, 2).unwrap();
    t.s().reset_all(1..3).unwrap();
    let conds: Vec<_> = (0..4).map(|z| t.cond(z)).collect();
    assert_eq!(
        conds,
        [
            Cond::ImplicitOpen,
            Cond::Empty,
            Cond::Empty,
            Cond::ImplicitOpen
        ]
    );
    assert_eq!(t.counts(), (2, 2));
}

#[test]
fn concurrent_appends_get_distinct_ranges() {
    let big = Geometry {
        zone_size: 4 << 20,
        capacity: 4 << 20,
        nr_zones: 2,
    };
    let t = T::new(big, limits(0, 0));
    let s = t.s();
    let threads = 4;
    let per = 200u64;
    let mut got: Vec<u64> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| {
                    let mut v = Vec::new();
                    for i in 0..per {
                        let t = s.begin_write(WriteKind::Append, 0, 4096).unwrap();
                        if i % 3 == 0 {
                            std::thread::yield_now();
                        }
                        s.end_write(&t, true).unwrap();
                        v.push(t.offset);
                    }
                    v
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    got.sort_unstable();
    let want: Vec<u64> = (0..threads as u64 * per).map(|i| i * 4096).collect();
    assert_eq!(got, want);
    assert_eq!(t.record(0).1, threads as u64 * per * 4096);
}

#[test]
fn persisted_wp_never_passes_unwritten_data_under_concurrency() {
    use std::sync::atomic::AtomicBool;
    let big = Geometry {
        zone_size: 4 << 20,
        capacity: 4 << 20,
        nr_zones: 1,
    };
    let t = T::new(big, limits(0, 0));
    let s = t.s();
    let blocks = (4 << 20) / 4096;
    // Set when a block's data is "written", before its completion is
    // handed to the zone state.
    let written: Vec<AtomicBool> = (0..blocks).map(|_| AtomicBool::new(false)).collect();
    let running = AtomicBool::new(true);
    let reader = File::open(t.path()).unwrap();
    std::thread::scope(|sc| {
        let checker = sc.spawn(|| {
            let mut checks = 0u64;
            let mut last = 0;
            while running.load(Ordering::Acquire) || checks == 0 {
                let mut rec = [0u8; RECORD_SIZE];
                reader.read_exact_at(&mut rec, HEADER_SIZE).unwrap();
                let wp = le64(&rec[8..]);
                assert!(wp >= last, "the persisted write pointer went back");
                last = wp;
                for (b, w) in written.iter().take((wp / 4096) as usize).enumerate() {
                    assert!(
                        w.load(Ordering::Acquire),
                        "persisted wp {wp} is past block {b}, not written yet"
                    );
                }
                checks += 1;
            }
            checks
        });
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let written = &written;
                sc.spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
                    let mut pending = Vec::new();
                    for _ in 0..256 {
                        pending.push(s.begin_write(WriteKind::Append, 0, 4096).unwrap());
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Complete some of what is pending, in any order.
                        while !pending.is_empty() && x % 3 != 0 {
                            let i = (x as usize / 3) % pending.len();
                            let t: Ticket = pending.swap_remove(i);
                            written[(t.offset / 4096) as usize].store(true, Ordering::Release);
                            s.end_write(&t, true).unwrap();
                            x = x.rotate_left(9);
                        }
                    }
                    for t in pending {
                        written[(t.offset / 4096) as usize].store(true, Ordering::Release);
                        s.end_write(&t, true).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        running.store(false, Ordering::Release);
        assert!(checker.join().unwrap() > 0);
    });
    assert_eq!(t.record(0).0, Cond::Full as u8);
    assert_eq!(t.record(0).1, 4 << 20);
}

#[test]
fn persisted_wp_never_passes_data_in_flight() {
    let mut t = T::new(geo(ZS, 2), limits(0, 0));
    let s = t.s();
    let a = s.begin_write(WriteKind::Append, 0, 4096).unwrap();
    let b = s.begin_write(WriteKind::Write, 4096, 4096).unwrap();
    let c = s.begin_write(WriteKind::Append, 0, 4096).unwrap();
    assert_eq!((a.offset, b.offset, c.offset), (0, 4096, 8192));
    // The in-memory write pointer moved; the file did not.
    assert_eq!(t.wp(0), 12288);
    assert_eq!(t.record(0).1, 0);
    s.end_write(&b, true).unwrap();
    s.end_write(&c, true).unwrap();
    assert_eq!(t.record(0).1, 0, "a is still in flight");
    s.end_write(&a, true).unwrap();
    assert_eq!(t.record(0), (Cond::ImplicitOpen as u8, 12288, 8192, 4096));

    // A write that fills the zone is recorded FULL only once written.
    let d = s.begin_write(WriteKind::Append, 0, 32 * 1024).unwrap();
    let e = s
        .begin_write(WriteKind::Write, 12288 + 32768, ZS - 12288 - 32768)
        .unwrap();
    assert_eq!(t.cond(0), Cond::Full);
    s.end_write(&e, true).unwrap();
    assert_eq!(t.record(0).0, Cond::ImplicitOpen as u8);
    assert_eq!(t.record(0).1, 12288);
    // A worker dying now comes back with the completed prefix.
    let _ = d;
    t.reload();
    assert_eq!((t.cond(0), t.wp(0)), (Cond::ImplicitOpen, 12288));
}

#[test]
fn failed_writes() {
    let t = T::new(geo(ZS, 2), limits(0, 0));
    let s = t.s();
    // The last reservation failing gives its range back.
    let a = s.begin_write(WriteKind::Write, 0, 4096).unwrap();
    s.end_write(&a, false).unwrap();
    assert_eq!((t.cond(0), t.wp(0)), (Cond::Empty, 0));
    assert_eq!(t.counts(), (0, 0));
    // One with later reservations behind it: the write pointer goes
    // back to where it began (never past unwritten data: a failover
    // takes what lies below it as written), and the later ones fail
    // as no longer at the write pointer.
    let w = s.begin_write(WriteKind::Write, 0, 4096).unwrap();
    s.end_write(&w, true).unwrap();
    let a = s.begin_write(WriteKind::Append, 0, 4096).unwrap();
    let b = s.begin_write(WriteKind::Append, 0, 4096).unwrap();
    s.end_write(&a, false).unwrap();
    assert_eq!(t.wp(0), 4096);
    assert_eq!(t.record(0).1, 4096, "the file never says more was written");
    assert!(matches!(s.end_write(&b, true), Err(ZoneError::UnalignedWp)));
    assert_eq!((t.wp(0), t.record(0).1), (4096, 4096));
    // The zone takes writes at the write pointer again.
    let c = s.begin_write(WriteKind::Write, 4096, 4096).unwrap();
    s.end_write(&c, true).unwrap();
    assert_eq!((t.wp(0), t.record(0).1), (8192, 8192));
    // A zone filled by reservations opens again when one of them fails.
    let d = s.begin_write(WriteKind::Write, ZS, ZS - 4096).unwrap();
    let e = s
        .begin_write(WriteKind::Write, 2 * ZS - 4096, 4096)
        .unwrap();
    assert_eq!(t.cond(1), Cond::Full);
    s.end_write(&d, false).unwrap();
    assert_eq!((t.cond(1), t.wp(1)), (Cond::Empty, 0));
    assert!(s.end_write(&e, true).is_err());
    assert_eq!((t.cond(1), t.wp(1), t.record(1).1), (Cond::Empty, 0, 0));
    assert_eq!(t.counts(), (1, 1));
    // A failure below a write that already completed leaves a hole
    // under acknowledged data: the zone turns read-only.
    let f = s.begin_write(WriteKind::Write, ZS, 4096).unwrap();
    let g = s.begin_write(WriteKind::Write, ZS + 4096, 4096).unwrap();
    s.end_write(&g, true).unwrap();
    s.end_write(&f, false).unwrap();
    assert_eq!(t.cond(1), Cond::ReadOnly);
    assert_eq!(t.record(1).0, Cond::ReadOnly as u8);
    assert!(s.begin_write(WriteKind::Write, ZS + 8192, 4096).is_err());
}

#[test]
fn reset_and_finish_abandon_writes_in_flight() {
    let t = T::new(geo(ZS, 2), limits(0, 0));
    let s = t.s();
    let a = s.begin_write(WriteKind::Write, 0, 4096).unwrap();
    s.manage(Action::Reset, 0).unwrap();
    s.end_write(&a, true).unwrap();
    assert_eq!((t.cond(0), t.wp(0), t.record(0).1), (Cond::Empty, 0, 0));
    let b = s.begin_write(WriteKind::Write, 0, 4096).unwrap();
    s.manage(Action::Finish, 0).unwrap();
    s.end_write(&b, true).unwrap();
    assert_eq!((t.cond(0), t.wp(0)), (Cond::Full, ZS));
    assert_eq!(t.record(0).0, Cond::Full as u8);
}

#[test]
fn state_survives_reload() {
    let mut t = T::new(geo(ZS, 6), limits(0, 0));
    t.write(0, 4096).unwrap(); // implicitly open
    t.write(ZS, 512).unwrap();
    t.act(Action::Close, 1).unwrap(); // closed
    t.act(Action::Finish, 2).unwrap(); // full
    t.act(Action::Open, 3).unwrap(); // explicitly open, empty
    t.write(4 * ZS, ZS).unwrap(); // full by writes
    t.reload();
    let conds: Vec<_> = (0..6).map(|z| (t.cond(z), t.wp(z))).collect();
    assert_eq!(
        conds,
        [
            (Cond::ImplicitOpen, 4096),
            (Cond::Closed, 512),
            (Cond::Full, ZS),
            (Cond::ExplicitOpen, 0),
            (Cond::Full, ZS),
            (Cond::Empty, 0),
        ]
    );
    assert_eq!(t.counts(), (2, 3));
    // Writes go on from the loaded write pointer.
    t.write(4096, 512).unwrap();
    t.write(ZS + 512, 512).unwrap();
    assert_eq!(t.cond(1), Cond::ImplicitOpen);
}

#[test]
fn the_last_write_may_be_replayed_once_after_a_reload() {
    let mut t = T::new(geo(ZS, 2), limits(0, 0));
    t.write(0, 4096).unwrap();
    t.write(4096, 8192).unwrap();
    // Without a reload, rewriting is an error.
    assert_eq!(t.write(4096, 8192), Err(ZoneError::UnalignedWp));
    t.reload();
    // Only the exact last write, once.
    assert_eq!(t.write(0, 4096), Err(ZoneError::UnalignedWp));
    t.reload();
    t.write(4096, 8192).unwrap();
    assert_eq!(t.wp(0), 12288);
    assert_eq!(t.write(4096, 8192), Err(ZoneError::UnalignedWp));
    t.write(12288, 512).unwrap();
    // A zone made full by its last write replays too.
    t.write(ZS, ZS).unwrap();
    t.reload();
    t.write(ZS, ZS).unwrap();
    assert_eq!(t.cond(1), Cond::Full);
}

#[test]
fn metadata_of_another_geometry_is_refused() {
    let mut t = T::new(geo(ZS, 4), limits(0, 0));
    t.write(0, 512).unwrap();
    t.s = None;
    for other in [geo(ZS, 5), geo(ZS / 2, 4), geo(ZS - 4096, 4)] {
        let e = ZonedState::open(&t.path(), other, t.limits).unwrap_err();
        assert_eq!(e.errno.get(), libc::EINVAL);
        assert!(e.message.contains("remove the file"), "{}", e.message);
    }
    // Not ours at all.
    let junk = t.dir.path().join("junk");
    std::fs::write(
        &junk,
        b"hello, this is not zone metadata, really not at all..",
    )
    .unwrap();
    let e = ZonedState::open(&junk, t.geo, t.limits).unwrap_err();
    assert!(e.message.contains("magic"), "{}", e.message);
    // An empty file is initialized.
    let empty = t.dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    ZonedState::open(&empty, t.geo, t.limits).unwrap();
    assert_eq!(
        std::fs::metadata(&empty).unwrap().len(),
        HEADER_SIZE + 4 * RECORD_SIZE as u64
    );
    t.reload();
    assert_eq!(t.wp(0), 512);
}

#[test]
fn metadata_is_locked_against_a_second_opener() {
    let t = T::new(geo(ZS, 2), limits(0, 0));
    let e = ZonedState::open(&t.path(), t.geo, t.limits).unwrap_err();
    assert_eq!(e.errno.get(), libc::EBUSY, "{}", e.message);
}

#[test]
fn corrupt_records_are_refused() {
    let mut t = T::new(geo(ZS, 2), limits(0, 0));
    t.s = None;
    let f = OpenOptions::new().write(true).open(t.path()).unwrap();
    f.write_all_at(
        &[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0],
        HEADER_SIZE + 32,
    )
    .unwrap(); // implicitly open, wp 128 KiB > capacity
    let e = ZonedState::open(&t.path(), t.geo, t.limits).unwrap_err();
    assert!(e.message.contains("zone 1"), "{}", e.message);
}

#[test]
fn sync_only_when_records_changed() {
    let t = T::new(geo(ZS, 2), limits(0, 0));
    let s = t.s();
    s.sync().unwrap();
    assert_eq!(s.metadata.synced(), 0);
    t.write(0, 512).unwrap();
    s.sync().unwrap();
    let n = s.metadata.synced();
    assert!(n > 0);
    s.sync().unwrap();
    assert_eq!(s.metadata.synced(), n);
}
