//! The local store as a [`Repository`]: the engine's only way in.

use imgstore_format::{Id, ObjectKind, RefCount, RepoConfig};
use imgstore_repo::{
    ChunkRead, Codec, DamageMark, ForgetOutcome, Frames, GcOutcome, PutOutcome, Repository, Result,
    Totals,
};

use crate::Store;

impl Repository for Store {
    fn config(&self) -> &RepoConfig {
        Store::config(self)
    }

    fn location(&self) -> String {
        self.dir().display().to_string()
    }

    fn codec(&self) -> &Codec {
        Store::codec(self)
    }

    fn raw_records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        Store::raw_records(self, kind, ids)
    }

    fn chunk_frames(&self, ids: &[Id]) -> Result<Vec<ChunkRead>> {
        Store::chunk_frames(self, ids)
    }

    fn read_order(&self, ids: &[Id]) -> Result<Vec<usize>> {
        self.frames.read_order(&self.ix, ids)
    }

    fn in_flight(&self) -> usize {
        self.frames.in_flight()
    }

    /// Every lookup a backup makes is in the local index.
    fn backup_in_flight(&self) -> usize {
        0
    }

    fn uploads_in_flight(&self) -> usize {
        self.frames.uploads_in_flight()
    }

    fn ref_counts(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Option<RefCount>>> {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| kind.key(id)).collect();
        self.ix.get_refs(&keys)
    }

    fn totals(&self) -> Result<Totals> {
        Store::totals(self)
    }

    fn storage_bytes(&self) -> Option<u64> {
        Store::storage_bytes(self).ok()
    }

    fn chunks_known(&self, ids: &[Id]) -> Result<Vec<bool>> {
        Store::chunks_known(self, ids)
    }

    fn put_region(&self, id: &Id, stored: &[u8], frames: &Frames) -> Result<PutOutcome> {
        Store::put_region(self, id, stored, frames)
    }

    fn commit(&self, snapshot: &[u8], pages: &[Vec<u8>], parent: Option<&Id>) -> Result<(Id, u64)> {
        Store::commit(self, snapshot, pages, parent)
    }

    fn zero_cvs(&self, region_size: u32, count: u64) -> Result<Vec<Option<[u8; 32]>>> {
        Store::zero_cvs(self, region_size, count)
    }

    fn put_zero_cvs(&self, region_size: u32, cvs: &[(u64, [u8; 32])]) -> Result<()> {
        Store::put_zero_cvs(self, region_size, cvs)
    }

    fn parents(&self) -> Result<Vec<(Id, Id)>> {
        Store::parents(self)
    }

    fn replace_snapshot(&self, old: &Id, new: &[u8]) -> Result<Id> {
        Store::replace_snapshot(self, old, new)
    }

    fn forget(&self, ids: &[Id]) -> Result<ForgetOutcome> {
        Store::forget(self, ids)
    }

    fn set_protected(&self, id: &Id, protected: bool) -> Result<()> {
        Store::set_protected(self, id, protected)
    }

    fn protected(&self) -> Result<Vec<Id>> {
        Store::protected(self)
    }

    fn gc(&self, dry_run: bool) -> Result<GcOutcome> {
        let removed = self.sweep(dry_run, &|_| {})?;
        let rewrote = if dry_run { false } else { self.reclaim()? };
        Ok(GcOutcome { removed, rewrote })
    }

    fn damage_marks(&self) -> Result<Vec<DamageMark>> {
        Store::damage_marks(self)
    }

    fn mark_damaged(&self, marks: &[DamageMark]) -> Result<()> {
        Store::mark_damaged(self, marks)
    }

    fn clear_damaged(&self, objects: &[(ObjectKind, Id)]) -> Result<()> {
        Store::clear_damaged(self, objects)
    }

    fn damage_pending(&self) -> usize {
        Store::damage_pending(self)
    }

    fn witnesses(&self) -> Result<std::collections::HashMap<Id, imgstore_repo::Witness>> {
        Ok(self
            .attestations()?
            .into_iter()
            .map(|(id, a)| {
                (
                    id,
                    imgstore_repo::Witness {
                        image: a.image,
                        committed_ns: a.committed_ns,
                    },
                )
            })
            .collect())
    }

    fn snapshot_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Store::snapshot_records(self)
    }

    fn scan_recipes(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        Store::scan_recipes(self, f)
    }

    fn scan_refs(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        Store::scan_refs(self, f)
    }

    fn scan_orphans(&self, f: &mut dyn FnMut(&[u8])) -> Result<()> {
        Store::scan_orphans(self, f)
    }
}
