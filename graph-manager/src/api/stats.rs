//! `blkmesh.v1.StatsService` over [`Control`]: the sums (`crate::stats`)
//! of the reports the agents send on their sessions, and the event feed.

use std::sync::Arc;

use blkmesh_proto::v1::stats_service_server::StatsService;
use blkmesh_proto::v1::{Event, GetStatsRequest, GetStatsResponse, WatchEventsRequest};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::streams::EventStream;
use crate::control::hub::Control;
use crate::core::error::ApiError;
use crate::stats::{aggregate, Filter};

/// `blkmesh.v1.StatsService`.
pub(crate) struct StatsApi(pub Arc<Control>);

impl StatsApi {
    fn get(&self, req: GetStatsRequest) -> Result<GetStatsResponse, ApiError> {
        let cfg = self.0.stats_config();
        let filter = Filter::from_request(req, &cfg)?;
        let store = self.0.stats();
        Ok(aggregate(&cfg, &store, &filter))
    }

    fn watch(&self) -> EventStream<Event> {
        let mut events = self.0.subscribe_events();
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.0.shutdown_signal();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tx.closed() => break,
                    r = events.recv() => match r {
                        Ok(ev) => {
                            if tx.send(Ok(ev)).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(lost = n, "event subscriber too slow; skipped events");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl StatsService for StatsApi {
    type WatchEventsStream = EventStream<Event>;

    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        Ok(Response::new(self.get(request.into_inner())?))
    }

    async fn watch_events(
        &self,
        _request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Ok(Response::new(self.watch()))
    }
}
