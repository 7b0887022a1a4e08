//! The client's cache of a server repository: what a backup needs from the
//! server before its first byte can be sent, kept from the last run so the
//! next one can start at once (docs/FORMAT.md, "Client cache").
//!
//! Over a 150 ms link a backup spends its first half second learning what
//! it learned last night: the server's hello (the repository's config), the
//! snapshot listing (its parent) and the parent's index pages. The cache
//! holds them; the backup starts from them while the real answers are on
//! their way, and commits only once they agree (`imgstore_remote`'s
//! `connect_ahead`). Nothing here is trusted: a page is used only when it
//! opens under its id, the hello only when the server sends the same bytes,
//! the parent only when the server's listing picks it too.

use crate::codec::{Reader, Writer};
use crate::{FormatError, Id};

/// The largest hello kept (a server's is a few hundred bytes).
pub const HELLO_BYTES: usize = 1 << 20;
/// The largest snapshot record kept (the server's own bound).
pub const RECORD_BYTES: usize = 1 << 20;
/// The most pages kept for one snapshot: those a session can pin as it
/// opens (1,024 pages name 1,024 regions each: an 8 TiB image at the
/// default region size). A larger parent is read from the server.
pub const MAX_PAGES: usize = 1024;
/// The most bytes of pages kept for one snapshot.
pub const PAGES_BYTES: usize = 64 << 20;

const HELLO_MAGIC: &[u8; 8] = b"imgsCH\x00\x01";
const SNAPSHOT_MAGIC: &[u8; 8] = b"imgsCS\x00\x01";

/// A server's hello as it was last received, with the round-trip time then
/// measured (which sizes the calls kept in flight before one is measured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedHello {
    pub rtt_us: u64,
    pub hello: Vec<u8>,
}

impl CachedHello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(self.hello.len() + 24));
        w.bytes(HELLO_MAGIC);
        w.u64(self.rtt_us);
        w.u32(self.hello.len() as u32);
        w.bytes(&self.hello);
        w.0
    }

    pub fn decode(b: &[u8]) -> Result<CachedHello, FormatError> {
        let mut r = Reader::new(b, "cached hello");
        magic(&mut r, HELLO_MAGIC, "cached hello")?;
        let rtt_us = r.u64()?;
        let hello = sized(&mut r, HELLO_BYTES, "cached hello")?.to_vec();
        r.finish()?;
        Ok(CachedHello { rtt_us, hello })
    }
}

/// The last snapshot this client committed of an image: its id, its record
/// as stored (sealed in an encrypted repository) and its index pages as
/// stored, each with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSnapshot {
    pub id: Id,
    pub record: Vec<u8>,
    pub pages: Vec<(Id, Vec<u8>)>,
}

impl CachedSnapshot {
    /// Whether it is small enough to keep (see the bounds above).
    pub fn fits(&self) -> bool {
        self.record.len() <= RECORD_BYTES
            && self.pages.len() <= MAX_PAGES
            && self.pages.iter().map(|p| p.1.len()).sum::<usize>() <= PAGES_BYTES
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.bytes(SNAPSHOT_MAGIC);
        w.bytes(&self.id.0);
        w.u32(self.record.len() as u32);
        w.bytes(&self.record);
        w.u32(self.pages.len() as u32);
        for (id, page) in &self.pages {
            w.bytes(&id.0);
            w.u32(page.len() as u32);
            w.bytes(page);
        }
        w.0
    }

    pub fn decode(b: &[u8]) -> Result<CachedSnapshot, FormatError> {
        let mut r = Reader::new(b, "cached snapshot");
        magic(&mut r, SNAPSHOT_MAGIC, "cached snapshot")?;
        let id = r.id()?;
        let record = sized(&mut r, RECORD_BYTES, "cached snapshot")?.to_vec();
        let n = r.count(36)?;
        if n > MAX_PAGES {
            return Err(FormatError::Invalid {
                what: "cached snapshot",
                why: format!("{n} pages, more than {MAX_PAGES}"),
            });
        }
        let (mut pages, mut total) = (Vec::with_capacity(n), 0usize);
        for _ in 0..n {
            let pid = r.id()?;
            let page = sized(&mut r, PAGES_BYTES - total, "cached snapshot")?;
            total += page.len();
            pages.push((pid, page.to_vec()));
        }
        r.finish()?;
        Ok(CachedSnapshot { id, record, pages })
    }
}

fn magic(r: &mut Reader<'_>, want: &[u8; 8], what: &'static str) -> Result<(), FormatError> {
    let got = r.take(8)?;
    if got[..7] != want[..7] {
        return Err(FormatError::Invalid {
            what,
            why: "not an imgstore cache file".into(),
        });
    }
    if got[7] != want[7] {
        return Err(FormatError::Version {
            what,
            version: got[7],
        });
    }
    Ok(())
}

/// A u32 length, at most `max`, then that many bytes.
fn sized<'a>(r: &mut Reader<'a>, max: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
    let n = r.u32()? as usize;
    if n > max {
        return Err(FormatError::Invalid {
            what,
            why: format!("a field of {n} bytes, more than {max}"),
        });
    }
    r.take(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> CachedSnapshot {
        CachedSnapshot {
            id: Id::hash(b"record"),
            record: b"record".to_vec(),
            pages: vec![
                (Id::hash(b"p1"), b"p1".to_vec()),
                (Id::hash(b"p2"), vec![7; 300]),
            ],
        }
    }

    #[test]
    fn entries_round_trip() {
        let s = snap();
        assert_eq!(CachedSnapshot::decode(&s.encode()).unwrap(), s);
        let h = CachedHello {
            rtt_us: 150_000,
            hello: br#"{"protocol":1}"#.to_vec(),
        };
        assert_eq!(CachedHello::decode(&h.encode()).unwrap(), h);
    }

    /// The bytes must never change silently: a client reading another
    /// version's file would misread it (it is then ignored, not misread).
    #[test]
    fn golden_hello() {
        let h = CachedHello {
            rtt_us: 1,
            hello: b"{}".to_vec(),
        };
        assert_eq!(
            h.encode(),
            b"imgsCH\x00\x01\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00{}".to_vec()
        );
    }

    proptest::proptest! {
        // The decoders' fuzz test: any bytes, with a valid magic or not,
        // give Ok or Err, never a panic or a large allocation.
        #[test]
        fn decoders_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), which in 0u8..3) {
            let mut b = match which {
                0 => SNAPSHOT_MAGIC.to_vec(),
                1 => HELLO_MAGIC.to_vec(),
                _ => Vec::new(),
            };
            b.extend_from_slice(&tail);
            let _ = CachedSnapshot::decode(&b);
            let _ = CachedHello::decode(&b);
        }
    }

    #[test]
    fn damaged_entries_are_refused_not_misread() {
        let good = snap().encode();
        for cut in 0..good.len() {
            assert!(
                CachedSnapshot::decode(&good[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut other = good.clone();
        other[7] = 2;
        assert!(matches!(
            CachedSnapshot::decode(&other),
            Err(FormatError::Version { version: 2, .. })
        ));
        assert!(CachedHello::decode(&good).is_err());
        // A count that claims more pages than the file holds allocates nothing.
        let mut lying = good[..8 + 32 + 4 + 6].to_vec();
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(CachedSnapshot::decode(&lying).is_err());
        // A page larger than the bound.
        let mut big = snap();
        big.pages = vec![(Id::hash(b"x"), vec![0; PAGES_BYTES + 1])];
        assert!(!big.fits());
        assert!(CachedSnapshot::decode(&big.encode()).is_err());
    }
}
