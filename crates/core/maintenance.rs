//! `forget`, `gc`, `protect`/`unprotect` and `stats`.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context};
use imgstore_engine::policy::Policy;
use imgstore_engine::{ForgetRequest, Selector, SnapshotReader};
use imgstore_format::{Id, ObjectKind};
use imgstore_repo::Repository;
use imgstore_store::{disk_usage, Mode, Store};
use serde_json::json;

use crate::args::{ForgetArgs, GcArgs, IdArg, StatsArgs};
use crate::commands::{emit, note};
use crate::units::{format_time, human_bytes};

/// The repository's disk usage, then the repository opened read-only for a
/// dry run or as the writer `operation` otherwise (usage is measured first:
/// opening for write preallocates a WAL file).
fn open_for(repo: &Path, dry_run: bool, operation: &'static str) -> anyhow::Result<(u64, Store)> {
    let before = disk_usage(repo);
    let mode = if dry_run {
        Mode::ReadOnly
    } else {
        Mode::Write { operation }
    };
    Ok((before, Store::open(repo, mode)?))
}

fn resolve(store: &Store, s: &str, name: Option<&str>) -> anyhow::Result<Id> {
    let snaps = store.snapshots()?;
    Ok(imgstore_engine::select(&snaps, &Selector::parse(s)?, name)?.0)
}

pub fn forget(repo: &Path, a: ForgetArgs) -> anyhow::Result<()> {
    let within_ns = a
        .keep_within
        .as_deref()
        .map(|d| {
            humantime::parse_duration(d)
                .map(|d| d.as_nanos() as i64)
                .with_context(|| {
                    format!("--keep-within '{d}' is not a duration (e.g. 30d, 2w, 12h)")
                })
        })
        .transpose()?;
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within_ns,
        tags: a.keep_tag.clone(),
    };
    match (a.snapshots.is_empty(), policy.is_empty()) {
        (false, false) => bail!("give snapshot ids or --keep-* rules, not both"),
        (true, true) => {
            bail!("nothing to forget: name snapshots, or give --keep-* rules (e.g. --keep-daily 7)")
        }
        _ => {}
    }
    let (before, store) = open_for(repo, a.dry_run, "forget")?;
    let request = if a.snapshots.is_empty() {
        ForgetRequest::Policy(policy)
    } else {
        ForgetRequest::Snapshots(a.snapshots.clone())
    };
    let plan = imgstore_engine::plan_forget(&store, &request, a.name.as_deref())?;
    let decisions = &plan.decisions;
    let remove: Vec<Id> = decisions.iter().filter(|d| !d.keep).map(|d| d.id).collect();
    if a.json {
        let v: Vec<_> = decisions
            .iter()
            .map(|d| json!({"id": d.id.to_hex(), "name": d.name, "time": format_time(d.time_ns), "keep": d.keep, "reasons": d.reasons}))
            .collect();
        emit(&format!("{}\n", serde_json::Value::Array(v)))?;
    } else {
        let mut out = String::new();
        for d in decisions {
            out.push_str(&format!(
                "{:<6}  {}  {}  {}  {}\n",
                if d.keep { "keep" } else { "remove" },
                d.id.short(),
                format_time(d.time_ns),
                d.name,
                d.reasons.join(", ")
            ));
        }
        out.push_str(&format!(
            "{} snapshots {}, {} kept\n",
            remove.len(),
            if a.dry_run {
                "would be removed"
            } else {
                "removed"
            },
            decisions.len() - remove.len()
        ));
        emit(&out)?;
    }
    if a.dry_run {
        return Ok(());
    }
    imgstore_engine::forget(&store, &plan)?;
    if a.prune {
        run_gc(&store, before, false, a.json)?;
    }
    Ok(())
}

pub fn gc(repo: &Path, a: GcArgs) -> anyhow::Result<()> {
    let (before, store) = open_for(repo, a.dry_run, "gc")?;
    run_gc(&store, before, a.dry_run, a.json)
}

/// Sweeps and reclaims; `before` is the repository's disk usage measured
/// before it was opened (opening for write preallocates a WAL file).
fn run_gc(store: &Store, before: u64, dry_run: bool, json_out: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let outcome = store.gc(dry_run)?;
    let (swept, rewrote) = (outcome.removed, outcome.rewrote);
    let after = if dry_run {
        before
    } else {
        disk_usage(store.dir())
    };
    let secs = started.elapsed().as_secs_f64();
    if json_out {
        return emit(&format!(
            "{}\n",
            json!({
                "dry_run": dry_run,
                "chunks_removed": swept.chunks,
                "regions_removed": swept.regions,
                "pages_removed": swept.pages,
                "chunk_bytes_removed": swept.chunk_raw_bytes,
                "stored_bytes_removed": swept.chunk_stored_bytes + swept.recipe_bytes,
                "blob_files_rewritten": rewrote,
                "repository_bytes_before": before,
                "repository_bytes_after": after,
                "seconds": secs,
            })
        ));
    }
    note(&format!(
        "{} {} chunks ({} stored), {} regions, {} pages; repository {} -> {} in {:.2} s",
        if dry_run { "would remove" } else { "removed" },
        swept.chunks,
        human_bytes(swept.chunk_stored_bytes),
        swept.regions,
        swept.pages,
        human_bytes(before),
        human_bytes(after),
        secs
    ));
    Ok(())
}

pub fn protect(repo: &Path, a: IdArg, on: bool) -> anyhow::Result<()> {
    let store = Store::open(
        repo,
        Mode::Write {
            operation: if on { "protect" } else { "unprotect" },
        },
    )?;
    let id = resolve(&store, &a.snapshot, None)?;
    store.set_protected(&id, on)?;
    note(&format!(
        "snapshot {} {}",
        id.short(),
        if on { "protected" } else { "unprotected" }
    ));
    Ok(())
}

pub fn stats(repo: &Path, a: StatsArgs) -> anyhow::Result<()> {
    let store = Store::open(repo, Mode::ReadOnly)?;
    let snaps = store.snapshots()?;
    let v = match &a.snapshot {
        None => {
            let t = store.totals()?;
            let logical: u64 = snaps.iter().map(|(_, s)| s.size).sum();
            let data: u64 = snaps
                .iter()
                .map(|(_, s)| s.size - s.stats.zero_bytes.min(s.size))
                .sum();
            let stored = t.objects.chunk_stored_bytes + t.objects.recipe_bytes;
            json!({
                "snapshots": snaps.len(),
                "logical_bytes": logical,
                "data_bytes": data,
                "unique_chunk_bytes": t.objects.chunk_raw_bytes,
                "stored_bytes": stored,
                "recipe_bytes": t.objects.recipe_bytes,
                "chunks": t.objects.chunks,
                "regions": t.objects.regions,
                "pages": t.objects.pages,
                "orphans": t.orphans,
                "dedup_ratio": data as f64 / t.objects.chunk_raw_bytes.max(1) as f64,
                "compression_ratio": t.objects.chunk_raw_bytes as f64 / t.objects.chunk_stored_bytes.max(1) as f64,
                "repository_disk_bytes": disk_usage(store.dir()),
            })
        }
        Some(s) => {
            let (id, snap) =
                imgstore_engine::select(&snaps, &Selector::parse(s)?, a.name.as_deref())?;
            let reader = SnapshotReader::open(&store, &id, &snap)?;
            let regions = reader.region_ids();
            let mut chunks = HashSet::new();
            let mut seen = HashSet::new();
            let unique: Vec<Id> = regions
                .iter()
                .filter(|r| **r != Id::ZERO && seen.insert(**r))
                .copied()
                .collect();
            for batch in unique.chunks(256) {
                for r in store.regions(batch)? {
                    chunks.extend(r.entries.into_iter().filter_map(|e| e.chunk));
                }
            }
            let chunks: Vec<Id> = chunks.into_iter().collect();
            let (mut raw, mut stored) = (0u64, 0u64);
            for rc in store
                .ref_counts(ObjectKind::Chunk, &chunks)?
                .into_iter()
                .flatten()
            {
                raw += rc.logical_len as u64;
                stored += rc.stored_len as u64;
            }
            let data = snap.size - snap.stats.zero_bytes.min(snap.size);
            json!({
                "id": id.to_hex(),
                "name": snap.name,
                "logical_bytes": snap.size,
                "data_bytes": data,
                "zero_bytes": snap.stats.zero_bytes,
                "chunks": snap.stats.chunks,
                "unique_chunks": chunks.len(),
                "unique_chunk_bytes": raw,
                "stored_bytes": stored,
                "dedup_ratio": data as f64 / raw.max(1) as f64,
                "compression_ratio": raw as f64 / stored.max(1) as f64,
            })
        }
    };
    if a.json {
        return emit(&format!("{v}\n"));
    }
    let mut out = String::new();
    for (k, val) in v.as_object().expect("object") {
        let shown = match (k.ends_with("_bytes"), val.as_u64(), val.as_f64()) {
            (true, Some(n), _) => format!("{} ({n})", human_bytes(n)),
            (false, None, Some(f)) => format!("{f:.2}"),
            _ => val.to_string().trim_matches('"').to_string(),
        };
        out.push_str(&format!("{k:<22} {shown}\n"));
    }
    emit(&out)
}
