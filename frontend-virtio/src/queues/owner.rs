//! Which VMM connection of an export runs its queues. A VM being
//! migrated has two: the source QEMU's, whose rings run, and the
//! destination's, which connects while the source still serves and starts
//! its rings once the source stopped its own (GET_VRING_BASE drains
//! them). One connection at a time may run queues, and another takes over
//! only once every queue of the first is stopped *and* detached from its
//! worker (a worker serves a queue to one connection at a time).

use std::sync::Mutex;

#[derive(Debug, Default)]
struct State {
    /// The connection that runs (or last ran) the queues.
    active: Option<u64>,
    /// Its queues that are started and not yet fully stopped.
    running: usize,
}

/// The connection that runs the export's queues, if any.
#[derive(Debug, Default)]
pub struct QueueOwner(Mutex<State>);

impl QueueOwner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `conn` starts a queue: refused while another
    /// connection's queues run; taken over from one whose queues all
    /// stopped. On success the queue counts as running until
    /// [`QueueOwner::stopped`].
    pub fn claim(&self, conn: u64) -> bool {
        let mut s = self.lock();
        match s.active {
            Some(c) if c == conn => {}
            Some(_) if s.running > 0 => return false,
            _ => {
                s.active = Some(conn);
                s.running = 0;
            }
        }
        s.running += 1;
        true
    }

    /// A queue of `conn` that [`QueueOwner::claim`] counted did not start,
    /// or stopped and let go of its worker.
    pub fn stopped(&self, conn: u64) {
        let mut s = self.lock();
        if s.active == Some(conn) {
            s.running = s.running.saturating_sub(1);
        }
    }

    /// The connection that runs (or last ran) the queues.
    pub fn active(&self) -> Option<u64> {
        self.lock().active
    }

    /// Connection `conn` went away (its queues were stopped first).
    pub fn release(&self, conn: u64) {
        let mut s = self.lock();
        if s.active == Some(conn) {
            *s = State::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_runs_the_queues_at_a_time() {
        let o = QueueOwner::default();
        assert!(o.claim(1));
        assert!(o.claim(1), "a second queue of the same connection");
        assert!(!o.claim(2), "the source still runs its queues");
        assert_eq!(o.active(), Some(1));
        o.stopped(1);
        assert!(!o.claim(2), "one of them still runs");
        o.stopped(1);
        assert!(o.claim(2), "the source stopped them all");
        assert_eq!(o.active(), Some(2));
        o.stopped(1);
        o.release(1);
        assert_eq!(o.active(), Some(2), "the old connection no longer counts");
        assert!(!o.claim(3));
        o.release(2);
        assert_eq!(o.active(), None);
        assert!(o.claim(3));
    }
}
