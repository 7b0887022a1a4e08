//! `backup --stdin-from-command -- CMD ARGS`: back up what a command writes
//! to its stdout. The command's exit status decides: a non-zero status is
//! a read error at the end of the stream, so the backup fails before its
//! commit and no snapshot is written (a failed `pg_dump`, `qemu-img dd`
//! or `ssh host dd` never looks like a good backup).

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::Context;
use imgstore_engine::Source;

/// The command's stdout; at end of stream, its exit status.
struct CommandOutput {
    out: ChildStdout,
    child: std::sync::Arc<std::sync::Mutex<Child>>,
    label: String,
}

impl Read for CommandOutput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .wait()?;
            if !status.success() {
                return Err(std::io::Error::other(format!(
                    "{} failed ({status}); no snapshot was written",
                    self.label
                )));
            }
        }
        Ok(n)
    }
}

/// The running command; dropping it stops and collects the process.
pub struct Running(std::sync::Arc<std::sync::Mutex<Child>>);

/// Starts `argv` with its stdout piped into a stream source.
pub fn spawn(argv: &[String]) -> anyhow::Result<(Source, Running)> {
    let (prog, args) = argv.split_first().ok_or_else(|| {
        crate::exit::usage(
            "--stdin-from-command needs the command after `--`: imgstore backup --stdin-from-command --name NAME -- COMMAND ARGS",
        )
    })?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start command `{prog}`"))?;
    let out = child.stdout.take().expect("piped");
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    // Only the program is recorded (as the snapshot's source) and named
    // in errors: its arguments may hold secrets.
    let label = format!("command:{prog}");
    let reader = CommandOutput {
        out,
        child: child.clone(),
        label: label.clone(),
    };
    Ok((
        Source::from_reader(Path::new(&label), Box::new(reader)),
        Running(child),
    ))
}

/// Stops the command if it still runs (the backup failed or stopped
/// reading) and collects it, whichever way the backup ends.
impl Drop for Running {
    fn drop(&mut self) {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}
