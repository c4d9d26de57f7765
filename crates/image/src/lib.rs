//! Disk image formats for blkmesh: opening qcow2 and raw images as a
//! backing chain, creating images, and describing them (`image info`).
//!
//! The formats themselves are [imago]'s (its synchronous build: the worker's
//! queue threads call it directly, with no async runtime). What this crate
//! adds is blkmesh's policy:
//!
//! - **No implicit opens.** Every layer of a chain is named by the caller;
//!   the backing file an image header names is never opened from that path
//!   (imago's [`DenyImplicitOpenGate`]). An image whose header names a
//!   backing file must be given one, unless the caller says to read it
//!   without ([`Layer::no_backing`]); external data files are refused.
//! - **Bounded chains.** At most [`MAX_CHAIN_DEPTH`] layers, so a loop in
//!   a caller's description cannot recurse for ever.
//! - **Errors that say which layer and why** ([`ImageError`]), with an
//!   errno for the edges.

// Unsafe code only in `masked` (imago's storage trait), allowed there.
#![deny(unsafe_code)]

mod chain;
mod create;
mod error;
mod header;
mod info;
#[allow(unsafe_code)]
mod masked;

pub use self::chain::{open_chain, probe_format, Format, Image, Layer, Source, Storage};
pub use self::create::{create, CreateOptions, Preallocation};
pub use self::error::ImageError;
pub use self::header::{check_writable, drop_backing_file, MAX_CHAIN_DEPTH, MAX_IMAGE_SIZE};
pub use self::info::{info, info_as, ImageInfo};
pub use imago::format::PreallocateMode;
pub use imago::ShallowMapping;

#[cfg(test)]
mod tests;
