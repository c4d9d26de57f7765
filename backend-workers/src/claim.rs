//! Claims: knowing when a dead worker's I/O has left the kernel.
//!
//! A worker killed with io_uring requests in flight is gone before they
//! are: the kernel tears its rings down in a work item after the process
//! exits, and reads and writes already in the block layer (O_DIRECT, held
//! by a cgroup's throttle, on a slow disk or device) complete whenever they
//! complete. A write resubmitted by the frontend could complete first, the
//! guest then write the same sectors again, and the original land last
//! over the newer data; an old read could fill a guest buffer already
//! reused.
//!
//! Every request holds a reference to the open file it was submitted on,
//! and the rings hold their registered files until the last request has
//! completed. An open file description releases its OFD locks
//! (`F_OFD_SETLK`) only when its last reference goes. So a worker opens
//! every leaf itself and hands the descriptor to libblkio with a shared
//! lock on one byte that names the worker, its *I/O claim*; that lock
//! outlives the process exactly as long as the process's requests do.
//! Beside it, on a second descriptor that never carries I/O, the worker
//! holds a *life claim* on another byte; that one goes when the process
//! does.
//!
//! Before a queue takes a lost worker's requests over, the replacement
//! looks at the leaf's locks: an I/O claim without its life claim belongs
//! to a dead worker whose requests are still in the kernel, and the
//! replacement waits until it is gone. This works alike on image files,
//! block devices and NVMe character devices, and waits only for the dead
//! (never for live workers' I/O). Locks live on the inode the path names:
//! every worker must reach a device through the same node (the host's
//! `/dev`, or one bind mount of it), not a node of its own
//! (docs/RELIABILITY.md).
//!
//! The claims sit far beyond any data (from byte 2^62 on), clear of
//! QEMU's image locks (bytes 100 to 300).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::errno::Errno;

/// First byte of the I/O claims; a worker's is `IO_CLAIMS + token`.
const IO_CLAIMS: i64 = 1 << 62;
/// How many tokens there are.
const TOKENS: i64 = 1 << 32;
/// First byte of the life claims; a worker's is `LIFE_CLAIMS + token`.
const LIFE_CLAIMS: i64 = IO_CLAIMS + TOKENS;

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a regular file, block device or character device", path.display())]
    NotStorage { path: PathBuf },
    #[error("{}: replaced by another file while being opened", path.display())]
    Replaced { path: PathBuf },
    #[error(
        "{}: I/O of {count} lost worker(s) is still in the kernel after {waited:?}",
        path.display()
    )]
    StillInFlight {
        path: PathBuf,
        count: usize,
        waited: Duration,
    },
}

impl ClaimError {
    /// The errno the failure maps to at the edge.
    pub fn errno(&self) -> Errno {
        match self {
            ClaimError::Io { source, .. } => Errno::of_io(source),
            ClaimError::NotStorage { .. } => Errno::EINVAL,
            ClaimError::Replaced { .. } => Errno::EAGAIN,
            ClaimError::StillInFlight { .. } => Errno::EBUSY,
        }
    }

    fn io(path: &Path) -> impl Fn(std::io::Error) -> ClaimError + '_ {
        move |source| ClaimError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// This process's token: random, so that two live workers (in different
/// pid namespaces, say) never share one.
fn token() -> i64 {
    static TOKEN: OnceLock<i64> = OnceLock::new();
    *TOKEN.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        (h.finish() % TOKENS as u64) as i64
    })
}

/// How a leaf is opened.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub write: bool,
    pub direct: bool,
}

/// A life claim: held for as long as the leaf is open in this worker,
/// and dropped with the process whatever happens to its requests.
#[derive(Debug)]
pub struct LifeClaim {
    _file: File,
}

/// Opens `path` for a libblkio driver's I/O, with this worker's claims on
/// it (see the module doc). The caller hands the descriptor to libblkio
/// (its `fd` property), never duplicates it elsewhere, and keeps the
/// [`LifeClaim`] as long as the leaf is open.
pub fn open(path: &Path, access: Access) -> Result<(OwnedFd, LifeClaim), ClaimError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    // Opened non-blocking, so that a FIFO put at `path` cannot block the
    // opener, and checked on the descriptor itself, so that nothing swapped
    // in after the check gets the I/O.
    let io = OpenOptions::new()
        .read(true)
        .write(access.write)
        .custom_flags(libc::O_NONBLOCK | if access.direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(ClaimError::io(path))?;
    let meta = io.metadata().map_err(ClaimError::io(path))?;
    let kind = meta.file_type();
    if !(kind.is_file() || kind.is_block_device() || kind.is_char_device()) {
        return Err(ClaimError::NotStorage {
            path: path.to_path_buf(),
        });
    }
    // io_uring answers EAGAIN instead of waiting on an O_NONBLOCK file.
    let flags = nix::fcntl::fcntl(&io, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ClaimError::io(path)(e.into()))?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&io, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| ClaimError::io(path)(e.into()))?;
    let me = token();
    // The life claim first: a live worker's I/O claim always has one. It
    // must sit on the inode the I/O goes to.
    let life = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(ClaimError::io(path))?;
    let life_meta = life.metadata().map_err(ClaimError::io(path))?;
    if (life_meta.dev(), life_meta.ino()) != (meta.dev(), meta.ino()) {
        return Err(ClaimError::Replaced {
            path: path.to_path_buf(),
        });
    }
    share_lock(&life, LIFE_CLAIMS + me, 1).map_err(ClaimError::io(path))?;
    share_lock(&io, IO_CLAIMS + me, 1).map_err(ClaimError::io(path))?;
    Ok((io.into(), LifeClaim { _file: life }))
}

/// What waiting for lost workers on one leaf found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Lost workers that still had I/O in the kernel when we looked.
    pub lost: usize,
}

/// Waits until no lost worker has I/O in flight on `path` (see the module
/// doc), for at most `limit`.
pub fn settle(path: &Path, limit: Duration) -> Result<Settled, ClaimError> {
    let probe = File::open(path).map_err(ClaimError::io(path))?;
    let mut lost = Vec::new();
    for token in claimed(&probe, IO_CLAIMS, TOKENS).map_err(ClaimError::io(path))? {
        let alive = held(&probe, LIFE_CLAIMS + token).map_err(ClaimError::io(path))?;
        if !alive {
            lost.push(token);
        }
    }
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let mut still = 0;
        for &token in &lost {
            if held(&probe, IO_CLAIMS + token).map_err(ClaimError::io(path))? {
                still += 1;
            }
        }
        if still == 0 {
            return Ok(Settled { lost: lost.len() });
        }
        if start.elapsed() >= limit {
            return Err(ClaimError::StillInFlight {
                path: path.to_path_buf(),
                count: still,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The tokens of the one-byte locks that others hold in
/// `[base, base + len)`, found by asking for the first conflict and
/// splitting the range around it.
fn claimed(probe: &File, base: i64, len: i64) -> std::io::Result<Vec<i64>> {
    let mut found = Vec::new();
    let mut ranges = vec![(base, base + len)];
    while let Some((lo, hi)) = ranges.pop() {
        if lo >= hi {
            continue;
        }
        let Some((start, n)) = conflict(probe, lo, hi - lo)? else {
            continue;
        };
        // A lock to the end of the file has length 0.
        let end = if n == 0 { i64::MAX } else { start + n };
        if n == 1 && start >= lo && start < hi {
            found.push(start - base);
        }
        ranges.push((lo, start.max(lo)));
        ranges.push((end.min(hi), hi));
    }
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// Whether anyone holds a lock on byte `at`.
fn held(probe: &File, at: i64) -> std::io::Result<bool> {
    Ok(conflict(probe, at, 1)?.is_some())
}

/// A lock that would keep `probe` from write-locking `[start, start +
/// len)`: its start and length.
fn conflict(probe: &File, start: i64, len: i64) -> std::io::Result<Option<(i64, i64)>> {
    let mut fl = flock(libc::F_WRLCK, start, len);
    // SAFETY: F_OFD_GETLK reads and fills the `flock` it is given, which
    // lives on this stack frame for the whole call; `probe` is open.
    let r = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as i16).then_some((fl.l_start, fl.l_len)))
}

/// Takes a shared lock on `len` bytes from `at` (a claim: one byte).
fn share_lock(f: &impl AsFd, at: i64, len: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK, at, len);
    // SAFETY: F_OFD_SETLK only reads the `flock`, which outlives the
    // call; the descriptor is open.
    let r = unsafe { libc::fcntl(f.as_fd().as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn flock(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: `flock` is plain data; all zeroes is a valid value (and
    // l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        (dir, path)
    }

    const RW: Access = Access {
        write: true,
        direct: false,
    };

    #[test]
    fn a_live_workers_claims_are_not_waited_for() {
        let (_dir, path) = image();
        let claimed_fd = open(&path, RW).unwrap();
        // The descriptor libblkio gets blocks as usual (io_uring would
        // answer EAGAIN on an O_NONBLOCK file).
        let flags = nix::fcntl::fcntl(&claimed_fd.0, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let probe = File::open(&path).unwrap();
        assert_eq!(claimed(&probe, IO_CLAIMS, TOKENS).unwrap(), vec![token()]);
        assert!(held(&probe, LIFE_CLAIMS + token()).unwrap());
        let t = Instant::now();
        assert_eq!(settle(&path, Duration::ZERO).unwrap(), Settled { lost: 0 });
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    /// A dead worker, played by descriptors with a token of their own: its
    /// life claim is gone, its I/O claim lives on (a request holds it).
    #[test]
    fn a_dead_workers_io_claim_is_waited_out() {
        let (_dir, path) = image();
        let dead = (token() + 7) % TOKENS;
        let io = File::options().read(true).write(true).open(&path).unwrap();
        share_lock(&io, IO_CLAIMS + dead, 1).unwrap();
        // Another dead worker whose requests are all done left nothing.
        let err = settle(&path, Duration::from_millis(30)).unwrap_err();
        assert!(
            matches!(err, ClaimError::StillInFlight { count: 1, .. }),
            "{err}"
        );
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(io);
        });
        assert_eq!(
            settle(&path, Duration::from_secs(10)).unwrap(),
            Settled { lost: 1 }
        );
        release.join().unwrap();
        assert_eq!(settle(&path, Duration::ZERO).unwrap(), Settled { lost: 0 });
    }

    #[test]
    fn locks_that_are_not_claims_are_stepped_over() {
        let (_dir, path) = image();
        let other = File::options().read(true).write(true).open(&path).unwrap();
        // Someone else's lock at byte 0 (as QEMU takes them), a wide one
        // among the claims, and claims on both sides of it.
        share_lock(&other, 0, 1).unwrap();
        share_lock(&other, IO_CLAIMS + 10, 100).unwrap();
        let io = File::options().read(true).write(true).open(&path).unwrap();
        share_lock(&io, IO_CLAIMS + 5, 1).unwrap();
        share_lock(&io, IO_CLAIMS + TOKENS - 1, 1).unwrap();
        let probe = File::open(&path).unwrap();
        assert_eq!(
            claimed(&probe, IO_CLAIMS, TOKENS).unwrap(),
            vec![5, TOKENS - 1]
        );
    }

    #[test]
    fn missing_paths_and_fifos_are_errors() {
        let nowhere = Path::new("/nonexistent/blkmesh-claim");
        let e = open(nowhere, RW).unwrap_err();
        assert_eq!(e.errno().get(), libc::ENOENT, "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = open(&fifo, RW).unwrap_err();
        assert!(matches!(e, ClaimError::NotStorage { .. }), "{e}");
        assert_eq!(e.errno(), Errno::EINVAL);
        // Read-only too: a FIFO without a writer must not block the open.
        let read_only = Access {
            write: false,
            direct: false,
        };
        let e = open(&fifo, read_only).unwrap_err();
        assert!(matches!(e, ClaimError::NotStorage { .. }), "{e}");
        assert!(open(dir.path(), RW).is_err());
        assert!(matches!(
            open(dir.path(), read_only),
            Err(ClaimError::NotStorage { .. })
        ));
        assert!(matches!(
            settle(nowhere, Duration::ZERO),
            Err(ClaimError::Io { .. })
        ));
    }
}
