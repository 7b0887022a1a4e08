//! `imgstore copy`: snapshots from another repository into this one.

use std::path::Path;

use imgstore_engine::copy_snapshot;
use imgstore_format::Id;
use serde_json::json;

use crate::args::CopyArgs;
use crate::open::{open_source, open_writer, Credentials};
use crate::output::{emit, note};
use crate::progress::Bar;
use crate::select::check_name;
use crate::units::{format_time, human_bytes, plural};

pub fn copy(repo: &Path, a: CopyArgs, progress: bool) -> anyhow::Result<()> {
    check_name(a.name.as_deref())?;
    let src = open_source(
        &a.from,
        &Credentials {
            token_file: a.from_token_file.clone(),
            token_env: "IMGSTORE_FROM_TOKEN",
            fingerprint: a.from_server_fingerprint.clone(),
            ca_file: a.from_server_ca.clone(),
            secret_means_encrypted: false,
        },
    )?;
    let mut chosen = if a.snapshots.is_empty() {
        let mut all = crate::select::list_snapshots(&*src)?.snapshots;
        if let Some(n) = &a.name {
            all.retain(|(_, s)| &s.name == n);
        }
        all.sort_by_key(|(id, s)| (s.time_ns, *id));
        all
    } else {
        crate::select::chosen_snapshots(&*src, &a.snapshots, false, a.name.as_deref())?
    };
    if chosen.is_empty() {
        return Err(crate::exit::not_found(format!(
            "{} holds no snapshots{}",
            src.location(),
            a.name
                .as_deref()
                .map(|n| format!(" of {n}"))
                .unwrap_or_default()
        )));
    }
    let dst = open_writer(repo, "copy")?;
    // Unreadable records here are not warned about (this command reads
    // the source); an id among them is present all the same.
    let here = dst.list_snapshots()?;
    let present: std::collections::HashSet<Id> = here
        .snapshots
        .iter()
        .map(|(id, _)| *id)
        .chain(here.unreadable.iter().map(|u| u.id))
        .collect();
    let parents: std::collections::HashMap<Id, Id> = src.parents()?.into_iter().collect();
    let mut copied: std::collections::HashSet<Id> = present.clone();
    let mut out = Vec::new();
    let mut text = String::new();
    let (mut n_copied, mut bytes) = (0u64, 0u64);
    chosen.dedup_by_key(|(id, _)| *id);
    for (id, snap) in &chosen {
        let when = format_time(snap.time_ns);
        if present.contains(id) {
            out.push(json!({"id": id.to_hex(), "name": snap.name, "time": when, "copied": false}));
            text.push_str(&format!(
                "skipped {} ({}, {when}): already here\n",
                id.short(),
                snap.name
            ));
            continue;
        }
        // The parent is recorded only when it is (now) in this repository.
        let parent = parents.get(id).filter(|p| copied.contains(p));
        dst.begin_backup(&snap.name)?;
        let bar = Bar::new(progress);
        let r = copy_snapshot(&*src, &*dst, id, snap, parent, &bar)?;
        drop(bar);
        copied.insert(*id);
        n_copied += 1;
        bytes += r.chunk_bytes_sent;
        out.push(json!({
            "id": id.to_hex(), "name": snap.name, "time": when, "copied": true,
            "regions": r.regions, "regions_sent": r.regions_sent,
            "chunks_sent": r.chunks_sent, "chunk_bytes_sent": r.chunk_bytes_sent,
        }));
        text.push_str(&format!(
            "copied {} ({}, {when}): {} of {} regions sent, {} ({})\n",
            id.short(),
            snap.name,
            r.regions_sent,
            r.regions,
            plural(r.chunks_sent, "chunk"),
            human_bytes(r.chunk_bytes_sent)
        ));
    }
    if a.json {
        let v: Vec<_> = out
            .into_iter()
            .map(|mut v| {
                v["schema_version"] = json!(crate::output::JSON_SCHEMA);
                v
            })
            .collect();
        emit(&format!("{}\n", serde_json::Value::Array(v)))?;
    } else {
        emit(&text)?;
    }
    note(&format!(
        "copied {} of {} from {} ({} of chunk data sent)",
        plural(n_copied, "snapshot"),
        chosen.len(),
        src.location(),
        human_bytes(bytes)
    ));
    Ok(())
}
