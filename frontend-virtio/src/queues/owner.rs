//! Which VMM connection of an export runs its queues. A VM being
//! migrated has two: the source QEMU's, whose rings run, and the
//! destination's, which connects while the source still serves and starts
//! its rings once the source stopped its own (GET_VRING_BASE drains
//! them). One connection at a time may run queues, and another takes over
//! only once every queue of the first is stopped *and* detached from its
//! worker (a worker serves a queue to one connection at a time).
//!
//! The workers also hold one connection's guest memory at a time: a
//! connection's memory table reaches them only while no other
//! connection's queues run ([`QueueOwner::share_table`]), and a
//! connection whose table they do not hold sends it again before its
//! first queue starts.

use std::sync::Mutex;

#[derive(Debug, Default)]
struct State {
    /// The connection that runs (or last ran) the queues.
    active: Option<u64>,
    /// Its queues that are started and not yet fully stopped.
    running: usize,
    /// The connection whose memory table the workers hold.
    table: Option<u64>,
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

    /// Gives the workers connection `conn`'s memory table with `send`,
    /// unless another connection's queues run: then `None`, and the table
    /// waits for `conn`'s first queue ([`QueueOwner::holds_table`]). No
    /// queue starts or stops meanwhile.
    pub fn share_table<E>(
        &self,
        conn: u64,
        send: impl FnOnce() -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let mut s = self.lock();
        if s.active.is_some_and(|c| c != conn) && s.running > 0 {
            return None;
        }
        let sent = send();
        // After a failed send, which table each worker holds is unknown:
        // the next queue to start sends its own again.
        s.table = sent.is_ok().then_some(conn);
        Some(sent)
    }

    /// Whether the workers hold connection `conn`'s memory table.
    pub fn holds_table(&self, conn: u64) -> bool {
        self.lock().table == Some(conn)
    }

    /// Connection `conn` went away (its queues were stopped first).
    pub fn release(&self, conn: u64) {
        let mut s = self.lock();
        if s.active == Some(conn) {
            s.active = None;
            s.running = 0;
        }
        if s.table == Some(conn) {
            s.table = None;
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

    #[test]
    fn a_memory_table_reaches_the_workers_only_while_no_other_connection_runs() {
        let o = QueueOwner::default();
        let ok = || Ok::<(), ()>(());
        assert_eq!(o.share_table(1, ok), Some(Ok(())));
        assert!(o.claim(1));
        // A migration's destination sets its device up: its table waits.
        assert_eq!(
            o.share_table(2, || panic!("sent while 1 runs")),
            None::<Result<(), ()>>
        );
        assert!(o.holds_table(1) && !o.holds_table(2));
        // The source's own change goes through; a failed one is not held.
        assert_eq!(o.share_table(1, || Err(())), Some(Err(())));
        assert!(!o.holds_table(1));
        assert_eq!(o.share_table(1, ok), Some(Ok(())));
        o.stopped(1);
        // The source stopped: the destination's table may go now.
        assert_eq!(o.share_table(2, ok), Some(Ok(())));
        assert!(o.holds_table(2) && !o.holds_table(1));
        o.release(2);
        assert!(!o.holds_table(2));
    }
}
