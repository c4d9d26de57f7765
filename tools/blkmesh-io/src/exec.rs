//! Runs parsed `-c` commands against an open device, qemu-io style: one
//! result line per command, stop at the first failure (unless told to keep
//! going). The device is libblkio's driver or the native one
//! ([`Target`]); the ordinary commands print the same on both.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cmd::{Command, ZoneAction};
use crate::device::{Buffer, BufferPool, Completed, Device, IoError, PropValue, Queue, Request};
use crate::native::{NativeDevice, NativeError, Zone};
use crate::Error;

/// The device commands run on.
pub enum Target<'a> {
    /// libblkio's virtio-blk-vhost-user driver.
    Blkio {
        device: &'a Device,
        queues: &'a mut [Queue],
    },
    /// blkmesh's own driver (needed for zone commands).
    Native(&'a mut NativeDevice),
}

impl Target<'_> {
    fn properties(&self) -> Vec<(&'static str, PropValue)> {
        match self {
            Target::Blkio { device, .. } => device.properties(),
            Target::Native(n) => n.properties(),
        }
    }
}

/// What a successful command has to show besides "done".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Shown {
    #[default]
    Nothing,
    /// A zone report.
    Zones(Vec<Zone>),
    /// Where a zone append landed (bytes).
    Landed(u64),
}

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
        | Command::Info
        | Command::ZoneReport { .. }
        | Command::ZoneAction { .. }
        | Command::ZoneAppend { .. } => 0,
    }
}

/// Bytes of guest RAM one command needs with the native driver (its data,
/// or a zone report's buffer; headers and status bytes are small).
pub fn native_data_bytes(cmd: &Command) -> u64 {
    match cmd {
        Command::Read { lens, .. } | Command::Write { lens, .. } => lens
            .iter()
            .map(|l| l.saturating_add(4095) & !4095)
            .fold(0u64, u64::saturating_add),
        Command::ZoneAppend { len, .. } => *len,
        Command::ZoneReport { .. } => {
            blkmesh_vhost_user_client::zone::report_len(crate::native::REPORT_CHUNK)
        }
        Command::Flush { .. }
        | Command::Discard { .. }
        | Command::WriteZeroes { .. }
        | Command::Info
        | Command::ZoneAction { .. } => 0,
    }
}

/// Runs `cmds` in order and prints one result per command to `out`.
/// Returns the outcome of the last command run (the first that failed, if
/// any) and its index. Device errors (hangs, lost connections) are `Err`.
pub fn run(
    target: &mut Target<'_>,
    cmds: &[Command],
    opts: ExecOptions,
    out: &mut dyn Write,
) -> Result<(Outcome, usize), Error> {
    let mut first_failure: Option<(Outcome, usize)> = None;
    for (index, cmd) in cmds.iter().enumerate() {
        let start = Instant::now();
        let (outcome, shown) = match (cmd, &mut *target) {
            (Command::Info, t) => {
                print_info(&t.properties(), opts.json, out)?;
                continue;
            }
            (_, Target::Blkio { device, queues }) => {
                (run_io(device, queues, cmd, opts.timeout)?, Shown::Nothing)
            }
            (_, Target::Native(n)) => run_native(n, cmd)?,
        };
        report(cmd, &outcome, &shown, start.elapsed(), opts.json, out)?;
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
        // libblkio's virtio-blk driver has no zone requests (the command
        // line picks the native driver for these).
        Command::ZoneReport { .. } | Command::ZoneAction { .. } | Command::ZoneAppend { .. } => {
            return Ok(Outcome::IoFailed(IoError {
                errno: libc::ENOTSUP,
                detail: Some("zone commands need --driver native".into()),
            }))
        }
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
        let data: Vec<Vec<u8>> = done.bufs.into_vec().iter().map(Buffer::to_vec).collect();
        return Ok(check_pattern(*offset, *p, &data));
    }
    Ok(Outcome::Ok)
}

/// Runs one command on the native driver.
fn run_native(dev: &mut NativeDevice, cmd: &Command) -> Result<(Outcome, Shown), Error> {
    let queue = cmd.queue();
    let failed = |e: IoError| (Outcome::IoFailed(e), Shown::Nothing);
    let done = |r: Result<(), IoError>| match r {
        Ok(()) => (Outcome::Ok, Shown::Nothing),
        Err(e) => failed(e),
    };
    Ok(match cmd {
        Command::Read {
            offset,
            lens,
            pattern,
            ..
        } => match dev.read(queue, *offset, lens)? {
            Ok(data) => match pattern {
                Some(p) => (check_pattern(*offset, *p, &[data]), Shown::Nothing),
                None => (Outcome::Ok, Shown::Nothing),
            },
            Err(e) => failed(e),
        },
        Command::Write {
            offset,
            lens,
            pattern,
            ..
        } => done(dev.write(queue, *offset, lens, *pattern)?),
        Command::Flush { .. } => done(dev.flush(queue)?),
        Command::Discard { offset, len, .. } => {
            done(dev.discard_or_zeroes(queue, *offset, *len, None)?)
        }
        Command::WriteZeroes {
            offset,
            len,
            may_unmap,
            ..
        } => done(dev.discard_or_zeroes(queue, *offset, *len, Some(*may_unmap))?),
        Command::Info => (Outcome::Ok, Shown::Nothing),
        Command::ZoneReport { offset, count, .. } => {
            match dev.zone_report(queue, *offset, *count)? {
                Ok(zones) => (Outcome::Ok, Shown::Zones(zones)),
                Err(e) => failed(e),
            }
        }
        Command::ZoneAction { action, offset, .. } => {
            done(dev.zone_action(queue, *action, *offset)?)
        }
        Command::ZoneAppend {
            offset,
            len,
            pattern,
            ..
        } => match dev.zone_append(queue, *offset, *len, *pattern)? {
            Ok(at) => (Outcome::Ok, Shown::Landed(at)),
            Err(e) => failed(e),
        },
    })
}

impl From<NativeError> for Error {
    fn from(e: NativeError) -> Self {
        Error::Native(e)
    }
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

fn check_pattern(offset: u64, expected: u8, bufs: &[Vec<u8>]) -> Outcome {
    let mut at = offset;
    let checked = bufs.iter().map(|b| b.len() as u64).sum();
    for data in bufs {
        if let Some(i) = data.iter().position(|&x| x != expected) {
            return Outcome::Mismatch {
                offset: at + i as u64,
                expected,
                actual: data[i],
                checked,
            };
        }
        at += data.len() as u64;
    }
    Outcome::Ok
}

fn report(
    cmd: &Command,
    outcome: &Outcome,
    shown: &Shown,
    elapsed: Duration,
    json: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let (offset, len) = match cmd {
        Command::Read { offset, .. } | Command::Write { offset, .. } => (*offset, cmd.data_len()),
        Command::Discard { offset, len, .. }
        | Command::WriteZeroes { offset, len, .. }
        | Command::ZoneAppend { offset, len, .. } => (*offset, *len),
        Command::ZoneReport { offset, .. } | Command::ZoneAction { offset, .. } => (*offset, 0),
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
        match shown {
            Shown::Nothing => {}
            Shown::Zones(zones) => {
                v["zones"] = zones
                    .iter()
                    .map(|z| {
                        json!({
                            "start": z.start,
                            "length": z.length,
                            "capacity": z.capacity,
                            "write_pointer": z.write_pointer,
                            "condition": z.condition,
                            "type": z.zone_type,
                        })
                    })
                    .collect();
            }
            Shown::Landed(at) => {
                v["landed"] = json!(at);
                v["sector"] = json!(at / 512);
            }
        }
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
        Command::ZoneReport { .. } => {
            if let Shown::Zones(zones) = shown {
                for z in zones {
                    writeln!(out, "{}", zone_line(z))?;
                }
            }
            return Ok(());
        }
        Command::ZoneAction {
            action: ZoneAction::ResetAll,
            ..
        } => return writeln!(out, "zone_reset_all done"),
        Command::ZoneAction { .. } => {
            return writeln!(out, "{} done at offset {offset}", cmd.name())
        }
        Command::ZoneAppend { .. } => {
            let at = match shown {
                Shown::Landed(at) => *at,
                _ => offset,
            };
            writeln!(
                out,
                "appended {len}/{len} bytes at offset {at} (sector 0x{:x}) in the zone at offset {offset}",
                at / 512
            )?;
            return writeln!(out, "{}", rate_line(len, elapsed));
        }
    };
    writeln!(out, "{verb} {len}/{len} bytes at offset {offset}")?;
    writeln!(out, "{}", rate_line(len, elapsed))
}

/// One zone as qemu-io's `zone_report` prints it (bytes, hex):
/// `start: 0x0, len 0x80000, cap 0x80000, wptr 0x0, zcond:1, ztype:2`.
fn zone_line(z: &Zone) -> String {
    format!(
        "start: 0x{:x}, len 0x{:x}, cap 0x{:x}, wptr 0x{:x}, zcond:{}, ztype:{}",
        z.start, z.length, z.capacity, z.write_pointer, z.condition, z.zone_type
    )
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

fn print_info(
    props: &[(&'static str, PropValue)],
    json: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if json {
        let mut map = serde_json::Map::new();
        for (name, value) in props {
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
    for (name, value) in props {
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
    fn zone_lines_look_like_qemu_io() {
        let z = Zone {
            start: 0,
            length: 0x80000,
            capacity: 0x80000,
            write_pointer: 0,
            condition: 1,
            zone_type: 2,
        };
        assert_eq!(
            zone_line(&z),
            "start: 0x0, len 0x80000, cap 0x80000, wptr 0x0, zcond:1, ztype:2"
        );
        let mut out = Vec::new();
        let cmd = crate::cmd::parse("zone_report").unwrap();
        report(
            &cmd,
            &Outcome::Ok,
            &Shown::Zones(vec![z]),
            Duration::from_millis(1),
            true,
            &mut out,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["zones"][0]["length"], 0x80000);
        assert_eq!(v["zones"][0]["type"], 2);
    }

    #[test]
    fn zone_actions_and_appends_report_in_text() {
        let mut out = Vec::new();
        for (line, shown) in [
            ("zone_open 512k", Shown::Nothing),
            ("zone_reset_all", Shown::Nothing),
            ("zone_append 512k 4k", Shown::Landed(512 * 1024 + 8192)),
        ] {
            let cmd = crate::cmd::parse(line).unwrap();
            report(
                &cmd,
                &Outcome::Ok,
                &shown,
                Duration::from_millis(1),
                false,
                &mut out,
            )
            .unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "zone_open done at offset 524288");
        assert_eq!(lines[1], "zone_reset_all done");
        assert_eq!(
            lines[2],
            "appended 4096/4096 bytes at offset 532480 (sector 0x410) in the zone at offset 524288"
        );
        assert!(lines[3].contains(" ops; "));
    }

    #[test]
    fn native_buffers_cover_the_data() {
        let cmd = crate::cmd::parse("readv 0 4k 512 3584").unwrap();
        assert_eq!(native_data_bytes(&cmd), 12288);
        assert_eq!(
            native_data_bytes(&crate::cmd::parse("zone_append 0 1M").unwrap()),
            1 << 20
        );
        assert_eq!(
            native_data_bytes(&crate::cmd::parse("zone_report").unwrap()),
            64 + 1024 * 64
        );
    }

    #[test]
    fn buffer_bytes_cover_skewed_iovecs() {
        let cmd = crate::cmd::parse("readv 0 4k 512 3584").unwrap();
        // 4k+512 -> 8k, 512+1536 -> 4k, 3584+2560 -> 8k.
        assert_eq!(buffer_bytes(&cmd), 20480);
        assert_eq!(buffer_bytes(&crate::cmd::parse("flush").unwrap()), 0);
    }
}
