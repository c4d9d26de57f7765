//! `blkmesh-io`: a qemu-io–style tool and benchmark that drives a
//! vhost-user-blk export as a guest would, through libblkio's
//! `virtio-blk-vhost-user` driver, or (`--driver native`, and for zone
//! commands) blkmesh's own virtio-blk driver. With `--file` it drives a
//! file itself through libblkio's `io_uring` driver: the ceiling the
//! benchmarks measure servers against.
//!
//! Code map:
//! * [`cli`] — clap definitions; [`run`] dispatches to a mode.
//! * [`cmd`] — parser for `-c` commands; [`exec`] runs them.
//! * [`device`] — the device, queues and I/O buffers; the only module with
//!   `unsafe` (raw pointers for libblkio come only from mapped buffers).
//! * [`native`] — the native driver ([`blkmesh_vhost_user_client`]):
//!   the `-c` commands, zone commands included.
//! * [`bench`] — IOPS / bandwidth / latency benchmark, one thread per queue.
//! * [`verify`] — concurrent write/read-back/compare on every queue.
//! * [`hist`], [`pattern`], [`errno`] — helpers.

#![deny(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod cmd;
pub mod device;
pub mod errno;
pub mod exec;
pub mod hist;
pub mod native;
pub mod pattern;
pub mod verify;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use thiserror::Error;

use crate::cli::{Cli, DriverKind, Mode};
use crate::device::{Device, DeviceConfig, DeviceError, DeviceTarget, PoolError};
use crate::native::{NativeConfig, NativeDevice, NativeError};

/// Everything that can stop a run.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("device error")]
    Device(#[from] DeviceError),
    #[error("device error")]
    Native(#[source] NativeError),
    #[error("I/O buffer allocation failed")]
    Pool(#[from] PoolError),
    #[error("cannot write output")]
    Output(#[from] std::io::Error),
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("worker thread for queue {0} panicked")]
    WorkerPanicked(usize),
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A run finished but found failures (already reported on stdout).
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Device(_)
            | Error::Native(_)
            | Error::Pool(_)
            | Error::Output(_)
            | Error::NoSuchQueue(_)
            | Error::WorkerPanicked(_)
            | Error::Internal(_)
            | Error::Failed(_) => 1,
        }
    }
}

/// `a: b: c` from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Runs the tool; the exit code follows [`Error::exit_code`].
pub fn run(cli: Cli) -> ExitCode {
    match run_inner(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            // Failures already printed their details on stdout.
            if !matches!(e, Error::Failed(_)) || !cli.json {
                eprintln!("blkmesh-io: {}", error_chain(&e));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// A positive, finite number of seconds.
pub fn seconds(what: &str, secs: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| Error::Usage(format!("{what} must be a non-negative number of seconds")))
}

/// The driver for a list of `-c` commands: as asked, else the native one
/// when a zone command needs it (libblkio cannot send zone requests),
/// else libblkio's.
pub fn pick_driver(asked: Option<DriverKind>, cmds: &[cmd::Command]) -> Result<DriverKind, Error> {
    let zone = cmds.iter().find(|c| c.is_zone());
    match (asked, zone) {
        (Some(DriverKind::Blkio), Some(c)) => Err(Error::Usage(format!(
            "{}: zone commands need --driver native (libblkio's driver cannot send zone requests)",
            c.name()
        ))),
        (Some(d), _) => Ok(d),
        (None, Some(_)) => Ok(DriverKind::Native),
        (None, None) => Ok(DriverKind::Blkio),
    }
}

fn run_inner(cli: &Cli) -> Result<(), Error> {
    let timeout = seconds("--timeout", cli.timeout)?;
    if timeout.is_zero() {
        return Err(Error::Usage("--timeout must be positive".into()));
    }
    let queues = usize::from(cli.queues);
    // clap requires exactly one of the two.
    let target = match (&cli.socket, &cli.file) {
        (Some(s), _) => DeviceTarget::Socket(s.clone()),
        (None, Some(f)) => DeviceTarget::File(f.clone()),
        (None, None) => return Err(Error::Usage("give --socket or --file".into())),
    };
    let mut config = DeviceConfig {
        target,
        queues,
        poll_queues: cli.poll,
        queue_size: cli.queue_size,
        buffer_bytes: 0,
        read_only: cli.read_only,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();

    match (&cli.mode, cli.commands.is_empty()) {
        (None, true) => Err(Error::Usage(
            "nothing to do: give -c CMD, or the bench or verify subcommand (see --help)".into(),
        )),
        (Some(_), false) => Err(Error::Usage(
            "-c commands cannot be combined with the bench or verify subcommand".into(),
        )),
        (Some(_), true) if cli.driver == Some(DriverKind::Native) => Err(Error::Usage(
            "bench and verify run on libblkio's driver only (drop --driver native)".into(),
        )),
        (None, false) => {
            // Parse and check everything before touching the device.
            let cmds = cli
                .commands
                .iter()
                .map(|line| cmd::parse(line).map_err(|e| Error::Usage(format!("-c '{line}': {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(c) = cmds.iter().find(|c| c.queue() >= queues) {
                return Err(Error::Usage(format!(
                    "{}: queue {} does not exist (--queues {queues})",
                    c.name(),
                    c.queue()
                )));
            }
            let driver = pick_driver(cli.driver, &cmds)?;
            if driver == DriverKind::Native && cli.poll {
                return Err(Error::Usage(
                    "--poll needs libblkio's driver (--driver blkio)".into(),
                ));
            }
            let opts = exec::ExecOptions {
                json: cli.json,
                timeout,
                keep_going: cli.keep_going,
            };
            let (outcome, index) = match driver {
                DriverKind::Blkio => {
                    config.buffer_bytes =
                        cmds.iter().map(exec::buffer_bytes).max().unwrap_or(0) as usize;
                    let mut device = Device::open(&config)?;
                    let mut qs = device.take_queues();
                    let mut target = exec::Target::Blkio {
                        device: &device,
                        queues: &mut qs,
                    };
                    exec::run(&mut target, &cmds, opts, &mut out)?
                }
                DriverKind::Native => {
                    let DeviceTarget::Socket(socket) = &config.target else {
                        return Err(Error::Usage(
                            "the native driver (and zone commands) needs an export: give --socket, not --file"
                                .into(),
                        ));
                    };
                    let native = NativeConfig {
                        socket: socket.clone(),
                        queues,
                        queue_size: cli.queue_size,
                        read_only: cli.read_only,
                        timeout,
                        data_bytes: cmds.iter().map(exec::native_data_bytes).max().unwrap_or(0),
                    };
                    let mut device = NativeDevice::open(&native).map_err(Error::Native)?;
                    exec::run(
                        &mut exec::Target::Native(&mut device),
                        &cmds,
                        opts,
                        &mut out,
                    )?
                }
            };
            let what = match outcome {
                exec::Outcome::Ok => return Ok(()),
                exec::Outcome::IoFailed(_) => "failed",
                exec::Outcome::Mismatch { .. } => "failed pattern verification",
            };
            Err(Error::Failed(format!(
                "-c '{}' {what}",
                cli.commands.get(index).map_or("?", String::as_str)
            )))
        }
        (Some(Mode::Bench(args)), true) => {
            let plan = bench::Plan::new(args, queues)?;
            config.buffer_bytes = plan.buffer_bytes() as usize;
            let mut device = Device::open(&config)?;
            let report = bench::run(&mut device, &plan, timeout)?;
            report.print(cli.json, &mut out)?;
            report.check()
        }
        (Some(Mode::Verify(args)), true) => {
            let plan = verify::Plan::new(args, queues)?;
            config.buffer_bytes = plan.buffer_bytes() as usize;
            let mut device = Device::open(&config)?;
            let report = verify::run(&mut device, &plan, timeout)?;
            report.print(cli.json, &mut out)?;
            report.check()
        }
    }
}
