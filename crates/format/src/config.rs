//! The repository config file (`imgstore.json`), readable before RocksDB opens.

use serde::{Deserialize, Serialize};

use crate::{FormatError, FormatVersion};

/// Name of the config file at the top of a repository directory.
pub const CONFIG_FILE: &str = "imgstore.json";
/// Name of the RocksDB directory inside a repository directory.
pub const DB_DIR: &str = "db";
/// Name of the lock file inside a repository directory.
pub const LOCK_FILE: &str = "lock";

/// Chunking parameters, fixed at `init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkingConfig {
    /// Always "fastcdc-2020" in format version 1.
    pub algorithm: String,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    pub zero_min: u32,
}

/// How chunk payloads are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    /// zstd level used for new chunks (reading accepts any level).
    pub zstd_level: i32,
}

/// The contents of `imgstore.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Always "imgstore".
    pub format: String,
    /// The format version the repository was created with (stored as its
    /// number).
    pub version: FormatVersion,
    /// Random 128-bit repository id, hex.
    pub id: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    pub chunking: ChunkingConfig,
    /// Bytes per region (a power of two, a multiple of 1 KiB, at least 4×max).
    pub region_size: u32,
    pub compression: Compression,
    /// Present in an encrypted repository (format 3): its key slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Present in a bucket-backed repository (format 4): where its packs live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
}

/// Where a bucket-backed repository keeps its data. Credentials are never
/// stored here: they come from the environment or the AWS profile files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// Always "s3" (any S3-compatible service).
    pub kind: String,
    pub bucket: String,
    /// Folder inside the bucket ("" or ending without a slash).
    #[serde(default)]
    pub prefix: String,
    /// Service URL (None: AWS's endpoint for the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub region: String,
    /// Target size of a pack object, in bytes.
    pub pack_size: u32,
    /// Bytes of packs kept in the local cache (`cache/`); 0 keeps none.
    pub cache_bytes: u64,
}

impl Storage {
    /// `s3://BUCKET/PREFIX` for messages.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// The only encryption scheme: BLAKE3-derived sub-keys, keyed BLAKE3 chunk
/// ids, XChaCha20-Poly1305 sealing (`imgstore-crypto`).
/// Pack sizes a bucket-backed repository may use (1 MiB to 256 MiB).
pub const PACK_SIZES: std::ops::RangeInclusive<u32> = 1 << 20..=256 << 20;

pub const ENCRYPTION_SCHEME: &str = "xchacha20poly1305-blake3";

/// The encryption section of an encrypted repository's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Always [`ENCRYPTION_SCHEME`].
    pub scheme: String,
    /// The master key, wrapped once per slot.
    pub slots: Vec<KeySlot>,
}

/// argon2id parameters, stored in each passphrase slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

/// How a key slot is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    Passphrase,
    KeyFile,
}

/// One key slot: the master key wrapped by a passphrase or a key file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    /// A short random id (8 hex digits), for `key list` and `key remove`.
    pub id: String,
    pub kind: SlotKind,
    /// argon2id parameters (passphrase slots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// Salt, hex (16 bytes).
    pub salt: String,
    /// Nonce (24 bytes) then XChaCha20-Poly1305 of the master key (32 + 16), hex.
    pub wrapped: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
}

impl RepoConfig {
    /// A config for a new repository.
    pub fn new(id: String, created: i64, chunking: ChunkingConfig, zstd_level: i32) -> Self {
        let region_size = (chunking.max as u64 * 4).next_power_of_two().max(8 << 20) as u32;
        RepoConfig {
            format: "imgstore".into(),
            version: FormatVersion::for_new(false, false),
            id,
            created,
            chunking,
            region_size,
            compression: Compression { zstd_level },
            encryption: None,
            storage: None,
        }
    }

    /// Makes this a bucket-backed repository's config (format 4).
    pub fn in_bucket(mut self, storage: Storage) -> Self {
        self.version = FormatVersion::for_new(self.encryption.is_some(), true);
        self.storage = Some(storage);
        self
    }

    /// Makes this a new encrypted repository's config (format 3).
    pub fn encrypted(mut self, slots: Vec<KeySlot>) -> Self {
        self.version = FormatVersion::for_new(true, self.storage.is_some());
        self.encryption = Some(Encryption {
            scheme: ENCRYPTION_SCHEME.into(),
            slots,
        });
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("config serializes");
        v.push(b'\n');
        v
    }

    /// Parses and checks a config file: the format marker and version come
    /// first, so a newer repository is reported as such even when its other
    /// fields are unknown to this build.
    pub fn from_json(bytes: &[u8]) -> Result<RepoConfig, FormatError> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| FormatError::NotRepository {
                why: format!("not JSON: {e}"),
            })?;
        if v.get("format").and_then(|f| f.as_str()) != Some("imgstore") {
            return Err(FormatError::NotRepository {
                why: "no \"format\": \"imgstore\" field".into(),
            });
        }
        let version = v.get("version").and_then(|f| f.as_u64()).ok_or_else(|| {
            FormatError::NotRepository {
                why: "no version field".into(),
            }
        })?;
        FormatVersion::from_u32(u32::try_from(version).unwrap_or(u32::MAX))?;
        let c: RepoConfig = serde_json::from_value(v).map_err(|e| FormatError::Invalid {
            what: "repository config",
            why: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let bad = |why: String| FormatError::Invalid {
            what: "repository config",
            why,
        };
        let v = self.version;
        match (&self.storage, v.in_bucket()) {
            (Some(st), true) => {
                if st.kind != "s3" {
                    return Err(bad(format!("unknown storage kind {}", st.kind)));
                }
                if st.bucket.is_empty() || st.region.is_empty() {
                    return Err(bad("a storage section without bucket or region".into()));
                }
                if !PACK_SIZES.contains(&st.pack_size) {
                    return Err(bad(format!("pack size {} out of 1-256 MiB", st.pack_size)));
                }
            }
            (None, true) => return Err(bad(format!("format {v} needs a storage section"))),
            (Some(_), false) => {
                return Err(bad(format!("format {v} cannot keep data in a bucket")))
            }
            (None, false) => {}
        }
        match &self.encryption {
            None if !v.requires_encryption() => {}
            Some(e) if v.allows_encryption() => {
                if e.scheme != ENCRYPTION_SCHEME {
                    return Err(bad(format!("unknown encryption scheme {}", e.scheme)));
                }
                if e.slots.is_empty() {
                    return Err(bad("an encrypted repository without key slots".into()));
                }
            }
            None => return Err(bad(format!("format {v} needs an encryption section"))),
            Some(_) => return Err(bad(format!("format {v} cannot be encrypted"))),
        }
        if self.chunking.algorithm != "fastcdc-2020" {
            return Err(bad(format!(
                "unknown chunking algorithm {}",
                self.chunking.algorithm
            )));
        }
        let r = self.region_size;
        if !r.is_power_of_two() || r < 1 << 20 || (r as u64) < self.chunking.max as u64 * 4 {
            return Err(bad(format!(
                "region size {r} is not a power of two ≥ 1 MiB and ≥ 4×max chunk"
            )));
        }
        if self.chunking.max as usize > crate::MAX_CHUNK_LEN {
            return Err(bad(format!(
                "max chunk {} exceeds {}",
                self.chunking.max,
                crate::MAX_CHUNK_LEN
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RepoConfig {
        RepoConfig::new(
            "00".repeat(16),
            1,
            ChunkingConfig {
                algorithm: "fastcdc-2020".into(),
                min: 16384,
                avg: 65536,
                max: 262144,
                zero_min: 16384,
            },
            3,
        )
    }

    #[test]
    fn round_trip_and_region_size() {
        let c = cfg();
        assert_eq!(c.region_size, 8 << 20);
        assert_eq!(c.version, FormatVersion::V2);
        let json = String::from_utf8(c.to_json()).unwrap();
        assert!(json.contains("\"version\": 2,"), "the bare number: {json}");
        assert_eq!(RepoConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn a_bucket_config_is_format_4_and_checked() {
        let st = Storage {
            kind: "s3".into(),
            bucket: "b-1".into(),
            prefix: "p".into(),
            endpoint: Some("http://127.0.0.1:3900".into()),
            region: "garage".into(),
            pack_size: 32 << 20,
            cache_bytes: 1 << 30,
        };
        let c = cfg().in_bucket(st.clone());
        assert_eq!(c.version, FormatVersion::V4);
        assert_eq!(RepoConfig::from_json(&c.to_json()).unwrap(), c);
        // Encryption keeps format 4 in a bucket.
        let mut e = c.clone();
        e.encryption = Some(Encryption {
            scheme: ENCRYPTION_SCHEME.into(),
            slots: vec![KeySlot {
                id: "00000000".into(),
                kind: SlotKind::KeyFile,
                kdf: None,
                salt: "00".into(),
                wrapped: "00".into(),
                created: 0,
            }],
        });
        assert!(RepoConfig::from_json(&e.to_json()).is_ok());
        let mut bad = c.clone();
        bad.version = FormatVersion::V2;
        assert!(RepoConfig::from_json(&bad.to_json()).is_err());
        let mut bad = c.clone();
        bad.storage.as_mut().unwrap().pack_size = 1;
        assert!(RepoConfig::from_json(&bad.to_json()).is_err());
        let mut bad = cfg();
        bad.version = FormatVersion::V4;
        assert!(RepoConfig::from_json(&bad.to_json()).is_err());
    }

    #[test]
    fn newer_version_is_reported_before_unknown_fields() {
        let j = br#"{"format":"imgstore","version":99,"whatever":[1]}"#;
        assert_eq!(
            RepoConfig::from_json(j).unwrap_err(),
            FormatError::Newer {
                found: 99,
                supported: FormatVersion::newest()
            }
        );
        assert!(matches!(
            RepoConfig::from_json(b"{}").unwrap_err(),
            FormatError::NotRepository { .. }
        ));
    }

    proptest::proptest! {
        #[test]
        fn hostile_config_files_are_errors(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = RepoConfig::from_json(&bytes);
        }

        #[test]
        fn mutated_config_never_panics(pos in 0usize..1000, val in proptest::prelude::any::<u8>()) {
            let cfg = RepoConfig::new("00".repeat(16), 0, ChunkingConfig {
                algorithm: "fastcdc-2020".into(), min: 16384, avg: 65536, max: 262144, zero_min: 16384,
            }, 3);
            let mut b = cfg.to_json();
            let p = pos % b.len();
            b[p] = val;
            let _ = RepoConfig::from_json(&b);
        }
    }
}
