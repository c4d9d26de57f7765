//! Images made and checked by QEMU's own tools (qemu-img, qemu-io), and
//! damaged ones.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qcow2_with_pattern(dir: &Path) -> PathBuf {
    let img = dir.join("a.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xa5 64k 128k", s(&img)],
    );
    img
}

fn read(image: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read(&mut buf[..], offset).unwrap();
    buf
}

#[test]
fn reads_what_qemu_io_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2_with_pattern(dir.path());
    let image = open_chain(vec![Layer::read_only(Format::Qcow2, &img)]).unwrap();
    assert_eq!(image.size(), 4 << 20);
    assert!(read(&image, 64 << 10, 128 << 10).iter().all(|&b| b == 0xa5));
    assert!(read(&image, 0, 64 << 10).iter().all(|&b| b == 0));
}

#[test]
fn writes_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    create(
        &img,
        &CreateOptions {
            format: Format::Qcow2,
            size: 8 << 20,
            cluster_size: 0,
            backing: None,
            preallocation: Preallocation::Off,
        },
    )
    .unwrap();
    let raw = dir.path().join("w.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    {
        let image = open_chain(vec![Layer {
            writable: true,
            ..Layer::read_only(Format::Qcow2, &img)
        }])
        .unwrap();
        let raw_file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        for (i, at) in [0u64, 3 << 20, (5 << 20) + 4096, 100 * 1024]
            .iter()
            .enumerate()
        {
            let data = vec![i as u8 + 1; 12288];
            image.write(&data[..], *at).unwrap();
            raw_file.write_all_at(&data, *at).unwrap();
        }
        image.flush().unwrap();
    }
    run("qemu-img", &["check", "-q", s(&img)]);
    run("qemu-img", &["compare", "-q", s(&img), s(&raw)]);
}

#[test]
fn a_header_backing_file_must_be_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&top),
        ],
    );
    let e = open_chain(vec![Layer::read_only(Format::Qcow2, &top)]).unwrap_err();
    assert!(matches!(e, ImageError::BackingNotGiven { .. }), "{e}");
    assert!(e.to_string().contains("base.raw"), "{e}");
    // Named: the base shows through.
    let image = open_chain(vec![
        Layer::read_only(Format::Qcow2, &top),
        Layer::read_only(Format::Raw, &base),
    ])
    .unwrap();
    assert!(read(&image, 4096, 4096).iter().all(|&b| b == 7));
    // Refused on purpose: zeroes.
    let image = open_chain(vec![Layer {
        no_backing: true,
        ..Layer::read_only(Format::Qcow2, &top)
    }])
    .unwrap();
    assert!(read(&image, 4096, 4096).iter().all(|&b| b == 0));
}

#[test]
fn a_chain_of_three_and_its_info() {
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2_with_pattern(dir.path());
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    for (img, below) in [(&mid, &base), (&top, &mid)] {
        create(
            img,
            &CreateOptions {
                format: Format::Qcow2,
                size: 4 << 20,
                cluster_size: 4096,
                backing: Some((s(below).to_string(), Format::Qcow2)),
                preallocation: Preallocation::Off,
            },
        )
        .unwrap();
    }
    run("qemu-io", &["-c", "write -P 0x11 64k 4k", s(&mid)]);
    let image = open_chain(vec![
        Layer::read_only(Format::Qcow2, &top),
        Layer::read_only(Format::Qcow2, &mid),
        Layer::read_only(Format::Qcow2, &base),
    ])
    .unwrap();
    assert!(read(&image, 64 << 10, 4096).iter().all(|&b| b == 0x11));
    assert!(read(&image, 68 << 10, 4096).iter().all(|&b| b == 0xa5));
    let i = info(&mid).unwrap();
    assert_eq!(i.format, Format::Qcow2);
    assert_eq!(i.virtual_size, 4 << 20);
    assert_eq!(i.cluster_size, 4096);
    assert_eq!(i.backing_file.as_deref(), Some(s(&base)));
    assert_eq!(i.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(i.allocated, 4096);
    // QEMU agrees with what blkmesh wrote in the header.
    let q = run("qemu-img", &["info", "--output=json", s(&top)]);
    assert!(q.contains("\"cluster-size\": 4096"), "{q}");
    assert!(q.contains(s(&mid)), "{q}");
}

#[test]
fn create_refuses_bad_options_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    let ok = CreateOptions {
        format: Format::Qcow2,
        size: 1 << 20,
        cluster_size: 0,
        backing: None,
        preallocation: Preallocation::Off,
    };
    for bad in [
        CreateOptions {
            size: 0,
            ..ok.clone()
        },
        CreateOptions {
            size: 1000,
            ..ok.clone()
        },
        CreateOptions {
            size: u64::MAX - 511,
            ..ok.clone()
        },
        CreateOptions {
            cluster_size: 3000,
            ..ok.clone()
        },
        CreateOptions {
            cluster_size: 4 << 20,
            ..ok.clone()
        },
        CreateOptions {
            format: Format::Raw,
            backing: Some(("b".into(), Format::Raw)),
            ..ok.clone()
        },
        CreateOptions {
            backing: Some(("b".into(), Format::Raw)),
            preallocation: Preallocation::Metadata,
            ..ok.clone()
        },
    ] {
        let e = create(&img, &bad).unwrap_err();
        assert!(matches!(e, ImageError::Invalid(_)), "{bad:?}: {e}");
        assert!(!img.exists());
    }
    create(&img, &ok).unwrap();
    let e = create(&img, &ok).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
}

#[test]
fn metadata_preallocation_maps_every_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    create(
        &img,
        &CreateOptions {
            format: Format::Qcow2,
            size: 2 << 20,
            cluster_size: 65536,
            backing: None,
            preallocation: Preallocation::Metadata,
        },
    )
    .unwrap();
    run("qemu-img", &["check", "-q", s(&img)]);
    assert_eq!(info(&img).unwrap().allocated, 2 << 20);
}

#[test]
fn chains_are_bounded() {
    let layers = (0..=MAX_CHAIN_DEPTH)
        .map(|_| Layer::read_only(Format::Raw, "/nonexistent"))
        .collect();
    assert!(matches!(open_chain(layers), Err(ImageError::TooDeep(17))));
    assert!(matches!(open_chain(Vec::new()), Err(ImageError::Empty)));
    let e = open_chain(vec![Layer::read_only(Format::Raw, "/nonexistent")]).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
}

/// A fresh image (64 KiB clusters, 1 MiB) with header bytes replaced.
fn damaged(dir: &Path, name: &str, patch: &[(u64, &[u8])]) -> PathBuf {
    let img = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for (at, bytes) in patch {
        f.write_all_at(bytes, *at).unwrap();
    }
    img
}

#[test]
fn damaged_images_get_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let be64 = |v: u64| v.to_be_bytes();
    let be32 = |v: u32| v.to_be_bytes();
    let cases: Vec<(&str, PathBuf)> = vec![
        ("bad version", damaged(d, "v", &[(4, &be32(9))])),
        ("cluster bits 40", damaged(d, "c", &[(20, &be32(40))])),
        ("absurd size", damaged(d, "s", &[(24, &be64(u64::MAX))])),
        (
            "L1 outside the file",
            damaged(d, "l1", &[(40, &be64(1 << 50))]),
        ),
        (
            "L1 absurdly large",
            damaged(d, "l1n", &[(36, &be32(u32::MAX))]),
        ),
        (
            "refcount table outside",
            damaged(d, "rt", &[(48, &be64(1 << 50))]),
        ),
        (
            "unknown incompatible feature",
            damaged(d, "f", &[(72, &be64(1 << 40))]),
        ),
        (
            "backing name outside",
            damaged(d, "b", &[(8, &be64(1 << 40)), (16, &be32(16))]),
        ),
        (
            "backing name too long",
            damaged(d, "bl", &[(8, &be64(512)), (16, &be32(1 << 20))]),
        ),
    ];
    for (what, img) in cases {
        let Err(e) = open_chain(vec![Layer::read_only(Format::Qcow2, &img)]) else {
            panic!("{what}: opened");
        };
        assert!(matches!(e, ImageError::Open { .. }), "{what}: {e}");
        assert!(e.to_string().contains(s(&img)), "{what}: {e}");
    }
    // The state bits, as QEMU treats them: read-only opens read on;
    // writable ones get the remedy, not "unknown feature".
    for (name, bit, why) in [
        ("dirty2", 1u64, "dirty bit"),
        ("corrupt2", 2, "marked corrupt"),
    ] {
        let img = damaged(d, name, &[(72, &be64(bit))]);
        let image = open_chain(vec![Layer::read_only(Format::Qcow2, &img)])
            .unwrap_or_else(|e| panic!("{why}: read-only open refused: {e}"));
        assert_eq!(image.size(), 1 << 20);
        assert!(read(&image, 0, 4096).iter().all(|&b| b == 0));
        let e = open_chain(vec![Layer {
            writable: true,
            ..Layer::read_only(Format::Qcow2, &img)
        }])
        .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
        assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
        // The file is untouched: the bit is masked, not cleared.
        let mut b = [0u8; 8];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut b, 72)
            .unwrap();
        assert_eq!(u64::from_be_bytes(b), bit);
    }
    // A truncated header.
    let img = d.join("t");
    std::fs::write(&img, b"QFI\xfb\0\0\0\x03").unwrap();
    assert!(open_chain(vec![Layer::read_only(Format::Qcow2, &img)]).is_err());
    assert_eq!(probe_format(&img).unwrap(), Format::Qcow2);
}

#[test]
fn what_the_fuzzer_found_is_refused_not_a_panic() {
    // imago 0.2.6 panics on a feature name table with a partial entry.
    let bytes = include_bytes!("../../../fuzz/corpus/image_open/regress-feature-table-short");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("short-table.qcow2");
    std::fs::write(&img, bytes).unwrap();
    let e = open_chain(vec![Layer::read_only(Format::Qcow2, &img)]).unwrap_err();
    assert!(e.to_string().contains("48-byte entries"), "{e}");
}

#[test]
fn a_dropped_backing_file_is_gone_for_qemu_img_too() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&top),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x33 0 64k", s(&top)]);
    {
        let image = open_chain(vec![
            Layer {
                writable: true,
                ..Layer::read_only(Format::Qcow2, &top)
            },
            Layer::read_only(Format::Raw, &base),
        ])
        .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&top)
            .unwrap();
        drop_backing_file(&file).unwrap();
        // The open image goes on (imago does not write those fields).
        image.write(&[0x44u8; 4096][..], 1 << 16).unwrap();
        image.flush().unwrap();
    }
    let info = run("qemu-img", &["info", s(&top)]);
    assert!(!info.contains("backing file"), "{info}");
    run("qemu-img", &["check", s(&top)]);
    // No backing: what the base held reads as zeroes now.
    let image = open_chain(vec![Layer::read_only(Format::Qcow2, &top)]).unwrap();
    assert!(read(&image, 0, 4096).iter().all(|&b| b == 0x33));
    assert!(read(&image, 1 << 16, 4096).iter().all(|&b| b == 0x44));
    assert!(read(&image, 1 << 17, 4096).iter().all(|&b| b == 0));
    // Not a qcow2 image: refused, untouched.
    let raw = std::fs::File::open(&base).unwrap();
    assert!(drop_backing_file(&raw).is_err());
    let mut b = [0u8; 12];
    raw.read_exact_at(&mut b, 8).unwrap();
    assert_eq!(b, [7u8; 12]);
}

#[test]
fn an_image_qemu_left_dirty_reads_read_only_and_is_written_after_repair() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            s(&img),
            "4M",
        ],
    );
    // qemu-io's `abort` ends it as a crash would: the dirty bit stays.
    let _ = Command::new("qemu-io")
        .args(["-c", "write -P 0x42 0 64k", "-c", "abort", s(&img)])
        .output()
        .unwrap();
    let info = run("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    let image = open_chain(vec![Layer::read_only(Format::Qcow2, &img)]).unwrap();
    assert!(read(&image, 0, 4096).iter().all(|&b| b == 0x42));
    drop(image);
    let e = check_writable(&img).unwrap_err();
    assert!(e.to_string().contains("dirty bit"), "{e}");
    // As the error says: qemu-img repairs it, then it opens for writing.
    run("qemu-img", &["check", "-q", "-r", "all", s(&img)]);
    check_writable(&img).unwrap();
    let image = open_chain(vec![Layer {
        writable: true,
        ..Layer::read_only(Format::Qcow2, &img)
    }])
    .unwrap();
    assert!(read(&image, 0, 4096).iter().all(|&b| b == 0x42));
}
