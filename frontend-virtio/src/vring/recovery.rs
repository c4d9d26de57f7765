//! Taking up requests again: on a replacement worker's rings (fail-over),
//! and the ones a previous frontend left in flight (inflight tracking).

use std::sync::Arc;
use std::time::Instant;

use blkmesh_ipc::ring::Op;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use virtio_queue::QueueT;

use super::{Vring, WorkerEnds, EV_WORKER};
use crate::request::{self, RequestType, Status};

impl Vring {
    /// Moves to a replacement worker's rings and resubmits every request
    /// that was in flight with the lost one, in their submission order (a
    /// write may thus be applied twice, with the same data; none is lost).
    ///
    /// Zoned devices: a write the lost worker already applied is below
    /// its zone's write pointer now, and would be refused: given the
    /// replacement's write pointers ([`WorkerEnds::zones`]), such writes
    /// complete at once instead. A resubmitted zone append cannot be
    /// told from a new one: it appends again, and the guest is told the
    /// second place (the first copy stays in the zone, unreferenced, and
    /// takes zone capacity). Known limit; a fix needs an idempotency key
    /// carried in the ring entry and remembered by the zoned node.
    pub(super) fn replace_worker(&mut self, ends: WorkerEnds, epoll: &Epoll) {
        let writes = self
            .pending
            .iter()
            .flatten()
            .filter(|p| p.req.op == Op::Write)
            .map(|p| p.req.offset);
        let zones = ends.zones.as_ref().map(|o| o.map(writes));
        let _ = epoll.delete(&self.s.worker_call);
        self.s.requests = ends.requests;
        self.s.completions = ends.completions;
        self.s.worker_kick = ends.worker_kick;
        self.s.worker_call = ends.worker_call;
        if let Err(e) = epoll.add(
            &self.s.worker_call,
            EpollEvent::new(EpollFlags::EPOLLIN, EV_WORKER),
        ) {
            tracing::error!(queue = self.s.index, "epoll: {e}");
        }
        let mut resubmitted = 0;
        let mut applied = 0;
        let mut failed = 0;
        let mem = Arc::clone(&self.s.mem.lock().unwrap_or_else(|p| p.into_inner()));
        self.tables.see(&mem, self.inflight);
        // In the order they were first submitted (not by head): a zoned
        // device takes writes to a zone only in write-pointer order.
        let mut order: Vec<(u64, usize)> = (0..self.pending.len())
            .filter_map(|h| self.pending[h].map(|p| (p.seq, h)))
            .collect();
        order.sort_unstable();
        for (_, head) in order {
            let Some(p) = self.pending[head] else {
                continue;
            };
            let done = p.req.op == Op::Write
                && zones
                    .as_ref()
                    .is_some_and(|z| z.written(p.req.offset, p.req.len));
            if done {
                self.pending[head] = None;
                self.inflight -= 1;
                if let Some(kind) = p.kind {
                    let ns = p.start.elapsed().as_nanos() as u64;
                    self.s.stats.finished(kind, p.bytes, true, ns);
                }
                self.complete(
                    mem.guest_memory(),
                    head as u16,
                    p.status,
                    Status::Ok,
                    p.used_len,
                );
                applied += 1;
                continue;
            }
            // Memory-table changes since it was translated: translate
            // again; its memory may have left the table meanwhile.
            let translated = p.epoch == self.tables.epoch || self.translate_again(head, p.epoch);
            let pushed = translated
                && match self.s.requests.push(&p.req, &self.saved[head]) {
                    Ok(()) => true,
                    // The ring holds a whole virtqueue: only more segments
                    // than a ring entry takes (after translating again).
                    Err(e) => {
                        tracing::error!(queue = self.s.index, head, "resubmit: {e}");
                        false
                    }
                };
            if pushed {
                resubmitted += 1;
                continue;
            }
            self.pending[head] = None;
            self.inflight -= 1;
            if let Some(kind) = p.kind {
                self.s.stats.finished(kind, p.bytes, false, 0);
            }
            let status = request::status_of(-libc::EFAULT);
            self.complete(mem.guest_memory(), head as u16, p.status, status, 1);
            failed += 1;
        }
        if resubmitted > 0 {
            self.s.requests.publish();
            self.s.worker_kick.ring();
        }
        if applied + failed > 0 {
            self.notify_guest(mem.guest_memory());
        }
        self.last_progress = Instant::now();
        self.heartbeat_sampled = self.last_progress;
        self.hang_reported = false;
        self.distrusted = false;
        tracing::info!(
            queue = self.s.index,
            resubmitted,
            applied,
            failed,
            "queue moved to a replacement worker"
        );
    }

    /// Translates the segments of the request on `head`, made against the
    /// table of `epoch`, into the current table. False if they are not all
    /// in it (or that table is unknown, which cannot happen).
    pub(super) fn translate_again(&mut self, head: usize, epoch: u32) -> bool {
        let Some(old) = self.tables.of(epoch) else {
            return false;
        };
        self.segs.clear();
        if !self
            .tables
            .current
            .translate_from(old, &self.saved[head], &mut self.segs)
        {
            return false;
        }
        let saved = &mut self.saved[head];
        saved.clear();
        saved.extend_from_slice(&self.segs);
        true
    }

    /// Processes again the heads a previous frontend took from the avail
    /// ring and never completed (found in the inflight region), oldest
    /// first, as if just popped.
    pub(super) fn resubmit_recovered(&mut self, heads: &[u16]) {
        if heads.is_empty() {
            return;
        }
        let mem = Arc::clone(&self.s.mem.lock().unwrap_or_else(|p| p.into_inner()));
        let gm = mem.guest_memory();
        let (table, size) = (self.s.queue.desc_table(), self.s.queue.size());
        if let Some(oracle) = self.s.recovery_zones.take() {
            let mut writes = Vec::new();
            for &head in heads {
                if request::walk_chain(gm, table, size, head, &mut self.descs).is_ok() {
                    if let Some(header) = request::peek_header(&self.descs, gm)
                        .filter(|h| h.request_type() == Some(RequestType::Out))
                    {
                        writes.extend(header.sector().checked_mul(512));
                    }
                }
            }
            if !writes.is_empty() {
                self.already_written = Some(oracle.map(writes));
            }
        }
        let mut used = false;
        for &head in heads {
            if let Err(e) = request::walk_chain(gm, table, size, head, &mut self.descs) {
                self.log_guest_error(format_args!("in-flight chain {head}: {e}"));
                self.put_used(gm, head, 0);
                used = true;
                continue;
            }
            used |= self.handle_chain(head, &mem);
        }
        self.already_written = None;
        if self.s.requests.publish() {
            self.s.worker_kick.ring();
        }
        if used {
            self.notify_guest(gm);
        }
        tracing::info!(
            queue = self.s.index,
            requests = heads.len(),
            "resubmitted requests left in flight by the previous frontend"
        );
    }
}
