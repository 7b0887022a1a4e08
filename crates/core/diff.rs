//! `diff`: the byte ranges two snapshots differ in, from their recipes.

use std::path::Path;

use imgstore_engine::Selector;
use serde_json::json;

use crate::args::DiffArgs;
use crate::exit;
use crate::open::open_read;
use crate::output::{emit, warn_unreadable, JSON_SCHEMA};
use crate::select::check_name;
use crate::units::{format_time, human_bytes, plural};

/// `diff` exits like `diff(1)`: 0 when the snapshots are equal, 1 when
/// they differ, 2 (or a more specific code) on trouble.
pub fn diff(repo: &Path, a: DiffArgs) -> anyhow::Result<()> {
    let r = diff_inner(repo, a);
    match r {
        Ok(true) => Err(exit::Quiet(exit::FAILURE).into()),
        Ok(false) => Ok(()),
        Err(e) if exit::code_of(&e) == exit::FAILURE => Err(e.context(exit::Coded {
            code: exit::USAGE,
            msg: "diff".into(),
        })),
        Err(e) => Err(e),
    }
}

fn diff_inner(repo: &Path, a: DiffArgs) -> anyhow::Result<bool> {
    check_name(a.name.as_deref())?;
    let store = open_read(repo)?;
    let snaps = store.list_snapshots()?;
    let (ia, sa) =
        imgstore_engine::select_listed(&snaps, &Selector::parse(&a.a)?, a.name.as_deref())?;
    let (ib, sb) =
        imgstore_engine::select_listed(&snaps, &Selector::parse(&a.b)?, a.name.as_deref())?;
    warn_unreadable(&snaps.unreadable);
    let ranges = imgstore_engine::diff(&*store, (&ia, &sa), (&ib, &sb))?;
    let changed: u64 = ranges.iter().map(|r| r.1).sum();
    let differ = !ranges.is_empty();
    if a.json {
        emit(&format!(
            "{}\n",
            json!({
                "schema_version": JSON_SCHEMA,
                "a": ia.to_hex(),
                "b": ib.to_hex(),
                "a_size": sa.size,
                "b_size": sb.size,
                "changed_bytes": changed,
                "ranges": ranges.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
            })
        ))?;
        return Ok(differ);
    }
    let mut out = format!(
        "# imgstore diff {} ({}, {}) {} ({}, {})\n# {}, {} differ ({changed} bytes, {:.2}% of {})\n# OFFSET LENGTH\n",
        ia.short(),
        sa.name,
        format_time(sa.time_ns),
        ib.short(),
        sb.name,
        format_time(sb.time_ns),
        plural(ranges.len() as u64, "range"),
        human_bytes(changed),
        100.0 * changed as f64 / sb.size.max(sa.size).max(1) as f64,
        human_bytes(sb.size.max(sa.size)),
    );
    for (o, l) in &ranges {
        out.push_str(&format!("{o} {l}\n"));
    }
    emit(&out)?;
    Ok(differ)
}
