//! Zone ioctls of Linux zoned block devices (`<linux/blkzoned.h>`).
//!
//! The worker passes a host-managed (or host-aware) device through to the
//! guest: reports come from `BLKREPORTZONE`, zone management from
//! `BLKOPENZONE`, `BLKCLOSEZONE`, `BLKFINISHZONE` and `BLKRESETZONE`. These
//! are the only unsafe calls involved, so they live here behind safe
//! functions taking a borrowed fd and plain numbers (512-byte sectors, as
//! the kernel's interface has them).
//!
//! Under `--seccomp` the worker's filter must allow ioctl type `0x12`
//! (the block layer's) for these to work.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `struct blk_zone_report` without its trailing array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BlkZoneReportHdr {
    sector: u64,
    nr_zones: u32,
    flags: u32,
}

/// `struct blk_zone`: one zone descriptor as the kernel reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkZone {
    /// First sector of the zone.
    pub start: u64,
    /// Zone size in sectors.
    pub len: u64,
    /// Write pointer position (sector).
    pub wp: u64,
    /// `BLK_ZONE_TYPE_*`: 1 conventional, 2 sequential write required,
    /// 3 sequential write preferred.
    pub zone_type: u8,
    /// `BLK_ZONE_COND_*`: the same numbers as virtio-blk's `z_state`.
    pub cond: u8,
    pub non_seq: u8,
    pub reset: u8,
    pub resv: [u8; 4],
    /// Writable sectors from `start` (valid when the report says so, see
    /// [`report_zones`]; otherwise equal to `len`).
    pub capacity: u64,
    pub reserved: [u8; 24],
}

/// `struct blk_zone_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BlkZoneRange {
    sector: u64,
    nr_sectors: u64,
}

const _: () = assert!(std::mem::size_of::<BlkZone>() == 64);
const _: () = assert!(std::mem::size_of::<BlkZoneReportHdr>() == 16);
const _: () = assert!(std::mem::size_of::<BlkZoneRange>() == 16);

/// `BLK_ZONE_REP_CAPACITY`: the report's `capacity` fields are valid.
const BLK_ZONE_REP_CAPACITY: u32 = 1 << 0;

const BLKREPORTZONE: libc::Ioctl = libc::_IOWR::<BlkZoneReportHdr>(0x12, 130);
const BLKRESETZONE: libc::Ioctl = libc::_IOW::<BlkZoneRange>(0x12, 131);
const BLKOPENZONE: libc::Ioctl = libc::_IOW::<BlkZoneRange>(0x12, 134);
const BLKCLOSEZONE: libc::Ioctl = libc::_IOW::<BlkZoneRange>(0x12, 135);
const BLKFINISHZONE: libc::Ioctl = libc::_IOW::<BlkZoneRange>(0x12, 136);

/// Most zones asked for in one `BLKREPORTZONE` (bounds the buffer).
pub const MAX_REPORT: u32 = 4096;

/// Reports up to `max` zones (at most [`MAX_REPORT`]) from the zone
/// containing `sector`. A zone's `capacity` is set to its `len` when the
/// kernel does not report capacities.
pub fn report_zones(fd: BorrowedFd<'_>, sector: u64, max: u32) -> io::Result<Vec<BlkZone>> {
    let max = max.clamp(1, MAX_REPORT) as usize;
    // Header and descriptors in one u64-aligned buffer: the header is 16
    // bytes (2 words), each descriptor 64 bytes (8 words).
    let words = 2 + max * 8;
    let mut buf = vec![0u64; words];
    let hdr = BlkZoneReportHdr {
        sector,
        nr_zones: max as u32,
        flags: 0,
    };
    let base = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: `buf` holds at least 16 + 64 × max bytes, is 8-byte aligned
    // (as BlkZoneReportHdr and BlkZone need) and lives across the call; the
    // kernel writes at most `nr_zones` (= max) descriptors after the header
    // and updates the header's nr_zones and flags.
    let (n, flags) = unsafe {
        base.cast::<BlkZoneReportHdr>().write(hdr);
        if libc::ioctl(fd.as_raw_fd(), BLKREPORTZONE, base) < 0 {
            return Err(io::Error::last_os_error());
        }
        let out = base.cast::<BlkZoneReportHdr>().read();
        (out.nr_zones as usize, out.flags)
    };
    let n = n.min(max);
    let mut zones = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: descriptor i < max lies inside `buf` (see above), aligned
        // to 8 bytes; BlkZone is plain old data, valid for any bytes.
        let mut z = unsafe {
            base.add(std::mem::size_of::<BlkZoneReportHdr>())
                .cast::<BlkZone>()
                .add(i)
                .read()
        };
        if flags & BLK_ZONE_REP_CAPACITY == 0 {
            z.capacity = z.len;
        }
        zones.push(z);
    }
    Ok(zones)
}

/// A zone management operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneMgmt {
    Open,
    Close,
    Finish,
    Reset,
}

/// Applies `op` to the zones covering `nr_sectors` sectors from `sector`
/// (a zone start; `nr_sectors` a whole number of zones).
pub fn zone_mgmt(fd: BorrowedFd<'_>, op: ZoneMgmt, sector: u64, nr_sectors: u64) -> io::Result<()> {
    let req = match op {
        ZoneMgmt::Open => BLKOPENZONE,
        ZoneMgmt::Close => BLKCLOSEZONE,
        ZoneMgmt::Finish => BLKFINISHZONE,
        ZoneMgmt::Reset => BLKRESETZONE,
    };
    let range = BlkZoneRange { sector, nr_sectors };
    // SAFETY: the kernel only reads a struct blk_zone_range from the
    // pointer, which points at a live local of exactly that layout.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, &range as *const BlkZoneRange) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    // `Ioctl` is `c_ulong` with glibc and `c_int` elsewhere.
    #[allow(clippy::unnecessary_cast)]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/blkzoned.h> on x86_64 / arm64 (asm-generic ioctl.h).
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            assert_eq!(BLKREPORTZONE as u64, 0xc010_1282);
            assert_eq!(BLKRESETZONE as u64, 0x4010_1283);
            assert_eq!(BLKOPENZONE as u64, 0x4010_1286);
            assert_eq!(BLKCLOSEZONE as u64, 0x4010_1287);
            assert_eq!(BLKFINISHZONE as u64, 0x4010_1288);
        }
    }

    #[test]
    fn a_regular_file_is_not_zoned() {
        let f = tempfile::tempfile().unwrap();
        assert!(report_zones(f.as_fd(), 0, 4).is_err());
        assert!(zone_mgmt(f.as_fd(), ZoneMgmt::Reset, 0, 8).is_err());
    }
}
