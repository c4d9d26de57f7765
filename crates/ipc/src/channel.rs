//! The frontend ↔ worker control channel.
//!
//! A `SOCK_SEQPACKET` unix socket: every message is one datagram holding one
//! protobuf message (`blkmesh.ipc.v1`), with the file descriptors that go with
//! it in `SCM_RIGHTS`. Message boundaries and fds therefore travel together,
//! and a truncated datagram or descriptor list is detected and refused.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use thiserror::Error;

/// Largest encoded message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds in one message (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("socket {op}")]
    Socket {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("peer closed the channel")]
    Closed,
    #[error("message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("{0} fds exceed {MAX_FDS}")]
    TooManyFds(usize),
    #[error("message or its fds were truncated")]
    Truncated,
    #[error("undecodable message")]
    Decode(#[from] prost::DecodeError),
    #[error("timed out waiting for the peer")]
    Timeout,
}

fn sock_err(op: &'static str) -> impl FnOnce(nix::Error) -> ChannelError {
    move |source| match source {
        nix::Error::EAGAIN => ChannelError::Timeout,
        nix::Error::ECONNRESET | nix::Error::EPIPE => ChannelError::Closed,
        source => ChannelError::Socket { op, source },
    }
}

/// One connected end.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
}

impl Channel {
    /// Connects to a listening worker.
    pub fn connect(path: &Path) -> Result<Channel, ChannelError> {
        let sock = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(sock_err("create"))?;
        let addr = UnixAddr::new(path).map_err(sock_err("address"))?;
        socket::connect(sock.as_raw_fd(), &addr).map_err(sock_err("connect"))?;
        Ok(Channel { sock })
    }

    /// A connected pair, for tests.
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sock_err("socketpair"))?;
        Ok((Channel { sock: a }, Channel { sock: b }))
    }

    /// Bounds every later receive (None = wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ChannelError> {
        let tv = nix::sys::time::TimeVal::new(
            t.map_or(0, |t| t.as_secs() as i64),
            t.map_or(0, |t| t.subsec_micros() as i64),
        );
        socket::setsockopt(&self.sock, sockopt::ReceiveTimeout, &tv).map_err(sock_err("timeout"))
    }

    /// Sends one message with its fds.
    pub fn send<M: prost::Message>(
        &self,
        msg: &M,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        let buf = msg.encode_to_vec();
        if buf.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(buf.len()));
        }
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds(fds.len()));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        // An empty protobuf encodes to zero bytes, and a zero-length datagram
        // reads like EOF, so every frame starts with a version byte.
        let frame = [&[1u8][..], &buf[..]];
        let iov = [IoSlice::new(frame[0]), IoSlice::new(frame[1])];
        socket::sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(sock_err("send"))?;
        Ok(())
    }

    /// Receives one message and the fds that came with it.
    pub fn recv<M: prost::Message + Default>(&self) -> Result<(M, Vec<File>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let (bytes, flags, fds) = recv_with_fds(self.sock.as_fd(), &mut buf, MsgFlags::empty())
            .map_err(sock_err("recv"))?;
        if bytes == 0 {
            return Err(ChannelError::Closed);
        }
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(ChannelError::Truncated);
        }
        if buf[0] != 1 {
            return Err(ChannelError::Truncated);
        }
        let msg = M::decode(&buf[1..bytes])?;
        Ok((msg, fds))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// A listening socket for workers.
#[derive(Debug)]
pub struct ChannelListener {
    sock: OwnedFd,
}

impl ChannelListener {
    /// Wraps a bound, listening `SOCK_SEQPACKET` unix socket. Create it with
    /// `blkmesh_sandbox::SocketPolicy::listen_unix`, which gives the socket
    /// file its final mode before its path exists (a bind followed by a
    /// chmod leaves a window in which anyone may connect).
    pub fn from_listening(sock: OwnedFd) -> ChannelListener {
        ChannelListener { sock }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Channel, ChannelError> {
        let fd = socket::accept4(self.sock.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(sock_err("accept"))?;
        // SAFETY: accept4 returned a new fd that we now own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Channel { sock })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Receives into `buf` from a unix socket, taking ownership of up to
/// [`MAX_FDS`] descriptors passed with `SCM_RIGHTS` (close-on-exec).
/// `flags` are extra recvmsg flags. Returns the byte count, the message
/// flags (check `MSG_TRUNC`/`MSG_CTRUNC`) and the descriptors.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> nix::Result<(usize, MsgFlags, Vec<File>)> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            for fd in v {
                // SAFETY: the kernel just installed this fd for us in
                // SCM_RIGHTS; nothing else owns it.
                fds.push(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Ok((msg.bytes, msg.flags, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::ipc::v1 as ipc;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn message_and_fds_travel_together() {
        let (a, b) = Channel::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abc").unwrap();
        let req = ipc::Request {
            msg: Some(ipc::request::Msg::DetachQueue(ipc::DetachQueue {
                queue: 3,
            })),
            id: 7,
        };
        a.send(&req, &[f.as_fd()]).unwrap();
        let (got, mut fds): (ipc::Request, _) = b.recv().unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 1);
        let mut s = String::new();
        fds[0].seek(SeekFrom::Start(0)).unwrap();
        fds[0].read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
    }

    #[test]
    fn empty_message_is_not_mistaken_for_eof() {
        let (a, b) = Channel::pair().unwrap();
        a.send(&ipc::Ok {}, &[]).unwrap();
        let (_, fds): (ipc::Ok, _) = b.recv().unwrap();
        assert!(fds.is_empty());
        drop(a);
        assert!(matches!(b.recv::<ipc::Ok>(), Err(ChannelError::Closed)));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let (a, b) = Channel::pair().unwrap();
        let junk = [1u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        socket::send(a.sock.as_raw_fd(), &junk, MsgFlags::empty()).unwrap();
        assert!(matches!(
            b.recv::<ipc::Request>(),
            Err(ChannelError::Decode(_))
        ));
    }

    #[test]
    fn receive_times_out() {
        let (_a, b) = Channel::pair().unwrap();
        b.set_timeout(Some(Duration::from_millis(50))).unwrap();
        assert!(matches!(b.recv::<ipc::Ok>(), Err(ChannelError::Timeout)));
    }
}
