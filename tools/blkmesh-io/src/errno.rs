//! errno values as names for messages: `EIO (Input/output error)`.

/// The symbolic name of an errno value, if it is a common one.
pub fn name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::ERANGE => "ERANGE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        libc::ETIME => "ETIME",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECANCELED => "ECANCELED",
        libc::EDQUOT => "EDQUOT",
        libc::EPROTO => "EPROTO",
        libc::ETOOMANYREFS => "ETOOMANYREFS",
        _ => return None,
    })
}

/// `EIO (Input/output error)`, or `errno 4242 (Unknown error 4242)`.
pub fn describe(errno: i32) -> String {
    let message = std::io::Error::from_raw_os_error(errno).to_string();
    // io::Error's Display appends " (os error N)"; keep just the text.
    let message = message
        .rsplit_once(" (os error")
        .map_or(message.as_str(), |(m, _)| m);
    match name(errno) {
        Some(name) => format!("{name} ({message})"),
        None => format!("errno {errno} ({message})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_known_and_unknown_errnos() {
        assert_eq!(describe(libc::EIO), "EIO (Input/output error)");
        assert_eq!(
            describe(libc::EOPNOTSUPP),
            "EOPNOTSUPP (Operation not supported)"
        );
        assert!(describe(4242).starts_with("errno 4242 ("));
    }
}
