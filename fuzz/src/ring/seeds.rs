//! The committed seeds of `ring_entry`, and the input of the one known bug.

use blkmesh_ipc::ring::Op;

use crate::Writer;

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // A clean exchange: read (inline), write with 5 segments (spilled),
    // flush; the worker takes them, completes, the frontend reaps.
    {
        let mut w = Writer::new();
        w.u8(3).u16(7); // 8 entries, 8 segments
        let seg = |w: &mut Writer, region: u8, off: u16, len: u16| {
            w.u8(region).u8(0).u16(off).u16(len);
        };
        w.u8(9)
            .u16(1)
            .u8(Op::Read as u8)
            .u8(0)
            .u8(0)
            .u64(4096)
            .u8(1);
        seg(&mut w, 0, 0x100, 512);
        w.u8(9)
            .u16(2)
            .u8(Op::Write as u8)
            .u8(1)
            .u8(1)
            .u64(8192)
            .u8(5);
        for i in 0..5u16 {
            seg(&mut w, (i % 2) as u8, i * 512, 512);
        }
        w.u8(9).u16(3).u8(Op::Flush as u8).u8(0).u8(0).u64(0).u8(0);
        w.u8(10); // publish
        w.u8(4).u8(15); // worker pops
        w.u8(5);
        for tag in 1..4u16 {
            w.u8(6).u16(tag).u8(0).u64(0);
        }
        w.u8(7).u8(11).u8(15).u8(12).u8(18);
        out.push(("exchange", w.buf));
    }
    // Fill a 4-entry ring, sleep and wake on both sides.
    {
        let mut w = Writer::new();
        w.u8(2).u16(1);
        w.u8(8).u8(0); // worker sleeps
        for tag in 0..5u16 {
            w.u8(9)
                .u16(tag)
                .u8(Op::Discard as u8)
                .u8(0)
                .u8(2)
                .u64(tag as u64 * 512)
                .u8(0)
                .u64(512);
        }
        w.u8(10).u8(4).u8(0).u8(8).u8(1).u8(13).u8(1);
        w.u8(6).u16(0).u8(1).u64(0).u8(7).u8(11).u8(0);
        w.u8(14).u8(15).u8(4).u8(3);
        out.push(("full-ring", w.buf));
    }
    // Hostile: raw entries with bad tags, ops and counts, then a producer
    // index far ahead.
    {
        let mut w = Writer::new();
        w.u8(2).u16(3);
        let raw = |w: &mut Writer, slot: u16, tag: u16, op: u8, nseg: u16, len: u64| {
            w.u8(1)
                .u16(slot)
                .u16(tag)
                .u8(op)
                .u8(0)
                .u16(nseg)
                .u64(0)
                .u64(len);
            w.u8(0).u8(0).u16(0).u16(512);
            w.u8(1).u8(0).u16(0).u16(512);
        };
        raw(&mut w, 0, 1, 1, 2, 1024);
        raw(&mut w, 1, 9, 1, 1, 512);
        raw(&mut w, 2, 2, 99, 0, 0);
        raw(&mut w, 3, 3, 2, 4, 2048);
        w.u8(2).u16(3).u16(2).u8(2);
        w.u8(0).u8(2).u16(0).u32(0xffff_ffff);
        w.u8(1).u8(1).u64(u64::MAX - 100).u16(512);
        w.u8(3).u8(0).bool(false).u32(4);
        w.u8(4).u8(7);
        w.u8(3).u8(0).bool(true).u32(100);
        w.u8(4).u8(0);
        out.push(("hostile-entries", w.buf));
    }
    out
}

/// Known bug (reported): the frontend's `status_of` negates the worker's
/// result, which overflows for `i32::MIN`.
pub fn known() -> Vec<(&'static str, Vec<u8>)> {
    let mut w = Writer::new();
    w.u8(0).u16(0); // one entry
    w.u8(6).u16(0).u8(3).u32(i32::MIN as u32).u64(0); // worker completes tag 0
    w.u8(7).u8(11).u8(0); // publishes; the frontend pops
    vec![("status-of-i32-min", w.buf)]
}
