//! The metadata file of an emulated zoned node: its format, and the file
//! itself (opened locked, records written in place, synced on demand).
//!
//! A 4096-byte header (magic `BLKMZONE`, version, record size, zone size,
//! zone capacity, number of zones) followed by one 32-byte record per zone:
//! condition (the virtio `z_state` number; 0 reads as EMPTY), the persisted
//! write pointer (bytes from the zone start), and the last completed write
//! ending there (start, length). What a record says is the emulation's
//! business (`emulated.rs`); this module only stores it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::types::{Geometry, ZoneError};
use crate::errno::{Errno, OpenError};

const MAGIC: [u8; 8] = *b"BLKMZONE";
const VERSION: u32 = 1;
/// Bytes before the first record.
pub const HEADER_SIZE: u64 = 4096;
/// Bytes per zone record.
pub const RECORD_SIZE: usize = 32;

/// One zone's record as stored.
pub type RawRecord = [u8; RECORD_SIZE];

/// The fields of a zone record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The virtio `z_state` number (0 reads as EMPTY).
    pub cond: u8,
    /// Bytes from the zone start.
    pub wp: u64,
    /// The last completed write ending at `wp`: start and length.
    pub last_start: u64,
    pub last_len: u64,
}

impl Record {
    pub fn encode(&self) -> RawRecord {
        let mut r = [0u8; RECORD_SIZE];
        r[0] = self.cond;
        r[8..16].copy_from_slice(&self.wp.to_le_bytes());
        r[16..24].copy_from_slice(&self.last_start.to_le_bytes());
        r[24..32].copy_from_slice(&self.last_len.to_le_bytes());
        r
    }

    pub fn decode(r: &[u8]) -> Record {
        Record {
            cond: r[0],
            wp: le64(&r[8..]),
            last_start: le64(&r[16..]),
            last_len: le64(&r[24..]),
        }
    }
}

pub(super) fn le64(b: &[u8]) -> u64 {
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

/// An open, locked metadata file.
pub struct MetadataFile {
    path: PathBuf,
    /// Records are written under the zone state's lock; sync needs no lock.
    file: File,
    /// Records written, and records known synced.
    writes: AtomicU64,
    synced: AtomicU64,
}

impl MetadataFile {
    /// The error of opening `path`, `msg` saying why.
    pub fn error(path: &Path, errno: Errno, msg: impl std::fmt::Display) -> OpenError {
        OpenError::new(errno, format!("zone metadata {}: {msg}", path.display()))
    }

    /// Opens (or creates) the metadata at `path` for `geo`, locked against
    /// other processes; returns it with its records as they are.
    pub fn open(path: &Path, geo: Geometry) -> Result<(MetadataFile, Vec<u8>), OpenError> {
        let fail = |errno: Errno, msg: String| MetadataFile::error(path, errno, msg);
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
        let mut records = vec![0u8; records_len];
        read_fully(&file, HEADER_SIZE, &mut records).map_err(|e| io_fail("reading records", e))?;
        let metadata = MetadataFile {
            path: path.to_path_buf(),
            file,
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        };
        Ok((metadata, records))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes zone `z`'s record in place (to the page cache).
    pub fn write_record(&self, z: usize, record: &RawRecord) -> io::Result<()> {
        let at = HEADER_SIZE + (z * RECORD_SIZE) as u64;
        self.file.write_all_at(record, at)?;
        self.writes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Makes the records written so far durable, if any were since the
    /// last sync.
    pub fn sync(&self) -> Result<(), ZoneError> {
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

    /// Records known synced.
    #[cfg(test)]
    pub fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Records written since the last sync.
    #[cfg(test)]
    pub fn unsynced(&self) -> u64 {
        self.writes.load(Ordering::Acquire) - self.synced.load(Ordering::Acquire)
    }
}
