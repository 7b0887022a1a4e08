//! Keys and authenticated encryption for encrypted repositories.
//!
//! # Why this design
//!
//! Whoever holds an encrypted repository — a server's operator, a bucket's
//! provider, a thief of the disk — must learn nothing of the images beyond
//! sizes and timing, and must not be able to alter them unnoticed:
//!
//! * **One random master key**, never stored in the clear: it is wrapped in
//!   *key slots*, each opened by a passphrase (argon2id, parameters and salt
//!   in the slot) or a key file. Adding, removing or changing a slot never
//!   touches the data.
//! * **Sub-keys** come from the master key through BLAKE3's `derive_key`
//!   with fixed context strings: one to key chunk ids, one to derive record
//!   nonces, one to encrypt, one to seed the chunker. Golden vectors pin all
//!   of them (a change would make every repository unreadable).
//! * **Keyed chunk ids**: `id = BLAKE3-keyed(chunk-id key, plaintext)`, so
//!   the holder of the store cannot test whether a known file or image is
//!   inside. Deduplication works between hosts sharing the key and not
//!   across repositories.
//! * **XChaCha20-Poly1305** (HChaCha20 from RustCrypto, the bulk
//!   ChaCha20-Poly1305 from `ring`: see the `aead` module) for every chunk frame and every
//!   record, with the object's kind and id as associated data, so one object
//!   cannot be passed off as another. Chunk frames get a random 192-bit
//!   nonce. Records (region recipes, index pages, snapshot records) are
//!   sealed *deterministically*: the nonce is a keyed BLAKE3 of the kind and
//!   plaintext, so the same record always seals to the same bytes and its id
//!   — BLAKE3 of the sealed bytes — stays content-addressed (equal regions
//!   deduplicate) while the store, which has no key, can still check every
//!   stored object against its id. A nonce repeats only for an identical
//!   record, which then has an identical ciphertext: nothing leaks beyond
//!   the equality the id already shows.
//! * **Children in the clear**: a sealed record carries the ids its object
//!   names (sorted, with multiplicity) ahead of the ciphertext, so the store
//!   keeps reference counts and collects garbage without the key. Those ids
//!   are keyed hashes or hashes of ciphertext: they reveal the shape of the
//!   reference graph, not content.

mod aead;
mod keys;
mod seal;
mod slots;

pub use keys::{Keys, MasterKey};
pub use seal::{record_children, RecordKind, SEALED_CHUNK_MAGIC, SEALED_RECORD_MAGIC};
pub use slots::{
    new_key_file, open_any, rewrap, KdfParams, KeySlot, Secret, SlotExt, SlotKind, DEFAULT_KDF,
};

/// Why a key or a sealed object could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// No slot opens with this passphrase or key file.
    #[error("wrong passphrase or key file: no key slot opens with it")]
    WrongSecret,
    /// A sealed object failed authentication: altered, truncated, or
    /// stored under another id or kind.
    #[error("{what} failed authentication (altered, truncated, or not the object its id names)")]
    Forged { what: &'static str },
    /// A sealed object or slot that does not parse.
    #[error("{what} is malformed: {why}")]
    Malformed { what: &'static str, why: String },
    /// The system's random source failed.
    #[error("no system randomness: {0}")]
    Random(String),
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| CryptoError::Random(e.to_string()))?;
    Ok(b)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
#[cfg(test)]
mod tests;
