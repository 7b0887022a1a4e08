//! Counters for `/metrics` (Prometheus text format).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub(crate) struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub denied: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub regions_put: AtomicU64,
    pub chunks_new: AtomicU64,
    pub chunk_bytes_new: AtomicU64,
    pub commits: AtomicU64,
    pub gc_runs: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn render(&self, sessions: usize, pinned: usize) -> String {
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP imgstore_{name} {help}\n# TYPE imgstore_{name} {kind}\nimgstore_{name} {v}\n"
            ));
        };
        line(
            "requests_total",
            "counter",
            "Requests answered.",
            self.requests.load(Relaxed),
        );
        line(
            "errors_total",
            "counter",
            "Requests answered with an error.",
            self.errors.load(Relaxed),
        );
        line(
            "denied_total",
            "counter",
            "Requests refused for credentials or role.",
            self.denied.load(Relaxed),
        );
        line(
            "received_bytes_total",
            "counter",
            "Request body bytes.",
            self.bytes_in.load(Relaxed),
        );
        line(
            "sent_bytes_total",
            "counter",
            "Response body bytes.",
            self.bytes_out.load(Relaxed),
        );
        line(
            "regions_put_total",
            "counter",
            "Region uploads stored.",
            self.regions_put.load(Relaxed),
        );
        line(
            "chunks_new_total",
            "counter",
            "Chunks new to the repository.",
            self.chunks_new.load(Relaxed),
        );
        line(
            "chunk_bytes_new_total",
            "counter",
            "Stored bytes of new chunks.",
            self.chunk_bytes_new.load(Relaxed),
        );
        line(
            "commits_total",
            "counter",
            "Snapshots committed.",
            self.commits.load(Relaxed),
        );
        line(
            "gc_runs_total",
            "counter",
            "Garbage collections run.",
            self.gc_runs.load(Relaxed),
        );
        line(
            "sessions_active",
            "gauge",
            "Backup sessions open.",
            sessions as u64,
        );
        line(
            "pinned_objects",
            "gauge",
            "Objects held for open sessions.",
            pinned as u64,
        );
        out
    }
}
