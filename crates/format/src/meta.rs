//! Keys and values of the `meta` column family besides the format marker:
//! protection marks and damage marks. Encoded and checked here only.
//!
//! ```text
//! protect:<snapshot id, 32 bytes>      value: empty
//! damaged:<kind byte><object id, 32>   value: UTF-8 description of the damage
//! ```

use crate::{FormatError, Id, ObjectKind, META_DAMAGED_PREFIX, META_PROTECT_PREFIX};

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
    }
}
