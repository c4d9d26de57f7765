//! One virtqueue: requests move their buffers in, completions hand them back.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkioq, Completion, Errno, ReqFlags};

use super::error::DeviceError;
use super::pool::Buffer;
use super::shared::Shared;
use crate::errno;

/// One request. Data buffers are moved in and come back in [`Completed`].
pub enum Request {
    Read {
        offset: u64,
        buf: Buffer,
    },
    Write {
        offset: u64,
        buf: Buffer,
    },
    Readv {
        offset: u64,
        bufs: Vec<Buffer>,
    },
    Writev {
        offset: u64,
        bufs: Vec<Buffer>,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

/// The buffers of a finished request, handed back.
pub enum Bufs {
    None,
    One(Buffer),
    Many(Vec<Buffer>),
}

impl Bufs {
    pub fn into_vec(self) -> Vec<Buffer> {
        match self {
            Bufs::None => Vec::new(),
            Bufs::One(b) => vec![b],
            Bufs::Many(v) => v,
        }
    }
}

/// A failed request: errno plus libblkio's message when it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    pub errno: i32,
    pub detail: Option<String>,
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&errno::describe(self.errno))?;
        match &self.detail {
            Some(d) => write!(f, ": {d}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for IoError {}

impl IoError {
    fn new(errno: i32, detail: &str) -> Self {
        IoError {
            errno,
            detail: Some(detail.to_string()),
        }
    }
}

/// A finished request.
pub struct Completed {
    pub tag: u64,
    pub result: Result<(), IoError>,
    pub bufs: Bufs,
}

struct InFlight {
    tag: u64,
    bufs: Bufs,
    /// For readv/writev: the iovec array the driver was given. Its heap
    /// storage must not move or be freed until the request completes.
    iovecs: Iovecs,
}

/// An iovec array describing `Buffer`s of one device.
#[derive(Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses of `Buffer`s that travel in the same
// `InFlight` entry; the memory they name may be accessed from any thread.
unsafe impl Send for Iovecs {}

/// One virtqueue. `Send`: move it to the thread that drives it.
pub struct Queue {
    // Field order matters: `q` is dropped before `shared` (the `Blkio`).
    q: Blkioq,
    /// In-flight requests, indexed by the `user_data` given to libblkio.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Requests rejected before reaching the driver.
    local: VecDeque<Completed>,
    completions: Vec<MaybeUninit<Completion>>,
    shared: Arc<Shared>,
}

impl Queue {
    pub(super) fn new(q: Blkioq, shared: Arc<Shared>) -> Self {
        Queue {
            q,
            slots: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
            local: VecDeque::new(),
            completions: Vec::new(),
            shared,
        }
    }

    /// Requests submitted and not yet returned by [`Queue::wait`].
    pub fn in_flight(&self) -> usize {
        self.in_flight + self.local.len()
    }

    /// Queues a request; it reaches the device at the next [`Queue::wait`].
    pub fn submit(&mut self, req: Request, tag: u64) {
        // Only buffers carved from this device's region may become pointers.
        let foreign = match &req {
            Request::Read { buf, .. } | Request::Write { buf, .. } => !buf.belongs_to(&self.shared),
            Request::Readv { bufs, .. } | Request::Writev { bufs, .. } => {
                bufs.iter().any(|b| !b.belongs_to(&self.shared))
            }
            Request::Flush | Request::Discard { .. } | Request::WriteZeroes { .. } => false,
        };
        if foreign {
            let bufs = match req {
                Request::Read { buf, .. } | Request::Write { buf, .. } => Bufs::One(buf),
                Request::Readv { bufs, .. } | Request::Writev { bufs, .. } => Bufs::Many(bufs),
                Request::Flush | Request::Discard { .. } | Request::WriteZeroes { .. } => {
                    Bufs::None
                }
            };
            self.local.push_back(Completed {
                tag,
                result: Err(IoError::new(libc::EINVAL, "buffer of another device")),
                bufs,
            });
            return;
        }

        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut entry = InFlight {
            tag,
            bufs: Bufs::None,
            iovecs: Iovecs::default(),
        };
        // The pointers handed to libblkio below come from `Buffer`s of this
        // device's mapped region; the buffers (and the iovec arrays) are kept
        // in `slots[slot]` until the completion for `slot` is reaped.
        match req {
            Request::Read { offset, buf } => {
                let iov = buf.iovec();
                self.q.read(
                    offset,
                    iov.iov_base.cast(),
                    iov.iov_len,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::One(buf);
            }
            Request::Write { offset, buf } => {
                let iov = buf.iovec();
                self.q.write(
                    offset,
                    iov.iov_base.cast_const().cast(),
                    iov.iov_len,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::One(buf);
            }
            Request::Readv { offset, bufs } => {
                entry.iovecs = Iovecs(bufs.iter().map(Buffer::iovec).collect());
                // More than u32::MAX iovecs cannot be allocated from a pool.
                let cnt = u32::try_from(entry.iovecs.0.len()).unwrap_or(u32::MAX);
                self.q.readv(
                    offset,
                    entry.iovecs.0.as_ptr(),
                    cnt,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::Many(bufs);
            }
            Request::Writev { offset, bufs } => {
                entry.iovecs = Iovecs(bufs.iter().map(Buffer::iovec).collect());
                let cnt = u32::try_from(entry.iovecs.0.len()).unwrap_or(u32::MAX);
                self.q.writev(
                    offset,
                    entry.iovecs.0.as_ptr(),
                    cnt,
                    slot,
                    ReqFlags::empty(),
                );
                entry.bufs = Bufs::Many(bufs);
            }
            Request::Flush => self.q.flush(slot, ReqFlags::empty()),
            Request::Discard { offset, len } => {
                self.q.discard(offset, len, slot, ReqFlags::empty())
            }
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                let flags = if may_unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.q.write_zeroes(offset, len, slot, flags)
            }
        }
        // Moving `entry` moves the Vec header, not the iovec storage.
        self.slots[slot] = Some(entry);
        self.in_flight += 1;
    }

    /// Submits queued requests and waits until at least `min` (capped at
    /// [`Queue::in_flight`]) have completed, appending them to `out`.
    /// Returns how many were appended. `timeout` bounds the wait.
    pub fn wait(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completed>,
    ) -> Result<usize, DeviceError> {
        let mut n = 0;
        while let Some(c) = self.local.pop_front() {
            out.push(c);
            n += 1;
        }
        if self.in_flight == 0 {
            return Ok(n);
        }
        let want = min.saturating_sub(n).min(self.in_flight);
        if self.completions.len() < self.in_flight {
            self.completions
                .resize_with(self.slots.len().max(self.in_flight), MaybeUninit::uninit);
        }
        let mut left = timeout;
        let got = self
            .q
            .do_io(&mut self.completions, want, left.as_mut(), None)
            .map_err(|e| {
                if e.errno() == Errno::TIME {
                    DeviceError::Timeout(timeout.unwrap_or_default())
                } else {
                    DeviceError::Wait(e)
                }
            })?;
        for c in &self.completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            let Some(entry) = self.slots.get_mut(c.user_data).and_then(|slot| slot.take()) else {
                // Not ours: libblkio only echoes the user_data we gave it.
                continue;
            };
            self.free_slots.push(c.user_data);
            self.in_flight -= 1;
            let result = if c.ret == 0 {
                Ok(())
            } else {
                Err(IoError {
                    errno: -c.ret,
                    detail: error_msg(c),
                })
            };
            out.push(Completed {
                tag: entry.tag,
                result,
                bufs: entry.bufs,
            });
            n += 1;
        }
        Ok(n)
    }
}

fn error_msg(c: &Completion) -> Option<String> {
    if c.error_msg.is_null() {
        return None;
    }
    // SAFETY: libblkio sets `error_msg` to null or to a NUL-terminated
    // string with static lifetime (`blkio_completion` contract; the Rust
    // driver only uses `&'static CStr`s).
    let msg = unsafe { CStr::from_ptr(c.error_msg) };
    Some(msg.to_string_lossy().into_owned())
}

impl Drop for Queue {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        // Give the device a moment to finish; if it does not, leak the
        // in-flight buffers so their memory is never handed out again while
        // the device might still write to it.
        let mut sink = Vec::new();
        let deadline = Some(Duration::from_secs(5));
        while self.in_flight > 0 {
            if self.wait(self.in_flight, deadline, &mut sink).is_err() {
                std::mem::forget(std::mem::take(&mut self.slots));
                break;
            }
            sink.clear();
        }
    }
}
