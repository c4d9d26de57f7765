//! The worker's heartbeat: how often it must beat, and how the frontend
//! judges a sample (the word itself lives in [`super::mapping`]).

use std::time::Duration;

use super::error::RingError;

/// Longest a worker's queue loop sleeps while it has requests in flight, so
/// that its heartbeat keeps moving while a request is held.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// Slack on the "absurd jump" bound of the heartbeat: a loop iteration
/// takes far more than a nanosecond, so the heartbeat cannot move by more
/// than the nanoseconds elapsed between two samples, plus this.
pub(super) const HEARTBEAT_SLACK: u64 = 1_000_000;

/// Judges a heartbeat sample: `Ok(true)` if it moved since `was`,
/// `Ok(false)` if it did not, `Err` if the move is impossible for a sane
/// worker: backwards (the counter is a u64 bumped by one, so it does not
/// wrap in practice), or by more than one beat per nanosecond of `elapsed`
/// (plus [`HEARTBEAT_SLACK`]).
pub fn judge_heartbeat(was: u64, now: u64, elapsed: Duration) -> Result<bool, RingError> {
    let elapsed_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    let bad = || RingError::Heartbeat {
        was,
        now,
        elapsed_ns,
    };
    match now.checked_sub(was) {
        None => Err(bad()),
        Some(0) => Ok(false),
        Some(d) if d > elapsed_ns.saturating_add(HEARTBEAT_SLACK) => Err(bad()),
        Some(_) => Ok(true),
    }
}
