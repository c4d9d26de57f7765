//! `blkmesh-guest-bench`: what a guest sees. Boots real Linux guests
//! (QEMU, TCG, the real-guest test tooling) whose disk is served by
//! qemu-storage-daemon and by blkmesh in turn, runs the workloads inside
//! with O_DIRECT native AIO (`blkmesh-guest-check`'s bench mode), and
//! prints medians, blkmesh/qsd ratios, and the storage side's host CPU
//! per I/O. `bench/guest.sh` builds everything and runs it.

#![forbid(unsafe_code)]

mod run;
mod server;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use blkmesh_guest_check::workload::Workload;
use blkmesh_testkit::GuestImage;
use clap::Parser;

use run::Plan;
use server::Target;

/// Compares blkmesh with qemu-storage-daemon as measured inside a guest.
#[derive(Parser, Debug)]
struct Args {
    /// Workloads: <block size>-<pattern>-qd<depth>, pattern one of
    /// randread, randwrite, read, write.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4k-randread-qd1,4k-randwrite-qd1,4k-randread-qd32,4k-randwrite-qd32,1m-read-qd8,1m-write-qd8"
    )]
    workloads: Vec<Workload>,
    /// Queue counts of the disk to measure with.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queues: Vec<u16>,
    /// Boots per target and queue count (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    reps: u32,
    /// Measured seconds per workload.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Warm-up seconds per workload.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// Seconds with the guest up and doing no I/O, before the workloads:
    /// the storage side's CPU then (0: not measured).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=600))]
    idle: u64,
    /// The blkmesh build to measure (`blkmesh` of target/release).
    #[arg(long, default_value = "target/release/blkmesh")]
    blkmesh: PathBuf,
    /// A second blkmesh build, measured alternately with the first (the
    /// previous commit's, say).
    #[arg(long)]
    blkmesh_old: Option<PathBuf>,
    /// blkmesh's worker processes; with --spread the queues go round robin.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    #[arg(long)]
    spread: bool,
    /// Leave qemu-storage-daemon out.
    #[arg(long)]
    no_qsd: bool,
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Size of the scratch image (bytes, or with k/m/g).
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    image_size: u64,
    /// Scratch directory: image, sockets, logs (default: a new one in /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = match s.to_ascii_lowercase().chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&b| b >= 1 << 20 && b % (1 << 20) == 0)
        .ok_or_else(|| format!("{s:?}: a whole number of MiB, at least 1m"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkmesh-guest-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("blkmesh-guest-bench.")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut targets = Vec::new();
    if !args.no_qsd {
        targets.push(Target::Qsd {
            program: args.qsd.clone(),
        });
    }
    let blkmesh = |label: &str, program: &PathBuf| Target::Blkmesh {
        label: label.into(),
        program: program.clone(),
        workers: args.workers,
        spread: args.spread,
    };
    targets.push(blkmesh("blkmesh", &args.blkmesh));
    if let Some(old) = &args.blkmesh_old {
        targets.push(blkmesh("blkmesh-old", old));
    }
    let image = GuestImage::prepare()?;
    let disk = dir.join("disk.img");
    prefill(&disk, args.image_size)?;
    table::print_conditions(args, &targets);
    let mut results = table::Results::default();
    for &queues in &args.queues {
        let plan = Plan {
            workloads: args.workloads.clone(),
            seconds: args.seconds,
            warmup: args.warmup,
            idle: args.idle,
            queues,
        };
        for rep in 1..=args.reps {
            for target in &targets {
                eprintln!(
                    "queues {queues}, rep {rep}/{}: {}",
                    args.reps,
                    target.label()
                );
                let boot = run::run(&image, target, &disk, &plan, &dir)?;
                if let Some(pct) = boot.idle_cpu_pct {
                    eprintln!("  idle (no I/O)        storage CPU {pct:>6.2} % of a CPU");
                    results.add_idle(queues, target.label(), pct);
                }
                for (name, p) in boot.points {
                    eprintln!(
                        "  {name:<20} {:>9.0} IOPS p50 {:>6} p99 {:>6} us, storage CPU {:>6.1} us/IO",
                        p.iops, p.p50_us, p.p99_us, p.cpu_us_per_io
                    );
                    results.add(queues, target.label(), &name, p);
                }
            }
        }
    }
    results.print(&args.workloads, &args.queues, &targets);
    Ok(())
}

/// Writes the whole image once, so that neither side reads holes, and
/// leaves it in the host's page cache.
fn prefill(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..size >> 20 {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}
