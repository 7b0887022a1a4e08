//! Reassembling a snapshot: into a (sparse) file, onto a block device, or
//! as a stream.
//!
//! Regions are independent, so they are restored in parallel: each worker
//! fetches its region's chunks in one batched lookup, decompresses them,
//! checks every chunk against its id, writes it at its offset and feeds the
//! region's bytes to its part of the image digest. Zero extents are holes in
//! a file target (which was created sparse), real zeros on a device or a
//! stream. The image digest is compared with the snapshot's at the end; a
//! file target is written under a temporary name and renamed into place
//! only then, so a failed restore never leaves a plausible-looking image.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use imgstore_format::{decode_chunk, decode_chunk_into, Id, RecipeEntry, Snapshot};
use imgstore_store::{Store, StoreError};
use rayon::prelude::*;

use blake3::hazmat::HasherExt;

use crate::aligned::{align_down, align_up, write_direct, AlignedBuf, Direct};
use crate::digest::{image_digest, region_hasher, RegionHash};
use crate::{EngineError, Progress};

/// Where a restore writes.
pub enum Target {
    /// A regular file, written sparse under a temporary name, then renamed.
    File { path: PathBuf },
    /// An existing block device, written in place (zeros written too).
    Device { path: PathBuf },
    /// Nowhere: every chunk and the digest are checked, nothing is written
    /// (`imgstore verify`).
    Discard,
    /// A sequential stream: stdout, a pipe, `/dev/null`.
    Stream {
        label: String,
        out: Box<dyn Write + Send>,
    },
}

impl Target {
    /// Decides what `path` is. An existing regular file is refused unless `force`.
    pub fn resolve(path: &Path, force: bool) -> Result<Target, EngineError> {
        let bad = |why: String| EngineError::BadTarget {
            path: path.to_path_buf(),
            why,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(bad(
                "is a directory: give a file path, a block device or -".into(),
            )),
            Ok(m) if m.file_type().is_block_device() => Ok(Target::Device {
                path: path.to_path_buf(),
            }),
            Ok(m) if m.is_file() => {
                if force {
                    Ok(Target::File {
                        path: path.to_path_buf(),
                    })
                } else {
                    Err(bad("already exists: pass --force to replace it".into()))
                }
            }
            Ok(_) => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| bad(crate::source::describe_io(&e)))?;
                Ok(Target::Stream {
                    label: path.display().to_string(),
                    out: Box::new(f),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !parent.is_dir() {
                    return Err(bad(format!(
                        "directory {} does not exist",
                        parent.display()
                    )));
                }
                Ok(Target::File {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => Err(bad(crate::source::describe_io(&e))),
        }
    }
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreReport {
    /// Bytes of chunk data written.
    pub data_bytes: u64,
    /// Bytes of zeros (left as holes in a file, written on a device or stream).
    pub zero_bytes: u64,
    pub seconds: f64,
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's zstd decompression context.
pub(crate) fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> T,
) -> T {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        f(d.get_or_insert_with(|| zstd::bulk::Decompressor::new().expect("zstd context")))
    })
}

pub(crate) struct Ctx<'a> {
    store: &'a Store,
    snapshot: &'a Snapshot,
    label: String,
    region_ids: Vec<Id>,
    /// Region chaining values (what a changed-block backup reuses).
    region_cvs: Vec<[u8; 32]>,
}

/// Where a restore writes regions: positional writes to a file or device,
/// direct I/O while the file system allows it.
pub(crate) struct Out<'a> {
    file: &'a File,
    direct: Direct,
    path: &'a Path,
    /// Write zero extents too (a device); a sparse file leaves them as holes.
    write_zeros: bool,
}

impl<'a> Out<'a> {
    fn new(file: &'a File, open_path: &Path, path: &'a Path, write_zeros: bool) -> Out<'a> {
        Out {
            file,
            direct: Direct::open(open_path, true),
            path,
            write_zeros,
        }
    }

    /// Writes the region `buf` (restored, verified) at `base`: all of it on
    /// a device, only its data entries (rounded out to whole 4 KiB blocks,
    /// which hold zeros around them) on a sparse file.
    fn write_region(
        &self,
        base: u64,
        entries: &[RecipeEntry],
        buf: &AlignedBuf,
    ) -> Result<(), EngineError> {
        let len = buf.len();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        if self.write_zeros {
            runs.push((0, len));
        } else {
            let mut pos = 0;
            for e in entries {
                let end = pos + e.len as usize;
                if e.chunk.is_some() {
                    let (a, b) = (align_down(pos), align_up(end).min(len));
                    match runs.last_mut() {
                        Some(last) if last.1 >= a => last.1 = b,
                        _ => runs.push((a, b)),
                    }
                }
                pos = end;
            }
        }
        let whole = align_down(len);
        for (a, b) in runs {
            // Whole blocks go direct; the image's partial last block, or
            // everything when direct I/O is refused, through the page cache.
            let mut from = a;
            let b0 = b.min(whole);
            if let Some(d) = self.direct.usable(buf).filter(|_| b0 > a) {
                match write_direct(d, &buf[a..b0], base + a as u64) {
                    Ok(()) => from = b0,
                    Err(e) if self.direct.refuses(&e) => {}
                    Err(e) => return Err(write_err(self.path, base + a as u64)(e)),
                }
            }
            if from < b {
                self.file
                    .write_all_at(&buf[from..b], base + from as u64)
                    .map_err(write_err(self.path, base + from as u64))?;
            }
        }
        Ok(())
    }
}

thread_local! {
    /// Each restore worker's region buffer, reused from region to region.
    static REGION_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(
        store: &'a Store,
        snapshot: &'a Snapshot,
        id: &Id,
    ) -> Result<Ctx<'a>, EngineError> {
        let label = id.short();
        let (region_ids, region_cvs) = region_index(store, snapshot, &label)?;
        Ok(Ctx {
            store,
            snapshot,
            region_ids,
            region_cvs,
            label,
        })
    }

    pub(crate) fn region_cv(&self, index: usize) -> [u8; 32] {
        self.region_cvs[index]
    }

    /// Rebuilds region `index` into `buf` (verified); returns its (data
    /// chunk count, zero bytes).
    pub(crate) fn region_bytes(
        &self,
        index: usize,
        buf: &mut AlignedBuf,
    ) -> Result<(u64, u64), EngineError> {
        let (_, _, zeros, chunks) = self.region(index, buf, None, true)?;
        Ok((chunks, zeros))
    }

    pub(crate) fn region_id(&self, index: usize) -> Id {
        self.region_ids[index]
    }

    pub(crate) fn region_count(&self) -> usize {
        self.region_ids.len()
    }

    pub(crate) fn region_len(&self, index: usize) -> u64 {
        let rs = self.snapshot.region_size as u64;
        (self.snapshot.size - index as u64 * rs).min(rs)
    }

    pub(crate) fn entries(&self, index: usize) -> Result<Vec<RecipeEntry>, EngineError> {
        let len = self.region_len(index);
        let offset = index as u64 * self.snapshot.region_size as u64;
        let rid = self.region_ids[index];
        if rid == Id::ZERO {
            return Ok(vec![RecipeEntry {
                len: len as u32,
                chunk: None,
            }]);
        }
        let region = self
            .store
            .region(&rid)
            .map_err(|e| EngineError::RecipeDamaged {
                snapshot: self.label.clone(),
                offset,
                source: Box::new(e),
            })?;
        if region.len() != len {
            return Err(EngineError::RecipeDamaged {
                snapshot: self.label.clone(),
                offset,
                source: format!("region {rid} covers {} bytes, expected {len}", region.len())
                    .into(),
            });
        }
        Ok(region.entries)
    }

    /// Restores region `index` into `buf` and, when given, writes it to
    /// `out`; returns its digest part, (data, zero) byte counts and data
    /// chunk count. `need_bytes` false lets an all-zero region skip
    /// filling `buf` when nothing will read it (a sparse file).
    ///
    /// The region's bytes are checked with one BLAKE3 pass against the
    /// chaining value its index page recorded at backup, before anything is
    /// written: that proves every chunk *and* their assembly. Only when it
    /// fails are the chunks hashed one by one, to name the damaged one.
    fn region(
        &self,
        index: usize,
        buf: &mut AlignedBuf,
        out: Option<&Out<'_>>,
        need_bytes: bool,
    ) -> Result<(RegionHash, u64, u64, u64), EngineError> {
        let base = index as u64 * self.snapshot.region_size as u64;
        let len = self.region_len(index) as usize;
        if self.region_ids[index] == Id::ZERO && index > 0 {
            // Nothing stored to be damaged: its chaining value is the one
            // recorded (the page was checked against its id), and the image
            // digest still ties it to the others.
            buf.reset(len);
            if need_bytes || out.is_some_and(|o| o.write_zeros) {
                buf.fill(0);
            }
            if let Some(o) = out.filter(|o| o.write_zeros) {
                let zero = [RecipeEntry {
                    len: len as u32,
                    chunk: None,
                }];
                o.write_region(base, &zero, buf)?;
            }
            return Ok((RegionHash::Cv(self.region_cvs[index]), 0, len as u64, 0));
        }
        let entries = self.entries(index)?;
        let mut ids: Vec<Id> = entries.iter().filter_map(|e| e.chunk).collect();
        let chunks = ids.len() as u64;
        ids.sort();
        ids.dedup();
        let frames = match self.store.chunk_frames(&ids) {
            Ok(f) => f,
            Err(StoreError::Missing { id, .. }) => {
                let off = base + offset_of(&entries, &id);
                return Err(self.damaged(off, id, "missing from the store".into()));
            }
            Err(StoreError::Unreadable { id, detail, .. }) => {
                let off = base + offset_of(&entries, &id);
                return Err(self.damaged(off, id, format!("unreadable: {detail}")));
            }
            Err(e) => return Err(e.into()),
        };
        buf.reset(len);
        let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
        let mut pos = 0usize;
        for e in &entries {
            let end = pos + e.len as usize;
            match e.chunk {
                None => {
                    buf[pos..end].fill(0);
                    zero_bytes += e.len as u64;
                }
                Some(id) => {
                    let frame = &frames[ids.binary_search(&id).expect("id fetched")];
                    with_decompressor(|d| decode_chunk_into(frame, d, &mut buf[pos..end]))
                        .map_err(|err| self.damaged(base + pos as u64, id, err.to_string()))?;
                    data_bytes += e.len as u64;
                }
            }
            pos = end;
        }
        let mut hasher = region_hasher(base);
        hasher.update(&buf[..]);
        if hasher.finalize_non_root() != self.region_cvs[index] {
            return Err(self.locate_damage(index, &entries, buf));
        }
        if let Some(o) = out {
            o.write_region(base, &entries, buf)?;
        }
        Ok((
            RegionHash::from_hasher(index as u64, hasher),
            data_bytes,
            zero_bytes,
            chunks,
        ))
    }

    /// Names what made region `index` differ from its recorded chaining
    /// value: the first chunk whose bytes do not hash to its id, or else the
    /// recipe itself.
    fn locate_damage(&self, index: usize, entries: &[RecipeEntry], buf: &[u8]) -> EngineError {
        let base = index as u64 * self.snapshot.region_size as u64;
        let mut pos = 0usize;
        for e in entries {
            let end = pos + e.len as usize;
            if let Some(id) = e.chunk {
                if Id::hash(&buf[pos..end]) != id {
                    return self.damaged(
                        base + pos as u64,
                        id,
                        "content does not match its id".into(),
                    );
                }
            }
            pos = end;
        }
        EngineError::RecipeDamaged {
            snapshot: self.label.clone(),
            offset: base,
            source: format!(
                "region {} does not rebuild the bytes its index page recorded",
                self.region_ids[index]
            )
            .into(),
        }
    }

    /// Frames of `ids`; a missing or unreadable chunk is reported as damage
    /// at `offset`.
    pub(crate) fn fetch(&self, ids: &[Id], offset: u64) -> Result<Vec<Vec<u8>>, EngineError> {
        match self.store.chunk_frames(ids) {
            Ok(f) => Ok(f),
            Err(StoreError::Missing { id, .. }) => {
                Err(self.damaged(offset, id, "missing from the store".into()))
            }
            Err(StoreError::Unreadable { id, detail, .. }) => {
                Err(self.damaged(offset, id, format!("unreadable: {detail}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn damaged(&self, offset: u64, chunk: Id, why: String) -> EngineError {
        EngineError::ChunkDamaged {
            snapshot: self.label.clone(),
            offset,
            chunk,
            why,
        }
    }
}

fn offset_of(entries: &[RecipeEntry], id: &Id) -> u64 {
    let mut off = 0;
    for e in entries {
        if e.chunk.as_ref() == Some(id) {
            return off;
        }
        off += e.len as u64;
    }
    0
}

/// A rayon pool with two workers per core, for stages that mix I/O and CPU.
pub(crate) fn io_pool() -> Result<rayon::ThreadPool, EngineError> {
    pool(2)
}

/// A rayon pool with `per_core` workers per core.
fn pool(per_core: usize) -> Result<rayon::ThreadPool, EngineError> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        * per_core;
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| EngineError::Invalid {
            what: "thread pool",
            why: e.to_string(),
        })
}

fn write_err(path: &Path, offset: u64) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::TargetWrite {
        path: path.to_path_buf(),
        offset,
        source,
    }
}

fn write_zeros_at(file: &File, path: &Path, mut pos: u64, mut len: u64) -> Result<(), EngineError> {
    static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], pos)
            .map_err(write_err(path, pos))?;
        pos += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Loads the region ids of a snapshot from its index pages.
pub fn region_ids(store: &Store, snap: &Snapshot, label: &str) -> Result<Vec<Id>, EngineError> {
    Ok(region_index(store, snap, label)?.0)
}

/// Loads a snapshot's index: region ids and their chaining values.
pub(crate) fn region_index(
    store: &Store,
    snap: &Snapshot,
    label: &str,
) -> Result<(Vec<Id>, Vec<[u8; 32]>), EngineError> {
    let mut ids = Vec::with_capacity(snap.region_count() as usize);
    let mut cvs = Vec::with_capacity(snap.region_count() as usize);
    for (i, pid) in snap.pages.iter().enumerate() {
        let page = store.page(pid).map_err(|e| EngineError::RecipeDamaged {
            snapshot: label.to_string(),
            offset: (i * imgstore_format::PAGE_REGIONS) as u64 * snap.region_size as u64,
            source: Box::new(e),
        })?;
        ids.extend(page.regions);
        cvs.extend(page.cvs);
    }
    if ids.len() as u64 != snap.region_count() {
        return Err(EngineError::RecipeDamaged {
            snapshot: label.to_string(),
            offset: 0,
            source: format!(
                "index names {} regions, image needs {}",
                ids.len(),
                snap.region_count()
            )
            .into(),
        });
    }
    Ok((ids, cvs))
}

/// Restores snapshot `id` to `target`, verifying every chunk and the image digest.
pub fn restore(
    store: &Store,
    id: &Id,
    snapshot: &Snapshot,
    target: Target,
    progress: &dyn Progress,
) -> Result<RestoreReport, EngineError> {
    let started = Instant::now();
    let ctx = Ctx::new(store, snapshot, id)?;
    progress.start(Some(snapshot.size));
    let n = ctx.region_ids.len();
    let positional = |out: Option<&Out<'_>>| -> Result<(Vec<RegionHash>, u64, u64), EngineError> {
        // Three workers per core: while some wait for a blob read or a
        // direct write, others decompress and hash (2 per core: 1.71–1.85 s
        // for the workload's disk-0, 3: 1.52–1.67 s, 4: no better and
        // +23 MiB).
        let pool = pool(3)?;
        let parts: Vec<(RegionHash, u64, u64, u64)> = pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let r = REGION_BUF.with(|b| ctx.region(i, &mut b.borrow_mut(), out, false))?;
                    progress.advance(ctx.region_len(i));
                    Ok(r)
                })
                .collect::<Result<_, EngineError>>()
        })?;
        let (d, z) = parts.iter().fold((0, 0), |(d, z), p| (d + p.1, z + p.2));
        Ok((parts.into_iter().map(|p| p.0).collect(), d, z))
    };
    let (_, data_bytes, zero_bytes) = match target {
        Target::File { path } => {
            remove_stale_temps(&path);
            let tmp = temp_path(&path);
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| EngineError::BadTarget {
                    path: tmp.clone(),
                    why: crate::source::describe_io(&e),
                })?;
            let result: Result<_, EngineError> = (|| {
                file.set_len(snapshot.size).map_err(write_err(&path, 0))?;
                let r = positional(Some(&Out::new(&file, &tmp, &path, false)))?;
                check_digest(&ctx, snapshot, &r.0)?;
                file.sync_all().map_err(write_err(&path, snapshot.size))?;
                std::fs::rename(&tmp, &path).map_err(write_err(&path, snapshot.size))?;
                Ok(r)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            let r = result?;
            (r.0, r.1, r.2)
        }
        Target::Device { path } => {
            let mut file =
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| EngineError::BadTarget {
                        path: path.clone(),
                        why: crate::source::describe_io(&e),
                    })?;
            let dev_size = file.seek(SeekFrom::End(0)).map_err(write_err(&path, 0))?;
            if dev_size < snapshot.size {
                return Err(EngineError::BadTarget {
                    path,
                    why: format!(
                        "device holds {dev_size} bytes, smaller than the {}-byte image: use a larger device",
                        snapshot.size
                    ),
                });
            }
            let r = positional(Some(&Out::new(&file, &path, &path, true)))?;
            check_digest(&ctx, snapshot, &r.0)?;
            file.sync_all().map_err(write_err(&path, snapshot.size))?;
            r
        }
        Target::Discard => {
            let r = positional(None)?;
            check_digest(&ctx, snapshot, &r.0)?;
            r
        }
        Target::Stream { label, mut out } => {
            // Regions are rebuilt in parallel a window at a time and written in order.
            let window = rayon::current_num_threads().max(1) * 2;
            let mut hashes = Vec::with_capacity(n);
            let (mut data, mut zeros, mut written) = (0u64, 0u64, 0u64);
            let mut bufs: Vec<AlignedBuf> = (0..window).map(|_| AlignedBuf::default()).collect();
            for start in (0..n).step_by(window) {
                let end = (start + window).min(n);
                let parts: Vec<(RegionHash, u64, u64, u64)> = bufs[..end - start]
                    .par_iter_mut()
                    .enumerate()
                    .map(|(k, b)| ctx.region(start + k, b, None, true))
                    .collect::<Result<_, EngineError>>()?;
                for (b, p) in bufs.iter().zip(parts) {
                    if let Err(e) = out.write_all(b) {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Err(EngineError::OutputClosed {
                                snapshot: ctx.label.clone(),
                                written,
                                size: snapshot.size,
                            });
                        }
                        return Err(EngineError::TargetWrite {
                            path: PathBuf::from(&label),
                            offset: written,
                            source: e,
                        });
                    }
                    written += b.len() as u64;
                    progress.advance(b.len() as u64);
                    data += p.1;
                    zeros += p.2;
                    hashes.push(p.0);
                }
            }
            out.flush().map_err(|e| EngineError::OutputClosed {
                snapshot: format!("{} ({e})", ctx.label),
                written,
                size: snapshot.size,
            })?;
            check_digest(&ctx, snapshot, &hashes)?;
            (hashes, data, zeros)
        }
    };
    progress.finish();
    Ok(RestoreReport {
        data_bytes,
        zero_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn check_digest(
    ctx: &Ctx<'_>,
    snapshot: &Snapshot,
    hashes: &[RegionHash],
) -> Result<(), EngineError> {
    let got = image_digest(hashes, snapshot.region_size as u64, snapshot.size);
    if got != snapshot.digest {
        return Err(EngineError::DigestMismatch {
            snapshot: ctx.label.clone(),
            want: Id(snapshot.digest).to_hex(),
            got: Id(got).to_hex(),
        });
    }
    Ok(())
}

/// Removes temporary files an interrupted restore to `path` left behind
/// (`.NAME.imgstore-partial-PID` whose process no longer runs), so retrying
/// cleans up after a Ctrl-C or a crash.
fn remove_stale_temps(path: &Path) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.imgstore-partial-");
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.imgstore-partial-{}", std::process::id()))
}

/// What a delta restore did.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeltaReport {
    /// Bytes of the target read and compared (holes of a sparse file are
    /// known to be zeros and not read).
    pub read_bytes: u64,
    /// Bytes of chunk data written (chunks that differed).
    pub written_bytes: u64,
    /// Bytes already right (not written).
    pub skipped_bytes: u64,
    /// Bytes that had to become zeros (holes punched in a file, zeros
    /// written on a device).
    pub zeroed_bytes: u64,
    pub seconds: f64,
}

/// Restores snapshot `id` onto `path`, an existing file or block device
/// that holds some version of the image: every chunk-sized extent of the
/// target is read and hashed, and only extents whose content differs are
/// written (fetched from the store, verified). A file is first truncated or
/// extended to the image size. The result is checked against the image
/// digest. Writes are in place, so an interrupted delta restore leaves a
/// mixed image — running it again completes it.
pub fn restore_delta(
    store: &Store,
    id: &Id,
    snapshot: &Snapshot,
    path: &Path,
    progress: &dyn Progress,
) -> Result<DeltaReport, EngineError> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let started = Instant::now();
    let bad = |why: String| EngineError::BadTarget {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "{}: --delta writes onto an existing file or block device holding an earlier version",
            crate::source::describe_io(&e)
        ))
    })?;
    let device = meta.file_type().is_block_device();
    if !device && !meta.is_file() {
        return Err(bad(
            "is neither a regular file nor a block device: --delta needs one holding an earlier version".into(),
        ));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| bad(crate::source::describe_io(&e)))?;
    if device {
        let dev_size = file.seek(SeekFrom::End(0)).map_err(write_err(path, 0))?;
        if dev_size < snapshot.size {
            return Err(bad(format!(
                "device holds {dev_size} bytes, smaller than the {}-byte image: use a larger device",
                snapshot.size
            )));
        }
    } else {
        file.set_len(snapshot.size).map_err(write_err(path, 0))?;
    }
    let ctx = Ctx::new(store, snapshot, id)?;
    progress.start(Some(snapshot.size));
    let (read, written, skipped, zeroed) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let file = &file;
    let hashes: Vec<RegionHash> = io_pool()?.install(|| {
        (0..ctx.region_ids.len())
            .into_par_iter()
            .map(|index| -> Result<RegionHash, EngineError> {
                let base = index as u64 * snapshot.region_size as u64;
                let entries = ctx.entries(index)?;
                let len = ctx.region_len(index) as usize;
                // Holes of a sparse target read as the zeros they are: only
                // its data extents are read.
                let mut buf = vec![0u8; len];
                let end = base + len as u64;
                let mut at = base;
                while at < end {
                    let (data, hole) = crate::source::data_extent(file, at, end);
                    if data >= end {
                        break;
                    }
                    let dst = &mut buf[(data - base) as usize..(hole - base) as usize];
                    file.read_exact_at(dst, data)
                        .map_err(|e| EngineError::TargetWrite {
                            path: path.to_path_buf(),
                            offset: data,
                            source: e,
                        })?;
                    read.fetch_add(hole - data, Relaxed);
                    at = hole;
                }
                // Pass 1: which extents differ.
                let mut pos = 0usize;
                let mut need: Vec<(usize, usize, Id)> = Vec::new();
                let mut zero: Vec<(usize, usize)> = Vec::new();
                for e in &entries {
                    let s = &buf[pos..pos + e.len as usize];
                    match e.chunk {
                        Some(c) if Id::hash(s) != c => need.push((pos, e.len as usize, c)),
                        None if !imgstore_chunker::is_zero(s) => {
                            // Only the non-zero 4 KiB blocks need zeroing.
                            let mut at = 0;
                            for blk in s.chunks(imgstore_chunker::BLOCK) {
                                if !imgstore_chunker::is_zero(blk) {
                                    match zero.last_mut() {
                                        Some(z) if z.0 + z.1 == pos + at => z.1 += blk.len(),
                                        _ => zero.push((pos + at, blk.len())),
                                    }
                                } else {
                                    skipped.fetch_add(blk.len() as u64, Relaxed);
                                }
                                at += blk.len();
                            }
                        }
                        _ => {
                            skipped.fetch_add(e.len as u64, Relaxed);
                        }
                    }
                    pos += e.len as usize;
                }
                // Pass 2: fetch, verify and write what differs.
                if !need.is_empty() {
                    let mut ids: Vec<Id> = need.iter().map(|n| n.2).collect();
                    ids.sort();
                    ids.dedup();
                    let frames = match store.chunk_frames(&ids) {
                        Ok(f) => f,
                        Err(StoreError::Missing { id, .. }) => {
                            let off = need.iter().find(|n| n.2 == id).map_or(0, |n| n.0);
                            return Err(ctx.damaged(
                                base + off as u64,
                                id,
                                "missing from the store".into(),
                            ));
                        }
                        Err(StoreError::Unreadable { id, detail, .. }) => {
                            let off = need.iter().find(|n| n.2 == id).map_or(0, |n| n.0);
                            return Err(ctx.damaged(
                                base + off as u64,
                                id,
                                format!("unreadable: {detail}"),
                            ));
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let mut out = Vec::new();
                    for &(off, l, c) in &need {
                        let frame = &frames[ids.binary_search(&c).expect("fetched")];
                        let at = base + off as u64;
                        with_decompressor(|d| decode_chunk(frame, d, &mut out).map(|_| ()))
                            .map_err(|err| ctx.damaged(at, c, err.to_string()))?;
                        if out.len() != l || Id::hash(&out) != c {
                            return Err(ctx.damaged(at, c, "content does not match its id".into()));
                        }
                        file.write_all_at(&out, at).map_err(write_err(path, at))?;
                        buf[off..off + l].copy_from_slice(&out);
                        written.fetch_add(l as u64, Relaxed);
                    }
                }
                for &(off, l) in &zero {
                    let at = base + off as u64;
                    let punched = !device
                        && rustix::fs::fallocate(
                            file,
                            rustix::fs::FallocateFlags::PUNCH_HOLE
                                | rustix::fs::FallocateFlags::KEEP_SIZE,
                            at,
                            l as u64,
                        )
                        .is_ok();
                    if !punched {
                        write_zeros_at(file, path, at, l as u64)?;
                    }
                    buf[off..off + l].fill(0);
                    zeroed.fetch_add(l as u64, Relaxed);
                }
                let mut h = region_hasher(base);
                h.update(&buf);
                progress.advance(len as u64);
                Ok(RegionHash::from_hasher(index as u64, h))
            })
            .collect::<Result<_, _>>()
    })?;
    check_digest(&ctx, snapshot, &hashes)?;
    file.sync_all().map_err(write_err(path, snapshot.size))?;
    progress.finish();
    Ok(DeltaReport {
        read_bytes: read.into_inner(),
        written_bytes: written.into_inner(),
        skipped_bytes: skipped.into_inner(),
        zeroed_bytes: zeroed.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
