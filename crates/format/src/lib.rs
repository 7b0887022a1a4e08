//! The on-disk format of an imgstore repository, in one place.
//!
//! Everything imgstore writes — the repository config file, every RocksDB key
//! layout and every value encoding — is defined in this crate and documented
//! byte by byte in `docs/FORMAT.md`. Nothing else in the workspace builds or
//! parses stored bytes; the store crate moves them, the engine interprets
//! them through the types here.
//!
//! Why a separate crate: the format outlives every version of the code that
//! writes it. Keeping it free of RocksDB and of the pipeline makes its
//! decoders easy to fuzz and its version rules easy to audit.
//!
//! All integers are little-endian. Every decoder checks lengths against the
//! bytes actually present before allocating, so a corrupt or hostile length
//! field yields an error, never a huge allocation or a panic.

pub mod cache;
mod codec;
mod config;
mod frame;
mod id;
pub mod meta;
mod overlay;
pub mod pack;
mod records;
pub mod sealed;
mod version;

pub use codec::FormatError;
pub use config::{
    ChunkingConfig, Compression, Encryption, KdfParams, KeySlot, RepoConfig, SlotKind, Storage,
    CONFIG_FILE, DB_DIR, ENCRYPTION_SCHEME, LOCK_FILE, PACK_SIZES,
};
pub use frame::{
    decode_chunk, decode_chunk_into, encode_chunk, ChunkCodec, FrameCodec, FRAME_HEADER_LEN,
    MAX_CHUNK_LEN,
};
pub use id::{Id, IdParseError};
pub use overlay::{OverlayRecord, OVERLAY_FILE, OVERLAY_VERSION};
pub use records::{
    BitmapKind, Page, RecipeEntry, RefCount, Region, Snapshot, SnapshotBitmap, SnapshotStats,
};
pub use version::FormatVersion;

/// Number of region ids in one index page (see [`Page`]). Part of the format.
pub const PAGE_REGIONS: usize = 1024;

/// Column family names. Part of the format.
pub mod cf {
    /// Chunk payloads (BlobDB): key = chunk id (32 bytes), value = chunk frame.
    pub const CHUNKS: &str = "chunks";
    /// Region recipes and index pages: key = kind byte + id, value = record.
    pub const RECIPES: &str = "recipes";
    /// Reference counts: key = kind byte + id, value = [`super::RefCount`].
    pub const REFS: &str = "refs";
    /// Objects whose reference count is zero: key = kind byte + id, value empty.
    pub const ORPHANS: &str = "orphans";
    /// Snapshot records: key = snapshot id (32 bytes), value = [`super::Snapshot`].
    pub const SNAPSHOTS: &str = "snapshots";
    /// Repository-wide small records (format marker).
    pub const META: &str = "meta";
    /// Every column family the format defines, in creation order.
    pub const ALL: [&str; 6] = [CHUNKS, RECIPES, REFS, ORPHANS, SNAPSHOTS, META];
}

/// The kind byte that prefixes keys in the `recipes`, `refs` and `orphans`
/// column families. Part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ObjectKind {
    /// A data chunk (`C`).
    Chunk = b'C',
    /// A region recipe (`R`).
    Region = b'R',
    /// An index page (`P`).
    Page = b'P',
}

impl ObjectKind {
    /// The object's name in messages: "chunk", "region recipe", "index page".
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Region => "region recipe",
            ObjectKind::Page => "index page",
        }
    }

    /// The 33-byte key `kind || id`.
    pub fn key(self, id: &Id) -> [u8; 33] {
        let mut k = [0u8; 33];
        k[0] = self as u8;
        k[1..].copy_from_slice(id.as_bytes());
        k
    }

    /// Splits a 33-byte key back into kind and id.
    pub fn parse_key(key: &[u8]) -> Result<(ObjectKind, Id), FormatError> {
        if key.len() != 33 {
            return Err(FormatError::BadKey { len: key.len() });
        }
        let kind = match key[0] {
            b'C' => ObjectKind::Chunk,
            b'R' => ObjectKind::Region,
            b'P' => ObjectKind::Page,
            other => {
                return Err(FormatError::BadTag {
                    what: "object kind",
                    tag: other,
                })
            }
        };
        Ok((kind, Id::from_slice(&key[1..]).expect("32 bytes")))
    }
}

/// Key in the `meta` column family holding the format version (u32 LE) the
/// database was created with; checked against the config file on open.
pub const META_FORMAT_KEY: &[u8] = b"format";

/// Prefix of `meta` keys marking a protected snapshot: `protect:` + snapshot id (32 bytes).
pub const META_PROTECT_PREFIX: &[u8] = b"protect:";

/// Prefix of `meta` keys marking a stored object found damaged by `check`
/// or `verify`: `damaged:` + object key (kind byte + id, 33 bytes); the value
/// is a UTF-8 description of the damage. A backup that produces the same
/// object writes it again and deletes the mark in its commit.
pub const META_DAMAGED_PREFIX: &[u8] = b"damaged:";
