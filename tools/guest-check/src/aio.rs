//! Linux native AIO (`io_setup`, `io_submit`, `io_getevents`), the engine
//! of the in-guest benchmark: what fio's `libaio` engine uses on a block
//! device opened with O_DIRECT, without the library. The context owns its
//! buffers, so no request can outlive the memory it reads or writes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::sys::AlignedBuf;

// <linux/aio_abi.h>
const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;

/// `struct iocb` (little-endian layout: `aio_key` before `aio_rw_flags`).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IoEvent {
    /// The slot the request was submitted from.
    pub data: u64,
    obj: u64,
    /// Bytes transferred, or a negative errno.
    pub res: i64,
    res2: i64,
}

/// An AIO context with one buffer per slot; a slot holds at most one
/// request at a time.
pub struct Aio<'fd> {
    ctx: libc::c_ulong,
    fd: BorrowedFd<'fd>,
    /// Dropped after the context (see `Drop`), so never while the kernel
    /// may still use them.
    bufs: Vec<AlignedBuf>,
}

impl<'fd> Aio<'fd> {
    /// A context for `slots` requests of `len` bytes on `fd`.
    pub fn new(fd: BorrowedFd<'fd>, slots: usize, len: usize) -> io::Result<Aio<'fd>> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id through the pointer, which
        // points to a live local.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, slots as libc::c_long, &mut ctx) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let bufs = (0..slots).map(|_| AlignedBuf::new(len)).collect();
        Ok(Aio { ctx, fd, bufs })
    }

    /// The buffer of `slot`, to fill before a write. Only between that
    /// slot's requests: the kernel does not touch it then.
    pub fn buf_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.bufs[slot]
    }

    /// Starts a read into (or a write from) the buffer of `slot` at
    /// `offset`. The slot must not have a request in flight.
    pub fn submit(&mut self, slot: usize, write: bool, offset: u64) -> io::Result<()> {
        let buf = &mut self.bufs[slot];
        let mut iocb = Iocb {
            aio_data: slot as u64,
            aio_lio_opcode: if write {
                IOCB_CMD_PWRITE
            } else {
                IOCB_CMD_PREAD
            },
            aio_fildes: self.fd.as_raw_fd() as u32,
            aio_buf: buf.as_mut_ptr() as u64,
            aio_nbytes: buf.len() as u64,
            aio_offset: offset as i64,
            ..Iocb::default()
        };
        let mut list = [&mut iocb as *mut Iocb];
        // SAFETY: io_submit reads one iocb pointer from `list` and the iocb
        // it points to, both live locals, and copies them before returning.
        // The buffer belongs to `self` and outlives the request: the
        // context is destroyed (which waits for every request) before the
        // buffers are freed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.ctx,
                1 as libc::c_long,
                list.as_mut_ptr(),
            )
        };
        match r {
            1 => Ok(()),
            r if r < 0 => Err(io::Error::last_os_error()),
            _ => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
        }
    }

    /// Waits for at least `min` completions and returns how many of
    /// `events` were filled.
    pub fn wait(&self, min: usize, events: &mut [IoEvent]) -> io::Result<usize> {
        loop {
            // SAFETY: io_getevents writes at most `events.len()` io_event
            // structs into `events`, a live mutable slice of them; the
            // timeout pointer is null (wait).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    min as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Aio<'_> {
    fn drop(&mut self) {
        // SAFETY: the context is ours and destroyed once; io_destroy waits
        // for the requests still in flight, so the buffers (dropped after
        // this) are no longer in use.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn reads_and_writes_round_trip_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(64 << 10).unwrap();
        let mut aio = Aio::new(file.as_fd(), 2, 4096).unwrap();
        aio.buf_mut(0).fill(0xab);
        aio.submit(0, true, 8192).unwrap();
        let mut events = [IoEvent::default(); 2];
        assert_eq!(aio.wait(1, &mut events).unwrap(), 1);
        assert_eq!((events[0].data, events[0].res), (0, 4096));
        aio.submit(1, false, 8192).unwrap();
        assert_eq!(aio.wait(1, &mut events).unwrap(), 1);
        assert_eq!(events[0].data, 1);
        assert!(aio.buf_mut(1).iter().all(|&b| b == 0xab));
        let mut check = [0u8; 4];
        file.read_exact_at(&mut check, 8192 + 4092).unwrap();
        assert_eq!(check, [0xab; 4]);
    }

    #[test]
    fn a_bad_request_completes_with_an_errno() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("ro")).unwrap();
        // Opened write-only: a read fails, at submission or completion.
        let mut aio = Aio::new(file.as_fd(), 1, 4096).unwrap();
        match aio.submit(0, false, 0) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
            Ok(()) => {
                let mut events = [IoEvent::default(); 1];
                assert_eq!(aio.wait(1, &mut events).unwrap(), 1);
                assert!(events[0].res < 0);
            }
        }
    }
}
