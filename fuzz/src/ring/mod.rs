//! `ring_entry`: the shared queue rings, frontend and worker ends in one
//! process, with the memfd also mapped a third time as a hostile peer's view.
//!
//! Input format:
//!
//! ```text
//! u8 log2 entries (mod 13), u16 max_segments - 1 (mod 1024)
//! then operations until the input ends, each a u8 code (mod 19):
//!  0 scribble     u32 offset (mod ring size), bytes (<= 256)
//!  1 write entry  u16 slot, u16 tag, u8 op, u8 flags, u16 nseg, u64 offset,
//!                 u64 len, 2 × segment           (a raw request entry)
//!  2 write segs   u16 tag, u16 index, u8 count (mod 8) × segment
//!  3 set word     u8 which (req prod/cons/sleep, cpl prod/cons/sleep),
//!                 bool relative, u32 value (relative: added to the word)
//!  4 worker pop   u8 n-1 (mod 16)
//!  5 worker release
//!  6 worker complete  u16 tag, u8 result kind, u32 result, u64 extra
//!  7 worker publish
//!  8 worker sleep     bool wake afterwards
//!  9 frontend push    u16 tag, u8 op, u8 flags, u8 kind, u64 offset,
//!                     u8 nseg (kind bit 0: nseg up to 255), segments,
//!                     kind bit 1: u64 len instead of the segments' sum
//! 10 frontend publish
//! 11 frontend pop completions  u8 n-1 (mod 16)
//! 12 frontend release
//! 13 frontend sleep   bool wake afterwards
//! 14 re-attach the worker (a live move: the ring indices carry over)
//! 15 re-attach the frontend
//! 16 write completion u16 slot, u16 tag, u32 result, u64 extra
//! 17 write header     u8 field (magic, version, entries, max_segments), u32
//! 18 queries          (has_new, unconsumed)
//! segment: u8 region (mod 3; region 2 does not exist), u8 kind,
//!          offset (kind bit 0: u64, else u16), len (kind bit 1: u32, else u16)
//! ```
//!
//! Checks: no panic. Every request the worker accepts has a tag inside the
//! ring, allowed flags, a segment count within the geometry, lengths that add
//! up and a range that does not wrap; its segments either fail the guest-RAM
//! check or lie inside the worker's mapping (and are read). A refused entry
//! names a tag only if it is inside the ring. Until the first scribble, a
//! model of both rings (indices, segment table, sleeping flags) must agree
//! exactly with what each end sees, including full rings and wake-ups.
//!
//! The rooms: `state` (the three views of the memfd, the hostile peer's
//! raw writes), `model` (what both rings must do while nobody scribbles),
//! `step` (one operation of the input), `ends` (the ends' operations
//! checked against the model) and `seeds`.

mod ends;
mod model;
mod seeds;
mod state;
mod step;

use std::fs::File;

use blkmesh_ipc::guest_ram::{GuestRam, RegionSpec};
use blkmesh_ipc::ring::{QueueRings, RingLayout};
use blkmesh_ipc::shm::SharedMemory;

use self::model::Model;
use self::state::St;
use self::step::step;
use crate::{memfd, Reader};

pub(crate) use self::ends::check_accepted;
pub use self::seeds::{known, seeds};

thread_local! {
    /// The worker's guest RAM: two regions, the second at an fd offset that
    /// is not page-aligned (so its mapping starts before the region).
    static RAM: GuestRam = {
        let specs = [
            RegionSpec { guest_addr: 0, size: 0x10000, fd_offset: 0 },
            RegionSpec { guest_addr: 0x10000, size: 0x2000 - 100, fd_offset: 0x1000 + 100 },
        ];
        let files = vec![
            memfd("fuzz-ram0", 0x10000, false),
            memfd("fuzz-ram1", 0x3000, false),
        ];
        GuestRam::map(&specs, files).unwrap()
    };
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let entries = 1u32 << (r.u8() % 13);
    let max_segments = 1 + (r.u16() % 1024) as u32;
    let layout = RingLayout::new(entries, max_segments).unwrap();
    let front = QueueRings::create("fuzz-ring", layout).unwrap();
    let dup = || File::from(front.fd().try_clone_to_owned().unwrap());
    let worker = QueueRings::attach(dup(), layout).unwrap();
    let peer = SharedMemory::from_peer(dup(), layout.size()).unwrap();
    let (tx, crx) = front.frontend_end();
    let (rx, ctx) = worker.worker_end();
    let mut st = St {
        layout,
        front,
        worker,
        peer,
        tx,
        crx,
        rx,
        ctx,
        worker_broken: false,
        frontend_broken: false,
        clean: true,
        m: Model {
            table: vec![Vec::new(); entries as usize],
            ..Default::default()
        },
    };
    RAM.with(|ram| {
        while !r.is_empty() {
            step(&mut r, &mut st, ram);
        }
    });
}
