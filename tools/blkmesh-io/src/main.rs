use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    blkmesh_io::run(blkmesh_io::cli::Cli::parse())
}
