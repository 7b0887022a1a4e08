//! The binary body codec: little-endian integers, length-prefixed byte
//! strings, 32-byte ids. Every length is checked against a limit and
//! against what is left of the body before anything is allocated.

use imgstore_format::Id;

use crate::Malformed;

/// Builds a binary body.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn with_capacity(n: usize) -> Enc {
        Enc(Vec::with_capacity(n))
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn id(&mut self, id: &Id) -> &mut Self {
        self.0.extend_from_slice(id.as_bytes());
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A `u32` length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.raw(b)
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a binary body; `what` names it in errors.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Dec<'a> {
        Dec { buf, pos: 0, what }
    }

    pub fn err(&self, why: impl Into<String>) -> Malformed {
        Malformed {
            what: self.what,
            why: why.into(),
        }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{n} bytes wanted at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn id(&mut self) -> Result<Id, Malformed> {
        Ok(Id(self.take(32)?.try_into().expect("32 bytes")))
    }

    /// A count of items of at least `min_item` bytes each, at most `limit`.
    pub fn count(&mut self, limit: usize, min_item: usize) -> Result<usize, Malformed> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(self.err(format!("{n} items, the limit is {limit}")));
        }
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(self.err(format!(
                "{n} items cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// A `u32` length (at most `limit`), then that many bytes.
    pub fn bytes(&mut self, limit: usize) -> Result<&'a [u8], Malformed> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(self.err(format!("an item of {n} bytes, the limit is {limit}")));
        }
        self.take(n)
    }

    /// The body must be consumed exactly.
    pub fn end(&self) -> Result<(), Malformed> {
        if self.remaining() != 0 {
            return Err(self.err(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}
