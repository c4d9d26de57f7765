//! `blkmesh-health`: a probe for container health checks (docker compose
//! `healthcheck`, Kubernetes `exec` probes).
//!
//! ```text
//! blkmesh-health [--manager URL] [--worker NAME]... [--frontend NAME]...
//! ```
//!
//! Exits 0 when the manager's `grpc.health.v1` service answers SERVING and
//! every check asked for passes:
//!
//! - `--worker NAME`: `WorkerService.ListWorkers` lists NAME as ALIVE (the
//!   worker holds its agent session open);
//! - `--frontend NAME`: `FrontendService.ListFrontends` lists NAME as
//!   connected (the frontend holds its agent session open). Exports
//!   it failed to open are named in the output but do not make it
//!   unhealthy: restarting the frontend would not mend a missing file.
//!
//! Exit status: 0 healthy, 1 unhealthy or unreachable, 2 usage errors. One
//! line on stdout says what was checked (docker keeps it in
//! `docker inspect`'s health log).

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use blkmesh_proto::client::{status_message, ClientConfig, ManagerChannel};
use blkmesh_proto::v1::frontend_service_client::FrontendServiceClient;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{ListFrontendsRequest, ListWorkersRequest, WorkerState};
use clap::Parser;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

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
    /// Also require this frontend to be registered (repeatable).
    #[arg(long, value_name = "NAME")]
    frontend: Vec<String>,
    /// Give up after this many milliseconds (connection and calls).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    timeout_ms: u64,
    #[command(flatten)]
    security: blkmesh_proto::client::ManagerSecurityArgs,
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
    args.security.apply(
        ClientConfig::new(args.manager.clone())
            .with_connect_timeout(timeout)
            .with_timeout(timeout),
    )
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
    if !args.frontend.is_empty() {
        report.extend(frontends(&channel, &args.frontend).await?);
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

async fn frontends(channel: &ManagerChannel, names: &[String]) -> Result<Vec<String>, Unhealthy> {
    let list = FrontendServiceClient::new(channel.clone())
        .list_frontends(ListFrontendsRequest {})
        .await
        .map_err(|s| Unhealthy(format!("ListFrontends: {}", status_message(&s))))?
        .into_inner()
        .frontends;
    let mut out = Vec::new();
    for name in names {
        match list.iter().find(|f| &f.name == name) {
            None => return Err(Unhealthy(format!("frontend {name} is not registered"))),
            Some(f) if !f.connected => {
                return Err(Unhealthy(format!("frontend {name} is gone")));
            }
            Some(f) => {
                let mut line = format!(
                    "frontend {name} connected ({} exports serving",
                    f.serving.len()
                );
                if !f.failed.is_empty() {
                    line.push_str(&format!(", failed: {}", f.failed.join(", ")));
                }
                if !f.vmm_refused.is_empty() {
                    line.push_str(&format!(", vmm refused: {}", f.vmm_refused.join(", ")));
                }
                line.push(')');
                out.push(line);
            }
        }
    }
    Ok(out)
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
