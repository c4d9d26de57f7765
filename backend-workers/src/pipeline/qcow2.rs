//! The qcow2 stage: a request at a `qcow2` node (see `qcow2.rs` for
//! where the data goes and how metadata is ordered), and the queue's
//! share of the work: a buffer, and the requests whose metadata is still
//! to be written back before their completions are published.

use std::sync::Arc;

use blkmesh_image::{Image, ShallowMapping};
use blkmesh_ipc::ring::{Op, Segment, FLAG_FUA};

use crate::errno::Errno;
use crate::memory::RegisteredRam;
use crate::qcow2::{errno, Qcow2Layer};
use crate::slot::InFlight;
use crate::stages::Verdict;

/// A queue's part of the layer: a reused buffer for the requests the
/// layer does itself, the requests whose metadata is still to be written
/// back, and how many it did (logged when the queue stops).
#[derive(Debug, Default)]
pub struct Qcow2Scratch {
    buf: Vec<u8>,
    /// Done here, changed mappings: their completions wait for the
    /// write-back ([`Qcow2Scratch::write_back`]).
    unwritten: Vec<u32>,
    /// The layer they changed.
    layer: Option<Arc<Qcow2Layer>>,
    /// Reads and writes passed to the file at their mapped offset.
    pub direct: u64,
    /// Reads and writes done here, through a buffer.
    pub copied: u64,
}

impl Qcow2Scratch {
    /// Writes back the metadata the requests done since the last call
    /// changed, before their completions are published. On failure, the
    /// tags whose completions must fail instead.
    pub fn write_back(&mut self) -> Result<(), (Errno, Vec<u32>)> {
        let Some(layer) = self.layer.take() else {
            return Ok(());
        };
        let tags = std::mem::take(&mut self.unwritten);
        layer.flush().map_err(|e| (e, tags))
    }

    /// Request `tag` changed `layer`'s mappings.
    fn defer(&mut self, layer: &Arc<Qcow2Layer>, tag: u32) {
        self.unwritten.push(tag);
        if self.layer.is_none() {
            self.layer = Some(Arc::clone(layer));
        }
    }
}

impl Drop for Qcow2Scratch {
    fn drop(&mut self) {
        if self.direct + self.copied > 0 {
            tracing::info!(
                direct = self.direct,
                copied = self.copied,
                "qcow2 reads and writes of the queue: to the file directly, or copied"
            );
        }
    }
}

/// Request `tag` at `offset` (in the image's coordinates): passes on
/// to the file at the mapped offset, or is done here.
pub(super) fn step(
    layer: &Arc<Qcow2Layer>,
    tag: u32,
    r: &mut InFlight,
    segs: &[Segment],
    offset: &mut u64,
    scratch: &mut Qcow2Scratch,
) -> Verdict {
    let at = *offset;
    if matches!(r.op, Op::Write | Op::WriteZeroes | Op::Discard) {
        r.qcow2_written = Some(at);
    }
    match r.op {
        Op::GetId => Verdict::Pass,
        Op::Flush => match layer.flush() {
            Ok(()) => Verdict::Pass,
            Err(e) => Verdict::Fail(e),
        },
        // A write that must be durable when it completes needs the
        // metadata that maps it synced too, which the leaf's FUA (a
        // data-range sync) does not cover: it is done here, then the
        // metadata written back and the file synced.
        Op::Write if r.flags & FLAG_FUA != 0 => {
            scratch.copied += 1;
            let image = layer.shared();
            done(copy_through(&image, r, segs, at, scratch).and_then(|()| {
                image
                    .flush()
                    .and_then(|()| image.sync())
                    .map_err(|e| errno(&e))
            }))
        }
        Op::Read | Op::Write => {
            let image = layer.shared();
            match direct_mapping(&image, r.op, at, r.len) {
                Ok(Some(host)) => {
                    scratch.direct += 1;
                    *offset = host;
                    Verdict::Pass
                }
                Ok(None) => {
                    scratch.copied += 1;
                    let result = copy_through(&image, r, segs, at, scratch);
                    if result.is_ok() && r.op == Op::Write {
                        scratch.defer(layer, tag);
                    }
                    done(result)
                }
                Err(e) => Verdict::Fail(e),
            }
        }
        Op::WriteZeroes => {
            let result = layer
                .shared()
                .write_zeroes(at, r.len)
                .map_err(|e| errno(&e));
            scratch.defer(layer, tag);
            done(result)
        }
        Op::Discard => {
            let mut image = layer.exclusive();
            let result = image.discard_to_zero(at, r.len).map_err(|e| errno(&e));
            drop(image);
            scratch.defer(layer, tag);
            done(result)
        }
        _ => Verdict::Fail(Errno::EOPNOTSUPP),
    }
}

fn done(r: Result<(), Errno>) -> Verdict {
    match r {
        Ok(()) => Verdict::Done(0),
        Err(e) => Verdict::Fail(e),
    }
}

/// Where `len` bytes at `offset` are in the image's own file, when they
/// are there in one piece (and, for a write, may be written in place).
fn direct_mapping(image: &Image, op: Op, offset: u64, len: u64) -> Result<Option<u64>, Errno> {
    let (mapping, n) = image
        .get_shallow_mapping(offset, len)
        .map_err(|e| errno(&e))?;
    Ok(match mapping {
        ShallowMapping::Raw {
            offset: host,
            writable,
            ..
        } if n >= len && (op == Op::Read || writable) => Some(host),
        _ => None,
    })
}

/// Does a read or write through imago, copying the data between the guest
/// (or the request's bounce buffer) and a buffer.
fn copy_through(
    image: &Image,
    r: &mut InFlight,
    segs: &[Segment],
    offset: u64,
    scratch: &mut Qcow2Scratch,
) -> Result<(), Errno> {
    let len = usize::try_from(r.len).map_err(|_| Errno::EINVAL)?;
    let io = |buf: &mut [u8]| -> Result<(), Errno> {
        match r.op {
            Op::Read => image.read(buf, offset),
            _ => image.write(&*buf, offset),
        }
        .map_err(|e| errno(&e))
    };
    // A bounced request already has its buffer (a write's data is in it;
    // a read's is copied to the guest when it completes).
    if let Some(bb) = &mut r.bounce {
        return io(&mut bb.bytes_mut()[..len]);
    }
    let buf = &mut scratch.buf;
    buf.clear();
    buf.resize(len, 0);
    if r.op == Op::Write {
        from_guest(&r.ram, segs, buf)?;
    }
    io(buf)?;
    if r.op == Op::Read {
        to_guest(&r.ram, segs, buf)?;
    }
    Ok(())
}

fn from_guest(ram: &RegisteredRam, segs: &[Segment], dst: &mut [u8]) -> Result<(), Errno> {
    let mut at = 0;
    for s in segs {
        let b = ram.ram().buf(s).map_err(|_| Errno::EFAULT)?;
        at += b.copy_to(&mut dst[at..]);
    }
    Ok(())
}

fn to_guest(ram: &RegisteredRam, segs: &[Segment], src: &[u8]) -> Result<(), Errno> {
    let mut at = 0;
    for s in segs {
        let b = ram.ram().buf(s).map_err(|_| Errno::EFAULT)?;
        at += b.copy_from(&src[at..]);
    }
    Ok(())
}
