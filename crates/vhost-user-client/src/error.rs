//! What can go wrong talking to a vhost-user-blk device.

use std::time::Duration;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A vhost-user exchange through the vhost crate failed (a refusal
    /// with REPLY_ACK shows up here too).
    #[error("vhost-user: {0}")]
    Vhost(String),
    /// The device refused a message the driver sent itself.
    #[error("the device refused {0}")]
    Refused(String),
    /// The device closed the connection.
    #[error("the device closed the connection")]
    Closed,
    /// No connection is open.
    #[error("not connected")]
    NotConnected,
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A parameter makes no sense.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A queue index past the ones set up.
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// Not enough free descriptors.
    #[error("queue full: {wanted} descriptors wanted, {free} free")]
    QueueFull {
        /// Descriptors wanted.
        wanted: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The data area of guest RAM is exhausted.
    #[error("guest memory exhausted ({0} bytes wanted)")]
    OutOfGuestMemory(u64),
    /// The device did not answer in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// For how long.
        timeout: Duration,
    },
    /// A request completed with this status (not `VIRTIO_BLK_S_OK`;
    /// [`crate::STATUS_UNTOUCHED`] if the device did not write it): `S_IOERR`,
    /// `S_UNSUPP`, or for zoned devices one of the `S_ZONE_*` statuses
    /// (see [`crate::zone::status_name`]).
    #[error("request failed with status {0} ({name})", name = crate::status::status_name(*.0))]
    Status(u8),
    /// A feature this call needs was not negotiated.
    #[error("not negotiated: {0}")]
    Unsupported(&'static str),
}

impl Error {
    /// The status byte of a request that failed with one.
    pub fn status(&self) -> Option<u8> {
        match self {
            Error::Status(s) => Some(*s),
            _ => None,
        }
    }
}
