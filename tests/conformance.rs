//! The conformance suite: every [`Repository`] implementation held to the
//! same rules by the same scenario functions.
//!
//! # Why
//!
//! The engine reaches storage only through the `Repository` trait, and its
//! unit tests run on `MemRepo`. That is worth something only if every
//! implementation answers the way `MemRepo` does: the same reference
//! counts, orphans, gc figures, refusals, healing. So each scenario below
//! is one function over a [`Subject`] (a repository plus the few things a
//! test needs around it: a backup session, a reopen, real damage), and it
//! runs on every kind:
//!
//! | kind   | what                                                          | encrypted variant              |
//! |--------|---------------------------------------------------------------|--------------------------------|
//! | memory | `MemRepo`                                                     | `MemRepo::with_codec` (sealed) |
//! | local  | `imgstore_store::Store` on a RocksDB directory                | format 3 config + sealed codec |
//! | bucket | a `Store` whose frames live in packs on a private Garage      | format 4 with key slots        |
//! | remote | `RemoteRepo` to a real `imgstore server` (the binary) over loopback TLS, admin token | the server keeps sealed bytes, the client holds the key |
//!
//! Every kind has an encrypted variant; all encrypted subjects share one
//! master key, so their chunk ids and (deterministically sealed) record ids
//! are the same and their answers can be compared byte for byte.
//!
//! Each scenario returns what it observed (outcomes, totals, counts, ids);
//! the run on each kind is compared line by line with the run on a fresh
//! `MemRepo` of the same sealing, the reference model. Each scenario also
//! asserts concrete answers itself, so a rule broken the same way
//! everywhere still fails.
//!
//! # Where implementations legitimately differ (asserted as such)
//!
//! * **Damage reported on read**: a flipped byte in a local store's blob
//!   file is caught by RocksDB's checksum (`ChunkFault::Unreadable`, also
//!   through the server); a flipped byte in a bucket's pack (no per-read
//!   checksum: entries are verified where used) or in `MemRepo` comes back
//!   as stored bytes that do not open or decode to the chunk. Either way
//!   the chunk is never returned as intact.
//! * **`damage_pending`**: a `RemoteRepo` always says 0 (the server heals);
//!   the server's store loads the marks when it (re)starts.
//! * **Writers**: a local or bucket store has one writing process (a
//!   second `Store::open` for writing is `Busy`); concurrent writers share
//!   the handle from threads. Remote writers are separate connections, each
//!   with its own backup session.
//! * **Sessions pin**: on the server, gc leaves what a live backup session
//!   relies on (an uncommitted region), until the session ends.
//! * **`storage_bytes`**: exact stored bytes for `MemRepo`, disk usage for
//!   a local store (with the packs for a bucket), the server's figure for
//!   an admin; only "at least the chunk frames" is common.
//! * **Protocol violations** (a recipe sent under an id it does not hash
//!   to) are refused by the server before its repository sees them, as
//!   `malformed` (`RepoError::Remote`); a repository says `Invalid`.
//! * **Commit witnesses**: only a server records them (`witnesses`).
//! * **A namespace token's view** of a remote repository is private:
//!   chunks, snapshots and counts of other namespaces do not show, put and
//!   commit answers are what a private repository would give, admin calls
//!   are refused, and its damage marks are kept only where the server can
//!   confirm them ([`remote_namespace_tokens_get_private_answers`]).
//!
//! `ChunkFault::Collected` comes only from a store's read-only view (a
//! reader opened before a writer's gc), so it has its own test over the
//! local and bucket-backed kinds
//! ([`a_reader_opened_before_gc_reports_collected_chunks`]).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Once};
use std::time::Duration;

use imgstore_crypto::{Keys, MasterKey, Secret, SlotExt, DEFAULT_KDF};
use imgstore_format::sealed::RecordKind;
use imgstore_format::{
    ChunkingConfig, FrameCodec, Id, KeySlot, ObjectKind, Page, RecipeEntry, Region, RepoConfig,
    Snapshot, SnapshotStats, Storage,
};
use imgstore_remote::{RemoteOptions, RemoteRepo, Role};
use imgstore_repo::{
    ChunkFault, Codec, DamageMark, Frames, MemRepo, PutOutcome, RepoError, Repository, Tally,
    Totals,
};
use imgstore_store::{Mode, Store};

use crate::bucket::{garage, Node, ACCESS_KEY, BUCKET, SECRET_KEY};
use crate::server::{serve_config, Served};
use crate::util::{seeded, Env};

// ---------------------------------------------------------------------------
// The subjects
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Memory,
    Local,
    Bucket,
    Remote,
}

/// One repository under test, fresh for each scenario.
struct Subject {
    kind: Kind,
    sealed: bool,
    /// Dropped before `env` (fields drop in order): the server and stores
    /// close before their directory goes.
    backend: Backend,
    env: Env,
}

enum Backend {
    Memory(MemRepo),
    /// A local or bucket-backed store (None only while reopening).
    Store(Option<Store>),
    /// A server on the subject's directory, and an admin's connection.
    Remote {
        served: Served,
        repo: Option<Box<RemoteRepo>>,
    },
}

/// A writer for a concurrent backup: the subject's own handle (one
/// process writes a local or bucket store), or a connection of its own
/// with its own session (remote).
enum Writer<'a> {
    Shared(&'a dyn Repository),
    Own(Box<RemoteRepo>),
}

impl Writer<'_> {
    fn repo(&self) -> &dyn Repository {
        match self {
            Writer::Shared(r) => *r,
            Writer::Own(r) => &**r,
        }
    }
}

fn chunking() -> ChunkingConfig {
    ChunkingConfig {
        algorithm: "fastcdc-2020".into(),
        min: 16384,
        avg: 65536,
        max: 262144,
        zero_min: 16384,
    }
}

/// The one master key of every encrypted subject.
fn master() -> MasterKey {
    MasterKey::from_bytes([0x5e; 32])
}

fn codec(sealed: bool) -> Codec {
    if sealed {
        Codec::Sealed(Arc::new(Keys::derive(&master())))
    } else {
        Codec::Plain
    }
}

/// The config of a new repository: format 2, 3 with a key slot, or 4 in
/// a bucket (with key slots when sealed).
fn config(sealed: bool, storage: Option<Storage>) -> RepoConfig {
    let mut c = RepoConfig::new("c0".repeat(16), 0, chunking(), 3);
    if let Some(st) = storage {
        c = c.in_bucket(st);
    }
    if sealed {
        // A key-file slot: no argon2 cost; the tests hold the master key.
        let slot = KeySlot::new(
            &master(),
            &Secret::KeyFile(b"conformance key file"),
            DEFAULT_KDF,
            0,
        )
        .unwrap();
        c = c.encrypted(vec![slot]);
    }
    c
}

/// The bucket credentials in this process's environment, where the store
/// looks for them (as the binary does). Set once, to the fixed keys every
/// test Garage is started with; child processes of other tests set or
/// remove their own.
fn bucket_credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    });
}

/// A fresh folder of the test bucket for each bucket-backed subject.
fn next_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("conformance-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn connect(env: &Env, served: &Served, token: &str, sealed: bool) -> RemoteRepo {
    // The subjects' handles are long-lived: a reader opened before other
    // writers commit must list what they committed.
    connect_prefetching(env, served, token, sealed, false)
}

/// [`connect`], asking for the listing with the hello when `prefetch`.
fn connect_prefetching(
    env: &Env,
    served: &Served,
    token: &str,
    sealed: bool,
    prefetch: bool,
) -> RemoteRepo {
    let token = fs::read_to_string(env.path(&format!("{token}.token"))).unwrap();
    RemoteRepo::connect(RemoteOptions {
        url: served.url(),
        token,
        fingerprint: Some(served.fp.clone()),
        ca_file: None,
        retry_for: Duration::from_secs(10),
        limits: Default::default(),
        session_for: None,
        prefetch_listing: prefetch,
    })
    .unwrap()
    .with_codec(codec(sealed))
}

impl Subject {
    fn new(kind: Kind, sealed: bool, garage: Option<&Node>) -> Subject {
        let env = Env::new();
        let backend = match kind {
            Kind::Memory => {
                Backend::Memory(MemRepo::with_codec(config(sealed, None), codec(sealed)))
            }
            Kind::Local => Backend::Store(Some(
                Store::init(&env.repo(), config(sealed, None))
                    .unwrap()
                    .with_codec(codec(sealed)),
            )),
            Kind::Bucket => {
                bucket_credentials();
                let node = garage.expect("a bucket subject needs its Garage");
                let storage = Storage {
                    kind: "s3".into(),
                    bucket: BUCKET.into(),
                    prefix: next_prefix(),
                    endpoint: Some(node.endpoint()),
                    region: "garage".into(),
                    pack_size: 1 << 20,
                    // No local pack cache: reads reach the bucket.
                    cache_bytes: 0,
                };
                Backend::Store(Some(
                    Store::init(&env.repo(), config(sealed, Some(storage)))
                        .unwrap()
                        .with_codec(codec(sealed)),
                ))
            }
            Kind::Remote => {
                drop(Store::init(&env.repo(), config(sealed, None)).unwrap());
                serve_config(&env);
                let served = Served::start(&env, "127.0.0.1:0");
                let repo = connect(&env, &served, "admin", sealed);
                Backend::Remote {
                    served,
                    repo: Some(Box::new(repo)),
                }
            }
        };
        Subject {
            kind,
            sealed,
            backend,
            env,
        }
    }

    fn label(&self) -> String {
        format!(
            "{:?}{}",
            self.kind,
            if self.sealed { " (encrypted)" } else { "" }
        )
    }

    fn repo(&self) -> &dyn Repository {
        match &self.backend {
            Backend::Memory(m) => m,
            Backend::Store(s) => s.as_ref().expect("open"),
            Backend::Remote { repo, .. } => repo.as_deref().expect("connected"),
        }
    }

    fn remote(&self) -> Option<&RemoteRepo> {
        match &self.backend {
            Backend::Remote { repo, .. } => repo.as_deref(),
            _ => None,
        }
    }

    /// Starts the backup session the writes of a backup of `image` run in
    /// (the server's; nothing elsewhere: a local writer holds the lock).
    fn begin(&self, image: &str) {
        if let Some(r) = self.remote() {
            r.begin_session(image).unwrap();
        }
    }

    /// Ends the backup session (on the server: what it pinned is garbage
    /// again for gc).
    fn end(&self) {
        if let Some(r) = self.remote() {
            r.end_session();
        }
    }

    /// A writer for a concurrent backup of `image`, its session begun.
    fn writer(&self, image: &str) -> Writer<'_> {
        match &self.backend {
            Backend::Remote { served, .. } => {
                let r = connect(&self.env, served, "admin", self.sealed);
                r.begin_session(image).unwrap();
                Writer::Own(Box::new(r))
            }
            _ => Writer::Shared(self.repo()),
        }
    }

    /// Closes the repository and opens it again as a new writer would
    /// (damage marks pending again): a new `MemRepo` handle, the store
    /// reopened, the server restarted.
    fn reopen(&mut self) {
        let sealed = self.sealed;
        match &mut self.backend {
            Backend::Memory(m) => *m = m.reopen(),
            Backend::Store(s) => {
                drop(s.take());
                *s = Some(
                    Store::open(&self.env.repo(), Mode::Write { operation: "test" })
                        .unwrap()
                        .with_codec(codec(sealed)),
                );
            }
            Backend::Remote { served, repo } => {
                drop(repo.take());
                served.kill9();
                *served = Served::start(&self.env, "127.0.0.1:0");
                *repo = Some(Box::new(connect(&self.env, served, "admin", sealed)));
            }
        }
    }

    /// Damages chunk `id` (stored as `stored`) where this kind keeps it: a
    /// flipped byte in `MemRepo`, in the blob file of a local store (the
    /// server's too), in the pack object in the bucket.
    fn damage(&self, id: &Id, stored: &[u8]) {
        match &self.backend {
            Backend::Memory(m) => assert!(m.corrupt_chunk(id)),
            Backend::Store(_) if self.kind == Kind::Bucket => {
                flip_in_pack(self.repo().config().storage.as_ref().unwrap(), id)
            }
            Backend::Store(_) | Backend::Remote { .. } => {
                flip_in_blob_file(&self.env.repo(), stored)
            }
        }
    }

    /// What reading a damaged chunk gives on this kind (module docs).
    fn damaged_read(&self) -> &'static str {
        match self.kind {
            Kind::Local | Kind::Remote => "unreadable",
            Kind::Memory | Kind::Bucket => "wrong bytes",
        }
    }

    /// Whether a writer's `damage_pending` counts marks (a `RemoteRepo`'s
    /// is always 0: the server heals).
    fn counts_pending(&self) -> bool {
        self.kind != Kind::Remote
    }
}

/// Flips a byte in the middle of `stored` where it lies in a blob file of
/// the store in `repo`.
fn flip_in_blob_file(repo: &Path, stored: &[u8]) {
    use std::os::unix::fs::FileExt;
    assert!(stored.len() > 256, "a chunk too small to find");
    let mid = stored.len() / 2;
    let probe = &stored[mid - 64..mid + 64];
    for e in fs::read_dir(repo.join("db")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "blob") {
            continue;
        }
        let bytes = fs::read(&p).unwrap();
        if let Some(at) = bytes.windows(probe.len()).position(|w| w == probe) {
            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(&[bytes[at + 64] ^ 0x40], (at + 64) as u64)
                .unwrap();
            return;
        }
    }
    panic!(
        "the chunk's stored bytes are in no blob file of {}",
        repo.display()
    );
}

/// Flips a byte in the middle of chunk `id`'s entry in its pack object.
fn flip_in_pack(storage: &Storage, id: &Id) {
    use imgstore_format::pack;
    let bucket = imgstore_bucket::Bucket::connect(
        &imgstore_bucket::BucketSpec {
            bucket: storage.bucket.clone(),
            prefix: storage.prefix.clone(),
            endpoint: storage.endpoint.clone(),
            region: storage.region.clone(),
        },
        imgstore_bucket::Tuning::default(),
    )
    .unwrap();
    for (path, len) in bucket.list(pack::PACKS_DIR).unwrap() {
        let Some(name) = pack::parse_pack_path(&path) else {
            continue;
        };
        let mut bytes = bucket.get(&path, len).unwrap();
        let end = bytes.len() - pack::FOOTER_LEN;
        let footer = pack::decode_footer(&bytes[end..], len).unwrap();
        let start = end - footer.trailer_len as usize;
        let trailer = pack::decode_trailer(&bytes[start..end], footer.version, &name, len).unwrap();
        let offsets = trailer.offsets();
        let hit = trailer
            .entries
            .iter()
            .zip(offsets)
            .find(|(e, _)| e.kind == ObjectKind::Chunk && e.id == *id);
        if let Some((e, at)) = hit {
            bytes[(at + u64::from(e.len) / 2) as usize] ^= 0x40;
            bucket.put(&path, bytes).unwrap();
            return;
        }
    }
    panic!("chunk {id} is in no pack of {}", storage.url());
}

// ---------------------------------------------------------------------------
// Writing and reading through the trait, for any codec
// ---------------------------------------------------------------------------

/// Chunk `i`'s content: deterministic, incompressible, 40–92 KB.
fn content(i: u64) -> Vec<u8> {
    seeded(40_000 + (i as usize % 5) * 13_001, 0xc0f0 + i)
}

fn chunk_ids(repo: &dyn Repository, chunks: &[u64]) -> Vec<Id> {
    chunks.iter().map(|&i| repo.chunk_id(&content(i))).collect()
}

/// Chunk `i`'s stored frame as a backup makes it.
fn stored_frame(repo: &dyn Repository, i: u64) -> (Id, Vec<u8>, u32) {
    let data = content(i);
    let id = repo.chunk_id(&data);
    let frame = FrameCodec::with_thread(|c| c.encode(&data, 3));
    let stored = repo.codec().store_chunk(&id, frame).unwrap();
    (id, stored, data.len() as u32)
}

/// The stored recipe (and its id) of a region of `chunks`.
fn region_record(repo: &dyn Repository, chunks: &[u64]) -> (Id, Vec<u8>) {
    let ids = chunk_ids(repo, chunks);
    let region = Region {
        entries: chunks
            .iter()
            .zip(&ids)
            .map(|(&i, id)| RecipeEntry {
                len: content(i).len() as u32,
                chunk: Some(*id),
            })
            .collect(),
    };
    repo.codec()
        .store_record(RecordKind::Region, region.encode(), &ids)
}

/// Puts a region of `chunks` as a backup does: asks which chunks are
/// known, sends the others.
fn put(repo: &dyn Repository, chunks: &[u64]) -> (Id, PutOutcome) {
    let ids = chunk_ids(repo, chunks);
    let known = repo.chunks_known(&ids).unwrap();
    let mut frames = Frames::new();
    for (&i, k) in chunks.iter().zip(known) {
        if !k {
            let (id, stored, raw) = stored_frame(repo, i);
            frames.insert(id, (stored, raw));
        }
    }
    let (rid, rec) = region_record(repo, chunks);
    (rid, repo.put_region(&rid, &rec, &frames).unwrap())
}

/// A snapshot of one index page naming `regions` (chaining values `cv`),
/// as stored records.
struct Snap {
    snap: Snapshot,
    id: Id,
    record: Vec<u8>,
    page_id: Id,
    page: Vec<u8>,
}

fn snap(repo: &dyn Repository, name: &str, t: i64, regions: &[Id], cv: u8) -> Snap {
    let page = Page {
        regions: regions.to_vec(),
        cvs: vec![[cv; 32]; regions.len()],
    };
    let (page_id, page) = repo
        .codec()
        .store_record(RecordKind::Page, page.encode(), regions);
    let snap = Snapshot {
        time_ns: t,
        name: name.into(),
        hostname: "h".into(),
        source: "s".into(),
        tags: vec![],
        size: regions.len() as u64 * 100_000,
        digest: [cv; 32],
        region_size: 8 << 20,
        pages: vec![page_id],
        stats: SnapshotStats::default(),
        bitmap: None,
    };
    let (id, record) = record_of(repo, &snap);
    Snap {
        snap,
        id,
        record,
        page_id,
        page,
    }
}

fn record_of(repo: &dyn Repository, s: &Snapshot) -> (Id, Vec<u8>) {
    repo.codec()
        .store_record(RecordKind::Snapshot, s.encode(), &s.pages)
}

/// Commits `s`; returns the bytes its new page added.
fn commit(repo: &dyn Repository, s: &Snap, parent: Option<&Id>) -> u64 {
    let (id, added) = repo
        .commit(&s.record, std::slice::from_ref(&s.page), parent)
        .unwrap();
    assert_eq!(id, s.id, "a snapshot's id is the hash of its record");
    added
}

/// What reading a chunk gives: its content, a fault the repository
/// reports, or stored bytes that do not open or decode to the content.
fn read(repo: &dyn Repository, chunks: &[u64]) -> Vec<&'static str> {
    let ids = chunk_ids(repo, chunks);
    let reads = repo.chunk_frames(&ids).unwrap();
    assert_eq!(reads.len(), ids.len(), "one answer per chunk asked");
    chunks
        .iter()
        .zip(&ids)
        .zip(reads)
        .map(|((&i, id), r)| match r {
            Err(ChunkFault::Missing) => "missing",
            Err(ChunkFault::Unreadable(_)) => "unreadable",
            Err(ChunkFault::Collected) => "collected",
            Ok(stored) => {
                let Ok(frame) = repo.codec().open_chunk(id, &stored) else {
                    return "wrong bytes";
                };
                let mut out = Vec::new();
                match FrameCodec::with_thread(|c| c.decode(&frame, &mut out)) {
                    Ok(_) if out == content(i) => "intact",
                    _ => "wrong bytes",
                }
            }
        })
        .collect()
}

fn assert_intact(repo: &dyn Repository, chunks: &[u64]) {
    assert_eq!(
        read(repo, chunks),
        vec!["intact"; chunks.len()],
        "chunks {chunks:?} read back byte-exact"
    );
}

fn counts(repo: &dyn Repository, kind: ObjectKind, ids: &[Id]) -> Vec<Option<u64>> {
    repo.ref_counts(kind, ids)
        .unwrap()
        .into_iter()
        .map(|rc| rc.map(|rc| rc.count))
        .collect()
}

fn snapshot_ids(repo: &dyn Repository) -> BTreeSet<Id> {
    repo.snapshots().unwrap().into_iter().map(|s| s.0).collect()
}

/// Entries of each scan (recipes, reference entries, orphans).
fn scans(repo: &dyn Repository) -> (usize, usize, usize) {
    let (mut recipes, mut refs, mut orphans) = (0, 0, 0);
    repo.scan_recipes(&mut |_, _| recipes += 1).unwrap();
    repo.scan_refs(&mut |_, _| refs += 1).unwrap();
    repo.scan_orphans(&mut |_| orphans += 1).unwrap();
    (recipes, refs, orphans)
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// What a scenario observed, one line per answer, compared across kinds.
#[derive(Default)]
struct Log(Vec<String>);

impl Log {
    fn note(&mut self, what: &str, v: impl Debug) {
        self.0.push(format!("{what}: {v:?}"));
    }
}

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

type Scenario = fn(&mut Subject) -> Log;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("store_commit_and_read_back", store_commit_and_read_back),
    ("dedup_across_snapshots", dedup_across_snapshots),
    ("forget_and_gc", forget_and_gc),
    (
        "uncommitted_regions_are_orphans",
        uncommitted_regions_are_orphans,
    ),
    ("protection", protection),
    ("replace_snapshot", replace_snapshot),
    ("zero_cvs", zero_cvs),
    ("concurrent_writers", concurrent_writers),
    ("damage_marks_and_healing", damage_marks_and_healing),
];

/// Regions put and committed; every chunk, record and count read back.
fn store_commit_and_read_back(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    assert_eq!(r.codec().is_sealed(), s.sealed);
    assert_eq!(r.config().id, "c0".repeat(16));
    assert_eq!(r.config().encryption.is_some(), s.sealed);
    assert!(!r.location().is_empty());
    let ids = chunk_ids(r, &[0, 1, 2, 3]);
    s.begin("vm");
    assert_eq!(r.chunks_known(&ids).unwrap(), vec![false; 4]);
    assert_eq!(r.totals().unwrap(), Totals::default());

    let (r1, o1) = put(r, &[0, 1]);
    let (r2, o2) = put(r, &[1, 2]);
    assert!(o1.region_new && o2.region_new);
    assert_eq!(
        (o1.new_chunks, o2.new_chunks),
        (2, 1),
        "chunk 1 is sent once"
    );
    log.note("put", (o1, o2));
    assert_eq!(r.chunks_known(&ids).unwrap(), [true, true, true, false]);
    // Putting a stored region again adds nothing.
    let (again, rec) = region_record(r, &[0, 1]);
    assert_eq!(again, r1);
    assert_eq!(
        r.put_region(&r1, &rec, &Frames::new()).unwrap(),
        PutOutcome::default()
    );
    // A chunk neither stored nor sent is refused, storing nothing.
    let (r3, rec3) = region_record(r, &[3]);
    match r.put_region(&r3, &rec3, &Frames::new()) {
        Err(RepoError::Missing {
            kind: ObjectKind::Chunk,
            id,
        }) => assert_eq!(id, ids[3]),
        other => panic!("a region naming an unsent chunk: {other:?}"),
    }
    assert_eq!(counts(r, ObjectKind::Region, &[r3]), [None]);
    // A recipe that does not hash to its id is refused: by a repository
    // as `Invalid`; the server refuses it before its repository sees it,
    // as a request that breaks the protocol (`malformed`, docs/PROTOCOL.md),
    // which the client reports as `Remote`.
    let err = r.put_region(&r3, &rec, &Frames::new()).unwrap_err();
    match s.kind {
        Kind::Remote => assert!(
            matches!(&err, RepoError::Remote { detail, .. } if detail.contains("does not hash")),
            "{err}"
        ),
        _ => assert!(matches!(err, RepoError::Invalid(_)), "{err}"),
    }
    assert_eq!(counts(r, ObjectKind::Region, &[r3]), [None]);
    // Until a commit names them, the regions are orphans.
    let t = r.totals().unwrap();
    assert_eq!((t.objects.regions, t.orphans), (2, 2));
    log.note("totals before commit", t);

    // A commit naming what is not stored is refused, showing nothing.
    let bad = snap(r, "vm", 1, &[r1, r3], 1);
    let err = r
        .commit(&bad.record, std::slice::from_ref(&bad.page), None)
        .unwrap_err();
    assert!(
        matches!(err, RepoError::Missing { kind: ObjectKind::Region, id } if id == r3),
        "{err}"
    );
    let err = r.commit(&bad.record, &[], None).unwrap_err();
    assert!(
        matches!(err, RepoError::Missing { kind: ObjectKind::Page, id } if id == bad.page_id),
        "{err}"
    );
    assert!(r.snapshots().unwrap().is_empty());
    assert_eq!(counts(r, ObjectKind::Page, &[bad.page_id]), [None]);

    let s1 = snap(r, "vm", 1, &[r1, r2], 1);
    let added = commit(r, &s1, None);
    assert_eq!(added, s1.page.len() as u64, "the new page's bytes");
    log.note("commit", (s1.id, added));
    // A repeated commit (a retry whose answer was lost) changes nothing.
    assert_eq!(
        r.commit(&s1.record, std::slice::from_ref(&s1.page), None)
            .unwrap(),
        (s1.id, 0)
    );
    let t = r.totals().unwrap();
    assert_eq!(
        (
            t.objects.chunks,
            t.objects.regions,
            t.objects.pages,
            t.orphans
        ),
        (3, 2, 1, 0)
    );
    log.note("totals", t);
    log.note("chunk refs", r.ref_counts(ObjectKind::Chunk, &ids).unwrap());
    assert_eq!(
        counts(r, ObjectKind::Chunk, &ids),
        [Some(1), Some(2), Some(1), None]
    );
    assert_eq!(counts(r, ObjectKind::Region, &[r1, r2]), [Some(1), Some(1)]);
    assert_eq!(counts(r, ObjectKind::Page, &[s1.page_id]), [Some(1)]);
    log.note("scans", scans(r));

    // Records come back as stored, and decode to what was written.
    assert_eq!(r.raw_records(ObjectKind::Region, &[r1]).unwrap(), [rec]);
    assert_eq!(
        r.raw_records(ObjectKind::Page, &[s1.page_id]).unwrap(),
        std::slice::from_ref(&s1.page)
    );
    assert_eq!(r.regions(&[r1]).unwrap()[0].entries.len(), 2);
    assert_eq!(r.pages(&[s1.page_id]).unwrap()[0].regions, [r1, r2]);
    match r.raw_records(ObjectKind::Region, &[r3]) {
        Err(RepoError::Missing {
            kind: ObjectKind::Region,
            id,
        }) => assert_eq!(id, r3),
        other => panic!("an absent recipe: {other:?}"),
    }
    assert_eq!(r.snapshots().unwrap(), [(s1.id, s1.snap.clone())]);
    let list = r.list_snapshots().unwrap();
    assert_eq!(list.snapshots, [(s1.id, s1.snap.clone())]);
    assert!(list.unreadable.is_empty());
    assert_eq!(
        r.snapshot_records().unwrap(),
        [(s1.id.as_bytes().to_vec(), s1.record.clone())]
    );
    assert!(r.parents().unwrap().is_empty());
    assert!(r.protected().unwrap().is_empty());
    assert!(r.damage_marks().unwrap().is_empty());

    // Answers come one per id, in order, past the protocol's batch sizes.
    let mut many: Vec<Id> = (0..5000u32).map(|i| Id::hash(&i.to_le_bytes())).collect();
    many[4321] = ids[1];
    let known = r.chunks_known(&many).unwrap();
    assert_eq!(known.len(), many.len());
    assert_eq!(known.iter().filter(|k| **k).count(), 1);
    assert!(known[4321]);
    let rcs = counts(r, ObjectKind::Chunk, &many);
    assert_eq!((rcs.len(), rcs[4321]), (many.len(), Some(2)));
    let frames = r.chunk_frames(&many[4000..4600]).unwrap();
    assert_eq!(frames.len(), 600);
    assert!(frames[321].is_ok());
    assert_eq!(frames.iter().filter(|f| f.is_ok()).count(), 1);
    // Empty batches are answered empty; a read order is a permutation.
    assert!(r.chunks_known(&[]).unwrap().is_empty());
    assert!(r.chunk_frames(&[]).unwrap().is_empty());
    assert!(r.ref_counts(ObjectKind::Chunk, &[]).unwrap().is_empty());
    assert!(r.raw_records(ObjectKind::Region, &[]).unwrap().is_empty());
    assert_eq!(sorted(r.read_order(&ids).unwrap()), [0, 1, 2, 3]);
    log.note("forget nothing", r.forget(&[]).unwrap());
    // Only a server witnesses commits (the image of the session, its clock).
    let witnesses = r.witnesses().unwrap();
    if s.kind == Kind::Remote {
        assert_eq!(witnesses.len(), 1);
        assert_eq!(witnesses[&s1.id].image, "vm");
    } else {
        assert!(witnesses.is_empty());
    }

    // Every chunk byte-exact; the one never stored is missing.
    assert_eq!(
        read(r, &[0, 1, 2, 3]),
        ["intact", "intact", "intact", "missing"]
    );
    // Every stored chunk frame is somewhere in what the repository occupies.
    let used = r.storage_bytes().expect("every kind can tell");
    assert!(
        used >= t.objects.chunk_stored_bytes,
        "{used} bytes stored, {} of chunk frames",
        t.objects.chunk_stored_bytes
    );
    if let Backend::Memory(m) = &s.backend {
        let exact: usize = m.stored_bytes().iter().map(Vec::len).sum();
        assert_eq!(used, exact as u64);
    }
    log
}

/// A second snapshot sharing chunks, regions and a page with the first:
/// each stored once, counted once per parent.
fn dedup_across_snapshots(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    s.begin("vm");
    let (r1, _) = put(r, &[0, 1]);
    let s1 = snap(r, "vm", 1, &[r1], 1);
    commit(r, &s1, None);
    let before = r.totals().unwrap();

    s.begin("vm");
    // The same region again: known, nothing sent, nothing added.
    let (r1b, o) = put(r, &[0, 1]);
    assert_eq!((r1b, o), (r1, PutOutcome::default()));
    let (r2, o2) = put(r, &[1, 2]);
    assert_eq!((o2.region_new, o2.new_chunks), (true, 1));
    let s2 = snap(r, "vm", 2, &[r1, r2], 2);
    let added = commit(r, &s2, Some(&s1.id));
    log.note("second commit", (o2, added));
    // A third snapshot with the first one's page: no new page, no bytes.
    let s3 = snap(r, "vm", 3, &[r1], 1);
    assert_eq!(s3.page_id, s1.page_id);
    assert_eq!(commit(r, &s3, Some(&s2.id)), 0, "the page was stored");

    let ids = chunk_ids(r, &[0, 1, 2]);
    assert_eq!(
        counts(r, ObjectKind::Chunk, &ids),
        [Some(1), Some(2), Some(1)]
    );
    assert_eq!(counts(r, ObjectKind::Region, &[r1, r2]), [Some(2), Some(1)]);
    assert_eq!(
        counts(r, ObjectKind::Page, &[s1.page_id, s2.page_id]),
        [Some(2), Some(1)]
    );
    let t = r.totals().unwrap();
    assert_eq!(
        (
            t.objects.chunks,
            t.objects.regions,
            t.objects.pages,
            t.orphans
        ),
        (3, 2, 2, 0)
    );
    assert_eq!(
        t.objects.chunk_stored_bytes - before.objects.chunk_stored_bytes,
        o2.new_bytes - (r.raw_records(ObjectKind::Region, &[r2]).unwrap()[0].len() as u64),
        "only chunk 2's frame was added"
    );
    log.note("totals", t);
    assert_eq!(
        sorted(r.parents().unwrap()),
        sorted(vec![(s2.id, s1.id), (s3.id, s2.id)])
    );
    assert_eq!(snapshot_ids(r), BTreeSet::from([s1.id, s2.id, s3.id]));
    assert_intact(r, &[0, 1, 2]);
    log
}

/// Forgetting one snapshot and collecting: the shared chunks survive, the
/// others are reclaimed and read as missing; forgetting the rest and
/// collecting empties the repository.
fn forget_and_gc(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    s.begin("vm");
    let (r1, _) = put(r, &[0, 1]);
    let (r2, _) = put(r, &[1, 2]);
    let s1 = snap(r, "vm", 1, &[r1, r2], 1);
    commit(r, &s1, None);
    s.begin("vm");
    let (r3, _) = put(r, &[2, 3]);
    let s2 = snap(r, "vm", 2, &[r3], 2);
    commit(r, &s2, Some(&s1.id));
    s.end();
    let full = r.totals().unwrap();

    // All or nothing: one absent id refuses the whole call.
    let absent = Id([7; 32]);
    match r.forget(&[s1.id, absent]) {
        Err(RepoError::NoSnapshot { id }) => assert_eq!(id, absent),
        other => panic!("forgetting an absent snapshot: {other:?}"),
    }
    assert_eq!(snapshot_ids(r).len(), 2);
    assert_eq!(r.totals().unwrap(), full);

    let out = r.forget(&[s1.id, s1.id]).unwrap();
    assert_eq!((out.snapshots, out.pages_orphaned), (1, 1));
    log.note("forget", out);
    assert_eq!(snapshot_ids(r), BTreeSet::from([s2.id]));
    log.note("parents after forget", sorted(r.parents().unwrap()));
    let t = r.totals().unwrap();
    assert_eq!(t.orphans, 1, "the forgotten page");
    assert_eq!(t.objects, full.objects, "forget deletes nothing");
    log.note("totals after forget", t);

    // A dry run computes the same figures and deletes nothing.
    let dry = r.gc(true).unwrap();
    assert_eq!(r.totals().unwrap(), t);
    let real = r.gc(false).unwrap();
    assert_eq!(dry.removed, real.removed);
    let removed = real.removed;
    assert_eq!(
        (removed.chunks, removed.regions, removed.pages),
        (2, 2, 1),
        "chunks 0 and 1, regions 1 and 2, the page"
    );
    log.note("gc", removed);
    let t = r.totals().unwrap();
    assert_eq!(
        (
            t.objects.chunks,
            t.objects.regions,
            t.objects.pages,
            t.orphans
        ),
        (2, 1, 1, 0)
    );
    log.note("totals after gc", t);
    // Reclaimed chunks read as missing; the shared one survives.
    assert_eq!(
        read(r, &[0, 1, 2, 3]),
        ["missing", "missing", "intact", "intact"]
    );
    let ids = chunk_ids(r, &[0, 1, 2, 3]);
    assert_eq!(
        counts(r, ObjectKind::Chunk, &ids),
        [None, None, Some(1), Some(1)]
    );
    assert!(matches!(
        r.raw_records(ObjectKind::Region, &[r1]),
        Err(RepoError::Missing { kind: ObjectKind::Region, id }) if id == r1
    ));
    assert_eq!(r.regions(&[r3]).unwrap().len(), 1);
    s.begin("vm");
    assert_eq!(r.chunks_known(&ids).unwrap(), [false, false, true, true]);
    s.end();
    assert_eq!(
        r.gc(false).unwrap().removed,
        Tally::default(),
        "nothing left"
    );

    // Forget the rest: gc empties the repository.
    assert_eq!(r.forget(&[s2.id]).unwrap().snapshots, 1);
    let last = r.gc(false).unwrap().removed;
    assert_eq!((last.chunks, last.regions, last.pages), (2, 1, 1));
    log.note("last gc", last);
    assert_eq!(r.totals().unwrap(), Totals::default());
    assert_eq!(scans(r), (0, 0, 0));
    assert!(r.snapshots().unwrap().is_empty());
    assert!(r.snapshot_records().unwrap().is_empty());
    assert_eq!(read(r, &[2, 3]), ["missing", "missing"]);
    log
}

/// A region put but never committed is an orphan, and gc removes it with
/// its chunks (on the server: once the session that put it has ended).
fn uncommitted_regions_are_orphans(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    s.begin("vm");
    let (r1, o) = put(r, &[0, 1]);
    assert!(o.region_new);
    let ids = chunk_ids(r, &[0, 1]);
    assert_eq!(counts(r, ObjectKind::Region, &[r1]), [Some(0)]);
    assert_eq!(counts(r, ObjectKind::Chunk, &ids), [Some(1), Some(1)]);
    let mut orphans = Vec::new();
    r.scan_orphans(&mut |k| orphans.push(k.to_vec())).unwrap();
    assert_eq!(orphans, [ObjectKind::Region.key(&r1).to_vec()]);
    let t = r.totals().unwrap();
    assert_eq!((t.objects.regions, t.orphans), (1, 1));
    log.note("totals", t);

    if s.kind == Kind::Remote {
        // The live session relies on its region: gc leaves it.
        assert_eq!(r.gc(false).unwrap().removed, Tally::default());
        assert_eq!(r.totals().unwrap(), t);
        s.end();
    }
    let removed = r.gc(false).unwrap().removed;
    assert_eq!((removed.chunks, removed.regions, removed.pages), (2, 1, 0));
    log.note("gc", removed);
    assert_eq!(r.totals().unwrap(), Totals::default());
    s.begin("vm");
    assert_eq!(r.chunks_known(&ids).unwrap(), [false, false]);
    assert_eq!(read(r, &[0, 1]), ["missing", "missing"]);

    // The same backup again stores everything anew.
    s.begin("vm");
    let (again, o) = put(r, &[0, 1]);
    assert_eq!((again, o.region_new, o.new_chunks), (r1, true, 2));
    commit(r, &snap(r, "vm", 1, &[r1], 1), None);
    assert_intact(r, &[0, 1]);
    log.note("totals after commit", r.totals().unwrap());
    log
}

/// Protected snapshots: forget refuses them (and everything asked with
/// them), gc keeps their data; unprotected, they go.
fn protection(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    s.begin("vm");
    let (r1, _) = put(r, &[0]);
    let s1 = snap(r, "vm", 1, &[r1], 1);
    commit(r, &s1, None);
    s.begin("vm");
    let s2 = snap(r, "vm", 2, &[r1], 2);
    commit(r, &s2, Some(&s1.id));
    s.end();

    r.set_protected(&s1.id, true).unwrap();
    r.set_protected(&s1.id, true).unwrap();
    assert_eq!(r.protected().unwrap(), [s1.id]);
    assert!(matches!(r.forget(&[s1.id]), Err(RepoError::Protected { id }) if id == s1.id));
    assert!(matches!(
        r.forget(&[s2.id, s1.id]),
        Err(RepoError::Protected { id }) if id == s1.id
    ));
    assert_eq!(snapshot_ids(r), BTreeSet::from([s1.id, s2.id]));
    assert_eq!(r.gc(false).unwrap().removed, Tally::default());
    let absent = Id([8; 32]);
    assert!(matches!(
        r.set_protected(&absent, true),
        Err(RepoError::NoSnapshot { id }) if id == absent
    ));

    // The unprotected one goes; the protected one's data stays.
    log.note("forget", r.forget(&[s2.id]).unwrap());
    let removed = r.gc(false).unwrap().removed;
    assert_eq!((removed.chunks, removed.regions, removed.pages), (0, 0, 1));
    log.note("gc", removed);
    assert_intact(r, &[0]);
    assert_eq!(r.protected().unwrap(), [s1.id]);

    r.set_protected(&s1.id, false).unwrap();
    assert!(r.protected().unwrap().is_empty());
    r.forget(&[s1.id]).unwrap();
    assert!(matches!(
        r.set_protected(&s1.id, true),
        Err(RepoError::NoSnapshot { .. })
    ));
    let removed = r.gc(false).unwrap().removed;
    assert_eq!((removed.chunks, removed.regions, removed.pages), (1, 1, 1));
    assert_eq!(r.totals().unwrap(), Totals::default());
    log
}

/// Retagging replaces a snapshot's record: protection and parent entries
/// follow it, counts do not change; a record naming other pages, or an
/// absent snapshot, is refused.
fn replace_snapshot(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    s.begin("vm");
    let (r1, _) = put(r, &[0, 1]);
    let s1 = snap(r, "vm", 1, &[r1], 1);
    commit(r, &s1, None);
    let s2 = snap(r, "vm", 2, &[r1], 2);
    commit(r, &s2, Some(&s1.id));
    let s3 = snap(r, "vm", 3, &[r1], 3);
    commit(r, &s3, Some(&s2.id));
    s.end();
    r.set_protected(&s2.id, true).unwrap();
    let totals = r.totals().unwrap();

    let mut tagged = s2.snap.clone();
    tagged.tags = vec!["kept".into()];
    let (want, record) = record_of(r, &tagged);
    let new = r.replace_snapshot(&s2.id, &record).unwrap();
    assert_eq!(new, want);
    log.note("replaced", (s2.id, new));
    assert_eq!(r.protected().unwrap(), [new]);
    assert_eq!(
        sorted(r.parents().unwrap()),
        sorted(vec![(new, s1.id), (s3.id, new)])
    );
    let snaps = r.snapshots().unwrap();
    assert_eq!(snaps.len(), 3);
    assert!(snaps.iter().all(|(id, _)| *id != s2.id));
    assert_eq!(
        snaps.iter().find(|(id, _)| *id == new).unwrap().1.tags,
        ["kept"]
    );
    assert_eq!(r.totals().unwrap(), totals, "no count changes");
    // The same record again: nothing to do.
    assert_eq!(r.replace_snapshot(&new, &record).unwrap(), new);

    let mut other = tagged.clone();
    other.pages = vec![s1.page_id];
    let (_, other) = record_of(r, &other);
    assert!(matches!(
        r.replace_snapshot(&new, &other),
        Err(RepoError::Invalid(_))
    ));
    assert!(matches!(
        r.replace_snapshot(&s2.id, &record),
        Err(RepoError::NoSnapshot { id }) if id == s2.id
    ));
    assert!(matches!(
        r.forget(&[new]),
        Err(RepoError::Protected { id }) if id == new
    ));
    log.note("snapshots", snapshot_ids(r));
    log
}

/// The cache of all-zero regions' chaining values: by region size and
/// index, misses as None.
fn zero_cvs(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    assert_eq!(r.zero_cvs(8 << 20, 3).unwrap(), [None, None, None]);
    r.put_zero_cvs(8 << 20, &[(3, [3; 32]), (1, [1; 32])])
        .unwrap();
    r.put_zero_cvs(4 << 20, &[(2, [9; 32])]).unwrap();
    let got = r.zero_cvs(8 << 20, 5).unwrap();
    assert_eq!(got, [None, Some([1; 32]), None, Some([3; 32]), None]);
    log.note("8 MiB", got);
    assert_eq!(r.zero_cvs(4 << 20, 3).unwrap(), [None, None, Some([9; 32])]);
    assert!(r.zero_cvs(8 << 20, 0).unwrap().is_empty());
    // Not objects: no totals, and gc leaves them.
    assert_eq!(r.totals().unwrap(), Totals::default());
    r.gc(false).unwrap();
    assert_eq!(r.zero_cvs(8 << 20, 2).unwrap(), [None, Some([1; 32])]);
    log
}

/// Two writers at once, in threads, committing snapshots that share a
/// chunk and a region: both readable afterwards, each object stored once
/// and counted once per parent, whatever the interleaving.
fn concurrent_writers(s: &mut Subject) -> Log {
    let mut log = Log::default();
    if matches!(s.kind, Kind::Local | Kind::Bucket) {
        // One writing process per store: writers share its handle.
        match Store::open(
            &s.env.repo(),
            Mode::Write {
                operation: "second",
            },
        ) {
            Err(RepoError::Busy { .. }) => {}
            other => panic!("a second writer of a store: {:?}", other.map(|_| "opened")),
        }
    }
    for round in 0..3u64 {
        let base = round * 10;
        let a = s.writer(&format!("vm-a{round}"));
        let b = s.writer(&format!("vm-b{round}"));
        let barrier = Barrier::new(2);
        let backup = |w: &Writer<'_>, name: String, own: [u64; 2], t: i64| {
            let r = w.repo();
            barrier.wait();
            let (mine, o1) = put(r, &own);
            let (shared, o2) = put(r, &[base + 3]);
            let sn = snap(r, &name, t, &[mine, shared], t as u8);
            commit(r, &sn, None);
            (sn.id, mine, shared, [o1, o2])
        };
        let (ra, rb) = std::thread::scope(|sc| {
            let ha = sc.spawn(|| backup(&a, format!("vm-a{round}"), [base, base + 1], 1));
            let hb = sc.spawn(|| backup(&b, format!("vm-b{round}"), [base + 1, base + 2], 2));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        drop((a, b));
        assert_eq!(ra.2, rb.2, "the shared region has one id");
        let outcomes: Vec<PutOutcome> = ra.3.iter().chain(&rb.3).copied().collect();
        let new_chunks: u64 = outcomes.iter().map(|o| o.new_chunks).sum();
        let new_regions = outcomes.iter().filter(|o| o.region_new).count();
        assert_eq!((new_chunks, new_regions), (4, 3), "each stored once");
        log.note("stored", (new_chunks, new_regions));

        let r = s.repo();
        assert!(snapshot_ids(r).is_superset(&BTreeSet::from([ra.0, rb.0])));
        let ids = chunk_ids(r, &[base, base + 1, base + 2, base + 3]);
        assert_eq!(
            counts(r, ObjectKind::Chunk, &ids),
            [Some(1), Some(2), Some(1), Some(1)]
        );
        assert_eq!(
            counts(r, ObjectKind::Region, &[ra.1, rb.1, ra.2]),
            [Some(1), Some(1), Some(2)]
        );
        assert_intact(r, &[base, base + 1, base + 2, base + 3]);
    }
    let t = s.repo().totals().unwrap();
    assert_eq!(
        (
            t.objects.chunks,
            t.objects.regions,
            t.objects.pages,
            t.orphans
        ),
        (12, 9, 6, 0)
    );
    log.note("totals", t);
    log
}

/// Damage marks (recorded, listed, cleared); real damage reported on
/// read; a new writer counts a marked chunk unknown, and the backup that
/// produces it again rewrites it and clears the mark.
fn damage_marks_and_healing(s: &mut Subject) -> Log {
    let mut log = Log::default();
    let r = s.repo();
    s.begin("vm");
    let (r0, _) = put(r, &[0]);
    let (r1, _) = put(r, &[1]);
    let s1 = snap(r, "vm", 1, &[r0, r1], 1);
    commit(r, &s1, None);
    s.end();
    let ids = chunk_ids(r, &[0, 1]);

    // Marks: recorded, listed, cleared.
    let marks = vec![
        DamageMark {
            kind: ObjectKind::Chunk,
            id: ids[1],
            why: "a test mark".into(),
        },
        DamageMark {
            kind: ObjectKind::Page,
            id: s1.page_id,
            why: "another".into(),
        },
    ];
    r.mark_damaged(&marks).unwrap();
    let key = |m: &DamageMark| (m.kind.key(&m.id), m.why.clone());
    assert_eq!(
        sorted(r.damage_marks().unwrap().iter().map(key).collect()),
        sorted(marks.iter().map(key).collect())
    );
    r.clear_damaged(&[(ObjectKind::Chunk, ids[1]), (ObjectKind::Page, s1.page_id)])
        .unwrap();
    assert!(r.damage_marks().unwrap().is_empty());

    // Real damage to chunk 0 is reported on read, never returned intact;
    // chunk 1 is untouched.
    let stored = r.chunk_frames(&ids[..1]).unwrap().remove(0).unwrap();
    s.damage(&ids[0], &stored);
    assert_eq!(read(r, &[0, 1]), [s.damaged_read(), "intact"]);
    let found = DamageMark {
        kind: ObjectKind::Chunk,
        id: ids[0],
        why: "read failed".into(),
    };
    let wrong = DamageMark {
        kind: ObjectKind::Chunk,
        id: ids[1],
        why: "a false alarm".into(),
    };
    r.mark_damaged(&[found.clone(), wrong]).unwrap();
    log.note(
        "marks",
        sorted(r.damage_marks().unwrap().iter().map(key).collect()),
    );

    // A new writer: marked chunks count as unknown, until a mark is
    // cleared (chunk 1 was found intact after all).
    s.reopen();
    let r = s.repo();
    assert_eq!(r.damage_marks().unwrap().len(), 2);
    assert_eq!(r.damage_pending(), 2 * usize::from(s.counts_pending()));
    r.clear_damaged(&[(ObjectKind::Chunk, ids[1])]).unwrap();
    assert_eq!(r.damage_marks().unwrap(), [found]);
    s.begin("vm");
    assert_eq!(r.damage_pending(), usize::from(s.counts_pending()));
    assert_eq!(r.chunks_known(&ids).unwrap(), [false, true]);
    // The backup of the same data sends what counts as unknown again and
    // repairs it.
    let (again, o) = put(r, &[0]);
    assert_eq!(again, r0);
    log.note("healing put", o);
    assert_eq!(put(r, &[1]), (r1, PutOutcome::default()));
    let s2 = snap(r, "vm", 2, &[r0], 2);
    commit(r, &s2, Some(&s1.id));
    s.end();
    assert!(r.damage_marks().unwrap().is_empty());
    assert_eq!(r.damage_pending(), 0);
    assert_intact(r, &[0, 1]);
    assert_eq!(counts(r, ObjectKind::Chunk, &ids), [Some(1), Some(1)]);
    assert_eq!(counts(r, ObjectKind::Region, &[r0, r1]), [Some(2), Some(1)]);
    log.note("totals", r.totals().unwrap());
    log
}

// ---------------------------------------------------------------------------
// Running them
// ---------------------------------------------------------------------------

/// Every scenario on a fresh subject of `kind`, each compared with its
/// run on a fresh `MemRepo` of the same sealing.
fn conform(kind: Kind, sealed: bool) {
    let garage_env = Env::new();
    let node = (kind == Kind::Bucket).then(|| garage(&garage_env));
    for (name, scenario) in SCENARIOS {
        let mut reference = Subject::new(Kind::Memory, sealed, None);
        let want = scenario(&mut reference).0;
        let mut subject = Subject::new(kind, sealed, node.as_ref());
        let label = subject.label();
        eprintln!("conformance: {name} on {label}");
        let got = scenario(&mut subject).0;
        assert!(!want.is_empty(), "{name} observed nothing");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{name}, answer {i}: {label} disagrees with MemRepo");
        }
        assert_eq!(got.len(), want.len(), "{name}: {label} answered less");
    }
}

#[test]
fn memory() {
    conform(Kind::Memory, false);
}

#[test]
fn memory_encrypted() {
    conform(Kind::Memory, true);
}

#[test]
fn local() {
    conform(Kind::Local, false);
}

#[test]
fn local_encrypted() {
    conform(Kind::Local, true);
}

#[test]
fn bucket() {
    conform(Kind::Bucket, false);
}

#[test]
fn bucket_encrypted() {
    conform(Kind::Bucket, true);
}

#[test]
fn remote() {
    conform(Kind::Remote, false);
}

#[test]
fn remote_encrypted() {
    conform(Kind::Remote, true);
}

/// A reader that opened before a writer's gc deleted what it reads says
/// so (`ChunkFault::Collected`: its snapshot was forgotten meanwhile), not
/// "missing", which would be damage. Local and bucket-backed stores, whose
/// read-only views outlive the blob files or packs a gc deletes; `MemRepo`
/// only injects it (`collect_under_reader`), and a server reads through its
/// own writer.
#[test]
fn a_reader_opened_before_gc_reports_collected_chunks() {
    let garage_env = Env::new();
    let node = garage(&garage_env);
    for (kind, sealed) in [
        (Kind::Local, false),
        (Kind::Local, true),
        (Kind::Bucket, false),
        (Kind::Bucket, true),
    ] {
        let s = Subject::new(kind, sealed, Some(&node));
        let r = s.repo();
        let (r0, _) = put(r, &[0]);
        let s0 = snap(r, "vm", 1, &[r0], 1);
        commit(r, &s0, None);
        let (r1, _) = put(r, &[1]);
        commit(r, &snap(r, "vm", 2, &[r1], 2), None);
        let reader = Store::open(&s.env.repo(), Mode::ReadOnly)
            .unwrap()
            .with_codec(codec(sealed));
        assert_eq!(snapshot_ids(&reader).len(), 2);
        r.forget(&[s0.id]).unwrap();
        let removed = r.gc(false).unwrap().removed;
        assert_eq!((removed.chunks, removed.regions), (1, 1));
        assert_eq!(
            read(&reader, &[0, 1]),
            ["collected", "intact"],
            "{}",
            s.label()
        );
        assert_eq!(read(r, &[0, 1]), ["missing", "intact"]);
    }
}

/// A listing fetched with the hello stands in for the first listing, but
/// never for one after this handle committed.
#[test]
fn remote_listing_fetched_with_the_hello_is_dropped_by_a_commit() {
    for sealed in [false, true] {
        let s = Subject::new(Kind::Remote, sealed, None);
        let Backend::Remote { served, .. } = &s.backend else {
            unreachable!()
        };
        let r = connect_prefetching(&s.env, served, "admin", sealed, true);
        r.begin_session("vm").unwrap();
        let (r0, _) = put(&r, &[0]);
        let s0 = snap(&r, "vm", 1, &[r0], 1);
        commit(&r, &s0, None);
        assert_eq!(snapshot_ids(&r), BTreeSet::from([s0.id]), "{}", s.label());
        // The session ended with the commit; another commit goes on in a
        // new one.
        let (r1, _) = put(&r, &[1]);
        let s1 = snap(&r, "vm", 2, &[r1], 2);
        commit(&r, &s1, None);
        assert_eq!(snapshot_ids(&r), BTreeSet::from([s0.id, s1.id]));
    }
}

/// What a namespace token sees of a remote repository is what a private
/// repository would show: the documented difference from an admin's view
/// (docs/SECURITY.md).
#[test]
fn remote_namespace_tokens_get_private_answers() {
    for sealed in [false, true] {
        let s = Subject::new(Kind::Remote, sealed, None);
        let Backend::Remote { served, .. } = &s.backend else {
            unreachable!()
        };
        let admin = s.repo();
        s.begin("vm");
        let (ra, _) = put(admin, &[0, 1]);
        let sa = snap(admin, "vm", 1, &[ra], 1);
        commit(admin, &sa, None);
        s.end();

        let web = connect(&s.env, served, "web-backup", sealed);
        assert_eq!(web.role().0, Role::Backup);
        assert_eq!(web.role().1, ["web"]);
        // Outside its namespaces it cannot back up.
        assert!(matches!(
            web.begin_session("vm"),
            Err(RepoError::Denied { .. })
        ));
        web.begin_session("web-1").unwrap();
        // In a namespace of an encrypted repository chunk ids carry its tag.
        let d0 = content(0);
        if sealed {
            let id = web.chunk_id(&d0);
            assert_ne!(id, admin.chunk_id(&d0));
            assert!(imgstore_format::sealed::has_namespace_tag(&id, "web"));
        } else {
            assert_eq!(web.chunk_id(&d0), admin.chunk_id(&d0));
        }
        // The admin's chunk is stored, but not for this namespace.
        let admin_ids = chunk_ids(admin, &[0, 1]);
        assert_eq!(web.chunks_known(&admin_ids).unwrap(), [false, false]);
        assert_eq!(
            web.chunk_frames(&admin_ids).unwrap(),
            [Err(ChunkFault::Missing), Err(ChunkFault::Missing)]
        );
        assert_intact(admin, &[0, 1]);
        // Naming it without sending it is refused.
        let (rid, rec) = region_record(admin, &[0]);
        let err = web.put_region(&rid, &rec, &Frames::new()).unwrap_err();
        if sealed {
            assert!(err.to_string().contains("tag"), "{err}");
        } else {
            assert!(
                matches!(err, RepoError::Missing { kind: ObjectKind::Chunk, id } if id == admin_ids[0]),
                "{err}"
            );
        }

        // Its own backup of chunks 0 and 2: every frame sent is new in
        // the answer, whatever the admin stored.
        let (rw, o) = put(&web, &[0, 2]);
        assert_eq!((o.region_new, o.new_chunks), (true, 2));
        let sw = snap(&web, "web-1", 2, &[rw], 2);
        commit(&web, &sw, None);
        assert_intact(&web, &[0, 2]);
        let t = admin.totals().unwrap();
        // Plain: chunk 0 is one object; sealed: the tagged id is another.
        assert_eq!(t.objects.chunks, if sealed { 4 } else { 3 });
        let web_ids = chunk_ids(&web, &[0, 2]);
        assert_eq!(
            counts(admin, ObjectKind::Chunk, &web_ids[..1]),
            [Some(if sealed { 1 } else { 2 })]
        );
        // Counts are capped at one outside the admin's view.
        assert_eq!(
            counts(&web, ObjectKind::Chunk, &web_ids),
            [Some(1), Some(1)]
        );

        // Snapshots: its own; the admin sees all; another namespace none.
        assert_eq!(snapshot_ids(&web), BTreeSet::from([sw.id]));
        assert_eq!(web.list_snapshots().unwrap().snapshots.len(), 1);
        assert_eq!(snapshot_ids(admin), BTreeSet::from([sa.id, sw.id]));
        let db = connect(&s.env, served, "db-backup", sealed);
        assert!(db.snapshots().unwrap().is_empty());
        assert!(db.parents().unwrap().is_empty());

        // Admin calls are refused.
        let denied = |r: Result<(), RepoError>, what: &str| {
            assert!(
                matches!(r, Err(RepoError::Denied { .. })),
                "{what} by a backup token: {r:?}"
            );
        };
        denied(web.totals().map(drop), "totals");
        assert_eq!(web.storage_bytes(), None);
        denied(web.forget(&[sw.id]).map(drop), "forget");
        denied(web.gc(true).map(drop), "gc");
        denied(web.set_protected(&sw.id, true), "protect");
        denied(
            web.replace_snapshot(&sw.id, &sw.record).map(drop),
            "replace",
        );
        denied(web.scan_refs(&mut |_, _| {}), "scan");
        assert_eq!(web.damage_pending(), 0);
        assert_eq!(snapshot_ids(admin).len(), 2);

        // A restore token's damage marks are kept only where the server
        // confirms the damage itself: a plain chunk it finds intact is not
        // marked; a sealed one it cannot open, so the mark is kept.
        let ro = connect(&s.env, served, "web-restore", sealed);
        assert_eq!(ro.role().0, Role::Restore);
        let mark = DamageMark {
            kind: ObjectKind::Chunk,
            id: web_ids[1],
            why: "the client could not read it".into(),
        };
        ro.mark_damaged(std::slice::from_ref(&mark)).unwrap();
        let kept = if sealed { vec![mark] } else { vec![] };
        assert_eq!(admin.damage_marks().unwrap(), kept);
        assert_eq!(ro.damage_marks().unwrap(), kept);
        assert!(db.damage_marks().unwrap().is_empty(), "not its namespace");
    }
}
