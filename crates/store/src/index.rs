//! The index: the RocksDB database every repository keeps on this machine.
//!
//! It holds what a backup asks about thousands of times a second — which
//! objects exist, their reference counts, the orphans, region recipes,
//! index pages, snapshot records and `meta` entries — and, in its `chunks`
//! column family, either the chunk frames themselves (RocksDB blob files)
//! or where the frame store keeps them (pack locations in a bucket).
//! [`Index`] owns the database handle, the write mutex that serialises
//! read-modify-write of counts, and the helpers every part of the store
//! shares; the frame stores (`frames.rs`, `packs/`) get it as an argument.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use imgstore_format::{cf, Id, ObjectKind, RefCount, DB_DIR};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, FlushOptions, Options,
    WriteBatch, WriteOptions, DB,
};

use crate::{Mode, Result, StoreError};

/// How many newer views one chunk read may open (a writer can delete files
/// again between a reopen and the read).
pub(crate) const VIEW_REFRESHES: usize = 3;

/// Which way [`Index::change_refs`] moves counts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refs {
    /// New parents: adds to existing objects, returns the absent ones.
    Add,
    /// Removed parents: subtracts (an absent object or a count that would
    /// go below zero is an error), returns those reaching zero, now orphans.
    Remove,
}

/// The open database and what every part of the store shares about it.
pub(crate) struct Index {
    pub(crate) db: DB,
    pub(crate) dir: PathBuf,
    pub(crate) mode: Mode,
    /// Serialises read-modify-write of reference counts within this process
    /// (other processes are excluded by the file lock).
    write: Mutex<()>,
    /// A read-only store's newer view of the database, for chunk reads.
    /// A read-only open sees the files live at that moment; a writer's gc
    /// may since have rewritten the live chunks of a blob file (or, in a
    /// bucket, of a pack) into a new one and deleted the old (the SST
    /// files the view uses stay open, and readable, from the open). A
    /// chunk read that finds its blob file or pack gone reopens the
    /// database once and reads it where that view says: a chunk's bytes
    /// never change, only where they lie.
    newer: Mutex<Option<Arc<DB>>>,
    /// The block cache, shared with a newer view.
    cache: Cache,
    /// Whether `chunks` values go to blob files (they are frames) or stay
    /// in the LSM tree (they are small locations).
    blob_files: bool,
}

pub(crate) fn db_options(
    create: bool,
    cache: &Cache,
    blob_files: bool,
) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db = Options::default();
    db.create_if_missing(create);
    db.create_missing_column_families(create);
    db.set_atomic_flush(true);
    db.set_max_background_jobs(2);
    db.set_keep_log_file_num(2);
    db.set_max_log_file_size(1 << 20);
    // Also the size RocksDB preallocates each WAL file with (else 1.1 ×
    // the largest write buffer: 17.6 MiB). Backups write without the WAL
    // (only commits and small records use it), so a WAL file holds a few
    // KiB; but at each flush its preallocated rest is truncated away, and
    // on a file system mounted with `discard` that is a synchronous
    // discard: the commit's next sync waited 150–300 ms behind 17.6 MiB
    // of it (server incrementals of the workload, `/proc/diskstats`).
    // More than 1 MiB of live WAL only makes RocksDB flush sooner.
    db.set_max_total_wal_size(1 << 20);
    db.set_bytes_per_sync(1 << 20);
    db.set_paranoid_checks(true);
    db.set_log_level(rocksdb::LogLevel::Warn);

    let table = |bloom: bool| {
        let mut t = BlockBasedOptions::default();
        t.set_block_cache(cache);
        t.set_cache_index_and_filter_blocks(true);
        if bloom {
            t.set_bloom_filter(10.0, false);
        }
        t
    };
    let cfd = |name: &str, f: &dyn Fn(&mut Options)| {
        let mut o = Options::default();
        o.set_compression_type(DBCompressionType::None);
        o.set_level_compaction_dynamic_level_bytes(true);
        f(&mut o);
        ColumnFamilyDescriptor::new(name, o)
    };
    let cfs = vec![
        cfd(cf::CHUNKS, &|o| {
            // Chunk payloads (already zstd-compressed) go to blob files; the
            // LSM tree holds only 32-byte keys and blob references.
            // When the values are 44-byte pack locations (a bucket-backed
            // repository) they stay in the LSM tree.
            o.set_enable_blob_files(blob_files);
            o.set_min_blob_size(0);
            o.set_blob_file_size(256 << 20);
            o.set_blob_compression_type(DBCompressionType::None);
            // Blob GC rewrites live blobs out of old blob files. Backups
            // delete nothing, so during them it would only add write
            // amplification; garbage collection enables it when it runs.
            o.set_enable_blob_gc(false);
            // Memtables hold chunk values until a flush moves them to a blob
            // file: 16 MiB × 3 bounds that memory (and sizes blob files).
            o.set_write_buffer_size(16 << 20);
            o.set_max_write_buffer_number(2);
            o.set_block_based_table_factory(&table(true));
        }),
        cfd(cf::RECIPES, &|o| {
            o.set_write_buffer_size(8 << 20);
            o.set_block_based_table_factory(&table(true));
        }),
        cfd(cf::REFS, &|o| {
            o.set_write_buffer_size(8 << 20);
            o.set_block_based_table_factory(&table(true));
        }),
        cfd(cf::ORPHANS, &|o| {
            o.set_write_buffer_size(4 << 20);
        }),
        cfd(cf::SNAPSHOTS, &|o| {
            o.set_write_buffer_size(4 << 20);
        }),
        cfd(cf::META, &|o| {
            o.set_write_buffer_size(1 << 20);
        }),
    ];
    (db, cfs)
}

/// Opens the database read-only while a writer may be running (readers do
/// not take the repository lock). A read-only open lists the live files and
/// then opens them; a writer that flushes meanwhile deletes the WAL file it
/// no longer needs, and the open fails with "No such file or directory"
/// (seen in CI: a `snapshots` during a held backup), or compacts SST files
/// away, which RocksDB reports as corruption. Such a failure is retried on
/// a fresh listing; anything else, or a file still missing after a second,
/// is the error.
fn open_read_only(
    path: &Path,
    options: impl Fn() -> (Options, Vec<ColumnFamilyDescriptor>),
) -> std::result::Result<DB, rocksdb::Error> {
    let mut attempt = 0;
    loop {
        let (opts, cfs) = options();
        match DB::open_cf_descriptors_read_only(&opts, path, cfs, false) {
            Err(e) if attempt < 20 && e.as_ref().contains("No such file or directory") => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

fn read_only_options(cache: &Cache, blob_files: bool) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let (mut opts, cfs) = db_options(false, cache, blob_files);
    // Readers (restore, verify, check, serve) mostly read blob files in the
    // order backups wrote them: let the kernel read ahead (RocksDB's
    // default advises "random", which turns it off). A cold restore of the
    // workload's 2 GiB image: 1.32–1.45 s with the default, 1.09 s without.
    opts.set_advise_random_on_open(false);
    (opts, cfs)
}

/// Whether a read failed because a file of this reader's view was deleted
/// (by the writer's compaction or blob rewrite) since the view was opened.
pub(crate) fn file_vanished(e: &rocksdb::Error) -> bool {
    e.kind() == rocksdb::ErrorKind::IOError && e.as_ref().contains("No such file or directory")
}

impl Index {
    /// Opens the database of the repository at `dir`.
    pub(crate) fn open(dir: &Path, mode: Mode, blob_files: bool) -> Result<Index> {
        let cache = Cache::new_lru_cache(32 << 20);
        let db_path = dir.join(DB_DIR);
        let db = match mode {
            Mode::Write { .. } => {
                let (opts, cfs) = db_options(false, &cache, blob_files);
                DB::open_cf_descriptors(&opts, &db_path, cfs)
            }
            Mode::ReadOnly => open_read_only(&db_path, || read_only_options(&cache, blob_files)),
        }
        .map_err(|e| crate::error::db(&db_path, "open", e))?;
        Ok(Index {
            db,
            dir: dir.to_path_buf(),
            mode,
            write: Mutex::new(()),
            newer: Mutex::new(None),
            cache,
            blob_files,
        })
    }

    /// Takes the write mutex (see [`Index::write`]).
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every column family is created at init and opened every time.
        self.db.cf_handle(name).expect("column family exists")
    }

    pub(crate) fn db_err(&self, op: &'static str, e: rocksdb::Error) -> StoreError {
        crate::error::db(&self.dir.join(DB_DIR), op, e)
    }

    /// A `meta` entry that does not decode.
    pub(crate) fn meta_err(&self, source: imgstore_format::FormatError) -> StoreError {
        StoreError::Format {
            path: self.dir.join(DB_DIR),
            source,
        }
    }

    pub(crate) fn require_write(&self) -> Result<()> {
        match self.mode {
            Mode::Write { .. } => Ok(()),
            Mode::ReadOnly => Err(StoreError::ReadOnly),
        }
    }

    /// Refuses a write of `incoming` bytes that the file system could not
    /// take together with what the memtables hold unflushed. RocksDB meeting
    /// ENOSPC in a background flush does not fail the writes waiting behind
    /// it: its error recovery stalls them until space appears, and a backup
    /// onto a full disk hung (found by the disk-full test under load). So
    /// the store says "no space" itself, before the write, while earlier
    /// snapshots are intact and the partial work is garbage for gc.
    pub(crate) fn ensure_room(&self, incoming: u64) -> Result<()> {
        let Ok(st) = rustix::fs::statvfs(&self.dir) else {
            return Ok(());
        };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let unflushed: u64 = cf::ALL
            .iter()
            .filter_map(|n| {
                self.db
                    .property_int_value_cf(self.cf(n), "rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()
            })
            .sum();
        // Flushed data takes about what the memtables hold (values are
        // stored as written); a margin covers SST and manifest overhead.
        let need = (incoming + unflushed) + (incoming + unflushed) / 8 + (8 << 20);
        if free < need {
            return Err(StoreError::NoSpace {
                path: self.dir.clone(),
                detail: format!("{free} bytes free, {need} needed to write and flush"),
            });
        }
        Ok(())
    }

    /// Writes `batch` with the WAL and fsync.
    pub(crate) fn write_synced(&self, batch: WriteBatch, op: &'static str) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.db_err(op, e))
    }

    /// Writes `batch` without the WAL: durable at the next flush (step 1
    /// of the durability protocol in the crate docs).
    pub(crate) fn write_unlogged(&self, batch: WriteBatch, op: &'static str) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.db_err(op, e))
    }

    /// Flushes every column family together (`atomic_flush`), waiting:
    /// what was written without the WAL is durable afterwards.
    pub(crate) fn flush_all(&self) -> Result<()> {
        let handles: Vec<_> = cf::ALL.iter().map(|n| self.cf(n)).collect();
        let refs: Vec<_> = handles.iter().collect();
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db
            .flush_cfs_opt(&refs, &fo)
            .map_err(|e| self.db_err("flush", e))
    }

    pub(crate) fn get_refs(&self, keys: &[[u8; 33]]) -> Result<Vec<Option<RefCount>>> {
        let refs = self.cf(cf::REFS);
        self.db
            .batched_multi_get_cf(&refs, keys.iter(), false)
            .into_iter()
            .zip(keys)
            .map(|(r, k)| match r {
                Ok(None) => Ok(None),
                Ok(Some(v)) => RefCount::decode(&v).map(Some).map_err(|source| {
                    let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
                    StoreError::Corrupt { kind, id, source }
                }),
                Err(e) => Err(self.db_err("read refs", e)),
            })
            .collect()
    }

    /// Moves the counts of the objects in `counts` by their numbers, in
    /// `batch`, keeping `orphans` in step (an object leaves it when its
    /// count leaves zero, and joins it when its count reaches zero). See
    /// [`Refs`] for what each direction returns. The one place counts
    /// change, so "count = number of stored parents" is kept here.
    pub(crate) fn change_refs(
        &self,
        batch: &mut WriteBatch,
        counts: &HashMap<[u8; 33], u64>,
        way: Refs,
    ) -> Result<Vec<[u8; 33]>> {
        let keys: Vec<[u8; 33]> = counts.keys().copied().collect();
        let cur = self.get_refs(&keys)?;
        let (refs, orphans) = (self.cf(cf::REFS), self.cf(cf::ORPHANS));
        let mut out = Vec::new();
        for (k, c) in keys.into_iter().zip(cur) {
            let n = counts[&k];
            let (kind, id) = ObjectKind::parse_key(&k).expect("33-byte key");
            match (way, c) {
                (Refs::Add, None) => out.push(k),
                (Refs::Add, Some(mut rc)) => {
                    if rc.count == 0 {
                        batch.delete_cf(&orphans, k);
                    }
                    rc.count += n;
                    batch.put_cf(&refs, k, rc.encode());
                }
                (Refs::Remove, None) => return Err(StoreError::Missing { kind, id }),
                (Refs::Remove, Some(mut rc)) => {
                    if rc.count < n {
                        return Err(StoreError::Invalid(format!(
                            "{kind:?} {id} has {} references, {n} would be removed: run `imgstore check`",
                            rc.count
                        )));
                    }
                    rc.count -= n;
                    batch.put_cf(&refs, k, rc.encode());
                    if rc.count == 0 {
                        batch.put_cf(&orphans, k, []);
                        out.push(k);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Calls `f(key, value)` for the `meta` entries whose keys start with
    /// `prefix`, in key order, until it returns false.
    pub(crate) fn scan_meta(
        &self,
        prefix: &[u8],
        op: &'static str,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        for item in self.db.prefix_iterator_cf(self.cf(cf::META), prefix) {
            let (k, v) = item.map_err(|e| self.db_err(op, e))?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Calls `f(key, value)` for every entry of column family `name`.
    pub(crate) fn scan(
        &self,
        name: &'static str,
        op: &'static str,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(name), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| self.db_err(op, e))?;
            f(&k, &v);
        }
        Ok(())
    }

    /// Raw snapshot records `(key, value)` in key order, undecoded, so one
    /// bad record does not hide the others.
    pub(crate) fn snapshot_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.scan(cf::SNAPSHOTS, "scan snapshots", &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()))
        })?;
        Ok(out)
    }

    /// One snapshot record, or `NoSnapshot`.
    pub(crate) fn snapshot_record(&self, id: &Id) -> Result<Vec<u8>> {
        self.db
            .get_cf(self.cf(cf::SNAPSHOTS), id.as_bytes())
            .map_err(|e| self.db_err("read snapshot", e))?
            .ok_or(StoreError::NoSnapshot { id: *id })
    }

    /// Stored region recipes or index pages as stored (the caller checks
    /// them against their ids); an absent one is an error naming it.
    pub(crate) fn raw_records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| kind.key(id)).collect();
        self.db
            .batched_multi_get_cf(self.cf(cf::RECIPES), keys.iter(), false)
            .into_iter()
            .zip(ids)
            .map(|(r, id)| match r {
                Ok(Some(v)) => Ok(v.to_vec()),
                Ok(None) => Err(StoreError::Missing { kind, id: *id }),
                Err(e) => Err(self.db_err("read recipe", e)),
            })
            .collect()
    }

    /// Ids of protected snapshots.
    pub(crate) fn protected(&self) -> Result<Vec<Id>> {
        let mut out = Vec::new();
        self.scan_meta(
            imgstore_format::META_PROTECT_PREFIX,
            "read protection marks",
            |k, _| {
                let id =
                    imgstore_format::meta::parse_protect_key(k).map_err(|e| self.meta_err(e))?;
                out.extend(id);
                Ok(true)
            },
        )?;
        Ok(out)
    }

    /// Every recorded (snapshot, parent) pair.
    pub(crate) fn parents(&self) -> Result<Vec<(Id, Id)>> {
        let mut out = Vec::new();
        self.scan_meta(
            imgstore_format::meta::PARENT_PREFIX,
            "read parents",
            |k, v| {
                let pair =
                    imgstore_format::meta::parse_parent(k, v).map_err(|e| self.meta_err(e))?;
                out.extend(pair);
                Ok(true)
            },
        )?;
        Ok(out)
    }

    /// Reads `ids` with `read` through the view this store opened (what it
    /// lists is what it reads), then the chunks whose blob file or pack
    /// `read` found deleted through newer views (see [`Index::newer`]). A
    /// chunk a newer view lacks was there at the open: only gc deletes
    /// chunks, so its snapshot was forgotten meanwhile.
    pub(crate) fn read_through_views(
        &self,
        ids: &[Id],
        read: impl Fn(&DB, &[Id]) -> Result<(Vec<imgstore_repo::ChunkRead>, Vec<usize>)>,
    ) -> Result<Vec<imgstore_repo::ChunkRead>> {
        use imgstore_repo::ChunkFault;
        let (mut out, mut gone) = read(&self.db, ids)?;
        let mut view = None;
        for _ in 0..VIEW_REFRESHES {
            if gone.is_empty() {
                break;
            }
            let Some(db) = self.newer_view(view.as_ref()) else {
                break;
            };
            let again: Vec<Id> = gone.iter().map(|&i| ids[i]).collect();
            let (reads, still) = read(&db, &again)?;
            for (&i, r) in gone.iter().zip(reads) {
                out[i] = match r {
                    Err(ChunkFault::Missing) => Err(ChunkFault::Collected),
                    r => r,
                };
            }
            gone = still.into_iter().map(|j| gone[j]).collect();
            view = Some(db);
        }
        Ok(out)
    }

    /// A view of the database newer than `seen` (the view a read just
    /// used; `None` for the one opened with the store): the one another
    /// reader opened meanwhile, or a fresh read-only open. `None` when the
    /// store is a writer (its view is always current) or the open fails
    /// (the read's own error then stands).
    fn newer_view(&self, seen: Option<&Arc<DB>>) -> Option<Arc<DB>> {
        if !matches!(self.mode, Mode::ReadOnly) {
            return None;
        }
        let mut newer = self.newer.lock().unwrap_or_else(|p| p.into_inner());
        let current = newer.as_ref();
        let moved_on = match (current, seen) {
            (Some(c), Some(s)) => !Arc::ptr_eq(c, s),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !moved_on {
            let db = open_read_only(&self.dir.join(DB_DIR), || {
                read_only_options(&self.cache, self.blob_files)
            })
            .ok()?;
            *newer = Some(Arc::new(db));
        }
        newer.clone()
    }
}
