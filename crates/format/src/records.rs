//! Region recipes, index pages, snapshot records and reference counts.

use crate::codec::{Reader, Writer};
use crate::{FormatError, Id, PAGE_REGIONS};

/// One extent of a region recipe: `len` bytes that are either zeros
/// (`chunk == None`) or the data chunk with that id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecipeEntry {
    pub len: u32,
    pub chunk: Option<Id>,
}

/// The recipe of one region of an image: the extents that make it up, in
/// order. Content-addressed (its id is the BLAKE3 of its encoding), so a
/// region that did not change between snapshots — or that repeats at
/// another offset or in another image — is stored once.
///
/// ```text
/// u8   version = 1
/// u32  entry count n
/// n ×  u8 tag (0 = zeros, 1 = chunk), u32 length, [32-byte chunk id if tag 1]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Region {
    pub entries: Vec<RecipeEntry>,
}

impl Region {
    const VERSION: u8 = 1;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(5 + self.entries.len() * 37));
        w.u8(Self::VERSION);
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            match e.chunk {
                None => {
                    w.u8(0);
                    w.u32(e.len);
                }
                Some(id) => {
                    w.u8(1);
                    w.u32(e.len);
                    w.bytes(id.as_bytes());
                }
            }
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Region, FormatError> {
        let mut r = Reader::new(buf, "region recipe");
        let v = r.u8()?;
        if v != Self::VERSION {
            return Err(FormatError::Version {
                what: "region recipe",
                version: v,
            });
        }
        let n = r.count(5)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let tag = r.u8()?;
            let len = r.u32()?;
            if len == 0 {
                return Err(FormatError::Invalid {
                    what: "region recipe",
                    why: "zero-length entry".into(),
                });
            }
            let chunk = match tag {
                0 => None,
                1 => Some(r.id()?),
                tag => {
                    return Err(FormatError::BadTag {
                        what: "recipe entry",
                        tag,
                    })
                }
            };
            entries.push(RecipeEntry { len, chunk });
        }
        r.finish()?;
        Ok(Region { entries })
    }

    /// Total bytes the region covers.
    pub fn len(&self) -> u64 {
        self.entries.iter().map(|e| e.len as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when the region is only zeros (such a region is never stored:
    /// its id in a page is [`Id::ZERO`]).
    pub fn is_all_zero(&self) -> bool {
        self.entries.iter().all(|e| e.chunk.is_none())
    }
}

/// An index page: the ids of up to [`PAGE_REGIONS`] consecutive regions,
/// and each region's BLAKE3 chaining value at its position in the image.
/// [`Id::ZERO`] stands for an all-zero region. Content-addressed like
/// regions, so a snapshot whose 8 GiB stretch did not change reuses the
/// previous snapshot's page.
///
/// The chaining values (`finalize_non_root` of the region's subtree, whose
/// input offset is its byte offset) let a changed-block backup compute the
/// new image digest from the regions it re-read plus the base snapshot's
/// values, without reading unchanged data.
///
/// ```text
/// u8   version = 2
/// u32  region count n (1..=1024)
/// n ×  32-byte region id
/// n ×  32-byte chaining value
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Page {
    pub regions: Vec<Id>,
    /// One per region, same order.
    pub cvs: Vec<[u8; 32]>,
}

impl Page {
    const VERSION: u8 = 2;

    pub fn encode(&self) -> Vec<u8> {
        debug_assert_eq!(self.regions.len(), self.cvs.len());
        let mut w = Writer(Vec::with_capacity(5 + self.regions.len() * 64));
        w.u8(Self::VERSION);
        w.u32(self.regions.len() as u32);
        for id in &self.regions {
            w.bytes(id.as_bytes());
        }
        for cv in &self.cvs {
            w.bytes(cv);
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Page, FormatError> {
        let mut r = Reader::new(buf, "index page");
        let v = r.u8()?;
        if v != Self::VERSION {
            return Err(FormatError::Version {
                what: "index page",
                version: v,
            });
        }
        let n = r.count(64)?;
        if n == 0 || n > PAGE_REGIONS {
            return Err(FormatError::Invalid {
                what: "index page",
                why: format!("{n} regions (1..={PAGE_REGIONS} allowed)"),
            });
        }
        let regions = (0..n).map(|_| r.id()).collect::<Result<_, _>>()?;
        let cvs = (0..n)
            .map(|_| r.id().map(|id| *id.as_bytes()))
            .collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(Page { regions, cvs })
    }
}

/// Figures recorded with a snapshot at backup time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnapshotStats {
    /// Data chunk references in the image (zero extents not counted).
    pub chunks: u64,
    /// Bytes of the image covered by zero extents.
    pub zero_bytes: u64,
    /// Chunks this backup added to the store.
    pub new_chunks: u64,
    /// Bytes this backup added to the store (chunk frames, recipes, pages).
    pub new_bytes: u64,
    /// Wall-clock duration of the backup, nanoseconds.
    pub duration_ns: u64,
}

/// How a changed-block tracking bitmap was used by a backup, recorded in
/// its snapshot so that the next backup can tell whether the bitmap it is
/// given belongs to its parent (`--bitmap`, `--checkpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotBitmap {
    pub kind: BitmapKind,
    /// The name given with `--bitmap` (empty when only `--checkpoint` was).
    pub name: String,
    /// The bitmap whose dirty extents this backup read; empty when it read
    /// the whole source.
    pub read: String,
    /// The bitmap that records the writes made after this snapshot: what
    /// the next backup must read for its dirty extents to be complete. For
    /// a managed bitmap, `NAME-` and the generation token (16 hex digits).
    pub next: String,
    /// The source's identity: the NBD URI as given, or the image file's
    /// canonical path.
    pub source: String,
}

/// Who keeps a recorded bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapKind {
    /// A `qemu:dirty-bitmap:NAME` of an NBD export, kept by whoever runs
    /// QEMU (QMP, libvirt).
    Nbd = 1,
    /// A persistent bitmap in a qcow2 file, added and rotated by imgstore.
    Managed = 2,
}

/// A snapshot record (value in the `snapshots` column family; its key, the
/// snapshot id, is the BLAKE3 of this encoding).
///
/// ```text
/// u8   version = 1, or 2 when a bitmap section follows the stats
/// i64  time, nanoseconds since the Unix epoch (UTC)
/// str  name            (str = u16 length + UTF-8 bytes)
/// str  hostname
/// str  source (path as given, or "-" for stdin)
/// u16  tag count, then that many str
/// u64  image size in bytes
/// 32   image digest: BLAKE3 of the whole image (equal to `b3sum IMAGE`)
/// u32  region size in bytes
/// u32  page count p, then p × 32-byte page ids
/// u64 ×5  stats: chunks, zero_bytes, new_chunks, new_bytes, duration_ns
/// version 2 only (a backup with --bitmap or --checkpoint):
/// u8   bitmap kind (1 = an NBD export's bitmap, 2 = a managed qcow2 bitmap)
/// str  bitmap name, str bitmap read, str next bitmap, str source identity
/// ```
///
/// A snapshot without a bitmap is still written as version 1, byte for
/// byte as before, so its id does not change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub time_ns: i64,
    pub name: String,
    pub hostname: String,
    pub source: String,
    pub tags: Vec<String>,
    pub size: u64,
    pub digest: [u8; 32],
    pub region_size: u32,
    pub pages: Vec<Id>,
    pub stats: SnapshotStats,
    /// The changed-block bitmap the backup was taken with (version 2).
    pub bitmap: Option<SnapshotBitmap>,
}

impl Snapshot {
    /// A record without a bitmap.
    const VERSION: u8 = 1;
    /// A record with a bitmap section.
    const VERSION_BITMAP: u8 = 2;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(200 + self.pages.len() * 32));
        w.u8(if self.bitmap.is_some() {
            Self::VERSION_BITMAP
        } else {
            Self::VERSION
        });
        w.i64(self.time_ns);
        w.str(&self.name);
        w.str(&self.hostname);
        w.str(&self.source);
        w.u16(self.tags.len().min(u16::MAX as usize) as u16);
        for t in self.tags.iter().take(u16::MAX as usize) {
            w.str(t);
        }
        w.u64(self.size);
        w.bytes(&self.digest);
        w.u32(self.region_size);
        w.u32(self.pages.len() as u32);
        for p in &self.pages {
            w.bytes(p.as_bytes());
        }
        let s = &self.stats;
        for v in [
            s.chunks,
            s.zero_bytes,
            s.new_chunks,
            s.new_bytes,
            s.duration_ns,
        ] {
            w.u64(v);
        }
        if let Some(b) = &self.bitmap {
            w.u8(b.kind as u8);
            w.str(&b.name);
            w.str(&b.read);
            w.str(&b.next);
            w.str(&b.source);
        }
        w.0
    }

    /// The snapshot's id: BLAKE3 of its encoding.
    pub fn id(&self) -> Id {
        Id::hash(&self.encode())
    }

    pub fn decode(buf: &[u8]) -> Result<Snapshot, FormatError> {
        let mut r = Reader::new(buf, "snapshot record");
        let v = r.u8()?;
        if v != Self::VERSION && v != Self::VERSION_BITMAP {
            return Err(FormatError::Version {
                what: "snapshot record",
                version: v,
            });
        }
        let time_ns = r.i64()?;
        let name = r.str()?;
        let hostname = r.str()?;
        let source = r.str()?;
        let ntags = r.u16()? as usize;
        let mut tags = Vec::with_capacity(ntags.min(r.remaining() / 2));
        for _ in 0..ntags {
            tags.push(r.str()?);
        }
        let size = r.u64()?;
        let digest: [u8; 32] = r.take(32)?.try_into().unwrap();
        let region_size = r.u32()?;
        let np = r.count(32)?;
        let pages = (0..np).map(|_| r.id()).collect::<Result<Vec<_>, _>>()?;
        let stats = SnapshotStats {
            chunks: r.u64()?,
            zero_bytes: r.u64()?,
            new_chunks: r.u64()?,
            new_bytes: r.u64()?,
            duration_ns: r.u64()?,
        };
        let bitmap = if v == Self::VERSION_BITMAP {
            let kind = match r.u8()? {
                1 => BitmapKind::Nbd,
                2 => BitmapKind::Managed,
                tag => {
                    return Err(FormatError::BadTag {
                        what: "snapshot bitmap kind",
                        tag,
                    })
                }
            };
            Some(SnapshotBitmap {
                kind,
                name: r.str()?,
                read: r.str()?,
                next: r.str()?,
                source: r.str()?,
            })
        } else {
            None
        };
        r.finish()?;
        let snap = Snapshot {
            time_ns,
            name,
            hostname,
            source,
            tags,
            size,
            digest,
            region_size,
            pages,
            stats,
            bitmap,
        };
        snap.check_shape()?;
        Ok(snap)
    }

    /// Number of regions the image spans.
    pub fn region_count(&self) -> u64 {
        if self.region_size == 0 {
            return 0;
        }
        self.size.div_ceil(self.region_size as u64)
    }

    fn check_shape(&self) -> Result<(), FormatError> {
        let bad = |why: String| FormatError::Invalid {
            what: "snapshot record",
            why,
        };
        if !self.region_size.is_power_of_two() {
            return Err(bad(format!(
                "region size {} is not a power of two",
                self.region_size
            )));
        }
        let want = self.region_count().div_ceil(PAGE_REGIONS as u64);
        if want != self.pages.len() as u64 {
            return Err(bad(format!(
                "{} pages for {} bytes (expected {want})",
                self.pages.len(),
                self.size
            )));
        }
        Ok(())
    }
}

/// The value in the `refs` column family for a chunk, region or page.
///
/// ```text
/// u64  reference count: how many stored parents refer to the object
///      (snapshots → pages, pages → regions, regions → chunks; with multiplicity)
/// u32  logical length (chunk: raw bytes; region/page: encoded record length)
/// u32  stored length (chunk: frame length; region/page: encoded record length)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RefCount {
    pub count: u64,
    pub logical_len: u32,
    pub stored_len: u32,
}

impl RefCount {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..12].copy_from_slice(&self.logical_len.to_le_bytes());
        b[12..].copy_from_slice(&self.stored_len.to_le_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<RefCount, FormatError> {
        let mut r = Reader::new(buf, "reference count");
        let rc = RefCount {
            count: r.u64()?,
            logical_len: r.u32()?,
            stored_len: r.u32()?,
        };
        r.finish()?;
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap() -> Snapshot {
        Snapshot {
            time_ns: 1_700_000_000_000_000_000,
            name: "vm-disk".into(),
            hostname: "host".into(),
            source: "/dev/vg/disk".into(),
            tags: vec!["daily".into(), "pre-upgrade".into()],
            size: (8 << 20) * 1500 + 17,
            digest: [7; 32],
            region_size: 8 << 20,
            pages: vec![Id([1; 32]), Id([2; 32])],
            stats: SnapshotStats {
                chunks: 1,
                zero_bytes: 2,
                new_chunks: 3,
                new_bytes: 4,
                duration_ns: 5,
            },
            bitmap: None,
        }
    }

    fn snap_with_bitmap() -> Snapshot {
        Snapshot {
            size: 8 << 20,
            pages: vec![Id([1; 32])],
            bitmap: Some(SnapshotBitmap {
                kind: BitmapKind::Managed,
                name: "nightly".into(),
                read: "nightly-00112233aabbccdd".into(),
                next: "nightly-445566778899eeff".into(),
                source: "/vm/web01.qcow2".into(),
            }),
            ..snap()
        }
    }

    /// Golden vector: the bytes of a record with a bitmap (version 2) and
    /// one without (version 1, unchanged by the bitmap's addition), pinned
    /// by their ids; an encoding change fails here.
    #[test]
    fn snapshot_encodings_are_pinned() {
        let v1 = snap();
        let b = v1.encode();
        assert_eq!(b[0], 1);
        assert_eq!(
            v1.id().to_hex(),
            "cf802fcbeb3948db92ae44495fa52408b32036efa582d515e856d36cf09dc4c7",
            "the version-1 encoding changed: existing snapshot ids would change"
        );
        let v2 = snap_with_bitmap();
        let b = v2.encode();
        assert_eq!(b[0], 2);
        // The bitmap section is the tail: kind, then four strings.
        let mut tail = vec![2u8];
        for s in [
            "nightly",
            "nightly-00112233aabbccdd",
            "nightly-445566778899eeff",
            "/vm/web01.qcow2",
        ] {
            tail.extend_from_slice(&(s.len() as u16).to_le_bytes());
            tail.extend_from_slice(s.as_bytes());
        }
        assert!(b.ends_with(&tail));
        let mut without = b[..b.len() - tail.len()].to_vec();
        without[0] = 1;
        assert_eq!(
            Snapshot::decode(&without).unwrap(),
            Snapshot {
                bitmap: None,
                ..v2.clone()
            }
        );
        assert_eq!(
            v2.id().to_hex(),
            "890983b9a970f2a812bfdcaec41a5cee308a48e4dd87013ec420b9d96110337c"
        );
        assert_eq!(Snapshot::decode(&b).unwrap(), v2);
        // A version-2 record must hold its bitmap section, whole.
        let mut cut = b.clone();
        cut.truncate(b.len() - 3);
        assert!(Snapshot::decode(&cut).is_err());
        let mut bad_kind = b.clone();
        let at = b.len() - tail.len();
        bad_kind[at] = 9;
        assert!(Snapshot::decode(&bad_kind).is_err());
        // Version 3 is not known.
        let mut v3 = b;
        v3[0] = 3;
        assert!(Snapshot::decode(&v3).is_err());
    }

    #[test]
    fn records_round_trip() {
        let s = snap();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        let s = snap_with_bitmap();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        let r = Region {
            entries: vec![
                RecipeEntry {
                    len: 4096,
                    chunk: None,
                },
                RecipeEntry {
                    len: 70000,
                    chunk: Some(Id([9; 32])),
                },
            ],
        };
        assert_eq!(Region::decode(&r.encode()).unwrap(), r);
        assert_eq!(r.len(), 74096);
        let p = Page {
            regions: vec![Id::ZERO, Id([3; 32])],
            cvs: vec![[1; 32], [2; 32]],
        };
        assert_eq!(Page::decode(&p.encode()).unwrap(), p);
        let c = RefCount {
            count: 3,
            logical_len: 5,
            stored_len: 6,
        };
        assert_eq!(RefCount::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn page_count_must_match_size() {
        let mut s = snap();
        s.pages.pop();
        assert!(Snapshot::decode(&s.encode()).is_err());
    }

    proptest! {
        // Hostile input: random bytes and mutated valid records decode to
        // errors or values, never a panic or an oversized allocation.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Region::decode(&bytes);
            let _ = Page::decode(&bytes);
            let _ = Snapshot::decode(&bytes);
            let _ = RefCount::decode(&bytes);
        }

        #[test]
        fn mutated_snapshots_never_panic(pos in 0usize..400, val in any::<u8>(), bm in any::<bool>()) {
            let mut b = if bm { snap_with_bitmap() } else { snap() }.encode();
            let p = pos % b.len();
            b[p] = val;
            if let Ok(s) = Snapshot::decode(&b) {
                prop_assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
            }
        }
    }
}
