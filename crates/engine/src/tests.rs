//! The pipelines driven through the in-memory repository: backup, restore,
//! delta restore, changed-block backup, check, forget and gc — including
//! missing, unreadable and altered chunks, which must be reported with
//! their snapshot offset, never returned as wrong bytes.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use imgstore_format::{Id, ObjectKind, Snapshot};
use imgstore_repo::{MemRepo, Repository};

use crate::{
    backup, backup_changed, check, forget, plan_forget, record_damage, restore, restore_delta,
    BackupOptions, BackupReport, ChangedBlocks, EngineError, ForgetRequest, NoProgress, ReadData,
    Source, Target,
};

const MIB: usize = 1 << 20;

fn repo() -> MemRepo {
    let params = imgstore_chunker::Params::with_avg(16 * 1024).unwrap();
    MemRepo::new(crate::new_repo_config(params, 3))
}

/// Deterministic pseudo-random bytes (xorshift64), compressible by half:
/// each 4 KiB block is random or a repeated byte.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = imgstore_chunker::testing::Xorshift(seed | 1);
    let mut out = vec![0u8; len];
    for (i, block) in out.chunks_mut(4096).enumerate() {
        let x = rng.next_plain();
        match x % 4 {
            0 => {} // a zero block
            1 => block.fill((x >> 8) as u8),
            _ => {
                for b in block.iter_mut() {
                    *b = rng.next_plain() as u8;
                }
            }
        }
        // A long zero run in the middle: a hole region.
        if (8 * MIB..17 * MIB).contains(&(i * 4096)) {
            block.fill(0);
        }
    }
    out
}

fn back_up(repo: &dyn Repository, data: &[u8], parent: Option<&BackupReport>) -> BackupReport {
    let src = Source::from_reader(
        Path::new("mem.img"),
        Box::new(std::io::Cursor::new(data.to_vec())),
    );
    let opts = BackupOptions {
        name: "vm".into(),
        tags: vec![],
        hostname: "test".into(),
        parent: parent.map(|p| (p.id, p.snapshot.clone())),
        allow_empty: false,
        bitmap: None,
        prehash: None,
    };
    backup(repo, src, &opts, &NoProgress).unwrap()
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn restore_to_vec(repo: &dyn Repository, id: &Id, snap: &Snapshot) -> Result<Vec<u8>, EngineError> {
    let sink = Sink::default();
    let target = Target::Stream {
        label: "memory".into(),
        out: Box::new(sink.clone()),
    };
    restore(repo, id, snap, target, &NoProgress)?;
    let v = sink.0.lock().unwrap().clone();
    Ok(v)
}

/// Asserts `result` is damage of `chunk` at image offset `offset`; returns why.
fn damage_at<T: std::fmt::Debug>(result: Result<T, EngineError>, chunk: Id, offset: u64) -> String {
    match result {
        Err(EngineError::ChunkDamaged {
            chunk: c,
            offset: o,
            why,
            ..
        }) => {
            assert_eq!((c, o), (chunk, offset), "{why}");
            why
        }
        other => panic!("expected damage of {chunk} at {offset}, got {other:?}"),
    }
}

/// The first data chunk of a snapshot and its image offset.
fn first_chunk(repo: &dyn Repository, snap: &Snapshot, id: &Id) -> (Id, u64) {
    let r = crate::SnapshotReader::open(repo, id, snap).unwrap();
    for i in 0..r.region_count() {
        let mut off = i as u64 * r.region_size();
        for e in r.entries(i).unwrap() {
            if let Some(c) = e.chunk {
                return (c, off);
            }
            off += e.len as u64;
        }
    }
    panic!("no data chunk");
}

#[test]
fn backup_and_restore_round_trip_with_dedup() {
    let repo = repo();
    let gen1 = image(20 * MIB + 12345, 7);
    let r1 = back_up(&repo, &gen1, None);
    assert_eq!(r1.snapshot.size, gen1.len() as u64);
    assert_eq!(r1.snapshot.digest, *blake3::hash(&gen1).as_bytes());
    assert!(r1.snapshot.stats.zero_bytes >= 9 * MIB as u64);
    assert_eq!(restore_to_vec(&repo, &r1.id, &r1.snapshot).unwrap(), gen1);

    // A second generation changed in place: only its new chunks are stored,
    // and regions equal to the parent's are reused whole.
    let mut gen2 = gen1.clone();
    gen2[3 * MIB..3 * MIB + 100_000].copy_from_slice(&image(100_000, 99));
    let r2 = back_up(&repo, &gen2, Some(&r1));
    assert!(r2.snapshot.stats.new_chunks > 0);
    assert!(
        r2.snapshot.stats.new_chunks < r1.snapshot.stats.new_chunks / 4,
        "{} new chunks of {}",
        r2.snapshot.stats.new_chunks,
        r1.snapshot.stats.new_chunks
    );
    assert!(r2.bytes_reused >= 8 * MIB as u64);
    assert_eq!(restore_to_vec(&repo, &r2.id, &r2.snapshot).unwrap(), gen2);
    assert_eq!(restore_to_vec(&repo, &r1.id, &r1.snapshot).unwrap(), gen1);

    let report = check(&repo, ReadData::All, &NoProgress).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 2);
    assert_eq!(report.chunks_read, report.chunks);
}

#[test]
fn altered_chunk_is_damage_never_wrong_bytes_and_heals() {
    let repo = repo();
    let gen = image(12 * MIB, 3);
    let r = back_up(&repo, &gen, None);
    let (chunk, offset) = first_chunk(&repo, &r.snapshot, &r.id);
    assert!(repo.corrupt_chunk(&chunk));

    damage_at(restore_to_vec(&repo, &r.id, &r.snapshot), chunk, offset);

    let report = check(&repo, ReadData::All, &NoProgress).unwrap();
    assert!(!report.is_clean());
    let marks = report.damage_marks();
    assert_eq!(marks.len(), 1);
    assert_eq!((marks[0].kind, marks[0].id), (ObjectKind::Chunk, chunk));
    assert_eq!(report.damaged_snapshots.len(), 1);
    assert_eq!(report.damaged_snapshots[0].id, r.id);
    assert_eq!(report.damaged_snapshots[0].ranges[0].0, offset);
    // Structure alone does not read chunks: it sees nothing.
    assert!(check(&repo, ReadData::None, &NoProgress)
        .unwrap()
        .is_clean());

    assert_eq!(record_damage(&repo, &marks, &[]).unwrap(), 1);
    assert_eq!(record_damage(&repo, &marks, &[]).unwrap(), 0, "marked once");
    // A writer opened later repairs the chunk by backing the same data up.
    let writer = repo.reopen();
    assert_eq!(writer.damage_pending(), 1);
    back_up(&writer, &gen, Some(&r));
    assert_eq!(writer.damage_pending(), 0);
    assert!(writer.damage_marks().unwrap().is_empty());
    assert_eq!(restore_to_vec(&writer, &r.id, &r.snapshot).unwrap(), gen);
    assert!(check(&writer, ReadData::All, &NoProgress)
        .unwrap()
        .is_clean());
}

#[test]
fn missing_and_unreadable_chunks_name_their_offset() {
    let repo = repo();
    let gen = image(10 * MIB, 11);
    let r = back_up(&repo, &gen, None);
    let (chunk, offset) = first_chunk(&repo, &r.snapshot, &r.id);

    repo.make_unreadable(&chunk);
    let why = damage_at(restore_to_vec(&repo, &r.id, &r.snapshot), chunk, offset);
    assert!(why.starts_with("unreadable"), "{why}");

    assert!(repo.remove_chunk(&chunk));
    let repo = repo.reopen_readable();
    let why = damage_at(restore_to_vec(&repo, &r.id, &r.snapshot), chunk, offset);
    assert!(why.contains("missing"), "{why}");
    let report = check(&repo, ReadData::All, &NoProgress).unwrap();
    assert_eq!(report.damage_marks().len(), 1);
    assert!(
        report.problems[0].what.contains("missing"),
        "{:?}",
        report.problems
    );
}

/// A chunk a gc in another process deleted under a reader (its snapshot
/// forgotten meanwhile) is said as such, never as damage: no damage mark,
/// and `check --read-data` passes over it.
#[test]
fn a_chunk_collected_under_a_reader_is_not_damage() {
    let repo = repo();
    let gen = image(10 * MIB, 12);
    let r = back_up(&repo, &gen, None);
    let (chunk, _) = first_chunk(&repo, &r.snapshot, &r.id);
    let all = check(&repo, ReadData::All, &NoProgress).unwrap();
    assert!(all.problems.is_empty(), "{:?}", all.problems);

    repo.collect_under_reader(&chunk);
    let err = restore_to_vec(&repo, &r.id, &r.snapshot).unwrap_err();
    assert!(
        matches!(err, EngineError::Collected { .. }),
        "a collected chunk reported as {err}"
    );
    assert!(err.damage_mark().is_none());
    let report = check(&repo, ReadData::All, &NoProgress).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.damage_marks().is_empty());
    assert_eq!(report.chunks_read, all.chunks_read - 1);
}

/// Removes the injected read error while keeping everything else.
trait Readable {
    fn reopen_readable(&self) -> MemRepo;
}
impl Readable for MemRepo {
    fn reopen_readable(&self) -> MemRepo {
        let r = self.reopen();
        r.clear_injected();
        r
    }
}

fn temp_file(name: &str, data: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("imgstore-engine-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("image");
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn delta_restore_writes_only_what_differs_and_refuses_damage() {
    let repo = repo();
    let gen1 = image(16 * MIB, 5);
    let mut gen2 = gen1.clone();
    gen2[MIB..MIB + 50_000].copy_from_slice(&image(50_000, 77));
    gen2[12 * MIB..12 * MIB + 4096].fill(0);
    let r1 = back_up(&repo, &gen1, None);
    let r2 = back_up(&repo, &gen2, Some(&r1));

    let path = temp_file("delta", &gen1);
    let rep = restore_delta(&repo, &r2.id, &r2.snapshot, &path, false, &NoProgress).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), gen2);
    assert!(
        rep.written_bytes > 0 && rep.written_bytes < 2 * MIB as u64,
        "{rep:?}"
    );
    assert!(rep.skipped_bytes > 12 * MIB as u64, "{rep:?}");

    // Back to gen1 with one of the chunks it needs altered: an error naming
    // that chunk, never its wrong bytes written.
    let (chunk, _) = {
        let reader = crate::SnapshotReader::open(&repo, &r1.id, &r1.snapshot).unwrap();
        let e = reader.entries(0).unwrap();
        let mut off = 0u64;
        let mut found = None;
        for x in e {
            if let Some(c) = x.chunk {
                if off + x.len as u64 > MIB as u64 && off < (MIB + 50_000) as u64 {
                    found = Some((c, off));
                    break;
                }
            }
            off += x.len as u64;
        }
        found.expect("a chunk over the changed range")
    };
    assert!(repo.corrupt_chunk(&chunk));
    let err = restore_delta(&repo, &r1.id, &r1.snapshot, &path, false, &NoProgress).unwrap_err();
    assert!(
        matches!(err, EngineError::ChunkDamaged { chunk: c, .. } if c == chunk),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn changed_block_backup_equals_full_backup() {
    let repo = repo();
    let gen1 = image(18 * MIB, 21);
    let r1 = back_up(&repo, &gen1, None);
    let mut gen2 = gen1.clone();
    gen2[9 * MIB + 10..9 * MIB + 70_000].copy_from_slice(&image(69_990, 5));
    let path = temp_file("changed", &gen2);
    let src = Source::open(&path).unwrap();
    let changed = ChangedBlocks {
        base_id: r1.id,
        base: r1.snapshot.clone(),
        ranges: vec![(9 * MIB as u64, 70_000)],
        verify_unchanged: 1.0,
    };
    let opts = BackupOptions {
        name: "vm".into(),
        hostname: "test".into(),
        ..Default::default()
    };
    let r2 = backup_changed(&repo, &src, &changed, &opts, &NoProgress).unwrap();
    assert_eq!(r2.snapshot.digest, *blake3::hash(&gen2).as_bytes());
    let full = back_up(&repo, &gen2, None);
    assert_eq!(
        r2.snapshot.pages, full.snapshot.pages,
        "same regions as a full backup"
    );
    assert_eq!(restore_to_vec(&repo, &r2.id, &r2.snapshot).unwrap(), gen2);

    // A list that misses a change is caught by sampling the rest.
    let wrong = ChangedBlocks {
        ranges: vec![(0, 4096)],
        ..changed
    };
    let err = backup_changed(&repo, &src, &wrong, &opts, &NoProgress).unwrap_err();
    assert!(
        matches!(err, EngineError::ChangeListWrong { .. }),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A region the change list covers whole is read from the source alone
/// (only its base's recipe is counted): the snapshot, and its counts, are
/// those of a full backup, whether the covering ranges come whole or in
/// adjacent pieces.
#[test]
fn a_region_rewritten_whole_gives_a_full_backups_snapshot_and_counts() {
    let repo = repo();
    let region = repo.config().region_size as usize;
    let gen1 = image(2 * region + 2 * MIB, 31);
    let r1 = back_up(&repo, &gen1, None);
    let mut gen2 = gen1.clone();
    gen2[region..2 * region + MIB].copy_from_slice(&image(region + MIB, 32));
    gen2[..MIB].fill(0);
    let path = temp_file("whole", &gen2);
    let src = Source::open(&path).unwrap();
    let half = region as u64 / 2;
    let changed = ChangedBlocks {
        base_id: r1.id,
        base: r1.snapshot.clone(),
        // Region 1 in two adjacent pieces, part of region 2, and zeros in
        // part of region 0.
        ranges: vec![
            (region as u64, half),
            (region as u64 + half, half + MIB as u64),
            (0, MIB as u64),
        ],
        verify_unchanged: 0.0,
    };
    let opts = BackupOptions {
        name: "vm".into(),
        hostname: "test".into(),
        ..Default::default()
    };
    let r2 = backup_changed(&repo, &src, &changed, &opts, &NoProgress).unwrap();
    assert_eq!(r2.snapshot.digest, *blake3::hash(&gen2).as_bytes());
    let full = back_up(&repo, &gen2, None);
    assert_eq!(r2.snapshot.pages, full.snapshot.pages);
    assert_eq!(r2.snapshot.stats.chunks, full.snapshot.stats.chunks);
    assert_eq!(r2.snapshot.stats.zero_bytes, full.snapshot.stats.zero_bytes);
    assert_eq!(r2.bytes_read, 2 * MIB as u64 + region as u64);
    assert_eq!(restore_to_vec(&repo, &r2.id, &r2.snapshot).unwrap(), gen2);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn forget_plan_then_gc_frees_only_what_is_unreferenced() {
    let repo = repo();
    let gen1 = image(10 * MIB, 1);
    let gen2 = image(10 * MIB, 2);
    let r1 = back_up(&repo, &gen1, None);
    let r2 = back_up(&repo, &gen2, Some(&r1));
    repo.set_protected(&r2.id, true).unwrap();

    let keep_none = crate::policy::Policy {
        last: 0,
        tags: vec![],
        ..Default::default()
    };
    // A policy keeps protected snapshots; naming one is refused.
    let vm = crate::SnapshotFilter {
        name: Some("vm".into()),
        ..Default::default()
    };
    let plan = plan_forget(&repo, &ForgetRequest::Policy(keep_none.clone()), &vm).unwrap();
    assert_eq!(plan.remove(), vec![r1.id]);
    assert!(plan_forget(
        &repo,
        &ForgetRequest::Snapshots(vec![r2.id.to_hex()]),
        &Default::default()
    )
    .is_err());

    let before = repo.totals().unwrap();
    forget(&repo, &plan).unwrap();
    assert_eq!(repo.snapshots().unwrap().len(), 1);
    let dry = repo.gc(true).unwrap();
    assert_eq!(
        repo.totals().unwrap(),
        {
            let mut t = before;
            t.orphans = repo.totals().unwrap().orphans;
            t
        },
        "a dry run deletes nothing"
    );
    let gc = repo.gc(false).unwrap();
    assert_eq!(gc.removed, dry.removed, "dry run predicts the real one");
    assert!(gc.removed.chunks > 0);
    let after = repo.totals().unwrap();
    assert_eq!(after.orphans, 0);
    assert_eq!(
        after.objects.chunks + gc.removed.chunks,
        before.objects.chunks
    );
    assert_eq!(restore_to_vec(&repo, &r2.id, &r2.snapshot).unwrap(), gen2);
    assert!(check(&repo, ReadData::All, &NoProgress).unwrap().is_clean());
}

#[test]
fn empty_sources_are_refused_unless_allowed() {
    let repo = repo();
    let src = || Source::from_reader(Path::new("-"), Box::new(std::io::empty()));
    let mut opts = BackupOptions {
        name: "vm".into(),
        ..Default::default()
    };
    let err = backup(&repo, src(), &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, EngineError::EmptySource { .. }), "{err}");
    assert!(repo.snapshots().unwrap().is_empty(), "no snapshot written");
    opts.allow_empty = true;
    let r = backup(&repo, src(), &opts, &NoProgress).unwrap();
    assert_eq!(r.snapshot.size, 0);
    assert_eq!(
        restore_to_vec(&repo, &r.id, &r.snapshot).unwrap(),
        Vec::<u8>::new()
    );
}

#[test]
fn retag_replaces_the_record_and_filters_select_by_host_and_tag() {
    let repo = repo();
    let gen = image(9 * MIB, 8);
    let r1 = back_up(&repo, &gen, None);
    let r2 = back_up(&repo, &gen, Some(&r1));
    assert_eq!(repo.parents().unwrap(), vec![(r2.id, r1.id)]);
    repo.set_protected(&r1.id, true).unwrap();

    let new = crate::retag(&repo, &r1.id, None, &["keep".into()], &[]).unwrap();
    assert_ne!(new, r1.id, "the id is the hash of the record");
    let snaps = repo.snapshots().unwrap();
    let tagged = &snaps.iter().find(|s| s.0 == new).unwrap().1;
    assert_eq!(tagged.tags, vec!["keep".to_string()]);
    assert_eq!(tagged.pages, r1.snapshot.pages);
    assert_eq!(repo.protected().unwrap(), vec![new], "protection follows");
    assert_eq!(
        repo.parents().unwrap(),
        vec![(r2.id, new)],
        "children follow"
    );
    assert_eq!(restore_to_vec(&repo, &new, tagged).unwrap(), gen);
    assert!(crate::retag(&repo, &new, None, &["bad tag".into()], &[]).is_err());
    assert_eq!(
        crate::retag(&repo, &new, None, &["keep".into()], &[]).unwrap(),
        new
    );

    let f = crate::SnapshotFilter {
        tags: vec!["keep".into()],
        ..Default::default()
    };
    let kept: Vec<Id> = snaps
        .iter()
        .filter(|s| f.matches(&s.1))
        .map(|s| s.0)
        .collect();
    assert_eq!(kept, vec![new]);
    let other_host = crate::SnapshotFilter {
        hosts: vec!["elsewhere".into()],
        ..Default::default()
    };
    assert!(!snaps.iter().any(|s| other_host.matches(&s.1)));
    let this_host = crate::SnapshotFilter {
        hosts: vec!["test".into(), "elsewhere".into()],
        ..Default::default()
    };
    assert_eq!(snaps.iter().filter(|s| this_host.matches(&s.1)).count(), 2);
    check(&repo, ReadData::All, &NoProgress).unwrap();
}

/// A sparse file of `regions` 8 MiB regions with 64 KiB of data at the
/// start of each region listed in `data_at`; the rest are holes.
fn thin_file(
    name: &str,
    regions: u64,
    data_at: &[u64],
    seed: u64,
) -> (std::path::PathBuf, Vec<u8>) {
    let size = regions * 8 * MIB as u64;
    let path = temp_file(name, &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(size).unwrap();
    let mut whole = vec![0u8; size as usize];
    for (k, &r) in data_at.iter().enumerate() {
        let d = image(64 * 1024, seed + k as u64);
        let off = r * 8 * MIB as u64;
        std::os::unix::fs::FileExt::write_all_at(&f, &d, off).unwrap();
        whole[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    (path, whole)
}

#[test]
fn zero_region_values_are_cached_for_every_later_first_backup() {
    let repo = repo();
    let rs = repo.config().region_size;
    let opts = |name: &str| BackupOptions {
        name: name.into(),
        ..Default::default()
    };
    // A first backup computes the holes' values and caches them.
    let (a, a_bytes) = thin_file("zero-a", 6, &[0, 3], 1);
    let ra = backup(&repo, Source::open(&a).unwrap(), &opts("a"), &NoProgress).unwrap();
    assert_eq!(ra.snapshot.digest, *blake3::hash(&a_bytes).as_bytes());
    let cached = repo.zero_cvs(rs, 6).unwrap();
    let holes: Vec<usize> = (0..6).filter(|i| cached[*i].is_some()).collect();
    assert_eq!(holes, vec![1, 2, 4, 5], "full hole regions after the first");

    // Another image's first backup (no parent) takes them from the cache
    // and still has the b3sum digest.
    let (b, b_bytes) = thin_file("zero-b", 6, &[1, 5], 7);
    let rb = backup(&repo, Source::open(&b).unwrap(), &opts("b"), &NoProgress).unwrap();
    assert_eq!(rb.snapshot.digest, *blake3::hash(&b_bytes).as_bytes());
    // b's holes 2 and 4 were cached by a; its hole 3 (data in a) is
    // computed and cached now, its hole 0 never is.
    assert_eq!(rb.zero_bytes_cached, 2 * 8 * MIB as u64);
    assert!(repo.zero_cvs(rs, 6).unwrap()[3].is_some());
    assert_eq!(ra.zero_bytes_cached, 0, "a's were computed");
    assert_eq!(
        restore_to_vec(&repo, &rb.id, &rb.snapshot).unwrap(),
        b_bytes
    );
    // Region 0 of b is a hole: never cached (it may be the root).
    assert!(repo.zero_cvs(rs, 1).unwrap()[0].is_none());

    // A wrong entry is caught by the sample recomputed before use: the
    // table is distrusted, the digest stays right and the entry is rewritten.
    repo.put_zero_cvs(rs, &[(2, [0xaa; 32])]).unwrap();
    let (c, c_bytes) = thin_file("zero-c", 6, &[0], 9);
    let rc = backup(&repo, Source::open(&c).unwrap(), &opts("c"), &NoProgress).unwrap();
    assert_eq!(rc.snapshot.digest, *blake3::hash(&c_bytes).as_bytes());
    assert_eq!(rc.zero_bytes_cached, 0, "the whole table was distrusted");
    assert_eq!(repo.zero_cvs(rs, 6).unwrap()[2], cached[2], "rewritten");
    for p in [a, b, c] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}

#[test]
fn copy_sends_only_what_the_destination_lacks_and_never_copies_damage() {
    let src = repo();
    let g0 = image(20 * MIB, 21);
    let mut g1 = g0.clone();
    g1[3 * MIB..3 * MIB + 100_000].copy_from_slice(&image(100_000, 22));
    let r0 = back_up(&src, &g0, None);
    let r1 = back_up(&src, &g1, Some(&r0));
    let dst = repo();
    let c0 = crate::copy_snapshot(&src, &dst, &r0.id, &r0.snapshot, None, &NoProgress).unwrap();
    assert_eq!(c0.id, r0.id, "a copy keeps its id");
    assert_eq!(c0.regions_sent, c0.regions);
    let c1 =
        crate::copy_snapshot(&src, &dst, &r1.id, &r1.snapshot, Some(&r0.id), &NoProgress).unwrap();
    assert_eq!(c1.regions_sent, 1, "{c1:?}");
    assert!(
        c1.chunks_sent > 0 && c1.chunks_sent < c0.chunks_sent / 4,
        "{c1:?}"
    );
    assert_eq!(restore_to_vec(&dst, &r1.id, &r1.snapshot).unwrap(), g1);
    assert_eq!(dst.parents().unwrap(), vec![(r1.id, r0.id)]);
    let report = check(&dst, ReadData::All, &NoProgress).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);

    // An altered chunk in the source: the copy fails at its offset, and
    // the destination gets no snapshot.
    let (chunk, offset) = first_chunk(&src, &r0.snapshot, &r0.id);
    src.corrupt_chunk(&chunk);
    let fresh = repo();
    let err = crate::copy_snapshot(&src, &fresh, &r0.id, &r0.snapshot, None, &NoProgress);
    damage_at(err, chunk, offset);
    assert!(fresh.snapshots().unwrap().is_empty());
}

#[test]
fn sequential_image_reads_load_whole_regions_and_still_refuse_damage() {
    let repo = repo();
    let data = image(20 * MIB, 31);
    let r = back_up(&repo, &data, None);
    let reader = crate::ImageReader::new(&repo, &r.id, &r.snapshot, 64 * MIB).unwrap();
    let mut out = vec![0u8; data.len()];
    for (i, piece) in out.chunks_mut(128 * 1024).enumerate() {
        reader.read_at((i * 128 * 1024) as u64, piece).unwrap();
    }
    assert!(out == data, "sequential reads differ from the image");
    let unique: std::collections::HashSet<Id> = {
        let sr = crate::SnapshotReader::open(&repo, &r.id, &r.snapshot).unwrap();
        (0..sr.region_count())
            .flat_map(|i| sr.entries(i).unwrap())
            .filter_map(|e| e.chunk)
            .collect()
    };
    assert_eq!(reader.decompressed_chunks(), unique.len() as u64);

    let (chunk, offset) = first_chunk(&repo, &r.snapshot, &r.id);
    repo.corrupt_chunk(&chunk);
    let fresh = crate::ImageReader::new(&repo, &r.id, &r.snapshot, 64 * MIB).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    let mut result = Ok(());
    for i in 0..(data.len() / buf.len()) {
        result = fresh.read_at((i * buf.len()) as u64, &mut buf);
        if result.is_err() {
            break;
        }
    }
    damage_at(result, chunk, offset);
}

fn sealed_repo() -> MemRepo {
    let params = imgstore_chunker::Params::with_avg(16 * 1024).unwrap();
    let keys = imgstore_crypto::Keys::derive(&imgstore_crypto::MasterKey::from_bytes([42; 32]));
    MemRepo::with_codec(
        crate::new_repo_config(params, 3),
        imgstore_repo::Codec::Sealed(std::sync::Arc::new(keys)),
    )
}

#[test]
fn sealed_repositories_round_trip_dedup_and_store_no_plaintext() {
    let repo = sealed_repo();
    let g0 = image(20 * MIB, 51);
    let mut g1 = g0.clone();
    g1[2 * MIB..2 * MIB + 50_000].copy_from_slice(&image(50_000, 52));
    let r0 = back_up(&repo, &g0, None);
    let r1 = back_up(&repo, &g1, Some(&r0));
    assert!(
        r1.snapshot.stats.new_chunks < r0.snapshot.stats.new_chunks / 4,
        "dedup across generations"
    );
    assert_eq!(restore_to_vec(&repo, &r1.id, &r1.snapshot).unwrap(), g1);
    assert_eq!(restore_to_vec(&repo, &r0.id, &r0.snapshot).unwrap(), g0);
    let report = check(&repo, ReadData::All, &NoProgress).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Nothing stored shows a 64-byte window of the image, nor the name.
    let windows: std::collections::HashSet<&[u8]> = g1
        .chunks(4096)
        .map(|b| &b[..64])
        .filter(|w| w.iter().any(|x| *x != w[0]))
        .collect();
    for stored in repo.stored_bytes() {
        assert!(
            !stored.windows(64).any(|w| windows.contains(w)),
            "plaintext stored"
        );
    }
    // Chunk ids are keyed: not BLAKE3 of the data.
    let (chunk, offset) = first_chunk(&repo, &r0.snapshot, &r0.id);
    let data = &g0[offset as usize..];
    assert!(!(1..=data.len().min(300_000)).any(|n| Id::hash(&data[..n]) == chunk));
    // A tampered chunk is damage at its offset, never wrong bytes.
    repo.corrupt_chunk(&chunk);
    damage_at(restore_to_vec(&repo, &r0.id, &r0.snapshot), chunk, offset);
}

#[test]
fn a_sealed_repository_opened_without_its_key_refuses_to_read() {
    let repo = sealed_repo();
    let g = image(4 * MIB, 61);
    let r = back_up(&repo, &g, None);
    let plain = repo.reopen_with_codec(imgstore_repo::Codec::Plain);
    let err = plain.snapshots().unwrap_err().to_string();
    assert!(err.contains("encrypted"), "{err}");
    let other = repo.reopen_with_codec(imgstore_repo::Codec::Sealed(std::sync::Arc::new(
        imgstore_crypto::Keys::derive(&imgstore_crypto::MasterKey::from_bytes([7; 32])),
    )));
    assert!(other.snapshots().is_err());
    assert!(restore_to_vec(&other, &r.id, &r.snapshot).is_err());
}

/// Flushes from several connections at once (nbdcopy opens four) each
/// leave a whole bitmap behind, and the writes survive a reopen.
#[test]
fn concurrent_overlay_flushes_leave_a_whole_bitmap() {
    let repo = repo();
    let gen = image(4 * MIB, 13);
    let r = back_up(&repo, &gen, None);
    let dir = std::env::temp_dir().join(format!(
        "imgstore-overlay-flush-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let reader = crate::ImageReader::new(&repo, &r.id, &r.snapshot, 16 * MIB).unwrap();
    let overlay = crate::Overlay::open(&dir, &r.id, &r.snapshot).unwrap();
    let failures = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (overlay, reader, failures) = (&overlay, &reader, &failures);
            s.spawn(move || {
                for k in 0..40u64 {
                    let block = [(t * 40 + k) as u8; 4096];
                    overlay
                        .write_at(reader, (t * 40 + k) * 4096, &block)
                        .unwrap();
                    if overlay.flush().is_err() {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(failures.into_inner(), 0, "concurrent flushes failed");
    drop(overlay);
    let overlay = crate::Overlay::open(&dir, &r.id, &r.snapshot).unwrap();
    let mut got = vec![0u8; 160 * 4096];
    overlay.read_at(&reader, 0, &mut got).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    for (i, b) in got.chunks(4096).enumerate() {
        assert!(b.iter().all(|&x| x == i as u8), "block {i} lost its write");
    }
}

/// A junk snapshot record (46 bytes shaped like a sealed record, which a
/// store that can only check hashes accepts) is reported and skipped by
/// everything that lists snapshots, never fatal: listing, selection,
/// parent choice, retention; it is named only by its id, and removed so.
#[test]
fn one_unreadable_snapshot_record_is_skipped_never_fatal() {
    use imgstore_format::sealed::{SEALED_RECORD_MAGIC, SEAL_NONCE, SEAL_TAG};
    use imgstore_repo::RepoError;

    use crate::{parent_for, select_listed, ParentChoice, Selector};

    let repo = sealed_repo();
    let g0 = image(6 * MIB, 71);
    let mut g1 = g0.clone();
    g1[MIB..MIB + 30_000].copy_from_slice(&image(30_000, 72));
    let r0 = back_up(&repo, &g0, None);
    let r1 = back_up(&repo, &g1, Some(&r0));
    let mut junk = vec![SEALED_RECORD_MAGIC, b'S', 0, 0, 0, 0];
    junk.extend(std::iter::repeat_n(0xa5u8, SEAL_NONCE + SEAL_TAG));
    let (bad, _) = repo.commit(&junk, &[], None).unwrap();

    assert!(repo.snapshots().is_err(), "the strict listing fails");
    let list = repo.list_snapshots().unwrap();
    assert_eq!(list.snapshots.len(), 2);
    assert_eq!(list.unreadable.len(), 1);
    assert_eq!(list.unreadable[0].id, bad);

    // latest and the parent come from the readable ones; the junk by id
    // is an error that says what it is.
    let (id, _) = select_listed(&list, &Selector::Latest, Some("vm")).unwrap();
    assert_eq!(id, r1.id);
    let parent = parent_for(&list.snapshots, "vm", &ParentChoice::Latest).unwrap();
    assert_eq!(parent.map(|p| p.0), Some(r1.id));
    let err = select_listed(&list, &Selector::parse(&bad.to_hex()).unwrap(), None).unwrap_err();
    assert!(
        matches!(&err, EngineError::Repo(RepoError::UnreadableSnapshot { id, .. }) if *id == bad),
        "{err}"
    );
    assert!(crate::retag(&repo, &bad, None, &["x".into()], &[]).is_err());
    // A backup with a parent still works, and restores.
    let r2 = back_up(&repo, &g1, Some(&r1));
    assert_eq!(restore_to_vec(&repo, &r2.id, &r2.snapshot).unwrap(), g1);

    // check reports it.
    let report = check(&repo, ReadData::None, &NoProgress).unwrap();
    assert!(!report.is_clean());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains(&bad.to_hex())),
        "{:?}",
        report.problems
    );
    assert_eq!(
        report.problems.len(),
        1,
        "only the record: {:?}",
        report.problems
    );

    // A policy neither fails nor chooses it.
    let keep_last = crate::policy::Policy {
        last: 1,
        ..Default::default()
    };
    let vm = crate::SnapshotFilter {
        name: Some("vm".into()),
        ..Default::default()
    };
    let plan = plan_forget(&repo, &ForgetRequest::Policy(keep_last), &vm).unwrap();
    let mut removed = plan.remove();
    removed.sort();
    let mut want = vec![r0.id, r1.id];
    want.sort();
    assert_eq!(removed, want);
    assert!(plan.unreadable_removed.is_empty());
    assert_eq!(plan.unreadable_kept.len(), 1);
    forget(&repo, &plan).unwrap();

    // Named by a prefix, it is removed; nothing unreadable is left.
    let hex = bad.to_hex();
    let plan = plan_forget(
        &repo,
        &ForgetRequest::Snapshots(vec![hex[..12].to_string()]),
        &vm,
    )
    .unwrap();
    assert_eq!(plan.remove(), vec![bad]);
    assert!(plan.decisions.is_empty() && plan.unreadable_kept.is_empty());
    forget(&repo, &plan).unwrap();
    let list = repo.list_snapshots().unwrap();
    assert!(list.unreadable.is_empty());
    assert_eq!(list.snapshots.len(), 1);
    assert!(check(&repo, ReadData::All, &NoProgress).unwrap().is_clean());
    assert_eq!(restore_to_vec(&repo, &r2.id, &r2.snapshot).unwrap(), g1);
}

/// Over a link the parent's index arrives after the workers have started:
/// the regions they hash meanwhile are put aside and compared once it is
/// here; those that differ are read again and stored. The snapshot must be
/// the one a backup with the index at hand gives.
#[test]
fn regions_hashed_before_the_parents_index_arrives_are_compared_when_it_does() {
    let repo = repo();
    let rs = repo.config().region_size as usize;
    let regions = 12;
    let mut bytes = image(regions * rs, 21);
    let path = temp_file("aside", &bytes);
    let opts = |parent: Option<&BackupReport>| BackupOptions {
        name: "vm".into(),
        parent: parent.map(|p| (p.id, p.snapshot.clone())),
        ..Default::default()
    };
    let first = backup(
        &repo,
        Source::open(&path).unwrap(),
        &opts(None),
        &NoProgress,
    )
    .unwrap();
    // The first region (which may hold the root), one in the middle and
    // the last change; the rest stays.
    for r in [0, 5, regions - 1] {
        let at = r * rs + 4096 * (r + 1);
        for b in &mut bytes[at..at + 12_345] {
            *b = b.wrapping_add(101);
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    // Long enough for every region to be read and hashed first.
    repo.delay_pages(std::time::Duration::from_millis(400));
    let second = backup(
        &repo,
        Source::open(&path).unwrap(),
        &opts(Some(&first)),
        &NoProgress,
    )
    .unwrap();
    repo.delay_pages(std::time::Duration::ZERO);
    assert_eq!(second.snapshot.digest, *blake3::hash(&bytes).as_bytes());
    assert_eq!(second.bytes_reused, ((regions - 3) * rs) as u64);
    assert_eq!(
        second.bytes_read,
        bytes.len() as u64,
        "each byte counted once"
    );
    assert_eq!(
        second.snapshot.stats.chunks,
        back_up(&repo, &bytes, None).snapshot.stats.chunks,
        "the chunks of a full backup of the same bytes"
    );
    assert_eq!(
        restore_to_vec(&repo, &second.id, &second.snapshot).unwrap(),
        bytes
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Regions hashed before the backup starts (`PreHash`, while a command
/// reaches its server) are taken from the parent without being read when
/// equal, and read and stored when not: the snapshot is the one a plain
/// backup gives. With another region size the values are not used.
#[test]
fn regions_hashed_ahead_of_the_backup_are_compared_with_the_parent() {
    let repo = repo();
    let rs = repo.config().region_size as usize;
    let regions = 10;
    let mut bytes = image(regions * rs + 12_345, 33);
    let path = temp_file("prehash", &bytes);
    let opts = |parent: Option<&BackupReport>, pre: Option<crate::PreHash>| BackupOptions {
        name: "vm".into(),
        parent: parent.map(|p| (p.id, p.snapshot.clone())),
        prehash: pre.map(Arc::new),
        ..Default::default()
    };
    let first = backup(
        &repo,
        Source::open(&path).unwrap(),
        &opts(None, None),
        &NoProgress,
    )
    .unwrap();
    // Change region 3 and the short last one.
    for at in [3 * rs + 777, regions * rs + 100] {
        for b in &mut bytes[at..at + 5_000] {
            *b ^= 0x3c;
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    for (region_size, used) in [(rs, true), (rs * 2, false)] {
        let source = Source::open(&path).unwrap();
        let pre = crate::PreHash::start(&source, region_size).unwrap();
        // Every region after the first: region 0 is the backup's own, and
        // the all-zero region 1 of `image` is a hole only in a sparse file.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while pre.hashed() < regions.div_ceil(region_size / rs)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Region 5 changes after it was hashed ahead: a region taken from
        // the values is taken as it was when hashed (equal to the parent),
        // which shows the values were used; without them it is read now.
        let mut late = bytes.clone();
        late[5 * rs + 10] ^= 0xff;
        std::fs::write(&path, &late).unwrap();
        let r = backup(&repo, source, &opts(Some(&first), Some(pre)), &NoProgress).unwrap();
        let (want, reused) = if used {
            (&bytes, regions - 1)
        } else {
            (&late, regions - 2)
        };
        assert_eq!(
            r.snapshot.digest,
            *blake3::hash(want).as_bytes(),
            "used: {used}"
        );
        assert_eq!(r.bytes_reused, (reused * rs) as u64, "used: {used}");
        assert_eq!(r.bytes_read, bytes.len() as u64, "each byte counted once");
        assert_eq!(
            &restore_to_vec(&repo, &r.id, &r.snapshot).unwrap(),
            want,
            "used: {used}"
        );
        std::fs::write(&path, &bytes).unwrap();
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
