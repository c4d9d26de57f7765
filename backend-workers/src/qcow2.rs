//! A `qcow2` format node in a worker: its image (imago, through
//! [`blkmesh_image`]); what it does with each request is its stage's
//! (`pipeline/qcow2.rs`).
//!
//! # Where the data goes
//!
//! A read or write whose whole range the image maps, in one piece, to its
//! own file (an allocated cluster run; for a write, one that needs no copy
//! on write) passes on to the file's libblkio queue at the mapped offset,
//! with the registered guest RAM: no copy, no metadata I/O once the L2
//! table is cached. Everything else is done here, synchronously on the
//! queue's thread, by imago: reads of unallocated clusters (zeroes, or the
//! backing chain), compressed clusters, ranges that map in pieces, and
//! allocating writes (cluster allocation, copy on write from the backing
//! image, L2 and refcount updates). Those copy the data through a buffer.
//!
//! # Metadata and ordering
//!
//! imago keeps the metadata in its caches and writes refcount blocks
//! before the L2 tables that point at new clusters. The dirty metadata of
//! requests that changed mappings (allocating writes, write-zeroes,
//! discard) is written back to the file (the page cache, no sync) before
//! their completions are published, once per batch of completions
//! ([`Qcow2Scratch::write_back`]): a worker that dies loses no completed
//! write, and its replacement opens the image as it was. (imago writes a
//! whole table when one entry changed, so once per batch rather than per
//! request is what keeps allocating writes at qemu-storage-daemon's pace.) A guest flush writes back what
//! is left and passes to the leaf, whose fdatasync covers data and
//! metadata. So what a completed flush covers survives a host crash, and a
//! crash leaves at worst leaked clusters.
//!
//! The image is shared by every queue of the node in this worker (its
//! cache is per process: the node is exclusive to one worker). A discard
//! changes mappings other requests may hold, so it takes the image
//! exclusively; everything else shares it.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use blkmesh_image::Image;

use crate::errno::Errno;

/// A qcow2 node opened in this worker.
pub struct Qcow2Layer {
    node: String,
    image: RwLock<Image>,
}

impl std::fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qcow2Layer({})", self.node)
    }
}

pub(crate) fn errno(e: &std::io::Error) -> Errno {
    Errno::of_io(e)
}

impl Qcow2Layer {
    pub fn new(node: &str, image: Image) -> Self {
        Qcow2Layer {
            node: node.to_string(),
            image: RwLock::new(image),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.shared().size()
    }

    /// The image, shared with the other queues.
    pub fn shared(&self) -> RwLockReadGuard<'_, Image> {
        self.image.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The image, alone (a discard changes mappings others may hold).
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, Image> {
        self.image.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the cached metadata back (before the leaf's flush).
    pub fn flush(&self) -> Result<(), Errno> {
        self.shared().flush().map_err(|e| errno(&e))
    }
}
