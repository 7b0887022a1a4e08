//! `restore --live`: instant recovery. The snapshot is served over NBD
//! (the `serve` server, one writable export) within a second, while the
//! engine's [`LiveTarget`] restores it into TARGET underneath; this module
//! is the glue: the export, the listener, the background copy's thread,
//! progress lines, and stopping in order on Ctrl-C/SIGTERM.
//!
//! `IMGSTORE_LIVE_TEST_PAUSE_MS` (undocumented for users, for the test
//! suite only) makes the copy run on one thread and pause that long after
//! each region, so tests can overlap client I/O and kill -9 with a copy
//! still running on small images, on any number of cores.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use imgstore_engine::{EngineError, LiveOptions, LiveStart, LiveTarget, Progress};
use imgstore_format::{Id, Snapshot};
use imgstore_nbd::{Export, Exports};
use imgstore_repo::Repository;
use serde_json::json;

use crate::args::RestoreArgs;
use crate::output::{emit, note, JSON_SCHEMA};
use crate::progress::Bar;
use crate::units::{human_bytes, parse_size};

/// The one export: the disk as the live target presents it.
struct LiveExport<'a> {
    live: &'a LiveTarget<'a>,
    name: String,
    describe: String,
    /// When a client error was last reported (at most one a second: a
    /// repository that is down fails every read of a missing block).
    last_note: Mutex<Option<Instant>>,
}

impl LiveExport<'_> {
    fn eio(&self, e: EngineError) -> std::io::Error {
        let mut last = self.last_note.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            note(&format!("imgstore restore --live: client I/O failed: {e}"));
        }
        std::io::Error::other(e.to_string())
    }
}

impl Export for LiveExport<'_> {
    fn size(&self) -> u64 {
        self.live.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.live.read_at(offset, buf).map_err(|e| self.eio(e))
    }
    fn map(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        self.live.map(offset, len).map_err(|e| self.eio(e))
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.live.write_at(offset, data).map_err(|e| self.eio(e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.live.write_zeroes(offset, len).map_err(|e| self.eio(e))
    }
    fn flush(&self) -> std::io::Result<()> {
        self.live.flush().map_err(|e| self.eio(e))
    }
}

impl Exports for LiveExport<'_> {
    fn lookup(&self, name: &str) -> Option<&dyn Export> {
        // The default export, or the snapshot's id (a prefix of 8 or more).
        (name.is_empty() || name.len() >= 8 && self.name.starts_with(name))
            .then_some(self as &dyn Export)
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![(self.name.clone(), self.describe.clone())]
    }
}

/// The default state file of a live restore into `target`: in the state
/// directory, named after a hash of TARGET's canonical path, so running
/// the same command again finds it.
fn default_state(target: &Path) -> anyhow::Result<PathBuf> {
    let canonical = match std::fs::canonicalize(target) {
        Ok(p) => p,
        Err(_) => {
            let parent = target
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let parent = std::fs::canonicalize(parent).with_context(|| {
                format!(
                    "target {}: directory {} does not exist",
                    target.display(),
                    parent.display()
                )
            })?;
            parent.join(target.file_name().unwrap_or_default())
        }
    };
    let dir = crate::open::state_dir("live-restore state files")?.join("live");
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create {}: make it writable, set IMGSTORE_STATE_DIR, or pass --state FILE",
            dir.display()
        )
    })?;
    let key = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    Ok(dir.join(format!("{}.state", &key[..32])))
}

/// One `--json-status` line.
fn status_json(s: &imgstore_engine::LiveStats, elapsed: f64) -> String {
    let rate = if elapsed > 0.0 {
        s.copied_bytes as f64 / elapsed
    } else {
        0.0
    };
    let left = s.size - s.final_bytes.min(s.size);
    json!({
        "schema_version": JSON_SCHEMA,
        "message_type": "live_status",
        "seconds_elapsed": elapsed,
        "total_bytes": s.size,
        "final_bytes": s.final_bytes,
        "copied_bytes": s.copied_bytes,
        "resumed_bytes": s.resumed_bytes,
        "client_written_bytes": s.client_written_bytes,
        "repo_read_bytes": s.repo_read_bytes,
        "bytes_per_second": rate,
        "eta_seconds": if left == 0 { Some(0.0) } else if rate > 0.0 { Some(left as f64 / rate) } else { None },
        "complete": s.complete(),
    })
    .to_string()
}

/// `restore SNAPSHOT TARGET --live`.
pub fn restore_live(
    store: &dyn Repository,
    id: &Id,
    snap: &Snapshot,
    target: &str,
    a: &RestoreArgs,
    progress: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    if target == "-" {
        return Err(crate::exit::usage(
            "--live restores into a file or block device it serves from, not stdout",
        ));
    }
    let target_path = Path::new(target);
    let state = match &a.state {
        Some(s) => s.clone(),
        None => default_state(target_path)?,
    };
    let pause = std::env::var("IMGSTORE_LIVE_TEST_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let threads = match pause {
        Some(_) => 1,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()) * 3,
    };
    let opts = LiveOptions {
        cache_bytes: parse_size(&a.cache)? as usize,
        copy_threads: threads,
        region_pause: pause,
        ..LiveOptions::default()
    };
    let (live, start) = LiveTarget::open(store, id, snap, target_path, &state, a.force, opts)?;
    let live = &live;
    let export = LiveExport {
        live,
        name: id.to_hex(),
        describe: format!(
            "live restore of {} ({}) into {target}",
            id.short(),
            snap.name
        ),
        last_note: Mutex::new(None),
    };
    let export = &export;
    enum Listener {
        Unix(UnixListener),
        Tcp(TcpListener),
    }
    let (listener, uri) = match &a.socket {
        Some(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                // Left by an earlier run that was killed.
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path)
                .with_context(|| format!("cannot listen on socket {}", path.display()))?;
            (
                Listener::Unix(l),
                format!("nbd+unix:///?socket={}", path.display()),
            )
        }
        None => {
            let l = TcpListener::bind(&a.listen)
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            (Listener::Tcp(l), format!("nbd://{}", a.listen))
        }
    };
    let s0 = live.stats();
    note(&format!(
        "serving {} ({}, {}) at {uri}, writable; restoring into {target} underneath ({}); Ctrl-C stops, the same command resumes",
        id.short(),
        snap.name,
        human_bytes(snap.size),
        match start {
            LiveStart::Fresh => "from the start".to_string(),
            LiveStart::Resumed => format!(
                "resumed: {} already there, state {}",
                human_bytes(s0.final_bytes),
                state.display()
            ),
        }
    ));
    let stop = AtomicBool::new(false);
    let copy_over = AtomicBool::new(false);
    let copy_failed = AtomicBool::new(false);
    let (stop, copy_over, copy_failed) = (&stop, &copy_over, &copy_failed);
    let (rt, mut stops) = crate::stops::watch()?;
    let json_status = a.json_status;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // The background copy.
        scope.spawn(move || {
            let on_retry = |e: &EngineError, wait: Duration| {
                note(&format!(
                    "imgstore restore --live: copy: {e}; retrying in {:.1} s",
                    wait.as_secs_f64()
                ))
            };
            match live.copy(stop, &on_retry) {
                Ok(true) => {
                    let s = live.stats();
                    note(&format!(
                        "{target} now holds the snapshot plus {} written by the client; switch the VM to it, then stop with Ctrl-C",
                        crate::units::plural(s.client_written_bytes, "byte")
                    ));
                }
                Ok(false) => {}
                Err(e) => {
                    copy_failed.store(true, Relaxed);
                    note(&format!(
                        "imgstore restore --live: the background copy stopped: {e}; the export keeps serving; fix it, stop with Ctrl-C and run the same command to resume"
                    ));
                }
            }
            copy_over.store(true, Relaxed);
        });
        // Progress: the bar on a terminal, JSON lines with --json-status.
        scope.spawn(move || {
            let bar = Bar::new(progress);
            bar.start(Some(live.size()));
            let mut shown = 0;
            let mut last_json = Instant::now();
            loop {
                let s = live.stats();
                bar.advance(s.final_bytes - shown);
                shown = s.final_bytes;
                if json_status && last_json.elapsed() >= Duration::from_secs(1) {
                    last_json = Instant::now();
                    let _ = emit(&format!(
                        "{}\n",
                        status_json(&s, started.elapsed().as_secs_f64())
                    ));
                }
                if copy_over.load(Relaxed) {
                    bar.finish();
                    if json_status {
                        let _ = emit(&format!(
                            "{}\n",
                            status_json(&live.stats(), started.elapsed().as_secs_f64())
                        ));
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        // Ctrl-C / SIGTERM: the copy stops, every write is made durable,
        // the state file goes once TARGET is complete.
        let socket = a.socket.clone();
        let state = state.clone();
        scope.spawn(move || {
            let why = rt.block_on(stops.next());
            stop.store(true, Relaxed);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !copy_over.load(Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut code = 0;
            if let Err(e) = live.flush() {
                note(&format!("imgstore restore --live: {e}"));
                code = crate::exit::FAILURE as i32;
            }
            if let Some(path) = &socket {
                let _ = std::fs::remove_file(path);
            }
            let s = live.stats();
            if code == 0 && s.complete() && !copy_failed.load(Relaxed) {
                if let Err(e) = live.remove_state() {
                    note(&format!("imgstore restore --live: {e}"));
                    code = crate::exit::FAILURE as i32;
                } else {
                    note(&format!(
                        "stopped ({why}); {target} is complete: the snapshot plus {} written by the client, every write kept",
                        crate::units::plural(s.client_written_bytes, "byte")
                    ));
                }
            } else if code == 0 {
                note(&format!(
                    "stopped ({why}) before the restore completed: {} of {} in {target}, every flushed write kept; run the same command to resume (state in {})",
                    human_bytes(s.final_bytes),
                    human_bytes(s.size),
                    state.display()
                ));
                code = crate::exit::FAILURE as i32;
            }
            std::process::exit(code);
        });
        match listener {
            Listener::Unix(l) => {
                for conn in l.incoming() {
                    let conn = conn.context("accept")?;
                    scope.spawn(move || {
                        if let Err(e) = imgstore_nbd::serve_connection(conn, export) {
                            note(&format!("imgstore restore --live: client: {e}"));
                        }
                    });
                }
            }
            Listener::Tcp(l) => {
                for conn in l.incoming() {
                    let conn = conn.context("accept")?;
                    let _ = conn.set_nodelay(true);
                    scope.spawn(move || {
                        if let Err(e) = imgstore_nbd::serve_connection(conn, export) {
                            note(&format!("imgstore restore --live: client: {e}"));
                        }
                    });
                }
            }
        }
        Ok(())
    })
}
