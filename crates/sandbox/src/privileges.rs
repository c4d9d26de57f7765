//! Giving up root for an unprivileged user, for good.

use nix::unistd::{
    getgroups, getresgid, getresuid, setgroups, setresgid, setresuid, Gid, Uid, User,
};

use crate::socket::resolve_group;
use crate::SandboxError;

/// The user (and group) a process switches to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// As given (for messages).
    pub name: String,
    pub uid: Uid,
    /// The only group the process keeps: the user's primary group, or the
    /// one named after the colon.
    pub gid: Gid,
}

/// Resolves `USER[:GROUP]`: a user name or uid, and optionally a group name
/// or gid to use instead of the user's primary group (e.g. `blkmesh:disk`
/// for a worker that opens block devices). A bare uid with no passwd entry
/// needs the group.
pub fn resolve_identity(spec: &str) -> Result<Identity, SandboxError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(SandboxError::UnknownUser(spec.to_string()));
    }
    let lookup = |r: nix::Result<Option<User>>| {
        r.map_err(|source| SandboxError::Lookup {
            what: "user",
            name: user.to_string(),
            source,
        })
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => {
            // A numeric uid needs no passwd entry; the entry (if any) only
            // supplies the primary group. A failed lookup (static binaries
            // in an image without /etc/passwd or NSS get ENOENT) is the same
            // as no entry: `UID:GID` works, a bare `UID` asks for a group.
            let uid = Uid::from_raw(n);
            (uid, User::from_uid(uid).ok().flatten().map(|u| u.gid))
        }
        Err(_) => match lookup(User::from_name(user))? {
            Some(u) => (u.uid, Some(u.gid)),
            None => return Err(SandboxError::UnknownUser(user.to_string())),
        },
    };
    let gid = match group {
        Some(g) => resolve_group(g)?,
        None => primary.ok_or(SandboxError::NoPrimaryGroup(uid.as_raw()))?,
    };
    Ok(Identity {
        name: spec.to_string(),
        uid,
        gid,
    })
}

/// Switches this process to `user` (`USER[:GROUP]`, see
/// [`resolve_identity`]) for good, and sets `no_new_privs`.
///
/// Call it once the process holds what only root could get (a socket bound
/// in a root-owned directory), before it opens anything on behalf of a
/// client: from then on it can open only what `user` may. For a worker this
/// means the files and block devices of its nodes must be accessible to
/// `user` (and the throttle-group segments in `/dev/shm` it shares with the
/// other workers must be too: run every worker as the same user).
///
/// What it does: `setgroups([gid])`, `setresgid(gid, gid, gid)`,
/// `setresuid(uid, uid, uid)` (glibc applies these to every thread of the
/// process), `PR_SET_NO_NEW_PRIVS` (for the calling thread and the threads
/// it starts later; the seccomp filter's TSYNC extends it to all), and then
/// checks that the real, effective and saved ids all changed, no other
/// group is left and, for a non-root user, no capability is effective.
/// Leaving root clears the process's capabilities and makes it
/// non-dumpable, which also keeps guest memory out of core dumps.
pub fn drop_privileges(user: &str) -> Result<Identity, SandboxError> {
    let id = resolve_identity(user)?;
    drop_to(&id)?;
    Ok(id)
}

/// [`drop_privileges`] with an identity resolved earlier.
pub fn drop_to(id: &Identity) -> Result<(), SandboxError> {
    let fail = |op| {
        move |source| SandboxError::Privileges {
            user: id.name.clone(),
            op,
            source,
        }
    };
    let (uid, gid) = (id.uid, id.gid);
    let already = getresuid().is_ok_and(|r| r.real == uid && r.effective == uid && r.saved == uid)
        && getresgid().is_ok_and(|r| r.real == gid && r.effective == gid && r.saved == gid)
        && getgroups().is_ok_and(|g| g.iter().all(|&x| x == gid));
    if !already {
        setgroups(&[gid]).map_err(fail("setgroups"))?;
        setresgid(gid, gid, gid).map_err(fail("setresgid"))?;
        setresuid(uid, uid, uid).map_err(fail("setresuid"))?;
    }
    set_no_new_privs()?;
    verify(id)?;
    tracing::info!(
        user = %id.name,
        uid = uid.as_raw(),
        gid = gid.as_raw(),
        "running as an unprivileged user"
    );
    Ok(())
}

/// Sets `PR_SET_NO_NEW_PRIVS` on the calling thread (inherited by threads
/// and processes it creates): no execve can grant privileges from then on.
pub fn set_no_new_privs() -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(|source| SandboxError::Privileges {
        user: String::new(),
        op: "prctl(PR_SET_NO_NEW_PRIVS)",
        source,
    })
}

fn verify(id: &Identity) -> Result<(), SandboxError> {
    let not = |what: String| SandboxError::NotDropped {
        user: id.name.clone(),
        what,
    };
    let fail = |op| {
        move |source| SandboxError::Privileges {
            user: id.name.clone(),
            op,
            source,
        }
    };
    let u = getresuid().map_err(fail("getresuid"))?;
    if [u.real, u.effective, u.saved] != [id.uid; 3] {
        return Err(not(format!("uid {}/{}/{}", u.real, u.effective, u.saved)));
    }
    let g = getresgid().map_err(fail("getresgid"))?;
    if [g.real, g.effective, g.saved] != [id.gid; 3] {
        return Err(not(format!("gid {}/{}/{}", g.real, g.effective, g.saved)));
    }
    let groups = getgroups().map_err(fail("getgroups"))?;
    if groups.iter().any(|&x| x != id.gid) {
        return Err(not(format!("in groups {groups:?}")));
    }
    if !id.uid.is_root() {
        if let Some(caps) = effective_capabilities() {
            if caps != 0 {
                return Err(not(format!("holding capabilities {caps:#x}")));
            }
        }
    }
    Ok(())
}

/// CapEff of this thread from /proc, if /proc is there.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_user_and_group_specs() {
        let root = resolve_identity("root").unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        let numeric = resolve_identity("0").unwrap();
        assert_eq!(numeric.gid, Gid::from_raw(0));
        let with_group = resolve_identity("root:4321").unwrap();
        assert_eq!(with_group.gid, Gid::from_raw(4321));
        let bare = resolve_identity("4242:4243").unwrap();
        assert_eq!((bare.uid.as_raw(), bare.gid.as_raw()), (4242, 4243));
    }

    #[test]
    fn refuses_unknown_or_incomplete_specs() {
        assert!(resolve_identity("").is_err());
        assert!(resolve_identity("root:").is_err());
        assert!(resolve_identity(":0").is_err());
        assert!(matches!(
            resolve_identity("no-such-user-blkmesh"),
            Err(SandboxError::UnknownUser(_))
        ));
        // A uid without a passwd entry has no primary group to default to.
        assert!(matches!(
            resolve_identity("3999999999"),
            Err(SandboxError::NoPrimaryGroup(3999999999))
        ));
    }
}
