use std::path::PathBuf;

use imgstore_format::{FormatError, Id, ObjectKind};
use imgstore_repo::{DamageMark, RepoError};

/// Errors of backup, restore and snapshot selection, carrying their evidence.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("source {}: {why}", path.display())]
    BadSource { path: PathBuf, why: String },
    #[error("cannot read source {} at byte {offset}: {source}", path.display())]
    SourceRead {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("source {} changed size during the backup (was {before} bytes, now {after}; noticed at byte {at}); no snapshot was written: back up a stable copy (an LVM or qemu snapshot)", path.display())]
    SourceChanged {
        path: PathBuf,
        before: u64,
        after: u64,
        at: u64,
    },
    #[error("source {} differs from the base snapshot in bytes {offset}..{} that the change list says are unchanged: the list is wrong or stale; no snapshot was written (run a full backup)", path.display(), offset + len)]
    ChangeListWrong {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    /// A server lost regions a backup had uploaded, and they could not be
    /// sent again.
    #[error("{repo} lost {regions} regions this backup of {image} had uploaded ({why}); no snapshot was written: run the backup again, it sends only what the server lacks")]
    RegionsLost {
        repo: String,
        image: String,
        regions: usize,
        why: &'static str,
    },
    #[error("source {} is empty (0 bytes); no snapshot was written: check the command that feeds it, or pass --allow-empty to keep an empty image", path.display())]
    EmptySource { path: PathBuf },
    #[error("target {}: {why}", path.display())]
    BadTarget { path: PathBuf, why: String },
    #[error("cannot write target {} at byte {offset}: {source}", path.display())]
    TargetWrite {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("output closed after {written} of {size} bytes of snapshot {snapshot}")]
    OutputClosed {
        snapshot: String,
        written: u64,
        size: u64,
    },
    #[error("snapshot {snapshot}: chunk {chunk} at byte {offset} is damaged ({why}); run `imgstore check --read-data`")]
    ChunkDamaged {
        snapshot: String,
        offset: u64,
        chunk: Id,
        why: String,
    },
    #[error("snapshot {snapshot} was forgotten and its data deleted by a gc while this command read it (at byte {offset}); nothing is damaged: read a snapshot that is kept")]
    Collected { snapshot: String, offset: u64 },
    #[error("snapshot {snapshot}: region at byte {offset} is damaged: {source}")]
    RecipeDamaged {
        snapshot: String,
        offset: u64,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("snapshot {snapshot}: restored image digest {got} does not match the recorded {want}")]
    DigestMismatch {
        snapshot: String,
        want: String,
        got: String,
    },
    #[error("live-restore state {}: {why}", path.display())]
    LiveState { path: PathBuf, why: String },
    #[error("{0}")]
    Select(String),
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("format: {0}")]
    Format(#[from] FormatError),
}

impl EngineError {
    /// The damage mark this error is evidence of (a chunk found missing,
    /// unreadable or altered), for the repository to record so the next
    /// backup of the same data repairs it.
    pub fn damage_mark(&self) -> Option<DamageMark> {
        match self {
            EngineError::ChunkDamaged { chunk, why, .. } => Some(DamageMark {
                kind: ObjectKind::Chunk,
                id: *chunk,
                why: why.clone(),
            }),
            _ => None,
        }
    }
}
