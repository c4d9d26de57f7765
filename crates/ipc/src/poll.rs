//! Adaptive polling before sleeping, as QEMU's event loops do.
//!
//! A thread that runs out of work first polls its sources (shared-memory
//! rings, the guest's avail ring) for a short while before it announces
//! sleep and blocks on its eventfds. A busy queue then never sleeps, so
//! neither side makes a syscall to wake the other. Between checks the
//! poller yields the CPU, so a peer sharing the same CPU (the frontend and a
//! worker pinned together) gets to run and produce the work being waited
//! for. As in QEMU, the window adapts: after sleeping, a wait that a longer
//! window would have covered grows it, a longer wait shrinks it, so an idle
//! queue stops polling and a busy one polls long enough never to sleep.

use std::time::{Duration, Instant};

/// Environment variable with the maximum poll window in microseconds
/// (0 disables polling).
pub const POLL_ENV: &str = "BLKMESH_POLL_US";
/// Default maximum window. Longer than QEMU's 32 µs: a request crosses two
/// processes here, and waking an idle vCPU costs tens of microseconds.
pub const DEFAULT_MAX: Duration = Duration::from_micros(200);
/// Where a grown window starts from zero.
const GROW_START: Duration = Duration::from_micros(4);

/// One thread's poll window.
#[derive(Clone, Copy, Debug)]
pub struct Poller {
    max: Duration,
    window: Duration,
}

impl Poller {
    /// A poller with the window from [`POLL_ENV`], or [`DEFAULT_MAX`].
    pub fn from_env() -> Self {
        let max = std::env::var(POLL_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_micros)
            .unwrap_or(DEFAULT_MAX);
        Self::new(max)
    }

    pub fn new(max: Duration) -> Self {
        Poller {
            max,
            window: max / 4,
        }
    }

    /// Polls `ready` until it returns true or the window passes; yields the
    /// CPU between checks. True if work arrived.
    pub fn poll(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        if self.max.is_zero() {
            return false;
        }
        if ready() {
            return true;
        }
        if self.window.is_zero() {
            return false;
        }
        let start = Instant::now();
        loop {
            std::thread::yield_now();
            if ready() {
                return true;
            }
            if start.elapsed() >= self.window {
                return false;
            }
        }
    }

    /// Adapts the window after a sleep of `waited` (from the start of the
    /// failed poll to the wake-up).
    pub fn slept(&mut self, waited: Duration) {
        if self.max.is_zero() {
            return;
        }
        if waited <= self.max {
            // A longer window would have caught this wake-up without sleeping.
            self.window = (self.window * 2).max(GROW_START).min(self.max);
        } else {
            self.window /= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_poller_never_polls() {
        let mut p = Poller::new(Duration::ZERO);
        assert!(!p.poll(|| true));
    }

    #[test]
    fn finds_work_that_arrives_within_the_window() {
        // A window of seconds: a loaded machine may take milliseconds per
        // yield, and this is about what is found, not how fast.
        let mut p = Poller::new(Duration::from_secs(40));
        let mut n = 0;
        assert!(p.poll(|| {
            n += 1;
            n > 3
        }));
    }

    #[test]
    fn gives_up_after_the_window() {
        let mut p = Poller::new(Duration::from_micros(400));
        let t = Instant::now();
        assert!(!p.poll(|| false));
        assert!(t.elapsed() >= Duration::from_micros(100));
    }

    #[test]
    fn short_sleeps_grow_and_long_sleeps_shrink_the_window() {
        let mut p = Poller::new(Duration::from_micros(200));
        assert_eq!(p.window, Duration::from_micros(50));
        p.slept(Duration::from_micros(80));
        assert_eq!(p.window, Duration::from_micros(100));
        p.slept(Duration::from_micros(80));
        p.slept(Duration::from_micros(80));
        assert_eq!(p.window, Duration::from_micros(200));
        for _ in 0..20 {
            p.slept(Duration::from_millis(10));
        }
        assert_eq!(p.window, Duration::ZERO);
        p.slept(Duration::from_micros(10));
        assert_eq!(p.window, GROW_START);
    }
}
