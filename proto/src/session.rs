//! What the agents (workers, frontends) share about their session with
//! the manager (`blkmesh.agent.v1`): one session at a time, opened again
//! with a [`Backoff`] whenever it ends, and the check of its first answer.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tonic::Status;

/// Opens `session` again and again, for ever, waiting with a [`Backoff`]
/// between two: back to the shortest wait after a session that ended
/// normally (`Ok`: the manager accepted it, then ended it). Logs why each
/// one ended.
pub async fn keep_open<F, Fut>(addr: &str, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Status>>,
{
    let mut backoff = Backoff::new();
    loop {
        match session().await {
            Ok(()) => {
                tracing::warn!("manager ended the session; opening a new one");
                backoff.reset();
            }
            Err(e) => tracing::warn!(
                "session with {addr} failed: {:?}: {}",
                e.code(),
                crate::client::status_message(&e)
            ),
        }
        backoff.wait().await;
    }
}

/// Checks the manager's first message on a session (`first`, `None` when
/// the session ended): `Ok` when `is_accepted` says it is `accepted`.
pub fn accepted<T: Debug>(
    first: Option<T>,
    is_accepted: impl FnOnce(&T) -> bool,
) -> Result<(), Status> {
    match first {
        Some(m) if is_accepted(&m) => Ok(()),
        None => Err(Status::unavailable(
            "the manager ended the session before accepting it",
        )),
        Some(other) => Err(Status::internal(format!(
            "the manager answered the hello with {other:?} instead of accepted"
        ))),
    }
}

/// Waits [`Backoff::FIRST`], doubling up to [`Backoff::MAX`]; back to the
/// first after a session the manager accepted.
#[derive(Debug, Clone)]
pub struct Backoff {
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(2);

    pub fn new() -> Backoff {
        Backoff { delay: Self::FIRST }
    }

    /// The wait before the next attempt; the one after is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        delay
    }

    /// Sleeps [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// The next attempt waits [`Backoff::FIRST`] again.
    pub fn reset(&mut self) {
        self.delay = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_accepted_opens_a_session() {
        assert!(accepted(Some(1), |m| *m == 1).is_ok());
        let e = accepted(None::<u8>, |_| true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let e = accepted(Some(2), |m| *m == 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.message().contains("with 2 instead of accepted"), "{e}");
    }

    #[test]
    fn doubles_up_to_the_max_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Backoff::FIRST);
    }
}
