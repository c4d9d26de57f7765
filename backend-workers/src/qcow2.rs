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
//! exclusively; everything else shares it, and so does a block job
//! (`jobs/`), which takes it exclusively only to change a mapping.
//!
//! # Writes a commit job follows
//!
//! While a commit job copies this image into its backing image, every
//! write, write-zeroes and discard that completes marks its range in the
//! job's [`DirtyMap`] ([`Qcow2Layer::written`]), after its data is in the
//! image: the job copies those ranges again, so none is missed however
//! its copy and the write interleave.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use blkmesh_image::{Format, Image, Layer, Source};

use crate::errno::Errno;
use crate::jobs::DirtyMap;

/// A layer of a qcow2 node's backing chain, as the plan names it.
#[derive(Clone, Debug)]
pub struct BackingLayer {
    pub format: Format,
    pub path: PathBuf,
    pub direct: bool,
    pub no_backing: bool,
}

impl BackingLayer {
    /// The layer to open (writable: the target of a commit).
    pub fn layer(&self, writable: bool) -> Layer {
        Layer {
            format: self.format,
            source: Source::Path(self.path.clone()),
            writable,
            direct: self.direct,
            no_backing: self.no_backing,
        }
    }
}

/// A qcow2 node opened in this worker.
pub struct Qcow2Layer {
    node: String,
    image: RwLock<Image>,
    /// The image file (another descriptor of the leaf's), for the header
    /// field imago leaves alone: the backing file a stream drops.
    file: File,
    /// Its backing chain, top first.
    backing: Vec<BackingLayer>,
    /// Where completed writes are marked while a commit job runs.
    written: RwLock<Option<Arc<DirtyMap>>>,
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
    pub fn new(node: &str, image: Image, file: File, backing: Vec<BackingLayer>) -> Self {
        Qcow2Layer {
            node: node.to_string(),
            image: RwLock::new(image),
            file,
            backing,
            written: RwLock::new(None),
        }
    }

    /// The image file (see [`blkmesh_image::drop_backing_file`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The backing chain as the plan named it, top first.
    pub fn backing(&self) -> &[BackingLayer] {
        &self.backing
    }

    /// A write of `len` bytes at `offset` completed: marks it for the
    /// commit job that follows writes, if one does.
    pub fn written(&self, offset: u64, len: u64) {
        if let Some(map) = &*self.written.read().unwrap_or_else(|p| p.into_inner()) {
            map.mark(offset, len);
        }
    }

    /// Marks completed writes in `map` from now on (`None`: no more).
    pub fn follow_writes(&self, map: Option<Arc<DirtyMap>>) {
        *self.written.write().unwrap_or_else(|p| p.into_inner()) = map;
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
