//! Checking a device's dirty logging: a request chain whose guest pages
//! are known (those the device may write, those it may only read), and
//! the comparison of a log's marked pages with them.

use std::collections::BTreeSet;

use super::dirty_log::LOG_PAGE;
use super::VhostUserBlk;
use crate::error::Error;
use crate::request::{header, Buf, Chain, Part};

/// The log pages `len` bytes at guest address `addr` span.
pub fn log_pages(addr: u64, len: u64) -> BTreeSet<u64> {
    if len == 0 {
        return BTreeSet::new();
    }
    (addr / LOG_PAGE..=(addr + len - 1) / LOG_PAGE).collect()
}

/// A request of known footprint (see [`VhostUserBlk::log_probe`]).
#[derive(Debug)]
pub struct LogProbe {
    /// The chain to submit.
    pub chain: Chain,
    /// Guest address of the status byte.
    pub status: u64,
    /// Pages the device writes: its writable buffer's and the status's.
    pub written: BTreeSet<u64>,
    /// Pages the device only reads (none of them also written).
    pub read_only: BTreeSet<u64>,
}

impl LogProbe {
    /// Compares the pages a log `marked` with the probe's: every written
    /// page marked, no read-only page marked, nothing else marked but the
    /// `used` ring's pages. The error names the pages that differ.
    pub fn check(&self, marked: &BTreeSet<u64>, used: &BTreeSet<u64>) -> Result<(), String> {
        let missing: Vec<_> = self.written.difference(marked).collect();
        let stray: Vec<_> = self.read_only.intersection(marked).collect();
        let extra: Vec<_> = marked
            .difference(&self.written)
            .filter(|p| !used.contains(p))
            .collect();
        if missing.is_empty() && stray.is_empty() && extra.is_empty() {
            return Ok(());
        }
        Err(format!(
            "written, not logged: {missing:x?}; only read, logged: {stray:x?}; logged, not written: {extra:x?}"
        ))
    }
}

impl VhostUserBlk {
    /// A chain of `kind` at `sector`: the header, `data` (device-readable,
    /// at a fresh guest address) if any, the device-writable range
    /// `writable` (guest address, bytes) if any, and a status byte on a
    /// page of its own.
    pub fn log_probe(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[u8],
        writable: Option<(u64, u32)>,
    ) -> Result<LogProbe, Error> {
        let mut chain = Chain::new().part(Part::readable(&header(kind, sector)));
        let mut read_only = BTreeSet::new();
        if !data.is_empty() {
            let at = self.alloc_with(data)?;
            read_only.extend(log_pages(at, data.len() as u64));
            chain = chain.part(Part::at(at, data.len() as u32, false));
        }
        let mut written = BTreeSet::new();
        if let Some((at, len)) = writable {
            written.extend(log_pages(at, u64::from(len)));
            chain = chain.part(Part::at(at, len, true));
        }
        let status = self.alloc(LOG_PAGE)? + 7;
        written.extend(log_pages(status, 1));
        chain = chain.part(Part {
            buf: Buf::At {
                addr: status,
                len: 1,
            },
            ..Part::status()
        });
        read_only.retain(|p| !written.contains(p));
        Ok(LogProbe {
            chain,
            status,
            written,
            read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_names_missing_stray_and_extra_pages() {
        let probe = LogProbe {
            chain: Chain::new(),
            status: 0,
            written: [1, 2].into(),
            read_only: [5].into(),
        };
        let used: BTreeSet<u64> = [9].into();
        assert!(probe.check(&[1, 2, 9].into(), &used).is_ok());
        let err = probe.check(&[1, 5, 7].into(), &used).unwrap_err();
        assert!(err.contains("not logged: [2]"), "{err}");
        assert!(err.contains("only read, logged: [5]"), "{err}");
        assert!(err.contains("not written: [5, 7]"), "{err}");
        assert_eq!(log_pages(LOG_PAGE - 1, 2), [0, 1].into());
        assert!(log_pages(3, 0).is_empty());
    }
}
