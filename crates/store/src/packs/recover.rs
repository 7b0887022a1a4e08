//! Rebuilding a bucket-backed repository's index from the bucket alone
//! (`imgstore recover`), and taking ownership of the bucket.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use imgstore_bucket::{Bucket, BucketError};
use imgstore_format::pack::{
    self, pack_key, pack_path, Location, PackName, PackStat, SnapshotObject,
};
use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{cf, Id, ObjectKind, RefCount, RepoConfig, Storage};
use rocksdb::WriteBatch;

use super::{
    bucket_err, connect, fetch_trailer, listed_packs, listed_snapshots, put_location,
    RecoverOutcome, MAX_CONFIG_BYTES, MAX_SNAPSHOT_BYTES,
};
use crate::index::Index;
use crate::{Result, Store, StoreError};

impl Store {
    /// Rebuilds a bucket-backed repository's local directory `dir` from the
    /// bucket alone: the config, every pack's trailer, every record's copy,
    /// every snapshot object; then the reference counts from the snapshots
    /// down. `storage` says where the bucket is (its endpoint, region and
    /// cache size may differ from the config in the bucket).
    pub fn recover(dir: &Path, storage: &Storage) -> Result<(Store, RecoverOutcome)> {
        let bucket = connect(storage)?;
        let bytes = bucket
            .get(pack::CONFIG_OBJECT, MAX_CONFIG_BYTES)
            .map_err(|e| match e {
                BucketError::NotFound { url, .. } => StoreError::NotARepository {
                    path: PathBuf::from(url),
                    why: "no config object in it".into(),
                },
                e => bucket_err(e),
            })?;
        let mut config = RepoConfig::from_json(&bytes).map_err(|source| StoreError::Format {
            path: PathBuf::from(format!("{}/config", bucket.url())),
            source,
        })?;
        let Some(st) = config.storage.as_mut() else {
            return Err(StoreError::Invalid(format!(
                "{}: the config in the bucket is not a bucket-backed repository's",
                bucket.url()
            )));
        };
        st.endpoint = storage.endpoint.clone();
        st.region = storage.region.clone();
        st.bucket = storage.bucket.clone();
        st.prefix = storage.prefix.clone();
        st.cache_bytes = storage.cache_bytes;
        let fresh = !dir.exists();
        let store = Store::create_local(dir, config, "recover")?;
        match rebuild_index(&store.ix, &bucket)
            .and_then(|out| take_bucket(&store.ix, &bucket).map(|_| out))
        {
            Ok(mut out) => {
                out.requests = bucket.counts();
                Ok((store, out))
            }
            Err(e) => {
                // A half-built index is worse than none: what this call
                // created goes, so `recover` can simply be run again.
                drop(store);
                if fresh {
                    let _ = fs::remove_dir_all(dir);
                }
                Err(e)
            }
        }
    }
}

/// Makes this index the bucket's owner (at `init` and `recover`): a
/// new index id in `meta`, and the `owner` object naming it.
pub(super) fn take_bucket(ix: &Index, bucket: &Bucket) -> Result<()> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| StoreError::Invalid(format!("no randomness: {e}")))?;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut b = WriteBatch::default();
    b.put_cf(ix.cf(cf::META), pack::META_INDEX_KEY, hex.as_bytes());
    ix.write_synced(b, "record the index id")?;
    let owner = pack::Owner {
        index: hex,
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        since: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    };
    bucket
        .put(pack::OWNER_OBJECT, owner.encode())
        .map_err(bucket_err)
}

fn rebuild_index(ix: &Index, bucket: &Bucket) -> Result<RecoverOutcome> {
    let mut out = RecoverOutcome::default();
    let listed = listed_packs(bucket)?;
    // Locations of everything the packs hold (first copy wins) and raw
    // lengths of chunks.
    let mut chunk_at: HashMap<Id, (Location, u32)> = HashMap::new();
    let mut record_at: HashMap<[u8; 33], Location> = HashMap::new();
    let mut sizes: HashMap<PackName, u64> = HashMap::new();
    for (name, len) in listed {
        let trailer = match fetch_trailer(bucket, &name, len) {
            Ok(t) => t,
            Err(_) => {
                out.rejected += 1;
                continue;
            }
        };
        out.packs += 1;
        sizes.insert(name, len);
        for (e, off) in trailer.entries.iter().zip(trailer.offsets()) {
            let loc = Location {
                pack: name,
                offset: off,
                len: e.len,
            };
            match e.kind {
                ObjectKind::Chunk => {
                    chunk_at.entry(e.id).or_insert((loc, e.raw_len));
                }
                k => {
                    record_at.entry(k.key(&e.id)).or_insert(loc);
                }
            }
        }
    }
    // Records: fetched and checked against their ids.
    let mut records: HashMap<[u8; 33], Vec<u8>> = HashMap::new();
    let rkeys: Vec<[u8; 33]> = record_at.keys().copied().collect();
    for group in rkeys.chunks(256) {
        let reqs: Vec<(String, std::ops::Range<u64>)> = group
            .iter()
            .map(|k| {
                let l = record_at[k];
                (pack_path(&l.pack), l.offset..l.offset + l.len as u64)
            })
            .collect();
        for (k, r) in group.iter().zip(bucket.get_ranges(&reqs)) {
            match r {
                Ok(b) if Id::hash(&b).as_bytes() == &k[1..] => {
                    records.insert(*k, b);
                }
                Ok(_) => out.rejected += 1,
                Err(e @ (BucketError::Unavailable { .. } | BucketError::Denied { .. })) => {
                    return Err(bucket_err(e))
                }
                Err(_) => out.rejected += 1,
            }
        }
    }
    // Snapshots.
    let mut snapshots = Vec::new();
    for (id, len) in listed_snapshots(bucket)? {
        if len > MAX_SNAPSHOT_BYTES {
            out.rejected += 1;
            continue;
        }
        let b = bucket
            .get(&pack::snapshot_path(&id), MAX_SNAPSHOT_BYTES)
            .map_err(bucket_err)?;
        match SnapshotObject::decode(&b, &id) {
            Ok(o) => snapshots.push((id, o)),
            Err(_) => out.rejected += 1,
        }
    }
    // A commit sends its snapshot object with its last packs: an object
    // naming a commit pack that is not here may be that of a commit that
    // never finished. It is taken only if everything it names is here
    // (a pack repacked since the commit), and left out otherwise, for gc.
    snapshots.retain(|(_, o)| {
        if o.commit_packs.iter().all(|p| sizes.contains_key(p))
            || names_only_present(&o.record, &records, &chunk_at)
        {
            return true;
        }
        out.unfinished += 1;
        false
    });
    // Reference counts: one per stored parent naming the object, with
    // multiplicity (what every write batch keeps).
    let mut refs: HashMap<[u8; 33], u64> = HashMap::new();
    for (_, o) in &snapshots {
        if let Ok(ps) = record_children(RecordKind::Snapshot, &o.record) {
            for page in ps {
                *refs.entry(ObjectKind::Page.key(&page)).or_default() += 1;
            }
        }
    }
    for (k, b) in &records {
        let (kind, child) = match k[0] {
            b'P' => (RecordKind::Page, ObjectKind::Region),
            _ => (RecordKind::Region, ObjectKind::Chunk),
        };
        if let Ok(cs) = record_children(kind, b) {
            for c in cs {
                *refs.entry(child.key(&c)).or_default() += 1;
            }
        }
    }
    let meta = ix.cf(cf::META);
    let mut batch = WriteBatch::default();
    let mut stats: HashMap<PackName, PackStat> = sizes
        .iter()
        .map(|(n, s)| {
            (
                *n,
                PackStat {
                    size: *s,
                    ..Default::default()
                },
            )
        })
        .collect();
    // One object: its count (and orphan entry), its location, its
    // pack's accounting; batches are written as they fill.
    let mut place =
        |batch: &mut WriteBatch, k: &[u8; 33], rc: RefCount, loc: &Location| -> Result<()> {
            batch.put_cf(ix.cf(cf::REFS), k, rc.encode());
            if rc.count == 0 {
                batch.put_cf(ix.cf(cf::ORPHANS), k, []);
            }
            put_location(ix, batch, k, loc);
            let s = stats.entry(loc.pack).or_default();
            s.live_entries += 1;
            s.live_bytes += loc.len as u64;
            if batch.len() > 50_000 {
                ix.write_synced(std::mem::take(batch), "recover")?;
            }
            Ok(())
        };
    for (id, (loc, raw)) in &chunk_at {
        let k = ObjectKind::Chunk.key(id);
        let rc = RefCount {
            count: refs.get(&k).copied().unwrap_or(0),
            logical_len: *raw,
            stored_len: loc.len,
        };
        place(&mut batch, &k, rc, loc)?;
        out.chunks += 1;
    }
    for (k, b) in &records {
        let rc = RefCount {
            count: refs.get(k).copied().unwrap_or(0),
            logical_len: b.len() as u32,
            stored_len: b.len() as u32,
        };
        batch.put_cf(ix.cf(cf::RECIPES), k, b);
        place(&mut batch, k, rc, &record_at[k])?;
        out.records += 1;
    }
    for (n, s) in &stats {
        batch.put_cf(meta, pack_key(n), s.encode());
    }
    for (id, o) in &snapshots {
        batch.put_cf(ix.cf(cf::SNAPSHOTS), id.as_bytes(), &o.record);
        if o.protected {
            batch.put_cf(meta, imgstore_format::meta::protect_key(id), []);
        }
        if let Some(parent) = o.parent {
            batch.put_cf(
                meta,
                imgstore_format::meta::parent_key(id),
                parent.as_bytes(),
            );
        }
        out.snapshots += 1;
    }
    out.missing = refs
        .keys()
        .filter(|k| match k[0] {
            b'C' => Id::from_slice(&k[1..]).is_some_and(|id| !chunk_at.contains_key(&id)),
            _ => !records.contains_key(*k),
        })
        .count() as u64;
    ix.write_synced(batch, "recover")?;
    ix.flush_all()?;
    Ok(out)
}

/// Whether every page a stored snapshot record names, every region those
/// name and every chunk those name is among what the packs hold.
fn names_only_present(
    snapshot: &[u8],
    records: &HashMap<[u8; 33], Vec<u8>>,
    chunks: &HashMap<Id, (Location, u32)>,
) -> bool {
    let children = |kind: RecordKind, key: &[u8; 33]| -> Option<Vec<Id>> {
        record_children(kind, records.get(key)?).ok()
    };
    let Ok(pages) = record_children(RecordKind::Snapshot, snapshot) else {
        return false;
    };
    pages.iter().all(|p| {
        children(RecordKind::Page, &ObjectKind::Page.key(p)).is_some_and(|regions| {
            regions.iter().all(|r| {
                children(RecordKind::Region, &ObjectKind::Region.key(r))
                    .is_some_and(|cs| cs.iter().all(|c| chunks.contains_key(c)))
            })
        })
    })
}
