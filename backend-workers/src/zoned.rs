//! Zoned block devices: the zone layer of a graph.
//!
//! A graph has at most one zone layer, a [`ZoneLayer`] in a
//! [`Stage::Zoned`](crate::stages::Stage::Zoned):
//!
//! - [`ZonedState`]: a `zoned` format node that emulates a host-managed
//!   zoned device over a regular child, with zone conditions and write
//!   pointers kept in a metadata file;
//! - [`ZonedDevice`]: an `io_uring` leaf on a Linux zoned block device,
//!   whose zones are the device's own (reports and zone management through
//!   the block layer's ioctls, zone append emulated by writes at the write
//!   pointer).
//!
//! Raw windows and filters above the layer pass zone operations through;
//! windows must be zone-aligned (checked at open, see `graph.rs`).
//!
//! # The emulation's state machine
//!
//! ZBC/ZNS rules, as null_blk implements them: a write must start at the
//! zone's write pointer (`UNALIGNED_WP`), be a multiple of the write
//! granularity (`UNALIGNED_WP`) and not cross the zone capacity
//! (`INVALID_CMD`); writing a full, read-only or offline zone is
//! `INVALID_CMD`. Writes and appends implicitly open an empty or closed zone;
//! when `max_open_zones` are open the least recently written implicitly open
//! zone is closed to make room, and only explicitly open zones left is
//! `OPEN_RESOURCE`; an empty zone needs an active slot (`ACTIVE_RESOURCE`).
//! Open (explicit) takes empty, implicitly open and closed zones; close
//! takes open zones (to CLOSED, or EMPTY when nothing was written), a closed
//! zone is left as it is, an empty or full one is `INVALID_CMD`; finish
//! makes any writable zone FULL with the write pointer at the zone end;
//! reset makes it EMPTY (the data is left in place). Reads go anywhere.
//!
//! # Concurrency
//!
//! One [`ZonedState`] per node per worker process (see [`open_emulated`]),
//! shared by every queue thread of every export that uses the node. All zone
//! state sits behind one mutex, held for a few hundred nanoseconds per
//! request (reserve at submission, record at completion), never across I/O.
//! A write or append reserves its range at submission: the in-memory write
//! pointer moves at once, so appends from several queues get distinct,
//! adjacent ranges, and a write is accepted while earlier ones are in
//! flight only when it starts exactly at the reserved end. Each zone keeps
//! the ranges in flight in submission order; the write pointer that is
//! persisted is the end of the prefix of them that has completed.
//!
//! A failed write that is still the zone's last reservation gives its range
//! back (the write pointer returns to its start). A failed write with later
//! writes already reserved behind it cannot be undone without invalidating
//! those: its range counts as written with undefined content.
//!
//! # Persistence and crash consistency
//!
//! The metadata file (`ZonedOptions.metadata_path`) is a 4096-byte header
//! (magic `BLKMZONE`, version, record size, zone size, zone capacity,
//! number of zones; a file of another geometry is refused unless empty)
//! followed by one 32-byte record per zone: condition (the virtio `z_state`
//! number; 0 reads as EMPTY), the persisted write pointer (bytes from the
//! zone start), and the last completed write ending there (start, length).
//!
//! A record is rewritten with `pwrite` (under the state's mutex, so records
//! reach the page cache in the order the state changed) whenever what it
//! would say changes: after a write's data completed, never before, and
//! with a write pointer that never passes a range still in flight (while
//! writes are in flight the record holds the completed prefix, and a zone
//! those writes made FULL is recorded as still open). The page cache
//! survives a `kill -9` of the worker, so a restarted worker never finds a
//! write pointer past data that was not written. Once the leaf completed a
//! flush from the guest, or a FUA write, the metadata file is `fdatasync`ed
//! (when a record changed since the last sync), so the zone state is on
//! stable storage after the data it describes. Against power loss that is
//! the guarantee: state up to the last completed flush; records written
//! since may have been written back by the kernel ahead of their data (the
//! page cache writes the two files back independently). Records are 32-byte
//! aligned within a sector, which the storage writes whole.
//!
//! On open the state is loaded as it was: open zones stay open (explicitly
//! or implicitly) and keep their write pointer, so a worker that restarts
//! under a running guest changes nothing the guest can see. That is the
//! failover case: the frontend resubmits the requests that were in flight
//! when the worker died. A write whose data and record reached the file
//! but whose completion did not reach the frontend comes back as a write
//! below the write pointer; the first write to a zone after a load that
//! matches the zone's recorded last write exactly is therefore accepted
//! again (rewritten in place, write pointer unchanged). Resubmitted appends
//! append again (the first copy stays in the zone as unreferenced data).
//!
//! Reset and finish abandon the ranges still in flight in the zone: their
//! completions no longer move anything.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use blkmesh_ipc::ring::zone_status;
use blkmesh_ipc::zoned_dev::{self, ZoneMgmt};
use blkmesh_proto::v1::ZoneModel;

use crate::errno::{Errno, OpenError};

/// Zone conditions, numbered as virtio-blk's `z_state` (and the kernel's
/// `BLK_ZONE_COND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cond {
    NotWritePointer = 0,
    Empty = 1,
    ImplicitOpen = 2,
    ExplicitOpen = 3,
    Closed = 4,
    ReadOnly = 13,
    Full = 14,
    Offline = 15,
}

impl Cond {
    pub fn from_u8(v: u8) -> Option<Cond> {
        Some(match v {
            0 => Cond::NotWritePointer,
            1 => Cond::Empty,
            2 => Cond::ImplicitOpen,
            3 => Cond::ExplicitOpen,
            4 => Cond::Closed,
            13 => Cond::ReadOnly,
            14 => Cond::Full,
            15 => Cond::Offline,
            _ => return None,
        })
    }

    fn is_open(self) -> bool {
        matches!(self, Cond::ImplicitOpen | Cond::ExplicitOpen)
    }

    fn is_active(self) -> bool {
        self.is_open() || self == Cond::Closed
    }
}

/// Zone types, numbered as virtio-blk's `z_type`.
pub const TYPE_CONVENTIONAL: u8 = 1;
pub const TYPE_SEQ_REQUIRED: u8 = 2;
pub const TYPE_SEQ_PREFERRED: u8 = 3;

/// One zone as reported, in bytes of the layer's coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneView {
    pub start: u64,
    pub len: u64,
    pub capacity: u64,
    pub wp: u64,
    pub zone_type: u8,
    pub cond: Cond,
}

/// Why a zone operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("the zone's condition forbids this operation")]
    InvalidCmd,
    #[error("write not at the zone's write pointer or not a multiple of the write granularity")]
    UnalignedWp,
    #[error("too many open zones")]
    OpenResource,
    #[error("too many active zones")]
    ActiveResource,
    #[error("offset is not the start of a zone of the device")]
    BadOffset,
    /// A write to the zone is in flight on a device that takes one at a
    /// time: try again shortly.
    #[error("zone busy")]
    Busy,
    #[error("I/O error ({0})")]
    Io(Errno),
}

impl ZoneError {
    /// The completion result on the ring (negative).
    pub fn ring_result(self) -> i32 {
        match self {
            ZoneError::InvalidCmd | ZoneError::BadOffset => zone_status::INVALID_CMD,
            ZoneError::UnalignedWp => zone_status::UNALIGNED_WP,
            ZoneError::OpenResource => zone_status::OPEN_RESOURCE,
            ZoneError::ActiveResource => zone_status::ACTIVE_RESOURCE,
            ZoneError::Busy => -libc::EBUSY,
            ZoneError::Io(e) => e.ring_result(),
        }
    }

    /// The errno of a control-channel failure: the zone statuses are
    /// negated errnos too (EBADRQC, EILSEQ, ETOOMANYREFS, EOVERFLOW).
    pub fn errno(self) -> Errno {
        match self {
            ZoneError::BadOffset => Errno::EINVAL,
            ZoneError::Busy => Errno::EBUSY,
            ZoneError::Io(e) => e,
            e => Errno::new(e.ring_result()).unwrap_or(Errno::EIO),
        }
    }

    fn from_io(e: &io::Error) -> ZoneError {
        match e.raw_os_error() {
            Some(libc::ETOOMANYREFS) => ZoneError::OpenResource,
            Some(libc::EOVERFLOW) => ZoneError::ActiveResource,
            _ => ZoneError::Io(Errno::of_io(e)),
        }
    }
}

/// A zone management action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Open,
    Close,
    Finish,
    Reset,
}

/// What writes into a zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A write (or write-zeroes) at a given offset: must be at the write pointer.
    Write,
    /// A zone append: lands at the write pointer of the zone starting at
    /// the given offset.
    Append,
}

/// Zone geometry (fixed for the life of the metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per zone, a power of two.
    pub zone_size: u64,
    /// Writable bytes per zone.
    pub capacity: u64,
    pub nr_zones: u32,
}

impl Geometry {
    fn zone_of(&self, offset: u64) -> Option<usize> {
        let z = offset / self.zone_size;
        (z < self.nr_zones as u64).then_some(z as usize)
    }

    fn start(&self, z: usize) -> u64 {
        z as u64 * self.zone_size
    }
}

/// Limits that may change when the graph is reopened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneLimits {
    /// Writes to sequential zones are multiples of this (bytes).
    pub granularity: u32,
    /// Largest zone append (bytes).
    pub max_append: u64,
    /// 0 = no limit.
    pub max_open: u32,
    pub max_active: u32,
}

/// A reserved write: where its data goes, to hand back on completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub zone: u32,
    /// Byte offset (layer coordinates) where the data goes.
    pub offset: u64,
    pub len: u64,
    gen: u32,
    /// Emulation: a replayed write that moves nothing. Device: no tracking
    /// (a conventional zone).
    untracked: bool,
}

/// The zone layer of a graph.
#[derive(Debug)]
pub enum ZoneLayer {
    Emulated(ZonedState),
    Device(ZonedDevice),
}

impl ZoneLayer {
    pub fn geometry(&self) -> Geometry {
        match self {
            ZoneLayer::Emulated(s) => s.geo,
            ZoneLayer::Device(d) => d.geo,
        }
    }

    pub fn limits(&self) -> ZoneLimits {
        match self {
            ZoneLayer::Emulated(s) => s.lock().limits,
            ZoneLayer::Device(d) => d.limits,
        }
    }

    pub fn model(&self) -> ZoneModel {
        match self {
            ZoneLayer::Emulated(_) => ZoneModel::HostManaged,
            ZoneLayer::Device(d) => d.model,
        }
    }

    /// Up to `max` zones from zone `first`, stopping before zone `end`.
    pub fn report(
        &self,
        first: u32,
        end: u32,
        max: usize,
        out: &mut Vec<ZoneView>,
    ) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => {
                s.report(first, end, max, out);
                Ok(())
            }
            ZoneLayer::Device(d) => d.report(first, end, max, out),
        }
    }

    /// Applies `action` to the zone starting at `offset`; the zone after it.
    pub fn manage(&self, action: Action, offset: u64) -> Result<ZoneView, ZoneError> {
        let geo = self.geometry();
        let z = geo.zone_of(offset).ok_or(ZoneError::BadOffset)?;
        if offset != geo.start(z) {
            return Err(ZoneError::BadOffset);
        }
        match self {
            ZoneLayer::Emulated(s) => s.manage(action, z),
            ZoneLayer::Device(d) => d.manage(action, z),
        }
    }

    /// Resets every zone of `zones` that can be.
    pub fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.reset_all(zones),
            ZoneLayer::Device(d) => d.reset_all(zones),
        }
    }

    /// Checks and reserves a write of `len` bytes at `offset` (layer
    /// coordinates; for an append, the zone start).
    pub fn begin_write(&self, kind: WriteKind, offset: u64, len: u64) -> Result<Ticket, ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.begin_write(kind, offset, len),
            ZoneLayer::Device(d) => d.begin_write(kind, offset, len),
        }
    }

    /// A reserved write completed (`ok`) or failed. An error means the
    /// zone state could not be recorded (the write should fail).
    pub fn end_write(&self, t: &Ticket, ok: bool) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.end_write(t, ok),
            ZoneLayer::Device(d) => {
                d.end_write(t, ok);
                Ok(())
            }
        }
    }

    /// Makes recorded zone state durable (flush, FUA).
    pub fn sync(&self) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.sync(),
            ZoneLayer::Device(_) => Ok(()),
        }
    }
}

/// Writes `views` (zones `start` shifted down by `shift`) as virtio-blk's
/// `struct virtio_blk_zone_report` into `out`, as many as fit in `room`
/// bytes; returns the bytes written. `room` must hold the 64-byte header.
pub fn encode_report(views: &[ZoneView], shift: u64, room: usize, out: &mut Vec<u8>) -> usize {
    let n = views.len().min(room.saturating_sub(64) / 64);
    out.clear();
    out.resize(64 + 64 * n, 0);
    out[..8].copy_from_slice(&(n as u64).to_le_bytes());
    for (i, v) in views[..n].iter().enumerate() {
        let d = &mut out[64 + 64 * i..128 + 64 * i];
        d[0..8].copy_from_slice(&(v.capacity / 512).to_le_bytes());
        d[8..16].copy_from_slice(&((v.start - shift) / 512).to_le_bytes());
        d[16..24].copy_from_slice(&(v.wp.saturating_sub(shift) / 512).to_le_bytes());
        d[24] = v.zone_type;
        d[25] = v.cond as u8;
    }
    out.len()
}

// ------------------------------------------------------------- emulation

const MAGIC: [u8; 8] = *b"BLKMZONE";
const VERSION: u32 = 1;
/// Bytes before the first record.
pub const HEADER_SIZE: u64 = 4096;
/// Bytes per zone record.
pub const RECORD_SIZE: usize = 32;
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
    saved: [u8; RECORD_SIZE],
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
fn durable_record(z: &Zone) -> [u8; RECORD_SIZE] {
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
    let mut r = [0u8; RECORD_SIZE];
    r[0] = cond as u8;
    r[8..16].copy_from_slice(&wp.to_le_bytes());
    r[16..24].copy_from_slice(&last.0.to_le_bytes());
    r[24..32].copy_from_slice(&(last.1 - last.0).to_le_bytes());
    r
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn header(geo: &Geometry) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(RECORD_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&geo.zone_size.to_le_bytes());
    h[24..32].copy_from_slice(&geo.capacity.to_le_bytes());
    h[32..36].copy_from_slice(&geo.nr_zones.to_le_bytes());
    h[40..48].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    h
}

/// Zone state of an emulated zoned node, backed by its metadata file.
pub struct ZonedState {
    geo: Geometry,
    path: PathBuf,
    /// Records are written under `inner`'s lock; sync needs no lock.
    file: File,
    inner: Mutex<Inner>,
    /// Records written, and records known synced.
    writes: AtomicU64,
    synced: AtomicU64,
}

impl std::fmt::Debug for ZonedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZonedState")
            .field("geo", &self.geo)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Takes an exclusive open-file-description lock on the whole file, held
/// until it is closed (or the process dies).
fn lock_file(file: &File) -> nix::Result<()> {
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)).map(|_| ())
}

fn read_fully(file: &File, mut at: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break, // past the end: zeroes
            Ok(n) => {
                done += n;
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl ZonedState {
    /// Opens (or creates) the metadata at `path` for `geo` and loads it.
    pub fn open(path: &Path, geo: Geometry, limits: ZoneLimits) -> Result<ZonedState, OpenError> {
        let fail = |errno: Errno, msg: String| {
            OpenError::new(errno, format!("zone metadata {}: {msg}", path.display()))
        };
        let io_fail = |what: &str, e: io::Error| fail(Errno::of_io(&e), format!("{what}: {e}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| io_fail("open", e))?;
        if !file.metadata().map_err(|e| io_fail("stat", e))?.is_file() {
            return Err(fail(Errno::EINVAL, "not a regular file".into()));
        }
        lock_file(&file).map_err(|e| {
            fail(
                Errno::EBUSY,
                format!("in use by another process (another worker serving this node?): {e}"),
            )
        })?;
        // Looked at once locked: nobody else initializes it meanwhile.
        let meta = file.metadata().map_err(|e| io_fail("stat", e))?;
        let records_len = geo.nr_zones as usize * RECORD_SIZE;
        if meta.len() == 0 {
            file.write_all_at(&header(&geo), 0)
                .map_err(|e| io_fail("writing the header", e))?;
            file.set_len(HEADER_SIZE + records_len as u64)
                .map_err(|e| io_fail("sizing", e))?;
            file.sync_all().map_err(|e| io_fail("sync", e))?;
        } else {
            let mut h = [0u8; 48];
            if meta.len() < h.len() as u64 {
                return Err(fail(
                    Errno::EINVAL,
                    "not a blkmesh zone metadata file (too short); refusing to overwrite it".into(),
                ));
            }
            read_fully(&file, 0, &mut h).map_err(|e| io_fail("reading the header", e))?;
            if h[0..8] != MAGIC {
                return Err(fail(
                    Errno::EINVAL,
                    "not a blkmesh zone metadata file (no BLKMZONE magic); refusing to overwrite it"
                        .into(),
                ));
            }
            let version = le32(&h[8..]);
            if version != VERSION || le32(&h[12..]) as usize != RECORD_SIZE {
                return Err(fail(
                    Errno::EINVAL,
                    format!("format version {version} is not supported (expected {VERSION})"),
                ));
            }
            let (zs, cap, nr) = (le64(&h[16..]), le64(&h[24..]), le32(&h[32..]));
            if (zs, cap, nr) != (geo.zone_size, geo.capacity, geo.nr_zones) {
                return Err(fail(
                    Errno::EINVAL,
                    format!(
                        "holds {nr} zones of {zs} bytes (capacity {cap}) but the node has {} zones \
                         of {} bytes (capacity {}); remove the file to start over (all zone state \
                         is lost) or use another metadata_path",
                        geo.nr_zones, geo.zone_size, geo.capacity
                    ),
                ));
            }
        }
        let mut raw = vec![0u8; records_len];
        read_fully(&file, HEADER_SIZE, &mut raw).map_err(|e| io_fail("reading records", e))?;
        let mut inner = Inner {
            zones: Vec::with_capacity(geo.nr_zones as usize),
            implicit: Vec::new(),
            n_open: 0,
            n_active: 0,
            limits,
            tick: 0,
            errors_logged: 0,
        };
        for (z, rec) in raw.chunks_exact(RECORD_SIZE).enumerate() {
            let corrupt = |why: &str| {
                fail(
                    Errno::EINVAL,
                    format!("record of zone {z} is corrupt ({why}); remove the file to start over"),
                )
            };
            let cond = match rec[0] {
                0 => Cond::Empty,
                v => Cond::from_u8(v)
                    .filter(|c| *c != Cond::NotWritePointer)
                    .ok_or_else(|| corrupt("condition"))?,
            };
            let wp = le64(&rec[8..]);
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
            let (ls, ll) = (le64(&rec[16..]), le64(&rec[24..]));
            let last = match ls.checked_add(ll) {
                Some(end) if ll > 0 && end == wp => (ls, end),
                _ => (0, 0),
            };
            let mut saved = [0u8; RECORD_SIZE];
            saved.copy_from_slice(rec);
            inner.zones.push(Zone {
                cond: Cond::Empty,
                wp,
                durable: wp,
                last,
                inflight: VecDeque::new(),
                gen: 0,
                replay: (last.1 > last.0).then_some(last),
                lru: 0,
                saved,
            });
            inner.set_cond(z, cond);
        }
        Ok(ZonedState {
            geo,
            path: path.to_path_buf(),
            file,
            inner: Mutex::new(inner),
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        let at = HEADER_SIZE + (z * RECORD_SIZE) as u64;
        match self.file.write_all_at(&rec, at) {
            Ok(()) => {
                g.zones[z].saved = rec;
                self.writes.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                if g.errors_logged < 8 {
                    g.errors_logged += 1;
                    tracing::error!(path = %self.path.display(), zone = z, "writing zone record: {e}");
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

    fn report(&self, first: u32, end: u32, max: usize, out: &mut Vec<ZoneView>) {
        let g = self.lock();
        let end = end.min(self.geo.nr_zones);
        out.extend((first..end).take(max).map(|z| self.view(&g, z as usize)));
    }

    fn manage(&self, action: Action, z: usize) -> Result<ZoneView, ZoneError> {
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

    fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
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

    fn begin_write(&self, kind: WriteKind, offset: u64, len: u64) -> Result<Ticket, ZoneError> {
        let geo = self.geo;
        let z = geo.zone_of(offset).ok_or(ZoneError::BadOffset)?;
        let zstart = geo.start(z);
        let rel = offset - zstart;
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

    fn end_write(&self, t: &Ticket, ok: bool) -> Result<(), ZoneError> {
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

    fn sync(&self) -> Result<(), ZoneError> {
        let w = self.writes.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= w {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| ZoneError::Io(Errno::of_io(&e)))?;
        self.synced.fetch_max(w, Ordering::AcqRel);
        Ok(())
    }

    /// Records written since the last sync.
    #[cfg(test)]
    pub(crate) fn unsynced(&self) -> u64 {
        self.writes.load(Ordering::Acquire) - self.synced.load(Ordering::Acquire)
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

/// The emulated zone layers of this process, by metadata path: every graph
/// that uses a node shares its state (queues of one export on several
/// connections, a reopened graph and the one it replaces).
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<ZoneLayer>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<ZoneLayer>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The zone layer of emulated zoned node `node` (its metadata at `path`),
/// shared with the graphs of this process that already use it.
pub fn open_emulated(
    node: &str,
    path: &Path,
    geo: Geometry,
    limits: ZoneLimits,
) -> Result<Arc<ZoneLayer>, OpenError> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|_, w| w.strong_count() > 0);
    if let Some(layer) = reg.get(path).and_then(Weak::upgrade) {
        if layer.geometry() != geo {
            return Err(OpenError::new(
                Errno::EBUSY,
                format!(
                    "node {node}: zone metadata {} is in use by an open graph with another \
                     zone geometry",
                    path.display()
                ),
            ));
        }
        if let ZoneLayer::Emulated(s) = &*layer {
            s.set_limits(limits);
        }
        return Ok(layer);
    }
    let state =
        ZonedState::open(path, geo, limits).map_err(|e| e.context(format_args!("node {node}")))?;
    let layer = Arc::new(ZoneLayer::Emulated(state));
    reg.insert(path.to_path_buf(), Arc::downgrade(&layer));
    Ok(layer)
}

// ------------------------------------------------------------- devices

/// What sysfs says about a zoned block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysZoned {
    pub model: ZoneModel,
    /// Bytes (`chunk_sectors` × 512).
    pub zone_size: u64,
    pub nr_zones: u32,
    pub max_open: u32,
    pub max_active: u32,
    /// `zone_write_granularity` (0 when absent).
    pub granularity: u32,
}

fn sysfs_u64(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads a block queue directory (`/sys/dev/block/M:m/queue`); `None` when
/// the device is not zoned.
pub fn probe_queue(queue: &Path) -> Option<SysZoned> {
    let model = match std::fs::read_to_string(queue.join("zoned")).ok()?.trim() {
        "host-managed" => ZoneModel::HostManaged,
        "host-aware" => ZoneModel::HostAware,
        _ => return None,
    };
    let zone_size = sysfs_u64(queue, "chunk_sectors")? * 512;
    let nr_zones = sysfs_u64(queue, "nr_zones")?;
    Some(SysZoned {
        model,
        zone_size,
        nr_zones: u32::try_from(nr_zones).unwrap_or(u32::MAX),
        max_open: sysfs_u64(queue, "max_open_zones").unwrap_or(0) as u32,
        max_active: sysfs_u64(queue, "max_active_zones").unwrap_or(0) as u32,
        granularity: sysfs_u64(queue, "zone_write_granularity").unwrap_or(0) as u32,
    })
}

/// The zone model of the block device at `path`, looked up under
/// `sys_root` (`/sys`); `None` for anything that is not a zoned block
/// device (regular files included).
pub fn probe_block_device(sys_root: &Path, path: &Path) -> Option<SysZoned> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    probe_queue(&sys_root.join(format!("dev/block/{major}:{minor}/queue")))
}

/// Whether an NVMe generic character device (`/dev/ngXnY`) is a zoned
/// (ZNS) namespace, by its block device's sysfs entry (`nvmeXnY`).
pub fn nvme_generic_is_zoned(sys_root: &Path, path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(rest) = name.strip_prefix("ng") else {
        return false;
    };
    probe_queue(&sys_root.join(format!("block/nvme{rest}/queue"))).is_some()
}

/// Zone tracking of a device: appends are emulated by writes at the write
/// pointer, so one write at a time per sequential zone.
#[derive(Clone, Copy, Debug, Default)]
struct DevZone {
    conventional: bool,
    /// Writable bytes.
    capacity: u64,
    /// Bytes from the zone start; `None` = unknown (ask the device).
    wp: Option<u64>,
    /// A write is in flight.
    busy: bool,
}

/// A Linux zoned block device passed through.
pub struct ZonedDevice {
    file: File,
    path: String,
    geo: Geometry,
    model: ZoneModel,
    limits: ZoneLimits,
    zones: Mutex<Vec<DevZone>>,
}

impl std::fmt::Debug for ZonedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZonedDevice")
            .field("path", &self.path)
            .field("geo", &self.geo)
            .finish_non_exhaustive()
    }
}

fn dev_view(z: &zoned_dev::BlkZone) -> ZoneView {
    ZoneView {
        start: z.start * 512,
        len: z.len * 512,
        capacity: z.capacity * 512,
        wp: z.wp * 512,
        zone_type: z.zone_type,
        cond: Cond::from_u8(z.cond).unwrap_or(Cond::Offline),
    }
}

fn dev_wp(z: &zoned_dev::BlkZone) -> Option<u64> {
    let writable = z.zone_type != TYPE_CONVENTIONAL
        && !matches!(
            Cond::from_u8(z.cond),
            Some(Cond::Full | Cond::ReadOnly | Cond::Offline) | None
        );
    writable.then(|| z.wp.saturating_sub(z.start) * 512)
}

impl ZonedDevice {
    /// Opens `path` (a zoned block device `sys` describes) for zone
    /// operations, with `nr_zones` whole zones exposed, and reads its zones.
    pub fn open(
        path: &str,
        sys: &SysZoned,
        nr_zones: u32,
        read_only: bool,
        limits: ZoneLimits,
    ) -> Result<ZonedDevice, OpenError> {
        let fail =
            |e: io::Error| OpenError::new(Errno::of_io(&e), format!("zoned device {path}: {e}"));
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(fail)?;
        let zone_sectors = sys.zone_size / 512;
        let mut zones = Vec::with_capacity(nr_zones as usize);
        while zones.len() < nr_zones as usize {
            let sector = zones.len() as u64 * zone_sectors;
            let want = (nr_zones as usize - zones.len()).min(zoned_dev::MAX_REPORT as usize);
            let got = zoned_dev::report_zones(file.as_fd(), sector, want as u32).map_err(fail)?;
            if got.is_empty() {
                return Err(OpenError::new(
                    Errno::EIO,
                    format!("zoned device {path}: reported no zone at sector {sector}"),
                ));
            }
            for z in got.iter().take(want) {
                zones.push(DevZone {
                    conventional: z.zone_type == TYPE_CONVENTIONAL,
                    capacity: z.capacity * 512,
                    wp: dev_wp(z),
                    busy: false,
                });
            }
        }
        let capacity = zones
            .iter()
            .find(|z| !z.conventional)
            .map_or(sys.zone_size, |z| z.capacity);
        Ok(ZonedDevice {
            file,
            path: path.to_string(),
            geo: Geometry {
                zone_size: sys.zone_size,
                capacity,
                nr_zones,
            },
            model: sys.model,
            limits,
            zones: Mutex::new(zones),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Replaces the limits (granularity, append size, open / active zones).
    pub fn with_limits(self, limits: ZoneLimits) -> ZonedDevice {
        ZonedDevice { limits, ..self }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<DevZone>> {
        self.zones.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report_one(&self, z: usize) -> Result<zoned_dev::BlkZone, ZoneError> {
        let sector = self.geo.start(z) / 512;
        zoned_dev::report_zones(self.file.as_fd(), sector, 1)
            .map_err(|e| ZoneError::from_io(&e))?
            .into_iter()
            .next()
            .ok_or(ZoneError::Io(Errno::EIO))
    }

    fn report(
        &self,
        first: u32,
        end: u32,
        max: usize,
        out: &mut Vec<ZoneView>,
    ) -> Result<(), ZoneError> {
        let end = end.min(self.geo.nr_zones);
        let mut z = first;
        let mut left = max;
        while z < end && left > 0 {
            let want = ((end - z) as usize)
                .min(left)
                .min(zoned_dev::MAX_REPORT as usize);
            let sector = self.geo.start(z as usize) / 512;
            let got = zoned_dev::report_zones(self.file.as_fd(), sector, want as u32)
                .map_err(|e| ZoneError::from_io(&e))?;
            if got.is_empty() {
                break;
            }
            for d in got.iter().take(want) {
                out.push(dev_view(d));
            }
            let n = got.len().min(want);
            z += n as u32;
            left -= n;
        }
        Ok(())
    }

    fn manage(&self, action: Action, z: usize) -> Result<ZoneView, ZoneError> {
        let op = match action {
            Action::Open => ZoneMgmt::Open,
            Action::Close => ZoneMgmt::Close,
            Action::Finish => ZoneMgmt::Finish,
            Action::Reset => ZoneMgmt::Reset,
        };
        let sector = self.geo.start(z) / 512;
        let result = zoned_dev::zone_mgmt(self.file.as_fd(), op, sector, self.geo.zone_size / 512);
        // Whatever happened, ask the device where the write pointer is.
        let d = self.report_one(z);
        if let Ok(d) = &d {
            self.lock()[z].wp = dev_wp(d);
        }
        result.map_err(|e| ZoneError::from_io(&e))?;
        Ok(dev_view(&d?))
    }

    fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
        let mut result = Ok(());
        for z in zones.start as usize..zones.end.min(self.geo.nr_zones) as usize {
            if self.lock()[z].conventional {
                continue;
            }
            if let Err(e) = self.manage(Action::Reset, z) {
                result = Err(e);
            }
        }
        result
    }

    fn begin_write(&self, kind: WriteKind, offset: u64, len: u64) -> Result<Ticket, ZoneError> {
        let geo = self.geo;
        let z = geo.zone_of(offset).ok_or(ZoneError::BadOffset)?;
        let zstart = geo.start(z);
        let rel = offset - zstart;
        let mut zones = self.lock();
        let dz = zones[z];
        if dz.conventional {
            if kind == WriteKind::Append {
                return Err(ZoneError::InvalidCmd);
            }
            return Ok(Ticket {
                zone: z as u32,
                offset,
                len,
                gen: 0,
                untracked: true,
            });
        }
        if dz.busy {
            return Err(ZoneError::Busy);
        }
        let wp = match dz.wp {
            Some(w) => w,
            None => {
                let d = self.report_one(z)?;
                zones[z].wp = dev_wp(&d);
                zones[z].wp.ok_or(ZoneError::InvalidCmd)?
            }
        };
        let gran = self.limits.granularity.max(1) as u64;
        let start = match kind {
            WriteKind::Append => {
                if rel != 0 {
                    return Err(ZoneError::BadOffset);
                }
                if len > self.limits.max_append {
                    return Err(ZoneError::InvalidCmd);
                }
                wp
            }
            // Host-aware zones take writes anywhere.
            WriteKind::Write if self.model == ZoneModel::HostAware => rel,
            WriteKind::Write => {
                if rel != wp {
                    return Err(ZoneError::UnalignedWp);
                }
                rel
            }
        };
        if len == 0 || len % gran != 0 || start % gran != 0 {
            return Err(ZoneError::UnalignedWp);
        }
        let end = start.checked_add(len).ok_or(ZoneError::InvalidCmd)?;
        if end > dz.capacity {
            return Err(ZoneError::InvalidCmd);
        }
        zones[z].busy = true;
        zones[z].wp = if start == wp { Some(end) } else { None };
        Ok(Ticket {
            zone: z as u32,
            offset: zstart + start,
            len,
            gen: 0,
            untracked: false,
        })
    }

    fn end_write(&self, t: &Ticket, ok: bool) {
        if t.untracked {
            return;
        }
        let mut zones = self.lock();
        let dz = &mut zones[t.zone as usize];
        dz.busy = false;
        if !ok {
            dz.wp = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(s.synced.load(Ordering::Relaxed), 0);
        t.write(0, 512).unwrap();
        s.sync().unwrap();
        let n = s.synced.load(Ordering::Relaxed);
        assert!(n > 0);
        s.sync().unwrap();
        assert_eq!(s.synced.load(Ordering::Relaxed), n);
    }

    #[test]
    fn report_encoding() {
        let views = [ZoneView {
            start: 1 << 20,
            len: 1 << 20,
            capacity: 1 << 19,
            wp: (1 << 20) + 4096,
            zone_type: TYPE_SEQ_REQUIRED,
            cond: Cond::ImplicitOpen,
        }; 3];
        let mut out = Vec::new();
        // Room for the header and two descriptors (and a bit).
        assert_eq!(encode_report(&views, 1 << 20, 64 + 128 + 63, &mut out), 192);
        assert_eq!(le64(&out[0..]), 2);
        assert!(out[8..64].iter().all(|&b| b == 0));
        let d = &out[64..128];
        assert_eq!(le64(&d[0..]), (1 << 19) / 512);
        assert_eq!(le64(&d[8..]), 0);
        assert_eq!(le64(&d[16..]), 8);
        assert_eq!((d[24], d[25]), (2, 2));
        assert!(d[26..].iter().all(|&b| b == 0));
    }

    #[test]
    fn sysfs_probe() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("block/nvme0n2/queue");
        std::fs::create_dir_all(&q).unwrap();
        let put = |n: &str, v: &str| std::fs::write(q.join(n), v).unwrap();
        put("zoned", "none\n");
        assert_eq!(probe_queue(&q), None);
        assert!(!nvme_generic_is_zoned(dir.path(), Path::new("/dev/ng0n2")));
        put("zoned", "host-managed\n");
        put("chunk_sectors", "524288\n");
        put("nr_zones", "3688\n");
        put("max_open_zones", "14\n");
        put("max_active_zones", "14\n");
        put("zone_write_granularity", "4096\n");
        assert_eq!(
            probe_queue(&q),
            Some(SysZoned {
                model: ZoneModel::HostManaged,
                zone_size: 256 << 20,
                nr_zones: 3688,
                max_open: 14,
                max_active: 14,
                granularity: 4096,
            })
        );
        assert!(nvme_generic_is_zoned(dir.path(), Path::new("/dev/ng0n2")));
        assert!(!nvme_generic_is_zoned(dir.path(), Path::new("/dev/ng1n1")));
        // A regular file is never a zoned device.
        let f = dir.path().join("img");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(probe_block_device(dir.path(), &f), None);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(ZoneError::InvalidCmd.errno().get(), libc::EBADRQC);
        assert_eq!(ZoneError::UnalignedWp.errno().get(), libc::EILSEQ);
        assert_eq!(ZoneError::OpenResource.errno().get(), libc::ETOOMANYREFS);
        assert_eq!(ZoneError::ActiveResource.errno().get(), libc::EOVERFLOW);
        assert_eq!(ZoneError::BadOffset.errno().get(), libc::EINVAL);
        assert_eq!(ZoneError::BadOffset.ring_result(), zone_status::INVALID_CMD);
        assert_eq!(ZoneError::Io(Errno::EIO).ring_result(), -libc::EIO);
        assert_eq!(
            ZoneError::from_io(&io::Error::from_raw_os_error(libc::ETOOMANYREFS)),
            ZoneError::OpenResource
        );
    }
}
