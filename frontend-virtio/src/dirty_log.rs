//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL` with the
//! `LOG_SHMFD` protocol feature).
//!
//! The VMM shares a bitmap (SET_LOG_BASE: a memfd, an offset and a size):
//! one bit per 4 KiB page of guest physical memory, bit `n % 8` of byte
//! `n / 8` for page `n`. While the driver has LOG_ALL acked, every guest
//! page the device writes is marked, with an atomic OR (the VMM clears
//! bits concurrently as it copies pages), *before* the used ring entry
//! that makes the write visible is published, so the last pass of a
//! migration, which runs once the rings are stopped, copies every page the
//! device touched. blkmesh's workers write read data into guest RAM
//! directly; the queue thread marks a request's device-writable buffers
//! when it completes it, which is after the worker's writes (see
//! `vring/guest.rs`).
//!
//! The log is reached through a [`LogSink`], shared by the connection's
//! handler and its queue threads: the handler replaces the map (a later
//! SET_LOG_BASE, while the guest runs) and switches marking on and off
//! (SET_FEATURES with or without LOG_ALL); the queues mark.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// Bytes of guest memory per bit (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

/// Largest log accepted: 1 GiB of bitmap covers 32 TiB of guest memory.
pub const MAX_LOG_SIZE: u64 = 1 << 30;

/// Why a log could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log size {0} is 0 or above {MAX_LOG_SIZE}")]
    Size(u64),
    #[error("mapping the log: {0}")]
    Map(String),
}

/// A mapped dirty log.
#[derive(Debug)]
pub struct DirtyLog {
    map: MmapRegion,
    len: usize,
    /// What was marked in it, for the record (see [`LogTally`]).
    tally: LogTally,
}

/// What one log was asked to mark and what it marked: guest bytes the
/// device wrote, the pages they span (a page counted once per write), and
/// the bits that were clear when set (the VMM clears bits as it copies
/// pages, so a page can be newly marked more than once).
#[derive(Debug, Default)]
pub struct LogTally {
    pub bytes: AtomicU64,
    pub page_marks: AtomicU64,
    pub newly_marked: AtomicU64,
}

impl DirtyLog {
    /// Maps `size` bytes of `file` at `offset`, shared with the VMM.
    pub fn map(file: File, offset: u64, size: u64) -> Result<DirtyLog, LogError> {
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(LogError::Size(size));
        }
        let len = size as usize;
        let map = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| LogError::Map(e.to_string()))?;
        Ok(DirtyLog {
            map,
            len,
            tally: LogTally::default(),
        })
    }

    /// What was marked so far.
    pub fn tally(&self) -> &LogTally {
        &self.tally
    }

    /// Guest bytes the log covers.
    pub fn covers(&self) -> u64 {
        self.len as u64 * 8 * LOG_PAGE
    }

    /// Marks the pages of `len` bytes at guest address `gpa`.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        // Pages past the log's end are not marked (the VMM sized it for its
        // memory); a map is never empty.
        let last = (gpa.saturating_add(len - 1) / LOG_PAGE).min(self.len as u64 * 8 - 1);
        if first > last {
            return;
        }
        self.tally.bytes.fetch_add(len, Ordering::Relaxed);
        self.tally
            .page_marks
            .fetch_add(last - first + 1, Ordering::Relaxed);
        let mut page = first;
        while page <= last {
            let byte = page / 8;
            if byte >= self.len as u64 {
                return;
            }
            // Bits of this byte from `page` up to `last`.
            let from = page % 8;
            let to = (last - page + from).min(7);
            let bits = ((0xffu16 << from) & (0xffu16 >> (7 - to))) as u8;
            if let Ok(b) = self.map.get_atomic_ref::<AtomicU8>(byte as usize) {
                let was = b.fetch_or(bits, Ordering::Release);
                let new = (bits & !was).count_ones();
                if new > 0 {
                    self.tally
                        .newly_marked
                        .fetch_add(u64::from(new), Ordering::Relaxed);
                }
            }
            page += to - from + 1;
        }
    }

    /// Whether the page holding `gpa` is marked (tests, and the VMM's view).
    pub fn is_marked(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        self.map
            .get_atomic_ref::<AtomicU8>((page / 8) as usize)
            .is_ok_and(|b| b.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }
}

/// A log goes when the VMM replaces it or the connection ends: what it
/// marked is recorded (docs/RELIABILITY.md compares it with what the
/// device wrote).
impl Drop for DirtyLog {
    fn drop(&mut self) {
        let t = &self.tally;
        tracing::info!(
            bytes_written = t.bytes.load(Ordering::Relaxed),
            page_marks = t.page_marks.load(Ordering::Relaxed),
            newly_marked = t.newly_marked.load(Ordering::Relaxed),
            "dirty log released"
        );
    }
}

/// The log of one VMM connection, as its queues see it.
#[derive(Debug, Default)]
pub struct LogSink {
    /// The driver acked LOG_ALL: marking is on.
    on: AtomicBool,
    log: RwLock<Option<Arc<DirtyLog>>>,
}

impl LogSink {
    /// Marking on or off (SET_FEATURES).
    pub fn set_logging(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    /// Installs a new log (SET_LOG_BASE), replacing the last.
    pub fn set_log(&self, log: DirtyLog) {
        *self.log.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(log));
    }

    /// The log to mark, while marking is on.
    pub fn active(&self) -> Option<Arc<DirtyLog>> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        self.log.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests;
