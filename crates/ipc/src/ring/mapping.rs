//! Everything that touches a ring memfd's mapping through raw pointers:
//! the header words, the generic single-producer/single-consumer ring, the
//! heartbeat word and the segment table. All of the ring's unsafe code is
//! here, behind methods that keep every access inside the mapping.

use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::entry::Segment;
use super::error::RingError;
use super::layout::{
    RingLayout, MAGIC, OFF_ENTRIES, OFF_ENTRIES_START, OFF_HEARTBEAT, OFF_MAGIC, OFF_MAX_SEGMENTS,
    OFF_VERSION, SLEEP_DELTA, VERSION,
};
use crate::shm::SharedMemory;

/// The geometry words of a ring's header, as read from the mapping.
pub(super) struct Header {
    pub(super) magic: u64,
    pub(super) version: u32,
    pub(super) entries: u32,
    pub(super) max_segments: u32,
}

/// Writes the header of a fresh ring (the frontend's side), before anybody
/// else has the memfd.
pub(super) fn write_header(shm: &SharedMemory, layout: RingLayout) -> Result<(), RingError> {
    // SAFETY: the header offsets are inside the mapping (size() > OFF_ENTRIES_START) and
    // aligned; nobody else has the memfd yet.
    unsafe {
        let p = shm.ptr_at(0, OFF_ENTRIES_START).ok_or(RingError::Full)?;
        p.add(OFF_MAGIC).cast::<u64>().write_volatile(MAGIC);
        p.add(OFF_VERSION).cast::<u32>().write_volatile(VERSION);
        p.add(OFF_ENTRIES)
            .cast::<u32>()
            .write_volatile(layout.entries());
        p.add(OFF_MAX_SEGMENTS)
            .cast::<u32>()
            .write_volatile(layout.max_segments());
    }
    Ok(())
}

/// Reads the header of a ring received from the peer.
pub(super) fn read_header(shm: &SharedMemory) -> Result<Header, RingError> {
    // SAFETY: header offsets are in bounds (checked by ptr_at) and aligned.
    let header = unsafe {
        let p = shm.ptr_at(0, OFF_ENTRIES_START).ok_or(RingError::Full)?;
        Header {
            magic: p.add(OFF_MAGIC).cast::<u64>().read_volatile(),
            version: p.add(OFF_VERSION).cast::<u32>().read_volatile(),
            entries: p.add(OFF_ENTRIES).cast::<u32>().read_volatile(),
            max_segments: p.add(OFF_MAX_SEGMENTS).cast::<u32>().read_volatile(),
        }
    };
    Ok(header)
}

fn word(shm: &SharedMemory, off: usize) -> *const AtomicU32 {
    // Offsets passed here are constants inside the header lines.
    shm.ptr_at(off, 4)
        .map(|p| p.cast::<AtomicU32>().cast_const())
        .unwrap_or(std::ptr::null())
}

/// The header word at `off` (a state word, or an index for tests).
pub(super) fn header_word(shm: &SharedMemory, off: usize) -> &AtomicU32 {
    // SAFETY: `word` returns an aligned, in-bounds pointer for header
    // offsets, valid as long as `shm`; AtomicU32 tolerates concurrent
    // writes by the peer.
    unsafe { &*word(shm, off) }
}

/// One direction: a single-producer/single-consumer ring of `T` in shared
/// memory. `local` is our own free-running index (producer or consumer),
/// `cached_peer` the last value of the peer's we loaded.
pub(super) struct Spsc<T> {
    /// Keeps the mapping alive for the raw pointers below.
    _shm: Arc<SharedMemory>,
    slots: *mut T,
    pub(super) entries: u32,
    prod: *const AtomicU32,
    cons: *const AtomicU32,
    sleeping: *const AtomicU32,
    pub(super) local: u32,
    pub(super) cached_peer: u32,
    /// Consumer side: the producer published an impossible index (peer,
    /// ours); latched.
    broken: Option<(u32, u32)>,
    _t: PhantomData<T>,
}

// SAFETY: the raw pointers point into `shm`, which is Send + Sync and kept
// alive by the Arc; a Spsc is used by one thread at a time (&mut self).
unsafe impl<T: Send> Send for Spsc<T> {}

impl<T: Copy> Spsc<T> {
    /// The ring whose indices are the header words at `prod` and `cons`
    /// (the sleeping flag follows `cons`) and whose `entries` slots start at
    /// `slots`. Both indices start at 0: the caller resumes them.
    pub(super) fn new(
        shm: &Arc<SharedMemory>,
        entries: u32,
        prod: usize,
        cons: usize,
        slots: usize,
    ) -> Self {
        let slots = shm
            .ptr_at(slots, entries as usize * std::mem::size_of::<T>())
            .map(|p| p.cast::<T>())
            .unwrap_or(std::ptr::null_mut());
        Spsc {
            _shm: Arc::clone(shm),
            slots,
            entries,
            prod: word(shm, prod),
            cons: word(shm, cons),
            sleeping: word(shm, cons + SLEEP_DELTA),
            local: 0,
            cached_peer: 0,
            broken: None,
            _t: PhantomData,
        }
    }

    pub(super) fn prod_word(&self) -> &AtomicU32 {
        // SAFETY: in-bounds, aligned header word kept alive by self.shm.
        unsafe { &*self.prod }
    }

    pub(super) fn cons_word(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.cons }
    }

    pub(super) fn sleeping_word(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.sleeping }
    }

    fn slot(&self, idx: u32) -> *mut T {
        let i = (idx & (self.entries - 1)) as usize;
        // SAFETY: i < entries and `slots` spans `entries` elements.
        unsafe { self.slots.add(i) }
    }

    // ---- producer side ----

    pub(super) fn push(&mut self, item: T) -> Result<(), RingError> {
        let mut used = self.local.wrapping_sub(self.cached_peer);
        if used >= self.entries {
            self.cached_peer = self.cons_word().load(Ordering::Acquire);
            used = self.local.wrapping_sub(self.cached_peer);
            if used > self.entries {
                return Err(RingError::PeerIndex {
                    peer: self.cached_peer,
                    ours: self.local,
                });
            }
            if used == self.entries {
                return Err(RingError::Full);
            }
        }
        // SAFETY: the slot is inside the ring and not visible to the consumer
        // until we publish `local + 1`.
        unsafe { self.slot(self.local).write_volatile(item) };
        self.local = self.local.wrapping_add(1);
        Ok(())
    }

    /// Publishes pushed entries; true when the consumer is (about to be)
    /// asleep and must be woken.
    pub(super) fn publish(&mut self) -> bool {
        self.prod_word().store(self.local, Ordering::Release);
        fence(Ordering::SeqCst);
        self.sleeping_word().load(Ordering::Relaxed) != 0
    }

    // ---- consumer side ----

    /// Takes the next entry. A producer index more than a ring ahead is
    /// latched: this and every later call fail with the same error, so no
    /// slot is ever read on the word of a producer caught lying.
    pub(super) fn pop(&mut self) -> Result<Option<T>, RingError> {
        if let Some((peer, ours)) = self.broken {
            return Err(RingError::PeerIndex { peer, ours });
        }
        if self.local == self.cached_peer {
            self.cached_peer = self.prod_word().load(Ordering::Acquire);
            if self.local == self.cached_peer {
                return Ok(None);
            }
            if self.cached_peer.wrapping_sub(self.local) > self.entries {
                self.broken = Some((self.cached_peer, self.local));
                return Err(RingError::PeerIndex {
                    peer: self.cached_peer,
                    ours: self.local,
                });
            }
        }
        // SAFETY: the producer published this slot (Acquire above pairs with
        // its Release) and will not reuse it until we release our index.
        let item = unsafe { self.slot(self.local).read_volatile() };
        self.local = self.local.wrapping_add(1);
        Ok(Some(item))
    }

    pub(super) fn release(&mut self) {
        self.cons_word().store(self.local, Ordering::Release);
    }

    pub(super) fn prepare_sleep(&mut self) -> bool {
        self.release();
        self.sleeping_word().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.prod_word().load(Ordering::Acquire) != self.local {
            self.sleeping_word().store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(super) fn woke(&mut self) {
        self.sleeping_word().store(0, Ordering::Relaxed);
    }

    /// Consumer side: whether the producer has published entries we have
    /// not taken yet (one Acquire load, no syscall: for polling).
    pub(super) fn has_new(&self) -> bool {
        self.prod_word().load(Ordering::Acquire) != self.local
    }

    pub(super) fn pending(&self) -> u32 {
        self.prod_word()
            .load(Ordering::Acquire)
            .wrapping_sub(self.cons_word().load(Ordering::Acquire))
    }
}

/// The worker's heartbeat word.
pub(super) struct Heartbeat {
    /// Keeps the mapping alive for `word`.
    _shm: Arc<SharedMemory>,
    word: *const AtomicU64,
}

// SAFETY: a pointer into the Arc'd mapping, only used as an atomic.
unsafe impl Send for Heartbeat {}

impl Heartbeat {
    pub(super) fn new(shm: &Arc<SharedMemory>) -> Self {
        Heartbeat {
            _shm: Arc::clone(shm),
            word: shm
                .ptr_at(OFF_HEARTBEAT, 8)
                .map(|p| p.cast::<AtomicU64>().cast_const())
                .unwrap_or(std::ptr::null()),
        }
    }

    pub(super) fn word(&self) -> &AtomicU64 {
        // SAFETY: OFF_HEARTBEAT is 64-byte aligned inside the header, which
        // every ring mapping covers (size() > OFF_ENTRIES_START), so the
        // pointer is valid and aligned for as long as `_shm` lives; the peer
        // only ever changes the word, which an AtomicU64 tolerates.
        unsafe { &*self.word }
    }
}

/// Spill space for long scatter-gather lists, `per_tag` segments per tag.
pub(super) struct SegmentTable {
    /// Keeps the mapping alive for `base`.
    _shm: Arc<SharedMemory>,
    base: *mut Segment,
    entries: u32,
    per_tag: u32,
}

// SAFETY: pointer into the Arc'd mapping, used through &mut self only.
unsafe impl Send for SegmentTable {}

impl SegmentTable {
    pub(super) fn new(shm: &Arc<SharedMemory>, layout: RingLayout) -> Self {
        let per_tag = layout.max_segments() as usize;
        let n = layout.entries() as usize * per_tag;
        SegmentTable {
            _shm: Arc::clone(shm),
            base: shm
                .ptr_at(layout.segments_off(), n * std::mem::size_of::<Segment>())
                .map(|p| p.cast::<Segment>())
                .unwrap_or(std::ptr::null_mut()),
            entries: layout.entries(),
            per_tag: layout.max_segments(),
        }
    }

    fn slot(&self, tag: u32, i: usize) -> Option<*mut Segment> {
        if tag >= self.entries || i >= self.per_tag as usize || self.base.is_null() {
            return None;
        }
        let idx = tag as usize * self.per_tag as usize + i;
        // SAFETY: idx < entries * per_tag, the table's length.
        Some(unsafe { self.base.add(idx) })
    }

    pub(super) fn write(&mut self, tag: u32, segs: &[Segment]) -> Result<(), RingError> {
        if segs.len() > self.per_tag as usize || tag >= self.entries {
            return Err(RingError::TooManySegments(segs.len()));
        }
        for (i, s) in segs.iter().enumerate() {
            let p = self
                .slot(tag, i)
                .ok_or(RingError::TooManySegments(segs.len()))?;
            // SAFETY: in-bounds slot owned by this in-flight tag.
            unsafe { p.write_volatile(*s) };
        }
        Ok(())
    }

    pub(super) fn read(&self, tag: u32, n: usize, out: &mut Vec<Segment>) -> bool {
        for i in 0..n {
            let Some(p) = self.slot(tag, i) else {
                return false;
            };
            // SAFETY: in-bounds slot; a racing peer can only change values,
            // which we copy once and validate afterwards.
            out.push(unsafe { p.read_volatile() });
        }
        true
    }
}
