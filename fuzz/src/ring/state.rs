//! The state of one input: the frontend's and the worker's ends, the
//! memfd mapped a third time as a hostile peer's view (and the peer's raw
//! writes through it), and the model.

use blkmesh_ipc::ring::{
    CompletionReceiver, CompletionSender, QueueRings, RequestReceiver, RequestSender, RingLayout,
    Segment, INLINE_SEGMENTS,
};
use blkmesh_ipc::shm::SharedMemory;

use super::model::{Entry, Model};
use crate::Reader;

// The layout documented in crates/ipc/src/ring/layout.rs and ARCHITECTURE.md.
pub(super) const OFF_MAGIC: usize = 0;
pub(super) const OFF_VERSION: usize = 8;
pub(super) const OFF_ENTRIES: usize = 12;
pub(super) const OFF_MAX_SEGMENTS: usize = 16;
pub(super) const OFF_REQ_PROD: usize = 64;
pub(super) const OFF_REQ_CONS: usize = 128;
pub(super) const OFF_CPL_PROD: usize = 192;
pub(super) const OFF_CPL_CONS: usize = 256;
pub(super) const SLEEP_DELTA: usize = 4;
pub(super) const OFF_REQ_ENTRIES: usize = 384;

pub(super) struct St {
    pub(super) layout: RingLayout,
    pub(super) front: QueueRings,
    pub(super) worker: QueueRings,
    pub(super) peer: SharedMemory,
    pub(super) tx: RequestSender,
    pub(super) crx: CompletionReceiver,
    pub(super) rx: RequestReceiver,
    pub(super) ctx: CompletionSender,
    /// A side that saw a corrupt index stops, as the real loops do.
    pub(super) worker_broken: bool,
    pub(super) frontend_broken: bool,
    pub(super) clean: bool,
    pub(super) m: Model,
}

impl St {
    pub(super) fn put(&mut self, off: usize, bytes: &[u8]) {
        self.clean = false;
        if let Some(p) = self.peer.ptr_at(off, bytes.len()) {
            // SAFETY: in-bounds (ptr_at) of a live mapping; the ring ends in
            // this thread are not running concurrently.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        }
    }

    pub(super) fn word(&self, off: usize) -> u32 {
        let p = self.peer.ptr_at(off, 4).unwrap();
        // SAFETY: in-bounds, aligned header word.
        unsafe { p.cast::<u32>().read_volatile() }
    }

    pub(super) fn req_slot(&self, slot: u32) -> usize {
        OFF_REQ_ENTRIES + (slot & (self.layout.entries() - 1)) as usize * 64
    }

    pub(super) fn cpl_off(&self) -> usize {
        OFF_REQ_ENTRIES + self.layout.entries() as usize * 64
    }

    pub(super) fn seg_off(&self) -> usize {
        self.cpl_off() + self.layout.entries() as usize * 16
    }
}

pub(super) fn max_segs(st: &St) -> usize {
    st.layout.max_segments() as usize
}

pub(super) fn segment(r: &mut Reader<'_>) -> Segment {
    let region = (r.u8() % 3) as u32;
    let kind = r.u8();
    let offset = if kind & 1 != 0 {
        r.u64()
    } else {
        r.u16() as u64
    };
    let len = if kind & 2 != 0 {
        r.u32()
    } else {
        r.u16() as u32
    };
    Segment {
        region,
        len,
        offset,
    }
}

pub(super) fn raw_entry(e: &Entry) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..4].copy_from_slice(&e.tag.to_le_bytes());
    b[4] = e.op;
    b[5] = e.flags;
    b[6..8].copy_from_slice(&(e.nseg as u16).to_le_bytes());
    b[8..16].copy_from_slice(&e.offset.to_le_bytes());
    b[16..24].copy_from_slice(&e.len.to_le_bytes());
    for (i, s) in e.inline.iter().take(INLINE_SEGMENTS).enumerate() {
        let o = 32 + i * 16;
        b[o..o + 16].copy_from_slice(&seg_bytes(s));
    }
    b
}

pub(super) fn seg_bytes(s: &Segment) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&s.region.to_le_bytes());
    b[4..8].copy_from_slice(&s.len.to_le_bytes());
    b[8..16].copy_from_slice(&s.offset.to_le_bytes());
    b
}
