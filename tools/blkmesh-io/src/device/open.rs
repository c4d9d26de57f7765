//! Opening a device: how ([`DeviceConfig`]), what it reports
//! ([`DeviceInfo`], [`PropValue`]) and the open [`Device`].

use std::path::PathBuf;
use std::sync::Arc;

use blkio::{Blkio, Errno};

use super::error::DeviceError;
use super::pool::{BufferPool, CHUNK_ALIGN};
use super::queue::Queue;
use super::shared::{Shared, DRIVER};

/// What the device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    /// A vhost-user-blk export: libblkio's virtio-blk-vhost-user driver.
    Socket(PathBuf),
    /// A file or block device: libblkio's io_uring driver, page cache.
    File(PathBuf),
}

impl DeviceTarget {
    /// The libblkio driver for it.
    pub fn driver(&self) -> &'static str {
        match self {
            DeviceTarget::Socket(_) => DRIVER,
            DeviceTarget::File(_) => "io_uring",
        }
    }

    pub fn path(&self) -> &std::path::Path {
        match self {
            DeviceTarget::Socket(p) | DeviceTarget::File(p) => p,
        }
    }
}

/// How to open a device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub target: DeviceTarget,
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
        let driver = config.target.driver();
        let mut blkio =
            Blkio::new(driver).map_err(|source| DeviceError::Create { driver, source })?;
        let path = config.target.path().to_string_lossy().into_owned();
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
        blkio.connect().map_err(|source| {
            let path = config.target.path().to_path_buf();
            match config.target {
                DeviceTarget::Socket(_) => DeviceError::Connect { path, source },
                DeviceTarget::File(_) => DeviceError::Open { path, source },
            }
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
        let pool = BufferPool::whole_region(&shared);
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
