//! What `check` and `verify` need from the store, and self-healing.
//!
//! The store hands out raw records (the engine interprets them through
//! `imgstore-format`) and per-object read outcomes, so one damaged object
//! never hides the state of the others.
//!
//! # Healing
//!
//! An object found damaged gets a mark in `meta` (`damaged:` + object key).
//! A writer loads the marks when it opens; while a mark is pending,
//! [`Store::chunks_known`] answers "unknown" for that chunk, so a backup of
//! the same data compresses it again and [`Store::put_region`] rewrites it
//! (and a damaged region recipe or index page it produces) in place of the
//! damaged copy, without touching reference counts. The commit that makes
//! the backup durable deletes the marks of what it rewrote. Content
//! addressing makes this safe: the rewritten object has, by definition, the
//! bytes every snapshot naming it expects.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;

use imgstore_format::{cf, Id, ObjectKind, META_DAMAGED_PREFIX};
use rocksdb::WriteBatch;

use crate::{DamageMark, Result, Store, StoreError};

/// A raw key and value of a column family.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Damage marks this writer may repair, and those it repaired so far.
#[derive(Default)]
pub(crate) struct Healing {
    pub pending: HashSet<[u8; 33]>,
    pub healed: Vec<[u8; 33]>,
}

pub(crate) fn damaged_key(key: &[u8; 33]) -> Vec<u8> {
    let (kind, id) = ObjectKind::parse_key(key).expect("33-byte object key");
    imgstore_format::meta::damaged_key(kind, &id)
}

impl Store {
    /// Every damage mark in the repository.
    pub fn damage_marks(&self) -> Result<Vec<DamageMark>> {
        let mut out = Vec::new();
        self.ix
            .scan_meta(META_DAMAGED_PREFIX, "read damage marks", |k, v| {
                // A malformed mark cannot name what to repair; check reports
                // the objects themselves.
                if let Ok(Some((kind, id, why))) = imgstore_format::meta::parse_damage_mark(k, v) {
                    out.push(DamageMark { kind, id, why });
                }
                Ok(true)
            })?;
        Ok(out)
    }

    /// Records damage marks (synced). A later backup of the same data repairs them.
    pub fn mark_damaged(&self, marks: &[DamageMark]) -> Result<()> {
        self.ix.require_write()?;
        let mut b = WriteBatch::default();
        for m in marks {
            b.put_cf(
                self.ix.cf(cf::META),
                imgstore_format::meta::damaged_key(m.kind, &m.id),
                m.why.as_bytes(),
            );
        }
        self.ix.write_synced(b, "mark damaged objects")
    }

    /// Deletes damage marks of objects found intact again (synced).
    pub fn clear_damaged(&self, objects: &[(ObjectKind, Id)]) -> Result<()> {
        self.ix.require_write()?;
        let mut b = WriteBatch::default();
        for (kind, id) in objects {
            b.delete_cf(
                self.ix.cf(cf::META),
                imgstore_format::meta::damaged_key(*kind, id),
            );
        }
        self.ix.write_synced(b, "clear damage marks")?;
        // Found intact: this writer need not rewrite them either.
        let mut h = self.heal.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, id) in objects {
            h.pending.remove(&kind.key(id));
        }
        self.heal_pending.store(!h.pending.is_empty(), Relaxed);
        Ok(())
    }

    /// Damage marks this writer has not repaired (yet).
    pub fn damage_pending(&self) -> usize {
        self.heal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .len()
    }

    pub(crate) fn load_healing(&self) -> Result<()> {
        let marks = self.damage_marks()?;
        let mut h = self.heal.lock().unwrap_or_else(|p| p.into_inner());
        h.pending = marks.iter().map(|m| m.kind.key(&m.id)).collect();
        self.heal_pending.store(!h.pending.is_empty(), Relaxed);
        Ok(())
    }

    /// Whether `key` is a damaged object this writer should write again.
    /// Called for every chunk a backup looks up: without marks (the usual
    /// case) it answers from an atomic flag, without taking the lock.
    pub(crate) fn is_pending_damage(&self, key: &[u8; 33]) -> bool {
        if !self.heal_pending.load(Relaxed) {
            return false;
        }
        let h = self.heal.lock().unwrap_or_else(|p| p.into_inner());
        h.pending.contains(key)
    }

    /// Notes that `key` was rewritten in a batch about to be written.
    pub(crate) fn healed(&self, key: [u8; 33]) {
        let mut h = self.heal.lock().unwrap_or_else(|p| p.into_inner());
        if h.pending.remove(&key) {
            h.healed.push(key);
            self.heal_pending.store(!h.pending.is_empty(), Relaxed);
        }
    }

    /// Raw snapshot records `(key, value)` in key order, undecoded, so one
    /// bad record does not hide the others.
    pub fn snapshot_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.ix.snapshot_records()
    }

    /// Calls `f(key, record)` for each snapshot record in key order after
    /// key `after` (from the first without), holding one at a time (a
    /// server filters them per caller), until `f` answers false.
    pub fn each_snapshot_record(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let mode = match after {
            None => rocksdb::IteratorMode::Start,
            Some(k) => rocksdb::IteratorMode::From(k, rocksdb::Direction::Forward),
        };
        for item in self.ix.db.iterator_cf(self.ix.cf(cf::SNAPSHOTS), mode) {
            let (k, v) = item.map_err(|e| self.ix.db_err("scan snapshots", e))?;
            if after.is_some_and(|a| &*k <= a) {
                continue;
            }
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// One page of a scan of column family `what` (`snapshots`, `recipes`,
    /// `refs` or `orphans`): entries after key `after`, until `max_entries`
    /// or `max_bytes`. Returns the entries and whether more follow — how a
    /// server hands `check` the store without holding it all in memory.
    pub fn scan_page(
        &self,
        what: &str,
        after: Option<&[u8]>,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<(Vec<KeyValue>, bool)> {
        let name = match what {
            "snapshots" => cf::SNAPSHOTS,
            "recipes" => cf::RECIPES,
            "refs" => cf::REFS,
            "orphans" => cf::ORPHANS,
            other => return Err(StoreError::Invalid(format!("no scan of {other:?}"))),
        };
        let mode = match after {
            None => rocksdb::IteratorMode::Start,
            Some(k) => rocksdb::IteratorMode::From(k, rocksdb::Direction::Forward),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self.ix.db.iterator_cf(self.ix.cf(name), mode) {
            let (k, v) = item.map_err(|e| self.ix.db_err("scan", e))?;
            if after == Some(&k[..]) {
                continue;
            }
            if out.len() >= max_entries
                || (bytes + k.len() + v.len() > max_bytes && !out.is_empty())
            {
                return Ok((out, true));
            }
            bytes += k.len() + v.len();
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok((out, false))
    }

    /// Calls `f(key, record)` for every region recipe and index page.
    pub fn scan_recipes(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        self.ix.scan(cf::RECIPES, "scan recipes", f)
    }

    /// Calls `f(key, count)` for every reference count entry.
    pub fn scan_refs(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        self.ix.scan(cf::REFS, "scan reference counts", f)
    }

    /// Calls `f(key)` for every orphan entry.
    pub fn scan_orphans(&self, f: &mut dyn FnMut(&[u8])) -> Result<()> {
        self.ix.scan(cf::ORPHANS, "scan orphans", &mut |k, _| f(k))
    }
}

/// What [`Store::check_stored_bytes`] read, and what it found.
#[derive(Debug, Default)]
pub struct StoredBytesCheck {
    /// Chunk objects read (and, in a bucket, every object of each pack).
    pub objects: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Version-1 packs, whose entries carry no hash: their chunks can only
    /// be checked with the key.
    pub unhashed_packs: u64,
    /// One line per problem.
    pub problems: Vec<String>,
}

impl Store {
    /// Reads every stored chunk and checks what can be checked without
    /// the key: that a sealed chunk is intact as stored. In a local store,
    /// through RocksDB's checksums (every data block and blob record has
    /// one, verified on this read) and the sealed frame's shape; in a
    /// bucket, each pack against its name and each entry against the hash
    /// its trailer records. Whether the plaintext is what its id names
    /// needs the key (`check --read-data`).
    pub fn check_stored_bytes(&self) -> Result<StoredBytesCheck> {
        self.frames
            .verify(&self.ix, self.config().encryption.is_some())
    }

    /// The frame store's own consistency with the index (a bucket: every
    /// pack the index knows is there at its size, every snapshot has its
    /// object; with `read_data`, every record's copy intact). One line per
    /// problem; nothing for a repository whose index is its storage.
    pub fn check_storage(&self, read_data: bool) -> Result<Vec<String>> {
        self.frames.check(&self.ix, read_data)
    }
}
