//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run blkmesh locally: the manager, the workers and the frontend, with a
/// default disk, under one supervisor.
#[derive(Debug, Parser)]
#[command(name = "blkmesh", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start everything, print how to connect, and supervise until Ctrl-C.
    Up(UpArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Directory for state, sockets, logs and the default image.
    #[arg(long, value_name = "DIR", default_value = "./run")]
    pub dir: PathBuf,
    /// Disk image to export (default `<dir>/disk0.img`; created sparse if absent).
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Size of a newly created image, e.g. 64M or 1G (an existing image keeps its size).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// vhost-user-blk socket of the export (default `<dir>/disk0.sock`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Number of worker processes.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Number of virtqueues of the export.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,
    /// Spread the export's queues over the workers (round robin).
    #[arg(long)]
    pub spread: bool,
    /// Export a null device of --size (reads zeroes, drops writes) instead of
    /// an image: for measuring blkmesh's own overhead.
    #[arg(long)]
    pub null: bool,
    /// Manager gRPC address (port 0: pick a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
}

const UNITS: [(char, u64); 4] = [
    ('K', 1 << 10),
    ('M', 1 << 20),
    ('G', 1 << 30),
    ('T', 1 << 40),
];

/// Parses a non-zero size that is a multiple of 512: bytes, or a number with
/// a k/M/G/T suffix (powers of 1024; `iB`/`B` accepted and ignored).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix(['B', 'b']))
        .unwrap_or(t);
    let (digits, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let up = c.to_ascii_uppercase();
            let mult = UNITS
                .iter()
                .find(|(u, _)| *u == up)
                .map(|(_, m)| *m)
                .ok_or_else(|| format!("unknown suffix {c:?} (use k, M, G or T)"))?;
            (&t[..t.len() - c.len_utf8()], mult)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a number with an optional k/M/G/T suffix".into());
    }
    let n = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or("too large")?;
    if n == 0 || n % 512 != 0 {
        return Err("must be a non-zero multiple of 512 bytes".into());
    }
    Ok(n)
}

/// Formats a byte count for people: `64 MiB`, `1 GiB`, `1536 KiB`, `1000 bytes`.
pub fn format_size(n: u64) -> String {
    for (u, m) in UNITS.iter().rev() {
        if n >= *m && n % m == 0 {
            return format!("{} {u}iB", n / m);
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn parses_sizes_with_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "",
            "0",
            "100",
            "1X",
            "G",
            "-1G",
            "1.5G",
            "99999999999999999999T",
            "ü",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536 << 10), "1536 KiB");
        assert_eq!(format_size(1000), "1000 bytes");
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_defaults_match_readme() {
        let cli = Cli::try_parse_from(["blkmesh", "up"]).unwrap();
        let Command::Up(up) = cli.command;
        assert_eq!(up.dir, PathBuf::from("./run"));
        assert_eq!(up.size, 1 << 30);
        assert_eq!((up.workers, up.queues), (2, 1));
        assert_eq!(up.listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn rejects_zero_workers() {
        assert!(Cli::try_parse_from(["blkmesh", "up", "--workers", "0"]).is_err());
    }
}
