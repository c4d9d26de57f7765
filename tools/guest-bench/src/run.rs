//! One guest boot on one target: every workload in turn, with the
//! storage side's CPU counted between each workload's `BENCH-BEGIN` and
//! `BENCH-END` lines as they appear on the console.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use blkmesh_guest_check::report::VERDICT;
use blkmesh_guest_check::workload::{self, field, Workload};
use blkmesh_testkit::{GuestError, GuestImage, GuestOptions, GuestVm};

use crate::server::{Server, ServerError, Target};

/// How often the console is read for markers.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("{target}: the guest printed no verdict within {timeout:?}; console tail:\n{tail}")]
    Timeout {
        target: String,
        timeout: Duration,
        tail: String,
    },
    #[error("{target}: {what}; console tail:\n{tail}")]
    Bench {
        target: String,
        what: String,
        tail: String,
    },
}

/// What one workload gave on one boot.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub iops: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// The storage side's CPU per I/O in the measured window, µs.
    pub cpu_us_per_io: f64,
}

/// The settings of every boot.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workloads: Vec<Workload>,
    pub seconds: u64,
    pub warmup: u64,
    /// Seconds with the guest up and no I/O before the workloads (0: none).
    pub idle: u64,
    pub queues: u16,
}

/// What one boot gave.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// Per workload.
    pub points: BTreeMap<String, Point>,
    /// The storage side's CPU while the guest was up and idle, in percent
    /// of one CPU (with a plan that has an idle window).
    pub idle_cpu_pct: Option<f64>,
}

impl Plan {
    /// Generous: TCG boots in about 5 s, and each workload takes its
    /// warm-up, its seconds and a drain.
    fn timeout(&self) -> Duration {
        let per = self.seconds + self.warmup + 5;
        Duration::from_secs(120 + self.idle * 2 + per * self.workloads.len() as u64 * 2)
    }
}

/// Boots a guest on `target` serving `image_path` and runs `plan`.
pub fn run(
    image: &GuestImage,
    target: &Target,
    image_path: &Path,
    plan: &Plan,
    dir: &Path,
) -> Result<Boot, RunError> {
    let server = Server::start(target, image_path, plan.queues, dir)?;
    let names: Vec<String> = plan.workloads.iter().map(Workload::to_string).collect();
    let opts = GuestOptions::new(&server.socket)
        .queues(plan.queues)
        .param("bench", names.join(","))
        .param("bench_seconds", plan.seconds)
        .param("bench_warmup", plan.warmup)
        .param("bench_idle", plan.idle)
        .dir(&dir.join(target.label()));
    let mut vm = GuestVm::start(image, opts)?;
    let label = target.label().to_string();
    let tail = |vm: &GuestVm| {
        let c = vm.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    // Workload name → (CPU ns, when) at BEGIN and at END.
    let mut begin: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    let mut end: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    let deadline = Instant::now() + plan.timeout();
    let mut seen_lines = 0;
    loop {
        let console = vm.console();
        let lines: Vec<&str> = console.lines().collect();
        // The last line may still be being written: only whole lines.
        let whole = if console.ends_with('\n') {
            lines.len()
        } else {
            lines.len().saturating_sub(1)
        };
        let mut done = false;
        for line in &lines[seen_lines.min(whole)..whole] {
            let now = (server.cpu_ns(), Instant::now());
            if let Some(n) = field(line, workload::BEGIN, "name") {
                begin.insert(n.to_string(), now);
            } else if let Some(n) = field(line, workload::END, "name") {
                end.insert(n.to_string(), now);
            } else if line.contains(VERDICT) {
                done = true;
            }
        }
        seen_lines = seen_lines.max(whole);
        if done {
            break;
        }
        if Instant::now() >= deadline {
            return Err(RunError::Timeout {
                target: label,
                timeout: plan.timeout(),
                tail: tail(&vm),
            });
        }
        std::thread::sleep(POLL);
    }
    let outcome = vm.wait_verdict(Duration::from_secs(30))?;
    if !outcome.passed() {
        return Err(RunError::Bench {
            target: label,
            what: "the benchmark failed in the guest".into(),
            tail: tail(&vm),
        });
    }
    let mut points = BTreeMap::new();
    for r in workload::parse_results(&outcome.console) {
        let (Some(b), Some(e)) = (begin.get(&r.name), end.get(&r.name)) else {
            continue;
        };
        let cpu_ns = e.0.saturating_sub(b.0);
        // The console's markers frame the guest's measured window; the
        // guest's ops per second times the host's window is the I/O the
        // CPU was spent on.
        let ios = r.iops() * e.1.duration_since(b.1).as_secs_f64();
        points.insert(
            r.name.clone(),
            Point {
                iops: r.iops(),
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                cpu_us_per_io: if ios > 0.0 {
                    cpu_ns as f64 / 1e3 / ios
                } else {
                    0.0
                },
            },
        );
    }
    for n in &names {
        if !points.contains_key(n) {
            return Err(RunError::Bench {
                target: label,
                what: format!("no result (or no BEGIN/END) for {n}"),
                tail: tail(&vm),
            });
        }
    }
    let idle_cpu_pct = match (begin.get(workload::IDLE), end.get(workload::IDLE)) {
        _ if plan.idle == 0 => None,
        (Some(b), Some(e)) => Some(cpu_pct(e.0.saturating_sub(b.0), e.1.duration_since(b.1))),
        _ => {
            return Err(RunError::Bench {
                target: label,
                what: "no BEGIN/END for the idle window".into(),
                tail: tail(&vm),
            })
        }
    };
    Ok(Boot {
        points,
        idle_cpu_pct,
    })
}

/// `cpu_ns` of CPU over `wall`, in percent of one CPU.
fn cpu_pct(cpu_ns: u64, wall: Duration) -> f64 {
    let wall_ns = wall.as_nanos() as f64;
    if wall_ns > 0.0 {
        cpu_ns as f64 / wall_ns * 100.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_cpu_is_a_share_of_one_cpu() {
        assert_eq!(cpu_pct(50_000_000, Duration::from_secs(1)), 5.0);
        assert_eq!(cpu_pct(2_000_000_000, Duration::from_secs(1)), 200.0);
        assert_eq!(cpu_pct(1, Duration::ZERO), 0.0);
    }
}
