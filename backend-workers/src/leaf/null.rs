//! The null leaf: reads return zeroes, writes are dropped, and every
//! request completes at once or, with a latency, once that has passed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use blkmesh_ipc::ring::{Op, Segment};

use super::types::{Data, Issued, LeafCompletion, LeafRequest};
use crate::bounce::BouncePool;
use crate::errno::Errno;
use crate::memory::RegisteredRam;

pub struct NullQueue {
    latency: Duration,
    /// Requests done but held for the latency, by when they are due.
    pending: VecDeque<(Instant, LeafCompletion)>,
    bounce: BouncePool,
}

impl NullQueue {
    pub(super) fn new(latency: Duration) -> NullQueue {
        NullQueue {
            latency,
            pending: VecDeque::new(),
            bounce: BouncePool::heap(),
        }
    }

    pub(super) fn bounce_pool(&mut self) -> &mut BouncePool {
        &mut self.bounce
    }

    pub(super) fn submit(&mut self, req: &LeafRequest, data: Data<'_>) -> Result<Issued, Errno> {
        if req.op == Op::Read {
            match data {
                Data::Bounce { buf, at, len } => buf.bytes_mut()[at..at + len].fill(0),
                Data::Segments(segs, ram) => zero_fill(ram, segs)?,
                // Raw iovecs are the driver's form; nothing sends them here.
                Data::Iovecs(_) => return Err(Errno::EIO),
                Data::None => {}
            }
        }
        Ok(Issued::Done)
    }

    pub(super) fn hold(&mut self, user_data: usize, result: i32) -> bool {
        if self.latency.is_zero() || result != 0 {
            return false;
        }
        let c = LeafCompletion { user_data, result };
        self.pending.push_back((Instant::now() + self.latency, c));
        true
    }

    pub(super) fn reap(&mut self, now: Instant, out: &mut Vec<LeafCompletion>) {
        while let Some(&(due, c)) = self.pending.front() {
            if due > now {
                break;
            }
            self.pending.pop_front();
            out.push(c);
        }
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.pending.front().map(|(d, _)| *d)
    }
}

fn zero_fill(ram: &RegisteredRam, segs: &[Segment]) -> Result<(), Errno> {
    static ZEROES: [u8; 4096] = [0; 4096];
    for s in segs {
        let mut seg = *s;
        while seg.len > 0 {
            let chunk = seg.len.min(ZEROES.len() as u32);
            let b = ram
                .ram()
                .buf(&Segment { len: chunk, ..seg })
                .map_err(|_| Errno::EFAULT)?;
            b.copy_from(&ZEROES[..chunk as usize]);
            seg.offset += chunk as u64;
            seg.len -= chunk;
        }
    }
    Ok(())
}
