//! [`QueueRings`]: one queue's ring memfd, created by the frontend or
//! attached by the worker, and the ends each side takes from it.

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::ends::{CompletionReceiver, CompletionSender, RequestReceiver, RequestSender};
use super::entry::{Completion, RawRequest};
use super::error::RingError;
use super::layout::{
    RingLayout, MAGIC, OFF_CPL_CONS, OFF_CPL_PROD, OFF_FRONTEND_STATE, OFF_REQ_CONS, OFF_REQ_PROD,
    OFF_WORKER_STATE, STATE_ALIVE, STATE_CLOSED, VERSION,
};
use super::mapping::{self, Heartbeat, SegmentTable, Spsc};
use crate::shm::SharedMemory;

/// The memfd of one queue's rings, mapped.
#[derive(Debug, Clone)]
pub struct QueueRings {
    shm: Arc<SharedMemory>,
    layout: RingLayout,
}

impl QueueRings {
    /// Creates and initializes a queue's rings (the frontend's side).
    pub fn create(name: &str, layout: RingLayout) -> Result<Self, RingError> {
        let shm = SharedMemory::create(name, layout.size())?;
        let rings = QueueRings {
            shm: Arc::new(shm),
            layout,
        };
        mapping::write_header(&rings.shm, layout)?;
        rings
            .state_word(OFF_FRONTEND_STATE)
            .store(STATE_ALIVE, Ordering::Release);
        Ok(rings)
    }

    /// Maps a queue's rings received from the frontend (the worker's side),
    /// checking the header against the geometry announced in the control
    /// message.
    pub fn attach(file: File, layout: RingLayout) -> Result<Self, RingError> {
        let shm = SharedMemory::from_peer(file, layout.size())?;
        let rings = QueueRings {
            shm: Arc::new(shm),
            layout,
        };
        let header = mapping::read_header(&rings.shm)?;
        if header.magic != MAGIC {
            return Err(RingError::BadHeader("magic"));
        }
        if header.version != VERSION {
            return Err(RingError::BadHeader("version"));
        }
        if header.entries != layout.entries() || header.max_segments != layout.max_segments() {
            return Err(RingError::BadHeader("geometry"));
        }
        rings
            .state_word(OFF_WORKER_STATE)
            .store(STATE_ALIVE, Ordering::Release);
        Ok(rings)
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The memfd, to pass to the worker.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shm.fd()
    }

    pub(super) fn heartbeat(&self) -> Heartbeat {
        Heartbeat::new(&self.shm)
    }

    pub(super) fn state_word(&self, off: usize) -> &AtomicU32 {
        mapping::header_word(&self.shm, off)
    }

    /// Marks the frontend's end closed (a clean detach).
    pub fn close_frontend(&self) {
        self.state_word(OFF_FRONTEND_STATE)
            .store(STATE_CLOSED, Ordering::Release);
    }

    /// Marks the worker's end closed (a clean detach).
    pub fn close_worker(&self) {
        self.state_word(OFF_WORKER_STATE)
            .store(STATE_CLOSED, Ordering::Release);
    }

    /// Whether the frontend has closed its end.
    pub fn frontend_closed(&self) -> bool {
        self.state_word(OFF_FRONTEND_STATE).load(Ordering::Acquire) == STATE_CLOSED
    }

    fn spsc<T: Copy>(&self, prod: usize, cons: usize, slots: usize) -> Spsc<T> {
        Spsc::new(&self.shm, self.layout.entries(), prod, cons, slots)
    }

    fn segment_table(&self) -> SegmentTable {
        SegmentTable::new(&self.shm, self.layout)
    }

    /// The frontend's two ends. Take them once per attach.
    pub fn frontend_end(&self) -> (RequestSender, CompletionReceiver) {
        let mut req =
            self.spsc::<RawRequest>(OFF_REQ_PROD, OFF_REQ_CONS, self.layout.req_entries_off());
        // Resume where the indices are (a re-attach of a used ring).
        req.local = req.prod_word().load(Ordering::Acquire);
        req.cached_peer = req.cons_word().load(Ordering::Acquire);
        let mut cpl =
            self.spsc::<Completion>(OFF_CPL_PROD, OFF_CPL_CONS, self.layout.cpl_entries_off());
        cpl.local = cpl.cons_word().load(Ordering::Acquire);
        cpl.cached_peer = cpl.local;
        let heartbeat = self.heartbeat();
        let seen = heartbeat.word().load(Ordering::Relaxed);
        (
            RequestSender {
                ring: req,
                segments: self.segment_table(),
            },
            CompletionReceiver {
                ring: cpl,
                heartbeat,
                seen,
                seen_at: Instant::now(),
            },
        )
    }

    /// The worker's two ends.
    pub fn worker_end(&self) -> (RequestReceiver, CompletionSender) {
        let mut req =
            self.spsc::<RawRequest>(OFF_REQ_PROD, OFF_REQ_CONS, self.layout.req_entries_off());
        req.local = req.cons_word().load(Ordering::Acquire);
        req.cached_peer = req.local;
        let mut cpl =
            self.spsc::<Completion>(OFF_CPL_PROD, OFF_CPL_CONS, self.layout.cpl_entries_off());
        cpl.local = cpl.prod_word().load(Ordering::Acquire);
        cpl.cached_peer = cpl.cons_word().load(Ordering::Acquire);
        (
            RequestReceiver {
                ring: req,
                segments: self.segment_table(),
                layout: self.layout,
                scratch: Vec::with_capacity(self.layout.max_segments() as usize),
            },
            CompletionSender {
                ring: cpl,
                heartbeat: self.heartbeat(),
            },
        )
    }
}
