//! A real Linux guest (QEMU, TCG) on a blkmesh export of a qcow2 overlay
//! over a raw base: the guest's checks (see `real_guest.rs`) write, flush,
//! discard and zero through the qcow2 node, whose allocating writes copy
//! the rest of each cluster up from the base. Afterwards QEMU's own tools
//! judge what blkmesh left behind: `qemu-img check` finds the overlay
//! sound, QEMU reads the overlay over its base as exactly what the guest
//! wrote on top of the base's data, and the base is untouched. Needs what
//! `real_guest.rs` needs (`scripts/deps.sh`) and qemu-img; build the
//! binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blkmesh_guest_check::plan::{self, Content, Extent, Plan, Region};
use blkmesh_guest_check::report::Verdict;
use blkmesh_proto::v1::{node_spec::Driver, NodeSpec, Qcow2Options};
use blkmesh_testkit::{
    host_tool, output_text, Cluster, ClusterOptions, ExportOpts, GuestImage, GuestOptions,
    GuestOutcome, GuestVm,
};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;
/// As in `real_guest.rs`: boot about 5 s, checks about 10 s under TCG,
/// the rest headroom for a loaded machine.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(80);
/// The guest's data plan seed.
const SEED: u64 = 31;
/// The base's pattern: position-dependent (so data copied up from the
/// wrong offset never matches), and apart from every guest pattern.
const BASE_SEED: u64 = 0xba5e;
const BASE_TAG: u64 = 100;
/// A constant byte in one part of the base (written with qemu-io).
const BASE_BYTE: u8 = 0x5a;

/// What the base holds, in parts, so that the guest's writes land both
/// over base data (copy-up of the rest of the cluster) and over holes
/// (unallocated in the base too): (region, content) where `None` is the
/// constant [`BASE_BYTE`]; everything else is a hole (zeroes).
const BASE_PARTS: [(Region, Option<Content>); 4] = [
    // Under the buffered, concurrent and discard regions, half of zeroout.
    (
        Region::new(0, 12 * MIB),
        Some(Content::Pattern {
            tag: BASE_TAG,
            generation: 0,
        }),
    ),
    // [12, 18) MiB: a hole under zeroout's other half, flush, loop and
    // part of large.
    (
        Region::new(18 * MIB, 26 * MIB),
        Some(Content::Pattern {
            tag: BASE_TAG,
            generation: 0,
        }),
    ),
    (Region::new(44 * MIB, 8 * MIB), None),
    // [52, 60) MiB: a hole; the last 4 MiB (with the disk's last block,
    // which the guest writes) are data again.
    (
        Region::new(60 * MIB, 4 * MIB),
        Some(Content::Pattern {
            tag: BASE_TAG,
            generation: 0,
        }),
    ),
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The base's bytes, as [`BASE_PARTS`] says.
fn base_bytes() -> Vec<u8> {
    let mut data = vec![0u8; DISK_SIZE as usize];
    for (r, content) in BASE_PARTS {
        let part = &mut data[r.offset as usize..r.end() as usize];
        match content {
            Some(c) => plan::fill(part, r.offset, BASE_SEED, c),
            None => part.fill(BASE_BYTE),
        }
    }
    data
}

/// Writes the base image: the pattern parts from here, the constant part
/// with qemu-io, holes left sparse.
fn write_base(path: &Path, data: &[u8]) {
    host_tool("qemu-img", &["create", "-q", "-f", "raw", s(path), "64M"]);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (r, content) in BASE_PARTS {
        if content.is_some() {
            f.write_all_at(&data[r.offset as usize..r.end() as usize], r.offset)
                .unwrap();
        }
    }
    f.sync_all().unwrap();
    drop(f);
    for (r, content) in BASE_PARTS {
        if content.is_none() {
            let cmd = format!("write -q -P {BASE_BYTE:#x} {} {}", r.offset, r.len);
            host_tool("qemu-io", &["-f", "raw", "-c", &cmd, s(path)]);
        }
    }
    let written = std::fs::read(path).unwrap();
    assert!(written == data, "the base image is not what was meant");
}

/// What the disk must read as after the guest's run: the base, with the
/// plan's extents (what the guest wrote, discarded or zeroed) on top.
fn expected_disk(base: &[u8], plan: &Plan, loop_rounds: [u64; 2]) -> Vec<u8> {
    let mut data = base.to_vec();
    for e in plan.expected(loop_rounds) {
        let r = e.region;
        plan::fill(
            &mut data[r.offset as usize..r.end() as usize],
            r.offset,
            plan.seed,
            e.content,
        );
    }
    data
}

/// Where `got` first differs from `want`, per 64 KiB cluster, with the
/// extent of the guest's that holds the offset, if any: at most a few.
fn differences(got: &[u8], want: &[u8], extents: &[Extent]) -> Vec<String> {
    const CLUSTER: usize = 64 << 10;
    let mut out = Vec::new();
    if got.len() != want.len() {
        out.push(format!("{} bytes, expected {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.chunks(CLUSTER).zip(want.chunks(CLUSTER)).enumerate() {
        let Some(at) = g.iter().zip(w).position(|(a, b)| a != b) else {
            continue;
        };
        let off = (i * CLUSTER + at) as u64;
        let what = extents
            .iter()
            .find(|e| e.region.offset <= off && off < e.region.end())
            .map(|e| format!("{:?} written by the guest", e.content))
            .unwrap_or_else(|| "where the guest wrote nothing".into());
        out.push(format!(
            "offset {off}: {:#04x}, expected {:#04x} ({what})",
            g[at], w[at]
        ));
        if out.len() >= 8 {
            out.push("…".into());
            break;
        }
    }
    out
}

/// The overlay's clusters per `qemu-img map`: how many hold data or
/// zeroes in the overlay itself, and what is wrong about them (a range the
/// guest wrote that is not data in the overlay, or an overlay cluster the
/// guest never touched).
fn overlay_clusters(top: &Path, plan: &Plan, loop_rounds: [u64; 2]) -> (u64, Vec<String>) {
    const CLUSTER: u64 = 64 << 10;
    let map = host_tool("qemu-img", &["map", "-f", "qcow2", "--output=json", s(top)]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    // (start, end, data) of the ranges the overlay itself holds.
    let own: Vec<(u64, u64, bool)> = entries
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            let len = e["length"].as_u64().unwrap();
            (start, start + len, e["data"] == true)
        })
        .collect();
    let extents = plan.expected(loop_rounds);
    let mut wrong = Vec::new();
    for e in &extents {
        if e.content == Content::Zero {
            continue;
        }
        let r = e.region;
        // Covered by the overlay's data ranges, which are sorted.
        let mut at = r.offset;
        for &(start, end, data) in &own {
            if data && start <= at && at < end {
                at = end;
            }
        }
        if at < r.end() {
            wrong.push(format!(
                "{}+{} ({:?}) is not data in the overlay from {at} on",
                r.offset, r.len, e.content
            ));
        }
    }
    let mut clusters = 0;
    for &(start, end, _) in &own {
        let mut c = start / CLUSTER * CLUSTER;
        while c < end {
            clusters += 1;
            let touched = extents
                .iter()
                .any(|e| e.region.offset < c + CLUSTER && c < e.region.end());
            if !touched && wrong.len() < 16 {
                wrong.push(format!(
                    "the overlay holds cluster {c}, which the guest never wrote"
                ));
            }
            c += CLUSTER;
        }
    }
    if !wrong.is_empty() {
        let head: String = map.chars().take(4000).collect();
        wrong.push(format!("qemu-img map (start): {head}"));
    }
    (clusters, wrong)
}

fn summary(out: &GuestOutcome) -> String {
    out.report
        .checks
        .iter()
        .map(|c| {
            format!(
                "  {} {} {}",
                c.name,
                if c.ok { "ok" } else { "FAIL" },
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_real_guest_passes_on_a_qcow2_overlay_and_qemu_agrees() {
    let t0 = Instant::now();
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    // As in qcow2.rs: one worker holds the writable qcow2 node (its
    // metadata cache is one worker's), both queues on it, under seccomp.
    let cluster = Cluster::start(ClusterOptions::default().workers(1).seccomp_enforce());
    let dir = cluster.dir().to_path_buf();
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    let base_data = base_bytes();
    write_base(&base, &base_data);
    // Default 64 KiB clusters: the guest's 4 KiB writes allocate partial
    // clusters (copied up from the base), its 64 KiB chunks whole ones.
    host_tool(
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

    cluster.add_io_uring("base", &base, false, true).unwrap();
    cluster
        .add_io_uring("top-file", &top, false, false)
        .unwrap();
    let info = cluster
        .client()
        .add_node(NodeSpec {
            name: "top".into(),
            driver: Some(Driver::Qcow2(Qcow2Options {
                file: "top-file".into(),
                backing: "base".into(),
                ..Default::default()
            })),
        })
        .unwrap();
    assert_eq!(info.size, DISK_SIZE, "the virtual size, from the header");
    let socket = cluster
        .add_export(ExportOpts::new("guest", "top").writable().queues(2))
        .unwrap();

    let opts = GuestOptions::new(&socket)
        .dir(&dir)
        .queues(2)
        .param("seed", SEED)
        // The guest checks these itself too.
        .param("size", DISK_SIZE)
        .param("logical_block_size", 512)
        .param("hw_queues", 2);
    let mut vm = GuestVm::start(&image, opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("qemu: {}", vm.command_line().join(" "));
    let out = match vm.wait_verdict(VERDICT_TIMEOUT) {
        Ok(out) => out,
        Err(e) => {
            cluster.dump_logs();
            panic!("{e}");
        }
    };
    eprintln!(
        "guest: boot {:?}, verdict after {:?}\n{}",
        out.boot,
        out.elapsed,
        summary(&out)
    );
    assert_eq!(
        out.report.verdict,
        Some(Verdict::Pass),
        "failed checks: {:?}\n{}",
        out.report.failures().collect::<Vec<_>>(),
        out.console
    );
    let g = |k: &str| -> u64 {
        out.report
            .geometry
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in GEOMETRY: {:?}", out.report.geometry))
            .parse()
            .unwrap()
    };
    assert_eq!(g("size"), DISK_SIZE);
    assert_eq!(g("hw_queues"), 2);
    assert!(g("discard_max_bytes") > 0, "{:?}", out.report.geometry);
    assert!(g("write_zeroes_max_bytes") > 0, "{:?}", out.report.geometry);
    drop(vm);

    // Every request that changed the mappings wrote the metadata back
    // before it completed, and the guest's last writes were flushed; the
    // worker lets go of the image with the export.
    cluster.remove_export("guest").unwrap();

    // QEMU's checker finds the overlay sound: no corruption, no leak.
    let check = Command::new("qemu-img")
        .args(["check", "--output=json", s(&top)])
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check: {}",
        output_text(&check)
    );
    eprintln!("qemu-img check: {}", String::from_utf8_lossy(&check.stdout));

    // The base is as it was: blkmesh never wrote through to it.
    let after = std::fs::read(&base).unwrap();
    let base_diff = differences(&after, &base_data, &[]);
    assert!(base_diff.is_empty(), "the base was written: {base_diff:#?}");

    // QEMU reads the overlay over its base (the backing file its header
    // names) as the guest's data on top of the base's, copied-up rest of
    // each cluster and discarded or zeroed ranges included.
    let flat = dir.join("flat.raw");
    host_tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&top), s(&flat)],
    );
    let plan = Plan::new(SEED, DISK_SIZE).unwrap();
    let want = expected_disk(&base_data, &plan, out.report.loop_rounds);
    let got = std::fs::read(&flat).unwrap();
    let problems = differences(&got, &want, &plan.expected(out.report.loop_rounds));
    assert!(
        problems.is_empty(),
        "QEMU reads the overlay differently from the plan: {problems:#?}"
    );
    // And it is the overlay that holds the guest's data: every cluster
    // the guest wrote is allocated in it, no cluster it never touched is.
    let (allocated, stray) = overlay_clusters(&top, &plan, out.report.loop_rounds);
    assert!(stray.is_empty(), "the overlay's clusters: {stray:#?}");
    eprintln!("overlay: {allocated} clusters of its own (data or zeroes)");

    // Nothing went wrong on the way that the guest did not notice.
    for process in ["worker0", "frontend", "manager"] {
        let log = std::fs::read_to_string(cluster.log_path(process)).unwrap();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        assert!(bad.is_empty(), "{process} logged:\n{}", bad.join("\n"));
    }
    eprintln!(
        "overlay {} bytes; whole test {:?}",
        std::fs::metadata(&top).unwrap().len(),
        t0.elapsed()
    );
}
