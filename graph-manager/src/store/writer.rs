//! The state file's one writer, off the manager's lock.
//!
//! A change to the persistent state takes the write ticket first
//! ([`Store::begin`]) and keeps it until it has written the new state and
//! made it the current one: changes reach the file one at a time, in the
//! order they took the ticket, and each one is computed from the state the
//! previous one left. The write itself ([`Store::write`]) runs on a
//! blocking thread, with the manager's lock free for everyone else, and
//! returns once the file and its directory are synced: the caller applies
//! the change, and answers, only then.

use std::path::PathBuf;

use tokio::sync::{Mutex, MutexGuard};

use crate::core::error::ApiError;
use crate::core::state::State;
use crate::store::file;

/// Writes the state file, one change at a time.
#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    ticket: Mutex<()>,
}

/// The right to change the persistent state: one holder at a time, first
/// come, first served.
#[derive(Debug)]
pub(crate) struct WriteTicket<'a> {
    /// Held, not read: dropping the ticket lets the next change in.
    _turn: MutexGuard<'a, ()>,
}

impl Store {
    /// The store of the state file at `path`.
    pub(crate) fn new(path: PathBuf) -> Store {
        Store {
            path,
            ticket: Mutex::new(()),
        }
    }

    /// Waits for the write ticket (changes queue up here, in order).
    pub(crate) async fn begin(&self) -> WriteTicket<'_> {
        WriteTicket {
            _turn: self.ticket.lock().await,
        }
    }

    /// Writes `state` to the state file and syncs it, on a blocking
    /// thread; once it is durable, hands it back. On an error the file
    /// holds the previous state, as far as the filesystem allows
    /// ([`file::save`]).
    pub(crate) async fn write(
        &self,
        _ticket: &WriteTicket<'_>,
        state: State,
    ) -> Result<State, ApiError> {
        let path = self.path.clone();
        let (state, saved) = tokio::task::spawn_blocking(move || {
            let saved = file::save(&path, &state);
            (state, saved)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("state file writer: {e}")))?;
        saved.map_err(|source| ApiError::Persist {
            path: self.path.clone(),
            source,
        })?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests;
