//! The master key and what is derived from it.

use imgstore_format::sealed::{namespace_tag, NAMESPACE_TAG_LEN};
use imgstore_format::Id;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::aead::XChaCha;
use crate::CryptoError;

/// Context strings of BLAKE3 `derive_key`: fixed forever (golden vectors).
const CTX_CHUNK_ID: &str = "imgstore 2026-11 chunk id key";
const CTX_RECORD_NONCE: &str = "imgstore 2026-11 record nonce key";
const CTX_DATA: &str = "imgstore 2026-11 data encryption key";
const CTX_CHUNKER: &str = "imgstore 2026-11 chunker seed";

/// A repository's 256-bit master key. Zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl MasterKey {
    /// A new random key.
    pub fn generate() -> Result<MasterKey, CryptoError> {
        Ok(MasterKey(crate::random()?))
    }

    /// A key from its bytes (tests, golden vectors).
    pub fn from_bytes(b: [u8; 32]) -> MasterKey {
        MasterKey(b)
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// The sub-keys an encrypted repository uses.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Keys {
    chunk_id: [u8; 32],
    pub(crate) record_nonce: [u8; 32],
    data: [u8; 32],
    chunker_seed: u64,
    pub(crate) cipher: XChaCha,
    /// The server namespace's tag the chunk ids of a backup carry
    /// (`imgstore_format::sealed::namespace_tag`), if it runs in one.
    tag: Option<[u8; NAMESPACE_TAG_LEN]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Derives every sub-key from the master key.
    pub fn derive(master: &MasterKey) -> Keys {
        let data = blake3::derive_key(CTX_DATA, &master.0);
        let seed = blake3::derive_key(CTX_CHUNKER, &master.0);
        Keys {
            chunk_id: blake3::derive_key(CTX_CHUNK_ID, &master.0),
            record_nonce: blake3::derive_key(CTX_RECORD_NONCE, &master.0),
            data,
            chunker_seed: u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")),
            cipher: XChaCha::new(data),
            tag: None,
        }
    }

    /// The same keys for a backup in server namespace `ns`: the chunk ids
    /// it computes carry the namespace's tag in their first bytes.
    pub fn in_namespace(&self, ns: &str) -> Keys {
        Keys {
            chunk_id: self.chunk_id,
            record_nonce: self.record_nonce,
            data: self.data,
            chunker_seed: self.chunker_seed,
            cipher: XChaCha::new(self.data),
            tag: Some(namespace_tag(ns)),
        }
    }

    /// The id of a chunk: BLAKE3 keyed with the chunk-id key, its first
    /// bytes replaced by the namespace tag when there is one.
    pub fn chunk_id(&self, plaintext: &[u8]) -> Id {
        let mut id = *blake3::keyed_hash(&self.chunk_id, plaintext).as_bytes();
        if let Some(t) = &self.tag {
            id[..NAMESPACE_TAG_LEN].copy_from_slice(t);
        }
        Id(id)
    }

    /// Whether `plaintext` is the content of chunk `id`, in whichever
    /// namespace it was written: the keyed hash must match past the tag
    /// bytes (192 bits; the AEAD, which binds the whole id, is checked
    /// too when the chunk is opened).
    pub fn chunk_id_matches(&self, plaintext: &[u8], id: &Id) -> bool {
        let h = blake3::keyed_hash(&self.chunk_id, plaintext);
        h.as_bytes()[NAMESPACE_TAG_LEN..] == id.as_bytes()[NAMESPACE_TAG_LEN..]
    }

    /// The seed the chunker's gear table is mixed with, so chunk lengths do
    /// not fingerprint known data.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    #[cfg(test)]
    pub(crate) fn raw(&self) -> ([u8; 32], [u8; 32], [u8; 32], u64) {
        (
            self.chunk_id,
            self.record_nonce,
            self.data,
            self.chunker_seed,
        )
    }
}
