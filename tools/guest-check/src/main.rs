//! `blkmesh-guest-check [DEVICE]`: data checks on a virtio-blk disk, run
//! inside a real Linux guest (the initramfs of
//! `blkmesh_testkit::guest`), where the disk is a blkmesh export.
//!
//! Unlike the host-side tests, which speak vhost-user to blkmesh directly,
//! this goes through the guest kernel: its virtio-blk driver, blk-mq's
//! queue mapping, the page cache, and the kernel's choice of request sizes,
//! flushes, discards and write-zeroes. The checks write the data plan of
//! [`blkmesh_guest_check::plan`], read it back, and print one
//! `CHECK <name> ok|FAIL <reason>` line each, then
//! `BLKMESH-GUEST-VERDICT: PASS|FAIL <n> checks failed` (see
//! [`blkmesh_guest_check::report`]).
//!
//! Parameters come from the kernel command line (`/proc/cmdline`), as
//! `blkmesh.<name>=<value>`:
//!
//! * `seed`: the data plan's seed (default 1);
//! * `loop`: seconds of write-then-verify rounds on both queues before the
//!   other checks (default 0: none), for fault-injection tests;
//! * any `GEOMETRY` key (`size`, `logical_block_size`, `hw_queues`, …): the
//!   value it must have;
//! * `bench`: run these benchmark workloads instead of the checks (see
//!   the `bench` module; it writes over the whole disk).

mod aio;
mod bench;
mod sys;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkmesh_guest_check::plan::{self, tag, Content, Plan, Region, BLOCK};
use blkmesh_guest_check::report;
use sha2::{Digest, Sha256};
use sys::AlignedBuf;

/// Seed when the command line gives none.
const DEFAULT_SEED: u64 = 1;
/// Size of one O_DIRECT transfer of the region checks.
const CHUNK: u64 = 64 * plan::KIB;
/// The `GEOMETRY` keys, in print order.
const GEOMETRY_KEYS: [&str; 8] = [
    "size",
    "logical_block_size",
    "physical_block_size",
    "max_hw_sectors_kb",
    "max_segments",
    "discard_max_bytes",
    "write_zeroes_max_bytes",
    "hw_queues",
];
/// Kernel log lines that mean an I/O failed somewhere.
const KERNEL_ERRORS: [&str; 2] = ["I/O error", "blk_update_request"];

type CheckResult = Result<String, String>;
/// A check: `Ok(details)` or `Err(reason)`.
type CheckFn = fn(&Ctx) -> CheckResult;

struct Ctx {
    dev: PathBuf,
    /// Block device name (`vda`), for /sys/block.
    name: String,
    params: BTreeMap<String, String>,
    plan: Plan,
}

fn main() {
    println!("{} uptime_ms={}", report::START, uptime_ms());
    let dev = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/dev/vda".into()));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = parse_params(&cmdline);
    let failed = if params.contains_key("bench") {
        bench::run(&dev, &params)
    } else {
        run(&dev, params)
    };
    if failed == 0 {
        println!("{}PASS", report::VERDICT);
    } else {
        println!("{}FAIL {failed} checks failed", report::VERDICT);
    }
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// `blkmesh.<k>=<v>` words of the kernel command line.
fn parse_params(cmdline: &str) -> BTreeMap<String, String> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("blkmesh."))
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs every check; returns the number that failed.
fn run(dev: &Path, params: BTreeMap<String, String>) -> u32 {
    let mut failed = 0;
    let mut record = |name: &str, r: CheckResult| match r {
        Ok(detail) => println!("{}{name} ok {detail}", report::CHECK),
        Err(reason) => {
            failed += 1;
            println!("{}{name} FAIL {reason}", report::CHECK);
        }
    };
    let seed = match params.get("seed").map(|s| s.parse::<u64>()) {
        None => DEFAULT_SEED,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            record("params", Err(format!("blkmesh.seed: {e}")));
            return failed;
        }
    };
    let size = match File::open(dev).and_then(|f| sys::device_size(&f)) {
        Ok(s) => s,
        Err(e) => {
            record("device", Err(format!("{}: {e}", dev.display())));
            return failed;
        }
    };
    let plan = match Plan::new(seed, size) {
        Ok(p) => p,
        Err(e) => {
            record("plan", Err(e.to_string()));
            return failed;
        }
    };
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ctx = Ctx {
        dev: dev.to_path_buf(),
        name,
        params,
        plan,
    };
    let checks: [(&str, CheckFn); 10] = [
        ("geometry", check_geometry),
        ("loop", check_loop),
        ("buffered", check_buffered),
        ("concurrent", check_concurrent),
        ("large", check_large),
        ("scattered", check_scattered),
        ("discard", check_discard),
        ("zeroout", check_zeroout),
        ("flush", check_flush),
        ("kernel-log", check_kernel_log),
    ];
    for (name, check) in checks {
        let t = Instant::now();
        // A panic in a check is that check's failure, not the end of the run.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&ctx)))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
        let ms = t.elapsed().as_millis();
        record(
            name,
            r.map(|d| format!("ms={ms} {d}").trim_end().to_string()),
        );
    }
    failed
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

// ----- helpers -----

impl Ctx {
    fn sys(&self, rel: &str) -> String {
        format!("/sys/block/{}/{rel}", self.name)
    }

    fn sys_u64(&self, rel: &str) -> Result<u64, String> {
        let p = self.sys(rel);
        let s = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
        s.trim().parse().map_err(|e| format!("{p}: {s:?}: {e}"))
    }

    fn open_direct(&self) -> Result<File, String> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.dev)
            .map_err(|e| format!("open {} O_DIRECT: {e}", self.dev.display()))
    }

    fn open_buffered(&self) -> Result<File, String> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.dev)
            .map_err(|e| format!("open {}: {e}", self.dev.display()))
    }

    /// The interrupt counts of this disk's virtqueues (`virtio0-req.0`, …),
    /// summed over CPUs, by queue index.
    fn queue_interrupts(&self) -> Result<BTreeMap<u32, u64>, String> {
        let link =
            std::fs::read_link(self.sys("device")).map_err(|e| format!("device link: {e}"))?;
        let virtio = link
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = format!("{virtio}-req.");
        let text = std::fs::read_to_string("/proc/interrupts")
            .map_err(|e| format!("/proc/interrupts: {e}"))?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some(q) = line
                .split_whitespace()
                .last()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let count: u64 = line
                .split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum();
            out.insert(q, count);
        }
        if out.is_empty() {
            return Err(format!("no {prefix}N lines in /proc/interrupts"));
        }
        Ok(out)
    }

    /// Flush requests completed (field 16 of /sys/block/<dev>/stat).
    fn flushes_completed(&self) -> Result<u64, String> {
        let p = self.sys("stat");
        let s = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
        s.split_whitespace()
            .nth(15)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{p} has no flush counter (field 16): {s:?}"))
    }
}

/// Writes `region` with `content` in O_DIRECT chunks of at most `CHUNK`.
fn write_direct(f: &File, seed: u64, region: Region, content: Content) -> Result<(), String> {
    let mut buf = AlignedBuf::new(CHUNK.min(region.len) as usize);
    let mut off = region.offset;
    while off < region.end() {
        let n = (region.end() - off).min(CHUNK) as usize;
        plan::fill(&mut buf[..n], off, seed, content);
        let t = Instant::now();
        f.write_all_at(&buf[..n], off)
            .map_err(|e| format!("write at offset {off} (+{n}): {e}"))?;
        latency::record(t.elapsed());
        off += n as u64;
    }
    Ok(())
}

/// Reads `region` back with O_DIRECT and compares it with `content`.
fn verify_direct(f: &File, seed: u64, region: Region, content: Content) -> Result<(), String> {
    let mut buf = AlignedBuf::new(CHUNK.min(region.len) as usize);
    let mut off = region.offset;
    while off < region.end() {
        let n = (region.end() - off).min(CHUNK) as usize;
        let t = Instant::now();
        f.read_exact_at(&mut buf[..n], off)
            .map_err(|e| format!("read at offset {off} (+{n}): {e}"))?;
        latency::record(t.elapsed());
        if let Some(at) = plan::first_mismatch(&buf[..n], off, seed, content) {
            let what = match content {
                Content::Zero => "expected zeroes".to_string(),
                Content::Pattern { tag, generation } => {
                    format!("data differs from pattern {tag}/{generation}")
                }
            };
            return Err(format!("mismatch at offset {at}: {what}"));
        }
        off += n as u64;
    }
    Ok(())
}

fn pattern(tag: u64) -> Content {
    Content::Pattern { tag, generation: 0 }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Latencies of the O_DIRECT reads and writes of a loop thread: what a
/// stall (a worker or frontend restart) costs as the guest sees it.
mod latency {
    use std::cell::RefCell;
    use std::time::Duration;

    thread_local! {
        static SAMPLES: RefCell<Option<Vec<u32>>> = const { RefCell::new(None) };
    }

    /// Starts recording on this thread.
    pub fn start() {
        SAMPLES.with(|s| *s.borrow_mut() = Some(Vec::new()));
    }

    /// Records one request (when recording).
    pub fn record(d: Duration) {
        SAMPLES.with(|s| {
            if let Some(v) = s.borrow_mut().as_mut() {
                v.push(d.as_micros().min(u32::MAX as u128) as u32);
            }
        });
    }

    /// A request slower than this is a stall (a failure being recovered
    /// from, as the guest sees it), listed on its own.
    const STALL_US: u32 = 50_000;
    /// At most this many stalls are listed.
    const MAX_STALLS: usize = 64;

    /// Stops recording: `ops=N p50_us=… p99_us=… max_us=… stalls_ms=a,b,…`
    /// (the stalls in the order they happened; empty if nothing was
    /// recorded).
    pub fn take() -> String {
        let mut v = SAMPLES.with(|s| s.borrow_mut().take()).unwrap_or_default();
        if v.is_empty() {
            return String::new();
        }
        let stalls: Vec<String> = v
            .iter()
            .filter(|&&us| us >= STALL_US)
            .take(MAX_STALLS)
            .map(|us| (us / 1000).to_string())
            .collect();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        format!(
            "ops={} p50_us={} p99_us={} max_us={} stalls_ms={}",
            v.len(),
            at(0.5),
            at(0.99),
            v[v.len() - 1],
            stalls.join(",")
        )
    }
}

// ----- checks -----

/// The disk as the guest kernel sees it, printed for the host to compare
/// with the export, and compared with `blkmesh.<key>` expectations.
fn check_geometry(ctx: &Ctx) -> CheckResult {
    let mut g: BTreeMap<&str, u64> = BTreeMap::new();
    g.insert("size", ctx.sys_u64("size")? * 512);
    // Between "size" and "hw_queues": the queue's own attributes.
    for key in &GEOMETRY_KEYS[1..GEOMETRY_KEYS.len() - 1] {
        g.insert(key, ctx.sys_u64(&format!("queue/{key}"))?);
    }
    let mq = std::fs::read_dir(ctx.sys("mq")).map_err(|e| format!("{}: {e}", ctx.sys("mq")))?;
    g.insert("hw_queues", mq.count() as u64);
    let line: Vec<String> = GEOMETRY_KEYS
        .iter()
        .map(|k| format!("{k}={}", g[k]))
        .collect();
    println!("{}{}", report::GEOMETRY, line.join(" "));

    let mut wrong = Vec::new();
    if g["size"] != ctx.plan.disk_size {
        wrong.push(format!(
            "sysfs size {} != BLKGETSIZE64 {}",
            g["size"], ctx.plan.disk_size
        ));
    }
    for key in GEOMETRY_KEYS {
        if let Some(want) = ctx.params.get(key) {
            if want != &g[key].to_string() {
                wrong.push(format!("{key}={} (expected {want})", g[key]));
            }
        }
    }
    if wrong.is_empty() {
        Ok(String::new())
    } else {
        Err(wrong.join(", "))
    }
}

/// Loop mode: write-then-verify rounds from both CPUs until the time is up,
/// so the host can kill and restart blkmesh processes under guest I/O.
fn check_loop(ctx: &Ctx) -> CheckResult {
    let secs: u64 = match ctx.params.get("loop") {
        None => return Ok("not requested".into()),
        Some(s) => s.parse().map_err(|e| format!("blkmesh.loop={s}: {e}"))?,
    };
    if secs == 0 {
        return Ok("not requested".into());
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let results: Vec<(u64, String, Result<(), String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    let mut rounds = 0u64;
                    latency::start();
                    let r = loop_rounds(ctx, t, deadline, &mut rounds);
                    let lat = latency::take();
                    (
                        rounds,
                        lat,
                        r.map_err(|e| format!("thread {t} round {rounds}: {e}")),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or((0, String::new(), Err("thread panicked".into())))
            })
            .collect()
    });
    let mut errors = Vec::new();
    for (t, (rounds, lat, r)) in results.iter().enumerate() {
        println!("{}thread={t} rounds={rounds} {lat}", report::LOOP);
        if let Err(e) = r {
            errors.push(e.clone());
        }
    }
    if errors.is_empty() {
        Ok(format!(
            "rounds={}+{} seconds={secs}",
            results[0].0, results[1].0
        ))
    } else {
        Err(errors.join("; "))
    }
}

/// Loop thread `t`: rounds over its half of [`plan::LOOP`] until
/// `deadline`; `rounds` counts the completed ones.
fn loop_rounds(ctx: &Ctx, t: u64, deadline: Instant, rounds: &mut u64) -> Result<(), String> {
    sys::pin_to_cpu(t as usize).map_err(|e| format!("pin to CPU {t}: {e}"))?;
    let f = ctx.open_direct()?;
    let region = plan::LOOP.half(t);
    while Instant::now() < deadline {
        let c = Content::Pattern {
            tag: tag::LOOP + t,
            generation: *rounds,
        };
        write_direct(&f, ctx.plan.seed, region, c)?;
        verify_direct(&f, ctx.plan.seed, region, c)?;
        *rounds += 1;
    }
    Ok(())
}

/// Buffered writes and fsync, then the page cache dropped and the data read
/// back with O_DIRECT: what fsync promised is on the device.
fn check_buffered(ctx: &Ctx) -> CheckResult {
    let seed = ctx.plan.seed;
    let region = plan::BUFFERED;
    let c = pattern(tag::BUFFERED);
    let f = ctx.open_buffered()?;
    let mut written = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = region.offset;
    while off < region.end() {
        plan::fill(&mut buf, off, seed, c);
        f.write_all_at(&buf, off)
            .map_err(|e| format!("buffered write at offset {off}: {e}"))?;
        written.update(&buf);
        off += CHUNK;
    }
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    drop(f);
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop_caches: {e}"))?;

    let f = ctx.open_direct()?;
    let mut read = Sha256::new();
    let mut abuf = AlignedBuf::new(CHUNK as usize);
    let mut off = region.offset;
    while off < region.end() {
        f.read_exact_at(&mut abuf, off)
            .map_err(|e| format!("O_DIRECT read at offset {off}: {e}"))?;
        read.update(&abuf[..]);
        off += CHUNK;
    }
    let (w, r) = (hex(&written.finalize()), hex(&read.finalize()));
    if w != r {
        let where_ = verify_direct(&f, seed, region, c).err().unwrap_or_default();
        return Err(format!("sha256 written {w} read {r} {where_}"));
    }
    Ok(format!("sha256={w}"))
}

/// O_DIRECT writes from a thread on each CPU, so blk-mq submits on both
/// hardware queues (and so both of blkmesh's virtqueues, spread over the
/// workers, carry I/O); both queues' interrupts must rise.
fn check_concurrent(ctx: &Ctx) -> CheckResult {
    let hw_queues = std::fs::read_dir(ctx.sys("mq"))
        .map_err(|e| format!("{}: {e}", ctx.sys("mq")))?
        .count();
    if hw_queues < 2 {
        return Err(format!(
            "the disk has {hw_queues} hardware queue(s), need 2"
        ));
    }
    let before = ctx.queue_interrupts()?;
    let seed = ctx.plan.seed;
    let c = pattern(tag::CONCURRENT);
    let results: Vec<Result<i32, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || -> Result<i32, String> {
                    sys::pin_to_cpu(t as usize).map_err(|e| format!("pin to CPU {t}: {e}"))?;
                    let f = ctx.open_direct()?;
                    let chunks = ctx.plan.concurrent_chunks(t);
                    for r in &chunks {
                        write_direct(&f, seed, *r, c)?;
                    }
                    for r in &chunks {
                        verify_direct(&f, seed, *r, c)?;
                    }
                    Ok(sys::current_cpu())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut cpus = Vec::new();
    for (t, r) in results.into_iter().enumerate() {
        cpus.push(r.map_err(|e| format!("thread {t}: {e}"))?);
    }
    // Read back once more from here: each thread's data, whole.
    let f = ctx.open_direct()?;
    verify_direct(&f, seed, plan::CONCURRENT, c)?;
    let after = ctx.queue_interrupts()?;
    let mut deltas = Vec::new();
    for q in 0..2u32 {
        let (b, a) = (
            before.get(&q).copied().unwrap_or(0),
            after.get(&q).copied().unwrap_or(0),
        );
        if a <= b {
            return Err(format!(
                "interrupts of queue {q} did not rise ({b} -> {a}); before {before:?} after {after:?}"
            ));
        }
        deltas.push(format!("q{q}+{}", a - b));
    }
    Ok(format!("cpus={cpus:?} irqs={}", deltas.join(",")))
}

/// One 4 MiB O_DIRECT write and one read, with the request size limit
/// raised as far as the device allows (from the kernel's 1280 KiB
/// default), so requests near seg_max × size_max reach blkmesh.
fn check_large(ctx: &Ctx) -> CheckResult {
    let region = plan::LARGE;
    let c = pattern(tag::LARGE);
    let seed = ctx.plan.seed;
    let knob = ctx.sys("queue/max_sectors_kb");
    let old = ctx.sys_u64("queue/max_sectors_kb")?;
    let new = ctx
        .sys_u64("queue/max_hw_sectors_kb")?
        .min(region.len / 1024);
    std::fs::write(&knob, new.to_string()).map_err(|e| format!("{knob} = {new}: {e}"))?;
    let r = (|| -> Result<String, String> {
        let f = ctx.open_direct()?;
        let mut buf = AlignedBuf::with_align(region.len as usize, 2 << 20);
        plan::fill(&mut buf, region.offset, seed, c);
        let ios = |ctx: &Ctx| -> Result<(u64, u64), String> {
            let s = std::fs::read_to_string(ctx.sys("stat")).map_err(|e| format!("stat: {e}"))?;
            let f: Vec<u64> = s
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            Ok((f[0], f[4]))
        };
        let (r0, w0) = ios(ctx)?;
        f.write_all_at(&buf, region.offset)
            .map_err(|e| format!("write {}+{}: {e}", region.offset, region.len))?;
        buf.fill(0);
        f.read_exact_at(&mut buf, region.offset)
            .map_err(|e| format!("read {}+{}: {e}", region.offset, region.len))?;
        let (r1, w1) = ios(ctx)?;
        if let Some(at) = plan::first_mismatch(&buf, region.offset, seed, c) {
            return Err(format!("mismatch at offset {at}"));
        }
        Ok(format!(
            "max_sectors_kb={old}->{new} write_requests={} read_requests={}",
            w1 - w0,
            r1 - r0
        ))
    })();
    // Put the limit back even on failure, for the checks after this one.
    std::fs::write(&knob, old.to_string()).map_err(|e| format!("{knob} = {old}: {e}"))?;
    r
}

/// Single 4 KiB O_DIRECT writes all over the disk, the last block included.
fn check_scattered(ctx: &Ctx) -> CheckResult {
    let f = ctx.open_direct()?;
    let c = pattern(tag::SCATTERED);
    let seed = ctx.plan.seed;
    for &off in &ctx.plan.scattered {
        write_direct(&f, seed, Region::new(off, BLOCK), c)?;
    }
    for &off in &ctx.plan.scattered {
        verify_direct(&f, seed, Region::new(off, BLOCK), c)?;
    }
    Ok(format!(
        "blocks={} last={}",
        ctx.plan.scattered.len(),
        ctx.plan.scattered.last().copied().unwrap_or(0)
    ))
}

/// Data written, then a range operation, then the range must read zeroes.
fn check_range_op(
    ctx: &Ctx,
    region: Region,
    tag: u64,
    limit_key: &str,
    op: fn(&File, u64, u64) -> io::Result<()>,
    op_name: &str,
) -> CheckResult {
    let limit = ctx.sys_u64(&format!("queue/{limit_key}"))?;
    if limit == 0 {
        // The kernel would emulate it (or refuse): the device's own
        // operation is what this check is about.
        return Err(format!("the device does not offer it ({limit_key}=0)"));
    }
    let f = ctx.open_direct()?;
    let seed = ctx.plan.seed;
    write_direct(&f, seed, region, pattern(tag))?;
    verify_direct(&f, seed, region, pattern(tag))?;
    op(&f, region.offset, region.len)
        .map_err(|e| format!("{op_name} {}+{}: {e}", region.offset, region.len))?;
    verify_direct(&f, seed, region, Content::Zero).map_err(|e| format!("after {op_name}: {e}"))?;
    Ok(format!("bytes={} {limit_key}={limit}", region.len))
}

fn check_discard(ctx: &Ctx) -> CheckResult {
    check_range_op(
        ctx,
        plan::DISCARD,
        tag::DISCARD,
        "discard_max_bytes",
        sys::discard,
        "BLKDISCARD",
    )
}

fn check_zeroout(ctx: &Ctx) -> CheckResult {
    check_range_op(
        ctx,
        plan::ZEROOUT,
        tag::ZEROOUT,
        "write_zeroes_max_bytes",
        sys::zeroout,
        "BLKZEROOUT",
    )
}

/// Every fsync after a dirtying write must reach the device as a FLUSH
/// (the disk has a volatile write cache): the flush counter rises by at
/// least the number of fsyncs.
fn check_flush(ctx: &Ctx) -> CheckResult {
    let f = ctx.open_buffered()?;
    let seed = ctx.plan.seed;
    let before = ctx.flushes_completed()?;
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..plan::FLUSH_BLOCKS {
        let r = ctx.plan.flush_block(i);
        plan::fill(&mut buf, r.offset, seed, pattern(tag::FLUSH));
        f.write_all_at(&buf, r.offset)
            .map_err(|e| format!("write at offset {}: {e}", r.offset))?;
        f.sync_all().map_err(|e| format!("fsync {i}: {e}"))?;
    }
    let after = ctx.flushes_completed()?;
    let d = ctx.open_direct()?;
    let whole = Region::new(plan::FLUSH.offset, plan::FLUSH_BLOCKS * BLOCK);
    verify_direct(&d, seed, whole, pattern(tag::FLUSH))?;
    if after < before + plan::FLUSH_BLOCKS {
        return Err(format!(
            "{} fsyncs but the flush counter went {before} -> {after}",
            plan::FLUSH_BLOCKS
        ));
    }
    Ok(format!(
        "fsyncs={} flushes=+{}",
        plan::FLUSH_BLOCKS,
        after - before
    ))
}

/// No I/O error anywhere in the kernel log, including the ones the
/// checks' own system calls did not see (readahead, writeback).
fn check_kernel_log(_ctx: &Ctx) -> CheckResult {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("/dev/kmsg: {e}"))?;
    let mut buf = vec![0u8; 8192];
    let mut records = 0u64;
    let mut bad = Vec::new();
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                records += 1;
                let rec = String::from_utf8_lossy(&buf[..n]);
                let msg = rec.split_once(';').map(|(_, m)| m).unwrap_or(&rec).trim();
                if KERNEL_ERRORS.iter().any(|e| msg.contains(e)) && bad.len() < 5 {
                    bad.push(msg.lines().next().unwrap_or("").to_string());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // EPIPE: records were overwritten before we read them; go on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => return Err(format!("/dev/kmsg: {e}")),
        }
    }
    if bad.is_empty() {
        Ok(format!("records={records}"))
    } else {
        Err(bad.join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_come_from_blkmesh_words_only() {
        let p = parse_params("console=ttyS0 quiet blkmesh.seed=9 blkmesh.loop=30 blkmesh.x");
        assert_eq!(p.len(), 2);
        assert_eq!(p["seed"], "9");
        assert_eq!(p["loop"], "30");
    }

    #[test]
    fn direct_io_round_trips_on_a_file() {
        // tmpfs does not take O_DIRECT; a plain buffered file exercises the
        // chunking and comparison.
        let f = tempfile::tempfile().unwrap();
        let r = Region::new(8192, 3 * CHUNK + 4096);
        write_direct(&f, 4, r, pattern(7)).unwrap();
        verify_direct(&f, 4, r, pattern(7)).unwrap();
        let e = verify_direct(&f, 4, r, pattern(8)).unwrap_err();
        assert!(e.contains("offset 8192"), "{e}");
    }
}
