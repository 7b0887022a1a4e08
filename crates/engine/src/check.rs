//! `check`: proves the repository is whole, and says exactly what is not.
//!
//! Structure (always): every snapshot record decodes and hashes to its key;
//! every stored region recipe and index page hashes to its id and decodes;
//! each object's reference count equals the number of stored parents naming
//! it (counted from the records themselves, not trusted from `refs`); every
//! referenced object exists; `orphans` lists exactly the objects with count
//! zero; each snapshot's index covers its size with regions of the right
//! length.
//!
//! Data (`ReadData::All` or a sample): every selected chunk is read,
//! decompressed, and re-hashed against its id, in parallel.
//!
//! Damage is then mapped back to what a user cares about: which snapshots
//! are affected, at which byte ranges. The walk costs one pass over the
//! recipes (twice when chunks are damaged) plus one over `refs`; it holds
//! one expected count per stored object (about 50 bytes each: ≈0.8 GiB per
//! TiB of unique data at the default chunk size).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use imgstore_format::sealed::{record_children, RecordKind};
use imgstore_format::{Id, ObjectKind, Page, RefCount, Region, Snapshot, PAGE_REGIONS};
use imgstore_repo::{ChunkFault, DamageMark, Repository};
use rayon::prelude::*;

use crate::read::{io_pool, ChunkReader};
use crate::{EngineError, Progress};

/// How much chunk data `check` reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReadData {
    /// Structure only.
    None,
    /// Every chunk.
    All,
    /// A random sample: each chunk with this probability (0..=1), plus every
    /// chunk already marked damaged.
    Subset { fraction: f64, seed: u64 },
}

/// One finding.
#[derive(Clone, Debug)]
pub struct Problem {
    /// The stored object it is about, when there is one.
    pub object: Option<(ObjectKind, Id)>,
    /// The object is unusable (missing, unreadable, wrong content): snapshots
    /// naming it are damaged.
    pub damaged: bool,
    pub what: String,
}

/// A snapshot that cannot be restored as recorded, and where.
#[derive(Clone, Debug)]
pub struct DamagedSnapshot {
    pub id: Id,
    /// `None` when the record itself does not decode.
    pub snapshot: Option<Snapshot>,
    /// Affected byte ranges `(offset, length)`, merged and in order.
    pub ranges: Vec<(u64, u64)>,
}

/// What `check` found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub snapshots: u64,
    pub chunks: u64,
    pub regions: u64,
    pub pages: u64,
    /// Objects with count zero, waiting for gc (not a problem).
    pub orphans: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    pub damaged_snapshots: Vec<DamagedSnapshot>,
    /// Objects with a damage mark that were read and found intact.
    pub intact_marked: Vec<(ObjectKind, Id)>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The damaged objects, as marks a writer records for healing.
    pub fn damage_marks(&self) -> Vec<DamageMark> {
        self.problems
            .iter()
            .filter(|p| p.damaged)
            .filter_map(|p| {
                p.object.map(|(kind, id)| DamageMark {
                    kind,
                    id,
                    why: p.what.clone(),
                })
            })
            .collect()
    }
}

#[derive(Default)]
struct Walk {
    problems: Vec<Problem>,
    /// Object key → why it is unusable.
    damaged: HashMap<[u8; 33], String>,
}

impl Walk {
    fn problem(&mut self, what: String) {
        self.problems.push(Problem {
            object: None,
            damaged: false,
            what,
        });
    }

    fn object_problem(&mut self, kind: ObjectKind, id: Id, what: String) {
        self.problems.push(Problem {
            object: Some((kind, id)),
            damaged: false,
            what: format!("{} {id}: {what}", kind.name()),
        });
    }

    fn damage(&mut self, kind: ObjectKind, id: Id, why: String) {
        let key = kind.key(&id);
        if self.damaged.contains_key(&key) {
            return;
        }
        self.problems.push(Problem {
            object: Some((kind, id)),
            damaged: true,
            what: format!("{} {id}: {why}", kind.name()),
        });
        self.damaged.insert(key, why);
    }
}

/// Checks `store`; `progress` counts chunk bytes read.
pub fn check(
    store: &dyn Repository,
    read_data: ReadData,
    progress: &dyn Progress,
) -> Result<CheckReport, EngineError> {
    walk(store, read_data, progress, false)
}

/// `check` without the key of an encrypted repository (its server, or the
/// host of a copy): every stored record against its id, the reference
/// graph from the records' clear child ids, reference counts and the
/// orphan list. Nothing is opened, so damage is named by object, not by
/// snapshot byte ranges, and chunk data is not read.
pub fn check_structure(
    store: &dyn Repository,
    progress: &dyn Progress,
) -> Result<CheckReport, EngineError> {
    walk(store, ReadData::None, progress, true)
}

fn walk(
    store: &dyn Repository,
    read_data: ReadData,
    progress: &dyn Progress,
    keyless: bool,
) -> Result<CheckReport, EngineError> {
    let mut report = CheckReport::default();
    let mut w = Walk::default();

    // 1. Snapshot records; expected page counts.
    let mut expected: HashMap<[u8; 33], u64> = HashMap::new();
    let mut snaps: Vec<(Id, Snapshot)> = Vec::new();
    for (k, v) in store.snapshot_records()? {
        let Some(id) = Id::from_slice(&k) else {
            w.problem(format!(
                "snapshot key of {} bytes (expected 32): the snapshots table is damaged",
                k.len()
            ));
            continue;
        };
        if keyless {
            let children = if Id::hash(&v) != id {
                Err("stored bytes do not match its id".to_string())
            } else {
                record_children(RecordKind::Snapshot, &v).map_err(|e| e.to_string())
            };
            match children {
                Ok(pages) => {
                    for pid in &pages {
                        *expected.entry(ObjectKind::Page.key(pid)).or_default() += 1;
                    }
                    report.snapshots += 1;
                }
                Err(why) => w.problem(format!("snapshot {id}: record is damaged ({why})")),
            }
            continue;
        }
        let decoded = store
            .codec()
            .open_record(RecordKind::Snapshot, &id, &v)
            .map_err(|e| e.to_string())
            .and_then(|enc| Snapshot::decode(&enc).map_err(|e| e.to_string()));
        match decoded {
            Ok(s) => {
                for pid in &s.pages {
                    *expected.entry(ObjectKind::Page.key(pid)).or_default() += 1;
                }
                snaps.push((id, s));
            }
            Err(why) => {
                // The store counted the pages a record names in the clear
                // when it was committed, whether or not it opens (a junk
                // record a client committed): expect those references.
                if Id::hash(&v) == id {
                    for pid in record_children(RecordKind::Snapshot, &v).unwrap_or_default() {
                        *expected.entry(ObjectKind::Page.key(&pid)).or_default() += 1;
                    }
                }
                w.problem(format!(
                    "snapshot {id}: record is damaged ({why}); `imgstore forget {}` removes it",
                    id.short()
                ));
                report.damaged_snapshots.push(DamagedSnapshot {
                    id,
                    snapshot: None,
                    ranges: Vec::new(),
                });
            }
        }
    }
    report.snapshots += snaps.len() as u64 + report.damaged_snapshots.len() as u64;

    // 2. Recipes: content matches id, decodes; expected region and chunk counts.
    let mut region_len: HashMap<Id, u64> = HashMap::new();
    let mut pages: HashMap<Id, Vec<Id>> = HashMap::new();
    store.scan_recipes(&mut |k, v| {
        let (kind, id) = match ObjectKind::parse_key(k) {
            Ok(x) if x.0 != ObjectKind::Chunk => x,
            _ => {
                w.problem(format!(
                    "recipes table holds a malformed key {}",
                    hex_prefix(k)
                ));
                return;
            }
        };
        if Id::hash(v) != id {
            w.damage(kind, id, "stored bytes do not match its id".into());
            return;
        }
        let rk = match kind {
            ObjectKind::Region => RecordKind::Region,
            _ => RecordKind::Page,
        };
        if keyless {
            let (child, regions) = match kind {
                ObjectKind::Region => (ObjectKind::Chunk, false),
                _ => (ObjectKind::Region, true),
            };
            match record_children(rk, v) {
                Ok(children) => {
                    for c in &children {
                        *expected.entry(child.key(c)).or_default() += 1;
                    }
                    if regions {
                        pages.insert(id, children);
                    } else {
                        // Its length is sealed; only its presence counts.
                        region_len.insert(id, 0);
                    }
                }
                Err(e) => w.damage(kind, id, format!("does not decode ({e})")),
            }
            return;
        }
        let v = match store.codec().open_record(rk, &id, v) {
            Ok(v) => v,
            Err(e) => {
                w.damage(kind, id, format!("does not open ({e})"));
                return;
            }
        };
        let v = &v[..];
        match kind {
            ObjectKind::Region => match Region::decode(v) {
                Ok(r) => {
                    for e in &r.entries {
                        if let Some(c) = e.chunk {
                            *expected.entry(ObjectKind::Chunk.key(&c)).or_default() += 1;
                        }
                    }
                    region_len.insert(id, r.len());
                }
                Err(e) => w.damage(kind, id, format!("does not decode ({e})")),
            },
            _ => match Page::decode(v) {
                Ok(p) => {
                    for r in &p.regions {
                        if *r != Id::ZERO {
                            *expected.entry(ObjectKind::Region.key(r)).or_default() += 1;
                        }
                    }
                    pages.insert(id, p.regions);
                }
                Err(e) => w.damage(kind, id, format!("does not decode ({e})")),
            },
        }
    })?;

    // 3. Reference counts against the parents counted above.
    let mut zero_count: HashSet<[u8; 33]> = HashSet::new();
    let mut chunk_list: Vec<(Id, u32)> = Vec::new();
    store.scan_refs(&mut |k, v| {
        let Ok((kind, id)) = ObjectKind::parse_key(k) else {
            w.problem(format!(
                "reference table holds a malformed key {}",
                hex_prefix(k)
            ));
            return;
        };
        let rc = match RefCount::decode(v) {
            Ok(rc) => rc,
            Err(e) => {
                w.object_problem(kind, id, format!("reference count does not decode ({e})"));
                expected.remove(k);
                return;
            }
        };
        let want = expected.remove(k).unwrap_or(0);
        if rc.count != want {
            w.object_problem(
                kind,
                id,
                format!(
                    "reference count is {} but {want} stored parents name it",
                    rc.count
                ),
            );
        }
        if rc.count == 0 {
            zero_count.insert(*<&[u8; 33]>::try_from(k).expect("33 bytes"));
        }
        match kind {
            ObjectKind::Chunk => {
                report.chunks += 1;
                chunk_list.push((id, rc.logical_len));
            }
            ObjectKind::Region => {
                report.regions += 1;
                if !region_len.contains_key(&id) {
                    w.damage(kind, id, "recipe is missing from the store".into());
                }
            }
            ObjectKind::Page => {
                report.pages += 1;
                if !pages.contains_key(&id) {
                    w.damage(kind, id, "index page is missing from the store".into());
                }
            }
        }
    })?;
    let mut leftover: Vec<_> = expected.into_iter().collect();
    leftover.sort();
    for (k, n) in leftover {
        let (kind, id) = ObjectKind::parse_key(&k).expect("built from ids");
        if !w.damaged.contains_key(&k) {
            w.damage(
                kind,
                id,
                format!("missing: named by {n} stored parents but absent from the store"),
            );
        }
    }

    // 4. Orphans list exactly the count-zero objects.
    let mut orphans = 0u64;
    let mut stale = Vec::new();
    store.scan_orphans(&mut |k| {
        orphans += 1;
        if !zero_count.remove(k) {
            stale.push(k.to_vec());
        }
    })?;
    report.orphans = orphans;
    for k in stale {
        w.problem(format!(
            "orphan entry {} names an object whose count is not zero or that does not exist",
            hex_prefix(&k)
        ));
    }
    let mut unlisted: Vec<_> = zero_count.into_iter().collect();
    unlisted.sort();
    for k in unlisted {
        let (kind, id) = ObjectKind::parse_key(&k).expect("33 bytes");
        w.object_problem(
            kind,
            id,
            "count is zero but it is not listed for gc (gc would never free it)".into(),
        );
    }

    // 5. Damage found earlier and not yet repaired.
    let marks = store.damage_marks()?;
    let marked: HashSet<Id> = marks
        .iter()
        .filter(|m| m.kind == ObjectKind::Chunk)
        .map(|m| m.id)
        .collect();

    // 6. Chunk data.
    let selected: Vec<(Id, u32)> = match read_data {
        ReadData::None => Vec::new(),
        ReadData::All => chunk_list,
        ReadData::Subset { fraction, seed } => {
            let threshold = (fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&seed.to_le_bytes());
            chunk_list
                .into_iter()
                .filter(|(id, _)| {
                    let h = blake3::keyed_hash(&key, id.as_bytes());
                    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
                    x < threshold || marked.contains(id)
                })
                .collect()
        }
    };
    let selected: Vec<(Id, u32)> = {
        let ids: Vec<Id> = selected.iter().map(|c| c.0).collect();
        store
            .read_order(&ids)?
            .into_iter()
            .map(|i| selected[i])
            .collect()
    };
    if !selected.is_empty() {
        let total: u64 = selected.iter().map(|c| c.1 as u64).sum();
        progress.start(Some(total));
        let bad = Mutex::new(Vec::new());
        let intact = Mutex::new(Vec::new());
        let (n, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        let chunks = ChunkReader::new(store);
        let pool = io_pool()?;
        pool.install(|| {
            selected.par_chunks(64).for_each(|batch| {
                let ids: Vec<Id> = batch.iter().map(|c| c.0).collect();
                let frames: Vec<Result<Vec<u8>, Option<String>>> = match chunks.frames(&ids) {
                    Ok(f) => f
                        .into_iter()
                        .map(|r| {
                            r.map_err(|e| match e {
                                // Deleted by a gc in another process since
                                // this check listed it: gone, not damaged.
                                ChunkFault::Collected => None,
                                e => Some(e.to_string()),
                            })
                        })
                        .collect(),
                    Err(e) => vec![Err(Some(format!("cannot be read: {e}"))); ids.len()],
                };
                let mut buf = Vec::new();
                for ((id, len), frame) in batch.iter().zip(frames) {
                    let frame = match frame {
                        Err(None) => continue,
                        Err(Some(why)) => Err(why),
                        Ok(f) => Ok(f),
                    };
                    let verdict = frame.and_then(|f| {
                        bytes.fetch_add(f.len() as u64, Relaxed);
                        chunks
                            .decode(id, &f, *len as u64, &mut buf)
                            .map_err(|bad| bad.to_string())
                    });
                    match verdict {
                        Ok(()) if marked.contains(id) => {
                            intact.lock().unwrap_or_else(|p| p.into_inner()).push(*id)
                        }
                        Ok(()) => {}
                        Err(why) => bad
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((*id, why)),
                    }
                    n.fetch_add(1, Relaxed);
                    progress.advance(*len as u64);
                }
            })
        });
        progress.finish();
        report.chunks_read = n.into_inner();
        report.bytes_read = bytes.into_inner();
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        bad.sort();
        for (id, why) in bad {
            w.damage(ObjectKind::Chunk, id, why);
        }
        let intact = intact.into_inner().unwrap_or_else(|p| p.into_inner());
        report.intact_marked = intact
            .into_iter()
            .map(|id| (ObjectKind::Chunk, id))
            .collect();
    }
    let intact: HashSet<Id> = report.intact_marked.iter().map(|x| x.1).collect();
    for m in marks {
        if !intact.contains(&m.id) {
            w.damage(
                m.kind,
                m.id,
                format!(
                    "marked damaged earlier ({}); back up the same data again to repair it",
                    m.why
                ),
            );
        }
    }

    // 7. Which snapshots, which bytes.
    let region_damage = region_damage(store, &w.damaged)?;
    for (id, s) in &snaps {
        let rs = s.region_size as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut push = |off: u64, len: u64| {
            let len = len.min(s.size.saturating_sub(off));
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 >= off => {
                    last.1 = last.1.max(off + len - last.0);
                }
                _ => ranges.push((off, len)),
            }
        };
        let mut index = 0u64;
        for pid in &s.pages {
            let page_base = index * rs;
            let Some(regions) = pages.get(pid) else {
                // Damage to the page itself was reported above.
                let n = (s.region_count() - index).min(PAGE_REGIONS as u64);
                push(page_base, n * rs);
                index += n;
                continue;
            };
            for rid in regions {
                let base = index * rs;
                index += 1;
                if *rid == Id::ZERO {
                    continue;
                }
                let want = s.size.saturating_sub(base).min(rs);
                match region_len.get(rid) {
                    None => push(base, want),
                    Some(&len) if len != want => {
                        w.object_problem(
                            ObjectKind::Region,
                            *rid,
                            format!(
                                "covers {len} bytes where snapshot {} needs {want} at byte {base}",
                                id.short()
                            ),
                        );
                        push(base, want);
                    }
                    Some(_) => {
                        for &(o, l) in region_damage.get(rid).map(Vec::as_slice).unwrap_or(&[]) {
                            push(base + o, l);
                        }
                    }
                }
            }
        }
        if index != s.region_count() {
            w.problem(format!(
                "snapshot {id}: its index names {index} regions, its size needs {}",
                s.region_count()
            ));
            push(0, s.size);
        }
        if !ranges.is_empty() {
            report.damaged_snapshots.push(DamagedSnapshot {
                id: *id,
                snapshot: Some(s.clone()),
                ranges,
            });
        }
    }
    report.problems = w.problems;
    Ok(report)
}

/// For regions that name a damaged chunk: the affected ranges within the
/// region. One more pass over the recipes, only when chunks are damaged.
fn region_damage(
    store: &dyn Repository,
    damaged: &HashMap<[u8; 33], String>,
) -> Result<HashMap<Id, Vec<(u64, u64)>>, EngineError> {
    let mut out: HashMap<Id, Vec<(u64, u64)>> = HashMap::new();
    if !damaged.keys().any(|k| k[0] == ObjectKind::Chunk as u8) {
        return Ok(out);
    }
    store.scan_recipes(&mut |k, v| {
        let Ok((ObjectKind::Region, id)) = ObjectKind::parse_key(k) else {
            return;
        };
        let Ok(v) = store.codec().open_record(RecordKind::Region, &id, v) else {
            return;
        };
        let Ok(r) = Region::decode(&v) else { return };
        let mut off = 0u64;
        for e in &r.entries {
            if let Some(c) = e.chunk {
                if damaged.contains_key(&ObjectKind::Chunk.key(&c)) {
                    out.entry(id).or_default().push((off, e.len as u64));
                }
            }
            off += e.len as u64;
        }
    })?;
    Ok(out)
}

fn hex_prefix(k: &[u8]) -> String {
    k.iter().take(12).map(|b| format!("{b:02x}")).collect()
}
