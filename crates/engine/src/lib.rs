//! The backup and restore engine: runs the pipeline between a source or
//! target and the chunk store, on rayon.
//!
//! * [`backup()`] reads a file, block device or stream region by region
//!   (skipping holes), cuts regions into zero extents and FastCDC chunks,
//!   hashes and compresses new chunks on every core, stores them, and
//!   commits a snapshot atomically.
//! * [`restore()`] rebuilds an image from a snapshot in parallel with
//!   positional writes, leaving holes in files, verifying every chunk and the
//!   whole-image BLAKE3 digest.
//! * [`LiveTarget`] serves a snapshot as a writable disk while restoring
//!   it into its target underneath (instant recovery).
//! * [`check()`] proves the repository whole (structure, reference counts,
//!   optionally every chunk's content) and maps damage to snapshots and
//!   byte ranges.
//! * [`select()`] resolves what the user typed (`latest`, an id prefix, a
//!   time, an NBD export name) to one snapshot; [`parent_for`] picks a
//!   backup's parent.
//! * [`plan_forget`] then [`forget()`] apply retention; [`record_damage`]
//!   keeps what check and verify found for healing.
//!
//! The engine reaches storage only through [`imgstore_repo::Repository`]:
//! it never links RocksDB and runs unchanged on the local store, on the
//! in-memory repository of its unit tests, and on the remote and
//! object-store implementations `docs/REMOTE.md` describes. One snapshot
//! is read through one [`SnapshotReader`], whatever the caller does with
//! the bytes.
//!
//! Why the unit of work is a *region* (8 MiB by default, aligned): regions
//! are what make the work parallel (each is chunked independently, chunk
//! boundaries are forced at region edges), what makes the image digest
//! parallel (a region is a complete BLAKE3 subtree), and what makes metadata
//! scale with change (an unchanged region reuses its content-addressed
//! recipe). Disk images change in place, so a forced cut every 8 MiB costs
//! deduplication almost nothing.
//!
//! The engine never prints: progress goes through the [`Progress`] trait.

mod aligned;
mod backup;
mod bitmap;
mod check;
mod claims;
mod copy;
mod diff;
pub mod digest;
mod error;
mod forget;
mod image;
mod live;
mod names;
mod overlay;
pub mod policy;
mod prehash;
mod read;
mod restore;
mod select;
mod snapshot;
mod source;
#[cfg(test)]
mod tests;

pub use backup::{backup, backup_changed, chunker_for, BackupOptions, BackupReport, ChangedBlocks};
pub use bitmap::{parent_bitmap, BitmapMismatch};
pub use check::{check, check_structure, CheckReport, DamagedSnapshot, Problem, ReadData};
pub use copy::{copy_snapshot, CopyReport};
pub use diff::diff;
pub use error::EngineError;
pub use forget::{forget, plan_forget, record_damage, retag, ForgetPlan, ForgetRequest};
pub use image::ImageReader;
pub use live::{
    LiveOptions, LiveStart, LiveStats, LiveTarget, LIVE_BLOCK, LIVE_STATE_MAGIC, LIVE_STATE_VERSION,
};
pub use names::{check_name, check_tag, NAME_MAX};
pub use overlay::{lock_overlay, overlay_info, Overlay, OverlayInfo, OverlayLock, OVERLAY_BLOCK};
pub use prehash::PreHash;
pub use restore::{
    remove_stale_temps, restore, restore_delta, restore_delta_disk, temp_path, BlockWriter,
    DeltaDisk, DeltaReport, RestoreReport, Target,
};
pub use select::{
    parent_for, parse_export_name, select, select_for_image, select_listed, select_unreadable,
    ParentChoice, Selector, SnapshotFilter,
};
pub use snapshot::SnapshotReader;
pub use source::{BlockReader, Source, SourceKind};

/// The config of a new repository chunking with `params`: a random id, the
/// current time, the region size derived from `params.max`.
pub fn new_repo_config(
    params: imgstore_chunker::Params,
    zstd_level: i32,
) -> imgstore_format::RepoConfig {
    use std::time::{SystemTime, UNIX_EPOCH};
    let chunking = imgstore_format::ChunkingConfig {
        algorithm: "fastcdc-2020".into(),
        min: params.min,
        avg: params.avg,
        max: params.max,
        zero_min: params.zero_min,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    imgstore_format::RepoConfig::new(random_id(now), now.as_secs() as i64, chunking, zstd_level)
}

/// 128 random bits as hex, from the kernel's generator (falling back to a
/// hash of the time and pid where /dev/urandom cannot be read).
fn random_id(now: std::time::Duration) -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let seed = format!("{now:?}{}", std::process::id());
        b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Receives progress of a long operation (called from worker threads).
pub trait Progress: Sync {
    /// Work begins; `total` bytes when known.
    fn start(&self, _total: Option<u64>) {}
    /// `bytes` more of the image are done.
    fn advance(&self, _bytes: u64) {}
    /// Work is complete.
    fn finish(&self) {}
}

/// A [`Progress`] that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}
