//! What the user sees besides tables and progress: stdout that ends quietly
//! when its reader goes away, notes and details on stderr as `--quiet` and
//! `--verbose` say, warnings about unreadable snapshot records, and the JSON
//! objects several commands print alike (schema version, a snapshot, a
//! bucket's request counts).

use std::io::Write;

use anyhow::Context;
use imgstore_format::{Id, Snapshot};
use imgstore_repo::UnreadableSnapshot;
use serde_json::json;

use crate::settings::settings;
use crate::units::format_time;

/// Writes to stdout; a reader that went away (`| head`) ends output quietly.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// A summary or note on stderr (not with --quiet).
pub(crate) fn note(text: &str) {
    if !settings().quiet {
        let _ = writeln!(std::io::stderr(), "{text}");
    }
}

/// One warning line on stderr (not with --quiet) per snapshot record that
/// cannot be read and was skipped.
pub(crate) fn warn_unreadable(bad: &[UnreadableSnapshot]) {
    for u in bad {
        note(&format!(
            "imgstore: warning: snapshot {} cannot be read ({}): skipped; `imgstore check` reports it, `imgstore forget {}` removes it",
            u.id,
            u.why,
            u.id.short()
        ));
    }
}

/// A detail on stderr, only with --verbose.
pub(crate) fn detail(text: &str) {
    if settings().verbose {
        let _ = writeln!(std::io::stderr(), "{text}");
    }
}

/// Version of every JSON object imgstore prints (docs/JSON.md); raised
/// when a field changes meaning or goes away, not when one is added.
pub(crate) const JSON_SCHEMA: u32 = 1;

pub(crate) fn snapshot_json(id: &Id, s: &Snapshot) -> serde_json::Value {
    json!({
        "schema_version": JSON_SCHEMA,
        "id": id.to_hex(),
        "short_id": id.short(),
        "name": s.name,
        "time": format_time(s.time_ns),
        "time_ns": s.time_ns,
        "hostname": s.hostname,
        "source": s.source,
        "tags": s.tags,
        "size": s.size,
        "digest": Id(s.digest).to_hex(),
        "chunks": s.stats.chunks,
        "zero_bytes": s.stats.zero_bytes,
        "new_chunks": s.stats.new_chunks,
        "new_bytes": s.stats.new_bytes,
        "seconds": s.stats.duration_ns as f64 / 1e9,
        "bitmap": s.bitmap.as_ref().map(|b| json!({
            "kind": match b.kind {
                imgstore_format::BitmapKind::Nbd => "nbd",
                imgstore_format::BitmapKind::Managed => "managed",
            },
            "name": b.name,
            "read": (!b.read.is_empty()).then_some(&b.read),
            "next": b.next,
            "source": b.source,
        })),
    })
}

/// Request counts and cache figures of a bucket-backed repository.
pub(crate) fn bucket_json(b: &imgstore_store::BucketReport) -> serde_json::Value {
    json!({
        "puts": b.requests.puts,
        "gets": b.requests.gets,
        "lists": b.requests.lists,
        "deletes": b.requests.deletes,
        "bytes_up": b.requests.bytes_up,
        "bytes_down": b.requests.bytes_down,
        "cache_hits": b.cache_hits,
        "cache_misses": b.cache_misses,
        "cache_bytes": b.cache_bytes,
    })
}
