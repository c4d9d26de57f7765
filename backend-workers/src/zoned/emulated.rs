//! The emulation of a host-managed zoned device over a regular child: the
//! zone state machine, the reservations of writes in flight, and what of
//! it goes to the metadata file (see the crate's `zoned` module docs).

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::metadata::{MetadataFile, RawRecord, Record, RECORD_SIZE};
use super::types::{
    Action, Cond, Geometry, Ticket, WriteKind, ZoneError, ZoneLimits, ZoneView, TYPE_SEQ_REQUIRED,
};
use crate::errno::{Errno, OpenError};

/// Most zones an emulated node may have (bounds memory and the file).
pub const MAX_ZONES: u64 = 1 << 20;

/// A range of a zone in flight (bytes from the zone start).
#[derive(Clone, Copy, Debug)]
struct InFlight {
    start: u64,
    end: u64,
    done: bool,
    ok: bool,
    /// Reserved behind a write that failed: the write pointer went back
    /// below it, so it is no longer at the write pointer and fails.
    doomed: bool,
}

#[derive(Debug)]
struct Zone {
    cond: Cond,
    /// Bytes from the zone start where the next write goes (reservations
    /// included).
    wp: u64,
    /// Bytes from the zone start known written: the end of the completed
    /// prefix of the reservations.
    durable: u64,
    /// The last completed write ending at `durable` (start, end), if it
    /// succeeded.
    last: (u64, u64),
    inflight: VecDeque<InFlight>,
    /// Bumped by reset and finish: completions of older tickets are ignored.
    gen: u32,
    /// Loaded `last`: accepted once as a replay, until anything else
    /// touches the zone.
    replay: Option<(u64, u64)>,
    /// When the zone was last written (for implicit-open eviction).
    lru: u64,
    /// The record as it is in the file.
    saved: RawRecord,
}

struct Inner {
    zones: Vec<Zone>,
    /// Implicitly open zones (eviction candidates).
    implicit: Vec<u32>,
    n_open: u32,
    n_active: u32,
    limits: ZoneLimits,
    tick: u64,
    errors_logged: u32,
}

impl Inner {
    /// Moves zone `z` to `new`, keeping the open / active counts.
    fn set_cond(&mut self, z: usize, new: Cond) {
        let old = self.zones[z].cond;
        if old == new {
            return;
        }
        if old.is_open() {
            self.n_open -= 1;
        }
        if old.is_active() {
            self.n_active -= 1;
        }
        if old == Cond::ImplicitOpen {
            if let Some(i) = self.implicit.iter().position(|&x| x as usize == z) {
                self.implicit.swap_remove(i);
            }
        }
        if new.is_open() {
            self.n_open += 1;
        }
        if new.is_active() {
            self.n_active += 1;
        }
        if new == Cond::ImplicitOpen {
            self.implicit.push(z as u32);
        }
        self.zones[z].cond = new;
    }

    fn check_active(&self) -> Result<(), ZoneError> {
        let max = self.limits.max_active;
        if max != 0 && self.n_active >= max {
            return Err(ZoneError::ActiveResource);
        }
        Ok(())
    }

    /// Makes room for one more open zone: closes the least recently
    /// written implicitly open zone if the limit is reached. Returns the
    /// zone it closed.
    fn open_room(&mut self) -> Result<Option<usize>, ZoneError> {
        let max = self.limits.max_open;
        if max == 0 || self.n_open < max {
            return Ok(None);
        }
        let victim = self
            .implicit
            .iter()
            .copied()
            .min_by_key(|&z| self.zones[z as usize].lru)
            .ok_or(ZoneError::OpenResource)? as usize;
        let to = if self.zones[victim].wp == 0 {
            Cond::Empty
        } else {
            Cond::Closed
        };
        self.set_cond(victim, to);
        Ok(Some(victim))
    }

    /// Opens zone `z` (empty or closed) as `to`, checking the limits;
    /// returns the zone closed to make room.
    fn open_zone(&mut self, z: usize, to: Cond) -> Result<Option<usize>, ZoneError> {
        if self.zones[z].cond == Cond::Empty {
            self.check_active()?;
        }
        let evicted = self.open_room()?;
        self.set_cond(z, to);
        Ok(evicted)
    }

    /// Empties zone `z` (or fills it, `full`), abandoning writes in flight.
    fn rewind(&mut self, z: usize, full: bool, zone_size: u64) {
        self.set_cond(z, if full { Cond::Full } else { Cond::Empty });
        let zone = &mut self.zones[z];
        zone.wp = if full { zone_size } else { 0 };
        zone.durable = zone.wp;
        zone.last = (0, 0);
        zone.inflight.clear();
        zone.gen = zone.gen.wrapping_add(1);
    }
}

/// The record a zone's state should have in the file.
fn durable_record(z: &Zone) -> RawRecord {
    let (cond, wp) = if z.inflight.is_empty() {
        (z.cond, z.wp)
    } else if z.cond == Cond::Full {
        // Made full by writes not all written yet.
        (Cond::ImplicitOpen, z.durable)
    } else {
        (z.cond, z.durable)
    };
    let (cond, wp) = match cond {
        Cond::Empty => (Cond::Empty, 0),
        Cond::ImplicitOpen | Cond::Closed if wp == 0 => (Cond::Empty, 0),
        c => (c, wp),
    };
    let last = if z.last.1 == wp && z.last.1 > z.last.0 && cond != Cond::Empty {
        z.last
    } else {
        (0, 0)
    };
    Record {
        cond: cond as u8,
        wp,
        last_start: last.0,
        last_len: last.1 - last.0,
    }
    .encode()
}

/// Zone state of an emulated zoned node, backed by its metadata file.
pub struct ZonedState {
    geo: Geometry,
    /// Records are written under `inner`'s lock.
    metadata: MetadataFile,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ZonedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZonedState")
            .field("geo", &self.geo)
            .field("path", &self.metadata.path())
            .finish_non_exhaustive()
    }
}

impl ZonedState {
    /// Opens (or creates) the metadata at `path` for `geo` and loads it.
    pub fn open(path: &Path, geo: Geometry, limits: ZoneLimits) -> Result<ZonedState, OpenError> {
        let (metadata, raw) = MetadataFile::open(path, geo)?;
        let mut inner = Inner {
            zones: Vec::with_capacity(geo.nr_zones as usize),
            implicit: Vec::new(),
            n_open: 0,
            n_active: 0,
            limits,
            tick: 0,
            errors_logged: 0,
        };
        for (z, saved) in raw.chunks_exact(RECORD_SIZE).enumerate() {
            let corrupt = |why: &str| {
                MetadataFile::error(
                    path,
                    Errno::EINVAL,
                    format!("record of zone {z} is corrupt ({why}); remove the file to start over"),
                )
            };
            let rec = Record::decode(saved);
            let cond = match rec.cond {
                0 => Cond::Empty,
                v => Cond::from_u8(v)
                    .filter(|c| *c != Cond::NotWritePointer)
                    .ok_or_else(|| corrupt("condition"))?,
            };
            let wp = rec.wp;
            let limit = if cond == Cond::Full {
                geo.zone_size
            } else {
                geo.capacity
            };
            if wp > limit {
                return Err(corrupt("write pointer beyond the zone"));
            }
            let (cond, wp) = match cond {
                Cond::Empty => (Cond::Empty, 0),
                Cond::ImplicitOpen | Cond::Closed if wp == 0 => (Cond::Empty, 0),
                Cond::ImplicitOpen | Cond::ExplicitOpen | Cond::Closed if wp == geo.capacity => {
                    (Cond::Full, wp)
                }
                c => (c, wp),
            };
            let (ls, ll) = (rec.last_start, rec.last_len);
            let last = match ls.checked_add(ll) {
                Some(end) if ll > 0 && end == wp => (ls, end),
                _ => (0, 0),
            };
            let mut record = [0u8; RECORD_SIZE];
            record.copy_from_slice(saved);
            inner.zones.push(Zone {
                cond: Cond::Empty,
                wp,
                durable: wp,
                last,
                inflight: VecDeque::new(),
                gen: 0,
                replay: (last.1 > last.0).then_some(last),
                lru: 0,
                saved: record,
            });
            inner.set_cond(z, cond);
        }
        Ok(ZonedState {
            geo,
            metadata,
            inner: Mutex::new(inner),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn path(&self) -> &Path {
        self.metadata.path()
    }

    pub fn limits(&self) -> ZoneLimits {
        self.lock().limits
    }

    /// New open / active limits, granularity, append size (a reopen).
    pub fn set_limits(&self, limits: ZoneLimits) {
        self.lock().limits = limits;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes zone `z`'s record if it changed.
    fn persist(&self, g: &mut Inner, z: usize) -> Result<(), ZoneError> {
        let rec = durable_record(&g.zones[z]);
        if rec == g.zones[z].saved {
            return Ok(());
        }
        match self.metadata.write_record(z, &rec) {
            Ok(()) => {
                g.zones[z].saved = rec;
                Ok(())
            }
            Err(e) => {
                if g.errors_logged < 8 {
                    g.errors_logged += 1;
                    tracing::error!(path = %self.path().display(), zone = z, "writing zone record: {e}");
                }
                Err(ZoneError::Io(Errno::of_io(&e)))
            }
        }
    }

    fn view(&self, g: &Inner, z: usize) -> ZoneView {
        let zone = &g.zones[z];
        let start = self.geo.start(z);
        ZoneView {
            start,
            len: self.geo.zone_size,
            capacity: self.geo.capacity,
            wp: start + zone.wp,
            zone_type: TYPE_SEQ_REQUIRED,
            cond: zone.cond,
        }
    }

    pub(super) fn report(&self, first: u32, end: u32, max: usize, out: &mut Vec<ZoneView>) {
        let g = self.lock();
        let end = end.min(self.geo.nr_zones);
        out.extend((first..end).take(max).map(|z| self.view(&g, z as usize)));
    }

    pub(super) fn manage(&self, action: Action, z: usize) -> Result<ZoneView, ZoneError> {
        let mut g = self.lock();
        g.zones[z].replay = None;
        let cond = g.zones[z].cond;
        let mut evicted = None;
        match (action, cond) {
            (_, Cond::ReadOnly | Cond::Offline | Cond::NotWritePointer) => {
                return Err(ZoneError::InvalidCmd)
            }
            (Action::Open, Cond::ExplicitOpen) => {}
            (Action::Open, Cond::ImplicitOpen) => g.set_cond(z, Cond::ExplicitOpen),
            (Action::Open, Cond::Empty | Cond::Closed) => {
                evicted = g.open_zone(z, Cond::ExplicitOpen)?;
            }
            (Action::Open, Cond::Full) => return Err(ZoneError::InvalidCmd),
            (Action::Close, Cond::ImplicitOpen | Cond::ExplicitOpen) => {
                let to = if g.zones[z].wp == 0 {
                    Cond::Empty
                } else {
                    Cond::Closed
                };
                g.set_cond(z, to);
            }
            (Action::Close, Cond::Closed) => {}
            (Action::Close, Cond::Empty | Cond::Full) => return Err(ZoneError::InvalidCmd),
            (Action::Finish, Cond::Full) => {}
            (Action::Finish, c) => {
                if c == Cond::Empty {
                    g.check_active()?;
                }
                g.rewind(z, true, self.geo.zone_size);
            }
            (Action::Reset, Cond::Empty) => {}
            (Action::Reset, _) => g.rewind(z, false, self.geo.zone_size),
        }
        if let Some(e) = evicted {
            self.persist(&mut g, e)?;
        }
        self.persist(&mut g, z)?;
        Ok(self.view(&g, z))
    }

    pub(super) fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
        let mut g = self.lock();
        let mut result = Ok(());
        for z in zones.start as usize..(zones.end.min(self.geo.nr_zones) as usize) {
            g.zones[z].replay = None;
            if matches!(
                g.zones[z].cond,
                Cond::ImplicitOpen | Cond::ExplicitOpen | Cond::Closed | Cond::Full
            ) {
                g.rewind(z, false, self.geo.zone_size);
                if let Err(e) = self.persist(&mut g, z) {
                    result = Err(e);
                }
            }
        }
        result
    }

    pub(super) fn begin_write(
        &self,
        kind: WriteKind,
        offset: u64,
        len: u64,
    ) -> Result<Ticket, ZoneError> {
        let geo = self.geo;
        let (z, zstart, rel) = geo.locate(offset)?;
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        let limits = g.limits;
        let zone = &mut g.zones[z];
        if kind == WriteKind::Write {
            if let Some((s, e)) = zone.replay.take() {
                if (s, e) == (rel, rel.saturating_add(len)) {
                    // The frontend resubmitting a write this zone already
                    // recorded (a worker died before completing it).
                    return Ok(Ticket {
                        zone: z as u32,
                        offset,
                        len,
                        gen: zone.gen,
                        untracked: true,
                    });
                }
            }
        }
        zone.replay = None;
        if matches!(
            zone.cond,
            Cond::Full | Cond::ReadOnly | Cond::Offline | Cond::NotWritePointer
        ) {
            return Err(ZoneError::InvalidCmd);
        }
        let gran = limits.granularity.max(1) as u64;
        let start = match kind {
            WriteKind::Append => {
                if rel != 0 {
                    return Err(ZoneError::BadOffset);
                }
                if len > limits.max_append {
                    return Err(ZoneError::InvalidCmd);
                }
                zone.wp
            }
            WriteKind::Write => rel,
        };
        if len == 0 || len % gran != 0 || start % gran != 0 || start != zone.wp {
            return Err(ZoneError::UnalignedWp);
        }
        let end = start.checked_add(len).ok_or(ZoneError::InvalidCmd)?;
        if end > geo.capacity {
            return Err(ZoneError::InvalidCmd);
        }
        let evicted = match g.zones[z].cond {
            Cond::Empty | Cond::Closed => g.open_zone(z, Cond::ImplicitOpen)?,
            _ => None, // already open (explicitly or not): stays so
        };
        let zone = &mut g.zones[z];
        zone.wp = end;
        zone.lru = tick;
        zone.inflight.push_back(InFlight {
            start,
            end,
            done: false,
            ok: false,
            doomed: false,
        });
        let gen = zone.gen;
        if end == geo.capacity {
            g.set_cond(z, Cond::Full);
        }
        // What changes in the file here is only an evicted zone becoming
        // closed (a newly open zone still reads as its old record): a
        // failure to record it fails nothing; the next record catches up.
        if let Some(e) = evicted {
            let _ = self.persist(&mut g, e);
        }
        let _ = self.persist(&mut g, z);
        Ok(Ticket {
            zone: z as u32,
            offset: zstart + start,
            len,
            gen,
            untracked: false,
        })
    }

    pub(super) fn end_write(&self, t: &Ticket, ok: bool) -> Result<(), ZoneError> {
        if t.untracked {
            return Ok(());
        }
        let z = t.zone as usize;
        let mut g = self.lock();
        if g.zones[z].gen != t.gen {
            return Ok(()); // reset or finished since: nothing to record
        }
        let start = t.offset - self.geo.start(z);
        let zone = &mut g.zones[z];
        let Some(i) = zone.inflight.iter().position(|f| f.start == start) else {
            return Ok(());
        };
        let mut result = Ok(());
        if zone.inflight[i].doomed {
            // Its data lies past the write pointer now: not the zone's.
            zone.inflight.remove(i);
            if ok {
                result = Err(ZoneError::UnalignedWp);
            }
        } else if !ok && zone.inflight.iter().skip(i + 1).any(|f| f.done) {
            // Writes behind it already completed (and were acknowledged):
            // the failed range stays a hole below them. The zone becomes
            // read-only, as a device's does on a media error, so no write
            // lands there and a failover never takes the hole as written.
            zone.inflight[i].done = true;
            g.set_cond(z, Cond::ReadOnly);
            tracing::error!(
                zone = z,
                offset = t.offset,
                "a write failed below completed ones: zone made read-only"
            );
        } else if !ok {
            // The write pointer never stays past data that was not written
            // (a failover takes what lies below it as written): it goes
            // back to where the failed write began, and the writes
            // reserved behind it fail too, as on a device.
            zone.inflight.remove(i);
            for f in zone.inflight.iter_mut().skip(i) {
                f.doomed = true;
            }
            zone.wp = start;
            let cond = zone.cond;
            if start == 0 && matches!(cond, Cond::ImplicitOpen | Cond::Closed | Cond::Full) {
                g.set_cond(z, Cond::Empty);
            } else if cond == Cond::Full {
                // Filled by reservations: open again (possibly above the
                // open limit until a zone closes).
                g.set_cond(z, Cond::ImplicitOpen);
            }
        } else {
            zone.inflight[i].done = true;
            zone.inflight[i].ok = true;
        }
        let zone = &mut g.zones[z];
        while zone.inflight.front().is_some_and(|f| f.done) {
            if let Some(f) = zone.inflight.pop_front() {
                zone.durable = f.end;
                zone.last = if f.ok { (f.start, f.end) } else { (0, 0) };
            }
        }
        self.persist(&mut g, z)?;
        result
    }

    pub(super) fn sync(&self) -> Result<(), ZoneError> {
        self.metadata.sync()
    }

    /// Records written since the last sync.
    #[cfg(test)]
    pub(crate) fn unsynced(&self) -> u64 {
        self.metadata.unsynced()
    }

    /// Puts a zone in a condition the emulation never enters by itself
    /// (read-only, offline), as a failing device would.
    #[cfg(test)]
    pub(crate) fn force_condition(&self, z: usize, cond: Cond) {
        let mut g = self.lock();
        g.set_cond(z, cond);
        let _ = self.persist(&mut g, z);
    }
}

#[cfg(test)]
mod tests;
