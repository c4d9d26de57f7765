//! [`GuestError`]: why a guest could not be prepared, started or finished.

use std::io;
use std::time::Duration;

/// Why a guest could not be prepared, started or finished.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A tool or file the guest needs is not installed.
    #[error("real-guest test: {what} is missing; install it with: {install}")]
    Missing { what: String, install: String },
    #[error("real-guest test: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A helper command (cargo, dpkg-deb, busybox cpio) failed.
    #[error("real-guest test: {what} failed ({status}):\n{output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
    /// No verdict line in time.
    #[error(
        "real-guest test: no verdict within {timeout:?}\n\
         --- guest console (last lines) ---\n{console}\n--- qemu output ---\n{qemu}"
    )]
    Timeout {
        timeout: Duration,
        console: String,
        qemu: String,
    },
    /// QEMU exited before the guest printed its verdict.
    #[error(
        "real-guest test: qemu exited ({status}) without a verdict\n\
         --- guest console (last lines) ---\n{console}\n--- qemu output ---\n{qemu}"
    )]
    Exited {
        status: String,
        console: String,
        qemu: String,
    },
    /// The guest printed its verdict but QEMU did not exit.
    #[error("real-guest test: the guest did not power off within {0:?} of its verdict")]
    NoPowerOff(Duration),
    /// A QMP command failed.
    #[error("real-guest test: QMP {command}: {message}")]
    Qmp { command: String, message: String },
}

pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let context = context.into();
    move |source| GuestError::Io { context, source }
}
