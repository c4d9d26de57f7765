//! The guest side of a queue thread: descriptor chains in, status bytes
//! and used-ring entries out.

use std::sync::Arc;
use std::time::Instant;

use blkmesh_ipc::ring::Op;
use blkmesh_stats::OpKind;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{kind_of, signal_eventfd, write_ranges, Pending, Vring};
use crate::memory::MemTable;
use crate::request::{self, Action, Desc, RequestType, Status};

impl Vring {
    /// Pops every available chain; returns whether any was found.
    pub(super) fn take_guest_requests(&mut self, mem: &Arc<MemTable>) -> bool {
        let gm = mem.guest_memory();
        let mut found = false;
        let mut used = false;
        if self.guest_notify {
            let disabled = self.s.queue.disable_notification(gm);
            self.log_used_ring();
            if let Err(e) = disabled {
                self.log_guest_error(format_args!("avail ring: {e}"));
                return found;
            }
            self.guest_notify = false;
        }
        if !self.avail_index_sane(gm) {
            return found;
        }
        {
            while let Some(chain) = self.s.queue.pop_descriptor_chain(gm) {
                found = true;
                let head = chain.head_index();
                if let Some(t) = &self.tracker {
                    t.taken(head, self.counter);
                    self.counter = self.counter.wrapping_add(1);
                }
                self.descs.clear();
                for d in chain {
                    self.descs.push(Desc {
                        addr: d.addr().0,
                        len: d.len(),
                        writable: d.is_write_only(),
                        has_next: d.has_next(),
                    });
                }
                used |= self.handle_chain(head, mem);
            }
        }
        if found && self.s.requests.publish() {
            self.s.worker_kick.ring();
        }
        if used {
            self.notify_guest(gm);
        }
        found
    }

    /// Chains the guest has made available that we have not popped, or
    /// `None` when its avail index is more than a ring ahead of us (a broken
    /// or hostile driver).
    pub(super) fn guest_pending(&self, gm: &vm_memory::GuestMemoryMmap<()>) -> Option<u16> {
        let avail = self
            .s
            .queue
            .avail_idx(gm, std::sync::atomic::Ordering::Acquire)
            .ok()?;
        let n = avail.0.wrapping_sub(self.s.queue.next_avail());
        (n <= self.s.queue.size()).then_some(n)
    }

    /// Whether the guest has made chains available that we have not popped
    /// (never for a broken avail index: that waits for the next kick).
    pub(super) fn guest_has_new(&self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        self.guest_pending(gm).is_some_and(|n| n > 0)
    }

    /// False (logged once per episode) when the avail index cannot be
    /// right; the queue then takes nothing until the guest fixes it.
    pub(super) fn avail_index_sane(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        let sane = self.guest_pending(gm).is_some();
        if !sane && !self.bad_avail {
            self.log_guest_error(format_args!(
                "avail index more than a ring ahead of the device (next {}); ignored until fixed",
                self.s.queue.next_avail()
            ));
        }
        self.bad_avail = !sane;
        sane
    }

    /// Asks the guest to kick us again (before sleeping); false if chains
    /// arrived meanwhile.
    pub(super) fn arm_guest_notifications(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) -> bool {
        self.guest_notify = true;
        let armed = self.s.queue.enable_notification(gm);
        // The avail event (or the used flags) is in the used ring.
        self.log_used_ring();
        match armed {
            // A broken avail index is not work: sleep until the next kick.
            Ok(more) => !more || !self.avail_index_sane(gm),
            Err(e) => {
                self.log_guest_error(format_args!("avail ring: {e}"));
                true
            }
        }
    }

    /// Returns true if the chain was completed at once (used ring touched).
    pub(super) fn handle_chain(&mut self, head: u16, mem: &Arc<MemTable>) -> bool {
        let gm = mem.guest_memory();
        if let Some(w) = self.writable.get_mut(head as usize) {
            // What the device may write of this chain, for the dirty log.
            w.clear();
            w.extend(
                self.descs
                    .iter()
                    .filter(|d| d.writable)
                    .map(|d| (d.addr, d.len as u64)),
            );
        }
        let status = match request::check_chain(&self.descs) {
            Ok(s) => s,
            Err(e) => {
                self.log_guest_error(format_args!("chain {head}: {e}"));
                // No status byte we may write: return the chain unused.
                self.put_used(gm, head, 0);
                return true;
            }
        };
        if self.pending.get(head as usize).is_none_or(|p| p.is_some()) {
            self.log_guest_error(format_args!("chain head {head} reused while in flight"));
            return false;
        }
        let parsed = request::parse_with_zones(
            &self.descs,
            status,
            gm,
            mem,
            &self.s.dev,
            self.s.zones.as_deref(),
            head as u32,
            &mut self.segs,
            &mut self.parts,
        );
        match parsed.action {
            Action::Complete(st) => {
                if st != Status::Ok {
                    self.log_guest_error(format_args!("chain {head}: status {}", st.byte()));
                }
                // Answered here (refused, or nothing to move): count it
                // with its kind so refusals show up as errors.
                if let Some(kind) = parsed.request_type.and_then(RequestType::op_kind) {
                    self.s.stats.started();
                    self.s.stats.finished(kind, 0, st == Status::Ok, 0);
                }
                self.complete(gm, head, parsed.status, st, parsed.used_len);
                true
            }
            Action::Submit(req)
                if req.op == Op::Write
                    && self
                        .already_written
                        .as_ref()
                        .is_some_and(|z| z.written(req.offset, req.len)) =>
            {
                // Applied before a frontend restart: below its zone's
                // write pointer, where the zone would refuse it again.
                self.s.stats.started();
                self.s.stats.finished(OpKind::Write, req.len, true, 0);
                self.complete(gm, head, parsed.status, Status::Ok, parsed.used_len);
                true
            }
            Action::Submit(req) => match self.s.requests.push(&req, &self.segs) {
                Ok(()) => {
                    let kind = kind_of(req.op);
                    if kind.is_some() {
                        self.s.stats.started();
                    }
                    if self.inflight == 0 {
                        self.last_progress = Instant::now();
                    }
                    let saved = &mut self.saved[head as usize];
                    saved.clear();
                    saved.extend_from_slice(&self.segs);
                    let append_at = &mut self.append_at[head as usize];
                    append_at.clear();
                    if req.op == Op::ZoneAppend {
                        let writable = self
                            .descs
                            .iter()
                            .filter(|d| d.writable)
                            .map(|d| (d.addr, d.len as u64));
                        request::byte_ranges(writable, 0, request::APPEND_SECTOR_BYTES, append_at);
                    }
                    self.pending[head as usize] = Some(Pending {
                        req,
                        status: parsed.status,
                        used_len: parsed.used_len,
                        kind,
                        bytes: req.len,
                        start: Instant::now(),
                        seq: self.next_seq,
                        epoch: self.tables.epoch,
                    });
                    self.next_seq += 1;
                    self.inflight += 1;
                    false
                }
                Err(e) => {
                    self.log_guest_error(format_args!("ring: {e}"));
                    self.complete(gm, head, parsed.status, request::status_of(-libc::EIO), 1);
                    true
                }
            },
        }
    }

    pub(super) fn complete(
        &mut self,
        gm: &vm_memory::GuestMemoryMmap<()>,
        head: u16,
        status: u64,
        st: Status,
        used_len: u32,
    ) {
        let written = match gm.get_slice(GuestAddress(status), 1) {
            Ok(s) => {
                s.copy_from(&[st.byte()]);
                true
            }
            Err(_) => false,
        };
        if !written {
            self.log_guest_error(format_args!("status byte of chain {head} not writable"));
        }
        // Everything the device may have written for this chain (the
        // worker's read data, a zone report, the append sector, the
        // status byte) is logged before the used entry makes it visible.
        if let Some(log) = self.s.log.active() {
            for &(at, len) in self.writable.get(head as usize).into_iter().flatten() {
                log.mark(at, len);
            }
            log.mark(status, 1);
        }
        // Without a status byte written, nothing the guest may trust was.
        self.put_used(gm, head, if written { used_len } else { 0 });
    }

    /// Puts `head` on the used ring, keeping the inflight record in step.
    pub(super) fn put_used(
        &mut self,
        gm: &vm_memory::GuestMemoryMmap<()>,
        head: u16,
        used_len: u32,
    ) {
        if let Some(t) = &self.tracker {
            t.completing(head);
        }
        if let Err(e) = self.s.queue.add_used(gm, head, used_len) {
            self.log_guest_error(format_args!("used ring: {e}"));
        }
        self.log_used_ring();
        if let Some(t) = &self.tracker {
            t.completed(head, self.s.queue.next_used());
        }
    }

    /// Marks the used ring in the dirty log: the entry and index just
    /// written, or the avail event (a few pages at most, marked whole).
    pub(super) fn log_used_ring(&self) {
        if let Some(log) = self.s.log.active() {
            let size = u64::from(self.s.queue.size());
            log.mark(self.s.queue.used_ring(), 6 + 8 * size);
        }
    }

    pub(super) fn notify_guest(&mut self, gm: &vm_memory::GuestMemoryMmap<()>) {
        match self.s.queue.needs_notification(gm) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Some(call) = &self.s.call {
                    signal_eventfd(call);
                }
            }
        }
    }

    /// Applies the worker's completions; returns whether there were any.
    /// A completion index more than a ring ahead, or a completion for a
    /// head not in flight, makes the worker distrusted: the ring is not
    /// read again (completions applied before it stand: their heads were
    /// in flight).
    pub(super) fn finish_completions(&mut self, mem: &Arc<MemTable>) -> bool {
        if self.distrusted {
            return false;
        }
        let gm = mem.guest_memory();
        let mut any = false;
        loop {
            let c = match self.s.completions.pop() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.distrust_worker(format_args!("{e}"));
                    break;
                }
            };
            let Some(p) = self.pending.get_mut(c.tag as usize).and_then(Option::take) else {
                self.distrust_worker(format_args!("completion for tag {}, not in flight", c.tag));
                break;
            };
            any = true;
            self.inflight -= 1;
            self.last_progress = Instant::now();
            self.hang_reported = false;
            let mut st = if self.s.zones.is_some() {
                request::zoned_status_of(c.result)
            } else {
                request::status_of(c.result)
            };
            let mut used = if st == Status::Ok { p.used_len } else { 1 };
            if st == Status::Ok {
                match p.req.op {
                    // What the worker wrote (it is not trusted: at most
                    // the buffer).
                    Op::ZoneReport => used = c.extra.min(p.req.len) as u32 + 1,
                    Op::ZoneAppend => {
                        let sector = (c.extra / 512).to_le_bytes();
                        let at = &self.append_at[c.tag as usize];
                        if !write_ranges(gm, at, &sector) {
                            self.log_guest_error(format_args!(
                                "append_sector of chain {} not writable",
                                c.tag
                            ));
                            st = request::status_of(-libc::EIO);
                            used = 1;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(kind) = p.kind {
                let ns = p.start.elapsed().as_nanos() as u64;
                self.s.stats.finished(kind, p.bytes, st == Status::Ok, ns);
            }
            self.complete(gm, c.tag as u16, p.status, st, used);
        }
        if !self.distrusted {
            self.s.completions.release();
        }
        if any {
            self.notify_guest(gm);
        }
        any
    }
}
