//! Forgetting snapshots and collecting garbage.
//!
//! Forget deletes snapshot records and decrements their pages in one synced
//! batch; a page whose count reaches zero is listed in `orphans`. The sweep
//! then works *only* on `orphans`: each orphan is deleted together with the
//! decrements of its children (children reaching zero become orphans), in
//! batches that each keep every count exact. Its cost is proportional to
//! what is freed, never to what stays; a crash between batches leaves a
//! consistent store and the next sweep carries on where it stopped.
//!
//! Space: deleting a chunk key leaves its value in a blob file. A manual
//! compaction of the `chunks` column family drops the dead references, and a
//! blob file none of whose blobs is referenced any more is deleted outright —
//! chunks of one backup are written together, so the chunks only old
//! snapshots used tend to fill whole blob files. Blob files that mix live and
//! dead chunks are rewritten (RocksDB blob GC) only when the garbage in
//! them exceeds [`BLOB_GC_RATIO`] of the blob bytes, so rewriting live data
//! costs at most about 1/ratio times the garbage it reclaims, amortised.

use std::collections::HashMap;

use imgstore_format::sealed::RecordKind;
use imgstore_format::{cf, Id, ObjectKind, RefCount};
use rocksdb::WriteBatch;

use crate::index::{Index, Refs};
use crate::{ForgetOutcome, Result, Store, StoreError};

/// Garbage share of blob bytes above which gc rewrites mixed blob files.
pub const BLOB_GC_RATIO: f64 = 0.2;

/// What a sweep deleted (or, dry, would delete).
pub type SweepOutcome = crate::Tally;

/// Blob file figures from RocksDB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlobSpace {
    pub files_bytes: u64,
    pub garbage_bytes: u64,
}

impl Store {
    /// Marks a snapshot protected (or not): `forget` refuses protected ones.
    pub fn set_protected(&self, id: &Id, protected: bool) -> Result<()> {
        self.ix.require_write()?;
        let snaps = self.ix.cf(cf::SNAPSHOTS);
        if self
            .ix
            .db
            .get_pinned_cf(snaps, id.as_bytes())
            .map_err(|e| self.ix.db_err("read", e))?
            .is_none()
        {
            return Err(StoreError::NoSnapshot { id: *id });
        }
        let mut b = WriteBatch::default();
        if protected {
            b.put_cf(
                self.ix.cf(cf::META),
                imgstore_format::meta::protect_key(id),
                [],
            );
        } else {
            b.delete_cf(self.ix.cf(cf::META), imgstore_format::meta::protect_key(id));
        }
        self.ix.write_synced(b, "protect")?;
        // The bucket's copy carries the flag too, for a rebuild.
        self.frames.snapshot_changed(&self.ix, id)
    }

    /// Ids of protected snapshots.
    pub fn protected(&self) -> Result<Vec<Id>> {
        self.ix.protected()
    }

    /// Cached all-zero region chaining values `0..count` for `region_size`
    /// (one ordered scan of their keys).
    pub fn zero_cvs(&self, region_size: u32, count: u64) -> Result<Vec<Option<[u8; 32]>>> {
        use imgstore_format::meta::{parse_zero_cv, zero_cv_prefix};
        let mut out = vec![None; count as usize];
        self.ix.scan_meta(
            &zero_cv_prefix(region_size),
            "read zero chaining values",
            |k, v| {
                Ok(match parse_zero_cv(k, v) {
                    Ok(Some((_, i, cv))) if i < count => {
                        out[i as usize] = Some(cv);
                        true
                    }
                    // Indices come in order: the rest are past the image.
                    Ok(_) => false,
                    // A malformed entry is only a cache miss.
                    Err(_) => true,
                })
            },
        )?;
        Ok(out)
    }

    /// Cached chaining values of all-zero regions `start..start + count`
    /// (a seek to `start`, then at most `count` entries): what a server
    /// answers, so the answer's size is the caller's `count`, never more.
    pub fn zero_cvs_range(
        &self,
        region_size: u32,
        start: u64,
        count: u64,
    ) -> Result<Vec<Option<[u8; 32]>>> {
        use imgstore_format::meta::{parse_zero_cv, zero_cv_key, zero_cv_prefix};
        let end = start.saturating_add(count);
        let mut out = vec![None; count as usize];
        let prefix = zero_cv_prefix(region_size);
        let from = zero_cv_key(region_size, start);
        let it = self.ix.db.iterator_cf(
            self.ix.cf(cf::META),
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| self.ix.db_err("read zero chaining values", e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            match parse_zero_cv(&k, &v) {
                Ok(Some((_, i, cv))) if (start..end).contains(&i) => {
                    out[(i - start) as usize] = Some(cv);
                }
                Ok(Some((_, i, _))) if i >= end => break,
                _ => {}
            }
        }
        Ok(out)
    }

    /// Adds cached all-zero region chaining values (not synced: a lost
    /// entry is computed again).
    pub fn put_zero_cvs(&self, region_size: u32, cvs: &[(u64, [u8; 32])]) -> Result<()> {
        self.ix.require_write()?;
        if cvs.is_empty() {
            return Ok(());
        }
        let mut b = WriteBatch::default();
        for (i, cv) in cvs {
            b.put_cf(
                self.ix.cf(cf::META),
                imgstore_format::meta::zero_cv_key(region_size, *i),
                cv,
            );
        }
        self.ix
            .db
            .write(b)
            .map_err(|e| self.ix.db_err("write zero chaining values", e))
    }

    /// Every recorded (snapshot, parent) pair.
    pub fn parents(&self) -> Result<Vec<(Id, Id)>> {
        self.ix.parents()
    }

    /// Replaces snapshot `old` by `new` (same pages) in one synced batch;
    /// protection and parent entries follow it.
    pub fn replace_snapshot(&self, old: &Id, new: &[u8]) -> Result<Id> {
        use imgstore_format::meta::{parent_key, protect_key};
        self.ix.require_write()?;
        let _guard = self.ix.lock();
        let snaps = self.ix.cf(cf::SNAPSHOTS);
        let v = self
            .ix
            .db
            .get_pinned_cf(snaps, old.as_bytes())
            .map_err(|e| self.ix.db_err("read snapshot", e))?
            .ok_or(StoreError::NoSnapshot { id: *old })?;
        let id = imgstore_repo::replacement(old, &v, new)?;
        let encoded = new;
        if id == *old {
            return Ok(id);
        }
        let meta = self.ix.cf(cf::META);
        let mut b = WriteBatch::default();
        b.delete_cf(snaps, old.as_bytes());
        b.put_cf(snaps, id.as_bytes(), encoded);
        if self.protected()?.contains(old) {
            b.delete_cf(meta, protect_key(old));
            b.put_cf(meta, protect_key(&id), []);
        }
        // The replacement is the replacer's (an admin's, or a local
        // writer's) record: the old commit's witness does not describe it
        // (it may be renamed). Namespace marks follow the snapshot.
        b.delete_cf(meta, imgstore_format::meta::attest_key(old));
        for ns in self.ns_names()? {
            if self.ns_marked(&ns, &[crate::snapshot_ns_key(old)])?[0] {
                self.mark_ns(&mut b, &ns, [&crate::snapshot_ns_key(&id)])?;
            }
        }
        for (child, parent) in self.parents()? {
            if child == *old {
                b.delete_cf(meta, parent_key(old));
                b.put_cf(meta, parent_key(&id), parent.as_bytes());
            } else if parent == *old {
                b.put_cf(meta, parent_key(&child), id.as_bytes());
            }
        }
        self.ix.write_synced(b, "replace snapshot")?;
        self.frames.snapshot_changed(&self.ix, &id)?;
        for (child, parent) in self.parents()? {
            if parent == id {
                self.frames.snapshot_changed(&self.ix, &child)?;
            }
        }
        self.frames.snapshots_removed(&[*old])?;
        Ok(id)
    }

    /// Removes snapshots, in one synced batch. Refuses (removing nothing)
    /// when any is protected or missing.
    pub fn forget(&self, ids: &[Id]) -> Result<ForgetOutcome> {
        self.ix.require_write()?;
        let _guard = self.ix.lock();
        let protected = self.protected()?;
        let snaps = self.ix.cf(cf::SNAPSHOTS);
        let mut page_counts: HashMap<[u8; 33], u64> = HashMap::new();
        let mut batch = WriteBatch::default();
        let mut unique = ids.to_vec();
        unique.sort();
        unique.dedup();
        for id in &unique {
            if protected.contains(id) {
                return Err(StoreError::Protected { id: *id });
            }
            let v = self
                .ix
                .db
                .get_pinned_cf(snaps, id.as_bytes())
                .map_err(|e| self.ix.db_err("read snapshot", e))?
                .ok_or(StoreError::NoSnapshot { id: *id })?;
            let pages = imgstore_format::sealed::record_children(RecordKind::Snapshot, &v)
                .map_err(|source| StoreError::CorruptSnapshot { id: *id, source })?;
            for p in &pages {
                *page_counts.entry(ObjectKind::Page.key(p)).or_default() += 1;
            }
            batch.delete_cf(snaps, id.as_bytes());
            batch.delete_cf(self.ix.cf(cf::META), imgstore_format::meta::parent_key(id));
            batch.delete_cf(self.ix.cf(cf::META), imgstore_format::meta::attest_key(id));
        }
        let orphaned = self
            .ix
            .change_refs(&mut batch, &page_counts, Refs::Remove)?;
        self.ix.write_synced(batch, "forget")?;
        // The snapshot objects go after the local records: one left behind
        // by a failure here is deleted by the next gc, before any pack.
        let _ = self.frames.snapshots_removed(&unique);
        Ok(ForgetOutcome {
            snapshots: unique.len() as u64,
            pages_orphaned: orphaned.len() as u64,
        })
    }

    /// Deletes every orphan and, transitively, whatever only orphans
    /// referenced. With `dry_run`, computes the same totals without writing.
    pub fn sweep(&self, dry_run: bool, progress: &dyn Fn(&SweepOutcome)) -> Result<SweepOutcome> {
        if !dry_run {
            self.ix.require_write()?;
        }
        let mut out = SweepOutcome::default();
        if dry_run {
            let _guard = self.ix.lock();
            return self.sweep_dry(out);
        }
        // Orphans pinned by a live server session stay listed; the scan
        // resumes after the last key it saw so it never meets them twice.
        let mut after: Option<[u8; 33]> = None;
        let mut deleted_in_pass = false;
        let namespaces = self.ns_names()?;
        loop {
            // The write mutex is held per batch, not for the whole sweep:
            // backups in the same process (a server) go on between batches.
            let _guard = self.ix.lock();
            let mode = match &after {
                None => rocksdb::IteratorMode::Start,
                Some(k) => rocksdb::IteratorMode::From(k, rocksdb::Direction::Forward),
            };
            let listed: Vec<[u8; 33]> = self
                .ix
                .db
                .iterator_cf(self.ix.cf(cf::ORPHANS), mode)
                .map(|r| {
                    r.map(|(k, _)| <[u8; 33]>::try_from(&k[..]).unwrap_or([0; 33]))
                        .map_err(|e| self.ix.db_err("scan orphans", e))
                })
                .filter(|r| !matches!((r, &after), (Ok(k), Some(a)) if k == a))
                .take(4096)
                .collect::<Result<_>>()?;
            let Some(last) = listed.last().copied() else {
                // Children orphaned during this pass may sort before where
                // it stood: another pass, until one deletes nothing.
                if deleted_in_pass {
                    (after, deleted_in_pass) = (None, false);
                    continue;
                }
                break;
            };
            after = Some(last);
            let orphans: Vec<[u8; 33]> = {
                let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
                if pins.is_empty() {
                    listed
                } else {
                    listed.into_iter().filter(|k| !pins.contains(k)).collect()
                }
            };
            let mut batch = WriteBatch::default();
            let mut children: HashMap<[u8; 33], u64> = HashMap::new();
            let rcs = self.ix.get_refs(&orphans)?;
            let mut gone: Vec<[u8; 33]> = Vec::new();
            for (k, rc) in orphans.iter().zip(rcs) {
                batch.delete_cf(self.ix.cf(cf::ORPHANS), k);
                let Ok((kind, id)) = ObjectKind::parse_key(k) else {
                    continue;
                };
                let rc = rc.unwrap_or_default();
                if rc.count != 0 {
                    // Referenced again since it was listed: not garbage.
                    continue;
                }
                self.collect_children(kind, &id, &mut children)?;
                deleted_in_pass = true;
                for ns in &namespaces {
                    if let Ok(nk) = imgstore_format::meta::ns_key(ns, k) {
                        batch.delete_cf(self.ix.cf(cf::META), nk);
                    }
                }
                batch.delete_cf(self.ix.cf(cf::REFS), k);
                gone.push(*k);
                out.add(kind, &rc);
                if kind != ObjectKind::Chunk {
                    batch.delete_cf(self.ix.cf(cf::RECIPES), k);
                }
            }
            self.ix.change_refs(&mut batch, &children, Refs::Remove)?;
            self.frames.objects_removed(&self.ix, &mut batch, &gone)?;
            self.ix.write_synced(batch, "gc")?;
            progress(&out);
        }
        Ok(out)
    }

    fn collect_children(
        &self,
        kind: ObjectKind,
        id: &Id,
        into: &mut HashMap<[u8; 33], u64>,
    ) -> Result<()> {
        let (rk, child) = match kind {
            ObjectKind::Chunk => return Ok(()),
            ObjectKind::Region => (RecordKind::Region, ObjectKind::Chunk),
            ObjectKind::Page => (RecordKind::Page, ObjectKind::Region),
        };
        let bytes = match self.raw_records(kind, &[*id]) {
            Ok(mut v) => v.pop().expect("one record"),
            Err(StoreError::Missing { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let children = imgstore_format::sealed::record_children(rk, &bytes).map_err(|source| {
            StoreError::Corrupt {
                kind,
                id: *id,
                source,
            }
        })?;
        for c in children {
            *into.entry(child.key(&c)).or_default() += 1;
        }
        Ok(())
    }

    /// The dry run: the same walk, with counts kept in memory.
    fn sweep_dry(&self, mut out: SweepOutcome) -> Result<SweepOutcome> {
        let mut pending: Vec<[u8; 33]> = self
            .ix
            .db
            .iterator_cf(self.ix.cf(cf::ORPHANS), rocksdb::IteratorMode::Start)
            .map(|r| {
                r.map(|(k, _)| <[u8; 33]>::try_from(&k[..]).unwrap_or([0; 33]))
                    .map_err(|e| self.ix.db_err("scan orphans", e))
            })
            .collect::<Result<_>>()?;
        let mut counts: HashMap<[u8; 33], RefCount> = HashMap::new();
        while let Some(k) = pending.pop() {
            let Ok((kind, id)) = ObjectKind::parse_key(&k) else {
                continue;
            };
            let rc = match counts.get(&k) {
                Some(rc) => *rc,
                None => self.ix.get_refs(&[k])?[0].unwrap_or_default(),
            };
            if rc.count != 0 {
                continue;
            }
            out.add(kind, &rc);
            let mut children = HashMap::new();
            self.collect_children(kind, &id, &mut children)?;
            for (ck, n) in children {
                let cur = match counts.get(&ck) {
                    Some(rc) => *rc,
                    None => self.ix.get_refs(&[ck])?[0].unwrap_or_default(),
                };
                let next = RefCount {
                    count: cur.count.saturating_sub(n),
                    ..cur
                };
                counts.insert(ck, next);
                if next.count == 0 {
                    pending.push(ck);
                }
            }
            counts.insert(
                k,
                RefCount {
                    count: u64::MAX,
                    ..rc
                },
            );
        }
        Ok(out)
    }

    /// Blob file bytes and the garbage in them, from RocksDB's properties.
    pub fn blob_space(&self) -> Result<BlobSpace> {
        blob_space(&self.ix)
    }

    /// Gives the space of deleted objects back (see the frame store's
    /// `reclaim`). Returns whether live data was rewritten.
    pub fn reclaim(&self) -> Result<bool> {
        self.ix.require_write()?;
        self.frames.reclaim(&self.ix)
    }
}

/// Blob file bytes and the garbage in them, from RocksDB's properties.
pub(crate) fn blob_space(ix: &Index) -> Result<BlobSpace> {
    let chunks = ix.cf(cf::CHUNKS);
    let prop = |name: &str| -> Result<u64> {
        Ok(ix
            .db
            .property_int_value_cf(chunks, name)
            .map_err(|e| ix.db_err("read property", e))?
            .unwrap_or(0))
    };
    Ok(BlobSpace {
        files_bytes: prop("rocksdb.live-blob-file-size")?,
        garbage_bytes: prop("rocksdb.live-blob-file-garbage-size")?,
    })
}
