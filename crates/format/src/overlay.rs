//! `overlay.json`, the record of a copy-on-write overlay directory
//! (`imgstore serve --writable DIR`): which snapshot it overlays and the
//! image size. Versioned like the repository config.
//!
//! ```json
//! {"format": "imgstore-overlay", "version": 1, "base": "<64 hex>", "size": 1073741824}
//! ```

use serde::{Deserialize, Serialize};

use crate::{FormatError, Id};

/// The file name of the record inside an overlay directory.
pub const OVERLAY_FILE: &str = "overlay.json";

/// The `format` value identifying an overlay record.
const OVERLAY_FORMAT: &str = "imgstore-overlay";

/// The overlay record version this build writes and reads.
pub const OVERLAY_VERSION: u32 = 1;

/// What `overlay.json` records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayRecord {
    /// The snapshot the overlay's writes apply to.
    pub base: Id,
    /// The image size in bytes.
    pub size: u64,
}

#[derive(Serialize, Deserialize)]
struct Json {
    format: String,
    version: u32,
    base: String,
    size: u64,
}

impl OverlayRecord {
    /// The record as written (pretty JSON, trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        let j = Json {
            format: OVERLAY_FORMAT.into(),
            version: OVERLAY_VERSION,
            base: self.base.to_hex(),
            size: self.size,
        };
        let mut v = serde_json::to_vec_pretty(&j).expect("serializable");
        v.push(b'\n');
        v
    }

    /// Parses and checks a record: the format name, a version this build
    /// reads, a 64-hex base id.
    pub fn from_json(bytes: &[u8]) -> Result<OverlayRecord, FormatError> {
        let j: Json = serde_json::from_slice(bytes).map_err(|e| FormatError::Invalid {
            what: "overlay record",
            why: e.to_string(),
        })?;
        if j.format != OVERLAY_FORMAT {
            return Err(FormatError::Invalid {
                what: "overlay record",
                why: format!("format is {:?}, not {OVERLAY_FORMAT:?}", j.format),
            });
        }
        if j.version != OVERLAY_VERSION {
            return Err(FormatError::Invalid {
                what: "overlay record",
                why: format!(
                    "version {} is not the {OVERLAY_VERSION} this imgstore reads",
                    j.version
                ),
            });
        }
        let base = Id::from_hex(&j.base).map_err(|e| FormatError::Invalid {
            what: "overlay record",
            why: format!("base: {e}"),
        })?;
        Ok(OverlayRecord { base, size: j.size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let r = OverlayRecord {
            base: Id([0xab; 32]),
            size: 1 << 30,
        };
        assert_eq!(OverlayRecord::from_json(&r.to_json()).unwrap(), r);
        // The layout earlier builds wrote by hand still reads.
        let old = format!(
            "{{\n  \"format\": \"imgstore-overlay\",\n  \"version\": 1,\n  \"base\": \"{}\",\n  \"size\": 4096\n}}\n",
            "ab".repeat(32)
        );
        assert_eq!(OverlayRecord::from_json(old.as_bytes()).unwrap().size, 4096);
        let newer = old.replace("\"version\": 1", "\"version\": 2");
        assert!(OverlayRecord::from_json(newer.as_bytes()).is_err());
        let other = old.replace("imgstore-overlay", "something");
        assert!(OverlayRecord::from_json(other.as_bytes()).is_err());
        assert!(OverlayRecord::from_json(b"{}").is_err());
    }
}
