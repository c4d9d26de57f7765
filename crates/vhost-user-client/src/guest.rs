//! Guest RAM: one memfd, mapped here with vm-memory and shared with the
//! device through SET_MEM_TABLE, as a VMM with
//! `memory-backend-memfd,share=on` does.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestUsize};

use crate::alloc::Allocator;
use crate::error::Error;

/// Guest RAM at guest physical addresses `[0, size)`, backed by a memfd.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    pub(crate) mem: GuestMemoryMmap<()>,
    size: u64,
    /// Where the mapping lies in this process: the "VMM virtual address"
    /// of guest address 0, which is what SET_MEM_TABLE's `user_addr` and
    /// SET_VRING_ADDR speak in.
    host_base: u64,
}

impl GuestRam {
    /// Creates a memfd of `size` bytes (a multiple of 4096) and maps it.
    pub fn new(size: u64) -> Result<Self, Error> {
        if size == 0 || size % 4096 != 0 || usize::try_from(size).is_err() {
            return Err(Error::Invalid(format!(
                "guest RAM size {size} must be a non-zero multiple of 4096"
            )));
        }
        // Sealable, as QEMU's memory-backend-memfd makes guest RAM: the
        // device may seal it against shrinking.
        let file = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("blkmesh-guest-ram")
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
            .into_file();
        file.set_len(size)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(|e| Error::Memory(e.to_string()))?;
        let host_base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))? as u64;
        Ok(GuestRam {
            file,
            mem,
            size,
            host_base,
        })
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd behind guest RAM.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The memfd behind guest RAM.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The VMM virtual address of guest address `gpa` (wrapping: any
    /// `gpa` gives a number, in range or not).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.host_base.wrapping_add(gpa)
    }

    /// Copies `data` to guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("write {} bytes at {addr:#x}: {e}", data.len())))
    }

    /// Reads `len` bytes at guest address `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("read {len} bytes at {addr:#x}: {e}")))?;
        Ok(buf)
    }

    /// Atomically loads a little-endian `u16`.
    pub fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, Error> {
        self.mem
            .load::<u16>(GuestAddress(addr), order)
            .map(u16::from_le)
            .map_err(|e| Error::Memory(format!("load at {addr:#x}: {e}")))
    }

    /// Atomically stores a little-endian `u16`.
    pub fn store_u16(&self, addr: u64, v: u16, order: Ordering) -> Result<(), Error> {
        self.mem
            .store(v.to_le(), GuestAddress(addr), order)
            .map_err(|e| Error::Memory(format!("store at {addr:#x}: {e}")))
    }

    /// Whether `[addr, addr + len)` lies in guest RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|end| end <= self.size as GuestUsize)
    }
}

/// Guest RAM plus the allocator for its data area.
#[derive(Debug)]
pub(crate) struct Ram {
    pub(crate) ram: GuestRam,
    pub(crate) alloc: Allocator,
}

impl Ram {
    /// Allocates a buffer holding `data` (alignment 4096 for buffers of a
    /// sector or more, 16 otherwise).
    pub(crate) fn alloc_with(&mut self, data: &[u8]) -> Result<u64, Error> {
        let addr = self.alloc(data.len() as u64)?;
        self.ram.write(addr, data)?;
        Ok(addr)
    }

    pub(crate) fn alloc(&mut self, len: u64) -> Result<u64, Error> {
        let align = if len >= 512 { 4096 } else { 16 };
        self.alloc
            .alloc(len, align)
            .ok_or(Error::OutOfGuestMemory(len))
    }
}
