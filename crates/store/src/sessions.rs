//! What a repository server needs from the store beyond the
//! [`Repository`](imgstore_repo::Repository) calls: write sessions whose
//! objects gc must leave alone, and namespace marks.
//!
//! # Why pins, and why no grace period
//!
//! A backup asks which chunks are stored, then sends a region naming the
//! ones it was told are there, and finally commits pages naming its
//! regions. Between those steps an object it relies on may be an orphan
//! (a chunk of a forgotten snapshot, the backup's own region before its
//! commit). A gc in the same process would delete it, and the backup would
//! fail at its `put_region` or `commit` (both re-check, so nothing dangles).
//!
//! Instead, each session *pins* what it relies on, and [`Store::sweep`]
//! skips pinned orphans (they stay listed for the next gc). Pins are set in
//! the same critical section as the lookup that justifies them (the write
//! mutex gc also takes per batch), so no interleaving lets a gc delete an
//! object between "present" and the pin. The store is the only deleter and
//! sees every session, so no time-based grace period is needed (Proxmox
//! Backup Server keeps chunks touched in the last 24 h; kopia waits out a
//! safety interval).
//!
//! Pins live in memory: a restarted server forgets them, and with them
//! every session. A backup in flight then goes on in a new session that
//! trusts nothing the lost one was told: its region uploads are checked as
//! always, and before its commit [`Store::session_regions_known`] tells it
//! which of the regions it names survived (pinning them) so it sends the
//! others again (`docs/GC.md`, "Sessions after a server restart").

use std::collections::{HashMap, HashSet};

use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{cf, meta, Id, ObjectKind};
use rocksdb::WriteBatch;

use crate::{Result, Store, StoreError};

/// A writer's identity inside a server: which session, and which namespace
/// its objects are marked for (None: no marks, a trusted admin writer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub session: u64,
    pub namespace: Option<String>,
    /// Answer "is it stored?" from the whole repository (an admin, or a
    /// server told to trust its clients), not only from the namespace.
    pub global: bool,
}

/// The server's witness of a commit, recorded beside the snapshot: the
/// image name of the session that committed it and the server's clock at
/// the commit. A sealed record hides both from the server; clients that
/// open it compare (docs/SECURITY.md, "What a compromised host cannot do").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    pub image: String,
    pub committed_ns: i64,
}

impl Store {
    /// Every recorded commit witness, by snapshot id (malformed ones are
    /// left out: a snapshot without a witness is checked as a local one).
    pub fn attestations(&self) -> Result<HashMap<imgstore_format::Id, Attestation>> {
        let mut out = HashMap::new();
        self.ix
            .scan_meta(meta::ATTEST_PREFIX, "read commit witnesses", |k, v| {
                if let (Some(id), Ok((image, committed_ns))) = (
                    imgstore_format::Id::from_slice(&k[meta::ATTEST_PREFIX.len()..]),
                    meta::decode_attestation(v),
                ) {
                    out.insert(
                        id,
                        Attestation {
                            image,
                            committed_ns,
                        },
                    );
                }
                Ok(true)
            })?;
        Ok(out)
    }
}

/// The namespace-mark key of snapshot `id` (kind byte `S`): how a server
/// lists a sealed snapshot, whose name it cannot read, to its namespace.
pub fn snapshot_ns_key(id: &Id) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = b'S';
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// Pinned object keys per session.
#[derive(Default)]
pub(crate) struct Pins {
    by_session: HashMap<u64, HashSet<[u8; 33]>>,
}

impl Pins {
    pub(crate) fn contains(&self, key: &[u8; 33]) -> bool {
        self.by_session.values().any(|s| s.contains(key))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_session.values().all(|s| s.is_empty())
    }
}

impl Store {
    fn pins(&self) -> std::sync::MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Store::chunks_known`] for a session: each chunk reported present is
    /// pinned until the session puts a region naming it or ends. With a
    /// namespace, a chunk counts as present only if it is marked for it.
    pub fn session_chunks_known(&self, scope: &Scope, ids: &[Id]) -> Result<Vec<bool>> {
        let _guard = self.ix.lock();
        let mut known = self.chunks_known(ids)?;
        if let (Some(ns), false) = (&scope.namespace, scope.global) {
            let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
            for (k, mine) in known.iter_mut().zip(self.ns_marked(ns, &keys)?) {
                *k &= mine;
            }
        }
        let mut pins = self.pins();
        let set = pins.by_session.entry(scope.session).or_default();
        for (id, k) in ids.iter().zip(&known) {
            if *k {
                set.insert(ObjectKind::Chunk.key(id));
            }
        }
        Ok(known)
    }

    /// For a session that took over a backup from one the server lost (it
    /// restarted, or the session expired): of the regions the backup will
    /// name in its commit, which are stored, whole and not marked damaged
    /// (with a namespace: marked for it). Each one reported present is
    /// pinned for the session in the same critical section as the lookup,
    /// as [`Store::session_chunks_known`] does for chunks; the backup sends
    /// the others again.
    ///
    /// "Whole": in a frame store that can lose writes after the index
    /// counted them (a bucket's open pack dies with its process), the
    /// region's record copy and every chunk it names must be held too.
    pub fn session_regions_known(&self, scope: &Scope, ids: &[Id]) -> Result<Vec<bool>> {
        let _guard = self.ix.lock();
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Region.key(id)).collect();
        let mut known: Vec<bool> = keys
            .iter()
            .zip(self.ix.get_refs(&keys)?)
            .map(|(k, rc)| rc.is_some() && !self.is_pending_damage(k))
            .collect();
        if !self.frames.blob_files() {
            for ((k, id), known) in keys.iter().zip(ids).zip(known.iter_mut()) {
                if !*known {
                    continue;
                }
                let recipe = self.ix.raw_records(ObjectKind::Region, &[*id])?;
                let chunks = record_children(RecordKind::Region, &recipe[0]).map_err(|source| {
                    StoreError::Corrupt {
                        kind: ObjectKind::Region,
                        id: *id,
                        source,
                    }
                })?;
                *known = self.frames.held(&self.ix, &[*k])?[0]
                    && self.chunks_known(&chunks)?.iter().all(|c| *c);
            }
        }
        if let (Some(ns), false) = (&scope.namespace, scope.global) {
            for (k, mine) in known.iter_mut().zip(self.ns_marked(ns, &keys)?) {
                *k &= mine;
            }
        }
        let mut pins = self.pins();
        let set = pins.by_session.entry(scope.session).or_default();
        for (k, known) in keys.iter().zip(&known) {
            if *known {
                set.insert(*k);
            }
        }
        Ok(known)
    }

    /// Pins objects a session will name without sending them (the regions
    /// of its parent's pages it reuses). Call after reading them; a gc that
    /// won the race makes the session's commit fail cleanly.
    pub fn pin(&self, session: u64, keys: impl IntoIterator<Item = [u8; 33]>) {
        self.pins()
            .by_session
            .entry(session)
            .or_default()
            .extend(keys);
    }

    /// Drops a session's pins (it committed, gave up or expired).
    pub fn end_session(&self, session: u64) {
        self.pins().by_session.remove(&session);
    }

    /// Number of objects pinned by live sessions (for metrics).
    pub fn pinned(&self) -> usize {
        self.pins().by_session.values().map(HashSet::len).sum()
    }

    /// Called with the write mutex held, after a session's region batch
    /// landed: the region is pinned (an orphan until the commit), its chunks
    /// no longer need to be (the region's references hold them).
    pub(crate) fn after_session_region(&self, scope: &Scope, rkey: [u8; 33], chunks: &[[u8; 33]]) {
        let mut pins = self.pins();
        let set = pins.by_session.entry(scope.session).or_default();
        for k in chunks {
            set.remove(k);
        }
        set.insert(rkey);
    }

    /// Adds namespace marks for `keys` to `batch`.
    pub(crate) fn mark_ns<'k>(
        &self,
        batch: &mut WriteBatch,
        ns: &str,
        keys: impl IntoIterator<Item = &'k [u8; 33]>,
    ) -> Result<()> {
        let meta_cf = self.ix.cf(cf::META);
        let prefix = meta::ns_prefix(ns).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut k = prefix.clone();
        for key in keys {
            k.truncate(prefix.len());
            k.extend_from_slice(key);
            batch.put_cf(meta_cf, &k, []);
        }
        Ok(())
    }

    /// For each object key: is it marked for namespace `ns`?
    pub fn ns_marked(&self, ns: &str, keys: &[[u8; 33]]) -> Result<Vec<bool>> {
        let prefix = meta::ns_prefix(ns).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let full: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| {
                let mut v = prefix.clone();
                v.extend_from_slice(k);
                v
            })
            .collect();
        self.ix
            .db
            .batched_multi_get_cf(self.ix.cf(cf::META), full.iter(), false)
            .into_iter()
            .map(|r| {
                r.map(|v| v.is_some())
                    .map_err(|e| self.ix.db_err("read namespace marks", e))
            })
            .collect()
    }

    /// Stored region recipes or index pages as stored (the caller checks
    /// them against their ids); an absent one is an error naming it.
    pub fn raw_records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        self.ix.raw_records(kind, ids)
    }

    /// Names of the namespaces that have marks (a seek per name, not a
    /// scan of the marks).
    pub fn ns_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut from = meta::NS_PREFIX.to_vec();
        loop {
            let mut it = self.ix.db.iterator_cf(
                self.ix.cf(cf::META),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            let Some(item) = it.next() else { break };
            let (k, _) = item.map_err(|e| self.ix.db_err("list namespaces", e))?;
            let Some(rest) = k.strip_prefix(meta::NS_PREFIX) else {
                break;
            };
            let len = rest.first().copied().unwrap_or(0) as usize;
            let Some(name) = rest
                .get(1..1 + len)
                .and_then(|n| std::str::from_utf8(n).ok())
            else {
                break;
            };
            names.push(name.to_string());
            from = meta::ns_prefix(name).map_err(|e| StoreError::Invalid(e.to_string()))?;
            from.extend_from_slice(&[0xff; 34]);
        }
        Ok(names)
    }

    /// Marks, for namespace `ns`, every object reachable from `pages` (a
    /// snapshot's index pages): their regions and chunks. How a repository
    /// written before it was served, or by an admin, is handed to a
    /// namespace. Returns the number of objects marked.
    pub fn adopt(&self, ns: &str, pages: &[Id]) -> Result<u64> {
        self.ix.require_write()?;
        let mut keys: HashSet<[u8; 33]> = HashSet::new();
        let mut regions: HashSet<Id> = HashSet::new();
        let children = |kind: ObjectKind, rk: RecordKind, id: &Id| -> Result<Vec<Id>> {
            let bytes = self.raw_records(kind, &[*id])?.pop().expect("one record");
            record_children(rk, &bytes).map_err(|source| StoreError::Corrupt {
                kind,
                id: *id,
                source,
            })
        };
        for p in pages {
            keys.insert(ObjectKind::Page.key(p));
            regions.extend(children(ObjectKind::Page, RecordKind::Page, p)?);
        }
        for r in &regions {
            keys.insert(ObjectKind::Region.key(r));
            for c in children(ObjectKind::Region, RecordKind::Region, r)? {
                keys.insert(ObjectKind::Chunk.key(&c));
            }
        }
        let mut batch = WriteBatch::default();
        self.mark_ns(&mut batch, ns, keys.iter())?;
        self.ix.write_synced(batch, "mark namespace")?;
        Ok(keys.len() as u64)
    }
}
