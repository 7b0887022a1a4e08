//! The `imgstore` command line: parses flags, opens the repository, resolves
//! what the user named into engine calls, and decides what the user sees.
//! Everything that touches data lives in the library crates; this crate is
//! thin on purpose.

mod args;
mod commands;
mod integrity;
mod maintenance;
mod mount;
mod progress;
mod serve;
mod units;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Repository files hold whole disks: readable by their owner only
    // (RocksDB creates its files with the process umask).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its causes, outermost first.
            // Library errors already quote their cause in their message;
            // a cause is appended only when the line does not hold it yet.
            let mut line = String::new();
            for cause in err.chain() {
                let c = cause.to_string();
                if !line.contains(&c) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&c);
                }
            }
            line = line.replace('\n', " ");
            let _ = writeln!(std::io::stderr(), "imgstore: error: {line}");
            ExitCode::FAILURE
        }
    }
}
