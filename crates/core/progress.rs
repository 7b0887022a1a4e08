//! The progress bar: on stderr, only when stderr is a terminal.

use std::io::IsTerminal;

use imgstore_engine::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(enabled: bool) -> Bar {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Bar { bar }
    }
}

impl Progress for Bar {
    fn start(&self, total: Option<u64>) {
        match (&self.bar, total) {
            (Some(b), Some(t)) => b.set_length(t),
            // A stream or a device of unknown size: bytes and rate, no
            // made-up total or ETA.
            (Some(b), None) => b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bytes} {binary_bytes_per_sec}",
                )
                .expect("valid template"),
            ),
            (None, _) => {}
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `backup --json --json-status`: a JSON status line on stdout about once
/// a second while the backup runs (the final summary follows it).
pub struct JsonStatus {
    started: std::time::Instant,
    total: std::sync::Mutex<Option<u64>>,
    done: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<std::time::Instant>,
}

impl JsonStatus {
    pub fn new() -> JsonStatus {
        let now = std::time::Instant::now();
        JsonStatus {
            started: now,
            total: std::sync::Mutex::new(None),
            done: std::sync::atomic::AtomicU64::new(0),
            last: std::sync::Mutex::new(now),
        }
    }

    fn line(&self) -> String {
        let done = self.done.load(std::sync::atomic::Ordering::Relaxed);
        let total = *self.total.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "schema_version": crate::output::JSON_SCHEMA,
            "message_type": "status",
            "seconds_elapsed": self.started.elapsed().as_secs_f64(),
            "bytes_done": done,
            "total_bytes": total,
            "percent_done": total.map(|t| if t == 0 { 1.0 } else { done as f64 / t as f64 }),
        })
        .to_string()
    }
}

impl Progress for JsonStatus {
    fn start(&self, total: Option<u64>) {
        *self.total.lock().unwrap_or_else(|p| p.into_inner()) = total;
    }
    fn advance(&self, bytes: u64) {
        self.done
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            *last = std::time::Instant::now();
            drop(last);
            let _ = crate::output::emit(&format!("{}\n", self.line()));
        }
    }
}
