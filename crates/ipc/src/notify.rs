//! Eventfds used as doorbells between the frontend and a worker.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::eventfd::{EfdFlags, EventFd};

/// A non-blocking eventfd.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> std::io::Result<Self> {
        let fd = OwnedFd::from(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        Ok(Doorbell { fd })
    }

    /// Adopts an eventfd received from a peer; refuses any other kind of fd
    /// and makes it non-blocking.
    pub fn from_peer(file: File) -> std::io::Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        if link.to_string_lossy() != "anon_inode:[eventfd]" {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an eventfd",
            ));
        }
        let owned = OwnedFd::from(file);
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&owned, FcntlArg::F_GETFL)?;
        fcntl(
            &owned,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )?;
        Ok(Doorbell { fd: owned })
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Doorbell {
            fd: self.fd.try_clone()?,
        })
    }

    /// Rings the bell.
    pub fn ring(&self) {
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears pending rings; false if there were none.
    pub fn clear(&self) -> bool {
        let mut buf = [0u8; 8];
        nix::unistd::read(&self.fd, &mut buf).is_ok()
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Doorbell {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_and_clears() {
        let d = Doorbell::new().unwrap();
        assert!(!d.clear());
        d.ring();
        d.ring();
        assert!(d.clear());
        assert!(!d.clear());
    }

    #[test]
    fn refuses_non_eventfd() {
        let f = tempfile::tempfile().unwrap();
        assert!(Doorbell::from_peer(f).is_err());
    }

    #[test]
    fn peer_copy_sees_rings() {
        let d = Doorbell::new().unwrap();
        let peer =
            Doorbell::from_peer(File::from(d.as_fd().try_clone_to_owned().unwrap())).unwrap();
        d.ring();
        assert!(peer.clear());
    }
}
