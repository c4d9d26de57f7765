//! Writes the seed corpora: `fuzz/corpus/<target>/seed-<name>`.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --features seeds --bin gen_seeds
//!
//! Each seed is also run through its target once, so a seed that would
//! crash is noticed here rather than in the fuzz run.

use std::path::PathBuf;

type Seeds = fn() -> Vec<(&'static str, Vec<u8>)>;
type Run = fn(&[u8]);

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Seeds, Run); 5] = [
        (
            "descriptor_chain",
            blkmesh_fuzz::chain::seeds,
            blkmesh_fuzz::chain::run,
        ),
        (
            "ring_entry",
            blkmesh_fuzz::ring::seeds,
            blkmesh_fuzz::ring::run,
        ),
        (
            "control_message",
            blkmesh_fuzz::control::seeds,
            blkmesh_fuzz::control::run,
        ),
        (
            "mem_table",
            blkmesh_fuzz::memtable::seeds,
            blkmesh_fuzz::memtable::run,
        ),
        // Made by qemu-img and qemu-io (skipped without them).
        (
            "image_open",
            blkmesh_fuzz::image::seeds,
            blkmesh_fuzz::image::run,
        ),
    ];
    for (target, seeds, run) in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            run(&bytes);
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, &bytes).unwrap();
            println!("{} ({} bytes)", path.display(), bytes.len());
        }
    }
    // Known bugs: regression inputs that pass while the bug is stepped
    // around (corpus/<target>/regress-*), and the same inputs as crash
    // reproductions (artifacts/<target>/known-*, for BLKMESH_FUZZ_KNOWN=1).
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    let known: [(&str, Seeds); 2] = [
        ("ring_entry", blkmesh_fuzz::ring::known),
        ("control_message", blkmesh_fuzz::control::known),
    ];
    // Bugs fixed since: regression inputs only.
    for (name, bytes) in blkmesh_fuzz::memtable::regressions() {
        blkmesh_fuzz::memtable::run(&bytes);
        let path = root.join("mem_table").join(format!("regress-{name}"));
        std::fs::write(&path, &bytes).unwrap();
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    // Open bugs outside blkmesh (imago): their inputs only as crash
    // reproductions, not in the corpus, where they would stop every
    // default (strict) run until the fix.
    std::fs::create_dir_all(artifacts.join("image_open")).unwrap();
    for (name, bytes) in blkmesh_fuzz::image::known() {
        if !blkmesh_fuzz::strict() {
            blkmesh_fuzz::image::run(&bytes);
        }
        let path = artifacts.join("image_open").join(format!("known-{name}"));
        std::fs::write(&path, &bytes).unwrap();
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    for (target, inputs) in known {
        std::fs::create_dir_all(artifacts.join(target)).unwrap();
        for (name, bytes) in inputs() {
            if !blkmesh_fuzz::strict() {
                let run = targets.iter().find(|t| t.0 == target).unwrap().2;
                run(&bytes);
            }
            for path in [
                root.join(target).join(format!("regress-{name}")),
                artifacts.join(target).join(format!("known-{name}")),
            ] {
                std::fs::write(&path, &bytes).unwrap();
                println!("{} ({} bytes)", path.display(), bytes.len());
            }
        }
    }
}
