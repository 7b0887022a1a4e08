//! Reference counts and orphans on a real RocksDB.

mod common;

use std::collections::HashMap;

use imgstore_format::{Id, ObjectKind, Page, RecipeEntry, Region, Snapshot, SnapshotStats};
use imgstore_repo::Repository;
use imgstore_store::{Mode, Store, StoreError};

fn frame(data: &[u8]) -> (Vec<u8>, u32) {
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    (
        imgstore_format::encode_chunk(data, &mut c),
        data.len() as u32,
    )
}

fn snapshot(pages: &[Page], size: u64, t: i64) -> Snapshot {
    Snapshot {
        time_ns: t,
        name: "t".into(),
        hostname: "h".into(),
        source: "s".into(),
        tags: vec![],
        size,
        digest: [0; 32],
        region_size: 8 << 20,
        pages: pages.iter().map(|p| Id::hash(&p.encode())).collect(),
        stats: SnapshotStats::default(),
        bitmap: None,
    }
}

#[test]
fn counts_follow_parents_and_orphans_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let store = Store::init(&repo, common::config()).unwrap();
    let (d1, d2) = (vec![1u8; 70_000], vec![2u8; 50_000]);
    let (c1, c2) = (Id::hash(&d1), Id::hash(&d2));
    let region = Region {
        entries: vec![
            RecipeEntry {
                len: 70_000,
                chunk: Some(c1),
            },
            RecipeEntry {
                len: 50_000,
                chunk: Some(c2),
            },
            RecipeEntry {
                len: 70_000,
                chunk: Some(c1),
            },
        ],
    };
    let enc = region.encode();
    let rid = Id::hash(&enc);
    let frames: HashMap<Id, (Vec<u8>, u32)> = [(c1, frame(&d1)), (c2, frame(&d2))].into();
    let out = store.put_region(&rid, &enc, &frames).unwrap();
    assert!(out.region_new);
    assert_eq!(out.new_chunks, 2);
    // Uncommitted: the region is an orphan; its chunks are referenced by it.
    assert_eq!(
        store
            .ref_count(ObjectKind::Region, &rid)
            .unwrap()
            .unwrap()
            .count,
        0
    );
    assert_eq!(store.totals().unwrap().orphans, 1);
    assert_eq!(
        store
            .ref_count(ObjectKind::Chunk, &c1)
            .unwrap()
            .unwrap()
            .count,
        2
    );
    // Storing the same region again adds nothing.
    assert_eq!(
        store
            .put_region(&rid, &enc, &HashMap::new())
            .unwrap()
            .new_chunks,
        0
    );

    let page = Page {
        regions: vec![rid, Id::ZERO, rid],
        cvs: vec![[0; 32]; 3],
    };
    let size = 2 * (8 << 20) + region.len();
    let (s1, added) = common::commit_plain(
        &store,
        &snapshot(std::slice::from_ref(&page), size, 1),
        std::slice::from_ref(&page),
        None,
    )
    .unwrap();
    assert!(added > 0);
    assert_eq!(
        store
            .ref_count(ObjectKind::Region, &rid)
            .unwrap()
            .unwrap()
            .count,
        2
    );
    assert_eq!(store.totals().unwrap().orphans, 0);
    let pid = Id::hash(&page.encode());
    let (s2, added2) = common::commit_plain(
        &store,
        &snapshot(std::slice::from_ref(&page), size, 2),
        std::slice::from_ref(&page),
        None,
    )
    .unwrap();
    assert_eq!(added2, 0, "an existing page is not stored again");
    assert_ne!(s1, s2);
    assert_eq!(
        store
            .ref_count(ObjectKind::Page, &pid)
            .unwrap()
            .unwrap()
            .count,
        2
    );
    assert_eq!(
        store
            .ref_count(ObjectKind::Region, &rid)
            .unwrap()
            .unwrap()
            .count,
        2
    );
    assert_eq!(
        store
            .ref_count(ObjectKind::Chunk, &c2)
            .unwrap()
            .unwrap()
            .count,
        1
    );

    // A page naming a region that is not stored is refused, nothing committed.
    let bad = Page {
        regions: vec![Id([9; 32])],
        cvs: vec![[0; 32]],
    };
    let err = common::commit_plain(
        &store,
        &snapshot(std::slice::from_ref(&bad), 100, 3),
        std::slice::from_ref(&bad),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Missing {
                kind: ObjectKind::Region,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.snapshots().unwrap().len(), 2);

    // Frames read back and a second writer is refused while this one lives.
    let f = store.chunk_frames(&[c2, c1]).unwrap();
    assert_eq!(f[0].as_ref().unwrap(), &frame(&d2).0);
    assert_eq!(f[1].as_ref().unwrap(), &frame(&d1).0);
    match Store::open(&repo, Mode::Write { operation: "gc" }) {
        Err(StoreError::Busy { operation, pid, .. }) => {
            assert_eq!(operation, "init");
            assert_eq!(pid, std::process::id().to_string());
        }
        other => panic!("expected busy, got {:?}", other.map(|_| ())),
    }
    drop(store);
    let ro = Store::open(&repo, Mode::ReadOnly).unwrap();
    assert_eq!(ro.snapshots().unwrap().len(), 2);
    assert!(matches!(
        ro.put_region(&rid, &enc, &frames),
        Err(StoreError::ReadOnly)
    ));
}
