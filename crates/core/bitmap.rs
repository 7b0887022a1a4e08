//! `backup --bitmap` and `--checkpoint`: changed-block backups driven by
//! QEMU dirty bitmaps.
//!
//! Two kinds. An **NBD export's** bitmap (`qemu:dirty-bitmap:NAME`) is
//! kept by whoever runs QEMU; imgstore reads its dirty extents and records
//! which bitmap will hold the next backup's changes (`--checkpoint`, else
//! the same). A **stopped qcow2 file's** bitmap is managed by imgstore: a
//! private `qemu-storage-daemon` opens the image read-write (its lock keeps
//! a VM out), exports it read-only with a frozen copy of the generation
//! `NAME-<token>` the parent recorded, and only after the snapshot is
//! committed adds the next generation and removes the old ones, then stops
//! cleanly so QEMU writes the bitmaps into the file. A failed backup stops
//! the daemon cleanly too: the old generation stays, consistent.
//!
//! Either way the dirty extents are used only when the parent snapshot
//! recorded exactly that bitmap for this source and size
//! ([`imgstore_engine::parent_bitmap`]); otherwise the backup reads the
//! whole disk and says why.

use std::path::{Path, PathBuf};

use imgstore_engine::{ChangedBlocks, Source};
use imgstore_format::{BitmapKind, Id, Snapshot, SnapshotBitmap};
use imgstore_qemu::{BitmapInfo, Export, ExportOptions, ImageInfo};

use crate::exit;
use crate::output::note;
use crate::vm::{bitmap_context, NbdDisk};

/// Checks a bitmap name given on the command line (QEMU allows up to 1023
/// bytes; a managed one gets a 17-byte generation suffix).
pub fn check_bitmap_name(name: &str, flag: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 1000 || name.chars().any(|c| c.is_control()) {
        return Err(exit::usage(format!(
            "{flag} {name:?}: a bitmap name is 1-1000 bytes without control characters"
        )));
    }
    Ok(())
}

/// Whether `candidate` is a generation of managed bitmap `name`
/// (`NAME-` and 16 lowercase hex digits).
pub fn is_generation(name: &str, candidate: &str) -> bool {
    candidate
        .strip_prefix(name)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|t| t.len() == 16 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// A new generation token: 16 hex digits, unique in practice.
fn new_token(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(path.as_os_str().as_encoded_bytes());
    let b = h.finalize();
    format!(
        "{:016x}",
        u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
    )
}

/// The changed-block part of a backup with a bitmap: against the parent
/// when the bitmap belongs to it (else `None`, with a note why), and the
/// bitmap record for the snapshot.
pub struct Plan {
    pub changed: Option<ChangedBlocks>,
    pub record: SnapshotBitmap,
}

/// An NBD source with `--bitmap` (its dirty extents read at connect, when
/// given) and/or `--checkpoint`.
pub fn plan_nbd(
    uri: &str,
    bitmap: Option<&str>,
    checkpoint: Option<&str>,
    dirty: Option<Vec<(u64, u64)>>,
    size: u64,
    parent: Option<&(Id, Snapshot)>,
    verify_unchanged: f64,
) -> Plan {
    let next = checkpoint.or(bitmap).unwrap_or_default().to_string();
    let mut changed = None;
    let mut read = String::new();
    if let (Some(b), Some(dirty)) = (bitmap, dirty) {
        match imgstore_engine::parent_bitmap(parent, BitmapKind::Nbd, b, uri, size) {
            Ok(_) => {
                let (base_id, base) = parent.cloned().expect("a parent matched");
                read = b.to_string();
                changed = Some(ChangedBlocks {
                    base_id,
                    base,
                    ranges: dirty,
                    verify_unchanged,
                });
            }
            Err(why) => note(&format!("--bitmap {b}: {why}: reading the whole disk")),
        }
    }
    Plan {
        changed,
        record: SnapshotBitmap {
            kind: BitmapKind::Nbd,
            name: bitmap.unwrap_or_default().to_string(),
            read,
            next,
            source: uri.to_string(),
        },
    }
}

/// A stopped qcow2 image whose bitmap imgstore manages: its daemon runs
/// from [`Managed::start`] until [`Managed::finish`] (or the drop of a
/// failed backup, which stops it cleanly).
pub struct Managed {
    name: String,
    path: PathBuf,
    identity: String,
    info: ImageInfo,
    daemon: Export,
    next: String,
}

impl Managed {
    /// Starts the private daemon on the qcow2 image at `path` (read-write,
    /// with a monitor, no export yet). `info` is what `qemu-img info` said
    /// before: the bitmaps as the last user left them.
    pub fn start(path: &Path, info: ImageInfo, name: &str) -> anyhow::Result<Managed> {
        if info.format != "qcow2" {
            return Err(exit::usage(format!(
                "--bitmap on an image file needs a qcow2 image (QEMU keeps persistent bitmaps only there); {} is {}: back up an NBD export of it with --bitmap, or without --bitmap",
                path.display(),
                info.format
            )));
        }
        let identity = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        let daemon = Export::start(
            path,
            "qcow2",
            &ExportOptions {
                writable: false,
                manage_bitmaps: true,
            },
        )?;
        Ok(Managed {
            name: name.to_string(),
            next: format!("{name}-{}", new_token(path)),
            path: path.to_path_buf(),
            identity,
            info,
            daemon,
        })
    }

    /// The image's size (what the guest sees).
    pub fn size(&self) -> u64 {
        self.info.virtual_size
    }

    /// Which generation to read, if the parent recorded one the image
    /// still holds intact; else why not.
    fn usable(&self, parent: Option<&(Id, Snapshot)>) -> Result<String, String> {
        let want = imgstore_engine::parent_bitmap(
            parent,
            BitmapKind::Managed,
            &self.name,
            &self.identity,
            self.size(),
        )
        .map_err(|e| e.to_string())?;
        let found: Option<&BitmapInfo> = self.info.bitmaps.iter().find(|b| b.name == want);
        match found {
            None => Err(format!(
                "the image holds no bitmap {want} (deleted or recreated, or rotated by a backup into another repository)"
            )),
            Some(b) if b.in_use() => Err(format!(
                "bitmap {want} is marked in-use: QEMU did not close the image cleanly (a crash or a kill), so it may have missed writes"
            )),
            Some(b) if !b.enabled() => Err(format!(
                "bitmap {want} is disabled: it did not record every write"
            )),
            Some(_) => Ok(want.to_string()),
        }
    }

    /// Exports the image (with the generation to read, when usable) and
    /// opens it as the backup's source; the plan against `parent`.
    pub fn open(
        &mut self,
        parent: Option<&(Id, Snapshot)>,
        verify_unchanged: f64,
    ) -> anyhow::Result<(Source, Plan)> {
        let mut read = match self.usable(parent) {
            Ok(b) => Some(b),
            Err(why) => {
                let why = if self
                    .info
                    .bitmaps
                    .iter()
                    .any(|b| is_generation(&self.name, &b.name))
                    || parent.is_some_and(|p| p.1.bitmap.is_some())
                {
                    why
                } else {
                    format!("first backup with this bitmap ({why})")
                };
                note(&format!(
                    "--bitmap {}: {why}: reading the whole disk",
                    self.name
                ));
                None
            }
        };
        if let Some(b) = read.as_deref() {
            if let Err(e) = self.daemon.export(Some(b)) {
                note(&format!(
                    "--bitmap {}: QEMU cannot use bitmap {b} ({e}): reading the whole disk",
                    self.name
                ));
                read = None;
                self.daemon.export(None)?;
            }
        } else {
            self.daemon.export(None)?;
        }
        let label = self.path.display().to_string();
        let context = bitmap_context(imgstore_qemu::EXPORTED_BITMAP);
        let disk = NbdDisk::connect_with(
            self.daemon.uri(),
            &label,
            read.is_some().then_some(context.as_str()),
        )?;
        self.daemon.seal();
        let changed = match &read {
            Some(_) => {
                if !disk.has_context(&context) {
                    anyhow::bail!(
                        "{label}: the private QEMU export does not offer the bitmap it was given"
                    );
                }
                let (base_id, base) = parent.cloned().expect("a parent matched");
                Some(ChangedBlocks {
                    base_id,
                    base,
                    ranges: disk.dirty_extents(&context)?,
                    verify_unchanged,
                })
            }
            None => None,
        };
        let source = Source::from_block_reader(&self.path, Box::new(disk));
        let record = SnapshotBitmap {
            kind: BitmapKind::Managed,
            name: self.name.clone(),
            read: read.unwrap_or_default(),
            next: self.next.clone(),
            source: self.identity.clone(),
        };
        Ok((source, Plan { changed, record }))
    }

    /// After the commit: adds the next generation, removes the older ones
    /// (the one read, stale or inconsistent ones), and stops the daemon
    /// cleanly so the bitmaps are written into the file. A failure here
    /// leaves the snapshot as it is; the next backup then reads the whole
    /// disk, and this says so.
    pub fn finish(mut self) {
        let old: Vec<String> = self
            .info
            .bitmaps
            .iter()
            .filter(|b| is_generation(&self.name, &b.name))
            .map(|b| b.name.clone())
            .collect();
        let r = (|| -> Result<(), imgstore_qemu::QemuError> {
            self.daemon.add_bitmap(&self.next)?;
            for b in &old {
                self.daemon.remove_bitmap(b)?;
            }
            self.daemon.stop()
        })();
        if let Err(e) = r {
            note(&format!(
                "imgstore: warning: the snapshot is committed, but the bitmap could not be rotated to {}: {e}; the next backup with --bitmap {} reads the whole disk",
                self.next, self.name
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_the_name_and_16_hex_digits() {
        assert!(is_generation("nightly", "nightly-0123456789abcdef"));
        assert!(!is_generation("nightly", "nightly"));
        assert!(!is_generation("nightly", "nightly-0123456789ABCDEF"));
        assert!(!is_generation("nightly", "nightly-0123456789abcde"));
        assert!(!is_generation("night", "nightly-0123456789abcdef"));
        assert!(!is_generation("nightly", "weekly-0123456789abcdef"));
        let t = new_token(Path::new("/x"));
        assert!(is_generation("n", &format!("n-{t}")), "{t}");
    }
}
