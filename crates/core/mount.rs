//! `mount`: snapshots as image files in a read-only FUSE file system.

use std::io;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use imgstore_engine::ImageReader;
use imgstore_fuse::{Entry, Image};

use crate::args::MountArgs;
use crate::output::note;
use crate::units::{format_time, parse_size};

struct SnapImage(ImageReader<'static>);

impl Image for SnapImage {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf).map_err(|e| {
            note(&format!("imgstore mount: {e}"));
            io::Error::other(e.to_string())
        })
    }
    fn map(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.0
            .map(offset, len)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

pub fn mount(repo: &Path, a: MountArgs) -> anyhow::Result<()> {
    if !Path::new("/dev/fuse").exists() {
        return Err(crate::exit::usage("/dev/fuse is missing: load the fuse module (modprobe fuse) or use `imgstore serve` (NBD)"));
    }
    if !a.mountpoint.is_dir() {
        return Err(crate::exit::usage(format!(
            "mount point {} is not a directory: create it first",
            a.mountpoint.display()
        )));
    }
    let empty = std::fs::read_dir(&a.mountpoint)
        .with_context(|| format!("cannot read mount point {}", a.mountpoint.display()))?
        .next()
        .is_none();
    if !empty {
        return Err(crate::exit::usage(format!(
            "mount point {} is not empty: mount on an empty directory (its files would be hidden)",
            a.mountpoint.display()
        )));
    }
    let cache = parse_size(&a.cache)? as usize;
    // The file system serves until unmounted, for the rest of the process:
    // the store and snapshot list live as long.
    let store: &'static crate::open::Repo = Box::leak(Box::new(crate::open::open_read(repo)?));
    let snaps = crate::select::chosen_snapshots(
        &**store,
        &a.snapshots,
        a.snapshots.is_empty(),
        a.name.as_deref(),
    )?;
    let snaps: &'static [_] = Vec::leak(snaps);
    let per = (cache / snaps.len()).max(8 << 20);
    // Two snapshots of one name taken in the same second get their short
    // ids appended, so every snapshot has its own file.
    let mut seen: std::collections::HashMap<(&str, String), usize> =
        std::collections::HashMap::new();
    for (_, s) in snaps.iter() {
        *seen
            .entry((s.name.as_str(), format_time(s.time_ns)))
            .or_default() += 1;
    }
    let mut entries = Vec::new();
    for (id, s) in snaps {
        let time = format_time(s.time_ns);
        let time_label = if seen[&(s.name.as_str(), time.clone())] > 1 {
            format!("{time}-{}", id.short())
        } else {
            time
        };
        entries.push(Entry {
            id: id.to_hex(),
            name: s.name.clone(),
            time_label,
            time: UNIX_EPOCH + Duration::from_nanos(s.time_ns.max(0) as u64),
            data_bytes: s.size - s.stats.zero_bytes.min(s.size),
            image: Box::new(SnapImage(ImageReader::new(&**store, id, s, per)?)),
        });
    }
    // Ctrl-C and SIGTERM unmount and end the command cleanly; watched
    // before the mount, so no signal finds it half set up.
    let (rt, mut stops) = crate::stops::watch()?;
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let mounted = imgstore_fuse::mount(entries, &a.mountpoint, uid, gid)
        .with_context(|| format!("cannot mount at {}", a.mountpoint.display()))?;
    note(&format!(
        "mounted {} read-only at {} (by-name/NAME/TIME.img, by-id/ID.img); unmount with `fusermount3 -u {}` or Ctrl-C",
        crate::units::plural(snaps.len() as u64, "snapshot"),
        a.mountpoint.display(),
        a.mountpoint.display()
    ));
    let mountpoint = a.mountpoint.display();
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let why = loop {
            tokio::select! {
                why = stops.next() => break why,
                _ = tick.tick() => if mounted.is_finished() {
                    return mounted.wait().with_context(|| format!("serving {mountpoint} failed"));
                },
            }
        };
        mounted
            .unmount()
            .with_context(|| format!("cannot unmount {mountpoint} after {why}"))?;
        // Files open in the tree stay readable until closed (a lazy
        // unmount): a copy running from it finishes, then the command ends.
        let mut told = false;
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stops.next() => return Err(stopped_busy(&mountpoint)),
                _ = tick.tick() => {
                    if mounted.is_finished() {
                        break;
                    }
                    if !told && started.elapsed() > Duration::from_secs(1) {
                        told = true;
                        note(&format!("{mountpoint} is unmounted; still serving the files open in it until they are closed (Ctrl-C again to stop now)"));
                    }
                }
            }
        }
        match mounted.wait() {
            // Once unmounted, the kernel may end the connection as aborted
            // rather than gone (seen after SIGTERM with a file open): the
            // end asked for, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
            r => r.with_context(|| format!("serving {mountpoint} failed"))?,
        }
        note(&format!("unmounted {mountpoint} ({why})"));
        Ok(())
    })
}

/// A second signal while files were still open: the command ends, and
/// their readers get I/O errors.
fn stopped_busy(mountpoint: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "stopped while files in {mountpoint} were still open: their readers get I/O errors from now on"
    )
}
