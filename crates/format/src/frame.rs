//! Chunk frames: the value stored for each chunk in the `chunks` column family.
//!
//! ```text
//! offset size field
//! 0      1    codec: 0 = raw, 1 = zstd
//! 1      4    raw length (u32 LE): length of the chunk's bytes
//! 5      ..   payload: the chunk's bytes (raw) or one zstd frame (zstd)
//! ```

use crate::FormatError;

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest chunk a frame may describe (16 MiB, FastCDC 2020's maximum). A
/// decoder refuses larger raw lengths before allocating.
pub const MAX_CHUNK_LEN: usize = 16 << 20;

/// The payload encoding of a chunk frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkCodec {
    Raw = 0,
    Zstd = 1,
}

/// Encodes `data` as a frame, compressing with `compressor` when that saves at
/// least 1/32 of the bytes (incompressible data is stored raw, so reading it
/// back costs a copy, not a failed decompression).
pub fn encode_chunk(data: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + data.len());
    out.push(ChunkCodec::Zstd as u8);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let bound = zstd::zstd_safe::compress_bound(data.len());
    out.resize(FRAME_HEADER_LEN + bound, 0);
    let compressed = compressor
        .compress_to_buffer(data, &mut out[FRAME_HEADER_LEN..])
        .ok()
        .filter(|&n| n < data.len() - data.len() / 32);
    match compressed {
        Some(n) => out.truncate(FRAME_HEADER_LEN + n),
        None => {
            out.truncate(FRAME_HEADER_LEN);
            out[0] = ChunkCodec::Raw as u8;
            out.extend_from_slice(data);
        }
    }
    out
}

/// A frame's codec tag, declared length (checked against
/// [`MAX_CHUNK_LEN`]) and payload.
fn header(frame: &[u8]) -> Result<(u8, usize, &[u8]), FormatError> {
    if frame.len() < FRAME_HEADER_LEN {
        return Err(FormatError::Truncated {
            what: WHAT,
            offset: 0,
            needed: FRAME_HEADER_LEN - frame.len(),
        });
    }
    let raw_len = u32::from_le_bytes(frame[1..5].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_CHUNK_LEN {
        return Err(FormatError::Invalid {
            what: WHAT,
            why: format!("declared length {raw_len} exceeds {MAX_CHUNK_LEN}"),
        });
    }
    Ok((frame[0], raw_len, &frame[FRAME_HEADER_LEN..]))
}

const WHAT: &str = "chunk frame";

/// Decodes a frame into `out` (replacing its contents). Checks the declared
/// length against [`MAX_CHUNK_LEN`] before allocating and the decoded length
/// against the declared one after.
pub fn decode_chunk(
    frame: &[u8],
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    out: &mut Vec<u8>,
) -> Result<ChunkCodec, FormatError> {
    let (_, raw_len, _) = header(frame)?;
    out.clear();
    out.resize(raw_len, 0);
    decode_chunk_into(frame, decompressor, out)
}

/// Decodes a chunk frame straight into `out`, which must be exactly the
/// chunk's length (the recipe says it): no intermediate buffer, so a
/// restore decompresses into the region it writes.
pub fn decode_chunk_into(
    frame: &[u8],
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    out: &mut [u8],
) -> Result<ChunkCodec, FormatError> {
    let (tag, raw_len, payload) = header(frame)?;
    if raw_len != out.len() {
        return Err(FormatError::Invalid {
            what: WHAT,
            why: format!("header says {raw_len} bytes, the recipe {}", out.len()),
        });
    }
    match tag {
        0 if payload.len() == raw_len => {
            out.copy_from_slice(payload);
            Ok(ChunkCodec::Raw)
        }
        0 => Err(FormatError::Invalid {
            what: WHAT,
            why: format!(
                "raw payload of {} bytes, header says {raw_len}",
                payload.len()
            ),
        }),
        1 => match decompressor.decompress_to_buffer(payload, out) {
            Ok(n) if n == raw_len => Ok(ChunkCodec::Zstd),
            Ok(n) => Err(FormatError::Invalid {
                what: WHAT,
                why: format!("decoded {n} bytes, header says {raw_len}"),
            }),
            Err(e) => Err(FormatError::Invalid {
                what: WHAT,
                why: format!("zstd: {e}"),
            }),
        },
        tag => Err(FormatError::BadTag {
            what: "chunk codec",
            tag,
        }),
    }
}

/// A chunk codec owning its zstd contexts: what the engine compresses and
/// decompresses chunks with, so that only this crate depends on zstd and
/// the frame layout and its compressor live together.
///
/// Contexts are costly to create (a compressor at level 3 holds about
/// 1 MiB), so each worker thread keeps one ([`FrameCodec::with_thread`]).
pub struct FrameCodec {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl FrameCodec {
    /// A codec without contexts yet (they are made on first use).
    pub const fn new() -> FrameCodec {
        FrameCodec {
            compressor: None,
            decompressor: None,
        }
    }

    /// Runs `f` with this thread's codec.
    pub fn with_thread<T>(f: impl FnOnce(&mut FrameCodec) -> T) -> T {
        thread_local! {
            static CODEC: std::cell::RefCell<FrameCodec> = const { std::cell::RefCell::new(FrameCodec::new()) };
        }
        CODEC.with(|c| f(&mut c.borrow_mut()))
    }

    /// Encodes `data` as a frame at zstd `level` (see [`encode_chunk`]).
    pub fn encode(&mut self, data: &[u8], level: i32) -> Vec<u8> {
        if self.compressor.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level)
                .or_else(|_| zstd::bulk::Compressor::new(zstd::DEFAULT_COMPRESSION_LEVEL))
                .expect("zstd compression context");
            self.compressor = Some((level, c));
        }
        encode_chunk(data, &mut self.compressor.as_mut().expect("set above").1)
    }

    fn decompressor(&mut self) -> &mut zstd::bulk::Decompressor<'static> {
        self.decompressor
            .get_or_insert_with(|| zstd::bulk::Decompressor::new().expect("zstd context"))
    }

    /// Decodes a frame into `out` (see [`decode_chunk`]).
    pub fn decode(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<ChunkCodec, FormatError> {
        decode_chunk(frame, self.decompressor(), out)
    }

    /// Decodes a frame into `out`, exactly the chunk's length (see [`decode_chunk_into`]).
    pub fn decode_into(&mut self, frame: &[u8], out: &mut [u8]) -> Result<ChunkCodec, FormatError> {
        decode_chunk_into(frame, self.decompressor(), out)
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressible_and_random() {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let text = b"hello disk image ".repeat(4000);
        let f = encode_chunk(&text, &mut c);
        assert_eq!(f[0], ChunkCodec::Zstd as u8);
        assert!(f.len() < text.len() / 10);
        let mut out = Vec::new();
        decode_chunk(&f, &mut d, &mut out).unwrap();
        assert_eq!(out, text);

        let random: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let f = encode_chunk(&random, &mut c);
        decode_chunk(&f, &mut d, &mut out).unwrap();
        assert_eq!(out, random);
    }

    #[test]
    fn decode_into_matches_decode_and_checks_length() {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let text = b"region bytes ".repeat(3000);
        let raw: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for data in [&text[..], &raw[..]] {
            let f = encode_chunk(data, &mut c);
            let mut out = vec![0u8; data.len()];
            decode_chunk_into(&f, &mut d, &mut out).unwrap();
            assert_eq!(out, data);
            let mut short = vec![0u8; data.len() - 1];
            assert!(decode_chunk_into(&f, &mut d, &mut short).is_err());
        }
        assert!(decode_chunk_into(&[0, 4, 0, 0, 0, 1, 2], &mut d, &mut [0; 4]).is_err());
        assert!(decode_chunk_into(&[1, 4, 0, 0, 0, 1, 2, 3], &mut d, &mut [0; 4]).is_err());
        assert!(decode_chunk_into(&[9, 4, 0, 0, 0], &mut d, &mut [0; 4]).is_err());
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut out = Vec::new();
        assert!(decode_chunk(&[1, 0xff, 0xff, 0xff, 0xff, 0], &mut d, &mut out).is_err());
        assert!(decode_chunk(&[1, 4, 0, 0, 0, 1, 2, 3], &mut d, &mut out).is_err());
        assert!(decode_chunk(&[0, 4, 0, 0, 0, 1, 2], &mut d, &mut out).is_err());
        assert!(decode_chunk(&[7, 0, 0, 0, 0], &mut d, &mut out).is_err());
        assert!(decode_chunk(&[0, 0], &mut d, &mut out).is_err());
    }

    proptest::proptest! {
        // Hostile frames: random bytes and valid frames with one byte
        // changed decode to an error or to exactly the declared length,
        // never a panic, never more than MAX_CHUNK_LEN bytes.
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut d = zstd::bulk::Decompressor::new().unwrap();
            let mut out = Vec::new();
            if decode_chunk(&bytes, &mut d, &mut out).is_ok() {
                proptest::prop_assert!(out.len() <= MAX_CHUNK_LEN);
                proptest::prop_assert_eq!(out.len() as u32, u32::from_le_bytes(bytes[1..5].try_into().unwrap()));
            }
        }

        #[test]
        fn mutated_frames_never_panic(pos in 0usize..2000, val in proptest::prelude::any::<u8>(), seed in 0u32..1000) {
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            let mut d = zstd::bulk::Decompressor::new().unwrap();
            let data: Vec<u8> = (0..20_000u32).map(|i| ((i / 7) ^ seed) as u8).collect();
            let mut f = encode_chunk(&data, &mut c);
            let p = pos % f.len();
            f[p] = val;
            let mut out = Vec::new();
            if decode_chunk(&f, &mut d, &mut out).is_ok() {
                proptest::prop_assert_eq!(out.len() as u32, u32::from_le_bytes(f[1..5].try_into().unwrap()));
            }
        }
    }
}
