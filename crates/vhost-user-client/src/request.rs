//! virtio-blk requests and the descriptor chains that carry them.
//!
//! A [`RequestSpec`] is a well-formed request (header, data, status).
//! [`RequestSpec::chain`] turns it into a [`Chain`]: a list of [`Part`]s,
//! one descriptor each, which a test may bend before submitting it (flip a
//! direction flag, point a part outside guest RAM, add a loop, put the
//! chain in an indirect table...).

use crate::layout::VRING_DESC_F_WRITE;

/// `VIRTIO_BLK_T_IN`: read.
pub const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
/// `VIRTIO_BLK_T_OUT`: write.
pub const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
/// `VIRTIO_BLK_T_GET_ID`: the 20-byte serial.
pub const T_GET_ID: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

pub use crate::status::{STATUS_UNTOUCHED, S_IOERR, S_OK, S_UNSUPP};

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 =
    virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Bytes of a sector, the unit of request offsets.
pub const SECTOR: u64 = 512;
/// Bytes of the request header (`type u32, ioprio u32, sector u64`).
pub const HEADER_SIZE: usize = 16;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// The 16-byte request header.
pub fn header(req_type: u32, sector: u64) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One 16-byte discard / write-zeroes segment
/// (`sector u64, num_sectors u32, flags u32`).
pub fn range_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A virtio-blk request: header fields, the bytes the device reads after
/// the header, and how many bytes it may write before the status byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestSpec {
    /// `VIRTIO_BLK_T_*` (any value: unknown types are allowed).
    pub req_type: u32,
    /// The header's `ioprio` field.
    pub ioprio: u32,
    /// The header's `sector` field.
    pub sector: u64,
    /// Device-readable bytes after the header (write data, discard ranges).
    pub out: Vec<u8>,
    /// Device-writable bytes before the status byte (read data, the ID).
    pub in_len: u32,
}

impl RequestSpec {
    /// A request of `req_type` with no data.
    pub fn new(req_type: u32, sector: u64) -> Self {
        RequestSpec {
            req_type,
            ioprio: 0,
            sector,
            out: Vec::new(),
            in_len: 0,
        }
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        RequestSpec {
            in_len: len,
            ..Self::new(T_IN, sector)
        }
    }

    /// Writes `data` at `sector`.
    pub fn write(sector: u64, data: &[u8]) -> Self {
        RequestSpec {
            out: data.to_vec(),
            ..Self::new(T_OUT, sector)
        }
    }

    /// A flush.
    pub fn flush() -> Self {
        Self::new(T_FLUSH, 0)
    }

    /// GET_ID, with room for the 20-byte serial.
    pub fn get_id() -> Self {
        RequestSpec {
            in_len: ID_BYTES as u32,
            ..Self::new(T_GET_ID, 0)
        }
    }

    /// Discards `num` sectors from `sector` (one range).
    pub fn discard(sector: u64, num: u32) -> Self {
        RequestSpec {
            out: range_segment(sector, num, 0).to_vec(),
            ..Self::new(T_DISCARD, 0)
        }
    }

    /// Zeroes `num` sectors from `sector` (one range); `unmap` allows the
    /// device to deallocate them.
    pub fn write_zeroes(sector: u64, num: u32, unmap: bool) -> Self {
        let flags = if unmap { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        RequestSpec {
            out: range_segment(sector, num, flags).to_vec(),
            ..Self::new(T_WRITE_ZEROES, 0)
        }
    }

    /// A zone report from the zone containing `sector`, with room for
    /// `zones` descriptors after the 64-byte header (needs ZONED).
    pub fn zone_report(sector: u64, zones: u32) -> Self {
        let len = crate::zone::report_len(zones).min(u32::MAX as u64) as u32;
        RequestSpec {
            in_len: len,
            ..Self::new(crate::zone::T_ZONE_REPORT, sector)
        }
    }

    /// A zone management request without data: `req_type` is one of
    /// [`crate::zone::T_ZONE_OPEN`], `_CLOSE`, `_FINISH`, `_RESET` (with
    /// the zone's first sector) or `_RESET_ALL` (sector 0).
    pub fn zone_mgmt(req_type: u32, sector: u64) -> Self {
        Self::new(req_type, sector)
    }

    /// Appends `data` to the zone starting at `sector`; the device writes
    /// the sector where it landed into the 8 writable bytes before the
    /// status (returned as [`Completion::data`]).
    pub fn zone_append(sector: u64, data: &[u8]) -> Self {
        RequestSpec {
            out: data.to_vec(),
            in_len: crate::zone::APPEND_SECTOR_SIZE,
            ..Self::new(crate::zone::T_ZONE_APPEND, sector)
        }
    }

    /// The 16-byte header.
    pub fn header(&self) -> [u8; HEADER_SIZE] {
        let mut h = header(self.req_type, self.sector);
        h[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        h
    }

    /// The chain a well-behaved driver builds: header (readable), data out
    /// (readable, if any), data in (writable, if any), status (writable).
    pub fn chain(&self) -> Chain {
        let mut c = Chain::new().part(Part::readable(&self.header()));
        if !self.out.is_empty() {
            c = c.part(Part::readable(&self.out));
        }
        if self.in_len > 0 {
            c = c.part(Part::writable(self.in_len));
        }
        c.part(Part::status())
    }
}

/// Where a part's descriptor points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Buf {
    /// A fresh guest buffer holding these bytes (freed on completion).
    Bytes(Vec<u8>),
    /// A fixed guest address and length, taken as is: outside guest RAM,
    /// crossing its end, overlapping another buffer...
    At {
        /// Guest address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
}

/// One descriptor of a [`Chain`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The buffer.
    pub buf: Buf,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
    /// Extra `VRING_DESC_F_*` bits OR-ed into the descriptor's flags (e.g.
    /// `VRING_DESC_F_INDIRECT` for a nested indirect table).
    pub extra_flags: u16,
    /// This part is the status byte: its first byte is reported as
    /// [`Completion::status`].
    pub is_status: bool,
}

impl Part {
    /// A device-readable buffer holding `bytes`.
    pub fn readable(bytes: &[u8]) -> Part {
        Part {
            buf: Buf::Bytes(bytes.to_vec()),
            writable: false,
            extra_flags: 0,
            is_status: false,
        }
    }

    /// A device-writable buffer of `len` zero bytes; its contents are
    /// returned in [`Completion::data`].
    pub fn writable(len: u32) -> Part {
        Part {
            buf: Buf::Bytes(vec![0; len as usize]),
            writable: true,
            extra_flags: 0,
            is_status: false,
        }
    }

    /// The 1-byte writable status, pre-set to [`STATUS_UNTOUCHED`].
    pub fn status() -> Part {
        Part {
            buf: Buf::Bytes(vec![STATUS_UNTOUCHED]),
            writable: true,
            extra_flags: 0,
            is_status: true,
        }
    }

    /// A descriptor for `[addr, addr + len)` exactly as given.
    pub fn at(addr: u64, len: u32, writable: bool) -> Part {
        Part {
            buf: Buf::At { addr, len },
            writable,
            extra_flags: 0,
            is_status: false,
        }
    }

    /// Sets the direction (`VRING_DESC_F_WRITE`).
    pub fn with_writable(mut self, writable: bool) -> Part {
        self.writable = writable;
        self
    }

    /// ORs `flags` into the descriptor's flags.
    pub fn with_flags(mut self, flags: u16) -> Part {
        self.extra_flags |= flags;
        self
    }

    /// The descriptor's length.
    pub fn len(&self) -> u32 {
        match &self.buf {
            Buf::Bytes(b) => b.len() as u32,
            Buf::At { len, .. } => *len,
        }
    }

    /// Whether the descriptor's length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The descriptor flags, without `NEXT`.
    pub fn flags(&self) -> u16 {
        (if self.writable { VRING_DESC_F_WRITE } else { 0 }) | self.extra_flags
    }
}

/// Where a link in a [`Chain`] points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The descriptor of another part of the same chain (a loop when it
    /// comes earlier).
    Part(usize),
    /// A raw descriptor index (e.g. one past the table).
    Index(u16),
}

/// A descriptor chain to submit: parts in order, linked with `NEXT`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// The descriptors, in chain order.
    pub parts: Vec<Part>,
    /// Put the parts in an indirect table referenced by one ring
    /// descriptor.
    pub indirect: bool,
    /// Overrides of the `next` link of a part (which also gets `NEXT`):
    /// loops, out-of-range indices.
    pub links: Vec<(usize, Target)>,
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Chain {
        Chain::default()
    }

    /// Appends a part.
    pub fn part(mut self, p: Part) -> Chain {
        self.parts.push(p);
        self
    }

    /// Puts the chain in an indirect table.
    pub fn indirect(mut self) -> Chain {
        self.indirect = true;
        self
    }

    /// Links part `from` to `to` (setting `NEXT` on it).
    pub fn link(mut self, from: usize, to: Target) -> Chain {
        self.links.push((from, to));
        self
    }

    /// Makes the last part point back to the first: an endless chain.
    pub fn looped(self) -> Chain {
        let last = self.parts.len().saturating_sub(1);
        self.link(last, Target::Part(0))
    }

    /// Changes part `i` with `f` (for bending a well-formed chain).
    pub fn map_part(mut self, i: usize, f: impl FnOnce(Part) -> Part) -> Chain {
        let p = self.parts.remove(i);
        self.parts.insert(i, f(p));
        self
    }
}

/// Identifies a submitted chain until its completion is collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// A used-ring entry and what the driver read back for it.
#[derive(Clone, PartialEq, Eq)]
pub struct Completion {
    /// The chain it completes; `None` when the device returned an id the
    /// driver had not made available (or had already seen completed).
    pub token: Option<Token>,
    /// The id field of the used element (a descriptor head).
    pub head: u32,
    /// The used element's `len`: bytes the device says it wrote.
    pub used_len: u32,
    /// The status byte, if the chain had one inside guest RAM
    /// ([`STATUS_UNTOUCHED`] if the device did not write it).
    pub status: Option<u8>,
    /// Contents of the chain's writable data parts, concatenated.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Completion {
    /// Shows the data's length and first bytes, not all of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = &self.data[..self.data.len().min(8)];
        f.debug_struct("Completion")
            .field("token", &self.token)
            .field("head", &self.head)
            .field("used_len", &self.used_len)
            .field("status", &self.status)
            .field(
                "data",
                &format_args!(
                    "{} bytes {:02x?}{}",
                    self.data.len(),
                    head,
                    if self.data.len() > 8 { "…" } else { "" }
                ),
            )
            .finish()
    }
}

impl Completion {
    /// Whether the status byte is `VIRTIO_BLK_S_OK`.
    pub fn is_ok(&self) -> bool {
        self.status == Some(S_OK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_little_endian_type_ioprio_sector() {
        let mut r = RequestSpec::read(0x0102_0304_0506_0708, 512);
        r.ioprio = 7;
        let h = r.header();
        assert_eq!(&h[0..4], &T_IN.to_le_bytes());
        assert_eq!(&h[4..8], &7u32.to_le_bytes());
        assert_eq!(h[8], 0x08);
        assert_eq!(h[15], 0x01);
    }

    #[test]
    fn read_chain_is_header_data_status() {
        let c = RequestSpec::read(0, 4096).chain();
        let shape: Vec<(u32, bool, bool)> = c
            .parts
            .iter()
            .map(|p| (p.len(), p.writable, p.is_status))
            .collect();
        assert_eq!(
            shape,
            vec![(16, false, false), (4096, true, false), (1, true, true)]
        );
    }

    #[test]
    fn write_and_discard_carry_readable_payload() {
        let w = RequestSpec::write(8, &[1; 1024]).chain();
        assert_eq!(w.parts.len(), 3);
        assert!(!w.parts[1].writable);
        assert_eq!(w.parts[1].len(), 1024);
        let d = RequestSpec::write_zeroes(16, 8, true);
        assert_eq!(
            d.out,
            range_segment(16, 8, WRITE_ZEROES_FLAG_UNMAP).to_vec()
        );
        assert_eq!(RequestSpec::flush().chain().parts.len(), 2);
    }

    #[test]
    fn zone_requests_have_the_spec_layouts() {
        // Append: header, data (readable), append_sector + status (writable).
        let a = RequestSpec::zone_append(2048, &[7; 4096]).chain();
        let shape: Vec<(u32, bool)> = a.parts.iter().map(|p| (p.len(), p.writable)).collect();
        assert_eq!(
            shape,
            vec![(16, false), (4096, false), (8, true), (1, true)]
        );
        assert_eq!(a.parts[0].len(), 16);
        // Report: a 64-byte header and 64 bytes per zone.
        let r = RequestSpec::zone_report(5, 3);
        assert_eq!(r.in_len, 64 + 3 * 64);
        assert_eq!(r.header()[0..4], crate::zone::T_ZONE_REPORT.to_le_bytes());
        let m = RequestSpec::zone_mgmt(crate::zone::T_ZONE_RESET_ALL, 0).chain();
        assert_eq!(m.parts.len(), 2);
    }

    #[test]
    fn completion_debug_abbreviates_data() {
        let c = Completion {
            token: Some(Token(1)),
            head: 2,
            used_len: 4097,
            status: Some(S_OK),
            data: vec![0xab; 4096],
        };
        let s = format!("{c:?}");
        assert!(s.contains("4096 bytes [ab, ab"), "{s}");
        assert!(s.len() < 200, "{s}");
    }

    #[test]
    fn chain_helpers_bend_parts_and_links() {
        let c = RequestSpec::read(0, 512)
            .chain()
            .map_part(2, |p| p.with_writable(false))
            .looped();
        assert!(!c.parts[2].writable);
        assert_eq!(c.links, vec![(2, Target::Part(0))]);
        assert_eq!(
            Part::at(1, 2, false)
                .with_flags(crate::layout::VRING_DESC_F_INDIRECT)
                .flags(),
            4
        );
    }
}
