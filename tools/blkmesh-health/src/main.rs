//! `blkmesh-health`: a probe for container health checks (docker compose
//! `healthcheck`, Kubernetes `exec` probes).
//!
//! ```text
//! blkmesh-health [--manager URL] [--worker NAME]... [--frontend]
//! ```
//!
//! Exits 0 when the manager's `grpc.health.v1` service answers SERVING and
//! every check asked for passes:
//!
//! - `--worker NAME`: `WorkerService.ListWorkers` lists NAME as ALIVE (the
//!   worker holds its registration stream open);
//! - `--frontend`: no export is waiting for a frontend. The API has no list
//!   of frontends, so this is read from the exports: while no frontend is
//!   registered the manager reports every export as PENDING with "no
//!   frontend connected". With no export at all nothing tells whether a
//!   frontend is registered, and only the manager is checked (the output
//!   says so).
//!
//! Exit status: 0 healthy, 1 unhealthy or unreachable, 2 usage errors. One
//! line on stdout says what was checked (docker keeps it in
//! `docker inspect`'s health log).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blkmesh_proto::client::{status_message, ClientConfig, ManagerChannel};
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{ExportState, ListExportsRequest, ListWorkersRequest, WorkerState};
use clap::Parser;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What the manager says about exports while no frontend is registered
/// (`graph-manager/src/service.rs`, `Inner::export_state`).
const NO_FRONTEND: &str = "no frontend connected";

/// Health probe: exits 0 if the blkmesh manager is SERVING and the asked-for
/// worker(s) and frontend are registered with it.
#[derive(Debug, Parser)]
#[command(name = "blkmesh-health", version)]
struct Args {
    /// Manager address: http://HOST:PORT, https://HOST:PORT or unix:/PATH.
    #[arg(
        long,
        value_name = "URL",
        env = "BLKMESH_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    manager: String,
    /// Also require this worker to be registered and ALIVE (repeatable).
    #[arg(long, value_name = "NAME")]
    worker: Vec<String>,
    /// Also require a frontend to be registered, as far as the exports show
    /// it (with no export, only the manager is checked).
    #[arg(long)]
    frontend: bool,
    /// Give up after this many milliseconds (connection and calls).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    timeout_ms: u64,
    /// CA certificate (PEM) of an https:// manager.
    #[arg(long, value_name = "FILE", env = "BLKMESH_MANAGER_CA")]
    manager_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a manager that requires one.
    #[arg(
        long,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_CERT",
        requires = "manager_key"
    )]
    manager_cert: Option<PathBuf>,
    /// Private key (PEM) of --manager-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_KEY",
        requires = "manager_cert"
    )]
    manager_key: Option<PathBuf>,
    /// File holding the manager's bearer token (needed for --worker and
    /// --frontend when the manager requires one; the health service is open).
    #[arg(long, value_name = "FILE", env = "BLKMESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print nothing; only the exit status tells.
    #[arg(short, long)]
    quiet: bool,
}

/// Why the probe failed.
#[derive(Debug)]
struct Unhealthy(String);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blkmesh-health: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let result = runtime.block_on(async {
        match tokio::time::timeout(timeout, probe(&args, timeout)).await {
            Ok(r) => r,
            Err(_) => Err(Unhealthy(format!(
                "no answer from {} within {} ms",
                args.manager, args.timeout_ms
            ))),
        }
    });
    match result {
        Ok(report) => {
            if !args.quiet {
                println!("healthy: {}", report.join("; "));
            }
            ExitCode::SUCCESS
        }
        Err(Unhealthy(why)) => {
            if !args.quiet {
                println!("unhealthy: {why}");
            }
            ExitCode::FAILURE
        }
    }
}

fn config(args: &Args, timeout: Duration) -> ClientConfig {
    let mut c = ClientConfig::new(args.manager.clone())
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    if let Some(ca) = &args.manager_ca {
        c = c.with_ca_file(ca);
    }
    if let (Some(cert), Some(key)) = (&args.manager_cert, &args.manager_key) {
        c = c.with_client_identity(cert, key);
    }
    if let Some(t) = &args.token_file {
        c = c.with_token_file(t);
    }
    c
}

/// Runs the checks; returns what was found healthy, one item per check.
async fn probe(args: &Args, timeout: Duration) -> Result<Vec<String>, Unhealthy> {
    let channel = config(args, timeout)
        .connect()
        .await
        .map_err(|e| Unhealthy(format!("cannot reach the manager: {}", error_chain(&e))))?;
    let mut report = vec![manager_health(&channel).await?];
    if !args.worker.is_empty() {
        report.extend(workers(&channel, &args.worker).await?);
    }
    if args.frontend {
        report.push(frontend(&channel).await?);
    }
    Ok(report)
}

async fn manager_health(channel: &ManagerChannel) -> Result<String, Unhealthy> {
    let resp = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| Unhealthy(format!("health check: {}", status_message(&s))))?
        .into_inner();
    let status = ServingStatus::try_from(resp.status).unwrap_or(ServingStatus::Unknown);
    if status == ServingStatus::Serving {
        Ok("manager SERVING".into())
    } else {
        Err(Unhealthy(format!("manager is {}", status.as_str_name())))
    }
}

async fn workers(channel: &ManagerChannel, names: &[String]) -> Result<Vec<String>, Unhealthy> {
    let list = WorkerServiceClient::new(channel.clone())
        .list_workers(ListWorkersRequest {})
        .await
        .map_err(|s| Unhealthy(format!("ListWorkers: {}", status_message(&s))))?
        .into_inner()
        .workers;
    let mut out = Vec::new();
    for name in names {
        match list.iter().find(|w| &w.name == name) {
            None => return Err(Unhealthy(format!("worker {name} is not registered"))),
            Some(w) if w.state == WorkerState::Alive as i32 => {
                out.push(format!("worker {name} ALIVE (pid {})", w.pid));
            }
            Some(w) => {
                let state = WorkerState::try_from(w.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN");
                return Err(Unhealthy(format!("worker {name} is {state}")));
            }
        }
    }
    Ok(out)
}

async fn frontend(channel: &ManagerChannel) -> Result<String, Unhealthy> {
    let exports = ExportServiceClient::new(channel.clone())
        .list_exports(ListExportsRequest {})
        .await
        .map_err(|s| Unhealthy(format!("ListExports: {}", status_message(&s))))?
        .into_inner()
        .exports;
    if exports.is_empty() {
        return Ok("frontend not checked (no export; the API does not list frontends)".into());
    }
    let waiting = exports
        .iter()
        .find(|e| e.state == ExportState::Pending as i32 && e.message.starts_with(NO_FRONTEND));
    if let Some(e) = waiting {
        let id = e.export.as_ref().map(|x| x.id.as_str()).unwrap_or("?");
        return Err(Unhealthy(format!("{NO_FRONTEND} (export {id} is pending)")));
    }
    let serving = exports
        .iter()
        .filter(|e| e.state == ExportState::Serving as i32)
        .count();
    Ok(format!(
        "frontend connected ({serving} of {} exports serving)",
        exports.len()
    ))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    msg
}
