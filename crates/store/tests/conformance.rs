//! One scenario through the `Repository` trait, run on the local RocksDB
//! store and on `MemRepo`: both must answer the same, so the engine's unit
//! tests on `MemRepo` speak for the real store.

mod common;

use std::collections::HashMap;

use imgstore_format::{
    ChunkingConfig, FrameCodec, Id, ObjectKind, Page, RecipeEntry, Region, RepoConfig, Snapshot,
    SnapshotStats,
};
use imgstore_repo::{ChunkFault, DamageMark, MemRepo, RepoError, Repository};
use imgstore_store::{Mode, Store};

fn config() -> RepoConfig {
    RepoConfig::new(
        "cd".repeat(16),
        0,
        ChunkingConfig {
            algorithm: "fastcdc-2020".into(),
            min: 16384,
            avg: 65536,
            max: 262144,
            zero_min: 16384,
        },
        3,
    )
}

struct Fixture {
    data: Vec<Vec<u8>>,
    ids: Vec<Id>,
}

impl Fixture {
    fn new() -> Fixture {
        let data: Vec<Vec<u8>> = (0..4u8)
            .map(|i| {
                (0..60_000u32)
                    .map(|j| (j.wrapping_mul(31) as u8) ^ i)
                    .collect()
            })
            .collect();
        let ids = data.iter().map(|d| Id::hash(d)).collect();
        Fixture { data, ids }
    }

    fn frames(&self, which: &[usize]) -> HashMap<Id, (Vec<u8>, u32)> {
        which
            .iter()
            .map(|&i| {
                let f = FrameCodec::with_thread(|c| c.encode(&self.data[i], 3));
                (self.ids[i], (f, self.data[i].len() as u32))
            })
            .collect()
    }

    fn region(&self, which: &[usize]) -> (Id, Region, Vec<u8>) {
        let region = Region {
            entries: which
                .iter()
                .map(|&i| RecipeEntry {
                    len: self.data[i].len() as u32,
                    chunk: Some(self.ids[i]),
                })
                .collect(),
        };
        let enc = region.encode();
        (Id::hash(&enc), region, enc)
    }
}

fn snapshot(pages: &[Page], regions: u64, t: i64) -> Snapshot {
    Snapshot {
        time_ns: t,
        name: "vm".into(),
        hostname: "h".into(),
        source: "s".into(),
        tags: vec![],
        size: regions * 120_000,
        digest: [0; 32],
        region_size: 8 << 20,
        pages: pages.iter().map(|p| Id::hash(&p.encode())).collect(),
        stats: SnapshotStats::default(),
    }
}

/// The first half of the scenario, up to a damage mark; the caller then
/// reopens the repository as a new writer (marks pending again) for
/// [`second_half`]. Returns what was observed.
fn first_half(repo: &dyn Repository) -> Vec<String> {
    let f = Fixture::new();
    let mut seen = Vec::new();
    let (r1, reg1, enc1) = f.region(&[0, 1]);
    let (r2, _reg2, enc2) = f.region(&[1, 2]);
    assert_eq!(repo.chunks_known(&f.ids).unwrap(), vec![false; 4]);
    let o1 = repo.put_region(&r1, &enc1, &f.frames(&[0, 1])).unwrap();
    let o2 = repo.put_region(&r2, &enc2, &f.frames(&[2])).unwrap();
    seen.push(format!("put {o1:?} {o2:?}"));
    // A chunk neither known nor supplied is refused, storing nothing.
    let (r3, _reg3, enc3) = f.region(&[3]);
    let err = repo.put_region(&r3, &enc3, &HashMap::new()).unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::Missing {
                kind: ObjectKind::Chunk,
                ..
            }
        ),
        "{err}"
    );
    seen.push(format!("known {:?}", repo.chunks_known(&f.ids).unwrap()));
    seen.push(format!("totals {:?}", repo.totals().unwrap()));

    let p1 = Page {
        regions: vec![r1, r2],
        cvs: vec![[1; 32]; 2],
    };
    let p2 = Page {
        regions: vec![r2],
        cvs: vec![[2; 32]],
    };
    let (s1, a1) = common::commit_plain(
        repo,
        &snapshot(std::slice::from_ref(&p1), 2, 1),
        &[p1],
        None,
    )
    .unwrap();
    let (s2, a2) = common::commit_plain(
        repo,
        &snapshot(std::slice::from_ref(&p2), 1, 2),
        &[p2],
        Some(&s1),
    )
    .unwrap();
    seen.push(format!("commit {a1} {a2}"));
    seen.push(format!("totals {:?}", repo.totals().unwrap()));
    seen.push(format!(
        "refs {:?}",
        repo.ref_counts(ObjectKind::Chunk, &f.ids).unwrap()
    ));
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.iter().map(|s| s.0).collect::<Vec<_>>().len(), 2);
    assert_eq!(repo.regions(&[r1]).unwrap()[0], reg1);

    assert_eq!(repo.parents().unwrap(), vec![(s2, s1)]);
    // Retagging replaces the record; protection and parent follow it.
    repo.set_protected(&s2, true).unwrap();
    let mut tagged = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .find(|s| s.0 == s2)
        .unwrap()
        .1;
    tagged.tags = vec!["kept".into()];
    let s2 = repo.replace_snapshot(&s2, &tagged.encode()).unwrap();
    assert_eq!(repo.protected().unwrap(), vec![s2]);
    assert_eq!(repo.parents().unwrap(), vec![(s2, s1)]);
    let mut other = tagged.clone();
    other.pages.clear();
    assert!(repo.replace_snapshot(&s2, &other.encode()).is_err());

    assert!(matches!(
        repo.forget(&[s2]),
        Err(RepoError::Protected { .. })
    ));
    assert!(matches!(
        repo.forget(&[Id([9; 32])]),
        Err(RepoError::NoSnapshot { .. })
    ));
    seen.push(format!("forget {:?}", repo.forget(&[s1]).unwrap()));
    seen.push(format!("parents {:?}", repo.parents().unwrap()));
    // The zero chaining value cache: entries in index order, misses as None.
    repo.put_zero_cvs(8 << 20, &[(3, [3; 32]), (1, [1; 32])])
        .unwrap();
    repo.put_zero_cvs(4 << 20, &[(2, [9; 32])]).unwrap();
    seen.push(format!("zero {:?}", repo.zero_cvs(8 << 20, 5).unwrap()));
    assert_eq!(
        repo.zero_cvs(8 << 20, 2).unwrap(),
        vec![None, Some([1; 32])]
    );
    let dry = repo.gc(true).unwrap();
    let real = repo.gc(false).unwrap();
    assert_eq!(dry.removed, real.removed);
    seen.push(format!("gc {:?}", real.removed));
    seen.push(format!("totals {:?}", repo.totals().unwrap()));
    let reads = repo.chunk_frames(&[f.ids[0], f.ids[1]]).unwrap();
    assert_eq!(reads[0], Err(ChunkFault::Missing));
    assert!(reads[1].is_ok());

    // Healing: a marked chunk counts as unknown to a new writer, and the
    // region that names it rewrites it and clears the mark at the commit.
    repo.mark_damaged(&[DamageMark {
        kind: ObjectKind::Chunk,
        id: f.ids[2],
        why: "test".into(),
    }])
    .unwrap();
    seen
}

fn second_half(w: &dyn Repository) -> Vec<String> {
    let f = Fixture::new();
    let mut seen = Vec::new();
    let (r2, _reg2, enc2) = f.region(&[1, 2]);
    assert_eq!(w.damage_pending(), 1);
    assert_eq!(w.chunks_known(&[f.ids[2]]).unwrap(), vec![false]);
    w.put_region(&r2, &enc2, &f.frames(&[2])).unwrap();
    let p3 = Page {
        regions: vec![r2],
        cvs: vec![[3; 32]],
    };
    common::commit_plain(w, &snapshot(std::slice::from_ref(&p3), 1, 3), &[p3], None).unwrap();
    assert_eq!(w.damage_pending(), 0);
    seen.push(format!("marks {:?}", w.damage_marks().unwrap()));
    seen.push(format!("totals {:?}", w.totals().unwrap()));
    let mut orphans = 0;
    w.scan_orphans(&mut |_| orphans += 1).unwrap();
    seen.push(format!("orphans {orphans}"));
    seen
}

#[test]
fn local_store_and_memory_repository_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let mut local = first_half(&Store::init(&path, config()).unwrap());
    local.extend(second_half(
        &Store::open(&path, Mode::Write { operation: "test" }).unwrap(),
    ));
    let mem = MemRepo::new(config());
    let mut memory = first_half(&mem);
    memory.extend(second_half(&mem.reopen()));
    assert_eq!(local, memory);
    assert!(local.len() > 8, "{local:?}");
}
