use std::fmt;

/// A 32-byte content address: the BLAKE3 hash of a chunk, region recipe,
/// index page or snapshot record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

/// A string that is not a hex id or id prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdParseError(pub String);

impl fmt::Display for IdParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' is not a hexadecimal snapshot id", self.0)
    }
}
impl std::error::Error for IdParseError {}

impl Id {
    /// The reserved all-zero id. As a region id it means "this region is all
    /// zeros" (nothing stored); it is never the hash of stored bytes.
    pub const ZERO: Id = Id([0; 32]);

    /// BLAKE3 of `data`.
    pub fn hash(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(b: &[u8]) -> Option<Id> {
        <[u8; 32]>::try_from(b).ok().map(Id)
    }

    /// Full lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 8 hex characters, as shown in tables.
    pub fn short(&self) -> String {
        self.to_hex()[..8].to_string()
    }

    /// Parses a full 64-character hex id.
    pub fn from_hex(s: &str) -> Result<Id, IdParseError> {
        let err = || IdParseError(s.to_string());
        // Hex digits only: `from_str_radix` alone takes "+0" for a byte.
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(err)?, 16)
                .map_err(|_| err())?;
        }
        Ok(Id(out))
    }

    /// True when the hex form of this id starts with `prefix` (case-insensitive).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.to_hex().starts_with(&prefix.to_ascii_lowercase())
    }

    /// Checks that `s` could be an id prefix (1..=64 hex digits).
    pub fn check_prefix(s: &str) -> Result<(), IdParseError> {
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdParseError(s.to_string()));
        }
        Ok(())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn hex_round_trip_and_prefix() {
        let id = Id::hash(b"abc");
        assert_eq!(Id::from_hex(&id.to_hex()).unwrap(), id);
        assert!(id.has_prefix(&id.short().to_uppercase()));
        assert!(Id::from_hex("zz").is_err());
        assert!(Id::check_prefix("12ab").is_ok());
        assert!(Id::check_prefix("12ag").is_err());
        assert!(Id::check_prefix("").is_err());
    }

    #[test]
    fn only_hex_digits_make_an_id() {
        let hex = Id::hash(b"abc").to_hex();
        assert!(Id::from_hex(&hex.to_uppercase()).is_ok());
        let signed = format!("+0{}", &hex[2..]);
        assert_eq!(signed.len(), 64);
        assert!(Id::from_hex(&signed).is_err());
    }
}
