//! The chunk store: the only crate that links RocksDB.
//!
//! A repository is a directory holding `imgstore.json` (the config, readable
//! without RocksDB), a `lock` file, and `db/`, a RocksDB database whose column
//! families and encodings are defined in `imgstore-format` and documented in
//! `docs/FORMAT.md`.
//!
//! # Why this crate owns reference counts
//!
//! Every stored object — chunk, region recipe, index page — has a reference
//! count in the `refs` column family: the number of stored parents naming it
//! (snapshot → page → region → chunk, with multiplicity). The count is
//! changed only in the same atomic write batch that adds or removes the
//! parent, so the invariant "count = number of stored parents" holds after
//! every batch, and therefore after every crash. Objects whose count is zero
//! are listed in the `orphans` column family, so garbage collection can find
//! exactly what is unreferenced without walking what is still live.
//! Keeping that invariant here, next to the write batches, means no caller
//! can break it.
//!
//! # Durability protocol of a backup
//!
//! 1. Region batches (new chunk frames, the region recipe, their counts) are
//!    written **without the WAL**: chunk data reaches disk once, in blob files
//!    at flush time, instead of twice.
//! 2. Before the snapshot commit, all column families are flushed together
//!    (`atomic_flush`), so the flushed state is a consistent prefix of the
//!    batches.
//! 3. The commit — index pages, counts, the snapshot record — is one batch
//!    written **with the WAL and fsync**. A snapshot is visible only if the
//!    commit landed, and then everything it references is already durable.
//!
//! A crash before step 3 leaves at most orphaned regions (count zero, listed
//! in `orphans`) and their chunks: never a partial snapshot.
//!
//! # Locking
//!
//! Writers (`backup`, later `gc`/`forget`) hold an exclusive `flock` on the
//! `lock` file, which names the operation and pid for the "busy" message.
//! Readers open RocksDB read-only and take no lock.

mod error;
mod gc;
mod integrity;
mod lock;
mod packs;
mod repository;
mod sessions;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{
    cf, FormatError, Id, ObjectKind, RefCount, RepoConfig, CONFIG_FILE, DB_DIR, META_FORMAT_KEY,
};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, FlushOptions, Options,
    WriteBatch, WriteOptions, DB,
};

pub use error::StoreError;
pub use gc::{BlobSpace, SweepOutcome, BLOB_GC_RATIO};
pub use imgstore_repo::{DamageMark, ForgetOutcome, PutOutcome, Tally, Totals};
pub use integrity::StoredBytesCheck;
pub use lock::Lock;
pub use packs::{BucketReport, RecoverOutcome, DEFAULT_PACK_SIZE, REPACK_GARBAGE};
pub use sessions::{snapshot_ns_key, Attestation, Scope};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How to open a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Exclusive writer; `operation` names it in "busy" messages.
    Write { operation: &'static str },
    /// Read-only, no lock: may run while a writer works, sees only committed snapshots.
    ReadOnly,
}

/// An open repository.
pub struct Store {
    db: DB,
    dir: PathBuf,
    config: RepoConfig,
    mode: Mode,
    /// Serialises read-modify-write of reference counts within this process
    /// (other processes are excluded by the file lock).
    write: Mutex<()>,
    /// Damage marks this writer repairs when it produces the same objects.
    heal: Mutex<integrity::Healing>,
    /// Whether `heal` holds any pending mark (checked without the lock).
    heal_pending: std::sync::atomic::AtomicBool,
    /// Objects live server sessions rely on: gc leaves them.
    pins: Mutex<sessions::Pins>,
    /// How the engine seals what it stores here (the store itself only
    /// moves bytes; see `imgstore_repo::Codec`).
    codec: imgstore_repo::Codec,
    /// The bucket side of a bucket-backed repository (format 4).
    packs: Option<Box<packs::Packs>>,
    /// A read-only store's newer view of the database, for chunk reads.
    /// A read-only open sees the files live at that moment; a writer's gc
    /// may since have rewritten the live chunks of a blob file (or, in a
    /// bucket, of a pack) into a new one and deleted the old (the SST
    /// files the view uses stay open, and readable, from the open). A
    /// chunk read that finds its blob file or pack gone reopens the
    /// database once and reads it where that view says: a chunk's bytes
    /// never change, only where they lie.
    newer: Mutex<Option<std::sync::Arc<DB>>>,
    /// The block cache, shared with a newer view.
    cache: Cache,
    _lock: Option<Lock>,
}

fn db_options(create: bool, cache: &Cache, bucket: bool) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db = Options::default();
    db.create_if_missing(create);
    db.create_missing_column_families(create);
    db.set_atomic_flush(true);
    db.set_max_background_jobs(2);
    db.set_keep_log_file_num(2);
    db.set_max_log_file_size(1 << 20);
    db.set_max_total_wal_size(64 << 20);
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
            // In a bucket-backed repository the values are 44-byte pack
            // locations: they stay in the LSM tree.
            o.set_enable_blob_files(!bucket);
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

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
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

fn read_only_options(cache: &Cache, bucket: bool) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let (mut opts, cfs) = db_options(false, cache, bucket);
    // Readers (restore, verify, check, serve) mostly read blob files in the
    // order backups wrote them: let the kernel read ahead (RocksDB's
    // default advises "random", which turns it off). A cold restore of the
    // workload's 2 GiB image: 1.32–1.45 s with the default, 1.09 s without.
    opts.set_advise_random_on_open(false);
    (opts, cfs)
}

/// Whether a read failed because a file of this reader's view was deleted
/// (by the writer's compaction or blob rewrite) since the view was opened.
fn file_vanished(e: &rocksdb::Error) -> bool {
    e.kind() == rocksdb::ErrorKind::IOError && e.as_ref().contains("No such file or directory")
}

/// How many newer views one chunk read may open (a writer can delete files
/// again between a reopen and the read).
pub(crate) const VIEW_REFRESHES: usize = 3;

impl Store {
    /// Creates a new repository at `dir` (which must not exist, or be an
    /// empty directory) with the given config. The directory is created
    /// mode 0700 and the config file 0600.
    pub fn init(dir: &Path, config: RepoConfig) -> Result<Store> {
        if config.storage.is_none() {
            return Store::create_local(dir, config, "init");
        }
        let fresh = !dir.exists();
        let store = Store::create_local(dir, config.clone(), "init")?;
        if let Err(e) = store.init_bucket() {
            drop(store);
            // Nothing but what this call created is removed.
            if fresh {
                let _ = fs::remove_dir_all(dir);
            } else if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
                }
            }
            return Err(e);
        }
        Ok(store)
    }

    /// Creates the local directory of a repository (the whole repository,
    /// unless it is bucket-backed) and opens it for writing as `operation`.
    pub(crate) fn create_local(
        dir: &Path,
        config: RepoConfig,
        operation: &'static str,
    ) -> Result<Store> {
        if dir.exists() {
            let empty = dir.is_dir()
                && fs::read_dir(dir)
                    .map_err(io_err(dir, "read"))?
                    .next()
                    .is_none();
            if !empty {
                return Err(StoreError::AlreadyExists {
                    path: dir.to_path_buf(),
                });
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir, "chmod"))?;
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir, "create directory"))?;
        }
        let lock = Lock::acquire(dir, "init")?;
        {
            let cache = Cache::new_lru_cache(8 << 20);
            let (opts, cfs) = db_options(true, &cache, config.storage.is_some());
            let db_path = dir.join(DB_DIR);
            let db = DB::open_cf_descriptors(&opts, &db_path, cfs)
                .map_err(|e| crate::error::db(&db_path, "create", e))?;
            let meta = db.cf_handle(cf::META).expect("meta cf");
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            let mut b = WriteBatch::default();
            // The config's version (2 plain, 3 encrypted, 4 in a bucket),
            // as its number.
            b.put_cf(
                &meta,
                META_FORMAT_KEY,
                config.version.as_u32().to_le_bytes(),
            );
            db.write_opt(b, &wo)
                .map_err(|e| crate::error::db(&db_path, "write", e))?;
        }
        // The config file is written last and atomically: a directory without
        // it is not a repository, so an interrupted init leaves nothing usable.
        let path = dir.join(CONFIG_FILE);
        let tmp = dir.join(format!("{CONFIG_FILE}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&config.to_json())
            .map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, &path).map_err(io_err(&path, "rename"))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "fsync"))?;
        drop(lock);
        Store::open(dir, Mode::Write { operation })
    }

    /// Opens an existing repository; a writer that finds the lock held
    /// retries until `wait` has passed (restic's `--retry-lock`, borg's
    /// `--lock-wait`), polling at most every 2 s, then reports it busy.
    pub fn open_waiting(dir: &Path, mode: Mode, wait: std::time::Duration) -> Result<Store> {
        let deadline = std::time::Instant::now() + wait;
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            match Store::open(dir, mode) {
                Err(StoreError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }

    /// Opens an existing repository.
    pub fn open(dir: &Path, mode: Mode) -> Result<Store> {
        let cfg_path = dir.join(CONFIG_FILE);
        let owner_err = |readable: bool| -> Option<StoreError> {
            use std::os::unix::fs::MetadataExt;
            let owner = fs::metadata(dir).ok()?.uid();
            let user = rustix::process::geteuid().as_raw();
            (owner != user).then(|| StoreError::Owner {
                path: dir.to_path_buf(),
                owner,
                user,
                readable,
            })
        };
        let bytes = match fs::read(&cfg_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(owner_err(false).unwrap_or_else(|| io_err(&cfg_path, "read")(e)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotARepository {
                    path: dir.to_path_buf(),
                    why: if dir.exists() {
                        format!("no {CONFIG_FILE} in it")
                    } else {
                        "it does not exist".into()
                    },
                })
            }
            Err(e) => return Err(io_err(&cfg_path, "read")(e)),
        };
        let config = RepoConfig::from_json(&bytes).map_err(|source| match source {
            FormatError::NotRepository { why } => StoreError::NotARepository {
                path: dir.to_path_buf(),
                why,
            },
            source => StoreError::Format {
                path: cfg_path.clone(),
                source,
            },
        })?;
        if let (Mode::Write { .. }, Some(e)) = (mode, owner_err(true)) {
            // Files a writer creates would belong to this user and could
            // lock the owner out of their own repository.
            return Err(e);
        }
        let lock = match mode {
            Mode::Write { operation } => Some(Lock::acquire(dir, operation)?),
            Mode::ReadOnly => None,
        };
        let cache = Cache::new_lru_cache(32 << 20);
        let db_path = dir.join(DB_DIR);
        let bucket = config.storage.is_some();
        let packs = match &config.storage {
            Some(st) => Some(Box::new(packs::Packs::new(dir, st)?)),
            None => None,
        };
        let db = match mode {
            Mode::Write { .. } => {
                let (opts, cfs) = db_options(false, &cache, bucket);
                DB::open_cf_descriptors(&opts, &db_path, cfs)
            }
            Mode::ReadOnly => open_read_only(&db_path, || read_only_options(&cache, bucket)),
        }
        .map_err(|e| crate::error::db(&db_path, "open", e))?;
        let store = Store {
            db,
            dir: dir.to_path_buf(),
            config,
            mode,
            write: Mutex::new(()),
            heal: Mutex::new(integrity::Healing::default()),
            heal_pending: std::sync::atomic::AtomicBool::new(false),
            pins: Mutex::new(sessions::Pins::default()),
            codec: imgstore_repo::Codec::Plain,
            packs,
            newer: Mutex::new(None),
            cache,
            _lock: lock,
        };
        let v = store
            .db
            .get_pinned_cf(store.cf(cf::META), META_FORMAT_KEY)
            .map_err(|e| store.db_err("read", e))?
            .map(|v| v.to_vec());
        match v.as_deref().and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            Some(b) if u32::from_le_bytes(b) == store.config.version.as_u32() => {}
            other => {
                return Err(StoreError::Format {
                    path: db_path,
                    source: FormatError::Invalid {
                        what: "database format marker",
                        why: format!(
                            "{:?} does not match config version {}",
                            other.map(u32::from_le_bytes),
                            store.config.version
                        ),
                    },
                })
            }
        }
        if let Mode::Write { operation } = mode {
            store.load_healing()?;
            // `init` and `recover` are about to take the bucket.
            if store.packs.is_some() && operation != "init" && operation != "recover" {
                store.check_owner()?;
            }
        }
        Ok(store)
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The codec the engine uses on this repository.
    pub fn codec(&self) -> &imgstore_repo::Codec {
        &self.codec
    }

    /// Uses `codec` (the sealing keys of an encrypted repository).
    pub fn with_codec(mut self, codec: imgstore_repo::Codec) -> Store {
        self.codec = codec;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every column family is created at init and opened every time.
        self.db.cf_handle(name).expect("column family exists")
    }

    fn db_err(&self, op: &'static str, e: rocksdb::Error) -> StoreError {
        crate::error::db(&self.dir.join(DB_DIR), op, e)
    }

    /// Refuses a write of `incoming` bytes that the file system could not
    /// take together with what the memtables hold unflushed. RocksDB meeting
    /// ENOSPC in a background flush does not fail the writes waiting behind
    /// it: its error recovery stalls them until space appears, and a backup
    /// onto a full disk hung (found by the disk-full test under load). So
    /// the store says "no space" itself, before the write, while earlier
    /// snapshots are intact and the partial work is garbage for gc.
    fn ensure_room(&self, incoming: u64) -> Result<()> {
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

    fn require_write(&self) -> Result<()> {
        match self.mode {
            Mode::Write { .. } => Ok(()),
            Mode::ReadOnly => Err(StoreError::ReadOnly),
        }
    }

    /// For each chunk id: is it in the store already? A chunk marked
    /// damaged counts as unknown, so the caller supplies its frame again.
    pub fn chunks_known(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let refs = self.cf(cf::REFS);
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
        if self.packs.is_some() {
            // Counted is not enough: the frame must be in the bucket (or on
            // its way there from this process).
            let counted = self.get_refs(&keys)?;
            let held = self.held(&keys)?;
            return Ok(keys
                .iter()
                .zip(counted.into_iter().zip(held))
                .map(|(k, (c, h))| c.is_some() && h && !self.is_pending_damage(k))
                .collect());
        }
        self.db
            .batched_multi_get_cf(&refs, keys.iter(), false)
            .into_iter()
            .zip(&keys)
            .map(|(r, k)| {
                r.map(|v| v.is_some() && !self.is_pending_damage(k))
                    .map_err(|e| self.db_err("read", e))
            })
            .collect()
    }

    /// Stored frames of several chunks, in order, each with its own
    /// outcome (one batched lookup, keys sorted so RocksDB reads blob files
    /// in order).
    pub fn chunk_frames(&self, ids: &[Id]) -> Result<Vec<imgstore_repo::ChunkRead>> {
        if self.packs.is_some() {
            return self.read_through_views(ids, |db, ids| self.bucket_frames_in(db, ids));
        }
        self.read_through_views(ids, |db, ids| Ok(self.local_frames_in(db, ids)))
    }

    /// Frames of `ids` from view `db` of the database (one batched lookup,
    /// keys sorted so RocksDB reads blob files in order), and the positions
    /// of those whose blob file was deleted after the view was opened.
    fn local_frames_in(&self, db: &DB, ids: &[Id]) -> (Vec<imgstore_repo::ChunkRead>, Vec<usize>) {
        use imgstore_repo::ChunkFault;
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
        let mut out: Vec<imgstore_repo::ChunkRead> = vec![Err(ChunkFault::Missing); ids.len()];
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
                        crate::error::db(&self.dir, "read chunk", e).to_string(),
                    ))
                }
            };
        }
        (out, vanished)
    }

    /// Reads `ids` with `read` through the view this store opened (what it
    /// lists is what it reads), then the chunks whose blob file or pack
    /// `read` found deleted through newer views (see [`Store::newer`]). A
    /// chunk a newer view lacks was there at the open: only gc deletes
    /// chunks, so its snapshot was forgotten meanwhile.
    fn read_through_views(
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
    fn newer_view(&self, seen: Option<&std::sync::Arc<DB>>) -> Option<std::sync::Arc<DB>> {
        if !matches!(self.mode, Mode::ReadOnly) {
            return None;
        }
        let mut newer = self.newer.lock().unwrap_or_else(|p| p.into_inner());
        let current = newer.as_ref();
        let moved_on = match (current, seen) {
            (Some(c), Some(s)) => !std::sync::Arc::ptr_eq(c, s),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !moved_on {
            let bucket = self.packs.is_some();
            let db = open_read_only(&self.dir.join(DB_DIR), || {
                read_only_options(&self.cache, bucket)
            })
            .ok()?;
            *newer = Some(std::sync::Arc::new(db));
        }
        newer.clone()
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

    /// Adds `n` references to each existing object in `counts`, in `batch`;
    /// returns the keys that were absent.
    fn add_refs(
        &self,
        batch: &mut WriteBatch,
        counts: &HashMap<[u8; 33], u64>,
    ) -> Result<Vec<[u8; 33]>> {
        let keys: Vec<[u8; 33]> = counts.keys().copied().collect();
        let cur = self.get_refs(&keys)?;
        let (refs, orphans) = (self.cf(cf::REFS), self.cf(cf::ORPHANS));
        let mut absent = Vec::new();
        for (k, c) in keys.into_iter().zip(cur) {
            match c {
                Some(mut rc) => {
                    if rc.count == 0 {
                        batch.delete_cf(&orphans, k);
                    }
                    rc.count += counts[&k];
                    batch.put_cf(&refs, k, rc.encode());
                }
                None => absent.push(k),
            }
        }
        Ok(absent)
    }

    /// Stores a region recipe (if new) with the chunks it references.
    ///
    /// `frames` holds the encoded frames of chunks the caller found absent;
    /// chunks that became present meanwhile are not written again. Written
    /// without the WAL: it becomes durable at the flush before the next
    /// [`Store::commit`]. Until a page references it the region is an orphan.
    pub fn put_region(
        &self,
        id: &Id,
        encoded: &[u8],
        frames: &HashMap<Id, (Vec<u8>, u32)>,
    ) -> Result<PutOutcome> {
        self.put_region_in(None, id, encoded, frames)
    }

    /// [`Store::put_region`] for a server session: the region is pinned
    /// until the session ends and, with a namespace, marked for it with its
    /// chunks.
    pub fn put_region_in(
        &self,
        scope: Option<&Scope>,
        id: &Id,
        encoded: &[u8],
        frames: &HashMap<Id, (Vec<u8>, u32)>,
    ) -> Result<PutOutcome> {
        self.require_write()?;
        if Id::hash(encoded) != *id {
            return Err(StoreError::Invalid(
                "region id does not match its content".into(),
            ));
        }
        let chunks =
            record_children(RecordKind::Region, encoded).map_err(|source| StoreError::Corrupt {
                kind: ObjectKind::Region,
                id: *id,
                source,
            })?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let rkey = ObjectKind::Region.key(id);
        let mut counts: HashMap<[u8; 33], u64> = HashMap::new();
        for c in chunks {
            *counts.entry(ObjectKind::Chunk.key(&c)).or_default() += 1;
        }
        if self.get_refs(&[rkey])?[0].is_some() {
            let (out, sealed) = self.heal_region(&rkey, id, encoded, frames, scope, &counts)?;
            if let Some(s) = scope {
                let chunks: Vec<[u8; 33]> = counts.keys().copied().collect();
                self.after_session_region(s, rkey, &chunks);
            }
            drop(_guard);
            self.ship_all(sealed)?;
            return Ok(out);
        }
        let bucket = self.packs.is_some();
        let mut items: Vec<packs::Item<'_>> = Vec::new();
        // Sized once for everything it may hold (new chunks' frames, their
        // keys and counts, the recipe): a batch grown by doubling copied
        // each multi-MiB frame buffer again and faulted fresh pages in, under
        // the write lock.
        let capacity = frames.values().map(|(f, _)| f.len() + 96).sum::<usize>()
            + counts.len() * 96
            + encoded.len()
            + 256;
        let mut batch = WriteBatch::with_capacity_bytes(capacity);
        let absent = self.add_refs(&mut batch, &counts)?;
        let (chunks, refs, recipes, orphans) = (
            self.cf(cf::CHUNKS),
            self.cf(cf::REFS),
            self.cf(cf::RECIPES),
            self.cf(cf::ORPHANS),
        );
        let mut out = PutOutcome {
            region_new: true,
            ..Default::default()
        };
        for k in absent {
            let cid = Id::from_slice(&k[1..]).expect("32 bytes");
            let (frame, raw_len) = frames.get(&cid).ok_or(StoreError::Missing {
                kind: ObjectKind::Chunk,
                id: cid,
            })?;
            if bucket {
                items.push((ObjectKind::Chunk, cid, frame, *raw_len));
            } else {
                batch.put_cf(&chunks, cid.as_bytes(), frame);
            }
            let rc = RefCount {
                count: counts[&k],
                logical_len: *raw_len,
                stored_len: frame.len() as u32,
            };
            batch.put_cf(&refs, k, rc.encode());
            out.new_chunks += 1;
            out.new_bytes += frame.len() as u64;
        }
        if bucket {
            // Counted chunks whose frames never reached the bucket (lost with
            // a process that died before its upload), and damaged ones.
            let present: Vec<[u8; 33]> = counts
                .keys()
                .filter(|k| !items.iter().any(|i| i.0.key(&i.1) == **k))
                .copied()
                .collect();
            items.extend(self.bucket_resend(&mut batch, &present, frames, scope)?);
            items.push((ObjectKind::Region, *id, encoded, encoded.len() as u32));
        } else {
            for (cid, (frame, _)) in frames {
                let k = ObjectKind::Chunk.key(cid);
                if counts.contains_key(&k)
                    && self.is_pending_damage(&k)
                    && self.may_heal_chunk(scope, cid)
                {
                    batch.put_cf(&chunks, cid.as_bytes(), frame);
                    self.healed(k);
                }
            }
        }
        batch.put_cf(&recipes, rkey, encoded);
        let rc = RefCount {
            count: 0,
            logical_len: encoded.len() as u32,
            stored_len: encoded.len() as u32,
        };
        batch.put_cf(&refs, rkey, rc.encode());
        batch.put_cf(&orphans, rkey, []);
        out.new_bytes += encoded.len() as u64;
        if let Some(ns) = scope.and_then(|s| s.namespace.as_deref()) {
            self.mark_ns(&mut batch, ns, counts.keys().chain([&rkey]))?;
        }
        self.ensure_room(capacity as u64)?;
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.db_err("write region", e))?;
        if let Some(s) = scope {
            let chunks: Vec<[u8; 33]> = counts.keys().copied().collect();
            self.after_session_region(s, rkey, &chunks);
        }
        let sealed = self.pack_append(&items);
        drop(_guard);
        self.ship_all(sealed)?;
        Ok(out)
    }

    /// Whether a writer's frame may replace damaged chunk `id`. A server has
    /// checked every frame of a plain repository against its id, but cannot
    /// open an encrypted one's: there only a trusted writer (a local one,
    /// or an admin's session) may replace stored bytes — otherwise a damage
    /// mark would let any key holder swap another namespace's chunk for
    /// bytes of its choosing.
    /// A namespace's own chunks (ids with its tag, which no other
    /// namespace can write) it may heal.
    fn may_heal_chunk(&self, scope: Option<&Scope>, id: &Id) -> bool {
        self.config.encryption.is_none()
            || scope.is_none_or(|s| {
                s.global
                    || s.namespace
                        .as_deref()
                        .is_some_and(|ns| imgstore_format::sealed::has_namespace_tag(id, ns))
            })
    }

    /// Bucket mode: of counted chunks `keys`, those that must be sent to
    /// the bucket again — not held (never landed) or marked damaged — with
    /// their frames from `frames`. A damaged one loses its old location in
    /// `batch`, so the new copy's lands.
    fn bucket_resend<'a>(
        &self,
        batch: &mut WriteBatch,
        keys: &[[u8; 33]],
        frames: &'a HashMap<Id, (Vec<u8>, u32)>,
        scope: Option<&Scope>,
    ) -> Result<Vec<packs::Item<'a>>> {
        let held = self.held(keys)?;
        let mut items = Vec::new();
        let mut relocate = Vec::new();
        for (k, h) in keys.iter().zip(held) {
            let cid = Id::from_slice(&k[1..]).expect("32 bytes");
            let damaged = self.may_heal_chunk(scope, &cid) && self.is_pending_damage(k);
            if h && !damaged {
                continue;
            }
            let Some((frame, raw)) = frames.get(&cid) else {
                if !h {
                    return Err(StoreError::Missing {
                        kind: ObjectKind::Chunk,
                        id: cid,
                    });
                }
                continue;
            };
            if damaged {
                relocate.push(*k);
                batch.delete_cf(self.cf(cf::CHUNKS), cid.as_bytes());
                self.healed(*k);
            }
            items.push((ObjectKind::Chunk, cid, frame.as_slice(), *raw));
        }
        self.unlocate(batch, &relocate)?;
        Ok(items)
    }

    /// A region already stored: rewrites the damaged objects among it and
    /// its chunks (those with pending damage marks), changing no count.
    fn heal_region(
        &self,
        rkey: &[u8; 33],
        id: &Id,
        encoded: &[u8],
        frames: &HashMap<Id, (Vec<u8>, u32)>,
        scope: Option<&Scope>,
        counts: &HashMap<[u8; 33], u64>,
    ) -> Result<(PutOutcome, Vec<packs::Sealed>)> {
        let mut batch = WriteBatch::default();
        let mut items = Vec::new();
        if self.packs.is_some() {
            let keys: Vec<[u8; 33]> = counts.keys().copied().collect();
            items = self.bucket_resend(&mut batch, &keys, frames, scope)?;
            if !self.held(&[*rkey])?[0] {
                items.push((ObjectKind::Region, *id, encoded, encoded.len() as u32));
            }
        }
        if let Some(ns) = scope.and_then(|s| s.namespace.as_deref()) {
            // The same region written under another namespace: this one
            // sent (or was told it had) every chunk, so it may see them.
            self.mark_ns(&mut batch, ns, counts.keys().chain([rkey]))?;
        }
        if self.is_pending_damage(rkey) {
            batch.put_cf(self.cf(cf::RECIPES), rkey, encoded);
            self.healed(*rkey);
        }
        for (cid, (frame, _)) in frames {
            let k = ObjectKind::Chunk.key(cid);
            if self.packs.is_none() && self.is_pending_damage(&k) && self.may_heal_chunk(scope, cid)
            {
                batch.put_cf(self.cf(cf::CHUNKS), cid.as_bytes(), frame);
                self.healed(k);
            }
        }
        if !batch.is_empty() {
            let mut wo = WriteOptions::default();
            wo.disable_wal(true);
            self.db
                .write_opt(batch, &wo)
                .map_err(|e| self.db_err("rewrite damaged objects", e))?;
        }
        Ok((PutOutcome::default(), self.pack_append(&items)))
    }

    /// Makes a snapshot visible: flushes everything written so far, then
    /// writes its new index pages, the reference counts and the snapshot
    /// record in one synced batch. Returns the snapshot id and the bytes the
    /// pages added.
    pub fn commit(
        &self,
        snapshot: &[u8],
        pages: &[Vec<u8>],
        parent: Option<&Id>,
    ) -> Result<(Id, u64)> {
        self.commit_in(None, snapshot, pages, parent, None)
    }

    /// [`Store::commit`] for a server session: with a namespace, the pages
    /// and the regions they name are marked for it; with a witness, it is
    /// recorded beside the snapshot (see [`Attestation`]).
    pub fn commit_in(
        &self,
        scope: Option<&Scope>,
        snapshot: &[u8],
        pages: &[Vec<u8>],
        parent: Option<&Id>,
        attest: Option<&Attestation>,
    ) -> Result<(Id, u64)> {
        self.require_write()?;
        let id = Id::hash(snapshot);
        let named = record_children(RecordKind::Snapshot, snapshot)
            .map_err(|source| StoreError::CorruptSnapshot { id, source })?;
        let by_key: HashMap<[u8; 33], &Vec<u8>> = pages
            .iter()
            .map(|p| (ObjectKind::Page.key(&Id::hash(p)), p))
            .collect();
        // A bucket-backed repository: everything the snapshot names reaches
        // the bucket, and its snapshot object is written, before it becomes
        // visible here.
        let page_locs = match self.packs {
            Some(_) => self.bucket_commit(snapshot, pages, parent)?,
            None => Vec::new(),
        };
        let out = self.commit_local(scope, snapshot, parent, attest, &named, &by_key, &page_locs);
        self.committed(&id);
        out
    }

    /// The local batch of [`Store::commit_in`] (one synced batch: the
    /// witness is written with the snapshot or not at all).
    #[allow(clippy::too_many_arguments)]
    fn commit_local(
        &self,
        scope: Option<&Scope>,
        snapshot: &[u8],
        parent: Option<&Id>,
        attest: Option<&Attestation>,
        named: &[Id],
        by_key: &HashMap<[u8; 33], &Vec<u8>>,
        page_locs: &[([u8; 33], imgstore_format::pack::Location)],
    ) -> Result<(Id, u64)> {
        let id = Id::hash(snapshot);
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        // Committing the same record twice (a client retrying a commit
        // whose answer it lost) changes nothing: counting its pages again
        // would break "count = number of stored parents".
        if self
            .db
            .get_pinned_cf(self.cf(cf::SNAPSHOTS), id.as_bytes())
            .map_err(|e| self.db_err("read snapshot", e))?
            .is_some()
        {
            return Ok((id, 0));
        }
        // Step 2 of the protocol: make every earlier WAL-less write durable.
        let names = cf::ALL;
        let handles: Vec<_> = names.iter().map(|n| self.cf(n)).collect();
        let refs: Vec<_> = handles.iter().collect();
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db
            .flush_cfs_opt(&refs, &fo)
            .map_err(|e| self.db_err("flush", e))?;

        let mut batch = WriteBatch::default();
        let mut page_counts: HashMap<[u8; 33], u64> = HashMap::new();
        for pid in named {
            *page_counts.entry(ObjectKind::Page.key(pid)).or_default() += 1;
        }
        let absent = self.add_refs(&mut batch, &page_counts)?;
        let (recipes, refs_cf) = (self.cf(cf::RECIPES), self.cf(cf::REFS));
        let mut region_counts: HashMap<[u8; 33], u64> = HashMap::new();
        let mut added = 0u64;
        if self.packs.is_some() {
            self.commit_page_locations(&mut batch, &absent.iter().copied().collect(), page_locs)?;
        }
        for k in absent {
            let (_, pid) = ObjectKind::parse_key(&k).expect("33-byte key");
            let encoded = by_key.get(&k).ok_or(StoreError::Missing {
                kind: ObjectKind::Page,
                id: pid,
            })?;
            let regions = record_children(RecordKind::Page, encoded).map_err(|source| {
                StoreError::Corrupt {
                    kind: ObjectKind::Page,
                    id: pid,
                    source,
                }
            })?;
            for r in regions {
                *region_counts.entry(ObjectKind::Region.key(&r)).or_default() += 1;
            }
            batch.put_cf(&recipes, k, encoded);
            let rc = RefCount {
                count: page_counts[&k],
                logical_len: encoded.len() as u32,
                stored_len: encoded.len() as u32,
            };
            batch.put_cf(&refs_cf, k, rc.encode());
            added += encoded.len() as u64;
        }
        for (k, page) in by_key {
            if page_counts.contains_key(k) && self.is_pending_damage(k) {
                batch.put_cf(&recipes, k, page);
                self.healed(*k);
            }
        }
        {
            // Rewritten objects reached disk with the flush above (chunks,
            // regions) or do so with this batch (pages): their marks go.
            let mut h = self.heal.lock().unwrap_or_else(|p| p.into_inner());
            for k in h.healed.drain(..) {
                batch.delete_cf(self.cf(cf::META), integrity::damaged_key(&k));
            }
        }
        let missing = self.add_refs(&mut batch, &region_counts)?;
        if let Some(k) = missing.first() {
            let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
            return Err(StoreError::Missing { kind, id });
        }
        if let Some(ns) = scope.and_then(|s| s.namespace.as_deref()) {
            let mut keys: Vec<[u8; 33]> = page_counts.keys().copied().collect();
            keys.push(sessions::snapshot_ns_key(&id));
            for page in by_key.values() {
                if let Ok(regions) = record_children(RecordKind::Page, page) {
                    keys.extend(regions.iter().map(|r| ObjectKind::Region.key(r)));
                }
            }
            self.mark_ns(&mut batch, ns, keys.iter())?;
        }
        batch.put_cf(&self.cf(cf::SNAPSHOTS), id.as_bytes(), snapshot);
        if let Some(a) = attest {
            batch.put_cf(
                self.cf(cf::META),
                imgstore_format::meta::attest_key(&id),
                imgstore_format::meta::encode_attestation(&a.image, a.committed_ns),
            );
        }
        if let Some(p) = parent {
            batch.put_cf(
                self.cf(cf::META),
                imgstore_format::meta::parent_key(&id),
                p.as_bytes(),
            );
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.db_err("commit snapshot", e))?;
        Ok((id, added))
    }

    /// Totals over the `refs` and `orphans` column families (a full scan of
    /// small keys, not of chunk data).
    pub fn totals(&self) -> Result<Totals> {
        let mut t = Totals::default();
        let refs = self.cf(cf::REFS);
        for item in self.db.iterator_cf(&refs, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.db_err("scan refs", e))?;
            let (kind, id) = ObjectKind::parse_key(&k).map_err(|source| StoreError::Corrupt {
                kind: ObjectKind::Chunk,
                id: Id::ZERO,
                source,
            })?;
            let rc =
                RefCount::decode(&v).map_err(|source| StoreError::Corrupt { kind, id, source })?;
            t.objects.add(kind, &rc);
        }
        let orphans = self.cf(cf::ORPHANS);
        t.orphans = self
            .db
            .iterator_cf(&orphans, rocksdb::IteratorMode::Start)
            .count() as u64;
        Ok(t)
    }

    /// Reference count of one object (None when absent). For tests and `check`.
    pub fn ref_count(&self, kind: ObjectKind, id: &Id) -> Result<Option<RefCount>> {
        Ok(self.get_refs(&[kind.key(id)])?[0])
    }
}

/// Re-exported so callers can name object kinds without depending on the format crate directly.
pub use imgstore_format::ObjectKind as Kind;

/// Bytes a directory tree occupies on disk (what `du` reports): allocated
/// blocks, so a sparse or preallocated file counts what it really holds.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}
