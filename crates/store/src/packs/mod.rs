//! Bucket-backed repositories (format 4): chunk frames, and a copy of every
//! record, in pack objects in an S3-compatible bucket; RocksDB stays the
//! index (where each object lives, reference counts, orphans, snapshots).
//!
//! # Why the index stays local and the packs are self-describing
//!
//! Every backup asks "which of these chunks are stored?" thousands of
//! times a second; that must be a RocksDB lookup, not a request. But a
//! backup must survive the machine that made it, so every pack names its
//! entries in its trailer and every snapshot has its own object: the
//! bucket alone rebuilds the index ([`Store::recover`]).
//!
//! # Landing: a location is written only after its pack is in the bucket
//!
//! `put_region` writes counts and recipes as before, and appends the new
//! frames (and the recipe) to the open pack. A full pack is named by the
//! thread that filled it, outside the write lock, and uploaded on a thread
//! of its own ([`Packs::send_off`]); then it *lands*: the
//! objects it holds get their locations (`chunks` values, `loc:` entries)
//! and the pack its `pack:` accounting. Until then the objects are
//! *pending*: known to this process, readable from memory. So:
//!
//! * an object with a reference entry but no location and not pending was
//!   lost with a process that died before uploading it: `chunks_known`
//!   says "unknown" and the next backup sends it again;
//! * a pack in the bucket without a `pack:` entry was never landed: gc
//!   deletes it;
//! * a commit uploads the open pack with the snapshot's new pages and, at
//!   the same time, the snapshot object (over a slow link: one round trip,
//!   not two); it names that last pack and the packs still on their way.
//!   Once all have landed it checks that every newly live region and its
//!   chunks have landed, and only then commits locally; a failure deletes
//!   the object again. A committed snapshot never names data that is not in the
//!   bucket; an object a crash left names a pack that is not there, so a
//!   rebuild leaves it out (unless all it names is there) and gc deletes
//!   it.
//!
//! # gc
//!
//! The sweep deletes index entries as before and takes each deleted
//! object's bytes off its pack's `pack:` entry, so the cost follows what is
//! forgotten. Then: packs with no live entry are deleted; packs whose dead
//! bytes pass [`REPACK_GARBAGE`] are repacked (live entries copied into new
//! packs, locations switched when those land, then the old pack deleted);
//! packs in the bucket that the index does not know, and snapshot objects
//! of snapshots the index does not hold, are deleted.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use imgstore_bucket::{Bucket, BucketError, BucketSpec, Counts, Tuning};
use imgstore_format::pack::{
    self, loc_key, pack_key, pack_path, Location, PackEntry, PackName, PackStat, SnapshotObject,
    Trailer, FOOTER_LEN, PACK_PREFIX,
};
use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{cf, Id, ObjectKind, RepoConfig, Storage};
use rocksdb::WriteBatch;

use crate::frames::{FrameStore, Item, PageLocations};
use crate::index::Index;
use crate::{Result, StoreError, StoredBytesCheck};

mod cache;
mod recover;

use cache::PackCache;
use recover::take_bucket;

/// Share of a pack's bytes that may be garbage before gc repacks it.
pub const REPACK_GARBAGE: f64 = 0.25;

/// Default target size of a pack object.
pub const DEFAULT_PACK_SIZE: u32 = 32 << 20;

/// A pack is sealed before its target size when it holds at least
/// `1 / EARLY_SEAL_SHARE` of it, the link has room (no pack is on its way
/// to the bucket, or one early pack is: see below), and sending what it
/// holds would take the link at least [`EARLY_SEAL_WORTH`] (at the rate of
/// the last upload; always, before the first): new data that trickles in
/// over a slow link (an incremental backup finds a few MB among GBs it
/// hashes) then crosses it while the backup goes on, instead of all at
/// the commit. Over a fast link the pack waits for its target size as
/// before (the commit's last pack costs little there), so the PUTs do not
/// multiply.
///
/// The link has room when no pack is on its way, or when the packs on
/// their way will have crossed it (at the measured rate) within
/// [`EARLY_SEAL_WORTH`], or (no rate measured yet) when the one on its way
/// is an early pack itself, under half the target size: a pack's answer
/// comes a round trip after its last byte, and with one pack at a time
/// the link idled for that round trip after each (disk-2 of the workload
/// at 150 ms: its data waited in the open pack). Not when packs are queued
/// for longer: a first backup's data comes faster than the link takes it,
/// and its open pack fills to its target size as before (letting a second
/// early pack go behind any one in flight took one of the workload's first
/// backups from 10 PUTs to 47–49, each pack sealed at an eighth of its
/// size).
const EARLY_SEAL_SHARE: usize = 8;
const EARLY_SEAL_WORTH: Duration = Duration::from_millis(100);

/// Largest config object accepted from a bucket.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest snapshot object accepted from a bucket.
const MAX_SNAPSHOT_BYTES: u64 = 16 << 20;

/// Where an object's bytes are until its pack lands.
#[derive(Clone, Copy)]
struct Pending {
    /// Sequence number of the pack holding it.
    seq: u64,
    offset: u64,
    len: u32,
}

/// The pack being filled.
#[derive(Default)]
struct OpenPack {
    seq: u64,
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A sealed pack on its way to the bucket. Sealing (under the write lock)
/// only closes the pack; [`Packs::finish`] hashes its entries and writes
/// its trailer outside the lock, which names it.
pub(crate) struct Sealed {
    seq: u64,
    /// Set by [`Packs::finish`].
    name: PackName,
    entries: Vec<PackEntry>,
    /// The entries; after `finish`, the whole pack object.
    bytes: Arc<Vec<u8>>,
}

#[derive(Default)]
struct Buffers {
    open: OpenPack,
    /// Sealed packs not landed yet, by sequence number (readable), with
    /// their names once finished.
    sealed: HashMap<u64, (Option<PackName>, Arc<Vec<u8>>)>,
    pending: HashMap<[u8; 33], Pending>,
    next_seq: u64,
    /// Uploads in progress, and their bytes.
    inflight: usize,
    inflight_bytes: usize,
    /// When the link will have taken every pack handed to it, as far as
    /// `rate` says (`None`: not known).
    link_free: Option<Instant>,
    /// The first upload failure since the last commit: commits refuse, and
    /// so do writes (the packs they fill would not be committed).
    failed: Option<StoreError>,
    /// Packs handed to upload threads ([`Packs::send_off`]) and not landed.
    shipping: usize,
    /// Bytes per second the link took the last pack upload at (its round
    /// trip left out where one is known): for [`Packs::append`]'s early
    /// seal.
    rate: Option<f64>,
}

/// Packs a store's writes upload at once: each on its own thread, so a
/// write that fills a pack returns while it crosses the link (see
/// [`Packs::send_off`]); a write that fills a third waits for a slot.
const UPLOADS: usize = 2;

/// The bucket side of a store.
pub(crate) struct Packs {
    /// This, for the upload threads it starts.
    me: Weak<Packs>,
    /// Those threads, joined when the store closes.
    uploaders: Mutex<Vec<JoinHandle<()>>>,
    bucket: Bucket,
    storage: Storage,
    buf: Mutex<Buffers>,
    idle: Condvar,
    cache: PackCache,
    /// Snapshots whose object is written and whose local commit is not
    /// yet: gc must not take their objects for strays.
    committing: Mutex<HashSet<Id>>,
    /// Whether this process may write the bucket (`check_owner`). A backup
    /// or a copy starts the check as it opens and waits for it only at its
    /// first bucket write, so over a slow link its round trip overlaps
    /// reading the source instead of preceding it.
    owner: Mutex<OwnerCheck>,
}

/// Where a writer's owner check stands ([`Packs::owned`]).
enum OwnerCheck {
    /// Nothing to wait for: not a writer, a writer that checked as it
    /// opened, or one that is taking the bucket (`init`, `recover`).
    Unneeded,
    /// The owner object's GET is under way; the index's id as read when
    /// the writer opened.
    Ahead(imgstore_bucket::Ahead, Option<Vec<u8>>),
    /// The check failed: it is made again (and fails again) before any
    /// write.
    Refused,
}

/// Request counts and cache figures of a bucket-backed store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketReport {
    /// The bucket's address (`s3://BUCKET/PREFIX` at its endpoint).
    pub url: String,
    pub requests: Counts,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_bytes: u64,
    /// Packs the index knows, their bytes, and the bytes it still points
    /// to (gc repacks past [`REPACK_GARBAGE`]).
    pub packs: u64,
    pub pack_bytes: u64,
    pub pack_live_bytes: u64,
}

/// What [`Store::recover`](crate::Store::recover) rebuilt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoverOutcome {
    pub packs: u64,
    pub chunks: u64,
    pub records: u64,
    pub snapshots: u64,
    /// Objects a snapshot names that no pack holds (`check` names them).
    pub missing: u64,
    /// Packs or objects that failed their checks and were left out.
    pub rejected: u64,
    /// Snapshot objects of commits that did not finish, left out: a
    /// commit pack they name is not in the bucket, and neither is
    /// everything they name (gc deletes them).
    pub unfinished: u64,
    /// Requests the rebuild made.
    pub requests: Counts,
}

fn bucket_err(e: BucketError) -> StoreError {
    match e {
        BucketError::Denied { url, path, detail } => StoreError::Denied {
            url,
            detail: format!("{path}: {detail}"),
        },
        BucketError::Unavailable {
            url,
            op,
            path,
            detail,
        } => StoreError::Unreachable {
            url,
            detail: format!("{op} {path}: {detail}"),
        },
        e => StoreError::Storage(e.to_string()),
    }
}

/// Connects to the bucket a config names.
pub(crate) fn connect(storage: &Storage) -> Result<Bucket> {
    let spec = BucketSpec {
        bucket: storage.bucket.clone(),
        prefix: storage.prefix.clone(),
        endpoint: storage.endpoint.clone(),
        region: storage.region.clone(),
    };
    Bucket::connect(&spec, tuning()).map_err(bucket_err)
}

/// Retries and timeouts; `IMGSTORE_BUCKET_RETRIES` and
/// `IMGSTORE_BUCKET_TIMEOUT` (seconds) override them (tests use short ones).
fn tuning() -> Tuning {
    let mut t = Tuning::default();
    if let Some(n) = std::env::var("IMGSTORE_BUCKET_RETRIES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        t.retries = n;
    }
    if let Some(s) = std::env::var("IMGSTORE_BUCKET_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        t.timeout = std::time::Duration::from_secs(s);
        t.max_backoff = t.max_backoff.min(t.timeout);
    }
    t
}

impl Packs {
    pub(crate) fn new(dir: &Path, storage: &Storage) -> Result<Arc<Packs>> {
        let bucket = connect(storage)?;
        Ok(Arc::new_cyclic(|me| Packs {
            me: me.clone(),
            uploaders: Mutex::default(),
            bucket,
            storage: storage.clone(),
            buf: Mutex::new(Buffers::default()),
            idle: Condvar::new(),
            cache: PackCache::open(dir.join("cache"), storage.cache_bytes),
            committing: Mutex::default(),
            owner: Mutex::new(OwnerCheck::Unneeded),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffers> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_pending(&self, key: &[u8; 33]) -> bool {
        self.lock().pending.contains_key(key)
    }

    /// Appends objects to the open pack; returns the packs sealed as they
    /// reached their target size. Called under the store's write lock.
    fn append(&self, items: &[Item<'_>]) -> Vec<Sealed> {
        let mut b = self.lock();
        let mut sealed = Vec::new();
        for (kind, id, bytes, raw_len) in items {
            let key = kind.key(id);
            if b.pending.contains_key(&key) {
                continue;
            }
            let seq = b.open.seq;
            let offset = b.open.data.len() as u64;
            b.open.data.extend_from_slice(bytes);
            b.open.entries.push(PackEntry {
                kind: *kind,
                id: *id,
                len: bytes.len() as u32,
                raw_len: *raw_len,
                hash: None,
            });
            b.pending.insert(
                key,
                Pending {
                    seq,
                    offset,
                    len: bytes.len() as u32,
                },
            );
            if b.open.data.len() >= self.storage.pack_size as usize {
                sealed.push(Self::seal(&mut b));
            }
        }
        let open = b.open.data.len();
        let room = b.inflight == 0
            || match b.link_free {
                Some(t) => t <= Instant::now() + EARLY_SEAL_WORTH,
                None => b.inflight == 1 && b.inflight_bytes < self.storage.pack_size as usize / 2,
            };
        if room
            && open >= self.storage.pack_size as usize / EARLY_SEAL_SHARE
            && b.rate
                .is_none_or(|r| open as f64 >= r * EARLY_SEAL_WORTH.as_secs_f64())
        {
            sealed.push(Self::seal(&mut b));
        }
        sealed
    }

    /// Seals the open pack (when it holds anything).
    fn seal_open(&self) -> Option<Sealed> {
        let mut b = self.lock();
        (!b.open.entries.is_empty()).then(|| Self::seal(&mut b))
    }

    fn seal(b: &mut Buffers) -> Sealed {
        b.next_seq += 1;
        let next = OpenPack {
            seq: b.next_seq,
            ..Default::default()
        };
        let OpenPack { seq, data, entries } = std::mem::replace(&mut b.open, next);
        let bytes = Arc::new(data);
        b.sealed.insert(seq, (None, bytes.clone()));
        b.inflight += 1;
        b.inflight_bytes += bytes.len();
        // The link takes it after what is ahead of it.
        let now = Instant::now();
        b.link_free = match (b.rate, b.link_free) {
            (Some(r), ahead) if r > 0.0 => Some(
                ahead.filter(|t| *t > now).unwrap_or(now)
                    + Duration::from_secs_f64(bytes.len() as f64 / r),
            ),
            _ => None,
        };
        Sealed {
            seq,
            name: Id::ZERO,
            entries,
            bytes,
        }
    }

    /// Hashes a sealed pack's entries (outside every lock), appends its
    /// trailer and footer, and names it. Until then the pack is readable
    /// but has no name, so gc cannot mistake it for a stray in the bucket
    /// (it is not there yet).
    fn finish(&self, s: &mut Sealed) {
        let mut at = 0usize;
        for e in &mut s.entries {
            let end = at + e.len as usize;
            e.hash = Some(Id::hash(&s.bytes[at..end]));
            at = end;
        }
        let trailer = Trailer {
            entries: std::mem::take(&mut s.entries),
        };
        let (tail, name) = trailer.encode();
        s.entries = trailer.entries;
        let mut b = self.lock();
        // The only other handle is the readable copy in `sealed`; with it
        // taken out the buffer grows in place.
        b.sealed.remove(&s.seq);
        Arc::make_mut(&mut s.bytes).extend_from_slice(&tail);
        b.sealed.insert(s.seq, (Some(name), s.bytes.clone()));
        s.name = name;
        // A commit waits for the names of the packs in flight.
        self.idle.notify_all();
    }

    /// Forgets a sealed pack's pending objects (landed, or lost with a
    /// failed upload) and wakes the waiters.
    fn retire(&self, sealed: &Sealed, failure: Option<&StoreError>) {
        let mut b = self.lock();
        b.sealed.remove(&sealed.seq);
        for e in &sealed.entries {
            let k = e.kind.key(&e.id);
            if b.pending.get(&k).is_some_and(|p| p.seq == sealed.seq) {
                b.pending.remove(&k);
            }
        }
        b.inflight -= 1;
        let sent: usize = sealed.entries.iter().map(|e| e.len as usize).sum();
        b.inflight_bytes = b.inflight_bytes.saturating_sub(sent);
        if let (Some(f), None) = (failure, &b.failed) {
            b.failed = Some(f.again());
        }
        // Waiters wait for all uploads (`drain`) or for a slot
        // (`send_off`).
        self.idle.notify_all();
    }

    /// Waits for every upload; returns the first failure since the last call.
    fn drain(&self) -> Option<StoreError> {
        let mut b = self.lock();
        while b.inflight > 0 {
            b = self.idle.wait(b).unwrap_or_else(|p| p.into_inner());
        }
        b.failed.take()
    }

    /// Bytes of a pending object, when this process holds it.
    fn pending_bytes(&self, key: &[u8; 33]) -> Option<Vec<u8>> {
        let b = self.lock();
        let p = b.pending.get(key)?;
        let data: &[u8] = if p.seq == b.open.seq {
            &b.open.data
        } else {
            &b.sealed.get(&p.seq)?.1
        };
        let (o, l) = (p.offset as usize, p.len as usize);
        data.get(o..o + l).map(|s| s.to_vec())
    }

    fn in_flight_names(&self) -> HashSet<PackName> {
        self.lock()
            .sealed
            .values()
            .filter_map(|(n, _)| *n)
            .collect()
    }
}

impl Packs {
    /// Located or pending in this process: safe to rely on.
    fn located_or_pending(&self, ix: &Index, keys: &[[u8; 33]]) -> Result<Vec<bool>> {
        let loc = located(ix, keys)?;
        Ok(keys
            .iter()
            .zip(loc)
            .map(|(k, l)| l || self.is_pending(k))
            .collect())
    }

    /// Names packs sealed under the write lock (after it is released) and
    /// hands each to a thread that uploads and lands it, at most
    /// [`UPLOADS`] at once: the write returns without waiting for the
    /// bucket's answer. So the last pack an incremental backup fills
    /// before its commit is still crossing the link when the commit
    /// starts, instead of delaying it by a round trip and its transfer
    /// (the snapshot object names it: [`Packs::bucket_commit`]). Its
    /// objects stay pending (readable, and known to `chunks_known`) until
    /// it lands. A failed upload fails the writes after it and the next
    /// commit.
    fn send_off(&self, ix: &Arc<Index>, sealed: Vec<Sealed>) -> Result<()> {
        let mut sealed = sealed.into_iter();
        while let Some(mut s) = sealed.next() {
            if let Err(e) = self.owned(ix) {
                self.retire(&s, Some(&e));
                for rest in sealed {
                    self.retire(&rest, None);
                }
                return Err(e);
            }
            self.finish(&mut s);
            {
                let mut b = self.lock();
                while b.shipping >= UPLOADS {
                    b = self.idle.wait(b).unwrap_or_else(|p| p.into_inner());
                }
                b.shipping += 1;
            }
            let Some(me) = self.me.upgrade() else {
                // Not while `self` is alive (it lives in that `Arc`).
                self.lock().shipping -= 1;
                let _ = self.ship_named(ix, s);
                continue;
            };
            // Taken by the thread; taken back, and uploaded here, if the
            // thread cannot start.
            let slot = Arc::new(Mutex::new(Some(s)));
            let (theirs, ix2) = (slot.clone(), ix.clone());
            let started = std::thread::Builder::new()
                .name("imgstore-pack-upload".into())
                .spawn(move || {
                    let s = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(s) = s {
                        // A failure is kept in `failed` (by `retire`).
                        let _ = me.ship_named(&ix2, s);
                    }
                    me.lock().shipping -= 1;
                    me.idle.notify_all();
                });
            match started {
                Ok(t) => {
                    let mut threads = self.uploaders.lock().unwrap_or_else(|p| p.into_inner());
                    threads.retain(|t| !t.is_finished());
                    threads.push(t);
                }
                Err(_) => {
                    self.lock().shipping -= 1;
                    let s = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(s) = s {
                        let _ = self.ship_named(ix, s);
                    }
                }
            }
        }
        match &self.lock().failed {
            Some(e) => Err(e.again()),
            None => Ok(()),
        }
    }

    /// Uploads a named pack ([`Packs::finish`]) and lands it (takes the
    /// write lock to land), for a writer the bucket's owner check passed.
    /// Page entries are not landed (pages get their counts in the commit
    /// that names them): they are returned with their locations.
    fn ship_named(&self, ix: &Index, sealed: Sealed) -> Result<Vec<([u8; 33], Location)>> {
        let path = pack_path(&sealed.name);
        let started = Instant::now();
        if let Err(e) = self.bucket.put(&path, sealed.bytes.to_vec()) {
            let e = bucket_err(e);
            self.retire(&sealed, Some(&e));
            return Err(e);
        }
        // The rate the link took it at: the upload's time less the round
        // trip its answer took (with small packs over a slow link, half of
        // the time), when one was measured.
        let rtt = self.bucket.rtt_seen().map_or(0.0, |d| d.as_secs_f64());
        let took = started.elapsed().as_secs_f64();
        let wire = if took > 2.0 * rtt { took - rtt } else { took };
        if wire > 0.0 {
            self.lock().rate = Some(sealed.bytes.len() as f64 / wire);
        }
        self.cache.insert(&sealed.name, &sealed.bytes);
        let out = {
            let _guard = ix.lock();
            self.land(ix, &sealed, &HashSet::new())
        };
        self.retire(&sealed, out.as_ref().err());
        out
    }

    /// Writes locations for the objects of an uploaded pack that still
    /// exist and have none (or whose location is in a pack in `retiring`),
    /// and the pack's accounting. Called under the write lock.
    fn land(
        &self,
        ix: &Index,
        sealed: &Sealed,
        retiring: &HashSet<PackName>,
    ) -> Result<Vec<([u8; 33], Location)>> {
        let keys: Vec<[u8; 33]> = sealed.entries.iter().map(|e| e.kind.key(&e.id)).collect();
        let refs = ix.get_refs(&keys)?;
        let current = current_locations(ix, &keys)?;
        let mut batch = WriteBatch::default();
        let mut stat = PackStat {
            size: sealed.bytes.len() as u64,
            ..Default::default()
        };
        let mut pages = Vec::new();
        let mut offset = 0u64;
        let mut seen = HashSet::new();
        for ((e, k), (rc, cur)) in sealed
            .entries
            .iter()
            .zip(&keys)
            .zip(refs.into_iter().zip(current))
        {
            let loc = Location {
                pack: sealed.name,
                offset,
                len: e.len,
            };
            offset += e.len as u64;
            if !seen.insert(*k) {
                continue;
            }
            if e.kind == ObjectKind::Page && rc.is_none() {
                pages.push((*k, loc));
                continue;
            }
            let movable = match cur {
                None => true,
                Some(c) => retiring.contains(&c.pack),
            };
            if rc.is_none() || !movable {
                continue;
            }
            put_location(ix, &mut batch, k, &loc);
            stat.live_entries += 1;
            stat.live_bytes += e.len as u64;
        }
        batch.put_cf(ix.cf(cf::META), pack_key(&sealed.name), stat.encode());
        ix.write_unlogged(batch, "land pack")?;
        Ok(pages)
    }

    /// The bucket part of a commit, before its local batch. Uploads the
    /// open pack with the snapshot's pages that have no location, and at
    /// the same time the snapshot object, which names those packs and
    /// every other pack still in flight (its *commit packs*): over a slow
    /// link the commit then costs one round trip, not two. Then every
    /// upload must succeed, and every region the
    /// snapshot makes live (and its chunks) must have landed, or the
    /// object is deleted again and the commit fails. An object left by a
    /// process that died meanwhile is deleted by gc (the index does not
    /// hold its snapshot), and a rebuild takes it only if everything it
    /// names is in the bucket (`recover`). Returns the new pages'
    /// locations, for the commit batch.
    pub(crate) fn bucket_commit(
        &self,
        ix: &Index,
        snapshot: &[u8],
        pages: &[Vec<u8>],
        parent: Option<&Id>,
    ) -> Result<Vec<([u8; 33], Location)>> {
        self.owned(ix)?;
        let id = Id::hash(snapshot);
        let mut sealed = {
            let _guard = ix.lock();
            let keys: Vec<[u8; 33]> = pages
                .iter()
                .map(|b| ObjectKind::Page.key(&Id::hash(b)))
                .collect();
            let held = self.located_or_pending(ix, &keys)?;
            let items: Vec<Item<'_>> = pages
                .iter()
                .zip(&held)
                .filter(|(_, h)| !**h)
                .map(|(b, _)| (ObjectKind::Page, Id::hash(b), b.as_slice(), b.len() as u32))
                .collect();
            let mut sealed = self.append(&items);
            sealed.extend(self.seal_open());
            sealed
        };
        // Named before they go: the object names them.
        for s in &mut sealed {
            self.finish(s);
        }
        let own: HashSet<u64> = sealed.iter().map(|s| s.seq).collect();
        // So are the packs still on their way (this backup's last ones,
        // sent off by its writes, or another's that this one's chunks
        // were found pending in), instead of the object waiting for them
        // to land: over a slow link, a round trip and their transfer.
        let mut commit_packs: Vec<PackName> = sealed.iter().map(|s| s.name).collect();
        commit_packs.extend(self.names_in_flight(&own));
        let together = commit_packs.len() <= pack::MAX_COMMIT_PACKS;
        let obj = SnapshotObject {
            protected: false,
            parent: parent.copied(),
            commit_packs: if together { commit_packs } else { Vec::new() },
            record: snapshot.to_vec(),
        };
        let path = pack::snapshot_path(&id);
        let (shipped, put) = std::thread::scope(|sc| {
            let ships: Vec<_> = sealed
                .into_iter()
                .map(|s| sc.spawn(move || self.ship_named(ix, s)))
                .collect();
            let mut put: Option<Result<()>> = None;
            // Not at all if an upload failed already: the commit fails.
            // Otherwise only its commit packs can be missing (earlier
            // packs have landed).
            if together && self.lock().failed.is_none() {
                self.begin_commit(id);
                put = Some(self.bucket.put(&path, obj.encode()).map_err(bucket_err));
            }
            let shipped: Vec<Result<_>> = ships
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StoreError::Storage(
                            "the thread uploading a pack panicked".into(),
                        ))
                    })
                })
                .collect();
            (shipped, put)
        });
        let mut page_locs = Vec::new();
        let mut first_err = None;
        for r in shipped {
            match r {
                Ok(l) => page_locs.extend(l),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let failed = self.drain();
        let landed = match (first_err, failed) {
            (Some(e), _) => Err(e),
            (None, Some(f)) => Err(f),
            (None, None) => check_landed(ix, pages, &page_locs),
        };
        let put = match (landed, put) {
            (Ok(()), Some(put)) => put,
            (Ok(()), None) => {
                // More commit packs than an object names: they are all in
                // the bucket now, so the object goes after them.
                self.begin_commit(id);
                let plain = SnapshotObject {
                    commit_packs: Vec::new(),
                    ..obj
                };
                self.bucket.put(&path, plain.encode()).map_err(bucket_err)
            }
            (Err(e), put) => {
                if let Some(Ok(())) = put {
                    // Taken back: this commit fails. If the delete fails
                    // too, gc deletes it (no local snapshot holds it), and
                    // a rebuild sees it name what is not there.
                    let _ = self.bucket.delete(std::slice::from_ref(&path));
                }
                Err(e)
            }
        };
        if let Err(e) = put {
            self.end_commit(&id);
            return Err(e);
        }
        Ok(page_locs)
    }

    /// Names of the packs on their way to the bucket but `own`, once each
    /// is named (a pack is named by the thread that sealed it, just after).
    fn names_in_flight(&self, own: &HashSet<u64>) -> Vec<PackName> {
        let mut b = self.lock();
        loop {
            let names: Option<Vec<PackName>> = b
                .sealed
                .iter()
                .filter(|(s, _)| !own.contains(s))
                .map(|(_, (n, _))| *n)
                .collect();
            if let Some(n) = names {
                return n;
            }
            b = self.idle.wait(b).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A commit is about to write its snapshot object: until
    /// [`Packs::end_commit`], gc does not take it for a stray.
    fn begin_commit(&self, id: Id) {
        self.committing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    /// The local part of a commit is done (or failed): its snapshot object
    /// is an ordinary one again for gc.
    fn end_commit(&self, id: &Id) {
        self.committing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Chunk frames of a bucket-backed store, by the locations view `db`
    /// of the index gives: pending ones from memory, cached packs from
    /// disk, the rest with ranged GETs (adjacent entries of a pack merged
    /// into one request), all packs of the call in parallel. Also returns
    /// the positions of those whose pack no longer exists.
    pub(crate) fn bucket_frames_in(
        &self,
        ix: &Index,
        db: &rocksdb::DB,
        ids: &[Id],
    ) -> Result<(Vec<imgstore_repo::ChunkRead>, Vec<usize>)> {
        use imgstore_repo::ChunkFault;
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
        let locs = locations_in(ix, db, &keys)?;
        let mut out: Vec<imgstore_repo::ChunkRead> = vec![Err(ChunkFault::Missing); ids.len()];
        let mut remote: HashMap<PackName, Vec<(usize, Location)>> = HashMap::new();
        // Not landed yet: readable from this writer's memory while the
        // index still counts it (gc may have collected it meanwhile; its
        // bytes then stay in the pack as garbage, and it is missing).
        let unlanded: Vec<[u8; 33]> = keys
            .iter()
            .zip(&locs)
            .filter(|(_, l)| l.is_none())
            .map(|(k, _)| *k)
            .collect();
        let counted: HashSet<[u8; 33]> = if unlanded.is_empty() {
            HashSet::new()
        } else {
            unlanded
                .iter()
                .zip(ix.get_refs(&unlanded)?)
                .filter(|(_, rc)| rc.is_some())
                .map(|(k, _)| *k)
                .collect()
        };
        for (i, (k, l)) in keys.iter().zip(locs).enumerate() {
            match l {
                None => {
                    if let Some(b) = counted.contains(k).then(|| self.pending_bytes(k)).flatten() {
                        out[i] = Ok(b);
                    }
                }
                Some(l) => match self.cache.read(&l) {
                    Some(b) => out[i] = Ok(b),
                    None => remote.entry(l.pack).or_default().push((i, l)),
                },
            }
        }
        let mut gone = Vec::new();
        if remote.is_empty() {
            return Ok((out, gone));
        }
        // Merge runs of entries of one pack that lie close together.
        const GAP: u64 = 256 << 10;
        const MAX_RUN: u64 = 16 << 20;
        let mut reqs: Vec<(String, std::ops::Range<u64>)> = Vec::new();
        let mut members: Vec<Vec<(usize, Location)>> = Vec::new();
        for (name, mut items) in remote {
            items.sort_by_key(|(_, l)| l.offset);
            let path = pack_path(&name);
            for (i, l) in items {
                let end = l.offset + l.len as u64;
                if let (Some((_, r)), Some(m)) = (reqs.last_mut(), members.last_mut()) {
                    if m[0].1.pack == name && l.offset <= r.end + GAP && end - r.start <= MAX_RUN {
                        r.end = r.end.max(end);
                        m.push((i, l));
                        continue;
                    }
                }
                reqs.push((path.clone(), l.offset..end));
                members.push(vec![(i, l)]);
            }
        }
        let parts: Vec<Vec<std::ops::Range<usize>>> = reqs
            .iter()
            .zip(&members)
            .map(|((_, r), m)| {
                m.iter()
                    .map(|(_, l)| {
                        let o = (l.offset - r.start) as usize;
                        o..o + l.len as usize
                    })
                    .collect()
            })
            .collect();
        for (answer, m) in self
            .bucket
            .get_parts(&reqs, &parts)
            .into_iter()
            .zip(members)
        {
            match answer {
                Ok(frames) => {
                    self.cache.miss(m.len() as u64);
                    for ((i, _), f) in m.into_iter().zip(frames) {
                        out[i] = Ok(f);
                    }
                }
                Err(e @ (BucketError::Unavailable { .. } | BucketError::Denied { .. })) => {
                    return Err(bucket_err(e));
                }
                Err(e) => {
                    let vanished = matches!(e, BucketError::NotFound { .. });
                    for (i, _) in m {
                        out[i] = Err(ChunkFault::Unreadable(e.to_string()));
                        if vanished {
                            gone.push(i);
                        }
                    }
                }
            }
        }
        Ok((out, gone))
    }

    /// gc's bucket part, after the sweep: snapshot objects the index does
    /// not hold, packs it does not know, packs with nothing live, and
    /// repacking of packs mostly garbage. Returns whether any pack was
    /// deleted or rewritten.
    pub(crate) fn bucket_gc(&self, ix: &Index) -> Result<bool> {
        // Checked again here, not only at open: a long-running writer (a
        // server) must not delete what a `recover` elsewhere now owns.
        self.check_owner(ix)?;
        // Snapshot objects: delete strays (a commit that died before its
        // local batch), upload missing ones (a PUT that failed after it).
        {
            let _guard = ix.lock();
            let listed: HashSet<Id> = listed_snapshots(&self.bucket)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let local: HashMap<Id, Vec<u8>> = ix
                .snapshot_records()?
                .into_iter()
                .filter_map(|(k, v)| Some((Id::from_slice(&k)?, v)))
                .collect();
            let committing = self
                .committing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let strays: Vec<String> = listed
                .iter()
                .filter(|id| !local.contains_key(id) && !committing.contains(id))
                .map(pack::snapshot_path)
                .collect();
            self.bucket.delete(&strays).map_err(bucket_err)?;
            for id in local.keys().filter(|id| !listed.contains(id)) {
                self.put_snapshot_object(ix, id)?;
            }
        }
        let mut changed = false;
        let known = pack_stats(ix)?;
        let inflight = self.in_flight_names();
        let unknown: Vec<PackName> = listed_packs(&self.bucket)?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !known.contains_key(n) && !inflight.contains(n))
            .collect();
        if !unknown.is_empty() {
            // Re-read under the lock: a pack that landed since the listing
            // is known now.
            let _guard = ix.lock();
            let now = pack_stats(ix)?;
            let inflight = self.in_flight_names();
            let gone: Vec<String> = unknown
                .iter()
                .filter(|n| !now.contains_key(n) && !inflight.contains(n))
                .map(pack_path)
                .collect();
            changed |= !gone.is_empty();
            self.bucket.delete(&gone).map_err(bucket_err)?;
        }
        // Dead packs: the accounting goes first (synced), then the object;
        // a crash between leaves an unknown pack, deleted next time.
        let dead: Vec<PackName> = known
            .iter()
            .filter(|(_, s)| s.live_entries == 0)
            .map(|(n, _)| *n)
            .collect();
        if !dead.is_empty() {
            let _guard = ix.lock();
            let mut b = WriteBatch::default();
            for n in &dead {
                b.delete_cf(ix.cf(cf::META), pack_key(n));
            }
            ix.write_synced(b, "gc packs")?;
            self.bucket
                .delete(&dead.iter().map(pack_path).collect::<Vec<_>>())
                .map_err(bucket_err)?;
            changed = true;
        }
        let sparse: Vec<PackName> = known
            .iter()
            .filter(|(_, s)| {
                s.live_entries > 0 && (s.live_bytes as f64) < s.size as f64 * (1.0 - REPACK_GARBAGE)
            })
            .map(|(n, _)| *n)
            .collect();
        for group in sparse.chunks(8) {
            self.repack(ix, group)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Copies the live entries of `packs` into new packs, switches their
    /// locations, then deletes the old packs.
    fn repack(&self, ix: &Index, packs: &[PackName]) -> Result<()> {
        let retiring: HashSet<PackName> = packs.iter().copied().collect();
        let mut sealed = Vec::new();
        for name in packs {
            let path = pack_path(name);
            let bytes = match self.cache.whole(name) {
                Some(b) => b,
                None => self
                    .bucket
                    .get(&path, pack::MAX_PACK_BYTES)
                    .map_err(bucket_err)?,
            };
            let trailer = read_trailer(&bytes, name)?;
            let _guard = ix.lock();
            let keys: Vec<[u8; 33]> = trailer.entries.iter().map(|e| e.kind.key(&e.id)).collect();
            let cur = current_locations(ix, &keys)?;
            let mut items = Vec::new();
            for ((e, off), c) in trailer.entries.iter().zip(trailer.offsets()).zip(cur) {
                if c.is_some_and(|c| c.pack == *name && c.offset == off) {
                    let s = &bytes[off as usize..off as usize + e.len as usize];
                    items.push((e.kind, e.id, s, e.raw_len));
                }
            }
            // Objects still pending elsewhere are skipped by append; these
            // are located, so none is.
            sealed.extend(self.append(&items));
        }
        sealed.extend(self.seal_open());
        let mut failed = None;
        for mut s in sealed {
            if failed.is_some() {
                // Nothing more is uploaded; the pack's objects keep their
                // old locations.
                self.retire(&s, None);
                continue;
            }
            self.finish(&mut s);
            if let Err(e) = self.bucket.put(&pack_path(&s.name), s.bytes.to_vec()) {
                let e = bucket_err(e);
                self.retire(&s, Some(&e));
                failed = Some(e);
                continue;
            }
            self.cache.insert(&s.name, &s.bytes);
            let _guard = ix.lock();
            let r = self.land(ix, &s, &retiring);
            self.retire(&s, r.as_ref().err());
            if let Err(e) = r {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            // The old packs stay: every object still has a location.
            self.drain();
            return Err(e);
        }
        self.drain();
        // The new locations are made durable before the old packs go.
        let _guard = ix.lock();
        ix.flush_all()?;
        let mut b = WriteBatch::default();
        for n in packs {
            b.delete_cf(ix.cf(cf::META), pack_key(n));
        }
        ix.write_synced(b, "repack")?;
        self.bucket
            .delete(&packs.iter().map(pack_path).collect::<Vec<_>>())
            .map_err(bucket_err)?;
        for n in packs {
            self.cache.remove(n);
        }
        Ok(())
    }

    /// Writes (or rewrites) a snapshot's object from the local index.
    pub(crate) fn put_snapshot_object(&self, ix: &Index, id: &Id) -> Result<()> {
        self.owned(ix)?;
        let record = ix.snapshot_record(id)?;
        let obj = SnapshotObject {
            commit_packs: Vec::new(),
            protected: ix.protected()?.contains(id),
            parent: ix
                .parents()?
                .into_iter()
                .find(|(c, _)| c == id)
                .map(|(_, parent)| parent),
            record,
        };
        self.bucket
            .put(&pack::snapshot_path(id), obj.encode())
            .map_err(bucket_err)
    }

    /// Deletes snapshot objects (after a local forget or replace).
    fn delete_snapshot_objects(&self, ids: &[Id]) -> Result<()> {
        self.bucket
            .delete(&ids.iter().map(pack::snapshot_path).collect::<Vec<_>>())
            .map_err(bucket_err)
    }

    /// `check` of the bucket: every pack the index knows is there with its
    /// size; with `read_data`, each pack's trailer matches its name and every
    /// record's copy hashes to its id. Returns one line per problem.
    pub(crate) fn check_bucket(&self, ix: &Index, read_data: bool) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        // Every snapshot has its object (a rebuild from the bucket needs
        // it); gc uploads a missing one.
        let objects: HashSet<Id> = listed_snapshots(&self.bucket)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for (k, _) in ix.snapshot_records()? {
            if let Some(id) = Id::from_slice(&k).filter(|id| !objects.contains(id)) {
                problems.push(format!(
                    "snapshot {id} has no object in {}: a rebuild from the bucket would miss it (the next gc uploads it)",
                    self.bucket.url()
                ));
            }
        }
        let known = pack_stats(ix)?;
        let listed: HashMap<PackName, u64> = listed_packs(&self.bucket)?.into_iter().collect();
        let mut names: Vec<&PackName> = known.keys().collect();
        names.sort();
        for n in names {
            let st = known[n];
            match listed.get(n) {
                None => problems.push(format!(
                    "pack {n} is missing from {} ({} live objects in it)",
                    self.bucket.url(),
                    st.live_entries
                )),
                Some(len) if *len != st.size => problems.push(format!(
                    "pack {n} in {} is {len} bytes, the index says {}",
                    self.bucket.url(),
                    st.size
                )),
                Some(_) if read_data => {
                    if let Err(e) = self.check_pack_records(n, st.size) {
                        problems.push(e);
                    }
                }
                Some(_) => {}
            }
        }
        Ok(problems)
    }

    /// Without the key: every pack the index knows and the bucket lists
    /// at its size is read whole, checked against its name, and each entry
    /// against the hash its trailer records. (Missing and wrong-sized
    /// packs are [`Packs::check_bucket`]'s to report.)
    pub(crate) fn check_packs_without_key(
        &self,
        ix: &Index,
    ) -> Result<crate::integrity::StoredBytesCheck> {
        let mut out = crate::integrity::StoredBytesCheck::default();
        let listed: HashMap<PackName, u64> = listed_packs(&self.bucket)?.into_iter().collect();
        let mut known: Vec<(PackName, PackStat)> = pack_stats(ix)?.into_iter().collect();
        known.sort_by_key(|(n, _)| *n);
        for (name, st) in known {
            if listed.get(&name) != Some(&st.size) {
                continue;
            }
            let bytes = match self.bucket.get(&pack_path(&name), pack::MAX_PACK_BYTES) {
                Ok(b) => b,
                Err(e) => {
                    out.problems.push(format!("pack {name}: {e}"));
                    continue;
                }
            };
            let trailer = match read_trailer(&bytes, &name) {
                Ok(t) => t,
                Err(e) => {
                    out.problems.push(format!(
                        "pack {name} is altered in {}: {e}",
                        self.bucket.url()
                    ));
                    continue;
                }
            };
            if trailer.entries.iter().any(|e| e.hash.is_none()) {
                out.unhashed_packs += 1;
                continue;
            }
            for (e, off) in trailer.entries.iter().zip(trailer.offsets()) {
                let stored = &bytes[off as usize..off as usize + e.len as usize];
                out.objects += 1;
                out.bytes += e.len as u64;
                if e.hash != Some(Id::hash(stored)) {
                    out.problems.push(format!(
                        "pack {name} in {}: the {} {} in it is altered",
                        self.bucket.url(),
                        e.kind.name(),
                        e.id
                    ));
                }
            }
        }
        Ok(out)
    }

    fn check_pack_records(&self, name: &PackName, size: u64) -> std::result::Result<(), String> {
        let trailer = fetch_trailer(&self.bucket, name, size).map_err(|e| e.to_string())?;
        let reqs: Vec<(String, std::ops::Range<u64>)> = trailer
            .entries
            .iter()
            .zip(trailer.offsets())
            .filter(|(e, _)| e.kind != ObjectKind::Chunk)
            .map(|(e, o)| (pack_path(name), o..o + e.len as u64))
            .collect();
        let ids: Vec<Id> = trailer
            .entries
            .iter()
            .filter(|e| e.kind != ObjectKind::Chunk)
            .map(|e| e.id)
            .collect();
        for (r, id) in self.bucket.get_ranges(&reqs).into_iter().zip(ids) {
            let b = r.map_err(|e| e.to_string())?;
            if Id::hash(&b) != id {
                return Err(format!(
                    "pack {name}: the copy of record {id} in it is altered"
                ));
            }
        }
        Ok(())
    }

    /// Creates the bucket side of a new repository: refuses a prefix that
    /// already holds one, then writes the config object.
    fn init_bucket(&self, ix: &Index, config: &RepoConfig) -> Result<()> {
        let bucket = &self.bucket;
        if bucket
            .size(pack::CONFIG_OBJECT)
            .map_err(bucket_err)?
            .is_some()
        {
            return Err(StoreError::Invalid(format!(
                "{} already holds a repository: recover it with `imgstore -r DIR recover {}`",
                bucket.url(),
                bucket.url()
            )));
        }
        bucket
            .put(pack::CONFIG_OBJECT, config.to_json())
            .map_err(bucket_err)?;
        take_bucket(ix, bucket)
    }

    /// A writer checks that its index still owns the bucket: after a
    /// `recover` elsewhere this directory is stale, and its gc would delete
    /// what the new index wrote.
    pub(crate) fn check_owner(&self, ix: &Index) -> Result<()> {
        let mine = index_id(ix)?;
        self.judge_owner(mine, self.bucket.get(pack::OWNER_OBJECT, MAX_CONFIG_BYTES))
    }

    /// Starts [`Packs::check_owner`] for a writer that will not write the
    /// bucket at once; [`Packs::owned`] takes its answer.
    fn check_owner_ahead(&self, ix: &Index) -> Result<()> {
        let mine = index_id(ix)?;
        let ahead = self.bucket.get_ahead(pack::OWNER_OBJECT, MAX_CONFIG_BYTES);
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = OwnerCheck::Ahead(ahead, mine);
        Ok(())
    }

    /// Before a write to the bucket: the owner check started ahead has
    /// passed (waiting for its answer if it has not come yet). A refused
    /// check refuses every write after it.
    fn owned(&self, ix: &Index) -> Result<()> {
        let mut state = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        let out = match std::mem::replace(&mut *state, OwnerCheck::Refused) {
            OwnerCheck::Unneeded => Ok(()),
            OwnerCheck::Ahead(ahead, mine) => self.judge_owner(mine, self.bucket.wait(ahead)),
            OwnerCheck::Refused => self.check_owner(ix),
        };
        if out.is_ok() {
            *state = OwnerCheck::Unneeded;
        }
        out
    }

    /// Whether the bucket's owner object (`theirs`, as its GET answered)
    /// names this index (`mine`).
    fn judge_owner(
        &self,
        mine: Option<Vec<u8>>,
        theirs: std::result::Result<Vec<u8>, BucketError>,
    ) -> Result<()> {
        let theirs = match theirs {
            Ok(b) => Some(
                pack::Owner::decode(&b).map_err(|source| StoreError::Format {
                    path: PathBuf::from(format!("{}/{}", self.bucket.url(), pack::OWNER_OBJECT)),
                    source,
                })?,
            ),
            Err(BucketError::NotFound { .. }) => None,
            Err(e) => return Err(bucket_err(e)),
        };
        match (mine, theirs) {
            (Some(m), Some(o)) if m == o.index.as_bytes() => Ok(()),
            (_, Some(o)) => Err(StoreError::Storage(format!(
                "{}: the bucket is written by another index (host {:?}, since {} s after the epoch, made by `imgstore recover`); this directory is stale: use that one, or rebuild here with `imgstore -r NEWDIR recover {}`",
                self.bucket.url(),
                o.host,
                o.since,
                self.bucket.url()
            ))),
            (_, None) => Err(StoreError::Storage(format!(
                "{}: the bucket has no owner object: run `imgstore -r NEWDIR recover {}` to rebuild an index that owns it",
                self.bucket.url(),
                self.bucket.url()
            ))),
        }
    }
}

/// This index's id, as the bucket's owner object must name it.
fn index_id(ix: &Index) -> Result<Option<Vec<u8>>> {
    ix.db
        .get_cf(ix.cf(cf::META), pack::META_INDEX_KEY)
        .map_err(|e| ix.db_err("read the index id", e))
}

/// The bucket as the frame store: what each step of the store does with
/// packs (module docs: landing, commits, gc).
impl FrameStore for Packs {
    fn blob_files(&self) -> bool {
        false
    }

    fn created(&self, ix: &Index, config: &RepoConfig) -> Result<()> {
        self.init_bucket(ix, config)
    }

    fn writer_opened(&self, ix: &Index, operation: &str) -> Result<()> {
        // `init` and `recover` are about to take the bucket.
        match operation {
            "init" | "recover" => Ok(()),
            // Their first bucket write waits for it (`owned`); nothing
            // else they do before it outlives a refusal: a backup's local
            // region batches are orphans its own gc would take, and that
            // gc checks again.
            "backup" | "copy" => self.check_owner_ahead(ix),
            _ => self.check_owner(ix),
        }
    }

    /// Counted is not enough: the frame must be in the bucket (or on its
    /// way there from this process).
    fn held(&self, ix: &Index, keys: &[[u8; 33]]) -> Result<Vec<bool>> {
        self.located_or_pending(ix, keys)
    }

    fn put_chunk<'a>(
        &self,
        _: &Index,
        _: &mut WriteBatch,
        out: &mut Vec<Item<'a>>,
        item: Item<'a>,
    ) {
        out.push(item);
    }

    fn put_record_copy<'a>(&self, out: &mut Vec<Item<'a>>, item: Item<'a>) {
        out.push(item);
    }

    /// A damaged chunk loses its old location in `batch`, so the new
    /// copy's lands.
    fn replace_chunks<'a>(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        out: &mut Vec<Item<'a>>,
        items: Vec<Item<'a>>,
    ) -> Result<()> {
        let keys: Vec<[u8; 33]> = items.iter().map(|(k, id, ..)| k.key(id)).collect();
        for (_, id, ..) in &items {
            batch.delete_cf(ix.cf(cf::CHUNKS), id.as_bytes());
        }
        unlocate(ix, batch, &keys)?;
        out.extend(items);
        Ok(())
    }

    /// Appends to the open pack under the lock; a pack that filled up is
    /// sent off after it is released ([`Packs::send_off`]).
    fn written(
        &self,
        ix: &Arc<Index>,
        guard: std::sync::MutexGuard<'_, ()>,
        out: Vec<Item<'_>>,
    ) -> Result<()> {
        let sealed = self.append(&out);
        drop(guard);
        self.send_off(ix, sealed)
    }

    /// Joins the upload threads: their packs land before the index closes.
    fn close(&self) {
        let threads =
            std::mem::take(&mut *self.uploaders.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    fn read(
        &self,
        ix: &Index,
        db: &rocksdb::DB,
        ids: &[Id],
    ) -> Result<(Vec<imgstore_repo::ChunkRead>, Vec<usize>)> {
        self.bucket_frames_in(ix, db, ids)
    }

    /// By pack and offset, so reads of one pack merge into ranged GETs;
    /// chunks without a location (missing) go last.
    fn read_order(&self, ix: &Index, ids: &[Id]) -> Result<Vec<usize>> {
        let mut at = Vec::with_capacity(ids.len());
        for (n, group) in ids.chunks(8192).enumerate() {
            let keys: Vec<[u8; 33]> = group.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
            for (i, l) in current_locations(ix, &keys)?.into_iter().enumerate() {
                at.push((
                    l.map(|l| (0u8, l.pack, l.offset))
                        .unwrap_or((1, Id::ZERO, 0)),
                    n * 8192 + i,
                ));
            }
        }
        at.sort_unstable();
        Ok(at.into_iter().map(|(_, i)| i).collect())
    }

    fn prepare_commit(
        &self,
        ix: &Index,
        snapshot: &[u8],
        pages: &[Vec<u8>],
        parent: Option<&Id>,
    ) -> Result<PageLocations> {
        self.bucket_commit(ix, snapshot, pages, parent)
    }

    fn in_commit(
        &self,
        ix: &Index,
        batch: &mut WriteBatch,
        added: &HashSet<[u8; 33]>,
        pages: &PageLocations,
    ) -> Result<()> {
        commit_page_locations(ix, batch, added, pages)
    }

    fn committed(&self, id: &Id) {
        self.end_commit(id);
    }

    /// The bucket's copy carries protection and parent too, for a rebuild.
    fn snapshot_changed(&self, ix: &Index, id: &Id) -> Result<()> {
        self.put_snapshot_object(ix, id)
    }

    fn snapshots_removed(&self, ids: &[Id]) -> Result<()> {
        self.delete_snapshot_objects(ids)
    }

    fn objects_removed(&self, ix: &Index, batch: &mut WriteBatch, keys: &[[u8; 33]]) -> Result<()> {
        // Locations are read before the chunk keys are deleted in `batch`
        // (the batch is not visible to reads).
        unlocate(ix, batch, keys)?;
        for k in keys.iter().filter(|k| k[0] == b'C') {
            batch.delete_cf(ix.cf(cf::CHUNKS), &k[1..]);
        }
        Ok(())
    }

    /// The data is in packs: gc deletes and repacks them.
    fn reclaim(&self, ix: &Index) -> Result<bool> {
        self.bucket_gc(ix)
    }

    fn verify(&self, ix: &Index, _: bool) -> Result<StoredBytesCheck> {
        self.check_packs_without_key(ix)
    }

    fn check(&self, ix: &Index, read_data: bool) -> Result<Vec<String>> {
        self.check_bucket(ix, read_data)
    }

    /// One more reader per 10 ms of the bucket's round trip (at most 32),
    /// as for a server: a restore worker waits a round trip for each
    /// region's ranged GETs.
    fn in_flight(&self) -> usize {
        let rtt = self.bucket.rtt();
        ((rtt.as_micros() + 5_000) / 10_000).min(32) as usize
    }

    /// Two: a `put_region` that fills a pack (32 MiB by default) waits
    /// for an upload slot when both are taken ([`UPLOADS`]), so the
    /// backup's workers hand their regions to two uploader threads and go
    /// on chunking meanwhile.
    fn uploads_in_flight(&self) -> usize {
        2
    }

    fn report(&self, ix: &Index) -> Option<BucketReport> {
        let (hits, misses, bytes) = self.cache.figures();
        let packs = pack_stats(ix).unwrap_or_default();
        Some(BucketReport {
            url: self.bucket.url().to_string(),
            requests: self.bucket.counts(),
            cache_hits: hits,
            cache_misses: misses,
            cache_bytes: bytes,
            packs: packs.len() as u64,
            pack_bytes: packs.values().map(|p| p.size).sum(),
            pack_live_bytes: packs.values().map(|p| p.live_bytes).sum(),
        })
    }

    fn external_bytes(&self, ix: &Index) -> Result<u64> {
        Ok(pack_stats(ix)?.values().map(|s| s.size).sum())
    }

    /// Writes the config object again (after `key add|remove|passwd`): a
    /// rebuild from the bucket must be able to open the repository.
    fn config_saved(&self, bytes: &[u8]) -> Result<()> {
        self.bucket
            .put(pack::CONFIG_OBJECT, bytes.to_vec())
            .map_err(bucket_err)
    }
}

/// Which of `keys` have a location (landed in the bucket).
pub(crate) fn located(ix: &Index, keys: &[[u8; 33]]) -> Result<Vec<bool>> {
    Ok(current_locations(ix, keys)?
        .iter()
        .map(Option::is_some)
        .collect())
}

fn put_location(ix: &Index, batch: &mut WriteBatch, key: &[u8; 33], loc: &Location) {
    match key[0] {
        b'C' => batch.put_cf(ix.cf(cf::CHUNKS), &key[1..], loc.encode()),
        _ => batch.put_cf(ix.cf(cf::META), loc_key(key), loc.encode()),
    }
}

/// Current locations of objects (None: not landed).
pub(crate) fn current_locations(ix: &Index, keys: &[[u8; 33]]) -> Result<Vec<Option<Location>>> {
    locations_in(ix, &ix.db, keys)
}

/// Locations of `keys` as view `db` of the index has them.
fn locations_in(ix: &Index, db: &rocksdb::DB, keys: &[[u8; 33]]) -> Result<Vec<Option<Location>>> {
    let cf = |name| db.cf_handle(name).expect("column family exists");
    let (chunks, meta) = (cf(cf::CHUNKS), cf(cf::META));
    let lookups: Vec<(&rocksdb::ColumnFamily, Vec<u8>)> = keys
        .iter()
        .map(|k| match k[0] {
            b'C' => (chunks, k[1..].to_vec()),
            _ => (meta, loc_key(k)),
        })
        .collect();
    db.multi_get_cf(lookups.iter().map(|(c, k)| (*c, k.as_slice())))
        .into_iter()
        .zip(keys)
        .map(|(r, k)| match r {
            Ok(None) => Ok(None),
            Ok(Some(v)) => Location::decode(&v).map(Some).map_err(|source| {
                let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
                StoreError::Corrupt { kind, id, source }
            }),
            Err(e) => Err(ix.db_err("read locations", e)),
        })
        .collect()
}

/// Every page of the commit is located or being committed now, every
/// region a page names is located, and every chunk of a region the
/// commit makes live is located.
fn check_landed(ix: &Index, pages: &[Vec<u8>], page_locs: &[([u8; 33], Location)]) -> Result<()> {
    let committing: HashSet<[u8; 33]> = page_locs.iter().map(|(k, _)| *k).collect();
    let pkeys: Vec<[u8; 33]> = pages
        .iter()
        .map(|b| ObjectKind::Page.key(&Id::hash(b)))
        .collect();
    let loc = located(ix, &pkeys)?;
    let mut regions = HashSet::new();
    for ((k, b), l) in pkeys.iter().zip(pages).zip(loc) {
        if !l && !committing.contains(k) {
            return Err(not_landed(k));
        }
        let (_, id) = ObjectKind::parse_key(k).expect("33-byte key");
        let rs = record_children(RecordKind::Page, b).map_err(|source| StoreError::Corrupt {
            kind: ObjectKind::Page,
            id,
            source,
        })?;
        regions.extend(rs.into_iter().map(|r| ObjectKind::Region.key(&r)));
    }
    let rkeys: Vec<[u8; 33]> = regions.into_iter().collect();
    for chunk in rkeys.chunks(4096) {
        let loc = located(ix, chunk)?;
        let rcs = ix.get_refs(chunk)?;
        let mut newly_live = Vec::new();
        for ((k, l), rc) in chunk.iter().zip(loc).zip(rcs) {
            if rc.is_none() {
                // Never stored at all: the commit names what no one sent.
                let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
                return Err(StoreError::Missing { kind, id });
            }
            if !l {
                return Err(not_landed(k));
            }
            if rc.is_some_and(|r| r.count == 0) {
                newly_live.push(*k);
            }
        }
        for k in newly_live {
            let (_, rid) = ObjectKind::parse_key(&k).expect("33-byte key");
            let rec = ix.raw_records(ObjectKind::Region, &[rid])?.remove(0);
            let cs = record_children(RecordKind::Region, &rec).map_err(|source| {
                StoreError::Corrupt {
                    kind: ObjectKind::Region,
                    id: rid,
                    source,
                }
            })?;
            let ckeys: Vec<[u8; 33]> = cs.iter().map(|c| ObjectKind::Chunk.key(c)).collect();
            for (ck, l) in ckeys.iter().zip(located(ix, &ckeys)?) {
                if !l {
                    return Err(not_landed(ck));
                }
            }
        }
    }
    Ok(())
}

fn not_landed(key: &[u8; 33]) -> StoreError {
    let (kind, id) = ObjectKind::parse_key(key).expect("33-byte key");
    StoreError::Unreadable {
        kind,
        id,
        detail: "it never reached the bucket (an upload failed): run the backup again".into(),
    }
}

/// The commit batch's part: locations of the committed pages and their
/// packs' accounting.
pub(crate) fn commit_page_locations(
    ix: &Index,
    batch: &mut WriteBatch,
    added: &HashSet<[u8; 33]>,
    page_locs: &[([u8; 33], Location)],
) -> Result<()> {
    let mut by_pack: HashMap<PackName, (u32, u64)> = HashMap::new();
    let mut done = HashSet::new();
    for (k, loc) in page_locs {
        if !added.contains(k) || !done.insert(*k) {
            continue;
        }
        put_location(ix, batch, k, loc);
        let e = by_pack.entry(loc.pack).or_default();
        e.0 += 1;
        e.1 += loc.len as u64;
    }
    for (name, (n, bytes)) in by_pack {
        let mut st = pack_stat(ix, &name)?.unwrap_or_default();
        st.live_entries += n;
        st.live_bytes += bytes;
        batch.put_cf(ix.cf(cf::META), pack_key(&name), st.encode());
    }
    Ok(())
}

fn pack_stat(ix: &Index, name: &PackName) -> Result<Option<PackStat>> {
    ix.db
        .get_pinned_cf(ix.cf(cf::META), pack_key(name))
        .map_err(|e| ix.db_err("read pack stat", e))?
        .map(|v| {
            PackStat::decode(&v).map_err(|source| StoreError::Format {
                path: ix.dir.join(imgstore_format::DB_DIR),
                source,
            })
        })
        .transpose()
}

/// In a sweep batch: drops the locations of deleted objects and takes
/// them off their packs' accounting.
pub(crate) fn unlocate(ix: &Index, batch: &mut WriteBatch, deleted: &[[u8; 33]]) -> Result<()> {
    if deleted.is_empty() {
        return Ok(());
    }
    let locs = current_locations(ix, deleted)?;
    let mut by_pack: HashMap<PackName, (u32, u64)> = HashMap::new();
    for (k, l) in deleted.iter().zip(locs) {
        if k[0] != b'C' {
            batch.delete_cf(ix.cf(cf::META), loc_key(k));
        }
        if let Some(l) = l {
            let e = by_pack.entry(l.pack).or_default();
            e.0 += 1;
            e.1 += l.len as u64;
        }
    }
    for (name, (n, bytes)) in by_pack {
        if let Some(mut st) = pack_stat(ix, &name)? {
            st.live_entries = st.live_entries.saturating_sub(n);
            st.live_bytes = st.live_bytes.saturating_sub(bytes);
            batch.put_cf(ix.cf(cf::META), pack_key(&name), st.encode());
        }
    }
    Ok(())
}

/// Every `pack:` entry.
pub(crate) fn pack_stats(ix: &Index) -> Result<HashMap<PackName, PackStat>> {
    let mut out = HashMap::new();
    ix.scan_meta(PACK_PREFIX, "read pack stats", |k, v| {
        if let (Some(n), Ok(s)) = (Id::from_slice(&k[PACK_PREFIX.len()..]), PackStat::decode(v)) {
            out.insert(n, s);
        }
        Ok(true)
    })?;
    Ok(out)
}

/// The packs in the bucket, by name, with their sizes (other objects
/// under `packs/` are ignored).
fn listed_packs(bucket: &Bucket) -> Result<Vec<(PackName, u64)>> {
    Ok(bucket
        .list(pack::PACKS_DIR)
        .map_err(bucket_err)?
        .into_iter()
        .filter_map(|(path, len)| Some((pack::parse_pack_path(&path)?, len)))
        .collect())
}

/// The snapshot objects in the bucket, by id, with their sizes.
fn listed_snapshots(bucket: &Bucket) -> Result<Vec<(Id, u64)>> {
    Ok(bucket
        .list(pack::SNAPSHOTS_DIR)
        .map_err(bucket_err)?
        .into_iter()
        .filter_map(|(path, len)| Some((pack::parse_snapshot_path(&path)?, len)))
        .collect())
}

/// Reads and checks a pack's trailer with one suffix GET (two when the
/// trailer is longer than the first guess).
fn fetch_trailer(bucket: &Bucket, name: &PackName, len: u64) -> Result<Trailer> {
    let path = pack_path(name);
    let bad = |source| StoreError::Format {
        path: PathBuf::from(format!("{}/{path}", bucket.url())),
        source,
    };
    if !(FOOTER_LEN as u64..=pack::MAX_PACK_BYTES).contains(&len) {
        return Err(bad(imgstore_format::FormatError::Invalid {
            what: "pack",
            why: format!("{len} bytes"),
        }));
    }
    let guess = len.min(64 << 10);
    let tail = bucket
        .get_ranges(&[(path.clone(), len - guess..len)])
        .pop()
        .expect("one answer")
        .map_err(bucket_err)?;
    let footer = pack::decode_footer(&tail[tail.len() - FOOTER_LEN..], len).map_err(bad)?;
    let tlen = footer.trailer_len as u64;
    let need = tlen + FOOTER_LEN as u64;
    let trailer_bytes = if need <= guess {
        tail[(guess - need) as usize..tail.len() - FOOTER_LEN].to_vec()
    } else {
        bucket
            .get_ranges(&[(path.clone(), len - need..len - FOOTER_LEN as u64)])
            .pop()
            .expect("one answer")
            .map_err(bucket_err)?
    };
    pack::decode_trailer(&trailer_bytes, footer.version, name, len).map_err(bad)
}

/// The trailer of a whole pack in memory.
fn read_trailer(bytes: &[u8], name: &PackName) -> Result<Trailer> {
    let bad = |source| StoreError::Format {
        path: PathBuf::from(pack_path(name)),
        source,
    };
    let len = bytes.len() as u64;
    if bytes.len() < FOOTER_LEN {
        return Err(bad(imgstore_format::FormatError::Invalid {
            what: "pack",
            why: format!("{len} bytes"),
        }));
    }
    let footer = pack::decode_footer(&bytes[bytes.len() - FOOTER_LEN..], len).map_err(bad)?;
    let start = bytes.len() - FOOTER_LEN - footer.trailer_len as usize;
    pack::decode_trailer(
        &bytes[start..bytes.len() - FOOTER_LEN],
        footer.version,
        name,
        len,
    )
    .map_err(bad)
}
