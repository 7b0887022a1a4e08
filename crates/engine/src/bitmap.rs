//! Whether a changed-block bitmap belongs to a backup's parent.
//!
//! A QEMU dirty bitmap says which blocks were written since it started
//! recording. Its dirty extents are a complete change list against a
//! parent snapshot only if the bitmap started recording at that snapshot
//! (or earlier) and never stopped. imgstore cannot see when a bitmap
//! started, so each snapshot taken with `--bitmap` or `--checkpoint`
//! records the bitmap that records the writes made after it (its `next`),
//! with the source and the bitmap's kind; a later backup uses a bitmap
//! only when its parent named exactly that bitmap, for the same source
//! and size. Anything else is a [`BitmapMismatch`], and the caller reads
//! the whole source instead: never a wrong snapshot.

use imgstore_format::{BitmapKind, Id, Snapshot};

/// Why a bitmap's dirty extents cannot be trusted against the parent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapMismatch {
    #[error("no earlier snapshot of this image to take the unchanged blocks from")]
    NoParent,
    #[error("the parent snapshot {parent} was not taken with --bitmap or --checkpoint")]
    ParentWithoutBitmap { parent: String },
    #[error("the parent snapshot {parent} was taken with {kind}")]
    OtherKind { parent: String, kind: &'static str },
    #[error(
        "the parent snapshot {parent}'s changes are recorded by bitmap {expected:?}, not {given:?} (a backup was skipped, or another bitmap was given)"
    )]
    OtherBitmap {
        parent: String,
        expected: String,
        given: String,
    },
    #[error("the parent snapshot {parent} was taken from {source_was}")]
    OtherSource { parent: String, source_was: String },
    #[error("the parent snapshot {parent} is {was} bytes, the source {now}")]
    OtherSize { parent: String, was: u64, now: u64 },
}

fn kind_name(k: BitmapKind) -> &'static str {
    match k {
        BitmapKind::Nbd => "an NBD export's bitmap",
        BitmapKind::Managed => "a bitmap imgstore manages in a qcow2 file",
    }
}

/// The bitmap the parent says records the writes made since it, when
/// that parent was taken with a bitmap of `kind` named `name`, from
/// `source`, of `size` bytes. For an NBD bitmap, `name` is the bitmap
/// given now, and must be the parent's `next` (its `--checkpoint`, or the
/// same `--bitmap`); for a managed bitmap, `name` is the family and the
/// answer is the generation to look for in the image.
pub fn parent_bitmap<'a>(
    parent: Option<&'a (Id, Snapshot)>,
    kind: BitmapKind,
    name: &str,
    source: &str,
    size: u64,
) -> Result<&'a str, BitmapMismatch> {
    let Some((id, p)) = parent else {
        return Err(BitmapMismatch::NoParent);
    };
    let parent = id.short();
    let Some(b) = &p.bitmap else {
        return Err(BitmapMismatch::ParentWithoutBitmap { parent });
    };
    if b.kind != kind {
        return Err(BitmapMismatch::OtherKind {
            parent,
            kind: kind_name(b.kind),
        });
    }
    if b.source != source {
        return Err(BitmapMismatch::OtherSource {
            parent,
            source_was: b.source.clone(),
        });
    }
    if p.size != size {
        return Err(BitmapMismatch::OtherSize {
            parent,
            was: p.size,
            now: size,
        });
    }
    let wrong = match kind {
        BitmapKind::Nbd => b.next != name,
        BitmapKind::Managed => b.name != name || b.next.is_empty(),
    };
    if wrong {
        return Err(BitmapMismatch::OtherBitmap {
            parent,
            expected: b.next.clone(),
            given: name.to_string(),
        });
    }
    Ok(&b.next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgstore_format::{SnapshotBitmap, SnapshotStats};

    fn snap(bitmap: Option<SnapshotBitmap>, size: u64) -> (Id, Snapshot) {
        let s = Snapshot {
            time_ns: 1,
            name: "vm".into(),
            hostname: "h".into(),
            source: "src".into(),
            tags: vec![],
            size,
            digest: [0; 32],
            region_size: 8 << 20,
            pages: vec![Id([1; 32])],
            stats: SnapshotStats::default(),
            bitmap,
        };
        (s.id(), s)
    }

    fn bm(kind: BitmapKind, name: &str, next: &str) -> Option<SnapshotBitmap> {
        Some(SnapshotBitmap {
            kind,
            name: name.into(),
            read: String::new(),
            next: next.into(),
            source: "src".into(),
        })
    }

    #[test]
    fn a_bitmap_belongs_only_to_the_parent_that_named_it() {
        use BitmapKind::*;
        let p = snap(bm(Nbd, "b1", "b2"), 4096);
        assert_eq!(parent_bitmap(Some(&p), Nbd, "b2", "src", 4096), Ok("b2"));
        assert!(matches!(
            parent_bitmap(Some(&p), Nbd, "b1", "src", 4096),
            Err(BitmapMismatch::OtherBitmap { .. })
        ));
        assert!(matches!(
            parent_bitmap(Some(&p), Nbd, "b2", "other", 4096),
            Err(BitmapMismatch::OtherSource { .. })
        ));
        assert!(matches!(
            parent_bitmap(Some(&p), Nbd, "b2", "src", 8192),
            Err(BitmapMismatch::OtherSize { .. })
        ));
        assert!(matches!(
            parent_bitmap(Some(&p), Managed, "b1", "src", 4096),
            Err(BitmapMismatch::OtherKind { .. })
        ));
        assert_eq!(
            parent_bitmap(None, Nbd, "b2", "src", 4096),
            Err(BitmapMismatch::NoParent)
        );
        let plain = snap(None, 4096);
        assert!(matches!(
            parent_bitmap(Some(&plain), Nbd, "b2", "src", 4096),
            Err(BitmapMismatch::ParentWithoutBitmap { .. })
        ));
        let m = snap(bm(Managed, "nightly", "nightly-0123456789abcdef"), 4096);
        assert_eq!(
            parent_bitmap(Some(&m), Managed, "nightly", "src", 4096),
            Ok("nightly-0123456789abcdef")
        );
        assert!(matches!(
            parent_bitmap(Some(&m), Managed, "weekly", "src", 4096),
            Err(BitmapMismatch::OtherBitmap { .. })
        ));
    }
}
