//! Key slots: the master key wrapped by a passphrase (argon2id) or a key
//! file, stored in the repository config.

use crate::aead::XChaCha;
use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

use crate::{hex, unhex, CryptoError, MasterKey};

const CTX_KEY_FILE: &str = "imgstore 2026-11 key file slot";

pub use imgstore_format::{KdfParams, KeySlot, SlotKind};

/// The default argon2id parameters: 64 MiB, 3 passes, 1 lane (OWASP's
/// argon2id guidance is at least 19 MiB with 2 passes).
pub const DEFAULT_KDF: KdfParams = KdfParams {
    m_kib: 64 * 1024,
    t: 3,
    p: 1,
};

/// What opens a slot.
pub enum Secret<'a> {
    Passphrase(&'a [u8]),
    /// The key file's contents.
    KeyFile(&'a [u8]),
}

fn wrapping_key(
    kind: SlotKind,
    kdf: Option<KdfParams>,
    salt: &[u8],
    secret: &Secret<'_>,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let mut key = Zeroizing::new([0u8; 32]);
    match (kind, secret) {
        (SlotKind::Passphrase, Secret::Passphrase(p)) => {
            let k = kdf.ok_or(CryptoError::Malformed {
                what: "key slot",
                why: "a passphrase slot without argon2id parameters".into(),
            })?;
            let params =
                Params::new(k.m_kib, k.t, k.p, Some(32)).map_err(|e| CryptoError::Malformed {
                    what: "key slot",
                    why: format!("argon2id parameters: {e}"),
                })?;
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(p, salt, &mut *key)
                .map_err(|e| CryptoError::Malformed {
                    what: "key slot",
                    why: format!("argon2id: {e}"),
                })?;
        }
        (SlotKind::KeyFile, Secret::KeyFile(f)) => {
            let mut h = blake3::Hasher::new_derive_key(CTX_KEY_FILE);
            h.update(salt);
            h.update(f);
            *key = *h.finalize().as_bytes();
        }
        _ => return Err(CryptoError::WrongSecret),
    }
    Ok(key)
}

/// Creating and opening key slots.
pub trait SlotExt: Sized {
    fn new(
        master: &MasterKey,
        secret: &Secret<'_>,
        kdf: KdfParams,
        created: i64,
    ) -> Result<Self, CryptoError>;
    fn open(&self, secret: &Secret<'_>) -> Result<MasterKey, CryptoError>;
}

impl SlotExt for KeySlot {
    /// A new slot wrapping `master` for `secret`.
    fn new(
        master: &MasterKey,
        secret: &Secret<'_>,
        kdf: KdfParams,
        created: i64,
    ) -> Result<KeySlot, CryptoError> {
        let salt: [u8; 16] = crate::random()?;
        let nonce: [u8; 24] = crate::random()?;
        let id: [u8; 4] = crate::random()?;
        slot_with(master, secret, kdf, created, &salt, &nonce, &hex(&id))
    }

    /// The master key, if `secret` opens this slot.
    fn open(&self, secret: &Secret<'_>) -> Result<MasterKey, CryptoError> {
        open_slot(self, secret)
    }
}

pub(crate) fn slot_with(
    master: &MasterKey,
    secret: &Secret<'_>,
    kdf: KdfParams,
    created: i64,
    salt: &[u8; 16],
    nonce: &[u8; 24],
    id: &str,
) -> Result<KeySlot, CryptoError> {
    let (kind, kdf) = match secret {
        Secret::Passphrase(_) => (SlotKind::Passphrase, Some(kdf)),
        Secret::KeyFile(_) => (SlotKind::KeyFile, None),
    };
    let key = wrapping_key(kind, kdf, salt, secret)?;
    let mut wrapped = nonce.to_vec();
    XChaCha::new(*key).seal_into(nonce, slot_ad(kind, id).as_bytes(), &master.0, &mut wrapped);
    Ok(KeySlot {
        id: id.to_string(),
        kind,
        kdf,
        salt: hex(salt),
        wrapped: hex(&wrapped),
        created,
    })
}

fn open_slot(slot: &KeySlot, secret: &Secret<'_>) -> Result<MasterKey, CryptoError> {
    let bad = |why: &str| CryptoError::Malformed {
        what: "key slot",
        why: why.into(),
    };
    let salt = unhex(&slot.salt).ok_or_else(|| bad("salt is not hex"))?;
    let wrapped = unhex(&slot.wrapped).ok_or_else(|| bad("wrapped key is not hex"))?;
    if wrapped.len() != 24 + 32 + 16 {
        return Err(bad("wrapped key has the wrong length"));
    }
    let key = wrapping_key(slot.kind, slot.kdf, &salt, secret)?;
    let plain = Zeroizing::new(
        XChaCha::new(*key)
            .open(
                wrapped[..24].try_into().expect("24 bytes"),
                slot_ad(slot.kind, &slot.id).as_bytes(),
                &wrapped[24..],
            )
            .map_err(|_| CryptoError::WrongSecret)?,
    );
    Ok(MasterKey(
        plain[..]
            .try_into()
            .map_err(|_| bad("unwrapped key is not 32 bytes"))?,
    ))
}

fn slot_ad(kind: SlotKind, id: &str) -> String {
    format!("imgstore key slot {kind:?} {id}")
}

/// Opens the first of `slots` that `secret` opens.
pub fn open_any(slots: &[KeySlot], secret: &Secret<'_>) -> Result<MasterKey, CryptoError> {
    for s in slots {
        match s.open(secret) {
            Ok(k) => return Ok(k),
            Err(CryptoError::WrongSecret) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(CryptoError::WrongSecret)
}

/// A slot for `secret` under a given id (a changed passphrase keeps its
/// slot's id).
pub fn rewrap(
    master: &MasterKey,
    secret: &Secret<'_>,
    kdf: KdfParams,
    created: i64,
    id: &str,
) -> Result<KeySlot, CryptoError> {
    let salt: [u8; 16] = crate::random()?;
    let nonce: [u8; 24] = crate::random()?;
    slot_with(master, secret, kdf, created, &salt, &nonce, id)
}

/// The contents of a new key file: 256 random bits, hex, a newline.
pub fn new_key_file() -> Result<Vec<u8>, CryptoError> {
    let k: [u8; 32] = crate::random()?;
    Ok(format!("{}\n", hex(&k)).into_bytes())
}
