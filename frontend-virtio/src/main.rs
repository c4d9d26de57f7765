use clap::Parser;

/// blkmesh frontend: serves vhost-user-blk exports (a vhost-user back-end).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Manager gRPC address (http://HOST:PORT, https://HOST:PORT or unix:/PATH).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    manager: String,
    /// Name to register under.
    #[arg(long, default_value = "frontend0")]
    name: String,
    #[command(flatten)]
    security: blkmesh_proto::client::ManagerSecurityArgs,
    #[command(flatten)]
    sandbox: blkmesh_sandbox::SandboxArgs,
    #[command(flatten)]
    user: blkmesh_sandbox::UserArgs,
}

fn main() -> std::process::ExitCode {
    blkmesh_logging::init(true);
    // First: no other process of this uid (a worker, say) may read guest
    // memory or the memfds of other tenants through /proc/<pid>/{mem,fd}.
    if let Err(e) = blkmesh_sandbox::set_not_dumpable() {
        eprintln!("blkmesh-frontend: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let args = Args::parse();
    if let Err(e) = args.security.install(Some(&args.manager)) {
        eprintln!("blkmesh-frontend: {e}");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blkmesh-frontend: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Least privilege (docs/SECURITY.md): export sockets get the socket
    // policy when they are bound; switch user, then filter every thread.
    let sandboxed = args.sandbox.socket_policy().and_then(|policy| {
        policy.install_global();
        args.user.drop_privileges()?;
        args.sandbox
            .install_seccomp(blkmesh_sandbox::Kind::Frontend)
    });
    if let Err(e) = sandboxed {
        eprintln!("blkmesh-frontend: {e}");
        return std::process::ExitCode::FAILURE;
    }
    rt.block_on(blkmesh_frontend::manager::run(
        args.manager,
        args.name,
        async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        },
    ));
    std::process::ExitCode::SUCCESS
}
