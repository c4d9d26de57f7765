//! What both rings must do while nobody scribbles: the entries as pushed,
//! the protocol's acceptance rules restated, and the rings' counters.

use blkmesh_ipc::ring::{Completion, Op, RingLayout, Segment};

/// The fields of a request entry, as pushed (or expected).
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) tag: u32,
    pub(super) op: u8,
    pub(super) flags: u8,
    pub(super) nseg: usize,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) inline: Vec<Segment>,
}

/// What the worker must accept: the ring protocol's rules, restated.
pub(super) fn acceptable(layout: RingLayout, e: &Entry, segs: &[Segment]) -> bool {
    let Some(op) = Op::from_u8(e.op) else {
        return false;
    };
    let allowed = match op {
        Op::Write | Op::ZoneAppend => 1,
        Op::WriteZeroes => 3,
        _ => 0,
    };
    if e.tag >= layout.entries()
        || e.flags & !allowed != 0
        || e.nseg > layout.max_segments() as usize
    {
        return false;
    }
    let data = matches!(
        op,
        Op::Read | Op::Write | Op::GetId | Op::ZoneReport | Op::ZoneAppend
    );
    if data {
        if segs.is_empty() || segs.iter().any(|s| s.len == 0) {
            return false;
        }
        if segs.iter().map(|s| s.len as u64).sum::<u64>() != e.len {
            return false;
        }
    } else if !segs.is_empty() {
        return false;
    }
    if matches!(op, Op::Discard | Op::WriteZeroes) && e.len == 0 {
        return false;
    }
    e.offset.checked_add(e.len).is_some()
}

/// Both rings as they should be while nobody scribbles.
#[derive(Default)]
pub(super) struct Model {
    /// Request entries by producer sequence number.
    pub(super) log: Vec<Entry>,
    /// The segment table, per tag (`max_segments` slots each).
    pub(super) table: Vec<Vec<Segment>>,
    pub(super) pushed: u64,
    pub(super) published: u64,
    pub(super) popped: u64,
    pub(super) released: u64,
    pub(super) worker_sleeping: bool,
    pub(super) cpl_log: Vec<Completion>,
    pub(super) cpl_pushed: u64,
    pub(super) cpl_published: u64,
    pub(super) cpl_popped: u64,
    pub(super) cpl_released: u64,
    pub(super) frontend_sleeping: bool,
}
