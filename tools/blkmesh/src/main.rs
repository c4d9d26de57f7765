//! `blkmesh`: runs the whole blkmesh process set locally.
//!
//! `blkmesh up` starts `blkmesh-manager`, N `blkmesh-worker`s and
//! `blkmesh-frontend` (found next to this executable), adds a default disk
//! (node and export `disk0`, an io_uring node over a sparse image) unless
//! the persisted state has one, or with `--config FILE` has the manager
//! apply the nodes and exports of a configuration file instead, prints how
//! to connect, restarts any process that exits, and on Ctrl-C / SIGTERM
//! stops them all (frontend, workers, manager) and removes the sockets.

#![forbid(unsafe_code)]

mod banner;
mod cli;
mod error;
mod process;
mod provision;
mod signals;
mod up;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    // The supervisor holds the manager's token: keep it out of other
    // processes' reach through /proc (its children are exec'd and start
    // dumpable, until they set it themselves).
    if let Err(e) = blkmesh_sandbox::set_not_dumpable() {
        eprintln!("blkmesh: error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    blkmesh_logging::init(false);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blkmesh: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up(args) => runtime.block_on(up::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("blkmesh: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(e.exit_code())
        }
    }
}
