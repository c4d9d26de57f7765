//! Unix listening sockets whose permissions are final before anyone can
//! reach them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{open, renameat2, OFlag, RenameFlags, AT_FDCWD};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::SandboxError;

/// Longest path `bind(2)` takes for a unix socket (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// The kind of unix socket [`crate::SocketPolicy::listen_unix`] creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixSocketKind {
    /// `SOCK_STREAM`: vhost-user exports, the manager's gRPC socket.
    Stream,
    /// `SOCK_SEQPACKET`: worker control channels.
    SeqPacket,
}

/// Creates a listening unix socket at `path` that already has its final
/// owner, group and mode (set by `secure` on the bound file) when the path
/// appears: see [`crate::SocketPolicy::listen_unix`].
pub(crate) fn listen_secured(
    path: &Path,
    kind: UnixSocketKind,
    backlog: i32,
    secure: impl FnOnce(&Path) -> Result<(), SandboxError>,
) -> Result<OwnedFd, SandboxError> {
    let err = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| SandboxError::Path {
            op,
            path: p,
            source,
        }
    };
    let name = path
        .file_name()
        .ok_or_else(|| SandboxError::NotASocket(path.to_path_buf()))?;
    if path.as_os_str().len() > SUN_PATH_MAX {
        return Err(err("binding", path)(nix::Error::ENAMETOOLONG));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => return Err(SandboxError::PathTaken(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("stat", path)(errno_of(&e))),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut private = PrivateDir::create(parent)?;
    private.entry = Some(name.to_os_string());
    let temp = private.path.join(name);
    let sock = socket::socket(
        AddressFamily::Unix,
        match kind {
            UnixSocketKind::Stream => SockType::Stream,
            UnixSocketKind::SeqPacket => SockType::SeqPacket,
        },
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("creating a socket for", path))?;
    // A path that is too long for sun_path inside the private
    // directory is reached through the directory's descriptor.
    let dirfd;
    let bind_at = if temp.as_os_str().len() <= SUN_PATH_MAX {
        temp.clone()
    } else {
        dirfd = open(
            &private.path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("opening", &private.path))?;
        PathBuf::from(format!("/proc/self/fd/{}", dirfd.as_raw_fd())).join(name)
    };
    let addr = UnixAddr::new(&bind_at).map_err(err("binding", path))?;
    socket::bind(sock.as_raw_fd(), &addr).map_err(err("binding", &temp))?;
    secure(&temp)?;
    let backlog = Backlog::new(backlog).map_err(err("listening on", path))?;
    socket::listen(&sock, backlog).map_err(err("listening on", path))?;
    renameat2(AT_FDCWD, &temp, AT_FDCWD, path, RenameFlags::empty())
        .map_err(err("renaming a socket onto", path))?;
    private.remove()?;
    Ok(sock)
}

/// A mode-0700 directory that is removed (with `entry` in it) when
/// dropped.
struct PrivateDir {
    path: PathBuf,
    entry: Option<std::ffi::OsString>,
    removed: bool,
}

impl PrivateDir {
    fn create(parent: &Path) -> Result<PrivateDir, SandboxError> {
        use std::hash::{BuildHasher, Hasher};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // Random keys from getrandom (no getpid: the frontend's seccomp
        // filter does not allow it).
        let keys = std::hash::RandomState::new();
        let mut last = nix::Error::EEXIST;
        for _ in 0..16 {
            let mut h = keys.build_hasher();
            h.write_u32(SEQ.fetch_add(1, Ordering::Relaxed));
            let path = parent.join(format!(".bm{:x}", h.finish() as u32));
            // The umask can only take bits away: at most 0700.
            match mkdirat(AT_FDCWD, &path, Mode::S_IRWXU) {
                Ok(()) => {
                    return Ok(PrivateDir {
                        path,
                        entry: None,
                        removed: false,
                    })
                }
                Err(e @ nix::Error::EEXIST) => last = e,
                Err(e) => {
                    return Err(SandboxError::Path {
                        op: "creating a private directory in",
                        path: parent.to_path_buf(),
                        source: e,
                    })
                }
            }
        }
        Err(SandboxError::Path {
            op: "creating a private directory in",
            path: parent.to_path_buf(),
            source: last,
        })
    }

    fn remove(mut self) -> Result<(), SandboxError> {
        self.removed = true;
        unlinkat(AT_FDCWD, &self.path, UnlinkatFlags::RemoveDir).map_err(|source| {
            SandboxError::Path {
                op: "removing",
                path: self.path.clone(),
                source,
            }
        })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Only the socket can be in it (no read_dir: getdents is not on
        // every seccomp allow-list).
        if let Some(entry) = &self.entry {
            let _ = unlinkat(AT_FDCWD, &self.path.join(entry), UnlinkatFlags::NoRemoveDir);
        }
        let _ = unlinkat(AT_FDCWD, &self.path, UnlinkatFlags::RemoveDir);
    }
}

fn errno_of(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SocketPolicy;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn binds_with_the_final_mode_and_leaves_no_private_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let policy = SocketPolicy {
            mode: 0o640,
            ..SocketPolicy::default()
        };
        let fd = policy
            .listen_unix(&sock, UnixSocketKind::Stream, 8)
            .unwrap();
        assert_eq!(mode(&sock), 0o640);
        let listener = UnixListener::from(fd);
        let _client = UnixStream::connect(&sock).unwrap();
        listener.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.sock")]);
    }

    #[test]
    fn replaces_a_stale_socket_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        drop(UnixListener::bind(&sock).unwrap());
        let policy = SocketPolicy::default();
        let fd = policy
            .listen_unix(&sock, UnixSocketKind::SeqPacket, 8)
            .unwrap();
        assert_eq!(mode(&sock), 0o600);
        drop(fd);
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(
            policy.listen_unix(&file, UnixSocketKind::Stream, 8),
            Err(SandboxError::PathTaken(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // A failed bind leaves no private directory behind.
        let missing = dir.path().join("no-such-dir").join("s");
        assert!(policy
            .listen_unix(&missing, UnixSocketKind::Stream, 8)
            .is_err());
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 2, "only s and f are left");
    }

    #[test]
    fn long_paths_bind_through_the_directory_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        while deep.as_os_str().len() < SUN_PATH_MAX - 8 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let sock = deep.join("x");
        assert!(sock.as_os_str().len() <= SUN_PATH_MAX);
        let fd = SocketPolicy::default()
            .listen_unix(&sock, UnixSocketKind::Stream, 8)
            .unwrap();
        let _l = UnixListener::from(fd);
        UnixStream::connect(&sock).unwrap();
        assert_eq!(mode(&sock), 0o600);
    }
}
