//! The backup pipeline.
//!
//! ```text
//!  reader thread          rayon workers (both cores)                 store
//!  ─────────────          ───────────────────────────                ─────
//!  region i: SEEK_DATA →  zero scan + FastCDC → BLAKE3 chunk ids  →  put_region
//!  pread data, skip       region chaining value (image digest)       (WAL-less,
//!  holes, recycle bufs    look up ids (bloom + multi_get), zstd       serialised)
//!                         only the unknown chunks
//!                                                       ... then commit: flush,
//!                                                       pages + snapshot, fsync
//! ```
//!
//! Memory is bounded by the region buffers in flight (channel capacity +
//! workers + the one being read), whatever the image size; per-region
//! results kept until the commit are 32-byte ids and chaining values.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use imgstore_chunker::{Chunker, Extent, Kind, Params};
use imgstore_format::{
    encode_chunk, Id, Page, RecipeEntry, Region, Snapshot, SnapshotStats, PAGE_REGIONS,
};
use imgstore_store::{Kind as ObjectKind, Store};
use rayon::prelude::*;

use crate::digest::{image_digest, region_hasher, update_zeros, RegionHash};
use crate::source::{RegionBuf, Source};
use crate::{EngineError, Progress};

/// What a backup records besides the image.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub name: String,
    pub tags: Vec<String>,
    pub hostname: String,
}

/// The result of a backup.
#[derive(Clone, Debug)]
pub struct BackupReport {
    pub id: Id,
    pub snapshot: Snapshot,
    /// Bytes read from the source (holes are not read).
    pub bytes_read: u64,
}

/// The chunker a repository's config prescribes.
pub fn chunker_for(store: &Store) -> Result<Chunker, EngineError> {
    let c = &store.config().chunking;
    Chunker::new(Params {
        min: c.min,
        avg: c.avg,
        max: c.max,
        zero_min: c.zero_min,
    })
    .map_err(|e| EngineError::Invalid {
        what: "repository chunking parameters",
        why: e.to_string(),
    })
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> Vec<u8> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((
                level,
                zstd::bulk::Compressor::new(level).expect("valid zstd level"),
            ));
        }
        encode_chunk(data, &mut c.as_mut().expect("set above").1)
    })
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    zero_bytes: AtomicU64,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
    image_bytes: AtomicU64,
}

struct Ctx<'a> {
    store: &'a Store,
    chunker: Chunker,
    level: i32,
    counters: Counters,
    results: Mutex<Vec<(u64, Id, RegionHash)>>,
    progress: &'a dyn Progress,
}

impl Ctx<'_> {
    fn process(&self, rb: &RegionBuf) -> Result<(), EngineError> {
        let data = &rb.data[..];
        let mut hasher = region_hasher(rb.offset);
        let mut extents = Vec::new();
        if rb.all_hole {
            update_zeros(&mut hasher, data.len() as u64);
            extents.push(Extent {
                offset: 0,
                len: data.len(),
                kind: Kind::Zero,
            });
        } else {
            hasher.update(data);
            self.chunker.split(data, &mut extents);
        }
        let mut entries = Vec::with_capacity(extents.len());
        let mut data_ids = Vec::new();
        let mut data_slices = Vec::new();
        for e in &extents {
            match e.kind {
                Kind::Zero => {
                    self.counters.zero_bytes.fetch_add(e.len as u64, Relaxed);
                    entries.push(RecipeEntry {
                        len: e.len as u32,
                        chunk: None,
                    })
                }
                Kind::Data => {
                    let bytes = &data[e.offset..e.offset + e.len];
                    let id = Id::hash(bytes);
                    data_ids.push(id);
                    data_slices.push(bytes);
                    entries.push(RecipeEntry {
                        len: e.len as u32,
                        chunk: Some(id),
                    });
                }
            }
        }
        self.counters
            .chunks
            .fetch_add(data_ids.len() as u64, Relaxed);
        let region = Region { entries };
        let rid = if region.is_all_zero() {
            Id::ZERO
        } else {
            let encoded = region.encode();
            let rid = Id::hash(&encoded);
            // Only chunks the store does not have are compressed.
            let known = self.store.chunks_known(&data_ids)?;
            let mut frames = HashMap::new();
            for ((id, bytes), known) in data_ids.iter().zip(&data_slices).zip(known) {
                if !known && !frames.contains_key(id) {
                    frames.insert(*id, (compress(bytes, self.level), bytes.len() as u32));
                }
            }
            let out = self.store.put_region(&rid, &region, &encoded, &frames)?;
            self.counters.new_chunks.fetch_add(out.new_chunks, Relaxed);
            self.counters.new_bytes.fetch_add(out.new_bytes, Relaxed);
            rid
        };
        self.counters
            .image_bytes
            .fetch_add(data.len() as u64, Relaxed);
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((rb.index, rid, RegionHash::from_hasher(rb.index, hasher)));
        self.progress.advance(data.len() as u64);
        Ok(())
    }
}

/// Backs up `source` into `store` as a new snapshot and commits it.
///
/// Nothing is visible until the final commit: an error or a crash at any
/// point before it leaves the repository's snapshots exactly as they were.
pub fn backup(
    store: &Store,
    mut source: Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport, EngineError> {
    let started = Instant::now();
    let time_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let region_size = store.config().region_size as usize;
    let ctx = Ctx {
        store,
        chunker: chunker_for(store)?,
        level: store.config().compression.zstd_level,
        counters: Counters::default(),
        results: Mutex::new(Vec::new()),
        progress,
    };
    progress.start(source.size());
    let initial_size = source.size();

    let (tx, rx) = crossbeam_channel::bounded::<RegionBuf>(2);
    let (free_tx, free_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let stop = AtomicBool::new(false);
    let (work, read) = std::thread::scope(|s| {
        let stop = &stop;
        let reader = s.spawn(move || -> Result<(u64, Source), EngineError> {
            let mut bytes_read = 0;
            let mut index = 0;
            while !stop.load(Relaxed) {
                let buf = free_rx.try_recv().unwrap_or_default();
                match source.read_region(index, region_size, buf)? {
                    None => break,
                    Some((rb, n)) => {
                        bytes_read += n;
                        if tx.send(rb).is_err() {
                            break;
                        }
                        index += 1;
                    }
                }
            }
            Ok((bytes_read, source))
        });
        let work = rx.into_iter().par_bridge().try_for_each(|rb| {
            let r = ctx.process(&rb);
            let _ = free_tx.send(rb.data);
            r
        });
        if work.is_err() {
            stop.store(true, Relaxed);
        }
        (work, reader.join().expect("reader thread panicked"))
    });
    work?;
    let (bytes_read, source) = read?;

    let size = ctx.counters.image_bytes.load(Relaxed);
    if let Some(before) = initial_size {
        let now = source.current_size().unwrap_or(before);
        if now != before || size != before {
            return Err(EngineError::SourceChanged {
                path: source.path().to_path_buf(),
                before,
                after: if now != before { now } else { size },
                at: size,
            });
        }
    }

    let mut results = ctx.results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.0);
    debug_assert!(results.iter().enumerate().all(|(i, r)| r.0 == i as u64));
    let (region_ids, hashes): (Vec<Id>, Vec<RegionHash>) =
        results.into_iter().map(|(_, id, h)| (id, h)).unzip();
    let digest = image_digest(&hashes, region_size as u64, size);
    let pages: Vec<Page> = region_ids
        .chunks(PAGE_REGIONS)
        .map(|c| Page {
            regions: c.to_vec(),
        })
        .collect();
    let page_ids: Vec<Id> = pages.iter().map(|p| Id::hash(&p.encode())).collect();
    let mut page_bytes = 0u64;
    let mut seen = std::collections::HashSet::new();
    for (pid, p) in page_ids.iter().zip(&pages) {
        if seen.insert(*pid) && store.ref_count(ObjectKind::Page, pid)?.is_none() {
            page_bytes += p.encode().len() as u64;
        }
    }
    let c = &ctx.counters;
    let snapshot = Snapshot {
        time_ns,
        name: opts.name.clone(),
        hostname: opts.hostname.clone(),
        source: source.path().display().to_string(),
        tags: opts.tags.clone(),
        size,
        digest,
        region_size: region_size as u32,
        pages: page_ids,
        stats: SnapshotStats {
            chunks: c.chunks.load(Relaxed),
            zero_bytes: c.zero_bytes.load(Relaxed),
            new_chunks: c.new_chunks.load(Relaxed),
            new_bytes: c.new_bytes.load(Relaxed) + page_bytes,
            duration_ns: started.elapsed().as_nanos() as u64,
        },
    };
    let (id, _) = store.commit(&snapshot, &pages)?;
    progress.finish();
    Ok(BackupReport {
        id,
        snapshot,
        bytes_read,
    })
}
