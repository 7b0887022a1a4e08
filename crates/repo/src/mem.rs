//! A repository held in memory, with the local store's rules.
//!
//! Why it exists: the engine's pipelines (backup, restore, delta restore,
//! check) can be driven in unit tests without RocksDB, and damage can be
//! injected exactly ([`MemRepo::corrupt_chunk`], [`MemRepo::remove_chunk`])
//! to prove that each pipeline reports it instead of returning wrong bytes.
//! It keeps reference counts, orphans, protection, damage marks and healing
//! the way the local store does, so a test that passes here exercises the
//! same contract.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{Id, ObjectKind, RefCount, RepoConfig};

use crate::{
    ChunkFault, ChunkRead, Codec, DamageMark, ForgetOutcome, Frames, GcOutcome, PutOutcome,
    RepoError, Repository, Result, Tally, Totals,
};

type Key = [u8; 33];

#[derive(Default)]
struct State {
    chunks: HashMap<Id, Vec<u8>>,
    recipes: BTreeMap<Key, Vec<u8>>,
    refs: BTreeMap<Key, RefCount>,
    orphans: BTreeSet<Key>,
    snapshots: BTreeMap<Id, Vec<u8>>,
    protected: BTreeSet<Id>,
    parents: BTreeMap<Id, Id>,
    zero_cvs: BTreeMap<(u32, u64), [u8; 32]>,
    damaged: BTreeMap<Key, String>,
    /// Marks not repaired by this handle yet (loaded at creation, like a
    /// writer of the local store loads them at open).
    pending: BTreeSet<Key>,
    /// Chunks whose reads fail as "unreadable" (injected).
    unreadable: BTreeSet<Id>,
    /// Chunks whose reads say a gc collected them under this reader
    /// (injected).
    collected: BTreeSet<Id>,
    /// How long reading index pages takes (injected: a link's latency).
    pages_delay: std::time::Duration,
}

/// An in-memory [`Repository`].
pub struct MemRepo {
    config: RepoConfig,
    codec: Codec,
    state: Mutex<State>,
}

impl MemRepo {
    /// An empty repository with `config`.
    pub fn new(config: RepoConfig) -> MemRepo {
        MemRepo::with_codec(config, Codec::Plain)
    }

    /// An empty repository storing objects through `codec` (sealed with a
    /// repository's keys, for tests of encryption).
    pub fn with_codec(config: RepoConfig, codec: Codec) -> MemRepo {
        MemRepo {
            config,
            codec,
            state: Mutex::new(State::default()),
        }
    }

    /// Every stored byte, for tests that look for plaintext.
    pub fn stored_bytes(&self) -> Vec<Vec<u8>> {
        let s = self.state();
        s.chunks
            .values()
            .chain(s.recipes.values())
            .chain(s.snapshots.values())
            .cloned()
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flips a byte in the middle of a chunk's stored frame. Returns false
    /// when the chunk is absent.
    pub fn corrupt_chunk(&self, id: &Id) -> bool {
        let mut s = self.state();
        match s.chunks.get_mut(id) {
            Some(f) => {
                let i = f.len() / 2;
                f[i] ^= 0x5a;
                true
            }
            None => false,
        }
    }

    /// Deletes a chunk's frame, leaving its reference entry (as a lost
    /// file would). Returns false when the chunk is absent.
    pub fn remove_chunk(&self, id: &Id) -> bool {
        self.state().chunks.remove(id).is_some()
    }

    /// Makes reads of a chunk fail as the storage would on a checksum error.
    pub fn make_unreadable(&self, id: &Id) {
        self.state().unreadable.insert(*id);
    }

    /// Makes reads of a chunk say what a read-only store says when a gc
    /// in another process deleted the chunk after the store was opened.
    pub fn collect_under_reader(&self, id: &Id) {
        self.state().collected.insert(*id);
    }

    /// Makes every read of index pages take `d` first, as a round trip to
    /// a distant server would.
    pub fn delay_pages(&self, d: std::time::Duration) {
        self.state().pages_delay = d;
    }

    /// Undoes [`MemRepo::make_unreadable`] and
    /// [`MemRepo::collect_under_reader`] for every chunk.
    pub fn clear_injected(&self) {
        let mut s = self.state();
        s.unreadable.clear();
        s.collected.clear();
    }

    /// Ids of every stored chunk frame, sorted.
    pub fn chunk_ids(&self) -> Vec<Id> {
        let mut v: Vec<Id> = self.state().chunks.keys().copied().collect();
        v.sort();
        v
    }

    /// [`MemRepo::reopen`] with another codec (another key, or none).
    pub fn reopen_with_codec(&self, codec: Codec) -> MemRepo {
        let mut r = self.reopen();
        r.codec = codec;
        r
    }

    /// A copy of this repository as a new writer would open it: damage
    /// marks pending again.
    pub fn reopen(&self) -> MemRepo {
        let s = self.state();
        MemRepo {
            config: self.config.clone(),
            codec: self.codec.clone(),
            state: Mutex::new(State {
                chunks: s.chunks.clone(),
                recipes: s.recipes.clone(),
                refs: s.refs.clone(),
                orphans: s.orphans.clone(),
                snapshots: s.snapshots.clone(),
                protected: s.protected.clone(),
                parents: s.parents.clone(),
                zero_cvs: s.zero_cvs.clone(),
                damaged: s.damaged.clone(),
                pending: s.damaged.keys().copied().collect(),
                unreadable: s.unreadable.clone(),
                collected: s.collected.clone(),
                pages_delay: s.pages_delay,
            }),
        }
    }
}

impl State {
    fn record(&self, kind: ObjectKind, id: &Id) -> Result<&[u8]> {
        self.recipes
            .get(&kind.key(id))
            .map(Vec::as_slice)
            .ok_or(RepoError::Missing { kind, id: *id })
    }

    fn add_refs(&mut self, counts: &HashMap<Key, u64>) -> Vec<Key> {
        let mut absent = Vec::new();
        for (k, n) in counts {
            match self.refs.get_mut(k) {
                Some(rc) => {
                    if rc.count == 0 {
                        self.orphans.remove(k);
                    }
                    rc.count += n;
                }
                None => absent.push(*k),
            }
        }
        absent
    }

    fn sub_refs(&mut self, counts: &HashMap<Key, u64>) -> Result<u64> {
        // Checked first so that a refusal changes nothing.
        for (k, n) in counts {
            let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
            let rc = self.refs.get(k).ok_or(RepoError::Missing { kind, id })?;
            if rc.count < *n {
                return Err(RepoError::Invalid(format!(
                    "{kind:?} {id} has {} references, {n} would be removed",
                    rc.count
                )));
            }
        }
        let mut zero = 0;
        for (k, n) in counts {
            let rc = self.refs.get_mut(k).expect("checked");
            rc.count -= n;
            if rc.count == 0 {
                self.orphans.insert(*k);
                zero += 1;
            }
        }
        Ok(zero)
    }

    fn healed(&mut self, k: &Key) {
        if self.pending.remove(k) {
            self.damaged.remove(k);
        }
    }

    fn children(&self, kind: ObjectKind, id: &Id) -> HashMap<Key, u64> {
        let mut out = HashMap::new();
        let Ok(bytes) = self.record(kind, id) else {
            return out;
        };
        let (rk, child) = match kind {
            ObjectKind::Chunk => return out,
            ObjectKind::Region => (RecordKind::Region, ObjectKind::Chunk),
            ObjectKind::Page => (RecordKind::Page, ObjectKind::Region),
        };
        if let Ok(ids) = record_children(rk, bytes) {
            for c in ids {
                *out.entry(child.key(&c)).or_default() += 1;
            }
        }
        out
    }
}

impl Repository for MemRepo {
    fn config(&self) -> &RepoConfig {
        &self.config
    }

    fn pages(&self, ids: &[Id]) -> Result<Vec<imgstore_format::Page>> {
        let delay = self.state().pages_delay;
        std::thread::sleep(delay);
        crate::open_records(self, ObjectKind::Page, ids, imgstore_format::Page::decode)
    }

    fn location(&self) -> String {
        "memory".into()
    }

    fn codec(&self) -> &Codec {
        &self.codec
    }

    fn raw_records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        let s = self.state();
        ids.iter()
            .map(|id| s.record(kind, id).map(<[u8]>::to_vec))
            .collect()
    }

    fn chunk_frames(&self, ids: &[Id]) -> Result<Vec<ChunkRead>> {
        let s = self.state();
        Ok(ids
            .iter()
            .map(|id| {
                if s.unreadable.contains(id) {
                    return Err(ChunkFault::Unreadable("injected read error".into()));
                }
                if s.collected.contains(id) {
                    return Err(ChunkFault::Collected);
                }
                s.chunks.get(id).cloned().ok_or(ChunkFault::Missing)
            })
            .collect())
    }

    fn ref_counts(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Option<RefCount>>> {
        let s = self.state();
        Ok(ids
            .iter()
            .map(|id| s.refs.get(&kind.key(id)).copied())
            .collect())
    }

    fn totals(&self) -> Result<Totals> {
        let s = self.state();
        let mut t = Totals::default();
        for (k, rc) in &s.refs {
            let (kind, _) = ObjectKind::parse_key(k).expect("33-byte key");
            t.objects.add(kind, rc);
        }
        t.orphans = s.orphans.len() as u64;
        Ok(t)
    }

    fn storage_bytes(&self) -> Option<u64> {
        let s = self.state();
        Some(
            s.chunks.values().map(|v| v.len() as u64).sum::<u64>()
                + s.recipes.values().map(|v| v.len() as u64).sum::<u64>()
                + s.snapshots.values().map(|v| v.len() as u64).sum::<u64>(),
        )
    }

    fn chunks_known(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let s = self.state();
        Ok(ids
            .iter()
            .map(|id| {
                let k = ObjectKind::Chunk.key(id);
                s.refs.contains_key(&k) && !s.pending.contains(&k)
            })
            .collect())
    }

    fn put_region(&self, id: &Id, encoded: &[u8], frames: &Frames) -> Result<PutOutcome> {
        if Id::hash(encoded) != *id {
            return Err(RepoError::Invalid(
                "region id does not match its content".into(),
            ));
        }
        let mut s = self.state();
        let rkey = ObjectKind::Region.key(id);
        if s.refs.contains_key(&rkey) {
            // Stored already: only rewrite what is marked damaged.
            if s.pending.contains(&rkey) {
                s.recipes.insert(rkey, encoded.to_vec());
                s.healed(&rkey);
            }
            for (cid, (frame, _)) in frames {
                let k = ObjectKind::Chunk.key(cid);
                if s.pending.contains(&k) {
                    s.chunks.insert(*cid, frame.clone());
                    s.unreadable.remove(cid);
                    s.healed(&k);
                }
            }
            return Ok(PutOutcome::default());
        }
        let mut counts: HashMap<Key, u64> = HashMap::new();
        let chunks =
            record_children(RecordKind::Region, encoded).map_err(|source| RepoError::Corrupt {
                kind: ObjectKind::Region,
                id: *id,
                source,
            })?;
        for c in chunks {
            *counts.entry(ObjectKind::Chunk.key(&c)).or_default() += 1;
        }
        // Every absent chunk must come with its frame before anything changes.
        for k in counts.keys() {
            if !s.refs.contains_key(k) {
                let cid = Id::from_slice(&k[1..]).expect("32 bytes");
                if !frames.contains_key(&cid) {
                    return Err(RepoError::Missing {
                        kind: ObjectKind::Chunk,
                        id: cid,
                    });
                }
            }
        }
        let absent = s.add_refs(&counts);
        let mut out = PutOutcome {
            region_new: true,
            ..Default::default()
        };
        for k in absent {
            let cid = Id::from_slice(&k[1..]).expect("32 bytes");
            let (frame, raw) = &frames[&cid];
            s.chunks.insert(cid, frame.clone());
            s.refs.insert(
                k,
                RefCount {
                    count: counts[&k],
                    logical_len: *raw,
                    stored_len: frame.len() as u32,
                },
            );
            out.new_chunks += 1;
            out.new_bytes += frame.len() as u64;
        }
        for (cid, (frame, _)) in frames {
            let k = ObjectKind::Chunk.key(cid);
            if counts.contains_key(&k) && s.pending.contains(&k) {
                s.chunks.insert(*cid, frame.clone());
                s.unreadable.remove(cid);
                s.healed(&k);
            }
        }
        s.recipes.insert(rkey, encoded.to_vec());
        s.refs.insert(
            rkey,
            RefCount {
                count: 0,
                logical_len: encoded.len() as u32,
                stored_len: encoded.len() as u32,
            },
        );
        s.orphans.insert(rkey);
        out.new_bytes += encoded.len() as u64;
        Ok(out)
    }

    fn commit(&self, snapshot: &[u8], pages: &[Vec<u8>], parent: Option<&Id>) -> Result<(Id, u64)> {
        let id = Id::hash(snapshot);
        let named = record_children(RecordKind::Snapshot, snapshot)
            .map_err(|source| RepoError::CorruptSnapshot { id, source })?;
        let mut s = self.state();
        // A repeated commit (a client retrying one whose answer it lost)
        // changes nothing, as in the store.
        if s.snapshots.contains_key(&id) {
            return Ok((id, 0));
        }
        let by_key: HashMap<Key, &Vec<u8>> = pages
            .iter()
            .map(|p| (ObjectKind::Page.key(&Id::hash(p)), p))
            .collect();
        let mut page_counts: HashMap<Key, u64> = HashMap::new();
        for pid in &named {
            *page_counts.entry(ObjectKind::Page.key(pid)).or_default() += 1;
        }
        // Pages it names must be given or stored, and the regions the new
        // pages name must exist, before anything changes.
        let mut region_counts: HashMap<Key, u64> = HashMap::new();
        for k in page_counts.keys() {
            if s.refs.contains_key(k) {
                continue;
            }
            let (_, pid) = ObjectKind::parse_key(k).expect("33-byte key");
            let bytes = by_key.get(k).ok_or(RepoError::Missing {
                kind: ObjectKind::Page,
                id: pid,
            })?;
            let regions =
                record_children(RecordKind::Page, bytes).map_err(|source| RepoError::Corrupt {
                    kind: ObjectKind::Page,
                    id: pid,
                    source,
                })?;
            for r in regions {
                *region_counts.entry(ObjectKind::Region.key(&r)).or_default() += 1;
            }
        }
        if let Some(k) = region_counts.keys().find(|k| !s.refs.contains_key(*k)) {
            let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
            return Err(RepoError::Missing { kind, id });
        }
        let absent = s.add_refs(&page_counts);
        let mut added = 0u64;
        for k in absent {
            let encoded = by_key[&k].clone();
            added += encoded.len() as u64;
            s.refs.insert(
                k,
                RefCount {
                    count: page_counts[&k],
                    logical_len: encoded.len() as u32,
                    stored_len: encoded.len() as u32,
                },
            );
            s.recipes.insert(k, encoded);
        }
        for (k, page) in &by_key {
            if page_counts.contains_key(k) && s.pending.contains(k) {
                s.recipes.insert(*k, page.to_vec());
                s.healed(k);
            }
        }
        s.add_refs(&region_counts);
        s.snapshots.insert(id, snapshot.to_vec());
        if let Some(p) = parent {
            s.parents.insert(id, *p);
        }
        Ok((id, added))
    }

    fn zero_cvs(&self, region_size: u32, count: u64) -> Result<Vec<Option<[u8; 32]>>> {
        let s = self.state();
        Ok((0..count)
            .map(|i| s.zero_cvs.get(&(region_size, i)).copied())
            .collect())
    }

    fn put_zero_cvs(&self, region_size: u32, cvs: &[(u64, [u8; 32])]) -> Result<()> {
        let mut s = self.state();
        for (i, cv) in cvs {
            s.zero_cvs.insert((region_size, *i), *cv);
        }
        Ok(())
    }

    fn parents(&self) -> Result<Vec<(Id, Id)>> {
        Ok(self.state().parents.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn replace_snapshot(&self, old: &Id, new: &[u8]) -> Result<Id> {
        let mut s = self.state();
        let v = s
            .snapshots
            .get(old)
            .ok_or(RepoError::NoSnapshot { id: *old })?;
        let id = crate::replacement(old, v, new)?;
        if id == *old {
            return Ok(id);
        }
        s.snapshots.remove(old);
        s.snapshots.insert(id, new.to_vec());
        if s.protected.remove(old) {
            s.protected.insert(id);
        }
        if let Some(p) = s.parents.remove(old) {
            s.parents.insert(id, p);
        }
        for p in s.parents.values_mut() {
            if p == old {
                *p = id;
            }
        }
        Ok(id)
    }

    fn forget(&self, ids: &[Id]) -> Result<ForgetOutcome> {
        let mut s = self.state();
        let mut unique = ids.to_vec();
        unique.sort();
        unique.dedup();
        let mut page_counts: HashMap<Key, u64> = HashMap::new();
        for id in &unique {
            if s.protected.contains(id) {
                return Err(RepoError::Protected { id: *id });
            }
            let v = s
                .snapshots
                .get(id)
                .ok_or(RepoError::NoSnapshot { id: *id })?;
            let pages = record_children(RecordKind::Snapshot, v)
                .map_err(|source| RepoError::CorruptSnapshot { id: *id, source })?;
            for p in &pages {
                *page_counts.entry(ObjectKind::Page.key(p)).or_default() += 1;
            }
        }
        let orphaned = s.sub_refs(&page_counts)?;
        for id in &unique {
            s.snapshots.remove(id);
            s.parents.remove(id);
        }
        Ok(ForgetOutcome {
            snapshots: unique.len() as u64,
            pages_orphaned: orphaned,
        })
    }

    fn set_protected(&self, id: &Id, protected: bool) -> Result<()> {
        let mut s = self.state();
        if !s.snapshots.contains_key(id) {
            return Err(RepoError::NoSnapshot { id: *id });
        }
        if protected {
            s.protected.insert(*id);
        } else {
            s.protected.remove(id);
        }
        Ok(())
    }

    fn protected(&self) -> Result<Vec<Id>> {
        Ok(self.state().protected.iter().copied().collect())
    }

    fn gc(&self, dry_run: bool) -> Result<GcOutcome> {
        let mut guard = self.state();
        // A dry run works on a copy of the counts.
        let mut copy;
        let s: &mut State = if dry_run {
            copy = State {
                recipes: guard.recipes.clone(),
                refs: guard.refs.clone(),
                orphans: guard.orphans.clone(),
                ..State::default()
            };
            &mut copy
        } else {
            &mut guard
        };
        let mut removed = Tally::default();
        while let Some(k) = s.orphans.pop_first() {
            let Some(rc) = s.refs.get(&k).copied() else {
                continue;
            };
            if rc.count != 0 {
                continue;
            }
            let (kind, id) = ObjectKind::parse_key(&k).expect("33-byte key");
            let children = s.children(kind, &id);
            s.refs.remove(&k);
            s.recipes.remove(&k);
            s.chunks.remove(&id);
            s.damaged.remove(&k);
            removed.add(kind, &rc);
            s.sub_refs(&children)?;
        }
        Ok(GcOutcome {
            removed,
            rewrote: false,
        })
    }

    fn damage_marks(&self) -> Result<Vec<DamageMark>> {
        Ok(self
            .state()
            .damaged
            .iter()
            .map(|(k, why)| {
                let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
                DamageMark {
                    kind,
                    id,
                    why: why.clone(),
                }
            })
            .collect())
    }

    fn mark_damaged(&self, marks: &[DamageMark]) -> Result<()> {
        let mut s = self.state();
        for m in marks {
            s.damaged.insert(m.kind.key(&m.id), m.why.clone());
        }
        Ok(())
    }

    fn clear_damaged(&self, objects: &[(ObjectKind, Id)]) -> Result<()> {
        let mut s = self.state();
        for (kind, id) in objects {
            let k = kind.key(id);
            s.damaged.remove(&k);
            s.pending.remove(&k);
        }
        Ok(())
    }

    fn damage_pending(&self) -> usize {
        self.state().pending.len()
    }

    fn snapshot_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .state()
            .snapshots
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect())
    }

    fn scan_recipes(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        for (k, v) in &self.state().recipes {
            f(k, v);
        }
        Ok(())
    }

    fn scan_refs(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        for (k, rc) in &self.state().refs {
            f(k, &rc.encode());
        }
        Ok(())
    }

    fn scan_orphans(&self, f: &mut dyn FnMut(&[u8])) -> Result<()> {
        for k in &self.state().orphans {
            f(k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use imgstore_format::sealed::{SEALED_RECORD_MAGIC, SEAL_NONCE, SEAL_TAG};
    use imgstore_format::{ChunkingConfig, Snapshot, SnapshotStats};

    use super::*;

    fn sealed() -> MemRepo {
        let chunking = ChunkingConfig {
            algorithm: "fastcdc-2020".into(),
            min: 4096,
            avg: 16384,
            max: 65536,
            zero_min: 4096,
        };
        let keys = imgstore_crypto::Keys::derive(&imgstore_crypto::MasterKey::from_bytes([9; 32]));
        MemRepo::with_codec(
            RepoConfig::new("00".repeat(16), 0, chunking, 3),
            Codec::Sealed(Arc::new(keys)),
        )
    }

    fn commit_snapshot(repo: &MemRepo, name: &str, t: i64) -> Id {
        let s = Snapshot {
            time_ns: t,
            name: name.into(),
            hostname: "h".into(),
            source: "s".into(),
            tags: vec![],
            size: 0,
            digest: [0; 32],
            region_size: 1 << 23,
            pages: vec![],
            stats: SnapshotStats::default(),
            bitmap: None,
        };
        let (_, stored) = repo
            .codec()
            .store_record(RecordKind::Snapshot, s.encode(), &s.pages);
        repo.commit(&stored, &[], None).unwrap().0
    }

    /// 46 bytes shaped like a sealed snapshot record naming no page: what
    /// a client can commit to a store that checks only the hash.
    fn junk() -> Vec<u8> {
        let mut j = vec![SEALED_RECORD_MAGIC, b'S', 0, 0, 0, 0];
        j.extend((0..SEAL_NONCE + SEAL_TAG).map(|i| i as u8 ^ 0x5c));
        assert_eq!(j.len(), 46);
        j
    }

    #[test]
    fn one_unreadable_record_is_listed_apart_and_can_be_forgotten() {
        let repo = sealed();
        let a = commit_snapshot(&repo, "vm", 10);
        let b = commit_snapshot(&repo, "vm", 20);
        let (bad, _) = repo.commit(&junk(), &[], None).unwrap();
        // The strict listing fails on it; the listing reports it apart.
        let err = repo.snapshots().unwrap_err();
        assert!(
            matches!(err, RepoError::CorruptSnapshot { id, .. } if id == bad),
            "{err}"
        );
        let list = repo.list_snapshots().unwrap();
        let mut ids: Vec<Id> = list.snapshots.iter().map(|(id, _)| *id).collect();
        ids.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(list.unreadable.len(), 1);
        assert_eq!(list.unreadable[0].id, bad);
        assert!(list.contains(&bad) && list.contains(&a));
        let u = list.unreadable(&bad).unwrap();
        assert!(!u.why.is_empty());
        let msg = u.error().to_string();
        assert!(
            msg.contains(&bad.to_hex()) && msg.contains("forget"),
            "{msg}"
        );
        // A record damaged after it was stored is listed apart too.
        repo.state().snapshots.get_mut(&a).unwrap()[60] ^= 1;
        let list = repo.list_snapshots().unwrap();
        assert_eq!(list.snapshots.len(), 1);
        assert_eq!(list.unreadable.len(), 2);
        assert!(list
            .unreadable(&a)
            .is_some_and(|u| u.why.contains("does not hash")));
        // Forgetting the junk by id works; what is left lists cleanly.
        repo.forget(&[bad, a]).unwrap();
        assert!(repo.snapshots().unwrap().iter().all(|(id, _)| *id == b));
        let list = repo.list_snapshots().unwrap();
        assert!(list.unreadable.is_empty());
        assert_eq!(list.snapshots.len(), 1);
    }
}
