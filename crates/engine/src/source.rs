//! Where a backup reads from: a regular (possibly sparse) file, a block
//! device, or a stream (stdin, or the output of a command).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::aligned::{align_down, align_up, read_direct, AlignedBuf, Direct};
use crate::EngineError;

/// The kind of source, which decides how it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A regular file: holes are skipped with `SEEK_DATA`/`SEEK_HOLE`.
    File,
    /// A block device: read positionally, every byte.
    BlockDevice,
    /// A stream: read sequentially until end of file; size unknown up front.
    Stream,
}

enum Inner {
    /// A file or device; with direct I/O on, regions are read through the
    /// second, `O_DIRECT` handle while the file system allows it.
    Positional(File, Direct),
    Stream(Box<dyn Read + Send>),
}

/// An open backup source.
pub struct Source {
    kind: SourceKind,
    path: PathBuf,
    size: Option<u64>,
    inner: Inner,
}

/// One region of the image as read from the source.
pub struct RegionBuf {
    pub index: u64,
    pub offset: u64,
    pub data: AlignedBuf,
    /// True when the source reported the whole region as a hole (nothing was
    /// read). `data` then has the region's length but its bytes are not
    /// filled: they are zeros by definition, and must not be read.
    pub all_hole: bool,
}

impl Source {
    /// Opens a file, block device or stream path for reading.
    pub fn open(path: &Path) -> Result<Source, EngineError> {
        let bad = |why: String| EngineError::BadSource {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(describe_io(&e)))?;
        if meta.is_dir() {
            return Err(bad(
                "is a directory: give an image file, a block device or - for stdin".into(),
            ));
        }
        let ft = meta.file_type();
        // Checked before opening: opening a FIFO without a writer blocks
        // for ever, and a character device such as /dev/zero never ends.
        if ft.is_fifo() || ft.is_char_device() || ft.is_socket() {
            let what = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a character device"
            };
            return Err(bad(format!(
                "is {what}: imgstore backs up files and block devices by path; feed a stream on stdin (`... | imgstore backup - --name NAME`) or with --stdin-from-command"
            )));
        }
        let mut file = File::open(path).map_err(|e| bad(describe_io(&e)))?;
        let (kind, size) = if ft.is_file() {
            (SourceKind::File, Some(meta.len()))
        } else if ft.is_block_device() {
            let size = file
                .seek(SeekFrom::End(0))
                .map_err(|e| bad(format!("cannot find its size: {}", describe_io(&e))))?;
            (SourceKind::BlockDevice, Some(size))
        } else {
            return Err(bad("is not a file, block device or stream".into()));
        };
        Ok(Source {
            kind,
            path: path.to_path_buf(),
            size,
            inner: Inner::Positional(file, Direct::default()),
        })
    }

    /// Reads regions with direct I/O (`O_DIRECT`) instead of through the
    /// page cache: less CPU on machines where page-cache copies are
    /// expensive, and a backup of many disks does not evict what the host
    /// caches — but no readahead, and data already cached is read again
    /// from the disk. Falls back to buffered reads where the file system
    /// refuses. No effect on streams.
    pub fn with_direct_io(mut self, on: bool) -> Source {
        if let Inner::Positional(_, direct) = &mut self.inner {
            *direct = if on {
                Direct::open(&self.path, false)
            } else {
                Direct::default()
            };
        }
        self
    }

    /// Standard input as a stream source.
    pub fn stdin() -> Source {
        Source::from_reader(Path::new("-"), Box::new(std::io::stdin()))
    }

    /// Any reader as a stream source (its size is found at end of file).
    pub fn from_reader(label: &Path, r: Box<dyn Read + Send>) -> Source {
        Source {
            kind: SourceKind::Stream,
            path: label.to_path_buf(),
            size: None,
            inner: Inner::Stream(r),
        }
    }

    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size when known up front (files and devices).
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Positional access to a file or device source (`None` for a stream).
    pub(crate) fn positional(&self) -> Option<Positional<'_>> {
        match &self.inner {
            Inner::Positional(file, direct) => Some(Positional {
                file,
                direct,
                sparse: self.kind == SourceKind::File,
                path: &self.path,
                size: self.size.unwrap_or(0),
            }),
            Inner::Stream(_) => None,
        }
    }

    /// The current size of a file source (to detect a source that changed).
    pub(crate) fn current_size(&self) -> Option<u64> {
        match (&self.inner, self.kind) {
            (Inner::Positional(f, _), SourceKind::File) => f.metadata().ok().map(|m| m.len()),
            _ => self.size,
        }
    }

    /// Reads region `index` (of `region_size` bytes) into `buf`; returns the
    /// region, or `None` past the end. Also returns how many bytes were read
    /// from the source (holes are not read).
    pub(crate) fn read_region(
        &mut self,
        index: u64,
        region_size: usize,
        mut buf: AlignedBuf,
    ) -> Result<Option<(RegionBuf, u64)>, EngineError> {
        let Inner::Stream(r) = &mut self.inner else {
            let p = self.positional().expect("a file or device source");
            return p.read_region(index, region_size, buf);
        };
        let offset = index * region_size as u64;
        buf.reset(region_size);
        let mut filled = 0;
        while filled < region_size {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(EngineError::SourceRead {
                        path: self.path.clone(),
                        offset: offset + filled as u64,
                        source,
                    })
                }
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.reset(filled);
        Ok(Some((
            RegionBuf {
                index,
                offset,
                data: buf,
                all_hole: false,
            },
            filled as u64,
        )))
    }
}

/// The next data extent `[data, hole)` at or after `pos`, clipped to `end`;
/// `data >= end` when the rest is a hole. File systems without
/// `SEEK_DATA` support report everything as data.
pub(crate) fn data_extent(file: &File, pos: u64, end: u64) -> (u64, u64) {
    use rustix::fs::{seek, SeekFrom as S};
    let data = match seek(file, S::Data(pos)) {
        Ok(d) => d,
        Err(rustix::io::Errno::NXIO) => return (end, end),
        Err(_) => return (pos, end),
    };
    if data >= end {
        return (end, end);
    }
    let hole = seek(file, S::Hole(data)).unwrap_or(end).min(end);
    (data, hole.max(data + 1).min(end))
}

/// A short, user-facing description of an I/O error.
pub(crate) fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".into(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (run as a user that can read it)".into()
        }
        _ => e.to_string(),
    }
}

/// Reads at offsets of a file or device source; shareable between threads.
pub(crate) struct Positional<'a> {
    file: &'a File,
    direct: &'a Direct,
    /// A regular file: holes are found with `SEEK_DATA` and not read.
    sparse: bool,
    path: &'a Path,
    size: u64,
}

impl Positional<'_> {
    /// Reads region `index` (of `region_size` bytes) into `buf`, holes as
    /// zeros without reading them; `None` past the end. Also returns how
    /// many bytes were read from the source. Several threads may read
    /// regions at once (that is what keeps a fast disk busy).
    pub(crate) fn read_region(
        &self,
        index: u64,
        region_size: usize,
        mut buf: AlignedBuf,
    ) -> Result<Option<(RegionBuf, u64)>, EngineError> {
        let offset = index * region_size as u64;
        let size = self.size;
        if offset >= size {
            return Ok(None);
        }
        let len = (size - offset).min(region_size as u64) as usize;
        buf.reset(len);
        let end = offset + len as u64;
        let mut read = 0u64;
        // Bytes of `buf` before `filled` hold the image; holes are zeroed
        // here rather than the whole buffer up front.
        let mut filled = 0usize;
        let changed = |at: u64| EngineError::SourceChanged {
            path: self.path.to_path_buf(),
            before: size,
            after: self.file.metadata().map(|m| m.len()).unwrap_or(0),
            at,
        };
        let read_err = |at: u64, source: std::io::Error| EngineError::SourceRead {
            path: self.path.to_path_buf(),
            offset: at,
            source,
        };
        for (data, hole) in self.data_extents(offset, end) {
            let (a, b) = ((data - offset) as usize, (hole - offset) as usize);
            buf[filled..a].fill(0);
            let mut done = false;
            if let Some(d) = self.direct.usable(&buf) {
                // Region offsets are aligned; round the extent out to whole
                // blocks (what lies around it is hole, or image bytes read
                // again).
                let (a0, b0) = (align_down(a), align_up(b));
                match read_direct(d, buf.io_mut(a0, b0), offset + a0 as u64) {
                    Ok(n) if a0 + n >= b => done = true,
                    Ok(n) => return Err(changed(offset + (a0 + n) as u64)),
                    Err(e) if self.direct.refuses(&e) => {}
                    Err(e) => return Err(read_err(data, e)),
                }
            }
            if !done {
                self.file.read_exact_at(&mut buf[a..b], data).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        changed(data)
                    } else {
                        read_err(data, e)
                    }
                })?;
            }
            filled = b;
            read += hole - data;
        }
        // An all-hole region's bytes are known to be zeros and nobody reads
        // them (see `RegionBuf::all_hole`): zero-filling 8 MiB per hole was
        // most of a first backup of a thin image once hole chaining values
        // come from the cache (1 TiB virtual, 1 GiB data: 98 s).
        if read > 0 {
            buf[filled..].fill(0);
        }
        Ok(Some((
            RegionBuf {
                index,
                offset,
                data: buf,
                all_hole: read == 0,
            },
            read,
        )))
    }

    /// Asks the kernel to start reading region `index`'s data extents into
    /// the page cache now (`POSIX_FADV_WILLNEED`, which does not wait), so
    /// that the disk has several requests in flight while the threads hash
    /// and compress: a virtual disk here read 1.4 GB/s with one 8 MiB
    /// request at a time and 2.1 GB/s with four. Holes are not advised
    /// (the kernel would fill the cache with zero pages); direct reads
    /// bypass the cache, so nothing is advised for them.
    pub(crate) fn prefetch(&self, index: u64, region_size: usize) {
        let offset = index * region_size as u64;
        if offset >= self.size || self.direct.is_on() {
            return;
        }
        let end = (offset + region_size as u64).min(self.size);
        for (data, hole) in self.data_extents(offset, end) {
            // Advice is only advice: an error changes nothing but speed.
            let _ = rustix::fs::fadvise(
                self.file,
                data,
                std::num::NonZeroU64::new(hole - data),
                rustix::fs::Advice::WillNeed,
            );
        }
    }

    /// The data extents `[data, hole)` of `[from, end)`: found with
    /// `SEEK_DATA` in a regular file, all of it on a device.
    fn data_extents(&self, from: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut pos = from;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (data, hole) = if self.sparse {
                data_extent(self.file, pos, end)
            } else {
                (pos, end)
            };
            pos = hole;
            (data < end).then_some((data, hole))
        })
    }

    /// Reads exactly `buf.len()` bytes at `offset` (holes read as zeros).
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                EngineError::SourceChanged {
                    path: self.path.to_path_buf(),
                    before: self.size,
                    after: self.file.metadata().map(|m| m.len()).unwrap_or(0),
                    at: offset,
                }
            } else {
                EngineError::SourceRead {
                    path: self.path.to_path_buf(),
                    offset,
                    source: e,
                }
            }
        })
    }
}
