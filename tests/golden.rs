//! Golden vectors: chunk boundaries *and ids* of a seeded input are pinned.
//! A change that fails this test would stop new backups from deduplicating
//! against every existing repository: that is a format change (a new
//! `FormatVersion` variant, keeping the old chunker), not a refactor.

use imgstore_chunker::{Chunker, Kind, Params};

use crate::util::seeded;

#[test]
fn chunk_ids_of_a_seeded_region_are_pinned() {
    let mut region = seeded(8 << 20, 0x5eed);
    region[(3 << 20)..(3 << 20) + (200 << 10)].fill(0);
    let chunker = Chunker::new(Params::DEFAULT).unwrap();
    let mut extents = Vec::new();
    chunker.split(&region, &mut extents);
    // One digest over (kind, length, BLAKE3 id) of every extent.
    let mut h = blake3::Hasher::new();
    for e in &extents {
        h.update(&[(e.kind == Kind::Zero) as u8]);
        h.update(&(e.len as u64).to_le_bytes());
        if e.kind == Kind::Data {
            h.update(blake3::hash(&region[e.offset..e.offset + e.len]).as_bytes());
        }
    }
    let first: Vec<usize> = extents.iter().take(4).map(|e| e.len).collect();
    assert_eq!(
        (extents.len(), first, h.finalize().to_hex().to_string()),
        (
            110,
            vec![70860, 32337, 69488, 147106],
            "8f886565bb11762951bb4efde9503a0b75ceba2da6f905552b8334b5d1b23e81".to_string()
        ),
        "chunk boundaries or ids changed"
    );
}
