//! Test-only fault hooks, for end-to-end tests of how the frontend treats a
//! worker that breaks the ring protocol (it cannot be made to do so
//! otherwise).
//!
//! Guarded three ways: compiled in debug builds only (a release build
//! ignores the variable), armed only from the worker's own environment at
//! startup (which only whoever starts the worker controls; nothing a guest
//! or a plan sends reaches it), and only by a token file the worker
//! consumes, so that the hook fires in one worker process once and the
//! replacement started with the same environment runs clean.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Names a file holding `index N` or `tag N`: after one of its queues has
/// posted N completions, the worker publishes a completion producer index
/// more than a ring ahead (`index`), or a second completion for a request
/// it just completed (`tag`). The worker deletes the file when it arms.
pub const CORRUPT_COMPLETIONS_ENV: &str = "BLKMESH_TEST_CORRUPT_COMPLETIONS";

/// What the hook breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// The completion producer index jumps more than a ring ahead.
    Index,
    /// A completion repeated: its tag is no longer in flight.
    Tag,
}

static ARMED: OnceLock<Option<(Corruption, u64)>> = OnceLock::new();
static FIRED: AtomicBool = AtomicBool::new(false);

/// Parses the token file's content.
fn parse(text: &str) -> Option<(Corruption, u64)> {
    let mut words = text.split_whitespace();
    let how = match words.next()? {
        "index" => Corruption::Index,
        "tag" => Corruption::Tag,
        _ => return None,
    };
    let after = words.next().map_or(Some(0), |n| n.parse().ok())?;
    Some((how, after))
}

/// Arms the hook from [`CORRUPT_COMPLETIONS_ENV`] (debug builds only).
/// Call once at startup, before any queue runs.
pub fn arm_from_env() {
    let armed = cfg!(debug_assertions)
        .then(|| std::env::var_os(CORRUPT_COMPLETIONS_ENV))
        .flatten()
        .and_then(|path| {
            let text = std::fs::read_to_string(&path).ok()?;
            // Whoever removes the token owns it: one worker, once.
            std::fs::remove_file(&path).ok()?;
            parse(&text)
        });
    if let Some((how, after)) = armed {
        tracing::warn!(
            ?how,
            after,
            "test fault hook armed: completions will be corrupted"
        );
    }
    let _ = ARMED.set(armed);
}

/// Whether a queue that has posted `posted` completions must now corrupt
/// its completion ring, and how; true for one queue of the process, once.
pub fn corruption_due(posted: u64) -> Option<Corruption> {
    let (how, after) = (*ARMED.get()?)?;
    if posted < after || FIRED.swap(true, Ordering::Relaxed) {
        return None;
    }
    Some(how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_content() {
        assert_eq!(parse("index 300\n"), Some((Corruption::Index, 300)));
        assert_eq!(parse("tag"), Some((Corruption::Tag, 0)));
        assert_eq!(parse("index lots"), None);
        assert_eq!(parse("other 1"), None);
        assert_eq!(parse(""), None);
    }
}
