//! A real Linux guest on a blkmesh export: QEMU (TCG, so no KVM needed)
//! boots Debian's cloud kernel with a tiny initramfs whose only job is to
//! run `blkmesh-guest-check` on `/dev/vda` and power off.
//!
//! The host-side tests drive blkmesh with our own vhost-user client; this
//! is the one place where a real guest kernel's virtio-blk driver, blk-mq
//! queue mapping, page cache, flushes, discards and write-zeroes meet the
//! frontend. The guest prints one `CHECK` line per check and a verdict on
//! its serial console (see [`blkmesh_guest_check::report`]);
//! [`GuestVm::wait_verdict`] parses it.
//!
//! ```no_run
//! use std::time::Duration;
//! use blkmesh_testkit::guest::{GuestImage, GuestOptions, GuestVm};
//!
//! let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
//! # let socket = std::path::PathBuf::from("/tmp/disk.sock");
//! let mut vm = GuestVm::start(&image, GuestOptions::new(&socket).param("seed", 7)).unwrap();
//! let outcome = vm.wait_verdict(Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"));
//! assert!(outcome.passed(), "{}", outcome.console);
//! ```
//!
//! What it needs (all installed by `scripts/deps.sh`): `qemu-system-x86_64`
//! (10.x from bookworm-backports), a static busybox (`busybox-static`),
//! `dpkg-deb`, and the Debian cloud kernel package
//! `linux-image-<abi>-cloud-amd64_*.deb` in the cache directory
//! ([`CACHE_ENV`], default [`DEFAULT_CACHE`]). A missing piece is an error
//! naming it and how to install it, never a silent pass.
//!
//! The cache directory also holds the extracted kernel and modules
//! (`kernel/<version>/`) and the initramfs (`initramfs/<hash>.cpio`, keyed
//! by a hash of everything in it), so only the first run pays for them.
//!
//! The rooms: `host` (finding QEMU, busybox, the kernel package and the
//! static guest check), `image` ([`GuestImage`]: the kernel extracted from
//! its package), `initramfs` (the guest's /init and the cpio around it),
//! `vm` ([`GuestOptions`], [`GuestVm`]: starting QEMU), `verdict`
//! ([`GuestOutcome`], waiting for the console's verdict), `qmp` and
//! `error` ([`GuestError`]).

mod error;
mod host;
mod image;
mod initramfs;
mod qmp;
mod verdict;
mod vm;

pub use error::GuestError;
pub use host::{cache_dir, CACHE_ENV, CHECK_BIN_ENV, DEFAULT_CACHE, INSTALL_HINT};
pub use image::GuestImage;
pub use initramfs::MODULES;
pub use verdict::GuestOutcome;
pub use vm::{GuestOptions, GuestVm};
