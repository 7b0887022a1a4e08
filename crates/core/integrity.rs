//! `check` and `verify`.

use std::path::Path;

use imgstore_engine::{CheckReport, ReadData, Target};
use imgstore_format::{Id, ObjectKind};
use imgstore_repo::DamageMark;
use imgstore_store::StoreError;
use serde_json::json;

use crate::args::{CheckArgs, VerifyArgs};
use crate::output::{emit, note};
use crate::progress::Bar;
use crate::units::{format_time, human_bytes, plural};

fn kind_name(k: ObjectKind) -> &'static str {
    match k {
        ObjectKind::Chunk => "chunk",
        ObjectKind::Region => "region",
        ObjectKind::Page => "page",
    }
}

/// Records damage marks (and clears marks of objects found intact) so that
/// the next backup of the same data repairs them. The check itself runs
/// read-only; this needs the writer lock and is skipped, with a note, when
/// another writer holds it.
fn record_marks(
    repo: &Path,
    marks: &[DamageMark],
    intact: &[(ObjectKind, Id)],
    keyless: bool,
) -> Option<String> {
    if marks.is_empty() && intact.is_empty() {
        return None;
    }
    let result = if keyless {
        // Marks are stored by object id: no key needed to record them.
        crate::open::open_keyless(repo, false, "check").map_err(|e| {
            imgstore_engine::EngineError::Repo(imgstore_repo::RepoError::Invalid(e.to_string()))
        })
    } else {
        crate::open::open_writer_now(repo, "check")
    }
    .and_then(|w| imgstore_engine::record_damage(&*w, marks, intact));
    Some(match result {
        Ok(0) if intact.is_empty() => return None,
        Ok(n) => format!(
            "marked {} for repair (the next backup of the same data rewrites them){}",
            plural(n as u64, "newly damaged object"),
            if intact.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} unmarked",
                    plural(intact.len() as u64, "repaired object")
                )
            }
        ),
        Err(e @ imgstore_engine::EngineError::Repo(StoreError::Busy { .. })) => {
            format!("could not mark damaged objects for repair ({e}); run check again later")
        }
        Err(e) => format!("could not mark damaged objects for repair: {e}"),
    })
}

pub fn check(repo: &Path, a: CheckArgs, progress: bool) -> anyhow::Result<()> {
    let read = match (&a.read_data_subset, a.read_data) {
        (Some(s), _) => ReadData::Subset {
            fraction: crate::units::parse_fraction(s, "--read-data-subset")?,
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ u64::from(std::process::id()),
        },
        (None, true) => ReadData::All,
        (None, false) => ReadData::None,
    };
    let started = std::time::Instant::now();
    let report = {
        let store = if a.without_key {
            if crate::open::remote_url(repo).is_some() {
                return Err(crate::exit::usage(
                    "--without-key checks a repository on this machine: run it on the server with -r DIR",
                ));
            }
            crate::open::open_keyless(repo, true, "check")?
        } else {
            crate::open::open_read(repo)?
        };
        let bar = Bar::new(progress);
        let mut report = if a.without_key {
            imgstore_engine::check_structure(&*store, &bar)?
        } else {
            imgstore_engine::check(&*store, read, &bar)?
        };
        let mut problems = Vec::new();
        if let Some(s) = store.local() {
            // The bucket of a bucket-backed repository: every pack there,
            // whole, and (with --read-data and the key) every record's copy
            // intact; without the key the pass below reads every pack.
            let records = !a.without_key && !matches!(read, ReadData::None);
            problems.extend(s.check_storage(records)?);
            if a.without_key && a.read_data {
                let c = s.check_stored_bytes()?;
                report.chunks_read = c.objects;
                report.bytes_read = c.bytes;
                problems.extend(c.problems);
                if c.unhashed_packs > 0 {
                    note(&format!(
                        "{} of the bucket's packs predate entry hashes (pack version 1): their chunks are checked only with the key",
                        c.unhashed_packs
                    ));
                }
            }
        }
        report
            .problems
            .extend(problems.into_iter().map(|what| imgstore_engine::Problem {
                object: None,
                damaged: false,
                what,
            }));
        report
    };
    let secs = started.elapsed().as_secs_f64();
    let marks_note = record_marks(
        repo,
        &report.damage_marks(),
        &report.intact_marked,
        a.without_key,
    );
    if a.json {
        emit(&format!("{}\n", report_json(&report, secs)))?;
    } else {
        emit(&report_text(&report, secs))?;
    }
    if let Some(n) = marks_note {
        note(&n);
    }
    if !report.is_clean() {
        return Err(crate::exit::damaged(format!(
            "check found {}; {} of {} damaged (`imgstore check --json` lists the byte ranges)",
            plural(report.problems.len() as u64, "problem"),
            report.damaged_snapshots.len(),
            plural(report.snapshots, "snapshot")
        )));
    }
    Ok(())
}

fn report_text(r: &CheckReport, secs: f64) -> String {
    const SHOWN: usize = 20;
    let mut out = String::new();
    for p in r.problems.iter().take(SHOWN) {
        out.push_str(&format!(
            "{}: {}\n",
            if p.damaged { "damaged" } else { "problem" },
            p.what
        ));
    }
    if r.problems.len() > SHOWN {
        out.push_str(&format!(
            "... and {} more problems (`--json` lists all)\n",
            r.problems.len() - SHOWN
        ));
    }
    for d in &r.damaged_snapshots {
        let what = match &d.snapshot {
            Some(s) => format!("{}, {}", s.name, format_time(s.time_ns)),
            None => "record unreadable".into(),
        };
        let bytes: u64 = d.ranges.iter().map(|r| r.1).sum();
        let shown: Vec<String> = d
            .ranges
            .iter()
            .take(8)
            .map(|(o, l)| format!("{o}..{}", o + l))
            .collect();
        out.push_str(&format!(
            "damaged snapshot {} ({what}): {} in {} ranges: {}{}\n",
            d.id.short(),
            human_bytes(bytes),
            d.ranges.len(),
            shown.join(", "),
            if d.ranges.len() > 8 { ", ..." } else { "" }
        ));
    }
    out.push_str(&format!(
        "checked {}, {}, {}, {} ({} awaiting gc)",
        plural(r.snapshots, "snapshot"),
        plural(r.chunks, "chunk"),
        plural(r.regions, "region"),
        plural(r.pages, "page"),
        plural(r.orphans, "orphan")
    ));
    if r.chunks_read > 0 {
        out.push_str(&format!(
            "; read and checked {} ({} stored)",
            plural(r.chunks_read, "chunk"),
            human_bytes(r.bytes_read)
        ));
    }
    out.push_str(&format!(" in {secs:.2} s\n"));
    if r.is_clean() {
        out.push_str("no problems found\n");
    }
    out
}

fn report_json(r: &CheckReport, secs: f64) -> serde_json::Value {
    json!({
        "schema_version": crate::output::JSON_SCHEMA,
        "clean": r.is_clean(),
        "snapshots": r.snapshots,
        "chunks": r.chunks,
        "regions": r.regions,
        "pages": r.pages,
        "orphans": r.orphans,
        "chunks_read": r.chunks_read,
        "bytes_read": r.bytes_read,
        "seconds": secs,
        "problems": r.problems.iter().map(|p| json!({
            "damaged": p.damaged,
            "kind": p.object.map(|o| kind_name(o.0)),
            "id": p.object.map(|o| o.1.to_hex()),
            "what": p.what,
        })).collect::<Vec<_>>(),
        "damaged_snapshots": r.damaged_snapshots.iter().map(|d| json!({
            "id": d.id.to_hex(),
            "name": d.snapshot.as_ref().map(|s| s.name.clone()),
            "time": d.snapshot.as_ref().map(|s| format_time(s.time_ns)),
            "damaged_bytes": d.ranges.iter().map(|r| r.1).sum::<u64>(),
            "ranges": d.ranges.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub fn verify(repo: &Path, a: VerifyArgs, progress: bool) -> anyhow::Result<()> {
    if a.snapshots.is_empty() && !a.all {
        return Err(crate::exit::usage(
            "name the snapshots to verify (an id, a prefix or `latest`), or pass --all",
        ));
    }
    let store = crate::open::open_read(repo)?;
    let chosen = crate::select::chosen_snapshots(&*store, &a.snapshots, a.all, a.name.as_deref())?;
    let mut results = Vec::new();
    let mut failed = 0;
    let mut marks = Vec::new();
    for (id, snap) in &chosen {
        let bar = Bar::new(progress);
        let r = imgstore_engine::restore(&*store, id, snap, Target::Discard, &bar);
        drop(bar);
        let mut v = json!({
            "schema_version": crate::output::JSON_SCHEMA,
            "id": id.to_hex(),
            "name": snap.name,
            "time": format_time(snap.time_ns),
            "size": snap.size,
            "digest": Id(snap.digest).to_hex(),
        });
        match r {
            Ok(r) => {
                v["ok"] = json!(true);
                v["seconds"] = json!(r.seconds);
                if !a.json {
                    note(&format!(
                        "verified {} ({}, {}, {}) in {:.2} s: digest matches",
                        id.short(),
                        snap.name,
                        format_time(snap.time_ns),
                        human_bytes(snap.size),
                        r.seconds
                    ));
                }
            }
            Err(e) => {
                failed += 1;
                marks.extend(e.damage_mark());
                v["ok"] = json!(false);
                v["error"] = json!(e.to_string());
                if chosen.len() == 1 && !a.json {
                    if let Some(n) = record_marks(repo, &marks, &[], false) {
                        note(&n);
                    }
                    return Err(e.into());
                }
                if !a.json {
                    note(&format!("FAILED {}: {e}", id.short()));
                }
            }
        }
        results.push(v);
    }
    drop(store);
    if a.json {
        emit(&format!("{}\n", serde_json::Value::Array(results)))?;
    }
    if let Some(n) = record_marks(repo, &marks, &[], false) {
        note(&n);
    }
    if failed > 0 {
        return Err(crate::exit::damaged(format!(
            "{failed} of {} failed verification: run `imgstore check --read-data` for the full extent",
            plural(chosen.len() as u64, "snapshot")
        )));
    }
    Ok(())
}
