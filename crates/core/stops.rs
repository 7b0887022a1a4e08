//! Ctrl-C and SIGTERM for the long-running commands that must stop in
//! order (`mount` unmounts, `serve` flushes its overlay): watched from the
//! moment [`watch`] returns, on a small runtime of their own.

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The two stop signals, as they arrive.
pub struct Stops {
    int: Signal,
    term: Signal,
}

impl Stops {
    /// Waits for the next stop signal; its name, for messages.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Starts watching Ctrl-C and SIGTERM (replacing their default action,
/// and an ignore inherited from a shell); the runtime to await them on.
pub fn watch() -> anyhow::Result<(tokio::runtime::Runtime, Stops)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    let stops = {
        let _in_rt = rt.enter();
        Stops {
            int: signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?,
            term: signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
        }
    };
    Ok((rt, stops))
}
