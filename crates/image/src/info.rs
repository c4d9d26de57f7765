//! Describing an image: `image info`, as `qemu-img info`.

use std::path::{Path, PathBuf};

use imago::{FormatAccess, ShallowMapping};

use crate::chain::{open_chain, open_storage, probe_format, Format, Layer, Storage};
use crate::error::{open_err, ImageError};

/// What an image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file takes on the host (allocated blocks).
    pub disk_size: u64,
    /// qcow2 cluster size (0 for raw).
    pub cluster_size: u64,
    /// The backing file and format the header names (never opened here).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Bytes of the virtual disk that this image itself holds (allocated
    /// or explicitly zero), as `qemu-img map` counts them.
    pub allocated: u64,
}

/// Describes the image at `path` (its format probed from its first
/// bytes), opened read-only and without its backing file.
pub fn info(path: &Path) -> Result<ImageInfo, ImageError> {
    info_as(path, probe_format(path)?)
}

/// Describes the image at `path` as an image of `format` (a raw disk whose
/// guest wrote a qcow2 header into it is still raw).
pub fn info_as(path: &Path, format: Format) -> Result<ImageInfo, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let image = open_chain(vec![Layer {
        no_backing: true,
        ..Layer::read_only(format, path)
    }])?;
    let meta = std::fs::metadata(path).map_err(open_err(path))?;
    let (backing_file, backing_format, cluster_size) = header_fields(path, format)?;
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size: image.size(),
        disk_size: meta.blocks() * 512,
        cluster_size,
        backing_file,
        backing_format,
        allocated: allocated(&image).map_err(open_err(path))?,
    })
}

/// The backing file, its format and the cluster size from a header.
fn header_fields(
    path: &Path,
    format: Format,
) -> Result<(Option<String>, Option<String>, u64), ImageError> {
    if format != Format::Qcow2 {
        return Ok((None, None, 0));
    }
    use std::io::Read;
    let mut header = [0u8; 24];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(open_err(path))?;
    // cluster_bits, big-endian at byte 20 (imago checked it on open).
    let bits = u32::from_be_bytes([header[20], header[21], header[22], header[23]]);
    let cluster = 1u64.checked_shl(bits).unwrap_or(0);
    let storage = open_storage(Layer::read_only(format, path))?.0;
    let q = imago::qcow2::Qcow2::<Storage>::open_image(storage, false).map_err(open_err(path))?;
    Ok((
        q.implicit_backing_file().cloned(),
        q.implicit_backing_format().cloned(),
        cluster,
    ))
}

/// Bytes of the top layer that are its own (not its backing image's).
fn allocated(image: &FormatAccess<Storage>) -> std::io::Result<u64> {
    let size = image.size();
    let mut at = 0u64;
    let mut own = 0u64;
    while at < size {
        let (m, len) = image.get_shallow_mapping(at, size - at)?;
        if len == 0 {
            break;
        }
        match m {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => own += len,
            ShallowMapping::Zero { explicit: true, .. } => own += len,
            _ => {}
        }
        at += len;
    }
    Ok(own)
}
