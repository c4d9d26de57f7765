//! The ring memfd's geometry: header offsets, entry areas, and the
//! validation of a request copied out of the ring against it.

use super::entry::{
    BadRequest, Completion, Op, RawRequest, Request, Segment, MAX_ENTRIES, MAX_SEGMENTS,
};
use super::error::RingError;

pub(super) const MAGIC: u64 = u64::from_le_bytes(*b"BLKMRING");
/// 2: the heartbeat line at 320 (entries moved from 320 to 384).
pub(super) const VERSION: u32 = 2;
pub(super) const LINE: usize = 64;

pub(super) const OFF_MAGIC: usize = 0;
pub(super) const OFF_VERSION: usize = 8;
pub(super) const OFF_ENTRIES: usize = 12;
pub(super) const OFF_MAX_SEGMENTS: usize = 16;
pub(super) const OFF_FRONTEND_STATE: usize = 24;
pub(super) const OFF_WORKER_STATE: usize = 28;
pub(super) const OFF_REQ_PROD: usize = LINE;
pub(super) const OFF_REQ_CONS: usize = 2 * LINE;
pub(super) const OFF_CPL_PROD: usize = 3 * LINE;
pub(super) const OFF_CPL_CONS: usize = 4 * LINE;
/// The sleeping flag sits after the consumer index, on the consumer's line.
pub(super) const SLEEP_DELTA: usize = 4;
/// The worker's heartbeat (u64), alone on its line.
pub(super) const OFF_HEARTBEAT: usize = 5 * LINE;
pub(super) const OFF_ENTRIES_START: usize = 6 * LINE;
// The heartbeat has its line to itself: nothing else before the entries.
const _: () = assert!(OFF_HEARTBEAT % LINE == 0 && OFF_HEARTBEAT + LINE == OFF_ENTRIES_START);

pub(super) const STATE_ALIVE: u32 = 1;
pub(super) const STATE_CLOSED: u32 = 2;

/// Ring geometry, from which every offset follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    entries: u32,
    max_segments: u32,
}

impl RingLayout {
    pub fn new(entries: u32, max_segments: u32) -> Result<Self, RingError> {
        if entries == 0 || entries > MAX_ENTRIES || !entries.is_power_of_two() {
            return Err(RingError::BadEntries(entries));
        }
        if max_segments == 0 || max_segments > MAX_SEGMENTS {
            return Err(RingError::BadMaxSegments(max_segments));
        }
        Ok(RingLayout {
            entries,
            max_segments,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn max_segments(&self) -> u32 {
        self.max_segments
    }

    pub(super) fn req_entries_off(&self) -> usize {
        OFF_ENTRIES_START
    }

    pub(super) fn cpl_entries_off(&self) -> usize {
        self.req_entries_off() + self.entries as usize * std::mem::size_of::<RawRequest>()
    }

    pub(super) fn segments_off(&self) -> usize {
        self.cpl_entries_off() + self.entries as usize * std::mem::size_of::<Completion>()
    }

    /// Total bytes of the memfd.
    pub fn size(&self) -> usize {
        let segs =
            self.entries as usize * self.max_segments as usize * std::mem::size_of::<Segment>();
        (self.segments_off() + segs).next_multiple_of(4096)
    }

    /// Checks a request copied out of the ring. Segment lengths are summed
    /// and compared with `len`; guest-memory bounds are not checked here.
    pub fn validate(&self, raw: &RawRequest, segs: &[Segment]) -> Result<Request, BadRequest> {
        if raw.tag >= self.entries {
            return Err(BadRequest {
                tag: None,
                reason: "tag out of range",
            });
        }
        let bad = |reason| BadRequest {
            tag: Some(raw.tag),
            reason,
        };
        let op = Op::from_u8(raw.op).ok_or(bad("unknown op"))?;
        if raw.flags & !op.allowed_flags() != 0 {
            return Err(bad("flag not allowed for this op"));
        }
        if raw.nseg as u32 > self.max_segments || raw.nseg as usize != segs.len() {
            return Err(bad("segment count out of range"));
        }
        if op.has_data() {
            if segs.is_empty() {
                return Err(bad("data op without segments"));
            }
            let mut total: u64 = 0;
            for s in segs {
                if s.len == 0 {
                    return Err(bad("empty segment"));
                }
                total += s.len as u64;
            }
            if total != raw.len {
                return Err(bad("length does not match segments"));
            }
        } else if !segs.is_empty() {
            return Err(bad("segments on an op without data"));
        }
        if matches!(op, Op::Discard | Op::WriteZeroes) && raw.len == 0 {
            return Err(bad("empty range"));
        }
        if raw.offset.checked_add(raw.len).is_none() {
            return Err(bad("offset + length overflows"));
        }
        Ok(Request {
            tag: raw.tag,
            op,
            flags: raw.flags,
            offset: raw.offset,
            len: raw.len,
        })
    }
}
