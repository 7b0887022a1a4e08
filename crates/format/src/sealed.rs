//! The layout of sealed (encrypted) objects, and the children of any stored
//! record — what a store needs to count references without a key.
//!
//! ```text
//! sealed chunk:  u8 0xE1 | nonce (24) | ciphertext and tag (frame length + 16)
//! sealed record: u8 0xE2 | u8 kind (b'R', b'P', b'S') | u32 LE n | n × child id (32, sorted)
//!                | nonce (24) | ciphertext and tag (encoding length + 16)
//! ```
//!
//! A plain chunk frame starts with its codec byte (0 or 1) and a plain
//! record with its version (1), so the first byte tells them apart. The
//! cryptography is `imgstore-crypto`'s; only the layout lives here.

use crate::{FormatError, Id, Page, Region, Snapshot};

/// First byte of a sealed chunk frame.
pub const SEALED_CHUNK_MAGIC: u8 = 0xE1;
/// First byte of a sealed record.
pub const SEALED_RECORD_MAGIC: u8 = 0xE2;
/// Nonce length (XChaCha20-Poly1305).
pub const SEAL_NONCE: usize = 24;
/// Authentication tag length.
pub const SEAL_TAG: usize = 16;

/// Bytes of a namespace tag: the first bytes of every chunk id a backup in
/// a server namespace of an encrypted repository writes.
pub const NAMESPACE_TAG_LEN: usize = 8;

/// Context of the tag derivation: fixed forever (golden vector).
const CTX_NAMESPACE_TAG: &str = "imgstore 2026-12 namespace chunk-id tag";

/// The tag of server namespace `ns`.
///
/// A server cannot check a sealed chunk against its keyed id, so in an
/// encrypted repository it could not stop a key holder in one namespace
/// from storing bytes under ids another namespace will use. Instead, a
/// backup in namespace `ns` writes chunk ids whose first bytes are this
/// tag (the rest is the keyed BLAKE3 of the content), and the server
/// refuses, from a namespace's session, any chunk id without the
/// namespace's tag: no namespace can write where another's ids point. The
/// cost is deduplication across namespaces of an encrypted repository.
pub fn namespace_tag(ns: &str) -> [u8; NAMESPACE_TAG_LEN] {
    let h = blake3::derive_key(CTX_NAMESPACE_TAG, ns.as_bytes());
    h[..NAMESPACE_TAG_LEN].try_into().expect("8 bytes")
}

/// Whether chunk id `id` carries namespace `ns`'s tag.
pub fn has_namespace_tag(id: &Id, ns: &str) -> bool {
    id.as_bytes()[..NAMESPACE_TAG_LEN] == namespace_tag(ns)
}

/// The kinds of stored records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Region,
    Page,
    Snapshot,
}

impl RecordKind {
    pub fn byte(self) -> u8 {
        match self {
            RecordKind::Region => b'R',
            RecordKind::Page => b'P',
            RecordKind::Snapshot => b'S',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Region => "region recipe",
            RecordKind::Page => "index page",
            RecordKind::Snapshot => "snapshot record",
        }
    }
}

/// Whether stored chunk bytes have a sealed chunk's shape: the magic byte,
/// a nonce and at least a tag (whether they open needs the key).
pub fn is_sealed_chunk(bytes: &[u8]) -> bool {
    bytes.len() >= 1 + SEAL_NONCE + SEAL_TAG && bytes[0] == SEALED_CHUNK_MAGIC
}

/// Whether stored record bytes are sealed.
pub fn is_sealed_record(bytes: &[u8]) -> bool {
    bytes.first() == Some(&SEALED_RECORD_MAGIC)
}

/// Header length (everything before the nonce) and child count of a sealed
/// record of `kind`.
pub fn sealed_header(kind: RecordKind, bytes: &[u8]) -> Result<(usize, usize), FormatError> {
    let bad = |why: String| FormatError::Invalid {
        what: "sealed record",
        why,
    };
    if bytes.len() < 6 || bytes[0] != SEALED_RECORD_MAGIC {
        return Err(bad("no sealed-record header".into()));
    }
    if bytes[1] != kind.byte() {
        return Err(bad(format!(
            "it holds kind {:?}, not a {}",
            bytes[1] as char,
            kind.name()
        )));
    }
    let n = u32::from_le_bytes(bytes[2..6].try_into().expect("4 bytes")) as usize;
    let header = n
        .checked_mul(32)
        .and_then(|b| b.checked_add(6))
        .filter(|h| h + SEAL_NONCE + SEAL_TAG <= bytes.len())
        .ok_or_else(|| bad(format!("{n} children do not fit in {} bytes", bytes.len())))?;
    Ok((header, n))
}

/// The ids a stored record names, with multiplicity: a region's chunks, a
/// page's stored regions, a snapshot's pages. Plain records are decoded;
/// sealed ones carry the list in the clear, so a store without the key
/// can keep reference counts.
pub fn record_children(kind: RecordKind, bytes: &[u8]) -> Result<Vec<Id>, FormatError> {
    if is_sealed_record(bytes) {
        let (_, n) = sealed_header(kind, bytes)?;
        return Ok((0..n)
            .map(|i| {
                Id(bytes[6 + i * 32..6 + (i + 1) * 32]
                    .try_into()
                    .expect("32 bytes"))
            })
            .collect());
    }
    Ok(match kind {
        RecordKind::Region => Region::decode(bytes)?
            .entries
            .into_iter()
            .filter_map(|e| e.chunk)
            .collect(),
        RecordKind::Page => Page::decode(bytes)?
            .regions
            .into_iter()
            .filter(|r| *r != Id::ZERO)
            .collect(),
        RecordKind::Snapshot => Snapshot::decode(bytes)?.pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_tags_are_frozen() {
        // Golden: changing the derivation would make every tagged id of an
        // existing repository unwritable by its namespace.
        assert_eq!(
            namespace_tag("web").map(|b| format!("{b:02x}")).concat(),
            GOLDEN_WEB_TAG
        );
        assert_ne!(namespace_tag("web"), namespace_tag("db"));
        let mut id = Id([9; 32]);
        assert!(!has_namespace_tag(&id, "web"));
        id.0[..8].copy_from_slice(&namespace_tag("web"));
        assert!(has_namespace_tag(&id, "web") && !has_namespace_tag(&id, "db"));
    }

    const GOLDEN_WEB_TAG: &str = "9be6fbfdc469c96e";

    #[test]
    fn children_of_plain_and_sealed_records() {
        let a = Id([1; 32]);
        let region = Region {
            entries: vec![
                crate::RecipeEntry {
                    len: 5,
                    chunk: Some(a),
                },
                crate::RecipeEntry {
                    len: 5,
                    chunk: None,
                },
                crate::RecipeEntry {
                    len: 5,
                    chunk: Some(a),
                },
            ],
        };
        assert_eq!(
            record_children(RecordKind::Region, &region.encode()).unwrap(),
            vec![a, a]
        );
        let mut sealed = vec![SEALED_RECORD_MAGIC, b'P', 1, 0, 0, 0];
        sealed.extend_from_slice(&[7; 32]);
        sealed.extend_from_slice(&[0; SEAL_NONCE + SEAL_TAG]);
        assert_eq!(
            record_children(RecordKind::Page, &sealed).unwrap(),
            vec![Id([7; 32])]
        );
        assert!(
            record_children(RecordKind::Region, &sealed).is_err(),
            "kind checked"
        );
        sealed[2] = 200;
        assert!(
            record_children(RecordKind::Page, &sealed).is_err(),
            "count bounded"
        );
    }
}
