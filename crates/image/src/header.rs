//! Checks of a qcow2 header that imago leaves to its callers: sizes and
//! table locations a damaged or hostile image could get wrong. Each
//! refusal says what is wrong; `qemu-img check` refuses the same images.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::create::MAX_IMAGE_SIZE;

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
/// open; `Ok` leaves the rest to imago.
pub(crate) fn check(file: &File, file_len: u64) -> Result<(), String> {
    let mut h = [0u8; 72];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| format!("cannot read the qcow2 header: {e}"))?;
    check_fields(&parse(&h), file_len)
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
