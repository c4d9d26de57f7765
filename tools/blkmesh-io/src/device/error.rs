//! What goes wrong opening a device, waiting on it, or carving buffers.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Errors from setting up or waiting on the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot create the {driver} driver")]
    Create {
        driver: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot set {name}={value}")]
    SetProperty {
        name: &'static str,
        value: String,
        #[source]
        source: blkio::Error,
    },
    #[error(
        "cannot connect to {} (a host-managed zoned export refuses libblkio's driver, \
         which does not accept VIRTIO_BLK_F_ZONED: use --driver native there)",
        path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot start the device")]
    Start(#[source] blkio::Error),
    #[error("cannot read property {name}")]
    GetProperty {
        name: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot allocate a {len}-byte buffer region")]
    AllocRegion {
        len: usize,
        #[source]
        source: blkio::Error,
    },
    #[error("cannot map the buffer region into the device")]
    MapRegion(#[source] blkio::Error),
    #[error("device started {got} queues, {want} requested")]
    QueueCount { got: usize, want: usize },
    #[error("no completion within {0:?}: device hung or disconnected")]
    Timeout(Duration),
    #[error("waiting for completions failed")]
    Wait(#[source] blkio::Error),
}

/// Errors from carving buffers out of a pool.
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("buffer pool exhausted: no free {need}-byte chunk ({free} bytes free in total)")]
    Exhausted { need: usize, free: usize },
    #[error("buffer size {0} overflows")]
    TooLarge(u64),
}
