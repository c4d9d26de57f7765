//! Errors as the worker hands them on: one errno type, one sign convention.
//!
//! An [`Errno`] is always positive, as libc names it. Where it leaves the
//! worker it changes form in one place each: on the completion ring a
//! failure is the negative errno ([`Errno::ring_result`], next to 0 for
//! success and the virtio zone statuses of `zoned`), on the control channel
//! it is the positive value ([`Errno::get`]).

use std::io;

/// A positive errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("errno {0}")]
pub struct Errno(i32);

impl Errno {
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const ECANCELED: Errno = Errno(libc::ECANCELED);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const ESTALE: Errno = Errno(libc::ESTALE);

    /// The errno `value` (either sign: a negative one is taken as the
    /// negated errno libblkio and the kernel return); `None` for 0 and for
    /// what no errno can be.
    pub const fn new(value: i32) -> Option<Errno> {
        match value.checked_abs() {
            Some(0) | None => None,
            Some(v) => Some(Errno(v)),
        }
    }

    /// The errno of an I/O error, EIO when it carries none.
    pub fn of_io(e: &io::Error) -> Errno {
        e.raw_os_error().and_then(Errno::new).unwrap_or(Errno::EIO)
    }

    /// The errno of a libblkio error.
    pub fn of_blkio(e: &blkio::Error) -> Errno {
        Errno::new(e.errno().raw_os_error()).unwrap_or(Errno::EIO)
    }

    /// The positive value (the control channel's form).
    pub const fn get(self) -> i32 {
        self.0
    }

    /// The completion ring's form: the negated errno.
    pub const fn ring_result(self) -> i32 {
        -self.0
    }
}

/// Why a graph could not be opened: an errno for the frontend plus a message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpenError {
    pub errno: Errno,
    pub message: String,
}

impl OpenError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        OpenError {
            errno,
            message: message.into(),
        }
    }

    pub fn inval(message: impl Into<String>) -> Self {
        OpenError::new(Errno::EINVAL, message)
    }

    pub fn blkio(node: &str, what: &str, e: blkio::Error) -> Self {
        OpenError::new(
            Errno::of_blkio(&e),
            format!("node {node}: {what}: {}", e.message()),
        )
    }

    /// The same error, its message prefixed with `context`.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        OpenError::new(self.errno, format!("{context}: {}", self.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_positive_whatever_sign_it_came_with() {
        assert_eq!(Errno::new(-libc::EIO), Some(Errno::EIO));
        assert_eq!(Errno::new(libc::EIO), Some(Errno::EIO));
        assert_eq!(Errno::new(0), None);
        assert_eq!(Errno::new(i32::MIN), None);
        assert_eq!(Errno::EIO.ring_result(), -libc::EIO);
        assert_eq!(Errno::EIO.get(), libc::EIO);
        assert_eq!(Errno::of_io(&io::Error::other("x")), Errno::EIO);
    }
}
