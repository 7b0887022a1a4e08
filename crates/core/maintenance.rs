//! `forget`, `gc`, `protect`/`unprotect` and `stats`.

use std::collections::HashSet;
use std::path::Path;

use crate::open::Repo;
use imgstore_engine::policy::Policy;
use imgstore_engine::{ForgetRequest, Selector, SnapshotReader};
use imgstore_format::{Id, ObjectKind};
use imgstore_repo::Repository;
use serde_json::json;

use crate::args::{ForgetArgs, GcArgs, IdArg, StatsArgs, TagArgs};
use crate::output::{emit, note};
use crate::units::{format_time, human_bytes, plural};

/// The repository's disk usage, then the repository opened read-only for a
/// dry run or as the writer `operation` otherwise (usage is measured first:
/// opening for write preallocates a WAL file).
fn open_for(repo: &Path, dry_run: bool, operation: &'static str) -> anyhow::Result<(u64, Repo)> {
    let dir_bytes = crate::open::remote_url(repo)
        .is_none()
        .then(|| imgstore_store::disk_usage(repo));
    let store = if operation == "gc" {
        // gc moves counts and deletes orphans by their clear child ids: it
        // needs no key, so an encrypted repository's host can run it.
        crate::open::open_keyless(repo, dry_run, operation)?
    } else if dry_run {
        crate::open::open_read(repo)?
    } else {
        crate::open::open_writer(repo, operation)?
    };
    Ok((store.usage_with(dir_bytes), store))
}

fn resolve(store: &dyn Repository, s: &str, name: Option<&str>) -> anyhow::Result<Id> {
    crate::select::check_name(name)?;
    let snaps = store.list_snapshots()?;
    let id = imgstore_engine::select_listed(&snaps, &Selector::parse(s)?, name)?.0;
    crate::output::warn_unreadable(&snaps.unreadable);
    Ok(id)
}

pub fn forget(repo: &Path, a: ForgetArgs) -> anyhow::Result<()> {
    let within_ns = a
        .keep_within
        .as_deref()
        .map(|d| {
            humantime::parse_duration(d)
                .map(|d| d.as_nanos() as i64)
                .map_err(|_| {
                    crate::exit::usage(format!(
                        "--keep-within '{d}' is not a duration (e.g. 30d, 2w, 12h)"
                    ))
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
        (false, false) => {
            return Err(crate::exit::usage(
                "give snapshot ids or --keep-* rules, not both",
            ))
        }
        (true, true) => {
            return Err(crate::exit::usage(
                "nothing to forget: name snapshots, or give --keep-* rules (e.g. --keep-daily 7)",
            ))
        }
        _ => {}
    }
    let (before, store) = open_for(repo, a.dry_run, "forget")?;
    let request = if a.snapshots.is_empty() {
        ForgetRequest::Policy(policy)
    } else {
        ForgetRequest::Snapshots(a.snapshots.clone())
    };
    crate::select::check_name(a.name.as_deref())?;
    let filter = imgstore_engine::SnapshotFilter {
        name: a.name.clone(),
        hosts: a.host.clone(),
        tags: a.tag.clone(),
    };
    let plan = imgstore_engine::plan_forget(&*store, &request, &filter)?;
    let decisions = &plan.decisions;
    let remove = plan.remove();
    // Removed first, reported after: a refusal (a protected snapshot, a
    // server's append-only token) must not print "removed".
    if !a.dry_run {
        imgstore_engine::forget(&*store, &plan)?;
    }
    // Records that cannot be read and were not named are never chosen by a
    // policy: each is warned about (and, with a policy, listed as kept).
    crate::output::warn_unreadable(&plan.unreadable_kept);
    let policy_run = a.snapshots.is_empty();
    let unreadable: Vec<(&imgstore_repo::UnreadableSnapshot, bool)> = plan
        .unreadable_removed
        .iter()
        .map(|u| (u, false))
        .chain(
            plan.unreadable_kept
                .iter()
                .filter(|_| policy_run)
                .map(|u| (u, true)),
        )
        .collect();
    let kept = decisions.iter().filter(|d| d.keep).count()
        + unreadable.iter().filter(|(_, keep)| *keep).count();
    if a.json {
        let v: Vec<_> = unreadable
            .iter()
            .map(|(u, keep)| {
                json!({
                    "schema_version": crate::output::JSON_SCHEMA,
                    "id": u.id.to_hex(),
                    "name": null,
                    "time": null,
                    "keep": keep,
                    "reasons": if *keep { vec!["unreadable"] } else { vec![] },
                    "unreadable": u.why,
                })
            })
            .chain(decisions.iter().map(|d| json!({"schema_version": crate::output::JSON_SCHEMA, "id": d.id.to_hex(), "name": d.name, "time": format_time(d.time_ns), "keep": d.keep, "reasons": d.reasons})))
            .collect();
        emit(&format!("{}\n", serde_json::Value::Array(v)))?;
    } else {
        let mut out = String::new();
        for (u, keep) in &unreadable {
            out.push_str(&format!(
                "{:<6}  {}  (cannot be read: {})\n",
                if *keep { "keep" } else { "remove" },
                u.id.short(),
                u.why
            ));
        }
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
            "{} {}, {} kept\n",
            plural(remove.len() as u64, "snapshot"),
            if a.dry_run {
                "would be removed"
            } else {
                "removed"
            },
            kept
        ));
        emit(&out)?;
    }
    if a.dry_run {
        return Ok(());
    }
    if a.prune {
        run_gc(store, before, false, a.json)?;
    }
    Ok(())
}

pub fn gc(repo: &Path, a: GcArgs) -> anyhow::Result<()> {
    let (before, store) = open_for(repo, a.dry_run, "gc")?;
    run_gc(store, before, a.dry_run, a.json)
}

/// Sweeps and reclaims; `before` is the repository's disk usage measured
/// before it was opened (opening for write preallocates a WAL file). The
/// size after is measured once the store is closed: RocksDB deletes the
/// files compaction made obsolete by then, so the figure is space really
/// returned to the file system.
fn run_gc(store: Repo, before: u64, dry_run: bool, json_out: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let outcome = store.gc(dry_run)?;
    let (swept, rewrote) = (outcome.removed, outcome.rewrote);
    let after = if dry_run { before } else { store.close() };
    let secs = started.elapsed().as_secs_f64();
    if json_out {
        return emit(&format!(
            "{}\n",
            json!({
                "schema_version": crate::output::JSON_SCHEMA,
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
        "{} {} ({} stored), {}, {}; repository {} -> {} in {:.2} s",
        if dry_run { "would remove" } else { "removed" },
        plural(swept.chunks, "chunk"),
        human_bytes(swept.chunk_stored_bytes),
        plural(swept.regions, "region"),
        plural(swept.pages, "page"),
        human_bytes(before),
        human_bytes(after),
        secs
    ));
    Ok(())
}

pub fn protect(repo: &Path, a: IdArg, on: bool) -> anyhow::Result<()> {
    let store = crate::open::open_writer(repo, if on { "protect" } else { "unprotect" })?;
    let id = resolve(&*store, &a.snapshot, a.name.as_deref())?;
    store.set_protected(&id, on)?;
    note(&format!(
        "snapshot {} {}",
        id.short(),
        if on { "protected" } else { "unprotected" }
    ));
    Ok(())
}

pub fn stats(repo: &Path, a: StatsArgs) -> anyhow::Result<()> {
    let store = crate::open::open_read(repo)?;
    let listed = store.list_snapshots()?;
    let snaps = &listed.snapshots;
    let v = match &a.snapshot {
        None => {
            let t = store.totals()?;
            let logical: u64 = snaps.iter().map(|(_, s)| s.size).sum();
            let data: u64 = snaps
                .iter()
                .map(|(_, s)| s.size - s.stats.zero_bytes.min(s.size))
                .sum();
            let stored = t.objects.chunk_stored_bytes + t.objects.recipe_bytes;
            let mut v = json!({
                "schema_version": crate::output::JSON_SCHEMA,
                "snapshots": snaps.len(),
                "unreadable_snapshots": listed.unreadable.len(),
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
                "repository_disk_bytes": store.disk_usage(),
            });
            if let Some(b) = store.bucket_report() {
                // Packs in the bucket, and how much of them the index
                // still points to (gc repacks past 25% garbage).
                v["bucket"] = json!(b.url);
                v["packs"] = json!(b.packs);
                v["pack_bytes"] = json!(b.pack_bytes);
                v["pack_live_bytes"] = json!(b.pack_live_bytes);
            }
            v
        }
        Some(s) => {
            let (id, snap) =
                imgstore_engine::select_listed(&listed, &Selector::parse(s)?, a.name.as_deref())?;
            let reader = SnapshotReader::open(&*store, &id, &snap)?;
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
                "schema_version": crate::output::JSON_SCHEMA,
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
    crate::output::warn_unreadable(&listed.unreadable);
    if a.json {
        return emit(&format!("{v}\n"));
    }
    emit(&stats_text(&v))
}

/// `stats` for people: labelled lines, sizes in binary units with exact
/// bytes, ratios as "N.NN×".
fn stats_text(v: &serde_json::Value) -> String {
    const LABELS: &[(&str, &str)] = &[
        ("id", "Snapshot"),
        ("name", "Name"),
        ("snapshots", "Snapshots"),
        ("unreadable_snapshots", "Unreadable snapshot records"),
        ("logical_bytes", "Image bytes (all snapshots)"),
        ("data_bytes", "Data (non-zero) bytes"),
        ("zero_bytes", "Zero bytes"),
        ("chunks", "Chunks"),
        ("unique_chunks", "Unique chunks"),
        ("unique_chunk_bytes", "Unique chunk bytes"),
        ("stored_bytes", "Stored bytes"),
        ("recipe_bytes", "Metadata bytes"),
        ("regions", "Region recipes"),
        ("pages", "Index pages"),
        ("orphans", "Awaiting gc"),
        ("dedup_ratio", "Deduplication"),
        ("compression_ratio", "Compression"),
        ("repository_disk_bytes", "Repository on disk"),
        ("bucket", "Bucket"),
        ("packs", "Packs"),
        ("pack_bytes", "Pack bytes"),
        ("pack_live_bytes", "Live pack bytes"),
    ];
    let mut out = String::new();
    for (k, label) in LABELS {
        let Some(val) = v.get(*k) else { continue };
        if *k == "unreadable_snapshots" && val.as_u64() == Some(0) {
            continue;
        }
        let shown = match (k.ends_with("_bytes"), k.ends_with("_ratio"), val) {
            (true, _, serde_json::Value::Number(n)) => {
                let n = n.as_u64().unwrap_or(0);
                format!("{} ({n} bytes)", human_bytes(n))
            }
            (_, true, serde_json::Value::Number(f)) => {
                format!("{:.2}×", f.as_f64().unwrap_or(0.0))
            }
            (_, _, serde_json::Value::String(t)) => t.clone(),
            (_, _, other) => other.to_string(),
        };
        out.push_str(&format!("{:<28} {shown}\n", format!("{label}:")));
    }
    out
}

pub fn tag(repo: &Path, a: TagArgs) -> anyhow::Result<()> {
    if a.add.is_empty() && a.remove.is_empty() && a.set.is_empty() {
        return Err(crate::exit::usage(
            "nothing to change: give --add TAG, --remove TAG or --set TAG",
        ));
    }
    let store = crate::open::open_writer(repo, "tag")?;
    let chosen = crate::select::chosen_snapshots(&*store, &a.snapshots, false, a.name.as_deref())?;
    let set = (!a.set.is_empty()).then_some(a.set.as_slice());
    let mut changed = 0u64;
    for (id, _) in &chosen {
        let new = imgstore_engine::retag(&*store, id, set, &a.add, &a.remove)?;
        if new != *id {
            changed += 1;
            crate::output::detail(&format!("snapshot {} is now {}", id.short(), new.short()));
            emit(&format!("{}\n", new.to_hex()))?;
        } else {
            emit(&format!("{}\n", id.to_hex()))?;
        }
    }
    note(&format!(
        "retagged {} of {} (a snapshot's id changes with its tags)",
        plural(changed, "snapshot"),
        chosen.len()
    ));
    Ok(())
}
