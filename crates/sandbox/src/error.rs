use std::path::PathBuf;

use crate::kind::Kind;

/// Everything that can go wrong while narrowing a process's privileges.
///
/// None of these should be ignored: a process that asked for a sandbox and
/// did not get it must not go on as if it had.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid socket mode {0:?}: expected octal permission bits such as 0600 or 0660")]
    Mode(String),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("uid {0} has no passwd entry, so its group is unknown: name one (--user {0}:GID)")]
    NoPrimaryGroup(u32),
    #[error("looking up {what} {name:?}")]
    Lookup {
        what: &'static str,
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("{}: exists and is not a unix socket; not replacing it", .0.display())]
    PathTaken(PathBuf),
    #[error("{}: not a unix socket", .0.display())]
    NotASocket(PathBuf),
    #[error("{op} {}", path.display())]
    Path {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("switching to user {user}: {op}")]
    Privileges {
        user: String,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("switching to user {user}: still {what} afterwards")]
    NotDropped { user: String, what: String },
    #[error("building the {kind} seccomp filter")]
    Filter {
        kind: Kind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter")]
    Install {
        kind: Kind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("seccomp filters are not supported on {0}")]
    UnsupportedArch(&'static str),
}
