//! [`VhostUserBlk`]: the connection, negotiation, queues and request API.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
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
use crate::guest::{GuestRam, Ram};
use crate::layout::{align_up, Descriptor, RingLayout};
use crate::queue::SplitQueue;
use crate::raw::{self, req, MemRegion, RawMessage, RawOutcome, RawReply};
use crate::request::{Chain, Completion, RequestSpec, Token, ID_BYTES, S_OK};
use crate::zone::{self, ZoneDescriptor};
use crate::Error;

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

    // ----- requests -----

    fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    /// Submits a well-formed request; see [`VhostUserBlk::wait`].
    pub fn submit(&mut self, queue: u16, spec: &RequestSpec) -> Result<Token, Error> {
        self.submit_chain(queue, &spec.chain())
    }

    /// Lays out `chain` (buffers in guest RAM, descriptors in the table or
    /// an indirect table), makes it available and kicks.
    pub fn submit_chain(&mut self, queue: u16, chain: &Chain) -> Result<Token, Error> {
        let token = self.token();
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.submit(&mut self.ram, chain, token)?;
        q.kick()?;
        Ok(token)
    }

    /// Collects used elements without waiting: every completion collected
    /// so far and not claimed by [`VhostUserBlk::wait`], in used-ring order.
    pub fn poll_used(&mut self, queue: u16) -> Result<Vec<Completion>, Error> {
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.clear_call();
        q.collect(&mut self.ram)?;
        Ok(q.take_all())
    }

    /// Waits (at most `timeout`) for at least one used element; returns
    /// what [`VhostUserBlk::poll_used`] would (maybe nothing).
    pub fn wait_used(&mut self, queue: u16, timeout: Duration) -> Result<Vec<Completion>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.poll_used(queue)?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            self.sleep_for_call(queue, deadline)?;
        }
    }

    /// Waits (at most `timeout`) for the completion of `token`; other
    /// completions seen meanwhile stay for later calls.
    pub fn wait(
        &mut self,
        queue: u16,
        token: Token,
        timeout: Duration,
    ) -> Result<Completion, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let q = self
                    .queues
                    .get_mut(queue as usize)
                    .ok_or(Error::NoSuchQueue(queue))?;
                q.clear_call();
                q.collect(&mut self.ram)?;
                if let Some(c) = q.take(token) {
                    return Ok(c);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("the completion of {token:?} on queue {queue}"),
                    timeout,
                });
            }
            self.sleep_for_call(queue, deadline)?;
        }
    }

    /// Sleeps until the queue's call eventfd fires, 20 ms pass or the
    /// deadline comes.
    fn sleep_for_call(&self, queue: u16, deadline: Instant) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(20) as u16;
        let mut fds = [PollFd::new(q.call.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(io::Error::from(e).into()),
        }
    }

    /// Submits and waits ([`Options::timeout`]) for the completion.
    pub fn run(&mut self, queue: u16, spec: &RequestSpec) -> Result<Completion, Error> {
        let t = self.submit(queue, spec)?;
        self.wait(queue, t, self.opts.timeout)
    }

    /// Submits a chain and waits ([`Options::timeout`]) for its completion.
    pub fn run_chain(&mut self, queue: u16, chain: &Chain) -> Result<Completion, Error> {
        let t = self.submit_chain(queue, chain)?;
        self.wait(queue, t, self.opts.timeout)
    }

    fn run_ok(&mut self, queue: u16, spec: &RequestSpec) -> Result<Completion, Error> {
        let c = self.run(queue, spec)?;
        match c.status {
            Some(S_OK) => Ok(c),
            Some(s) => Err(Error::Status(s)),
            None => Err(Error::Status(crate::request::STATUS_UNTOUCHED)),
        }
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, queue: u16, sector: u64, len: u32) -> Result<Vec<u8>, Error> {
        Ok(self.run_ok(queue, &RequestSpec::read(sector, len))?.data)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, queue: u16, sector: u64, data: &[u8]) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::write(sector, data))
            .map(|_| ())
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self, queue: u16) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::flush()).map(|_| ())
    }

    /// Discards `num` sectors from `sector`.
    pub fn discard(&mut self, queue: u16, sector: u64, num: u32) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::discard(sector, num))
            .map(|_| ())
    }

    /// Zeroes `num` sectors from `sector`; `unmap` lets the device
    /// deallocate them.
    pub fn write_zeroes(
        &mut self,
        queue: u16,
        sector: u64,
        num: u32,
        unmap: bool,
    ) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::write_zeroes(sector, num, unmap))
            .map(|_| ())
    }

    /// The device's 20-byte serial (GET_ID).
    pub fn get_id(&mut self, queue: u16) -> Result<[u8; ID_BYTES], Error> {
        let c = self.run_ok(queue, &RequestSpec::get_id())?;
        let mut id = [0u8; ID_BYTES];
        let n = c.data.len().min(ID_BYTES);
        id[..n].copy_from_slice(&c.data[..n]);
        Ok(id)
    }

    // ----- zoned devices -----

    fn need_zoned(&self) -> Result<(), Error> {
        if self.has_feature(VIRTIO_BLK_F_ZONED) {
            Ok(())
        } else {
            Err(Error::Unsupported("VIRTIO_BLK_F_ZONED"))
        }
    }

    /// Reports at most `max_zones` (at least 1) zones from the one holding
    /// `sector`: one ZONE_REPORT request with room for that many
    /// descriptors; the device may return fewer (the last zones).
    /// Sectors are 512 bytes. Needs ZONED negotiated
    /// ([`Error::Unsupported`] otherwise); a refusal is
    /// [`Error::Status`].
    pub fn zone_report(
        &mut self,
        queue: u16,
        sector: u64,
        max_zones: u32,
    ) -> Result<Vec<ZoneDescriptor>, Error> {
        self.need_zoned()?;
        if max_zones == 0 {
            return Err(Error::Invalid("a zone report needs room for a zone".into()));
        }
        let c = self.run_ok(queue, &RequestSpec::zone_report(sector, max_zones))?;
        // Only what the device says it wrote (used_len includes the status).
        let n = (c.used_len as usize).saturating_sub(1).min(c.data.len());
        zone::parse_report(&c.data[..n])
    }

    fn zone_mgmt(&mut self, queue: u16, req_type: u32, sector: u64) -> Result<(), Error> {
        self.need_zoned()?;
        self.run_ok(queue, &RequestSpec::zone_mgmt(req_type, sector))
            .map(|_| ())
    }

    /// Opens the zone starting at `sector` explicitly (ZONE_OPEN).
    pub fn zone_open(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_OPEN, sector)
    }

    /// Closes the zone starting at `sector` (ZONE_CLOSE).
    pub fn zone_close(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_CLOSE, sector)
    }

    /// Makes the zone starting at `sector` full (ZONE_FINISH).
    pub fn zone_finish(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_FINISH, sector)
    }

    /// Empties the zone starting at `sector` (ZONE_RESET).
    pub fn zone_reset(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_RESET, sector)
    }

    /// Empties every sequential zone (ZONE_RESET_ALL).
    pub fn zone_reset_all(&mut self, queue: u16) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_RESET_ALL, 0)
    }

    /// Appends `data` to the zone starting at `sector` (ZONE_APPEND) and
    /// returns the sector where the device put it.
    pub fn zone_append(&mut self, queue: u16, sector: u64, data: &[u8]) -> Result<u64, Error> {
        self.need_zoned()?;
        let c = self.run_ok(queue, &RequestSpec::zone_append(sector, data))?;
        zone::parse_append_sector(&c.data)
    }

    /// Chains in flight on `queue` (made available, not yet used).
    pub fn in_flight(&self, queue: u16) -> usize {
        self.queues
            .get(queue as usize)
            .map_or(0, SplitQueue::in_flight)
    }

    // ----- raw ring access (hostile tests) -----

    /// Where `queue`'s rings lie in guest memory.
    pub fn ring_layout(&self, queue: u16) -> Result<RingLayout, Error> {
        Ok(self.queue_ref(queue)?.layout)
    }

    /// Takes `n` descriptor indices off the free list, for chains written
    /// by hand with [`VhostUserBlk::write_desc`]. Test-only.
    pub fn alloc_descs(&mut self, queue: u16, n: usize) -> Result<Vec<u16>, Error> {
        self.queue(queue)?.alloc_descs(n)
    }

    /// Returns descriptor indices to the free list. Test-only.
    pub fn free_descs(&mut self, queue: u16, descs: &[u16]) -> Result<(), Error> {
        self.queue(queue)?.free_descs(descs);
        Ok(())
    }

    /// Writes `d` into slot `index` (< queue size) of the descriptor table,
    /// as is. Test-only.
    pub fn write_desc(&mut self, queue: u16, index: u16, d: Descriptor) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        if index >= q.layout.size {
            return Err(Error::Invalid(format!(
                "descriptor {index} is outside the table of {}",
                q.layout.size
            )));
        }
        q.write_desc(&self.ram, index, &d)
    }

    /// Reads slot `index` of the descriptor table.
    pub fn read_desc(&self, queue: u16, index: u16) -> Result<Descriptor, Error> {
        self.queue_ref(queue)?.read_desc(&self.ram, index)
    }

    /// Makes `head` (any value, in range or not) available and kicks.
    /// When `head` is in range and not in flight, it is tracked under the
    /// returned token and `status` (a guest address) is read back on
    /// completion. Test-only.
    pub fn publish_head(
        &mut self,
        queue: u16,
        head: u16,
        status: Option<u64>,
    ) -> Result<Token, Error> {
        let token = self.token();
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.track_raw(head, token, status);
        q.publish(&self.ram, head)?;
        q.kick()?;
        Ok(token)
    }

    /// Puts `head` (any value) in the next avail slot without publishing
    /// the avail index: several heads pushed this way reach the device at
    /// once with [`VhostUserBlk::restore_avail_idx`]. Tracking as for
    /// [`VhostUserBlk::publish_head`]. Test-only.
    pub fn push_avail(
        &mut self,
        queue: u16,
        head: u16,
        status: Option<u64>,
    ) -> Result<Token, Error> {
        let token = self.token();
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.track_raw(head, token, status);
        q.push(&self.ram, head)?;
        Ok(token)
    }

    /// The avail index the driver will publish next (its shadow).
    pub fn avail_idx(&self, queue: u16) -> Result<u16, Error> {
        Ok(self.queue_ref(queue)?.avail_idx)
    }

    /// Writes `idx` into the avail ring's index field (the shadow stays)
    /// and kicks. Test-only: see [`VhostUserBlk::restore_avail_idx`].
    pub fn set_avail_idx(&mut self, queue: u16, idx: u16) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        q.store_avail_idx(&self.ram, idx)?;
        q.kick()
    }

    /// Writes the driver's shadow avail index into the avail ring (undoing
    /// [`VhostUserBlk::set_avail_idx`], publishing
    /// [`VhostUserBlk::push_avail`]) and kicks.
    pub fn restore_avail_idx(&mut self, queue: u16) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        q.store_avail_idx(&self.ram, q.avail_idx)?;
        q.kick()
    }

    /// The used index as the device last wrote it.
    pub fn used_idx(&self, queue: u16) -> Result<u16, Error> {
        self.queue_ref(queue)?.used_idx(&self.ram)
    }

    /// Kicks `queue`.
    pub fn kick(&self, queue: u16) -> Result<(), Error> {
        self.queue_ref(queue)?.kick()
    }

    /// Allocates `len` bytes of guest RAM (zeroed contents not promised).
    pub fn alloc(&mut self, len: u64) -> Result<u64, Error> {
        self.ram.alloc(len)
    }

    /// Allocates a buffer holding `data`.
    pub fn alloc_with(&mut self, data: &[u8]) -> Result<u64, Error> {
        self.ram.alloc_with(data)
    }

    /// Frees a buffer from [`VhostUserBlk::alloc`].
    pub fn free(&mut self, addr: u64) -> bool {
        self.ram.alloc.free(addr)
    }

    /// Allocates a table holding `descs` (for indirect descriptors) and
    /// returns its guest address.
    pub fn alloc_table(&mut self, descs: &[Descriptor]) -> Result<u64, Error> {
        self.ram.alloc_with(&Descriptor::table_bytes(descs))
    }

    /// Writes guest RAM.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.ram.ram.write(addr, data)
    }

    /// Reads guest RAM.
    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>, Error> {
        self.ram.ram.read(addr, len)
    }

    /// Guest RAM.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram.ram
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.ram.ram.size()
    }

    /// The VMM virtual address of guest address `gpa`, as vring addresses
    /// are given.
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.ram.ram.user_addr(gpa)
    }

    /// Guest RAM as SET_MEM_TABLE described it (one region, the memfd).
    pub fn mem_region(&self) -> MemRegion {
        MemRegion {
            gpa: 0,
            size: self.ram.ram.size(),
            user_addr: self.ram.ram.user_addr(0),
            mmap_offset: 0,
        }
    }

    // ----- raw vhost-user access (hostile tests) -----

    /// The vhost crate's front-end on the open connection, for messages
    /// the driver does not send itself. Test-only.
    pub fn frontend(&mut self) -> Result<&mut Frontend, Error> {
        Ok(&mut self.conn()?.frontend)
    }

    /// The connection's socket.
    pub fn socket(&self) -> Result<&UnixStream, Error> {
        self.conn
            .as_ref()
            .map(|c| &c.sock)
            .ok_or(Error::NotConnected)
    }

    /// Sends `msg` as is. Test-only.
    pub fn send_raw(&mut self, msg: &RawMessage) -> Result<(), Error> {
        raw::send(self.socket()?, msg)?;
        Ok(())
    }

    /// Sends arbitrary bytes (with `fds`) on the connection. Test-only.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        raw::send_bytes(self.socket()?, bytes, &fds)?;
        Ok(())
    }

    /// Closes our sending side (the device sees end of stream after what
    /// was sent: a truncated message stays truncated).
    pub fn shutdown_write(&mut self) -> Result<(), Error> {
        self.socket()?.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    }

    /// Reads one message from the device (`Ok(None)` on timeout).
    pub fn recv_raw(&mut self, timeout: Duration) -> Result<Option<RawReply>, Error> {
        raw::recv(self.socket()?, timeout).map_err(|_| Error::Closed)
    }

    /// Waits (at most `timeout`) for the device to close the connection.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        match self.socket() {
            Ok(s) => raw::wait_closed(s, timeout),
            Err(_) => true,
        }
    }

    /// Sends `msg` and reports how the device took it: the reply (a
    /// REPLY_ACK when the message asks for one and REPLY_ACK was
    /// negotiated, or a GET_* answer) and whether the device then closed
    /// the connection (see [`raw::request`]). Test-only.
    pub fn raw_request(&mut self, msg: &RawMessage) -> Result<RawOutcome, Error> {
        let reply_ack = self
            .protocol_features()
            .contains(ProtocolFeatures::REPLY_ACK);
        Ok(raw::request(
            self.socket()?,
            msg,
            reply_ack,
            self.opts.timeout,
        )?)
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
