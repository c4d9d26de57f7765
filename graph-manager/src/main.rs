//! `blkmesh-manager` binary: parses arguments and runs the library.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use blkmesh_manager::{Manager, ManagerConfig, TlsConfig, TokenSource};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Shown after the options in `--help`.
const AFTER_HELP: &str = r#"Security (everything off by default: plaintext, no token):
  --tls-cert/--tls-key     serve TLS on --listen; clients then use https://ADDR
                           and verify the manager with the CA that signed the
                           certificate (blkmeshctl --ca, the other binaries
                           --manager-ca, or $BLKMESH_MANAGER_CA).
  --tls-client-ca          also require a client certificate signed by this CA
                           (blkmeshctl --cert/--key, the other binaries
                           --manager-cert/--manager-key).
  --token-file             every blkmesh.v1 call, on --listen and on --unix, must
                           carry `authorization: Bearer <token>` (clients:
                           --token-file or $BLKMESH_TOKEN_FILE); others get
                           UNAUTHENTICATED. The grpc.health.v1 service and
                           --metrics stay open for probes.
The unix socket (--unix, mode 0600) is never TLS.

Configuration file (--config FILE, or $BLKMESH_CONFIG; empty = none): nodes and exports in
TOML, applied at start and reconciled with state.json. deploy/config/blkmesh.toml
is a commented example of every key; in short:

  [[node]]
  name = "disk0"
  io_uring = { path = "/var/lib/blkmesh/images/disk0.img" }
  create = { size = "1G" }        # sparse file, made when missing (io_uring only)
  [[node]]
  name = "slow"
  throttle = { child = "disk0", iops = 5000, bps = "200M", group = "tenant1" }
  [[export]]
  id = "disk0"
  node = "slow"
  socket = "/run/blkmesh/disk0.sock"
  writable = true
  num_queues = 2

Drivers: io_uring, null, nvme_io_uring, virtio_blk_vhost_user,
virtio_blk_vhost_vdpa, raw, zoned, throttle, fault_injection (fields as in the
API; sizes as "64k"/"1G" or bytes). At start: nodes and exports of the file that
the state lacks are added (exports as soon as a worker registers); ones with
the same settings are left alone; ones with other settings are changed live
when UpdateNode/ResizeNode can (options, throttle limits, fault rules, growing
a null node or a sized raw window), else the manager refuses to start; ones
the file does not name are kept and logged (--config-prune removes them).
Any error in the file stops the start with exit status 2 and lines such as
  blkmesh.toml:12:5: node[2].throttle.iops: must be at most ...
`blkmeshctl config check FILE` runs the same checks offline."#;

/// The blkmesh gRPC control plane.
#[derive(Debug, Parser)]
#[command(name = "blkmesh-manager", version, after_help = AFTER_HELP)]
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
    /// How long AddExport, UpdateNode and ResizeNode wait, in milliseconds,
    /// for a connected frontend to report that it applied the new plan.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    apply_timeout_ms: u64,
    /// How long a worker whose agent session ended may take to
    /// register again, in milliseconds, before every export queue assigned to
    /// it moves to the live workers (least loaded first). With no live worker
    /// the move happens when one registers. Workers in the state file get the
    /// same grace when the manager starts.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    worker_grace_ms: u64,
    /// Serve TLS with this certificate chain (PEM, leaf first). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    /// Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Require `authorization: Bearer <token>` on every blkmesh.v1 call; the
    /// token is this file's content without surrounding whitespace (visible
    /// ASCII, at most 4096 bytes). Read once at startup.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Apply this configuration file (TOML) at start: add what the state
    /// lacks, change live what differs, refuse to start on any error (exit
    /// status 2). See below. Without it, $BLKMESH_CONFIG unless empty.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// With a configuration file: remove the nodes and exports the file
    /// does not name (exports first) instead of keeping them.
    #[arg(long)]
    config_prune: bool,
    /// Give the images the configuration file creates to this numeric
    /// UID:GID (the workers' user, when they run as another user than the
    /// manager, as in docker-compose; needs CAP_CHOWN).
    #[arg(long, value_name = "UID:GID", value_parser = parse_owner)]
    image_owner: Option<(u32, u32)>,
    /// A directory in which AddNode may follow the backing file an image
    /// header names (`node add-qcow2 --backing-from-header`); repeat for
    /// more. Without one, backing nodes are always named.
    #[arg(long, value_name = "DIR")]
    image_dir: Vec<PathBuf>,
    /// Log filter, e.g. `info` or `blkmesh_manager=debug` (default: $RUST_LOG, else info).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    #[command(flatten)]
    sandbox: blkmesh_sandbox::SandboxArgs,
    #[command(flatten)]
    user: blkmesh_sandbox::UserArgs,
}

/// `UID:GID`, both numeric.
fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected UID:GID"))?;
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{v:?} in {s:?}: not a number"))
    };
    Ok((num(u)?, num(g)?))
}

fn main() -> ExitCode {
    // First: no other process of this uid may read the token or state
    // through /proc/<pid>/{mem,environ}.
    if let Err(e) = blkmesh_sandbox::set_not_dumpable() {
        eprintln!("blkmesh-manager: error: {e}");
        return ExitCode::FAILURE;
    }
    let mut args = Args::parse();
    // Not clap's `env`: an empty $BLKMESH_CONFIG means no file (compose
    // turns the default off with `BLKMESH_CONFIG=`), not an empty path.
    if args.config.is_none() {
        args.config = std::env::var_os("BLKMESH_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
    }
    if args.config_prune && args.config.is_none() {
        eprintln!(
            "blkmesh-manager: error: --config-prune needs a configuration file \
             (--config FILE or $BLKMESH_CONFIG)"
        );
        return ExitCode::from(2);
    }
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
    blkmesh_logging::init_with_filter(filter, true);

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
        Err(e @ blkmesh_manager::ManagerError::Config { .. }) => {
            eprintln!("blkmesh-manager: error: {e}");
            ExitCode::from(2)
        }
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
    let (sandbox, user) = (args.sandbox.clone(), args.user.clone());
    let mut config = ManagerConfig::new(args.state_dir).with_listen(args.listen);
    config.unix = args.unix;
    config.unix_policy = sandbox
        .socket_policy()
        .map_err(blkmesh_manager::ManagerError::Sandbox)?;
    config.metrics = args.metrics;
    config.apply_timeout = std::time::Duration::from_millis(args.apply_timeout_ms);
    config.worker_grace = std::time::Duration::from_millis(args.worker_grace_ms);
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(TlsConfig {
            cert,
            key,
            client_ca: args.tls_client_ca,
        });
    }
    config.token = args.token_file.map(TokenSource::File);
    config.config = args.config;
    config.config_prune = args.config_prune;
    config.image_owner = args.image_owner;
    config.image_dirs = args.image_dir;
    let manager = Manager::bind(config).await?;
    // Least privilege (docs/SECURITY.md): the unix socket's permissions,
    // then the unprivileged user, then the seccomp filter on every thread.
    let sandboxed = (|| {
        // The unix socket was created with its policy (Manager::bind).
        user.drop_privileges()?;
        sandbox.install_seccomp(blkmesh_sandbox::Kind::Manager)
    })();
    sandboxed.map_err(blkmesh_manager::ManagerError::Sandbox)?;
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
