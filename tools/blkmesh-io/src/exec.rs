//! Runs parsed `-c` commands against an open device, qemu-io style: one
//! result line per command, stop at the first failure (unless told to keep
//! going).

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cmd::Command;
use crate::device::{Buffer, BufferPool, Completed, Device, IoError, PropValue, Queue, Request};
use crate::Error;

/// How a command run went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The device failed the request (or a request of a split command).
    IoFailed(IoError),
    /// Read data did not match the `-P` pattern.
    Mismatch {
        offset: u64,
        expected: u8,
        actual: u8,
        checked: u64,
    },
}

/// Options for [`run`].
#[derive(Debug, Clone, Copy)]
pub struct ExecOptions {
    pub json: bool,
    /// Upper bound for each command's wait for completions.
    pub timeout: Duration,
    /// Run every command even after one failed (the result is still the
    /// first failure): shows that the device stays usable after an error.
    pub keep_going: bool,
}

/// Skew of iovec `i` from its chunk's start: all different and none
/// page-aligned, so servers see iovecs at odd places in memory.
pub fn iovec_skew(i: usize) -> usize {
    512 * ((2 * i + 1) % 8)
}

/// Buffer bytes one command needs (see [`BufferPool::bytes_needed`]).
pub fn buffer_bytes(cmd: &Command) -> u64 {
    match cmd {
        Command::Read { lens, vectored, .. } | Command::Write { lens, vectored, .. } => {
            BufferPool::bytes_needed(
                lens.iter()
                    .enumerate()
                    .map(|(i, &l)| (l, if *vectored { iovec_skew(i) } else { 0 })),
            )
        }
        Command::Flush { .. }
        | Command::Discard { .. }
        | Command::WriteZeroes { .. }
        | Command::Info => 0,
    }
}

/// Runs `cmds` in order and prints one result per command to `out`.
/// Returns the outcome of the last command run (the first that failed, if
/// any) and its index. Device errors (hangs, lost connections) are `Err`.
pub fn run(
    device: &Device,
    queues: &mut [Queue],
    cmds: &[Command],
    opts: ExecOptions,
    out: &mut dyn Write,
) -> Result<(Outcome, usize), Error> {
    let mut first_failure: Option<(Outcome, usize)> = None;
    for (index, cmd) in cmds.iter().enumerate() {
        let start = Instant::now();
        let outcome = match cmd {
            Command::Info => {
                print_info(device, opts.json, out)?;
                continue;
            }
            _ => run_io(device, queues, cmd, opts.timeout)?,
        };
        report(cmd, &outcome, start.elapsed(), opts.json, out)?;
        if outcome != Outcome::Ok {
            if !opts.keep_going {
                return Ok((outcome, index));
            }
            first_failure.get_or_insert((outcome, index));
        }
    }
    Ok(first_failure.unwrap_or((Outcome::Ok, cmds.len())))
}

fn run_io(
    device: &Device,
    queues: &mut [Queue],
    cmd: &Command,
    timeout: Duration,
) -> Result<Outcome, Error> {
    let queue = queues
        .get_mut(cmd.queue())
        .ok_or(Error::NoSuchQueue(cmd.queue()))?;
    let pool = device.pool();
    let request = match cmd {
        Command::Read {
            offset,
            lens,
            vectored,
            ..
        } => {
            let bufs = alloc_bufs(pool, lens, *vectored)?;
            if *vectored {
                Request::Readv {
                    offset: *offset,
                    bufs,
                }
            } else {
                Request::Read {
                    offset: *offset,
                    buf: bufs
                        .into_iter()
                        .next()
                        .ok_or(Error::Internal("no buffer"))?,
                }
            }
        }
        Command::Write {
            offset,
            lens,
            vectored,
            pattern,
            ..
        } => {
            let mut bufs = alloc_bufs(pool, lens, *vectored)?;
            for b in &mut bufs {
                b.fill(*pattern);
            }
            if *vectored {
                Request::Writev {
                    offset: *offset,
                    bufs,
                }
            } else {
                Request::Write {
                    offset: *offset,
                    buf: bufs
                        .into_iter()
                        .next()
                        .ok_or(Error::Internal("no buffer"))?,
                }
            }
        }
        Command::Flush { .. } => Request::Flush,
        Command::Discard { offset, len, .. } => Request::Discard {
            offset: *offset,
            len: *len,
        },
        Command::WriteZeroes {
            offset,
            len,
            may_unmap,
            ..
        } => Request::WriteZeroes {
            offset: *offset,
            len: *len,
            may_unmap: *may_unmap,
        },
        Command::Info => return Ok(Outcome::Ok),
    };

    let done = submit_and_wait(queue, request, timeout)?;
    if let Err(e) = done.result {
        return Ok(Outcome::IoFailed(e));
    }
    if let Command::Read {
        offset,
        pattern: Some(p),
        ..
    } = cmd
    {
        return Ok(check_pattern(*offset, *p, &done.bufs.into_vec()));
    }
    Ok(Outcome::Ok)
}

/// One buffer per length; for vectored commands each at a different skew
/// and allocated last-first, so the iovecs are neither aligned nor in
/// ascending memory order.
fn alloc_bufs(pool: &BufferPool, lens: &[u64], vectored: bool) -> Result<Vec<Buffer>, Error> {
    if !vectored {
        return lens.iter().map(|&l| Ok(pool.alloc(l)?)).collect();
    }
    let mut bufs = lens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, &l)| Ok(pool.alloc_skewed(l, iovec_skew(i))?))
        .collect::<Result<Vec<_>, Error>>()?;
    bufs.reverse();
    Ok(bufs)
}

fn submit_and_wait(
    queue: &mut Queue,
    request: Request,
    timeout: Duration,
) -> Result<Completed, Error> {
    queue.submit(request, 0);
    let mut done = Vec::with_capacity(1);
    let deadline = Instant::now() + timeout;
    while done.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        queue.wait(1, Some(left), &mut done)?;
    }
    done.pop().ok_or(Error::Internal("no completion"))
}

fn check_pattern(offset: u64, expected: u8, bufs: &[Buffer]) -> Outcome {
    let mut at = offset;
    let checked = bufs.iter().map(|b| b.len() as u64).sum();
    for b in bufs {
        let data = b.to_vec();
        if let Some(i) = data.iter().position(|&x| x != expected) {
            return Outcome::Mismatch {
                offset: at + i as u64,
                expected,
                actual: data[i],
                checked,
            };
        }
        at += b.len() as u64;
    }
    Outcome::Ok
}

fn report(
    cmd: &Command,
    outcome: &Outcome,
    elapsed: Duration,
    json: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let (offset, len) = match cmd {
        Command::Read { offset, .. } | Command::Write { offset, .. } => (*offset, cmd.data_len()),
        Command::Discard { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
            (*offset, *len)
        }
        Command::Flush { .. } | Command::Info => (0, 0),
    };
    if json {
        let mut v = json!({
            "command": cmd.name(),
            "queue": cmd.queue(),
            "offset": offset,
            "length": len,
            "ok": *outcome == Outcome::Ok,
            "elapsed_us": (elapsed.as_secs_f64() * 1e9).round() / 1e3,
        });
        match outcome {
            Outcome::Ok => {}
            Outcome::IoFailed(e) => {
                v["errno"] = json!(e.errno);
                v["error"] = json!(e.to_string());
            }
            Outcome::Mismatch {
                offset,
                expected,
                actual,
                ..
            } => {
                v["mismatch"] = json!({
                    "offset": offset, "expected": expected, "actual": actual,
                });
            }
        }
        return writeln!(out, "{v}");
    }

    match outcome {
        Outcome::Ok => {}
        Outcome::IoFailed(e) => return writeln!(out, "{} failed: {e}", cmd.name()),
        Outcome::Mismatch {
            offset,
            expected,
            actual,
            checked,
        } => {
            return writeln!(
                out,
                "Pattern verification failed at offset {offset}: \
                 expected 0x{expected:02x}, got 0x{actual:02x} ({checked} bytes checked)"
            )
        }
    }
    let verb = match cmd {
        Command::Read { .. } => "read",
        Command::Write { .. } | Command::WriteZeroes { .. } => "wrote",
        Command::Discard { .. } => "discard",
        Command::Flush { .. } => return writeln!(out, "flush done"),
        Command::Info => return Ok(()),
    };
    writeln!(out, "{verb} {len}/{len} bytes at offset {offset}")?;
    writeln!(out, "{}", rate_line(len, elapsed))
}

/// `64 KiB, 1 ops; 0.0001 sec (512.000 MiB/sec and 8192.0000 ops/sec)`.
fn rate_line(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{}, 1 ops; {:.4} sec ({}/sec and {:.4} ops/sec)",
        human(bytes as f64),
        secs,
        human(bytes as f64 / secs),
        1.0 / secs
    )
}

fn human(v: f64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = v;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u])
    }
}

fn print_info(device: &Device, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let props = device.properties();
    if json {
        let mut map = serde_json::Map::new();
        for (name, value) in &props {
            let v = match value {
                PropValue::Bool(b) => json!(b),
                PropValue::I32(i) => json!(i),
                PropValue::U64(u) => json!(u),
                PropValue::Str(s) => json!(s),
            };
            map.insert((*name).to_string(), v);
        }
        let v = json!({"command": "info", "ok": true, "properties": map});
        return writeln!(out, "{v}");
    }
    for (name, value) in &props {
        match (name, value) {
            (&"capacity", PropValue::U64(c)) => {
                writeln!(out, "capacity: {c} bytes ({} sectors)", c / 512)?
            }
            (_, PropValue::Bool(b)) => writeln!(out, "{name}: {b}")?,
            (_, PropValue::I32(i)) => writeln!(out, "{name}: {i}")?,
            (_, PropValue::U64(u)) => writeln!(out, "{name}: {u}")?,
            (_, PropValue::Str(s)) => writeln!(out, "{name}: {s}")?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovec_skews_differ_and_are_not_page_aligned() {
        let skews: Vec<_> = (0..4).map(iovec_skew).collect();
        assert_eq!(skews, vec![512, 1536, 2560, 3584]);
        assert!(skews.iter().all(|s| s % 4096 != 0));
    }

    #[test]
    fn formats_rates_like_qemu_io() {
        assert_eq!(human(65536.0), "64 KiB");
        assert_eq!(human(512.0), "512 bytes");
        assert_eq!(human(1.5 * 1024.0 * 1024.0), "1.500 MiB");
        assert!(rate_line(65536, Duration::from_millis(1)).starts_with("64 KiB, 1 ops; 0.0010 sec"));
    }

    #[test]
    fn buffer_bytes_cover_skewed_iovecs() {
        let cmd = crate::cmd::parse("readv 0 4k 512 3584").unwrap();
        // 4k+512 -> 8k, 512+1536 -> 4k, 3584+2560 -> 8k.
        assert_eq!(buffer_bytes(&cmd), 20480);
        assert_eq!(buffer_bytes(&crate::cmd::parse("flush").unwrap()), 0);
    }
}
