//! The system calls each process kind may make once it has started.
//!
//! Found by tracing the real binaries (see the parent module's docs for how)
//! and widened only with calls that the same code reaches on paths the
//! traces did not take (name resolution, panics with backtraces, shutdown)
//! or that libc makes under another name on another architecture. Each
//! group says who needs it.

/// One system call: its name (with the `SYS_` prefix) and number.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sys {
    pub name: &'static str,
    pub nr: i64,
}

impl Sys {
    /// The name without `SYS_`.
    pub fn short_name(&self) -> &'static str {
        self.name.strip_prefix("SYS_").unwrap_or(self.name)
    }
}

macro_rules! sys {
    ($($n:ident),* $(,)?) => {
        &[$(Sys { name: stringify!($n), nr: libc::$n as i64 }),*]
    };
}

/// Every kind: the Rust runtime, glibc, tokio/tonic (as gRPC client or
/// server), tracing, and panics.
pub(crate) const BASE: &[Sys] = sys![
    // Memory: allocator, thread stacks, the tokio runtime.
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mprotect,
    SYS_madvise,
    SYS_mremap,
    // Threads (std::thread, tokio's blocking pool, tonic). `clone` is
    // restricted to flags without a new namespace and `clone3` answers
    // ENOSYS (see `rules`), so glibc falls back to `clone`.
    SYS_clone,
    SYS_clone3,
    SYS_futex,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_gettid,
    SYS_getpid,
    SYS_exit,
    SYS_exit_group,
    // Signals: tokio's SIGTERM/SIGINT handling, the worker's signal thread
    // (sigtimedwait), std's stack-overflow guard, abort().
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigtimedwait,
    SYS_sigaltstack,
    SYS_tgkill,
    SYS_restart_syscall,
    // Time: timers, sleeps, tracing's timestamps (vDSO fallbacks).
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettimeofday,
    // Descriptors and files: logs to stderr, /etc/hosts and
    // /etc/resolv.conf for name resolution, /proc/self for backtraces.
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_pread64,
    SYS_close,
    SYS_lseek,
    SYS_openat,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_fcntl,
    SYS_dup,
    SYS_dup3,
    SYS_readlinkat,
    SYS_getcwd,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_getrandom,
    SYS_uname,
    // Restricted to a few terminal and socket requests (see `rules`).
    SYS_ioctl,
    // Restricted to thread names (see `rules`).
    SYS_prctl,
    // Restricted to reading limits (see `rules`).
    SYS_prlimit64,
    // Identity queries (no changes: setuid and friends are absent).
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_getresuid,
    SYS_getresgid,
    SYS_getgroups,
    // Event loops: tokio (epoll, eventfd), the queue threads (epoll,
    // eventfd doorbells), libblkio's vhost-user driver (ppoll), glibc's
    // resolver (poll).
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_ppoll,
    SYS_eventfd2,
    SYS_pipe2,
    // Sockets: gRPC over TCP or unix sockets, SOCK_SEQPACKET control
    // channels with SCM_RIGHTS, DNS over UDP (sendmmsg), the resolver's
    // netlink query (bind, getsockname). `socket` and `socketpair` are
    // restricted by family (see `rules`).
    SYS_socket,
    SYS_socketpair,
    SYS_connect,
    SYS_accept4,
    SYS_bind,
    SYS_getsockname,
    SYS_getpeername,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendmmsg,
    SYS_recvmmsg,
    SYS_shutdown,
];

/// x86_64's older calls that glibc still uses there (other architectures
/// only have the `*at`/`p*` forms above).
#[cfg(target_arch = "x86_64")]
pub(crate) const BASE_LEGACY: &[Sys] = sys![
    SYS_open,
    SYS_stat,
    SYS_lstat,
    SYS_poll,
    SYS_epoll_wait,
    SYS_readlink,
    SYS_access,
    SYS_dup2,
    SYS_pipe,
];
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const BASE_LEGACY: &[Sys] = &[];

/// The worker: libblkio's drivers (io_uring, nvme-io_uring, vhost-user,
/// vhost-vdpa), guest RAM and rings it maps, throttle groups in /dev/shm.
pub(crate) const WORKER: &[Sys] = sys![
    // io_uring: every read, write, flush, discard and write-zeroes of the
    // io_uring and nvme-io_uring leaves, and buffer registration.
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    // Plain file I/O, for drivers or paths that do not go through a ring.
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_ftruncate,
    // libblkio's drivers look at the file system of an image and at sysfs
    // (block queue limits, vDPA devices).
    SYS_fstatfs,
    SYS_statfs,
    SYS_getdents64,
    // libblkio's vhost-user driver: its own virtqueue memory.
    SYS_memfd_create,
    // Removing the worker socket on SIGTERM; shm_unlink of a throttle group.
    SYS_unlinkat,
    // A queue thread moving itself to its queue's CPU (placement); only
    // the calling thread (see `rules`).
    SYS_sched_setaffinity,
];
#[cfg(target_arch = "x86_64")]
pub(crate) const WORKER_LEGACY: &[Sys] = sys![SYS_unlink];
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const WORKER_LEGACY: &[Sys] = &[];

/// The frontend: export sockets created at run time, rings and inflight
/// regions in memfds, fencing hung workers.
pub(crate) const FRONTEND: &[Sys] = sys![
    // Export sockets are bound whenever the manager adds an export.
    SYS_listen,
    // Bound in a private directory and renamed into place with their
    // final mode (SocketPolicy::listen_unix).
    SYS_mkdirat,
    SYS_renameat2,
    // Their permissions (SocketPolicy::apply) and their removal.
    SYS_fchmodat,
    SYS_fchmod,
    SYS_fchownat,
    SYS_fchown,
    SYS_unlinkat,
    // Ring and inflight memfds: create, size, seal (fcntl), map.
    SYS_memfd_create,
    SYS_ftruncate,
    // SIGKILL to a worker that stopped answering (fencing).
    SYS_kill,
    // A queue thread moving itself to its queue's CPU (placement); only
    // the calling thread (see `rules`).
    SYS_sched_setaffinity,
];
#[cfg(target_arch = "x86_64")]
// renameat: glibc's renameat2() with no flags calls it where it exists.
pub(crate) const FRONTEND_LEGACY: &[Sys] = sys![
    SYS_unlink,
    SYS_chmod,
    SYS_chown,
    SYS_lchown,
    SYS_fchmodat2,
    SYS_renameat
];
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const FRONTEND_LEGACY: &[Sys] = &[];

/// The manager: the state file (write, fsync, rename), checks of node
/// paths and of qcow2 images, creating images (imago reads and writes
/// tables with preadv/pwritev and looks at the file system), growing image
/// files on resize, its unix socket on shutdown.
pub(crate) const MANAGER: &[Sys] = sys![
    SYS_preadv,
    SYS_pwritev,
    SYS_fstatfs,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_renameat2,
    SYS_unlinkat,
];
#[cfg(target_arch = "x86_64")]
pub(crate) const MANAGER_LEGACY: &[Sys] = sys![SYS_unlink, SYS_rename, SYS_renameat];
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const MANAGER_LEGACY: &[Sys] = &[];
