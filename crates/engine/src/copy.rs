//! Copying snapshots between repositories: a local repository replicated
//! to a server (or back, or between any two), as restic's `copy` and
//! Proxmox Backup Server's sync jobs do.
//!
//! A copy is a backup whose source is another repository's snapshot: the
//! destination is asked which regions and chunks it lacks, and only those
//! are sent. Regions the destination already holds (every region of an
//! earlier copied generation that did not change) cost one batched lookup.
//! Every chunk sent is decoded and checked against its id first, and every
//! recipe and page is checked against its id when read, so a copy never
//! carries damage from one repository to the other: it fails naming the
//! snapshot offset, and the destination gets no snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use imgstore_format::sealed::RecordKind;
use imgstore_format::{Id, ObjectKind, Region, Snapshot};
use imgstore_repo::{Codec, Frames, Repository};
use rayon::prelude::*;

use crate::{EngineError, Progress, SnapshotReader};

/// What one snapshot's copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// The snapshot's id (the same in both repositories).
    pub id: Id,
    /// Distinct stored regions the snapshot names.
    pub regions: u64,
    /// Regions the destination lacked and got.
    pub regions_sent: u64,
    /// Chunks the destination lacked and got.
    pub chunks_sent: u64,
    /// Stored bytes of those chunks.
    pub chunk_bytes_sent: u64,
}

/// Copies snapshot `id` (`snapshot` is its record) from `src` to `dst`,
/// recording `parent` (a snapshot already in `dst`) as its parent.
/// Progress counts image bytes of the regions examined.
pub fn copy_snapshot(
    src: &dyn Repository,
    dst: &dyn Repository,
    id: &Id,
    snapshot: &Snapshot,
    parent: Option<&Id>,
    progress: &dyn Progress,
) -> Result<CopyReport, EngineError> {
    if !same_keys(src.codec(), dst.codec()) {
        return Err(EngineError::Invalid {
            what: "copy",
            why:
                "the two repositories do not share a key (or one is encrypted and the other not): \
                  their chunk ids differ, so snapshots cannot be copied between them"
                    .into(),
        });
    }
    let reader = SnapshotReader::open(src, id, snapshot)?;
    progress.start(Some(snapshot.size));
    // First image index of each distinct stored region (for offsets in
    // damage reports).
    let mut first: HashMap<Id, usize> = HashMap::new();
    for (i, r) in reader.region_ids().iter().enumerate() {
        if *r != Id::ZERO {
            first.entry(*r).or_insert(i);
        }
    }
    let mut regions: Vec<(Id, usize)> = first.iter().map(|(r, i)| (*r, *i)).collect();
    regions.sort_by_key(|(_, i)| *i);
    let mut absent = Vec::new();
    for batch in regions.chunks(1024) {
        let ids: Vec<Id> = batch.iter().map(|(r, _)| *r).collect();
        for ((r, i), rc) in batch.iter().zip(dst.ref_counts(ObjectKind::Region, &ids)?) {
            if rc.is_none() {
                absent.push((*r, *i));
            } else {
                progress.advance(reader.region_len(*i));
            }
        }
    }
    let chunks_sent = AtomicU64::new(0);
    let bytes_sent = AtomicU64::new(0);
    absent
        .par_iter()
        .try_for_each(|(rid, index)| -> Result<(), EngineError> {
            let base = *index as u64 * reader.region_size();
            let recipe_err = |e: imgstore_repo::RepoError| EngineError::RecipeDamaged {
                snapshot: reader.label().to_string(),
                offset: base,
                source: Box::new(e),
            };
            // The stored bytes travel as they are (sealed ones too); they
            // are opened here only to be checked and to list the chunks.
            let stored = src
                .raw_records(ObjectKind::Region, &[*rid])
                .map_err(recipe_err)?
                .pop()
                .expect("one recipe");
            let region = src
                .codec()
                .open_record(RecordKind::Region, rid, &stored)
                .and_then(|enc| {
                    Region::decode(&enc).map_err(|source| imgstore_repo::RepoError::Corrupt {
                        kind: ObjectKind::Region,
                        id: *rid,
                        source,
                    })
                })
                .map_err(recipe_err)?;
            // Offset and length of each chunk's first use in the region.
            let mut at: HashMap<Id, (u64, u64)> = HashMap::new();
            let mut off = base;
            for e in &region.entries {
                if let Some(c) = e.chunk {
                    at.entry(c).or_insert((off, e.len as u64));
                }
                off += e.len as u64;
            }
            let mut ids: Vec<Id> = at.keys().copied().collect();
            ids.sort();
            let known = dst.chunks_known(&ids)?;
            let missing: Vec<Id> = ids
                .iter()
                .zip(known)
                .filter(|(_, k)| !k)
                .map(|(id, _)| *id)
                .collect();
            let frames = reader.frames(&missing, |c| at[c].0)?;
            let mut map: Frames = HashMap::with_capacity(missing.len());
            for (cid, frame) in missing.iter().zip(frames) {
                let (o, len) = at[cid];
                reader.decode_verified(&frame, *cid, o, len)?;
                bytes_sent.fetch_add(frame.len() as u64, Relaxed);
                map.insert(*cid, (frame, len as u32));
            }
            chunks_sent.fetch_add(map.len() as u64, Relaxed);
            dst.put_region(rid, &stored, &map)?;
            progress.advance(reader.region_len(*index));
            Ok(())
        })?;
    let mut pages = Vec::with_capacity(snapshot.pages.len());
    let mut unique: Vec<Id> = snapshot.pages.clone();
    unique.sort();
    unique.dedup();
    for batch in unique.chunks(64) {
        // Checked against their ids (and authenticated) before they travel.
        src.pages(batch)?;
        pages.extend(src.raw_records(ObjectKind::Page, batch)?);
    }
    let record = src
        .snapshot_records()?
        .into_iter()
        .find(|(k, _)| k.as_slice() == id.as_bytes())
        .map(|(_, v)| v)
        .ok_or(imgstore_repo::RepoError::NoSnapshot { id: *id })?;
    let (new_id, _) = dst.commit(&record, &pages, parent)?;
    debug_assert_eq!(new_id, *id);
    progress.finish();
    let unique: HashSet<&Id> = first.keys().collect();
    Ok(CopyReport {
        id: new_id,
        regions: unique.len() as u64,
        regions_sent: absent.len() as u64,
        chunks_sent: chunks_sent.into_inner(),
        chunk_bytes_sent: bytes_sent.into_inner(),
    })
}

/// Whether two codecs make the same chunk ids (both plain, or the same key).
fn same_keys(a: &Codec, b: &Codec) -> bool {
    match (a, b) {
        (Codec::Plain, Codec::Plain) => true,
        (Codec::Sealed(x), Codec::Sealed(y)) => {
            x.chunk_id(b"imgstore key check") == y.chunk_id(b"imgstore key check")
        }
        _ => false,
    }
}
