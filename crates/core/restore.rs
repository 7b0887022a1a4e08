//! `restore`: a snapshot onto a file, a block device or stdout, whole or
//! (`--delta`) only where the target differs; or into a new VM image
//! (`--format qcow2`, vmdk, vhdx, ...) through QEMU's block layer.

use std::path::Path;

use imgstore_engine::{Selector, Target};
use imgstore_format::Id;
use serde_json::json;

use crate::args::RestoreArgs;
use crate::exit;
use crate::open::open_read;
use crate::output::{bucket_json, emit, note, warn_unreadable, JSON_SCHEMA};
use crate::progress::Bar;
use crate::select::check_name;
use crate::units::{format_time, human_bytes, parse_time};

pub fn restore(repo: &Path, a: RestoreArgs, progress: bool) -> anyhow::Result<()> {
    check_name(a.name.as_deref())?;
    let (selector, target) = match (&a.at, a.second.clone()) {
        (Some(at), None) => (
            Selector::At(parse_time(at).map_err(|e| exit::usage(e.to_string()))?),
            a.first.clone(),
        ),
        (Some(_), Some(_)) => {
            return Err(exit::usage("give either SNAPSHOT or --at TIME, not both"))
        }
        (None, Some(t)) => (Selector::parse(&a.first)?, t),
        (None, None) => return Err(exit::usage(
            "missing TARGET: imgstore restore SNAPSHOT TARGET (a file path, a block device or -)",
        )),
    };
    if target == "-" && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(exit::usage(
            "stdout is a terminal: redirect it (`> image.img`, `| qemu-img ...`) or give a file or device as TARGET",
        ));
    }
    let store = open_read(repo)?;
    let listed = store.list_snapshots()?;
    let (id, snap) = imgstore_engine::select_listed(&listed, &selector, a.name.as_deref())?;
    warn_unreadable(&listed.unreadable);
    if a.live {
        return crate::live::restore_live(&*store, &id, &snap, &target, &a, progress);
    }
    if a.delta {
        if target == "-" {
            return Err(exit::usage(
                "--delta writes onto an existing file or block device, not stdout",
            ));
        }
        let path = Path::new(&target);
        // A VM image (qcow2, ...) is written through QEMU, in its format.
        let vm_format = if path.is_file() {
            crate::vm::vm_format(path, a.format.as_deref())?
        } else {
            None
        };
        let bar = Bar::new(progress);
        let r = match &vm_format {
            Some(f) => crate::vm::restore_delta_into_image(&*store, &id, &snap, path, f, &bar)?,
            None => imgstore_engine::restore_delta(&*store, &id, &snap, path, a.force, &bar)?,
        };
        drop(bar);
        if a.json {
            return emit(&format!(
                "{}\n",
                json!({
                    "schema_version": JSON_SCHEMA,
                    "id": id.to_hex(),
                    "name": snap.name,
                    "size": snap.size,
                    "target": target,
                    "format": vm_format.as_deref().unwrap_or("raw"),
                    "read_bytes": r.read_bytes,
                    "written_bytes": r.written_bytes,
                    "skipped_bytes": r.skipped_bytes,
                    "zeroed_bytes": r.zeroed_bytes,
                    "seconds": r.seconds,
                    "digest": Id(snap.digest).to_hex(),
                })
            ));
        }
        note(&format!(
            "delta-restored {} ({}, {}) onto {target} in {:.2} s: read {}, wrote {}, zeroed {}, {} already right; digest verified",
            id.short(),
            snap.name,
            human_bytes(snap.size),
            r.seconds,
            human_bytes(r.read_bytes),
            human_bytes(r.written_bytes),
            human_bytes(r.zeroed_bytes),
            human_bytes(r.skipped_bytes),
        ));
        return Ok(());
    }
    let target_label = target.clone();
    if let Some(format) = a.format.as_deref().filter(|f| *f != "raw") {
        if target == "-" {
            return Err(exit::usage(format!(
                "--format {format} writes an image file, not stdout: give a file path"
            )));
        }
        let bar = Bar::new(progress);
        let r = crate::vm::restore_into_image(
            &*store,
            &id,
            &snap,
            Path::new(&target),
            format,
            a.force,
            &bar,
        )?;
        drop(bar);
        return report(a.json, &id, &snap, &target_label, Some(format), r, &store);
    }
    let target = if target == "-" {
        Target::Stream {
            label: "stdout".into(),
            out: Box::new(std::io::stdout()),
        }
    } else {
        Target::resolve(Path::new(&target), a.force)?
    };
    let bar = Bar::new(progress && target_label != "-");
    let r = imgstore_engine::restore(&*store, &id, &snap, target, &bar)?;
    drop(bar);
    report(a.json, &id, &snap, &target_label, None, r, &store)
}

/// Prints what a restore did.
fn report(
    json: bool,
    id: &Id,
    snap: &imgstore_format::Snapshot,
    target_label: &str,
    format: Option<&str>,
    r: imgstore_engine::RestoreReport,
    store: &crate::open::Repo,
) -> anyhow::Result<()> {
    let line = format!(
        "restored {} ({}, {} taken {}) to {}{} in {:.2} s: {} data, {} zeros; digest verified",
        id.short(),
        snap.name,
        human_bytes(snap.size),
        format_time(snap.time_ns),
        target_label,
        format.map(|f| format!(" ({f})")).unwrap_or_default(),
        r.seconds,
        human_bytes(r.data_bytes),
        human_bytes(r.zero_bytes),
    );
    if json && target_label != "-" {
        let v = json!({
            "schema_version": JSON_SCHEMA,
            "id": id.to_hex(),
            "name": snap.name,
            "size": snap.size,
            "target": target_label,
            "format": format.unwrap_or("raw"),
            "data_bytes": r.data_bytes,
            "zero_bytes": r.zero_bytes,
            "seconds": r.seconds,
            "digest": Id(snap.digest).to_hex(),
            "bucket": store.bucket_report().map(|b| bucket_json(&b)),
        });
        emit(&format!("{v}\n"))
    } else {
        note(&line);
        Ok(())
    }
}
