//! Waiting out the direct I/O a dead worker left in the kernel.
//!
//! A worker killed with io_uring requests in flight is gone before they
//! are: the kernel tears its rings down in a work item after the process
//! exits, and reads and writes already in the block layer (O_DIRECT, held
//! by a cgroup's throttle, on a slow disk) complete whenever they complete.
//! A write resubmitted by the frontend could complete first, the guest then
//! write the same sectors again, and the original land last over the newer
//! data.
//!
//! A filesystem waits for a file's direct I/O in flight (`inode_dio_wait`)
//! before it changes the file's allocation, whoever submitted that I/O. So
//! before a queue takes such requests over, the replacement asks for an
//! allocation that changes nothing: `fallocate(FALLOC_FL_KEEP_SIZE)` of the
//! file's first block (already allocated in any used image; otherwise an
//! unwritten block that reads as zeroes), which returns once that I/O has
//! finished. Checked on ext4 (`crates/testkit/tests/resubmission.rs`
//! holds a write in the block layer with a cgroup throttle); XFS drains
//! the same way by its source, not checked here. Block devices have no
//! such call; their queues are not settled (docs/RELIABILITY.md).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

/// What settling one file did.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// Every direct request in flight on the file had finished.
    Drained,
    /// Not a regular file (a block device): nothing to wait with.
    NotAFile,
    /// The filesystem cannot allocate (fallocate unsupported): nothing to
    /// wait with.
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
#[error("settling {}: {source}", path.display())]
pub struct SettleError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Waits until the direct I/O in flight on the file at `path`, from any
/// process, has finished (see the module doc).
pub fn settle_file(path: &Path) -> Result<Settled, SettleError> {
    let err = |source| SettleError {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Ok(Settled::NotAFile);
    }
    let file = OpenOptions::new().write(true).open(path).map_err(err)?;
    match fallocate(&file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 4096) {
        Ok(()) => Ok(Settled::Drained),
        Err(nix::errno::Errno::EOPNOTSUPP) => Ok(Settled::Unsupported),
        Err(e) => Err(err(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_file_settles_without_changing_size_or_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [7u8; 8192]).unwrap();
        assert_eq!(settle_file(&path).unwrap(), Settled::Drained);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after, vec![7u8; 8192]);
        // A sparse file stays the size it was and reads zeroes.
        let sparse = dir.path().join("sparse");
        std::fs::File::create(&sparse)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        assert_eq!(settle_file(&sparse).unwrap(), Settled::Drained);
        let m = std::fs::metadata(&sparse).unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(
            m.blocks() * 512 <= 8192,
            "one block at most: {}",
            m.blocks()
        );
        assert!(std::fs::read(&sparse).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn devices_are_not_files_and_missing_paths_are_errors() {
        assert_eq!(
            settle_file(Path::new("/dev/null")).unwrap(),
            Settled::NotAFile
        );
        assert!(settle_file(Path::new("/nonexistent/blkmesh-settle")).is_err());
    }
}
