//! Whether this process may use io_uring.
//!
//! Container runtimes can forbid it: docker's default seccomp profile refuses
//! `io_uring_setup` from docker 25 on, Kubernetes' RuntimeDefault may too, and
//! `kernel.io_uring_disabled` can turn it off host-wide. A worker where it is
//! refused would otherwise only find out when the first io_uring or
//! nvme-io_uring node opens, i.e. when a VM connects; the worker probes at
//! start, logs a warning, and adds the reason to those nodes' open errors.

use std::sync::OnceLock;

/// `Ok` if `io_uring_setup` works here, else why not (with a hint).
pub fn io_uring() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT.get_or_init(setup_one).clone()
}

fn setup_one() -> Result<(), String> {
    // A ring with two entries, closed again when dropped.
    match io_uring::IoUring::new(2) {
        Ok(_ring) => Ok(()),
        Err(e) => Err(format!(
            "io_uring_setup failed: {e}{}",
            match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) => {
                    " (a seccomp profile, e.g. docker's default from docker 25, \
                     or kernel.io_uring_disabled forbids io_uring: run workers under \
                     deploy/seccomp-io_uring.json)"
                }
                _ => "",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_cached_and_says_why() {
        let first = io_uring();
        assert_eq!(first, io_uring());
        if let Err(why) = first {
            assert!(why.starts_with("io_uring_setup failed: "), "{why}");
        }
    }
}
