//! Fake agents: a worker's or a frontend's session (`blkmesh.agent.v1`),
//! driven by hand.

use std::future::Future;
use std::pin::Pin;

use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use blkmesh_proto::agent::v1::frontend_down::Msg as Down;
use blkmesh_proto::agent::v1::{
    frontend_up, worker_down, worker_up, ExportStatus, FrontendDown, FrontendHello, FrontendUp,
    WorkerDown, WorkerHello, WorkerUp, ZoneAnswer,
};
use blkmesh_proto::v1::StatsReport;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Status, Streaming};

use super::client::within;

/// A call that opens a session.
type Call<'a, D> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Streaming<D>>, Status>> + 'a>>;

/// An `AgentServiceClient` over any channel (plain, or with a token).
pub trait Agents {
    fn worker(&mut self, up: UnboundedReceiverStream<WorkerUp>) -> Call<'_, WorkerDown>;
    fn frontend(&mut self, up: UnboundedReceiverStream<FrontendUp>) -> Call<'_, FrontendDown>;
}

impl<T> Agents for AgentServiceClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::transport::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::transport::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    fn worker(&mut self, up: UnboundedReceiverStream<WorkerUp>) -> Call<'_, WorkerDown> {
        Box::pin(self.worker_session(up))
    }

    fn frontend(&mut self, up: UnboundedReceiverStream<FrontendUp>) -> Call<'_, FrontendDown> {
        Box::pin(self.frontend_session(up))
    }
}

/// A worker's open session; dropping it ends the session.
pub struct WorkerSession {
    up: mpsc::UnboundedSender<WorkerUp>,
    pub down: Streaming<WorkerDown>,
}

impl WorkerSession {
    /// Opens a session with `hello` and waits for `accepted` (or the error
    /// the session ends with).
    pub async fn open(
        client: &mut impl Agents,
        hello: WorkerHello,
    ) -> Result<WorkerSession, Status> {
        let (up, rx) = mpsc::unbounded_channel();
        let _ = up.send(WorkerUp {
            msg: Some(worker_up::Msg::Hello(hello)),
        });
        let mut down = client
            .worker(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        match within("accepted", down.message()).await? {
            Some(WorkerDown {
                msg: Some(worker_down::Msg::Accepted(_)),
            }) => Ok(WorkerSession { up, down }),
            other => panic!("expected accepted, got {other:?}"),
        }
    }

    pub fn stats(&self, report: StatsReport) {
        let _ = self.up.send(WorkerUp {
            msg: Some(worker_up::Msg::Stats(report)),
        });
    }

    /// Sends anything (protocol tests).
    pub fn send(&self, msg: WorkerUp) {
        let _ = self.up.send(msg);
    }

    /// Ends the session from the worker's side and waits for the manager
    /// to end it too, having handled everything sent before: `Err` with
    /// the status it ended with if it refused something.
    pub async fn finish(self) -> Result<(), Status> {
        drain(self.up, self.down).await
    }
}

async fn drain<U, D>(up: mpsc::UnboundedSender<U>, mut down: Streaming<D>) -> Result<(), Status> {
    drop(up);
    while within("the session's end", down.message()).await?.is_some() {}
    Ok(())
}

/// A frontend's open session; dropping it ends the session.
pub struct FrontendSession {
    up: mpsc::UnboundedSender<FrontendUp>,
    pub down: Streaming<FrontendDown>,
}

impl FrontendSession {
    /// Opens frontend `name`'s session and waits for `accepted` (or the
    /// error the session ends with); the snapshot follows.
    pub async fn open(client: &mut impl Agents, name: &str) -> Result<FrontendSession, Status> {
        let (up, rx) = mpsc::unbounded_channel();
        let _ = up.send(FrontendUp {
            msg: Some(frontend_up::Msg::Hello(FrontendHello { name: name.into() })),
        });
        let mut down = client
            .frontend(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        match within("accepted", down.message()).await? {
            Some(FrontendDown {
                msg: Some(Down::Accepted(_)),
            }) => Ok(FrontendSession { up, down }),
            other => panic!("expected accepted, got {other:?}"),
        }
    }

    /// The next message down, `snapshot_end` included; `None` when the
    /// session ended.
    pub async fn message(&mut self) -> Result<Option<Down>, Status> {
        Ok(within("frontend message", self.down.message())
            .await?
            .and_then(|m| m.msg))
    }

    /// The next upsert, removal or zone command (skipping `snapshot_end`).
    pub async fn next(&mut self) -> Down {
        loop {
            match self.message().await {
                Ok(Some(Down::SnapshotEnd(_))) => continue,
                Ok(Some(m)) => return m,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// Fails if anything but `snapshot_end` comes down within `d`.
    pub async fn quiet_for(&mut self, d: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(m) = tokio::time::timeout_at(deadline, self.down.message()).await {
            match m {
                Ok(Some(FrontendDown {
                    msg: Some(Down::SnapshotEnd(_)),
                })) => continue,
                other => panic!("unexpected frontend message: {other:?}"),
            }
        }
    }

    pub fn report(&self, status: ExportStatus) {
        let _ = self.up.send(FrontendUp {
            msg: Some(frontend_up::Msg::ExportStatus(status)),
        });
    }

    pub fn answer(&self, answer: ZoneAnswer) {
        let _ = self.up.send(FrontendUp {
            msg: Some(frontend_up::Msg::ZoneAnswer(answer)),
        });
    }

    pub fn stats(&self, report: StatsReport) {
        let _ = self.up.send(FrontendUp {
            msg: Some(frontend_up::Msg::Stats(report)),
        });
    }

    /// As [`WorkerSession::finish`].
    pub async fn finish(self) -> Result<(), Status> {
        drain(self.up, self.down).await
    }

    /// Sends anything (protocol tests).
    pub fn send(&self, msg: FrontendUp) {
        let _ = self.up.send(msg);
    }

    /// A sender of up-messages that outlives a borrow of the session.
    pub fn sender(&self) -> mpsc::UnboundedSender<FrontendUp> {
        self.up.clone()
    }
}
