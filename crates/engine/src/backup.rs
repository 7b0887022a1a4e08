//! The backup pipeline.
//!
//! ```text
//!  files, devices, block readers: one thread per core, each taking the
//!  next region index
//!  streams: one reader thread feeding rayon workers through a channel
//!
//!  region i: SEEK_DATA, read into a    →  region chaining value (image digest)
//!  reused aligned buffer (the next       equal to the parent's? reuse its region
//!  128 MiB advised to the kernel)       else zero scan + FastCDC → BLAKE3 ids →
//!                                        look up (bloom + multi_get) → zstd only
//!                                        unknown chunks → put_region (WAL-less)
//!                                   ... then commit: flush, pages + snapshot, fsync
//! ```
//!
//! Memory is bounded by the region buffers in flight (one per thread, plus
//! the channel's for streams), whatever the image size; per-region results
//! kept until the commit are 32-byte ids and chaining values.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use imgstore_chunker::{Chunker, Extent, Kind, Params};
use imgstore_format::sealed::RecordKind;
use imgstore_format::{
    FrameCodec, Id, ObjectKind, Page, RecipeEntry, Region, Snapshot, SnapshotBitmap, SnapshotStats,
    PAGE_REGIONS,
};
use imgstore_repo::{RepoError, Repository};
use rayon::prelude::*;

use crate::aligned::AlignedBuf;
use crate::claims::Claims;
use crate::digest::{image_digest, region_hasher, update_zeros, RegionHash};
use crate::read::{self, io_pool, threads, workers};
use crate::snapshot::SnapshotReader;
use crate::source::{RegionBuf, Source, SourceKind};
use crate::{EngineError, Progress};

/// What a backup records besides the image.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub name: String,
    pub tags: Vec<String>,
    pub hostname: String,
    /// A snapshot of the same disk taken earlier: a region whose BLAKE3
    /// chaining value equals the parent's at the same offset is taken from
    /// it without being chunked, hashed per chunk or looked up.
    pub parent: Option<(Id, Snapshot)>,
    /// Keep a 0-byte image as a snapshot (refused otherwise: an empty
    /// stream is usually a failed pipeline, not an empty disk).
    pub allow_empty: bool,
    /// The changed-block bitmap the backup is taken with, recorded in the
    /// snapshot (see [`crate::parent_bitmap`]).
    pub bitmap: Option<SnapshotBitmap>,
    /// Regions of the same source hashed while the repository was being
    /// reached ([`crate::PreHash`]); stopped and used by [`backup`].
    pub prehash: Option<std::sync::Arc<crate::PreHash>>,
}

/// The result of a backup.
#[derive(Clone, Debug)]
pub struct BackupReport {
    pub id: Id,
    pub snapshot: Snapshot,
    /// Bytes read from the source (holes are not read).
    pub bytes_read: u64,
    /// Bytes of the image in regions taken unchanged from the parent.
    pub bytes_reused: u64,
    /// Bytes of all-zero regions whose chaining value came from the
    /// repository's cache instead of being hashed.
    pub zero_bytes_cached: u64,
}

/// How many times a commit is prepared (regions the repository lost sent
/// again, then the commit tried) before a loss is reported as such.
const COMMIT_ROUNDS: u32 = 6;

/// The current time in nanoseconds since the epoch (a snapshot's time).
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The chunker a repository's config prescribes.
pub fn chunker_for(repo: &dyn Repository) -> Result<Chunker, EngineError> {
    let c = &repo.config().chunking;
    Chunker::with_seed(
        Params {
            min: c.min,
            avg: c.avg,
            max: c.max,
            zero_min: c.zero_min,
        },
        repo.codec().chunker_seed(),
    )
    .map_err(|e| EngineError::Invalid {
        what: "repository chunking parameters",
        why: e.to_string(),
    })
}

fn compress(data: &[u8], level: i32) -> Vec<u8> {
    FrameCodec::with_thread(|c| c.encode(data, level))
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    zero_bytes: AtomicU64,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
    image_bytes: AtomicU64,
    reused_bytes: AtomicU64,
    zero_cached_bytes: AtomicU64,
}

impl Counters {
    /// The snapshot statistics these counters add up to (duration set at commit).
    fn stats(&self) -> SnapshotStats {
        SnapshotStats {
            chunks: self.chunks.load(Relaxed),
            zero_bytes: self.zero_bytes.load(Relaxed),
            new_chunks: self.new_chunks.load(Relaxed),
            new_bytes: self.new_bytes.load(Relaxed),
            duration_ns: 0,
        }
    }
}

/// What a backup asks the repository for before it can take a region from
/// the parent. A backup over a link loads it while its workers read and
/// hash their first regions.
#[derive(Default)]
struct Known<'a> {
    /// The parent's region index, when regions may be reused from it.
    parent: Option<SnapshotReader<'a>>,
    /// Which of the parent's regions were taken unchanged, by index.
    reused: Vec<AtomicBool>,
    /// Whether any was (see [`Tally`]).
    any_reused: AtomicBool,
    /// Which of the parent's regions not taken were handed to the
    /// [`Tally`], by index (each is, once).
    handed: Vec<AtomicBool>,
}

/// The parent's regions a backup does not take, counted while it runs.
///
/// A snapshot's record carries its totals of data chunks and zero bytes;
/// for the regions taken from the parent they are the parent's totals less
/// those of the parent's regions not taken ([`reused_share`]), which needs
/// those regions' recipes. Over a link, asking for them all once every
/// region is read cost the commit one round trip more than the last
/// upload's (the record must be final before it is sent). So each region
/// found changed is handed to a thread that asks for its parent's recipe
/// in the background, a few calls at a time, while the image is still
/// being read; at the end only what is still unasked is asked (usually
/// nothing). Recipes are asked only once a region was taken from the
/// parent: a backup that takes none counts nothing from the parent and
/// asks for nothing, as before.
struct Tally {
    state: Mutex<TallyState>,
    wake: Condvar,
}

#[derive(Default)]
struct TallyState {
    /// Parent regions found not taken, not yet asked for.
    pending: Vec<usize>,
    /// Parent regions counted, and their data chunks and zero bytes.
    counted: Vec<usize>,
    chunks: u64,
    zeros: u64,
    /// Calls in flight.
    busy: usize,
    /// Every region is read (or the backup failed): no more will come.
    finished: bool,
    /// The counting thread is gone (or was never started).
    exited: bool,
}

/// Calls for parent recipes a [`Tally`] keeps in flight at once.
const TALLY_CALLS: usize = 4;

impl Tally {
    /// `active`: a thread will count ([`Tally::run`]); otherwise everything
    /// is counted at the end.
    fn new(active: bool) -> Tally {
        Tally {
            state: Mutex::new(TallyState {
                exited: !active,
                ..TallyState::default()
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TallyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parent region `index` was not taken.
    fn not_taken(&self, index: usize) {
        let mut st = self.lock();
        if !st.exited {
            st.pending.push(index);
            self.wake.notify_all();
        }
    }

    /// No more regions will come.
    fn stop(&self) {
        self.lock().finished = true;
        self.wake.notify_all();
    }

    /// [`Tally::stop`], then waits until the counting thread is gone (its
    /// calls in flight answered).
    fn finish(&self) {
        self.stop();
        let mut st = self.lock();
        while !st.exited {
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Counts what is handed over until [`Tally::finish`] (the counting
    /// thread). A call that fails counts nothing: its regions are asked for
    /// again at the end, where a failure is the commit's error.
    fn run(&self, ctx: &Ctx<'_>) {
        let _exit = Unblock(|| {
            let mut st = self.lock();
            st.exited = true;
            self.wake.notify_all();
        });
        let Ok(known) = ctx.known() else {
            return;
        };
        let Some(p) = &known.parent else {
            return;
        };
        std::thread::scope(|s| {
            let mut st = self.lock();
            loop {
                if !st.pending.is_empty() && st.busy < TALLY_CALLS && known.any_reused.load(Relaxed)
                {
                    let batch = std::mem::take(&mut st.pending);
                    st.busy += 1;
                    drop(st);
                    s.spawn(move || {
                        let r = p.tally(&batch);
                        let mut st = self.lock();
                        st.busy -= 1;
                        if let Ok((chunks, zeros)) = r {
                            st.chunks += chunks;
                            st.zeros += zeros;
                            st.counted.extend(batch);
                        }
                        self.wake.notify_all();
                    });
                    st = self.lock();
                    continue;
                }
                if st.finished {
                    break;
                }
                st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        });
    }
}

struct Ctx<'a> {
    repo: &'a dyn Repository,
    /// Set once loaded; `None` inside when loading failed (the error is the
    /// loader's to report). A worker that needs it waits for it.
    known: Gate<Option<Known<'a>>>,
    /// Cached chaining values of all-zero regions, by index (see
    /// `Repository::zero_cvs`), once loaded and checked; empty when not
    /// loaded. Only holes wait for it.
    zero_cvs: Gate<Vec<Option<[u8; 32]>>>,
    /// A parent was given: a region with data waits for [`Known`] to be
    /// compared with it. Without one, only holes wait (for the cache).
    may_reuse: bool,
    /// Made on first use: an encrypted repository's seed comes with the
    /// key, and a server's namespace codec with the session, which a
    /// region that needs no chunking does not wait for.
    chunker: OnceLock<Chunker>,
    level: i32,
    counters: Counters,
    results: Mutex<Vec<(u64, Id, RegionHash)>>,
    /// Regions this backup stored with chunks the repository reported it
    /// lacked: no stored index page can name them (see [`PageHints`]).
    fresh: Mutex<HashSet<Id>>,
    /// Where the parent regions not taken go to be counted.
    tally: Option<&'a Tally>,
    progress: &'a dyn Progress,
    /// Values this backup computed that the cache lacked.
    new_zero_cvs: Mutex<Vec<(u64, [u8; 32])>>,
    /// While uploader threads run ([`with_uploads`]): where the workers
    /// hand them their regions.
    uploads: Mutex<Option<crossbeam_channel::Sender<Upload>>>,
    /// An upload failed: the workers stop, and the backup fails with
    /// `upload_error`.
    upload_failed: AtomicBool,
    upload_error: Mutex<Option<EngineError>>,
    /// Regions whose upload named a chunk the repository had reported
    /// stored but lost since (see [`Ctx::stored`]): read and sent again
    /// before the commit.
    redo: Mutex<Vec<u64>>,
    /// The chunks the uploads carry, where the repository does not see
    /// them until each upload is answered
    /// (`Repository::dedups_uploads_in_flight`): a chunk two regions in
    /// flight both miss is sent once.
    claims: Option<std::sync::Arc<Claims>>,
}

/// A region to store: its id, its stored recipe and its new frames.
struct Upload {
    index: u64,
    rid: Id,
    stored: Vec<u8>,
    frames: imgstore_repo::Frames,
}

impl<'a> Ctx<'a> {
    /// A context with nothing to reuse: no parent, no cached holes.
    fn new(repo: &'a dyn Repository, progress: &'a dyn Progress) -> Result<Ctx<'a>, EngineError> {
        let ctx = Ctx::loading(repo, progress)?;
        ctx.known.set(Some(Known::default()));
        ctx.zero_cvs.set(Vec::new());
        Ok(ctx)
    }

    /// A context whose [`Known`] is still to be set.
    fn loading(
        repo: &'a dyn Repository,
        progress: &'a dyn Progress,
    ) -> Result<Ctx<'a>, EngineError> {
        Ok(Ctx {
            repo,
            known: Gate::default(),
            zero_cvs: Gate::default(),
            may_reuse: false,
            chunker: OnceLock::new(),
            level: repo.config().compression.zstd_level,
            counters: Counters::default(),
            results: Mutex::new(Vec::new()),
            fresh: Mutex::new(HashSet::new()),
            tally: None,
            progress,
            new_zero_cvs: Mutex::new(Vec::new()),
            uploads: Mutex::new(None),
            upload_failed: AtomicBool::new(false),
            upload_error: Mutex::new(None),
            redo: Mutex::new(Vec::new()),
            claims: (repo.uploads_in_flight() > 0 && !repo.dedups_uploads_in_flight())
                .then(|| std::sync::Arc::new(Claims::default())),
        })
    }

    /// What was loaded, once it is: a worker waits here. An error when
    /// loading failed (the backup reports the loader's own).
    fn known(&self) -> Result<&Known<'a>, EngineError> {
        self.known.wait().as_ref().ok_or_else(upload_stopped)
    }

    /// The cached zero chaining values, once loaded: a hole waits here.
    fn zero_cvs(&self) -> &[Option<[u8; 32]>] {
        self.zero_cvs.wait()
    }

    fn chunker(&self) -> Result<&Chunker, EngineError> {
        if let Some(c) = self.chunker.get() {
            return Ok(c);
        }
        let c = chunker_for(self.repo)?;
        Ok(self.chunker.get_or_init(|| c))
    }

    /// What was loaded, when it was (after the workers, always).
    fn known_now(&self) -> Option<&Known<'a>> {
        self.known.get().and_then(Option::as_ref)
    }

    /// Takes region `index` (`len` bytes, hashed into `hasher`) from the
    /// parent when its chaining value there is the same; false otherwise.
    /// Equal chaining values of the same subtree of the image tree mean
    /// equal bytes (BLAKE3's collision resistance), and the parent's index
    /// pages were checked against their ids when loaded.
    fn reuse(
        &self,
        p: &SnapshotReader<'_>,
        index: u64,
        len: usize,
        hasher: &blake3::Hasher,
    ) -> bool {
        use blake3::hazmat::HasherExt;
        self.reuse_cv(p, index, len, hasher.finalize_non_root(), Some(hasher))
    }

    /// [`Ctx::reuse`] with the region's chaining value `cv` computed
    /// already; `hasher`, when at hand, is kept for the first region (it
    /// may be the root), which is never taken without it.
    fn reuse_cv(
        &self,
        p: &SnapshotReader<'_>,
        index: u64,
        len: usize,
        cv: [u8; 32],
        hasher: Option<&blake3::Hasher>,
    ) -> bool {
        let i = index as usize;
        if i >= p.region_count() || p.region_len(i) != len as u64 {
            return false;
        }
        if cv != p.region_cv(i) || (index == 0 && hasher.is_none()) {
            return false;
        }
        // Its chunks and zero bytes are counted at the end, from the
        // parent's totals (see `reused_share`): no call per region.
        if let Some(k) = self.known_now() {
            k.reused[i].store(true, Relaxed);
            k.any_reused.store(true, Relaxed);
        }
        self.counters.reused_bytes.fetch_add(len as u64, Relaxed);
        // The value just compared is the region's share of the digest; only
        // the first region keeps its hasher (it may be the root).
        let hash = if let (0, Some(h)) = (index, hasher) {
            RegionHash::First(Box::new(h.clone()))
        } else {
            RegionHash::Cv(cv)
        };
        self.done(index, len, p.region_id(i), hash);
        true
    }

    /// Hands parent region `index` to the [`Tally`] (once) unless it was
    /// taken (`reuse_cv` marks a region taken before recording it).
    fn not_taken(&self, index: u64) {
        let (Some(t), Some(k)) = (self.tally, self.known_now()) else {
            return;
        };
        let i = index as usize;
        if i < k.reused.len() && !k.reused[i].load(Relaxed) && !k.handed[i].swap(true, Relaxed) {
            t.not_taken(i);
        }
    }

    /// Records region `index` (`len` bytes of the image) as `rid` with its
    /// share of the digest.
    fn done(&self, index: u64, len: usize, rid: Id, hash: RegionHash) {
        self.counters.image_bytes.fetch_add(len as u64, Relaxed);
        self.not_taken(index);
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((index, rid, hash));
        self.progress.advance(len as u64);
    }

    /// The chaining value of an all-zero region `index` of `len` bytes,
    /// when the parent has an all-zero region there too: a region's value
    /// depends only on its bytes and its offset, so the parent's recorded
    /// one is this region's, and the hole is not hashed again (8 MiB of
    /// zeros cost as much BLAKE3 as 8 MiB of data). The first region keeps
    /// its hasher (it may be the root).
    fn parent_zero_cv(&self, index: u64, len: usize) -> Option<[u8; 32]> {
        let p = self.known_now()?.parent.as_ref()?;
        let i = index as usize;
        (i > 0
            && i < p.region_count()
            && p.region_len(i) == len as u64
            && p.region_id(i) == Id::ZERO)
            .then(|| p.region_cv(i))
    }

    /// Remembers the chaining value of all-zero region `index` (hashed in
    /// `hasher`) for the repository's cache, when it is cacheable and the
    /// cache was loaded without it.
    fn note_zero_cv(&self, index: u64, len: usize, hasher: &blake3::Hasher) {
        use blake3::hazmat::HasherExt;
        let full = len as u64 == self.repo.config().region_size as u64;
        let missing = matches!(self.zero_cvs().get(index as usize), Some(None));
        if index > 0 && full && missing {
            self.new_zero_cvs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, hasher.finalize_non_root()));
        }
    }

    /// The chaining value of all-zero region `index` of `len` bytes from
    /// the repository's cache (full-size regions after the first only: the
    /// value depends on the region's length and the first may be the root).
    fn cached_zero_cv(&self, index: u64, len: usize) -> Option<[u8; 32]> {
        let full = len as u64 == self.repo.config().region_size as u64;
        if index == 0 || !full {
            return None;
        }
        *self.zero_cvs().get(index as usize)?
    }

    /// Stores a region: hands it to the uploader threads when they run,
    /// else stores it here.
    fn store_region(&self, up: Upload) -> Result<(), EngineError> {
        if self.upload_failed.load(Relaxed) {
            return Err(upload_stopped());
        }
        let tx = self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tx {
            Some(tx) => tx.send(up).map_err(|_| upload_stopped()),
            None => self.stored(&up, self.repo.put_region(&up.rid, &up.stored, &up.frames)),
        }
    }

    /// Counts a region's upload, or notes it for [`commit_resending`] when
    /// it named a chunk this backup did not send: one the repository had
    /// reported stored and lost since (a server restarted after a chunk
    /// was written but before its flush, or a gc took it while the lost
    /// session pinned nothing). Its bytes are no longer at hand here.
    fn stored(
        &self,
        up: &Upload,
        out: Result<imgstore_repo::PutOutcome, RepoError>,
    ) -> Result<(), EngineError> {
        match out {
            Ok(out) => {
                self.counters.new_chunks.fetch_add(out.new_chunks, Relaxed);
                self.counters.new_bytes.fetch_add(out.new_bytes, Relaxed);
                Ok(())
            }
            Err(RepoError::Missing {
                kind: ObjectKind::Chunk,
                id,
            }) if !up.frames.contains_key(&id) => {
                self.redo
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(up.index);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn process(&self, rb: &RegionBuf) -> Result<(), EngineError> {
        if self.upload_failed.load(Relaxed) {
            return Err(upload_stopped());
        }
        let data = &rb.data[..];
        let mut hasher = region_hasher(rb.offset);
        let mut extents = Vec::new();
        // A hole's value may be known from the parent; a region with data is
        // hashed first, while the parent's index may still be on its way.
        if rb.all_hole && self.may_reuse {
            self.known()?;
        }
        if rb.all_hole {
            let known = self.parent_zero_cv(rb.index, data.len()).or_else(|| {
                let cv = self.cached_zero_cv(rb.index, data.len())?;
                self.counters
                    .zero_cached_bytes
                    .fetch_add(data.len() as u64, Relaxed);
                Some(cv)
            });
            if let Some(cv) = known {
                self.counters
                    .zero_bytes
                    .fetch_add(data.len() as u64, Relaxed);
                self.done(rb.index, data.len(), Id::ZERO, RegionHash::Cv(cv));
                return Ok(());
            }
            update_zeros(&mut hasher, data.len() as u64);
            self.note_zero_cv(rb.index, data.len(), &hasher);
            extents.push(Extent {
                offset: 0,
                len: data.len(),
                kind: Kind::Zero,
            });
        } else if let Some(cv) = imgstore_chunker::is_zero(data)
            .then(|| self.cached_zero_cv(rb.index, data.len()))
            .flatten()
        {
            // Zeros read from a device (which reports no holes): the same
            // value, and no hashing. Where the parent has the same zero
            // region, it counts as reused, as it would through `reuse`.
            self.counters
                .zero_bytes
                .fetch_add(data.len() as u64, Relaxed);
            self.counters
                .zero_cached_bytes
                .fetch_add(data.len() as u64, Relaxed);
            if self.may_reuse
                && self.known().is_ok()
                && self.parent_zero_cv(rb.index, data.len()) == Some(cv)
            {
                self.counters
                    .reused_bytes
                    .fetch_add(data.len() as u64, Relaxed);
            }
            self.done(rb.index, data.len(), Id::ZERO, RegionHash::Cv(cv));
            return Ok(());
        } else {
            hasher.update(data);
            if self.may_reuse {
                if let Some(p) = &self.known()?.parent {
                    if self.reuse(p, rb.index, data.len(), &hasher) {
                        return Ok(());
                    }
                    // Its parent's recipe is asked for now, beside its own
                    // `chunks/known`: answered before its upload goes.
                    self.not_taken(rb.index);
                }
            }
            self.chunker()?.split(data, &mut extents);
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
                    let id = self.repo.chunk_id(bytes);
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
            self.note_zero_cv(rb.index, data.len(), &hasher);
            Id::ZERO
        } else {
            let codec = self.repo.codec();
            let (rid, stored) = codec.store_record(RecordKind::Region, region.encode(), &data_ids);
            // Only chunks the store does not have are compressed. A chunk
            // it reported stored may be gone by the upload when the server
            // lost the backup's session (it restarted: the chunk was written
            // after its last flush, or a gc took it while nothing pinned
            // it): the upload then fails naming it, and the region is read
            // and sent again before the commit (`Ctx::stored`).
            let mut frames = HashMap::new();
            let known = self.repo.chunks_known(&data_ids)?;
            for ((id, bytes), known) in data_ids.iter().zip(&data_slices).zip(known) {
                if !known && !frames.contains_key(id) {
                    let frame = codec.store_chunk(id, compress(bytes, self.level))?;
                    frames.insert(*id, (frame, bytes.len() as u32));
                }
            }
            if !frames.is_empty() {
                self.fresh
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rid);
            }
            self.store_region(Upload {
                index: rb.index,
                rid,
                stored,
                frames,
            })?;
            rid
        };
        self.done(
            rb.index,
            data.len(),
            rid,
            RegionHash::from_hasher(rb.index, hasher),
        );
        Ok(())
    }
}

/// `k` distinct items of `from` (all of them when there are fewer), picked
/// by a partial Fisher-Yates shuffle driven by `key`.
fn pick_distinct(mut from: Vec<usize>, k: usize, key: &[u8; 32]) -> Vec<usize> {
    let k = from.len().min(k);
    for j in 0..k {
        let h = blake3::keyed_hash(key, &(j as u64).to_le_bytes());
        let r = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        let pick = j + (r % (from.len() - j) as u64) as usize;
        from.swap(j, pick);
    }
    from.truncate(k);
    from
}

/// A key for picking samples that whoever supplied the values sampled
/// cannot predict: from the system's random source, or (should that fail)
/// the clock's nanoseconds.
fn sample_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    if getrandom::fill(&mut key).is_err() {
        key = *blake3::hash(&now_ns().to_le_bytes()).as_bytes();
    }
    key
}

/// A value set once that threads may wait for (`OnceLock::wait` needs a
/// newer Rust than the workspace's minimum).
struct Gate<T> {
    cell: OnceLock<T>,
    lock: Mutex<()>,
    set: Condvar,
}

impl<T> Default for Gate<T> {
    fn default() -> Self {
        Gate {
            cell: OnceLock::new(),
            lock: Mutex::new(()),
            set: Condvar::new(),
        }
    }
}

impl<T> Gate<T> {
    /// Sets the value unless it is set already, and wakes the waiters.
    fn set(&self, v: T) {
        let _ = self.cell.set(v);
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.set.notify_all();
    }

    fn get(&self) -> Option<&T> {
        self.cell.get()
    }

    /// The value, once set.
    fn wait(&self) -> &T {
        loop {
            if let Some(v) = self.cell.get() {
                return v;
            }
            let held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.cell.get().is_none() {
                drop(self.set.wait(held).unwrap_or_else(|p| p.into_inner()));
            }
        }
    }
}

/// Runs its closure when dropped, however the scope it guards ends.
struct Unblock<F: FnMut()>(F);

impl<F: FnMut()> Drop for Unblock<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// What a worker returns when an upload failed; [`with_uploads`] reports
/// the upload's own error instead.
fn upload_stopped() -> EngineError {
    EngineError::Invalid {
        what: "backup",
        why: "stopped: a region upload failed".into(),
    }
}

/// Runs `work` (the workers, which call [`Ctx::process`]) with
/// `Repository::uploads_in_flight` uploader threads storing the regions it
/// hands over, through a channel of two places: the workers chunk and
/// compress the next regions while the link carries the last ones, and
/// wait when it is behind. Memory: each uploader and each place holds one
/// region's frames. Without uploaders (a local store), `work` alone.
///
/// `after` runs once `work` has succeeded, while the last uploads drain
/// (what the commit will look up: over a link, its round trip then
/// overlaps theirs instead of following it). Its result is `None` when
/// `work` failed.
fn with_uploads<T>(
    ctx: &Ctx<'_>,
    work: impl FnOnce() -> (Result<(), EngineError>, u64),
    after: impl FnOnce() -> T,
) -> (Result<(), EngineError>, u64, Option<T>) {
    let n = ctx.repo.uploads_in_flight();
    if n == 0 {
        let (r, read) = work();
        let then = r.is_ok().then(after);
        return (r, read, then);
    }
    // Two places: enough that a worker rarely waits for an uploader to
    // come back for the next region, few enough that queued frames stay
    // a small part of the memory (measured: 8 places took 100 MiB more
    // at 150 ms RTT, for no speed).
    let (tx, rx) = crossbeam_channel::bounded::<Upload>(2);
    *ctx.uploads.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    let (result, read, then) = std::thread::scope(|s| {
        // A session opening in the background (a server's) is waited for
        // here, while the workers read and chunk their first regions (the
        // calls that need it wait for it too); if it cannot be opened, the
        // workers stop and the backup fails with its reason.
        s.spawn(|| {
            if let Err(e) = ctx.repo.ready() {
                let mut first = ctx.upload_error.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    *first = Some(e.into());
                }
                ctx.upload_failed.store(true, Relaxed);
            }
        });
        for _ in 0..n {
            let rx = rx.clone();
            s.spawn(move || {
                for mut up in rx {
                    if ctx.upload_failed.load(Relaxed) {
                        continue;
                    }
                    let claim = ctx.claims.as_ref().map(|c| c.take(&mut up.frames));
                    let out = ctx.repo.put_region_settled(
                        &up.rid,
                        &up.stored,
                        &up.frames,
                        Box::new(move |stored| {
                            if let Some(c) = claim {
                                c.settle(stored);
                            }
                        }),
                    );
                    if let Err(e) = ctx.stored(&up, out) {
                        let mut first = ctx.upload_error.lock().unwrap_or_else(|p| p.into_inner());
                        if first.is_none() {
                            *first = Some(e);
                        }
                        ctx.upload_failed.store(true, Relaxed);
                    }
                }
            });
        }
        drop(rx);
        let r = work();
        if r.0.is_err() {
            // Nothing queued is needed any more.
            ctx.upload_failed.store(true, Relaxed);
        }
        // Closing the channel lets the uploaders finish what is queued.
        *ctx.uploads.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let then = r.0.is_ok().then(after);
        (r.0, r.1, then)
    });
    match ctx
        .upload_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        Some(e) => (Err(e), read, None),
        None => (result, read, then),
    }
}

/// Backs up `source` into `store` as a new snapshot and commits it.
///
/// Nothing is visible until the final commit: an error or a crash at any
/// point before it leaves the repository's snapshots exactly as they were.
pub fn backup(
    repo: &dyn Repository,
    mut source: Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport, EngineError> {
    let (started, time_ns) = (Instant::now(), now_ns());
    let region_size = repo.config().region_size as usize;
    // Over a link (uploads in flight), the parent's regions not taken are
    // counted as they are found; a local store counts them at the end.
    let counting = Tally::new(opts.parent.is_some() && repo.uploads_in_flight() > 0);
    let tally = &counting;
    let mut ctx = Ctx::loading(repo, progress)?;
    ctx.may_reuse = opts.parent.is_some();
    ctx.tally = Some(tally);
    // Damaged objects are rewritten by backing the same data up again, so
    // while any are marked every region is processed in full. Holes of a
    // file or device take their chaining values from the cache (4 MiB of
    // them per TiB of image).
    let holes = match (source.size(), source.kind()) {
        (Some(size), SourceKind::File | SourceKind::BlockDevice | SourceKind::Reader) => Some(size),
        _ => None,
    };
    // The parent's index and the cache are asked for at once (over a link,
    // one round trip instead of two), while the workers read and hash their
    // first regions: they wait for them only to compare.
    let load = || -> Result<Known<'_>, EngineError> {
        let mut known = Known::default();
        if let Some((pid, parent)) = &opts.parent {
            if parent.region_size as usize == region_size && repo.damage_pending() == 0 {
                let p = SnapshotReader::open(repo, pid, parent)?;
                known.reused = (0..p.region_count())
                    .map(|_| AtomicBool::new(false))
                    .collect();
                known.handed = (0..p.region_count())
                    .map(|_| AtomicBool::new(false))
                    .collect();
                known.parent = Some(p);
            }
        }
        Ok(known)
    };
    let load_zeros = || -> Result<Vec<Option<[u8; 32]>>, EngineError> {
        let Some(size) = holes else {
            return Ok(Vec::new());
        };
        let mut cvs = repo.zero_cvs(region_size as u32, size.div_ceil(region_size as u64))?;
        distrust_unless_sample_holds(&mut cvs, region_size as u64);
        Ok(cvs)
    };
    // Regions hashed while the repository was being reached.
    let pre = opts
        .prehash
        .as_ref()
        .map(|p| p.finish(region_size))
        .unwrap_or_default();
    progress.start(source.size());
    let initial_size = source.size();

    let load_error = Mutex::new(None);
    let failed = |e: EngineError| {
        let mut first = load_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    };
    let (work, bytes_read, early) = std::thread::scope(|s| {
        // Told to stop however the backup ends, so the scope can end.
        let _stop_tally = Unblock(|| tally.stop());
        if !tally.lock().exited {
            s.spawn(|| tally.run(&ctx));
        }
        s.spawn(|| {
            // Set whatever happens, so no worker waits for ever.
            let _unblock = Unblock(|| {
                ctx.known.set(None);
            });
            match load() {
                Ok(known) => {
                    ctx.known.set(Some(known));
                }
                Err(e) => failed(e),
            }
        });
        s.spawn(|| {
            let _unblock = Unblock(|| {
                ctx.zero_cvs.set(Vec::new());
            });
            match load_zeros() {
                Ok(cvs) => {
                    ctx.zero_cvs.set(cvs);
                }
                Err(e) => failed(e),
            }
        });
        with_uploads(
            &ctx,
            || match source.positional() {
                Some(pos) => read_parallel(&ctx, &pos, region_size, &pre),
                None => read_sequential(&ctx, &mut source, region_size),
            },
            || {
                // Everything read: the commit's lookups and the new zero
                // chaining values go while the last uploads drain (the
                // parent's regions not taken are counted by then, or
                // nearly: see `Tally`).
                tally.finish();
                let new_zero_cvs = std::mem::take(
                    &mut *ctx.new_zero_cvs.lock().unwrap_or_else(|p| p.into_inner()),
                );
                let results = ctx
                    .results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let share = ctx.known_now().and_then(|k| {
                    let reused = &k.reused;
                    k.parent
                        .as_ref()
                        .map(|p| move || reused_share(p, reused, tally))
                });
                let hints = PageHints {
                    parent: ctx
                        .known_now()
                        .and_then(|k| k.parent.as_ref())
                        .map(|p| p.snapshot().pages.iter().copied().collect())
                        .unwrap_or_default(),
                    fresh: std::mem::take(
                        &mut *ctx.fresh.lock().unwrap_or_else(|p| p.into_inner()),
                    ),
                };
                std::thread::scope(|s| {
                    let zeros = s.spawn(|| repo.put_zero_cvs(region_size as u32, &new_zero_cvs));
                    let early = look_ahead(repo, results, share, &hints);
                    (
                        zeros.join().expect("zero chaining values thread panicked"),
                        early,
                    )
                })
            },
        )
    });
    if let Some(e) = load_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    work?;
    let early = match early {
        Some((zeros, early)) => {
            zeros?;
            // A failed lookup is done again at the commit.
            early.ok()
        }
        None => None,
    };
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

    if size == 0 && !opts.allow_empty {
        return Err(EngineError::EmptySource {
            path: source.path().to_path_buf(),
        });
    }
    let results = ctx.results.into_inner().unwrap_or_else(|p| p.into_inner());
    let stats = ctx.counters.stats();
    let meta = Meta {
        time_ns,
        opts,
        source: source.path().display().to_string(),
        size,
        region_size,
        started,
        parent: opts.parent.as_ref().map(|p| p.0),
    };
    let bytes_reused = ctx.counters.reused_bytes.load(Relaxed);
    let zero_bytes_cached = ctx.counters.zero_cached_bytes.load(Relaxed);
    let path = source.path().to_path_buf();
    let pos = source.positional();
    let reread = |i: u64| -> Result<RegionBuf, EngineError> {
        let pos = pos.as_ref().expect("only a file or device is read again");
        match pos.read_region(i, region_size, AlignedBuf::default())? {
            Some((rb, _)) => Ok(rb),
            None => Err(EngineError::SourceChanged {
                path: path.clone(),
                before: size,
                after: i * region_size as u64,
                at: i * region_size as u64,
            }),
        }
    };
    let reread: Option<&Reread<'_>> = match &pos {
        Some(_) => Some(&reread),
        None => None,
    };
    let redo = std::mem::take(&mut *ctx.redo.lock().unwrap_or_else(|p| p.into_inner()));
    // The chunks and zeros of the regions taken from the parent are
    // counted while the new pages are looked up: one round trip, not two.
    let share = ctx.known.get().and_then(Option::as_ref).and_then(|k| {
        let reused = &k.reused;
        k.parent
            .as_ref()
            .map(|p| move || reused_share(p, reused, tally))
    });
    let (id, snapshot) =
        commit_resending(repo, results, None, stats, meta, reread, redo, share, early)?;
    progress.finish();
    Ok(BackupReport {
        id,
        snapshot,
        bytes_read,
        bytes_reused,
        zero_bytes_cached,
    })
}

/// The data chunks and zero bytes of the parent's regions a backup took
/// unchanged (`reused`, by index): the parent's totals less those of the
/// regions it did not take. Only the recipes of those are read, so an
/// incremental backup asks for the recipes of its changed regions, in
/// batched calls, instead of one call per unchanged region (a round trip
/// each to a server). A parent's totals are its regions' sums (every
/// backup counts them so, and `backup_changed` relies on them the same
/// way).
///
/// What `tally` counted while the backup ran is not asked for again.
fn reused_share(
    p: &SnapshotReader<'_>,
    reused: &[AtomicBool],
    tally: &Tally,
) -> Result<(u64, u64), EngineError> {
    let mut rest: Vec<usize> = (0..p.region_count())
        .filter(|&i| !reused[i].load(Relaxed))
        .collect();
    if rest.len() == p.region_count() {
        return Ok((0, 0));
    }
    let (mut chunks, mut zeros) = (0, 0);
    {
        let st = tally.lock();
        if !st.counted.is_empty() {
            let counted: HashSet<usize> = st.counted.iter().copied().collect();
            rest.retain(|i| !counted.contains(i));
            (chunks, zeros) = (st.chunks, st.zeros);
        }
    }
    if !rest.is_empty() {
        let (c, z) = p.tally(&rest)?;
        chunks += c;
        zeros += z;
    }
    let stats = &p.snapshot().stats;
    Ok((
        stats.chunks.saturating_sub(chunks),
        stats.zero_bytes.saturating_sub(zeros),
    ))
}

/// Recomputes 64 distinct cached zero chaining values picked at random, or
/// all of them when there are fewer (about 2 ms each), before any is used;
/// if one is wrong the whole table is dropped, so every value is computed again and the cache rewritten. A
/// wrong value would otherwise give the snapshot a digest that no restore
/// can match. The pick is random (see [`sample_key`]), so whoever serves
/// the table cannot know which entries will be checked.
fn distrust_unless_sample_holds(table: &mut [Option<[u8; 32]>], region_size: u64) {
    use blake3::hazmat::HasherExt;
    let cached: Vec<usize> = (0..table.len()).filter(|&i| table[i].is_some()).collect();
    if cached.is_empty() {
        return;
    }
    let sample = pick_distinct(cached, 64, &sample_key());
    let holds = sample.par_iter().all(|&i| {
        let mut h = region_hasher(i as u64 * region_size);
        update_zeros(&mut h, region_size);
        Some(h.finalize_non_root()) == table[i]
    });
    if !holds {
        table.fill(None);
    }
}

/// How much of a file or device source is asked to be read ahead.
const PREFETCH_BYTES: u64 = 128 << 20;

/// Reads and processes the regions of a file or device: one thread per
/// core, each taking the next region, reading it (buffered, the kernel
/// asked to read the next 128 MiB meanwhile; direct with `--direct-io`)
/// and processing it, so reads overlap other threads' work and regions are
/// read roughly in order.
fn read_parallel(
    ctx: &Ctx<'_>,
    pos: &crate::source::Positional<'_>,
    region_size: usize,
    pre: &crate::prehash::Table,
) -> (Result<(), EngineError>, u64) {
    // One thread per core. A third thread (on 2 cores) kept a core busy
    // while another waited for its read — first backup of the workload's
    // disk-0 2.80–2.84 s instead of 3.07–3.15 s — but its region and heap
    // raised peak RSS over 128 MiB (8 GiB image: 141 MiB).
    // A repository behind a network link asks for more
    // (`backup_in_flight`): the extra threads wait on round trips, not on
    // the CPU. A backup worker waits one (`chunks/known`) per changed
    // region, its upload going on behind it, so half of `in_flight` keep
    // two cores busy: at 150 ms RTT, 7 more workers instead of 15 (peak
    // RSS of disk-0's first backup 400 MiB instead of 590 MiB, for the
    // same time).
    let threads = read::cores() + ctx.repo.backup_in_flight();
    // Regions advised to the kernel ahead of the one being read (see
    // `Positional::prefetch`), 128 MiB of them: the page cache holds them,
    // not the heap. On the workload (cold cache) a window of 16 × 8 MiB
    // made backups of disk-3 after disk-2 0.92–0.95 s instead of 1.12–1.15
    // s, and the first backup of disk-0 2.48–2.55 s instead of 2.74–2.76 s
    // (medians of 5 and 3); 2, 4 and 8 regions gained less, 32 no more.
    let ahead = (PREFETCH_BYTES / region_size as u64).max(1);
    for i in 0..ahead {
        pos.prefetch(i, region_size);
    }
    let next = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // Regions hashed before the parent's index arrived (over a link, the
    // round trip for its pages): compared once it is here, and read again
    // only if they differ (their bytes are in the page cache by then).
    // So are the regions hashed before the backup started (`pre`), which
    // are not read at all unless they differ.
    let aside: Mutex<Vec<(u64, Hashed)>> = Mutex::new(Vec::new());
    let take_aside = || aside.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let put_aside = |index: u64, h: Hashed| {
        aside
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((index, h))
    };
    let settle = |index: u64, hashed: Hashed, buf: AlignedBuf| {
        let known = ctx.known()?;
        if let Some(p) = &known.parent {
            let len = (pos.size() - index * region_size as u64).min(region_size as u64) as usize;
            let taken = match &hashed {
                Hashed::Hasher(h) => ctx.reuse(p, index, len, h),
                Hashed::Cv(cv) => ctx.reuse_cv(p, index, len, *cv, None),
                Hashed::Hole => false,
            };
            if taken {
                return Ok(buf);
            }
        }
        match pos.read_region(index, region_size, buf)? {
            Some((rb, _)) => ctx.process(&rb).map(|()| rb.data),
            None => Err(EngineError::SourceChanged {
                path: pos.path().to_path_buf(),
                before: pos.size(),
                after: index * region_size as u64,
                at: index * region_size as u64,
            }),
        }
    };
    let result = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), EngineError> {
                    let mut buf = AlignedBuf::default();
                    let fail = |e| {
                        stop.store(true, Relaxed);
                        Err(e)
                    };
                    while !stop.load(Relaxed) {
                        if ctx.known.get().is_some() {
                            if let Some((index, hashed)) = take_aside() {
                                buf = match settle(index, hashed, buf) {
                                    Ok(b) => b,
                                    Err(e) => return fail(e),
                                };
                                continue;
                            }
                        }
                        let index = next.fetch_add(1, Relaxed);
                        pos.prefetch(index + ahead, region_size);
                        if let Some(&Some((cv, n))) = pre.get(index as usize) {
                            if ctx.may_reuse {
                                // Read once already, for its value.
                                read.fetch_add(n, Relaxed);
                                if ctx.known.get().is_none() {
                                    put_aside(index, Hashed::Cv(cv));
                                    continue;
                                }
                                buf = match settle(index, Hashed::Cv(cv), buf) {
                                    Ok(b) => b,
                                    Err(e) => return fail(e),
                                };
                                continue;
                            }
                        }
                        let Some((rb, n)) = pos.read_region(index, region_size, buf)? else {
                            buf = AlignedBuf::default();
                            break;
                        };
                        read.fetch_add(n, Relaxed);
                        if ctx.may_reuse && ctx.known.get().is_none() {
                            let hashed = if rb.all_hole {
                                Hashed::Hole
                            } else {
                                let mut h = region_hasher(rb.offset);
                                h.update(&rb.data);
                                Hashed::Hasher(Box::new(h))
                            };
                            if ctx.known.get().is_none() {
                                put_aside(index, hashed);
                                buf = rb.data;
                                continue;
                            }
                        }
                        if let Err(e) = ctx.process(&rb) {
                            return fail(e);
                        }
                        buf = rb.data;
                    }
                    // What is still aside, once the index is here.
                    while !stop.load(Relaxed) {
                        let Some((index, hashed)) = take_aside() else {
                            break;
                        };
                        buf = match settle(index, hashed, buf) {
                            Ok(b) => b,
                            Err(e) => return fail(e),
                        };
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for h in handles {
            let r = h.join().expect("backup thread panicked");
            if r.is_err() {
                stop.store(true, Relaxed);
                if result.is_ok() {
                    result = r;
                }
            }
        }
        result
    });
    (result, read.into_inner())
}

/// A region hashed before it could be compared with the parent's.
enum Hashed {
    /// Read and hashed by the backup's own workers.
    Hasher(Box<blake3::Hasher>),
    /// Its chaining value, from a [`crate::PreHash`].
    Cv([u8; 32]),
    /// All hole: nothing to compare until the parent's index is here.
    Hole,
}

/// Reads a stream region by region on one thread while rayon's workers
/// process the regions already read.
fn read_sequential(
    ctx: &Ctx<'_>,
    source: &mut Source,
    region_size: usize,
) -> (Result<(), EngineError>, u64) {
    // One worker per core, more for a repository behind a network link.
    let pool = match threads(workers(ctx.repo, 1)) {
        Ok(p) => p,
        Err(e) => return (Err(e), 0),
    };
    let (tx, rx) = crossbeam_channel::bounded::<RegionBuf>(1);
    let (free_tx, free_rx) = crossbeam_channel::unbounded::<AlignedBuf>();
    let stop = AtomicBool::new(false);
    let (work, read) = std::thread::scope(|s| {
        let stop = &stop;
        let reader = s.spawn(move || -> Result<u64, EngineError> {
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
            Ok(bytes_read)
        });
        let work = pool.install(|| {
            rx.into_iter().par_bridge().try_for_each(|rb| {
                let r = ctx.process(&rb);
                let _ = free_tx.send(rb.data);
                r
            })
        });
        if work.is_err() {
            stop.store(true, Relaxed);
        }
        (work, reader.join().expect("reader thread panicked"))
    });
    match (work, read) {
        (Err(e), _) | (Ok(()), Err(e)) => (Err(e), 0),
        (Ok(()), Ok(n)) => (Ok(()), n),
    }
}

/// A counting step of [`commit_snapshot`]: (data chunks, zero bytes).
type Counted = fn() -> Result<(u64, u64), EngineError>;

/// What a snapshot records besides its regions.
#[derive(Clone)]
pub(crate) struct Meta<'a> {
    pub time_ns: i64,
    pub opts: &'a BackupOptions,
    pub source: String,
    pub size: u64,
    pub region_size: usize,
    pub started: Instant,
    /// The snapshot this one was made against (recorded for display).
    pub parent: Option<Id>,
}

/// Reads region `index` of the source again (see [`commit_resending`]).
pub(crate) type Reread<'a> = dyn Fn(u64) -> Result<RegionBuf, EngineError> + Sync + 'a;

/// [`commit_snapshot`], first sending again the regions the repository
/// says it may have lost since this backup stored them or read them from
/// its parent ([`Repository::regions_to_resend`]: a server that restarted
/// during the backup), and those in `redo` (their upload named a chunk it
/// had lost: see `Ctx::stored`). Those regions are read again with `reread` and
/// processed anew, without the parent (whose region may be what was
/// lost); a source that cannot be read twice (a stream) fails instead.
/// A commit that finds a region gone (lost after the check) goes round
/// again, a bounded number of times. `more` is as for `commit_snapshot`,
/// run at each attempt.
/// `early` is what [`look_ahead`] found before the commit (used if the
/// regions are still the ones it saw).
#[allow(clippy::too_many_arguments)]
pub(crate) fn commit_resending<F>(
    repo: &dyn Repository,
    mut results: Vec<(u64, Id, RegionHash)>,
    digest: Option<[u8; 32]>,
    mut stats: SnapshotStats,
    meta: Meta<'_>,
    reread: Option<&Reread<'_>>,
    mut redo: Vec<u64>,
    more: Option<F>,
    mut early: Option<Early>,
) -> Result<(Id, Snapshot), EngineError>
where
    F: Fn() -> Result<(u64, u64), EngineError> + Sync,
{
    let mut failed: Option<EngineError> = None;
    let mut resent = 0;
    for _ in 0..COMMIT_ROUNDS {
        let mut named: Vec<Id> = results
            .iter()
            .map(|r| r.1)
            .filter(|r| *r != Id::ZERO)
            .collect();
        named.sort_unstable();
        named.dedup();
        let lost: std::collections::HashSet<Id> =
            repo.regions_to_resend(&named)?.into_iter().collect();
        let mut indices: Vec<u64> = results
            .iter()
            .filter(|r| lost.contains(&r.1))
            .map(|r| r.0)
            .chain(redo.drain(..))
            .collect();
        indices.sort_unstable();
        indices.dedup();
        if indices.is_empty() {
            if let Some(e) = failed.take() {
                // The commit found something missing that the repository
                // does not say it lost: not a loss this can mend.
                return Err(e);
            }
        } else {
            failed = None;
            let Some(reread) = reread else {
                return Err(EngineError::RegionsLost {
                    repo: repo.location(),
                    image: meta.opts.name.clone(),
                    regions: indices.len(),
                    why:
                        "the server restarted during the backup, and a stream cannot be read twice",
                });
            };
            resent = indices.len();
            let ctx = Ctx::new(repo, &crate::NoProgress)?;
            io_pool()?.install(|| {
                indices
                    .par_iter()
                    .try_for_each(|&i| ctx.process(&reread(i)?))
            })?;
            stats.new_chunks += ctx.counters.new_chunks.load(Relaxed);
            stats.new_bytes += ctx.counters.new_bytes.load(Relaxed);
            redo = std::mem::take(&mut *ctx.redo.lock().unwrap_or_else(|p| p.into_inner()));
            let redone = ctx.results.into_inner().unwrap_or_else(|p| p.into_inner());
            let by_index: HashMap<u64, (Id, RegionHash)> =
                redone.into_iter().map(|(i, id, h)| (i, (id, h))).collect();
            for r in results.iter_mut() {
                if let Some((id, h)) = by_index.get(&r.0) {
                    r.1 = *id;
                    r.2 = h.clone();
                }
            }
            // Asked again before the commit: the server may have lost the
            // session once more meanwhile (answered without a request if not).
            continue;
        }
        let more = more.as_ref().map(|f| || f());
        match commit_snapshot(
            repo,
            &mut results,
            digest,
            stats,
            meta.clone(),
            more,
            early.take(),
        ) {
            Err(EngineError::Repo(RepoError::Missing {
                kind: ObjectKind::Region,
                id,
            })) => {
                failed = Some(EngineError::Repo(RepoError::Missing {
                    kind: ObjectKind::Region,
                    id,
                }))
            }
            r => return r,
        }
    }
    // The repository kept losing what was sent again (a server restarting
    // over and over).
    Err(failed.unwrap_or(EngineError::RegionsLost {
        repo: repo.location(),
        image: meta.opts.name.clone(),
        regions: resent,
        why: "it lost them again each time they were sent: is the server restarting over and over?",
    }))
}

/// Builds the index pages from per-region results (any order), computes the
/// image digest (unless given), and commits the snapshot.
///
/// `more`, when given, counts (data chunks, zero bytes) the results do not
/// (regions taken from a parent); it runs while the pages are looked up.
pub(crate) fn commit_snapshot<F>(
    repo: &dyn Repository,
    results: &mut [(u64, Id, RegionHash)],
    digest: Option<[u8; 32]>,
    mut stats: SnapshotStats,
    meta: Meta<'_>,
    more: Option<F>,
    early: Option<Early>,
) -> Result<(Id, Snapshot), EngineError>
where
    F: FnOnce() -> Result<(u64, u64), EngineError> + Send,
{
    results.sort_by_key(|r| r.0);
    debug_assert!(results.iter().enumerate().all(|(i, r)| r.0 == i as u64));
    let region_size = meta.region_size;
    let digest = match digest {
        Some(d) => d,
        None => {
            let hashes: Vec<RegionHash> = results.iter().map(|r| r.2.clone()).collect();
            image_digest(&hashes, region_size as u64, meta.size)
        }
    };
    let (page_ids, stored_pages) = index_pages(repo, results);
    let mut page_bytes = 0u64;
    let mut seen = std::collections::HashSet::new();
    let (known, more) = match early.filter(|e| e.page_ids == page_ids) {
        Some(e) => (Ok(e.stored), e.more),
        None => lookups(repo, &page_ids, more),
    };
    if let Some(m) = more {
        let (chunks, zeros) = m?;
        stats.chunks += chunks;
        stats.zero_bytes += zeros;
    }
    let known = known?;
    for ((pid, p), stored) in page_ids.iter().zip(&stored_pages).zip(known) {
        if seen.insert(*pid) && !stored {
            page_bytes += p.len() as u64;
        }
    }
    stats.new_bytes += page_bytes;
    stats.duration_ns = meta.started.elapsed().as_nanos() as u64;
    let snapshot = Snapshot {
        time_ns: meta.time_ns,
        name: meta.opts.name.clone(),
        hostname: meta.opts.hostname.clone(),
        source: meta.source,
        tags: meta.opts.tags.clone(),
        size: meta.size,
        digest,
        region_size: region_size as u32,
        pages: page_ids,
        stats,
        bitmap: meta.opts.bitmap.clone(),
    };
    let codec = repo.codec();
    let (_, record) = codec.store_record(RecordKind::Snapshot, snapshot.encode(), &snapshot.pages);
    let (id, _) = repo.commit(&record, &stored_pages, meta.parent.as_ref())?;
    Ok((id, snapshot))
}

/// The index pages of `results` (sorted by region, complete): their ids
/// and their records as stored.
fn index_pages(
    repo: &dyn Repository,
    results: &[(u64, Id, RegionHash)],
) -> (Vec<Id>, Vec<Vec<u8>>) {
    let codec = repo.codec();
    results
        .chunks(PAGE_REGIONS)
        .map(|c| {
            let page = Page {
                regions: c.iter().map(|r| r.1).collect(),
                cvs: c.iter().map(|r| r.2.cv()).collect(),
            };
            let regions: Vec<Id> = page
                .regions
                .iter()
                .copied()
                .filter(|r| *r != Id::ZERO)
                .collect();
            codec.store_record(RecordKind::Page, page.encode(), &regions)
        })
        .unzip()
}

/// What a commit looks up before it is sent: which of its pages the
/// repository holds (their bytes are not new), and `more` (the counts of
/// regions taken from the parent), at once.
#[allow(clippy::type_complexity)]
fn lookups<F>(
    repo: &dyn Repository,
    page_ids: &[Id],
    more: Option<F>,
) -> (
    Result<Vec<bool>, RepoError>,
    Option<Result<(u64, u64), EngineError>>,
)
where
    F: FnOnce() -> Result<(u64, u64), EngineError> + Send,
{
    std::thread::scope(|s| {
        let more = more.map(|f| s.spawn(f));
        let known = repo
            .ref_counts(ObjectKind::Page, page_ids)
            .map(|v| v.iter().map(Option::is_some).collect());
        (
            known,
            more.map(|h| h.join().expect("counting thread panicked")),
        )
    })
}

/// What a backup knows of its index pages without asking: a page its
/// parent names is stored; a page naming a region the backup stored with
/// chunks the repository reported it lacked is not (a stored page names
/// only stored regions, and a stored region only stored chunks). Only the
/// other pages are looked up, so the commit of an incremental backup over
/// a link usually waits for no lookup at all.
#[derive(Default)]
pub(crate) struct PageHints {
    pub parent: HashSet<Id>,
    pub fresh: HashSet<Id>,
}

impl PageHints {
    /// Whether page `id`, naming `regions`, is stored, when known here.
    fn stored(&self, id: &Id, regions: &[(u64, Id, RegionHash)]) -> Option<bool> {
        if self.parent.contains(id) {
            Some(true)
        } else if regions.iter().any(|r| self.fresh.contains(&r.1)) {
            Some(false)
        } else {
            None
        }
    }
}

/// A commit's lookups done ahead of it ([`look_ahead`]).
pub(crate) struct Early {
    page_ids: Vec<Id>,
    /// Whether each page is stored already.
    stored: Vec<bool>,
    more: Option<Result<(u64, u64), EngineError>>,
}

/// The lookups [`commit_snapshot`] makes for `results` (every region of
/// the image, in any order), made now: a backup runs them while its last
/// uploads drain, so over a link their round trip overlaps the uploads'
/// instead of following it. The commit uses them only if its pages are
/// these (a region sent again after a loss may change them).
pub(crate) fn look_ahead<F>(
    repo: &dyn Repository,
    mut results: Vec<(u64, Id, RegionHash)>,
    more: Option<F>,
    hints: &PageHints,
) -> Result<Early, EngineError>
where
    F: FnOnce() -> Result<(u64, u64), EngineError> + Send,
{
    results.sort_by_key(|r| r.0);
    if !results.iter().enumerate().all(|(i, r)| r.0 == i as u64) {
        return Err(EngineError::Repo(RepoError::Invalid(
            "the regions read are not the whole image".into(),
        )));
    }
    let (page_ids, _) = index_pages(repo, &results);
    let decided: Vec<Option<bool>> = page_ids
        .iter()
        .zip(results.chunks(PAGE_REGIONS))
        .map(|(id, regions)| hints.stored(id, regions))
        .collect();
    let ask: Vec<Id> = page_ids
        .iter()
        .zip(&decided)
        .filter(|(_, d)| d.is_none())
        .map(|(id, _)| *id)
        .collect();
    let (known, more) = lookups(repo, &ask, more);
    let mut asked = known?.into_iter();
    let stored = decided
        .into_iter()
        .map(|d| d.or_else(|| asked.next()).unwrap_or(false))
        .collect();
    Ok(Early {
        page_ids,
        stored,
        more,
    })
}

/// A changed-block backup: which bytes may differ from a base snapshot.
#[derive(Clone, Debug)]
pub struct ChangedBlocks {
    pub base_id: Id,
    pub base: Snapshot,
    /// Byte ranges `(offset, length)` that may differ from the base (any
    /// order, may overlap). Everything else is taken from the base.
    pub ranges: Vec<(u64, u64)>,
    /// Share (0..=1) of the regions taken from the base that are read from
    /// the source anyway and compared with the base's chaining values.
    pub verify_unchanged: f64,
}

/// Sorts, merges and clips ranges; refuses ranges past `size`.
fn normalize(
    ranges: &[(u64, u64)],
    size: u64,
    path: &std::path::Path,
) -> Result<Vec<(u64, u64)>, EngineError> {
    let mut v: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    let mut sorted: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
    sorted.sort();
    for (o, l) in sorted {
        let end = o.checked_add(l).filter(|e| *e <= size).ok_or_else(|| EngineError::BadSource {
            path: path.to_path_buf(),
            why: format!("changed range {o}+{l} ends beyond its {size} bytes: the change list does not belong to this source"),
        })?;
        match v.last_mut() {
            Some(last) if last.1 >= o => last.1 = last.1.max(end),
            _ => v.push((o, end)),
        }
    }
    Ok(v)
}

/// Backs up `source` reading only `changed.ranges` (and the bytes past the
/// base's end): regions no range touches are taken from the base snapshot
/// as they are (recipe and chaining value); a region a range touches is
/// rebuilt from the base, overlaid with the changed bytes read from the
/// source, and re-chunked whole — so chunk boundaries, and deduplication,
/// are exactly those of a full backup of the same image.
pub fn backup_changed(
    repo: &dyn Repository,
    source: &Source,
    changed: &ChangedBlocks,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport, EngineError> {
    let (started, time_ns) = (Instant::now(), now_ns());
    let path = source.path().to_path_buf();
    let (Some(size), Some(source)) = (source.size(), source.positional()) else {
        return Err(EngineError::BadSource {
            path,
            why: "is a stream: a changed-block backup reads at offsets, so give a file or block device".into(),
        });
    };
    let rs = repo.config().region_size as u64;
    let base = &changed.base;
    if base.region_size as u64 != rs {
        return Err(EngineError::Invalid {
            what: "base snapshot",
            why: "its region size differs from the repository's".into(),
        });
    }
    let base_ctx = SnapshotReader::open(repo, &changed.base_id, base)?;
    let mut ranges = changed.ranges.clone();
    if size > base.size {
        ranges.push((base.size, size - base.size));
    }
    let ranges = normalize(&ranges, size, &path)?;
    let n = size.div_ceil(rs);
    let base_n = base.region_count();
    let len_of = |i: u64, total: u64| total.saturating_sub(i * rs).min(rs);
    let mut touched = vec![false; n as usize];
    for (o, e) in &ranges {
        for i in o / rs..e.div_ceil(rs) {
            touched[i as usize] = true;
        }
    }
    for (i, t) in touched.iter_mut().enumerate() {
        let i = i as u64;
        if i >= base_n || len_of(i, size) != len_of(i, base.size) {
            *t = true;
        }
    }
    progress.start(Some(size));

    // The change list is a claim; sample it against the source.
    let mut bytes_read = 0u64;
    if changed.verify_unchanged > 0.0 {
        let threshold = (changed.verify_unchanged.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
        let seed = sample_key();
        let untouched: Vec<u64> = (0..n).filter(|&i| !touched[i as usize]).collect();
        let mut sample: Vec<u64> = untouched
            .iter()
            .copied()
            .filter(|i| {
                let h = blake3::keyed_hash(&seed, &i.to_le_bytes());
                u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) < threshold
            })
            .collect();
        if sample.is_empty() {
            if let Some(&first) = untouched.first() {
                sample.push(first);
            }
        }
        let results: Vec<Result<u64, EngineError>> = threads(workers(repo, 2))?.install(|| {
            sample
                .par_iter()
                .map(|&i| {
                    let len = len_of(i, size) as usize;
                    let mut buf = vec![0u8; len];
                    source.read_at(&mut buf, i * rs)?;
                    let mut h = region_hasher(i * rs);
                    h.update(&buf);
                    if RegionHash::from_hasher(i, h).cv() != base_ctx.region_cv(i as usize) {
                        return Err(EngineError::ChangeListWrong {
                            path: path.clone(),
                            offset: i * rs,
                            len: len as u64,
                        });
                    }
                    Ok(len as u64)
                })
                .collect()
        });
        for r in results {
            bytes_read += r?;
        }
    }

    let ctx = Ctx::new(repo, progress)?;
    let touched_ix: Vec<u64> = (0..n).filter(|&i| touched[i as usize]).collect();
    let read = AtomicU64::new(0);
    let (base_chunks, base_zeros) = (AtomicU64::new(0), AtomicU64::new(0));
    // Region `i` of the new image: the base's, overlaid with the changed
    // bytes read from the source.
    let build = |i: u64| -> Result<RegionBuf, EngineError> {
        let offset = i * rs;
        let len = len_of(i, size) as usize;
        let mut buf = AlignedBuf::default();
        let start = ranges.partition_point(|r| r.1 <= offset);
        // The ranges are merged (`normalize`), so one range holds the whole
        // region or the region keeps some of the base's bytes.
        let whole = ranges
            .get(start)
            .is_some_and(|r| r.0 <= offset && r.1 >= offset + len as u64);
        if i < base_n {
            // A region the source rewrites whole needs only its base's
            // counts (the recipe), not its bytes.
            let (c, z) = if whole {
                base_ctx.tally(&[i as usize])?
            } else {
                base_ctx.region_bytes(i as usize, &mut buf)?
            };
            base_chunks.fetch_add(c, Relaxed);
            base_zeros.fetch_add(z, Relaxed);
        }
        if whole {
            // Every byte is read from the source below.
            buf.reset(len);
        } else if buf.len() != len {
            // The base's last region was shorter, or there was none.
            let mut v = buf[..buf.len().min(len)].to_vec();
            v.resize(len, 0);
            buf = AlignedBuf::from_vec(v);
        }
        for &(o, e) in ranges[start..]
            .iter()
            .take_while(|r| r.0 < offset + len as u64)
        {
            let (a, b) = (o.max(offset), e.min(offset + len as u64));
            source.read_at(&mut buf[(a - offset) as usize..(b - offset) as usize], a)?;
            read.fetch_add(b - a, Relaxed);
        }
        Ok(RegionBuf {
            index: i,
            offset,
            data: buf,
            all_hole: false,
        })
    };
    let pool = threads(workers(repo, 2))?;
    let (work, _, _) = with_uploads(
        &ctx,
        || {
            let r = pool.install(|| {
                touched_ix
                    .par_iter()
                    .try_for_each(|&i| ctx.process(&build(i)?))
            });
            (r, 0)
        },
        || (),
    );
    work?;
    bytes_read += read.load(Relaxed);
    let mut results = ctx.results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut bytes_reused = 0;
    for i in (0..n).filter(|&i| !touched[i as usize]) {
        bytes_reused += len_of(i, size);
        results.push((
            i,
            base_ctx.region_id(i as usize),
            RegionHash::Cv(base_ctx.region_cv(i as usize)),
        ));
        progress.advance(len_of(i, size));
    }
    let digest = (n == 1 && !touched[0]).then_some(base.digest);
    // Re-read regions replaced their base counterparts.
    let mut stats = ctx.counters.stats();
    stats.chunks += base.stats.chunks - base_chunks.load(Relaxed).min(base.stats.chunks);
    stats.zero_bytes += base.stats.zero_bytes - base_zeros.load(Relaxed).min(base.stats.zero_bytes);
    let meta = Meta {
        time_ns,
        opts,
        source: path.display().to_string(),
        size,
        region_size: rs as usize,
        started,
        parent: Some(changed.base_id),
    };
    let redo = std::mem::take(&mut *ctx.redo.lock().unwrap_or_else(|p| p.into_inner()));
    let (id, snapshot) = commit_resending(
        repo,
        results,
        digest,
        stats,
        meta,
        Some(&build),
        redo,
        None::<Counted>,
        None,
    )?;
    progress.finish();
    Ok(BackupReport {
        id,
        snapshot,
        bytes_read,
        bytes_reused,
        zero_bytes_cached: 0,
    })
}

#[cfg(test)]
mod sample_tests {
    use super::pick_distinct;

    #[test]
    fn samples_are_distinct_members_and_depend_on_the_key() {
        let from: Vec<usize> = (0..1000).map(|i| i * 3).collect();
        let a = pick_distinct(from.clone(), 64, &[1; 32]);
        let b = pick_distinct(from.clone(), 64, &[2; 32]);
        for s in [&a, &b] {
            let mut d = s.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 64, "distinct");
            assert!(s.iter().all(|i| i % 3 == 0 && *i < 3000), "members");
        }
        assert_ne!(a, b, "another key, another sample");
        assert_eq!(a, pick_distinct(from, 64, &[1; 32]), "the key decides");
        // Fewer than asked: every one.
        let mut all = pick_distinct(vec![5, 9, 2], 64, &[7; 32]);
        all.sort_unstable();
        assert_eq!(all, vec![2, 5, 9]);
    }
}
