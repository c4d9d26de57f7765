//! Creating an image: `image create`, as `qemu-img create`.

use std::path::{Path, PathBuf};

use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatCreateBuilder, Storage as _, StorageCreateOptions};

use crate::chain::{Format, Storage};
use crate::error::{open_err, ImageError};
use crate::header::MAX_IMAGE_SIZE;

/// How much of a new image is allocated up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing: a thin image.
    #[default]
    Off,
    /// Every cluster mapped (qcow2 metadata written; data reads as zeroes),
    /// so that no write allocates.
    Metadata,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual size in bytes: a multiple of 512.
    pub size: u64,
    /// qcow2 cluster size (0: 64 KiB).
    pub cluster_size: u32,
    /// qcow2 backing image to write into the header: its name, as it is
    /// to be recorded (blkmesh never opens it from there), and its format.
    pub backing: Option<(String, Format)>,
    pub preallocation: Preallocation,
}

/// Creates an image at `path`, which must not exist yet.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), ImageError> {
    check(opts)?;
    if path.symlink_metadata().is_ok() {
        return Err(ImageError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::EEXIST),
        });
    }
    let storage_opts = StorageCreateOptions::new()
        .filename(PathBuf::from(path))
        .overwrite(false);
    let storage = Storage::create_open(storage_opts).map_err(open_err(path))?;
    let prealloc = match opts.preallocation {
        Preallocation::Off => PreallocateMode::None,
        Preallocation::Metadata => PreallocateMode::FormatAllocate,
    };
    let made = match opts.format {
        Format::Raw => Raw::create_builder(storage)
            .size(opts.size)
            .preallocate(prealloc)
            .create(),
        Format::Qcow2 => {
            let mut b = Qcow2::<Storage>::create_builder(storage)
                .size(opts.size)
                .preallocate(prealloc);
            if opts.cluster_size != 0 {
                b = b.cluster_size(opts.cluster_size as usize);
            }
            if let Some((name, format)) = &opts.backing {
                b = b.backing(name.clone(), format.name().to_string());
            }
            b.create()
        }
    };
    if let Err(e) = made {
        // Leave nothing half-made behind.
        let _ = std::fs::remove_file(path);
        return Err(open_err(path)(e));
    }
    Ok(())
}

fn check(opts: &CreateOptions) -> Result<(), ImageError> {
    let bad = |m: String| Err(ImageError::Invalid(m));
    if opts.size == 0 || opts.size % 512 != 0 || opts.size > MAX_IMAGE_SIZE {
        return bad(format!(
            "size must be a non-zero multiple of 512 of at most {MAX_IMAGE_SIZE} (got {})",
            opts.size
        ));
    }
    let c = opts.cluster_size;
    if c != 0
        && (opts.format != Format::Qcow2 || !c.is_power_of_two() || !(512..=2 << 20).contains(&c))
    {
        return bad(format!(
            "cluster size must be a power of two from 512 to 2 MiB, and only for qcow2 (got {c})"
        ));
    }
    match (&opts.backing, opts.format) {
        (Some(_), Format::Raw) => bad("a raw image cannot have a backing image".into()),
        (Some((name, _)), _) if name.is_empty() || name.len() > 1023 => bad(format!(
            "backing name must be 1 to 1023 bytes (got {})",
            name.len()
        )),
        (Some(_), _) if opts.preallocation != Preallocation::Off => {
            bad("an image with a backing image cannot be preallocated".into())
        }
        _ => Ok(()),
    }
}
