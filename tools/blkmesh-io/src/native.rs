//! The `native` driver: blkmesh's own virtio-blk driver over vhost-user
//! ([`blkmesh_vhost_user_client`]) instead of libblkio.
//!
//! libblkio's virtio-blk driver cannot send zone requests, so zone
//! commands need this one. The ordinary commands behave as with libblkio:
//! the same checks before a request reaches the device (start offsets in
//! whole sectors, writes refused on a device opened read-only, discard and
//! write-zeroes only when negotiated, a flush without FLUSH succeeding at
//! once), the same errno for each device status, and the same `info`
//! properties derived from the config space the way libblkio derives them.
//! Zoned devices add their zone properties to `info`.
//!
//! Data goes through guest RAM the driver owns (a memfd shared with the
//! device), sized for the largest command of the run.

use std::path::PathBuf;
use std::time::Duration;

use blkmesh_vhost_user_client as vuc;
use thiserror::Error;
use vuc::{
    BlkConfig, Chain, Completion, Options, Part, RequestSpec, VhostUserBlk, ZoneDescriptor, SECTOR,
};

use crate::device::{IoError, PropValue};

/// Queue size used when none is given (libblkio's default).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// libblkio's largest queue size, reported as `max-queue-size`.
const MAX_QUEUE_SIZE: i32 = 32768;
/// Most zone descriptors asked for in one ZONE_REPORT request.
pub const REPORT_CHUNK: u32 = 1024;

const F_SIZE_MAX: u32 = virtio_bits::SIZE_MAX;
const F_SEG_MAX: u32 = virtio_bits::SEG_MAX;
const F_RO: u32 = virtio_bits::RO;
const F_BLK_SIZE: u32 = virtio_bits::BLK_SIZE;
const F_FLUSH: u32 = virtio_bits::FLUSH;
const F_TOPOLOGY: u32 = virtio_bits::TOPOLOGY;
const F_CONFIG_WCE: u32 = virtio_bits::CONFIG_WCE;
const F_MQ: u32 = virtio_bits::MQ;
const F_DISCARD: u32 = virtio_bits::DISCARD;
const F_WRITE_ZEROES: u32 = virtio_bits::WRITE_ZEROES;

/// virtio-blk feature bits (virtio 1.3, 5.2.3).
mod virtio_bits {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
}

/// Errors that stop a run (not a failed request).
#[derive(Debug, Error)]
pub enum NativeError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: vuc::Error,
    },
    #[error("cannot start the device: {0}")]
    Start(&'static str),
    #[error("no completion within {0:?}: device hung or disconnected")]
    Timeout(Duration),
    #[error("request on queue {queue}")]
    Request {
        queue: usize,
        #[source]
        source: vuc::Error,
    },
}

/// How to open the device.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    pub socket: PathBuf,
    pub queues: usize,
    pub queue_size: Option<u32>,
    pub read_only: bool,
    /// Bound on the wait for each request.
    pub timeout: Duration,
    /// Data bytes the largest command moves at once (buffers are carved
    /// from guest RAM sized for it).
    pub data_bytes: u64,
}

/// Guest RAM for `cfg`: the rings, the data of the largest command with
/// room for alignment, and some slack; at least 16 MiB.
fn mem_size(cfg: &NativeConfig, queue_size: u16) -> u64 {
    let ring = (26 * queue_size as u64 + 64).next_multiple_of(4096) + 4096;
    let rings = 4096 + cfg.queues as u64 * ring;
    let data = cfg.data_bytes.next_multiple_of(4096);
    (rings + 2 * data + (4 << 20))
        .next_multiple_of(4096)
        .max(16 << 20)
}

/// An open device.
pub struct NativeDevice {
    blk: VhostUserBlk,
    config: BlkConfig,
    read_only: bool,
    queue_size: u16,
    num_queues: usize,
}

/// Outcome of one command: the device answered (maybe with an error), or
/// the run must stop.
pub type IoResult<T> = Result<Result<T, IoError>, NativeError>;

fn io_err(errno: i32, detail: &str) -> IoError {
    IoError {
        errno,
        detail: Some(detail.to_string()),
    }
}

/// The errno for a status byte, as libblkio maps them (IOERR → EIO,
/// UNSUPP → ENOTSUP); zone statuses as Linux's virtio-blk driver maps them,
/// with the status named.
pub fn status_error(status: u8) -> IoError {
    let named = |errno: i32| IoError {
        errno,
        detail: Some(format!("{} (status {status})", vuc::status_name(status))),
    };
    match status {
        vuc::S_IOERR => IoError {
            errno: libc::EIO,
            detail: None,
        },
        vuc::S_UNSUPP => IoError {
            errno: libc::ENOTSUP,
            detail: None,
        },
        vuc::S_ZONE_INVALID_CMD | vuc::S_ZONE_UNALIGNED_WP => named(libc::EIO),
        vuc::S_ZONE_OPEN_RESOURCE => named(libc::ETOOMANYREFS),
        vuc::S_ZONE_ACTIVE_RESOURCE => named(libc::EOVERFLOW),
        _ => named(libc::EPROTO),
    }
}

/// A zone action without data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneAction {
    Open,
    Close,
    Finish,
    Reset,
    ResetAll,
}

impl ZoneAction {
    fn request_type(self) -> u32 {
        match self {
            ZoneAction::Open => vuc::T_ZONE_OPEN,
            ZoneAction::Close => vuc::T_ZONE_CLOSE,
            ZoneAction::Finish => vuc::T_ZONE_FINISH,
            ZoneAction::Reset => vuc::T_ZONE_RESET,
            ZoneAction::ResetAll => vuc::T_ZONE_RESET_ALL,
        }
    }
}

/// A zone of a report, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone {
    pub start: u64,
    /// The zone size (the last zone may be shorter).
    pub length: u64,
    pub capacity: u64,
    pub write_pointer: u64,
    /// `z_state` (virtio numbering, as qemu-io's `zcond`).
    pub condition: u8,
    /// `z_type`.
    pub zone_type: u8,
}

impl NativeDevice {
    /// Connects, negotiates (EVENT_IDX and ZONED included) and starts the
    /// queues.
    pub fn open(cfg: &NativeConfig) -> Result<NativeDevice, NativeError> {
        let queue_size = match cfg.queue_size {
            None => DEFAULT_QUEUE_SIZE,
            Some(q) if q.is_power_of_two() && q <= MAX_QUEUE_SIZE as u32 => q as u16,
            Some(_) => {
                return Err(NativeError::Start(
                    "queue_size must be a power of two of at most 32768",
                ))
            }
        };
        // libblkio's feature set (CONFIG_WCE included, which decides
        // flush-needed), plus ZONED and INDIRECT_DESC.
        let opts = Options {
            features_wanted: vuc::DEFAULT_FEATURES | 1 << F_CONFIG_WCE,
            ..Options::default()
        }
        .queues(u16::try_from(cfg.queues).unwrap_or(u16::MAX))
        .queue_size(queue_size)
        .mem_size(mem_size(cfg, queue_size))
        .event_idx(true)
        .timeout(cfg.timeout);
        let connect = |source| NativeError::Connect {
            path: cfg.socket.clone(),
            source,
        };
        let mut blk = VhostUserBlk::connect(&cfg.socket, opts).map_err(connect)?;
        let config = blk.config().map_err(connect)?;
        if blk.has_feature(F_RO) && !cfg.read_only {
            return Err(NativeError::Start("Device is read-only"));
        }
        Ok(NativeDevice {
            blk,
            config,
            read_only: cfg.read_only,
            queue_size,
            num_queues: cfg.queues,
        })
    }

    fn run(&mut self, queue: usize, chain: &Chain) -> Result<Completion, NativeError> {
        let q = u16::try_from(queue).unwrap_or(u16::MAX);
        self.blk.run_chain(q, chain).map_err(|e| match e {
            vuc::Error::Timeout { timeout, .. } => NativeError::Timeout(timeout),
            source => NativeError::Request { queue, source },
        })
    }

    /// Runs `chain`; a status other than OK is the request's error.
    fn run_status(&mut self, queue: usize, chain: &Chain) -> IoResult<Completion> {
        let c = self.run(queue, chain)?;
        Ok(match c.status {
            Some(vuc::S_OK) => Ok(c),
            Some(s) => Err(status_error(s)),
            None => Err(status_error(vuc::STATUS_UNTOUCHED)),
        })
    }

    fn has(&self, bit: u32) -> bool {
        self.blk.has_feature(bit)
    }

    /// Reads `lens` bytes (one writable descriptor each) at `offset`.
    pub fn read(&mut self, queue: usize, offset: u64, lens: &[u64]) -> IoResult<Vec<u8>> {
        if offset % SECTOR != 0 {
            return Ok(Err(io_err(libc::EINVAL, "invalid start offset")));
        }
        let mut chain = Chain::new().part(Part::readable(&vuc::request::header(
            vuc::T_IN,
            offset / SECTOR,
        )));
        for &l in lens {
            let Ok(l) = u32::try_from(l) else {
                return Ok(Err(io_err(libc::EINVAL, "buffer too large")));
            };
            chain = chain.part(Part::writable(l));
        }
        let chain = chain.part(Part::status());
        Ok(self.run_status(queue, &chain)?.map(|c| c.data))
    }

    /// Writes `lens` bytes of `pattern` (one readable descriptor each) at
    /// `offset`.
    pub fn write(&mut self, queue: usize, offset: u64, lens: &[u64], pattern: u8) -> IoResult<()> {
        if offset % SECTOR != 0 {
            return Ok(Err(io_err(libc::EINVAL, "invalid start offset")));
        }
        if self.read_only {
            return Ok(Err(io_err(libc::EBADF, "device is read-only")));
        }
        let mut chain = Chain::new().part(Part::readable(&vuc::request::header(
            vuc::T_OUT,
            offset / SECTOR,
        )));
        for &l in lens {
            let Ok(l) = usize::try_from(l) else {
                return Ok(Err(io_err(libc::EINVAL, "buffer too large")));
            };
            if u32::try_from(l).is_err() {
                return Ok(Err(io_err(libc::EINVAL, "buffer too large")));
            }
            chain = chain.part(Part::readable(&vec![pattern; l]));
        }
        let chain = chain.part(Part::status());
        Ok(self.run_status(queue, &chain)?.map(|_| ()))
    }

    /// Flushes (succeeds at once when FLUSH was not negotiated, as
    /// libblkio does).
    pub fn flush(&mut self, queue: usize) -> IoResult<()> {
        if !self.has(F_FLUSH) {
            return Ok(Ok(()));
        }
        let chain = RequestSpec::flush().chain();
        Ok(self.run_status(queue, &chain)?.map(|_| ()))
    }

    /// A discard (`zeroes` false) or write-zeroes of `[offset, offset + len)`.
    pub fn discard_or_zeroes(
        &mut self,
        queue: usize,
        offset: u64,
        len: u64,
        zeroes: Option<bool>,
    ) -> IoResult<()> {
        let (bit, what) = match zeroes {
            None => (F_DISCARD, "discard not supported"),
            Some(_) => (F_WRITE_ZEROES, "write zeroes not supported"),
        };
        if !self.has(bit) {
            return Ok(Err(io_err(libc::ENOTSUP, what)));
        }
        let end = offset.checked_add(len);
        if offset % SECTOR != 0 || end.is_none_or(|e| e % SECTOR != 0) {
            return Ok(Err(io_err(libc::EINVAL, "invalid len or start offset")));
        }
        if self.read_only {
            return Ok(Err(io_err(libc::EBADF, "device is read-only")));
        }
        let Ok(num) = u32::try_from(len / SECTOR) else {
            return Ok(Err(io_err(libc::EINVAL, "length too large")));
        };
        let spec = match zeroes {
            None => RequestSpec::discard(offset / SECTOR, num),
            Some(may_unmap) => RequestSpec::write_zeroes(offset / SECTOR, num, may_unmap),
        };
        Ok(self.run_status(queue, &spec.chain())?.map(|_| ()))
    }

    /// The config space as read at connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Whether the device is zoned and ZONED was negotiated.
    pub fn is_zoned(&self) -> bool {
        self.has(vuc::F_ZONED) && self.config.is_zoned()
    }

    /// Bytes of the zone holding `offset` (the last zone may be shorter).
    fn zone_len(&self, start: u64) -> u64 {
        let size = self.config.zone_bytes();
        size.min(self.config.capacity_bytes().saturating_sub(start))
    }

    /// Zones from the one holding `offset`: `count` of them, or all up to
    /// the end. ZONE_REPORT requests of at most [`REPORT_CHUNK`] zones
    /// each. Sent whether or not the device is zoned: a device that is not
    /// answers UNSUPP.
    pub fn zone_report(
        &mut self,
        queue: usize,
        offset: u64,
        count: Option<u32>,
    ) -> IoResult<Vec<Zone>> {
        if offset % SECTOR != 0 {
            return Ok(Err(io_err(libc::EINVAL, "invalid start offset")));
        }
        let zone_bytes = self.config.zone_bytes();
        let capacity = self.config.capacity_bytes();
        let want = match count {
            Some(n) => n as u64,
            None if zone_bytes > 0 => capacity.saturating_sub(offset).div_ceil(zone_bytes),
            None => 1,
        };
        let mut zones: Vec<Zone> = Vec::new();
        let mut next = offset;
        while (zones.len() as u64) < want {
            let n = (want - zones.len() as u64).min(REPORT_CHUNK as u64) as u32;
            let spec = RequestSpec::zone_report(next / SECTOR, n);
            let c = match self.run_status(queue, &spec.chain())? {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let written = (c.used_len as usize).saturating_sub(1).min(c.data.len());
            let got = match vuc::zone::parse_report(&c.data[..written]) {
                Ok(z) => z,
                Err(e) => return Ok(Err(io_err(libc::EPROTO, &e.to_string()))),
            };
            if got.is_empty() {
                break;
            }
            zones.extend(got.iter().take(n as usize).map(|d| self.zone(d)));
            let Some(end) = zones.last().map(|z| z.start.saturating_add(z.length)) else {
                break;
            };
            if end <= next || end >= capacity {
                break;
            }
            next = end;
        }
        Ok(Ok(zones))
    }

    fn zone(&self, d: &ZoneDescriptor) -> Zone {
        let start = d.start.saturating_mul(SECTOR);
        Zone {
            start,
            length: self.zone_len(start),
            capacity: d.capacity.saturating_mul(SECTOR),
            write_pointer: d.write_pointer.saturating_mul(SECTOR),
            condition: d.state.as_u8(),
            zone_type: d.zone_type.as_u8(),
        }
    }

    /// Open, close, finish, reset the zone at `offset`, or reset all.
    pub fn zone_action(&mut self, queue: usize, action: ZoneAction, offset: u64) -> IoResult<()> {
        if offset % SECTOR != 0 {
            return Ok(Err(io_err(libc::EINVAL, "invalid start offset")));
        }
        if self.read_only {
            return Ok(Err(io_err(libc::EBADF, "device is read-only")));
        }
        let spec = RequestSpec::zone_mgmt(action.request_type(), offset / SECTOR);
        Ok(self.run_status(queue, &spec.chain())?.map(|_| ()))
    }

    /// Appends `len` bytes of `pattern` to the zone at `offset`; returns
    /// the byte offset where they landed.
    pub fn zone_append(
        &mut self,
        queue: usize,
        offset: u64,
        len: u64,
        pattern: u8,
    ) -> IoResult<u64> {
        if offset % SECTOR != 0 {
            return Ok(Err(io_err(libc::EINVAL, "invalid start offset")));
        }
        if self.read_only {
            return Ok(Err(io_err(libc::EBADF, "device is read-only")));
        }
        let Some(l) = usize::try_from(len)
            .ok()
            .filter(|&l| u32::try_from(l).is_ok())
        else {
            return Ok(Err(io_err(libc::EINVAL, "buffer too large")));
        };
        let spec = RequestSpec::zone_append(offset / SECTOR, &vec![pattern; l]);
        Ok(match self.run_status(queue, &spec.chain())? {
            Ok(c) => match vuc::zone::parse_append_sector(&c.data) {
                Ok(sector) => Ok(sector.saturating_mul(SECTOR)),
                Err(e) => Err(io_err(libc::EPROTO, &e.to_string())),
            },
            Err(e) => Err(e),
        })
    }

    /// The properties `info` prints: libblkio's virtio-blk set, derived
    /// the same way from the negotiated features and the config space,
    /// then the zone properties of a zoned device.
    pub fn properties(&self) -> Vec<(&'static str, PropValue)> {
        let c = &self.config;
        let has = |bit| self.has(bit);
        let i32_of = |v: u64| PropValue::I32(v.min(i32::MAX as u64) as i32);
        let blk_size = if has(F_BLK_SIZE) {
            c.blk_size as u64
        } else {
            512
        };
        let max_segment_len = if has(F_SIZE_MAX) {
            c.size_max as u64
        } else {
            0
        };
        let max_segments = if has(F_SEG_MAX) { c.seg_max as u64 } else { 1 };
        let max_transfer = if has(F_SIZE_MAX) && has(F_SEG_MAX) {
            max_segment_len * max_segments
        } else {
            0
        };
        let topology = has(F_TOPOLOGY);
        let flush_needed = if has(F_CONFIG_WCE) {
            c.writeback != 0
        } else {
            has(F_FLUSH)
        };
        let mut p = vec![
            ("driver", PropValue::Str("virtio-blk-vhost-user".into())),
            ("capacity", PropValue::U64(c.capacity_bytes())),
            ("read-only", PropValue::Bool(self.read_only)),
            ("request-alignment", i32_of(blk_size)),
            (
                "optimal-io-alignment",
                i32_of(if topology {
                    blk_size << c.physical_block_exp.min(32)
                } else {
                    blk_size
                }),
            ),
            (
                "optimal-io-size",
                i32_of(if topology {
                    blk_size * c.opt_io_size as u64
                } else {
                    0
                }),
            ),
            ("max-transfer", i32_of(max_transfer)),
            ("max-segments", i32_of(max_segments)),
            ("max-segment-len", i32_of(max_segment_len)),
            ("buf-alignment", PropValue::I32(1)),
            ("optimal-buf-alignment", PropValue::I32(1)),
            ("mem-region-alignment", PropValue::U64(1)),
        ];
        if let Some(slots) = self.blk.max_mem_slots() {
            p.push(("max-mem-regions", PropValue::U64(slots)));
        }
        let discard = has(F_DISCARD);
        p.extend([
            (
                "discard-alignment",
                i32_of(if discard {
                    512 * c.discard_sector_alignment as u64
                } else {
                    512
                }),
            ),
            (
                "discard-alignment-offset",
                i32_of(if topology {
                    blk_size * c.alignment_offset as u64
                } else {
                    0
                }),
            ),
            (
                "max-discard-len",
                PropValue::U64(if discard {
                    512 * c.max_discard_sectors as u64
                } else {
                    0
                }),
            ),
            (
                "max-write-zeroes-len",
                PropValue::U64(if has(F_WRITE_ZEROES) {
                    512 * c.max_write_zeroes_sectors as u64
                } else {
                    0
                }),
            ),
            ("supports-fua-natively", PropValue::Bool(false)),
            ("flush-needed", PropValue::Bool(flush_needed)),
            ("num-queues", i32_of(self.num_queues as u64)),
            ("num-poll-queues", PropValue::I32(0)),
            (
                "max-queues",
                i32_of(if has(F_MQ) { c.num_queues as u64 } else { 1 }),
            ),
            ("queue-size", PropValue::I32(self.queue_size as i32)),
            ("max-queue-size", PropValue::I32(MAX_QUEUE_SIZE)),
        ]);
        if self.is_zoned() {
            let model = match c.zoned_model {
                vuc::zone::Z_HM => "host-managed",
                _ => "host-aware",
            };
            p.extend([
                ("zoned-model", PropValue::Str(model.into())),
                ("zone-size", PropValue::U64(c.zone_bytes())),
                ("nr-zones", PropValue::U64(c.nr_zones())),
                ("max-open-zones", PropValue::U64(c.max_open_zones as u64)),
                (
                    "max-active-zones",
                    PropValue::U64(c.max_active_zones as u64),
                ),
                (
                    "max-append-len",
                    PropValue::U64(c.max_append_sectors as u64 * 512),
                ),
                (
                    "write-granularity",
                    PropValue::U64(c.write_granularity as u64),
                ),
            ]);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_errnos_like_libblkio() {
        assert_eq!(status_error(vuc::S_IOERR).errno, libc::EIO);
        assert_eq!(status_error(vuc::S_IOERR).detail, None);
        assert_eq!(status_error(vuc::S_UNSUPP).errno, libc::ENOTSUP);
        let wp = status_error(vuc::S_ZONE_UNALIGNED_WP);
        assert_eq!(wp.errno, libc::EIO);
        assert_eq!(wp.detail.as_deref(), Some("ZONE_UNALIGNED_WP (status 4)"));
        assert_eq!(
            status_error(vuc::S_ZONE_OPEN_RESOURCE).errno,
            libc::ETOOMANYREFS
        );
        assert_eq!(
            status_error(vuc::S_ZONE_ACTIVE_RESOURCE).errno,
            libc::EOVERFLOW
        );
        assert_eq!(status_error(0x55).errno, libc::EPROTO);
        assert_eq!(
            status_error(vuc::S_ZONE_INVALID_CMD).to_string(),
            "EIO (Input/output error): ZONE_INVALID_CMD (status 3)"
        );
    }

    #[test]
    fn guest_ram_fits_the_largest_command() {
        let cfg = NativeConfig {
            socket: "/s".into(),
            queues: 4,
            queue_size: None,
            read_only: false,
            timeout: Duration::from_secs(1),
            data_bytes: 64 << 20,
        };
        let m = mem_size(&cfg, 1024);
        assert!(m >= 128 << 20, "{m}");
        assert_eq!(m % 4096, 0);
        let small = NativeConfig {
            data_bytes: 0,
            ..cfg
        };
        assert_eq!(mem_size(&small, 256), 16 << 20);
    }
}
