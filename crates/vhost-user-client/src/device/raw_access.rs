//! Raw ring access for hostile tests: any descriptor, any head, any
//! index, and guest memory by address.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::Frontend;

use super::{ProtocolFeatures, VhostUserBlk};
use crate::error::Error;
use crate::guest::GuestRam;
use crate::layout::{Descriptor, RingLayout};
use crate::raw::{self, MemRegion, RawMessage, RawOutcome, RawReply};
use crate::request::Token;

impl VhostUserBlk {
    // ----- raw ring access (hostile tests) -----

    /// Where `queue`'s rings lie in guest memory.
    pub fn ring_layout(&self, queue: u16) -> Result<RingLayout, Error> {
        Ok(self.queue_ref(queue)?.layout)
    }

    /// Takes `n` descriptor indices off the free list, for chains written
    /// by hand with [`VhostUserBlk::write_desc`]. Test-only.
    pub fn alloc_descs(&mut self, queue: u16, n: usize) -> Result<Vec<u16>, Error> {
        self.queue(queue)?.alloc_descs(n)
    }

    /// Returns descriptor indices to the free list. Test-only.
    pub fn free_descs(&mut self, queue: u16, descs: &[u16]) -> Result<(), Error> {
        self.queue(queue)?.free_descs(descs);
        Ok(())
    }

    /// Writes `d` into slot `index` (< queue size) of the descriptor table,
    /// as is. Test-only.
    pub fn write_desc(&mut self, queue: u16, index: u16, d: Descriptor) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        if index >= q.layout.size {
            return Err(Error::Invalid(format!(
                "descriptor {index} is outside the table of {}",
                q.layout.size
            )));
        }
        q.write_desc(&self.ram, index, &d)
    }

    /// Reads slot `index` of the descriptor table.
    pub fn read_desc(&self, queue: u16, index: u16) -> Result<Descriptor, Error> {
        self.queue_ref(queue)?.read_desc(&self.ram, index)
    }

    /// Makes `head` (any value, in range or not) available and kicks.
    /// When `head` is in range and not in flight, it is tracked under the
    /// returned token and `status` (a guest address) is read back on
    /// completion. Test-only.
    pub fn publish_head(
        &mut self,
        queue: u16,
        head: u16,
        status: Option<u64>,
    ) -> Result<Token, Error> {
        let token = self.token();
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.track_raw(head, token, status);
        q.publish(&self.ram, head)?;
        q.kick()?;
        Ok(token)
    }

    /// Puts `head` (any value) in the next avail slot without publishing
    /// the avail index: several heads pushed this way reach the device at
    /// once with [`VhostUserBlk::restore_avail_idx`]. Tracking as for
    /// [`VhostUserBlk::publish_head`]. Test-only.
    pub fn push_avail(
        &mut self,
        queue: u16,
        head: u16,
        status: Option<u64>,
    ) -> Result<Token, Error> {
        let token = self.token();
        let q = self
            .queues
            .get_mut(queue as usize)
            .ok_or(Error::NoSuchQueue(queue))?;
        q.track_raw(head, token, status);
        q.push(&self.ram, head)?;
        Ok(token)
    }

    /// The avail index the driver will publish next (its shadow).
    pub fn avail_idx(&self, queue: u16) -> Result<u16, Error> {
        Ok(self.queue_ref(queue)?.avail_idx)
    }

    /// Writes `idx` into the avail ring's index field (the shadow stays)
    /// and kicks. Test-only: see [`VhostUserBlk::restore_avail_idx`].
    pub fn set_avail_idx(&mut self, queue: u16, idx: u16) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        q.store_avail_idx(&self.ram, idx)?;
        q.kick()
    }

    /// Writes the driver's shadow avail index into the avail ring (undoing
    /// [`VhostUserBlk::set_avail_idx`], publishing
    /// [`VhostUserBlk::push_avail`]) and kicks.
    pub fn restore_avail_idx(&mut self, queue: u16) -> Result<(), Error> {
        let q = self.queue_ref(queue)?;
        q.store_avail_idx(&self.ram, q.avail_idx)?;
        q.kick()
    }

    /// The used index as the device last wrote it.
    pub fn used_idx(&self, queue: u16) -> Result<u16, Error> {
        self.queue_ref(queue)?.used_idx(&self.ram)
    }

    /// Kicks `queue`.
    pub fn kick(&self, queue: u16) -> Result<(), Error> {
        self.queue_ref(queue)?.kick()
    }

    /// Allocates `len` bytes of guest RAM (zeroed contents not promised).
    pub fn alloc(&mut self, len: u64) -> Result<u64, Error> {
        self.ram.alloc(len)
    }

    /// Allocates a buffer holding `data`.
    pub fn alloc_with(&mut self, data: &[u8]) -> Result<u64, Error> {
        self.ram.alloc_with(data)
    }

    /// Frees a buffer from [`VhostUserBlk::alloc`].
    pub fn free(&mut self, addr: u64) -> bool {
        self.ram.alloc.free(addr)
    }

    /// Allocates a table holding `descs` (for indirect descriptors) and
    /// returns its guest address.
    pub fn alloc_table(&mut self, descs: &[Descriptor]) -> Result<u64, Error> {
        self.ram.alloc_with(&Descriptor::table_bytes(descs))
    }

    /// Writes guest RAM.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.ram.ram.write(addr, data)
    }

    /// Reads guest RAM.
    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>, Error> {
        self.ram.ram.read(addr, len)
    }

    /// Guest RAM.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram.ram
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.ram.ram.size()
    }

    /// The VMM virtual address of guest address `gpa`, as vring addresses
    /// are given.
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.ram.ram.user_addr(gpa)
    }

    /// Guest RAM as SET_MEM_TABLE described it (one region, the memfd).
    pub fn mem_region(&self) -> MemRegion {
        MemRegion {
            gpa: 0,
            size: self.ram.ram.size(),
            user_addr: self.ram.ram.user_addr(0),
            mmap_offset: 0,
        }
    }

    // ----- raw vhost-user access (hostile tests) -----

    /// The vhost crate's front-end on the open connection, for messages
    /// the driver does not send itself. Test-only.
    pub fn frontend(&mut self) -> Result<&mut Frontend, Error> {
        Ok(&mut self.conn()?.frontend)
    }

    /// The connection's socket.
    pub fn socket(&self) -> Result<&UnixStream, Error> {
        self.conn
            .as_ref()
            .map(|c| &c.sock)
            .ok_or(Error::NotConnected)
    }

    /// Sends `msg` as is. Test-only.
    pub fn send_raw(&mut self, msg: &RawMessage) -> Result<(), Error> {
        raw::send(self.socket()?, msg)?;
        Ok(())
    }

    /// Sends arbitrary bytes (with `fds`) on the connection. Test-only.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        raw::send_bytes(self.socket()?, bytes, &fds)?;
        Ok(())
    }

    /// Closes our sending side (the device sees end of stream after what
    /// was sent: a truncated message stays truncated).
    pub fn shutdown_write(&mut self) -> Result<(), Error> {
        self.socket()?.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    }

    /// Reads one message from the device (`Ok(None)` on timeout).
    pub fn recv_raw(&mut self, timeout: Duration) -> Result<Option<RawReply>, Error> {
        raw::recv(self.socket()?, timeout).map_err(|_| Error::Closed)
    }

    /// Waits (at most `timeout`) for the device to close the connection.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        match self.socket() {
            Ok(s) => raw::wait_closed(s, timeout),
            Err(_) => true,
        }
    }

    /// Sends `msg` and reports how the device took it: the reply (a
    /// REPLY_ACK when the message asks for one and REPLY_ACK was
    /// negotiated, or a GET_* answer) and whether the device then closed
    /// the connection (see [`raw::request`]). Test-only.
    pub fn raw_request(&mut self, msg: &RawMessage) -> Result<RawOutcome, Error> {
        let reply_ack = self
            .protocol_features()
            .contains(ProtocolFeatures::REPLY_ACK);
        Ok(raw::request(
            self.socket()?,
            msg,
            reply_ack,
            self.opts.timeout,
        )?)
    }
}
