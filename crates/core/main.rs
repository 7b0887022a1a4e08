//! The `imgstore` command line: parses flags, opens the repository, resolves
//! what the user named into engine calls, and decides what the user sees.
//! Everything that touches data lives in the library crates; this crate is
//! thin on purpose.

mod args;
mod backup;
mod bitmap;
mod commands;
mod copy;
mod diff;
mod exit;
mod init;
mod integrity;
mod key;
mod keys;
mod live;
mod maintenance;
mod mount;
mod open;
mod output;
mod packaging;
mod progress;
mod restore;
mod select;
mod serve;
mod server;
mod settings;
mod snapshots;
mod source_command;
mod stops;
mod units;
mod vm;

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
    // One TLS provider for the whole process (ring, as the server, the
    // client and the bucket use), installed before anything builds a
    // client: rustls and reqwest users that look for the process default
    // then find one instead of panicking ("No provider set").
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_error(e),
    };
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit::code_of(&err);
            if err.downcast_ref::<exit::Quiet>().is_some() || code == exit::PIPE_CLOSED {
                return ExitCode::from(code);
            }
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
            ExitCode::from(code)
        }
    }
}

/// A command line clap refused, as one line in the same style as every
/// other error (exit 2); help and version go to stdout as usual.
fn parse_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
        _ => {}
    }
    let text = e.render().to_string();
    // clap's message: "error: WHAT" (with the offending arguments on the
    // indented lines after it), an optional "tip: ...", then "Usage: ...".
    let mut parts: Vec<String> = Vec::new();
    let mut command = "imgstore".to_string();
    let mut in_error = false;
    for raw in text.lines() {
        let l = raw.trim();
        if let Some(m) = l.strip_prefix("error: ") {
            parts.push(m.trim_end_matches(':').to_string());
            in_error = true;
        } else if let Some(t) = l.strip_prefix("tip: ") {
            parts.push(t.to_string());
            in_error = false;
        } else if let Some(u) = l.strip_prefix("Usage: ") {
            command = u
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
            in_error = false;
        } else if l.is_empty() {
            in_error = false;
        } else if in_error && raw.starts_with(' ') {
            if let Some(last) = parts.last_mut() {
                last.push_str(if last.ends_with(':') { " " } else { ": " });
                last.push_str(l);
            }
        }
    }
    if parts.is_empty() {
        parts.push(
            text.lines()
                .next()
                .unwrap_or("invalid arguments")
                .to_string(),
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "imgstore: error: {} (see `{command} --help`)",
        parts.join("; ")
    );
    ExitCode::from(exit::USAGE)
}
