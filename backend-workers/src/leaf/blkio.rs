//! A queue's libblkio queue: the only place that turns bounce buffers and
//! guest iovecs into the raw pointers libblkio takes.

use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use blkmesh_ipc::ring::{Op, Segment, FLAG_FUA, FLAG_NO_UNMAP};

use super::types::{AttachError, BufferBits, Data, Issued, LeafCompletion, LeafRequest};
use crate::bounce::BouncePool;
use crate::errno::Errno;
use crate::graph::QueuePool;
use crate::memory::RegisteredRam;

/// Turns a request's guest segments into iovecs over this worker's mapping
/// of guest RAM (`iovs`, cleared first), checking each against the mapping;
/// returns their addresses and lengths ORed, for the alignment checks.
/// The iovecs stay valid while the request holds `ram`.
pub fn guest_iovecs(
    ram: &RegisteredRam,
    segs: &[Segment],
    iovs: &mut Vec<libc::iovec>,
) -> Result<BufferBits, Errno> {
    iovs.clear();
    let mut bits = BufferBits::default();
    for s in segs {
        let b = ram.ram().buf(s).map_err(|_| Errno::EFAULT)?;
        bits.addr |= b.as_ptr() as usize;
        bits.len |= b.len();
        iovs.push(b.iovec());
    }
    Ok(bits)
}

pub struct BlkioQueue {
    /// Always `Some` while the queue is attached; taken back into the pool.
    q: Option<blkio::Blkioq>,
    pool: Option<QueuePool>,
    bounce: BouncePool,
    /// Where the driver's completions land, one per ring entry.
    done: Vec<MaybeUninit<blkio::Completion>>,
}

// SAFETY: Blkioq is Send (its driver queue is Send + Sync); the completion
// buffer holds plain values. The queue moves once, with its loop, into the
// loop's thread.
unsafe impl Send for BlkioQueue {}

impl BlkioQueue {
    pub(super) fn attach(
        blkio: &Arc<Mutex<blkio::Blkio>>,
        pool: Option<&QueuePool>,
        driver: &str,
        entries: usize,
    ) -> Result<BlkioQueue, AttachError> {
        let q = match pool {
            Some(pool) => pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .ok_or(AttachError::NoQueue)?,
            None => blkio
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add_queue(false)
                .map_err(|e| {
                    let mut msg = e.message().to_string();
                    // io_uring refused to this process (a seccomp profile).
                    if driver.contains("io_uring") {
                        if let Err(why) = crate::probe::io_uring() {
                            msg.push_str(&format!(" ({why})"));
                        }
                    }
                    AttachError::Blkio(msg)
                })?,
        };
        Ok(BlkioQueue {
            q: Some(q),
            pool: pool.cloned(),
            bounce: BouncePool::new(Arc::clone(blkio)),
            done: (0..entries).map(|_| MaybeUninit::uninit()).collect(),
        })
    }

    pub(super) fn bounce_pool(&mut self) -> &mut BouncePool {
        &mut self.bounce
    }

    #[inline]
    pub(super) fn submit(
        &mut self,
        req: &LeafRequest,
        punch_holes: bool,
        data: Data<'_>,
        user_data: usize,
    ) -> Result<Issued, Errno> {
        let Some(q) = &mut self.q else {
            return Err(Errno::EIO);
        };
        let offset = req.offset;
        let fua = if req.flags & FLAG_FUA != 0 {
            blkio::ReqFlags::FUA
        } else {
            blkio::ReqFlags::empty()
        };
        match (req.op, data) {
            // The pointers stay valid until the completion: iovecs and
            // bounce buffers live in the request's slot, the guest mapping
            // they point into is held by the request.
            (Op::Read, Data::Iovecs(v)) => {
                q.readv(offset, v.as_ptr(), v.len() as u32, user_data, fua)
            }
            (Op::Write, Data::Iovecs(v)) => {
                q.writev(offset, v.as_ptr(), v.len() as u32, user_data, fua)
            }
            (Op::Read, Data::Bounce { buf, at, len }) => {
                let p = buf.as_ptr().wrapping_add(at);
                q.read(offset, p, len, user_data, fua)
            }
            (Op::Write, Data::Bounce { buf, at, len }) => {
                let p = buf.as_ptr().wrapping_add(at);
                q.write(offset, p.cast_const(), len, user_data, fua)
            }
            (Op::Read | Op::Write, Data::None | Data::Segments(..)) => return Err(Errno::EIO),
            (Op::Flush, _) => q.flush(user_data, blkio::ReqFlags::empty()),
            // Write-zeroes that may unmap: a hole punch on files.
            (Op::Discard, _) if punch_holes => {
                q.write_zeroes(offset, req.len, user_data, blkio::ReqFlags::empty())
            }
            (Op::Discard, _) => q.discard(offset, req.len, user_data, blkio::ReqFlags::empty()),
            (Op::WriteZeroes, _) => {
                let mut f = fua;
                if req.flags & FLAG_NO_UNMAP != 0 {
                    f |= blkio::ReqFlags::NO_UNMAP;
                }
                q.write_zeroes(offset, req.len, user_data, f)
            }
            _ => return Err(Errno::EOPNOTSUPP),
        }
        Ok(Issued::InFlight)
    }

    pub(super) fn reap(&mut self, queue: u32, out: &mut Vec<LeafCompletion>) {
        let Some(q) = &mut self.q else {
            return;
        };
        let n = match q.do_io(&mut self.done, 0, None, None) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(queue, "libblkio do_io: {}", e.message());
                0
            }
        };
        for c in &self.done[..n] {
            // SAFETY: do_io initialized the first n entries.
            let c = unsafe { c.assume_init_read() };
            out.push(LeafCompletion {
                user_data: c.user_data,
                result: c.ret,
            });
        }
    }

    pub(super) fn completion_fd(&mut self) -> Option<BorrowedFd<'_>> {
        let q = self.q.as_mut()?;
        q.set_completion_fd_enabled(true);
        let fd = q.get_completion_fd()?;
        // SAFETY: the fd belongs to the libblkio queue, which lives as long
        // as the returned borrow of it.
        Some(unsafe { BorrowedFd::borrow_raw(fd) })
    }

    pub(super) fn clear_completion_fd(&mut self) {
        if let Some(fd) = self.q.as_ref().and_then(|q| q.get_completion_fd()) {
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into a local buffer from the libblkio
            // queue's non-blocking eventfd.
            unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
        }
    }
}

impl Drop for BlkioQueue {
    fn drop(&mut self) {
        // A driver that cannot add queues gets its queue back for the next
        // attach of this virtqueue.
        if let (Some(pool), Some(q)) = (&self.pool, self.q.take()) {
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(q);
        }
    }
}
