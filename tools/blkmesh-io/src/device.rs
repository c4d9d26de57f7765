//! The device, its queues and its I/O buffers: the only module with `unsafe`.
//!
//! libblkio's `virtio-blk-vhost-user` driver takes raw buffer pointers from
//! safe functions and hands them to the vhost-user back-end, which can only
//! reach memory we registered with `map_mem_region`. This module makes that
//! sound by construction:
//!
//! * all I/O memory is one memory region allocated from libblkio and mapped
//!   into the device when the [`Device`] is opened;
//! * a [`BufferPool`] carves that region into disjoint [`Buffer`]s; only a
//!   `Buffer` can produce a pointer for a request;
//! * submitting a request *moves* its buffers into the [`Queue`], which hands
//!   them back in the [`Completed`] entry, so no code can touch a buffer the
//!   device may be accessing;
//! * every `Buffer` and `Queue` holds an `Arc` on the `Blkio` instance, so the
//!   region stays mapped for as long as a pointer into it can exist.
//!
//! The region is shared memory (the back-end maps the same memfd), so data
//! is only ever copied in and out with raw copies; no `&[u8]` into it is
//! ever created.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use thiserror::Error;

use crate::errno;

const DRIVER: &str = "virtio-blk-vhost-user";

/// Chunks handed out by a pool start on this boundary (before any skew).
pub const CHUNK_ALIGN: usize = 4096;

/// Errors from setting up or waiting on the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot create the {DRIVER} driver")]
    Create(#[source] blkio::Error),
    #[error("cannot set {name}={value}")]
    SetProperty {
        name: &'static str,
        value: String,
        #[source]
        source: blkio::Error,
    },
    #[error(
        "cannot connect to {} (a host-managed zoned export refuses libblkio's driver, \
         which does not accept VIRTIO_BLK_F_ZONED: use --driver native there)",
        path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot start the device")]
    Start(#[source] blkio::Error),
    #[error("cannot read property {name}")]
    GetProperty {
        name: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot allocate a {len}-byte buffer region")]
    AllocRegion {
        len: usize,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot map the buffer region into the device")]
    MapRegion(#[source] blkio::Error),
    #[error("device started {got} queues, {want} requested")]
    QueueCount { got: usize, want: usize },
    #[error("no completion within {0:?}: device hung or disconnected")]
    Timeout(Duration),
    #[error("waiting for completions failed")]
    Wait(#[source] blkio::Error),
}

/// Errors from carving buffers out of a pool.
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("buffer pool exhausted: no free {need}-byte chunk ({free} bytes free in total)")]
    Exhausted { need: usize, free: usize },
    #[error("buffer size {0} overflows")]
    TooLarge(u64),
}

/// How to open a device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub socket: PathBuf,
    pub queues: usize,
    /// Use libblkio poll queues (busy-waiting) instead of interrupt queues.
    pub poll_queues: bool,
    /// Virtqueue size (power of two); driver default when `None`.
    pub queue_size: Option<u32>,
    /// Bytes of I/O buffer memory to allocate and map.
    pub buffer_bytes: usize,
    /// Open read-only (required by libblkio for a device that offers
    /// VIRTIO_BLK_F_RO; writes then fail in the driver with EROFS/EBADF).
    pub read_only: bool,
}

/// Values of the driver properties every mode needs.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    pub capacity: u64,
    pub request_alignment: u64,
    pub buf_alignment: usize,
    /// 0 when the device does not advertise a limit.
    pub max_transfer: u64,
    pub max_segments: u32,
    pub num_queues: usize,
}

/// A driver property value, for `info`.
#[derive(Debug, Clone, PartialEq)]
pub enum PropValue {
    Bool(bool),
    I32(i32),
    U64(u64),
    Str(String),
}

#[derive(Clone, Copy)]
enum PropKind {
    Bool,
    I32,
    U64,
    Str,
}

/// Properties `info` reports, in order; those the driver rejects are skipped.
const INFO_PROPS: &[(&str, PropKind)] = &[
    ("driver", PropKind::Str),
    ("capacity", PropKind::U64),
    ("read-only", PropKind::Bool),
    ("request-alignment", PropKind::I32),
    ("optimal-io-alignment", PropKind::I32),
    ("optimal-io-size", PropKind::I32),
    ("max-transfer", PropKind::I32),
    ("max-segments", PropKind::I32),
    ("max-segment-len", PropKind::I32),
    ("buf-alignment", PropKind::I32),
    ("optimal-buf-alignment", PropKind::I32),
    ("mem-region-alignment", PropKind::U64),
    ("max-mem-regions", PropKind::U64),
    ("discard-alignment", PropKind::I32),
    ("discard-alignment-offset", PropKind::I32),
    ("max-discard-len", PropKind::U64),
    ("max-write-zeroes-len", PropKind::U64),
    ("supports-fua-natively", PropKind::Bool),
    ("flush-needed", PropKind::Bool),
    ("num-queues", PropKind::I32),
    ("num-poll-queues", PropKind::I32),
    ("max-queues", PropKind::I32),
    ("queue-size", PropKind::I32),
    ("max-queue-size", PropKind::I32),
];

/// State shared by the device, its queues and its buffers.
struct Shared {
    blkio: Blkio,
    /// The mapped buffer region; allocated by `blkio`, which frees it only
    /// once `blkio` and every `Blkioq` are gone.
    region: MemoryRegion,
    buf_alignment: usize,
}

/// An open, started device with its buffer region mapped.
pub struct Device {
    shared: Arc<Shared>,
    info: DeviceInfo,
    queues: Vec<Queue>,
    pool: BufferPool,
}

impl Device {
    /// Connects to the socket, starts `config.queues` queues and maps
    /// `config.buffer_bytes` of buffer memory.
    pub fn open(config: &DeviceConfig) -> Result<Device, DeviceError> {
        let mut blkio = Blkio::new(DRIVER).map_err(DeviceError::Create)?;
        let path = config.socket.to_string_lossy().into_owned();
        blkio
            .set_str("path", &path)
            .map_err(|source| DeviceError::SetProperty {
                name: "path",
                value: path.clone(),
                source,
            })?;
        if config.read_only {
            blkio
                .set_bool("read-only", true)
                .map_err(|source| DeviceError::SetProperty {
                    name: "read-only",
                    value: "true".into(),
                    source,
                })?;
        }
        blkio.connect().map_err(|source| DeviceError::Connect {
            path: config.socket.clone(),
            source,
        })?;

        let n = i32::try_from(config.queues).unwrap_or(i32::MAX);
        let (active, idle) = if config.poll_queues {
            ("num-poll-queues", "num-queues")
        } else {
            ("num-queues", "num-poll-queues")
        };
        set_i32(&mut blkio, idle, 0)?;
        set_i32(&mut blkio, active, n)?;
        if let Some(size) = config.queue_size {
            set_i32(&mut blkio, "queue-size", i32::try_from(size).unwrap_or(-1))?;
        }

        let outcome = blkio.start().map_err(DeviceError::Start)?;
        let blkioqs = if config.poll_queues {
            outcome.poll_queues
        } else {
            outcome.queues
        };
        if blkioqs.len() != config.queues {
            return Err(DeviceError::QueueCount {
                got: blkioqs.len(),
                want: config.queues,
            });
        }

        let info = DeviceInfo {
            capacity: get_u64(&blkio, "capacity")?,
            request_alignment: get_i32(&blkio, "request-alignment")?.max(1) as u64,
            buf_alignment: get_i32(&blkio, "buf-alignment")?.max(1) as usize,
            max_transfer: get_i32(&blkio, "max-transfer")?.max(0) as u64,
            max_segments: get_i32(&blkio, "max-segments")?.max(1) as u32,
            num_queues: config.queues,
        };

        let align = (get_u64(&blkio, "mem-region-alignment")? as usize)
            .max(page_size())
            .max(CHUNK_ALIGN);
        let len = config
            .buffer_bytes
            .max(CHUNK_ALIGN)
            .checked_next_multiple_of(align)
            .ok_or(DeviceError::AllocRegion {
                len: config.buffer_bytes,
                source: blkio::Error::new(Errno::OVERFLOW, "size overflows"),
            })?;
        let region = blkio
            .alloc_mem_region(len)
            .map_err(|source| DeviceError::AllocRegion { len, source })?;
        blkio
            .map_mem_region(&region)
            .map_err(DeviceError::MapRegion)?;

        let shared = Arc::new(Shared {
            blkio,
            region,
            buf_alignment: info.buf_alignment,
        });
        let pool = BufferPool(Arc::new(PoolInner {
            shared: Arc::clone(&shared),
            free: Mutex::new(FreeList(vec![Extent {
                off: 0,
                len: region.len,
            }])),
            _backing: None,
        }));
        let queues = blkioqs
            .into_iter()
            .map(|q| Queue::new(q, Arc::clone(&shared)))
            .collect();
        Ok(Device {
            shared,
            info,
            queues,
            pool,
        })
    }

    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The pool over the whole buffer region.
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Moves the queues out (once); each can go to its own thread.
    pub fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    /// Every property in [`INFO_PROPS`] the driver answers.
    pub fn properties(&self) -> Vec<(&'static str, PropValue)> {
        let b = &self.shared.blkio;
        INFO_PROPS
            .iter()
            .filter_map(|&(name, kind)| {
                let value = match kind {
                    PropKind::Bool => b.get_bool(name).map(PropValue::Bool),
                    PropKind::I32 => b.get_i32(name).map(PropValue::I32),
                    PropKind::U64 => b.get_u64(name).map(PropValue::U64),
                    PropKind::Str => b.get_str(name).map(PropValue::Str),
                };
                value.ok().map(|v| (name, v))
            })
            .collect()
    }
}

fn set_i32(blkio: &mut Blkio, name: &'static str, value: i32) -> Result<(), DeviceError> {
    blkio
        .set_i32(name, value)
        .map_err(|source| DeviceError::SetProperty {
            name,
            value: value.to_string(),
            source,
        })
}

fn get_i32(blkio: &Blkio, name: &'static str) -> Result<i32, DeviceError> {
    blkio
        .get_i32(name)
        .map_err(|source| DeviceError::GetProperty { name, source })
}

fn get_u64(blkio: &Blkio, name: &'static str) -> Result<u64, DeviceError> {
    blkio
        .get_u64(name)
        .map_err(|source| DeviceError::GetProperty { name, source })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(1)
}

// ---------------------------------------------------------------------------
// Buffers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    off: usize,
    len: usize,
}

/// Free extents of the region (offsets relative to the region start),
/// sorted by offset and coalesced. Pure bookkeeping, no memory access.
#[derive(Debug, Default, PartialEq, Eq)]
struct FreeList(Vec<Extent>);

impl FreeList {
    /// First fit: removes and returns `need` bytes.
    fn take(&mut self, need: usize) -> Option<Extent> {
        let i = self.0.iter().position(|e| e.len >= need)?;
        let chunk = Extent {
            off: self.0[i].off,
            len: need,
        };
        if self.0[i].len == need {
            self.0.remove(i);
        } else {
            self.0[i].off += need;
            self.0[i].len -= need;
        }
        Some(chunk)
    }

    /// Returns a chunk, merging it with its neighbours.
    fn give(&mut self, chunk: Extent) {
        let v = &mut self.0;
        let i = v.partition_point(|e| e.off < chunk.off);
        v.insert(i, chunk);
        if i + 1 < v.len() && v[i].off + v[i].len == v[i + 1].off {
            v[i].len += v[i + 1].len;
            v.remove(i + 1);
        }
        if i > 0 && v[i - 1].off + v[i - 1].len == v[i].off {
            v[i - 1].len += v[i].len;
            v.remove(i);
        }
    }

    fn total(&self) -> usize {
        self.0.iter().map(|e| e.len).sum()
    }
}

struct PoolInner {
    shared: Arc<Shared>,
    free: Mutex<FreeList>,
    /// For a sub-pool: the parent's chunk it manages, returned on drop.
    _backing: Option<Buffer>,
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, FreeList> {
        // A panic while holding the lock cannot break the list's invariants
        // in a way that matters for memory safety (at worst a chunk leaks).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, chunk: Extent) {
        self.lock().give(chunk);
    }
}

/// Hands out disjoint [`Buffer`]s from the mapped region (first fit).
#[derive(Clone)]
pub struct BufferPool(Arc<PoolInner>);

impl BufferPool {
    /// A buffer of `len` bytes starting on a [`CHUNK_ALIGN`] boundary.
    pub fn alloc(&self, len: u64) -> Result<Buffer, PoolError> {
        self.alloc_skewed(len, 0)
    }

    /// A buffer of `len` bytes starting `skew` bytes (rounded up to the
    /// device's buf-alignment) past a [`CHUNK_ALIGN`] boundary: used to put
    /// iovecs at deliberately odd places.
    pub fn alloc_skewed(&self, len: u64, skew: usize) -> Result<Buffer, PoolError> {
        let len = usize::try_from(len).map_err(|_| PoolError::TooLarge(len))?;
        let skew = skew
            .checked_next_multiple_of(self.0.shared.buf_alignment)
            .ok_or(PoolError::TooLarge(skew as u64))?;
        let need = len
            .checked_add(skew)
            .and_then(|n| n.max(1).checked_next_multiple_of(CHUNK_ALIGN))
            .ok_or(PoolError::TooLarge(len as u64))?;
        let mut free = self.0.lock();
        let chunk = free.take(need).ok_or_else(|| PoolError::Exhausted {
            need,
            free: free.total(),
        })?;
        drop(free);
        Ok(Buffer {
            pool: Arc::clone(&self.0),
            chunk,
            off: chunk.off + skew,
            len,
        })
    }

    /// Takes `len` bytes out of this pool as a separate pool, e.g. one per
    /// thread; the bytes come back when the sub-pool and its buffers are gone.
    pub fn sub_pool(&self, len: u64) -> Result<BufferPool, PoolError> {
        let backing = self.alloc(len)?;
        let extent = backing.chunk;
        Ok(BufferPool(Arc::new(PoolInner {
            shared: Arc::clone(&self.0.shared),
            free: Mutex::new(FreeList(vec![extent])),
            _backing: Some(backing),
        })))
    }

    /// Bytes needed for a pool that must hold buffers of these lengths (and
    /// skews) at the same time.
    pub fn bytes_needed(lens: impl IntoIterator<Item = (u64, usize)>) -> u64 {
        lens.into_iter()
            .map(|(len, skew)| {
                (len + skew as u64)
                    .max(1)
                    .next_multiple_of(CHUNK_ALIGN as u64)
            })
            .sum()
    }
}

/// A disjoint piece of the mapped region. Not `Clone`: whoever holds it may
/// access it, and while it is in flight the [`Queue`] holds it.
pub struct Buffer {
    pool: Arc<PoolInner>,
    /// What goes back to the pool.
    chunk: Extent,
    /// The usable bytes: `off..off + len` within `chunk`.
    off: usize,
    len: usize,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.pool.release(self.chunk);
    }
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn addr(&self) -> usize {
        self.pool.shared.region.addr + self.off
    }

    fn belongs_to(&self, shared: &Arc<Shared>) -> bool {
        Arc::ptr_eq(&self.pool.shared, shared)
    }

    /// Sets every byte to `byte`.
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: `off..off + len` lies inside the mapped region (pool
        // invariant) which stays allocated while `self.pool.shared` keeps the
        // `Blkio` alive; no other `Buffer` overlaps it, and `&mut self` means
        // it is not in flight. Raw writes create no reference to shared memory.
        unsafe { std::ptr::write_bytes(self.addr() as *mut u8, byte, self.len) };
    }

    /// Copies `src` to the start of the buffer; returns the bytes copied
    /// (`min(src.len(), self.len())`).
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.len);
        // SAFETY: as in `fill`; `n <= self.len` and `src` is a distinct,
        // valid slice of at least `n` bytes (it cannot alias the region: no
        // reference into the region is ever created).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.addr() as *mut u8, n) };
        n
    }

    /// Copies the start of the buffer into `dst`; returns the bytes copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len);
        // SAFETY: as in `copy_from`, reading instead of writing; `&self`
        // means the buffer is not in flight.
        unsafe { std::ptr::copy_nonoverlapping(self.addr() as *const u8, dst.as_mut_ptr(), n) };
        n
    }

    /// The contents as a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.copy_to(&mut v);
        v
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.addr() as *mut libc::c_void,
            iov_len: self.len,
        }
    }
}

// ---------------------------------------------------------------------------
// Queues

/// One request. Data buffers are moved in and come back in [`Completed`].
pub enum Request {
    Read {
        offset: u64,
        buf: Buffer,
    },
    Write {
        offset: u64,
        buf: Buffer,
    },
    Readv {
        offset: u64,
        bufs: Vec<Buffer>,
    },
    Writev {
        offset: u64,
        bufs: Vec<Buffer>,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

/// The buffers of a finished request, handed back.
pub enum Bufs {
    None,
    One(Buffer),
    Many(Vec<Buffer>),
}

impl Bufs {
    pub fn into_vec(self) -> Vec<Buffer> {
        match self {
            Bufs::None => Vec::new(),
            Bufs::One(b) => vec![b],
            Bufs::Many(v) => v,
        }
    }
}

/// A failed request: errno plus libblkio's message when it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    pub errno: i32,
    pub detail: Option<String>,
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&errno::describe(self.errno))?;
        match &self.detail {
            Some(d) => write!(f, ": {d}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for IoError {}

impl IoError {
    fn new(errno: i32, detail: &str) -> Self {
        IoError {
            errno,
            detail: Some(detail.to_string()),
        }
    }
}

/// A finished request.
pub struct Completed {
    pub tag: u64,
    pub result: Result<(), IoError>,
    pub bufs: Bufs,
}

struct InFlight {
    tag: u64,
    bufs: Bufs,
    /// For readv/writev: the iovec array the driver was given. Its heap
    /// storage must not move or be freed until the request completes.
    iovecs: Iovecs,
}

/// An iovec array describing `Buffer`s of one device.
#[derive(Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses of `Buffer`s that travel in the same
// `InFlight` entry; the memory they name may be accessed from any thread.
unsafe impl Send for Iovecs {}

/// One virtqueue. `Send`: move it to the thread that drives it.
pub struct Queue {
    // Field order matters: `q` is dropped before `shared` (the `Blkio`).
    q: Blkioq,
    /// In-flight requests, indexed by the `user_data` given to libblkio.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Requests rejected before reaching the driver.
    local: VecDeque<Completed>,
    completions: Vec<MaybeUninit<Completion>>,
    shared: Arc<Shared>,
}

impl Queue {
    fn new(q: Blkioq, shared: Arc<Shared>) -> Self {
        Queue {
            q,
            slots: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
            local: VecDeque::new(),
            completions: Vec::new(),
            shared,
        }
    }

    /// Requests submitted and not yet returned by [`Queue::wait`].
    pub fn in_flight(&self) -> usize {
        self.in_flight + self.local.len()
    }

    /// Queues a request; it reaches the device at the next [`Queue::wait`].
    pub fn submit(&mut self, req: Request, tag: u64) {
        // Only buffers carved from this device's region may become pointers.
        let foreign = match &req {
            Request::Read { buf, .. } | Request::Write { buf, .. } => !buf.belongs_to(&self.shared),
            Request::Readv { bufs, .. } | Request::Writev { bufs, .. } => {
                bufs.iter().any(|b| !b.belongs_to(&self.shared))
            }
            Request::Flush | Request::Discard { .. } | Request::WriteZeroes { .. } => false,
        };
        if foreign {
            let bufs = match req {
                Request::Read { buf, .. } | Request::Write { buf, .. } => Bufs::One(buf),
                Request::Readv { bufs, .. } | Request::Writev { bufs, .. } => Bufs::Many(bufs),
                Request::Flush | Request::Discard { .. } | Request::WriteZeroes { .. } => {
                    Bufs::None
                }
            };
            self.local.push_back(Completed {
                tag,
                result: Err(IoError::new(libc::EINVAL, "buffer of another device")),
                bufs,
            });
            return;
        }

        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut entry = InFlight {
            tag,
            bufs: Bufs::None,
            iovecs: Iovecs::default(),
        };
        // The pointers handed to libblkio below come from `Buffer`s of this
        // device's mapped region; the buffers (and the iovec arrays) are kept
        // in `slots[slot]` until the completion for `slot` is reaped.
        match req {
            Request::Read { offset, buf } => {
                let iov = buf.iovec();
                self.q.read(
                    offset,
                    iov.iov_base.cast(),
                    iov.iov_len,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::One(buf);
            }
            Request::Write { offset, buf } => {
                let iov = buf.iovec();
                self.q.write(
                    offset,
                    iov.iov_base.cast_const().cast(),
                    iov.iov_len,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::One(buf);
            }
            Request::Readv { offset, bufs } => {
                entry.iovecs = Iovecs(bufs.iter().map(Buffer::iovec).collect());
                // More than u32::MAX iovecs cannot be allocated from a pool.
                let cnt = u32::try_from(entry.iovecs.0.len()).unwrap_or(u32::MAX);
                self.q.readv(
                    offset,
                    entry.iovecs.0.as_ptr(),
                    cnt,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::Many(bufs);
            }
            Request::Writev { offset, bufs } => {
                entry.iovecs = Iovecs(bufs.iter().map(Buffer::iovec).collect());
                let cnt = u32::try_from(entry.iovecs.0.len()).unwrap_or(u32::MAX);
                self.q.writev(
                    offset,
                    entry.iovecs.0.as_ptr(),
                    cnt,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::Many(bufs);
            }
            Request::Flush => self.q.flush(slot, ReqFlags::empty()),
            Request::Discard { offset, len } => {
                self.q.discard(offset, len, slot, ReqFlags::empty())
            }
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                let flags = if may_unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.q.write_zeroes(offset, len, slot, flags)
            }
        }
        // Moving `entry` moves the Vec header, not the iovec storage.
        self.slots[slot] = Some(entry);
        self.in_flight += 1;
    }

    /// Submits queued requests and waits until at least `min` (capped at
    /// [`Queue::in_flight`]) have completed, appending them to `out`.
    /// Returns how many were appended. `timeout` bounds the wait.
    pub fn wait(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completed>,
    ) -> Result<usize, DeviceError> {
        let mut n = 0;
        while let Some(c) = self.local.pop_front() {
            out.push(c);
            n += 1;
        }
        if self.in_flight == 0 {
            return Ok(n);
        }
        let want = min.saturating_sub(n).min(self.in_flight);
        if self.completions.len() < self.in_flight {
            self.completions
                .resize_with(self.slots.len().max(self.in_flight), MaybeUninit::uninit);
        }
        let mut left = timeout;
        let got = self
            .q
            .do_io(&mut self.completions, want, left.as_mut(), None)
            .map_err(|e| {
                if e.errno() == Errno::TIME {
                    DeviceError::Timeout(timeout.unwrap_or_default())
                } else {
                    DeviceError::Wait(e)
                }
            })?;
        for c in &self.completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            let Some(entry) = self.slots.get_mut(c.user_data).and_then(|slot| slot.take()) else {
                // Not ours: libblkio only echoes the user_data we gave it.
                continue;
            };
            self.free_slots.push(c.user_data);
            self.in_flight -= 1;
            let result = if c.ret == 0 {
                Ok(())
            } else {
                Err(IoError {
                    errno: -c.ret,
                    detail: error_msg(c),
                })
            };
            out.push(Completed {
                tag: entry.tag,
                result,
                bufs: entry.bufs,
            });
            n += 1;
        }
        Ok(n)
    }
}

fn error_msg(c: &Completion) -> Option<String> {
    if c.error_msg.is_null() {
        return None;
    }
    // SAFETY: libblkio sets `error_msg` to null or to a NUL-terminated
    // string with static lifetime (`blkio_completion` contract; the Rust
    // driver only uses `&'static CStr`s).
    let msg = unsafe { CStr::from_ptr(c.error_msg) };
    Some(msg.to_string_lossy().into_owned())
}

impl Drop for Queue {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        // Give the device a moment to finish; if it does not, leak the
        // in-flight buffers so their memory is never handed out again while
        // the device might still write to it.
        let mut sink = Vec::new();
        let deadline = Some(Duration::from_secs(5));
        while self.in_flight > 0 {
            if self.wait(self.in_flight, deadline, &mut sink).is_err() {
                std::mem::forget(std::mem::take(&mut self.slots));
                break;
            }
            sink.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Extent, FreeList};

    fn ext(off: usize, len: usize) -> Extent {
        Extent { off, len }
    }

    #[test]
    fn free_list_takes_first_fit() {
        let mut free = FreeList(vec![ext(0, 4096), ext(8192, 16384)]);
        assert_eq!(free.take(8192), Some(ext(8192, 8192)));
        assert_eq!(free.take(4096), Some(ext(0, 4096)));
        assert_eq!(free.take(16384), None);
        assert_eq!(free, FreeList(vec![ext(16384, 8192)]));
        assert_eq!(free.total(), 8192);
    }

    #[test]
    fn free_list_coalesces_returned_chunks() {
        let mut free = FreeList::default();
        free.give(ext(8192, 4096));
        free.give(ext(0, 4096));
        assert_eq!(free.0.len(), 2);
        free.give(ext(4096, 4096));
        assert_eq!(free, FreeList(vec![ext(0, 12288)]));
        assert_eq!(free.take(12288), Some(ext(0, 12288)));
        assert_eq!(free.total(), 0);
    }
}
