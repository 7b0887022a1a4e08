//! The storage seam: what the engine needs from a repository, and nothing
//! about how it is kept.
//!
//! The engine (backup, restore, check, diff, the NBD and FUSE readers)
//! reaches storage only through [`Repository`]. Implementations:
//!
//! * `imgstore_store::Store` — the local RocksDB repository (the only crate
//!   that links RocksDB);
//! * [`MemRepo`] — everything in memory, with the same reference-count,
//!   orphan, healing and gc rules, so the pipelines can be unit-tested
//!   without a database and with damage injected on purpose;
//! * `imgstore_remote::RemoteRepo` — a repository on an `imgstore server`;
//!   a bucket-backed repository is a `Store` whose frames live in packs
//!   (`docs/REMOTE.md`).
//!
//! # Why the interface is shaped this way
//!
//! Every call that touches chunks takes a batch ([`Repository::chunks_known`],
//! [`Repository::chunk_frames`]) and the unit of writing is a whole region
//! ([`Repository::put_region`]) with only the chunks the repository lacks:
//! a remote implementation pays one round trip per 8 MiB region, never one
//! per chunk. Nothing is shared by memory: every argument and result is
//! plain owned data (ids, encoded records, frames) that could cross a wire
//! as it is. The stored encodings are those of `imgstore-format`, so an
//! implementation moves bytes and keeps counts; it never interprets
//! chunk contents.
//!
//! # Invariants every implementation keeps
//!
//! * Content addressing: a recipe, page or snapshot record is stored under
//!   the BLAKE3 hash of its encoding, a chunk under the hash of its bytes.
//! * Reference counts: each stored object's count equals the number of
//!   stored parents naming it (snapshot → page → region → chunk, with
//!   multiplicity), after every call; objects with count zero are
//!   *orphans*, and only [`Repository::gc`] deletes them.
//! * Atomic snapshots: after [`Repository::commit`] returns, the snapshot
//!   and everything it names are durable; before, the snapshot is not
//!   visible. A failure in between leaves only orphans.
//! * Healing: a chunk, recipe or page with a damage mark counts as unknown
//!   to [`Repository::chunks_known`], and a later `put_region`/`commit`
//!   that produces it rewrites it and clears the mark.

mod codec;
mod error;
mod mem;

use std::collections::HashMap;

use imgstore_format::sealed::RecordKind;
use imgstore_format::{Id, ObjectKind, Page, RefCount, Region, RepoConfig, Snapshot};
use serde::{Deserialize, Serialize};

pub use codec::Codec;
pub use error::RepoError;
pub use mem::MemRepo;

/// Result of a repository call.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// One chunk's stored frame, or why it cannot be had.
pub type ChunkRead = std::result::Result<Vec<u8>, ChunkFault>;

/// Why a chunk's frame could not be read. The engine maps both to
/// "damaged" with the snapshot offset; a transport failure is an `Err` of
/// the whole call instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkFault {
    /// The repository has no such chunk.
    Missing,
    /// The repository has it but cannot read it (a checksum error, I/O).
    Unreadable(String),
    /// It was there when this reader opened the repository, and a writer's
    /// gc has deleted it since: the snapshot being read was forgotten
    /// meanwhile. Not damage.
    Collected,
}

impl std::fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkFault::Missing => f.write_str("missing from the store"),
            ChunkFault::Unreadable(d) => write!(f, "unreadable: {d}"),
            ChunkFault::Collected => {
                f.write_str("deleted by a gc since this reader opened the repository")
            }
        }
    }
}

/// New chunk frames for [`Repository::put_region`]: id → (frame, raw length).
pub type Frames = HashMap<Id, (Vec<u8>, u32)>;

// `PutOutcome`, `Tally`, `ForgetOutcome` and `GcOutcome` are also the
// JSON answers of `imgstore server` (docs/PROTOCOL.md), field for field:
// renaming a field here changes the wire (imgstore-protocol's tests pin
// each shape).

/// What [`Repository::put_region`] added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOutcome {
    /// The region recipe was not in the store before.
    pub region_new: bool,
    /// Chunks written by this call.
    pub new_chunks: u64,
    /// Bytes written by this call (chunk frames + recipe).
    pub new_bytes: u64,
}

/// Counts and bytes of stored objects: what [`Repository::totals`] finds,
/// what a gc frees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub chunks: u64,
    /// Raw bytes of the chunks.
    pub chunk_raw_bytes: u64,
    /// Stored (frame) bytes of the chunks.
    pub chunk_stored_bytes: u64,
    pub regions: u64,
    pub pages: u64,
    /// Bytes of region recipes and index pages.
    pub recipe_bytes: u64,
}

impl Tally {
    /// Counts one object of `kind` with the sizes its reference entry records.
    pub fn add(&mut self, kind: ObjectKind, rc: &RefCount) {
        match kind {
            ObjectKind::Chunk => {
                self.chunks += 1;
                self.chunk_raw_bytes += rc.logical_len as u64;
                self.chunk_stored_bytes += rc.stored_len as u64;
            }
            ObjectKind::Region => {
                self.regions += 1;
                self.recipe_bytes += rc.stored_len as u64;
            }
            ObjectKind::Page => {
                self.pages += 1;
                self.recipe_bytes += rc.stored_len as u64;
            }
        }
    }
}

/// Repository-wide totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub objects: Tally,
    /// Objects with reference count zero, waiting for gc.
    pub orphans: u64,
}

/// What [`Repository::forget`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetOutcome {
    pub snapshots: u64,
    /// Pages no remaining snapshot references (now orphans).
    pub pages_orphaned: u64,
}

/// What [`Repository::gc`] deleted (or, dry, would delete).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcOutcome {
    pub removed: Tally,
    /// Whether live data was rewritten to give space back (the local store
    /// rewrites blob files whose garbage passed its threshold).
    pub rewrote: bool,
}

/// A damage mark: which object, and what was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamageMark {
    pub kind: ObjectKind,
    pub id: Id,
    pub why: String,
}

/// Everything the engine stores or reads. See the crate docs for the
/// invariants; every method is safe to call from several threads.
pub trait Repository: Send + Sync {
    /// The repository's config (chunking, compression, region size).
    fn config(&self) -> &RepoConfig;

    /// Where the repository lives, for messages (a path or a URL).
    fn location(&self) -> String;

    /// How objects become stored bytes (plain, or sealed with the keys).
    fn codec(&self) -> &Codec;

    /// The id a backup gives a chunk of `plaintext`: the codec's, except
    /// that a server session in a namespace of an encrypted repository
    /// tags it (`Codec::in_namespace`, docs/SECURITY.md).
    fn chunk_id(&self, plaintext: &[u8]) -> Id {
        self.codec().chunk_id(plaintext)
    }

    /// The server's witnesses of the commits it took, by snapshot id
    /// (none for a repository no server wrote). [`Repository::list_snapshots`]
    /// holds each snapshot to its witness.
    fn witnesses(&self) -> Result<HashMap<Id, Witness>> {
        Ok(HashMap::new())
    }

    // --- reading ---

    /// Stored region recipes or index pages, in order, as stored (sealed
    /// ones too); an absent one is an error naming it.
    fn raw_records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>>;

    /// Every snapshot, opened, decoded and checked against its id. A record
    /// that does not decode is an error naming it: one bad record fails
    /// the whole call. Commands use [`Repository::list_snapshots`], which
    /// reports such a record and goes on;
    /// [`Repository::snapshot_records`] gives them undecoded.
    fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        let codec = self.codec();
        let mut out = Vec::new();
        for (k, v) in self.snapshot_records()? {
            let id = snapshot_key(&k)?;
            out.push((id, open_snapshot(codec, &id, &v)?));
        }
        Ok(out)
    }

    /// Every snapshot this caller may see, split into those that open and
    /// decode (checked against their ids) and those that do not, each with
    /// why. A record that cannot be read — damaged on disk, or a junk
    /// record a client committed that only looks sealed — is listed, never
    /// fatal: it cannot hide the others. Only a failure of the repository
    /// itself is an `Err`.
    fn list_snapshots(&self) -> Result<SnapshotList> {
        let witnesses = self.witnesses()?;
        snapshot_list(self.codec(), &witnesses, self.snapshot_records()?)
    }

    /// Index pages, opened, decoded and checked against their ids, in order.
    fn pages(&self, ids: &[Id]) -> Result<Vec<Page>> {
        open_records(self, ObjectKind::Page, ids, Page::decode)
    }

    /// Region recipes, opened, decoded and checked against their ids, in order.
    fn regions(&self, ids: &[Id]) -> Result<Vec<Region>> {
        open_records(self, ObjectKind::Region, ids, Region::decode)
    }

    /// Stored frames of chunks, in order, each with its own outcome. An
    /// `Err` of the call is a failure of the repository, not of a chunk.
    fn chunk_frames(&self, ids: &[Id]) -> Result<Vec<ChunkRead>>;

    /// The order in which to read `ids` in bulk, as indices into `ids`
    /// (`check --read-data`). The default is as given; a store whose
    /// chunks live in packs orders them by pack and offset, so neighbours
    /// share one ranged request instead of one each.
    fn read_order(&self, ids: &[Id]) -> Result<Vec<usize>> {
        Ok((0..ids.len()).collect())
    }

    /// How many calls the engine should keep in flight beyond one per
    /// core, so that calls waiting on a network round trip do not leave
    /// the link idle: 0 (the default) for a repository whose calls cost
    /// only CPU and local I/O; for a server, sized from the round-trip time
    /// measured at connect. The engine runs that many more workers in its
    /// backup and restore pipelines, each holding one region's buffers, so
    /// it also bounds the memory those pipelines use.
    fn in_flight(&self) -> usize {
        0
    }

    /// How many backup workers the engine runs beyond one per core: those
    /// that wait a round trip for [`Repository::chunks_known`] on each
    /// changed region. Half of [`Repository::in_flight`] by default (a
    /// worker's upload goes on behind it, so half of them keep the cores
    /// busy); 0 where the lookups are local even though reads cross a link
    /// (a bucket-backed store, whose index is on this machine — and whose
    /// round trip is then not measured before a backup needs it).
    fn backup_in_flight(&self) -> usize {
        self.in_flight() / 2
    }

    /// Waits until the repository can take a backup's writes: a server's
    /// session opened in the background ([`imgstore_remote`'s
    /// `begin_session_ahead`]) is open, or the reason it could not be. A
    /// backup asks as its workers start on the first regions, and stops
    /// them if the session was refused. Nothing to wait for elsewhere.
    fn ready(&self) -> Result<()> {
        Ok(())
    }

    /// How many [`Repository::put_region`] calls a backup should keep in
    /// flight on their own threads while its workers go on to the next
    /// regions: 0 (the default) where a worker stores its own region (a
    /// local store, whose writes cost CPU and disk the workers share);
    /// more where an upload mostly waits on a link, whose bandwidth and
    /// latency then overlap the chunking and compressing instead of adding
    /// to them. Each holds one region's new frames.
    fn uploads_in_flight(&self) -> usize {
        0
    }

    /// Whether two [`Repository::put_region`] calls in flight together
    /// that carry the same new chunk cost it once without help: true where
    /// the store knows what it is storing (a local store, whose
    /// `chunks_known` answers yes for a chunk still on its way to a
    /// bucket, and which appends a pending chunk only once); false for a
    /// server's client, where each call's frames cross the link. The
    /// engine then sends a shared chunk with one upload, the others that
    /// need it waiting for that one's answer when that saves enough bytes
    /// to be worth a round trip (the engine's `claims`).
    fn dedups_uploads_in_flight(&self) -> bool {
        true
    }

    /// Reference entries of objects of one kind (None when absent).
    fn ref_counts(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Option<RefCount>>>;

    /// Repository-wide totals.
    fn totals(&self) -> Result<Totals>;

    /// Bytes the repository occupies on its storage, when it can tell.
    fn storage_bytes(&self) -> Option<u64>;

    // --- writing a snapshot ---

    /// For each chunk id: is it stored (and not marked damaged)?
    fn chunks_known(&self, ids: &[Id]) -> Result<Vec<bool>>;

    /// Stores a region recipe (`stored`, as [`Codec::store_record`] made
    /// it; its hash is `id`) with the chunks it references; `frames` holds
    /// those the caller found unknown. Until a committed page names it the
    /// region is an orphan.
    fn put_region(&self, id: &Id, stored: &[u8], frames: &Frames) -> Result<PutOutcome>;

    /// [`Repository::put_region`], calling `settled` with whether the
    /// region was stored once that is known. A repository that takes a
    /// commit ahead of its uploads' answers (a server that says so) returns
    /// before then, with what it sent, and reads the answer on a thread of
    /// its own; an upload that fails then is reported by a later upload or
    /// by the commit, which waits for them all. A backup's uploads that
    /// leave out a chunk another upload carries wait for that one to be
    /// settled (`claims`), not returned.
    fn put_region_settled(
        &self,
        id: &Id,
        stored: &[u8],
        frames: &Frames,
        settled: Box<dyn FnOnce(bool) + Send>,
    ) -> Result<PutOutcome> {
        let out = self.put_region(id, stored, frames);
        settled(out.is_ok());
        out
    }

    /// Makes a snapshot visible (`snapshot` is its stored record) with its
    /// index pages (stored bytes, each page it names at least once) and,
    /// when given, the id of its parent (recorded for display; it holds no
    /// reference), atomically and durably. Returns the snapshot id and the
    /// bytes new pages added.
    fn commit(&self, snapshot: &[u8], pages: &[Vec<u8>], parent: Option<&Id>) -> Result<(Id, u64)>;

    /// Before a commit: of the regions a backup will name (`ids`, stored
    /// earlier by this writer or reused from its parent), those it must
    /// send again because the repository may no longer hold them for it.
    ///
    /// A repository that keeps what this writer gave it (a local store, in
    /// this process) answers none without looking: the default. A server
    /// that lost the backup's session — it restarted, losing the regions
    /// written since its last flush and the pins that kept gc off the
    /// others — asks which it still holds, pinning those for the session
    /// that replaced the lost one (`docs/GC.md`). A commit naming a region
    /// that is gone fails as [`RepoError::Missing`]; asking again then
    /// finds it.
    fn regions_to_resend(&self, ids: &[Id]) -> Result<Vec<Id>> {
        let _ = ids;
        Ok(Vec::new())
    }

    /// Cached chaining values of all-zero regions of `region_size` with
    /// indices `0..count` (None where not cached). They depend only on the
    /// region size and index, so every image's first backup can share them.
    fn zero_cvs(&self, region_size: u32, count: u64) -> Result<Vec<Option<[u8; 32]>>>;

    /// Adds chaining values of all-zero regions to the cache.
    fn put_zero_cvs(&self, region_size: u32, cvs: &[(u64, [u8; 32])]) -> Result<()>;

    /// Every recorded (snapshot, parent) pair.
    fn parents(&self) -> Result<Vec<(Id, Id)>>;

    /// Replaces snapshot `old` by `new` (a stored record naming the same
    /// pages: new tags, say), atomically: its protection and parent entries
    /// move with it, and snapshots whose parent was `old` now name the new
    /// id. Returns the new id.
    fn replace_snapshot(&self, old: &Id, new: &[u8]) -> Result<Id>;

    // --- retention ---

    /// Removes snapshots at once; refuses, removing nothing, when any is
    /// protected or absent.
    fn forget(&self, ids: &[Id]) -> Result<ForgetOutcome>;

    /// Marks a snapshot protected (or not): `forget` refuses protected ones.
    fn set_protected(&self, id: &Id, protected: bool) -> Result<()>;

    /// Ids of protected snapshots.
    fn protected(&self) -> Result<Vec<Id>>;

    /// Deletes every orphan and, transitively, what only orphans named;
    /// with `dry_run`, computes the same figures and deletes nothing.
    fn gc(&self, dry_run: bool) -> Result<GcOutcome>;

    // --- integrity ---

    /// Every damage mark.
    fn damage_marks(&self) -> Result<Vec<DamageMark>>;

    /// Records damage marks durably; a later backup of the same data repairs them.
    fn mark_damaged(&self, marks: &[DamageMark]) -> Result<()>;

    /// Deletes the marks of objects found intact again.
    fn clear_damaged(&self, objects: &[(ObjectKind, Id)]) -> Result<()>;

    /// Damage marks this writer has not repaired (yet).
    fn damage_pending(&self) -> usize;

    /// Raw snapshot records `(key, value)`, undecoded, so `check` can report
    /// each bad one without it hiding the others.
    fn snapshot_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Calls `f(key, record)` for every stored region recipe and index page
    /// (key = kind byte + id).
    fn scan_recipes(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()>;

    /// Calls `f(key, encoded count)` for every reference entry.
    fn scan_refs(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()>;

    /// Calls `f(key)` for every orphan entry.
    fn scan_orphans(&self, f: &mut dyn FnMut(&[u8])) -> Result<()>;
}

/// [`Repository::list_snapshots`] from what it reads: the stored records
/// `(key, record)`, opened with `codec`, each held to its witness when it
/// has one. (A server's client fetches both at once.)
pub fn snapshot_list(
    codec: &Codec,
    witnesses: &HashMap<Id, Witness>,
    records: Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<SnapshotList> {
    let mut list = SnapshotList::default();
    for (k, v) in records {
        let id = snapshot_key(&k)?;
        let opened = open_snapshot(codec, &id, &v).and_then(|s| match witnesses.get(&id) {
            Some(w) => w.check(&id, s),
            None => Ok(s),
        });
        match opened {
            Ok(s) => list.snapshots.push((id, s)),
            Err(e) => list.unreadable.push(UnreadableSnapshot {
                id,
                why: match e {
                    RepoError::CorruptSnapshot { source, .. } => source.to_string(),
                    other => other.to_string(),
                },
            }),
        }
    }
    Ok(list)
}

/// A server's witness of a commit: the image name of the backup session
/// that committed the snapshot and the server's clock at the commit.
///
/// A sealed snapshot record hides its image name and time from the server,
/// so a key holder could commit one naming another namespace's image (an
/// admin's `restore latest --name` would then restore the wrong disk), or
/// dated years ahead (`forget --keep-last`/`--keep-within` would then keep
/// it and drop the real ones). A snapshot that contradicts its witness is
/// unreadable: reported, never used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    pub image: String,
    pub committed_ns: i64,
}

/// How far a snapshot's own time may be past its witness's: the client's
/// clock may run ahead of the server's by this much.
pub const WITNESS_SKEW_NS: i64 = 3600 * 1_000_000_000;

impl Witness {
    /// `snap` if it agrees with this witness.
    pub fn check(&self, id: &Id, snap: Snapshot) -> Result<Snapshot> {
        let bad = |why: String| RepoError::CorruptSnapshot {
            id: *id,
            source: imgstore_format::FormatError::Invalid {
                what: "snapshot record",
                why,
            },
        };
        if snap.name != self.image {
            return Err(bad(format!(
                "it names image {:?}, but the server's witness says it was committed by a backup of {:?}",
                snap.name, self.image
            )));
        }
        if snap.time_ns > self.committed_ns.saturating_add(WITNESS_SKEW_NS) {
            return Err(bad(
                "it is dated after the server's witness of its commit (more than an hour ahead)"
                    .into(),
            ));
        }
        Ok(snap)
    }
}

/// A snapshot record that cannot be opened or decoded, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableSnapshot {
    pub id: Id,
    pub why: String,
}

impl UnreadableSnapshot {
    /// The error a command that needs this snapshot fails with.
    pub fn error(&self) -> RepoError {
        RepoError::UnreadableSnapshot {
            id: self.id,
            why: self.why.clone(),
        }
    }
}

/// What [`Repository::list_snapshots`] finds: the snapshots that can be
/// read, and the records that cannot (kept apart, so a listing, a
/// retention policy or a parent choice never stops at one bad record and
/// never acts on it unknowingly).
#[derive(Clone, Debug, Default)]
pub struct SnapshotList {
    /// Readable snapshots, in the repository's order.
    pub snapshots: Vec<(Id, Snapshot)>,
    /// Records that do not open or decode.
    pub unreadable: Vec<UnreadableSnapshot>,
}

impl SnapshotList {
    /// The unreadable record with this id, when there is one.
    pub fn unreadable(&self, id: &Id) -> Option<&UnreadableSnapshot> {
        self.unreadable.iter().find(|u| u.id == *id)
    }

    /// Whether a snapshot (readable or not) with this id is stored.
    pub fn contains(&self, id: &Id) -> bool {
        self.snapshots.iter().any(|(i, _)| i == id) || self.unreadable(id).is_some()
    }
}

/// The id in a snapshot key; a key of another length is damage to the
/// snapshot table itself.
fn snapshot_key(k: &[u8]) -> Result<Id> {
    Id::from_slice(k)
        .ok_or_else(|| RepoError::Invalid(format!("a snapshot key of {} bytes", k.len())))
}

/// A stored snapshot record opened with the codec (checked against its id)
/// and decoded.
fn open_snapshot(codec: &Codec, id: &Id, stored: &[u8]) -> Result<Snapshot> {
    let enc = codec.open_record(RecordKind::Snapshot, id, stored)?;
    Snapshot::decode(&enc).map_err(|source| RepoError::CorruptSnapshot { id: *id, source })
}

/// Checks a [`Repository::replace_snapshot`] request against the stored
/// record `old_record` of snapshot `old`: the replacement must name the same
/// pages (so no reference count changes). Returns the replacement's id.
/// Shared by implementations so each refuses the same way.
pub fn replacement(old: &Id, old_record: &[u8], new: &[u8]) -> Result<Id> {
    let children = |b: &[u8], id: &Id| {
        imgstore_format::sealed::record_children(RecordKind::Snapshot, b)
            .map(|mut v| {
                v.sort();
                v
            })
            .map_err(|source| RepoError::CorruptSnapshot { id: *id, source })
    };
    let id = Id::hash(new);
    if children(old_record, old)? != children(new, &id)? {
        return Err(RepoError::Invalid(
            "a replacement snapshot must name the same pages".into(),
        ));
    }
    Ok(id)
}

/// The stored records of `ids`, opened with the codec and decoded.
fn open_records<R: Repository + ?Sized, T>(
    repo: &R,
    kind: ObjectKind,
    ids: &[Id],
    decode: impl Fn(&[u8]) -> std::result::Result<T, imgstore_format::FormatError>,
) -> Result<Vec<T>> {
    let rk = match kind {
        ObjectKind::Page => RecordKind::Page,
        _ => RecordKind::Region,
    };
    let codec = repo.codec();
    repo.raw_records(kind, ids)?
        .iter()
        .zip(ids)
        .map(|(v, id)| {
            let enc = codec.open_record(rk, id, v)?;
            decode(&enc).map_err(|source| RepoError::Corrupt {
                kind,
                id: *id,
                source,
            })
        })
        .collect()
}
