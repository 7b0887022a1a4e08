//! `snapshots`: the table (or JSON list) of a repository's snapshots.

use std::path::Path;

use imgstore_format::{Id, Snapshot};
use imgstore_repo::SnapshotList;
use serde_json::json;

use crate::args::SnapshotsArgs;
use crate::open::open_read;
use crate::output::{emit, snapshot_json, JSON_SCHEMA};
use crate::select::{check_name, list_snapshots};
use crate::units::{format_time, human_bytes, plural};

pub fn snapshots(repo: &Path, a: SnapshotsArgs) -> anyhow::Result<()> {
    check_name(a.name.as_deref())?;
    let store = open_read(repo)?;
    let filter = imgstore_engine::SnapshotFilter {
        name: a.name.clone(),
        hosts: a.host.clone(),
        tags: a.tag.clone(),
    };
    let SnapshotList {
        snapshots: mut snaps,
        unreadable,
    } = list_snapshots(&*store)?;
    snaps.retain(|(_, s)| filter.matches(s));
    snaps.sort_by_key(|(id, s)| (s.time_ns, *id));
    let protected: std::collections::HashSet<Id> = store.protected()?.into_iter().collect();
    let parents: std::collections::HashMap<Id, Id> = store.parents()?.into_iter().collect();
    if a.json {
        // Unreadable records first (their times are unknown), whatever the
        // filters (so are their names): the last element stays the newest.
        let v: Vec<_> = unreadable
            .iter()
            .map(|u| {
                json!({
                    "schema_version": JSON_SCHEMA,
                    "id": u.id.to_hex(),
                    "short_id": u.id.short(),
                    "unreadable": u.why,
                })
            })
            .chain(snaps.iter().map(|(id, s)| {
                let mut v = snapshot_json(id, s);
                v["protected"] = json!(protected.contains(id));
                v["parent"] = json!(parents.get(id).map(|p| p.to_hex()));
                v
            }))
            .collect();
        return emit(&format!("{}\n", serde_json::Value::Array(v)));
    }
    let width = |f: &dyn Fn(&Snapshot) -> usize, min: usize| {
        snaps.iter().map(|(_, s)| f(s)).max().unwrap_or(0).max(min)
    };
    let name_w = width(&|s| s.name.len(), 4);
    let host_w = width(&|s| s.hostname.len(), 4);
    let mut out = format!(
        "{:<8}  {:<20}  {:<name_w$}  {:<host_w$}  {:>10}  {:<8}  {:<9}  TAGS\n",
        "ID", "TIME", "NAME", "HOST", "SIZE", "PARENT", "PROTECTED"
    );
    for (id, s) in &snaps {
        out.push_str(&format!(
            "{:<8}  {:<20}  {:<name_w$}  {:<host_w$}  {:>10}  {:<8}  {:<9}  {}\n",
            id.short(),
            format_time(s.time_ns),
            s.name,
            s.hostname,
            human_bytes(s.size),
            parents
                .get(id)
                .map(|p| p.short())
                .unwrap_or_else(|| "-".into()),
            if protected.contains(id) { "yes" } else { "no" },
            s.tags.join(",")
        ));
    }
    out.push_str(&plural(snaps.len() as u64, "snapshot"));
    if !unreadable.is_empty() {
        out.push_str(&format!(
            " ({} skipped: cannot be read)",
            plural(unreadable.len() as u64, "record")
        ));
    }
    out.push('\n');
    emit(&out)
}
