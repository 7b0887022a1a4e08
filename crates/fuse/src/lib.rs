//! A read-only FUSE file system of snapshot images:
//! `by-id/ID.img` and `by-name/NAME/TIME.img`, one regular file per
//! snapshot (the two paths are hard links of one inode), each the image's
//! exact size, with random reads served by an [`Image`] and `SEEK_DATA` /
//! `SEEK_HOLE` answered from its allocation map.
//!
//! Why a crate of its own: it knows the FUSE protocol (through `fuser`, in
//! pure Rust, mounting with `fusermount3`) and nothing of storage, the same
//! split as the NBD server. A library never prints; the binary reports.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyLseek, ReplyOpen, Request,
};

/// A snapshot image the file system serves.
pub trait Image: Send {
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (within the image).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `(length, is_zero)` runs covering `[offset, offset + len)`.
    fn map(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>>;
}

/// One snapshot as the tree shows it.
pub struct Entry {
    /// File name under `by-id/` (without `.img`).
    pub id: String,
    /// Directory under `by-name/`.
    pub name: String,
    /// File name under `by-name/NAME/` (without `.img`).
    pub time_label: String,
    pub time: SystemTime,
    /// Bytes that are data (for `st_blocks`, so `du` shows the sparse size).
    pub data_bytes: u64,
    pub image: Box<dyn Image>,
}

const ROOT: u64 = 1;
const BY_NAME: u64 = 2;
const BY_ID: u64 = 3;
const NAME_BASE: u64 = 1 << 20;
const FILE_BASE: u64 = 1 << 40;
const TTL: Duration = Duration::from_secs(3600);

struct Fs {
    entries: Vec<Entry>,
    names: Vec<String>,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl Fs {
    fn dir_attr(&self, ino: u64) -> FileAttr {
        self.attr(ino, FileType::Directory, 0, 0, self.started, 0o555, 2)
    }

    #[allow(clippy::too_many_arguments)]
    fn attr(
        &self,
        ino: u64,
        kind: FileType,
        size: u64,
        blocks: u64,
        t: SystemTime,
        perm: u16,
        nlink: u32,
    ) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, i: usize) -> FileAttr {
        let e = &self.entries[i];
        let size = e.image.size();
        self.attr(
            FILE_BASE + i as u64,
            FileType::RegularFile,
            size,
            e.data_bytes.min(size).div_ceil(512),
            e.time,
            0o444,
            2,
        )
    }

    fn file(&self, ino: u64) -> Option<usize> {
        ino.checked_sub(FILE_BASE)
            .map(|i| i as usize)
            .filter(|i| *i < self.entries.len())
    }

    fn name_dir(&self, ino: u64) -> Option<usize> {
        (NAME_BASE..FILE_BASE)
            .contains(&ino)
            .then(|| (ino - NAME_BASE) as usize)
            .filter(|i| *i < self.names.len())
    }

    fn attr_of(&self, ino: u64) -> Option<FileAttr> {
        match ino {
            ROOT | BY_NAME | BY_ID => Some(self.dir_attr(ino)),
            _ => self
                .file(ino)
                .map(|i| self.file_attr(i))
                .or_else(|| self.name_dir(ino).map(|_| self.dir_attr(ino))),
        }
    }

    /// Directory listing: (ino, kind, name), without `.` and `..`.
    fn children(&self, ino: u64) -> Option<Vec<(u64, FileType, String)>> {
        Some(match ino {
            ROOT => vec![
                (BY_NAME, FileType::Directory, "by-name".into()),
                (BY_ID, FileType::Directory, "by-id".into()),
            ],
            BY_NAME => self
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| (NAME_BASE + i as u64, FileType::Directory, n.clone()))
                .collect(),
            BY_ID => self
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    (
                        FILE_BASE + i as u64,
                        FileType::RegularFile,
                        format!("{}.img", e.id),
                    )
                })
                .collect(),
            _ => {
                let n = &self.names[self.name_dir(ino)?];
                self.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| &e.name == n)
                    .map(|(i, e)| {
                        (
                            FILE_BASE + i as u64,
                            FileType::RegularFile,
                            format!("{}.img", e.time_label),
                        )
                    })
                    .collect()
            }
        })
    }

    /// The next offset at or after `from` that is data (`want_data`) or a hole.
    fn seek(&self, i: usize, from: u64, want_data: bool) -> io::Result<Option<u64>> {
        let img = &self.entries[i].image;
        let size = img.size();
        let mut pos = from;
        while pos < size {
            let window = (size - pos).min(64 << 20);
            for (n, zero) in img.map(pos, window)? {
                if zero != want_data {
                    return Ok(Some(pos));
                }
                pos += n;
            }
        }
        // The end of the file counts as a hole; past it there is no data.
        Ok(if want_data {
            None
        } else {
            Some(size.max(from))
        })
    }
}

impl Filesystem for Fs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_string_lossy();
        let found = self
            .children(parent)
            .and_then(|c| c.into_iter().find(|(_, _, n)| *n == name))
            .and_then(|(ino, _, _)| self.attr_of(ino));
        match found {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(libc::EISDIR);
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        // FOPEN_KEEP_CACHE: the image never changes, the page cache stays valid.
        reply.opened(0, 1 << 1);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(i) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        let total = self.entries[i].image.size();
        let offset = offset.max(0) as u64;
        if offset >= total {
            return reply.data(&[]);
        }
        let n = (size as u64).min(total - offset) as usize;
        let mut buf = vec![0u8; n];
        match self.entries[i].image.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(_) => reply.error(libc::EIO),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(children) = self.children(ino) else {
            return reply.error(libc::ENOENT);
        };
        let mut all = vec![
            (ino, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        all.extend(children);
        for (k, (child, kind, name)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(child, (k + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn lseek(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(i) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(libc::EINVAL),
        };
        let size = self.entries[i].image.size();
        if offset < 0 || offset as u64 >= size {
            return reply.error(libc::ENXIO);
        }
        match self.seek(i, offset as u64, want_data) {
            Ok(Some(p)) => reply.offset(p as i64),
            Ok(None) => reply.error(libc::ENXIO),
            Err(_) => reply.error(libc::EIO),
        }
    }
}

/// A mounted tree, served by a session thread until it is unmounted.
pub struct Mounted {
    session: fuser::BackgroundSession,
    mountpoint: PathBuf,
}

/// Mounts the tree read-only at `mountpoint` and serves it on a thread of
/// its own, until [`Mounted::unmount`] or an unmount from outside
/// (`fusermount3 -u`). If the process dies, the mount is made with
/// auto-unmount where the FUSE configuration allows it, so no stale mount
/// point stays behind.
pub fn mount(entries: Vec<Entry>, mountpoint: &Path, uid: u32, gid: u32) -> io::Result<Mounted> {
    let mut names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    names.sort();
    names.dedup();
    let fs = Fs {
        entries,
        names,
        uid,
        gid,
        started: SystemTime::now(),
    };
    let opts = [
        MountOption::RO,
        MountOption::FSName("imgstore".into()),
        MountOption::Subtype("imgstore".into()),
        MountOption::DefaultPermissions,
        MountOption::AutoUnmount,
        MountOption::AllowRoot,
    ];
    Ok(Mounted {
        session: fuser::spawn_mount2(fs, mountpoint, &opts)?,
        mountpoint: mountpoint.to_path_buf(),
    })
}

impl Mounted {
    /// Whether the session has ended (the tree was unmounted from outside).
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Waits for the session to end, and says how it ended.
    pub fn wait(self) -> io::Result<()> {
        let guard = self.session.guard;
        guard
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the FUSE session thread panicked")))
    }

    /// Unmounts the tree lazily, as `umount -l` does: it leaves the file
    /// system's namespace now, and the session ends once the files open
    /// in it are closed ([`Mounted::is_finished`] says when).
    /// `fusermount3 -u -z` does it, so it works for the user who mounted as
    /// for root.
    pub fn unmount(&self) -> io::Result<()> {
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg("--")
            .arg(&self.mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if out.status.success() || self.is_finished() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "fusermount3 -u {} failed: {}",
                self.mountpoint.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}
