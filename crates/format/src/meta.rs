//! Keys and values of the `meta` column family besides the format marker:
//! protection marks and damage marks. Encoded and checked here only.
//!
//! ```text
//! protect:<snapshot id, 32 bytes>      value: empty
//! damaged:<kind byte><object id, 32>   value: UTF-8 description of the damage
//! parent:<snapshot id, 32>             value: the parent snapshot's id (32 bytes)
//! zerocv:<region size, u32 LE><region index, u64 BE>
//!                                      value: the BLAKE3 chaining value (32 bytes)
//!                                      of an all-zero region of that size at that index
//! ns:<name length, u8><namespace name><kind byte><object id, 32>
//!                                      value: empty; the object was written or
//!                                      committed under that server namespace
//! attest:<snapshot id, 32>             value: u8 version (1) | i64 LE commit time (ns
//!                                      since the epoch, the server's clock) | u8 n |
//!                                      n bytes: the image name of the backup session
//!                                      that committed the snapshot
//! ```
//!
//! `attest:` entries are written by `imgstore server` at each commit (added
//! within format 2, ignored by builds that do not know them): the server's
//! own witness of who committed a snapshot and when. A sealed snapshot
//! record hides its image name and time from the server, so a key holder
//! could otherwise commit a record naming another namespace's image, or
//! dated years ahead to outlive the real snapshots under retention; clients
//! compare what they open against this witness (docs/SECURITY.md).
//!
//! `ns:` entries are written only by `imgstore server` (issue #14): they let
//! it answer "is this chunk stored?" and "give me this object" to a client
//! only for objects of the client's own namespaces, so a shared index is no
//! oracle for data a client does not have. A local repository has none.
//!
//! `zerocv:` entries are a cache of values that depend only on the region
//! size and index (BLAKE3 mixes each 1 KiB chunk's counter into its hash,
//! so an all-zero region costs as much to hash as data, and differs from
//! region to region): a first backup of a thin-provisioned image takes them
//! from here instead of hashing its holes. Losing them costs only time.
//!
//! `parent:` entries were added within format 2: a build that does not know
//! them ignores them (it iterates only the prefixes it knows), so format-2
//! repositories stay readable both ways.

use crate::{FormatError, Id, ObjectKind, META_DAMAGED_PREFIX, META_PROTECT_PREFIX};

/// Prefix of `meta` keys recording a snapshot's parent (the snapshot whose
/// regions its backup reused, or the base of a changed-block backup).
pub const PARENT_PREFIX: &[u8] = b"parent:";

/// The key recording the parent of snapshot `id`.
pub fn parent_key(id: &Id) -> Vec<u8> {
    let mut k = PARENT_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of `meta` keys holding the server's witness of a commit.
pub const ATTEST_PREFIX: &[u8] = b"attest:";

/// The key of snapshot `id`'s commit witness.
pub fn attest_key(id: &Id) -> Vec<u8> {
    let mut k = ATTEST_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// Encodes a commit witness: the image name of the committing session
/// (1–255 bytes) and the server's time of the commit.
pub fn encode_attestation(image: &str, committed_ns: i64) -> Vec<u8> {
    let name = &image.as_bytes()[..image.len().min(255)];
    let mut v = Vec::with_capacity(10 + name.len());
    v.push(1);
    v.extend_from_slice(&committed_ns.to_le_bytes());
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v
}

/// Decodes a commit witness: (image name, commit time in ns).
pub fn decode_attestation(v: &[u8]) -> Result<(String, i64), FormatError> {
    let bad = |why: &str| FormatError::Invalid {
        what: "commit witness",
        why: why.to_string(),
    };
    if v.len() < 10 || v[0] != 1 {
        return Err(bad("not a version-1 witness"));
    }
    let t = i64::from_le_bytes(v[1..9].try_into().expect("8 bytes"));
    let n = v[9] as usize;
    if v.len() != 10 + n {
        return Err(bad("its name length does not match"));
    }
    let name = std::str::from_utf8(&v[10..]).map_err(|_| bad("its name is not UTF-8"))?;
    Ok((name.to_string(), t))
}

/// Prefix of `meta` keys caching all-zero region chaining values.
pub const ZERO_CV_PREFIX: &[u8] = b"zerocv:";

/// The key prefix of all cached zero chaining values for `region_size`.
pub fn zero_cv_prefix(region_size: u32) -> Vec<u8> {
    let mut k = ZERO_CV_PREFIX.to_vec();
    k.extend_from_slice(&region_size.to_le_bytes());
    k
}

/// The key of the cached chaining value of all-zero region `index`
/// (indices big-endian, so a scan meets them in order).
pub fn zero_cv_key(region_size: u32, index: u64) -> Vec<u8> {
    let mut k = zero_cv_prefix(region_size);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// A cached zero chaining value's (region size, index, value); `None` for
/// a key of another kind.
pub fn parse_zero_cv(
    key: &[u8],
    value: &[u8],
) -> Result<Option<(u32, u64, [u8; 32])>, FormatError> {
    let Some(rest) = key.strip_prefix(ZERO_CV_PREFIX) else {
        return Ok(None);
    };
    if rest.len() != 12 {
        return Err(FormatError::BadKey { len: rest.len() });
    }
    let size = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
    let index = u64::from_be_bytes(rest[4..].try_into().expect("8 bytes"));
    let cv: [u8; 32] = value.try_into().map_err(|_| FormatError::Invalid {
        what: "zero chaining value",
        why: format!("value of {} bytes, expected 32", value.len()),
    })?;
    Ok(Some((size, index, cv)))
}

/// A parent entry's (snapshot, parent); `None` for a key of another kind.
pub fn parse_parent(key: &[u8], value: &[u8]) -> Result<Option<(Id, Id)>, FormatError> {
    let Some(rest) = key.strip_prefix(PARENT_PREFIX) else {
        return Ok(None);
    };
    let id = Id::from_slice(rest).ok_or(FormatError::BadKey { len: rest.len() })?;
    let parent = Id::from_slice(value).ok_or(FormatError::Invalid {
        what: "parent entry",
        why: format!("value of {} bytes, expected 32", value.len()),
    })?;
    Ok(Some((id, parent)))
}

/// The key marking snapshot `id` protected.
pub fn protect_key(id: &Id) -> Vec<u8> {
    let mut k = META_PROTECT_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// The snapshot a protection key names; `None` for a key of another kind,
/// an error for a protection key of the wrong length.
pub fn parse_protect_key(key: &[u8]) -> Result<Option<Id>, FormatError> {
    let Some(rest) = key.strip_prefix(META_PROTECT_PREFIX) else {
        return Ok(None);
    };
    Id::from_slice(rest)
        .map(Some)
        .ok_or(FormatError::BadKey { len: rest.len() })
}

/// The key of a damage mark on object `kind`/`id`.
pub fn damaged_key(kind: ObjectKind, id: &Id) -> Vec<u8> {
    let mut k = META_DAMAGED_PREFIX.to_vec();
    k.extend_from_slice(&kind.key(id));
    k
}

/// A damage mark's object and description; `None` for a key of another
/// kind, an error for a malformed mark.
pub fn parse_damage_mark(
    key: &[u8],
    value: &[u8],
) -> Result<Option<(ObjectKind, Id, String)>, FormatError> {
    let Some(rest) = key.strip_prefix(META_DAMAGED_PREFIX) else {
        return Ok(None);
    };
    let (kind, id) = ObjectKind::parse_key(rest)?;
    let why = std::str::from_utf8(value).map_err(|_| FormatError::Invalid {
        what: "damage mark",
        why: "description is not UTF-8".into(),
    })?;
    Ok(Some((kind, id, why.to_string())))
}

/// Prefix of `meta` keys marking objects of a server namespace.
pub const NS_PREFIX: &[u8] = b"ns:";

/// Longest namespace name (it is length-prefixed by one byte).
pub const NS_NAME_MAX: usize = 64;

/// The key prefix of every object marked for namespace `name`.
pub fn ns_prefix(name: &str) -> Result<Vec<u8>, FormatError> {
    let len = name.len();
    if len == 0 || len > NS_NAME_MAX {
        return Err(FormatError::Invalid {
            what: "namespace name",
            why: format!("{len} bytes; it must have 1 to {NS_NAME_MAX}"),
        });
    }
    let mut k = NS_PREFIX.to_vec();
    k.push(len as u8);
    k.extend_from_slice(name.as_bytes());
    Ok(k)
}

/// The key marking object `key` (kind byte + id) as one of namespace `name`'s.
pub fn ns_key(name: &str, key: &[u8; 33]) -> Result<Vec<u8>, FormatError> {
    let mut k = ns_prefix(name)?;
    k.extend_from_slice(key);
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attestations_round_trip_and_reject_junk() {
        let v = encode_attestation("web-1", 1_700_000_000_123_456_789);
        assert_eq!(
            v,
            [
                &[1u8][..],
                &1_700_000_000_123_456_789i64.to_le_bytes(),
                &[5],
                b"web-1"
            ]
            .concat(),
            "layout is frozen"
        );
        assert_eq!(
            decode_attestation(&v).unwrap(),
            ("web-1".to_string(), 1_700_000_000_123_456_789)
        );
        assert!(decode_attestation(&v[..v.len() - 1]).is_err());
        assert!(decode_attestation(&[2; 12]).is_err());
        assert!(decode_attestation(&[]).is_err());
        assert_eq!(attest_key(&Id([3; 32]))[..7], *b"attest:");
    }

    #[test]
    fn keys_round_trip_and_are_pinned() {
        let id = Id([7; 32]);
        let k = protect_key(&id);
        assert_eq!(&k[..8], b"protect:");
        assert_eq!(k.len(), 40);
        assert_eq!(parse_protect_key(&k).unwrap(), Some(id));
        assert_eq!(parse_protect_key(b"format").unwrap(), None);
        assert!(parse_protect_key(b"protect:short").is_err());

        let k = damaged_key(ObjectKind::Region, &id);
        assert_eq!(&k[..9], b"damaged:R");
        assert_eq!(k.len(), 8 + 33);
        assert_eq!(
            parse_damage_mark(&k, b"bad").unwrap(),
            Some((ObjectKind::Region, id, "bad".into()))
        );
        assert!(parse_damage_mark(&k, &[0xff]).is_err());
        assert!(parse_damage_mark(b"damaged:Xshort", b"").is_err());

        let k = parent_key(&id);
        assert_eq!(&k[..7], b"parent:");
        assert_eq!(parse_parent(&k, &[8; 32]).unwrap(), Some((id, Id([8; 32]))));
        assert!(parse_parent(&k, &[8; 31]).is_err());
        assert_eq!(parse_parent(b"protect:x", b"").unwrap(), None);

        let k = zero_cv_key(8 << 20, 258);
        assert_eq!(&k[..7], b"zerocv:");
        assert_eq!(&k[7..11], &(8u32 << 20).to_le_bytes());
        assert_eq!(&k[11..], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert!(
            zero_cv_key(8 << 20, 2) < zero_cv_key(8 << 20, 256),
            "ordered"
        );
        assert_eq!(
            parse_zero_cv(&k, &[5; 32]).unwrap(),
            Some((8 << 20, 258, [5; 32]))
        );
        assert!(parse_zero_cv(&k, &[5; 31]).is_err());
        assert!(parse_zero_cv(b"zerocv:abc", &[5; 32]).is_err());

        let k = ns_key("web01", &ObjectKind::Chunk.key(&id)).unwrap();
        assert_eq!(&k[..9], b"ns:\x05web01");
        assert_eq!(k[9], b'C');
        assert_eq!(&k[10..], &[7; 32]);
        assert!(ns_prefix("").is_err());
        assert!(ns_prefix(&"x".repeat(65)).is_err());
    }
}
