//! Registration with the manager: a server-streaming call kept open for the
//! worker's whole life, so that the manager sees a dropped stream as the
//! worker's death notice. The data path never waits on it: if the manager is
//! down the worker keeps serving and re-registers when it is back.

use std::path::PathBuf;
use std::time::Duration;

use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::WorkerHello;
use nix::sys::signal::{SigSet, Signal};

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("starting the registration thread")]
    Thread(#[source] std::io::Error),
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Starts the registration loop on its own thread with a small tokio runtime.
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
    blkmesh_stats::spawn_reporter(
        addr.clone(),
        format!("worker/{name}"),
        crate::stats().clone(),
    );
    let hello = WorkerHello {
        name: name.clone(),
        socket: socket.display().to_string(),
        pid: std::process::id(),
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match register_once(&addr, hello.clone()).await {
            Ok(()) => {
                tracing::warn!("manager closed the registration stream; re-registering");
                delay = Duration::from_millis(100);
            }
            Err(e) => tracing::warn!(
                "registration with {addr} failed: {:?}: {}",
                e.code(),
                blkmesh_proto::client::status_message(&e)
            ),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn register_once(addr: &str, hello: WorkerHello) -> Result<(), tonic::Status> {
    let channel = blkmesh_proto::client::ClientConfig::for_process(addr)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = WorkerServiceClient::new(channel);
    let mut stream = client.register(hello).await?.into_inner();
    tracing::info!("registered with the manager at {addr}");
    while stream.message().await?.is_some() {}
    Ok(())
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
