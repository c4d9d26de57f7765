//! [`VhostUserBlk`]: the connection, negotiation and queues; its request
//! API is in `requests`, its raw ring access (for hostile tests) in
//! `raw_access`.

mod dirty_log;
pub mod log_probe;
mod raw_access;
mod requests;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_F_ZONED,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::alloc::Allocator;
use crate::config::{BlkConfig, CONFIG_SIZE};
use crate::error::Error;
use crate::guest::{GuestRam, Ram};
use crate::layout::{align_up, RingLayout};
use crate::queue::SplitQueue;
use crate::raw::{self, req, RawMessage};

/// The vhost-user protocol feature bits (re-exported from the vhost crate).
pub type ProtocolFeatures = VhostUserProtocolFeatures;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30 of the device features).
pub const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The virtio feature bits a driver built with [`Options::default`] asks
/// for (those the device does not offer are left out):
/// VERSION_1, SIZE_MAX, SEG_MAX, RO, BLK_SIZE, FLUSH, TOPOLOGY, MQ,
/// DISCARD, WRITE_ZEROES, ZONED, INDIRECT_DESC. EVENT_IDX is added by
/// [`Options::event_idx`], PROTOCOL_FEATURES always when offered.
pub const DEFAULT_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES
    | 1 << VIRTIO_BLK_F_ZONED
    | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// Guest address where the rings start (page 0 stays unused: a virtqueue
/// with its avail ring at address 0 counts as not set up in rust-vmm).
const RINGS_START: u64 = 0x1000;

/// How to connect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up (default 1).
    pub num_queues: u16,
    /// Descriptors per queue, a power of two (default 128).
    pub queue_size: u16,
    /// Bytes of guest RAM, a multiple of 4096 (default 16 MiB). The rings
    /// take the first pages; data buffers come from the rest.
    pub mem_size: u64,
    /// Protocol features to ack if offered (default MQ, CONFIG,
    /// REPLY_ACK, CONFIGURE_MEM_SLOTS). With REPLY_ACK every message asks
    /// for an ack, so refusals surface as errors.
    pub protocol_features_wanted: ProtocolFeatures,
    /// Negotiate INFLIGHT_SHMFD when offered: GET_INFLIGHT_FD and
    /// SET_INFLIGHT_FD before the rings start, as QEMU does; the region is
    /// kept for [`VhostUserBlk::reconnect`] (default false).
    pub inflight: bool,
    /// Virtio features to ack if offered (default [`DEFAULT_FEATURES`]).
    pub features_wanted: u64,
    /// Also ask for VIRTIO_RING_F_EVENT_IDX (default false).
    pub event_idx: bool,
    /// Bound on every wait for the device: replies, completions of the
    /// convenience calls (default 5 s).
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: 128,
            mem_size: 16 << 20,
            protocol_features_wanted: ProtocolFeatures::MQ
                | ProtocolFeatures::CONFIG
                | ProtocolFeatures::REPLY_ACK
                | ProtocolFeatures::CONFIGURE_MEM_SLOTS,
            inflight: false,
            features_wanted: DEFAULT_FEATURES,
            event_idx: false,
            timeout: Duration::from_secs(5),
        }
    }
}

impl Options {
    /// Sets the number of queues.
    pub fn queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Sets the queue size.
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// Sets the guest RAM size.
    pub fn mem_size(mut self, bytes: u64) -> Self {
        self.mem_size = bytes;
        self
    }

    /// Asks for inflight tracking.
    pub fn inflight(mut self, on: bool) -> Self {
        self.inflight = on;
        self
    }

    /// Asks for EVENT_IDX.
    pub fn event_idx(mut self, on: bool) -> Self {
        self.event_idx = on;
        self
    }

    /// Sets the bound on waits.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// The inflight-tracking region the device handed out with
/// GET_INFLIGHT_FD, kept across reconnections.
#[derive(Debug)]
pub struct InflightRegion {
    /// Bytes of the region.
    pub mmap_size: u64,
    /// Offset of the region in `file`.
    pub mmap_offset: u64,
    /// Queues it covers.
    pub num_queues: u16,
    /// Queue size it was made for.
    pub queue_size: u16,
    /// The shared memory.
    pub file: File,
}

impl InflightRegion {
    fn message(&self) -> VhostUserInflight {
        VhostUserInflight::new(
            self.mmap_size,
            self.mmap_offset,
            self.num_queues,
            self.queue_size,
        )
    }
}

/// One vhost-user connection.
struct Conn {
    frontend: Frontend,
    /// The same socket, for raw messages.
    sock: UnixStream,
    offered: u64,
    acked: u64,
    offered_protocol: ProtocolFeatures,
    acked_protocol: ProtocolFeatures,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("sock", &self.sock)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("acked_protocol", &self.acked_protocol)
            .finish_non_exhaustive()
    }
}

/// A virtio-blk driver talking vhost-user to a device, as a VMM would.
///
/// Guest RAM is a memfd shared with the device; the rings and every data
/// buffer live in it. One connection at a time; [`VhostUserBlk::reconnect`]
/// opens a new one over the same memory and rings.
///
/// Besides the request API, the raw methods (`write_desc`, `publish_head`,
/// `set_avail_idx`, `send_raw`, `raw_request`...) break the rules on
/// purpose. They are for tests of the device's defences only: a device is
/// free to refuse what they send, or to close the connection.
#[derive(Debug)]
pub struct VhostUserBlk {
    socket: PathBuf,
    opts: Options,
    ram: Ram,
    queues: Vec<SplitQueue>,
    conn: Option<Conn>,
    config: Option<BlkConfig>,
    max_mem_slots: Option<u64>,
    inflight: Option<InflightRegion>,
    /// The dirty log shared with the device, once a "migration" started.
    dirty_log: Option<File>,
    next_token: u64,
}

fn vhost_err(e: vhost::Error) -> Error {
    Error::Vhost(e.to_string())
}

impl VhostUserBlk {
    /// Connects to the vhost-user-blk socket, negotiates features, shares
    /// guest RAM and starts `opts.num_queues` queues.
    pub fn connect(socket: impl AsRef<Path>, opts: Options) -> Result<VhostUserBlk, Error> {
        if opts.num_queues == 0 {
            return Err(Error::Invalid("num_queues must be at least 1".into()));
        }
        let ram = GuestRam::new(opts.mem_size)?;
        let mut queues = Vec::with_capacity(opts.num_queues as usize);
        let mut at = RINGS_START;
        for _ in 0..opts.num_queues {
            let layout = RingLayout::at(at, opts.queue_size).ok_or_else(|| {
                Error::Invalid(format!(
                    "queue size {} is not a power of two in 1..=32768",
                    opts.queue_size
                ))
            })?;
            at = align_up(layout.end(), 4096);
            queues.push(SplitQueue::new(layout, opts.event_idx)?);
        }
        if at + 4096 > ram.size() {
            return Err(Error::Invalid(format!(
                "{} bytes of guest RAM leave no room for data after the rings",
                ram.size()
            )));
        }
        let alloc = Allocator::new(at, ram.size());
        let mut blk = VhostUserBlk {
            socket: socket.as_ref().to_path_buf(),
            opts,
            ram: Ram { ram, alloc },
            queues,
            conn: None,
            config: None,
            max_mem_slots: None,
            inflight: None,
            dirty_log: None,
            next_token: 0,
        };
        blk.handshake(false)?;
        Ok(blk)
    }

    /// Drops the connection (the device sees the VMM go away) and opens a
    /// new one over the same guest RAM and rings, as QEMU does after a
    /// back-end restart: with inflight tracking the kept region is handed
    /// back with SET_INFLIGHT_FD (no new GET_INFLIGHT_FD), and each queue's
    /// base is the used index in guest memory, so chains made available
    /// but not used are seen again. Driver state (in-flight tokens) stays.
    pub fn reconnect(&mut self) -> Result<(), Error> {
        self.disconnect();
        self.handshake(true)
    }

    /// Closes the connection.
    pub fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether a connection is open (it may have been closed by the peer).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    fn connect_socket(&self) -> Result<UnixStream, Error> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => return Ok(s),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused
                                | io::ErrorKind::NotFound
                                | io::ErrorKind::WouldBlock
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn handshake(&mut self, reconnect: bool) -> Result<(), Error> {
        let stream = self.connect_socket()?;
        stream.set_read_timeout(Some(self.opts.timeout))?;
        stream.set_write_timeout(Some(self.opts.timeout))?;
        let sock = stream.try_clone()?;
        let nq = self.opts.num_queues;
        let mut fe = Frontend::from_stream(stream, nq as u64);
        let offered = fe.get_features().map_err(vhost_err)?;
        let mut offered_protocol = ProtocolFeatures::empty();
        let mut acked_protocol = ProtocolFeatures::empty();
        if offered & F_PROTOCOL_FEATURES != 0 {
            offered_protocol = fe.get_protocol_features().map_err(vhost_err)?;
            let mut want = self.opts.protocol_features_wanted;
            if self.opts.inflight {
                want |= ProtocolFeatures::INFLIGHT_SHMFD;
            }
            acked_protocol = offered_protocol & want;
            fe.set_protocol_features(acked_protocol)
                .map_err(vhost_err)?;
            if acked_protocol.contains(ProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if acked_protocol.contains(ProtocolFeatures::MQ) {
            let n = fe.get_queue_num().map_err(vhost_err)?;
            if n < nq as u64 {
                return Err(Error::Invalid(format!(
                    "the device has {n} queues, {nq} wanted"
                )));
            }
        }
        fe.set_owner().map_err(vhost_err)?;
        if acked_protocol.contains(ProtocolFeatures::CONFIG) {
            let (_, bytes) = fe
                .get_config(
                    0,
                    CONFIG_SIZE as u32,
                    VhostUserConfigFlags::empty(),
                    &[0u8; CONFIG_SIZE],
                )
                .map_err(vhost_err)?;
            self.config = Some(BlkConfig::parse(&bytes));
        }
        if acked_protocol.contains(ProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            self.max_mem_slots = Some(fe.get_max_mem_slots().map_err(vhost_err)?);
        }
        let mut want = self.opts.features_wanted | F_PROTOCOL_FEATURES;
        if self.opts.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let acked = offered & want;
        fe.set_features(acked).map_err(vhost_err)?;
        let mut conn = Conn {
            frontend: fe,
            sock,
            offered,
            acked,
            offered_protocol,
            acked_protocol,
        };
        if self.opts.inflight && acked_protocol.contains(ProtocolFeatures::INFLIGHT_SHMFD) {
            if !reconnect || self.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, nq, self.opts.queue_size);
                let (info, file) = conn.frontend.get_inflight_fd(&ask).map_err(vhost_err)?;
                self.inflight = Some(InflightRegion {
                    mmap_size: info.mmap_size,
                    mmap_offset: info.mmap_offset,
                    num_queues: info.num_queues,
                    queue_size: info.queue_size,
                    file,
                });
            }
            if let Some(r) = &self.inflight {
                conn.frontend
                    .set_inflight_fd(&r.message(), r.file.as_raw_fd())
                    .map_err(vhost_err)?;
            }
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.ram.ram.size(),
            userspace_addr: self.ram.ram.user_addr(0),
            mmap_offset: 0,
            mmap_handle: self.ram.ram.fd().as_raw_fd(),
        };
        conn.frontend.set_mem_table(&[region]).map_err(vhost_err)?;
        let reply_ack = acked_protocol.contains(ProtocolFeatures::REPLY_ACK);
        for (i, q) in self.queues.iter().enumerate() {
            let l = q.layout;
            let base = if reconnect { q.used_idx(&self.ram)? } else { 0 };
            conn.frontend.set_vring_num(i, l.size).map_err(vhost_err)?;
            conn.frontend.set_vring_base(i, base).map_err(vhost_err)?;
            let addrs = VringConfigData {
                queue_max_size: l.size,
                queue_size: l.size,
                flags: 0,
                desc_table_addr: self.ram.ram.user_addr(l.desc),
                used_ring_addr: self.ram.ram.user_addr(l.used),
                avail_ring_addr: self.ram.ram.user_addr(l.avail),
                log_addr: None,
            };
            conn.frontend.set_vring_addr(i, &addrs).map_err(vhost_err)?;
            for (request, fd) in [
                (req::SET_VRING_KICK, q.kick.as_fd()),
                (req::SET_VRING_CALL, q.call.as_fd()),
            ] {
                let flags = raw::FLAG_VERSION | if reply_ack { raw::FLAG_NEED_REPLY } else { 0 };
                let m = RawMessage::vring_fd(request, i as u64, Some(&fd))?.flags(flags);
                raw::send(&conn.sock, &m)?;
                if reply_ack {
                    expect_ack(&conn.sock, self.opts.timeout, request)?;
                }
            }
        }
        if acked & F_PROTOCOL_FEATURES != 0 {
            for i in 0..self.queues.len() {
                conn.frontend.set_vring_enable(i, true).map_err(vhost_err)?;
            }
        }
        self.conn = Some(conn);
        Ok(())
    }

    fn conn(&mut self) -> Result<&mut Conn, Error> {
        self.conn.as_mut().ok_or(Error::NotConnected)
    }

    fn queue(&mut self, queue: u16) -> Result<&mut SplitQueue, Error> {
        self.queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))
    }

    fn queue_ref(&self, queue: u16) -> Result<&SplitQueue, Error> {
        self.queues
            .get(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))
    }

    // ----- what was negotiated -----

    /// The options this driver was built with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The config space as read when the connection opened (needs the
    /// CONFIG protocol feature).
    pub fn cached_config(&self) -> Option<&BlkConfig> {
        self.config.as_ref()
    }

    /// Reads the config space now (GET_CONFIG).
    pub fn config(&mut self) -> Result<BlkConfig, Error> {
        let conn = self.conn()?;
        if !conn.acked_protocol.contains(ProtocolFeatures::CONFIG) {
            return Err(Error::Unsupported("the CONFIG protocol feature"));
        }
        let (_, bytes) = conn
            .frontend
            .get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_SIZE],
            )
            .map_err(vhost_err)?;
        let c = BlkConfig::parse(&bytes);
        self.config = Some(c.clone());
        Ok(c)
    }

    /// The device's capacity in bytes, from the cached config space.
    pub fn capacity(&self) -> Option<u64> {
        self.config.as_ref().map(BlkConfig::capacity_bytes)
    }

    /// Feature bits the device offered.
    pub fn offered_features(&self) -> u64 {
        self.conn.as_ref().map_or(0, |c| c.offered)
    }

    /// Feature bits acked.
    pub fn features(&self) -> u64 {
        self.conn.as_ref().map_or(0, |c| c.acked)
    }

    /// Whether feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.features() & (1 << bit) != 0
    }

    /// Protocol features the device offered.
    pub fn offered_protocol_features(&self) -> ProtocolFeatures {
        self.conn
            .as_ref()
            .map_or(ProtocolFeatures::empty(), |c| c.offered_protocol)
    }

    /// Protocol features acked.
    pub fn protocol_features(&self) -> ProtocolFeatures {
        self.conn
            .as_ref()
            .map_or(ProtocolFeatures::empty(), |c| c.acked_protocol)
    }

    /// GET_MAX_MEM_SLOTS's answer, with CONFIGURE_MEM_SLOTS.
    pub fn max_mem_slots(&self) -> Option<u64> {
        self.max_mem_slots
    }

    /// The inflight region from GET_INFLIGHT_FD, if negotiated.
    pub fn inflight_region(&self) -> Option<&InflightRegion> {
        self.inflight.as_ref()
    }
}

/// Reads a REPLY_ACK for `request`; a non-zero one is a refusal.
fn expect_ack(sock: &UnixStream, timeout: Duration, request: u32) -> Result<(), Error> {
    match raw::recv(sock, timeout) {
        Ok(Some(r)) if r.request == request && r.ack() == Some(0) => Ok(()),
        Ok(Some(r)) => Err(Error::Refused(format!(
            "request {request}: reply {} with payload {:?}",
            r.request, r.payload
        ))),
        Ok(None) => Err(Error::Timeout {
            what: format!("the ack of request {request}"),
            timeout,
        }),
        Err(raw::ConnectionClosed) => Err(Error::Closed),
    }
}
