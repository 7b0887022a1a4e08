//! The chunk store: the only crate that links RocksDB.
//!
//! A repository is a directory holding `imgstore.json` (the config, readable
//! without RocksDB), a `lock` file, and `db/`, a RocksDB database whose column
//! families and encodings are defined in `imgstore-format` and documented in
//! `docs/FORMAT.md`.
//!
//! # Index and frames
//!
//! [`Store`] is the index — what exists, reference counts, recipes,
//! snapshots, the lock, sessions, healing — and holds one frame store
//! (`frames.rs`) for the chunk frames: RocksDB blob files in `db/`, or
//! packs in an S3-compatible bucket (`packs/`). Everything below is true
//! of both; where they differ (what "written" and "durable" mean for a
//! frame), the frame store's methods say.
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
mod frames;
mod gc;
mod index;
mod integrity;
mod lock;
mod packs;
mod repository;
mod sessions;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{
    cf, FormatError, Id, ObjectKind, RefCount, RepoConfig, CONFIG_FILE, DB_DIR, META_FORMAT_KEY,
};
use rocksdb::{Cache, WriteBatch, WriteOptions, DB};

use frames::{FrameStore, Item};
use index::{Index, Refs};

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

/// An open repository: the index, and the frame store its chunk frames
/// live in (see `frames.rs`).
pub struct Store {
    /// Shared with the threads a bucket's packs are uploaded on.
    ix: std::sync::Arc<Index>,
    frames: std::sync::Arc<dyn FrameStore>,
    config: RepoConfig,
    /// Damage marks this writer repairs when it produces the same objects.
    heal: Mutex<integrity::Healing>,
    /// Whether `heal` holds any pending mark (checked without the lock).
    heal_pending: std::sync::atomic::AtomicBool,
    /// Objects live server sessions rely on: gc leaves them.
    pins: Mutex<sessions::Pins>,
    /// How the engine seals what it stores here (the store itself only
    /// moves bytes; see `imgstore_repo::Codec`).
    codec: imgstore_repo::Codec,
    /// Released last, after the database is closed.
    _lock: Option<Lock>,
}

/// Packs still on their way to a bucket go before the index closes (and
/// the lock is released): an upload that lands after a write returned is
/// not lost with the process that is ending normally.
impl Drop for Store {
    fn drop(&mut self) {
        self.frames.close();
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl Store {
    /// Creates a new repository at `dir` (which must not exist, or be an
    /// empty directory) with the given config. The directory is created
    /// mode 0700 and the config file 0600.
    pub fn init(dir: &Path, config: RepoConfig) -> Result<Store> {
        let fresh = !dir.exists();
        let store = Store::create_local(dir, config.clone(), "init")?;
        if let Err(e) = store.frames.created(&store.ix, &config) {
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
            let (opts, cfs) = index::db_options(true, &cache, frames::blob_files(&config));
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
        // Reopened as the writer. A child another thread of this process
        // forks in this instant shares the lock's descriptor until it
        // execs (close-on-exec acts only then), so the lock can look held
        // for a moment after the drop: wait that out (seen as "busy: init"
        // in the parallel test suite).
        Store::open_waiting(
            dir,
            Mode::Write { operation },
            std::time::Duration::from_secs(2),
        )
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
        let db_path = dir.join(DB_DIR);
        let frames = frames::for_config(dir, &config)?;
        let ix = std::sync::Arc::new(Index::open(dir, mode, frames.blob_files())?);
        let store = Store {
            ix,
            frames,
            config,
            heal: Mutex::new(integrity::Healing::default()),
            heal_pending: std::sync::atomic::AtomicBool::new(false),
            pins: Mutex::new(sessions::Pins::default()),
            codec: imgstore_repo::Codec::Plain,
            _lock: lock,
        };
        let v = store
            .ix
            .db
            .get_pinned_cf(store.ix.cf(cf::META), META_FORMAT_KEY)
            .map_err(|e| store.ix.db_err("read", e))?
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
            store.frames.writer_opened(&store.ix, operation)?;
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
        &self.ix.dir
    }

    /// For each chunk id: is it in the store already? Counted, and held
    /// by the frame store; a chunk marked damaged counts as unknown, so
    /// the caller supplies its frame again.
    pub fn chunks_known(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
        let counted = self.ix.get_refs(&keys)?;
        let held = self.frames.held(&self.ix, &keys)?;
        Ok(keys
            .iter()
            .zip(counted.into_iter().zip(held))
            .map(|(k, (c, h))| c.is_some() && h && !self.is_pending_damage(k))
            .collect())
    }

    /// Stored frames of several chunks, in order, each with its own
    /// outcome: through the view this store opened, then, for frames whose
    /// file or pack a writer deleted since, through newer views.
    pub fn chunk_frames(&self, ids: &[Id]) -> Result<Vec<imgstore_repo::ChunkRead>> {
        self.ix
            .read_through_views(ids, |db, ids| self.frames.read(&self.ix, db, ids))
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
        self.ix.require_write()?;
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
        let guard = self.ix.lock();
        let rkey = ObjectKind::Region.key(id);
        let mut counts: HashMap<[u8; 33], u64> = HashMap::new();
        for c in chunks {
            *counts.entry(ObjectKind::Chunk.key(&c)).or_default() += 1;
        }
        if self.ix.get_refs(&[rkey])?[0].is_some() {
            let (out, items) = self.heal_region(&rkey, id, encoded, frames, scope, &counts)?;
            if let Some(s) = scope {
                let chunks: Vec<[u8; 33]> = counts.keys().copied().collect();
                self.after_session_region(s, rkey, &chunks);
            }
            self.frames.written(&self.ix, guard, items)?;
            return Ok(out);
        }
        // Objects the frame store writes after the batch (outside it).
        let mut items: Vec<Item<'_>> = Vec::new();
        // Sized once for everything it may hold (new chunks' frames, their
        // keys and counts, the recipe): a batch grown by doubling copied
        // each multi-MiB frame buffer again and faulted fresh pages in, under
        // the write lock.
        let capacity = frames.values().map(|(f, _)| f.len() + 96).sum::<usize>()
            + counts.len() * 96
            + encoded.len()
            + 256;
        let mut batch = WriteBatch::with_capacity_bytes(capacity);
        let absent = self.ix.change_refs(&mut batch, &counts, Refs::Add)?;
        let (refs, recipes, orphans) = (
            self.ix.cf(cf::REFS),
            self.ix.cf(cf::RECIPES),
            self.ix.cf(cf::ORPHANS),
        );
        let mut out = PutOutcome {
            region_new: true,
            ..Default::default()
        };
        let new: std::collections::HashSet<[u8; 33]> = absent.iter().copied().collect();
        for k in absent {
            let cid = Id::from_slice(&k[1..]).expect("32 bytes");
            let (frame, raw_len) = frames.get(&cid).ok_or(StoreError::Missing {
                kind: ObjectKind::Chunk,
                id: cid,
            })?;
            self.frames.put_chunk(
                &self.ix,
                &mut batch,
                &mut items,
                (ObjectKind::Chunk, cid, frame, *raw_len),
            );
            let rc = RefCount {
                count: counts[&k],
                logical_len: *raw_len,
                stored_len: frame.len() as u32,
            };
            batch.put_cf(&refs, k, rc.encode());
            // A mark of an object no longer counted is answered by the
            // frame just written.
            if self.is_pending_damage(&k) {
                self.healed(k);
            }
            out.new_chunks += 1;
            out.new_bytes += frame.len() as u64;
        }
        // Counted chunks whose bytes the frame store lost (a bucket upload
        // that died with its process) or that are damaged.
        let present: Vec<[u8; 33]> = counts
            .keys()
            .filter(|k| !new.contains(*k))
            .copied()
            .collect();
        self.resend(&mut batch, &mut items, &present, frames, scope)?;
        self.frames.put_record_copy(
            &mut items,
            (ObjectKind::Region, *id, encoded, encoded.len() as u32),
        );
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
        self.ix.ensure_room(capacity as u64)?;
        self.ix.write_unlogged(batch, "write region")?;
        if let Some(s) = scope {
            let chunks: Vec<[u8; 33]> = counts.keys().copied().collect();
            self.after_session_region(s, rkey, &chunks);
        }
        self.frames.written(&self.ix, guard, items)?;
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

    /// Of counted chunks `keys`, stores again those whose bytes the frame
    /// store does not hold, and replaces the damaged ones this writer may
    /// heal, with their frames from `frames`. A chunk not held and not
    /// sent is an error (the caller was told it was there).
    fn resend<'a>(
        &self,
        batch: &mut WriteBatch,
        items: &mut Vec<Item<'a>>,
        keys: &[[u8; 33]],
        frames: &'a HashMap<Id, (Vec<u8>, u32)>,
        scope: Option<&Scope>,
    ) -> Result<()> {
        let held = self.frames.held(&self.ix, keys)?;
        let mut damaged = Vec::new();
        for (k, h) in keys.iter().zip(held) {
            let cid = Id::from_slice(&k[1..]).expect("32 bytes");
            let heal = self.is_pending_damage(k) && self.may_heal_chunk(scope, &cid);
            if h && !heal {
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
            let item = (ObjectKind::Chunk, cid, frame.as_slice(), *raw);
            if heal {
                damaged.push(item);
                self.healed(*k);
            } else {
                items.push(item);
            }
        }
        self.frames.replace_chunks(&self.ix, batch, items, damaged)
    }

    /// A region already stored: rewrites the damaged objects among it and
    /// its chunks (those with pending damage marks), and what the frame
    /// store lost, changing no count. Returns what the frame store writes
    /// after the batch.
    fn heal_region<'a>(
        &self,
        rkey: &[u8; 33],
        id: &Id,
        encoded: &'a [u8],
        frames: &'a HashMap<Id, (Vec<u8>, u32)>,
        scope: Option<&Scope>,
        counts: &HashMap<[u8; 33], u64>,
    ) -> Result<(PutOutcome, Vec<Item<'a>>)> {
        let mut batch = WriteBatch::default();
        let mut items = Vec::new();
        let keys: Vec<[u8; 33]> = counts.keys().copied().collect();
        self.resend(&mut batch, &mut items, &keys, frames, scope)?;
        if !self.frames.held(&self.ix, &[*rkey])?[0] {
            self.frames.put_record_copy(
                &mut items,
                (ObjectKind::Region, *id, encoded, encoded.len() as u32),
            );
        }
        if let Some(ns) = scope.and_then(|s| s.namespace.as_deref()) {
            // The same region written under another namespace: this one
            // sent (or was told it had) every chunk, so it may see them.
            self.mark_ns(&mut batch, ns, counts.keys().chain([rkey]))?;
        }
        if self.is_pending_damage(rkey) {
            batch.put_cf(self.ix.cf(cf::RECIPES), rkey, encoded);
            self.healed(*rkey);
        }
        if !batch.is_empty() {
            self.ix.write_unlogged(batch, "rewrite damaged objects")?;
        }
        Ok((PutOutcome::default(), items))
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
        self.ix.require_write()?;
        let id = Id::hash(snapshot);
        let named = record_children(RecordKind::Snapshot, snapshot)
            .map_err(|source| StoreError::CorruptSnapshot { id, source })?;
        let by_key: HashMap<[u8; 33], &Vec<u8>> = pages
            .iter()
            .map(|p| (ObjectKind::Page.key(&Id::hash(p)), p))
            .collect();
        // Everything the snapshot names is stored (in a bucket: uploaded,
        // with the snapshot's object) before it becomes visible here.
        let page_locs = self
            .frames
            .prepare_commit(&self.ix, snapshot, pages, parent)?;
        let out = self.commit_local(scope, snapshot, parent, attest, &named, &by_key, &page_locs);
        self.frames.committed(&id);
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
        page_locs: &frames::PageLocations,
    ) -> Result<(Id, u64)> {
        let id = Id::hash(snapshot);
        let _guard = self.ix.lock();
        // Committing the same record twice (a client retrying a commit
        // whose answer it lost) changes nothing: counting its pages again
        // would break "count = number of stored parents".
        if self
            .ix
            .db
            .get_pinned_cf(self.ix.cf(cf::SNAPSHOTS), id.as_bytes())
            .map_err(|e| self.ix.db_err("read snapshot", e))?
            .is_some()
        {
            return Ok((id, 0));
        }
        // Step 2 of the protocol: make every earlier WAL-less write durable.
        self.ix.flush_all()?;

        let mut batch = WriteBatch::default();
        let mut page_counts: HashMap<[u8; 33], u64> = HashMap::new();
        for pid in named {
            *page_counts.entry(ObjectKind::Page.key(pid)).or_default() += 1;
        }
        let absent = self.ix.change_refs(&mut batch, &page_counts, Refs::Add)?;
        let (recipes, refs_cf) = (self.ix.cf(cf::RECIPES), self.ix.cf(cf::REFS));
        let mut region_counts: HashMap<[u8; 33], u64> = HashMap::new();
        let mut added = 0u64;
        self.frames.in_commit(
            &self.ix,
            &mut batch,
            &absent.iter().copied().collect(),
            page_locs,
        )?;
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
                batch.delete_cf(self.ix.cf(cf::META), integrity::damaged_key(&k));
            }
        }
        let missing = self.ix.change_refs(&mut batch, &region_counts, Refs::Add)?;
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
        batch.put_cf(self.ix.cf(cf::SNAPSHOTS), id.as_bytes(), snapshot);
        if let Some(a) = attest {
            batch.put_cf(
                self.ix.cf(cf::META),
                imgstore_format::meta::attest_key(&id),
                imgstore_format::meta::encode_attestation(&a.image, a.committed_ns),
            );
        }
        if let Some(p) = parent {
            batch.put_cf(
                self.ix.cf(cf::META),
                imgstore_format::meta::parent_key(&id),
                p.as_bytes(),
            );
        }
        self.ix.write_synced(batch, "commit snapshot")?;
        Ok((id, added))
    }

    /// Totals over the `refs` and `orphans` column families (a full scan of
    /// small keys, not of chunk data).
    pub fn totals(&self) -> Result<Totals> {
        let mut t = Totals::default();
        let refs = self.ix.cf(cf::REFS);
        for item in self.ix.db.iterator_cf(refs, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.ix.db_err("scan refs", e))?;
            let (kind, id) = ObjectKind::parse_key(&k).map_err(|source| StoreError::Corrupt {
                kind: ObjectKind::Chunk,
                id: Id::ZERO,
                source,
            })?;
            let rc =
                RefCount::decode(&v).map_err(|source| StoreError::Corrupt { kind, id, source })?;
            t.objects.add(kind, &rc);
        }
        let orphans = self.ix.cf(cf::ORPHANS);
        t.orphans = self
            .ix
            .db
            .iterator_cf(&orphans, rocksdb::IteratorMode::Start)
            .count() as u64;
        Ok(t)
    }

    /// Bytes the repository occupies: its directory, and what its frame
    /// store keeps elsewhere (a bucket's packs).
    pub fn storage_bytes(&self) -> Result<u64> {
        Ok(disk_usage(self.dir()) + self.frames.external_bytes(&self.ix)?)
    }

    /// Bytes the repository keeps outside its directory (a bucket's
    /// packs; 0 when they cannot be listed).
    pub fn external_bytes(&self) -> u64 {
        self.frames.external_bytes(&self.ix).unwrap_or(0)
    }

    /// Closes the repository and returns the bytes it occupies, its
    /// directory measured after the database is closed (a compaction's
    /// obsolete files are deleted by then).
    pub fn close(self) -> u64 {
        let external = self.external_bytes();
        let dir = self.dir().to_path_buf();
        drop(self);
        disk_usage(&dir) + external
    }

    /// Request counts, cache and pack figures, for a bucket-backed
    /// repository.
    pub fn bucket_report(&self) -> Option<BucketReport> {
        self.frames.report(&self.ix)
    }

    /// Replaces the config (after `key add|remove|passwd`): the file
    /// atomically (a temporary file, fsync, rename), then the frame
    /// store's copy (a bucket keeps one, so a rebuild from the bucket
    /// alone can open the repository). Only a writer may.
    pub fn save_config(&mut self, config: RepoConfig) -> Result<()> {
        self.ix.require_write()?;
        let dir = self.dir().to_path_buf();
        let path = dir.join(CONFIG_FILE);
        let tmp = dir.join(format!("{CONFIG_FILE}.tmp"));
        let bytes = config.to_json();
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, &path).map_err(io_err(&path, "rename"))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir, "fsync"))?;
        self.config = config;
        self.frames.config_saved(&bytes)
    }

    /// Reference count of one object (None when absent). For tests and `check`.
    pub fn ref_count(&self, kind: ObjectKind, id: &Id) -> Result<Option<RefCount>> {
        Ok(self.ix.get_refs(&[kind.key(id)])?[0])
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
