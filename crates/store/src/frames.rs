//! The frame-storage seam: where a repository keeps chunk frames.
//!
//! [`Store`](crate::Store) keeps the index — which objects exist, their
//! reference counts, recipes, snapshots, the lock, sessions, healing — and
//! hands the frames themselves to one [`FrameStore`]:
//!
//! * [`BlobFiles`]: the frames are the values of the index's `chunks`
//!   column family, which RocksDB writes to blob files (formats 2 and 3);
//! * [`Packs`](crate::packs::Packs): the frames, and a copy of every
//!   record, are in pack objects in an S3-compatible bucket, and the
//!   `chunks` values are their locations (format 4).
//!
//! # Why a trait inside the store, and not a second `Repository`
//!
//! Both kinds share everything above the frames: the write batches that
//! keep "count = number of stored parents", the durability protocol,
//! sessions, namespace marks, healing and gc's sweep. What differs is
//! where bytes go when a batch is written, how they are read back, what a
//! commit must wait for, and how space is given back. Each of those is one
//! method here, called at one place in the store, so the store has no
//! "which kind am I" branches and a third kind is one more implementation.
//!
//! Every method gets the [`Index`]: a frame store may keep its own state in
//! it (locations, pack accounting) but only in the batches the store hands
//! it, or under the index's write mutex.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, MutexGuard};

use imgstore_format::pack::Location;
use imgstore_format::{cf, Id, ObjectKind, RepoConfig};
use imgstore_repo::{ChunkFault, ChunkRead};
use rocksdb::{BottommostLevelCompaction, CompactOptions, WriteBatch, DB};

use crate::index::{file_vanished, Index};
use crate::packs::Packs;
use crate::{BucketReport, Result, StoredBytesCheck, BLOB_GC_RATIO};

/// Whether a repository with `config` keeps frames in the index's blob
/// files (decided before a frame store exists: at `init`, the database
/// is created first).
pub(crate) fn blob_files(config: &RepoConfig) -> bool {
    config.storage.is_none()
}

/// The frame store a repository's config names: the one place that
/// chooses.
pub(crate) fn for_config(dir: &Path, config: &RepoConfig) -> Result<Arc<dyn FrameStore>> {
    Ok(match &config.storage {
        Some(storage) => Packs::new(dir, storage)?,
        None => Arc::new(BlobFiles),
    })
}

/// An object to store: kind, id, stored bytes, raw length.
pub(crate) type Item<'a> = (ObjectKind, Id, &'a [u8], u32);

/// Locations of index pages a commit stored, for its batch.
pub(crate) type PageLocations = Vec<([u8; 33], Location)>;

/// Where a repository keeps its chunk frames (see the module docs).
pub(crate) trait FrameStore: Send + Sync {
    /// Whether the index's `chunks` values are the frames themselves (kept
    /// in blob files) rather than small locations.
    fn blob_files(&self) -> bool;

    /// A new repository's index exists: set up the storage beside it.
    fn created(&self, ix: &Index, config: &RepoConfig) -> Result<()>;

    /// A writer opened the repository as `operation`.
    fn writer_opened(&self, ix: &Index, operation: &str) -> Result<()>;

    /// Of objects the index counts, whether their bytes are stored and
    /// readable (a frame store whose writes can be lost after the index
    /// counted them answers false for those, and they are sent again).
    fn held(&self, ix: &Index, keys: &[[u8; 33]]) -> Result<Vec<bool>>;

    /// Stores a new chunk's frame: in `batch`, or in `out` for
    /// [`FrameStore::written`].
    fn put_chunk<'a>(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        out: &mut Vec<Item<'a>>,
        item: Item<'a>,
    );

    /// Keeps a copy of a record (a region recipe or index page) beside the
    /// frames, where the storage must be rebuildable on its own.
    fn put_record_copy<'a>(&self, out: &mut Vec<Item<'a>>, item: Item<'a>);

    /// Replaces the stored bytes of damaged chunks (healing).
    fn replace_chunks<'a>(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        out: &mut Vec<Item<'a>>,
        items: Vec<Item<'a>>,
    ) -> Result<()>;

    /// The store's batch is written; `guard` is the index's write mutex,
    /// which this releases (before any slow I/O). Stores `out` (a bucket:
    /// the packs it fills go on other threads, which need the index).
    fn written(&self, ix: &Arc<Index>, guard: MutexGuard<'_, ()>, out: Vec<Item<'_>>)
        -> Result<()>;

    /// The store is closing: wait for what is still on its way.
    fn close(&self) {}

    /// Frames of `ids` through view `db` of the index, and the positions of
    /// those whose file or object was deleted after the view was opened.
    fn read(&self, ix: &Index, db: &DB, ids: &[Id]) -> Result<(Vec<ChunkRead>, Vec<usize>)>;

    /// The order in which reading `ids` is cheapest (positions into `ids`).
    fn read_order(&self, ix: &Index, ids: &[Id]) -> Result<Vec<usize>>;

    /// Before a commit's batch (without the write mutex): everything the
    /// snapshot names must be stored when this returns. Returns the
    /// locations of the pages it stored.
    fn prepare_commit(
        &self,
        ix: &Index,
        snapshot: &[u8],
        pages: &[Vec<u8>],
        parent: Option<&Id>,
    ) -> Result<PageLocations>;

    /// In the commit's batch: the locations of the pages it adds.
    fn in_commit(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        added: &HashSet<[u8; 33]>,
        pages: &PageLocations,
    ) -> Result<()>;

    /// A commit of snapshot `id` finished (or failed).
    fn committed(&self, id: &Id);

    /// Snapshot `id`'s record, protection or parent changed in the index.
    fn snapshot_changed(&self, ix: &Index, id: &Id) -> Result<()>;

    /// Snapshots removed from the index.
    fn snapshots_removed(&self, ids: &[Id]) -> Result<()>;

    /// In a sweep batch: objects deleted from the index lose their bytes
    /// (or their locations, and their packs' accounting).
    fn objects_removed(&self, ix: &Index, batch: &mut WriteBatch, keys: &[[u8; 33]]) -> Result<()>;

    /// After a sweep: gives the space of removed objects back. Returns
    /// whether live data had to be rewritten to do so.
    fn reclaim(&self, ix: &Index) -> Result<bool>;

    /// Reads every stored frame and checks what can be checked without
    /// the key.
    fn verify(&self, ix: &Index, sealed: bool) -> Result<StoredBytesCheck>;

    /// The storage's own consistency with the index; with `read_data`,
    /// every record's copy read. One line per problem.
    fn check(&self, ix: &Index, read_data: bool) -> Result<Vec<String>>;

    /// Request counts, cache and pack figures of a bucket.
    fn report(&self, ix: &Index) -> Option<BucketReport>;

    /// `Repository::in_flight`: 0 for frames on local disk.
    fn in_flight(&self) -> usize {
        0
    }

    /// `Repository::uploads_in_flight`: 0 for frames on local disk.
    fn uploads_in_flight(&self) -> usize {
        0
    }

    /// Bytes kept outside the repository's directory.
    fn external_bytes(&self, ix: &Index) -> Result<u64>;

    /// The config file was rewritten: `bytes` is its new content.
    fn config_saved(&self, bytes: &[u8]) -> Result<()>;
}

/// Frames as values of the `chunks` column family, in RocksDB blob files.
pub(crate) struct BlobFiles;

impl FrameStore for BlobFiles {
    fn blob_files(&self) -> bool {
        true
    }

    fn created(&self, _: &Index, _: &RepoConfig) -> Result<()> {
        Ok(())
    }

    fn writer_opened(&self, _: &Index, _: &str) -> Result<()> {
        Ok(())
    }

    fn held(&self, _: &Index, keys: &[[u8; 33]]) -> Result<Vec<bool>> {
        // Written in the same batch as their counts.
        Ok(vec![true; keys.len()])
    }

    fn put_chunk<'a>(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        _: &mut Vec<Item<'a>>,
        (_, id, frame, _): Item<'a>,
    ) {
        batch.put_cf(ix.cf(cf::CHUNKS), id.as_bytes(), frame);
    }

    fn put_record_copy<'a>(&self, _: &mut Vec<Item<'a>>, _: Item<'a>) {
        // The index holds the record; the directory is the repository.
    }

    fn replace_chunks<'a>(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        _: &mut Vec<Item<'a>>,
        items: Vec<Item<'a>>,
    ) -> Result<()> {
        for (_, id, frame, _) in items {
            batch.put_cf(ix.cf(cf::CHUNKS), id.as_bytes(), frame);
        }
        Ok(())
    }

    fn written(&self, _: &Arc<Index>, guard: MutexGuard<'_, ()>, _: Vec<Item<'_>>) -> Result<()> {
        drop(guard);
        Ok(())
    }

    fn read(&self, ix: &Index, db: &DB, ids: &[Id]) -> Result<(Vec<ChunkRead>, Vec<usize>)> {
        let chunks = db.cf_handle(cf::CHUNKS).expect("column family exists");
        let mut sorted: Vec<(usize, &Id)> = ids.iter().enumerate().collect();
        sorted.sort_by_key(|(_, id)| **id);
        let keys: Vec<&[u8; 32]> = sorted.iter().map(|(_, id)| id.as_bytes()).collect();
        // Checksums stay on although the reader verifies every chunk against
        // its BLAKE3 id: RocksDB's flag also covers the SST blocks that lead
        // to the blob, and parsing an unverified corrupt block can crash
        // RocksDB (found by the random-corruption test).
        let ro = rocksdb::ReadOptions::default();
        let vals = db.batched_multi_get_cf_opt(chunks, keys, true, &ro);
        let mut out: Vec<ChunkRead> = vec![Err(ChunkFault::Missing); ids.len()];
        let mut vanished = Vec::new();
        for ((i, _), v) in sorted.into_iter().zip(vals) {
            out[i] = match v {
                Ok(Some(v)) => Ok(v.to_vec()),
                Ok(None) => Err(ChunkFault::Missing),
                Err(e) => {
                    if file_vanished(&e) {
                        vanished.push(i);
                    }
                    Err(ChunkFault::Unreadable(
                        crate::error::db(&ix.dir, "read chunk", e).to_string(),
                    ))
                }
            };
        }
        Ok((out, vanished))
    }

    fn read_order(&self, _: &Index, ids: &[Id]) -> Result<Vec<usize>> {
        // A batched read sorts its keys itself (blob files follow key
        // order closely enough): the caller's order is as good as any.
        Ok((0..ids.len()).collect())
    }

    fn prepare_commit(
        &self,
        _: &Index,
        _: &[u8],
        _: &[Vec<u8>],
        _: Option<&Id>,
    ) -> Result<PageLocations> {
        // The commit's flush makes every frame durable with the index.
        Ok(Vec::new())
    }

    fn in_commit(
        &self,
        _: &Index,
        _: &mut WriteBatch,
        _: &HashSet<[u8; 33]>,
        _: &PageLocations,
    ) -> Result<()> {
        Ok(())
    }

    fn committed(&self, _: &Id) {}

    fn snapshot_changed(&self, _: &Index, _: &Id) -> Result<()> {
        Ok(())
    }

    fn snapshots_removed(&self, _: &[Id]) -> Result<()> {
        Ok(())
    }

    fn objects_removed(&self, ix: &Index, batch: &mut WriteBatch, keys: &[[u8; 33]]) -> Result<()> {
        for k in keys.iter().filter(|k| k[0] == b'C') {
            batch.delete_cf(ix.cf(cf::CHUNKS), &k[1..]);
        }
        Ok(())
    }

    /// Compacts every column family (dropping dead keys and references,
    /// deleting blob files nothing references), then, when garbage in blob
    /// files still exceeds [`BLOB_GC_RATIO`], rewrites the live blobs out
    /// of them.
    fn reclaim(&self, ix: &Index) -> Result<bool> {
        let _guard = ix.lock();
        let compact = |name: &str| {
            let mut co = CompactOptions::default();
            co.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
            co.set_exclusive_manual_compaction(true);
            ix.db
                .compact_range_cf_opt(ix.cf(name), None::<&[u8]>, None::<&[u8]>, &co);
        };
        for name in cf::ALL {
            compact(name);
        }
        let space = crate::gc::blob_space(ix)?;
        let rewrite = space.files_bytes > 0
            && space.garbage_bytes as f64 > BLOB_GC_RATIO * space.files_bytes as f64;
        if rewrite {
            let chunks = ix.cf(cf::CHUNKS);
            let set = |v: &[(&str, &str)]| {
                ix.db
                    .set_options_cf(chunks, v)
                    .map_err(|e| ix.db_err("set options", e))
            };
            set(&[
                ("enable_blob_garbage_collection", "true"),
                ("blob_garbage_collection_age_cutoff", "1.0"),
            ])?;
            compact(cf::CHUNKS);
            set(&[
                ("enable_blob_garbage_collection", "false"),
                ("blob_garbage_collection_age_cutoff", "0.25"),
            ])?;
        }
        Ok(rewrite)
    }

    /// Through RocksDB's checksums (every data block and blob record has
    /// one, verified on this read) and, sealed, the frame's shape.
    fn verify(&self, ix: &Index, sealed: bool) -> Result<StoredBytesCheck> {
        let mut out = StoredBytesCheck::default();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        let mut last: Option<Id> = None;
        for item in ix
            .db
            .iterator_cf_opt(ix.cf(cf::CHUNKS), ro, rocksdb::IteratorMode::Start)
        {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    out.problems.push(format!(
                        "the chunks table is damaged after chunk {}: {e} (run `imgstore check --read-data` with the key to name the snapshots it hurts)",
                        last.map_or("(first)".to_string(), |id| id.to_string())
                    ));
                    break;
                }
            };
            let Some(id) = Id::from_slice(&k) else {
                out.problems.push(format!(
                    "the chunks table holds a malformed key of {} bytes",
                    k.len()
                ));
                continue;
            };
            out.objects += 1;
            out.bytes += v.len() as u64;
            if sealed && !imgstore_format::sealed::is_sealed_chunk(&v) {
                out.problems.push(format!(
                    "chunk {id}: stored value of {} bytes is not a sealed chunk",
                    v.len()
                ));
            }
            last = Some(id);
        }
        Ok(out)
    }

    fn check(&self, _: &Index, _: bool) -> Result<Vec<String>> {
        // The index is the storage: `check` reads it.
        Ok(Vec::new())
    }

    fn report(&self, _: &Index) -> Option<BucketReport> {
        None
    }

    fn external_bytes(&self, _: &Index) -> Result<u64> {
        Ok(0)
    }

    fn config_saved(&self, _: &[u8]) -> Result<()> {
        Ok(())
    }
}
