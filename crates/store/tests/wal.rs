//! The write-ahead log's preallocation on a real RocksDB.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use imgstore_format::{Id, Page, RecipeEntry, Region, Snapshot};
use imgstore_store::Store;

/// Each flush (every commit) closes the WAL file and opens the next, which
/// RocksDB preallocates; closing truncates what was not used. On a file
/// system mounted with `discard` that truncation is a synchronous discard,
/// which a commit's next sync waits behind: 17.6 MiB of it per commit
/// (1.1 × the largest write buffer) delayed server commits by 150–300 ms.
/// The WAL file a commit leaves must hold at most 1 MiB.
#[test]
fn a_commit_leaves_a_wal_file_of_at_most_one_mib() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let store = Store::init(&repo, common::config()).unwrap();
    let data = vec![7u8; 70_000];
    let cid = Id::hash(&data);
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let frames: HashMap<Id, (Vec<u8>, u32)> =
        [(cid, (imgstore_format::encode_chunk(&data, &mut c), 70_000))].into();
    let region = Region {
        entries: vec![RecipeEntry {
            len: 70_000,
            chunk: Some(cid),
        }],
    };
    let enc = region.encode();
    let rid = Id::hash(&enc);
    store.put_region(&rid, &enc, &frames).unwrap();
    let page = Page {
        regions: vec![rid],
        cvs: vec![[0; 32]],
    };
    let snapshot = Snapshot {
        time_ns: 1,
        name: "w".into(),
        hostname: "h".into(),
        source: "s".into(),
        tags: vec![],
        size: 70_000,
        digest: [0; 32],
        region_size: 8 << 20,
        pages: vec![Id::hash(&page.encode())],
        stats: Default::default(),
        bitmap: None,
    };
    common::commit_plain(&store, &snapshot, std::slice::from_ref(&page), None).unwrap();
    let mut logs = 0;
    for e in std::fs::read_dir(repo.join("db")).unwrap() {
        let e = e.unwrap();
        if e.path().extension().is_some_and(|x| x == "log") {
            logs += 1;
            let allocated = e.metadata().unwrap().blocks() * 512;
            assert!(
                allocated <= 1 << 20,
                "{} has {allocated} bytes allocated",
                e.path().display()
            );
        }
    }
    assert!(logs > 0, "no WAL file in {}", repo.join("db").display());
}
