//! Moving running queues between workers, live: one sequence of steps
//! shared by the three ways a queue changes worker.
//!
//! ```text
//! move:      drain ─► detach ─► retarget ─► attach ─► resume
//! reopen:    drain ─► detach ─► swap graph ─► attach ─► resume   (all queues)
//! fail-over:          retarget ─► fresh ring ─► attach (settle) ─► resubmit
//!            failure after drain: back to the old worker or graph, attach, resume
//! ```
//!
//! - A **move** (the manager placed a queue elsewhere) drains the queue —
//!   no guest request is taken and every one in flight completes — so the
//!   same ring goes to the new worker; no request fails.
//! - A **reopen** (a new generation of the graph) does the same for every
//!   running queue at once, with the graph swapped in between.
//! - A **fail-over** (the worker died or was fenced) has nothing to drain:
//!   the queue gets a fresh ring on the replacement, and its thread
//!   resubmits everything that was in flight.
//!
//! A move of a queue whose worker is lost is a fail-over. On any failure
//! the queues go back to the workers they had and resume.

use super::{Destination, WorkerQueues, WorkerRing, PAUSE_TIMEOUT};
use crate::queue_host::HostError;
use crate::vring::Drained;
use crate::workers::{LinkError, MemRef, StagedLinks};

/// Why a queue could not move. The queues keep serving where they were
/// (a fail-over is retried by the caller).
#[derive(Debug, thiserror::Error)]
pub enum RelocationError {
    /// A queue did not drain in time; every queue was resumed.
    #[error("queue {queue} did not drain")]
    NotDrained { queue: usize },
    /// A queue's worker was lost while the queue drained; every queue was
    /// resumed, and the lost one waits for its replacement.
    #[error("queue {queue} lost its worker while draining")]
    WorkerLost { queue: usize },
    /// The new worker could not be reached or refused the queue.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A queue could not be attached to the reopened graph.
    #[error("queue {queue}: {source}")]
    Attach {
        queue: usize,
        #[source]
        source: LinkError,
    },
    /// The new graph could not be opened.
    #[error("{}", crate::error_chain(.0))]
    Open(LinkError),
    /// The new graph could not be opened after the old one was closed,
    /// but the old one could be opened again and serves.
    #[error("{} (the old graph was reopened)", crate::error_chain(.0))]
    OldGraphReopened(LinkError),
    /// Neither the new graph nor the old one could be opened: the queues
    /// stay drained.
    #[error("{}; reopening the old graph: {}", crate::error_chain(.open), crate::error_chain(.reopen))]
    NoGraph { open: LinkError, reopen: LinkError },
    /// A fresh ring for a failed-over queue could not be made.
    #[error(transparent)]
    Ring(#[from] HostError),
}

/// Opens a graph (for a reopen) on the workers, with the memory table.
pub type OpenGraph<'a> = &'a dyn Fn(Option<MemRef<'_>>) -> Result<StagedLinks, LinkError>;

impl WorkerQueues {
    /// Whether `queue` waits for a replacement worker.
    pub fn worker_lost(&self, queue: u32) -> bool {
        self.running(queue as usize)
            .is_some_and(|r| r.control.worker_lost())
    }

    /// The queues that run.
    fn running_queues(&self) -> Vec<usize> {
        (0..self.running.len())
            .filter(|&i| self.running(i).is_some())
            .collect()
    }

    /// Drains `queues`: no guest request is taken, every one in flight
    /// completes. On a timeout or a lost worker all of them resume.
    fn drain_all(&self, queues: &[usize]) -> Result<(), RelocationError> {
        for &queue in queues {
            let drained = self
                .running(queue)
                .map_or(Drained::TimedOut, |r| r.control.drain(PAUSE_TIMEOUT));
            let error = match drained {
                Drained::Quiet => continue,
                Drained::WorkerLost => RelocationError::WorkerLost { queue },
                Drained::TimedOut => RelocationError::NotDrained { queue },
            };
            self.resume_all(queues);
            return Err(error);
        }
        Ok(())
    }

    /// Resumes `queues`, waking their workers for anything published
    /// meanwhile.
    fn resume_all(&self, queues: &[usize]) {
        for &queue in queues {
            if let Some(r) = self.running(queue) {
                r.control.resume();
                r.ring.kick.ring();
            }
        }
    }

    /// Detaches `queues` from their workers; a worker that is gone is
    /// not an error (the queues are quiet either way).
    fn detach_all(&self, queues: &[usize]) {
        for &queue in queues {
            if let Err(e) = self.links.detach(queue as u32) {
                tracing::warn!(export = %self.export, queue, "detach for reopen: {e}");
            }
        }
    }

    /// Attaches the rings of `queues` to the workers the links point at.
    fn attach_all(&self, queues: &[usize]) -> Result<(), RelocationError> {
        for &queue in queues {
            if let Some(r) = self.running(queue) {
                r.ring
                    .attach(&self.links, queue, false)
                    .map_err(|source| RelocationError::Attach { queue, source })?;
            }
        }
        Ok(())
    }

    /// Moves a queue to the worker on `socket`, live: the queue thread stops
    /// taking guest requests and waits for the in-flight ones, the old
    /// worker detaches, the new one opens the graph (if it had no queue of
    /// this export yet), gets the memory table, and attaches the same ring;
    /// then the queue resumes. No request fails.
    pub fn move_queue(&mut self, queue: u32, to: Destination<'_>) -> Result<(), RelocationError> {
        let index = queue as usize;
        if self.running(index).is_none() {
            // Not running: the next start attaches to the new worker.
            return self.with_worker_mem(|this, mem| {
                Ok(this
                    .links
                    .retarget(queue, to.worker, to.socket, to.plan, mem)?)
            });
        }
        if self.worker_lost(queue) {
            // Its worker is gone: nothing to drain, resubmit instead.
            return self.fail_over(queue, to);
        }
        match self.drain_all(&[index]) {
            Ok(()) => {}
            // It died while we waited: the same.
            Err(RelocationError::WorkerLost { .. }) => return self.fail_over(queue, to),
            Err(e) => return Err(e),
        }
        let result = self.with_worker_mem(|this, mem| {
            this.links.detach(queue)?;
            this.links
                .retarget(queue, to.worker, to.socket, to.plan, mem)?;
            this.attach_one(index)
        });
        if result.is_err() {
            // Put the queue back on whichever worker the links point at
            // (the old one if the new one could not be reached).
            if let Err(e) = self.attach_one(index) {
                tracing::error!(export = %self.export, queue, "re-attach after a failed move: {e}");
            }
        }
        self.resume_all(&[index]);
        result
    }

    fn attach_one(&self, queue: usize) -> Result<(), RelocationError> {
        match self.running(queue) {
            Some(r) => Ok(r.ring.attach(&self.links, queue, false)?),
            None => Ok(()),
        }
    }

    /// Puts the graph opened by `open` in place of the current one, live:
    /// every running queue stops taking guest requests and drains, detaches
    /// from the old workers, attaches to the new ones, and resumes once
    /// `apply` has run (it updates what the queues check requests
    /// against). `open` gets the memory table and, when `close_first` is
    /// set (leaves that take one connection at a time, like a vhost-user
    /// target), is called only after the old graph has been closed; if it
    /// fails then, `reopen_old` opens the old graph again. On any failure
    /// the queues go back to the old graph and no request fails.
    pub fn reopen(
        &mut self,
        close_first: bool,
        open: OpenGraph<'_>,
        reopen_old: OpenGraph<'_>,
        apply: impl FnOnce(),
    ) -> Result<(), RelocationError> {
        self.with_worker_mem(|this, mem| {
            this.reopen_with(mem, close_first, open, reopen_old, apply)
        })
    }

    fn reopen_with(
        &mut self,
        mem: Option<MemRef<'_>>,
        close_first: bool,
        open: OpenGraph<'_>,
        reopen_old: OpenGraph<'_>,
        apply: impl FnOnce(),
    ) -> Result<(), RelocationError> {
        let staged = if close_first {
            None
        } else {
            Some(open(mem).map_err(RelocationError::Open)?)
        };
        let running = self.running_queues();
        self.drain_all(&running)?;
        self.detach_all(&running);
        let (staged, reopened_old) = match staged {
            Some(s) => (s, None),
            None => {
                drop(self.links.swap(StagedLinks::empty()));
                match open(mem) {
                    Ok(s) => (s, None),
                    Err(e) => match reopen_old(mem) {
                        Ok(old) => (old, Some(e)),
                        Err(e2) => {
                            tracing::error!(export = %self.export, "reopening the old graph failed too: {}", crate::error_chain(&e2));
                            return Err(RelocationError::NoGraph {
                                open: e,
                                reopen: e2,
                            });
                        }
                    },
                }
            }
        };
        let old = self.links.swap(staged);
        if let Err(e) = self.attach_all(&running) {
            tracing::warn!(export = %self.export, "attach after reopen: {e}; going back");
            for &i in &running {
                let _ = self.links.detach(i as u32);
            }
            drop(self.links.swap(old));
            if let Err(e) = self.attach_all(&running) {
                tracing::error!(export = %self.export, "re-attach to the old graph: {e}");
            }
            self.resume_all(&running);
            return Err(e);
        }
        if reopened_old.is_none() {
            apply();
        }
        self.resume_all(&running);
        drop(old);
        match reopened_old {
            Some(e) => Err(RelocationError::OldGraphReopened(e)),
            None => Ok(()),
        }
    }

    /// Moves a queue whose worker was lost to the worker on `socket`: opens
    /// the graph there with the memory table, attaches a fresh ring pair
    /// (the old one may hold anything the dead worker left), and hands it
    /// to the queue thread, which resubmits every in-flight request. On
    /// failure the queue keeps waiting; the caller tries again.
    pub fn fail_over(&mut self, queue: u32, to: Destination<'_>) -> Result<(), RelocationError> {
        self.with_worker_mem(|this, mem| {
            this.links
                .retarget(queue, to.worker, to.socket, to.plan, mem)
        })?;
        let index = queue as usize;
        let Some(layout) = self.running(index).map(|r| r.ring.rings.layout()) else {
            // Not running: the next start attaches to the new link.
            return Ok(());
        };
        let ring = WorkerRing::create(&self.export, index, layout)?;
        // Its requests are resubmitted: the lost worker's I/O still in the
        // kernel must finish first.
        ring.attach(&self.links, index, true)?;
        // A zoned export: which in-flight writes the lost worker applied.
        let ends = ring
            .ends(self.zone_oracle(index))
            .map_err(|source| HostError::Resource {
                what: "doorbell",
                source,
            })?;
        let Some(running) = self.running.get_mut(index).and_then(Option::as_mut) else {
            return Ok(());
        };
        running.ring = ring;
        running.control.replace_worker(ends);
        tracing::info!(export = %self.export, queue, worker = to.worker, "queue failed over");
        Ok(())
    }
}
