use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

/// blkmesh backend worker: executes node graphs for the frontend's queues.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unique worker name.
    #[arg(long)]
    name: String,
    /// Unix socket to accept frontend connections on.
    #[arg(long)]
    socket: PathBuf,
    /// Manager gRPC address to register with (e.g. http://127.0.0.1:50051).
    #[arg(long)]
    manager: Option<String>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = blkmesh_worker::registration::block_termination_signals() {
        eprintln!("blkmesh-worker: blocking signals: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let config = blkmesh_worker::WorkerConfig {
        name: args.name,
        socket: args.socket.clone(),
        manager: args.manager,
    };
    // SIGTERM/SIGINT: remove the socket and exit; in-flight I/O of a dying
    // worker is the frontend's to resubmit.
    let socket = args.socket;
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if blkmesh_worker::registration::wait_for_termination().is_ok() {
                let _ = std::fs::remove_file(&socket);
                std::process::exit(0);
            }
        });
    match blkmesh_worker::run(config, Arc::new(AtomicBool::new(false))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkmesh-worker: {e}: {}", source_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}
