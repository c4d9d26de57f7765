//! Guest RAM mapped by the worker and registered with libblkio.
//!
//! Registration happens once per memory table (the seeds' registered-buffer
//! path), so the hot path maps nothing. Every in-flight request holds an `Arc`
//! of the table its buffers point into; the mapping and the registration go
//! away only when the last such request has completed.

use std::sync::{Arc, Mutex};

use blkmesh_ipc::guest_ram::GuestRam;

use crate::graph::Leaf;

/// A mapped memory table, registered with the leaf's libblkio instance.
pub struct RegisteredRam {
    ram: GuestRam,
    blkio: Option<Arc<Mutex<blkio::Blkio>>>,
    mapped: Vec<blkio::MemoryRegion>,
}

impl std::fmt::Debug for RegisteredRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredRam")
            .field("regions", &self.ram.regions().len())
            .field("registered", &self.mapped.len())
            .finish()
    }
}

impl RegisteredRam {
    /// An empty table (before the frontend sends one).
    pub fn empty() -> Self {
        RegisteredRam {
            ram: GuestRam::default(),
            blkio: None,
            mapped: Vec::new(),
        }
    }

    /// Registers every region of `ram` with the leaf, if it is a libblkio one.
    pub fn register(ram: GuestRam, leaf: &Leaf) -> Result<Self, blkio::Error> {
        let Leaf::Blkio { blkio, .. } = leaf else {
            return Ok(RegisteredRam {
                ram,
                blkio: None,
                mapped: Vec::new(),
            });
        };
        let mut out = RegisteredRam {
            ram,
            blkio: Some(Arc::clone(blkio)),
            mapped: Vec::new(),
        };
        let mut b = blkio.lock().unwrap_or_else(|p| p.into_inner());
        for region in out.ram.regions() {
            let (addr, len, fd, fd_offset) = region.registration();
            let r = blkio::MemoryRegion {
                addr,
                iova: 0,
                len,
                fd,
                fd_offset: fd_offset as i64,
                flags: 0,
            };
            // On failure the regions mapped so far are unmapped by Drop.
            b.map_mem_region(&r)?;
            out.mapped.push(r);
        }
        drop(b);
        Ok(out)
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

impl Drop for RegisteredRam {
    fn drop(&mut self) {
        if let Some(blkio) = &self.blkio {
            let mut b = blkio.lock().unwrap_or_else(|p| p.into_inner());
            for r in &self.mapped {
                b.unmap_mem_region(r);
            }
        }
    }
}
