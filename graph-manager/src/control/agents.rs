//! The agent sessions (`blkmesh.agent.v1`): one task per worker or
//! frontend session. It reads the hello, registers the agent, then reads
//! what the agent sends up and sends down what the manager has for it,
//! until either side ends; the end of the session is the end of the agent
//! (a worker's grace starts, a frontend's exports wait for a report).
//!
//! The zone commands of a frontend session are numbered by the session,
//! from 1; the session itself keeps the callers waiting for an answer, by
//! number, so an answer can only reach a call made on the same session,
//! and every call still waiting when the session ends fails at once.
//!
//! Transport-free: what comes up is a stream of messages or errors, what
//! goes down a channel of messages or the error that ends the session
//! (`crate::api::agents` plugs them into tonic).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendMsg;
use blkmesh_proto::agent::v1::worker_down::Msg as WorkerMsg;
use blkmesh_proto::agent::v1::{
    frontend_up, worker_up, Accepted, FrontendDown, FrontendUp, WorkerDown, WorkerUp,
};
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::StatsReport;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};

use crate::control::hub::Control;
use crate::core::error::ApiError;
use crate::sessions::{JobAnswer, ToFrontend, ZoneAnswer};
use crate::stats::validate_report;

/// How long a new session may take to send its hello.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session sends down: a message, or the error that ends it.
pub(crate) type Down<T> = Result<T, ApiError>;

/// What a session receives: a message, or why the transport failed (the
/// agent is gone).
pub(crate) type Up<T> = Result<T, String>;

/// The sending half of a session.
type DownTx<T> = mpsc::UnboundedSender<Down<T>>;

fn protocol(kind: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::Protocol(format!("{kind} session: {what}"))
}

/// The hello that must open a session: `hello` takes it out of the first
/// message, or names what came instead. A manager that stops does not
/// wait for it.
async fn first<M, H, S>(
    control: &Control,
    up: &mut S,
    kind: &str,
    hello: impl FnOnce(M) -> Result<H, &'static str>,
) -> Result<H, ApiError>
where
    S: Stream<Item = Up<M>> + Unpin,
{
    let next = tokio::select! {
        n = tokio::time::timeout(HELLO_TIMEOUT, up.next()) => n,
        () = control.shutdown_signal() => return Err(ApiError::ShuttingDown),
    };
    let m = match next {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => return Err(protocol(kind, format!("ended before its hello: {e}"))),
        Ok(None) => return Err(protocol(kind, "ended before its hello")),
        Err(_) => {
            return Err(protocol(
                kind,
                format!("no hello within {} s", HELLO_TIMEOUT.as_secs()),
            ))
        }
    };
    hello(m).map_err(|got| protocol(kind, format!("the first message must be hello (got {got})")))
}

fn worker_up_name(m: &Option<worker_up::Msg>) -> &'static str {
    match m {
        None => "an empty message",
        Some(worker_up::Msg::Hello(_)) => "hello",
        Some(worker_up::Msg::Stats(_)) => "stats",
    }
}

fn frontend_up_name(m: &Option<frontend_up::Msg>) -> &'static str {
    match m {
        None => "an empty message",
        Some(frontend_up::Msg::Hello(_)) => "hello",
        Some(frontend_up::Msg::ExportStatus(_)) => "export_status",
        Some(frontend_up::Msg::ZoneAnswer(_)) => "zone_answer",
        Some(frontend_up::Msg::JobAnswer(_)) => "job_answer",
        Some(frontend_up::Msg::Stats(_)) => "stats",
    }
}

/// The error for an up-message that is not allowed after the hello.
fn unexpected(kind: &str, got: &'static str) -> ApiError {
    protocol(
        kind,
        format!("{got} is not allowed here (only the first message is a hello)"),
    )
}

impl Control {
    /// Runs `session` on a task of its own with the sending half of a
    /// new session; what it sends comes on the returned receiver, then the
    /// error it ends with, if any.
    fn spawn_session<T, F>(
        self: &Arc<Self>,
        session: impl FnOnce(Arc<Control>, DownTx<T>) -> F,
    ) -> mpsc::UnboundedReceiver<Down<T>>
    where
        T: Send + 'static,
        F: Future<Output = Result<(), ApiError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let run = session(Arc::clone(self), tx.clone());
        tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::warn!("{e}");
                let _ = tx.send(Err(e));
            }
        });
        rx
    }

    /// Runs a worker session over `up` on a task of its own; what to send
    /// down comes on the returned receiver, which ends with the session.
    pub(crate) fn worker_session<S>(
        self: &Arc<Self>,
        up: S,
    ) -> mpsc::UnboundedReceiver<Down<WorkerDown>>
    where
        S: Stream<Item = Up<WorkerUp>> + Send + Unpin + 'static,
    {
        self.spawn_session(|control, tx| async move { control.run_worker_session(up, tx).await })
    }

    async fn run_worker_session<S>(
        self: Arc<Self>,
        mut up: S,
        tx: DownTx<WorkerDown>,
    ) -> Result<(), ApiError>
    where
        S: Stream<Item = Up<WorkerUp>> + Send + Unpin,
    {
        let hello = first(&self, &mut up, "worker", |m: WorkerUp| match m.msg {
            Some(worker_up::Msg::Hello(h)) => Ok(h),
            other => Err(worker_up_name(&other)),
        })
        .await?;
        let name = hello.name.clone();
        let session = self.register_worker(hello).await?;
        let _ = tx.send(Ok(WorkerDown {
            msg: Some(WorkerMsg::Accepted(Accepted {})),
        }));
        let result = self.pump_worker(&name, &mut up, &tx).await;
        self.worker_gone(&name, session);
        result
    }

    async fn pump_worker<S>(
        &self,
        name: &str,
        up: &mut S,
        tx: &DownTx<WorkerDown>,
    ) -> Result<(), ApiError>
    where
        S: Stream<Item = Up<WorkerUp>> + Unpin,
    {
        let shutdown = self.shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tx.closed() => return Ok(()),
                m = up.next() => m,
            };
            let msg = match msg {
                None => return Ok(()),
                Some(Err(e)) => {
                    tracing::debug!(worker = %name, "session: {e}");
                    return Ok(());
                }
                Some(Ok(m)) => m.msg,
            };
            match msg {
                Some(worker_up::Msg::Stats(r)) => {
                    self.record_stats(format!("worker/{name}"), r)?;
                }
                other => return Err(unexpected("worker", worker_up_name(&other))),
            }
        }
    }

    /// Runs a frontend session over `up` on a task of its own; what to
    /// send down comes on the returned receiver, which ends with the session.
    pub(crate) fn frontend_session<S>(
        self: &Arc<Self>,
        up: S,
    ) -> mpsc::UnboundedReceiver<Down<FrontendDown>>
    where
        S: Stream<Item = Up<FrontendUp>> + Send + Unpin + 'static,
    {
        self.spawn_session(|control, tx| async move { control.run_frontend_session(up, tx).await })
    }

    async fn run_frontend_session<S>(
        self: Arc<Self>,
        mut up: S,
        tx: DownTx<FrontendDown>,
    ) -> Result<(), ApiError>
    where
        S: Stream<Item = Up<FrontendUp>> + Send + Unpin,
    {
        let hello = first(&self, &mut up, "frontend", |m: FrontendUp| match m.msg {
            Some(frontend_up::Msg::Hello(h)) => Ok(h),
            other => Err(frontend_up_name(&other)),
        })
        .await?;
        let (session, from_control) = self.register_frontend(&hello)?;
        let mut pump = FrontendPump {
            name: &hello.name,
            waiting: BTreeMap::new(),
            next_id: 1,
        };
        let result = pump.run(&self, from_control, &mut up, &tx).await;
        // Calls still waiting for an answer fail now (UNAVAILABLE).
        drop(pump);
        self.frontend_gone(&hello.name, session);
        result
    }

    /// Records the counters `report` of `source` (the session's agent,
    /// whatever the report says), and emits the I/O errors newly counted.
    fn record_stats(&self, source: String, mut report: StatsReport) -> Result<(), ApiError> {
        report.source = source;
        let kind = validate_report(&report)?;
        let mut store = self.stats();
        for e in store.insert(report, kind) {
            tracing::debug!(export = %e.export, queue = e.queue, new_errors = e.new_errors, "io errors");
            self.emit(EventKind::IoError(e));
        }
        Ok(())
    }
}

/// Who waits for the answer to a command sent to a frontend.
enum Waiter {
    Zone(oneshot::Sender<ZoneAnswer>),
    Job(oneshot::Sender<JobAnswer>),
}

impl Waiter {
    fn is_closed(&self) -> bool {
        match self {
            Waiter::Zone(a) => a.is_closed(),
            Waiter::Job(a) => a.is_closed(),
        }
    }
}

/// The state of one frontend session: the zone and job commands sent and
/// not answered yet.
struct FrontendPump<'a> {
    name: &'a str,
    /// Callers waiting for the answer to a command, by command id.
    waiting: BTreeMap<u64, Waiter>,
    next_id: u64,
}

impl FrontendPump<'_> {
    async fn run<S>(
        &mut self,
        control: &Control,
        mut from_control: mpsc::UnboundedReceiver<ToFrontend>,
        up: &mut S,
        tx: &DownTx<FrontendDown>,
    ) -> Result<(), ApiError>
    where
        S: Stream<Item = Up<FrontendUp>> + Unpin,
    {
        let shutdown = control.shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            // The pump stops quietly (no error to send) when the agent
            // goes away or the manager stops.
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tx.closed() => return Ok(()),
                m = from_control.recv() => {
                    // None: the manager let go of the session (it stops).
                    let Some(m) = m else { return Ok(()) };
                    let msg = self.down(m);
                    if tx.send(Ok(FrontendDown { msg: Some(msg) })).is_err() {
                        return Ok(());
                    }
                }
                m = up.next() => match m {
                    None => return Ok(()),
                    Some(Err(e)) => {
                        tracing::debug!(frontend = %self.name, "session: {e}");
                        return Ok(());
                    }
                    Some(Ok(m)) => self.up(control, m.msg)?,
                },
            }
        }
    }

    /// The message to send for `m`; a zone command gets its id.
    fn down(&mut self, m: ToFrontend) -> FrontendMsg {
        match m {
            ToFrontend::Send(msg) => msg,
            ToFrontend::Zone {
                mut command,
                answer,
            } => {
                // Forget the callers that stopped waiting (timed out).
                self.waiting.retain(|_, a| !a.is_closed());
                command.id = self.next_id;
                self.next_id += 1;
                tracing::debug!(frontend = %self.name, export = %command.export, id = command.id, "zone command sent");
                self.waiting.insert(command.id, Waiter::Zone(answer));
                FrontendMsg::ZoneCommand(command)
            }
            ToFrontend::Job {
                mut command,
                answer,
            } => {
                self.waiting.retain(|_, a| !a.is_closed());
                command.id = self.next_id;
                self.next_id += 1;
                self.waiting.insert(command.id, Waiter::Job(answer));
                FrontendMsg::JobCommand(command)
            }
        }
    }

    /// Logs what became of the answer `id` to a `what` command: passed on
    /// (`Some(true)`), too late (`Some(false)`), or never asked for.
    fn answered(&self, what: &str, id: u64, delivered: Option<bool>) {
        match delivered {
            Some(true) => {}
            Some(false) => {
                tracing::debug!(frontend = %self.name, id, "{what} answer came after its caller gave up; ignored")
            }
            None => {
                tracing::warn!(frontend = %self.name, id, "answer to a {what} command this session did not send or already answered; ignored")
            }
        }
    }

    /// Handles an up-message after the hello.
    fn up(&mut self, control: &Control, msg: Option<frontend_up::Msg>) -> Result<(), ApiError> {
        match msg {
            Some(frontend_up::Msg::ExportStatus(st)) => control.report_export(self.name, st),
            Some(frontend_up::Msg::ZoneAnswer(a)) => {
                let delivered = match self.waiting.remove(&a.id) {
                    Some(Waiter::Zone(caller)) => Some(caller.send(a.result).is_ok()),
                    _ => None,
                };
                self.answered("zone", a.id, delivered);
                Ok(())
            }
            Some(frontend_up::Msg::JobAnswer(a)) => {
                let delivered = match self.waiting.remove(&a.id) {
                    Some(Waiter::Job(caller)) => Some(caller.send(a.result).is_ok()),
                    _ => None,
                };
                self.answered("job", a.id, delivered);
                Ok(())
            }
            Some(frontend_up::Msg::Stats(r)) => {
                control.record_stats(format!("frontend/{}", self.name), r)
            }
            other => Err(unexpected("frontend", frontend_up_name(&other))),
        }
    }
}

#[cfg(test)]
mod tests;
