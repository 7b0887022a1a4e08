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

/// glibc raises its mmap threshold each time a large block is freed, so the
/// multi-MiB buffers of a backup (region buffers, RocksDB write batches and
/// memtable arenas) end up in the heap and fragment it: peak RSS of a first
/// backup was 150 MiB, about 115 MiB with a fixed 1 MiB threshold
/// (docs/BENCHMARKS.md). The threshold can only be fixed through the
/// environment at start-up (`mallopt` would need `unsafe`), so the binary
/// re-executes itself once with it set. Nothing happens when it is already
/// set, or when re-executing fails.
fn fix_malloc_threshold() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let _ = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "1048576")
        .exec();
}

fn main() -> ExitCode {
    fix_malloc_threshold();
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
