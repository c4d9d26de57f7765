//! Running a command-line tool to completion with a time limit.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bins::bin_path;

/// Time limit of [`run_tool`].
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the workspace binary `bin` (see [`crate::bin_path`]) with `args`,
/// capturing stdout and stderr; kills it after [`DEFAULT_TOOL_TIMEOUT`].
pub fn run_tool<I, S>(bin: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_tool_timeout(bin, args, DEFAULT_TOOL_TIMEOUT)
}

/// Like [`run_tool`] with a time limit of `timeout`. A tool that runs over
/// gets SIGKILL (its status then shows the signal) and a note on stderr.
/// `bin` may also be a path to any executable.
///
/// # Panics
///
/// If the binary is missing or cannot be started.
pub fn run_tool_timeout<I, S>(bin: &str, args: I, timeout: Duration) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = if bin.contains('/') {
        std::path::PathBuf::from(bin)
    } else {
        bin_path(bin)
    };
    let mut child = Command::new(&program)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("blkmesh-testkit: cannot run {}: {e}", program.display()));
    // Drain both pipes on threads so a chatty tool cannot block on a full pipe.
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                match child.wait() {
                    Ok(status) => break status,
                    Err(e) => panic!("blkmesh-testkit: waiting for {bin}: {e}"),
                }
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("blkmesh-testkit: waiting for {bin}: {e}"),
        }
    };
    let stdout = out.map(join).unwrap_or_default();
    let mut stderr = err.map(join).unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(
            format!("\nblkmesh-testkit: {bin} killed after {timeout:?}\n").as_bytes(),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn join(h: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.join().unwrap_or_default()
}

/// A tool's exit status and output, for a failed test's message.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `blkmesh-io verify` on the export at `socket` for `seconds`: two
/// queues over its first 16 MiB, requests up to 64 KiB, each write read
/// back and checked; killed after two minutes.
pub fn verify_load(socket: &std::path::Path, seconds: &str) -> Output {
    run_tool_timeout(
        "blkmesh-io",
        [
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--queues"),
            OsStr::new("2"),
            OsStr::new("--timeout"),
            OsStr::new("60"),
            OsStr::new("verify"),
            OsStr::new("--size"),
            OsStr::new("16M"),
            OsStr::new("--seconds"),
            OsStr::new(seconds),
            OsStr::new("--bs-max"),
            OsStr::new("64k"),
        ],
        Duration::from_secs(120),
    )
}

/// The stdout of a tool that had to succeed; a failure panics with its
/// status and output.
#[track_caller]
pub fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{}", output_text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a program of the host (qemu-img, qemu-io) that must succeed, and
/// returns its stdout.
#[track_caller]
pub fn host_tool(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => stdout_of(&out),
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Creates the qcow2 image `img` over `backing` (a path as the header
/// will name it, relative to `img`'s directory or absolute) of format
/// `format`, with qemu-img; `size` ("" = the backing's) creates it
/// without opening the backing (`-u`).
#[track_caller]
pub fn qcow2_overlay(img: &std::path::Path, backing: &str, format: &str, size: &str) {
    let img = img.to_str().expect("a UTF-8 path");
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", format, img,
    ];
    if !size.is_empty() {
        args.extend(["-u", size]);
    }
    host_tool("qemu-img", &args);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn captures_output_and_status() {
        let out = run_tool_timeout(
            "/bin/sh",
            ["-c", "echo hi; echo oops >&2; exit 3"],
            DEFAULT_TOOL_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"oops\n");
    }

    #[test]
    fn kills_tool_after_timeout() {
        let start = Instant::now();
        let out = run_tool_timeout("/bin/sleep", ["30"], Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(out.status.signal(), Some(9));
        assert!(String::from_utf8_lossy(&out.stderr).contains("killed after"));
    }
}
