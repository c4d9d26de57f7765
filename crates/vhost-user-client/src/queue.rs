//! The driver side of one split virtqueue: descriptor allocation, the
//! avail ring we produce, the used ring we consume.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::Error;
use crate::guest::Ram;
use crate::layout::{Descriptor, RingLayout, DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use crate::request::{Buf, Chain, Completion, Target, Token};

fn new_eventfd() -> Result<EventFd, Error> {
    Ok(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(std::io::Error::from)?,
    )
}

/// What the driver remembers about a chain in flight.
#[derive(Debug, Default)]
struct InFlight {
    token: Option<Token>,
    /// Ring descriptors to return to the free list.
    descs: Vec<u16>,
    /// Guest buffers to free.
    bufs: Vec<u64>,
    /// Address of the status byte.
    status: Option<u64>,
    /// Writable data parts to read back: (address, length).
    data: Vec<(u64, u32)>,
}

/// One virtqueue, driver side.
#[derive(Debug)]
pub(crate) struct SplitQueue {
    pub(crate) layout: RingLayout,
    /// Free descriptor indices (a stack).
    free: Vec<u16>,
    /// The next avail index we publish (our shadow of `avail.idx`).
    pub(crate) avail_idx: u16,
    /// The next used element to consume.
    pub(crate) last_used: u16,
    /// By head index.
    inflight: Vec<Option<InFlight>>,
    /// Collected, not yet claimed by `wait`.
    done: VecDeque<Completion>,
    pub(crate) kick: EventFd,
    pub(crate) call: EventFd,
    event_idx: bool,
}

impl SplitQueue {
    /// A queue whose rings lie at `layout` (zeroed guest memory).
    pub(crate) fn new(layout: RingLayout, event_idx: bool) -> Result<Self, Error> {
        let n = layout.size;
        Ok(SplitQueue {
            layout,
            free: (0..n).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            inflight: (0..n).map(|_| None).collect(),
            done: VecDeque::new(),
            kick: new_eventfd()?,
            call: new_eventfd()?,
            event_idx,
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.inflight.iter().filter(|s| s.is_some()).count()
    }

    pub(crate) fn alloc_descs(&mut self, n: usize) -> Result<Vec<u16>, Error> {
        if self.free.len() < n {
            return Err(Error::QueueFull {
                wanted: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut v = self.free.split_off(at);
        v.reverse();
        Ok(v)
    }

    pub(crate) fn free_descs(&mut self, descs: &[u16]) {
        for &d in descs {
            if d < self.layout.size && !self.free.contains(&d) {
                self.free.push(d);
            }
        }
    }

    pub(crate) fn write_desc(&self, ram: &Ram, index: u16, d: &Descriptor) -> Result<(), Error> {
        ram.ram.write(self.layout.desc_addr(index), &d.to_bytes())
    }

    pub(crate) fn read_desc(&self, ram: &Ram, index: u16) -> Result<Descriptor, Error> {
        let b = ram
            .ram
            .read(self.layout.desc_addr(index), DESC_SIZE as usize)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(&b);
        Ok(Descriptor::from_bytes(&a))
    }

    /// Lays out `chain` in guest memory and the descriptor table, and
    /// publishes it. On error nothing is published and everything
    /// allocated is released.
    pub(crate) fn submit(
        &mut self,
        ram: &mut Ram,
        chain: &Chain,
        token: Token,
    ) -> Result<u16, Error> {
        let mut fl = InFlight {
            token: Some(token),
            ..InFlight::default()
        };
        match self.lay_out(ram, chain, &mut fl) {
            Ok(head) => {
                self.track(head, fl);
                self.publish(ram, head)?;
                Ok(head)
            }
            Err(e) => {
                for b in &fl.bufs {
                    ram.alloc.free(*b);
                }
                self.free_descs(&fl.descs);
                Err(e)
            }
        }
    }

    fn lay_out(&mut self, ram: &mut Ram, chain: &Chain, fl: &mut InFlight) -> Result<u16, Error> {
        if chain.parts.is_empty() {
            return Err(Error::Invalid("a chain needs at least one part".into()));
        }
        // Buffers first.
        let mut addrs = Vec::with_capacity(chain.parts.len());
        for p in &chain.parts {
            let (addr, len) = match &p.buf {
                Buf::Bytes(b) => {
                    let a = ram.alloc_with(b)?;
                    fl.bufs.push(a);
                    (a, b.len() as u32)
                }
                Buf::At { addr, len } => (*addr, *len),
            };
            if matches!(p.buf, Buf::Bytes(_)) {
                if p.is_status && fl.status.is_none() {
                    fl.status = Some(addr);
                } else if p.writable && !p.is_status {
                    fl.data.push((addr, len));
                }
            }
            addrs.push((addr, len));
        }
        // Descriptor indices: ring slots, or positions in an indirect table.
        let n = chain.parts.len();
        let indices: Vec<u16> = if chain.indirect {
            (0..n as u16).collect()
        } else {
            let d = self.alloc_descs(n)?;
            fl.descs.extend_from_slice(&d);
            d
        };
        let mut descs: Vec<Descriptor> = chain
            .parts
            .iter()
            .zip(&addrs)
            .enumerate()
            .map(|(i, (p, &(addr, len)))| {
                let mut flags = p.flags();
                let mut next = 0;
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT;
                    next = indices[i + 1];
                }
                Descriptor::new(addr, len, flags, next)
            })
            .collect();
        for &(from, to) in &chain.links {
            let Some(d) = descs.get_mut(from) else {
                return Err(Error::Invalid(format!(
                    "link from part {from}: no such part"
                )));
            };
            d.flags |= VRING_DESC_F_NEXT;
            d.next = match to {
                Target::Part(p) => *indices
                    .get(p)
                    .ok_or_else(|| Error::Invalid(format!("link to part {p}: no such part")))?,
                Target::Index(i) => i,
            };
        }
        if chain.indirect {
            let table = Descriptor::table_bytes(&descs);
            let addr = ram.alloc_with(&table)?;
            fl.bufs.push(addr);
            let head = self.alloc_descs(1)?[0];
            fl.descs.push(head);
            self.write_desc(
                ram,
                head,
                &Descriptor::new(addr, table.len() as u32, VRING_DESC_F_INDIRECT, 0),
            )?;
            Ok(head)
        } else {
            for (i, d) in indices.iter().zip(&descs) {
                self.write_desc(ram, *i, d)?;
            }
            Ok(indices[0])
        }
    }

    fn track(&mut self, head: u16, fl: InFlight) {
        if let Some(slot) = self.inflight.get_mut(head as usize) {
            if slot.is_none() {
                *slot = Some(fl);
            }
        }
    }

    /// Registers `head` as in flight with a token (if its slot is free) so
    /// its completion is recognised; for chains the test wrote itself.
    pub(crate) fn track_raw(&mut self, head: u16, token: Token, status: Option<u64>) -> bool {
        match self.inflight.get_mut(head as usize) {
            Some(slot) if slot.is_none() => {
                *slot = Some(InFlight {
                    token: Some(token),
                    status,
                    ..InFlight::default()
                });
                true
            }
            _ => false,
        }
    }

    /// Puts `head` in the next avail slot and publishes it. Does not kick.
    pub(crate) fn publish(&mut self, ram: &Ram, head: u16) -> Result<(), Error> {
        self.push(ram, head)?;
        self.store_avail_idx(ram, self.avail_idx)
    }

    /// Puts `head` in the next avail slot without publishing the index.
    pub(crate) fn push(&mut self, ram: &Ram, head: u16) -> Result<(), Error> {
        let l = self.layout;
        ram.ram
            .store_u16(l.avail_slot_addr(self.avail_idx), head, Ordering::Relaxed)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Writes `idx` as the avail index the device sees (our shadow stays).
    pub(crate) fn store_avail_idx(&self, ram: &Ram, idx: u16) -> Result<(), Error> {
        // Slots before the index (virtio 2.7.13.3.1).
        fence(Ordering::Release);
        ram.ram
            .store_u16(self.layout.avail_idx_addr(), idx, Ordering::Release)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn kick(&self) -> Result<(), Error> {
        self.kick.write(1).map_err(std::io::Error::from)?;
        Ok(())
    }

    /// The device's used index.
    pub(crate) fn used_idx(&self, ram: &Ram) -> Result<u16, Error> {
        ram.ram
            .load_u16(self.layout.used_idx_addr(), Ordering::Acquire)
    }

    /// Moves every new used element into `done`.
    pub(crate) fn collect(&mut self, ram: &mut Ram) -> Result<usize, Error> {
        let used = self.used_idx(ram)?;
        let mut n = 0;
        while self.last_used != used {
            let at = self.layout.used_elem_addr(self.last_used);
            let b = ram.ram.read(at, 8)?;
            let head = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let used_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
            let fl = usize::try_from(head)
                .ok()
                .and_then(|h| self.inflight.get_mut(h))
                .and_then(Option::take);
            let c = match fl {
                Some(fl) => {
                    let status = match fl.status {
                        Some(a) => Some(ram.ram.read(a, 1)?[0]),
                        None => None,
                    };
                    let mut data = Vec::new();
                    for &(a, len) in &fl.data {
                        data.extend_from_slice(&ram.ram.read(a, len as usize)?);
                    }
                    for b in &fl.bufs {
                        ram.alloc.free(*b);
                    }
                    self.free_descs(&fl.descs);
                    Completion {
                        token: fl.token,
                        head,
                        used_len,
                        status,
                        data,
                    }
                }
                None => Completion {
                    token: None,
                    head,
                    used_len,
                    status: None,
                    data: Vec::new(),
                },
            };
            self.done.push_back(c);
        }
        if self.event_idx && n > 0 {
            // Ask for an interrupt at the next completion.
            ram.ram.store_u16(
                self.layout.used_event_addr(),
                self.last_used,
                Ordering::Release,
            )?;
            fence(Ordering::SeqCst);
        }
        Ok(n)
    }

    /// Takes the completion of `token` out of `done`.
    pub(crate) fn take(&mut self, token: Token) -> Option<Completion> {
        let i = self.done.iter().position(|c| c.token == Some(token))?;
        self.done.remove(i)
    }

    /// Takes every collected completion.
    pub(crate) fn take_all(&mut self) -> Vec<Completion> {
        self.done.drain(..).collect()
    }

    /// Clears the call eventfd (non-blocking).
    pub(crate) fn clear_call(&self) {
        let _ = self.call.read();
    }
}

#[cfg(test)]
mod tests {
    //! The driver's rings, read by rust-vmm's device-side virtqueue.
    use super::*;
    use crate::alloc::Allocator;
    use crate::guest::GuestRam;
    use crate::request::{Part, RequestSpec, STATUS_UNTOUCHED};
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    fn setup(size: u16) -> (Ram, SplitQueue, Queue) {
        let ram = GuestRam::new(1 << 20).unwrap();
        let layout = RingLayout::at(0x1000, size).unwrap();
        let alloc = Allocator::new(0x10000, ram.size());
        let q = SplitQueue::new(layout, false).unwrap();
        let mut dev = Queue::new(size).unwrap();
        dev.set_size(size);
        dev.set_desc_table_address(Some(layout.desc as u32), Some(0));
        dev.set_avail_ring_address(Some(layout.avail as u32), Some(0));
        dev.set_used_ring_address(Some(layout.used as u32), Some(0));
        dev.set_ready(true);
        let ram = Ram { ram, alloc };
        assert!(dev.is_valid(&ram.ram.mem));
        (ram, q, dev)
    }

    /// (address, length, device-writable) of a descriptor.
    type Seen = (u64, u32, bool);

    /// Pops one chain: its head and descriptors.
    fn pop(ram: &Ram, dev: &mut Queue) -> Option<(u16, Vec<Seen>)> {
        let chain = dev.iter(&ram.ram.mem).unwrap().next()?;
        let head = chain.head_index();
        let descs = chain
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        Some((head, descs))
    }

    #[test]
    fn device_sees_the_chain_and_driver_sees_the_completion() {
        let (mut ram, mut q, mut dev) = setup(16);
        let t = Token(1);
        q.submit(&mut ram, &RequestSpec::read(8, 4096).chain(), t)
            .unwrap();
        let (head, descs) = pop(&ram, &mut dev).unwrap();
        assert_eq!(descs.len(), 3);
        assert_eq!((descs[0].1, descs[0].2), (16, false));
        assert_eq!((descs[1].1, descs[1].2), (4096, true));
        assert_eq!((descs[2].1, descs[2].2), (1, true));
        let hdr = ram.ram.read(descs[0].0, 16).unwrap();
        assert_eq!(hdr, RequestSpec::read(8, 4096).header().to_vec());
        assert_eq!(ram.ram.read(descs[2].0, 1).unwrap(), vec![STATUS_UNTOUCHED]);
        // The device fills the buffer, writes OK and returns the chain.
        ram.ram.write(descs[1].0, &[0x5a; 4096]).unwrap();
        ram.ram.write(descs[2].0, &[0]).unwrap();
        dev.add_used(&ram.ram.mem, head, 4097).unwrap();
        assert_eq!(q.collect(&mut ram).unwrap(), 1);
        let c = q.take(t).unwrap();
        assert_eq!((c.head, c.used_len, c.status), (head as u32, 4097, Some(0)));
        assert_eq!(c.data, vec![0x5a; 4096]);
        // Everything went back to the free lists.
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free.len(), 16);
        assert_eq!(ram.alloc.live(), 0);
    }

    #[test]
    fn indices_wrap_around_the_ring() {
        let (mut ram, mut q, mut dev) = setup(4);
        for i in 0..40u64 {
            let t = Token(i);
            q.submit(&mut ram, &RequestSpec::flush().chain(), t)
                .unwrap();
            let (head, descs) = pop(&ram, &mut dev).unwrap();
            assert_eq!(descs.len(), 2);
            ram.ram.write(descs[1].0, &[0]).unwrap();
            dev.add_used(&ram.ram.mem, head, 1).unwrap();
            q.collect(&mut ram).unwrap();
            assert!(q.take(t).unwrap().status == Some(0));
        }
        assert_eq!(q.avail_idx, 40);
        assert_eq!(q.last_used, 40);
    }

    #[test]
    fn indirect_chains_use_one_ring_descriptor() {
        let (mut ram, mut q, mut dev) = setup(8);
        let chain = RequestSpec::write(0, &[1; 1024]).chain().indirect();
        q.submit(&mut ram, &chain, Token(7)).unwrap();
        assert_eq!(q.free.len(), 7);
        let (_, descs) = pop(&ram, &mut dev).unwrap();
        assert_eq!(
            descs.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>(),
            vec![(16, false), (1024, false), (1, true)]
        );
    }

    #[test]
    fn links_make_loops_the_device_cuts_short() {
        let (mut ram, mut q, mut dev) = setup(8);
        let chain = RequestSpec::read(0, 512).chain().looped();
        q.submit(&mut ram, &chain, Token(1)).unwrap();
        let (_, descs) = pop(&ram, &mut dev).unwrap();
        // The device follows the loop until its budget (the queue size) ends.
        assert_eq!(descs.len(), 8);
        let raw = Chain::new()
            .part(Part::at(0x1234, 16, false))
            .link(0, Target::Index(200));
        q.submit(&mut ram, &raw, Token(2)).unwrap();
        let (_, descs) = pop(&ram, &mut dev).unwrap();
        assert_eq!(descs, vec![(0x1234, 16, false)]);
    }

    #[test]
    fn failed_submissions_release_what_they_took() {
        let (mut ram, mut q, _dev) = setup(2);
        let err = q
            .submit(&mut ram, &RequestSpec::read(0, 512).chain(), Token(1))
            .unwrap_err();
        assert!(
            matches!(err, Error::QueueFull { wanted: 3, free: 2 }),
            "{err}"
        );
        assert_eq!(q.free.len(), 2);
        assert_eq!(ram.alloc.live(), 0);
        assert_eq!(q.avail_idx, 0);
    }

    #[test]
    fn unknown_used_ids_are_reported_without_a_token() {
        let (mut ram, mut q, _dev) = setup(4);
        // A device writing an element for a head never made available.
        let l = q.layout;
        ram.ram
            .mem
            .write_obj(3u32.to_le(), GuestAddress(l.used_elem_addr(0)))
            .unwrap();
        ram.ram
            .store_u16(l.used_idx_addr(), 1, Ordering::Release)
            .unwrap();
        q.collect(&mut ram).unwrap();
        let all = q.take_all();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].token, all[0].head), (None, 3));
    }
}
