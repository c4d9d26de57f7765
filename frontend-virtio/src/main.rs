use clap::Parser;

/// blkmesh frontend: serves vhost-user-blk exports (a vhost-user back-end).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Manager gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    manager: String,
    /// Name to register under.
    #[arg(long, default_value = "frontend0")]
    name: String,
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
