//! The repository format version: which encodings a repository uses.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FormatError;

/// A repository format version, as the config's `version` field names it.
///
/// Each version says what it adds to the one before. Stored as the bare
/// number (`"version": 2` in `imgstore.json`, a u32 LE under the `meta`
/// column family's `format` key), so the on-disk bytes are the integer.
///
/// Adding a version: a new variant (documented here and in
/// `docs/FORMAT.md`), [`FormatVersion::newest`] moved to it if this build
/// reads it, and a fixture repository of the version under
/// `tests/fixtures/` with a test that opens, checks and restores it. Never
/// change the meaning of an existing variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FormatVersion {
    /// Written only by pre-release builds; no build reads it. Its index
    /// pages (version byte 1) had no region chaining values.
    V1 = 1,
    /// A plain local repository: chunk frames in RocksDB blob files,
    /// recipes, index pages with region chaining values, snapshots and
    /// reference counts in column families. The oldest version read.
    V2 = 2,
    /// An encrypted local repository: format 2's layout with every chunk
    /// frame and record sealed (`sealed`), key slots in the config. A plain
    /// repository stays version 2, so builds without encryption still read
    /// it.
    V3 = 3,
    /// A bucket-backed repository, plain or encrypted (sealed as in
    /// format 3): chunk frames and copies of every record in pack objects
    /// in an S3-compatible bucket (`pack`), the local `chunks` column
    /// family holding pack locations instead of frames. Builds that know
    /// only 2 and 3 refuse it instead of reading locations as frames.
    V4 = 4,
}

impl FormatVersion {
    /// Every version, oldest first.
    pub const ALL: [FormatVersion; 4] = [
        FormatVersion::V1,
        FormatVersion::V2,
        FormatVersion::V3,
        FormatVersion::V4,
    ];

    /// The newest version this build reads (and writes, for a bucket).
    pub const fn newest() -> FormatVersion {
        FormatVersion::V4
    }

    /// The oldest version this build reads.
    pub const fn oldest() -> FormatVersion {
        FormatVersion::V2
    }

    /// The version `init` writes: plain local (2), encrypted local (3),
    /// bucket-backed (4, plain or encrypted).
    pub const fn for_new(encrypted: bool, in_bucket: bool) -> FormatVersion {
        match (encrypted, in_bucket) {
            (_, true) => FormatVersion::V4,
            (true, false) => FormatVersion::V3,
            (false, false) => FormatVersion::V2,
        }
    }

    /// The number stored on disk.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The version a repository's stored number names, if this build reads
    /// it: a newer one is [`FormatError::Newer`] (upgrade imgstore), an
    /// older one [`FormatError::Older`].
    pub fn from_u32(v: u32) -> Result<FormatVersion, FormatError> {
        match v {
            2 => Ok(FormatVersion::V2),
            3 => Ok(FormatVersion::V3),
            4 => Ok(FormatVersion::V4),
            v if v > Self::newest().as_u32() => Err(FormatError::Newer {
                found: v,
                supported: Self::newest(),
            }),
            v => Err(FormatError::Older {
                found: v,
                oldest: Self::oldest(),
            }),
        }
    }

    /// Whether chunk frames and records may be sealed (formats 3 and 4).
    pub const fn allows_encryption(self) -> bool {
        matches!(self, FormatVersion::V3 | FormatVersion::V4)
    }

    /// Whether it must be encrypted (format 3).
    pub const fn requires_encryption(self) -> bool {
        matches!(self, FormatVersion::V3)
    }

    /// Whether its data lives in a bucket (format 4).
    pub const fn in_bucket(self) -> bool {
        matches!(self, FormatVersion::V4)
    }
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u32())
    }
}

impl Serialize for FormatVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.as_u32())
    }
}

impl<'de> Deserialize<'de> for FormatVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FormatVersion, D::Error> {
        let v = u32::deserialize(d)?;
        FormatVersion::from_u32(v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_unknown_ones_are_typed_errors() {
        for v in FormatVersion::ALL {
            assert_eq!(v.as_u32(), v as u32);
            if v >= FormatVersion::oldest() {
                assert_eq!(FormatVersion::from_u32(v.as_u32()), Ok(v));
            }
        }
        assert_eq!(
            [2, 3, 4].map(|n| FormatVersion::from_u32(n).unwrap().as_u32()),
            [2, 3, 4],
            "the stored numbers never change"
        );
        let e = FormatVersion::from_u32(5).unwrap_err();
        assert_eq!(
            e,
            FormatError::Newer {
                found: 5,
                supported: FormatVersion::V4
            }
        );
        assert!(e.to_string().contains("version 5") && e.to_string().contains("upgrade"));
        for n in [0, 1] {
            let e = FormatVersion::from_u32(n).unwrap_err();
            assert_eq!(
                e,
                FormatError::Older {
                    found: n,
                    oldest: FormatVersion::V2
                }
            );
            assert!(e.to_string().contains(&format!("version {n}")), "{e}");
        }
        assert!(FormatVersion::from_u32(u32::MAX).is_err());
        assert_eq!(FormatVersion::newest(), *FormatVersion::ALL.last().unwrap());
    }

    #[test]
    fn serde_writes_the_bare_number() {
        assert_eq!(serde_json::to_string(&FormatVersion::V3).unwrap(), "3");
        assert_eq!(
            serde_json::from_str::<FormatVersion>("4").unwrap(),
            FormatVersion::V4
        );
        assert!(serde_json::from_str::<FormatVersion>("9").is_err());
        assert!(serde_json::from_str::<FormatVersion>("\"2\"").is_err());
    }

    #[test]
    fn new_repositories_get_the_right_version() {
        assert_eq!(FormatVersion::for_new(false, false), FormatVersion::V2);
        assert_eq!(FormatVersion::for_new(true, false), FormatVersion::V3);
        assert_eq!(FormatVersion::for_new(false, true), FormatVersion::V4);
        assert_eq!(FormatVersion::for_new(true, true), FormatVersion::V4);
    }
}
