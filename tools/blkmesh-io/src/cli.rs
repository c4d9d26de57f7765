//! Command-line interface (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cmd::parse_size;

/// Drive a vhost-user-blk export as a guest would (libblkio
/// virtio-blk-vhost-user, or blkmesh's own driver), or a file directly
/// (`--file`, libblkio io_uring): qemu-io–style commands, zone commands, a
/// benchmark, and a multi-queue data verifier.
///
/// Exit status: 0 success, 1 I/O error / data mismatch / device failure,
/// 2 bad usage or command syntax.
#[derive(Debug, Parser)]
#[command(name = "blkmesh-io", version, after_help = COMMANDS_HELP)]
pub struct Cli {
    /// vhost-user-blk Unix socket.
    #[arg(
        short = 's',
        long,
        value_name = "PATH",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub socket: Option<PathBuf>,

    /// Instead of an export, drive this file or block device directly with
    /// libblkio's io_uring driver (through the page cache): the ceiling a
    /// server is measured against. Not with --driver native.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Number of virtqueues to start.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub queues: u16,

    /// Virtqueue size (power of two; libblkio's default is 256).
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u32>,

    /// Open the device read-only (needed for exports that are read-only).
    #[arg(long)]
    pub read_only: bool,

    /// Use busy-polling queues (libblkio poll queues) instead of eventfds.
    #[arg(long)]
    pub poll: bool,

    /// Seconds to wait for any completion before declaring the device hung.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub timeout: f64,

    /// virtio-blk driver: libblkio's (`blkio`) or blkmesh's own (`native`,
    /// which also sends zone requests). Default: native when a zone
    /// command is given, else blkio. bench and verify need blkio.
    #[arg(long, value_enum, value_name = "DRIVER")]
    pub driver: Option<DriverKind>,

    /// Run every -c command even after one failed (exit status still 1).
    #[arg(short = 'k', long)]
    pub keep_going: bool,

    /// Command to run (repeatable; run in order, stop at the first failure).
    #[arg(short = 'c', long = "cmd", value_name = "CMD")]
    pub commands: Vec<String>,

    /// Machine-readable output: one JSON object per command / per run.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub mode: Option<Mode>,
}

const COMMANDS_HELP: &str = "\
Commands for -c (sizes and offsets: bytes or k/m/g/t suffix; -q picks the queue):
  write        [-P pattern] [-q N] OFF LEN       (default pattern 0xcd)
  read         [-P pattern] [-q N] OFF LEN       (-P: verify every byte)
  writev       [-P pattern] [-q N] OFF LEN [LEN ...]
  readv        [-P pattern] [-q N] OFF LEN [LEN ...]
  flush        [-q N]
  discard      [-q N] OFF LEN
  write_zeroes [-u] [-q N] OFF LEN               (-u: may unmap)
  info
Zone commands (zoned devices; native driver, chosen automatically):
  zone_report    [-q N] [OFF [COUNT]]            (zones from OFF's; default all)
  zone_open      [-q N] OFF                      (OFF: a zone's start)
  zone_close     [-q N] OFF
  zone_finish    [-q N] OFF
  zone_reset     [-q N] OFF
  zone_reset_all [-q N]
  zone_append    [-P pattern] [-q N] OFF LEN     (prints where the data landed)";

/// Which virtio-blk driver talks to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DriverKind {
    /// libblkio's virtio-blk-vhost-user driver.
    Blkio,
    /// blkmesh's own driver (blkmesh-vhost-user-client); needed for zone
    /// commands.
    Native,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Measure IOPS, bandwidth and latency percentiles.
    Bench(BenchArgs),
    /// Write, read back and check data on every queue concurrently.
    Verify(VerifyArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RwMode {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl RwMode {
    pub fn is_random(self) -> bool {
        matches!(self, RwMode::Randread | RwMode::Randwrite | RwMode::Randrw)
    }

    pub fn name(self) -> &'static str {
        match self {
            RwMode::Randread => "randread",
            RwMode::Randwrite => "randwrite",
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Randrw => "randrw",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// I/O pattern.
    #[arg(long, value_enum)]
    pub rw: RwMode,

    /// Block size.
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    pub bs: u64,

    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,

    /// Measured run time.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,

    /// Unmeasured warm-up before the measured run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,

    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix_read: u8,

    /// Limit offsets to the first SIZE bytes (default: whole capacity).
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,

    /// Seed for random offsets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Bytes of the disk to use, split into one stripe per queue.
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,

    /// Run time.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,

    /// Smallest request (multiple of 512).
    #[arg(long, default_value = "512", value_parser = size_arg)]
    pub bs_min: u64,

    /// Largest request (multiple of 512).
    #[arg(long, default_value = "1M", value_parser = size_arg)]
    pub bs_max: u64,

    /// Requests in flight per queue (each in its own sub-stripe).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub qd: u32,

    /// Seed for offsets, lengths and data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("invalid size '{s}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_bench_with_sizes() {
        let cli = Cli::try_parse_from([
            "blkmesh-io",
            "--socket",
            "/s",
            "bench",
            "--rw",
            "randread",
            "--bs",
            "64k",
            "--qd",
            "8",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Some(Mode::Bench(b)) = cli.mode else {
            panic!("not bench")
        };
        assert_eq!(b.bs, 65536);
        assert_eq!(b.qd, 8);
        assert_eq!(b.rw, RwMode::Randread);
    }

    #[test]
    fn takes_a_socket_or_a_file_never_both_nor_neither() {
        let cli = Cli::try_parse_from(["blkmesh-io", "--file", "/f", "-c", "info"]).unwrap();
        assert_eq!(cli.file.as_deref(), Some(std::path::Path::new("/f")));
        assert_eq!(cli.socket, None);
        assert!(
            Cli::try_parse_from(["blkmesh-io", "-s", "/s", "--file", "/f", "-c", "info"]).is_err()
        );
        assert!(Cli::try_parse_from(["blkmesh-io", "-c", "info"]).is_err());
    }

    #[test]
    fn parses_driver() {
        let cli =
            Cli::try_parse_from(["blkmesh-io", "-s", "/s", "--driver", "native", "-c", "info"])
                .unwrap();
        assert_eq!(cli.driver, Some(DriverKind::Native));
        assert!(Cli::try_parse_from(["blkmesh-io", "-s", "/s", "--driver", "qemu"]).is_err());
    }

    #[test]
    fn rejects_bad_bench_size() {
        assert!(Cli::try_parse_from([
            "blkmesh-io",
            "--socket",
            "/s",
            "bench",
            "--rw",
            "read",
            "--bs",
            "4z"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["blkmesh-io", "--socket", "/s", "--queues", "0"]).is_err());
    }
}
