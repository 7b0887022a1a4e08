//! Reassembling a snapshot: into a (sparse) file, onto a block device, or
//! as a stream.
//!
//! Regions are independent, so they are restored in parallel: each worker
//! fetches its region's chunks in one batched lookup, decompresses them,
//! checks every chunk against its id, writes it at its offset and feeds the
//! region's bytes to its part of the image digest. Zero extents are holes in
//! a file target (which was created sparse), zeroed by the device where it
//! can on a device ([`Zeroing`]), and real zeros on a stream. The image
//! digest is compared with the snapshot's at the end; a file target is
//! written under a temporary name and renamed into place only then, so a
//! failed restore never leaves a plausible-looking image.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use imgstore_format::{Id, RecipeEntry, Snapshot};
use imgstore_repo::Repository;
use rayon::prelude::*;

use crate::aligned::{align_down, align_up, write_direct, AlignedBuf, Direct};
use crate::digest::{image_digest, region_hasher, RegionHash};
use crate::read::{io_pool, threads, workers};
use crate::snapshot::SnapshotReader;
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
    /// A fresh disk written at offsets through a [`BlockWriter`] (a VM
    /// image exported over NBD): only data is written, zero extents are
    /// left as they are — zeros, on a new thin image.
    Writer {
        label: String,
        writer: Box<dyn BlockWriter>,
    },
}

/// A disk written at offsets through something other than a file
/// descriptor (a new VM image exported over NBD). It must read as zeros
/// wherever nothing is written. Several threads call it at once.
pub trait BlockWriter: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Writes each `(offset, bytes)`; several at once, so it can keep
    /// several requests in flight.
    fn write_extents(&self, writes: &[(u64, &[u8])]) -> std::io::Result<()>;
    /// Makes everything written durable.
    fn flush(&self) -> std::io::Result<()>;
}

impl Target {
    /// Decides what `path` is. An existing regular file or a block device
    /// is refused unless `force`: both are overwritten.
    pub fn resolve(path: &Path, force: bool) -> Result<Target, EngineError> {
        let bad = |why: String| EngineError::BadTarget {
            path: path.to_path_buf(),
            why,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(bad(
                "is a directory: give a file path, a block device or -".into(),
            )),
            Ok(m) if m.file_type().is_block_device() => {
                if force {
                    Ok(Target::Device {
                        path: path.to_path_buf(),
                    })
                } else {
                    Err(bad(
                        "is a block device: everything on it would be overwritten; pass --force to restore onto it".into(),
                    ))
                }
            }
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
                crate::restore::parent_dir_exists(path).map_err(bad)?;
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

/// Where a restore writes regions: positional writes to a file or device,
/// direct I/O while the file system allows it.
pub(crate) struct Out<'a> {
    to: To<'a>,
    path: &'a Path,
    /// Zero extents must become zeros on the target (a device); a sparse
    /// file leaves them as holes.
    write_zeros: bool,
    /// How this device takes zeros (see [`Zeroing`]), learnt on first use.
    zeroing: Zeroing,
}

/// Zero gaps shorter than this are written with the data around them: a
/// request to zero a range costs more than writing a few KiB.
const MIN_ZERO_GAP: usize = 64 << 10;

/// What an [`Out`] writes to.
enum To<'a> {
    File(&'a File, Direct),
    Writer(&'a dyn BlockWriter),
}

impl<'a> Out<'a> {
    fn new(file: &'a File, open_path: &Path, path: &'a Path, write_zeros: bool) -> Out<'a> {
        Out {
            to: To::File(file, Direct::open(open_path, true)),
            path,
            write_zeros,
            zeroing: Zeroing::default(),
        }
    }

    /// Writes the region `buf` (restored, verified) at `base`: its data
    /// entries (rounded out to whole 4 KiB blocks, which hold zeros around
    /// them); on a device, the zero extents between them are zeroed too
    /// (by the device where it can, see [`Zeroing`]).
    fn write_region(
        &self,
        base: u64,
        entries: &[RecipeEntry],
        buf: &AlignedBuf,
    ) -> Result<(), EngineError> {
        let len = buf.len();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut pos = 0;
        for e in entries {
            let end = pos + e.len as usize;
            if e.chunk.is_some() {
                let (a, b) = (align_down(pos), align_up(end).min(len));
                // On a device a short gap is written with the data (the
                // buffer holds its zeros).
                let join = if self.write_zeros { MIN_ZERO_GAP } else { 0 };
                match runs.last_mut() {
                    Some(last) if last.1 + join >= a => last.1 = b,
                    _ => runs.push((a, b)),
                }
            }
            pos = end;
        }
        let (file, direct) = match &self.to {
            To::File(f, d) => (*f, d),
            To::Writer(w) => {
                let writes: Vec<(u64, &[u8])> = runs
                    .iter()
                    .map(|&(a, b)| (base + a as u64, &buf[a..b]))
                    .collect();
                return w.write_extents(&writes).map_err(write_err(self.path, base));
            }
        };
        if self.write_zeros {
            let mut at = 0;
            for &(a, b) in runs.iter().chain(std::iter::once(&(len, len))) {
                if a > at {
                    self.zeroing
                        .zero(file, self.path, base + at as u64, (a - at) as u64)?;
                }
                at = b;
            }
        }
        let whole = align_down(len);
        for (a, b) in runs {
            // Whole blocks go direct; the image's partial last block, or
            // everything when direct I/O is refused, through the page cache.
            let mut from = a;
            let b0 = b.min(whole);
            if let Some(d) = direct.usable(buf).filter(|_| b0 > a) {
                match write_direct(d, &buf[a..b0], base + a as u64) {
                    Ok(()) => from = b0,
                    Err(e) if direct.refuses(&e) => {}
                    Err(e) => return Err(write_err(self.path, base + a as u64)(e)),
                }
            }
            if from < b {
                file.write_all_at(&buf[from..b], base + from as u64)
                    .map_err(write_err(self.path, base + from as u64))?;
            }
        }
        Ok(())
    }
}

/// How a target takes a range of zeros, best first. A device is asked to
/// zero the range itself with `fallocate(PUNCH_HOLE)`, which the kernel
/// turns into WRITE ZEROES allowing unmap (a thin LV, an SSD or a loop
/// device's file stays thin, and nothing crosses the bus); where the
/// device cannot, `fallocate(ZERO_RANGE)`, which the kernel serves with
/// WRITE ZEROES or by writing zero pages itself; else zeros are written
/// from here. Either way the range reads back as zeros afterwards (the
/// kernel's contract for both calls on a block device). A sparse file
/// target is punched (its holes read as zeros). What failed once is not
/// tried again for the rest of the restore.
#[derive(Default)]
pub(crate) struct Zeroing {
    /// 0: punch; 1: zero range; 2: write zeros.
    level: std::sync::atomic::AtomicU8,
}

impl Zeroing {
    pub(crate) fn zero(
        &self,
        file: &File,
        path: &Path,
        at: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        use rustix::fs::FallocateFlags as F;
        use std::sync::atomic::Ordering::Relaxed;
        let modes = [F::PUNCH_HOLE | F::KEEP_SIZE, F::ZERO_RANGE | F::KEEP_SIZE];
        let mut level = self.level.load(Relaxed);
        while (level as usize) < modes.len() {
            match rustix::fs::fallocate(file, modes[level as usize], at, len) {
                Ok(()) => return Ok(()),
                // Unsupported here, or the range not aligned to the
                // device's blocks (an image's odd tail): the next way.
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {
                    if e == rustix::io::Errno::OPNOTSUPP {
                        let _ = self.level.fetch_max(level + 1, Relaxed);
                    }
                    level += 1;
                }
                Err(e) => return Err(write_err(path, at)(e.into())),
            }
        }
        write_zeros_at(file, path, at, len)
    }
}

thread_local! {
    /// Each restore worker's region buffer, reused from region to region.
    static REGION_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

/// Rebuilds region `index` (verified) into `buf` and, when given, writes
/// it to `out`; returns its digest part, (data, zero) byte counts.
fn restore_region(
    reader: &SnapshotReader<'_>,
    index: usize,
    entries: Option<Vec<RecipeEntry>>,
    buf: &mut AlignedBuf,
    out: Option<&Out<'_>>,
    need_bytes: bool,
) -> Result<(RegionHash, u64, u64), EngineError> {
    let write_zeros = out.is_some_and(|o| o.write_zeros);
    let r = reader.rebuild_with(index, entries, buf, need_bytes || write_zeros)?;
    if let Some(o) = out {
        o.write_region(index as u64 * reader.region_size(), &r.entries, buf)?;
    }
    Ok((r.hash, r.data_bytes, r.zero_bytes))
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

/// Regions whose recipes a restore fetches in one call (2 GiB of image at
/// 8 MiB regions; about 1.2 MiB of recipes).
const RECIPE_BATCH: usize = 256;

/// Restores snapshot `id` to `target`, verifying every chunk and the image digest.
pub fn restore(
    repo: &dyn Repository,
    id: &Id,
    snapshot: &Snapshot,
    target: Target,
    progress: &dyn Progress,
) -> Result<RestoreReport, EngineError> {
    let started = Instant::now();
    let reader = SnapshotReader::open(repo, id, snapshot)?;
    progress.start(Some(snapshot.size));
    let n = reader.region_count();
    // Three workers per core: while some wait for a blob read or a
    // direct write, others decompress and hash (2 per core: 1.71–1.85 s
    // for the workload's disk-0, 3: 1.52–1.67 s, 4: no better and
    // +23 MiB). A repository behind a network link asks for more
    // (`Repository::in_flight`): each worker has one region's `chunks/get`
    // in flight.
    let workers = workers(repo, 3);
    let positional = |out: Option<&Out<'_>>| -> Result<(Vec<RegionHash>, u64, u64), EngineError> {
        let pool = threads(workers)?;
        let mut parts: Vec<(RegionHash, u64, u64)> = Vec::with_capacity(n);
        pool.install(|| -> Result<(), EngineError> {
            // Recipes a batch at a time, the next batch's fetched while
            // this one is restored: one call per RECIPE_BATCH regions.
            let batches: Vec<std::ops::Range<usize>> = (0..n)
                .step_by(RECIPE_BATCH)
                .map(|s| s..(s + RECIPE_BATCH).min(n))
                .collect();
            let mut next = match batches.first() {
                Some(r) => Some(reader.entries_of(r.clone())?),
                None => None,
            };
            for (k, range) in batches.iter().enumerate() {
                let entries = next.take().expect("fetched ahead");
                let (done, following) = rayon::join(
                    || {
                        range
                            .clone()
                            .into_par_iter()
                            .zip(entries)
                            .map(|(i, e)| {
                                let r = REGION_BUF.with(|b| {
                                    restore_region(
                                        &reader,
                                        i,
                                        Some(e),
                                        &mut b.borrow_mut(),
                                        out,
                                        false,
                                    )
                                })?;
                                progress.advance(reader.region_len(i));
                                Ok(r)
                            })
                            .collect::<Result<Vec<_>, EngineError>>()
                    },
                    || {
                        batches
                            .get(k + 1)
                            .map(|r| reader.entries_of(r.clone()))
                            .transpose()
                    },
                );
                parts.extend(done?);
                next = following?;
            }
            Ok(())
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
                    path: path.clone(),
                    why: format!(
                        "cannot create it in {}: {}",
                        path.parent()
                            .filter(|p| !p.as_os_str().is_empty())
                            .unwrap_or(Path::new("."))
                            .display(),
                        crate::source::describe_io(&e)
                    ),
                })?;
            let result: Result<_, EngineError> = (|| {
                file.set_len(snapshot.size).map_err(write_err(&path, 0))?;
                let r = positional(Some(&Out::new(&file, &tmp, &path, false)))?;
                check_digest(&reader, &r.0)?;
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
            let mut file = open_device_exclusive(&path, false)?;
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
            check_digest(&reader, &r.0)?;
            file.sync_all().map_err(write_err(&path, snapshot.size))?;
            r
        }
        Target::Discard => {
            let r = positional(None)?;
            check_digest(&reader, &r.0)?;
            r
        }
        Target::Writer { label, writer } => {
            let path = PathBuf::from(&label);
            if writer.size() != snapshot.size {
                return Err(EngineError::BadTarget {
                    path,
                    why: format!(
                        "holds {} bytes, not the image's {}",
                        writer.size(),
                        snapshot.size
                    ),
                });
            }
            let out = Out {
                to: To::Writer(&*writer),
                path: &path,
                write_zeros: false,
                zeroing: Zeroing::default(),
            };
            let r = positional(Some(&out))?;
            check_digest(&reader, &r.0)?;
            writer.flush().map_err(write_err(&path, snapshot.size))?;
            r
        }
        Target::Stream { label, mut out } => {
            // Regions are rebuilt in parallel a window at a time and written in order.
            let window = workers * 2 / 3;
            let pool = threads(workers)?;
            let mut hashes = Vec::with_capacity(n);
            let (mut data, mut zeros, mut written) = (0u64, 0u64, 0u64);
            let mut bufs: Vec<AlignedBuf> = (0..window).map(|_| AlignedBuf::default()).collect();
            for start in (0..n).step_by(window) {
                let end = (start + window).min(n);
                let entries = reader.entries_of(start..end)?;
                let parts: Vec<(RegionHash, u64, u64)> = pool.install(|| {
                    bufs[..end - start]
                        .par_iter_mut()
                        .zip(entries)
                        .enumerate()
                        .map(|(k, (b, e))| {
                            restore_region(&reader, start + k, Some(e), b, None, true)
                        })
                        .collect::<Result<_, EngineError>>()
                })?;
                for (b, p) in bufs.iter().zip(parts) {
                    if let Err(e) = out.write_all(b) {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Err(EngineError::OutputClosed {
                                snapshot: reader.label().to_string(),
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
                snapshot: format!("{} ({e})", reader.label()),
                written,
                size: snapshot.size,
            })?;
            check_digest(&reader, &hashes)?;
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

fn check_digest(reader: &SnapshotReader<'_>, hashes: &[RegionHash]) -> Result<(), EngineError> {
    let snapshot = reader.snapshot();
    let got = image_digest(hashes, snapshot.region_size as u64, snapshot.size);
    if got != snapshot.digest {
        return Err(EngineError::DigestMismatch {
            snapshot: reader.label().to_string(),
            want: Id(snapshot.digest).to_hex(),
            got: Id(got).to_hex(),
        });
    }
    Ok(())
}

/// Opens block device `path` for writing (and reading, for a delta
/// restore) with `O_EXCL`, which the kernel refuses while the device is
/// mounted or held by another exclusive user (a mounted partition, LVM,
/// RAID, a VM). The refusal names the mount points it can find.
pub(crate) fn open_device_exclusive(path: &Path, read: bool) -> Result<File, EngineError> {
    let bad = |why: String| EngineError::BadTarget {
        path: path.to_path_buf(),
        why,
    };
    OpenOptions::new()
        .read(read)
        .write(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() != Some(rustix::io::Errno::BUSY.raw_os_error()) {
                return bad(crate::source::describe_io(&e));
            }
            let mounts = mounts_of(path);
            if mounts.is_empty() {
                bad("is in use (held by a mount of one of its partitions, LVM, RAID or another program): release it first".into())
            } else {
                bad(format!(
                    "is mounted at {}: unmount it first",
                    mounts.join(", ")
                ))
            }
        })
}

/// Mount points of block device `path` or of its partitions, from
/// `/proc/self/mountinfo` and `/sys/dev/block`.
fn mounts_of(path: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let rdev = meta.rdev();
    let dev = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let sys = |d: &str| std::fs::canonicalize(format!("/sys/dev/block/{d}")).ok();
    let ours = sys(&dev);
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(d), Some(mp)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let hit = *d == dev
            || match (&ours, sys(d)) {
                (Some(o), Some(p)) => p.parent() == Some(o.as_path()),
                _ => false,
            };
        if hit {
            out.push(mp.replace("\\040", " "));
        }
    }
    out
}

/// Removes temporary files an interrupted restore to `path` left behind
/// (`.NAME.imgstore-partial-PID` whose process no longer runs), so retrying
/// cleans up after a Ctrl-C or a crash.
pub fn remove_stale_temps(path: &Path) {
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

/// The hidden name a restore to `path` writes under until the image is
/// complete (`.NAME.imgstore-partial-PID`); [`remove_stale_temps`] removes
/// those an interrupted restore left.
pub fn temp_path(path: &Path) -> PathBuf {
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
    repo: &dyn Repository,
    id: &Id,
    snapshot: &Snapshot,
    path: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<DeltaReport, EngineError> {
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
    if device && !force {
        return Err(bad(
            "is a block device: the blocks that differ would be overwritten; pass --force to restore onto it".into(),
        ));
    }
    let mut file = if device {
        open_device_exclusive(path, true)?
    } else {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| bad(crate::source::describe_io(&e)))?
    };
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
    let io = FileDelta {
        file: &file,
        path,
        zeroing: Zeroing::default(),
    };
    delta_into(repo, id, snapshot, &io, started, progress)
}

/// Restores snapshot `id` onto `disk`, which holds some version of the
/// image (a VM image exported over NBD), as [`restore_delta`] does onto a
/// file: only its data extents are read, only chunks that differ are
/// written, only blocks that must become zero are zeroed; the digest is
/// checked at the end. `label` names the disk in errors.
pub fn restore_delta_disk(
    repo: &dyn Repository,
    id: &Id,
    snapshot: &Snapshot,
    label: &str,
    disk: &dyn DeltaDisk,
    progress: &dyn Progress,
) -> Result<DeltaReport, EngineError> {
    let started = Instant::now();
    let path = PathBuf::from(label);
    let size = crate::source::BlockReader::size(disk);
    if size != snapshot.size {
        return Err(EngineError::BadTarget {
            path,
            why: format!(
                "holds {size} bytes, not the image's {}: --delta needs a disk of the image's size",
                snapshot.size
            ),
        });
    }
    let io = DiskDelta { disk, path: &path };
    delta_into(repo, id, snapshot, &io, started, progress)
}

/// A disk a delta restore reads and writes at offsets: a [`BlockReader`](crate::BlockReader)
/// and a [`BlockWriter`] that can also zero ranges.
pub trait DeltaDisk: crate::source::BlockReader + BlockWriter {
    /// Makes `len` bytes at `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// What a delta restore does to its target, whatever it is.
trait DeltaIo: Sync {
    /// Fills `buf` (zeroed) with the target's bytes at `base`, reading
    /// only data extents; returns how many bytes were read.
    fn read(&self, base: u64, buf: &mut [u8]) -> Result<u64, EngineError>;
    fn write(&self, at: u64, data: &[u8]) -> Result<(), EngineError>;
    fn zero(&self, at: u64, len: u64) -> Result<(), EngineError>;
    fn sync(&self, size: u64) -> Result<(), EngineError>;
}

struct FileDelta<'a> {
    file: &'a File,
    path: &'a Path,
    zeroing: Zeroing,
}

impl DeltaIo for FileDelta<'_> {
    fn read(&self, base: u64, buf: &mut [u8]) -> Result<u64, EngineError> {
        // Holes of a sparse target read as the zeros they are: only its
        // data extents are read.
        let end = base + buf.len() as u64;
        let mut at = base;
        let mut read = 0;
        while at < end {
            let (data, hole) = crate::source::data_extent(self.file, at, end);
            if data >= end {
                break;
            }
            let dst = &mut buf[(data - base) as usize..(hole - base) as usize];
            self.file
                .read_exact_at(dst, data)
                .map_err(|e| EngineError::TargetWrite {
                    path: self.path.to_path_buf(),
                    offset: data,
                    source: e,
                })?;
            read += hole - data;
            at = hole;
        }
        Ok(read)
    }
    fn write(&self, at: u64, data: &[u8]) -> Result<(), EngineError> {
        self.file
            .write_all_at(data, at)
            .map_err(write_err(self.path, at))
    }
    fn zero(&self, at: u64, len: u64) -> Result<(), EngineError> {
        self.zeroing.zero(self.file, self.path, at, len)
    }
    fn sync(&self, size: u64) -> Result<(), EngineError> {
        self.file.sync_all().map_err(write_err(self.path, size))
    }
}

struct DiskDelta<'a> {
    disk: &'a dyn DeltaDisk,
    path: &'a Path,
}

impl DeltaIo for DiskDelta<'_> {
    fn read(&self, base: u64, buf: &mut [u8]) -> Result<u64, EngineError> {
        let err = |offset, source| EngineError::TargetWrite {
            path: self.path.to_path_buf(),
            offset,
            source,
        };
        let end = base + buf.len() as u64;
        let extents = self
            .disk
            .data_extents(base, end)
            .map_err(|e| err(base, e))?;
        let mut pos = base;
        for &(a, b) in &extents {
            if a < pos || b <= a || b > end {
                return Err(err(
                    base,
                    std::io::Error::other("the disk reported extents out of order"),
                ));
            }
            pos = b;
        }
        self.disk
            .read_extents(base, buf, &extents)
            .map_err(|e| err(base, e))?;
        Ok(extents.iter().map(|e| e.1 - e.0).sum())
    }
    fn write(&self, at: u64, data: &[u8]) -> Result<(), EngineError> {
        self.disk
            .write_extents(&[(at, data)])
            .map_err(write_err(self.path, at))
    }
    fn zero(&self, at: u64, len: u64) -> Result<(), EngineError> {
        self.disk
            .write_zeroes(at, len)
            .map_err(write_err(self.path, at))
    }
    fn sync(&self, size: u64) -> Result<(), EngineError> {
        self.disk.flush().map_err(write_err(self.path, size))
    }
}

/// The delta restore proper, onto any [`DeltaIo`].
fn delta_into(
    repo: &dyn Repository,
    id: &Id,
    snapshot: &Snapshot,
    io: &dyn DeltaIo,
    started: Instant,
    progress: &dyn Progress,
) -> Result<DeltaReport, EngineError> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let reader = SnapshotReader::open(repo, id, snapshot)?;
    progress.start(Some(snapshot.size));
    let (read, written, skipped, zeroed) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let hashes: Vec<RegionHash> = io_pool()?.install(|| {
        (0..reader.region_count())
            .into_par_iter()
            .map(|index| -> Result<RegionHash, EngineError> {
                let base = index as u64 * snapshot.region_size as u64;
                let entries = reader.entries(index)?;
                let len = reader.region_len(index) as usize;
                let mut buf = vec![0u8; len];
                read.fetch_add(io.read(base, &mut buf)?, Relaxed);
                // Pass 1: which extents differ.
                let mut pos = 0usize;
                let mut need: Vec<(usize, usize, Id)> = Vec::new();
                let mut zero: Vec<(usize, usize)> = Vec::new();
                for e in &entries {
                    let s = &buf[pos..pos + e.len as usize];
                    match e.chunk {
                        Some(c) if !reader.repo().codec().chunk_matches(s, &c) => {
                            need.push((pos, e.len as usize, c))
                        }
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
                    let frames = reader.frames(&ids, |id| {
                        base + need.iter().find(|n| n.2 == *id).map_or(0, |n| n.0) as u64
                    })?;
                    for &(off, l, c) in &need {
                        let frame = &frames[ids.binary_search(&c).expect("fetched")];
                        let at = base + off as u64;
                        let out = reader.decode_verified(frame, c, at, l as u64)?;
                        io.write(at, &out)?;
                        buf[off..off + l].copy_from_slice(&out);
                        written.fetch_add(l as u64, Relaxed);
                    }
                }
                for &(off, l) in &zero {
                    let at = base + off as u64;
                    io.zero(at, l as u64)?;
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
    check_digest(&reader, &hashes)?;
    io.sync(snapshot.size)?;
    progress.finish();
    Ok(DeltaReport {
        read_bytes: read.into_inner(),
        written_bytes: written.into_inner(),
        skipped_bytes: skipped.into_inner(),
        zeroed_bytes: zeroed.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Whether the directory a new target file would go in exists: the error
/// names it.
pub(crate) fn parent_dir_exists(path: &Path) -> Result<(), String> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if parent.is_dir() {
        Ok(())
    } else {
        Err(format!("directory {} does not exist", parent.display()))
    }
}
