//! Least privilege for the blkmesh processes.
//!
//! Three independent, opt-in layers, each a few lines in a binary's `main`
//! (the threat model behind them is `docs/SECURITY.md`):
//!
//! 1. **Socket permissions** ([`SocketPolicy`]): every unix socket a process
//!    creates (worker sockets, vhost-user export sockets, the manager's
//!    `--unix` socket) gets mode `0600` by default, or the mode, owner and
//!    group given with `--socket-mode`, `--socket-owner` and
//!    `--socket-group`. Connecting to a unix socket needs write permission on
//!    it, so `0600` means "only the owner", `0660` "owner and group".
//! 2. **An unprivileged user** ([`drop_privileges`]): a process that had to
//!    start as root (to bind a socket in `/run`, say) switches for good to
//!    `--user NAME[:GROUP]` once its socket is bound. A worker then opens
//!    only what that user may open: the files and devices of its nodes must
//!    be readable (and writable, for writable exports) by it — that is how a
//!    worker is limited to "what its nodes need".
//! 3. **A seccomp filter per process kind** ([`seccomp`]): an allow-list of
//!    the system calls that [`Kind::Manager`], [`Kind::Frontend`] or
//!    [`Kind::Worker`] make after start-up, installed on every thread
//!    (TSYNC). `--seccomp=enforce` kills the process on any other call,
//!    `--seccomp=errno` fails it with `EPERM`, `--seccomp=log` lets it
//!    through and has the kernel log it (to find a missing one), and
//!    `--seccomp=off` (the default) installs nothing. The lists were found by
//!    tracing the real processes; see [`seccomp`] for them and how.
//!
//! Order matters: resolve names and parse flags first (user and group
//! look-ups read `/etc/passwd` and may load NSS modules), bind sockets, apply
//! the socket policy, drop privileges, and install the seccomp filter last,
//! since it forbids `setuid` and friends.
//!
//! [`SandboxArgs`] and [`UserArgs`] are clap argument groups that the
//! binaries flatten into their own. A worker, once its socket is bound:
//!
//! ```no_run
//! use blkmesh_sandbox::{Kind, SandboxArgs, UserArgs};
//! # fn bind(_: &std::path::Path) {}
//! # let (sandbox, user) = (SandboxArgs::default(), UserArgs::default());
//! let socket = std::path::Path::new("/run/blkmesh/worker0.sock");
//! bind(socket);
//! sandbox.apply_socket_policy(socket)?; // --socket-mode/-owner/-group
//! user.drop_privileges()?; // --user, if given
//! sandbox.install_seccomp(Kind::Worker)?; // --seccomp, if not off
//! # Ok::<(), blkmesh_sandbox::SandboxError>(())
//! ```
//!
//! A process that creates sockets later (the frontend's exports) installs
//! the policy once with [`SocketPolicy::install_global`] and applies
//! [`SocketPolicy::global`] after each bind.

#![forbid(unsafe_code)]
#![deny(unsafe_code)]

mod cli;
mod dumpable;
mod error;
mod kind;
mod listener;
mod privileges;
pub mod seccomp;
mod socket;

pub use cli::{SandboxArgs, UserArgs};
pub use dumpable::set_not_dumpable;
pub use error::SandboxError;
pub use listener::UnixSocketKind;
pub use privileges::{drop_privileges, drop_to, resolve_identity, set_no_new_privs, Identity};
pub use seccomp::{Action, Kind, SeccompMode};
pub use socket::{parse_mode, resolve_group, resolve_user, SocketPolicy};

/// Re-exported so callers need no direct nix dependency for the ids.
pub use nix::unistd::{Gid, Uid};
