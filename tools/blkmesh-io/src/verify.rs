//! Multi-queue data verifier.
//!
//! The first `--size` bytes are split into one stripe per queue and each
//! stripe into one sub-stripe per in-flight slot, so no two concurrent
//! requests overlap. Each queue runs on its own thread; each slot loops:
//! write a random-length, 512-aligned request at a random offset of its
//! sub-stripe with data derived from (seed, generation, disk offset), read it
//! back, compare. About one request in four uses several iovecs (at odd
//! buffer offsets), for writes and reads independently.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::VerifyArgs;
use crate::device::{Buffer, BufferPool, Completed, Device, DeviceInfo, Queue, Request};
use crate::exec::iovec_skew;
use crate::pattern::{self, Rng};
use crate::{seconds, Error};

/// Sector size requests are aligned to.
const SECTOR: u64 = 512;
/// Most iovecs in a vectored request.
const MAX_IOVECS: usize = 4;

/// Validated verifier parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    pub size: Option<u64>,
    pub seconds: Duration,
    pub bs_min: u64,
    pub bs_max: u64,
    pub qd: usize,
    pub queues: usize,
    pub seed: u64,
}

impl Plan {
    pub fn new(args: &VerifyArgs, queues: usize) -> Result<Plan, Error> {
        for (name, v) in [("--bs-min", args.bs_min), ("--bs-max", args.bs_max)] {
            if v == 0 || v % SECTOR != 0 {
                return Err(Error::Usage(format!(
                    "{name} {v} is not a positive multiple of 512"
                )));
            }
        }
        if args.bs_min > args.bs_max {
            return Err(Error::Usage("--bs-min is larger than --bs-max".into()));
        }
        Ok(Plan {
            size: args.size,
            seconds: seconds("--seconds", args.seconds)?,
            bs_min: args.bs_min,
            bs_max: args.bs_max,
            qd: args.qd as usize,
            queues,
            seed: args.seed,
        })
    }

    /// Bytes of one slot's buffer pool: the largest request, split into
    /// up to `MAX_IOVECS` skewed chunks, always fits in an empty pool.
    fn slot_pool_bytes(&self) -> u64 {
        self.bs_max.next_multiple_of(4096) + MAX_IOVECS as u64 * 8192
    }

    pub fn buffer_bytes(&self) -> u64 {
        self.slot_pool_bytes() * (self.qd * self.queues) as u64
    }

    /// (sub-stripe length, effective bs_max) for this device.
    fn layout(&self, info: &DeviceInfo) -> Result<(u64, u64), Error> {
        let size = self.size.unwrap_or(info.capacity);
        if size > info.capacity {
            return Err(Error::Usage(format!(
                "--size {size} exceeds the capacity {}",
                info.capacity
            )));
        }
        if info.request_alignment > SECTOR {
            return Err(Error::Usage(format!(
                "request alignment {} is above 512; not supported by verify",
                info.request_alignment
            )));
        }
        let slots = (self.queues * self.qd) as u64;
        let sub = size / slots / SECTOR * SECTOR;
        if sub < self.bs_min {
            return Err(Error::Usage(format!(
                "--size {size} leaves {sub} bytes per slot ({} queues x qd {}), below --bs-min {}",
                self.queues, self.qd, self.bs_min
            )));
        }
        let mut bs_max = self.bs_max.min(sub);
        if info.max_transfer > 0 {
            bs_max = bs_max.min(info.max_transfer / SECTOR * SECTOR);
        }
        Ok((sub, bs_max.max(self.bs_min)))
    }
}

/// Counts for one queue.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStats {
    pub queue: usize,
    pub writes: u64,
    pub reads: u64,
    pub vectored: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub mismatches: u64,
    /// Slowest request, submission to completion, in microseconds.
    pub max_latency_us: u64,
    /// Bytes read back at the end, checked against the last write to each sector.
    pub final_checked: u64,
    pub first_failure: Option<String>,
}

/// Result of a verify run.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub seconds: f64,
    pub size: u64,
    pub ops: u64,
    pub errors: u64,
    pub mismatches: u64,
    pub max_latency_us: u64,
    pub final_checked: u64,
    pub queues: Vec<QueueStats>,
}

impl VerifyReport {
    pub fn print(&self, json: bool, out: &mut dyn Write) -> Result<(), Error> {
        if json {
            let line =
                serde_json::to_string(self).map_err(|_| Error::Internal("report serialisation"))?;
            writeln!(out, "{line}")?;
            return Ok(());
        }
        for q in &self.queues {
            writeln!(
                out,
                "verify: queue {}: {} writes, {} reads ({} vectored), {} bytes written, \
                 {} errors, {} mismatches, max latency {} us",
                q.queue,
                q.writes,
                q.reads,
                q.vectored,
                q.bytes_written,
                q.errors,
                q.mismatches,
                q.max_latency_us
            )?;
            if let Some(f) = &q.first_failure {
                writeln!(out, "verify: queue {}: {f}", q.queue)?;
            }
        }
        writeln!(
            out,
            "verify: final read-back of {} bytes against the last write to every sector",
            self.final_checked
        )?;
        writeln!(out, "verify: max latency {} us", self.max_latency_us)?;
        writeln!(
            out,
            "verify: {} ops over {} bytes in {:.2} s, {} errors, {} mismatches",
            self.ops, self.size, self.seconds, self.errors, self.mismatches
        )?;
        Ok(())
    }

    pub fn check(&self) -> Result<(), Error> {
        if self.errors == 0 && self.mismatches == 0 {
            Ok(())
        } else {
            Err(Error::Failed(format!(
                "verify failed: {} errors, {} mismatches",
                self.errors, self.mismatches
            )))
        }
    }
}

/// Runs the verifier on every queue of `device`.
pub fn run(device: &mut Device, plan: &Plan, timeout: Duration) -> Result<VerifyReport, Error> {
    let (sub, bs_max) = plan.layout(&device.info())?;
    let mut pools = Vec::with_capacity(plan.queues);
    for _ in 0..plan.queues {
        let slot_pools = (0..plan.qd)
            .map(|_| device.pool().sub_pool(plan.slot_pool_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        pools.push(slot_pools);
    }
    let queues = device.take_queues();
    let start = Instant::now();
    let end = start + plan.seconds;
    let results: Vec<Result<QueueStats, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(pools)
            .enumerate()
            .map(|(i, (queue, slot_pools))| {
                let slots = slot_pools
                    .into_iter()
                    .enumerate()
                    .map(|(j, pool)| {
                        let lo = (i * plan.qd + j) as u64 * sub;
                        Slot {
                            pool,
                            lo,
                            hi: lo + sub,
                            op: None,
                            gens: vec![0; (sub / SECTOR) as usize],
                        }
                    })
                    .collect();
                let mut w = Worker {
                    queue,
                    slots,
                    rng: Rng::new(plan.seed ^ ((i as u64 + 1) << 40)),
                    seed: plan.seed,
                    generation: (i as u64) << 48,
                    bs_min: plan.bs_min,
                    bs_max,
                    max_iovecs: MAX_IOVECS.min(device.info().max_segments as usize),
                    end,
                    timeout,
                    stats: QueueStats {
                        queue: i,
                        ..QueueStats::default()
                    },
                };
                s.spawn(move || w.run().map(|()| w.stats))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or(Err(Error::WorkerPanicked(i))))
            .collect()
    });
    let queues = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(VerifyReport {
        seconds: start.elapsed().as_secs_f64(),
        size: sub * (plan.queues * plan.qd) as u64,
        ops: queues.iter().map(|q| q.writes + q.reads).sum(),
        errors: queues.iter().map(|q| q.errors).sum(),
        mismatches: queues.iter().map(|q| q.mismatches).sum(),
        max_latency_us: queues.iter().map(|q| q.max_latency_us).max().unwrap_or(0),
        final_checked: queues.iter().map(|q| q.final_checked).sum(),
        queues,
    })
}

/// The write-then-read-back cycle a slot is in.
#[derive(Debug, Clone, Copy)]
struct Op {
    offset: u64,
    len: u64,
    generation: u64,
    reading: bool,
    iovecs: usize,
    started: Instant,
}

/// `Slot::gens` value of sectors whose content is unknown (a write failed).
const UNKNOWN: u64 = u64::MAX;

struct Slot {
    pool: BufferPool,
    lo: u64,
    hi: u64,
    op: Option<Op>,
    /// Per sector of `lo..hi`: the generation last written there
    /// (0 = never, [`UNKNOWN`] = a write failed), for the final read-back.
    gens: Vec<u64>,
}

struct Worker {
    queue: Queue,
    slots: Vec<Slot>,
    rng: Rng,
    seed: u64,
    generation: u64,
    bs_min: u64,
    bs_max: u64,
    max_iovecs: usize,
    end: Instant,
    timeout: Duration,
    stats: QueueStats,
}

impl Worker {
    fn run(&mut self) -> Result<(), Error> {
        for slot in 0..self.slots.len() {
            self.start_write(slot)?;
        }
        let mut done = Vec::new();
        let mut stop = false;
        while self.queue.in_flight() > 0 {
            self.queue.wait(1, Some(self.timeout), &mut done)?;
            for c in done.drain(..) {
                let slot = usize::try_from(c.tag).map_err(|_| Error::Internal("tag"))?;
                let op = self.slots[slot]
                    .op
                    .ok_or(Error::Internal("idle slot completed"))?;
                let latency = op.started.elapsed().as_micros() as u64;
                self.stats.max_latency_us = self.stats.max_latency_us.max(latency);
                if !op.reading {
                    let ok = c.result.is_ok();
                    self.record_write(slot, &op, ok);
                }
                if let Err(e) = &c.result {
                    self.stats.errors += 1;
                    self.fail(format!(
                        "{} failed at offset {} length {}: {e}",
                        if op.reading { "read" } else { "write" },
                        op.offset,
                        op.len
                    ));
                    stop = true;
                    continue;
                }
                if !op.reading {
                    self.stats.writes += 1;
                    self.stats.bytes_written += op.len;
                    drop(c);
                    // Always read back what was written, even at the end.
                    self.start_read(slot, op)?;
                    continue;
                }
                self.stats.reads += 1;
                if !self.check(&op, c) {
                    stop = true;
                }
                self.slots[slot].op = None;
                if !stop && Instant::now() < self.end {
                    self.start_write(slot)?;
                }
            }
        }
        for slot in 0..self.slots.len() {
            self.read_back(slot)?;
        }
        Ok(())
    }

    fn record_write(&mut self, slot: usize, op: &Op, ok: bool) {
        let s = &mut self.slots[slot];
        let first = ((op.offset - s.lo) / SECTOR) as usize;
        let n = (op.len / SECTOR) as usize;
        if let Some(gens) = s.gens.get_mut(first..first + n) {
            gens.fill(if ok { op.generation } else { UNKNOWN });
        }
    }

    /// Reads the slot's whole range and checks every sector written during
    /// the run against its last write.
    fn read_back(&mut self, slot: usize) -> Result<(), Error> {
        let (lo, hi) = (self.slots[slot].lo, self.slots[slot].hi);
        let mut offset = lo;
        let mut done = Vec::new();
        while offset < hi {
            let len = self.bs_max.min(hi - offset);
            let buf = self.slots[slot].pool.alloc(len)?;
            self.queue
                .submit(Request::Read { offset, buf }, slot as u64);
            done.clear();
            while done.is_empty() {
                self.queue.wait(1, Some(self.timeout), &mut done)?;
            }
            for c in done.drain(..) {
                if let Err(e) = &c.result {
                    self.stats.errors += 1;
                    self.fail(format!(
                        "final read-back at offset {offset} length {len}: {e}"
                    ));
                    return Ok(());
                }
                let mut actual = Vec::with_capacity(len as usize);
                for b in c.bufs.into_vec() {
                    actual.extend_from_slice(&b.to_vec());
                }
                let mut expected = vec![0u8; SECTOR as usize];
                for (i, sector) in actual.chunks(SECTOR as usize).enumerate() {
                    let at = offset + i as u64 * SECTOR;
                    let generation = self.slots[slot].gens[((at - lo) / SECTOR) as usize];
                    if generation == 0 || generation == UNKNOWN {
                        continue;
                    }
                    pattern::fill(pattern::key(self.seed, generation), at, &mut expected);
                    if let Some(j) = pattern::first_mismatch(&expected, sector) {
                        self.stats.mismatches += 1;
                        self.fail(format!(
                            "final read-back: mismatch at offset {} (last written by generation {generation})",
                            at + j as u64
                        ));
                        return Ok(());
                    }
                }
                self.stats.final_checked += len;
            }
            offset += len;
        }
        Ok(())
    }

    fn fail(&mut self, msg: String) {
        self.stats.first_failure.get_or_insert(msg);
    }

    /// Lengths of the iovecs for `len` bytes: one, or 2..=max random
    /// 512-multiples.
    fn split(&mut self, len: u64) -> Vec<u64> {
        let sectors = len / SECTOR;
        let max = (self.max_iovecs as u64).min(sectors);
        if max < 2 || !self.rng.percent(25) {
            return vec![len];
        }
        let n = 2 + self.rng.below(max - 1);
        let mut cuts: Vec<u64> = (1..n).map(|_| 1 + self.rng.below(sectors - 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut lens = Vec::with_capacity(cuts.len() + 1);
        let mut prev = 0;
        for c in cuts.into_iter().chain([sectors]) {
            lens.push((c - prev) * SECTOR);
            prev = c;
        }
        lens
    }

    fn alloc(&mut self, slot: usize, lens: &[u64]) -> Result<Vec<Buffer>, Error> {
        let pool = &self.slots[slot].pool;
        if lens.len() == 1 {
            return Ok(vec![pool.alloc(lens[0])?]);
        }
        lens.iter()
            .enumerate()
            .map(|(i, &l)| Ok(pool.alloc_skewed(l, iovec_skew(i))?))
            .collect()
    }

    fn start_write(&mut self, slot: usize) -> Result<(), Error> {
        let (lo, hi) = (self.slots[slot].lo, self.slots[slot].hi);
        let span = (self.bs_max - self.bs_min) / SECTOR;
        let len = self.bs_min + self.rng.below(span + 1) * SECTOR;
        let offset = lo + self.rng.below((hi - lo - len) / SECTOR + 1) * SECTOR;
        self.generation += 1;
        let generation = self.generation;

        let mut data = vec![0u8; len as usize];
        pattern::fill(pattern::key(self.seed, generation), offset, &mut data);
        let lens = self.split(len);
        let mut bufs = self.alloc(slot, &lens)?;
        let mut at = 0;
        for b in &mut bufs {
            at += b.copy_from(&data[at..]);
        }
        let iovecs = bufs.len();
        if iovecs > 1 {
            self.stats.vectored += 1;
        }
        self.slots[slot].op = Some(Op {
            offset,
            len,
            generation,
            reading: false,
            iovecs,
            started: Instant::now(),
        });
        let req = if iovecs == 1 {
            Request::Write {
                offset,
                buf: bufs.remove(0),
            }
        } else {
            Request::Writev { offset, bufs }
        };
        self.queue.submit(req, slot as u64);
        Ok(())
    }

    fn start_read(&mut self, slot: usize, op: Op) -> Result<(), Error> {
        let lens = self.split(op.len);
        let mut bufs = self.alloc(slot, &lens)?;
        // Poison the buffers so a read that transfers nothing is caught.
        for b in &mut bufs {
            b.fill(0x5a);
        }
        let iovecs = bufs.len();
        if iovecs > 1 {
            self.stats.vectored += 1;
        }
        self.slots[slot].op = Some(Op {
            reading: true,
            iovecs,
            started: Instant::now(),
            ..op
        });
        let req = if iovecs == 1 {
            Request::Read {
                offset: op.offset,
                buf: bufs.remove(0),
            }
        } else {
            Request::Readv {
                offset: op.offset,
                bufs,
            }
        };
        self.queue.submit(req, slot as u64);
        Ok(())
    }

    /// Compares read data with what was written; false on mismatch.
    fn check(&mut self, op: &Op, c: Completed) -> bool {
        let bufs = c.bufs.into_vec();
        let mut actual = Vec::with_capacity(op.len as usize);
        for b in &bufs {
            actual.extend_from_slice(&b.to_vec());
        }
        let mut expected = vec![0u8; op.len as usize];
        pattern::fill(
            pattern::key(self.seed, op.generation),
            op.offset,
            &mut expected,
        );
        match pattern::first_mismatch(&expected, &actual) {
            None => true,
            Some(i) => {
                self.stats.mismatches += 1;
                let got = actual
                    .get(i)
                    .map_or("nothing".to_string(), |b| format!("0x{b:02x}"));
                self.fail(format!(
                    "mismatch at offset {} (request {}+{}, {} iovecs): expected 0x{:02x}, got {got}",
                    op.offset + i as u64,
                    op.offset,
                    op.len,
                    op.iovecs,
                    expected[i]
                ));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(size: u64, queues: usize, qd: usize) -> Plan {
        Plan {
            size: Some(size),
            seconds: Duration::from_secs(1),
            bs_min: 512,
            bs_max: 1 << 20,
            qd,
            queues,
            seed: 1,
        }
    }

    fn info(capacity: u64) -> DeviceInfo {
        DeviceInfo {
            capacity,
            request_alignment: 512,
            buf_alignment: 1,
            max_transfer: 0,
            max_segments: 254,
            num_queues: 1,
        }
    }

    #[test]
    fn layout_splits_into_disjoint_slots_and_clamps_bs_max() {
        let (sub, bs_max) = plan(64 << 20, 2, 4).layout(&info(256 << 20)).unwrap();
        assert_eq!(sub, 8 << 20);
        assert_eq!(bs_max, 1 << 20);
        let (sub, bs_max) = plan(1 << 20, 2, 4).layout(&info(1 << 20)).unwrap();
        assert_eq!(sub, 128 << 10);
        assert_eq!(bs_max, 128 << 10);
    }

    #[test]
    fn layout_rejects_too_small_or_too_large_sizes() {
        assert!(plan(64 << 20, 1, 1).layout(&info(1 << 20)).is_err());
        assert!(plan(2048, 2, 4).layout(&info(1 << 20)).is_err());
    }
}
