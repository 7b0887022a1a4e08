//! Phase two: the shared flags resolved, then each command handed to the
//! module that runs it. Nothing else lives here: what several commands
//! share is in `settings`, `output` and `select`, so no command module
//! imports this one.

use crate::args::{Cli, Command};
use crate::exit;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::settings::init(&cli)?;
    let progress = !cli.no_progress && !cli.quiet;
    match cli.command {
        Command::Completions(a) => return crate::packaging::completions(a),
        Command::Man(a) => return crate::packaging::man(a),
        _ => {}
    }
    let repo = cli.repo.clone().ok_or_else(|| {
        exit::usage("no repository given: pass -r/--repo PATH or set IMGSTORE_REPO")
    })?;
    match cli.command {
        Command::Init(a) => crate::init::init(&repo, a),
        Command::Recover(a) => crate::init::recover(&repo, a),
        Command::Backup(a) => crate::backup::backup(&repo, a, progress),
        Command::Snapshots(a) => crate::snapshots::snapshots(&repo, a),
        Command::Restore(a) => crate::restore::restore(&repo, a, progress),
        Command::Forget(a) => crate::maintenance::forget(&repo, a),
        Command::Gc(a) => crate::maintenance::gc(&repo, a),
        Command::Protect(a) => crate::maintenance::protect(&repo, a, true),
        Command::Unprotect(a) => crate::maintenance::protect(&repo, a, false),
        Command::Stats(a) => crate::maintenance::stats(&repo, a),
        Command::Diff(a) => crate::diff::diff(&repo, a),
        Command::Serve(a) => crate::serve::serve(&repo, a),
        Command::Mount(a) => crate::mount::mount(&repo, a),
        Command::Check(a) => crate::integrity::check(&repo, a, progress),
        Command::Verify(a) => crate::integrity::verify(&repo, a, progress),
        Command::Tag(a) => crate::maintenance::tag(&repo, a),
        Command::Copy(a) => crate::copy::copy(&repo, a, progress),
        Command::Key(a) => crate::key::key(&repo, a),
        Command::Server(a) => crate::server::server(&repo, a),
        Command::Token(a) => crate::server::token(&repo, a),
        Command::Completions(_) | Command::Man(_) => unreachable!("handled above"),
    }
}
