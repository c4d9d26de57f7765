//! Permissions of the unix sockets a process creates.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;

use nix::fcntl::{open, AtFlags, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Group, Uid, User};

use crate::listener::{listen_secured, UnixSocketKind};
use crate::SandboxError;

/// Who may connect to a unix socket this process created.
///
/// Connecting to a unix socket needs write permission on its file, so the
/// default `0600` lets only the owner (the user the process runs as, or
/// `owner`) connect, and `0660` adds the members of `group` — e.g. the group
/// a VMM runs as, for vhost-user export sockets. The directory holding the
/// sockets should not be writable by anyone the sockets are kept from: who
/// can write there can remove a socket and bind their own in its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPolicy {
    /// Permission bits (at most `0o777`).
    pub mode: u32,
    /// New owner, if not the process's user (changing it needs root or
    /// CAP_CHOWN).
    pub owner: Option<Uid>,
    /// New group, if not the process's group (a group the process is not a
    /// member of needs root or CAP_CHOWN).
    pub group: Option<Gid>,
}

impl Default for SocketPolicy {
    fn default() -> Self {
        SocketPolicy {
            mode: Self::DEFAULT_MODE,
            owner: None,
            group: None,
        }
    }
}

static GLOBAL: OnceLock<SocketPolicy> = OnceLock::new();

impl SocketPolicy {
    /// Owner read and write only.
    pub const DEFAULT_MODE: u32 = 0o600;

    /// The policy of command-line values: `mode` in octal (`0660`), `owner`
    /// and `group` as names or numbers. Names are resolved now.
    pub fn parse(
        mode: Option<&str>,
        owner: Option<&str>,
        group: Option<&str>,
    ) -> Result<Self, SandboxError> {
        Ok(SocketPolicy {
            mode: mode
                .map(parse_mode)
                .transpose()?
                .unwrap_or(Self::DEFAULT_MODE),
            owner: owner.map(resolve_user).transpose()?,
            group: group.map(resolve_group).transpose()?,
        })
    }

    /// Creates a listening unix socket at `path` that has this policy's
    /// owner, group and mode from the moment the path exists.
    ///
    /// Binding creates the socket file with `0777 & !umask`, and a chmod
    /// after it leaves a window in which anyone may connect. So the socket
    /// is bound in a fresh private directory next to `path` (mode 0700, so
    /// nobody else can reach the file there), given the policy, set
    /// listening, and only then renamed onto `path` (atomically replacing a
    /// stale socket left there). The private directory is removed again,
    /// also on failure.
    ///
    /// Anything at `path` that is not a socket is left alone and refused.
    /// The returned descriptor is close-on-exec and blocking.
    pub fn listen_unix(
        &self,
        path: &Path,
        kind: UnixSocketKind,
        backlog: i32,
    ) -> Result<OwnedFd, SandboxError> {
        listen_secured(path, kind, backlog, |bound| self.apply(bound))
    }

    /// Gives the socket at `path`, just bound by this process, this policy's
    /// owner, group and mode.
    ///
    /// The path is opened with `O_PATH | O_NOFOLLOW` and must be a socket,
    /// and the changes go through that descriptor, so a symlink or another
    /// file swapped in at `path` is refused rather than changed.
    pub fn apply(&self, path: &Path) -> Result<(), SandboxError> {
        let err = |op| {
            move |source| SandboxError::Path {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let fd = open(
            path,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("opening"))?;
        let st = fstat(fd.as_fd()).map_err(err("stat"))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
            return Err(SandboxError::NotASocket(path.to_path_buf()));
        }
        if self.owner.is_some() || self.group.is_some() {
            fchownat(
                fd.as_fd(),
                "",
                self.owner,
                self.group,
                AtFlags::AT_EMPTY_PATH,
            )
            .map_err(err("chown"))?;
        }
        // fchmod() does not work on an O_PATH descriptor (nor would it reach
        // the file of a socket); /proc/self/fd/N names the very inode opened.
        let via_proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let perms = std::fs::Permissions::from_mode(self.mode);
        match std::fs::set_permissions(&via_proc, perms.clone()) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // No /proc: fall back to the path, checked once more.
                let again =
                    std::fs::symlink_metadata(path).map_err(|e| err("stat")(errno_of(&e)))?;
                if !std::os::unix::fs::FileTypeExt::is_socket(&again.file_type()) {
                    return Err(SandboxError::NotASocket(path.to_path_buf()));
                }
                std::fs::set_permissions(path, perms).map_err(|e| err("chmod")(errno_of(&e)))
            }
            Err(e) => Err(err("chmod")(errno_of(&e))),
        }
    }

    /// Makes `self` the policy that [`SocketPolicy::global`] returns, for
    /// code that creates sockets long after `main` (the frontend's export
    /// sockets). Returns false, changing nothing, if one was installed
    /// already.
    pub fn install_global(self) -> bool {
        GLOBAL.set(self).is_ok()
    }

    /// The policy installed with [`SocketPolicy::install_global`], or the
    /// default (`0600`, owner and group unchanged).
    pub fn global() -> SocketPolicy {
        GLOBAL.get().copied().unwrap_or_default()
    }
}

fn errno_of(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Parses permission bits in octal: `0660`, `660` or `0o660`. Bits above
/// `0o777` (setuid, setgid, sticky) are refused.
pub fn parse_mode(s: &str) -> Result<u32, SandboxError> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(SandboxError::Mode(s.to_string()));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| SandboxError::Mode(s.to_string()))?;
    if mode > 0o777 {
        return Err(SandboxError::Mode(s.to_string()));
    }
    Ok(mode)
}

/// A user name or a numeric uid. A number is taken as a uid even if no
/// passwd entry has it (containers often run with such ids).
pub fn resolve_user(s: &str) -> Result<Uid, SandboxError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Uid::from_raw(n));
    }
    match User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid),
        Ok(None) => Err(SandboxError::UnknownUser(s.to_string())),
        Err(source) => Err(SandboxError::Lookup {
            what: "user",
            name: s.to_string(),
            source,
        }),
    }
}

/// A group name or a numeric gid (taken as is, like [`resolve_user`]).
pub fn resolve_group(s: &str) -> Result<Gid, SandboxError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(SandboxError::UnknownGroup(s.to_string())),
        Err(source) => Err(SandboxError::Lookup {
            what: "group",
            name: s.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_octal_modes() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("660").unwrap(), 0o660);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        assert_eq!(parse_mode("0").unwrap(), 0);
        assert_eq!(parse_mode("0777").unwrap(), 0o777);
    }

    #[test]
    fn rejects_bad_modes() {
        for bad in [
            "", "0o", "rw", "0800", "4755", "1777", "-600", "06600", "0x600",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resolves_users_and_groups_by_name_and_number() {
        assert_eq!(resolve_user("root").unwrap(), Uid::from_raw(0));
        assert_eq!(resolve_user("0").unwrap(), Uid::from_raw(0));
        assert_eq!(resolve_user("4242").unwrap(), Uid::from_raw(4242));
        assert_eq!(resolve_group("root").unwrap(), Gid::from_raw(0));
        assert_eq!(resolve_group("4243").unwrap(), Gid::from_raw(4243));
        assert!(matches!(
            resolve_user("no-such-user-blkmesh"),
            Err(SandboxError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve_group("no-such-group-blkmesh"),
            Err(SandboxError::UnknownGroup(_))
        ));
    }

    #[test]
    fn parse_defaults_to_0600_and_no_chown() {
        assert_eq!(
            SocketPolicy::parse(None, None, None).unwrap(),
            SocketPolicy::default()
        );
        let p = SocketPolicy::parse(Some("0660"), Some("0"), Some("root")).unwrap();
        assert_eq!(p.mode, 0o660);
        assert_eq!(p.owner, Some(Uid::from_raw(0)));
        assert_eq!(p.group, Some(Gid::from_raw(0)));
    }
}
