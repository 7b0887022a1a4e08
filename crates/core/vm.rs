//! Virtual machine disks as sources: NBD exports (`nbd://`, `nbd+unix://`)
//! read through `imgstore-nbd`'s client, and VM image formats (qcow2,
//! vmdk, vhdx, ...) exported by a private `qemu-storage-daemon`
//! (`imgstore-qemu`) and read the same way. The engine sees a
//! [`BlockReader`]: zero extents (NBD `base:allocation`) are skipped as
//! holes of a sparse file are.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use imgstore_engine::{BlockReader, BlockWriter, DeltaDisk, Source};
use imgstore_nbd::client::{Client, ClientError, Command, Uri, TIMEOUT};
use imgstore_nbd::STATE_ZERO;

use anyhow::Context;

use crate::exit;

const BASE_ALLOCATION: &str = "base:allocation";

/// Most connections opened to one export (one per reading thread).
const MAX_CONNECTIONS: usize = 4;

/// An NBD export read (or written) over a few connections, each used by
/// one thread at a time with several requests in flight.
pub struct NbdDisk {
    label: String,
    size: u64,
    conns: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
    /// The error that ended a connection, repeated to whoever meets the
    /// connection gone (threads race to report, and it is the news).
    failed: Mutex<Option<(std::io::ErrorKind, String)>>,
}

/// A client error as the I/O error the engine reports, saying what to do.
fn io_error(e: ClientError) -> std::io::Error {
    use std::io::ErrorKind::*;
    match e {
        ClientError::Io(e) | ClientError::Connect(e)
            if matches!(
                e.kind(),
                UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted
            ) =>
        {
            std::io::Error::new(
                e.kind(),
                "the NBD server closed the connection: check that it still runs, then back up again",
            )
        }
        ClientError::Io(e) if matches!(e.kind(), WouldBlock | TimedOut) => std::io::Error::new(
            TimedOut,
            format!(
                "the NBD server did not answer within {} s",
                TIMEOUT.as_secs()
            ),
        ),
        other => other.into_io(),
    }
}

impl NbdDisk {
    /// Connects to `uri`: one connection, and more (up to one per core)
    /// when the server says several connections see the same data.
    pub fn connect(uri: &Uri, label: &str) -> anyhow::Result<NbdDisk> {
        NbdDisk::connect_with(uri, label, None)
    }

    /// As [`NbdDisk::connect`], negotiating metadata context `extra` too
    /// (a dirty bitmap's) on every connection.
    pub fn connect_with(uri: &Uri, label: &str, extra: Option<&str>) -> anyhow::Result<NbdDisk> {
        let mut contexts = vec![BASE_ALLOCATION];
        contexts.extend(extra);
        let contexts = &contexts[..];
        let first = Client::connect(uri, contexts, TIMEOUT).map_err(|e| {
            let hint = match &e {
                ClientError::Connect(_) => ": is the server running, and the address right?",
                ClientError::Refused { .. } => ": list the exports with nbdinfo --list",
                _ => "",
            };
            exit::Coded {
                code: exit::FAILURE,
                msg: format!("NBD source {label}: {e}{hint}"),
            }
        })?;
        let size = first.size();
        let want = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, MAX_CONNECTIONS);
        let multi = first.multi_conn();
        let mut conns = vec![Mutex::new(Some(first))];
        if multi {
            // A server that advertises multi-conn but limits connections
            // (qemu-nbd without --shared) leaves a handshake unanswered:
            // extra connections get a short wait, and are only a speed-up.
            for _ in 1..want {
                match Client::connect(uri, contexts, std::time::Duration::from_secs(2)) {
                    Ok(c) if c.size() == size && extra.is_none_or(|x| c.context(x)) => {
                        conns.push(Mutex::new(Some(c)));
                    }
                    _ => break,
                }
            }
        }
        Ok(NbdDisk {
            label: label.to_string(),
            size,
            conns,
            next: AtomicUsize::new(0),
            failed: Mutex::new(None),
        })
    }

    /// Whether the server agreed to metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.with(|c| Ok(c.context(name))).unwrap_or(false)
    }

    /// The extents metadata context `context` (a `qemu:dirty-bitmap:`)
    /// marks dirty, as `(offset, length)`, merged and in order: block
    /// status of the whole export, several requests in flight.
    pub fn dirty_extents(&self, context: &str) -> anyhow::Result<Vec<(u64, u64)>> {
        let all = self
            .with(|c| c.block_status_range(context, 0, self.size))
            .with_context(|| format!("{}: block status of {context}", self.label))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l, f) in all {
            if f & imgstore_nbd::client::STATE_DIRTY == 0 {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => out.push((o, l)),
            }
        }
        Ok(out)
    }

    /// Runs `f` on one of the connections; a connection that failed is
    /// dropped (the backup stops at its first error anyway).
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, ClientError>) -> std::io::Result<T> {
        let i = self.next.fetch_add(1, Relaxed) % self.conns.len();
        let mut slot = self.conns[i].lock().unwrap_or_else(|p| p.into_inner());
        let failed = || {
            let f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            let (kind, msg) = f.clone().unwrap_or((
                std::io::ErrorKind::Other,
                format!("an earlier error ended a connection to {}", self.label),
            ));
            std::io::Error::new(kind, msg)
        };
        let Some(c) = slot.as_mut() else {
            return Err(failed());
        };
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => {
                *slot = None;
                let e = io_error(e);
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert((e.kind(), e.to_string()));
                Err(e)
            }
        }
    }
}

impl Drop for NbdDisk {
    /// Ends each session politely (`NBD_CMD_DISC`).
    fn drop(&mut self) {
        for c in &mut self.conns {
            let c = c.get_mut().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = c.take() {
                c.disconnect();
            }
        }
    }
}

impl BlockReader for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&self, from: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
        self.with(|c| {
            if !c.context(BASE_ALLOCATION) {
                return Ok(if from < end {
                    vec![(from, end)]
                } else {
                    Vec::new()
                });
            }
            let mut out: Vec<(u64, u64)> = Vec::new();
            let mut pos = from;
            // Each answer covers at least one byte (the client checks).
            while pos < end {
                let len = (end - pos).min(u32::MAX as u64 / 2) as u32;
                for (n, flags) in c.block_status(BASE_ALLOCATION, pos, len)? {
                    let e = (pos + n).min(end);
                    if flags & STATE_ZERO == 0 {
                        match out.last_mut() {
                            Some(last) if last.1 == pos => last.1 = e,
                            _ => out.push((pos, e)),
                        }
                    }
                    pos = e;
                    if pos >= end {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    fn read_extents(
        &self,
        offset: u64,
        buf: &mut [u8],
        extents: &[(u64, u64)],
    ) -> std::io::Result<()> {
        let mut cmds = Vec::with_capacity(extents.len());
        let mut rest: &mut [u8] = buf;
        let mut at = offset;
        for &(a, b) in extents {
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut((a - at) as usize);
            let (piece, tail) = tail.split_at_mut((b - a) as usize);
            cmds.push(Command::Read(a, piece));
            rest = tail;
            at = b;
        }
        self.with(|c| c.run(&mut cmds))
    }
}

impl BlockWriter for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_extents(&self, writes: &[(u64, &[u8])]) -> std::io::Result<()> {
        let mut cmds: Vec<Command<'_>> =
            writes.iter().map(|&(o, d)| Command::Write(o, d)).collect();
        self.with(|c| c.run(&mut cmds))
    }

    fn flush(&self) -> std::io::Result<()> {
        for _ in 0..self.conns.len() {
            self.with(|c| c.run(&mut [Command::Flush]))?;
        }
        Ok(())
    }
}

impl DeltaDisk for NbdDisk {
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.with(|c| {
            if !c.can_write_zeroes() {
                let zeros = vec![0u8; imgstore_nbd::client::MAX_IO];
                let mut cmds = Vec::new();
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(zeros.len() as u64) as usize;
                    cmds.push(Command::Write(offset + at, &zeros[..n]));
                    at += n as u64;
                }
                return c.run(&mut cmds);
            }
            // Requests carry 32-bit lengths: 1 GiB at a time.
            let mut cmds = Vec::new();
            let mut at = 0;
            while at < len {
                let n = (len - at).min(1 << 30);
                cmds.push(Command::WriteZeroes(offset + at, n));
                at += n;
            }
            c.run(&mut cmds)
        })
    }
}

/// A VM image being read through a private QEMU daemon; the daemon stops
/// when this is dropped.
pub struct VmSource {
    pub source: Source,
    pub daemon: imgstore_qemu::Export,
}

/// What `path` is, when it is a VM image imgstore reads through QEMU:
/// `Some(format)`, or `None` for a raw image (read directly, as before).
/// `format` is what the user forced with `--format`. Without QEMU's
/// tools, an image is read as raw unless a format was forced.
pub fn vm_format(path: &Path, format: Option<&str>) -> anyhow::Result<Option<String>> {
    if let Some(f) = format {
        if !imgstore_qemu::FORMATS.contains(&f) {
            return Err(exit::usage(format!(
                "--format {f}: give one of {}",
                imgstore_qemu::FORMATS.join(", ")
            )));
        }
        if f == "raw" {
            return Ok(None);
        }
    } else if !imgstore_qemu::available() {
        return Ok(None);
    }
    let info = imgstore_qemu::info(path, format)?;
    Ok((info.format != "raw").then_some(info.format))
}

/// Starts a private daemon exporting `image` (in `format`), read-only
/// or `writable`, and connects to it as `label`.
fn private_disk(
    image: &Path,
    format: &str,
    writable: bool,
    label: &str,
) -> anyhow::Result<(imgstore_qemu::Export, NbdDisk)> {
    let mut daemon = imgstore_qemu::Export::start(
        image,
        format,
        &imgstore_qemu::ExportOptions {
            writable,
            ..Default::default()
        },
    )?;
    let disk = NbdDisk::connect(daemon.uri(), label)?;
    // Connected: the socket goes, so nothing else reaches the export and
    // nothing is left behind.
    daemon.seal();
    Ok((daemon, disk))
}

/// Starts a private daemon exporting the image at `path` (in `format`)
/// read-only and opens it as a source.
pub fn open_vm_image(path: &Path, format: &str) -> anyhow::Result<VmSource> {
    let (daemon, reader) = private_disk(path, format, false, &path.display().to_string())?;
    Ok(VmSource {
        source: Source::from_block_reader(path, Box::new(reader)),
        daemon,
    })
}

/// Restores snapshot `id` into a new image at `path` in `format` (thin:
/// only data is written, through a private writable QEMU export of a
/// fresh `qemu-img create` image), under a temporary name renamed into
/// place once the digest checked and QEMU closed the image cleanly.
pub fn restore_into_image(
    store: &dyn imgstore_repo::Repository,
    id: &imgstore_format::Id,
    snap: &imgstore_format::Snapshot,
    path: &Path,
    format: &str,
    force: bool,
    progress: &dyn imgstore_engine::Progress,
) -> anyhow::Result<imgstore_engine::RestoreReport> {
    if !imgstore_qemu::WRITABLE_FORMATS.contains(&format) {
        return Err(exit::usage(format!(
            "--format {format}: a restore writes one of {} (or restore raw without --format)",
            imgstore_qemu::WRITABLE_FORMATS.join(", ")
        )));
    }
    match imgstore_engine::Target::resolve(path, force)? {
        imgstore_engine::Target::File { .. } => {}
        _ => {
            return Err(exit::usage(format!(
                "{}: --format {format} writes a new image file; give a file path (an existing file with --force)",
                path.display()
            )))
        }
    }
    imgstore_engine::remove_stale_temps(path);
    let tmp = imgstore_engine::temp_path(path);
    /// Removes the temporary image unless it was renamed into place.
    struct Temp<'a>(&'a Path, bool);
    impl Drop for Temp<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut temp = Temp(&tmp, false);
    imgstore_qemu::create(&tmp, format, snap.size)?;
    let label = path.display().to_string();
    let (daemon, disk) = private_disk(&tmp, format, true, &label)?;
    let report = imgstore_engine::restore(
        store,
        id,
        snap,
        imgstore_engine::Target::Writer {
            label,
            writer: Box::new(disk),
        },
        progress,
    )?;
    daemon.stop()?;
    std::fs::rename(&tmp, path).with_context(|| {
        format!(
            "cannot rename the restored image into place as {}",
            path.display()
        )
    })?;
    temp.1 = true;
    Ok(report)
}

/// `restore --delta` onto an existing VM image at `path` in `format`:
/// exported writable by a private QEMU daemon, only its data read (block
/// status), only what differs written; QEMU closes it cleanly at the end.
/// Writes are in place, as onto a raw file.
pub fn restore_delta_into_image(
    store: &dyn imgstore_repo::Repository,
    id: &imgstore_format::Id,
    snap: &imgstore_format::Snapshot,
    path: &Path,
    format: &str,
    progress: &dyn imgstore_engine::Progress,
) -> anyhow::Result<imgstore_engine::DeltaReport> {
    let label = path.display().to_string();
    let (daemon, disk) = private_disk(path, format, true, &label)?;
    let report = imgstore_engine::restore_delta_disk(store, id, snap, &label, &disk, progress)?;
    drop(disk);
    daemon.stop()?;
    Ok(report)
}

/// Opens an NBD URI as a source.
pub fn open_nbd(uri: &str) -> anyhow::Result<Source> {
    let parsed = Uri::parse(uri).map_err(|e| exit::usage(e.to_string()))?;
    let reader = NbdDisk::connect(&parsed, uri)?;
    Ok(Source::from_block_reader(
        &PathBuf::from(uri),
        Box::new(reader),
    ))
}

/// The NBD metadata context QEMU offers a dirty bitmap under.
pub fn bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// Opens an NBD URI as a source together with the dirty extents of QEMU
/// dirty bitmap `bitmap`, which the export must offer.
pub fn open_nbd_bitmap(uri: &str, bitmap: &str) -> anyhow::Result<(Source, Vec<(u64, u64)>)> {
    let parsed = Uri::parse(uri).map_err(|e| exit::usage(e.to_string()))?;
    let context = bitmap_context(bitmap);
    let reader = NbdDisk::connect_with(&parsed, uri, Some(&context))?;
    if !reader.has_context(&context) {
        drop(reader);
        let prefix = bitmap_context("");
        let offered: Vec<String> = Client::list_contexts(&parsed, &prefix, TIMEOUT)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.strip_prefix(&prefix).map(|b| format!("{b:?}")))
            .collect();
        let offered = if offered.is_empty() {
            "it offers none".to_string()
        } else {
            format!("it offers {}", offered.join(", "))
        };
        return Err(exit::Coded {
            code: exit::FAILURE,
            msg: format!(
                "NBD source {uri} does not offer bitmap {bitmap:?} (metadata context {context}; {offered}): export it with the disk (QMP block-export-add \"bitmaps\"; virsh backup-begin: exportbitmap='{bitmap}' on the backup XML's <disk>), or back up without --bitmap"
            ),
        }
        .into());
    }
    let dirty = reader.dirty_extents(&context)?;
    Ok((
        Source::from_block_reader(&PathBuf::from(uri), Box::new(reader)),
        dirty,
    ))
}

/// The default image name of an NBD source: the export's name, or the
/// socket's file name for the default export.
pub fn nbd_default_name(uri: &str) -> Option<String> {
    let u = Uri::parse(uri).ok()?;
    if !u.export.is_empty() {
        return Some(u.export.replace('/', "-"));
    }
    match &u.address {
        imgstore_nbd::client::Address::Unix(p) => {
            p.file_stem().map(|s| s.to_string_lossy().into_owned())
        }
        imgstore_nbd::client::Address::Tcp { host, .. } => Some(host.clone()),
    }
}
