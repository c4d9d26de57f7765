//! The in-guest benchmark's workloads and console lines, shared by the
//! guest (which runs them, `blkmesh.bench=<names>`) and the host (which
//! starts the guests and reads the results off the console).
//!
//! A workload is named `<block size>-<pattern>-qd<depth>`, as
//! `4k-randread-qd32` or `1m-write-qd8`. The guest prints, per workload:
//!
//! ```text
//! BENCH-BEGIN name=4k-randread-qd32
//! BENCH-END name=4k-randread-qd32
//! BENCH-RESULT name=4k-randread-qd32 jobs=2 ops=51234 seconds=5.000 p50_us=170 p99_us=950 errors=0
//! ```
//!
//! `BEGIN` and `END` frame the measured seconds (after a warm-up), so the
//! host can count what the storage side spent in between.

use std::fmt;
use std::str::FromStr;

pub const BEGIN: &str = "BENCH-BEGIN ";
pub const END: &str = "BENCH-END ";
/// The name on the markers of the idle window (`bench_idle`): the guest
/// up and doing no I/O. Not a workload name (those have a pattern).
pub const IDLE: &str = "idle";
pub const RESULT: &str = "BENCH-RESULT ";

/// The largest block size and queue depth a workload may ask for.
pub const MAX_BLOCK_SIZE: u64 = 4 << 20;
pub const MAX_QUEUE_DEPTH: u32 = 256;

/// What the requests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Pattern {
    pub fn writes(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    pub fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
        }
    }
}

/// One benchmark point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub block_size: u64,
    pub pattern: Pattern,
    pub queue_depth: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload {0:?}: expected <block size>-<pattern>-qd<depth>, as 4k-randread-qd32")]
    Shape(String),
    #[error("workload {0:?}: block size must be a multiple of 512 up to 4m")]
    BlockSize(String),
    #[error("workload {0:?}: pattern must be randread, randwrite, read or write")]
    Pattern(String),
    #[error("workload {0:?}: queue depth must be 1 to 256")]
    QueueDepth(String),
}

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Workload, WorkloadError> {
        let err = |f: fn(String) -> WorkloadError| f(s.to_string());
        let mut parts = s.split('-');
        let (Some(bs), Some(pattern), Some(qd), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err(WorkloadError::Shape));
        };
        let block_size = parse_size(bs)
            .filter(|&b| b > 0 && b % 512 == 0 && b <= MAX_BLOCK_SIZE)
            .ok_or_else(|| err(WorkloadError::BlockSize))?;
        let pattern = match pattern {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            _ => return Err(err(WorkloadError::Pattern)),
        };
        let queue_depth = qd
            .strip_prefix("qd")
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|d| (1..=MAX_QUEUE_DEPTH).contains(d))
            .ok_or_else(|| err(WorkloadError::QueueDepth))?;
        Ok(Workload {
            block_size,
            pattern,
            queue_depth,
        })
    }
}

/// `512`, `4k`, `1m` → bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'k') => (&s[..i], 1 << 10),
        (i, 'm') => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bs = self.block_size;
        if bs % (1 << 20) == 0 {
            write!(f, "{}m", bs >> 20)?;
        } else if bs % (1 << 10) == 0 {
            write!(f, "{}k", bs >> 10)?;
        } else {
            write!(f, "{bs}")?;
        }
        write!(f, "-{}-qd{}", self.pattern.name(), self.queue_depth)
    }
}

impl Workload {
    /// How many threads share the queue depth on a guest with `cpus`
    /// CPUs: one per CPU for random I/O deeper than 1 (so that blk-mq
    /// uses each CPU's queue), else one. Sequential I/O stays one stream.
    pub fn jobs(&self, cpus: u32) -> u32 {
        if self.pattern.random() {
            cpus.clamp(1, self.queue_depth)
        } else {
            1
        }
    }

    /// The queue depth of job `job` of `jobs`: the depth shared out, the
    /// first jobs taking what does not divide.
    pub fn job_depth(&self, job: u32, jobs: u32) -> u32 {
        self.queue_depth / jobs + u32::from(job < self.queue_depth % jobs)
    }
}

/// One `BENCH-RESULT` line.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub name: String,
    pub jobs: u32,
    /// Requests completed in the measured seconds.
    pub ops: u64,
    pub seconds: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: u64,
}

impl BenchResult {
    pub fn iops(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{RESULT}name={} jobs={} ops={} seconds={:.3} p50_us={} p99_us={} errors={}",
            self.name, self.jobs, self.ops, self.seconds, self.p50_us, self.p99_us, self.errors
        )
    }
}

/// The value of `key=` on a line after `marker`, wherever the marker
/// sits in the line (kernel messages may share it).
pub fn field<'a>(line: &'a str, marker: &str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Every well-formed `BENCH-RESULT` line of `console`, in order; a line
/// that does not parse is skipped (the host reports the missing name).
pub fn parse_results(console: &str) -> Vec<BenchResult> {
    console
        .lines()
        .filter_map(|line| {
            let get = |k| field(line, RESULT, k);
            Some(BenchResult {
                name: get("name")?.to_string(),
                jobs: get("jobs")?.parse().ok()?,
                ops: get("ops")?.parse().ok()?,
                seconds: get("seconds")?.parse().ok()?,
                p50_us: get("p50_us")?.parse().ok()?,
                p99_us: get("p99_us")?.parse().ok()?,
                errors: get("errors")?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "4k-randread-qd1",
            "4k-randwrite-qd32",
            "1m-read-qd8",
            "512-write-qd2",
        ] {
            let w: Workload = name.parse().unwrap();
            assert_eq!(w.to_string(), name);
        }
        let w: Workload = "64k-randread-qd4".parse().unwrap();
        assert_eq!(w.block_size, 64 << 10);
        assert_eq!(w.pattern, Pattern::RandRead);
        assert_eq!(w.queue_depth, 4);
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        type Want = fn(String) -> WorkloadError;
        let cases: [(&str, Want); 9] = [
            ("", WorkloadError::Shape),
            ("4k-randread", WorkloadError::Shape),
            ("4k-randread-qd1-x", WorkloadError::Shape),
            ("1000-randread-qd1", WorkloadError::BlockSize),
            ("8m-read-qd1", WorkloadError::BlockSize),
            ("k-read-qd1", WorkloadError::BlockSize),
            ("4k-trim-qd1", WorkloadError::Pattern),
            ("4k-read-qd0", WorkloadError::QueueDepth),
            ("4k-read-32", WorkloadError::QueueDepth),
        ];
        for (name, want) in cases {
            assert_eq!(
                name.parse::<Workload>(),
                Err(want(name.to_string())),
                "{name}"
            );
        }
        assert!(parse_size("99999999999999999999k").is_none());
    }

    #[test]
    fn depth_is_shared_over_cpus_for_random_io_only() {
        let w: Workload = "4k-randread-qd32".parse().unwrap();
        assert_eq!(w.jobs(2), 2);
        assert_eq!((w.job_depth(0, 2), w.job_depth(1, 2)), (16, 16));
        let w: Workload = "4k-randread-qd3".parse().unwrap();
        assert_eq!((w.job_depth(0, 2), w.job_depth(1, 2)), (2, 1));
        assert_eq!("4k-randread-qd1".parse::<Workload>().unwrap().jobs(2), 1);
        assert_eq!("1m-read-qd8".parse::<Workload>().unwrap().jobs(2), 1);
    }

    #[test]
    fn results_parse_among_kernel_noise() {
        let r = BenchResult {
            name: "4k-randread-qd1".into(),
            jobs: 1,
            ops: 1000,
            seconds: 2.0,
            p50_us: 300,
            p99_us: 900,
            errors: 0,
        };
        let console = format!(
            "BENCH-BEGIN name=x\n[ 1.2] virtio_blk: noise {r}\nBENCH-RESULT name=broken ops=x\n"
        );
        let parsed = parse_results(&console);
        assert_eq!(parsed, vec![r]);
        assert_eq!(parsed[0].iops(), 500.0);
        assert_eq!(field("a BENCH-BEGIN name=x", BEGIN, "name"), Some("x"));
    }
}
