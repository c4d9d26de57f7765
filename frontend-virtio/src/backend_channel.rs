//! The vhost-user back-end request channel, on which blkmesh tells the VMM
//! that the config space changed (a resize), so the guest re-reads it.
//!
//! The VMM hands the channel over with SET_BACKEND_REQ_FD. The vhost crate
//! wraps it in a `Backend` that can send only the messages it knows, and
//! CONFIG_CHANGE_MSG is not among them; so the export's connection loop
//! takes SET_BACKEND_REQ_FD off the socket itself, before the crate's
//! handler reads the next message, and keeps the channel.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use blkmesh_ipc::channel::recv_with_fds;
use nix::sys::socket::{recv, MsgFlags};

/// Bytes of a vhost-user message header: request, flags, payload size.
const HEADER: usize = 12;
/// Front-end request that carries the channel's fd.
const SET_BACKEND_REQ_FD: u32 = 21;
/// Back-end request: the config space changed.
const CONFIG_CHANGE_MSG: u32 = 2;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

fn field(h: &[u8; HEADER], at: usize) -> u32 {
    u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

/// Waits for the VMM's next message. If it is SET_BACKEND_REQ_FD, takes it
/// off the socket, answers it (when asked to) and returns the channel;
/// otherwise leaves it for the vhost crate's handler and returns `None`.
/// A malformed SET_BACKEND_REQ_FD (a payload, no fd, or an fd that is not
/// a socket) is answered with a failure and dropped.
pub fn take(sock: &UnixStream) -> io::Result<Option<UnixStream>> {
    let mut h = [0u8; HEADER];
    let n = recv(
        sock.as_raw_fd(),
        &mut h,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_WAITALL,
    )
    .map_err(io::Error::from)?;
    if n < HEADER || field(&h, 0) != SET_BACKEND_REQ_FD {
        // End of stream or another request: the handler reports either.
        return Ok(None);
    }
    let (n, flags, mut fds) =
        recv_with_fds(sock.as_fd(), &mut h, MsgFlags::empty()).map_err(io::Error::from)?;
    let size = field(&h, 8);
    let channel = match fds.pop() {
        Some(f)
            if n == HEADER
                && size == 0
                && fds.is_empty()
                && !flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
                && f.metadata().is_ok_and(|m| m.file_type().is_socket()) =>
        {
            Some(UnixStream::from(std::os::fd::OwnedFd::from(f)))
        }
        _ => None,
    };
    if channel.is_none() {
        tracing::warn!(
            size,
            fds = fds.len() + 1,
            "malformed SET_BACKEND_REQ_FD refused"
        );
        if size != 0 {
            // The payload would otherwise be read as the next header.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "SET_BACKEND_REQ_FD with a payload",
            ));
        }
    }
    if field(&h, 4) & NEED_REPLY != 0 {
        let mut reply = [0u8; HEADER + 8];
        reply[..HEADER].copy_from_slice(&header(SET_BACKEND_REQ_FD, VERSION | REPLY, 8));
        reply[HEADER] = u8::from(channel.is_none());
        (&*sock).write_all(&reply)?;
    }
    if let Some(c) = &channel {
        c.set_write_timeout(Some(Duration::from_secs(1)))?;
    }
    Ok(channel)
}

/// Tells the VMM that the config space changed. No reply is asked for: the
/// VMM answers by reading the config space on the main socket, which the
/// caller may be about to serve.
pub fn notify_config_change(channel: &UnixStream) -> io::Result<()> {
    (&*channel).write_all(&header(CONFIG_CHANGE_MSG, VERSION, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    use nix::sys::socket::{sendmsg, ControlMessage};

    fn send(sock: &UnixStream, h: [u8; HEADER], fd: Option<&dyn AsRawFd>) {
        let iov = [std::io::IoSlice::new(&h)];
        let raw: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg: Vec<ControlMessage> = if raw.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    }

    #[test]
    fn takes_the_channel_and_acks() {
        let (vmm, dev) = UnixStream::pair().unwrap();
        let (chan_vmm, chan_dev) = UnixStream::pair().unwrap();
        send(
            &vmm,
            header(SET_BACKEND_REQ_FD, VERSION | NEED_REPLY, 0),
            Some(&chan_dev),
        );
        let chan = take(&dev).unwrap().expect("channel");
        let mut reply = [0u8; HEADER + 8];
        (&vmm).read_exact(&mut reply).unwrap();
        assert_eq!(
            reply[..HEADER],
            header(SET_BACKEND_REQ_FD, VERSION | REPLY, 8)
        );
        assert_eq!(reply[HEADER..], [0u8; 8]);
        notify_config_change(&chan).unwrap();
        let mut got = [0u8; HEADER];
        (&chan_vmm).read_exact(&mut got).unwrap();
        assert_eq!(got, header(CONFIG_CHANGE_MSG, VERSION, 0));
    }

    #[test]
    fn leaves_other_messages_in_place() {
        let (vmm, dev) = UnixStream::pair().unwrap();
        send(&vmm, header(1, VERSION, 0), None);
        assert!(take(&dev).unwrap().is_none());
        let mut h = [0u8; HEADER];
        (&dev).read_exact(&mut h).unwrap();
        assert_eq!(h, header(1, VERSION, 0));
    }

    #[test]
    fn refuses_a_channel_without_fd() {
        let (vmm, dev) = UnixStream::pair().unwrap();
        send(
            &vmm,
            header(SET_BACKEND_REQ_FD, VERSION | NEED_REPLY, 0),
            None,
        );
        assert!(take(&dev).unwrap().is_none());
        let mut reply = [0u8; HEADER + 8];
        (&vmm).read_exact(&mut reply).unwrap();
        assert_eq!(reply[HEADER], 1);
    }

    #[test]
    fn refuses_a_channel_that_is_not_a_socket() {
        let (vmm, dev) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(
            &vmm,
            header(SET_BACKEND_REQ_FD, VERSION | NEED_REPLY, 0),
            Some(&file),
        );
        assert!(take(&dev).unwrap().is_none());
        let mut reply = [0u8; HEADER + 8];
        (&vmm).read_exact(&mut reply).unwrap();
        assert_eq!(reply[HEADER], 1);
    }

    #[test]
    fn a_payload_closes_the_connection() {
        let (vmm, dev) = UnixStream::pair().unwrap();
        let (_c, chan_dev) = UnixStream::pair().unwrap();
        send(
            &vmm,
            header(SET_BACKEND_REQ_FD, VERSION, 8),
            Some(&chan_dev),
        );
        assert!(take(&dev).is_err());
    }
}
