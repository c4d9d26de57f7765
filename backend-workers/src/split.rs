//! Splitting requests that break the graph's limits.
//!
//! The graph reports merged limits (the leaf's, made stricter by the nodes
//! above it, as QEMU's refresh_limits does). A request within them goes to
//! the leaf whole; one that is longer than `max_transfer`, has more memory
//! segments than `max_segments`, or is a discard / write-zeroes longer than
//! the leaf takes is cut here into sub-requests ("parts"). Data parts keep
//! pointing into guest memory (zero copy): a part takes whole segments and,
//! at its ends, pieces of segments. Cuts fall on multiples of
//! [`SplitLimits::unit`] from the request's start, so every part but the last
//! stays aligned for the device (offset and length) and every piece cut out
//! of a segment keeps the segment's memory alignment.
//!
//! This module is the arithmetic only; `queue/submit.rs` drives the parts
//! through the leaf and aggregates their completions.

use blkmesh_ipc::ring::{Op, Segment};
use blkmesh_proto::ipc::v1::Limits;

/// Sub-requests of one request in flight at the same time (the rest follow as
/// these complete).
pub const LANES: usize = 8;

/// The graph's limits, in the form the queue loop checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLimits {
    /// Cut granularity in bytes (a power of two): the logical block size, the
    /// device's request alignment and the buffer alignment, whichever is
    /// largest.
    pub unit: u64,
    /// Largest data part: `max_transfer` rounded down to `unit` (but at least
    /// one unit); `u64::MAX` when unlimited.
    pub max_transfer: u64,
    /// Most memory segments in one part; `usize::MAX` when unlimited.
    pub max_segments: usize,
    /// Largest discard / write-zeroes part (multiples of the block size);
    /// `u64::MAX` when unlimited.
    pub max_discard: u64,
    pub max_write_zeroes: u64,
    /// `buf_alignment - 1`: a buffer address or length with any of these bits
    /// set needs a bounce buffer.
    pub buf_mask: usize,
}

/// A power of two not smaller than `v` (at least 1), saturating.
fn pow2(v: u32) -> u64 {
    (v.max(1) as u64).next_power_of_two()
}

/// `a` and `b` where 0 means "no limit": the stricter.
pub fn min_nonzero<T: Ord + Default + Copy>(a: T, b: T) -> T {
    let zero = T::default();
    if a == zero {
        b
    } else if b == zero {
        a
    } else {
        a.min(b)
    }
}

impl SplitLimits {
    /// `discard_as_write_zeroes`: the leaf turns discards into write-zeroes
    /// (hole punching on files), so both limits apply to them.
    pub fn new(l: &Limits, discard_as_write_zeroes: bool) -> Self {
        let lbs = pow2(l.logical_block_size.max(512));
        let block = lbs.max(pow2(l.request_alignment));
        let buf = pow2(l.buf_alignment);
        let unit = block.max(buf);
        // 0 = unlimited; otherwise rounded down to the granularity, and never
        // below one granule (a request cannot be cut finer than that).
        let cap = |v: u64, g: u64| {
            if v == 0 {
                u64::MAX
            } else {
                (v - v % g).max(g)
            }
        };
        let discard = if discard_as_write_zeroes {
            min_nonzero(l.max_discard, l.max_write_zeroes)
        } else {
            l.max_discard
        };
        SplitLimits {
            unit,
            max_transfer: cap(l.max_transfer, unit),
            max_segments: match l.max_segments {
                0 => usize::MAX,
                n => n as usize,
            },
            max_discard: cap(discard, block),
            max_write_zeroes: cap(l.max_write_zeroes, block),
            buf_mask: (buf - 1) as usize,
        }
    }

    /// Largest part of a range op (discard, write-zeroes); `None` for others.
    pub fn max_range(&self, op: Op) -> Option<u64> {
        match op {
            Op::Discard => Some(self.max_discard),
            Op::WriteZeroes => Some(self.max_write_zeroes),
            _ => None,
        }
    }

    /// Whether a data request of `len` bytes in `nseg` segments must be cut.
    #[inline]
    pub fn data_needs_split(&self, len: u64, nseg: usize) -> bool {
        len > self.max_transfer || nseg > self.max_segments
    }

    /// Whether segments whose lengths OR together to `len_bits` can be cut
    /// at unit boundaries without breaking a piece's alignment (every
    /// segment a multiple of the unit). Otherwise the request is bounced.
    #[inline]
    pub fn segments_cuttable(&self, len_bits: usize) -> bool {
        len_bits as u64 & (self.unit - 1) == 0
    }
}

/// Something with a length that can be cut: a guest [`Segment`] or an iovec.
pub trait Piece: Copy {
    /// Bytes.
    fn bytes(&self) -> u64;
    /// `len` bytes from `off` on.
    fn slice(&self, off: u64, len: u64) -> Self;
}

impl Piece for Segment {
    fn bytes(&self) -> u64 {
        self.len as u64
    }

    fn slice(&self, off: u64, len: u64) -> Self {
        Segment {
            region: self.region,
            // off + len <= self.len (u32), so neither overflows.
            len: len as u32,
            offset: self.offset.saturating_add(off),
        }
    }
}

impl Piece for libc::iovec {
    fn bytes(&self) -> u64 {
        self.iov_len as u64
    }

    fn slice(&self, off: u64, len: u64) -> Self {
        libc::iovec {
            // Address arithmetic only; the driver dereferences it.
            iov_base: self.iov_base.wrapping_byte_add(off as usize),
            iov_len: len as usize,
        }
    }
}

/// Where the next part of a request starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Bytes of the request already handed out.
    pub pos: u64,
    /// Segment the next byte is in, and its offset there.
    seg: usize,
    seg_off: u64,
}

impl Cursor {
    pub fn is_done(&self, len: u64) -> bool {
        self.pos >= len
    }
}

/// Cuts the next data part out of `src` (the request's segments, `len` bytes
/// in all) at `cur` into `out` (cleared first): at most `max_transfer` bytes
/// in at most `max_segments` pieces. Returns the part's offset in the request
/// and its length, or `None` once the request is used up.
///
/// Parts end on whole units (except the request's last) provided every
/// segment is a multiple of the unit ([`SplitLimits::segments_cuttable`]);
/// the caller bounces requests where that does not hold.
pub fn next_vectored<P: Piece>(
    src: &[P],
    len: u64,
    lim: &SplitLimits,
    cur: &mut Cursor,
    out: &mut Vec<P>,
) -> Option<(u64, u64)> {
    out.clear();
    let start = cur.pos;
    let budget = lim.max_transfer.min(len.saturating_sub(start));
    let mut taken = 0u64;
    while taken < budget && out.len() < lim.max_segments && cur.seg < src.len() {
        let s = &src[cur.seg];
        let avail = s.bytes().saturating_sub(cur.seg_off);
        let n = avail.min(budget - taken);
        if n > 0 {
            out.push(s.slice(cur.seg_off, n));
            taken += n;
        }
        if n == avail {
            cur.seg += 1;
            cur.seg_off = 0;
        } else {
            cur.seg_off += n;
        }
    }
    if taken == 0 {
        return None;
    }
    let excess = taken % lim.unit;
    if excess != 0 && excess < taken && start + taken < len {
        // A part that is not the last ended off a unit boundary: only
        // possible with segments that are not multiples of the unit, which
        // the caller bounces instead. Still end on a unit where we can.
        trim(out, excess);
        taken -= excess;
        rewind(src, cur, excess);
    }
    cur.pos = start + taken;
    Some((start, taken))
}

/// Drops the last `excess` bytes of `out`.
fn trim<P: Piece>(out: &mut Vec<P>, mut excess: u64) {
    while excess > 0 {
        let Some(last) = out.last_mut() else { return };
        if last.bytes() <= excess {
            excess -= last.bytes();
            out.pop();
        } else {
            *last = last.slice(0, last.bytes() - excess);
            excess = 0;
        }
    }
}

/// Moves the segment cursor back by `n` bytes.
fn rewind<P: Piece>(src: &[P], cur: &mut Cursor, mut n: u64) {
    while n > 0 {
        if cur.seg_off >= n {
            cur.seg_off -= n;
            return;
        }
        n -= cur.seg_off;
        if cur.seg == 0 {
            cur.seg_off = 0;
            return;
        }
        cur.seg -= 1;
        cur.seg_off = src[cur.seg].bytes();
    }
}

/// The next part of a contiguous range (a bounce buffer, a discard):
/// at most `max` bytes at `cur.pos`. Returns its offset in the request and
/// its length, or `None` once the range is used up.
pub fn next_linear(len: u64, max: u64, cur: &mut Cursor) -> Option<(u64, u64)> {
    let start = cur.pos;
    let n = max.min(len.saturating_sub(start));
    if n == 0 {
        return None;
    }
    cur.pos = start + n;
    Some((start, n))
}

/// Offset on the leaf of a part `at` bytes into a request that starts at
/// `base`; `None` if the part (`n` bytes) would run past the end of the
/// 64-bit offset space.
pub fn part_offset(base: u64, at: u64, n: u64) -> Option<u64> {
    let off = base.checked_add(at)?;
    off.checked_add(n)?;
    Some(off)
}

/// Number of parts a contiguous range of `len` bytes is cut into.
pub fn linear_parts(len: u64, max: u64) -> u64 {
    len.div_ceil(max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_transfer: u64, max_segments: u32, buf_alignment: u32) -> SplitLimits {
        SplitLimits::new(
            &Limits {
                size: 1 << 30,
                logical_block_size: 512,
                physical_block_size: 512,
                request_alignment: 1,
                buf_alignment,
                optimal_io_size: 0,
                max_transfer,
                max_segments,
                max_discard: 0,
                max_write_zeroes: 0,
                read_only: false,
                zones: None,
            },
            false,
        )
    }

    fn seg(region: u32, offset: u64, len: u32) -> Segment {
        Segment {
            region,
            len,
            offset,
        }
    }

    /// Every part of a request, as (offset in request, length, pieces).
    fn parts<P: Piece>(src: &[P], lim: &SplitLimits) -> Vec<(u64, u64, Vec<P>)> {
        let len = src.iter().map(|p| p.bytes()).sum();
        let mut cur = Cursor::default();
        let mut out = Vec::new();
        let mut v = Vec::new();
        while let Some((at, n)) = next_vectored(src, len, lim, &mut cur, &mut out) {
            assert_eq!(out.iter().map(|p| p.bytes()).sum::<u64>(), n);
            v.push((at, n, out.clone()));
            assert!(v.len() < 10_000, "no progress");
        }
        assert!(cur.is_done(len));
        v
    }

    #[test]
    fn limits_round_to_the_unit_and_treat_zero_as_unlimited() {
        let l = limits(0, 0, 0);
        assert_eq!(l.unit, 512);
        assert_eq!(l.max_transfer, u64::MAX);
        assert_eq!(l.max_segments, usize::MAX);
        assert_eq!(l.max_discard, u64::MAX);
        assert_eq!(l.buf_mask, 0);
        assert!(!l.data_needs_split(u32::MAX as u64, 1024));

        let l = limits(8192 + 512, 2, 4096);
        assert_eq!(l.unit, 4096, "buffer alignment joins the unit");
        assert_eq!(l.max_transfer, 8192, "rounded down to the unit");
        assert_eq!(l.buf_mask, 4095);
        assert!(l.data_needs_split(8193, 1));
        assert!(l.data_needs_split(4096, 3));
        assert!(!l.data_needs_split(8192, 2));

        // Smaller than one unit: a unit (no part can be smaller).
        assert_eq!(limits(512, 0, 4096).max_transfer, 4096);
        // A non-power-of-two alignment is made one (stricter).
        assert_eq!(limits(0, 0, 3000).buf_mask, 4095);
    }

    #[test]
    fn discard_limits_follow_write_zeroes_when_discard_punches_holes() {
        let base = Limits {
            logical_block_size: 4096,
            max_discard: 1 << 20,
            max_write_zeroes: 64 << 10,
            ..Default::default()
        };
        let l = SplitLimits::new(&base, false);
        assert_eq!(l.max_range(Op::Discard), Some(1 << 20));
        assert_eq!(l.max_range(Op::WriteZeroes), Some(64 << 10));
        assert_eq!(l.max_range(Op::Read), None);
        let l = SplitLimits::new(&base, true);
        assert_eq!(l.max_range(Op::Discard), Some(64 << 10));
        // Rounded down to the block size.
        let l = SplitLimits::new(
            &Limits {
                logical_block_size: 4096,
                max_discard: 10_000,
                ..Default::default()
            },
            false,
        );
        assert_eq!(l.max_discard, 8192);
    }

    #[test]
    fn min_nonzero_prefers_the_stricter_limit() {
        assert_eq!(min_nonzero(0u64, 0), 0);
        assert_eq!(min_nonzero(0u64, 5), 5);
        assert_eq!(min_nonzero(7u32, 0), 7);
        assert_eq!(min_nonzero(7u32, 5), 5);
    }

    #[test]
    fn a_segment_longer_than_max_transfer_is_cut_inside() {
        let l = limits(8192, 2, 4096);
        let p = parts(&[seg(3, 0x10000, 20480)], &l);
        assert_eq!(
            p,
            vec![
                (0, 8192, vec![seg(3, 0x10000, 8192)]),
                (8192, 8192, vec![seg(3, 0x12000, 8192)]),
                (16384, 4096, vec![seg(3, 0x14000, 4096)]),
            ]
        );
    }

    #[test]
    fn segments_are_grouped_by_max_segments() {
        let l = limits(0, 2, 0);
        let src = [
            seg(0, 0, 512),
            seg(0, 4096, 1024),
            seg(1, 0, 512),
            seg(1, 8192, 512),
            seg(2, 0, 1536),
        ];
        let p = parts(&src, &l);
        assert_eq!(
            p,
            vec![
                (0, 1536, src[0..2].to_vec()),
                (1536, 1024, src[2..4].to_vec()),
                (2560, 1536, src[4..5].to_vec()),
            ]
        );
    }

    #[test]
    fn both_limits_cut_mid_segment_and_carry_the_rest_over() {
        // 4 KiB parts of at most 2 pieces over 3 KiB + 3 KiB + 2 KiB.
        let l = limits(4096, 2, 0);
        let src = [seg(0, 0, 3072), seg(0, 8192, 3072), seg(0, 16384, 2048)];
        let p = parts(&src, &l);
        assert_eq!(
            p,
            vec![
                (0, 4096, vec![seg(0, 0, 3072), seg(0, 8192, 1024)]),
                (4096, 4096, vec![seg(0, 9216, 2048), seg(0, 16384, 2048)]),
            ]
        );
        // Every part but the last is whole units; parts tile the request.
        let l = limits(2560, 3, 0);
        let p = parts(&src, &l);
        let mut at = 0;
        for (i, (off, n, pieces)) in p.iter().enumerate() {
            assert_eq!(*off, at);
            assert!(pieces.len() <= 3 && *n <= 2560);
            if i + 1 < p.len() {
                assert_eq!(n % 512, 0);
            }
            at += n;
        }
        assert_eq!(at, 8192);
    }

    #[test]
    fn iovecs_are_cut_at_the_right_addresses() {
        let l = limits(8192, 1, 0);
        let iov = |addr: usize, len: usize| libc::iovec {
            iov_base: std::ptr::null_mut::<libc::c_void>().wrapping_byte_add(addr),
            iov_len: len,
        };
        let p = parts(&[iov(0x10000, 12288), iov(0x40000, 4096)], &l);
        type Flat = Vec<(u64, u64, Vec<(usize, usize)>)>;
        let flat: Flat = p
            .into_iter()
            .map(|(o, n, v)| {
                (
                    o,
                    n,
                    v.iter().map(|i| (i.iov_base as usize, i.iov_len)).collect(),
                )
            })
            .collect();
        assert_eq!(
            flat,
            vec![
                (0, 8192, vec![(0x10000, 8192)]),
                (8192, 4096, vec![(0x12000, 4096)]),
                (12288, 4096, vec![(0x40000, 4096)]),
            ]
        );
    }

    #[test]
    fn within_limits_is_one_part() {
        let l = limits(1 << 20, 4, 0);
        let src = [seg(0, 0, 4096), seg(0, 65536, 8192)];
        assert_eq!(parts(&src, &l), vec![(0, 12288, src.to_vec())]);
    }

    #[test]
    fn zero_length_requests_have_no_parts() {
        let l = limits(4096, 1, 0);
        let mut cur = Cursor::default();
        let mut out = vec![seg(0, 0, 1)];
        assert_eq!(
            next_vectored::<Segment>(&[], 0, &l, &mut cur, &mut out),
            None
        );
        assert!(out.is_empty());
        assert_eq!(next_linear(0, 4096, &mut cur), None);
        assert_eq!(linear_parts(0, 4096), 0);
        // Empty segments are skipped, not turned into empty pieces.
        let p = parts(&[seg(0, 0, 0), seg(0, 512, 512), seg(0, 0, 0)], &l);
        assert_eq!(p, vec![(0, 512, vec![seg(0, 512, 512)])]);
    }

    #[test]
    fn segments_shorter_than_a_unit_are_flagged_for_bouncing() {
        let l = limits(4096, 2, 0);
        assert!(l.segments_cuttable(4096 | 512 | 1024));
        assert!(!l.segments_cuttable(4096 | 100));
        // Fed anyway, the parts still tile the request and end on units
        // where the segments allow it.
        let src = [
            seg(0, 0, 100),
            seg(0, 1000, 412),
            seg(0, 2000, 1500),
            seg(0, 9000, 2084),
        ];
        let p = parts(&src, &l);
        let total: u64 = p.iter().map(|(_, n, _)| n).sum();
        assert_eq!(total, 4096);
        assert!(p.iter().all(|(_, _, v)| v.len() <= 2));
    }

    #[test]
    fn part_offsets_that_would_wrap_are_refused() {
        assert_eq!(part_offset(4096, 8192, 8192), Some(12288));
        assert_eq!(
            part_offset(u64::MAX - 8191, 4096, 4095),
            Some(u64::MAX - 4095)
        );
        assert_eq!(part_offset(u64::MAX - 8191, 4096, 4096), None);
        assert_eq!(part_offset(u64::MAX, 1, 0), None);
        // The cursor itself never wraps, even at the top of the range.
        let mut cur = Cursor {
            pos: u64::MAX - 100,
            ..Default::default()
        };
        assert_eq!(
            next_linear(u64::MAX, 4096, &mut cur),
            Some((u64::MAX - 100, 100))
        );
        assert_eq!(next_linear(u64::MAX, 4096, &mut cur), None);
    }

    #[test]
    fn linear_parts_cover_the_range() {
        let mut cur = Cursor::default();
        let mut v = Vec::new();
        while let Some(p) = next_linear(20480, 8192, &mut cur) {
            v.push(p);
        }
        assert_eq!(v, vec![(0, 8192), (8192, 8192), (16384, 4096)]);
        assert_eq!(linear_parts(20480, 8192), 3);
        assert_eq!(linear_parts(16384, 8192), 2);
        // An unlimited maximum gives one part, even for the largest range.
        let mut cur = Cursor::default();
        assert_eq!(
            next_linear(u64::MAX, u64::MAX, &mut cur),
            Some((0, u64::MAX))
        );
        assert_eq!(next_linear(u64::MAX, u64::MAX, &mut cur), None);
    }
}
