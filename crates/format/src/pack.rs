//! Bucket-backed repositories (format 4): the pack object, the snapshot
//! object, the bucket layout, and the local index entries that point into
//! packs. Encoded and checked here only; `docs/FORMAT.md` ("Bucket-backed
//! repositories") documents every byte.
//!
//! ```text
//! bucket/PREFIX/
//!   config                    the repository config (imgstore.json bytes)
//!   packs/<aa>/<pack name>    entries back to back, then the trailer, then the footer
//!   snapshots/<snapshot id>   a snapshot object (envelope + stored record)
//! ```
//!
//! A pack's name is the BLAKE3 hash (hex) of its trailer. The trailer names
//! every entry (kind, id, length, raw length, and the BLAKE3 of its stored
//! bytes), so a pack is self-describing: the bucket alone is enough to
//! rebuild the local index. Entries are verified where they are used — a
//! chunk against its id after decoding, a record against its id as stored.
//! The entry hashes exist for whoever has no key: an encrypted chunk's id
//! is a keyed hash of its plaintext, so without them the index's host (a
//! server, a copy's host) could not tell an intact sealed chunk in the
//! bucket from an altered one. Through the pack name, which the index
//! holds, each entry's hash is bound to what was uploaded.
//!
//! Version 1 packs (`IMGPACK1`, written by the first format-4 builds) have
//! 41-byte trailer entries without the hash; they stay readable, and are
//! rewritten with hashes by a repack.

use crate::codec::{Reader, Writer};
use crate::{FormatError, Id, ObjectKind};

/// Last 8 bytes of every pack this build writes (version 2).
pub const PACK_MAGIC: &[u8; 8] = b"IMGPACK2";
/// Last 8 bytes of a version-1 pack (read, never written).
pub const PACK_MAGIC_V1: &[u8; 8] = b"IMGPACK1";
/// The fixed footer: entry count (u32 LE), trailer length (u32 LE), magic.
pub const FOOTER_LEN: usize = 16;
/// Bytes per trailer entry: kind (1), id (32), stored length (u32), raw
/// length (u32), BLAKE3 of the stored bytes (32).
pub const TRAILER_ENTRY_LEN: usize = 73;
/// Bytes per trailer entry of a version-1 pack (no hash).
pub const TRAILER_ENTRY_LEN_V1: usize = 41;
/// Bytes per trailer entry in a pack of `version`.
fn entry_len(version: u8) -> usize {
    if version >= 2 {
        TRAILER_ENTRY_LEN
    } else {
        TRAILER_ENTRY_LEN_V1
    }
}

/// Most entries a pack may name (a 64 MiB pack of 4 KiB chunks has 16,384);
/// a trailer claiming more is refused before anything is allocated.
pub const MAX_PACK_ENTRIES: u32 = 1 << 20;
/// Largest pack object accepted (the writer's target is far below).
pub const MAX_PACK_BYTES: u64 = 1 << 30;

/// Object name of the repository config in the bucket.
pub const CONFIG_OBJECT: &str = "config";
/// Object name of the bucket's owner record ([`Owner`]).
pub const OWNER_OBJECT: &str = "owner";
/// Folder of pack objects.
pub const PACKS_DIR: &str = "packs/";
/// Folder of snapshot objects.
pub const SNAPSHOTS_DIR: &str = "snapshots/";

/// A pack's name: the BLAKE3 of its trailer.
pub type PackName = Id;

/// Path of a pack object under the prefix.
pub fn pack_path(name: &PackName) -> String {
    let hex = name.to_hex();
    format!("{PACKS_DIR}{}/{hex}", &hex[..2])
}

/// The pack name in a pack object's path (`packs/aa/<hex>`), if it is one.
pub fn parse_pack_path(path: &str) -> Option<PackName> {
    let rest = path.strip_prefix(PACKS_DIR)?;
    let (dir, hex) = rest.split_once('/')?;
    let id = Id::from_hex(hex).ok()?;
    (dir.len() == 2 && hex.starts_with(dir)).then_some(id)
}

/// Path of a snapshot object.
pub fn snapshot_path(id: &Id) -> String {
    format!("{SNAPSHOTS_DIR}{}", id.to_hex())
}

/// The snapshot id in a snapshot object's path, if it is one.
pub fn parse_snapshot_path(path: &str) -> Option<Id> {
    Id::from_hex(path.strip_prefix(SNAPSHOTS_DIR)?).ok()
}

/// One entry of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: ObjectKind,
    pub id: Id,
    /// Stored bytes in the pack.
    pub len: u32,
    /// For a chunk, its raw length; for a record, its stored length again.
    pub raw_len: u32,
    /// BLAKE3 of the stored bytes; `None` in a version-1 pack.
    pub hash: Option<Id>,
}

/// A pack's footer, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Length of the trailer, before the footer.
    pub trailer_len: u32,
    /// 1 (`IMGPACK1`, no entry hashes) or 2.
    pub version: u8,
}

/// A pack's trailer, decoded: entries in order, with their offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub entries: Vec<PackEntry>,
}

impl Trailer {
    /// Offset of each entry (entries are back to back from 0).
    pub fn offsets(&self) -> Vec<u64> {
        let mut at = 0u64;
        self.entries
            .iter()
            .map(|e| {
                let o = at;
                at += e.len as u64;
                o
            })
            .collect()
    }

    /// Bytes of all entries (where the trailer starts).
    pub fn data_len(&self) -> u64 {
        self.entries.iter().map(|e| e.len as u64).sum()
    }

    /// The trailer's bytes followed by the footer; the pack name is the
    /// BLAKE3 of the trailer part. Version 2 when every entry has its hash
    /// (as the writer always gives them), else version 1.
    pub fn encode(&self) -> (Vec<u8>, PackName) {
        let v2 = self.entries.iter().all(|e| e.hash.is_some());
        let per = entry_len(if v2 { 2 } else { 1 });
        let mut w = Writer(Vec::with_capacity(self.entries.len() * per + FOOTER_LEN));
        for e in &self.entries {
            w.u8(e.kind as u8);
            w.bytes(e.id.as_bytes());
            w.u32(e.len);
            w.u32(e.raw_len);
            if let (true, Some(h)) = (v2, e.hash) {
                w.bytes(h.as_bytes());
            }
        }
        let name = Id::hash(&w.0);
        let tlen = w.0.len() as u32;
        w.u32(self.entries.len() as u32);
        w.u32(tlen);
        w.bytes(if v2 { PACK_MAGIC } else { PACK_MAGIC_V1 });
        (w.0, name)
    }
}

/// Reads a pack's footer (its last [`FOOTER_LEN`] bytes): the trailer's
/// length and the pack's version. `pack_len` is the object's size, checked
/// against it.
pub fn decode_footer(footer: &[u8], pack_len: u64) -> Result<Footer, FormatError> {
    let bad = |why: String| FormatError::Invalid {
        what: "pack footer",
        why,
    };
    if footer.len() != FOOTER_LEN {
        return Err(bad(format!("{} bytes, not {FOOTER_LEN}", footer.len())));
    }
    let version = match &footer[8..] {
        m if m == PACK_MAGIC => 2,
        m if m == PACK_MAGIC_V1 => 1,
        _ => return Err(bad("no pack magic".into())),
    };
    let per = entry_len(version);
    let count = u32::from_le_bytes(footer[..4].try_into().unwrap());
    let tlen = u32::from_le_bytes(footer[4..8].try_into().unwrap());
    if count > MAX_PACK_ENTRIES || tlen as u64 != count as u64 * per as u64 {
        return Err(bad(format!("{count} entries in a trailer of {tlen} bytes")));
    }
    if tlen as u64 + FOOTER_LEN as u64 > pack_len {
        return Err(bad(format!(
            "a trailer of {tlen} bytes in a pack of {pack_len}"
        )));
    }
    Ok(Footer {
        trailer_len: tlen,
        version,
    })
}

/// Decodes a trailer (without the footer) of a pack of `version`, checks it
/// hashes to `name` and that its entries fill the pack exactly (`pack_len`
/// bytes in all).
pub fn decode_trailer(
    bytes: &[u8],
    version: u8,
    name: &PackName,
    pack_len: u64,
) -> Result<Trailer, FormatError> {
    if Id::hash(bytes) != *name {
        return Err(FormatError::Invalid {
            what: "pack trailer",
            why: format!("does not hash to the pack name {name}"),
        });
    }
    let mut r = Reader::new(bytes, "pack trailer");
    let mut entries = Vec::with_capacity(bytes.len() / entry_len(version));
    while r.remaining() > 0 {
        let tag = r.u8()?;
        let kind = match tag {
            b'C' => ObjectKind::Chunk,
            b'R' => ObjectKind::Region,
            b'P' => ObjectKind::Page,
            tag => {
                return Err(FormatError::BadTag {
                    what: "pack entry kind",
                    tag,
                })
            }
        };
        let id = r.id()?;
        let len = r.u32()?;
        let raw_len = r.u32()?;
        let hash = if version >= 2 { Some(r.id()?) } else { None };
        entries.push(PackEntry {
            kind,
            id,
            len,
            raw_len,
            hash,
        });
    }
    r.finish()?;
    let t = Trailer { entries };
    let want = t.data_len() + bytes.len() as u64 + FOOTER_LEN as u64;
    if want != pack_len {
        return Err(FormatError::Invalid {
            what: "pack trailer",
            why: format!("its entries and trailer make {want} bytes, the pack has {pack_len}"),
        });
    }
    Ok(t)
}

/// Where an object lives: a pack, an offset and a length. The value of a
/// chunk's entry in the `chunks` column family, and of a record's
/// `loc:` entry in `meta`, in a bucket-backed repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub pack: PackName,
    pub offset: u64,
    pub len: u32,
}

/// Encoded length of a [`Location`].
pub const LOCATION_LEN: usize = 44;

impl Location {
    pub fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut b = [0u8; LOCATION_LEN];
        b[..32].copy_from_slice(self.pack.as_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Location, FormatError> {
        let mut r = Reader::new(b, "pack location");
        let l = Location {
            pack: r.id()?,
            offset: r.u64()?,
            len: r.u32()?,
        };
        r.finish()?;
        Ok(l)
    }
}

/// Prefix of `meta` keys holding a region recipe's or index page's place in
/// the bucket: `loc:` + object key (33 bytes) → [`Location`].
pub const LOC_PREFIX: &[u8] = b"loc:";

/// The `loc:` key of a record.
pub fn loc_key(key: &[u8; 33]) -> Vec<u8> {
    let mut k = LOC_PREFIX.to_vec();
    k.extend_from_slice(key);
    k
}

/// Prefix of `meta` keys holding a pack's accounting: `pack:` + pack name
/// (32 bytes) → [`PackStat`].
pub const PACK_PREFIX: &[u8] = b"pack:";

/// The `pack:` key of a pack.
pub fn pack_key(name: &PackName) -> Vec<u8> {
    let mut k = PACK_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// What the local index knows of a pack in the bucket: its size, and how
/// many of its entries (and bytes) the index still points to. gc deletes a
/// pack whose live entries reach zero and repacks one whose live bytes fall
/// below its threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStat {
    /// The pack object's size.
    pub size: u64,
    pub live_entries: u32,
    pub live_bytes: u64,
}

impl PackStat {
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.live_entries.to_le_bytes());
        b[12..].copy_from_slice(&self.live_bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<PackStat, FormatError> {
        let mut r = Reader::new(b, "pack stat");
        let s = PackStat {
            size: r.u64()?,
            live_entries: r.u32()?,
            live_bytes: r.u64()?,
        };
        r.finish()?;
        Ok(s)
    }
}

/// Key in `meta` holding this index's id (16 bytes): the bucket's
/// [`Owner`] must name it for this directory to write.
pub const META_INDEX_KEY: &[u8] = b"bucket-index";

/// Which local index writes a bucket (`owner` object, JSON). `init` and
/// `recover` write it; a writer whose index is not the owner refuses, so
/// a stale directory (the machine that was replaced by a `recover`) can
/// never delete what the new index wrote.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The owning index's id, 32 hex digits.
    pub index: String,
    /// The host that created it, for messages.
    pub host: String,
    /// When it took the bucket, seconds since the Unix epoch.
    pub since: i64,
}

impl Owner {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("owner serializes")
    }

    pub fn decode(b: &[u8]) -> Result<Owner, FormatError> {
        let o: Owner = serde_json::from_slice(b).map_err(|e| FormatError::Invalid {
            what: "bucket owner",
            why: e.to_string(),
        })?;
        if o.index.len() != 32 || !o.index.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(FormatError::Invalid {
                what: "bucket owner",
                why: format!("index id {:?}", o.index),
            });
        }
        Ok(o)
    }
}

/// First bytes of a snapshot object.
pub const SNAPSHOT_OBJECT_MAGIC: &[u8; 8] = b"IMGSNAP1";

/// A snapshot object in the bucket: the stored snapshot record with what
/// the local index keeps beside it (protection and parent), so a rebuild
/// from the bucket restores both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotObject {
    pub protected: bool,
    pub parent: Option<Id>,
    /// The packs its commit uploaded at the same time as this object (at
    /// most [`MAX_COMMIT_PACKS`]): while any of them is missing from the
    /// bucket, the object may be that of a commit that never finished, and
    /// a rebuild takes it only if everything it names is there. Empty once
    /// the object is rewritten (protection, gc): it was committed.
    pub commit_packs: Vec<PackName>,
    /// The stored snapshot record (its BLAKE3 is the snapshot id).
    pub record: Vec<u8>,
}

/// Most packs a snapshot object names as its commit's (a commit uploads
/// its open pack with its new pages: one pack, more only for pages past
/// the pack size).
pub const MAX_COMMIT_PACKS: usize = 255;

impl SnapshotObject {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(self.record.len() + 48));
        w.bytes(SNAPSHOT_OBJECT_MAGIC);
        let packs = !self.commit_packs.is_empty();
        w.u8(self.protected as u8 | (self.parent.is_some() as u8) << 1 | (packs as u8) << 2);
        if let Some(p) = &self.parent {
            w.bytes(p.as_bytes());
        }
        if packs {
            debug_assert!(self.commit_packs.len() <= MAX_COMMIT_PACKS);
            w.u8(self.commit_packs.len().min(MAX_COMMIT_PACKS) as u8);
            for n in self.commit_packs.iter().take(MAX_COMMIT_PACKS) {
                w.bytes(n.as_bytes());
            }
        }
        w.bytes(&self.record);
        w.0
    }

    /// Decodes and checks the record against the object's name `id`.
    pub fn decode(b: &[u8], id: &Id) -> Result<SnapshotObject, FormatError> {
        let mut r = Reader::new(b, "snapshot object");
        if r.take(8)? != SNAPSHOT_OBJECT_MAGIC {
            return Err(FormatError::Invalid {
                what: "snapshot object",
                why: "no snapshot object magic".into(),
            });
        }
        let flags = r.u8()?;
        if flags & !7 != 0 {
            return Err(FormatError::BadTag {
                what: "snapshot object flags",
                tag: flags,
            });
        }
        let parent = if flags & 2 != 0 { Some(r.id()?) } else { None };
        let mut commit_packs = Vec::new();
        if flags & 4 != 0 {
            let n = r.u8()?;
            if n == 0 {
                return Err(FormatError::Invalid {
                    what: "snapshot object",
                    why: "it says it names its commit's packs and names none".into(),
                });
            }
            for _ in 0..n {
                commit_packs.push(r.id()?);
            }
        }
        let record = r.take(r.remaining())?.to_vec();
        if Id::hash(&record) != *id {
            return Err(FormatError::Invalid {
                what: "snapshot object",
                why: format!("its record does not hash to {id}"),
            });
        }
        Ok(SnapshotObject {
            protected: flags & 1 != 0,
            parent,
            commit_packs,
            record,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Trailer {
        Trailer {
            entries: vec![
                PackEntry {
                    kind: ObjectKind::Chunk,
                    id: Id::hash(b"a"),
                    len: 10,
                    raw_len: 4096,
                    hash: Some(Id::hash(b"0123456789")),
                },
                PackEntry {
                    kind: ObjectKind::Region,
                    id: Id::hash(b"r"),
                    len: 7,
                    raw_len: 7,
                    hash: Some(Id::hash(b"recipe!")),
                },
            ],
        }
    }

    #[test]
    fn trailer_round_trips_and_is_pinned() {
        let t = sample();
        let (bytes, name) = t.encode();
        let pack_len = t.data_len() + bytes.len() as u64;
        let f = decode_footer(&bytes[bytes.len() - FOOTER_LEN..], pack_len).unwrap();
        assert_eq!(f.version, 2);
        let tlen = f.trailer_len;
        assert_eq!(tlen as usize, 2 * TRAILER_ENTRY_LEN);
        let back = decode_trailer(&bytes[..tlen as usize], 2, &name, pack_len).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.offsets(), vec![0, 10]);
        // Golden: the layout of a trailer must never change silently.
        assert_eq!(
            name.to_hex(),
            blake3::hash(&bytes[..tlen as usize]).to_hex().as_str()
        );
        assert_eq!(&bytes[..1], b"C");
        assert_eq!(&bytes[33..41], &[10, 0, 0, 0, 0, 16, 0, 0]);
        assert_eq!(&bytes[41..73], Id::hash(b"0123456789").as_bytes());
        assert_eq!(&bytes[73..74], b"R");
        assert_eq!(
            &bytes[bytes.len() - 16..bytes.len() - 8],
            &[2, 0, 0, 0, 146, 0, 0, 0]
        );
        assert_eq!(&bytes[bytes.len() - 8..], b"IMGPACK2");
        assert_eq!(
            name.to_hex().as_str(),
            "597e9b7f41adc334ee46e92cad75a4e8467291d541918461700495ed7ce3b8e4"
        );
    }

    #[test]
    fn version_1_packs_still_decode() {
        let mut t = sample();
        for e in &mut t.entries {
            e.hash = None;
        }
        let (bytes, name) = t.encode();
        let pack_len = t.data_len() + bytes.len() as u64;
        assert_eq!(&bytes[bytes.len() - 8..], b"IMGPACK1");
        let f = decode_footer(&bytes[bytes.len() - FOOTER_LEN..], pack_len).unwrap();
        assert_eq!(
            (f.version, f.trailer_len as usize),
            (1, 2 * TRAILER_ENTRY_LEN_V1)
        );
        let tb = &bytes[..f.trailer_len as usize];
        assert_eq!(decode_trailer(tb, 1, &name, pack_len).unwrap(), t);
        // The same bytes read as version 2 do not parse.
        assert!(decode_trailer(tb, 2, &name, pack_len).is_err());
    }

    #[test]
    fn a_trailer_that_does_not_fill_the_pack_or_hash_is_refused() {
        let t = sample();
        let (bytes, name) = t.encode();
        let tl = bytes.len() - FOOTER_LEN;
        let pack_len = t.data_len() + bytes.len() as u64;
        assert!(decode_trailer(&bytes[..tl], 2, &name, pack_len + 1).is_err());
        assert!(decode_trailer(&bytes[..tl], 2, &Id::hash(b"x"), pack_len).is_err());
        assert!(decode_footer(&bytes[tl..], 20).is_err());
        let mut f = bytes[tl..].to_vec();
        f[0] = 0xff;
        assert!(decode_footer(&f, pack_len).is_err());
    }

    #[test]
    fn paths_parse_back() {
        let id = Id::hash(b"p");
        assert_eq!(parse_pack_path(&pack_path(&id)), Some(id));
        assert_eq!(parse_snapshot_path(&snapshot_path(&id)), Some(id));
        assert_eq!(parse_pack_path("packs/zz/abc"), None);
        let loc = Location {
            pack: id,
            offset: 5,
            len: 9,
        };
        assert_eq!(Location::decode(&loc.encode()).unwrap(), loc);
        let st = PackStat {
            size: 1,
            live_entries: 2,
            live_bytes: 3,
        };
        assert_eq!(PackStat::decode(&st.encode()).unwrap(), st);
    }

    #[test]
    fn snapshot_objects_round_trip_and_check_their_record() {
        let rec = b"record".to_vec();
        let id = Id::hash(&rec);
        let packs = vec![Id::hash(b"pack a"), Id::hash(b"pack b")];
        for (protected, parent, commit_packs) in [
            (false, None, vec![]),
            (true, Some(Id::hash(b"p")), vec![]),
            (false, Some(Id::hash(b"p")), packs.clone()),
            (false, None, packs[..1].to_vec()),
        ] {
            let o = SnapshotObject {
                protected,
                parent,
                commit_packs,
                record: rec.clone(),
            };
            let b = o.encode();
            assert_eq!(SnapshotObject::decode(&b, &id).unwrap(), o);
            assert!(SnapshotObject::decode(&b, &Id::hash(b"z")).is_err());
            // Every truncation before the record is refused.
            for cut in 0..b.len() - rec.len() {
                assert!(SnapshotObject::decode(&b[..cut], &id).is_err(), "{cut}");
            }
        }
        // Golden: the layout must never change silently.
        let o = SnapshotObject {
            protected: true,
            parent: Some(Id::from_slice(&[1; 32]).unwrap()),
            commit_packs: vec![Id::from_slice(&[2; 32]).unwrap()],
            record: b"rec".to_vec(),
        };
        let mut want = b"IMGSNAP1".to_vec();
        want.push(0b111);
        want.extend([1u8; 32]);
        want.push(1);
        want.extend([2u8; 32]);
        want.extend(b"rec");
        assert_eq!(o.encode(), want);
        // An object that says it names packs and names none is refused.
        let mut none = b"IMGSNAP1".to_vec();
        none.extend([4u8, 0]);
        none.extend(b"rec");
        assert!(SnapshotObject::decode(&none, &Id::hash(b"rec")).is_err());
        // Unknown flags are refused.
        let mut unknown = b"IMGSNAP1".to_vec();
        unknown.push(8);
        unknown.extend(b"rec");
        assert!(SnapshotObject::decode(&unknown, &Id::hash(b"rec")).is_err());
    }

    #[test]
    fn owners_round_trip_and_are_checked() {
        let o = Owner {
            index: "0123456789abcdef0123456789abcdef".into(),
            host: "vm".into(),
            since: 5,
        };
        assert_eq!(Owner::decode(&o.encode()).unwrap(), o);
        assert!(Owner::decode(br#"{"index":"xyz","host":"h","since":1}"#).is_err());
        assert!(Owner::decode(b"not json").is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400), len in 0u64..10_000) {
            let _ = decode_footer(&b, len);
            let _ = decode_trailer(&b, 1, &Id::hash(&b), len);
            let _ = decode_trailer(&b, 2, &Id::hash(&b), len);
            let _ = Location::decode(&b);
            let _ = PackStat::decode(&b);
            let _ = SnapshotObject::decode(&b, &Id::hash(&b));
            let _ = Owner::decode(&b);
        }
    }
}
