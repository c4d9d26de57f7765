//! Checks of a qcow2 header that imago leaves to its callers: sizes and
//! table locations a damaged or hostile image could get wrong. Each
//! refusal says what is wrong; `qemu-img check` refuses the same images.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Largest image size accepted: QEMU's limit for qcow2 (2^61 bytes keeps
/// every offset computation in range).
pub const MAX_IMAGE_SIZE: u64 = 1 << 61;

/// Most layers in one chain (the image and its backing images).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// The header fields checked here (qcow2 v2/v3, big-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn parse(h: &[u8; 72]) -> Fields {
    Fields {
        cluster_bits: be32(h, 20),
        size: be64(h, 24),
        l1_size: be32(h, 36),
        l1_table_offset: be64(h, 40),
        refcount_table_offset: be64(h, 48),
        refcount_table_clusters: be32(h, 56),
    }
}

/// Why the header at the start of `file` (`file_len` bytes) is not one to
/// open (`writable`: for writing); `Ok` leaves the rest to imago, and says
/// whether the header has state bits (dirty, corrupt) for imago not to
/// see (`masked.rs`).
pub(crate) fn check(file: &File, file_len: u64, writable: bool) -> Result<bool, String> {
    let mut h = [0u8; 72];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| format!("cannot read the qcow2 header: {e}"))?;
    let fields = parse(&h);
    check_fields(&fields, file_len)?;
    let mut state = false;
    if be32(&h, 4) == 3 {
        let mut features = [0u8; 8];
        file.read_exact_at(&mut features, 72)
            .map_err(|e| format!("cannot read the qcow2 header: {e}"))?;
        let bits = u64::from_be_bytes(features) & (DIRTY | CORRUPT);
        if bits != 0 && writable {
            check_state_bits(bits)?;
        }
        state = bits != 0;
    }
    if (9..=21).contains(&fields.cluster_bits) {
        // The extensions live in the first cluster.
        let len = (1usize << fields.cluster_bits).min(usize::try_from(file_len).unwrap_or(0));
        let mut cluster = vec![0u8; len];
        file.read_exact_at(&mut cluster, 0)
            .map_err(|e| format!("cannot read the qcow2 header: {e}"))?;
        check_extensions(&cluster)?;
    }
    Ok(state)
}

/// The incompatible feature bits that say what state an image was left
/// in, not what it needs to be read.
const DIRTY: u64 = 1 << 0;
const CORRUPT: u64 = 1 << 1;

/// An image left dirty (lazy refcounts, not closed cleanly: its refcounts
/// may be too low) or marked corrupt (QEMU found an inconsistency) opens
/// read-only, as in QEMU; for writing it is refused with the remedy (QEMU
/// refuses a corrupt one too, and repairs a dirty one's refcounts on
/// open, which blkmesh does not do).
fn check_state_bits(incompatible: u64) -> Result<(), String> {
    let remedy = "repair it with `qemu-img check -r all` first";
    if incompatible & CORRUPT != 0 {
        return Err(format!(
            "the image is marked corrupt (QEMU found its metadata inconsistent): it opens \
             read-only only; {remedy}"
        ));
    }
    if incompatible & DIRTY != 0 {
        return Err(format!(
            "the image was not closed cleanly while it used lazy refcounts (the dirty bit), \
             so its refcounts may be wrong: it opens read-only only; {remedy}"
        ));
    }
    Ok(())
}

/// The feature name table extension: 48-byte entries.
const FEATURE_NAME_TABLE: u32 = 0x6803_f857;

/// Walks the header extensions of `first` (the first cluster): each must
/// fit in it, and a feature name table must hold whole entries (imago
/// 0.2.6 panics on a partial last entry).
fn check_extensions(first: &[u8]) -> Result<(), String> {
    if first.len() < 72 {
        return Ok(());
    }
    let version = be32(first, 4);
    let mut at = match version {
        2 => 72usize,
        3 if first.len() >= 104 => be32(first, 100) as usize,
        // imago refuses other versions in its own words.
        _ => return Ok(()),
    };
    while at + 8 <= first.len() {
        let kind = be32(first, at);
        let len = be32(first, at + 4) as usize;
        if kind == 0 {
            return Ok(());
        }
        let data = at + 8;
        if data + len > first.len() {
            return Err(format!(
                "header extension {kind:#x} ({len} bytes at {at:#x}) runs past the first cluster"
            ));
        }
        if kind == FEATURE_NAME_TABLE && len % 48 != 0 {
            return Err(format!(
                "the feature name table ({len} bytes) is not a whole number of 48-byte entries"
            ));
        }
        at = data + len.div_ceil(8) * 8;
    }
    Ok(())
}

fn check_fields(f: &Fields, file_len: u64) -> Result<(), String> {
    if !(9..=21).contains(&f.cluster_bits) {
        // imago says so in its own words.
        return Ok(());
    }
    let cluster = 1u64 << f.cluster_bits;
    if f.size > MAX_IMAGE_SIZE {
        return Err(format!(
            "virtual size {} is larger than {MAX_IMAGE_SIZE} bytes",
            f.size
        ));
    }
    // Each L1 entry maps one L2 table: cluster / 8 clusters.
    let per_l1 = cluster * (cluster / 8);
    let needed = f.size.div_ceil(per_l1);
    if u64::from(f.l1_size) < needed {
        return Err(format!(
            "the L1 table ({} entries) is too small for the virtual size {} (needs {needed})",
            f.l1_size, f.size
        ));
    }
    table_in_file(
        "L1 table",
        f.l1_table_offset,
        u64::from(f.l1_size) * 8,
        cluster,
        file_len,
    )?;
    if f.refcount_table_clusters == 0 {
        return Err("the refcount table is empty".into());
    }
    table_in_file(
        "refcount table",
        f.refcount_table_offset,
        u64::from(f.refcount_table_clusters) * cluster,
        cluster,
        file_len,
    )
}

fn table_in_file(
    what: &str,
    offset: u64,
    len: u64,
    cluster: u64,
    file_len: u64,
) -> Result<(), String> {
    if len == 0 {
        return Ok(());
    }
    if offset % cluster != 0 {
        return Err(format!(
            "the {what} offset {offset:#x} is not aligned to a cluster"
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "the {what} ({len} bytes at {offset:#x}) lies outside the file ({file_len} bytes)"
        )),
    }
}

/// Why the image at `path` must not be opened for writing: a qcow2 image
/// left dirty or marked corrupt (it opens read-only only, as in QEMU).
pub fn check_writable(path: &std::path::Path) -> Result<(), crate::ImageError> {
    let open = |e: std::io::Error| crate::ImageError::Open {
        path: path.to_path_buf(),
        source: e,
    };
    let file = File::open(path).map_err(open)?;
    let mut h = [0u8; 80];
    if file.read_exact_at(&mut h, 0).is_err() || h[..4] != *b"QFI\xfb" || be32(&h, 4) < 3 {
        return Ok(());
    }
    check_state_bits(u64::from_be_bytes([
        h[72], h[73], h[74], h[75], h[76], h[77], h[78], h[79],
    ]))
    .map_err(|why| open(std::io::Error::new(std::io::ErrorKind::InvalidData, why)))
}

/// Makes the qcow2 image in `file` name no backing file (a stream copied
/// everything its backing chain held into it): the header's backing file
/// offset and length become zero, and are synced. imago never writes
/// these fields of an open image (only its table pointers), so this may
/// run while the image is open. The name's bytes stay where they were,
/// unreferenced, as do the backing format extension, which QEMU reads
/// only together with a backing file.
pub fn drop_backing_file(file: &File) -> std::io::Result<()> {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0)?;
    if magic != *b"QFI\xfb" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a qcow2 image",
        ));
    }
    // backing_file_offset (u64 at 8) and backing_file_size (u32 at 16).
    file.write_all_at(&[0u8; 12], 8)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: Fields = Fields {
        cluster_bits: 16,
        size: 1 << 30,
        l1_size: 2,
        l1_table_offset: 3 << 16,
        refcount_table_offset: 1 << 16,
        refcount_table_clusters: 1,
    };

    #[test]
    fn a_sound_header_passes() {
        check_fields(&GOOD, 4 << 16).unwrap();
    }

    /// A v3 header of 104 bytes followed by `ext`, in a 512-byte cluster.
    fn with_extension(ext: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; 512];
        c[4..8].copy_from_slice(&3u32.to_be_bytes());
        c[100..104].copy_from_slice(&104u32.to_be_bytes());
        c[104..104 + ext.len()].copy_from_slice(ext);
        c
    }

    #[test]
    fn header_extensions_must_fit_and_be_whole() {
        let ext = |kind: u32, len: u32| {
            let mut e = kind.to_be_bytes().to_vec();
            e.extend(len.to_be_bytes());
            e
        };
        check_extensions(&with_extension(&[])).unwrap();
        check_extensions(&with_extension(&ext(FEATURE_NAME_TABLE, 48))).unwrap();
        let e = check_extensions(&with_extension(&ext(FEATURE_NAME_TABLE, 49))).unwrap_err();
        assert!(e.contains("48-byte entries"), "{e}");
        let e = check_extensions(&with_extension(&ext(0xe2792aca, 4096))).unwrap_err();
        assert!(e.contains("runs past the first cluster"), "{e}");
    }

    #[test]
    fn each_damage_is_named() {
        let len = 4 << 16;
        let err = |f: Fields| check_fields(&f, len).unwrap_err();
        assert!(err(Fields {
            size: u64::MAX,
            ..GOOD
        })
        .contains("virtual size"));
        assert!(err(Fields { l1_size: 1, ..GOOD }).contains("too small"));
        assert!(err(Fields {
            l1_table_offset: 1 << 50,
            ..GOOD
        })
        .contains("outside the file"));
        assert!(err(Fields {
            l1_table_offset: 4097,
            ..GOOD
        })
        .contains("not aligned"));
        assert!(err(Fields {
            l1_table_offset: !0xffff,
            ..GOOD
        })
        .contains("outside"));
        assert!(err(Fields {
            refcount_table_offset: 8 << 16,
            ..GOOD
        })
        .contains("refcount table"));
        assert!(err(Fields {
            refcount_table_clusters: 0,
            ..GOOD
        })
        .contains("empty"));
    }
}
