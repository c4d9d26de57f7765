use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

/// blkmesh backend worker: executes node graphs for the frontend's queues.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unique worker name.
    #[arg(long, required_unless_present = "check_io_uring")]
    name: Option<String>,
    /// Unix socket to accept frontend connections on.
    #[arg(long, required_unless_present = "check_io_uring")]
    socket: Option<PathBuf>,
    /// Only check whether io_uring may be used here (a container's seccomp
    /// profile can forbid it), print the answer and exit: 0 yes, 1 no.
    #[arg(long, exclusive = true)]
    check_io_uring: bool,
    /// Manager gRPC address to register with (e.g. http://127.0.0.1:50051,
    /// https://HOST:PORT or unix:/PATH).
    #[arg(long)]
    manager: Option<String>,
    #[command(flatten)]
    security: blkmesh_proto::client::ManagerSecurityArgs,
    #[command(flatten)]
    sandbox: blkmesh_sandbox::SandboxArgs,
    #[command(flatten)]
    user: blkmesh_sandbox::UserArgs,
}

fn main() -> std::process::ExitCode {
    blkmesh_logging::init(true);
    // First: no other process of this uid may read this one through /proc.
    if let Err(e) = blkmesh_sandbox::set_not_dumpable() {
        eprintln!("blkmesh-worker: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let args = Args::parse();
    if args.check_io_uring {
        return match blkmesh_worker::probe::io_uring() {
            Ok(()) => {
                println!("io_uring: available");
                std::process::ExitCode::SUCCESS
            }
            Err(why) => {
                println!("io_uring: unavailable: {why}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let (Some(name), Some(socket)) = (args.name, args.socket) else {
        // clap requires both unless --check-io-uring.
        eprintln!("blkmesh-worker: --name and --socket are required");
        return std::process::ExitCode::from(2);
    };
    if let Err(why) = blkmesh_worker::probe::io_uring() {
        tracing::warn!("{why}; io_uring and nvme-io_uring nodes will fail to open on this worker");
    }
    if let Err(e) = args.security.install(args.manager.as_deref()) {
        eprintln!("blkmesh-worker: {e}");
        return std::process::ExitCode::from(2);
    }
    if let Err(e) = blkmesh_worker::registration::block_termination_signals() {
        eprintln!("blkmesh-worker: blocking signals: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // Resolve --user and --socket-owner/--socket-group now, to fail early.
    if let Err(e) = args.user.identity().and(args.sandbox.socket_policy()) {
        eprintln!("blkmesh-worker: {e}");
        return std::process::ExitCode::from(2);
    }
    blkmesh_worker::test_hooks::arm_from_env();
    let config = blkmesh_worker::WorkerConfig {
        name,
        socket: socket.clone(),
        manager: args.manager,
        sandbox: args.sandbox,
        user: args.user,
    };
    // SIGTERM/SIGINT: remove the socket and exit; in-flight I/O of a dying
    // worker is the frontend's to resubmit.
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
