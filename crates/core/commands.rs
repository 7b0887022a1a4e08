//! Phase two: resolve raw arguments into settings and call the engine.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use imgstore_engine::{BackupOptions, ParentChoice, Selector, Source, Target};
use imgstore_format::{Id, Snapshot};
use imgstore_repo::{Repository, SnapshotList, UnreadableSnapshot};
use imgstore_store::Store;
use serde_json::json;

use crate::args::{BackupArgs, Cli, Command, DiffArgs, InitArgs, RestoreArgs, SnapshotsArgs};
use crate::exit;
use crate::progress::Bar;
use crate::units::{format_time, human_bytes, parse_size, parse_time, plural};

/// Flags every command shares.
pub(crate) struct Settings {
    pub quiet: bool,
    pub verbose: bool,
    /// How long a writer waits for the repository lock.
    pub wait: std::time::Duration,
    /// For a server repository: where the token is, whom to trust, how
    /// long to retry.
    pub token_file: Option<PathBuf>,
    pub server_fingerprint: Option<String>,
    pub server_ca: Option<PathBuf>,
    pub retry_for: std::time::Duration,
    /// For an encrypted repository: where the secret comes from.
    pub key_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    /// Accept a server repository that contradicts the known-repositories
    /// record (`--trust-new-repository`).
    pub trust_new_repository: bool,
}

static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();

pub(crate) fn settings() -> &'static Settings {
    SETTINGS.get_or_init(|| Settings {
        quiet: false,
        verbose: false,
        wait: std::time::Duration::ZERO,
        token_file: None,
        server_fingerprint: None,
        server_ca: None,
        retry_for: std::time::Duration::from_secs(120),
        key_file: None,
        password_file: None,
        password_command: None,
        trust_new_repository: false,
    })
}

pub(crate) use crate::open::{open_read, open_writer};

/// Checks a `--name` the user gave against the name grammar.
pub(crate) fn check_name(name: Option<&str>) -> anyhow::Result<()> {
    if let Some(n) = name {
        imgstore_engine::check_name(n)?;
    }
    Ok(())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let wait = match &cli.wait {
        Some(w) => humantime::parse_duration(w).map_err(|_| {
            exit::usage(format!("--wait={w} is not a duration (e.g. 30s, 10m, 2h)"))
        })?,
        None => std::time::Duration::ZERO,
    };
    let retry_for = humantime::parse_duration(&cli.retry_for).map_err(|_| {
        exit::usage(format!(
            "--retry-for {} is not a duration (e.g. 30s, 2m)",
            cli.retry_for
        ))
    })?;
    let _ = SETTINGS.set(Settings {
        quiet: cli.quiet,
        verbose: cli.verbose,
        wait,
        token_file: cli.token_file.clone(),
        server_fingerprint: cli.server_fingerprint.clone(),
        server_ca: cli.server_ca.clone(),
        retry_for,
        key_file: cli.key_file.clone(),
        password_file: cli.password_file.clone(),
        password_command: cli.password_command.clone(),
        trust_new_repository: cli.trust_new_repository,
    });
    let progress = !cli.no_progress && !cli.quiet;
    match cli.command {
        Command::Completions(a) => return crate::packaging::completions(a),
        Command::Man(a) => return crate::packaging::man(a),
        _ => {}
    }
    let repo = cli.repo.clone().ok_or_else(|| {
        exit::usage("no repository given: pass -r/--repo PATH or set IMGSTORE_REPO")
    })?;
    match cli.command {
        Command::Init(a) => init(&repo, a),
        Command::Recover(a) => recover(&repo, a),
        Command::Backup(a) => backup(&repo, a, progress),
        Command::Snapshots(a) => snapshots(&repo, a),
        Command::Restore(a) => restore(&repo, a, progress),
        Command::Forget(a) => crate::maintenance::forget(&repo, a),
        Command::Gc(a) => crate::maintenance::gc(&repo, a),
        Command::Protect(a) => crate::maintenance::protect(&repo, a, true),
        Command::Unprotect(a) => crate::maintenance::protect(&repo, a, false),
        Command::Stats(a) => crate::maintenance::stats(&repo, a),
        Command::Diff(a) => diff(&repo, a),
        Command::Serve(a) => crate::serve::serve(&repo, a),
        Command::Mount(a) => crate::mount::mount(&repo, a),
        Command::Check(a) => crate::integrity::check(&repo, a, progress),
        Command::Verify(a) => crate::integrity::verify(&repo, a, progress),
        Command::Tag(a) => crate::maintenance::tag(&repo, a),
        Command::Copy(a) => crate::copy::copy(&repo, a, progress),
        Command::Key(a) => crate::keys::key(&repo, a),
        Command::Server(a) => crate::server::server(&repo, a),
        Command::Token(a) => crate::server::token(&repo, a),
        Command::Completions(_) | Command::Man(_) => unreachable!("handled above"),
    }
}

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

/// The repository's snapshots: those that can be read, and those that
/// cannot, each of which is warned about on stderr and otherwise skipped.
pub(crate) fn list_snapshots(store: &dyn Repository) -> anyhow::Result<SnapshotList> {
    let list = store.list_snapshots()?;
    warn_unreadable(&list.unreadable);
    Ok(list)
}

/// A detail on stderr, only with --verbose.
pub(crate) fn detail(text: &str) {
    if settings().verbose {
        let _ = writeln!(std::io::stderr(), "{text}");
    }
}

fn init(repo: &Path, a: InitArgs) -> anyhow::Result<()> {
    if let Some(url) = crate::open::remote_url(repo) {
        return Err(exit::usage(format!(
            "{url}: a server's repository is created on the server: `imgstore -r DIR init` there, then `imgstore -r DIR server`"
        )));
    }
    let avg = parse_size(&a.chunk_size)?;
    let avg = u32::try_from(avg).context("--chunk-size is too large")?;
    let p = imgstore_chunker::Params::with_avg(avg)
        .map_err(|e| anyhow::anyhow!("--chunk-size {}: {e}", a.chunk_size))?;
    let mut config = imgstore_engine::new_repo_config(p, a.compression_level);
    if let Some(url) = &a.storage {
        let pack_size = parse_size(&a.pack_size)?;
        if !(1 << 20..=256 << 20).contains(&pack_size) {
            return Err(exit::usage(format!(
                "--pack-size {}: choose 1M..256M",
                a.pack_size
            )));
        }
        config = config.in_bucket(storage_of(url, &a.bucket, pack_size as u32)?);
    }
    if a.encryption {
        let (_, slots) = crate::keys::new_slots(&repo.display().to_string())?;
        config = config.encrypted(slots);
    }
    let store = Store::init(repo, config)?;
    let c = store.config();
    note(&format!(
        "created {}imgstore repository at {}{} (chunks {}/{}/{} KiB, regions {} MiB, zstd level {})",
        if c.encryption.is_some() {
            "an encrypted "
        } else {
            ""
        },
        repo.display(),
        c.storage
            .as_ref()
            .map(|s| format!(" with its data in {}", s.url()))
            .unwrap_or_default(),
        c.chunking.min / 1024,
        c.chunking.avg / 1024,
        c.chunking.max / 1024,
        c.region_size >> 20,
        c.compression.zstd_level
    ));
    Ok(())
}

/// The storage section for `--storage URL` and the bucket options.
fn storage_of(
    url: &str,
    b: &crate::args::BucketArgs,
    pack_size: u32,
) -> anyhow::Result<imgstore_format::Storage> {
    let spec = imgstore_bucket::BucketSpec::parse(url, b.endpoint.clone(), b.region.clone())
        .map_err(|e| exit::usage(e.to_string()))?;
    Ok(imgstore_format::Storage {
        kind: "s3".into(),
        bucket: spec.bucket,
        prefix: spec.prefix,
        endpoint: spec.endpoint,
        region: spec.region,
        pack_size,
        cache_bytes: parse_size(&b.cache_size)?,
    })
}

/// `imgstore -r DIR recover s3://BUCKET/PREFIX`.
fn recover(repo: &Path, a: crate::args::RecoverArgs) -> anyhow::Result<()> {
    if crate::open::remote_url(repo).is_some() {
        return Err(exit::usage(
            "recover rebuilds a local directory: give -r a new directory",
        ));
    }
    let storage = storage_of(&a.storage, &a.bucket, imgstore_store::DEFAULT_PACK_SIZE)?;
    let started = std::time::Instant::now();
    let (_store, r) = Store::recover(repo, &storage)?;
    let secs = started.elapsed().as_secs_f64();
    let url = storage.url();
    if a.json {
        let v = json!({
            "schema_version": JSON_SCHEMA,
            "bucket": url,
            "packs": r.packs,
            "chunks": r.chunks,
            "records": r.records,
            "snapshots": r.snapshots,
            "missing": r.missing,
            "rejected": r.rejected,
            "seconds": secs,
            "requests": bucket_json(&imgstore_store::BucketReport {
                requests: r.requests,
                ..Default::default()
            }),
        });
        emit(&format!(
            "{v}
"
        ))?;
    } else {
        note(&format!(
            "recovered {} from {url} in {secs:.2} s: {} snapshots, {} chunks and {} records in {} packs",
            repo.display(),
            r.snapshots,
            r.chunks,
            r.records,
            r.packs
        ));
    }
    if r.missing > 0 || r.rejected > 0 {
        return Err(crate::exit::damaged(format!(
            "{url}: {} objects named by snapshots are missing and {} packs or objects failed their checks: run `imgstore -r {} check --read-data` to see which snapshots are damaged",
            r.missing,
            r.rejected,
            repo.display()
        )));
    }
    Ok(())
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn backup(repo: &Path, a: BackupArgs, progress: bool) -> anyhow::Result<()> {
    check_name(a.name.as_deref())?;
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
    let (source, default_name) = match (&overlay, a.source.as_deref()) {
        (Some(o), _) => (Source::open(&o.data)?, None),
        _ if a.stdin_from_command => {
            let (src, c) = crate::source_command::spawn(&a.command)?;
            child = Some(c);
            (src, None)
        }
        (None, Some("-")) => (Source::stdin(), None),
        (None, Some(p)) => {
            let path = PathBuf::from(p);
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (Source::open(&path)?.with_direct_io(a.direct_io), name)
        }
        (None, None) => {
            return Err(exit::usage(
                "give SOURCE (a file, block device or -), --from-export DIR or --stdin-from-command -- COMMAND",
            ))
        }
    };
    let store = match early_store {
        Some(s) => s,
        None => open_writer(repo, "backup")?,
    };
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
    store.begin_backup(&name)?;
    // Listed once, within the backup's server session: an unreadable
    // record is never a parent or a base, and is warned about once they
    // are chosen.
    let listed = store.list_snapshots()?;
    let status = a.json_status.then(crate::progress::JsonStatus::new);
    let bar = Bar::new(progress && status.is_none());
    // The parent: regions equal to it at the same offset are not chunked.
    let choice = match (&a.parent, a.no_parent) {
        (_, true) => ParentChoice::None,
        (Some(p), false) => ParentChoice::Named(p.clone()),
        (None, false) => ParentChoice::Latest,
    };
    let parent = imgstore_engine::parent_for(&listed.snapshots, &name, &choice)?;
    if let Some((id, p)) = &parent {
        detail(&format!(
            "parent: {} ({}, {})",
            id.short(),
            p.name,
            format_time(p.time_ns)
        ));
    }
    let opts = BackupOptions {
        name,
        tags: a.tags,
        hostname: hostname(),
        parent,
        allow_empty: a.allow_empty,
    };
    let damaged = store.damage_pending();
    let changed = match (&a.base, &a.changed) {
        _ if from_overlay.is_some() => from_overlay,
        (Some(base), Some(list)) => {
            let (base_id, base) =
                imgstore_engine::select_for_image(&listed.snapshots, base, &opts.name)
                    .with_context(|| format!("--base {base}"))?;
            let verify_unchanged = match &a.verify_unchanged {
                Some(v) => crate::units::parse_fraction(v, "--verify-unchanged")?,
                None => 0.0,
            };
            Some(imgstore_engine::ChangedBlocks {
                base_id,
                base,
                ranges: read_ranges(list)?,
                verify_unchanged,
            })
        }
        _ => None,
    };
    warn_unreadable(&listed.unreadable);
    let progress: &dyn imgstore_engine::Progress = match &status {
        Some(s) => s,
        None => &bar,
    };
    let result = match &changed {
        Some(c) => imgstore_engine::backup_changed(&*store, &source, c, &opts, progress),
        None => imgstore_engine::backup(&*store, source, &opts, progress),
    };
    // The command's exit status was checked at end of stream; a backup
    // that stopped early does not leave it running.
    drop(child);
    let r = result?;
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
        emit(&format!("{v}\n"))
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
        emit(&format!("{}\n", r.id))
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
    })
}

/// The snapshots a command names (ids, prefixes, `latest`), or all of them
/// with `everything`; oldest first, each once.
pub(crate) fn chosen_snapshots(
    store: &dyn imgstore_repo::Repository,
    names: &[String],
    everything: bool,
    name: Option<&str>,
) -> anyhow::Result<Vec<(Id, Snapshot)>> {
    check_name(name)?;
    // Unreadable records are warned about once the choice is made, so an
    // error stays one line.
    let all = store.list_snapshots()?;
    let mut out = if everything {
        all.snapshots.clone()
    } else {
        names
            .iter()
            .map(|s| {
                Ok(imgstore_engine::select_listed(
                    &all,
                    &Selector::parse(s)?,
                    name,
                )?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    out.sort_by_key(|(id, s)| (s.time_ns, *id));
    out.dedup_by_key(|(id, _)| *id);
    if out.is_empty() {
        return Err(exit::not_found(if all.unreadable.is_empty() {
            "the repository holds no snapshots".to_string()
        } else {
            format!(
                "the repository holds no readable snapshots ({} cannot be read: `imgstore check` reports them)",
                plural(all.unreadable.len() as u64, "snapshot record")
            )
        }));
    }
    warn_unreadable(&all.unreadable);
    Ok(out)
}

fn snapshots(repo: &Path, a: SnapshotsArgs) -> anyhow::Result<()> {
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

fn restore(repo: &Path, a: RestoreArgs, progress: bool) -> anyhow::Result<()> {
    check_name(a.name.as_deref())?;
    let (selector, target) = match (&a.at, a.second) {
        (Some(at), None) => (
            Selector::At(parse_time(at).map_err(|e| exit::usage(e.to_string()))?),
            a.first,
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
    if a.delta {
        if target == "-" {
            return Err(exit::usage(
                "--delta writes onto an existing file or block device, not stdout",
            ));
        }
        let bar = Bar::new(progress);
        let r =
            imgstore_engine::restore_delta(&*store, &id, &snap, Path::new(&target), a.force, &bar)?;
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
    let line = format!(
        "restored {} ({}, {} taken {}) to {} in {:.2} s: {} data, {} zeros; digest verified",
        id.short(),
        snap.name,
        human_bytes(snap.size),
        format_time(snap.time_ns),
        target_label,
        r.seconds,
        human_bytes(r.data_bytes),
        human_bytes(r.zero_bytes),
    );
    if a.json && target_label != "-" {
        let v = json!({
            "schema_version": JSON_SCHEMA,
            "id": id.to_hex(),
            "name": snap.name,
            "size": snap.size,
            "target": target_label,
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

/// `diff` exits like `diff(1)`: 0 when the snapshots are equal, 1 when
/// they differ, 2 (or a more specific code) on trouble.
fn diff(repo: &Path, a: DiffArgs) -> anyhow::Result<()> {
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
