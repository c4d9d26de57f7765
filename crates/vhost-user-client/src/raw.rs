//! Raw vhost-user messages, built byte by byte, for hostile-input tests.
//!
//! A message is a 12-byte header (`request u32, flags u32, size u32`),
//! `size` bytes of payload and, in the same `sendmsg`, any file
//! descriptors. [`RawMessage`] lets every field lie: the header's size may
//! differ from the payload actually sent, regions may overlap, indices may
//! be out of range. Nothing here checks anything.

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// Front-end request codes (vhost-user spec, "Front-end message types").
pub mod req {
    #![allow(missing_docs)]
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Header flag: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flag: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the front-end wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Bytes of a message header.
pub const HEADER_SIZE: usize = 12;
/// Bit 8 of a SET_VRING_KICK/CALL/ERR payload: no fd attached.
pub const VRING_NOFD_MASK: u64 = 0x100;

/// One memory region as SET_MEM_TABLE / ADD_MEM_REG describe it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The VMM's virtual address of the region (what vring addresses use).
    pub user_addr: u64,
    /// Offset of the region in its fd.
    pub mmap_offset: u64,
}

impl MemRegion {
    /// The 32 bytes of the region in a message.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.user_addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b
    }
}

/// A vhost-user message with every field under the caller's control.
#[derive(Debug)]
pub struct RawMessage {
    /// Request code (see [`req`]; anything goes).
    pub request: u32,
    /// Header flags ([`FLAG_VERSION`] | [`FLAG_NEED_REPLY`] by default).
    pub flags: u32,
    /// The header's size field; `None` sends the payload's length.
    pub size: Option<u32>,
    /// The bytes after the header, sent as they are.
    pub payload: Vec<u8>,
    /// File descriptors sent with the message (duplicates, owned here).
    pub fds: Vec<OwnedFd>,
}

impl RawMessage {
    /// A message with `request`, no payload, flags VERSION | NEED_REPLY.
    pub fn new(request: u32) -> RawMessage {
        RawMessage {
            request,
            flags: FLAG_VERSION | FLAG_NEED_REPLY,
            size: None,
            payload: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Sets the payload.
    pub fn payload(mut self, bytes: &[u8]) -> RawMessage {
        self.payload = bytes.to_vec();
        self
    }

    /// Sets the header flags.
    pub fn flags(mut self, flags: u32) -> RawMessage {
        self.flags = flags;
        self
    }

    /// Makes the header claim `size` payload bytes, whatever is sent.
    pub fn claim_size(mut self, size: u32) -> RawMessage {
        self.size = Some(size);
        self
    }

    /// Attaches a duplicate of `fd`.
    pub fn fd(mut self, fd: impl AsFd) -> io::Result<RawMessage> {
        self.fds.push(fd.as_fd().try_clone_to_owned()?);
        Ok(self)
    }

    /// A message with one `u64` payload (SET_FEATURES, SET_PROTOCOL_FEATURES...).
    pub fn u64(request: u32, value: u64) -> RawMessage {
        RawMessage::new(request).payload(&value.to_le_bytes())
    }

    /// A vring-state message (`index u32, num u32`): SET_VRING_NUM,
    /// SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE.
    pub fn vring_state(request: u32, index: u32, num: u32) -> RawMessage {
        let mut p = [0u8; 8];
        p[0..4].copy_from_slice(&index.to_le_bytes());
        p[4..8].copy_from_slice(&num.to_le_bytes());
        RawMessage::new(request).payload(&p)
    }

    /// SET_VRING_ADDR (`index, flags, desc, used, avail, log`; addresses
    /// are VMM virtual addresses).
    pub fn vring_addr(
        index: u32,
        flags: u32,
        desc: u64,
        used: u64,
        avail: u64,
        log: u64,
    ) -> RawMessage {
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        for v in [desc, used, avail, log] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        RawMessage::new(req::SET_VRING_ADDR).payload(&p)
    }

    /// SET_VRING_KICK / CALL / ERR: `value` is the payload (index in bits
    /// 0-7, [`VRING_NOFD_MASK`] for no fd), `fd` attached if given.
    pub fn vring_fd(request: u32, value: u64, fd: Option<&dyn AsFd>) -> io::Result<RawMessage> {
        let m = RawMessage::u64(request, value);
        match fd {
            Some(f) => m.fd(f.as_fd()),
            None => Ok(m),
        }
    }

    /// SET_MEM_TABLE with `regions` (the count field says `regions.len()`)
    /// and `fds` attached, however many.
    pub fn mem_table(regions: &[MemRegion], fds: &[&dyn AsFd]) -> io::Result<RawMessage> {
        Self::mem_table_counted(regions.len() as u32, regions, fds)
    }

    /// SET_MEM_TABLE whose count field says `count`, whatever follows.
    pub fn mem_table_counted(
        count: u32,
        regions: &[MemRegion],
        fds: &[&dyn AsFd],
    ) -> io::Result<RawMessage> {
        let mut p = Vec::with_capacity(8 + 32 * regions.len());
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            p.extend_from_slice(&r.to_bytes());
        }
        let mut m = RawMessage::new(req::SET_MEM_TABLE).payload(&p);
        for f in fds {
            m = m.fd(f.as_fd())?;
        }
        Ok(m)
    }

    /// ADD_MEM_REG or REM_MEM_REG (`padding u64`, one region), with `fd`
    /// attached if given.
    pub fn mem_region(
        request: u32,
        region: &MemRegion,
        fd: Option<&dyn AsFd>,
    ) -> io::Result<RawMessage> {
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&region.to_bytes());
        let m = RawMessage::new(request).payload(&p);
        match fd {
            Some(f) => m.fd(f.as_fd()),
            None => Ok(m),
        }
    }

    /// GET_CONFIG / SET_CONFIG (`offset, size, flags`, then `data`).
    pub fn config(request: u32, offset: u32, size: u32, data: &[u8]) -> RawMessage {
        let mut p = Vec::with_capacity(12 + data.len());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(data);
        RawMessage::new(request).payload(&p)
    }

    /// Header and payload bytes as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let size = self.size.unwrap_or(self.payload.len() as u32);
        let mut b = Vec::with_capacity(HEADER_SIZE + self.payload.len());
        b.extend_from_slice(&self.request.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&self.payload);
        b
    }
}

/// A message the device sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawReply {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl RawReply {
    /// The payload as a `u64` (a REPLY_ACK: 0 is success), if 8 bytes long.
    pub fn ack(&self) -> Option<u64> {
        let b: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// How the device took a raw message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOutcome {
    /// The reply (a REPLY_ACK, or a GET_* answer), if one came.
    pub reply: Option<RawReply>,
    /// `reply` is a REPLY_ACK (the message asked for one and REPLY_ACK was
    /// negotiated), not an answer.
    pub is_ack: bool,
    /// The device closed the connection.
    pub closed: bool,
}

impl RawOutcome {
    /// The device refused the message: a non-zero REPLY_ACK, or it closed
    /// the connection.
    pub fn refused(&self) -> bool {
        self.closed || self.nacked()
    }

    /// The REPLY_ACK was non-zero.
    pub fn nacked(&self) -> bool {
        self.is_ack
            && self
                .reply
                .as_ref()
                .and_then(RawReply::ack)
                .is_some_and(|v| v != 0)
    }
}

/// Sends `bytes` with `fds` in one `sendmsg`.
pub fn send_bytes(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let n = sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if n != bytes.len() {
        // A stream socket may take part of a large message; send the rest
        // without the fds.
        let mut rest = &bytes[n..];
        while !rest.is_empty() {
            let iov = [IoSlice::new(rest)];
            let m = sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)?;
            rest = &rest[m..];
        }
    }
    Ok(())
}

/// Sends `msg`.
pub fn send(sock: &UnixStream, msg: &RawMessage) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    send_bytes(sock, &msg.to_bytes(), &fds)
}

/// What waiting for bytes found.
enum Ready {
    Data,
    Closed,
    Timeout,
}

fn wait_readable(sock: &UnixStream, deadline: Instant) -> Ready {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(u16::MAX as u128) as u16;
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ready::Timeout,
            Ok(_) => {
                let r = fds[0].revents().unwrap_or(PollFlags::empty());
                if r.contains(PollFlags::POLLIN) {
                    return Ready::Data;
                }
                if r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                    return Ready::Closed;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Ready::Closed,
        }
        if Instant::now() >= deadline {
            return Ready::Timeout;
        }
    }
}

fn read_exact_until(sock: &UnixStream, buf: &mut [u8], deadline: Instant) -> Result<(), Ready> {
    let mut at = 0;
    while at < buf.len() {
        match wait_readable(sock, deadline) {
            Ready::Data => {}
            other => return Err(other),
        }
        match (&*sock).read(&mut buf[at..]) {
            Ok(0) => return Err(Ready::Closed),
            Ok(n) => at += n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Ready::Closed),
        }
    }
    Ok(())
}

/// The peer closed the connection (or it broke, or sent a message
/// that cannot be one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionClosed;

impl std::fmt::Display for ConnectionClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the vhost-user connection is closed")
    }
}

impl std::error::Error for ConnectionClosed {}

/// Reads one message (header and payload). `Ok(None)` on timeout.
pub fn recv(sock: &UnixStream, timeout: Duration) -> Result<Option<RawReply>, ConnectionClosed> {
    let deadline = Instant::now() + timeout;
    let mut h = [0u8; HEADER_SIZE];
    match read_exact_until(sock, &mut h, deadline) {
        Ok(()) => {}
        Err(Ready::Timeout) => return Ok(None),
        Err(_) => return Err(ConnectionClosed),
    }
    let field = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let size = field(8) as usize;
    if size > 0x1000 {
        return Err(ConnectionClosed);
    }
    let mut payload = vec![0u8; size];
    // A header without its payload is a broken connection too.
    if read_exact_until(sock, &mut payload, deadline).is_err() {
        return Err(ConnectionClosed);
    }
    Ok(Some(RawReply {
        request: field(0),
        flags: field(4),
        payload,
    }))
}

/// Waits until the peer closes the connection; true if it did within
/// `timeout`. Bytes that arrive meanwhile are discarded.
pub fn wait_closed(sock: &UnixStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        match wait_readable(sock, deadline) {
            Ready::Closed => return true,
            Ready::Timeout => return false,
            Ready::Data => match (&*sock).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            },
        }
    }
}

/// Request codes the device answers with a message of its own.
fn has_reply(request: u32) -> bool {
    matches!(
        request,
        req::GET_FEATURES
            | req::GET_PROTOCOL_FEATURES
            | req::GET_VRING_BASE
            | req::GET_QUEUE_NUM
            | req::GET_CONFIG
            | req::GET_INFLIGHT_FD
            | req::GET_MAX_MEM_SLOTS
    )
}

/// Sends `msg` on `sock` and reports how the device took it. A reply is
/// awaited (up to `timeout`) when the request has one, or when it asks for
/// a REPLY_ACK and `reply_ack` (negotiated) is set. Then the device gets
/// `timeout` to close the connection after a refusal, 200 ms when no reply
/// came; after an accepted message only a close already seen counts.
pub fn request(
    sock: &UnixStream,
    msg: &RawMessage,
    reply_ack: bool,
    timeout: Duration,
) -> io::Result<RawOutcome> {
    let answers = has_reply(msg.request);
    let is_ack = !answers && reply_ack && msg.flags & FLAG_NEED_REPLY != 0;
    if let Err(e) = send(sock, msg) {
        // The device may have closed already.
        if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Ok(RawOutcome {
                reply: None,
                is_ack,
                closed: true,
            });
        }
        return Err(e);
    }
    let mut out = RawOutcome {
        reply: None,
        is_ack,
        closed: false,
    };
    if answers || is_ack {
        match recv(sock, timeout) {
            Ok(r) => out.reply = r,
            Err(ConnectionClosed) => {
                out.closed = true;
                return Ok(out);
            }
        }
    }
    let grace = if out.nacked() {
        // A refusal: the device may close the connection now.
        timeout
    } else if out.reply.is_some() {
        // Accepted: only notice a close that already happened.
        Duration::ZERO
    } else {
        // No reply to go by.
        Duration::from_millis(200)
    };
    out.closed = wait_closed(sock, grace);
    Ok(out)
}

/// A bare vhost-user connection: nothing is sent unless asked, so a test
/// can damage the very first messages (a bad memory table before any
/// good one, vring messages before SET_MEM_TABLE...).
#[derive(Debug)]
pub struct RawConnection {
    sock: UnixStream,
    reply_ack: bool,
    timeout: Duration,
}

impl RawConnection {
    /// Connects (retrying while the socket refuses, up to `timeout`, the
    /// bound on every later wait too).
    pub fn connect(path: impl AsRef<std::path::Path>, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path.as_ref()) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        sock.set_write_timeout(Some(timeout))?;
        Ok(RawConnection {
            sock,
            reply_ack: false,
            timeout,
        })
    }

    /// GET_FEATURES, SET_FEATURES (everything offered),
    /// GET/SET_PROTOCOL_FEATURES (`protocol` & offered), SET_OWNER: what
    /// a VMM sends before the memory table. Returns the features and the
    /// protocol features acked. With REPLY_ACK in `protocol` and offered,
    /// later [`RawConnection::request`]s wait for acks.
    pub fn negotiate(&mut self, protocol: u64) -> io::Result<(u64, u64)> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let features = self
            .request(&RawMessage::new(req::GET_FEATURES).flags(FLAG_VERSION))?
            .reply
            .and_then(|r| r.ack())
            .ok_or_else(|| bad("no GET_FEATURES reply"))?;
        self.send(&RawMessage::u64(req::SET_FEATURES, features).flags(FLAG_VERSION))?;
        let mut acked_protocol = 0;
        if features & (1 << 30) != 0 {
            let offered = self
                .request(&RawMessage::new(req::GET_PROTOCOL_FEATURES).flags(FLAG_VERSION))?
                .reply
                .and_then(|r| r.ack())
                .ok_or_else(|| bad("no GET_PROTOCOL_FEATURES reply"))?;
            acked_protocol = offered & protocol;
            self.send(
                &RawMessage::u64(req::SET_PROTOCOL_FEATURES, acked_protocol).flags(FLAG_VERSION),
            )?;
            // REPLY_ACK is bit 3.
            self.reply_ack = acked_protocol & (1 << 3) != 0;
        }
        let owner = self.request(&RawMessage::new(req::SET_OWNER))?;
        if owner.refused() {
            return Err(bad("SET_OWNER refused"));
        }
        Ok((features, acked_protocol))
    }

    /// Sends `msg` and reports how the device took it (see [`request`]).
    pub fn request(&mut self, msg: &RawMessage) -> io::Result<RawOutcome> {
        request(&self.sock, msg, self.reply_ack, self.timeout)
    }

    /// Sends `msg` without waiting for anything.
    pub fn send(&mut self, msg: &RawMessage) -> io::Result<()> {
        send(&self.sock, msg)
    }

    /// Sends arbitrary bytes.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        send_bytes(&self.sock, bytes, fds)
    }

    /// Reads one message (`Ok(None)` on timeout).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<RawReply>, ConnectionClosed> {
        recv(&self.sock, timeout)
    }

    /// Waits for the device to close the connection.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        wait_closed(&self.sock, timeout)
    }

    /// Closes our sending side.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.sock.shutdown(std::net::Shutdown::Write)
    }

    /// The socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_carries_request_flags_and_payload_size() {
        let m = RawMessage::vring_state(req::SET_VRING_NUM, 3, 256);
        let b = m.to_bytes();
        assert_eq!(&b[0..4], &8u32.to_le_bytes());
        assert_eq!(&b[4..8], &(FLAG_VERSION | FLAG_NEED_REPLY).to_le_bytes());
        assert_eq!(&b[8..12], &8u32.to_le_bytes());
        assert_eq!(&b[12..16], &3u32.to_le_bytes());
        assert_eq!(&b[16..20], &256u32.to_le_bytes());
    }

    #[test]
    fn claimed_size_may_lie() {
        let b = RawMessage::u64(req::SET_FEATURES, 1)
            .claim_size(40)
            .to_bytes();
        assert_eq!(&b[8..12], &40u32.to_le_bytes());
        assert_eq!(b.len(), HEADER_SIZE + 8);
    }

    #[test]
    fn mem_table_payload_is_count_padding_regions() {
        let r = MemRegion {
            gpa: 0x1000,
            size: 0x2000,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        let m = RawMessage::mem_table_counted(5, &[r, r], &[]).unwrap();
        assert_eq!(m.payload.len(), 8 + 64);
        assert_eq!(&m.payload[0..4], &5u32.to_le_bytes());
        assert_eq!(&m.payload[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&m.payload[16..24], &0x2000u64.to_le_bytes());
        let add = RawMessage::mem_region(req::ADD_MEM_REG, &r, None).unwrap();
        assert_eq!(add.payload.len(), 40);
    }

    #[test]
    fn vring_addr_payload_order_is_desc_used_avail_log() {
        let m = RawMessage::vring_addr(1, 0, 10, 20, 30, 40);
        assert_eq!(m.payload.len(), 40);
        assert_eq!(&m.payload[8..16], &10u64.to_le_bytes());
        assert_eq!(&m.payload[16..24], &20u64.to_le_bytes());
        assert_eq!(&m.payload[24..32], &30u64.to_le_bytes());
    }

    #[test]
    fn outcome_refusal_is_nack_or_close() {
        let ack = |v: u64| RawReply {
            request: 8,
            flags: FLAG_VERSION | FLAG_REPLY,
            payload: v.to_le_bytes().to_vec(),
        };
        let ok = RawOutcome {
            reply: Some(ack(0)),
            is_ack: true,
            closed: false,
        };
        assert!(!ok.refused());
        assert!(RawOutcome {
            reply: Some(ack(1)),
            is_ack: true,
            closed: false
        }
        .refused());
        // An answer is not an ack, whatever its value.
        assert!(!RawOutcome {
            reply: Some(ack(1)),
            is_ack: false,
            closed: false
        }
        .refused());
        assert!(RawOutcome {
            reply: None,
            is_ack: false,
            closed: true
        }
        .refused());
    }

    #[test]
    fn send_and_receive_over_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send(&a, &RawMessage::u64(req::SET_FEATURES, 9).fd(&r).unwrap()).unwrap();
        let got = recv(&b, Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(got.request, req::SET_FEATURES);
        assert_eq!(got.ack(), Some(9));
        assert_eq!(recv(&b, Duration::from_millis(10)), Ok(None));
        drop(a);
        assert!(wait_closed(&b, Duration::from_secs(1)));
    }
}
