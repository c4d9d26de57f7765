//! Server-streaming responses.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// A server-streaming response.
pub(crate) type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The events of `rx` as a response stream; it ends when the sender is dropped.
pub(crate) fn unbounded<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> EventStream<T> {
    Box::pin(UnboundedReceiverStream::new(rx).map(Ok))
}
