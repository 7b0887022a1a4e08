//! Content-defined chunking of disk-image regions.
//!
//! A disk image is mostly two things: runs of zeros (unallocated blocks,
//! holes) and data that changes in place between backups. This crate turns one
//! in-memory *region* of an image into a list of [`Extent`]s:
//!
//! * **Zero extents** — runs of at least [`Params::zero_min`] bytes of zeros,
//!   aligned to [`BLOCK`] (4 KiB) boundaries relative to the region start.
//!   They are found first, with a word-wise scan, so they are never hashed,
//!   compressed or stored, and a restore can leave holes for them.
//! * **Data extents** — the bytes between zero runs, cut with FastCDC (the 2020
//!   variant, normalisation level 1, gear table seed 0) into chunks of
//!   `min..=max` bytes averaging `avg`. A data chunk that happens to be all
//!   zeros is reported as a zero extent too.
//!
//! Why zero runs cut the data stream instead of being chunked like any other
//! byte: a zero run's position is itself content, so cutting there is as
//! stable under edits as a FastCDC cut, and it lets a 100 GiB disk with 5 GiB
//! of data cost 5 GiB of chunking work.
//!
//! The crate knows nothing of storage, hashing or I/O: it is a pure function
//! of (parameters, bytes), which is what makes chunk boundaries — and so
//! deduplication against existing repositories — stable. The golden tests at
//! the bottom of this file pin them.

use std::fmt;

/// Granularity of zero detection, and the alignment of zero extents.
pub const BLOCK: usize = 4096;

/// Chunking parameters. Fixed per repository at `init`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Smallest data chunk FastCDC may cut (except at the end of a data span).
    pub min: u32,
    /// Target average data chunk size.
    pub avg: u32,
    /// Largest data chunk.
    pub max: u32,
    /// Shortest zero run (a multiple of [`BLOCK`]) recorded as a zero extent.
    pub zero_min: u32,
}

/// Why a [`Params`] value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParams(pub String);

impl fmt::Display for InvalidParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidParams {}

impl Params {
    /// The default: 16/64/256 KiB, zero runs of 16 KiB or more.
    pub const DEFAULT: Params = Params {
        min: 16 * 1024,
        avg: 64 * 1024,
        max: 256 * 1024,
        zero_min: 16 * 1024,
    };

    /// Parameters for a chosen average size: min = avg/4, max = avg*4,
    /// zero runs of at least min (rounded up to a block).
    pub fn with_avg(avg: u32) -> Result<Params, InvalidParams> {
        let min = avg / 4;
        let p = Params {
            min,
            avg,
            max: avg.saturating_mul(4),
            zero_min: min.div_ceil(BLOCK as u32).max(1) * BLOCK as u32,
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks the bounds FastCDC 2020 supports and the invariants this crate relies on.
    pub fn validate(&self) -> Result<(), InvalidParams> {
        use fastcdc::v2020::*;
        let bad = |m: String| Err(InvalidParams(m));
        if !self.avg.is_power_of_two() {
            return bad(format!(
                "average chunk size {} is not a power of two",
                self.avg
            ));
        }
        if (self.avg as usize) < AVERAGE_MIN.max(4096) || self.avg as usize > AVERAGE_MAX {
            return bad(format!(
                "average chunk size {} is outside 4 KiB..={} bytes",
                self.avg, AVERAGE_MAX
            ));
        }
        if (self.min as usize) < MINIMUM_MIN
            || self.min as usize > MINIMUM_MAX
            || self.min >= self.avg
            || self.min % 2 != 0
        {
            return bad(format!("minimum chunk size {} is out of range", self.min));
        }
        if (self.max as usize) < MAXIMUM_MIN
            || self.max as usize > MAXIMUM_MAX
            || self.max <= self.avg
            || self.max % 2 != 0
        {
            return bad(format!("maximum chunk size {} is out of range", self.max));
        }
        if self.zero_min == 0 || self.zero_min as usize % BLOCK != 0 {
            return bad(format!(
                "zero run minimum {} is not a positive multiple of {BLOCK}",
                self.zero_min
            ));
        }
        Ok(())
    }
}

impl Default for Params {
    fn default() -> Self {
        Params::DEFAULT
    }
}

/// What an extent of a region holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Every byte is zero.
    Zero,
    /// A content-defined data chunk.
    Data,
}

/// A piece of a region: `len` bytes at `offset` (relative to the region start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: usize,
    pub len: usize,
    pub kind: Kind,
}

/// Splits regions into extents. Cheap to clone; holds only the parameters.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: Params,
    seed: u64,
}

static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// True when every byte of `buf` is zero.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    // memcmp against a static zero block: glibc's vectorised memcmp runs at
    // memory speed and stops at the first non-zero byte.
    buf.chunks(BLOCK).all(|c| c == &ZEROS[..c.len()])
}

impl Chunker {
    /// A chunker for validated parameters.
    pub fn new(params: Params) -> Result<Chunker, InvalidParams> {
        Chunker::with_seed(params, 0)
    }

    /// A chunker whose gear table is mixed with `seed` (an encrypted
    /// repository's, derived from its key, so chunk lengths do not
    /// fingerprint known data). Seed 0 is the plain table.
    pub fn with_seed(params: Params, seed: u64) -> Result<Chunker, InvalidParams> {
        params.validate()?;
        Ok(Chunker { params, seed })
    }

    /// The parameters this chunker cuts with.
    pub fn params(&self) -> Params {
        self.params
    }

    /// Splits `region` into extents covering it exactly, in order, appending
    /// them to `out` (which is cleared first).
    pub fn split(&self, region: &[u8], out: &mut Vec<Extent>) {
        out.clear();
        let zero_min = self.params.zero_min as usize;
        let mut data_start = 0usize;
        let mut pos = 0usize;
        while pos < region.len() {
            // Find the next run of zero blocks starting at a block boundary.
            let end = (pos + BLOCK).min(region.len());
            if end - pos == BLOCK && is_zero(&region[pos..end]) {
                let run_start = pos;
                let mut run_end = end;
                while run_end < region.len() {
                    let e = (run_end + BLOCK).min(region.len());
                    if !is_zero(&region[run_end..e]) {
                        break;
                    }
                    run_end = e;
                }
                if run_end - run_start >= zero_min {
                    self.cut_data(region, data_start, run_start, out);
                    out.push(Extent {
                        offset: run_start,
                        len: run_end - run_start,
                        kind: Kind::Zero,
                    });
                    data_start = run_end;
                }
                pos = run_end;
            } else {
                pos = end;
            }
        }
        self.cut_data(region, data_start, region.len(), out);
    }

    fn cut_data(&self, region: &[u8], start: usize, end: usize, out: &mut Vec<Extent>) {
        if start >= end {
            return;
        }
        let p = self.params;
        let span = &region[start..end];
        let cuts = if self.seed == 0 {
            fastcdc::v2020::FastCDC::new(span, p.min as usize, p.avg as usize, p.max as usize)
        } else {
            fastcdc::v2020::FastCDC::with_level_and_seed(
                span,
                p.min as usize,
                p.avg as usize,
                p.max as usize,
                fastcdc::v2020::Normalization::Level1,
                self.seed,
            )
        };
        for c in cuts {
            let offset = start + c.offset;
            let kind = if is_zero(&region[offset..offset + c.length]) {
                Kind::Zero
            } else {
                Kind::Data
            };
            // Merge adjacent zero extents so a region's description is canonical.
            if kind == Kind::Zero {
                if let Some(last) = out.last_mut() {
                    if last.kind == Kind::Zero && last.offset + last.len == offset {
                        last.len += c.length;
                        continue;
                    }
                }
            }
            out.push(Extent {
                offset,
                len: c.length,
                kind,
            });
        }
    }
}

/// Seeded pseudo-random input for tests, golden vectors and benchmarks of
/// every crate: one generator, here because the chunker's golden vectors
/// (and those of the binary's tests) are pinned to its bytes. Not for
/// anything secret; not part of the chunker's API.
#[doc(hidden)]
pub mod testing {
    /// A xorshift generator's state (Marsaglia). A state of 0 stays 0.
    #[derive(Clone, Copy, Debug)]
    pub struct Xorshift(pub u64);

    impl Xorshift {
        /// xorshift64 (shifts 13, 7, 17): the next state, which is the
        /// output (the engine's test images).
        pub fn next_plain(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// xorshift64* (shifts 12, 25, 27, then a multiply): the output
        /// [`seeded`] is made of.
        pub fn next_star(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// `len` bytes of xorshift64* from `state` as given (each output
    /// little-endian): the bytes of the golden vectors.
    pub fn seeded(len: usize, state: u64) -> Vec<u8> {
        let mut rng = Xorshift(state);
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&rng.next_star().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testing::seeded;
    use super::*;

    fn check_cover(region: &[u8], ext: &[Extent], p: Params) {
        let mut pos = 0;
        for e in ext {
            assert_eq!(e.offset, pos, "extents must be contiguous");
            assert!(e.len > 0);
            match e.kind {
                Kind::Zero => assert!(is_zero(&region[e.offset..e.offset + e.len])),
                Kind::Data => {
                    assert!(e.len <= p.max as usize);
                    assert!(!is_zero(&region[e.offset..e.offset + e.len]));
                }
            }
            pos += e.len;
        }
        assert_eq!(pos, region.len());
    }

    #[test]
    fn zero_runs_become_zero_extents_and_data_is_cut() {
        let p = Params::DEFAULT;
        let c = Chunker::new(p).unwrap();
        let mut region = seeded(4 << 20, 7);
        // A 1 MiB hole at a block boundary and a 8 KiB zero run (too short).
        region[(1 << 20)..(2 << 20)].fill(0);
        region[(3 << 20)..(3 << 20) + 8192].fill(0);
        let mut out = Vec::new();
        c.split(&region, &mut out);
        check_cover(&region, &out, p);
        let zeros: Vec<_> = out.iter().filter(|e| e.kind == Kind::Zero).collect();
        assert_eq!(zeros.len(), 1, "{zeros:?}");
        assert_eq!((zeros[0].offset, zeros[0].len), (1 << 20, 1 << 20));
    }

    #[test]
    fn all_zero_region_is_one_extent() {
        let c = Chunker::new(Params::DEFAULT).unwrap();
        let mut out = Vec::new();
        c.split(&vec![0u8; 8 << 20], &mut out);
        assert_eq!(
            out,
            vec![Extent {
                offset: 0,
                len: 8 << 20,
                kind: Kind::Zero
            }]
        );
        // A short tail of zeros below zero_min is still zero (all-zero chunk).
        c.split(&[0u8; 100], &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, Kind::Zero);
    }

    #[test]
    fn edit_changes_only_nearby_chunks() {
        let p = Params::DEFAULT;
        let c = Chunker::new(p).unwrap();
        let a = seeded(8 << 20, 99);
        let mut b = a.clone();
        b[5_000_000..5_004_096].copy_from_slice(&seeded(4096, 5));
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        c.split(&a, &mut ea);
        c.split(&b, &mut eb);
        check_cover(&b, &eb, p);
        let same = ea.iter().filter(|e| eb.contains(e)).count();
        assert!(same + 3 >= ea.len(), "{same} of {} kept", ea.len());
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(Params::with_avg(3000).is_err());
        assert!(Params::with_avg(1024).is_err());
        assert!(Params::with_avg(64 * 1024).is_ok());
        assert_eq!(Params::with_avg(64 * 1024).unwrap(), Params::DEFAULT);
        assert!(Params::with_avg(8 << 20).is_err());
    }

    /// Golden vector: boundaries of a seeded 4 MiB region (with a zero run).
    /// If this fails, chunk boundaries changed and new backups would no
    /// longer deduplicate against existing repositories: that is a format
    /// change, not a refactor.
    #[test]
    fn golden_boundaries() {
        let mut region = seeded(4 << 20, 0x1a2b_3c4d);
        region[(2 << 20)..(2 << 20) + (64 << 10)].fill(0);
        let c = Chunker::new(Params::DEFAULT).unwrap();
        let mut out = Vec::new();
        c.split(&region, &mut out);
        let got: Vec<(usize, char)> = out
            .iter()
            .map(|e| (e.len, if e.kind == Kind::Zero { 'z' } else { 'd' }))
            .collect();
        let golden: Vec<(usize, char)> = GOLDEN.to_vec();
        assert_eq!(got, golden);
    }

    #[rustfmt::skip]
    const GOLDEN: &[(usize, char)] = &[
    (169495, 'd'),
    (65457, 'd'),
    (178012, 'd'),
    (111186, 'd'),
    (53919, 'd'),
    (101953, 'd'),
    (52439, 'd'),
    (91647, 'd'),
    (48802, 'd'),
    (105145, 'd'),
    (39974, 'd'),
    (83596, 'd'),
    (23841, 'd'),
    (70460, 'd'),
    (121626, 'd'),
    (78488, 'd'),
    (80864, 'd'),
    (73470, 'd'),
    (84789, 'd'),
    (128550, 'd'),
    (38262, 'd'),
    (42657, 'd'),
    (28671, 'd'),
    (85431, 'd'),
    (138418, 'd'),
    (65536, 'z'),
    (75635, 'd'),
    (29727, 'd'),
    (45194, 'd'),
    (100926, 'd'),
    (48892, 'd'),
    (27633, 'd'),
    (90979, 'd'),
    (44083, 'd'),
    (46251, 'd'),
    (81695, 'd'),
    (91685, 'd'),
    (22547, 'd'),
    (67931, 'd'),
    (33035, 'd'),
    (73632, 'd'),
    (89832, 'd'),
    (180258, 'd'),
    (59879, 'd'),
    (64420, 'd'),
    (67471, 'd'),
    (73656, 'd'),
    (32519, 'd'),
    (56025, 'd'),
    (34729, 'd'),
    (62402, 'd'),
    (77304, 'd'),
    (81415, 'd'),
    (102553, 'd'),
    (28964, 'd'),
    (99782, 'd'),
    (40562, 'd'),
    ];
}
