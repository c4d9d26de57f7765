//! Command-line flags, as clap argument groups to `#[command(flatten)]`.

use std::path::Path;

use crate::privileges::{drop_to, resolve_identity, Identity};
use crate::seccomp::{self, Kind, SeccompMode};
use crate::socket::{parse_mode, SocketPolicy};
use crate::SandboxError;

/// `--socket-mode`, `--socket-owner`, `--socket-group` and `--seccomp`:
/// for every blkmesh daemon.
#[derive(Clone, Debug, clap::Args)]
pub struct SandboxArgs {
    /// Permission bits (octal) of the unix sockets this process creates;
    /// connecting needs write permission, so 0600 admits only the owner and
    /// 0660 the group too.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Owner (user name or uid) to give those sockets.
    #[arg(long, value_name = "NAME|UID")]
    pub socket_owner: Option<String>,
    /// Group (group name or gid) to give those sockets, e.g. the VMM's
    /// group with --socket-mode 0660.
    #[arg(long, value_name = "NAME|GID")]
    pub socket_group: Option<String>,
    /// Seccomp filter for this process kind, installed once it has started:
    /// `enforce` kills the process on a system call outside its allow-list,
    /// `errno` fails the call with EPERM, `log` only has the kernel log it
    /// (dmesg, audit type 1326), `off` installs nothing.
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        default_value_t = SeccompMode::Off,
        env = "BLKMESH_SECCOMP"
    )]
    pub seccomp: SeccompMode,
}

impl Default for SandboxArgs {
    fn default() -> Self {
        SandboxArgs {
            socket_mode: SocketPolicy::DEFAULT_MODE,
            socket_owner: None,
            socket_group: None,
            seccomp: SeccompMode::Off,
        }
    }
}

impl SandboxArgs {
    /// The socket policy these flags describe (owner and group resolved).
    pub fn socket_policy(&self) -> Result<SocketPolicy, SandboxError> {
        let mut p = SocketPolicy::parse(
            None,
            self.socket_owner.as_deref(),
            self.socket_group.as_deref(),
        )?;
        p.mode = self.socket_mode;
        Ok(p)
    }

    /// Applies the socket policy to `path`.
    pub fn apply_socket_policy(&self, path: &Path) -> Result<(), SandboxError> {
        self.socket_policy()?.apply(path)
    }

    /// Installs `kind`'s seccomp filter as `--seccomp` asks (nothing for
    /// `off`). Call it last: after sockets are bound and privileges dropped.
    pub fn install_seccomp(&self, kind: Kind) -> Result<(), SandboxError> {
        seccomp::install_mode(kind, self.seccomp)
    }
}

/// `--user USER[:GROUP]`: the unprivileged user to switch to.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct UserArgs {
    /// Run as this user once the socket is bound (user name or uid,
    /// optionally `:GROUP` instead of the user's primary group). The files
    /// and devices this process opens must then be accessible to it.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
}

impl UserArgs {
    /// Resolves `--user` (do it early: look-ups read /etc/passwd).
    pub fn identity(&self) -> Result<Option<Identity>, SandboxError> {
        self.user.as_deref().map(resolve_identity).transpose()
    }

    /// Switches to `--user`, if given (see [`crate::drop_privileges`]).
    pub fn drop_privileges(&self) -> Result<Option<Identity>, SandboxError> {
        let Some(id) = self.identity()? else {
            return Ok(None);
        };
        drop_to(&id)?;
        Ok(Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxArgs,
        #[command(flatten)]
        user: UserArgs,
    }

    #[test]
    fn defaults_are_0600_no_seccomp_no_user() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.sandbox.socket_mode, 0o600);
        if std::env::var_os("BLKMESH_SECCOMP").is_none() {
            assert_eq!(cli.sandbox.seccomp, SeccompMode::Off);
        }
        assert_eq!(
            cli.sandbox.socket_policy().unwrap(),
            SocketPolicy::default()
        );
        assert!(cli.user.user.is_none());
    }

    #[test]
    fn parses_every_flag() {
        let cli = Cli::try_parse_from([
            "x",
            "--socket-mode",
            "0660",
            "--socket-owner",
            "root",
            "--socket-group",
            "0",
            "--seccomp",
            "enforce",
            "--user",
            "nobody",
        ])
        .unwrap();
        let p = cli.sandbox.socket_policy().unwrap();
        assert_eq!(p.mode, 0o660);
        assert_eq!(p.owner.map(|u| u.as_raw()), Some(0));
        assert_eq!(p.group.map(|g| g.as_raw()), Some(0));
        assert_eq!(cli.sandbox.seccomp, SeccompMode::Enforce);
        assert_eq!(cli.user.user.as_deref(), Some("nobody"));
        for mode in ["off", "log", "errno", "enforce"] {
            assert!(Cli::try_parse_from(["x", "--seccomp", mode]).is_ok());
        }
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Cli::try_parse_from(["x", "--socket-mode", "4755"]).is_err());
        assert!(Cli::try_parse_from(["x", "--seccomp", "strict"]).is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
