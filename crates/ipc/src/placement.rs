//! Where a queue's threads run: the frontend's and the worker's thread of
//! one virtqueue on the same CPU.
//!
//! A request crosses two threads, the frontend's queue thread and the
//! worker's. When they share a CPU, a doorbell from one to the other puts
//! the sleeper on a runqueue that is already busy: the waker yields (it
//! polls for the answer) and the other runs at once. On different CPUs
//! each hop wakes an idle CPU instead, which inside a VM costs tens of
//! microseconds and, with the vCPUs competing for the same cores, takes a
//! CPU they need. Like QEMU's `iothread-vq-mapping`, queue `q` goes to
//! `cpus[q % cpus.len()]`: both processes compute it from the same list,
//! so they agree without asking each other.
//!
//! The list is [`QUEUE_CPUS_ENV`] if set (a CPU list such as `2,4-7`, or
//! `off` to leave placement to the scheduler); otherwise the CPUs the
//! process may run on. Give both processes the same list when their
//! allowed CPUs differ (containers with different cpusets).

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Environment variable naming the CPUs for queue threads, or `off`.
pub const QUEUE_CPUS_ENV: &str = "BLKMESH_QUEUE_CPUS";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("{QUEUE_CPUS_ENV}: {0:?} is not a CPU list (like 0,2-3) or \"off\"")]
    BadList(String),
    #[error("{QUEUE_CPUS_ENV}: CPU {0} is beyond what this system can name")]
    TooLarge(usize),
}

/// Parses a CPU list (`0,2-3`), or `off` for none. The CPUs come back
/// sorted, each once.
pub fn parse_cpu_list(s: &str) -> Result<Option<Vec<usize>>, PlacementError> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || PlacementError::BadList(s.to_string());
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part.trim(), part.trim()),
        };
        let lo: usize = lo.parse().map_err(|_| bad())?;
        let hi: usize = hi.parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        if hi >= CpuSet::count() {
            return Err(PlacementError::TooLarge(hi));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(Some(cpus))
}

/// The CPUs for queue threads: [`QUEUE_CPUS_ENV`], else the CPUs the
/// process (its main thread) may run on. None: no placement.
pub fn queue_cpus() -> Result<Option<Vec<usize>>, PlacementError> {
    if let Ok(v) = std::env::var(QUEUE_CPUS_ENV) {
        return parse_cpu_list(&v);
    }
    let Ok(set) = sched_getaffinity(Pid::this()) else {
        return Ok(None);
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    Ok((!cpus.is_empty()).then_some(cpus))
}

/// The CPU of queue `queue` in `cpus`.
pub fn cpu_for_queue(cpus: &[usize], queue: u32) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[queue as usize % cpus.len()])
}

/// Places the calling thread, the queue thread of `queue`, on its CPU.
/// Returns the CPU, or None when placement is off. A failure is logged by
/// the caller; the queue runs anyway, where the scheduler puts it.
pub fn place_queue_thread(queue: u32) -> Result<Option<usize>, PlacementError> {
    let Some(cpus) = queue_cpus()? else {
        return Ok(None);
    };
    let Some(cpu) = cpu_for_queue(&cpus, queue) else {
        return Ok(None);
    };
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|_| PlacementError::TooLarge(cpu))?;
    // Pid 0: the calling thread only.
    match sched_setaffinity(Pid::from_raw(0), &set) {
        Ok(()) => Ok(Some(cpu)),
        // Not ours to use (a cpuset): leave it to the scheduler.
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernels() {
        assert_eq!(parse_cpu_list("0"), Ok(Some(vec![0])));
        assert_eq!(parse_cpu_list("3,0-1, 1"), Ok(Some(vec![0, 1, 3])));
        assert_eq!(parse_cpu_list("off"), Ok(None));
        assert_eq!(parse_cpu_list(" OFF "), Ok(None));
    }

    #[test]
    fn bad_cpu_lists_are_refused() {
        for bad in ["", "a", "1-", "3-1", "1,,2", "-1"] {
            assert!(
                matches!(parse_cpu_list(bad), Err(PlacementError::BadList(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_cpu_list("99999999"),
            Err(PlacementError::TooLarge(99999999))
        );
    }

    #[test]
    fn queues_go_round_the_list() {
        let cpus = [2, 5, 7];
        let got: Vec<_> = (0..5).map(|q| cpu_for_queue(&cpus, q)).collect();
        assert_eq!(got, [Some(2), Some(5), Some(7), Some(2), Some(5)]);
        assert_eq!(cpu_for_queue(&[], 0), None);
    }

    #[test]
    fn a_queue_thread_lands_on_its_cpu() {
        let allowed = queue_cpus().unwrap().unwrap();
        let queue = 1;
        let want = cpu_for_queue(&allowed, queue).unwrap();
        let got = std::thread::spawn(move || {
            let placed = place_queue_thread(queue).unwrap();
            let now = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let on: Vec<usize> = (0..CpuSet::count())
                .filter(|&c| now.is_set(c).unwrap())
                .collect();
            (placed, on)
        })
        .join()
        .unwrap();
        assert_eq!(got, (Some(want), vec![want]));
    }
}
