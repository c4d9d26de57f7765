//! Medians over the boots, and the tables: blkmesh against qsd, and
//! against a second blkmesh build when there is one.

use std::collections::BTreeMap;

use blkmesh_guest_check::workload::Workload;

use crate::run::Point;
use crate::server::Target;
use crate::Args;

/// Every point measured: (queues, target, workload) → one per boot; and
/// the idle CPU, (queues, target) → one per boot.
#[derive(Default)]
pub struct Results {
    points: BTreeMap<(u16, String, String), Vec<Point>>,
    idle: BTreeMap<(u16, String), Vec<f64>>,
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

impl Results {
    pub fn add(&mut self, queues: u16, target: &str, workload: &str, p: Point) {
        self.points
            .entry((queues, target.to_string(), workload.to_string()))
            .or_default()
            .push(p);
    }

    /// The storage side's CPU (% of one CPU) on one boot with the guest idle.
    pub fn add_idle(&mut self, queues: u16, target: &str, pct: f64) {
        self.idle
            .entry((queues, target.to_string()))
            .or_default()
            .push(pct);
    }

    fn median(&self, q: u16, target: &str, w: &str, f: fn(&Point) -> f64) -> Option<f64> {
        let points = self.points.get(&(q, target.to_string(), w.to_string()))?;
        median(points.iter().map(f).collect())
    }

    pub fn print(&self, workloads: &[Workload], queues: &[u16], targets: &[Target]) {
        let has = |label: &str| targets.iter().any(|t| t.label() == label);
        let iops = |p: &Point| p.iops;
        let p99 = |p: &Point| p.p99_us as f64;
        let cpu = |p: &Point| p.cpu_us_per_io;
        println!();
        println!("Medians over the boots; latency in µs as the guest saw it; CPU = the storage side's host CPU per I/O.");
        println!("IOPS/CPU ratio > 1: blkmesh does an I/O on less host CPU than qsd.");
        for &q in queues {
            println!();
            println!("### {q} queue(s)");
            println!();
            println!("| workload | qsd IOPS | blkmesh IOPS | ratio | qsd p99 | blkmesh p99 | qsd CPU µs/IO | blkmesh CPU µs/IO | IOPS/CPU ratio |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for w in workloads {
                let w = w.to_string();
                let (qi, bi) = (
                    self.median(q, "qsd", &w, iops),
                    self.median(q, "blkmesh", &w, iops),
                );
                let (qc, bc) = (
                    self.median(q, "qsd", &w, cpu),
                    self.median(q, "blkmesh", &w, cpu),
                );
                println!(
                    "| {w} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    cell(qi, 0),
                    cell(bi, 0),
                    ratio(bi, qi),
                    cell(self.median(q, "qsd", &w, p99), 0),
                    cell(self.median(q, "blkmesh", &w, p99), 0),
                    cell(qc, 1),
                    cell(bc, 1),
                    ratio(qc, bc),
                );
            }
            if self.idle.keys().any(|(iq, _)| *iq == q) {
                let idle: Vec<String> = targets
                    .iter()
                    .map(|t| {
                        let pct = self
                            .idle
                            .get(&(q, t.label().to_string()))
                            .and_then(|v| median(v.clone()));
                        format!("{} {} %", t.label(), cell(pct, 2))
                    })
                    .collect();
                println!();
                println!(
                    "Idle (guest up, no I/O), storage CPU in % of one CPU: {}",
                    idle.join(", ")
                );
            }
            if has("blkmesh-old") {
                println!();
                println!(
                    "| workload | old IOPS | new IOPS | new/old | old CPU µs/IO | new CPU µs/IO |"
                );
                println!("|---|---:|---:|---:|---:|---:|");
                for w in workloads {
                    let w = w.to_string();
                    let (oi, ni) = (
                        self.median(q, "blkmesh-old", &w, iops),
                        self.median(q, "blkmesh", &w, iops),
                    );
                    println!(
                        "| {w} | {} | {} | {} | {} | {} |",
                        cell(oi, 0),
                        cell(ni, 0),
                        ratio(ni, oi),
                        cell(self.median(q, "blkmesh-old", &w, cpu), 1),
                        cell(self.median(q, "blkmesh", &w, cpu), 1),
                    );
                }
            }
        }
    }
}

/// What the figures were taken under.
pub fn print_conditions(args: &Args, targets: &[Target]) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("## In-guest benchmark");
    println!();
    println!("- host: {cpus} CPUs, nothing pinned; guest: QEMU TCG, 2 vCPUs, 512 MiB memfd RAM, vhost-user-blk-pci");
    println!(
        "- guest I/O: O_DIRECT native AIO on /dev/vda; random workloads deeper than 1 use one job per vCPU (each pinned)"
    );
    println!(
        "- {} s measured + {} s warm-up per workload; {} boot(s) per target and queue count, targets in turn: {}",
        args.seconds,
        args.warmup,
        args.reps,
        targets.iter().map(Target::label).collect::<Vec<_>>().join(", ")
    );
    println!(
        "- image: {} MiB raw, written once, host page cache; qsd: file aio=io_uring cache.direct=off + raw; blkmesh: `blkmesh up --workers {}{}`",
        args.image_size >> 20,
        args.workers,
        if args.spread { " --spread" } else { "" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "-");
        assert_eq!(ratio(None, Some(1.0)), "-");
    }
}
