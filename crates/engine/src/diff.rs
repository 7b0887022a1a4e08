//! `diff`: which byte ranges differ between two snapshots, from their
//! recipes alone (no chunk data is read).
//!
//! Regions with the same id are equal. Inside other regions, two stretches
//! are equal when both are zeros, or both lie in the same chunk at the same
//! offset within it. A chunk boundary that moved makes the bytes around it
//! count as changed, so the result may over-report slightly (at chunk
//! granularity) but never misses a difference — which is what a change
//! list for `backup --changed` must guarantee.

use imgstore_format::{Id, RecipeEntry, Snapshot};
use imgstore_repo::Repository;
use rayon::prelude::*;

use crate::read::io_pool;
use crate::snapshot::SnapshotReader;
use crate::EngineError;

/// Differing byte ranges `(offset, length)`, merged and in order, in the
/// coordinates of the larger image.
pub fn diff(
    repo: &dyn Repository,
    a: (&Id, &Snapshot),
    b: (&Id, &Snapshot),
) -> Result<Vec<(u64, u64)>, EngineError> {
    let (ca, cb) = (
        SnapshotReader::open(repo, a.0, a.1)?,
        SnapshotReader::open(repo, b.0, b.1)?,
    );
    if a.1.region_size != b.1.region_size {
        return Ok(vec![(0, a.1.size.max(b.1.size))]);
    }
    let rs = a.1.region_size as u64;
    let (na, nb) = (a.1.region_count(), b.1.region_count());
    let common = na.min(nb);
    let pool = io_pool()?;
    let per_region: Vec<Vec<(u64, u64)>> = pool.install(|| {
        (0..common)
            .into_par_iter()
            .map(|i| -> Result<Vec<(u64, u64)>, EngineError> {
                let i = i as usize;
                if ca.region_id(i) == cb.region_id(i) {
                    return Ok(Vec::new());
                }
                let base = i as u64 * rs;
                Ok(differing(&ca.entries(i)?, &cb.entries(i)?)
                    .into_iter()
                    .map(|(o, l)| (base + o, l))
                    .collect())
            })
            .collect::<Result<_, _>>()
    })?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |o: u64, l: u64| match out.last_mut() {
        Some(last) if last.0 + last.1 >= o => last.1 = last.1.max(o + l - last.0),
        _ => out.push((o, l)),
    };
    for (o, l) in per_region.into_iter().flatten() {
        push(o, l);
    }
    let (small, large) = (a.1.size.min(b.1.size), a.1.size.max(b.1.size));
    if large > small {
        push(small, large - small);
    }
    Ok(out)
}

/// Ranges (relative to the region) where two recipes of a region differ.
/// Where one recipe is shorter, the rest counts as different.
fn differing(a: &[RecipeEntry], b: &[RecipeEntry]) -> Vec<(u64, u64)> {
    let ends = |v: &[RecipeEntry]| -> Vec<(u64, u64, Option<Id>)> {
        let mut pos = 0;
        v.iter()
            .map(|e| {
                let s = pos;
                pos += e.len as u64;
                (s, pos, e.chunk)
            })
            .collect()
    };
    let (ea, eb) = (ends(a), ends(b));
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut i, mut j, mut pos) = (0, 0, 0u64);
    while i < ea.len() && j < eb.len() {
        let (x, y) = (ea[i], eb[j]);
        let end = x.1.min(y.1);
        let same = match (x.2, y.2) {
            (None, None) => true,
            (Some(p), Some(q)) => p == q && x.0 == y.0,
            _ => false,
        };
        if !same && end > pos {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == pos => last.1 += end - pos,
                _ => out.push((pos, end - pos)),
            }
        }
        pos = end;
        if x.1 == end {
            i += 1;
        }
        if y.1 == end {
            j += 1;
        }
    }
    let total = ea
        .last()
        .map_or(0, |e| e.1)
        .max(eb.last().map_or(0, |e| e.1));
    if total > pos {
        out.push((pos, total - pos));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(len: u32, c: Option<u8>) -> RecipeEntry {
        RecipeEntry {
            len,
            chunk: c.map(|b| Id([b; 32])),
        }
    }

    #[test]
    fn differing_ranges_follow_chunks_and_zeros() {
        // Same.
        assert!(differing(&[e(10, Some(1)), e(5, None)], &[e(10, Some(1)), e(5, None)]).is_empty());
        // Second chunk replaced.
        assert_eq!(
            differing(
                &[e(10, Some(1)), e(5, Some(2))],
                &[e(10, Some(1)), e(5, Some(3))]
            ),
            vec![(10, 5)]
        );
        // Zero run split differently is still equal; data vs zeros differs.
        assert!(differing(&[e(4, None), e(6, None)], &[e(10, None)]).is_empty());
        assert_eq!(
            differing(&[e(10, None)], &[e(3, None), e(4, Some(7)), e(3, None)]),
            vec![(3, 4)]
        );
        // A boundary moved: the whole span of the affected chunks differs.
        assert_eq!(
            differing(
                &[e(6, Some(1)), e(6, Some(2))],
                &[e(8, Some(4)), e(4, Some(2))]
            ),
            vec![(0, 8), (8, 4)]
                .into_iter()
                .fold(Vec::new(), |mut v: Vec<(u64, u64)>, r| {
                    match v.last_mut() {
                        Some(l) if l.0 + l.1 == r.0 => l.1 += r.1,
                        _ => v.push(r),
                    }
                    v
                })
        );
        // Same chunk id at a different offset is a difference.
        assert_eq!(
            differing(&[e(2, None), e(4, Some(1))], &[e(4, Some(1)), e(2, None)]),
            vec![(0, 6)]
        );
    }
}
