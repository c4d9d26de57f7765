//! Server-streaming responses.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::core::error::ApiError;

/// A server-streaming response.
pub(crate) type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The messages of `rx` as a response stream, each error with its status
/// code; it ends when the sender is dropped.
pub(crate) fn unbounded<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<Result<T, ApiError>>,
) -> EventStream<T> {
    Box::pin(UnboundedReceiverStream::new(rx).map(|m| m.map_err(Status::from)))
}
