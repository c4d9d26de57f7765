//! Walking a descriptor chain from its head without the virtqueue's
//! iterator: for the heads a previous frontend left in flight.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::chain::Desc;

/// Why a descriptor chain could not be walked from its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("descriptor index {0} outside the table")]
    Index(u16),
    #[error("descriptor table entry not in guest memory")]
    Unreadable,
    #[error("bad indirect descriptor")]
    Indirect,
    #[error("chain longer than its table (a loop?)")]
    Loop,
}

/// Bytes of a split-ring descriptor.
const DESC_BYTES: u64 = 16;

/// Walks the split-ring descriptor chain that starts at `head` in the table
/// at `desc_table` (`queue_size` entries), following one indirect table, as
/// the virtio-queue crate's iterator would. Used to take up again the heads
/// an earlier frontend left in flight (inflight tracking); every read is
/// bounds-checked through guest memory and the walk is bounded.
pub fn walk_chain<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) -> Result<(), WalkError> {
    out.clear();
    let (mut table, mut size, mut index) = (desc_table, queue_size as u32, head as u32);
    let mut indirect = false;
    let mut steps = 0u32;
    loop {
        if index >= size {
            return Err(WalkError::Index(index as u16));
        }
        let at = table
            .checked_add(index as u64 * DESC_BYTES)
            .ok_or(WalkError::Unreadable)?;
        let raw: Descriptor = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| WalkError::Unreadable)?;
        let (addr, len) = (raw.addr().0, raw.len());
        if raw.refers_to_indirect_table() {
            // Only one level, never chained, a whole number of entries,
            // no longer than the queue (a driver may not make a chain
            // longer than the queue size).
            if indirect
                || raw.has_next()
                || len == 0
                || len as u64 % DESC_BYTES != 0
                || len as u64 / DESC_BYTES > queue_size as u64
            {
                return Err(WalkError::Indirect);
            }
            (table, size, index, indirect) = (addr, len / DESC_BYTES as u32, 0, true);
            continue;
        }
        steps += 1;
        if steps > size {
            return Err(WalkError::Loop);
        }
        out.push(Desc {
            addr,
            len,
            writable: raw.is_write_only(),
            has_next: raw.has_next(),
        });
        if !raw.has_next() {
            return Ok(());
        }
        index = raw.next() as u32;
    }
}
