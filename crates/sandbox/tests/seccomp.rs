//! The filters installed in real processes: what they let through, what
//! they stop, and that they hold on every thread.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use blkmesh_sandbox::seccomp::{self, Action, Kind};
use common::{armed, assert_done, assert_killed_by_seccomp, done, no_core_dumps, run, scenario};

fn install(kind: Kind, action: Action) {
    seccomp::install(kind, action).expect("install the filter");
}

/// Writes and reads back a file through an io_uring, as libblkio's io_uring
/// driver does, and returns what was read.
fn io_uring_round_trip(file: &std::fs::File) -> Vec<u8> {
    use io_uring::{opcode, types, IoUring};
    let mut ring = IoUring::new(8).expect("io_uring_setup");
    let fd = types::Fd(file.as_raw_fd());
    let data = *b"blkmesh io_uring under seccomp";
    let mut back = vec![0u8; data.len()];
    let ops = [
        opcode::Write::new(fd, data.as_ptr(), data.len() as u32)
            .offset(4096)
            .build()
            .user_data(1),
        opcode::Fsync::new(fd).build().user_data(2),
        opcode::Read::new(fd, back.as_mut_ptr(), back.len() as u32)
            .offset(4096)
            .build()
            .user_data(3),
    ];
    for op in &ops {
        // SAFETY: the buffers the entries point at (`data`, `back`) live
        // until the completions are reaped below.
        unsafe { ring.submission().push(op).expect("submission queue full") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        let cqe = ring.completion().next().expect("a completion");
        assert!(
            cqe.result() >= 0,
            "op {} failed: {}",
            cqe.user_data(),
            cqe.result()
        );
    }
    // Buffer registration, as libblkio does with guest RAM.
    let mut buf = vec![0u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` outlives the registration, which ends with `ring`.
    unsafe { ring.submitter().register_buffers(&iov) }.expect("io_uring_register");
    assert_eq!(&back[..], &data[..]);
    back
}

/// Raw system call that must not be reached under a filter.
fn raw(nr: libc::c_long, a: libc::c_long, b: libc::c_long, c: libc::c_long) -> libc::c_long {
    // SAFETY: every call made through this passes only integers (no
    // pointers), or calls that fail before touching memory.
    unsafe { libc::syscall(nr, a, b, c, 0, 0) }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The child side: runs the scenario named in the environment.
#[test]
fn child() {
    let Some(name) = scenario() else {
        return;
    };
    no_core_dumps();
    let dir = common::dir();
    let path = dir.join("image");
    match name.as_str() {
        "worker-io" => {
            // Prepared before the filter, as a worker's socket is.
            std::fs::write(&path, vec![0u8; 8192]).unwrap();
            install(Kind::Worker, Action::KillProcess);
            // What a worker does after start-up: open an image, plain and
            // ring I/O, flush, discard-like calls, threads, a panic.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            io_uring_round_trip(&file);
            file.write_all_at(b"pwrite", 0).unwrap();
            let mut b = [0u8; 6];
            file.read_exact_at(&mut b, 0).unwrap();
            assert_eq!(&b, b"pwrite");
            file.sync_all().unwrap();
            file.sync_data().unwrap();
            file.set_len(16384).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), 16384);
            // SAFETY: fallocate on a file we own, integers only.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                )
            };
            assert!(rc == 0 || errno() == libc::EOPNOTSUPP);
            // Threads start (clone3 answers ENOSYS, glibc falls back).
            let t = std::thread::spawn(|| 40 + 2);
            assert_eq!(t.join().unwrap(), 42);
            // A panic with a backtrace unwinds instead of tripping the filter.
            std::env::set_var("RUST_BACKTRACE", "1");
            let r = std::thread::spawn(|| panic!("expected panic under seccomp")).join();
            assert!(r.is_err());
            // eventfd and epoll, as the queue threads use them.
            // SAFETY: plain fd-returning calls.
            let (efd, ep) =
                unsafe { (libc::eventfd(0, libc::EFD_CLOEXEC), libc::epoll_create1(0)) };
            assert!(efd >= 0 && ep >= 0);
            // memfd, as libblkio's vhost-user driver uses for its rings.
            let m = raw(libc::SYS_memfd_create, c"m".as_ptr() as libc::c_long, 0, 0);
            assert!(m >= 0);
            // An AF_UNIX socket pair and a TCP socket (gRPC) are fine.
            let (_a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let tcp = raw(
                libc::SYS_socket,
                libc::AF_INET.into(),
                libc::SOCK_STREAM.into(),
                0,
            );
            assert!(tcp >= 0);
            std::io::stdout().flush().unwrap();
            done();
        }
        "worker-ptrace" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_ptrace, libc::PTRACE_TRACEME as libc::c_long, 0, 0);
            done();
        }
        "worker-mount" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_mount, 0, 0, 0);
            done();
        }
        "worker-execve" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_execve, 0, 0, 0);
            done();
        }
        "worker-userns-clone" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(
                libc::SYS_clone,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_long,
                0,
                0,
            );
            done();
        }
        "worker-unshare" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_unshare, libc::CLONE_NEWUSER as libc::c_long, 0, 0);
            done();
        }
        "worker-packet-socket" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(
                libc::SYS_socket,
                libc::AF_PACKET.into(),
                libc::SOCK_RAW.into(),
                0,
            );
            done();
        }
        "worker-alg-socket" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(
                libc::SYS_socket,
                libc::AF_ALG.into(),
                libc::SOCK_SEQPACKET.into(),
                0,
            );
            done();
        }
        "worker-tiocsti" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_ioctl, -1, libc::TIOCSTI as libc::c_long, 0);
            done();
        }
        "worker-dumpable" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_prctl, libc::PR_SET_DUMPABLE.into(), 1, 0);
            done();
        }
        "worker-setuid" => {
            install(Kind::Worker, Action::KillProcess);
            armed();
            raw(libc::SYS_setuid, 0, 0, 0);
            done();
        }
        "worker-clone3-enosys" => {
            install(Kind::Worker, Action::KillProcess);
            // clone3 fails softly, so that glibc falls back to clone.
            let rc = raw(libc::SYS_clone3, 0, 0, 0);
            assert_eq!((rc, errno()), (-1, libc::ENOSYS));
            done();
        }
        "worker-other-thread" => {
            // A thread that exists before the filter is bound by it too.
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                go_rx.recv().unwrap();
                armed();
                raw(libc::SYS_ptrace, libc::PTRACE_TRACEME as libc::c_long, 0, 0);
            });
            install(Kind::Worker, Action::KillProcess);
            go_tx.send(()).unwrap();
            let _ = t.join();
            done();
        }
        "frontend-io-uring" => {
            install(Kind::Frontend, Action::KillProcess);
            armed();
            let mut params = [0u8; 120];
            raw(
                libc::SYS_io_uring_setup,
                8,
                params.as_mut_ptr() as libc::c_long,
                0,
            );
            done();
        }
        "frontend-works" => {
            // What the frontend does at run time: memfd rings with seals,
            // export sockets with their permissions, fencing by SIGKILL.
            install(Kind::Frontend, Action::KillProcess);
            let m = raw(
                libc::SYS_memfd_create,
                c"ring".as_ptr() as libc::c_long,
                2,
                0,
            );
            assert!(m >= 0);
            // SAFETY: integer-only calls on the memfd we just created.
            unsafe {
                assert_eq!(libc::ftruncate(m as i32, 65536), 0);
                assert_eq!(
                    libc::fcntl(m as i32, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
                    0
                );
            }
            let sock = dir.join("export.sock");
            let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            blkmesh_sandbox::SocketPolicy::default()
                .apply(&sock)
                .unwrap();
            std::fs::remove_file(&sock).unwrap();
            // kill(pid, 0) on ourselves: the call is allowed.
            // SAFETY: signal 0 only checks the pid.
            assert_eq!(unsafe { libc::kill(libc::getpid(), 0) }, 0);
            done();
        }
        "manager-io-uring" => {
            install(Kind::Manager, Action::KillProcess);
            armed();
            let mut params = [0u8; 120];
            raw(
                libc::SYS_io_uring_setup,
                8,
                params.as_mut_ptr() as libc::c_long,
                0,
            );
            done();
        }
        "manager-state-file" => {
            // The manager's state file: write a temporary, fsync, rename.
            install(Kind::Manager, Action::KillProcess);
            let tmp = dir.join("state.json.tmp");
            let mut f = std::fs::File::create(&tmp).unwrap();
            f.write_all(b"{}").unwrap();
            f.sync_all().unwrap();
            std::fs::rename(&tmp, dir.join("state.json")).unwrap();
            std::fs::File::open(&dir).unwrap().sync_all().unwrap();
            done();
        }
        "errno-mode" => {
            install(Kind::Worker, Action::Errno(libc::EPERM));
            let rc = raw(libc::SYS_ptrace, libc::PTRACE_TRACEME as libc::c_long, 0, 0);
            assert_eq!((rc, errno()), (-1, libc::EPERM));
            done();
        }
        "log-mode" => {
            install(Kind::Worker, Action::Log);
            // Let through (and logged): the kernel itself answers.
            let rc = raw(libc::SYS_mount, 0, 0, 0);
            assert_eq!(rc, -1);
            assert_ne!(errno(), 0);
            done();
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn worker_filter_allows_io_uring_file_io_threads_and_panics() {
    assert_done(&run("worker-io"));
}

#[test]
fn worker_filter_kills_on_forbidden_calls() {
    for s in [
        "worker-ptrace",
        "worker-mount",
        "worker-execve",
        "worker-userns-clone",
        "worker-unshare",
        "worker-packet-socket",
        "worker-alg-socket",
        "worker-tiocsti",
        "worker-dumpable",
        "worker-setuid",
    ] {
        let out = run(s);
        assert_killed_by_seccomp(&out);
    }
}

#[test]
fn clone3_fails_with_enosys_instead_of_killing() {
    assert_done(&run("worker-clone3-enosys"));
}

#[test]
fn filter_binds_threads_that_existed_before() {
    assert_killed_by_seccomp(&run("worker-other-thread"));
}

#[test]
fn frontend_and_manager_get_no_io_uring() {
    assert_killed_by_seccomp(&run("frontend-io-uring"));
    assert_killed_by_seccomp(&run("manager-io-uring"));
}

#[test]
fn frontend_filter_allows_rings_sockets_and_fencing() {
    assert_done(&run("frontend-works"));
}

#[test]
fn manager_filter_allows_the_state_file() {
    assert_done(&run("manager-state-file"));
}

#[test]
fn errno_mode_fails_the_call_and_goes_on() {
    assert_done(&run("errno-mode"));
}

#[test]
fn log_mode_lets_the_call_through() {
    assert_done(&run("log-mode"));
}
