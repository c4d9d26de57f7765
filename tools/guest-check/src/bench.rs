//! The in-guest benchmark (`blkmesh.bench=<workload>,…`): each workload
//! runs O_DIRECT native AIO on the disk for a warm-up and then the
//! measured seconds, and prints the lines of
//! [`blkmesh_guest_check::workload`]. It writes over the disk: the host
//! gives it a scratch image.
//!
//! Parameters: `bench` (the workload names), `bench_seconds` (measured
//! seconds per workload, default 5), `bench_warmup` (default 1),
//! `bench_idle` (seconds of no I/O at all before the workloads, framed by
//! `BENCH-BEGIN name=idle` and `BENCH-END name=idle`, default 0: the host
//! measures what the storage side costs while a guest is up but quiet).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blkmesh_guest_check::report;
use blkmesh_guest_check::workload::{self, BenchResult, Workload};

use crate::aio::{Aio, IoEvent};
use crate::sys;

const DEFAULT_SECONDS: u64 = 5;
const DEFAULT_WARMUP: u64 = 1;

/// How long each part of the run lasts.
#[derive(Debug, PartialEq, Eq)]
struct Windows {
    /// Measured, per workload (`bench_seconds`, 1 to 3600).
    measured: Duration,
    /// Warm-up, per workload (`bench_warmup`, 0 to 3600).
    warmup: Duration,
    /// Idle before the workloads (`bench_idle`, 0 to 3600; 0: none).
    idle: Duration,
}

impl Windows {
    fn from_params(params: &BTreeMap<String, String>) -> Result<Windows, String> {
        let seconds = |key: &str, default: u64, min: u64| -> Result<Duration, String> {
            params
                .get(key)
                .map_or(Ok(default), |v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|s| (min..=3600).contains(s))
                        .ok_or_else(|| format!("blkmesh.{key}={v}: not a number of seconds"))
                })
                .map(Duration::from_secs)
        };
        Ok(Windows {
            measured: seconds("bench_seconds", DEFAULT_SECONDS, 1)?,
            warmup: seconds("bench_warmup", DEFAULT_WARMUP, 0)?,
            idle: seconds("bench_idle", 0, 0)?,
        })
    }
}

/// Runs the workloads `params` name; returns how many failed.
pub fn run(dev: &Path, params: &BTreeMap<String, String>) -> u32 {
    let mut failed = 0;
    let mut fail = |what: &str, why: String| {
        failed += 1;
        println!("{}bench-{what} FAIL {why}", report::CHECK);
    };
    let Windows {
        measured,
        warmup,
        idle,
    } = match Windows::from_params(params) {
        Ok(w) => w,
        Err(e) => {
            fail("params", e);
            return failed;
        }
    };
    let names = params.get("bench").map(String::as_str).unwrap_or_default();
    let workloads: Vec<Workload> = match names.split(',').map(str::parse).collect() {
        Ok(w) => w,
        Err(e) => {
            fail("params", format!("{e}"));
            return failed;
        }
    };
    let size = match std::fs::File::open(dev).and_then(|f| sys::device_size(&f)) {
        Ok(s) => s,
        Err(e) => {
            fail("device", format!("{}: {e}", dev.display()));
            return failed;
        }
    };
    if !idle.is_zero() {
        println!("{}name={}", workload::BEGIN, workload::IDLE);
        std::thread::sleep(idle);
        println!("{}name={}", workload::END, workload::IDLE);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    for w in workloads {
        match run_one(dev, size, cpus, w, warmup, measured) {
            Ok(r) if r.errors == 0 => println!("{r}"),
            Ok(r) => {
                println!("{r}");
                fail(&w.to_string(), format!("{} requests failed", r.errors));
            }
            Err(e) => fail(&w.to_string(), e),
        }
    }
    failed
}

/// What one job counted in the measured window.
#[derive(Default)]
struct JobCount {
    latencies_us: Vec<u32>,
    errors: u64,
}

fn run_one(
    dev: &Path,
    size: u64,
    cpus: u32,
    w: Workload,
    warmup: Duration,
    measured: Duration,
) -> Result<BenchResult, String> {
    if w.block_size > size {
        return Err(format!(
            "block size {} beyond the disk's {size} bytes",
            w.block_size
        ));
    }
    let jobs = w.jobs(cpus);
    let start = Instant::now();
    let begin = start + warmup;
    let end = begin + measured;
    let name = w.to_string();
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs)
            .map(|job| s.spawn(move || run_job(dev, size, cpus, w, job, jobs, begin, end)))
            .collect();
        std::thread::sleep(begin.saturating_duration_since(Instant::now()));
        println!("{}name={name}", workload::BEGIN);
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        println!("{}name={name}", workload::END);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a job panicked".into())))
            .collect::<Result<Vec<JobCount>, String>>()
    })?;
    let mut latencies: Vec<u32> = counts
        .iter()
        .flat_map(|c| c.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0, |&v| u64::from(v))
    };
    Ok(BenchResult {
        name,
        jobs,
        ops: latencies.len() as u64,
        seconds: measured.as_secs_f64(),
        p50_us: at(0.5),
        p99_us: at(0.99),
        errors: counts.iter().map(|c| c.errors).sum(),
    })
}

/// One thread of a workload, pinned to a CPU so that blk-mq submits on
/// that CPU's queue: keeps its share of the queue depth busy until `end`,
/// counting what completes between `begin` and `end`.
#[allow(clippy::too_many_arguments)]
fn run_job(
    dev: &Path,
    size: u64,
    cpus: u32,
    w: Workload,
    job: u32,
    jobs: u32,
    begin: Instant,
    end: Instant,
) -> Result<JobCount, String> {
    sys::pin_to_cpu((job % cpus) as usize).map_err(|e| format!("pin to CPU {job}: {e}"))?;
    let file = OpenOptions::new()
        .read(true)
        .write(w.pattern.writes())
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    let depth = w.job_depth(job, jobs) as usize;
    let bs = w.block_size as usize;
    let mut aio = Aio::new(file.as_fd(), depth, bs).map_err(|e| format!("io_setup: {e}"))?;
    // Sequential jobs each stream through their own slice of the disk.
    let blocks = size / w.block_size;
    let slice = (blocks / u64::from(jobs)).max(1);
    let mut next_seq = u64::from(job) * slice;
    let mut rng =
        0x9e37_79b9_7f4a_7c15u64 ^ (u64::from(job) + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next_offset = || {
        let block = if w.pattern.random() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let b = next_seq;
            next_seq = if b + 1 >= (u64::from(job) + 1) * slice {
                u64::from(job) * slice
            } else {
                b + 1
            };
            b
        };
        block * w.block_size
    };
    let mut started = Vec::with_capacity(depth);
    for slot in 0..depth {
        if w.pattern.writes() {
            aio.buf_mut(slot)
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u8) ^ (slot as u8) ^ 0x5a);
        }
        started.push(Instant::now());
        aio.submit(slot, w.pattern.writes(), next_offset())
            .map_err(|e| format!("io_submit: {e}"))?;
    }
    let mut count = JobCount::default();
    let mut in_flight = depth;
    let mut events = vec![IoEvent::default(); depth];
    while in_flight > 0 {
        let n = aio
            .wait(1, &mut events)
            .map_err(|e| format!("io_getevents: {e}"))?;
        let now = Instant::now();
        for ev in &events[..n] {
            let slot = ev.data as usize;
            let Some(&t) = started.get(slot) else {
                return Err(format!("completion for unknown slot {slot}"));
            };
            if now >= begin && now < end {
                if ev.res == bs as i64 {
                    let us = now.duration_since(t).as_micros();
                    count.latencies_us.push(us.min(u128::from(u32::MAX)) as u32);
                } else {
                    count.errors += 1;
                }
            }
            if now < end {
                started[slot] = Instant::now();
                aio.submit(slot, w.pattern.writes(), next_offset())
                    .map_err(|e| format!("io_submit: {e}"))?;
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn windows_default_and_take_zero_where_it_means_none() {
        let w = Windows::from_params(&params(&[])).unwrap();
        assert_eq!(
            w,
            Windows {
                measured: Duration::from_secs(5),
                warmup: Duration::from_secs(1),
                idle: Duration::ZERO,
            }
        );
        let w =
            Windows::from_params(&params(&[("bench_idle", "7"), ("bench_warmup", "0")])).unwrap();
        assert_eq!((w.idle, w.warmup), (Duration::from_secs(7), Duration::ZERO));
    }

    #[test]
    fn bad_window_lengths_are_refused_with_the_parameter_named() {
        for (key, bad) in [
            ("bench_idle", "x"),
            ("bench_idle", "3601"),
            ("bench_warmup", "-1"),
            ("bench_seconds", "0"),
        ] {
            let err = Windows::from_params(&params(&[(key, bad)])).unwrap_err();
            assert_eq!(err, format!("blkmesh.{key}={bad}: not a number of seconds"));
        }
    }
}
