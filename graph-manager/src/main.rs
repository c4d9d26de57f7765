//! `blkmesh-manager` binary: parses arguments and runs the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use blkmesh_manager::{Manager, ManagerConfig};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The blkmesh gRPC control plane.
#[derive(Debug, Parser)]
#[command(name = "blkmesh-manager", version)]
struct Args {
    /// TCP address to serve gRPC on (port 0: pick a free port).
    #[arg(long, default_value = blkmesh_manager::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Also serve on this unix socket (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Directory holding state.json (created if missing).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Serve Prometheus metrics on this TCP address (`GET /metrics`), e.g.
    /// 127.0.0.1:9100 (port 0: pick a free port). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Log filter, e.g. `info` or `blkmesh_manager=debug` (default: $RUST_LOG, else info).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match &args.log {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("blkmesh-manager: error: invalid log filter: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blkmesh-manager: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("blkmesh-manager: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), blkmesh_manager::ManagerError> {
    let mut config = ManagerConfig::new(args.state_dir).with_listen(args.listen);
    config.unix = args.unix;
    config.metrics = args.metrics;
    let manager = Manager::bind(config).await?;
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "blkmesh-manager listening on {}",
        manager.local_addr()
    );
    if let Some(addr) = manager.metrics_addr() {
        let _ = writeln!(stdout, "blkmesh-manager metrics on {addr}");
    }
    let _ = stdout.flush();
    manager.serve(shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install SIGTERM handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
