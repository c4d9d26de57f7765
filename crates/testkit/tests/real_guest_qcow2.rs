//! A real Linux guest (QEMU, TCG) on a blkmesh export of a qcow2 overlay
//! over a raw base: the guest's checks (see `real_guest.rs`) write, flush,
//! discard and zero through the qcow2 node, whose allocating writes copy
//! the rest of each cluster up from the base. Afterwards QEMU's own tools
//! judge what blkmesh left behind: `qemu-img check` finds the overlay
//! sound, QEMU reads the overlay over its base as exactly what the guest
//! wrote on top of the base's data, and the base is untouched.
//!
//! The block jobs that delete a snapshot under the same guest (see
//! `qcow2_jobs.rs`, with a load generator): a commit of the overlay into
//! the base, completed (the export switched to the base) while the guest's
//! loop mode writes and verifies, after which the base alone reads as what
//! the guest wrote on top of its data; and a stream of the base into the
//! overlay, which then drops the base, after which the overlay alone does.
//!
//! Needs what `real_guest.rs` needs (`scripts/deps.sh`) and qemu-img;
//! build the binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkmesh_guest_check::plan::{self, Content, Extent, Plan, Region};
use blkmesh_guest_check::report::Verdict;
use blkmesh_proto::v1::{node_spec::Driver, NodeSpec, Qcow2Options};
use blkmesh_testkit::{
    host_tool, output_text, qcow2_overlay, stdout_of, Cluster, ClusterOptions, ExportOpts,
    GuestImage, GuestOptions, GuestOutcome, GuestVm,
};

const KIB: u64 = 1 << 10;
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
/// What the job tests write into the overlay with qemu-io before the
/// guest starts: [`OVERLAY_BYTE`] over the end of the base's pattern, all
/// of its constant part and the start of the hole after it, from and to
/// the middle of a cluster (so QEMU copies up the rest of the first and
/// last cluster from the base). The guest's plan leaves it alone but for a
/// few scattered blocks: what a commit must copy into the base, and what a
/// stream must not overwrite with the base's data.
const OVERLAY_PART: Region = Region::new(40 * MIB + 12 * KIB, 16 * MIB - 4 * KIB);
const OVERLAY_BYTE: u8 = 0xc3;

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

/// The export's id.
const EXPORT: &str = "guest";
/// Seconds of the guest's loop mode (write-then-verify rounds on both
/// queues before its other checks) in the job tests: the job runs, and
/// its switch-over happens, while the guest does I/O.
const LOOP_SECS: u64 = 12;

/// What every test starts from: the raw base of [`BASE_PARTS`] and a
/// qcow2 overlay over it, as nodes `base` and `top` of one worker, `top`
/// exported writable with two queues as [`EXPORT`].
struct Chain {
    cluster: Cluster,
    dir: PathBuf,
    base: PathBuf,
    top: PathBuf,
    base_data: Vec<u8>,
    /// What the disk reads before the guest: the base, with
    /// [`OVERLAY_PART`] on top if the overlay has it.
    disk_data: Vec<u8>,
    socket: PathBuf,
}

impl Chain {
    /// `base_read_only`: how the `base` node opens its file (only a
    /// commit writes it); `overlay_part`: whether the overlay starts with
    /// [`OVERLAY_PART`] (else empty).
    fn new(base_read_only: bool, overlay_part: bool) -> Chain {
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
        qcow2_overlay(&top, s(&base), "raw", "");
        let mut disk_data = base_data.clone();
        if overlay_part {
            let r = OVERLAY_PART;
            let cmd = format!("write -q -P {OVERLAY_BYTE:#x} {} {}", r.offset, r.len);
            host_tool("qemu-io", &["-f", "qcow2", "-c", &cmd, s(&top)]);
            disk_data[r.offset as usize..r.end() as usize].fill(OVERLAY_BYTE);
        }

        cluster
            .add_io_uring("base", &base, false, base_read_only)
            .unwrap();
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
            .add_export(ExportOpts::new(EXPORT, "top").writable().queues(2))
            .unwrap();
        Chain {
            cluster,
            dir,
            base,
            top,
            base_data,
            disk_data,
            socket,
        }
    }

    /// The guest on the export: the plan's seed and the geometry it must
    /// see.
    fn guest_options(&self) -> GuestOptions {
        GuestOptions::new(&self.socket)
            .dir(&self.dir)
            .queues(2)
            .param("seed", SEED)
            // The guest checks these itself too.
            .param("size", DISK_SIZE)
            .param("logical_block_size", 512)
            .param("hw_queues", 2)
    }

    /// Starts the guest in loop mode ([`LOOP_SECS`]) and waits until its
    /// loop runs (the geometry check, just before it, printed its line).
    fn start_looping_guest(&self, image: &GuestImage) -> GuestVm {
        let opts = self.guest_options().param("loop", LOOP_SECS);
        let mut vm = GuestVm::start(image, opts).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("qemu: {}", vm.command_line().join(" "));
        let deadline = Instant::now() + VERDICT_TIMEOUT;
        while !vm.console().contains("CHECK geometry") {
            if Instant::now() >= deadline || vm.pid().is_none() {
                self.cluster.dump_logs();
                panic!("the guest's checks did not start:\n{}", vm.console());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        vm
    }

    /// Waits for the guest's verdict and requires what the guest must see
    /// whatever happened under it: every check passing (no I/O error in
    /// its kernel log included) on the export's geometry.
    fn verdict(&self, vm: &mut GuestVm) -> GuestOutcome {
        let out = match vm.wait_verdict(VERDICT_TIMEOUT) {
            Ok(out) => out,
            Err(e) => {
                self.cluster.dump_logs();
                panic!("{e}");
            }
        };
        eprintln!(
            "guest: boot {:?}, verdict after {:?}\n{}",
            out.boot,
            out.elapsed,
            summary(&out)
        );
        if out.report.verdict != Some(Verdict::Pass) {
            self.cluster.dump_logs();
        }
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
        out
    }

    /// QEMU's checker finds the overlay sound: no corruption, no leak.
    /// (After the export is removed: the worker has let go of the image.)
    fn check_overlay(&self) {
        let check = Command::new("qemu-img")
            .args(["check", "--output=json", s(&self.top)])
            .output()
            .unwrap();
        assert_eq!(
            check.status.code(),
            Some(0),
            "qemu-img check: {}",
            output_text(&check)
        );
        eprintln!("qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
    }

    /// The base is as it was: blkmesh never wrote through to it.
    fn base_untouched(&self) {
        let after = std::fs::read(&self.base).unwrap();
        let base_diff = differences(&after, &self.base_data, &[]);
        assert!(base_diff.is_empty(), "the base was written: {base_diff:#?}");
    }

    /// Requires that QEMU reads `image` (of `format`, with whatever backing
    /// file its header names) as the guest's data on top of what the disk
    /// held before ([`Chain::disk_data`]).
    fn qemu_reads_the_plan(&self, image: &Path, format: &str, loop_rounds: [u64; 2], what: &str) {
        let flat = self.dir.join("flat.raw");
        host_tool(
            "qemu-img",
            &["convert", "-f", format, "-O", "raw", s(image), s(&flat)],
        );
        let plan = Plan::new(SEED, DISK_SIZE).unwrap();
        let want = expected_disk(&self.disk_data, &plan, loop_rounds);
        let got = std::fs::read(&flat).unwrap();
        std::fs::remove_file(&flat).unwrap();
        let problems = differences(&got, &want, &plan.expected(loop_rounds));
        assert!(
            problems.is_empty(),
            "QEMU reads {what} differently from the plan: {problems:#?}"
        );
    }

    /// Nothing went wrong on the way that the guest did not notice.
    fn quiet_logs(&self) {
        for process in ["worker0", "frontend", "manager"] {
            let log = std::fs::read_to_string(self.cluster.log_path(process)).unwrap();
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
                .collect();
            assert!(bad.is_empty(), "{process} logged:\n{}", bad.join("\n"));
        }
    }

    /// The node the export is on, per `blkmeshctl --json export list`.
    fn export_node(&self) -> String {
        let out = stdout_of(&self.cluster.ctl(["--json", "export", "list"]));
        let exports: serde_json::Value = serde_json::from_str(&out).unwrap();
        let export = exports
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == EXPORT)
            .unwrap_or_else(|| panic!("no export {EXPORT}: {out}"));
        assert_eq!(export["state"], "SERVING", "{out}");
        export["node"].as_str().unwrap().to_string()
    }

    /// Job `id`, per `blkmeshctl --json job show`.
    fn job(&self, id: &str) -> serde_json::Value {
        let out = stdout_of(&self.cluster.ctl(["--json", "job", "show", id]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
    }

    /// Waits (at most a minute) until job `id` is in `state`.
    fn wait_job(&self, id: &str, state: &str) {
        let out = self
            .cluster
            .ctl(["job", "wait", id, "--state", state, "--timeout", "60"]);
        if !out.status.success() {
            self.cluster.dump_logs();
            panic!(
                "job {id} did not get {state}: {}\n{}",
                output_text(&out),
                self.job(id)
            );
        }
    }
}

/// Whether the guest is still in its loop mode (its loop check has not
/// printed its line yet).
fn looping(vm: &GuestVm) -> bool {
    !vm.console().contains("CHECK loop")
}

#[test]
fn a_real_guest_passes_on_a_qcow2_overlay_and_qemu_agrees() {
    let t0 = Instant::now();
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let chain = Chain::new(true, false);
    let mut vm = GuestVm::start(&image, chain.guest_options()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("qemu: {}", vm.command_line().join(" "));
    let out = chain.verdict(&mut vm);
    drop(vm);

    // Every request that changed the mappings wrote the metadata back
    // before it completed, and the guest's last writes were flushed; the
    // worker lets go of the image with the export.
    chain.cluster.remove_export(EXPORT).unwrap();
    chain.check_overlay();
    chain.base_untouched();

    // QEMU reads the overlay over its base (the backing file its header
    // names) as the guest's data on top of the base's, copied-up rest of
    // each cluster and discarded or zeroed ranges included.
    chain.qemu_reads_the_plan(&chain.top, "qcow2", out.report.loop_rounds, "the overlay");
    // And it is the overlay that holds the guest's data: every cluster
    // the guest wrote is allocated in it, no cluster it never touched is.
    let plan = Plan::new(SEED, DISK_SIZE).unwrap();
    let (allocated, stray) = overlay_clusters(&chain.top, &plan, out.report.loop_rounds);
    assert!(stray.is_empty(), "the overlay's clusters: {stray:#?}");
    eprintln!("overlay: {allocated} clusters of its own (data or zeroes)");

    chain.quiet_logs();
    eprintln!(
        "overlay {} bytes; whole test {:?}",
        std::fs::metadata(&chain.top).unwrap().len(),
        t0.elapsed()
    );
}

/// An active commit under a live guest: started once the guest's loop
/// writes through the overlay, it copies the overlay ([`OVERLAY_PART`]
/// and what the guest wrote so far) into the base and follows the guest's
/// writes, and completing it switches the export to the base while the
/// guest's loop still writes and verifies on both queues; the guest's
/// other checks then run on the base. The guest sees nothing of it, and
/// afterwards the base alone reads as what the guest wrote on top of what
/// the disk held.
#[test]
fn a_guest_keeps_its_disk_through_a_live_commit() {
    let t0 = Instant::now();
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    // The commit writes the base: a writable node nobody else uses.
    let chain = Chain::new(false, true);
    let mut vm = chain.start_looping_guest(&image);
    let cluster = &chain.cluster;

    let started = t0.elapsed();
    stdout_of(&cluster.ctl(["job", "commit", "c1", EXPORT]));
    let job = chain.job("c1");
    assert_eq!(
        (
            job["kind"].as_str(),
            job["top"].as_str(),
            job["base"].as_str()
        ),
        (Some("commit"), Some("top"), Some("base")),
        "{job}"
    );
    chain.wait_job("c1", "ready");
    let ready = t0.elapsed();
    // Ready: the guest's writes keep going to the overlay, and the job
    // follows them into the base.
    std::thread::sleep(Duration::from_millis(1500));
    let done = stdout_of(&cluster.ctl(["job", "complete", "c1"]));
    assert!(done.contains("completed"), "{done}");
    let switched = t0.elapsed();
    // The switch-over came while the guest's loop was writing and
    // verifying (the loop check prints its line when it is over).
    assert!(
        looping(&vm),
        "the guest's loop ended before the switch-over ({switched:?} into the test): \
         no I/O to switch under\n{}",
        vm.console()
    );
    assert_eq!(chain.export_node(), "base");

    let out = chain.verdict(&mut vm);
    let [r0, r1] = out.report.loop_rounds;
    assert!(r0 > 0 && r1 > 0, "loop rounds {r0}+{r1}");
    for (t, lat) in out.report.loop_latency.iter().enumerate() {
        eprintln!(
            "guest loop thread {t}: rounds {} {lat:?} stalls_ms {:?}",
            out.report.loop_rounds[t], out.report.loop_stalls_ms[t]
        );
    }
    drop(vm);

    let job = chain.job("c1");
    eprintln!("job: {job}");
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(chain.export_node(), "base");
    let log = std::fs::read_to_string(cluster.log_path("frontend")).unwrap();
    assert!(log.contains("graph reopened"), "no live reopen logged");
    cluster.remove_export(EXPORT).unwrap();

    // The overlay is sound (what it holds is from before the switch-over:
    // stale now, but no corruption and no leak).
    chain.check_overlay();
    // The base alone holds the guest's data on top of its own: what the
    // overlay held, copied in, and what the guest wrote after the switch.
    chain.qemu_reads_the_plan(&chain.base, "raw", out.report.loop_rounds, "the base alone");

    chain.quiet_logs();
    eprintln!(
        "commit: started {started:?}, ready {ready:?}, switched {switched:?} into the test; \
         whole test {:?}",
        t0.elapsed()
    );
}

/// A stream under a live guest: started once the guest's loop writes
/// through the overlay, it copies what the overlay reads from the base
/// into it (at 16 MiB/s: about 4 s of the loop's 12), keeping what the
/// overlay holds ([`OVERLAY_PART`], the guest's writes), and then drops
/// the base, all while the guest's loop writes and verifies on both
/// queues; the guest's other checks then run on the overlay alone. The
/// guest sees nothing of it, the base is untouched, and the overlay alone
/// (its header names no backing file any more) reads as what the guest
/// wrote on top of what the disk held.
#[test]
fn a_guest_keeps_its_disk_through_a_live_stream() {
    let t0 = Instant::now();
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let chain = Chain::new(true, true);
    let mut vm = chain.start_looping_guest(&image);
    let cluster = &chain.cluster;

    let started = t0.elapsed();
    stdout_of(&cluster.ctl(["job", "stream", "s1", EXPORT, "--speed", "16M"]));
    chain.wait_job("s1", "completed");
    let streamed = t0.elapsed();
    assert!(
        looping(&vm),
        "the guest's loop ended before the stream did ({streamed:?} into the test)\n{}",
        vm.console()
    );
    // The node has no backing node any more; the header no backing file.
    let info = stdout_of(&cluster.ctl(["--json", "image", "info", "--node", "top"]));
    let images: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1, "{info}");
    assert_eq!(images[0]["backing_file"], "", "{info}");

    let out = chain.verdict(&mut vm);
    let [r0, r1] = out.report.loop_rounds;
    assert!(r0 > 0 && r1 > 0, "loop rounds {r0}+{r1}");
    drop(vm);

    let job = chain.job("s1");
    eprintln!("job: {job}");
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["done"].as_u64(), Some(DISK_SIZE), "{job}");
    assert_eq!(chain.export_node(), "top");
    cluster.remove_export(EXPORT).unwrap();

    chain.check_overlay();
    chain.base_untouched();
    // QEMU agrees that the overlay names no backing file, and reads it
    // alone (the base moved away) as the guest's data on top of the base's.
    let info = host_tool(
        "qemu-img",
        &["info", "-f", "qcow2", "--output=json", s(&chain.top)],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    std::fs::rename(&chain.base, chain.dir.join("base.moved")).unwrap();
    chain.qemu_reads_the_plan(
        &chain.top,
        "qcow2",
        out.report.loop_rounds,
        "the overlay alone",
    );

    chain.quiet_logs();
    eprintln!(
        "stream: started {started:?}, completed {streamed:?} into the test; whole test {:?}",
        t0.elapsed()
    );
}
