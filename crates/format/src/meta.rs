//! Keys and values of the `meta` column family besides the format marker:
//! protection marks and damage marks. Encoded and checked here only.
//!
//! ```text
//! protect:<snapshot id, 32 bytes>      value: empty
//! damaged:<kind byte><object id, 32>   value: UTF-8 description of the damage
//! parent:<snapshot id, 32>             value: the parent snapshot's id (32 bytes)
//! ```
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
