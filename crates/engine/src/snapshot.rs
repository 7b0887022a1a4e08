//! Reading one snapshot: its index, its regions as verified bytes, its
//! chunks — with the mapping from "missing" or "unreadable" to "damaged at
//! this offset of this snapshot" written once, here.
//!
//! Restore, verify, delta restore, changed-block backup (which rebuilds the
//! regions a change touches from the base), the parent a backup reuses
//! regions from, `diff`, and [`crate::ImageReader`] (NBD and FUSE) all read
//! through a [`SnapshotReader`]. They differ in where bytes go, not in how
//! they are fetched and proven.
//!
//! What is proven: index pages and recipes are checked against their ids by
//! the repository; a rebuilt region is checked with one BLAKE3 pass against
//! the chaining value its index page recorded at backup, which covers every
//! chunk *and* their assembly; a single chunk fetched on its own (delta
//! restore, random reads) is checked against its id.

use imgstore_format::{FrameCodec, Id, RecipeEntry, Snapshot, PAGE_REGIONS};
use imgstore_repo::{ChunkFault, Repository};

use blake3::hazmat::HasherExt;

use crate::aligned::AlignedBuf;
use crate::digest::{region_hasher, RegionHash};
use crate::read::{BadChunk, ChunkReader};
use crate::EngineError;

/// A snapshot opened for reading: its region index loaded.
pub struct SnapshotReader<'a> {
    repo: &'a dyn Repository,
    snapshot: &'a Snapshot,
    label: String,
    region_ids: Vec<Id>,
    /// Region chaining values recorded at backup.
    region_cvs: Vec<[u8; 32]>,
}

/// A region rebuilt by [`SnapshotReader::rebuild`].
pub(crate) struct Rebuilt {
    /// Its share of the image digest.
    pub hash: RegionHash,
    /// Its recipe (one zero entry for an all-zero region).
    pub entries: Vec<RecipeEntry>,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Data chunks it names (with repeats).
    pub chunks: u64,
}

impl<'a> SnapshotReader<'a> {
    /// Opens snapshot `id` (`snapshot` is its record): loads its index pages.
    pub fn open(
        repo: &'a dyn Repository,
        id: &Id,
        snapshot: &'a Snapshot,
    ) -> Result<SnapshotReader<'a>, EngineError> {
        let label = id.short();
        let mut region_ids = Vec::with_capacity(snapshot.region_count() as usize);
        let mut region_cvs = Vec::with_capacity(snapshot.region_count() as usize);
        // Pages are fetched a batch at a time (one call for 64 pages, i.e.
        // 512 GiB of image at 8 MiB regions).
        for (b, batch) in snapshot.pages.chunks(64).enumerate() {
            let pages = repo.pages(batch).map_err(|e| {
                let first = e_page_index(&e, batch).unwrap_or(0) + b * 64;
                EngineError::RecipeDamaged {
                    snapshot: label.clone(),
                    offset: (first * PAGE_REGIONS) as u64 * snapshot.region_size as u64,
                    source: Box::new(e),
                }
            })?;
            for page in pages {
                region_ids.extend(page.regions);
                region_cvs.extend(page.cvs);
            }
        }
        if region_ids.len() as u64 != snapshot.region_count() {
            return Err(EngineError::RecipeDamaged {
                snapshot: label,
                offset: 0,
                source: format!(
                    "index names {} regions, image needs {}",
                    region_ids.len(),
                    snapshot.region_count()
                )
                .into(),
            });
        }
        Ok(SnapshotReader {
            repo,
            snapshot,
            label,
            region_ids,
            region_cvs,
        })
    }

    /// The snapshot record.
    pub fn snapshot(&self) -> &'a Snapshot {
        self.snapshot
    }

    /// The short id used in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The repository it reads from.
    pub fn repo(&self) -> &'a dyn Repository {
        self.repo
    }

    /// Region ids in image order (`Id::ZERO` for an all-zero region).
    pub fn region_ids(&self) -> &[Id] {
        &self.region_ids
    }

    pub fn region_count(&self) -> usize {
        self.region_ids.len()
    }

    pub fn region_id(&self, index: usize) -> Id {
        self.region_ids[index]
    }

    /// The chaining value recorded for region `index`.
    pub fn region_cv(&self, index: usize) -> [u8; 32] {
        self.region_cvs[index]
    }

    /// Region size of the snapshot.
    pub fn region_size(&self) -> u64 {
        self.snapshot.region_size as u64
    }

    pub fn region_len(&self, index: usize) -> u64 {
        let rs = self.region_size();
        (self.snapshot.size - index as u64 * rs).min(rs)
    }

    /// The recipe of region `index`, checked to cover the region's length.
    pub fn entries(&self, index: usize) -> Result<Vec<RecipeEntry>, EngineError> {
        let len = self.region_len(index);
        let offset = index as u64 * self.region_size();
        let rid = self.region_ids[index];
        if rid == Id::ZERO {
            return Ok(vec![RecipeEntry {
                len: len as u32,
                chunk: None,
            }]);
        }
        let region = self
            .repo
            .regions(&[rid])
            .map_err(|e| EngineError::RecipeDamaged {
                snapshot: self.label.clone(),
                offset,
                source: Box::new(e),
            })?
            .pop()
            .expect("one region per id");
        if region.len() != len {
            return Err(EngineError::RecipeDamaged {
                snapshot: self.label.clone(),
                offset,
                source: format!("region {rid} covers {} bytes, expected {len}", region.len())
                    .into(),
            });
        }
        Ok(region.entries)
    }

    /// Recipes of the regions `range` (one batched call for those stored,
    /// instead of one call each: a round trip each to a server), in order,
    /// each checked to cover its region's length.
    pub(crate) fn entries_of(
        &self,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<RecipeEntry>>, EngineError> {
        let mut ids: Vec<Id> = self.region_ids[range.clone()]
            .iter()
            .copied()
            .filter(|id| *id != Id::ZERO)
            .collect();
        ids.sort();
        ids.dedup();
        let regions = self.repo.regions(&ids).map_err(|e| {
            let named = match &e {
                imgstore_repo::RepoError::Missing { id, .. }
                | imgstore_repo::RepoError::Corrupt { id, .. }
                | imgstore_repo::RepoError::Unreadable { id, .. } => Some(*id),
                _ => None,
            };
            let index = range
                .clone()
                .find(|&i| Some(self.region_ids[i]) == named)
                .unwrap_or(range.start);
            EngineError::RecipeDamaged {
                snapshot: self.label.clone(),
                offset: index as u64 * self.region_size(),
                source: Box::new(e),
            }
        })?;
        range
            .map(|i| {
                let rid = self.region_ids[i];
                let len = self.region_len(i);
                if rid == Id::ZERO {
                    return Ok(vec![RecipeEntry {
                        len: len as u32,
                        chunk: None,
                    }]);
                }
                let region = &regions[ids.binary_search(&rid).expect("fetched")];
                if region.len() != len {
                    return Err(EngineError::RecipeDamaged {
                        snapshot: self.label.clone(),
                        offset: i as u64 * self.region_size(),
                        source: format!(
                            "region {rid} covers {} bytes, expected {len}",
                            region.len()
                        )
                        .into(),
                    });
                }
                Ok(region.entries.clone())
            })
            .collect()
    }

    /// Data chunks (with repeats) and zero bytes of the regions `indices`,
    /// their recipes read in batched calls (a few thousand at a time, so
    /// memory stays small whatever the image).
    pub(crate) fn tally(&self, indices: &[usize]) -> Result<(u64, u64), EngineError> {
        let (mut chunks, mut zeros) = (0u64, 0u64);
        for batch in indices.chunks(4096) {
            let mut ids: Vec<Id> = Vec::with_capacity(batch.len());
            for &i in batch {
                match self.region_ids[i] {
                    rid if rid == Id::ZERO => zeros += self.region_len(i),
                    rid => ids.push(rid),
                }
            }
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            let regions = self.repo.regions(&unique).map_err(|e| {
                let first = batch.first().copied().unwrap_or(0);
                EngineError::RecipeDamaged {
                    snapshot: self.label.clone(),
                    offset: first as u64 * self.region_size(),
                    source: Box::new(e),
                }
            })?;
            for rid in ids {
                let region = &regions[unique.binary_search(&rid).expect("fetched")];
                for e in &region.entries {
                    match e.chunk {
                        Some(_) => chunks += 1,
                        None => zeros += e.len as u64,
                    }
                }
            }
        }
        Ok((chunks, zeros))
    }

    /// Stored frames of `ids` (in order); a missing or unreadable chunk is
    /// damage at the image offset `offset_of` gives for it.
    pub fn frames(
        &self,
        ids: &[Id],
        offset_of: impl Fn(&Id) -> u64,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        let reads = ChunkReader::new(self.repo).frames(ids)?;
        reads
            .into_iter()
            .zip(ids)
            .map(|(r, id)| {
                r.map_err(|fault| match fault {
                    ChunkFault::Collected => EngineError::Collected {
                        snapshot: self.label.clone(),
                        offset: offset_of(id),
                    },
                    fault => self.damaged(offset_of(id), *id, fault.to_string()),
                })
            })
            .collect()
    }

    /// Chunk `id` of `len` bytes at image offset `offset`, fetched, decoded
    /// and checked against its id.
    pub fn chunk(&self, id: Id, offset: u64, len: u64) -> Result<Vec<u8>, EngineError> {
        let frame = self.frames(&[id], |_| offset)?.pop().expect("one frame");
        self.decode_verified(&frame, id, offset, len)
    }

    /// Decodes `frame` of chunk `id` (`len` bytes at `offset`) and checks
    /// it against its id.
    pub fn decode_verified(
        &self,
        frame: &[u8],
        id: Id,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::new();
        ChunkReader::new(self.repo)
            .decode(&id, frame, len, &mut out)
            .map_err(|bad| {
                let why = match bad {
                    BadChunk::Sealed(why) | BadChunk::Decode(why) => why,
                    // Wrong bytes, whatever their count.
                    BadChunk::Length { .. } | BadChunk::Content => BadChunk::Content.to_string(),
                };
                self.damaged(offset, id, why)
            })?;
        Ok(out)
    }

    /// Rebuilds region `index` into `buf` (verified); returns its (data
    /// chunk count, zero bytes).
    pub(crate) fn region_bytes(
        &self,
        index: usize,
        buf: &mut AlignedBuf,
    ) -> Result<(u64, u64), EngineError> {
        let r = self.rebuild(index, buf, true)?;
        Ok((r.chunks, r.zero_bytes))
    }

    /// Rebuilds region `index` into `buf` and proves it: one BLAKE3 pass
    /// against the recorded chaining value (only when that fails are the
    /// chunks hashed one by one, to name the damaged one). `need_bytes`
    /// false lets an all-zero region skip filling `buf` when nothing will
    /// read it (a sparse file target).
    pub(crate) fn rebuild(
        &self,
        index: usize,
        buf: &mut AlignedBuf,
        need_bytes: bool,
    ) -> Result<Rebuilt, EngineError> {
        self.rebuild_with(index, None, buf, need_bytes)
    }

    /// [`SnapshotReader::rebuild`] with the region's recipe when the caller
    /// fetched it already ([`SnapshotReader::entries_of`]).
    pub(crate) fn rebuild_with(
        &self,
        index: usize,
        entries: Option<Vec<RecipeEntry>>,
        buf: &mut AlignedBuf,
        need_bytes: bool,
    ) -> Result<Rebuilt, EngineError> {
        let base = index as u64 * self.region_size();
        let len = self.region_len(index) as usize;
        if self.region_ids[index] == Id::ZERO && index > 0 {
            // Nothing stored to be damaged: its chaining value is the one
            // recorded (the page was checked against its id), and the image
            // digest still ties it to the others.
            buf.reset(len);
            if need_bytes {
                buf.fill(0);
            }
            return Ok(Rebuilt {
                hash: RegionHash::Cv(self.region_cvs[index]),
                entries: vec![RecipeEntry {
                    len: len as u32,
                    chunk: None,
                }],
                data_bytes: 0,
                zero_bytes: len as u64,
                chunks: 0,
            });
        }
        let entries = match entries {
            Some(e) => e,
            None => self.entries(index)?,
        };
        let mut ids: Vec<Id> = entries.iter().filter_map(|e| e.chunk).collect();
        let chunks = ids.len() as u64;
        ids.sort();
        ids.dedup();
        let mut frames = self.frames(&ids, |id| base + offset_of(&entries, id))?;
        // Each distinct chunk is opened once, where it lies (a region may
        // name a chunk more than once).
        let mut spans = Vec::with_capacity(frames.len());
        for (id, f) in ids.iter().zip(frames.iter_mut()) {
            spans.push(
                self.repo
                    .codec()
                    .open_chunk_in_place(id, f)
                    .map_err(|why| self.damaged(base + offset_of(&entries, id), *id, why))?,
            );
        }
        buf.reset(len);
        let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
        let mut pos = 0usize;
        FrameCodec::with_thread(|codec| -> Result<(), EngineError> {
            for e in &entries {
                let end = pos + e.len as usize;
                match e.chunk {
                    None => {
                        buf[pos..end].fill(0);
                        zero_bytes += e.len as u64;
                    }
                    Some(id) => {
                        let i = ids.binary_search(&id).expect("id fetched");
                        let frame = &frames[i][spans[i].clone()];
                        codec
                            .decode_into(frame, &mut buf[pos..end])
                            .map_err(|err| self.damaged(base + pos as u64, id, err.to_string()))?;
                        data_bytes += e.len as u64;
                    }
                }
                pos = end;
            }
            Ok(())
        })?;
        let mut hasher = region_hasher(base);
        hasher.update(&buf[..]);
        if hasher.finalize_non_root() != self.region_cvs[index] {
            return Err(self.locate_damage(index, &entries, buf));
        }
        Ok(Rebuilt {
            hash: RegionHash::from_hasher(index as u64, hasher),
            entries,
            data_bytes,
            zero_bytes,
            chunks,
        })
    }

    /// Names what made region `index` differ from its recorded chaining
    /// value: the first chunk whose bytes do not hash to its id, or else the
    /// recipe itself.
    fn locate_damage(&self, index: usize, entries: &[RecipeEntry], buf: &[u8]) -> EngineError {
        let base = index as u64 * self.region_size();
        let mut pos = 0usize;
        for e in entries {
            let end = pos + e.len as usize;
            if let Some(id) = e.chunk {
                if !self.repo.codec().chunk_matches(&buf[pos..end], &id) {
                    return self.damaged(
                        base + pos as u64,
                        id,
                        "content does not match its id".into(),
                    );
                }
            }
            pos = end;
        }
        EngineError::RecipeDamaged {
            snapshot: self.label.clone(),
            offset: base,
            source: format!(
                "region {} does not rebuild the bytes its index page recorded",
                self.region_ids[index]
            )
            .into(),
        }
    }

    /// The error for chunk `chunk` found damaged at image offset `offset`.
    pub fn damaged(&self, offset: u64, chunk: Id, why: String) -> EngineError {
        EngineError::ChunkDamaged {
            snapshot: self.label.clone(),
            offset,
            chunk,
            why,
        }
    }
}

/// Which page of `batch` a repository error names (for the offset in the
/// message).
fn e_page_index(e: &imgstore_repo::RepoError, batch: &[Id]) -> Option<usize> {
    use imgstore_repo::RepoError;
    let id = match e {
        RepoError::Missing { id, .. }
        | RepoError::Corrupt { id, .. }
        | RepoError::Unreadable { id, .. } => id,
        _ => return None,
    };
    batch.iter().position(|p| p == id)
}

/// Offset within a region of the first entry naming `id`.
fn offset_of(entries: &[RecipeEntry], id: &Id) -> u64 {
    let mut off = 0;
    for e in entries {
        if e.chunk.as_ref() == Some(id) {
            return off;
        }
        off += e.len as u64;
    }
    0
}
