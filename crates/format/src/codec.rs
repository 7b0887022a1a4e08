//! Bounds-checked little-endian reading and writing.

/// A stored structure that cannot be decoded. Carries what was being read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what} is truncated: needed {needed} more bytes at offset {offset}")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("{what} has {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
    #[error("{what} has unknown version {version}")]
    Version { what: &'static str, version: u8 },
    #[error("unknown {what} tag {tag}")]
    BadTag { what: &'static str, tag: u8 },
    #[error("{what} is invalid: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("key of {len} bytes is not an object key")]
    BadKey { len: usize },
    #[error("this is not an imgstore repository config ({why})")]
    NotRepository { why: String },
    #[error("repository format version {found} is newer than this imgstore supports ({supported}): upgrade imgstore")]
    Newer {
        found: u32,
        supported: crate::FormatVersion,
    },
    #[error(
        "repository format version {found} is older than this imgstore can read (oldest {oldest})"
    )]
    Older {
        found: u32,
        oldest: crate::FormatVersion,
    },
}

pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A string of at most 65535 bytes: u16 length, then UTF-8.
    pub fn str(&mut self, s: &str) {
        let b = s.as_bytes();
        let n = b.len().min(u16::MAX as usize);
        self.u16(n as u16);
        self.bytes(&b[..n]);
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.buf.len() - self.pos < n {
            return Err(FormatError::Truncated {
                what: self.what,
                offset: self.pos,
                needed: n - (self.buf.len() - self.pos),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn id(&mut self) -> Result<crate::Id, FormatError> {
        Ok(crate::Id(self.take(32)?.try_into().unwrap()))
    }
    pub fn str(&mut self) -> Result<String, FormatError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| FormatError::Invalid {
            what: self.what,
            why: format!("string at offset {} is not UTF-8", self.pos - n),
        })
    }
    /// A count of items of at least `min_item` bytes each, checked against
    /// the bytes left so a corrupt count cannot make the caller allocate more
    /// than the record's size.
    pub fn count(&mut self, min_item: usize) -> Result<usize, FormatError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(FormatError::Truncated {
                what: self.what,
                offset: self.pos,
                needed: n.saturating_mul(min_item) - self.remaining(),
            });
        }
        Ok(n)
    }
    pub fn finish(self) -> Result<(), FormatError> {
        if self.pos != self.buf.len() {
            return Err(FormatError::Trailing {
                what: self.what,
                extra: self.buf.len() - self.pos,
            });
        }
        Ok(())
    }
}
