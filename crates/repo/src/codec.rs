//! How the engine's objects become stored bytes: plain, or sealed with the
//! repository's keys (`imgstore-crypto`).
//!
//! Every implementation stores what the codec produced and checks each
//! stored object against its id as BLAKE3 of the stored bytes, so a store
//! needs no key: ids of sealed records are hashes of their ciphertext, and
//! their children are readable (`imgstore_format::sealed::record_children`).
//! Only chunk ids differ: keyed with the repository key when sealed.

use std::borrow::Cow;
use std::sync::Arc;

use imgstore_crypto::Keys;
use imgstore_format::sealed::RecordKind;
use imgstore_format::{FormatError, Id, ObjectKind};

use crate::{RepoError, Result};

/// Plain, or sealed with the keys opened from a key slot.
#[derive(Clone, Debug, Default)]
pub enum Codec {
    #[default]
    Plain,
    Sealed(Arc<Keys>),
}

fn kind_of(kind: RecordKind) -> Option<ObjectKind> {
    match kind {
        RecordKind::Region => Some(ObjectKind::Region),
        RecordKind::Page => Some(ObjectKind::Page),
        RecordKind::Snapshot => None,
    }
}

fn corrupt(kind: RecordKind, id: &Id, why: String) -> RepoError {
    let source = FormatError::Invalid {
        what: "stored record",
        why,
    };
    match kind_of(kind) {
        Some(k) => RepoError::Corrupt {
            kind: k,
            id: *id,
            source,
        },
        None => RepoError::CorruptSnapshot { id: *id, source },
    }
}

impl Codec {
    pub fn is_sealed(&self) -> bool {
        matches!(self, Codec::Sealed(_))
    }

    /// A chunk's id: BLAKE3 of its bytes, keyed when sealed.
    pub fn chunk_id(&self, plaintext: &[u8]) -> Id {
        match self {
            Codec::Plain => Id::hash(plaintext),
            Codec::Sealed(k) => k.chunk_id(plaintext),
        }
    }

    /// Whether `plaintext` is the content of chunk `id` (a sealed
    /// repository's ids may carry a namespace tag: `Keys::chunk_id_matches`).
    pub fn chunk_matches(&self, plaintext: &[u8], id: &Id) -> bool {
        match self {
            Codec::Plain => Id::hash(plaintext) == *id,
            Codec::Sealed(k) => k.chunk_id_matches(plaintext, id),
        }
    }

    /// The same codec for a backup in server namespace `ns`: a sealed one's
    /// chunk ids carry the namespace's tag; a plain one is unchanged (the
    /// server checks plain chunks against their ids itself).
    pub fn in_namespace(&self, ns: &str) -> Codec {
        match self {
            Codec::Plain => Codec::Plain,
            Codec::Sealed(k) => Codec::Sealed(Arc::new(k.in_namespace(ns))),
        }
    }

    /// The seed of the chunker's gear table (0 for a plain repository,
    /// whose chunk boundaries must not change).
    pub fn chunker_seed(&self) -> u64 {
        match self {
            Codec::Plain => 0,
            Codec::Sealed(k) => k.chunker_seed(),
        }
    }

    /// The stored form of chunk `id`'s frame.
    pub fn store_chunk(&self, id: &Id, frame: Vec<u8>) -> Result<Vec<u8>> {
        match self {
            Codec::Plain => Ok(frame),
            Codec::Sealed(k) => k
                .seal_chunk(id, &frame)
                .map_err(|e| RepoError::Invalid(e.to_string())),
        }
    }

    /// The frame of chunk `id` from its stored form; a sealed one that
    /// fails authentication is an error naming why.
    pub fn open_chunk<'a>(
        &self,
        id: &Id,
        stored: &'a [u8],
    ) -> std::result::Result<Cow<'a, [u8]>, String> {
        match self {
            Codec::Plain => Ok(Cow::Borrowed(stored)),
            Codec::Sealed(k) => k
                .open_chunk(id, stored)
                .map(Cow::Owned)
                .map_err(|e| e.to_string()),
        }
    }

    /// Opens a stored chunk where it lies (no copy): the range of `stored`
    /// that holds the frame afterwards. On failure `stored` may be altered.
    pub fn open_chunk_in_place(
        &self,
        id: &Id,
        stored: &mut [u8],
    ) -> std::result::Result<std::ops::Range<usize>, String> {
        match self {
            Codec::Plain => Ok(0..stored.len()),
            Codec::Sealed(k) => k.open_chunk_in_place(id, stored).map_err(|e| e.to_string()),
        }
    }

    /// The stored form and id of a record encoding naming `children`.
    pub fn store_record(
        &self,
        kind: RecordKind,
        encoding: Vec<u8>,
        children: &[Id],
    ) -> (Id, Vec<u8>) {
        let stored = match self {
            Codec::Plain => encoding,
            Codec::Sealed(k) => k.seal_record(kind, &encoding, children),
        };
        (Id::hash(&stored), stored)
    }

    /// The encoding of a stored record, checked against its id (and
    /// authenticated when sealed).
    pub fn open_record<'a>(
        &self,
        kind: RecordKind,
        id: &Id,
        stored: &'a [u8],
    ) -> Result<Cow<'a, [u8]>> {
        if Id::hash(stored) != *id {
            return Err(corrupt(
                kind,
                id,
                "its content does not hash to its id".into(),
            ));
        }
        match (self, imgstore_format::sealed::is_sealed_record(stored)) {
            (Codec::Plain, false) => Ok(Cow::Borrowed(stored)),
            (Codec::Sealed(k), true) => k
                .open_record(kind, stored)
                .map(Cow::Owned)
                .map_err(|e| corrupt(kind, id, e.to_string())),
            (Codec::Plain, true) => Err(corrupt(
                kind,
                id,
                "it is encrypted and the repository was opened without its key".into(),
            )),
            (Codec::Sealed(_), false) => Err(corrupt(
                kind,
                id,
                "it is not encrypted in an encrypted repository".into(),
            )),
        }
    }
}
