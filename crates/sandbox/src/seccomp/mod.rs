//! Seccomp allow-lists per process kind.
//!
//! Each blkmesh process installs, once started, a BPF filter that lets
//! through only the system calls its kind makes, on every thread (TSYNC)
//! and on every thread it starts later. What happens to any other call is
//! the [`Action`]: kill the process (`--seccomp=enforce`), fail the call
//! with `EPERM` (`--seccomp=errno`), or let it through and have the kernel
//! log it (`--seccomp=log`, `SECCOMP_RET_LOG`: audit records of type 1326
//! in `dmesg`, `journalctl -k` or `ausearch -m SECCOMP`, with `syscall=N`
//! and `code=0x7ffc0000`; `ausyscall N` names it; a kill under `enforce`
//! is logged the same way with `code=0x80000000`). Run with `log` first when something changed
//! (a new driver, another libc) and add what shows up.
//!
//! # What the lists hold, and how they were found
//!
//! The binaries ran under `strace -f` (attached to each process from its
//! first instruction through a wrapper put in `BLKMESH_BIN_DIR`) while the
//! end-to-end suites drove them (`crates/testkit/tests`: data path, placement
//! and live queue moves, failover with killed and hung workers, reopen and
//! resize, fault isolation, limits, every node kind including the absent
//! nvme and vDPA devices and vhost-user chaining, the golden scripts), and
//! during a manual `blkmesh up` session (two-queue `blkmesh-io verify`,
//! throttle groups, fault injection, `blkmeshctl stats`, `events`, `worker
//! move-queue`, `worker drain`), plus a worker resolving its manager's
//! address by name (`localhost`, and a name that needs DNS). Only the calls
//! made after the point where the filter is installed count: for a worker
//! after its socket is bound, for the frontend once its runtime runs, for
//! the manager once it listens (the first `listen`; the
//! frontend's marker was its runtime's first `epoll_create1`). Seen there (x86_64, glibc 2.36):
//!
//! | kind | system calls seen after start-up |
//! |---|---|
//! | all three | accept4 clone3 close epoll_ctl epoll_wait exit exit_group fcntl ftruncate futex getrandom gettid madvise mmap mprotect munmap openat prctl(PR_SET_NAME) recvfrom rseq rt_sigprocmask sched_getaffinity sendto set_robust_list shutdown sigaltstack statx write writev |
//! | worker, also | connect epoll_create1 eventfd2 fstatfs getpid getsockopt io_uring_enter io_uring_register io_uring_setup ioctl(NVME_IOCTL_ID, VHOST_SET_OWNER, FIONREAD) lseek memfd_create newfstatat poll read readlink recvmsg restart_syscall rt_sigtimedwait sched_yield sendmmsg sendmsg setsockopt socket(AF_INET, AF_UNIX) socketpair uname unlink |
//! | frontend, also | bind brk chmod clock_nanosleep connect epoll_create1 eventfd2 getsockopt ioctl(FIONBIO) kill listen memfd_create poll read recvmsg rt_sigaction rt_sigreturn sched_yield sendmsg setsockopt socket(AF_INET, AF_UNIX) socketpair unlink |
//! | manager, also | brk fsync getpeername getpid getsockname rename rt_sigaction rt_sigreturn |
//!
//! (`ioctl(TCGETS, TIOCGWINSZ)` came only at start-up, from the log
//! formatter's terminal check; `sendmmsg`, `uname` and `FIONREAD` from DNS.)
//!
//! The allow-lists ([`allowed`]) are these plus calls that the same code
//! makes on paths the traces did not reach — name resolution over netlink,
//! a panic's backtrace, `abort()`, plain `pread`/`pwrite`/`fsync` in the
//! worker, the forms glibc uses on other architectures (`*at`, `ppoll`,
//! `epoll_pwait`), and the frontend's `mkdirat`, `renameat2` and
//! `unlinkat` of the private directory its export sockets are bound in
//! ([`crate::SocketPolicy::listen_unix`], added after those traces), and
//! the queue threads' `sched_setaffinity` of themselves (queue placement,
//! `blkmesh_ipc::placement`, also later). Nothing on them changes identity, mounts, namespaces,
//! traces or executes: `execve`, `ptrace`, `process_vm_readv`, `mount`,
//! `unshare`, `setns`, `bpf`, `perf_event_open`, `keyctl`, `setuid`, module
//! loading and the like fail for every kind, and `io_uring_*` is allowed for
//! the worker only.
//!
//! Argument checks on top of the lists:
//!
//! - `sched_setaffinity` only with pid 0, the calling thread;
//! - `clone` only without `CLONE_NEW*` flags (no new namespaces: creating a
//!   user namespace is how many kernel exploits start), and `clone3`, whose
//!   flags BPF cannot read, fails with `ENOSYS` so glibc falls back to
//!   `clone` (Docker's default profile does the same);
//! - `socket` only for `AF_UNIX`, `AF_INET`, `AF_INET6` and `NETLINK_ROUTE`
//!   (no packet, `AF_ALG`, vsock or other netlink sockets), `socketpair`
//!   only for `AF_UNIX`;
//! - `ioctl` only `FIONBIO`, `FIONREAD`, `FIOCLEX`, `FIONCLEX`, `TCGETS`,
//!   `TIOCGWINSZ`, and for the worker the vhost (`0xAF`) and NVMe (`'N'`)
//!   families that the vDPA and nvme-io_uring drivers use;
//! - `prctl` only `PR_SET_NAME`, `PR_GET_NAME`, `PR_SET_VMA` and
//!   `PR_SET_NO_NEW_PRIVS` (so no `PR_SET_DUMPABLE`: core dumps and same-user
//!   `ptrace` of a process holding guest RAM stay off);
//! - `prlimit64` only to read limits.
//!
//! # Limits
//!
//! Operations submitted through io_uring are not system calls and seccomp
//! never sees them: a compromised worker can open files or sockets through
//! its rings. What a worker may open is therefore bounded by the user it
//! runs as (see [`crate::drop_privileges`]), not by this filter. The
//! frontend and the manager do not get io_uring at all.

mod allowlist;

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use crate::kind::Kind;
use crate::SandboxError;
use allowlist::Sys;

/// The allow-lists of `kind`: its own and its legacy system calls.
fn lists(kind: Kind) -> [&'static [Sys]; 2] {
    match kind {
        Kind::Manager => [allowlist::MANAGER, allowlist::MANAGER_LEGACY],
        Kind::Frontend => [allowlist::FRONTEND, allowlist::FRONTEND_LEGACY],
        Kind::Worker => [allowlist::WORKER, allowlist::WORKER_LEGACY],
    }
}

/// Every system call `kind` may make.
fn syscalls(kind: Kind) -> impl Iterator<Item = &'static Sys> {
    [allowlist::BASE, allowlist::BASE_LEGACY]
        .into_iter()
        .chain(lists(kind))
        .flatten()
}

/// What a system call outside the allow-list gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let it through, and have the kernel log it (`SECCOMP_RET_LOG`).
    Log,
    /// Fail it with this errno (`EPERM` for `--seccomp=errno`).
    Errno(i32),
    /// Kill the whole process with SIGSYS (`SECCOMP_RET_KILL_PROCESS`).
    KillProcess,
}

impl From<Action> for SeccompAction {
    fn from(a: Action) -> SeccompAction {
        match a {
            Action::Log => SeccompAction::Log,
            Action::Errno(e) => SeccompAction::Errno(e as u32),
            Action::KillProcess => SeccompAction::KillProcess,
        }
    }
}

/// The `--seccomp` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filter.
    #[default]
    Off,
    /// Allow everything, log calls outside the allow-list (to find them).
    Log,
    /// Fail calls outside the allow-list with EPERM.
    Errno,
    /// Kill the process on a call outside the allow-list.
    Enforce,
}

impl SeccompMode {
    /// The action for calls outside the allow-list; `None` for `Off`.
    pub fn action(self) -> Option<Action> {
        match self {
            SeccompMode::Off => None,
            SeccompMode::Log => Some(Action::Log),
            SeccompMode::Errno => Some(Action::Errno(libc::EPERM)),
            SeccompMode::Enforce => Some(Action::KillProcess),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::Errno => "errno",
            SeccompMode::Enforce => "enforce",
        })
    }
}

/// The names of the system calls `kind` may make, sorted.
pub fn allowed(kind: Kind) -> Vec<&'static str> {
    let mut v: Vec<_> = syscalls(kind).map(Sys::short_name).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Whether `name` (e.g. `"io_uring_setup"`) is on `kind`'s allow-list
/// (possibly with argument checks).
pub fn is_allowed(kind: Kind, name: &str) -> bool {
    syscalls(kind).any(|s| s.short_name() == name)
}

/// `PR_SET_VMA` (naming anonymous mappings; glibc may use it).
const PR_SET_VMA: u64 = 0x5356_4d41;

/// Namespace flags refused in `clone`.
const CLONE_NEW_ANY: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// ioctl requests every kind may make.
// The constants are `c_ulong` with glibc and `c_int` elsewhere.
#[allow(clippy::unnecessary_cast)]
const IOCTLS: [u64; 6] = [
    libc::FIONBIO as u64,
    libc::FIONREAD as u64,
    libc::FIOCLEX as u64,
    libc::FIONCLEX as u64,
    libc::TCGETS as u64,
    libc::TIOCGWINSZ as u64,
];

/// ioctl "types" (bits 8..16 of the request) the worker's drivers use:
/// vhost (vhost-vdpa), NVMe (nvme-io_uring) and the block layer (0x12:
/// BLKREPORTZONE and friends for zoned devices, BLKGETSIZE64).
const WORKER_IOCTL_TYPES: [u64; 3] = [0xAF, b'N' as u64, 0x12];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5, which none here is.
    SeccompCondition::new(arg, len, op, value).expect("valid seccomp condition")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    // Only fails for an empty list, which none here is.
    SeccompRule::new(conds).expect("non-empty seccomp rule")
}

fn eq32(arg: u8, value: u64) -> SeccompRule {
    rule(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )])
}

/// The argument checks of a system call: empty means any arguments.
fn rules(kind: Kind, nr: i64) -> Vec<SeccompRule> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    match nr {
        libc::SYS_clone => vec![rule(vec![cond(0, Qword, MaskedEq(CLONE_NEW_ANY), 0)])],
        libc::SYS_socket => {
            let mut v: Vec<_> = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
                .into_iter()
                .map(|af| eq32(0, af as u64))
                .collect();
            v.push(rule(vec![
                cond(0, Dword, Eq, libc::AF_NETLINK as u64),
                cond(2, Dword, Eq, libc::NETLINK_ROUTE as u64),
            ]));
            v
        }
        libc::SYS_socketpair => vec![eq32(0, libc::AF_UNIX as u64)],
        libc::SYS_ioctl => {
            let mut v: Vec<_> = IOCTLS.iter().map(|&r| eq32(1, r)).collect();
            if kind == Kind::Worker {
                v.extend(
                    WORKER_IOCTL_TYPES
                        .iter()
                        .map(|&t| rule(vec![cond(1, Dword, MaskedEq(0xff00), t << 8)])),
                );
            }
            v
        }
        libc::SYS_prctl => [
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            PR_SET_VMA,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ]
        .into_iter()
        .map(|op| eq32(0, op))
        .collect(),
        // sched_setaffinity(0, ...): the calling thread, never another.
        libc::SYS_sched_setaffinity => vec![eq32(0, 0)],
        // prlimit64(pid, resource, new_limit = NULL, old_limit): read only.
        libc::SYS_prlimit64 => vec![rule(vec![cond(2, Qword, Eq, 0)])],
        _ => Vec::new(),
    }
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SandboxError::UnsupportedArch(std::env::consts::ARCH))
}

/// Compiles `kind`'s filters with `action` for calls outside the list, in
/// the order [`install`] installs them: first a filter that answers
/// `clone3` with `ENOSYS` and lets everything else through, then the
/// allow-list (which has no `seccomp` call, so nothing can be installed
/// after it). The kernel applies the strictest verdict of all installed
/// filters, so the first overrides the allow-list for `clone3` alone.
pub fn filters(kind: Kind, action: Action) -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = target_arch()?;
    let err = |source| SandboxError::Filter { kind, source };
    let map: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls(kind).map(|s| (s.nr, rules(kind, s.nr))).collect();
    let allow = SeccompFilter::new(map, action.into(), SeccompAction::Allow, arch).map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    Ok(vec![
        clone3.try_into().map_err(err)?,
        allow.try_into().map_err(err)?,
    ])
}

/// Installs `kind`'s filters on every thread of the process (and so on
/// every thread started later). Sets `no_new_privs` first, as seccomp
/// requires of an unprivileged process. Cannot be undone.
pub fn install(kind: Kind, action: Action) -> Result<(), SandboxError> {
    for prog in filters(kind, action)? {
        seccompiler::apply_filter_all_threads(&prog)
            .map_err(|source| SandboxError::Install { kind, source })?;
    }
    Ok(())
}

/// [`install`] as the `--seccomp` flag asks: nothing for `Off`.
pub fn install_mode(kind: Kind, mode: SeccompMode) -> Result<(), SandboxError> {
    let Some(action) = mode.action() else {
        return Ok(());
    };
    install(kind, action)?;
    tracing::info!(%kind, %mode, "seccomp filter installed on all threads");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_and_action_compiles() {
        for kind in Kind::ALL {
            for action in [Action::Log, Action::Errno(libc::EPERM), Action::KillProcess] {
                let progs = filters(kind, action).unwrap();
                assert_eq!(progs.len(), 2);
                assert!(progs.iter().all(|p| !p.is_empty()));
            }
        }
    }

    #[test]
    fn lists_have_no_duplicates() {
        for kind in Kind::ALL {
            let mut nrs: Vec<i64> = syscalls(kind).map(|s| s.nr).collect();
            let n = nrs.len();
            nrs.sort_unstable();
            nrs.dedup();
            assert_eq!(nrs.len(), n, "{kind} lists a system call twice");
        }
    }

    #[test]
    fn only_the_worker_gets_io_uring() {
        for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
            assert!(is_allowed(Kind::Worker, name));
            assert!(!is_allowed(Kind::Frontend, name));
            assert!(!is_allowed(Kind::Manager, name));
        }
    }

    #[test]
    fn dangerous_calls_are_on_no_list() {
        for kind in Kind::ALL {
            for name in [
                "execve",
                "execveat",
                "ptrace",
                "process_vm_readv",
                "process_vm_writev",
                "mount",
                "umount2",
                "pivot_root",
                "chroot",
                "unshare",
                "setns",
                "bpf",
                "perf_event_open",
                "keyctl",
                "add_key",
                "init_module",
                "finit_module",
                "kexec_load",
                "setuid",
                "setgid",
                "setresuid",
                "setgroups",
                "capset",
                "userfaultfd",
                "open_by_handle_at",
                "personality",
                "fork",
                "vfork",
            ] {
                assert!(!is_allowed(kind, name), "{kind} allows {name}");
            }
        }
    }

    #[test]
    fn only_the_frontend_kills_and_listens() {
        assert!(is_allowed(Kind::Frontend, "kill"));
        assert!(is_allowed(Kind::Frontend, "listen"));
        for kind in [Kind::Manager, Kind::Worker] {
            assert!(!is_allowed(kind, "kill"));
            assert!(!is_allowed(kind, "listen"));
        }
    }

    #[test]
    fn modes_map_to_actions() {
        assert_eq!(SeccompMode::Off.action(), None);
        assert_eq!(SeccompMode::Log.action(), Some(Action::Log));
        assert_eq!(
            SeccompMode::Errno.action(),
            Some(Action::Errno(libc::EPERM))
        );
        assert_eq!(SeccompMode::Enforce.action(), Some(Action::KillProcess));
    }
}
