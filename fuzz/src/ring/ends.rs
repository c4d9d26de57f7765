//! The ends' operations that carry requests and completions, each checked
//! against the model while the ring is clean and against the protocol's
//! promises always.

use blkmesh_frontend::request::status_of;
use blkmesh_ipc::guest_ram::GuestRam;
use blkmesh_ipc::ring::{Op, Received, Request, RingError, RingLayout, Segment, INLINE_SEGMENTS};

use super::model::{acceptable, Entry};
use super::state::{max_segs, segment, St};
use crate::{touch, Reader};

pub(super) fn frontend_push(r: &mut Reader<'_>, st: &mut St) {
    let entries = st.layout.entries();
    let tag = r.u16() as u32 % (2 * entries);
    let op = Op::from_u8(r.u8() % 17).unwrap_or(Op::Read);
    let flags = r.u8() & 3;
    let kind = r.u8();
    let offset = r.u64();
    let nseg = if kind & 1 != 0 {
        r.u8() as usize
    } else {
        (r.u8() % 4) as usize
    };
    let segs: Vec<Segment> = (0..nseg).map(|_| segment(r)).collect();
    let len = if kind & 2 != 0 {
        r.u64()
    } else {
        segs.iter().map(|s| s.len as u64).sum()
    };
    if st.frontend_broken {
        return;
    }
    let req = Request {
        tag,
        op,
        flags,
        offset,
        len,
    };
    let res = st.tx.push(&req, &segs);
    if !st.clean {
        if matches!(res, Err(RingError::PeerIndex { .. })) {
            st.frontend_broken = true;
        }
        return;
    }
    let spill = segs.len() > INLINE_SEGMENTS;
    let seg_err = spill && (segs.len() > max_segs(st) || tag >= entries);
    if spill && !seg_err {
        // The table is written before the ring is found full.
        let max = max_segs(st);
        st.m.table[tag as usize].resize(max, Segment::default());
        st.m.table[tag as usize][..segs.len()].copy_from_slice(&segs);
    }
    let full = st.m.pushed - st.m.released == entries as u64;
    match res {
        Ok(()) => {
            assert!(!seg_err && !full, "push should have failed");
            let e = Entry {
                tag,
                op: op as u8,
                flags,
                nseg: segs.len(),
                offset,
                len,
                inline: if spill { vec![] } else { segs },
            };
            st.m.log.truncate(st.m.pushed as usize);
            st.m.log.push(e);
            st.m.pushed += 1;
        }
        Err(RingError::TooManySegments(_)) => assert!(seg_err),
        Err(RingError::Full) => assert!(!seg_err && full, "ring full too early"),
        Err(e) => panic!("push: {e}"),
    }
}

/// One pop by the worker; false when there was nothing (or the ring broke).
pub(super) fn worker_pop(st: &mut St, ram: &GuestRam) -> bool {
    if st.worker_broken {
        return false;
    }
    let layout = st.layout;
    let expected = if st.clean && st.m.popped < st.m.published {
        let e = st.m.log[st.m.popped as usize].clone();
        let segs = if e.nseg <= INLINE_SEGMENTS {
            e.inline.clone()
        } else {
            st.m.table[e.tag as usize][..e.nseg].to_vec()
        };
        Some((e, segs))
    } else {
        None
    };
    let got = match st.rx.pop() {
        Err(e) => {
            assert!(!st.clean, "clean ring reported broken: {e}");
            st.worker_broken = true;
            return false;
        }
        Ok(None) => {
            assert!(expected.is_none(), "published request not received");
            return false;
        }
        Ok(Some(got)) => got,
    };
    if crate::debug() {
        eprintln!("worker popped {got:?} (clean: {})", st.clean);
    }
    if st.clean {
        assert!(expected.is_some(), "received a request nobody published");
        st.m.popped += 1;
    }
    match got {
        Received::Request(req, segs) => {
            check_accepted(layout, &req, segs, ram);
            if let Some((e, esegs)) = expected {
                assert!(acceptable(layout, &e, &esegs), "accepted {e:?}");
                assert_eq!(
                    (req.tag, req.op as u8, req.flags, req.offset, req.len),
                    (e.tag, e.op, e.flags, e.offset, e.len)
                );
                assert_eq!(segs, &esegs[..]);
            }
        }
        Received::Bad(bad) => {
            if let Some(t) = bad.tag {
                assert!(
                    t < layout.entries(),
                    "refusal names tag {t} outside the ring"
                );
            }
            if let Some((e, esegs)) = expected {
                assert!(!acceptable(layout, &e, &esegs), "refused {e:?}: {bad}");
                assert_eq!(bad.tag, (e.tag < layout.entries()).then_some(e.tag));
            }
        }
    }
    true
}

/// What the worker may rely on for an accepted request, and its segments
/// against the worker's guest RAM as queue.rs uses them.
pub(crate) fn check_accepted(layout: RingLayout, req: &Request, segs: &[Segment], ram: &GuestRam) {
    assert!(
        req.tag < layout.entries(),
        "tag {} outside the ring",
        req.tag
    );
    assert!(segs.len() <= layout.max_segments() as usize);
    assert_eq!(req.flags & !req.op.allowed_flags(), 0);
    assert!(req.offset.checked_add(req.len).is_some());
    if req.op.has_data() {
        assert!(!segs.is_empty());
        assert!(segs.iter().all(|s| s.len > 0));
        assert_eq!(segs.iter().map(|s| s.len as u64).sum::<u64>(), req.len);
    } else {
        assert!(segs.is_empty());
    }
    if matches!(req.op, Op::Discard | Op::WriteZeroes) {
        assert!(req.len > 0);
    }
    for s in segs {
        let Ok(b) = ram.buf(s) else { continue };
        let region = &ram.regions()[s.region as usize];
        let (map, map_len, _, _) = region.registration();
        let p = b.as_ptr() as usize;
        assert!(
            p >= map && p + b.len() <= map + map_len,
            "segment {s:?} escapes its region's mapping"
        );
        assert!(s.offset + s.len as u64 <= region.spec().size);
        touch(b.as_ptr());
        touch(b.as_ptr().wrapping_add(b.len() - 1));
    }
}

/// One completion taken by the frontend, handled as vring/ does.
pub(super) fn frontend_pop(st: &mut St) -> bool {
    if st.frontend_broken {
        return false;
    }
    let expected = (st.clean && st.m.cpl_popped < st.m.cpl_published)
        .then(|| st.m.cpl_log[st.m.cpl_popped as usize]);
    match st.crx.pop() {
        Err(e) => {
            assert!(!st.clean, "clean completion ring reported broken: {e}");
            st.frontend_broken = true;
            false
        }
        Ok(None) => {
            assert!(expected.is_none(), "published completion not received");
            false
        }
        Ok(Some(c)) => {
            if crate::debug() {
                eprintln!("frontend popped {c:?}");
            }
            if st.clean {
                assert_eq!(Some(c), expected, "completion");
                st.m.cpl_popped += 1;
            }
            // vring/: the tag is looked up in the in-flight table (a
            // bounds-checked get), then the result becomes a virtio status.
            if c.result != i32::MIN || crate::strict() {
                let status = status_of(c.result);
                assert!(status.byte() <= 2);
            }
            true
        }
    }
}
