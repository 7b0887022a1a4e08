//! Buffers and file access for direct I/O (`O_DIRECT`).
//!
//! Why: a restore writes each region once and never reads it back, so the
//! page cache only costs there — a copy of every byte and an `fsync` with
//! everything still to write; restores write regions direct. A backup
//! reads through the page cache by default (with read-ahead, see
//! `Positional::prefetch`): direct reads cut its system time by more than
//! half, but with one request per thread in flight they were no faster cold
//! and read a cached image from the disk again (docs/BENCHMARKS.md), so
//! they are opt-in (`backup --direct-io`). Direct I/O needs the buffer, the
//! file offset and the length aligned to the device's logical block size;
//! [`ALIGN`] (4 KiB) covers 512-byte and 4 KiB devices. Whoever uses it
//! falls back to buffered I/O when the file system refuses (`EINVAL`:
//! tmpfs, some network file systems, unusual block sizes).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Alignment of buffers, offsets and lengths for direct I/O.
pub(crate) const ALIGN: usize = 4096;

pub(crate) fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

pub(crate) fn align_down(n: usize) -> usize {
    n / ALIGN * ALIGN
}

/// A byte buffer whose start is [`ALIGN`]-aligned, with room to round its
/// length up to a multiple of [`ALIGN`] (for the last, partial block of a
/// file). Dereferences to its `len` bytes.
#[derive(Default)]
pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer holding `v` as it is (not necessarily aligned).
    pub(crate) fn from_vec(v: Vec<u8>) -> AlignedBuf {
        let len = v.len();
        AlignedBuf {
            vec: v,
            start: 0,
            len,
        }
    }

    /// Makes the buffer `len` bytes long. The contents are unspecified (old
    /// bytes are kept, new ones are zero): the caller fills every byte.
    pub(crate) fn reset(&mut self, len: usize) {
        let room = align_up(len);
        if self.vec.capacity() < room + ALIGN {
            self.vec = Vec::with_capacity(room + ALIGN);
        }
        // The vector never reallocates below (its capacity suffices), so the
        // aligned start stays valid until the next reset.
        let start = self.vec.as_ptr().align_offset(ALIGN);
        self.start = if start < ALIGN { start } else { 0 };
        if self.vec.len() < self.start + room {
            self.vec.resize(self.start + room, 0);
        }
        self.len = len;
    }

    /// Bytes `a..b` of the buffer, where `b` may reach past the length up to
    /// the next multiple of [`ALIGN`].
    pub(crate) fn io_mut(&mut self, a: usize, b: usize) -> &mut [u8] {
        &mut self.vec[self.start + a..self.start + b]
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

/// A second handle on a file, opened with `O_DIRECT`, given up for good
/// the first time the file system refuses a direct request (`EINVAL`:
/// tmpfs on older kernels, some network file systems, unusual block
/// sizes); its user then does that request, and all later ones, buffered.
#[derive(Default)]
pub(crate) struct Direct {
    file: Option<File>,
    refused: AtomicBool,
}

impl Direct {
    /// Opens `path` for reading (`write` false) or writing; a file system
    /// that refuses at open gives a handle that is never used.
    pub(crate) fn open(path: &Path, write: bool) -> Direct {
        let file = OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        Direct {
            file,
            refused: AtomicBool::new(false),
        }
    }

    /// The direct handle, while direct I/O works and `buf` is aligned.
    pub(crate) fn usable(&self, buf: &[u8]) -> Option<&File> {
        self.file
            .as_ref()
            .filter(|_| buf.as_ptr() as usize % ALIGN == 0 && !self.refused.load(Relaxed))
    }

    /// Whether reads and writes go direct (open worked, not refused yet).
    pub(crate) fn is_on(&self) -> bool {
        self.file.is_some() && !self.refused.load(Relaxed)
    }

    /// Whether the error of a direct request means "not possible here"
    /// (then direct I/O is off from now on, and the caller retries
    /// buffered) rather than a real I/O error.
    pub(crate) fn refuses(&self, e: &std::io::Error) -> bool {
        let refusal = e.kind() == ErrorKind::InvalidInput
            || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error());
        if refusal {
            self.refused.store(true, Relaxed);
        }
        refusal
    }
}

/// Reads into `buf` (aligned start and length) from `pos` (aligned) with a
/// direct file until `buf` is full or end of file; returns the bytes read.
pub(crate) fn read_direct(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                // Only the end of the file gives a partial block.
                if done % ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` (aligned start and length) at `pos` (aligned) with a
/// direct file.
pub(crate) fn write_direct(file: &File, buf: &[u8], pos: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.write_at(&buf[done..], pos + done as u64) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_keeps_alignment_and_room() {
        let mut b = AlignedBuf::default();
        for len in [0, 1, 4095, 4096, 4097, 8 << 20, 100, (8 << 20) + 1] {
            b.reset(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert_eq!(b.io_mut(0, align_up(len)).len(), align_up(len));
        }
    }

    #[test]
    fn direct_round_trip_or_refused() {
        let dir = std::env::temp_dir().join(format!("imgstore-aligned-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mut b = AlignedBuf::default();
        b.reset(10_000);
        let direct = Direct::open(&path, false);
        match direct.usable(&b) {
            // File systems without O_DIRECT refuse at open.
            None => assert!(direct.file.is_none()),
            Some(f) => {
                let n = read_direct(f, b.io_mut(0, align_up(10_000)), 0).unwrap();
                assert_eq!(n, 10_000);
                assert!(b.iter().all(|&x| x == 7));
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
