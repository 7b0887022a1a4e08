//! Instant recovery: a snapshot served while it is restored underneath.
//!
//! A [`LiveTarget`] presents snapshot S as a writable disk whose bytes live
//! in TARGET (a file or block device) as soon as they are known there, and
//! in the repository until then. TARGET is cut into blocks of
//! [`LIVE_BLOCK`] bytes; a block is *final* once TARGET holds its snapshot
//! bytes or a client write has been applied to it, and a final block is
//! never written by the background copy again. Hence the one invariant
//! everything else follows from: **snapshot data never overwrites a final
//! block**.
//!
//! * Client reads of final blocks come from TARGET; of other blocks, from
//!   the snapshot (verified chunks), written into TARGET on the way and
//!   marked final.
//! * Client writes to a non-final block first fill it from the snapshot
//!   (copy-on-write at block granularity), apply the write, write the whole
//!   block and mark it final; writes to final blocks go straight to TARGET.
//! * [`LiveTarget::copy`] walks the snapshot a region at a time (one
//!   batched fetch, as a plain restore) and writes the non-final blocks of
//!   each region, zero extents zeroed as a plain restore zeroes them.
//! * Per-block locks (striped mutexes) keep the copy and client I/O from
//!   racing on one block; the copy takes a region's stripes in ascending
//!   order, a client one stripe at a time, so they cannot deadlock.
//!
//! Why a bitmap persisted this way is crash-safe: NBD makes a write
//! durable only once the client flushed. [`LiveTarget::flush`] copies the
//! bitmap, *then* syncs TARGET's data, *then* writes the copy to the state
//! file atomically (temporary file, fsync, rename, fsync of the
//! directory). Every bit in the copy was set after its block's data was
//! written, so the sync covers it; a block whose bit was not persisted
//! shows its snapshot bytes again after a resume — the state before an
//! unflushed write, which NBD allows to be lost. A flushed write's bit is
//! always persisted, so it is never overwritten. The state file's bytes
//! are in docs/FORMAT.md ("Live-restore state").
//!
//! A repository that fails turns client reads of non-final blocks into
//! errors (never wrong bytes: every chunk is verified); final blocks keep
//! being served; the copy retries with backoff. Nothing here prints: the
//! copy reports its retries through a callback.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use imgstore_format::{Id, Snapshot};
use imgstore_repo::Repository;

use crate::aligned::{align_down, write_direct, AlignedBuf, Direct};
use crate::image::ImageReader;
use crate::restore::{open_device_exclusive, Zeroing};
use crate::snapshot::SnapshotReader;
use crate::EngineError;

/// Block size of a live restore: the granularity of copy-on-write and of
/// the bitmap (1 TiB = 16 Mi blocks = a 2 MiB bitmap). It divides every
/// region size (a power of two of at least 8 MiB).
pub const LIVE_BLOCK: u64 = 64 << 10;

/// The state file's first bytes.
pub const LIVE_STATE_MAGIC: [u8; 8] = *b"IMGLIVE\0";
/// The state file's layout version.
pub const LIVE_STATE_VERSION: u32 = 1;
const HEADER: usize = 64;

/// Mutexes guarding blocks (block `b` is guarded by `b % STRIPES`).
const STRIPES: usize = 4096;

/// How the background copy runs.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// Decompressed-chunk cache for client reads.
    pub cache_bytes: usize,
    /// Threads of the background copy.
    pub copy_threads: usize,
    /// A pause after each region copied (tests slow the copy down with it
    /// to overlap it with client I/O; `None` in normal use).
    pub region_pause: Option<Duration>,
    /// How often the copy persists its progress.
    pub checkpoint_every: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            cache_bytes: 256 << 20,
            copy_threads: 3,
            region_pause: None,
            checkpoint_every: Duration::from_secs(2),
        }
    }
}

/// Counters of a live restore, for progress lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveStats {
    /// The image size.
    pub size: u64,
    /// Bytes of TARGET that are final (copied or written by a client).
    pub final_bytes: u64,
    /// Bytes the background copy made final in this run.
    pub copied_bytes: u64,
    /// Bytes final when this run started (from the state file).
    pub resumed_bytes: u64,
    /// Bytes clients wrote in this run.
    pub client_written_bytes: u64,
    /// Bytes of not-yet-restored blocks clients read (or wrote into),
    /// fetched from the repository.
    pub repo_read_bytes: u64,
}

impl LiveStats {
    pub fn complete(&self) -> bool {
        self.final_bytes >= self.size
    }
}

/// How [`LiveTarget::open`] found TARGET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveStart {
    /// A new live restore (TARGET created, or replaced with `force`).
    Fresh,
    /// A live restore resumed from its state file.
    Resumed,
}

/// TARGET under restore, servable as a disk (see the module docs).
pub struct LiveTarget<'a> {
    image: ImageReader<'a>,
    reader: SnapshotReader<'a>,
    id: Id,
    size: u64,
    region_size: u64,
    file: File,
    /// TARGET opened for direct writes, for the copy (when allowed).
    direct: Direct,
    path: PathBuf,
    device: bool,
    state: PathBuf,
    blocks: u64,
    bits: Vec<AtomicU64>,
    locks: Vec<Mutex<()>>,
    /// Serializes persisting (flushes from clients and checkpoints).
    persist: Mutex<()>,
    zeroing: Zeroing,
    final_bytes: AtomicU64,
    resumed_bytes: u64,
    copied: AtomicU64,
    client_written: AtomicU64,
    repo_read: AtomicU64,
    /// Client requests being served (the copy gives way to them).
    client_busy: AtomicUsize,
    opts: LiveOptions,
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn state_err(path: &Path, why: impl Into<String>) -> EngineError {
    EngineError::LiveState {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The state file's bytes for `bits` (docs/FORMAT.md).
fn encode_state(id: &Id, size: u64, blocks: u64, bits: &[u64]) -> Vec<u8> {
    let n = blocks.div_ceil(8) as usize;
    let mut b = Vec::with_capacity(HEADER + n + 32);
    b.extend_from_slice(&LIVE_STATE_MAGIC);
    b.extend_from_slice(&LIVE_STATE_VERSION.to_le_bytes());
    b.extend_from_slice(&(LIVE_BLOCK as u32).to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&id.0);
    b.extend_from_slice(&blocks.to_le_bytes());
    for w in bits {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.truncate(HEADER + n);
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

/// What a state file holds.
struct State {
    id: Id,
    size: u64,
    bits: Vec<u64>,
}

fn decode_state(path: &Path, b: &[u8]) -> Result<State, EngineError> {
    let bad = |why: &str| {
        state_err(
            path,
            format!("{why}: it is not a live-restore state file this imgstore can read; delete it to start the restore over"),
        )
    };
    if b.len() < HEADER + 32 || b[..8] != LIVE_STATE_MAGIC {
        return Err(bad("bad magic or truncated"));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    if u32_at(8) != LIVE_STATE_VERSION {
        return Err(bad(&format!("version {}", u32_at(8))));
    }
    if u32_at(12) as u64 != LIVE_BLOCK {
        return Err(bad(&format!("block size {}", u32_at(12))));
    }
    let size = u64_at(16);
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[24..56]);
    let blocks = u64_at(56);
    if blocks != size.div_ceil(LIVE_BLOCK) || body.len() != HEADER + blocks.div_ceil(8) as usize {
        return Err(bad("bitmap length does not match the image size"));
    }
    let mut bits = vec![0u64; blocks.div_ceil(64) as usize];
    for (i, byte) in body[HEADER..].iter().enumerate() {
        bits[i / 8] |= (*byte as u64) << (8 * (i % 8));
    }
    // Bits past the last block are ignored.
    if blocks % 64 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (blocks % 64)) - 1;
        }
    }
    Ok(State {
        id: Id(id),
        size,
        bits,
    })
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in
/// the same directory, synced, renamed over `path`, the directory synced.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

impl<'a> LiveTarget<'a> {
    /// Opens TARGET `path` for a live restore of snapshot `id`, with its
    /// progress in state file `state`. A state file for this snapshot and
    /// size resumes (TARGET must be there; `force` is not needed: the
    /// target is this restore's own); one for another snapshot or size is
    /// refused. Without one, TARGET follows the rules of any restore (an
    /// existing file or a block device only with `force`) and the state
    /// file is written before anything else is.
    pub fn open(
        repo: &'a dyn Repository,
        id: &Id,
        snapshot: &'a Snapshot,
        path: &Path,
        state: &Path,
        force: bool,
        opts: LiveOptions,
    ) -> Result<(LiveTarget<'a>, LiveStart), EngineError> {
        let bad = |why: String| EngineError::BadTarget {
            path: path.to_path_buf(),
            why,
        };
        let region_size = snapshot.region_size as u64;
        if region_size == 0 || region_size % LIVE_BLOCK != 0 {
            return Err(EngineError::Invalid {
                what: "snapshot",
                why: format!("region size {region_size} is not a multiple of {LIVE_BLOCK}"),
            });
        }
        let size = snapshot.size;
        let blocks = size.div_ceil(LIVE_BLOCK);
        let previous = match std::fs::read(state) {
            Ok(b) => Some(decode_state(state, &b)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(state_err(
                    state,
                    format!(
                        "cannot read it ({}): make it readable, or pass --state FILE",
                        crate::source::describe_io(&e)
                    ),
                ))
            }
        };
        if let Some(p) = &previous {
            if p.id != *id || p.size != size {
                return Err(state_err(
                    state,
                    format!(
                        "belongs to an unfinished live restore of snapshot {} ({} bytes) into {}: resume it with that snapshot, or delete the state file to restore {} over it from the start",
                        p.id.short(),
                        p.size,
                        path.display(),
                        id.short()
                    ),
                ));
            }
        }
        let meta = std::fs::metadata(path);
        let device = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
        let start = if previous.is_some() {
            LiveStart::Resumed
        } else {
            LiveStart::Fresh
        };
        let file = match (&meta, &previous) {
            (Ok(m), _) if m.is_dir() => {
                return Err(bad(
                    "is a directory: give a file path or a block device".into(),
                ))
            }
            (Ok(m), _) if !device && !m.is_file() => {
                return Err(bad(
                    "is neither a regular file nor a block device: a live restore serves its target, so it needs one of them".into(),
                ))
            }
            (Err(e), Some(_)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(format!(
                    "does not exist, but state file {} says it was partly restored: delete the state file to start over",
                    state.display()
                )))
            }
            (Err(e), None) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::restore::parent_dir_exists(path).map_err(bad)?;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| bad(crate::source::describe_io(&e)))?
            }
            (Err(e), _) => return Err(bad(crate::source::describe_io(e))),
            (Ok(_), None) if !force => {
                return Err(bad(if device {
                    "is a block device: everything on it would be overwritten; pass --force to restore onto it".into()
                } else {
                    "already exists: pass --force to replace it".into()
                }))
            }
            (Ok(_), _) if device => open_device_exclusive(path, true)?,
            (Ok(_), _) => OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| bad(crate::source::describe_io(&e)))?,
        };
        let werr = |e: std::io::Error| EngineError::TargetWrite {
            path: path.to_path_buf(),
            offset: 0,
            source: e,
        };
        if device {
            let mut f = &file;
            let dev_size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(werr)?;
            if dev_size < size {
                return Err(bad(format!(
                    "device holds {dev_size} bytes, smaller than the {size}-byte image: use a larger device"
                )));
            }
        } else if previous.is_none() {
            // A new file, or one replaced: all holes, read as zeros.
            file.set_len(0).map_err(werr)?;
            file.set_len(size).map_err(werr)?;
        } else {
            file.set_len(size).map_err(werr)?;
        }
        let bits: Vec<u64> = match previous {
            Some(p) => p.bits,
            None => vec![0u64; blocks.div_ceil(64) as usize],
        };
        let live = LiveTarget {
            image: ImageReader::new(repo, id, snapshot, opts.cache_bytes)?,
            reader: SnapshotReader::open(repo, id, snapshot)?,
            id: *id,
            size,
            region_size,
            file,
            direct: Direct::open(path, true),
            path: path.to_path_buf(),
            device,
            state: state.to_path_buf(),
            blocks,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            persist: Mutex::new(()),
            zeroing: Zeroing::default(),
            final_bytes: AtomicU64::new(0),
            resumed_bytes: 0,
            copied: AtomicU64::new(0),
            client_written: AtomicU64::new(0),
            repo_read: AtomicU64::new(0),
            client_busy: AtomicUsize::new(0),
            bits: bits.into_iter().map(AtomicU64::new).collect(),
            opts,
        };
        let done: u64 = (0..blocks)
            .filter(|b| live.is_final(*b))
            .map(|b| live.block_len(b))
            .sum();
        let mut live = live;
        live.final_bytes.store(done, Relaxed);
        live.resumed_bytes = done;
        if start == LiveStart::Fresh {
            // Written before TARGET is, so a resume always finds it.
            live.flush()?;
        }
        Ok((live, start))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The state file.
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// The snapshot restored.
    pub fn snapshot_id(&self) -> &Id {
        &self.id
    }

    pub fn stats(&self) -> LiveStats {
        LiveStats {
            size: self.size,
            final_bytes: self.final_bytes.load(Relaxed),
            copied_bytes: self.copied.load(Relaxed),
            resumed_bytes: self.resumed_bytes,
            client_written_bytes: self.client_written.load(Relaxed),
            repo_read_bytes: self.repo_read.load(Relaxed),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.final_bytes.load(Relaxed) >= self.size
    }

    fn block_len(&self, b: u64) -> u64 {
        (self.size - b * LIVE_BLOCK).min(LIVE_BLOCK)
    }

    fn is_final(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize].load(Relaxed) & (1 << (b % 64)) != 0
    }

    /// Marks block `b` final (its bytes are in TARGET); true if it was not.
    fn set_final(&self, b: u64) -> bool {
        let was = self.bits[(b / 64) as usize].fetch_or(1 << (b % 64), Relaxed);
        let new = was & (1 << (b % 64)) == 0;
        if new {
            self.final_bytes.fetch_add(self.block_len(b), Relaxed);
        }
        new
    }

    fn stripe(&self, b: u64) -> &Mutex<()> {
        &self.locks[(b % STRIPES as u64) as usize]
    }

    fn target_err(&self, offset: u64) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
        move |source| EngineError::TargetWrite {
            path: self.path.clone(),
            offset,
            source,
        }
    }

    /// Block `b`'s snapshot bytes, written into TARGET and marked final
    /// (the caller holds its stripe and saw it non-final).
    fn fetch_block(&self, b: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        let at = b * LIVE_BLOCK;
        out.resize(self.block_len(b) as usize, 0);
        self.image.read_at(at, out)?;
        self.repo_read.fetch_add(out.len() as u64, Relaxed);
        Ok(())
    }

    /// Runs of blocks in `[offset, end)` of one finality: `(start, end,
    /// final)` byte ranges.
    fn runs(&self, offset: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / LIVE_BLOCK;
            let e = ((b + 1) * LIVE_BLOCK).min(end);
            let f = self.is_final(b);
            match out.last_mut() {
                Some(last) if last.2 == f => last.1 = e,
                _ => out.push((pos, e, f)),
            }
            pos = e;
        }
        out
    }

    fn check_range(&self, what: &'static str, offset: u64, len: u64) -> Result<(), EngineError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(EngineError::Invalid {
                what,
                why: format!("{offset}+{len} is beyond the {}-byte image", self.size),
            });
        }
        Ok(())
    }

    /// Fills `buf` with the disk's bytes at `offset`: final blocks from
    /// TARGET, the others from the snapshot (then written into TARGET).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        self.check_range("read", offset, buf.len() as u64)?;
        let _busy = Busy::new(&self.client_busy);
        let end = offset + buf.len() as u64;
        let mut block = Vec::new();
        for (a, e, f) in self.runs(offset, end) {
            let dst = &mut buf[(a - offset) as usize..(e - offset) as usize];
            if f {
                self.file
                    .read_exact_at(dst, a)
                    .map_err(self.target_err(a))?;
                continue;
            }
            let mut pos = a;
            while pos < e {
                let b = pos / LIVE_BLOCK;
                let bstart = b * LIVE_BLOCK;
                let n = (((b + 1) * LIVE_BLOCK).min(e) - pos) as usize;
                let d = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
                let g = lock(self.stripe(b));
                if self.is_final(b) {
                    drop(g);
                    self.file
                        .read_exact_at(d, pos)
                        .map_err(self.target_err(pos))?;
                } else {
                    self.fetch_block(b, &mut block)?;
                    self.file
                        .write_all_at(&block, bstart)
                        .map_err(self.target_err(bstart))?;
                    self.set_final(b);
                    drop(g);
                    let from = (pos - bstart) as usize;
                    d.copy_from_slice(&block[from..from + n]);
                }
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into TARGET; a non-final block is first
    /// filled from the snapshot (see the module docs). Durable after
    /// [`flush`](Self::flush).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), EngineError> {
        self.check_range("write", offset, data.len() as u64)?;
        let _busy = Busy::new(&self.client_busy);
        let end = offset + data.len() as u64;
        let mut block = Vec::new();
        for (a, e, f) in self.runs(offset, end) {
            let src = &data[(a - offset) as usize..(e - offset) as usize];
            if f {
                self.file.write_all_at(src, a).map_err(self.target_err(a))?;
                continue;
            }
            let mut pos = a;
            while pos < e {
                let b = pos / LIVE_BLOCK;
                let bstart = b * LIVE_BLOCK;
                let blen = self.block_len(b);
                let n = (((b + 1) * LIVE_BLOCK).min(e) - pos) as usize;
                let s = &data[(pos - offset) as usize..(pos - offset) as usize + n];
                let g = lock(self.stripe(b));
                if self.is_final(b) {
                    drop(g);
                    self.file
                        .write_all_at(s, pos)
                        .map_err(self.target_err(pos))?;
                } else if n as u64 == blen {
                    self.file
                        .write_all_at(s, pos)
                        .map_err(self.target_err(pos))?;
                    self.set_final(b);
                } else {
                    self.fetch_block(b, &mut block)?;
                    let from = (pos - bstart) as usize;
                    block[from..from + n].copy_from_slice(s);
                    self.file
                        .write_all_at(&block, bstart)
                        .map_err(self.target_err(bstart))?;
                    self.set_final(b);
                }
                pos += n as u64;
            }
        }
        self.client_written.fetch_add(data.len() as u64, Relaxed);
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` (as [`write_at`](Self::write_at)).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check_range("write", offset, len)?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64);
            self.write_at(pos, &zeros[..n as usize])?;
            pos += n;
        }
        Ok(())
    }

    /// `(length, is_zero)` runs of `[offset, offset + len)`: the snapshot's
    /// zero extents where blocks are not final yet, data elsewhere.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, EngineError> {
        let end = (offset + len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, zero: bool| match out.last_mut() {
            Some(last) if last.1 == zero => last.0 += n,
            _ => out.push((n, zero)),
        };
        let mut pos = offset;
        for (n, zero) in self.image.map(offset, end - offset)? {
            let e = pos + n;
            if !zero {
                push(n, false);
            } else {
                for (a, b, f) in self.runs(pos, e) {
                    push(b - a, !f);
                }
            }
            pos = e;
        }
        Ok(out)
    }

    /// Makes every completed write durable and persists which blocks are
    /// final: the bitmap is copied, TARGET synced, then the copy written
    /// (see the module docs for why in this order).
    pub fn flush(&self) -> Result<(), EngineError> {
        let _g = lock(&self.persist);
        let bits: Vec<u64> = self.bits.iter().map(|w| w.load(Relaxed)).collect();
        self.file.sync_data().map_err(self.target_err(self.size))?;
        let bytes = encode_state(&self.id, self.size, self.blocks, &bits);
        write_atomic(&self.state, &bytes).map_err(|e| {
            state_err(
                &self.state,
                format!(
                    "cannot write it ({}): make its directory writable, or pass --state FILE",
                    crate::source::describe_io(&e)
                ),
            )
        })
    }

    /// Once complete and flushed: removes the state file (TARGET is now a
    /// plain restored disk). Refused while blocks are missing.
    pub fn remove_state(&self) -> Result<(), EngineError> {
        if !self.is_complete() {
            return Err(state_err(&self.state, "the restore is not complete: kept"));
        }
        self.flush()?;
        match std::fs::remove_file(&self.state) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_err(
                &self.state,
                format!("cannot remove it: {}", crate::source::describe_io(&e)),
            )),
        }
    }

    /// Copies region `index`'s non-final blocks into TARGET.
    fn copy_region(&self, index: usize, buf: &mut AlignedBuf) -> Result<(), EngineError> {
        let base = index as u64 * self.region_size;
        let len = self.reader.region_len(index);
        let (first, last) = (base / LIVE_BLOCK, (base + len).div_ceil(LIVE_BLOCK));
        if (first..last).all(|b| self.is_final(b)) {
            return Ok(());
        }
        let r = self.reader.rebuild(index, buf, true)?;
        // Which bytes of the region are zero extents.
        let mut zero_runs: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        for e in &r.entries {
            if e.chunk.is_none() {
                zero_runs.push((pos, pos + e.len as u64));
            }
            pos += e.len as u64;
        }
        let all_zero = |a: u64, b: u64| {
            zero_runs
                .iter()
                .any(|&(za, zb)| za <= a - base && b - base <= zb)
        };
        // Client I/O goes first: wait (briefly) while some is in flight.
        for _ in 0..20 {
            if self.client_busy.load(Relaxed) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut stripes: Vec<usize> = (first..last)
            .map(|b| (b % STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<MutexGuard<'_, ()>> =
            stripes.iter().map(|&s| lock(&self.locks[s])).collect();
        // Runs of non-final blocks, each all data or all zeros.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for b in first..last {
            if self.is_final(b) {
                continue;
            }
            let (a, e) = (b * LIVE_BLOCK, b * LIVE_BLOCK + self.block_len(b));
            let z = all_zero(a, e);
            match runs.last_mut() {
                Some(last) if last.1 == a && last.2 == z => last.1 = e,
                _ => runs.push((a, e, z)),
            }
        }
        for &(a, e, z) in &runs {
            if z {
                if self.device {
                    self.zeroing.zero(&self.file, &self.path, a, e - a)?;
                } else {
                    // A hole reads as zeros (and a new file is all holes).
                    let punch = rustix::fs::FallocateFlags::PUNCH_HOLE
                        | rustix::fs::FallocateFlags::KEEP_SIZE;
                    if rustix::fs::fallocate(&self.file, punch, a, e - a).is_err() {
                        self.zeroing.zero(&self.file, &self.path, a, e - a)?;
                    }
                }
            } else {
                // Direct where the file system allows (the copy never reads
                // back what it writes), whole 4 KiB blocks; the image's
                // partial last block through the page cache.
                let s = &buf[(a - base) as usize..(e - base) as usize];
                let whole = align_down(s.len());
                let mut from = 0;
                if let Some(d) = self.direct.usable(s).filter(|_| whole > 0) {
                    match write_direct(d, &s[..whole], a) {
                        Ok(()) => from = whole,
                        Err(err) if self.direct.refuses(&err) => {}
                        Err(err) => return Err(self.target_err(a)(err)),
                    }
                }
                if from < s.len() {
                    let at = a + from as u64;
                    self.file
                        .write_all_at(&s[from..], at)
                        .map_err(self.target_err(at))?;
                }
            }
        }
        for &(a, e, _) in &runs {
            for b in a / LIVE_BLOCK..e.div_ceil(LIVE_BLOCK) {
                if self.set_final(b) {
                    self.copied.fetch_add(self.block_len(b), Relaxed);
                }
            }
        }
        Ok(())
    }

    /// The background copy: every region with non-final blocks, on
    /// `copy_threads` threads, until all blocks are final (returns true)
    /// or `stop` is set (returns false). A region that fails is retried
    /// with backoff (0.2 s doubling to 10 s), `on_retry` told each time;
    /// progress is persisted every `checkpoint_every` (and at the end).
    pub fn copy(
        &self,
        stop: &AtomicBool,
        on_retry: &(dyn Fn(&EngineError, Duration) + Sync),
    ) -> Result<bool, EngineError> {
        let next = AtomicUsize::new(0);
        let n = self.reader.region_count();
        let last_checkpoint = Mutex::new(Instant::now());
        let failed: Mutex<Option<EngineError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.opts.copy_threads.max(1) {
                s.spawn(|| {
                    let mut buf = AlignedBuf::default();
                    loop {
                        if stop.load(Relaxed) {
                            return;
                        }
                        let i = next.fetch_add(1, Relaxed);
                        if i >= n {
                            return;
                        }
                        let mut backoff = Duration::from_millis(200);
                        loop {
                            match self.copy_region(i, &mut buf) {
                                Ok(()) => break,
                                // The target failing is not retried: the
                                // copy stops and says why.
                                Err(e @ EngineError::TargetWrite { .. }) => {
                                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                    stop.store(true, Relaxed);
                                    return;
                                }
                                Err(e) => {
                                    on_retry(&e, backoff);
                                    let until = Instant::now() + backoff;
                                    while Instant::now() < until {
                                        if stop.load(Relaxed) {
                                            return;
                                        }
                                        std::thread::sleep(Duration::from_millis(50));
                                    }
                                    backoff = (backoff * 2).min(Duration::from_secs(10));
                                }
                            }
                        }
                        if let Some(p) = self.opts.region_pause {
                            let until = Instant::now() + p;
                            while Instant::now() < until && !stop.load(Relaxed) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                        let mut last = last_checkpoint.lock().unwrap_or_else(|p| p.into_inner());
                        if last.elapsed() >= self.opts.checkpoint_every {
                            *last = Instant::now();
                            drop(last);
                            if let Err(e) = self.flush() {
                                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                stop.store(true, Relaxed);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        self.flush()?;
        Ok(self.is_complete())
    }
}

/// Counts a client request in flight while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(c: &'a AtomicUsize) -> Busy<'a> {
        c.fetch_add(1, Relaxed);
        Busy(c)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_refuses_damage() {
        let id = Id([7; 32]);
        let size = 130 * LIVE_BLOCK + 5;
        let blocks = size.div_ceil(LIVE_BLOCK);
        let mut bits = vec![0u64; blocks.div_ceil(64) as usize];
        bits[0] = 0b1011;
        bits[2] = 1 << 2; // block 130, the partial last one
        let b = encode_state(&id, size, blocks, &bits);
        assert_eq!(b.len(), HEADER + blocks.div_ceil(8) as usize + 32);
        let s = decode_state(Path::new("s"), &b).unwrap();
        assert_eq!((s.id, s.size, s.bits.clone()), (id, size, bits));
        let mut bad = b.clone();
        bad[HEADER] ^= 1;
        assert!(decode_state(Path::new("s"), &bad).is_err());
        assert!(decode_state(Path::new("s"), &b[..40]).is_err());
    }
}
