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

use imgstore_format::Id;

use crate::{CryptoError, Keys};

use imgstore_format::sealed::is_sealed_chunk;
pub use imgstore_format::sealed::{
    RecordKind, SEALED_CHUNK_MAGIC, SEALED_RECORD_MAGIC, SEAL_NONCE as NONCE, SEAL_TAG as TAG,
};

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
        let mut out = Vec::with_capacity(1 + NONCE + frame.len() + TAG);
        out.push(SEALED_CHUNK_MAGIC);
        out.extend_from_slice(nonce);
        self.cipher.seal_into(nonce, &chunk_ad(id), frame, &mut out);
        out
    }

    /// Opens a sealed chunk frame stored as chunk `id`.
    pub fn open_chunk(&self, id: &Id, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let what = "sealed chunk";
        if !is_sealed_chunk(sealed) {
            return Err(CryptoError::Malformed {
                what,
                why: format!("{} bytes, not a sealed chunk", sealed.len()),
            });
        }
        let nonce = sealed[1..1 + NONCE].try_into().expect("24 bytes");
        self.cipher
            .open(nonce, &chunk_ad(id), &sealed[1 + NONCE..])
            .map_err(|_| CryptoError::Forged { what })
    }

    /// Opens a sealed chunk frame stored as chunk `id` where it lies, with
    /// no copy: returns the range of `sealed` that now holds the frame.
    /// On failure `sealed` is left altered.
    pub fn open_chunk_in_place(
        &self,
        id: &Id,
        sealed: &mut [u8],
    ) -> Result<std::ops::Range<usize>, CryptoError> {
        let what = "sealed chunk";
        if !is_sealed_chunk(sealed) {
            return Err(CryptoError::Malformed {
                what,
                why: format!("{} bytes, not a sealed chunk", sealed.len()),
            });
        }
        let (head, body) = sealed.split_at_mut(1 + NONCE);
        let nonce: &[u8; NONCE] = head[1..].try_into().expect("24 bytes");
        let n = self
            .cipher
            .open_in_place(nonce, &chunk_ad(id), body)
            .map_err(|_| CryptoError::Forged { what })?;
        Ok(1 + NONCE..1 + NONCE + n)
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
        let mut body = Vec::with_capacity(encoding.len() + TAG);
        self.cipher.seal_into(&nonce, &out, encoding, &mut body);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out
    }

    /// Opens a sealed record of `kind`; returns its encoding.
    pub fn open_record(&self, kind: RecordKind, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (header_len, _) = parse(kind, sealed)?;
        let nonce = sealed[header_len..header_len + NONCE]
            .try_into()
            .expect("24 bytes");
        self.cipher
            .open(nonce, &sealed[..header_len], &sealed[header_len + NONCE..])
            .map_err(|_| CryptoError::Forged {
                what: sealed_name(kind),
            })
    }
}

fn parse(kind: RecordKind, sealed: &[u8]) -> Result<(usize, usize), CryptoError> {
    imgstore_format::sealed::sealed_header(kind, sealed).map_err(|e| CryptoError::Malformed {
        what: kind.name(),
        why: e.to_string(),
    })
}

/// The ids a sealed record names, readable without the key.
pub fn record_children(kind: RecordKind, sealed: &[u8]) -> Result<Vec<Id>, CryptoError> {
    parse(kind, sealed)?;
    imgstore_format::sealed::record_children(kind, sealed).map_err(|e| CryptoError::Malformed {
        what: kind.name(),
        why: e.to_string(),
    })
}

fn sealed_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Region => "sealed region recipe",
        RecordKind::Page => "sealed index page",
        RecordKind::Snapshot => "sealed snapshot record",
    }
}
