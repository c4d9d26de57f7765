//! Requests: submitting chains, waiting for them, and the one-call
//! helpers for every request kind (zoned ones included).

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_ZONED;

use super::VhostUserBlk;
use crate::error::Error;
use crate::queue::SplitQueue;
use crate::request::{Chain, Completion, RequestSpec, Token, ID_BYTES, S_OK};
use crate::zone::{self, ZoneDescriptor};

impl VhostUserBlk {
    // ----- requests -----

    pub(super) fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    /// Submits a well-formed request; see [`VhostUserBlk::wait`].
    pub fn submit(&mut self, queue: u16, spec: &RequestSpec) -> Result<Token, Error> {
        self.submit_chain(queue, &spec.chain())
    }

    /// Lays out `chain` (buffers in guest RAM, descriptors in the table or
    /// an indirect table), makes it available and kicks.
    pub fn submit_chain(&mut self, queue: u16, chain: &Chain) -> Result<Token, Error> {
        let token = self.token();
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.submit(&mut self.ram, chain, token)?;
        q.kick()?;
        Ok(token)
    }

    /// Collects used elements without waiting: every completion collected
    /// so far and not claimed by [`VhostUserBlk::wait`], in used-ring order.
    pub fn poll_used(&mut self, queue: u16) -> Result<Vec<Completion>, Error> {
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.clear_call();
        q.collect(&mut self.ram)?;
        Ok(q.take_all())
    }

    /// Waits (at most `timeout`) for at least one used element; returns
    /// what [`VhostUserBlk::poll_used`] would (maybe nothing).
    pub fn wait_used(&mut self, queue: u16, timeout: Duration) -> Result<Vec<Completion>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.poll_used(queue)?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            self.sleep_for_call(queue, deadline)?;
        }
    }

    /// Waits (at most `timeout`) for the completion of `token`; other
    /// completions seen meanwhile stay for later calls.
    pub fn wait(
        &mut self,
        queue: u16,
        token: Token,
        timeout: Duration,
    ) -> Result<Completion, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let q = self
                    .queues
                    .get_mut(queue as usize)
                    .ok_or(Error::NoSuchQueue(queue))?;
                q.clear_call();
                q.collect(&mut self.ram)?;
                if let Some(c) = q.take(token) {
                    return Ok(c);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("the completion of {token:?} on queue {queue}"),
                    timeout,
                });
            }
            self.sleep_for_call(queue, deadline)?;
        }
    }

    /// Sleeps until the queue's call eventfd fires, 20 ms pass or the
    /// deadline comes.
    fn sleep_for_call(&self, queue: u16, deadline: Instant) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(20) as u16;
        let mut fds = [PollFd::new(q.call.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(io::Error::from(e).into()),
        }
    }

    /// Submits and waits ([`crate::Options::timeout`]) for the completion.
    pub fn run(&mut self, queue: u16, spec: &RequestSpec) -> Result<Completion, Error> {
        let t = self.submit(queue, spec)?;
        self.wait(queue, t, self.opts.timeout)
    }

    /// Submits a chain and waits ([`crate::Options::timeout`]) for its completion.
    pub fn run_chain(&mut self, queue: u16, chain: &Chain) -> Result<Completion, Error> {
        let t = self.submit_chain(queue, chain)?;
        self.wait(queue, t, self.opts.timeout)
    }

    fn run_ok(&mut self, queue: u16, spec: &RequestSpec) -> Result<Completion, Error> {
        let c = self.run(queue, spec)?;
        match c.status {
            Some(S_OK) => Ok(c),
            Some(s) => Err(Error::Status(s)),
            None => Err(Error::Status(crate::request::STATUS_UNTOUCHED)),
        }
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, queue: u16, sector: u64, len: u32) -> Result<Vec<u8>, Error> {
        Ok(self.run_ok(queue, &RequestSpec::read(sector, len))?.data)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, queue: u16, sector: u64, data: &[u8]) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::write(sector, data))
            .map(|_| ())
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self, queue: u16) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::flush()).map(|_| ())
    }

    /// Discards `num` sectors from `sector`.
    pub fn discard(&mut self, queue: u16, sector: u64, num: u32) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::discard(sector, num))
            .map(|_| ())
    }

    /// Zeroes `num` sectors from `sector`; `unmap` lets the device
    /// deallocate them.
    pub fn write_zeroes(
        &mut self,
        queue: u16,
        sector: u64,
        num: u32,
        unmap: bool,
    ) -> Result<(), Error> {
        self.run_ok(queue, &RequestSpec::write_zeroes(sector, num, unmap))
            .map(|_| ())
    }

    /// The device's 20-byte serial (GET_ID).
    pub fn get_id(&mut self, queue: u16) -> Result<[u8; ID_BYTES], Error> {
        let c = self.run_ok(queue, &RequestSpec::get_id())?;
        let mut id = [0u8; ID_BYTES];
        let n = c.data.len().min(ID_BYTES);
        id[..n].copy_from_slice(&c.data[..n]);
        Ok(id)
    }

    // ----- zoned devices -----

    fn need_zoned(&self) -> Result<(), Error> {
        if self.has_feature(VIRTIO_BLK_F_ZONED) {
            Ok(())
        } else {
            Err(Error::Unsupported("VIRTIO_BLK_F_ZONED"))
        }
    }

    /// Reports at most `max_zones` (at least 1) zones from the one holding
    /// `sector`: one ZONE_REPORT request with room for that many
    /// descriptors; the device may return fewer (the last zones).
    /// Sectors are 512 bytes. Needs ZONED negotiated
    /// ([`Error::Unsupported`] otherwise); a refusal is
    /// [`Error::Status`].
    pub fn zone_report(
        &mut self,
        queue: u16,
        sector: u64,
        max_zones: u32,
    ) -> Result<Vec<ZoneDescriptor>, Error> {
        self.need_zoned()?;
        if max_zones == 0 {
            return Err(Error::Invalid("a zone report needs room for a zone".into()));
        }
        let c = self.run_ok(queue, &RequestSpec::zone_report(sector, max_zones))?;
        // Only what the device says it wrote (used_len includes the status).
        let n = (c.used_len as usize).saturating_sub(1).min(c.data.len());
        zone::parse_report(&c.data[..n])
    }

    fn zone_mgmt(&mut self, queue: u16, req_type: u32, sector: u64) -> Result<(), Error> {
        self.need_zoned()?;
        self.run_ok(queue, &RequestSpec::zone_mgmt(req_type, sector))
            .map(|_| ())
    }

    /// Opens the zone starting at `sector` explicitly (ZONE_OPEN).
    pub fn zone_open(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_OPEN, sector)
    }

    /// Closes the zone starting at `sector` (ZONE_CLOSE).
    pub fn zone_close(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_CLOSE, sector)
    }

    /// Makes the zone starting at `sector` full (ZONE_FINISH).
    pub fn zone_finish(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_FINISH, sector)
    }

    /// Empties the zone starting at `sector` (ZONE_RESET).
    pub fn zone_reset(&mut self, queue: u16, sector: u64) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_RESET, sector)
    }

    /// Empties every sequential zone (ZONE_RESET_ALL).
    pub fn zone_reset_all(&mut self, queue: u16) -> Result<(), Error> {
        self.zone_mgmt(queue, zone::T_ZONE_RESET_ALL, 0)
    }

    /// Appends `data` to the zone starting at `sector` (ZONE_APPEND) and
    /// returns the sector where the device put it.
    pub fn zone_append(&mut self, queue: u16, sector: u64, data: &[u8]) -> Result<u64, Error> {
        self.need_zoned()?;
        let c = self.run_ok(queue, &RequestSpec::zone_append(sector, data))?;
        zone::parse_append_sector(&c.data)
    }

    /// Chains in flight on `queue` (made available, not yet used).
    pub fn in_flight(&self, queue: u16) -> usize {
        self.queues
            .get(queue as usize)
            .map_or(0, SplitQueue::in_flight)
    }
}
