//! Socket permissions and the switch to an unprivileged user, in real
//! processes. The ownership and user changes need root: without it those
//! tests say so and pass.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use blkmesh_sandbox::seccomp::{self, Action, Kind};
use blkmesh_sandbox::{drop_privileges, resolve_group, resolve_user, SandboxError, SocketPolicy};
use common::{assert_done, done, no_core_dumps, require_root, run, scenario};
use nix::unistd::{getgroups, getresgid, getresuid, setuid, Uid};

fn nobody() -> (u32, u32) {
    let uid = resolve_user("nobody").expect("a nobody user").as_raw();
    let gid = nix::unistd::User::from_uid(Uid::from_raw(uid))
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    (uid, gid)
}

/// The child side: runs the scenario named in the environment.
#[test]
fn child() {
    let Some(name) = scenario() else {
        return;
    };
    no_core_dumps();
    let dir = common::dir();
    match name.as_str() {
        "drop-to-nobody" => {
            let secret = dir.join("root-only");
            std::fs::write(&secret, b"secret").unwrap();
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
            let id = drop_privileges("nobody").unwrap();
            let (uid, gid) = nobody();
            assert_eq!((id.uid.as_raw(), id.gid.as_raw()), (uid, gid));
            let u = getresuid().unwrap();
            assert!(!u.real.is_root() && !u.effective.is_root() && !u.saved.is_root());
            assert_eq!(u.effective.as_raw(), uid);
            let g = getresgid().unwrap();
            assert_eq!(g.effective.as_raw(), gid);
            assert_eq!(getgroups().unwrap(), vec![id.gid]);
            // No way back, and nothing root-only to open.
            assert_eq!(setuid(Uid::from_raw(0)), Err(nix::Error::EPERM));
            let denied = std::fs::read(&secret).unwrap_err();
            assert_eq!(denied.kind(), std::io::ErrorKind::PermissionDenied);
            assert!(nix::sys::prctl::get_no_new_privs().unwrap());
            // Other threads changed too (glibc applies set*id to all).
            let other = std::thread::spawn(|| getresuid().unwrap().effective)
                .join()
                .unwrap();
            assert_eq!(other.as_raw(), uid);
            done();
        }
        "worker-sequence" => {
            // The worker's order: bind as root, socket policy, drop, seccomp.
            let sock = dir.join("worker.sock");
            let _l = UnixListener::bind(&sock).unwrap();
            let (uid, gid) = nobody();
            let policy = SocketPolicy {
                mode: 0o660,
                owner: None,
                group: Some(nix::unistd::Gid::from_raw(gid)),
            };
            policy.apply(&sock).unwrap();
            // The data the worker serves must be the new user's to open.
            let image = dir.join("image");
            std::fs::write(&image, vec![0u8; 4096]).unwrap();
            std::os::unix::fs::chown(&image, Some(uid), Some(gid)).unwrap();
            // The temporary directory is 0700 root: let nobody through.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
            drop_privileges("nobody").unwrap();
            seccomp::install(Kind::Worker, Action::KillProcess).unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image)
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, b"ok", 0).unwrap();
            let ring = io_uring::IoUring::new(4).expect("io_uring as nobody, filtered");
            drop(ring);
            let meta = std::fs::symlink_metadata(&sock).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, gid));
            done();
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn drop_privileges_to_nobody_leaves_root_for_good() {
    require_root("switching users");
    assert_done(&run("drop-to-nobody"));
}

#[test]
fn worker_binds_sets_permissions_drops_then_filters() {
    require_root("switching users");
    assert_done(&run("worker-sequence"));
}

#[test]
fn socket_policy_sets_mode() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let _l = UnixListener::bind(&sock).unwrap();
    for mode in [0o600, 0o660, 0o666, 0o000] {
        SocketPolicy {
            mode,
            owner: None,
            group: None,
        }
        .apply(&sock)
        .unwrap();
        let got = std::fs::symlink_metadata(&sock).unwrap().mode() & 0o7777;
        assert_eq!(got, mode, "{mode:o}");
    }
}

#[test]
fn socket_policy_sets_owner_and_group() {
    require_root("changing a socket's owner");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let _l = UnixListener::bind(&sock).unwrap();
    let policy = SocketPolicy::parse(Some("0660"), Some("nobody"), Some("nogroup"))
        .or_else(|_| SocketPolicy::parse(Some("0660"), Some("nobody"), Some("65534")))
        .unwrap();
    policy.apply(&sock).unwrap();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), resolve_user("nobody").unwrap().as_raw());
    assert_eq!(meta.gid(), policy.group.unwrap().as_raw());
    // Group only: the owner stays.
    let root_group = SocketPolicy {
        mode: 0o640,
        owner: None,
        group: Some(resolve_group("0").unwrap()),
    };
    root_group.apply(&sock).unwrap();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (resolve_user("nobody").unwrap().as_raw(), 0, 0o640)
    );
}

#[test]
fn socket_policy_refuses_what_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let policy = SocketPolicy::default();
    assert!(matches!(
        policy.apply(&file),
        Err(SandboxError::NotASocket(_))
    ));
    // A symlink (even to a socket) is refused, not followed.
    let sock = dir.path().join("s.sock");
    let _l = UnixListener::bind(&sock).unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&sock, &link).unwrap();
    assert!(policy.apply(&link).is_err());
    let link_to_file = dir.path().join("link-file");
    std::os::unix::fs::symlink(&file, &link_to_file).unwrap();
    assert!(policy.apply(&link_to_file).is_err());
    // Nothing was changed on the way.
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert!(policy.apply(&dir.path().join("missing")).is_err());
}

#[test]
fn global_policy_defaults_until_installed() {
    assert_eq!(SocketPolicy::global(), SocketPolicy::default());
    let p = SocketPolicy {
        mode: 0o660,
        owner: None,
        group: None,
    };
    assert!(p.install_global());
    assert_eq!(SocketPolicy::global(), p);
    assert!(!SocketPolicy::default().install_global());
    assert_eq!(SocketPolicy::global(), p);
}
