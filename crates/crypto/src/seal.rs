//! Sealed chunk frames and records: the stored bytes of an encrypted
//! repository (`docs/FORMAT.md`, "Encrypted objects").
//!
//! ```text
//! sealed chunk:  u8 0xE1 | nonce (24, random) | XChaCha20-Poly1305(frame) (len + 16)
//!                associated data: b"C" | chunk id (32)
//! sealed record: u8 0xE2 | u8 kind (R, P, S) | u32 LE n | n × child id (32, sorted)
//!                | nonce (24) | XChaCha20-Poly1305(record encoding) (len + 16)
//!                nonce = first 24 bytes of BLAKE3-keyed(record-nonce key, kind | encoding)
//!                associated data: every byte before the nonce
//! ```

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::XNonce;
use imgstore_format::Id;

use crate::{CryptoError, Keys};

/// First byte of a sealed chunk frame (a plain frame starts with its codec
/// byte, 0 or 1).
pub const SEALED_CHUNK_MAGIC: u8 = 0xE1;
/// First byte of a sealed record (plain records start with version 1).
pub const SEALED_RECORD_MAGIC: u8 = 0xE2;

const NONCE: usize = 24;
const TAG: usize = 16;

/// What a sealed record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Region,
    Page,
    Snapshot,
}

impl RecordKind {
    fn byte(self) -> u8 {
        match self {
            RecordKind::Region => b'R',
            RecordKind::Page => b'P',
            RecordKind::Snapshot => b'S',
        }
    }
    fn name(self) -> &'static str {
        match self {
            RecordKind::Region => "sealed region recipe",
            RecordKind::Page => "sealed index page",
            RecordKind::Snapshot => "sealed snapshot record",
        }
    }
}

fn chunk_ad(id: &Id) -> [u8; 33] {
    let mut ad = [0u8; 33];
    ad[0] = b'C';
    ad[1..].copy_from_slice(id.as_bytes());
    ad
}

impl Keys {
    /// Seals a chunk frame under a random nonce.
    pub fn seal_chunk(&self, id: &Id, frame: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Ok(self.seal_chunk_with(id, frame, &crate::random()?))
    }

    pub(crate) fn seal_chunk_with(&self, id: &Id, frame: &[u8], nonce: &[u8; NONCE]) -> Vec<u8> {
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: frame,
                    aad: &chunk_ad(id),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length");
        let mut out = Vec::with_capacity(1 + NONCE + ct.len());
        out.push(SEALED_CHUNK_MAGIC);
        out.extend_from_slice(nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a sealed chunk frame stored as chunk `id`.
    pub fn open_chunk(&self, id: &Id, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let what = "sealed chunk";
        if sealed.len() < 1 + NONCE + TAG || sealed[0] != SEALED_CHUNK_MAGIC {
            return Err(CryptoError::Malformed {
                what,
                why: format!("{} bytes, not a sealed chunk", sealed.len()),
            });
        }
        self.cipher
            .decrypt(
                XNonce::from_slice(&sealed[1..1 + NONCE]),
                Payload {
                    msg: &sealed[1 + NONCE..],
                    aad: &chunk_ad(id),
                },
            )
            .map_err(|_| CryptoError::Forged { what })
    }

    /// Seals a record's encoding with the ids it names (deterministic: the
    /// same record always gives the same bytes).
    pub fn seal_record(&self, kind: RecordKind, encoding: &[u8], children: &[Id]) -> Vec<u8> {
        let mut sorted = children.to_vec();
        sorted.sort();
        let mut out = Vec::with_capacity(6 + sorted.len() * 32 + NONCE + encoding.len() + TAG);
        out.push(SEALED_RECORD_MAGIC);
        out.push(kind.byte());
        out.extend_from_slice(&(sorted.len() as u32).to_le_bytes());
        for c in &sorted {
            out.extend_from_slice(c.as_bytes());
        }
        let mut h = blake3::Hasher::new_keyed(&self.record_nonce);
        h.update(&[kind.byte()]);
        h.update(encoding);
        let nonce: [u8; NONCE] = h.finalize().as_bytes()[..NONCE].try_into().expect("24");
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: encoding,
                    aad: &out,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a sealed record of `kind`; returns its encoding.
    pub fn open_record(&self, kind: RecordKind, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (header_len, _) = parse(kind, sealed)?;
        let nonce = &sealed[header_len..header_len + NONCE];
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: &sealed[header_len + NONCE..],
                    aad: &sealed[..header_len],
                },
            )
            .map_err(|_| CryptoError::Forged { what: kind.name() })
    }
}

/// Header length and child count of a sealed record of `kind`.
fn parse(kind: RecordKind, sealed: &[u8]) -> Result<(usize, usize), CryptoError> {
    let bad = |why: String| CryptoError::Malformed {
        what: kind.name(),
        why,
    };
    if sealed.len() < 6 || sealed[0] != SEALED_RECORD_MAGIC {
        return Err(bad("no sealed-record header".into()));
    }
    if sealed[1] != kind.byte() {
        return Err(bad(format!("it holds kind {:?}", sealed[1] as char)));
    }
    let n = u32::from_le_bytes(sealed[2..6].try_into().expect("4")) as usize;
    let header = n
        .checked_mul(32)
        .and_then(|b| b.checked_add(6))
        .filter(|h| h + NONCE + TAG <= sealed.len())
        .ok_or_else(|| bad(format!("{n} children do not fit in {} bytes", sealed.len())))?;
    Ok((header, n))
}

/// The ids a sealed record names, readable without the key (for
/// reference counting and garbage collection by a store that has none).
pub fn record_children(kind: RecordKind, sealed: &[u8]) -> Result<Vec<Id>, CryptoError> {
    let (_, n) = parse(kind, sealed)?;
    Ok((0..n)
        .map(|i| Id(sealed[6 + i * 32..6 + (i + 1) * 32].try_into().expect("32")))
        .collect())
}
