//! Opening an image chain, top first, each layer as the caller names it.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};

use crate::error::{open_err, ImageError};
use crate::header::{self, MAX_CHAIN_DEPTH};

/// The storage every layer sits on: a file or block device (see
/// `masked.rs` for why it is wrapped).
pub type Storage = crate::masked::Masked;
/// An opened image: the top of its chain.
pub type Image = FormatAccess<Storage>;

/// An image format blkmesh opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Where a layer's bytes are.
#[derive(Debug)]
pub enum Source {
    /// A path, opened here.
    Path(PathBuf),
    /// A file the caller opened (a worker hands over a duplicate of its
    /// leaf's descriptor), with the path it was opened from, for messages.
    File(File, PathBuf),
}

/// One layer of a chain.
#[derive(Debug)]
pub struct Layer {
    pub format: Format,
    pub source: Source,
    pub writable: bool,
    /// The file is (to be) opened with O_DIRECT.
    pub direct: bool,
    /// Read without a backing image even though the header names one:
    /// unallocated clusters read as zeroes.
    pub no_backing: bool,
}

impl Layer {
    /// A layer read from `path`, read-only, through the page cache.
    pub fn read_only(format: Format, path: impl Into<PathBuf>) -> Layer {
        Layer {
            format,
            source: Source::Path(path.into()),
            writable: false,
            direct: false,
            no_backing: false,
        }
    }
}

/// Opens a layer's storage; a qcow2 layer's header is checked first.
pub(crate) fn open_storage(layer: Layer) -> Result<(Storage, PathBuf), ImageError> {
    let (file, path) = match layer.source {
        Source::File(file, path) => (file, path),
        Source::Path(path) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(layer.writable)
                .custom_flags(if layer.direct { libc::O_DIRECT } else { 0 })
                .open(&path)
                .map_err(open_err(&path))?;
            (file, path)
        }
    };
    let mut state_bits = false;
    if layer.format == Format::Qcow2 {
        // A block device's length is its size; a file's, its length.
        let len = file
            .metadata()
            .map_err(open_err(&path))?
            .len()
            .max(device_size(&file));
        state_bits = header::check(&file, len, layer.writable).map_err(|why| ImageError::Open {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, why),
        })?;
    }
    let opts = StorageOpenOptions::new()
        .write(layer.writable)
        .direct(layer.direct)
        .filename(path.clone());
    let file = imago::file::File::from_open_file(file, opts).map_err(open_err(&path))?;
    let storage = match state_bits {
        true => Storage::state_bits_clear(file),
        false => Storage::plain(file),
    };
    Ok((storage, path))
}

/// The size of a block device (0 for anything else).
fn device_size(file: &File) -> u64 {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(0));
    size
}

/// Opens a chain, top first: each layer's backing image is the next, the
/// last has none. Nothing is opened that the chain does not name.
pub fn open_chain(layers: Vec<Layer>) -> Result<Image, ImageError> {
    if layers.is_empty() {
        return Err(ImageError::Empty);
    }
    if layers.len() > MAX_CHAIN_DEPTH {
        return Err(ImageError::TooDeep(layers.len()));
    }
    let mut below: Option<(Arc<Image>, PathBuf)> = None;
    let mut top = None;
    let n = layers.len();
    for (i, layer) in layers.into_iter().rev().enumerate() {
        let format = layer.format;
        let no_backing = layer.no_backing;
        let writable = layer.writable;
        let (storage, path) = open_storage(layer)?;
        let image = match format {
            Format::Raw => {
                if let Some((_, below_path)) = &below {
                    return Err(ImageError::RawOverBacking {
                        path,
                        below: below_path.clone(),
                    });
                }
                let raw = guarded(&path, || {
                    Raw::builder(storage)
                        .write(writable)
                        .open(DenyImplicitOpenGate::default())
                })?;
                FormatAccess::new(raw)
            }
            Format::Qcow2 => {
                let backing = below.as_ref().map(|(b, _)| Arc::clone(b));
                let given = backing.is_some();
                let qcow2 = guarded(&path, || {
                    Qcow2::<Storage, Arc<Image>>::builder(storage)
                        .write(writable)
                        .backing(backing)
                        .open(DenyImplicitOpenGate::default())
                })?;
                if let Some(named) = qcow2.implicit_backing_file() {
                    if !given && !no_backing {
                        return Err(ImageError::BackingNotGiven {
                            path,
                            named: named.clone(),
                        });
                    }
                }
                FormatAccess::new(qcow2)
            }
        };
        if i + 1 == n {
            top = Some(image);
        } else {
            below = Some((Arc::new(image), path));
        }
    }
    top.ok_or(ImageError::Empty)
}

/// Runs imago's parsing of an untrusted image: a panic there (an imago
/// bug; the fuzz target finds them, see fuzz/README.md) refuses this image
/// instead of killing the manager or the worker.
fn guarded<T>(path: &Path, f: impl FnOnce() -> io::Result<T>) -> Result<T, ImageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(open_err(path)),
        Err(_) => Err(ImageError::Open {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "the image parser failed on this image (a bug in imago); refused",
            ),
        }),
    }
}

/// Reads the first bytes of `path` and says whether they are a qcow2
/// header (magic `QFI\xfb`); anything else is raw.
pub fn probe_format(path: &Path) -> Result<Format, ImageError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(open_err(path))?;
    let n = f.read(&mut magic).map_err(open_err(path))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    })
}
