//! `init` and `recover`: the commands that make a repository directory,
//! new or rebuilt from the bucket of a bucket-backed one.

use std::path::Path;

use anyhow::Context;
use imgstore_store::Store;
use serde_json::json;

use crate::args::{BucketArgs, InitArgs, RecoverArgs};
use crate::exit;
use crate::output::{bucket_json, emit, note, JSON_SCHEMA};
use crate::units::parse_size;

pub fn init(repo: &Path, a: InitArgs) -> anyhow::Result<()> {
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
        let pack_size = u32::try_from(parse_size(&a.pack_size)?)
            .ok()
            .filter(|s| imgstore_format::PACK_SIZES.contains(s))
            .ok_or_else(|| exit::usage(format!("--pack-size {}: choose 1M..256M", a.pack_size)))?;
        config = config.in_bucket(storage_of(url, &a.bucket, pack_size)?);
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
    b: &BucketArgs,
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
pub fn recover(repo: &Path, a: RecoverArgs) -> anyhow::Result<()> {
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
            "unfinished": r.unfinished,
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
            "recovered {} from {url} in {secs:.2} s: {} snapshots, {} chunks and {} records in {} packs{}",
            repo.display(),
            r.snapshots,
            r.chunks,
            r.records,
            r.packs,
            match r.unfinished {
                0 => String::new(),
                n => format!(
                    " ({n} snapshot objects of commits that did not finish left out: gc deletes them)"
                ),
            }
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
