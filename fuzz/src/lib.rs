//! The fuzz targets' code. Each target in `fuzz_targets/` is one line that
//! calls a `run` here, so the input formats, the seed writer
//! (`src/bin/gen_seeds.rs`) and the checks live side by side.
//!
//! Inputs are read with [`Reader`]: a byte cursor whose reads never fail
//! (missing bytes read as zero), so every byte string is a valid input and
//! a seed is just the same sequence of fields written with [`Writer`].
//!
//! - [`chain`]: virtio-blk descriptor chains (frontend `request/`), fed
//!   both as descriptor lists and through a real `virtio_queue::Queue` over
//!   fuzzed guest memory; every request it submits goes through a ring to
//!   the worker side and against the worker's own guest RAM mapping.
//! - [`ring`]: the shared queue rings (`crates/ipc/src/ring/`) with a
//!   hostile peer scribbling on the shared memory between the worker's and
//!   the frontend's operations, plus an exact model while nobody scribbles.
//! - [`control`]: control-channel datagrams (`channel.rs`) decoded as
//!   `Request` (then handled as the worker's connection does, up to opening
//!   graphs with non-file leaves and mapping guest RAM) or `Reply` (then
//!   turned into the frontend's config space), and guest-RAM segments.
//! - [`memtable`]: the frontend's vhost-user memory table (`memory.rs`).
//! - [`image`]: qcow2 image files opened through `blkmesh-image` (imago),
//!   then read, mapped and described (`image info`).
//!
//! The bugs these targets found are fixed, and their inputs kept in the
//! corpora (`regress-*`). Should a bug be found that cannot be fixed at
//! once, it can be stepped around here until it is; `BLKMESH_FUZZ_KNOWN=0`
//! then skips it (see [`strict`]).

pub mod chain;
pub mod control;
pub mod image;
pub mod memtable;
pub mod ring;

use std::fs::File;

/// Whether known bugs should crash (the default, now that all known ones
/// are fixed) rather than be stepped around (`BLKMESH_FUZZ_KNOWN=0`).
pub fn strict() -> bool {
    use std::sync::OnceLock;
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("BLKMESH_FUZZ_KNOWN").is_none_or(|v| v != "0"))
}

/// Whether to describe what each input did on stderr
/// (`BLKMESH_FUZZ_DEBUG=1`; for checking seeds, far too slow for fuzzing).
pub fn debug() -> bool {
    use std::sync::OnceLock;
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("BLKMESH_FUZZ_DEBUG").is_some_and(|v| v == "1"))
}

/// A byte cursor over a fuzz input; reads past the end yield zeroes.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// A byte string: a u16 length, then that many bytes (fewer at the end
    /// of the input), at most `max`.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.u16() as usize).min(max).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
}

/// Writes fields in [`Reader`]'s format (for seeds).
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16);
        self.buf.extend_from_slice(b);
        self
    }
}

/// A memfd of `len` bytes (guest RAM stand-in). With `seal`, sealed against
/// shrinking and growing as blkmesh's own memfds are.
pub fn memfd(name: &str, len: u64, seal: bool) -> File {
    let m = memfd::MemfdOptions::new()
        .allow_sealing(seal)
        .close_on_exec(true)
        .create(name)
        .expect("memfd_create");
    m.as_file().set_len(len).expect("ftruncate memfd");
    if seal {
        m.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .expect("seal memfd");
    }
    m.into_file()
}

/// Reads one byte of a mapping: a segment that was accepted but points
/// outside its mapping faults here instead of passing silently.
pub fn touch(p: *const u8) -> u8 {
    // SAFETY: callers pass pointers they have checked to lie inside a live
    // mapping; the point of the read is to fault if that check was wrong.
    unsafe { p.read_volatile() }
}
