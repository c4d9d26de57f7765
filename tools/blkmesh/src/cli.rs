//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run blkmesh locally: the manager, the workers and the frontend, with a
/// default disk or the nodes and exports of a configuration file, under one
/// supervisor.
#[derive(Debug, Parser)]
#[command(name = "blkmesh", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start everything, print how to connect, and supervise until Ctrl-C.
    #[command(after_help = UP_HELP)]
    Up(UpArgs),
}

/// Shown after the options of `blkmesh up --help`.
const UP_HELP: &str = r#"Configuration file (--config FILE): instead of the default disk, the manager
applies the nodes and exports of FILE at start, and again at every restart
(adding what its state lacks, changing live what differs, keeping what the
file does not name). The file is checked before anything starts; an error
stops `blkmesh up` with exit status 2 and lines such as
  blkmesh.toml:12:5: node[2].throttle.iops: must be ...
Paths in the file are the paths the processes see: here, the host's. The
same file serves docker-compose when the host directories are mounted at
those same paths in the containers. deploy/config/blkmesh.toml documents
every key; for example:

  [[node]]
  name = "disk0"
  io_uring = { path = "/var/lib/blkmesh/images/disk0.img" }
  create = { size = "1G" }
  [[node]]
  name = "slow"
  throttle = { child = "disk0", iops = 5000, bps = "200M" }
  [[export]]
  id = "disk0"
  node = "slow"
  socket = "/run/blkmesh/disk0.sock"
  writable = true"#;

/// Default of `--worker-user`: a uid and gid no distribution assigns
/// (Debian's range for such ids is 60000-64999; docs in deploy/README.md).
pub const DEFAULT_WORKER_USER: &str = "64055:64055";

/// Options of the default disk, which a configuration file replaces.
const DEFAULT_DISK: [&str; 6] = ["image", "size", "socket", "queues", "spread", "null"];

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Directory for state, sockets, logs and the default image.
    #[arg(long, value_name = "DIR", default_value = "./run")]
    pub dir: PathBuf,
    /// Apply the nodes and exports of this configuration file (TOML)
    /// instead of adding the default disk (see below).
    #[arg(long, value_name = "FILE", conflicts_with_all = DEFAULT_DISK)]
    pub config: Option<PathBuf>,
    /// Remove the nodes and exports the configuration file does not name
    /// (kept by default). Needs --config.
    #[arg(long, requires = "config")]
    pub config_prune: bool,
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
    /// Serve the manager over TLS with this certificate (PEM); it must name
    /// the --listen host (e.g. an IP SAN 127.0.0.1). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) the workers, the frontend and blkmeshctl verify
    /// the manager with (default: --tls-cert itself, for a self-signed one).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Require the bearer token in this file on every manager call; every
    /// process started here gets it.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// When blkmesh runs as root: the user (and group) the workers switch to
    /// once their socket is bound, so that a compromised worker is not the
    /// frontend's uid (it cannot signal it or read it through /proc). The
    /// images blkmesh creates are given to this user; other images must be
    /// readable and writable by it. `root` keeps the workers root. Ignored
    /// when blkmesh does not run as root (everything runs as the caller).
    #[arg(long, value_name = "USER[:GROUP]", default_value = DEFAULT_WORKER_USER)]
    pub worker_user: String,
}

/// Parses a non-zero size that is a multiple of 512: bytes, or a number with
/// a k/M/G/T suffix (powers of 1024; `iB`/`B` accepted and ignored).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let n = blkmesh_graph::size::parse_size(s)?;
    if n == 0 || n % 512 != 0 {
        return Err("must be a non-zero multiple of 512 bytes".into());
    }
    Ok(n)
}

/// Formats a byte count for people: `64 MiB`, `1 GiB`, `1536 KiB`, `1000 bytes`.
pub fn format_size(n: u64) -> String {
    blkmesh_graph::size::format_size_iec(n)
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
        assert!(up.tls_cert.is_none() && up.tls_key.is_none() && up.tls_ca.is_none());
        assert!(up.token_file.is_none());
    }

    #[test]
    fn tls_needs_cert_and_key() {
        assert!(Cli::try_parse_from(["blkmesh", "up", "--tls-cert", "c.pem"]).is_err());
        assert!(Cli::try_parse_from(["blkmesh", "up", "--tls-key", "k.pem"]).is_err());
        assert!(Cli::try_parse_from(["blkmesh", "up", "--tls-ca", "ca.pem"]).is_err());
        let cli = Cli::try_parse_from([
            "blkmesh",
            "up",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--token-file",
            "t",
        ])
        .unwrap();
        let Command::Up(up) = cli.command;
        assert_eq!(up.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(up.token_file, Some(PathBuf::from("t")));
    }

    #[test]
    fn config_replaces_the_default_disk() {
        let cli = Cli::try_parse_from(["blkmesh", "up", "--config", "b.toml"]).unwrap();
        let Command::Up(up) = cli.command;
        assert_eq!(up.config, Some(PathBuf::from("b.toml")));
        assert!(!up.config_prune);
        for (flag, value) in [
            ("--size", Some("64M")),
            ("--image", Some("/i")),
            ("--socket", Some("/s")),
            ("--queues", Some("2")),
            ("--spread", None),
            ("--null", None),
        ] {
            let mut argv = vec!["blkmesh", "up", "--config", "b.toml", flag];
            argv.extend(value);
            assert!(
                Cli::try_parse_from(argv).is_err(),
                "{flag} accepted with --config"
            );
        }
        assert!(Cli::try_parse_from(["blkmesh", "up", "--config-prune"]).is_err());
        assert!(Cli::try_parse_from(["blkmesh", "up", "--config", "b", "--config-prune"]).is_ok());
    }

    #[test]
    fn rejects_zero_workers() {
        assert!(Cli::try_parse_from(["blkmesh", "up", "--workers", "0"]).is_err());
    }
}
