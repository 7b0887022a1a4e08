//! `backup`: a file, block device, VM image (through QEMU), NBD export,
//! stream, command's output or an overlay's writes into a new snapshot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use imgstore_engine::{BackupOptions, ParentChoice, Source, SourceKind};
use serde_json::json;

use crate::args::BackupArgs;
use crate::exit;
use crate::open::open_writer;
use crate::output::{bucket_json, detail, emit, note, snapshot_json, warn_unreadable};
use crate::progress::Bar;
use crate::select::check_name;
use crate::units::{format_time, human_bytes, plural};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn backup(repo: &Path, a: BackupArgs, progress: bool) -> anyhow::Result<()> {
    match backup_once(repo, a.clone(), progress, true)? {
        Outcome::Done => Ok(()),
        // Started from the client's cache, and the server's answers
        // differed: nothing was committed. Again from the server's.
        Outcome::Outdated(why) => {
            detail(&format!(
                "the client's cache of the repository is out of date ({why}): backing up from the server's answers"
            ));
            match backup_once(repo, a, progress, false)? {
                Outcome::Done => Ok(()),
                Outcome::Outdated(why) => Err(anyhow::anyhow!(
                    "the backup's view of the repository went out of date twice ({why}): back up again"
                )),
            }
        }
    }
}

/// How one attempt at a backup ended, when it did not fail.
enum Outcome {
    Done,
    /// It started from the client's cache of the server, which the
    /// server's answers showed out of date (why); nothing was committed.
    Outdated(String),
}

/// The parent a backup started from the client's cache takes: the last
/// snapshot this client committed of `name`, when its record opens under
/// its id and names that image.
fn cached_parent(
    repo: &dyn imgstore_repo::Repository,
    name: &str,
    c: &imgstore_format::cache::CachedSnapshot,
) -> Option<(imgstore_format::Id, imgstore_format::Snapshot)> {
    if imgstore_format::Id::hash(&c.record) != c.id {
        return None;
    }
    let rk = imgstore_format::sealed::RecordKind::Snapshot;
    let plain = repo.codec().open_record(rk, &c.id, &c.record).ok()?;
    let snap = imgstore_format::Snapshot::decode(&plain).ok()?;
    (snap.name == name).then_some((c.id, snap))
}

/// One attempt at a backup; `ahead`: it may start from the client's cache
/// of a server (`Outcome::Outdated` when the server disagrees).
fn backup_once(repo: &Path, a: BackupArgs, progress: bool, ahead: bool) -> anyhow::Result<Outcome> {
    check_name(a.name.as_deref())?;
    if let Some(b) = &a.bitmap {
        crate::bitmap::check_bitmap_name(b, "--bitmap")?;
    }
    if let Some(c) = &a.checkpoint {
        crate::bitmap::check_bitmap_name(c, "--checkpoint")?;
    }
    if a.verify_unchanged.is_some() && a.changed.is_none() && a.bitmap.is_none() {
        return Err(exit::usage(
            "--verify-unchanged checks a changed-block backup: give it with --changed or --bitmap",
        ));
    }
    let verify_unchanged = match &a.verify_unchanged {
        Some(v) => crate::units::parse_fraction(v, "--verify-unchanged")?,
        None => 0.0,
    };
    let is_nbd = a
        .source
        .as_deref()
        .is_some_and(imgstore_nbd::client::Uri::is_uri);
    if a.checkpoint.is_some() && !is_nbd {
        return Err(exit::usage(
            "--checkpoint names the bitmap of an NBD export that records the writes after this backup; a qcow2 file's bitmap (--bitmap) is rotated by imgstore itself",
        ));
    }
    for t in &a.tags {
        imgstore_engine::check_tag(t)?;
    }
    // The overlay is held for the whole backup: no server writes into it
    // meanwhile, so the snapshot is the overlay as its server left it.
    let _overlay_lock = a
        .from_export
        .as_deref()
        .map(imgstore_engine::lock_overlay)
        .transpose()?;
    let overlay = a
        .from_export
        .as_deref()
        .map(imgstore_engine::overlay_info)
        .transpose()?;
    // A command is started only once the repository is ours: a busy or
    // missing repository must not leave it running.
    let early_store = if a.stdin_from_command {
        Some(open_writer(repo, "backup")?)
    } else {
        None
    };
    let mut child = None;
    // The QEMU daemon reading a VM image: stopped when the backup ends,
    // whichever way.
    let mut vm_daemon = None;
    // --bitmap on a stopped qcow2: the daemon that manages its bitmaps;
    // the source is opened once the parent is known.
    let mut managed = None;
    // --bitmap on an NBD export: its dirty extents.
    let mut nbd_dirty = None;
    // A file or device backed up to a server or a bucket: its regions
    // hashed while it is reached (`imgstore_engine::PreHash`), for the
    // comparison with the parent.
    let mut prehash = None;
    let (source, default_name) = match (&overlay, a.source.as_deref()) {
        (Some(o), _) => (Some(Source::open(&o.data)?), None),
        _ if a.stdin_from_command => {
            let (src, c) = crate::source_command::spawn(&a.command)?;
            child = Some(c);
            (Some(src), None)
        }
        (None, Some("-")) if a.bitmap.is_some() => {
            return Err(exit::usage(
                "--bitmap reads a qcow2 file or an NBD export at offsets, not a stream",
            ))
        }
        (None, Some("-")) => (Some(Source::stdin()), None),
        (None, Some(p)) if imgstore_nbd::client::Uri::is_uri(p) => {
            let source = match &a.bitmap {
                Some(b) => {
                    let (source, dirty) = crate::vm::open_nbd_bitmap(p, b)?;
                    nbd_dirty = Some(dirty);
                    source
                }
                None => crate::vm::open_nbd(p)?,
            };
            (Some(source), crate::vm::nbd_default_name(p))
        }
        (None, Some(p)) => {
            let path = PathBuf::from(p);
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let source = Source::open(&path)?;
            let format = a.format.as_deref();
            if let Some(b) = &a.bitmap {
                if source.kind() != SourceKind::File || format.is_some_and(|f| f != "qcow2") {
                    return Err(exit::usage(format!(
                        "--bitmap on a local source needs a qcow2 image file (QEMU keeps persistent bitmaps only there); {p} is not one: back it up without --bitmap, or over NBD from the QEMU that tracks its writes"
                    )));
                }
                let info = imgstore_qemu::info(&path, Some(format.unwrap_or("qcow2")))
                    .or_else(|_| imgstore_qemu::info(&path, None))?;
                let m = crate::bitmap::Managed::start(&path, info, b)?;
                detail(&format!("{p}: qcow2 image, bitmap {b} managed by imgstore"));
                managed = Some(m);
                (None, name)
            } else {
            let vm_format = match source.kind() {
                SourceKind::File => crate::vm::vm_format(&path, format)?,
                _ if format.is_some_and(|f| f != "raw") => {
                    return Err(exit::usage(format!(
                        "--format {}: {p} is a block device, read as raw; convert a VM image on a device with qemu-img first",
                        format.unwrap_or_default()
                    )))
                }
                _ => None,
            };
            match vm_format {
                Some(f) => {
                    let vm = crate::vm::open_vm_image(&path, &f)?;
                    detail(&format!("{p}: {f} image, read through QEMU's block layer"));
                    vm_daemon = Some(vm.daemon);
                    (Some(vm.source), name)
                }
                None => {
                    let source = source.with_direct_io(a.direct_io);
                    if crate::open::over_a_link(repo)
                        && !a.direct_io
                        && !a.no_parent
                        && a.changed.is_none()
                    {
                        prehash = imgstore_engine::PreHash::start(
                            &source,
                            imgstore_engine::PreHash::LIKELY_REGION_SIZE,
                        )
                        .map(std::sync::Arc::new);
                    }
                    (Some(source), name)
                }
            }
            }
        }
        (None, None) => {
            return Err(exit::usage(
                "give SOURCE (a file, block device or -), --from-export DIR or --stdin-from-command -- COMMAND",
            ))
        }
    };
    // A file or device backed up to a server, taking the latest of its
    // name as parent: it may start from the client's cache of the server
    // (`imgstore_remote::RemoteRepo::connect_ahead`) instead of waiting a
    // round trip for the hello and the listing and another for the
    // parent's index.
    let ahead = ahead && prehash.is_some() && a.parent.is_none();
    let (store, cache) = match early_store {
        Some(s) => (s, None),
        None => crate::open::backup_writer(
            repo,
            a.no_cache,
            ahead,
            a.name
                .as_deref()
                .or(default_name.as_deref())
                .filter(|_| ahead),
        )?,
    };
    let ahead = store.remote().filter(|r| r.started_ahead());
    // An overlay's view is a changed-block backup of its base: only the
    // blocks written through the export are read.
    let from_overlay = match &overlay {
        Some(o) => {
            let listed = store.list_snapshots()?;
            if let Some(u) = listed.unreadable(&o.base) {
                return Err(u.error().into());
            }
            let Some((_, base)) = listed
                .snapshots
                .iter()
                .find(|(id, _)| *id == o.base)
                .cloned()
            else {
                return Err(exit::not_found(format!(
                    "the overlay's base snapshot {} is no longer in the repository (forgotten?): its writes cannot be completed into an image",
                    o.base.short()
                )));
            };
            Some(imgstore_engine::ChangedBlocks {
                base_id: o.base,
                base,
                ranges: o.dirty.clone(),
                verify_unchanged: 0.0,
            })
        }
        None => None,
    };
    let default_name = default_name.or(from_overlay.as_ref().map(|c| c.base.name.clone()));
    let name = match a.name.or(default_name) {
        Some(n) if !n.is_empty() => n,
        _ => {
            return Err(exit::usage(
                "a backup from stdin needs a name: pass --name NAME",
            ))
        }
    };
    imgstore_engine::check_name(&name)
        .context("the image name defaults to the source's file name: pass --name NAME")?;
    // Listed once (from a server, the listing came with the hello): an
    // unreadable record is never a parent or a base, and is warned about
    // once they are chosen. Started from the cache, the listing is checked
    // while the backup runs (below).
    let listed = match ahead {
        Some(_) => imgstore_repo::SnapshotList::default(),
        None => store.list_snapshots()?,
    };
    let status = a.json_status.then(crate::progress::JsonStatus::new);
    let bar = Bar::new(progress && status.is_none());
    // The parent: regions equal to it at the same offset are not chunked.
    let choice = match (&a.parent, a.no_parent) {
        (_, true) => ParentChoice::None,
        (Some(p), false) => ParentChoice::Named(p.clone()),
        (None, false) => ParentChoice::Latest,
    };
    let parent = match ahead {
        Some(r) => {
            let cached = cache.as_ref().and_then(|c| c.snapshot(&name));
            let parent = cached
                .as_ref()
                .and_then(|c| cached_parent(&*store, &name, c));
            if let (Some(c), Some(_)) = (cached, &parent) {
                r.use_cached_pages(c.pages);
            }
            parent
        }
        None => imgstore_engine::parent_for(&listed.snapshots, &name, &choice)?,
    };
    if let Some((id, p)) = &parent {
        detail(&format!(
            "parent: {} ({}, {})",
            id.short(),
            p.name,
            format_time(p.time_ns)
        ));
    }
    // A bitmap's dirty extents, when it belongs to the parent.
    let (source, plan) = match (source, managed.as_mut()) {
        (Some(source), None) if is_nbd && (a.bitmap.is_some() || a.checkpoint.is_some()) => {
            let size = source.size().unwrap_or_default();
            let plan = crate::bitmap::plan_nbd(
                a.source.as_deref().unwrap_or_default(),
                a.bitmap.as_deref(),
                a.checkpoint.as_deref(),
                nbd_dirty.take(),
                size,
                parent.as_ref(),
                verify_unchanged,
            );
            (source, Some(plan))
        }
        (Some(source), _) => (source, None),
        (None, Some(m)) => {
            let (source, plan) = m.open(parent.as_ref(), verify_unchanged)?;
            (source, Some(plan))
        }
        (None, None) => unreachable!("a source or a managed image"),
    };
    let (bitmap_changed, bitmap) = match plan {
        Some(p) => (p.changed, Some(p.record)),
        None => (None, None),
    };
    let opts = BackupOptions {
        name,
        tags: a.tags,
        hostname: hostname(),
        parent,
        allow_empty: a.allow_empty,
        bitmap,
        prehash,
    };
    let changed = match (&a.base, &a.changed) {
        _ if from_overlay.is_some() => from_overlay,
        _ if bitmap_changed.is_some() => bitmap_changed,
        (Some(base), Some(list)) => {
            let (base_id, base) =
                imgstore_engine::select_for_image(&listed.snapshots, base, &opts.name)
                    .with_context(|| format!("--base {base}"))?;
            Some(imgstore_engine::ChangedBlocks {
                base_id,
                base,
                ranges: read_ranges(list)?,
                verify_unchanged,
            })
        }
        _ => None,
    };
    if ahead.is_none() {
        warn_unreadable(&listed.unreadable);
    }
    // The server's session opens while the engine reads the parent's (or
    // base's) index, which the server pins for it as it opens: over a
    // link, one round trip instead of two.
    let pins = match (&changed, &opts.parent) {
        (Some(c), _) => c.base.pages.clone(),
        (None, Some((_, p))) => p.pages.clone(),
        (None, None) => Vec::new(),
    };
    store.begin_backup_ahead(&opts.name, &pins);
    let damaged = store.damage_pending();
    let progress: &dyn imgstore_engine::Progress = match &status {
        Some(s) => s,
        None => &bar,
    };
    let cached_id = opts.parent.as_ref().map(|p| p.0);
    let result = std::thread::scope(|s| {
        // Started from the cache: the server's listing, when it comes,
        // must pick the parent the cache did; the commit waits for this.
        if let Some(r) = ahead {
            let name = &opts.name;
            let store = &store;
            s.spawn(move || {
                let listed = match store.list_snapshots() {
                    Ok(l) => l,
                    Err(e) => return r.refuse_ahead(&e.to_string()),
                };
                let latest = imgstore_engine::parent_for(&listed.snapshots, name, &choice)
                    .ok()
                    .flatten()
                    .map(|p| p.0);
                if latest == cached_id {
                    warn_unreadable(&listed.unreadable);
                    r.confirm_ahead();
                } else {
                    let short = |i: Option<imgstore_format::Id>| {
                        i.map_or("none".to_string(), |i| i.short().to_string())
                    };
                    r.refuse_ahead(&format!(
                        "the latest snapshot of {name} is {}, the cache's {}",
                        short(latest),
                        short(cached_id)
                    ));
                }
            });
        }
        match &changed {
            Some(c) => {
                let r = imgstore_engine::backup_changed(&*store, &source, c, &opts, progress);
                drop(source);
                r
            }
            None => imgstore_engine::backup(&*store, source, &opts, progress),
        }
    });
    if let (Err(_), Some(why)) = (&result, ahead.and_then(|r| r.outdated())) {
        if let Some(r) = ahead {
            r.end_session();
        }
        return Ok(Outcome::Outdated(why));
    }
    // The command's exit status was checked at end of stream; a backup
    // that stopped early does not leave it running.
    drop(child);
    drop(vm_daemon);
    // A failed backup drops the managed daemon, which stops cleanly: the
    // image keeps the bitmap it had. Rotation waits for the commit.
    let r = result?;
    if let Some(m) = managed {
        m.finish();
    }
    // What the next backup of this image may start from.
    if let (Some(c), Some(remote)) = (&cache, store.remote()) {
        let kept = remote.hello_to_cache().map(|h| c.save_hello(&h));
        let snap = remote
            .take_last_commit()
            .filter(|(id, _, pages)| *id == r.id && pages.len() == r.snapshot.pages.len())
            .map(
                |(id, record, pages)| imgstore_format::cache::CachedSnapshot {
                    id,
                    record,
                    pages: r.snapshot.pages.iter().copied().zip(pages).collect(),
                },
            );
        let saved = match snap {
            Some(snap) => c.save_snapshot(&r.snapshot.name, &snap),
            None => c.forget_snapshot(&r.snapshot.name),
        };
        if let Err(e) = kept.unwrap_or(Ok(())).and(saved) {
            detail(&format!(
                "the client's cache in {} was not updated: {e}",
                c.dir().display()
            ));
        }
    }
    drop(bar);
    let repaired = damaged - store.damage_pending();
    let s = &r.snapshot;
    let secs = s.stats.duration_ns as f64 / 1e9;
    if a.json {
        let mut v = snapshot_json(&r.id, s);
        if status.is_some() {
            v["message_type"] = json!("summary");
        }
        v["bytes_read"] = json!(r.bytes_read);
        v["bytes_reused"] = json!(r.bytes_reused);
        v["zero_bytes_cached"] = json!(r.zero_bytes_cached);
        let parent = changed
            .as_ref()
            .map(|c| c.base_id)
            .or(opts.parent.as_ref().map(|p| p.0));
        v["parent"] = json!(parent.map(|p| p.to_string()));
        v["repaired_objects"] = json!(repaired);
        if let Some(b) = store.bucket_report() {
            v["bucket"] = bucket_json(&b);
        }
        v["started_from_cache"] = json!(ahead.is_some());
        emit(&format!("{v}\n"))?;
        Ok(Outcome::Done)
    } else {
        note(&format!(
            "backed up {} ({}) in {:.2} s ({}/s): {} chunks, {} new, {} added; {} zeros, {} read, {} unchanged from the parent",
            s.name,
            human_bytes(s.size),
            secs,
            human_bytes((s.size as f64 / secs.max(1e-9)) as u64),
            s.stats.chunks,
            s.stats.new_chunks,
            human_bytes(s.stats.new_bytes),
            human_bytes(s.stats.zero_bytes),
            human_bytes(r.bytes_read),
            human_bytes(r.bytes_reused),
        ));
        if repaired > 0 {
            note(&format!(
                "repaired {} found by an earlier check ({} still marked)",
                plural(repaired as u64, "damaged object"),
                store.damage_pending()
            ));
        }
        emit(&format!("{}\n", r.id))?;
        Ok(Outcome::Done)
    }
}

/// Reads a change list: `OFFSET LENGTH` per line (decimal or 0x hex; more
/// fields are ignored, so `nbdinfo --map` output filtered to dirty extents
/// works), blank lines and `#` comments skipped.
fn read_ranges(list: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let text = if list == "-" {
        std::io::read_to_string(std::io::stdin())
            .context("cannot read the change list from stdin")?
    } else {
        std::fs::read_to_string(list).with_context(|| format!("cannot read change list {list}"))?
    };
    let num = |s: &str| match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse::<u64>().ok(),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        match (f.next().and_then(num), f.next().and_then(num)) {
            (Some(o), Some(l)) => out.push((o, l)),
            _ => {
                return Err(exit::usage(format!(
                "change list {list}, line {}: expected `OFFSET LENGTH` in bytes, found {line:?}",
                n + 1
            )))
            }
        }
    }
    Ok(out)
}
