//! Benchmark: one thread per queue, `qd` requests kept in flight per queue,
//! fixed block size, random or sequential block-aligned offsets.
//!
//! Latency is measured per request from submission to the reaping of its
//! completion. Each thread submits every request it can, then blocks in
//! `do_io(min_completions = 1)`; requests resubmitted after one wake-up
//! reach the device together (one notification per batch).

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::{BenchArgs, RwMode};
use crate::device::{Buffer, BufferPool, Bufs, Device, DeviceInfo, IoError, Queue, Request};
use crate::hist::Histogram;
use crate::pattern::Rng;
use crate::{seconds, Error};

/// Validated benchmark parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rw: RwMode,
    pub bs: u64,
    pub qd: usize,
    pub queues: usize,
    pub seconds: Duration,
    pub warmup: Duration,
    pub rwmix_read: u8,
    pub size: Option<u64>,
    pub seed: u64,
}

impl Plan {
    pub fn new(args: &BenchArgs, queues: usize) -> Result<Plan, Error> {
        let secs = seconds("--seconds", args.seconds)?;
        if secs.is_zero() {
            return Err(Error::Usage("--seconds must be positive".into()));
        }
        if args.bs == 0 || args.bs % 512 != 0 {
            return Err(Error::Usage(format!(
                "--bs {} is not a positive multiple of 512",
                args.bs
            )));
        }
        let rwmix_read = match args.rw {
            RwMode::Randread | RwMode::Read => 100,
            RwMode::Randwrite | RwMode::Write => 0,
            RwMode::Randrw => args.rwmix_read,
        };
        Ok(Plan {
            rw: args.rw,
            bs: args.bs,
            qd: args.qd as usize,
            queues,
            seconds: secs,
            warmup: seconds("--warmup", args.warmup)?,
            rwmix_read,
            size: args.size,
            seed: args.seed,
        })
    }

    /// Buffer memory: one `bs` buffer per in-flight request.
    pub fn buffer_bytes(&self) -> u64 {
        let per_queue = BufferPool::bytes_needed((0..self.qd).map(|_| (self.bs, 0)));
        per_queue * self.queues as u64
    }

    /// The number of `bs` blocks offsets are drawn from.
    fn blocks(&self, info: &DeviceInfo) -> Result<u64, Error> {
        let size = self.size.unwrap_or(info.capacity);
        if size > info.capacity {
            return Err(Error::Usage(format!(
                "--size {size} exceeds the capacity {}",
                info.capacity
            )));
        }
        if self.bs % info.request_alignment != 0 {
            return Err(Error::Usage(format!(
                "--bs {} is not a multiple of the request alignment {}",
                self.bs, info.request_alignment
            )));
        }
        let blocks = size / self.bs;
        if blocks == 0 {
            return Err(Error::Usage(format!(
                "--bs {} is larger than the disk ({size} bytes)",
                self.bs
            )));
        }
        Ok(blocks)
    }
}

/// Result of a benchmark run; serialised as-is for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub rw: &'static str,
    pub bs: u64,
    pub qd: usize,
    pub queues: usize,
    pub seconds: f64,
    pub size: u64,
    pub ops: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub iops: f64,
    /// Decimal megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    pub mib_per_s: f64,
    pub lat_mean_us: f64,
    pub lat_min_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub lat_max_us: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl BenchReport {
    pub fn print(&self, json: bool, out: &mut dyn Write) -> Result<(), Error> {
        if json {
            let line =
                serde_json::to_string(self).map_err(|_| Error::Internal("report serialisation"))?;
            writeln!(out, "{line}")?;
            return Ok(());
        }
        writeln!(
            out,
            "{} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MB/s ({:.1} MiB/s)",
            self.rw, self.bs, self.qd, self.queues, self.iops, self.mb_per_s, self.mib_per_s
        )?;
        writeln!(
            out,
            "  latency (us): mean {:.1}, min {:.1}, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
            self.lat_mean_us,
            self.lat_min_us,
            self.lat_p50_us,
            self.lat_p99_us,
            self.lat_p999_us,
            self.lat_max_us
        )?;
        writeln!(
            out,
            "  {} ops ({} reads, {} writes) in {:.2} s over {} bytes, {} errors",
            self.ops, self.read_ops, self.write_ops, self.seconds, self.size, self.errors
        )?;
        if let Some(e) = &self.first_error {
            writeln!(out, "  first error: {e}")?;
        }
        Ok(())
    }

    /// Fails the run if any request failed.
    pub fn check(&self) -> Result<(), Error> {
        match &self.first_error {
            None => Ok(()),
            Some(e) => Err(Error::Failed(format!(
                "{} requests failed; first: {e}",
                self.errors
            ))),
        }
    }
}

#[derive(Debug, Default)]
struct WorkerStats {
    hist: Histogram,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<(bool, IoError)>,
}

/// Shared timing and layout of one run.
struct Run<'a> {
    plan: &'a Plan,
    blocks: u64,
    measure_from: Instant,
    end: Instant,
    timeout: Duration,
}

/// Runs the benchmark on every queue of `device`.
pub fn run(device: &mut Device, plan: &Plan, timeout: Duration) -> Result<BenchReport, Error> {
    let blocks = plan.blocks(&device.info())?;
    let pools = (0..plan.queues)
        .map(|_| {
            device
                .pool()
                .sub_pool(plan.buffer_bytes() / plan.queues as u64)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let queues = device.take_queues();
    if queues.len() != plan.queues {
        return Err(Error::Internal("queue count"));
    }

    let start = Instant::now();
    let run = Run {
        plan,
        blocks,
        measure_from: start + plan.warmup,
        end: start + plan.warmup + plan.seconds,
        timeout,
    };
    let results: Vec<Result<WorkerStats, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(pools)
            .enumerate()
            .map(|(i, (q, pool))| {
                let run = &run;
                s.spawn(move || worker(run, i, q, &pool))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or(Err(Error::WorkerPanicked(i))))
            .collect()
    });

    let mut total = WorkerStats::default();
    for r in results {
        let w = r?;
        total.hist.merge(&w.hist);
        total.reads += w.reads;
        total.writes += w.writes;
        total.errors += w.errors;
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
    }

    let secs = plan.seconds.as_secs_f64();
    let ops = total.reads + total.writes;
    let bytes = ops as f64 * plan.bs as f64;
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(BenchReport {
        rw: plan.rw.name(),
        bs: plan.bs,
        qd: plan.qd,
        queues: plan.queues,
        seconds: secs,
        size: blocks * plan.bs,
        ops,
        read_ops: total.reads,
        write_ops: total.writes,
        iops: ops as f64 / secs,
        mb_per_s: bytes / secs / 1e6,
        mib_per_s: bytes / secs / (1024.0 * 1024.0),
        lat_mean_us: total.hist.mean_ns() / 1e3,
        lat_min_us: us(total.hist.min_ns()),
        lat_p50_us: us(total.hist.quantile_ns(0.50)),
        lat_p99_us: us(total.hist.quantile_ns(0.99)),
        lat_p999_us: us(total.hist.quantile_ns(0.999)),
        lat_max_us: us(total.hist.max_ns()),
        errors: total.errors,
        first_error: total
            .first_error
            .map(|(write, e)| format!("{} failed: {e}", if write { "write" } else { "read" })),
    })
}

fn worker(
    run: &Run<'_>,
    index: usize,
    queue: Queue,
    pool: &BufferPool,
) -> Result<WorkerStats, Error> {
    let plan = run.plan;
    let mut w = Worker {
        run,
        queue,
        rng: Rng::new(plan.seed ^ ((index as u64) << 32)),
        // Sequential workloads: each queue starts at its own part of the disk.
        cursor: run.blocks * index as u64 / plan.queues as u64,
        submitted_at: vec![Instant::now(); plan.qd],
        is_write: vec![false; plan.qd],
        stats: WorkerStats::default(),
    };
    let now = Instant::now();
    for slot in 0..plan.qd {
        let buf = pool.alloc(plan.bs)?;
        w.submit(slot, buf, now);
    }
    w.complete_all()?;
    Ok(w.stats)
}

struct Worker<'a> {
    run: &'a Run<'a>,
    queue: Queue,
    rng: Rng,
    cursor: u64,
    submitted_at: Vec<Instant>,
    is_write: Vec<bool>,
    stats: WorkerStats,
}

impl Worker<'_> {
    fn next_offset(&mut self) -> u64 {
        let block = if self.run.plan.rw.is_random() {
            self.rng.below(self.run.blocks)
        } else {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % self.run.blocks;
            b
        };
        block * self.run.plan.bs
    }

    fn submit(&mut self, slot: usize, buf: Buffer, now: Instant) {
        let plan = self.run.plan;
        let offset = self.next_offset();
        let write = plan.rwmix_read < 100 && !self.rng.percent(plan.rwmix_read);
        self.is_write[slot] = write;
        self.submitted_at[slot] = now;
        let req = if write {
            Request::Write { offset, buf }
        } else {
            Request::Read { offset, buf }
        };
        self.queue.submit(req, slot as u64);
    }

    /// Reaps completions and resubmits until the run ends, then drains.
    fn complete_all(&mut self) -> Result<(), Error> {
        let run = self.run;
        let mut done = Vec::with_capacity(run.plan.qd);
        let mut stop = false;
        while self.queue.in_flight() > 0 {
            self.queue.wait(1, Some(run.timeout), &mut done)?;
            let now = Instant::now();
            let in_window = now >= run.measure_from && now < run.end;
            stop |= now >= run.end;
            for c in done.drain(..) {
                let slot = usize::try_from(c.tag).map_err(|_| Error::Internal("tag"))?;
                let Bufs::One(buf) = c.bufs else {
                    return Err(Error::Internal("bench request without its buffer"));
                };
                match c.result {
                    Ok(()) if in_window => {
                        if self.is_write[slot] {
                            self.stats.writes += 1;
                        } else {
                            self.stats.reads += 1;
                        }
                        if self.submitted_at[slot] >= run.measure_from {
                            self.stats.hist.record(now - self.submitted_at[slot]);
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        self.stats.errors += 1;
                        self.stats
                            .first_error
                            .get_or_insert((self.is_write[slot], e));
                        stop = true;
                    }
                }
                if !stop {
                    self.submit(slot, buf, now);
                }
            }
        }
        Ok(())
    }
}
