//! Why an image could not be opened or created.

use std::io;
use std::path::{Path, PathBuf};

use crate::header::MAX_CHAIN_DEPTH;

/// Why an image could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: its header names the backing file {named:?}; name the backing node \
         explicitly (or set no_backing to read unallocated clusters as zeroes)"
    )]
    BackingNotGiven { path: PathBuf, named: String },
    #[error("{path}: a raw image has no backing file; it cannot sit over {below}")]
    RawOverBacking { path: PathBuf, below: PathBuf },
    #[error("a chain of {0} images is deeper than {MAX_CHAIN_DEPTH}")]
    TooDeep(usize),
    #[error("an image chain needs at least one image")]
    Empty,
    #[error("{0}")]
    Invalid(String),
}

impl ImageError {
    /// The errno this error is at the edges: EINVAL for what the caller or
    /// the image got wrong, the system's errno where it said one.
    pub fn errno(&self) -> i32 {
        match self {
            ImageError::Open { source, .. } => match source.raw_os_error() {
                Some(e) => e,
                None if source.kind() == io::ErrorKind::NotFound => libc::ENOENT,
                None => libc::EINVAL,
            },
            _ => libc::EINVAL,
        }
    }
}

pub(crate) fn open_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    }
}
