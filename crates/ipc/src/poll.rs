//! Adaptive polling before sleeping, as QEMU's event loops do, with one
//! window per kind of wait.
//!
//! A thread that runs out of work first polls its sources (shared-memory
//! rings, the guest's avail ring) for a short while before it announces
//! sleep and blocks on its eventfds. A busy queue then never sleeps, so
//! neither side makes a syscall to wake the other. Between checks the
//! poller yields the CPU, so a peer sharing the same CPU (the frontend and a
//! worker pinned together) gets to run and produce the work being waited
//! for.
//!
//! A queue thread waits for two different things, and polling pays for one
//! and not the other:
//! - with requests in flight it waits for their completions: as long as the
//!   storage takes, tens of microseconds for a cached read or a fast disk;
//! - with nothing in flight it waits for the driver's next request: as long
//!   as the guest thinks, which inside a VM is hundreds of microseconds
//!   even at queue depth 1.
//!
//! So each [`Wait`] has its own window. As in QEMU, a window adapts: after
//! sleeping, a wait that the window's maximum would have covered grows it,
//! a longer wait shrinks it. A window only lasts while waits stay short,
//! so a thread spins only where spinning saves a wake-up, and an idle or
//! slow-driven queue does not poll at all. The maximum for the next request
//! depends on who sends it: the guest's is worth a long window (it saves
//! the guest's kick too), the frontend's a short one.

use std::time::{Duration, Instant};

/// Environment variable with the maximum poll window for completions, in
/// microseconds (0 disables all polling).
pub const POLL_ENV: &str = "BLKMESH_POLL_US";
/// Environment variable with the maximum poll window for the driver's next
/// request, in microseconds (0 disables that window).
pub const POLL_IDLE_ENV: &str = "BLKMESH_POLL_IDLE_US";
/// Default maximum window for completions: the round trip through the
/// other process and the storage.
pub const DEFAULT_MAX: Duration = Duration::from_micros(200);
/// Default maximum window for the guest's next request, in the frontend.
/// Catching it by polling saves the guest its kick (notifications stay
/// off while polling) and the frontend a wake-up: inside a VM this is what
/// makes queue depth 1 faster than qemu-storage-daemon (docs/PERFORMANCE.md).
pub const DEFAULT_GUEST_MAX: Duration = Duration::from_micros(200);
/// Default maximum window for the frontend's next request, in a worker
/// (QEMU's `poll-max-ns`). With the two queue threads on one CPU
/// ([`crate::placement`]) waking the worker costs little, so it need not
/// spin for the frontend.
pub const DEFAULT_PEER_MAX: Duration = Duration::from_micros(32);
/// Where a grown window starts from zero.
const GROW_START: Duration = Duration::from_micros(4);

/// What a queue thread with no work left is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Requests are in flight: the next event is likely a completion.
    Completion,
    /// Nothing is in flight: the next event is the driver's next request.
    Request,
}

impl Wait {
    /// The wait of a queue thread with `inflight` requests outstanding.
    pub fn with_inflight(inflight: usize) -> Wait {
        if inflight > 0 {
            Wait::Completion
        } else {
            Wait::Request
        }
    }
}

/// One queue thread's poll windows, one per [`Wait`].
#[derive(Clone, Copy, Debug)]
pub struct Poller {
    completion: Window,
    request: Window,
}

impl Poller {
    /// A poller with the maxima from [`POLL_ENV`] and [`POLL_IDLE_ENV`], or
    /// [`DEFAULT_MAX`] and `idle_default` ([`DEFAULT_GUEST_MAX`] or
    /// [`DEFAULT_PEER_MAX`]).
    pub fn from_env(idle_default: Duration) -> Self {
        let micros = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_micros)
        };
        let max = micros(POLL_ENV).unwrap_or(DEFAULT_MAX);
        let idle = micros(POLL_IDLE_ENV).unwrap_or(idle_default);
        Self::new(max, idle)
    }

    /// Windows of at most `max` for completions and `idle_max` for the next
    /// request; a zero `max` turns polling off altogether.
    pub fn new(max: Duration, idle_max: Duration) -> Self {
        let idle_max = if max.is_zero() { max } else { idle_max };
        Poller {
            completion: Window::new(max),
            request: Window::new(idle_max),
        }
    }

    fn window(&mut self, wait: Wait) -> &mut Window {
        match wait {
            Wait::Completion => &mut self.completion,
            Wait::Request => &mut self.request,
        }
    }

    /// Polls `ready` until it returns true or the window for `wait` passes;
    /// yields the CPU between checks. True if work arrived.
    pub fn poll(&mut self, wait: Wait, ready: impl FnMut() -> bool) -> bool {
        self.window(wait).poll(ready)
    }

    /// Adapts the window for `wait` after a sleep of `waited` (from the
    /// start of the failed poll to the wake-up).
    pub fn slept(&mut self, wait: Wait, waited: Duration) {
        self.window(wait).slept(waited)
    }
}

/// One adaptive window.
#[derive(Clone, Copy, Debug)]
struct Window {
    max: Duration,
    current: Duration,
}

impl Window {
    fn new(max: Duration) -> Self {
        Window {
            max,
            current: max / 4,
        }
    }

    fn poll(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        if self.max.is_zero() {
            return false;
        }
        if ready() {
            return true;
        }
        if self.current.is_zero() {
            return false;
        }
        let start = Instant::now();
        loop {
            std::thread::yield_now();
            if ready() {
                return true;
            }
            if start.elapsed() >= self.current {
                return false;
            }
        }
    }

    fn slept(&mut self, waited: Duration) {
        if self.max.is_zero() {
            return;
        }
        if waited <= self.max {
            // A longer window would have caught this wake-up without sleeping.
            self.current = (self.current * 2).max(GROW_START).min(self.max);
        } else if self.current > GROW_START {
            self.current /= 2;
        } else {
            // Windows shorter than this catch nothing a look would not.
            self.current = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_poller_never_polls() {
        let mut p = Poller::new(Duration::ZERO, Duration::from_micros(32));
        assert!(!p.poll(Wait::Completion, || true));
        assert!(!p.poll(Wait::Request, || true));
    }

    #[test]
    fn finds_work_that_arrives_within_the_window() {
        // A window of seconds: a loaded machine may take milliseconds per
        // yield, and this is about what is found, not how fast.
        let mut p = Poller::new(Duration::from_secs(40), Duration::from_secs(40));
        for wait in [Wait::Completion, Wait::Request] {
            let mut n = 0;
            assert!(p.poll(wait, || {
                n += 1;
                n > 3
            }));
        }
    }

    #[test]
    fn gives_up_after_the_window() {
        let mut p = Poller::new(Duration::from_micros(400), Duration::ZERO);
        let t = Instant::now();
        assert!(!p.poll(Wait::Completion, || false));
        assert!(t.elapsed() >= Duration::from_micros(100));
        // The request window is off: no spinning.
        let t = Instant::now();
        assert!(!p.poll(Wait::Request, || false));
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn short_sleeps_grow_and_long_sleeps_shrink_the_window() {
        let mut w = Window::new(Duration::from_micros(200));
        assert_eq!(w.current, Duration::from_micros(50));
        w.slept(Duration::from_micros(80));
        assert_eq!(w.current, Duration::from_micros(100));
        w.slept(Duration::from_micros(80));
        w.slept(Duration::from_micros(80));
        assert_eq!(w.current, Duration::from_micros(200));
        for _ in 0..20 {
            w.slept(Duration::from_millis(10));
        }
        assert_eq!(w.current, Duration::ZERO);
        w.slept(Duration::from_micros(10));
        assert_eq!(w.current, GROW_START);
    }

    #[test]
    fn each_wait_adapts_its_own_window() {
        let mut p = Poller::new(Duration::from_micros(200), Duration::from_micros(32));
        // A guest that thinks 300 µs between requests closes the request
        // window; completions that come in 20 µs keep theirs open.
        for _ in 0..10 {
            p.slept(Wait::Request, Duration::from_micros(300));
            p.slept(Wait::Completion, Duration::from_micros(20));
        }
        assert_eq!(p.request.current, Duration::ZERO);
        assert_eq!(p.completion.current, Duration::from_micros(200));
        let mut looks = 0;
        assert!(!p.poll(Wait::Request, || {
            looks += 1;
            false
        }));
        assert_eq!(looks, 1);
    }

    #[test]
    fn a_zero_maximum_turns_both_windows_off() {
        let p = Poller::new(Duration::ZERO, Duration::from_micros(32));
        assert!(p.request.max.is_zero());
    }

    #[test]
    fn the_wait_follows_the_requests_in_flight() {
        assert_eq!(Wait::with_inflight(0), Wait::Request);
        assert_eq!(Wait::with_inflight(3), Wait::Completion);
    }
}
