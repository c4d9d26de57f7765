//! `blkmeshctl`: command-line client for the blkmesh management API.
//!
//! ```text
//! blkmeshctl [--addr http://127.0.0.1:50051] [--json] <noun> <verb> ...
//! ```
//!
//! A manager serving TLS is reached at `https://HOST:PORT` with `--ca FILE`
//! (the CA that signed its certificate), plus `--cert`/`--key` when it asks
//! for a client certificate; `--token-file FILE` sends its bearer token.
//!
//! Exit status: 0 on success, 1 when the manager refuses the request or
//! cannot be reached (`error: <CODE>: <message>` on stderr), 2 for usage
//! errors and for a configuration file `config check` refuses.

#![forbid(unsafe_code)]

mod config;
mod events;
mod export;
mod failure;
mod frontend;
mod health;
mod image;
mod job;
mod node;
mod stats;
mod view;
mod worker;
mod zone;

use std::process::ExitCode;
use std::time::Duration;

use blkmesh_proto::client::{ClientConfig, ManagerChannel};
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::GetStatsRequest;
use clap::{Parser, Subcommand};

use crate::config::{config_check, ConfigCmd};
use crate::events::events;
use crate::export::{export, ExportCmd};
use crate::failure::Failure;
use crate::frontend::{frontend, FrontendCmd};
use crate::health::health;
use crate::image::{image, ImageCmd};
use crate::job::{job, JobCmd};
use crate::node::{node, NodeCmd};
use crate::view::Output;
use crate::worker::{worker, WorkerCmd};
use crate::zone::{zone, ZoneCmd};

/// Manage a blkmesh-manager: nodes, exports and workers; statistics and events.
#[derive(Debug, Parser)]
#[command(name = "blkmeshctl", version)]
struct Cli {
    /// Manager address: http://HOST:PORT, https://HOST:PORT (TLS; needs
    /// --ca) or unix:/PATH.
    #[arg(
        long,
        global = true,
        env = "BLKMESH_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// CA certificate (PEM) that signed the manager's TLS certificate.
    #[arg(long, global = true, value_name = "FILE", env = "BLKMESH_MANAGER_CA")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a manager that requires one.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_CERT",
        requires = "key"
    )]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_KEY",
        requires = "cert"
    )]
    key: Option<std::path::PathBuf>,
    /// File holding the manager's bearer token (sent as
    /// `authorization: Bearer <token>`).
    #[arg(long, global = true, value_name = "FILE", env = "BLKMESH_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Block nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// vhost-user-blk exports.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Backend workers.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// vhost-user-blk frontends (the processes serving the exports).
    #[command(subcommand)]
    Frontend(FrontendCmd),
    /// Zones of an export over a zoned node (run by the frontend serving it).
    #[command(subcommand)]
    Zone(ZoneCmd),
    /// Image files: create and describe them (qcow2, raw).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Block jobs on an export's qcow2 chain: stream, commit.
    #[command(subcommand)]
    Job(JobCmd),
    /// I/O statistics per export, queue and node (counters since each
    /// frontend or worker started; latency percentiles estimated from
    /// power-of-two histograms, shown as the bucket's bound).
    Stats {
        /// Only this export (repeat for more). Given alone, no nodes are shown.
        #[arg(long = "export", value_name = "E")]
        exports: Vec<String>,
        /// Only this node (repeat for more). Given alone, no exports are shown.
        #[arg(long = "node", value_name = "N")]
        nodes: Vec<String>,
    },
    /// Print events as they happen (one line each) until interrupted.
    Events {
        /// Stop after N events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Configuration files (TOML) for `blkmesh-manager --config`.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// gRPC health check; exits 0 if the manager is SERVING.
    Health {
        /// Service to check ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline: no runtime, no manager.
    if let Command::Config(ConfigCmd::Check { file }) = &cli.command {
        return config_check(file, cli.json);
    }
    let tls_without_cert = cli.addr.starts_with("https://") && cli.cert.is_none();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(mut f) => {
            // TLS 1.3: a manager that wants a client certificate closes the
            // connection after the handshake, which the first call sees.
            if tls_without_cert
                && matches!(f.code, "CANCELLED" | "UNKNOWN")
                && !f.message.contains("client certificate")
            {
                f.message.push_str(
                    " (if the manager requires client certificates, pass --cert and --key)",
                );
            }
            eprintln!("error: {}: {}", f.code, f.message);
            ExitCode::FAILURE
        }
    }
}

/// Connects to the manager; `streaming` calls get no overall deadline.
async fn connect(cli: &Cli, streaming: bool) -> Result<ManagerChannel, Failure> {
    let mut config =
        ClientConfig::new(cli.addr.clone()).with_connect_timeout(Duration::from_secs(5));
    config.ca_file = cli.ca.clone();
    config.cert_file = cli.cert.clone();
    config.key_file = cli.key.clone();
    config.token_file = cli.token_file.clone();
    if !streaming {
        // A 30 s deadline per call, except for streams that run until stopped.
        config = config.with_timeout(Duration::from_secs(30));
    }
    Ok(config.connect().await?)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Output { json: cli.json };
    let streaming = matches!(cli.command, Command::Events { .. });
    let channel = connect(&cli, streaming).await?;
    match cli.command {
        Command::Node(cmd) => node(cmd, channel, out).await,
        Command::Export(cmd) => export(cmd, channel, out).await,
        Command::Worker(cmd) => worker(cmd, channel, out).await,
        Command::Frontend(cmd) => frontend(cmd, channel, out).await,
        Command::Zone(cmd) => zone(cmd, channel, out).await,
        Command::Image(cmd) => image(cmd, channel, out).await,
        Command::Job(cmd) => job(cmd, channel, out).await,
        Command::Stats { exports, nodes } => {
            // Given only one kind of filter, show only that kind.
            let show_exports = !exports.is_empty() || nodes.is_empty();
            let show_nodes = !nodes.is_empty() || exports.is_empty();
            let resp = StatsServiceClient::new(channel)
                .get_stats(GetStatsRequest { exports, nodes })
                .await?
                .into_inner();
            stats::print_stats(&resp, out.json, show_exports, show_nodes);
            Ok(())
        }
        Command::Events { count } => events(channel, out, count).await,
        Command::Config(_) => Err(Failure {
            code: "INTERNAL",
            message: "config commands run without a manager".into(),
        }),
        Command::Health { service } => health(channel, out, service).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
