//! The worker's agent session with the manager (`blkmesh.agent.v1`): one
//! two-way stream kept open for the worker's whole life, so that the
//! manager sees its end as the worker's death notice, and on which the
//! worker sends its statistics. The data path never waits on it: if the
//! manager is down the worker keeps serving and opens a new session when
//! it is back.

use std::path::PathBuf;

use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use blkmesh_proto::agent::v1::{worker_down, worker_up, WorkerHello, WorkerUp};
use nix::sys::signal::{SigSet, Signal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("starting the registration thread")]
    Thread(#[source] std::io::Error),
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Starts the session loop on its own thread with a small tokio runtime.
pub fn spawn(addr: String, name: String, socket: PathBuf) -> Result<(), RegistrationError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RegistrationError::Runtime)?;
    std::thread::Builder::new()
        .name("registration".into())
        .spawn(move || rt.block_on(register_forever(addr, name, socket)))
        .map_err(RegistrationError::Thread)?;
    Ok(())
}

async fn register_forever(addr: String, name: String, socket: PathBuf) {
    let hello = WorkerHello {
        name: name.clone(),
        socket: socket.display().to_string(),
        pid: std::process::id(),
    };
    let source = format!("worker/{name}");
    blkmesh_proto::session::keep_open(&addr, || session(&addr, hello.clone(), &source)).await;
}

/// One session: the hello, then a stats report every
/// [`blkmesh_stats::REPORT_INTERVAL`] until the session ends. `Ok` once
/// an accepted session ended.
async fn session(addr: &str, hello: WorkerHello, source: &str) -> Result<(), tonic::Status> {
    let channel = blkmesh_proto::client::ClientConfig::for_process(addr)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (up, up_rx) = mpsc::unbounded_channel();
    let send = |msg| up.send(WorkerUp { msg: Some(msg) }).is_ok();
    send(worker_up::Msg::Hello(hello));
    let mut down = AgentServiceClient::new(channel)
        .worker_session(UnboundedReceiverStream::new(up_rx))
        .await?
        .into_inner();
    blkmesh_proto::session::accepted(down.message().await?, |m| {
        matches!(m.msg, Some(worker_down::Msg::Accepted(_)))
    })?;
    tracing::info!("registered with the manager at {addr}");
    let mut tick = tokio::time::interval(blkmesh_stats::REPORT_INTERVAL);
    loop {
        tokio::select! {
            m = down.message() => {
                if m?.is_none() {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                if !send(worker_up::Msg::Stats(crate::stats().report(source))) {
                    return Ok(());
                }
            }
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (call it first thing in
/// main, so every thread inherits the mask) and returns the set.
pub fn block_termination_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

/// Waits for SIGTERM or SIGINT (blocked by [`block_termination_signals`]).
pub fn wait_for_termination() -> nix::Result<Signal> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.wait()
}
