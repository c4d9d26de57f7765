//! Orders the connections that serve one virtqueue of an export.
//!
//! A frontend that dies leaves requests running here: held by a throttle or
//! a delay, or already in the kernel. The restarted frontend resubmits them
//! (from the VMM's inflight region) on a new connection, and the guest,
//! once they complete, may reuse their buffers and write the same sectors
//! again. An old request that ran after that would write stale data over
//! newer data, or read into a buffer the guest reused. So a queue attached
//! on a new connection waits until every connection whose frontend hung up
//! has finished that queue (its held requests are cancelled, see
//! [`crate::queue::QueueHandle::abandon`]; those in the kernel complete),
//! and only then says it is attached. Connections whose frontend is alive
//! (a live reopen stages a second one) are not waited for: their frontend
//! orders them itself.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// A connection as the other connections of its export see it.
#[derive(Clone)]
pub struct Peer {
    id: u64,
    /// A duplicate of the connection's socket, polled for the frontend's hang-up.
    socket: Arc<OwnedFd>,
}

impl Peer {
    /// A connection over `socket` (its fd is duplicated).
    pub fn new(socket: impl AsFd) -> std::io::Result<Peer> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Peer {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            socket: Arc::new(socket.as_fd().try_clone_to_owned()?),
        })
    }

    fn hung_up(&self) -> bool {
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::empty())];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
    }
}

type Key = (String, u32);

#[derive(Default)]
struct Table {
    serving: Mutex<HashMap<Key, Vec<Peer>>>,
    released: Condvar,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(Table::default)
}

fn lock(t: &Table) -> MutexGuard<'_, HashMap<Key, Vec<Peer>>> {
    t.serving.lock().unwrap_or_else(|p| p.into_inner())
}

/// The queue of an abandoned connection did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "queue {queue} of export {export:?} is still finishing the requests of a frontend that is gone"
)]
pub struct StillFinishing {
    pub export: String,
    pub queue: u32,
}

/// That `peer` serves `queue` of `export`; released when dropped (after
/// the queue has stopped).
pub struct Claim {
    key: Key,
    peer: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let t = table();
        let mut serving = lock(t);
        if let Some(v) = serving.get_mut(&self.key) {
            v.retain(|p| p.id != self.peer);
            if v.is_empty() {
                serving.remove(&self.key);
            }
        }
        t.released.notify_all();
    }
}

/// Claims `queue` of `export` for `peer`, first waiting (up to `timeout`)
/// until no connection whose frontend hung up still serves it.
pub fn claim(
    export: &str,
    queue: u32,
    peer: &Peer,
    timeout: Duration,
) -> Result<Claim, StillFinishing> {
    let key = (export.to_string(), queue);
    let t = table();
    let deadline = Instant::now() + timeout;
    let mut serving = lock(t);
    loop {
        let abandoned = serving
            .get(&key)
            .is_some_and(|v| v.iter().any(|p| p.id != peer.id && p.hung_up()));
        if !abandoned {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StillFinishing {
                export: key.0,
                queue,
            });
        }
        // Woken when a claim is released; a connection that hangs up
        // meanwhile is seen at the next look.
        serving = t
            .released
            .wait_timeout(serving, left.min(Duration::from_millis(50)))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    serving.entry(key.clone()).or_default().push(peer.clone());
    Ok(Claim { key, peer: peer.id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_hung_up_holder_is_waited_for_and_a_live_one_is_not() {
        let (old, old_frontend) = UnixStream::pair().unwrap();
        let (live, _live_frontend) = UnixStream::pair().unwrap();
        let (new, _new_frontend) = UnixStream::pair().unwrap();
        let (old, live, new) = (
            Peer::new(&old).unwrap(),
            Peer::new(&live).unwrap(),
            Peer::new(&new).unwrap(),
        );
        let t = Duration::from_millis(200);
        let held = claim("handover-test-e", 0, &old, t).unwrap();
        let _live = claim("handover-test-e", 0, &live, t).unwrap();
        // Both frontends alive: no waiting (a live reopen).
        drop(claim("handover-test-e", 0, &new, t).unwrap());
        // The old frontend hangs up: its queue must finish first.
        drop(old_frontend);
        let e = claim("handover-test-e", 0, &new, t)
            .err()
            .expect("waited for the old queue");
        assert_eq!((e.export.as_str(), e.queue), ("handover-test-e", 0));
        // Another queue or export is not held up.
        drop(claim("handover-test-e", 1, &new, t).unwrap());
        drop(claim("handover-test-f", 0, &new, t).unwrap());
        // Released from another thread while we wait.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
        });
        let started = Instant::now();
        drop(claim("handover-test-e", 0, &new, Duration::from_secs(5)).unwrap());
        assert!(started.elapsed() < Duration::from_secs(5));
        release.join().unwrap();
    }
}
