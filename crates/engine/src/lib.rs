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
//! * [`select()`] resolves what the user typed (`latest`, an id prefix, a
//!   time) to one snapshot.
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

mod backup;
pub mod digest;
mod error;
mod restore;
mod select;
mod source;

pub use backup::{backup, chunker_for, BackupOptions, BackupReport};
pub use error::EngineError;
pub use restore::{region_ids, restore, RestoreReport, Target};
pub use select::{select, Selector};
pub use source::{Source, SourceKind};

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
