//! A copy-on-write overlay over a snapshot image: what `serve --writable`
//! writes into (never into the store), and what `backup --from-export`
//! turns into a new snapshot.
//!
//! An overlay is a directory (format in `docs/FORMAT.md`, "Overlay
//! directory"): `overlay.json` names the base snapshot and the image size,
//! `data.img` is a sparse file of that size holding every written 4 KiB
//! block at its offset, and `dirty.bitmap` has one bit per block, set when
//! the block in `data.img` replaces the base. A block is written whole to
//! `data.img` before its bit is set (a partial write first copies the base
//! block), and the bitmap is replaced atomically (temp file, fsync, rename)
//! after `data.img` is synced — at every flush the client asks for and when
//! a client disconnects. So after a crash the overlay holds at least every
//! write the client saw flushed, which is the block-device contract.
//!
//! The dirty blocks are exactly a change list: a backup of the overlay is a
//! changed-block backup against the base that reads only them.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use imgstore_format::{Id, OverlayRecord, Snapshot, OVERLAY_FILE as META};

use crate::{EngineError, ImageReader};

/// Overlay block size: the unit of copy-on-write.
pub const OVERLAY_BLOCK: u64 = 4096;

const DATA: &str = "data.img";
const BITMAP: &str = "dirty.bitmap";

/// An open overlay.
pub struct Overlay {
    dir: PathBuf,
    data: File,
    /// Holds an exclusive `flock` on `lock`: one server per overlay.
    _lock: File,
    size: u64,
    /// One bit per block; the mutex also serialises writes.
    dirty: Mutex<Vec<u64>>,
    /// Serialises flushes: each writes the bitmap through one temporary
    /// file (two at once truncated and renamed it under each other; most
    /// concurrent flushes failed, and the client saw EIO).
    flushing: Mutex<()>,
}

fn bad(dir: &Path, why: String) -> EngineError {
    EngineError::BadTarget {
        path: dir.to_path_buf(),
        why,
    }
}

fn io(dir: &Path, what: &str, e: std::io::Error) -> EngineError {
    bad(dir, format!("{what}: {e}"))
}

/// What `overlay.json` records.
pub struct OverlayInfo {
    pub base: Id,
    pub size: u64,
    pub data: PathBuf,
    /// Dirty byte ranges `(offset, length)`, merged, clipped to the size.
    pub dirty: Vec<(u64, u64)>,
}

fn read_bitmap(dir: &Path, blocks: u64) -> Result<Vec<u64>, EngineError> {
    let words = blocks.div_ceil(64) as usize;
    match fs::read(dir.join(BITMAP)) {
        Ok(b) if b.len() == words * 8 => Ok(b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()),
        Ok(b) => Err(bad(
            dir,
            format!(
                "{BITMAP} holds {} bytes, expected {}: the overlay is damaged",
                b.len(),
                words * 8
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![0; words]),
        Err(e) => Err(io(dir, "cannot read the dirty bitmap", e)),
    }
}

fn ranges(bits: &[u64], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, word) in bits.iter().enumerate() {
        if *word == 0 {
            continue;
        }
        for b in 0..64 {
            if word & (1 << b) != 0 {
                let off = (w as u64 * 64 + b) * OVERLAY_BLOCK;
                let len = OVERLAY_BLOCK.min(size.saturating_sub(off));
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += len,
                    _ => out.push((off, len)),
                }
            }
        }
    }
    out
}

/// Reads an overlay directory's record and dirty ranges.
/// The overlay in a directory held for this process alone: while it is
/// held no `serve --writable` can write into it (and while one serves, it
/// cannot be taken).
pub struct OverlayLock(File);

/// Takes the overlay lock of `dir`, or says who holds it. A backup of the
/// overlay holds it for its whole run, so what it reads is the overlay as
/// its server last left it, never an image still being written.
pub fn lock_overlay(dir: &Path) -> Result<OverlayLock, EngineError> {
    if !dir.join(META).is_file() {
        // Checked first, so no lock file is left in a directory that is
        // not an overlay.
        overlay_info(dir)?;
    }
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join("lock"))
        .map_err(|e| io(dir, "cannot create the overlay lock", e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            bad(
                dir,
                "is in use by a running `imgstore serve --writable` (or a backup of it): stop it first (Ctrl-C keeps every write)".into(),
            )
        },
    )?;
    Ok(OverlayLock(lock))
}

pub fn overlay_info(dir: &Path) -> Result<OverlayInfo, EngineError> {
    let text = fs::read_to_string(dir.join(META)).map_err(|e| {
        bad(
            dir,
            format!("is not an imgstore overlay ({META}: {e}); make one with `imgstore serve SNAPSHOT --writable DIR`"),
        )
    })?;
    let OverlayRecord { base, size } = OverlayRecord::from_json(text.as_bytes())
        .map_err(|e| bad(dir, format!("{META}: {e}: the overlay is damaged")))?;
    let bits = read_bitmap(dir, size.div_ceil(OVERLAY_BLOCK))?;
    Ok(OverlayInfo {
        base,
        size,
        data: dir.join(DATA),
        dirty: ranges(&bits, size),
    })
}

impl Overlay {
    /// Opens the overlay in `dir` for snapshot `base_id`, creating it when
    /// `dir` is absent or empty. An overlay of another snapshot is refused.
    pub fn open(dir: &Path, base_id: &Id, base: &Snapshot) -> Result<Overlay, EngineError> {
        let fresh = !dir.join(META).exists();
        if fresh {
            fs::create_dir_all(dir)
                .map_err(|e| io(dir, "cannot create the overlay directory", e))?;
            let meta = OverlayRecord {
                base: *base_id,
                size: base.size,
            }
            .to_json();
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(META))
                .map_err(|e| io(dir, "cannot create the overlay record", e))?;
            f.write_all(&meta)
                .and_then(|_| f.sync_all())
                .map_err(|e| io(dir, "cannot write the overlay record", e))?;
        } else {
            let info = overlay_info(dir)?;
            if info.base != *base_id {
                return Err(bad(
                    dir,
                    format!(
                        "holds an overlay of snapshot {}, not {}: use another directory",
                        info.base.short(),
                        base_id.short()
                    ),
                ));
            }
        }
        let lock = lock_overlay(dir)?.0;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(DATA))
            .map_err(|e| io(dir, "cannot open the overlay data", e))?;
        data.set_len(base.size)
            .map_err(|e| io(dir, "cannot size the overlay data", e))?;
        let dirty = read_bitmap(dir, base.size.div_ceil(OVERLAY_BLOCK))?;
        Ok(Overlay {
            dir: dir.to_path_buf(),
            data,
            _lock: lock,
            size: base.size,
            dirty: Mutex::new(dirty),
            flushing: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn is_dirty(bits: &[u64], block: u64) -> bool {
        bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(EngineError::Invalid {
                what: "overlay access",
                why: format!("{offset}+{len} is beyond the {}-byte image", self.size),
            });
        }
        Ok(())
    }

    /// Writes `data` at `offset` (copy-on-write per 4 KiB block).
    pub fn write_at(
        &self,
        base: &ImageReader<'_>,
        offset: u64,
        data: &[u8],
    ) -> Result<(), EngineError> {
        self.check_range(offset, data.len() as u64)?;
        let mut bits = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + data.len() as u64;
        let mut block = offset / OVERLAY_BLOCK;
        let mut buf = vec![0u8; OVERLAY_BLOCK as usize];
        while block * OVERLAY_BLOCK < end {
            let bstart = block * OVERLAY_BLOCK;
            let blen = OVERLAY_BLOCK.min(self.size - bstart);
            let (from, to) = (offset.max(bstart), end.min(bstart + blen));
            let src = &data[(from - offset) as usize..(to - offset) as usize];
            if from == bstart && to == bstart + blen {
                self.data
                    .write_all_at(src, bstart)
                    .map_err(|e| io(&self.dir, "cannot write the overlay", e))?;
            } else {
                // A partial block: start from its current content.
                let b = &mut buf[..blen as usize];
                if Self::is_dirty(&bits, block) {
                    self.data
                        .read_exact_at(b, bstart)
                        .map_err(|e| io(&self.dir, "cannot read the overlay", e))?;
                } else {
                    base.read_at(bstart, b)?;
                }
                b[(from - bstart) as usize..(to - bstart) as usize].copy_from_slice(src);
                self.data
                    .write_all_at(b, bstart)
                    .map_err(|e| io(&self.dir, "cannot write the overlay", e))?;
            }
            bits[(block / 64) as usize] |= 1 << (block % 64);
            block += 1;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn write_zeros(
        &self,
        base: &ImageReader<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(base, pos, &zeros[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Runs `(start, end, dirty)` covering `[offset, end)`, block-aligned
    /// inside; computed under the lock, so reads need not hold it.
    fn runs(&self, offset: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let bits = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / OVERLAY_BLOCK;
            let stop = ((block + 1) * OVERLAY_BLOCK).min(end);
            let dirty = Self::is_dirty(&bits, block);
            match out.last_mut() {
                Some(last) if last.2 == dirty => last.1 = stop,
                _ => out.push((pos, stop, dirty)),
            }
            pos = stop;
        }
        out
    }

    /// Reads the overlay's view: written blocks from the overlay, the rest from the base.
    pub fn read_at(
        &self,
        base: &ImageReader<'_>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        self.check_range(offset, buf.len() as u64)?;
        for (start, stop, dirty) in self.runs(offset, offset + buf.len() as u64) {
            let dst = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            if dirty {
                self.data
                    .read_exact_at(dst, start)
                    .map_err(|e| io(&self.dir, "cannot read the overlay", e))?;
            } else {
                base.read_at(start, dst)?;
            }
        }
        Ok(())
    }

    /// Allocation map of the overlay's view: written blocks count as data.
    pub fn map(
        &self,
        base: &ImageReader<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, bool)>, EngineError> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (start, stop, dirty) in self.runs(offset, (offset + len).min(self.size)) {
            let runs = if dirty {
                vec![(stop - start, false)]
            } else {
                base.map(start, stop - start)?
            };
            for (n, zero) in runs {
                match out.last_mut() {
                    Some(last) if last.1 == zero => last.0 += n,
                    _ => out.push((n, zero)),
                }
            }
        }
        Ok(out)
    }

    /// Makes every write so far durable: syncs the data, then replaces the
    /// bitmap atomically.
    pub fn flush(&self) -> Result<(), EngineError> {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let bits = self.dirty.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.data
            .sync_all()
            .map_err(|e| io(&self.dir, "cannot sync the overlay", e))?;
        let tmp = self.dir.join(format!("{BITMAP}.tmp"));
        let bytes: Vec<u8> = bits.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&self.dir, "cannot write the dirty bitmap", e))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .and_then(|_| fs::rename(&tmp, self.dir.join(BITMAP)))
            .and_then(|_| File::open(&self.dir)?.sync_all())
            .map_err(|e| io(&self.dir, "cannot write the dirty bitmap", e))
    }
}
