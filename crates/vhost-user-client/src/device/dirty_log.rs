//! Dirty-page logging, as a migrating VMM drives it: share a log
//! (SET_LOG_BASE with a memfd, LOG_SHMFD), turn LOG_ALL on with
//! SET_FEATURES, read and clear the bitmap, turn it off.

use std::os::fd::AsRawFd;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

use super::{vhost_err, ProtocolFeatures, VhostUserBlk};
use crate::error::Error;

/// Bytes of guest memory per log bit.
pub const LOG_PAGE: u64 = 0x1000;

const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

impl VhostUserBlk {
    /// Shares a new dirty log covering all guest RAM (replacing the last
    /// one, if any) and turns LOG_ALL on. Needs LOG_SHMFD negotiated
    /// (`Options::protocol_features_wanted`).
    pub fn start_dirty_log(&mut self) -> Result<(), Error> {
        let size = (self.ram.ram.size() / LOG_PAGE).div_ceil(8).max(1);
        let file = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .create("blkmesh-dirty-log")
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
            .into_file();
        file.set_len(size)?;
        let conn = self.conn()?;
        if !conn.acked_protocol.contains(ProtocolFeatures::LOG_SHMFD) {
            return Err(Error::Invalid("LOG_SHMFD was not negotiated".into()));
        }
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        conn.frontend
            .set_log_base(0, Some(region))
            .map_err(vhost_err)?;
        let features = conn.acked | LOG_ALL;
        conn.frontend.set_features(features).map_err(vhost_err)?;
        conn.acked = features;
        self.dirty_log = Some(file);
        Ok(())
    }

    /// Turns LOG_ALL off (the log stays shared).
    pub fn stop_dirty_log(&mut self) -> Result<(), Error> {
        let conn = self.conn()?;
        let features = conn.acked & !LOG_ALL;
        conn.frontend.set_features(features).map_err(vhost_err)?;
        conn.acked = features;
        Ok(())
    }

    /// The guest pages (by number: address / [`LOG_PAGE`]) the log has
    /// marked; clears them, as a migration pass does.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<u64>, Error> {
        use std::os::unix::fs::FileExt;
        let file = self
            .dirty_log
            .as_ref()
            .ok_or_else(|| Error::Invalid("no dirty log shared".into()))?;
        let mut bits = vec![0u8; file.metadata()?.len() as usize];
        file.read_exact_at(&mut bits, 0)?;
        file.write_all_at(&vec![0u8; bits.len()], 0)?;
        Ok(bits
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                (0..8)
                    .filter(move |k| b & (1 << k) != 0)
                    .map(move |k| i as u64 * 8 + k)
            })
            .collect())
    }
}
