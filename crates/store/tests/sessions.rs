//! What a server needs from the store: sessions whose pins gc honours,
//! namespace marks, and commits that may be repeated.

mod common;

use std::collections::HashMap;

use imgstore_format::{
    FrameCodec, Id, ObjectKind, Page, RecipeEntry, Region, Snapshot, SnapshotStats,
};
use imgstore_repo::{RepoError, Repository};
use imgstore_store::{Mode, Scope, Store};

fn store(dir: &std::path::Path) -> Store {
    drop(Store::init(dir, common::config()).unwrap());
    Store::open(dir, Mode::Write { operation: "test" }).unwrap()
}

fn chunk(i: u8) -> (Id, Vec<u8>) {
    let d: Vec<u8> = (0..50_000u32)
        .map(|j| (j.wrapping_mul(7) as u8) ^ i)
        .collect();
    (Id::hash(&d), d)
}

fn region(chunks: &[u8]) -> (Id, Region, Vec<u8>) {
    let region = Region {
        entries: chunks
            .iter()
            .map(|&i| RecipeEntry {
                len: 50_000,
                chunk: Some(chunk(i).0),
            })
            .collect(),
    };
    let enc = region.encode();
    (Id::hash(&enc), region, enc)
}

fn frames(chunks: &[u8]) -> HashMap<Id, (Vec<u8>, u32)> {
    chunks
        .iter()
        .map(|&i| {
            let (id, d) = chunk(i);
            (id, (FrameCodec::with_thread(|c| c.encode(&d, 3)), 50_000))
        })
        .collect()
}

fn snap(regions: &[Id], t: i64) -> (Snapshot, Vec<Page>) {
    let page = Page {
        regions: regions.to_vec(),
        cvs: vec![[0; 32]; regions.len()],
    };
    let s = Snapshot {
        time_ns: t,
        name: "web-1".into(),
        hostname: "h".into(),
        source: "s".into(),
        tags: vec![],
        size: regions.len() as u64 * 100_000,
        digest: [0; 32],
        region_size: 8 << 20,
        pages: vec![Id::hash(&page.encode())],
        stats: SnapshotStats::default(),
        bitmap: None,
    };
    (s, vec![page])
}

fn scope(session: u64, ns: Option<&str>, global: bool) -> Scope {
    Scope {
        session,
        namespace: ns.map(str::to_string),
        global,
    }
}

/// A snapshot of chunks 0 and 1, forgotten: its objects are garbage once
/// gc reaches them. Returns the chunk ids.
fn forgotten_snapshot(s: &Store) -> Vec<Id> {
    let (r, _reg, enc) = region(&[0, 1]);
    s.put_region(&r, &enc, &frames(&[0, 1])).unwrap();
    let (sn, pages) = snap(&[r], 1);
    let (id, _) = common::commit_plain(s, &sn, &pages, None).unwrap();
    s.forget(&[id]).unwrap();
    vec![chunk(0).0, chunk(1).0]
}

#[test]
fn gc_leaves_what_a_live_session_was_told_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let ids = forgotten_snapshot(&s);
    let sc = scope(7, None, true);
    assert_eq!(s.session_chunks_known(&sc, &ids).unwrap(), vec![true, true]);
    assert_eq!(s.pinned(), 2);
    let out = Repository::gc(&s, false).unwrap();
    assert_eq!(
        (out.removed.pages, out.removed.regions, out.removed.chunks),
        (1, 1, 0)
    );
    // The session now names them without sending them: accepted.
    let (r2, _reg2, enc2) = region(&[1, 0]);
    s.put_region_in(Some(&sc), &r2, &enc2, &HashMap::new())
        .unwrap();
    // Its region is pinned until the commit, its chunks held by the region.
    Repository::gc(&s, false).unwrap();
    let (sn, pages) = snap(&[r2], 2);
    s.commit_in(
        Some(&sc),
        &sn.encode(),
        &pages.iter().map(|p| p.encode()).collect::<Vec<_>>(),
        None,
        None,
    )
    .unwrap();
    s.end_session(7);
    assert_eq!(s.pinned(), 0);
    let frames = s.chunk_frames(&ids).unwrap();
    assert!(frames.iter().all(|f| f.is_ok()));
    assert_eq!(Repository::totals(&s).unwrap().orphans, 0);
}

#[test]
fn without_a_pin_the_same_race_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let ids = forgotten_snapshot(&s);
    // Asked outside a session: nothing pinned.
    assert_eq!(s.chunks_known(&ids).unwrap(), vec![true, true]);
    Repository::gc(&s, false).unwrap();
    let (r2, _reg2, enc2) = region(&[1, 0]);
    let err = s
        .put_region_in(Some(&scope(8, None, true)), &r2, &enc2, &HashMap::new())
        .unwrap_err();
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
    assert_eq!(Repository::totals(&s).unwrap().objects.chunks, 0);
}

#[test]
fn a_session_region_survives_gc_until_the_session_ends() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let sc = scope(9, None, true);
    let (r, _reg, enc) = region(&[3]);
    s.put_region_in(Some(&sc), &r, &enc, &frames(&[3])).unwrap();
    let out = Repository::gc(&s, false).unwrap();
    assert_eq!(out.removed.regions, 0, "pinned region deleted");
    s.end_session(9);
    let out = Repository::gc(&s, false).unwrap();
    assert_eq!((out.removed.regions, out.removed.chunks), (1, 1));
}

#[test]
fn namespaces_see_only_their_own_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let a = scope(1, Some("a"), false);
    let (r, _reg, enc) = region(&[4, 5]);
    s.put_region_in(Some(&a), &r, &enc, &frames(&[4, 5]))
        .unwrap();
    let (sn, pages) = snap(&[r], 3);
    s.commit_in(
        Some(&a),
        &sn.encode(),
        &pages.iter().map(|p| p.encode()).collect::<Vec<_>>(),
        None,
        None,
    )
    .unwrap();
    let ids = [chunk(4).0, chunk(5).0];
    assert_eq!(s.session_chunks_known(&a, &ids).unwrap(), vec![true, true]);
    assert_eq!(
        s.session_chunks_known(&scope(2, Some("b"), false), &ids)
            .unwrap(),
        vec![false, false]
    );
    assert_eq!(
        s.session_chunks_known(&scope(3, Some("b"), true), &ids)
            .unwrap(),
        vec![true, true]
    );
    assert_eq!(s.ns_names().unwrap(), vec!["a".to_string()]);
    let keys: Vec<[u8; 33]> = ids.iter().map(|i| ObjectKind::Chunk.key(i)).collect();
    assert_eq!(s.ns_marked("a", &keys).unwrap(), vec![true, true]);
    // Forgotten and collected: the marks go with the objects.
    for sess in 1..=3 {
        s.end_session(sess);
    }
    let id = Repository::snapshots(&s).unwrap()[0].0;
    s.forget(&[id]).unwrap();
    Repository::gc(&s, false).unwrap();
    assert_eq!(s.ns_marked("a", &keys).unwrap(), vec![false, false]);
}

#[test]
fn a_repeated_commit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let (r, _reg, enc) = region(&[6]);
    s.put_region(&r, &enc, &frames(&[6])).unwrap();
    let (sn, pages) = snap(&[r], 4);
    let (id1, _) = common::commit_plain(&s, &sn, &pages, None).unwrap();
    let (id2, added) = common::commit_plain(&s, &sn, &pages, None).unwrap();
    assert_eq!((id1, added), (id2, 0));
    let rc = Repository::ref_counts(&s, ObjectKind::Page, &sn.pages).unwrap();
    assert_eq!(rc[0].unwrap().count, 1, "a page counted twice");
    s.forget(&[id1]).unwrap();
    Repository::gc(&s, false).unwrap();
    assert_eq!(Repository::totals(&s).unwrap().objects.chunks, 0);
}

/// A session that replaced a lost one (the server restarted: no pins
/// survived) asks which regions it may still name: a region another
/// session left as an orphan is reported and pinned, so gc keeps it for
/// the commit; one gc took before the question is reported absent (the
/// backup sends it again); one of another namespace is absent for it.
#[test]
fn a_replacing_session_is_told_which_regions_survived_and_they_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let lost = scope(10, Some("a"), false);
    let (kept, _r1, enc1) = region(&[7]);
    let (taken, _r2, enc2) = region(&[8]);
    s.put_region_in(Some(&lost), &kept, &enc1, &frames(&[7]))
        .unwrap();
    s.put_region_in(Some(&lost), &taken, &enc2, &frames(&[8]))
        .unwrap();
    // The server restarts: the lost session's pins are gone, and a gc
    // runs before the backup comes back for one of the regions.
    s.end_session(10);
    let next = scope(11, Some("a"), false);
    assert_eq!(s.session_regions_known(&next, &[kept]).unwrap(), vec![true]);
    let out = Repository::gc(&s, false).unwrap();
    assert_eq!(
        (out.removed.regions, out.removed.chunks),
        (1, 1),
        "only the unpinned region goes"
    );
    assert_eq!(
        s.session_regions_known(&next, &[kept, taken]).unwrap(),
        vec![true, false]
    );
    assert_eq!(
        s.session_regions_known(&scope(12, Some("b"), false), &[kept])
            .unwrap(),
        vec![false],
        "another namespace's region is not reported"
    );
    // Sent again, the lost region lands, and the commit naming both holds.
    s.put_region_in(Some(&next), &taken, &enc2, &frames(&[8]))
        .unwrap();
    let (sn, pages) = snap(&[kept, taken], 5);
    s.commit_in(
        Some(&next),
        &sn.encode(),
        &pages.iter().map(|p| p.encode()).collect::<Vec<_>>(),
        None,
        None,
    )
    .unwrap();
    s.end_session(11);
    s.end_session(12);
    Repository::gc(&s, false).unwrap();
    let t = Repository::totals(&s).unwrap();
    assert_eq!((t.objects.regions, t.objects.chunks, t.orphans), (2, 2, 0));
}
