//! One operation of the input: a hostile write, or one of the ends'
//! operations (see the input format in `mod.rs`).

use std::fs::File;

use blkmesh_ipc::guest_ram::GuestRam;
use blkmesh_ipc::ring::{Completion, QueueRings, RingError};

use super::ends::{frontend_pop, frontend_push, worker_pop};
use super::model::Entry;
use super::state::{
    max_segs, raw_entry, seg_bytes, segment, St, OFF_CPL_CONS, OFF_CPL_PROD, OFF_ENTRIES,
    OFF_MAGIC, OFF_MAX_SEGMENTS, OFF_REQ_CONS, OFF_REQ_PROD, OFF_VERSION, SLEEP_DELTA,
};
use crate::Reader;

pub(super) fn step(r: &mut Reader<'_>, st: &mut St, ram: &GuestRam) {
    let layout = st.layout;
    let entries = layout.entries();
    match r.u8() % 19 {
        0 => {
            let off = r.u32() as usize % layout.size();
            let b = r.bytes(256);
            st.put(off, b);
        }
        1 => {
            let slot = r.u16() as u32;
            let mut e = Entry {
                tag: r.u16() as u32,
                op: r.u8(),
                flags: r.u8(),
                nseg: r.u16() as usize,
                offset: r.u64(),
                len: r.u64(),
                inline: vec![],
            };
            e.inline = vec![segment(r), segment(r)];
            let off = st.req_slot(slot);
            st.put(off, &raw_entry(&e));
        }
        2 => {
            let tag = r.u16() as usize;
            let idx = r.u16() as usize;
            let n = r.u8() % 8;
            for i in 0..n as usize {
                let s = segment(r);
                let off = st.seg_off() + ((tag * max_segs(st)) + idx + i) * 16;
                st.put(off, &seg_bytes(&s));
            }
        }
        3 => {
            let which = [
                OFF_REQ_PROD,
                OFF_REQ_CONS,
                OFF_REQ_CONS + SLEEP_DELTA,
                OFF_CPL_PROD,
                OFF_CPL_CONS,
                OFF_CPL_CONS + SLEEP_DELTA,
            ][r.u8() as usize % 6];
            let rel = r.bool();
            let v = r.u32();
            let v = if rel {
                st.word(which).wrapping_add(v)
            } else {
                v
            };
            st.put(which, &v.to_le_bytes());
        }
        4 => {
            for _ in 0..1 + r.u8() % 16 {
                if !worker_pop(st, ram) {
                    break;
                }
            }
        }
        5 => {
            if !st.worker_broken {
                st.rx.release();
                st.m.released = st.m.popped;
            }
        }
        6 => {
            let tag = r.u16() as u32;
            let result = match r.u8() % 4 {
                0 => 0,
                1 => -libc::EIO,
                2 => -(r.u32() as i32 & 0xfff),
                _ => r.u32() as i32,
            };
            let c = Completion {
                tag,
                result,
                extra: r.u64(),
            };
            if st.worker_broken {
                return;
            }
            let res = st.ctx.push(c);
            if st.clean {
                let full = st.m.cpl_pushed - st.m.cpl_released == entries as u64;
                match res {
                    Ok(()) => {
                        assert!(!full, "completion pushed into a full ring");
                        st.m.cpl_log.truncate(st.m.cpl_pushed as usize);
                        st.m.cpl_log.push(c);
                        st.m.cpl_pushed += 1;
                    }
                    Err(RingError::Full) => assert!(full, "completion ring full too early"),
                    Err(e) => panic!("completion push: {e}"),
                }
            } else if matches!(res, Err(RingError::PeerIndex { .. })) {
                st.worker_broken = true;
            }
        }
        7 => {
            if st.worker_broken {
                return;
            }
            let kick = st.ctx.publish();
            if st.clean {
                st.m.cpl_published = st.m.cpl_pushed;
                assert_eq!(kick, st.m.frontend_sleeping, "completion kick");
            }
        }
        8 => {
            let wake = r.bool();
            if st.worker_broken {
                return;
            }
            let sleeps = st.rx.prepare_sleep();
            if st.clean {
                st.m.released = st.m.popped;
                assert_eq!(sleeps, st.m.published == st.m.popped, "worker sleep");
                st.m.worker_sleeping = sleeps;
            }
            if wake {
                st.rx.woke();
                st.m.worker_sleeping = false;
            }
        }
        9 => frontend_push(r, st),
        10 => {
            if st.frontend_broken {
                return;
            }
            let kick = st.tx.publish();
            if st.clean {
                st.m.published = st.m.pushed;
                assert_eq!(kick, st.m.worker_sleeping, "request kick");
            }
        }
        11 => {
            for _ in 0..1 + r.u8() % 16 {
                if !frontend_pop(st) {
                    break;
                }
            }
        }
        12 => {
            if !st.frontend_broken {
                st.crx.release();
                st.m.cpl_released = st.m.cpl_popped;
            }
        }
        13 => {
            let wake = r.bool();
            if st.frontend_broken {
                return;
            }
            let sleeps = st.crx.prepare_sleep();
            if st.clean {
                st.m.cpl_released = st.m.cpl_popped;
                assert_eq!(
                    sleeps,
                    st.m.cpl_published == st.m.cpl_popped,
                    "frontend sleep"
                );
                st.m.frontend_sleeping = sleeps;
            }
            if wake {
                st.crx.woke();
                st.m.frontend_sleeping = false;
            }
        }
        14 => {
            let fd = File::from(st.front.fd().try_clone_to_owned().unwrap());
            match QueueRings::attach(fd, layout) {
                Ok(w) => {
                    let (rx, ctx) = w.worker_end();
                    st.worker = w;
                    st.rx = rx;
                    st.ctx = ctx;
                    st.worker_broken = false;
                    // Resumes at the released request and the published
                    // completion.
                    st.m.popped = st.m.released;
                    st.m.cpl_pushed = st.m.cpl_published;
                }
                Err(e) => assert!(!st.clean, "re-attach of a clean ring: {e}"),
            }
        }
        15 => {
            let (tx, crx) = st.front.frontend_end();
            st.tx = tx;
            st.crx = crx;
            st.frontend_broken = false;
            st.m.pushed = st.m.published;
            st.m.cpl_popped = st.m.cpl_released;
        }
        16 => {
            let slot = r.u16() as usize & (entries as usize - 1);
            let mut b = [0u8; 16];
            b[0..4].copy_from_slice(&(r.u16() as u32).to_le_bytes());
            b[4..8].copy_from_slice(&r.u32().to_le_bytes());
            b[8..16].copy_from_slice(&r.u64().to_le_bytes());
            let off = st.cpl_off() + slot * 16;
            st.put(off, &b);
        }
        17 => {
            let (off, len) = [
                (OFF_MAGIC, 8),
                (OFF_VERSION, 4),
                (OFF_ENTRIES, 4),
                (OFF_MAX_SEGMENTS, 4),
            ][r.u8() as usize % 4];
            let v = r.u32() as u64;
            st.put(off, &v.to_le_bytes()[..len]);
        }
        _ => {
            let has = st.rx.has_new();
            let chas = st.crx.has_new();
            let unconsumed = st.tx.unconsumed();
            if st.clean && !st.worker_broken && !st.frontend_broken {
                assert_eq!(has, st.m.published != st.m.popped);
                assert_eq!(chas, st.m.cpl_published != st.m.cpl_popped);
                assert_eq!(unconsumed as u64, st.m.published - st.m.released);
            }
        }
    }
}
