//! A descriptor chain as the virtqueue yielded it: its shape, and its
//! readable and writable bytes in guest memory.

use vm_memory::{GuestAddress, GuestMemoryBackend};

/// A descriptor as the chain yielded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
    pub has_next: bool,
}

/// Why a chain cannot even be answered (no place for a status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("empty or unreadable descriptor chain")]
    Empty,
    #[error("descriptor chain cut short (loop, bad next index, bad indirect table or too long)")]
    Truncated,
    #[error("readable descriptor after a writable one")]
    Order,
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
}

/// Checks the shape of a chain. `descs` is what the chain iterator yielded.
pub fn check_chain(descs: &[Desc]) -> Result<u64, ChainError> {
    let last = descs.last().ok_or(ChainError::Empty)?;
    if last.has_next {
        return Err(ChainError::Truncated);
    }
    let mut seen_writable = false;
    for d in descs {
        if !d.writable && seen_writable {
            return Err(ChainError::Order);
        }
        seen_writable |= d.writable;
    }
    if !last.writable || last.len == 0 {
        return Err(ChainError::NoStatus);
    }
    last.addr
        .checked_add(last.len as u64 - 1)
        .ok_or(ChainError::NoStatus)
}

/// Byte ranges `[skip, skip + take)` of the concatenation of the guest
/// buffers `descs` (address, length), appended to `out`.
pub fn byte_ranges(
    descs: impl Iterator<Item = (u64, u64)>,
    mut skip: u64,
    mut take: u64,
    out: &mut Vec<(u64, u64)>,
) {
    for (addr, len) in descs {
        if take == 0 {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push((addr + skip, n));
        take -= n;
        skip = 0;
    }
}

/// The device-readable buffers of a chain, as (address, length).
pub(super) fn readable(descs: &[Desc]) -> impl Iterator<Item = (u64, u64)> + '_ {
    descs
        .iter()
        .filter(|d| !d.writable)
        .map(|d| (d.addr, d.len as u64))
}

/// The device-writable buffers of a chain, as (address, length).
pub(super) fn writable(descs: &[Desc]) -> impl Iterator<Item = (u64, u64)> + '_ {
    descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| (d.addr, d.len as u64))
}

/// Reads guest memory ranges `parts` into `buf`; false unless they are
/// readable and fill it exactly.
pub(super) fn read_exact<M: GuestMemoryBackend>(
    mem: &M,
    parts: &[(u64, u64)],
    buf: &mut [u8],
) -> bool {
    let mut at = 0usize;
    for &(addr, len) in parts {
        let n = len as usize;
        if at + n > buf.len() {
            return false;
        }
        let dst = &mut buf[at..at + n];
        // Fast path: the range lies in one region (always, in practice);
        // the general path walks regions.
        let done = match mem.get_slice(GuestAddress(addr), n) {
            Ok(s) => s.copy_to(dst) == n,
            Err(_) => vm_memory::Bytes::read_slice(mem, dst, GuestAddress(addr)).is_ok(),
        };
        if !done {
            return false;
        }
        at += n;
    }
    at == buf.len()
}
