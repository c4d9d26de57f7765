//! `image_open`: a qcow2 image file as the worker and `image info` open it,
//! through `blkmesh-image` (`open_chain`, `probe_format`, `info`) and so
//! through imago's qcow2 driver (its sync build). The image file is what an
//! operator or tenant hands over, so all of it is untrusted.
//!
//! Input format: the whole input is the image file's contents. It is
//! written to a memfd, which is opened by descriptor (`Source::File`; read
//! only, page cache, `no_backing`: a backing file named in the header is
//! never opened and unallocated clusters read as zeroes) and by its
//! `/proc/self/fd` path (`probe_format`, `info`).
//!
//! What an opened image is put through, bounded whatever its header says
//! (at most [`READ_BUDGET`] bytes read back, [`WALK_STEPS`] mapping
//! look-ups, `info` only for images of at most [`INFO_MAX_CLUSTERS`]
//! clusters, since its walk covers the whole virtual disk):
//!
//! - reads: the first clusters, across the first cluster and the first L2
//!   table boundary, the middle, the last clusters and across the end of
//!   the virtual disk, and past it;
//! - `get_shallow_mapping` walks over the first [`WALK_SPAN`] bytes and
//!   over the end, each range read back;
//! - `info`.
//!
//! Checks: no panic, hang or huge allocation. `probe_format` says qcow2
//! exactly for the qcow2 magic. An image that opens has the magic, version
//! 2 or 3, a cluster size imago supports, a virtual size of at most
//! [`MAX_IMAGE_SIZE`] and no external data file (refused, never opened).
//! Mappings: never `Indirect` (no backing image given), `Eof` exactly from
//! the virtual size on, otherwise a length of at least one byte that stays
//! within the request and the disk. Reads agree with the mappings: a `Raw`
//! range reads as the file's bytes at its host offset (zeroes past the
//! file's end), a `Zero` range and anything past the virtual size as
//! zeroes, and a long read equals its pieces read one mapping at a time.
//! `info`, when it succeeds, says what the header and the opened image say.
//!
//! Found here: imago 0.2.6 panics on a short feature name table
//! ([`known_feature_table_short`]); blkmesh-image's header check refuses
//! such images before imago parses them, so that input now fails cleanly.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use blkmesh_image::{info, open_chain, probe_format, Format, Image, Layer, ShallowMapping, Source};

/// `blkmesh-image`'s `create::MAX_IMAGE_SIZE` (not exported): the largest
/// virtual size its header check lets through.
pub const MAX_IMAGE_SIZE: u64 = 1 << 61;
/// Most bytes read back from one image.
pub const READ_BUDGET: u64 = 1 << 20;
/// Most bytes in one read.
const MAX_READ: u64 = 64 << 10;
/// Most `get_shallow_mapping` calls per image.
pub const WALK_STEPS: usize = 384;
/// How much of the start of the disk the first walk covers.
pub const WALK_SPAN: u64 = 256 << 10;
/// `info` walks the whole disk; only for images this small (in clusters).
pub const INFO_MAX_CLUSTERS: u64 = 4096;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Incompatible feature bit: the data is in an external data file.
const EXTERNAL_DATA_FILE: u64 = 1 << 2;

fn be32(d: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = d.get(at + i).copied().unwrap_or(0);
    }
    u32::from_be_bytes(b)
}

fn be64(d: &[u8], at: usize) -> u64 {
    (u64::from(be32(d, at)) << 32) | u64::from(be32(d, at + 4))
}

/// The header fields the checks need (zero where the input is short).
struct Header {
    version: u32,
    cluster_bits: u32,
    backing_offset: u64,
    backing_len: u32,
    incompatible: u64,
}

impl Header {
    fn parse(d: &[u8]) -> Header {
        let version = be32(d, 4);
        Header {
            version,
            backing_offset: be64(d, 8),
            backing_len: be32(d, 16),
            cluster_bits: be32(d, 20),
            incompatible: if version >= 3 { be64(d, 72) } else { 0 },
        }
    }
}

/// The image's bytes at `[offset, offset + buf.len())`: the file's, zero
/// past its end.
fn file_bytes(data: &[u8], offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < data.len() {
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
    }
}

/// An opened image and what is known of it.
struct Opened<'a> {
    image: Image,
    data: &'a [u8],
    size: u64,
    budget: u64,
    steps: usize,
}

impl Opened<'_> {
    /// Reads `len` bytes (at most [`MAX_READ`], within the budget) at
    /// `offset`; `None` if the budget is spent or the read failed.
    fn read(&mut self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let len = len.min(MAX_READ).min(self.budget);
        if len == 0 {
            return None;
        }
        self.budget -= len;
        let mut buf = vec![0u8; len as usize];
        match self.image.read(&mut buf[..], offset) {
            Ok(()) => {
                // Past the virtual size: zeroes.
                if let Some(past) = self.size.checked_sub(offset) {
                    if past < len {
                        assert!(
                            buf[past as usize..].iter().all(|&b| b == 0),
                            "read of {len} at {offset:#x} is not zero past the virtual size {:#x}",
                            self.size
                        );
                    }
                } else {
                    assert!(
                        buf.iter().all(|&b| b == 0),
                        "read past the end at {offset:#x}"
                    );
                }
                Some(buf)
            }
            Err(e) => {
                if crate::debug() {
                    eprintln!("  read {len} at {offset:#x}: {e}");
                }
                None
            }
        }
    }

    /// Walks the mappings of `[start, end)` (plus what lies past the
    /// virtual size, if the range reaches it), checking each and reading
    /// it back; then reads the covered range in one go and compares.
    fn walk(&mut self, start: u64, end: u64) {
        let mut at = start;
        // What the pieces read from `start` on, as long as each was read
        // whole, for comparing with one long read.
        let mut pieces: Vec<u8> = Vec::new();
        let mut contiguous = true;
        while at < end && self.steps < WALK_STEPS {
            self.steps += 1;
            let max = end - at;
            let (kind, len, host) = match self.image.get_shallow_mapping(at, max) {
                Ok((m, len)) => {
                    let (kind, host) = match m {
                        ShallowMapping::Raw { offset, .. } => ("raw", Some(offset)),
                        ShallowMapping::Zero { explicit: true, .. } => ("zero", None),
                        ShallowMapping::Zero { .. } => ("unallocated", None),
                        ShallowMapping::Special { .. } => ("special", None),
                        ShallowMapping::Eof { .. } => ("eof", None),
                        ShallowMapping::Indirect { offset, .. } => panic!(
                            "mapping at {at:#x}: indirect ({offset:#x}) without a backing image"
                        ),
                        _ => ("other", None),
                    };
                    (kind, len, host)
                }
                Err(e) => {
                    if crate::debug() {
                        eprintln!("  mapping at {at:#x}: {e}");
                    }
                    break;
                }
            };
            if crate::debug() {
                eprintln!("  mapping at {at:#x} (max {max:#x}): {kind} {len:#x} {host:x?}");
            }
            if at >= self.size {
                assert_eq!(
                    (kind, len),
                    ("eof", 0),
                    "mapping at {at:#x}, past the virtual size {:#x}",
                    self.size
                );
                // Past the end reads as zeroes (checked in `read`).
                let _ = self.read(at, end - at);
                break;
            }
            assert_ne!(
                kind, "eof",
                "eof at {at:#x} before the virtual size {:#x}",
                self.size
            );
            assert!(len >= 1, "empty {kind} mapping at {at:#x}");
            assert!(
                len <= max && len <= self.size - at,
                "{kind} mapping at {at:#x} of {len:#x} bytes is longer than asked ({max:#x}) \
                 or than the disk ({:#x})",
                self.size
            );
            // Read back (the first MAX_READ bytes of it, within budget).
            let got = self.read(at, len);
            if let Some(got) = &got {
                let want = match (kind, host) {
                    ("raw", Some(h)) => {
                        let mut w = vec![0u8; got.len()];
                        file_bytes(self.data, h, &mut w);
                        Some(w)
                    }
                    ("zero" | "unallocated", _) => Some(vec![0u8; got.len()]),
                    _ => None,
                };
                if let Some(want) = want {
                    assert!(
                        *got == want,
                        "{kind} mapping at {at:#x} (host {host:x?}): {} bytes read differ \
                         from the file",
                        got.len()
                    );
                }
            }
            if contiguous {
                match &got {
                    Some(got) => {
                        let room = (MAX_READ as usize).saturating_sub(pieces.len());
                        pieces.extend_from_slice(&got[..got.len().min(room)]);
                        contiguous = got.len() as u64 == len && room > got.len();
                    }
                    None => contiguous = false,
                }
            }
            at += len;
        }
        if !pieces.is_empty() {
            if let Some(long) = self.read(start, pieces.len() as u64) {
                assert!(
                    long == pieces,
                    "one read of {:#x} bytes at {start:#x} differs from its pieces",
                    pieces.len()
                );
            }
        }
    }
}

pub fn run(data: &[u8]) {
    let file = crate::memfd("fuzz-image", 0, false);
    file.write_all_at(data, 0).expect("write memfd");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let magic = data.len() >= 4 && data[..4] == MAGIC[..];
    let h = Header::parse(data);

    let probed = probe_format(&path).expect("probe_format of a readable memfd");
    assert_eq!(
        probed == Format::Qcow2,
        magic,
        "probe_format says {probed:?}"
    );

    let dup: File = file.try_clone().expect("dup memfd");
    let image = match open_chain(vec![Layer {
        format: Format::Qcow2,
        source: Source::File(dup, PathBuf::from("fuzz.qcow2")),
        writable: false,
        direct: false,
        no_backing: true,
    }]) {
        Ok(image) => image,
        Err(e) => {
            if crate::debug() {
                eprintln!("refused: {e}");
            }
            return;
        }
    };
    let size = image.size();
    if crate::debug() {
        eprintln!(
            "opened: v{} cluster_bits {} size {size:#x}",
            h.version, h.cluster_bits
        );
    }
    assert!(magic, "opened without the qcow2 magic");
    assert!(matches!(h.version, 2 | 3), "opened qcow2 v{}", h.version);
    assert!(
        (9..=21).contains(&h.cluster_bits),
        "opened with cluster_bits {}",
        h.cluster_bits
    );
    assert!(size <= MAX_IMAGE_SIZE, "opened with virtual size {size:#x}");
    assert!(
        h.incompatible & EXTERNAL_DATA_FILE == 0,
        "opened an image with an external data file"
    );
    let cluster = 1u64 << h.cluster_bits;
    let mut o = Opened {
        image,
        data,
        size,
        budget: READ_BUDGET,
        steps: 0,
    };

    // Reads at the places a driver gets wrong: the start, cluster and L2
    // table boundaries (unaligned), the middle, the end and past it.
    let l2_span = cluster * (cluster / 8);
    let reads = [
        (0, (4 * cluster).min(size)),
        (cluster.saturating_sub(100), 200),
        (l2_span.saturating_sub(300), 600),
        ((size / 2) & !511, 4096),
        (
            size.saturating_sub((2 * cluster).min(MAX_READ / 2)),
            2 * cluster + 512,
        ),
        (size.saturating_sub(1), 2),
        (size.saturating_add(cluster), 512),
    ];
    for (offset, len) in reads {
        let _ = o.read(offset, len);
    }

    // Mappings, read back: the start, then the end.
    o.walk(0, WALK_SPAN.min(size));
    let tail = size.saturating_sub((8 * cluster).min(MAX_READ)) & !(cluster - 1);
    o.walk(tail, size.saturating_add(cluster));
    let Opened {
        image,
        budget,
        steps,
        ..
    } = o;
    drop(image);
    if crate::debug() {
        eprintln!("read {} bytes, {steps} mappings", READ_BUDGET - budget);
    }

    // `image info` (by path, so opened a second time).
    if size.div_ceil(cluster) <= INFO_MAX_CLUSTERS {
        match info(&path) {
            Ok(i) => {
                if crate::debug() {
                    eprintln!("info: {i:?}");
                }
                assert_eq!(i.format, Format::Qcow2);
                assert_eq!(i.virtual_size, size);
                assert_eq!(i.cluster_size, cluster);
                assert!(
                    i.allocated <= size,
                    "info: {} allocated of {size}",
                    i.allocated
                );
                let named = (h.backing_offset != 0).then(|| {
                    let mut b = vec![0u8; h.backing_len as usize];
                    file_bytes(data, h.backing_offset, &mut b);
                    String::from_utf8(b).expect("imago accepted a non-UTF-8 backing name")
                });
                assert_eq!(i.backing_file, named, "info: backing file");
            }
            Err(e) => {
                if crate::debug() {
                    eprintln!("info: {e}");
                }
            }
        }
    }
    drop(file);
}

/// Bug `feature-table-short` (imago 0.2.6, `qcow2/metadata.rs`
/// `HeaderExtension::deserialize`): a feature name table extension
/// (`0x6803f857`) whose length is 1 mod 48 ends in a 1-byte entry; if that
/// byte is a known feature type (0-2), imago slices `feat[2..]` of it and
/// panics while opening the image. Whether `data` has such an extension,
/// walked as imago walks them (v3, from `header_length`, within the first
/// cluster, up to the end marker).
pub fn known_feature_table_short(data: &[u8]) -> bool {
    let h = Header::parse(data);
    if h.version != 3 || !(9..=21).contains(&h.cluster_bits) {
        return false;
    }
    let cluster = 1u64 << h.cluster_bits;
    let mut at = u64::from(be32(data, 100)); // header_length
    while at + 8 <= cluster {
        let (kind, len) = (
            be32(data, at as usize),
            u64::from(be32(data, at as usize + 4)),
        );
        at += 8;
        if kind == 0 || at + len > cluster {
            return false;
        }
        if kind == 0x6803_f857 && len % 48 == 1 {
            let last = data.get((at + len - 1) as usize).copied().unwrap_or(0);
            if last <= 2 {
                return true;
            }
        }
        at += len.next_multiple_of(8);
    }
    false
}

/// A minimal empty image as `qemu-img create -f qcow2 -o cluster_size=512
/// ... 64k` lays it out (header, refcount table at 0x200, its block at
/// 0x400, a 2-entry L1 table at 0x600), header extensions left to the
/// caller at 0x70.
fn empty_image() -> Vec<u8> {
    let mut d = vec![0u8; 0x610];
    let mut put = |at: usize, b: &[u8]| d[at..at + b.len()].copy_from_slice(b);
    put(0, MAGIC);
    put(4, &3u32.to_be_bytes()); // version
    put(20, &9u32.to_be_bytes()); // cluster_bits
    put(24, &0x10000u64.to_be_bytes()); // size
    put(36, &2u32.to_be_bytes()); // l1_size
    put(40, &0x600u64.to_be_bytes()); // l1_table_offset
    put(48, &0x200u64.to_be_bytes()); // refcount_table_offset
    put(56, &1u32.to_be_bytes()); // refcount_table_clusters
    put(96, &4u32.to_be_bytes()); // refcount_order
    put(100, &0x70u32.to_be_bytes()); // header_length
    put(0x200, &0x400u64.to_be_bytes()); // refcount table -> block
    for c in 0..4 {
        put(0x400 + 2 * c, &1u16.to_be_bytes()); // header, table, block, L1
    }
    d
}

/// Inputs of bugs found here (see [`known_feature_table_short`]), kept as
/// reproductions: blkmesh-image refuses them now.
pub fn known() -> Vec<(&'static str, Vec<u8>)> {
    let mut d = empty_image();
    // Feature name table, 1 byte long: one entry of type 0 (incompatible).
    d[0x70..0x78].copy_from_slice(&[0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 1]);
    d[0x78] = 0;
    assert!(known_feature_table_short(&d));
    vec![("feature-table-short", d)]
}

// ------------------------------------------------------------------ seeds

/// Small images made by QEMU's own tools (qemu-img, qemu-io): a 64 KiB
/// disk, mostly 512-byte clusters, to stay a few KiB each. Empty if the
/// tools are missing (the committed seeds then stay as they are).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("blkmesh-fuzz-image-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let run = |cmd: &str, args: &[&str]| -> bool {
        match Command::new(cmd).args(args).output() {
            Ok(out) if out.status.success() => true,
            Ok(out) => panic!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => {
                eprintln!("image_open seeds skipped: {cmd}: {e}");
                false
            }
        }
    };
    let create = |name: &str, opts: &str| -> bool {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, &p(name), "64k"],
        )
    };
    let io = |name: &str, cmds: &[&str]| -> bool {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let path = p(name);
        args.push(&path);
        run("qemu-io", &args)
    };
    let mut ok = true;
    // Empty, v3.
    ok &= create("empty", "cluster_size=512");
    // 4 KiB of data at 0: an L2 table and 8 data clusters.
    ok &= create("data", "cluster_size=512") && io("data", &["write -q -P 0xaa 0 4k"]);
    // v2 (compat=0.10): no zero clusters, no header extensions.
    ok &= create("v2", "cluster_size=512,compat=0.10")
        && io("v2", &["write -q -P 0x11 0 1k", "write -q -P 0x12 63k 1k"]);
    // Explicit zero clusters, and data in the last cluster (second L2 table
    // is not needed: 64 KiB is two L2 tables of 32 KiB).
    ok &= create("zero-and-tail", "cluster_size=512")
        && io(
            "zero-and-tail",
            &[
                "write -q -P 0x22 0 512",
                "write -q -z 1k 2k",
                "write -q -P 0x33 32256 1k",
                "write -q -P 0x44 63k 1k",
            ],
        );
    // 2 KiB clusters: one L2 table for the whole disk (the largest
    // cluster size whose image stays under the run's 16 KiB max_len).
    ok &= create("cluster-2k", "cluster_size=2048")
        && io(
            "cluster-2k",
            &["write -q -P 0xbb 2k 2k", "write -q -z 8k 4k"],
        );
    // Compressed clusters (text compresses; the noise does not and is
    // stored as it is), from a raw file.
    {
        let mut raw = vec![0u8; 64 << 10];
        for (i, b) in raw[..3000].iter_mut().enumerate() {
            *b = b"blkmesh qcow2 compressed seed "[i % 30];
        }
        let mut x = 0x1234_5678u32;
        for b in &mut raw[8 << 10..(8 << 10) + 1024] {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        raw[(60 << 10)..(61 << 10)].fill(0x5a);
        std::fs::write(p("compressed.raw"), &raw).unwrap();
        ok &= run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512",
                &p("compressed.raw"),
                &p("compressed"),
            ],
        );
    }
    // A backing file name in the header (never opened): the data image,
    // rebased without looking (-u) onto a file that does not exist.
    ok &= create("backing", "cluster_size=512")
        && io("backing", &["write -q -P 0xaa 0 4k"])
        && run(
            "qemu-img",
            &[
                "rebase",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-b",
                "/nonexistent",
                "-F",
                "raw",
                &p("backing"),
            ],
        );
    let out = if ok {
        [
            "empty",
            "data",
            "v2",
            "zero-and-tail",
            "cluster-2k",
            "compressed",
            "backing",
        ]
        .into_iter()
        .map(|name| (name, std::fs::read(p(name)).unwrap()))
        .collect()
    } else {
        Vec::new()
    };
    std::fs::remove_dir_all(&dir).unwrap();
    out
}
