use std::process::Command;

use super::*;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image at `img` over `backing` as the header names it.
fn overlay(img: &Path, backing: &str, format: &str, size: &str) {
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        format,
        s(img),
    ];
    if !size.is_empty() {
        args.extend(["-u", size]);
    }
    qemu_img(&args);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn follows_named_backing_files_inside_the_allowed_directories_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let mid = d.join("mid.qcow2");
    overlay(&mid, "base.raw", "raw", "");
    let top = d.join("top.qcow2");
    overlay(&top, s(&mid), "qcow2", "");
    let chain = follow_header(&top, &[d.to_path_buf()]).unwrap();
    let canon = |p: &Path| p.canonicalize().unwrap();
    let got: Vec<_> = chain
        .iter()
        .map(|l| (l.path.clone(), l.format, l.size))
        .collect();
    assert_eq!(
        got,
        vec![
            (canon(&mid), Format::Qcow2, 1 << 20),
            (canon(&base), Format::Raw, 1 << 20),
        ]
    );
    assert_eq!(chain[1].file_len, 1 << 20);
    // Not allowed: no directory, another directory.
    let e = follow_header(&top, &[]).unwrap_err().to_string();
    assert!(e.contains("none given"), "{e}");
    let other = tempfile::tempdir().unwrap();
    let e = follow_header(&top, &[other.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the image directories"), "{e}");
    // A symlink out of the directory is followed to where it points.
    let outside = other.path().join("secret.raw");
    std::fs::write(&outside, vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("link.raw")).unwrap();
    let sneaky = d.join("sneaky.qcow2");
    overlay(&sneaky, "link.raw", "raw", "4k");
    let e = follow_header(&sneaky, &[d.to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("secret.raw"), "{e}");
    // A missing file, a loop.
    let gone = d.join("gone.qcow2");
    overlay(&gone, "nothing.raw", "raw", "4k");
    assert!(follow_header(&gone, &[d.to_path_buf()]).is_err());
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    overlay(&a, "b.qcow2", "qcow2", "4k");
    overlay(&b, "a.qcow2", "qcow2", "4k");
    let e = follow_header(&a, &[d.to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("deeper than"), "{e}");
}

#[test]
fn the_backing_format_must_be_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![0u8; 4096]).unwrap();
    let top = d.join("top.qcow2");
    // Old-style: a header without the backing format extension (its
    // type overwritten by one nobody knows, which readers skip).
    overlay(&top, "base.raw", "raw", "");
    let mut bytes = std::fs::read(&top).unwrap();
    let at = bytes[..65536]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&top, bytes).unwrap();
    let e = follow_header(&top, &[d.to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("backing format None"), "{e}");
}

fn layer(path: &str, format: Format) -> HeaderLayer {
    HeaderLayer {
        path: PathBuf::from(path),
        format,
        size: 1 << 20,
        file_len: 4096,
    }
}

#[test]
fn new_backing_nodes_are_read_only_and_an_existing_one_is_reused() {
    let layers = [
        layer("/img/mid.qcow2", Format::Qcow2),
        layer("/img/base.raw", Format::Raw),
    ];
    let (backing, add) = backing_nodes(&Graph::new(), "top", &layers).unwrap();
    assert_eq!(backing, "top-b1");
    let names: Vec<&str> = add.iter().map(|(s, _)| s.name.as_str()).collect();
    assert_eq!(names, ["top-b1-file", "top-b2", "top-b1"], "children first");
    match &add[2].0.driver {
        Some(Driver::Qcow2(q)) => {
            assert_eq!(
                (q.file.as_str(), q.backing.as_str()),
                ("top-b1-file", "top-b2")
            );
            assert!(q.read_only);
        }
        other => panic!("{other:?}"),
    }
    assert!(add.iter().all(|(s, _)| match &s.driver {
        Some(Driver::IoUring(o)) => o.read_only,
        _ => true,
    }));
    // A graph that holds the base already: the new chain ends there.
    let mut g = Graph::new();
    g.add(NodeSpec {
        name: "shared-base".into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: "/img/base.raw".into(),
            read_only: true,
            ..Default::default()
        })),
    })
    .unwrap();
    let (_, add) = backing_nodes(&g, "top", &layers).unwrap();
    match &add.last().unwrap().0.driver {
        Some(Driver::Qcow2(q)) => assert_eq!(q.backing, "shared-base"),
        other => panic!("{other:?}"),
    }
    assert_eq!(add.len(), 2);
    let (backing, add) = backing_nodes(&g, "top", &layers[1..]).unwrap();
    assert_eq!((backing.as_str(), add.len()), ("shared-base", 0));
    // A name that grows too long is refused, not cut.
    let long = "n".repeat(60);
    assert!(backing_nodes(&Graph::new(), &long, &layers).is_err());
}
