//! The `imgstore` command line: parses flags, opens the repository, resolves
//! what the user named into engine calls, and decides what the user sees.
//! Everything that touches data lives in the library crates; this crate is
//! thin on purpose.

mod args;
mod commands;
mod maintenance;
mod progress;
mod units;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its causes, outermost first.
            let mut line = format!("{err:#}");
            line = line.replace('\n', " ");
            let _ = writeln!(std::io::stderr(), "imgstore: error: {line}");
            ExitCode::FAILURE
        }
    }
}
