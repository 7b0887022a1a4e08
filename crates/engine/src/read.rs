//! Reading a repository in parallel: the thread pools the reading stages
//! run on, and [`ChunkReader`], the one place chunks are fetched by id,
//! opened with the repository's codec, decoded and checked against their
//! ids (what Proxmox Backup Server calls `ReadChunk`).
//!
//! Restore, delta restore, `check --read-data`, `diff`, the changed-block
//! backup and the snapshot reader use these instead of each building its
//! own pool or decoding chunks its own way. What a caller does with a
//! chunk that is missing or wrong (damage at an offset of a snapshot, a
//! line in a check report) stays with the caller.
//!
//! Not here: rebuilding a whole region ([`crate::SnapshotReader`]), which
//! decodes its chunks in place into the region's buffer and proves them
//! together with one hash of the region against its recorded chaining
//! value, instead of one hash per chunk.

use imgstore_format::{FrameCodec, Id};
use imgstore_repo::{ChunkRead, RepoError, Repository};

use crate::EngineError;

/// A rayon pool with two workers per core, for stages that mix I/O and CPU.
pub(crate) fn io_pool() -> Result<rayon::ThreadPool, EngineError> {
    pool(2)
}

/// The machine's cores (2 when it cannot tell).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Workers for a stage whose every step makes one call to `repo`:
/// `per_core` per core, or one per core plus the calls the repository
/// wants in flight ([`Repository::in_flight`]) when that is more.
pub(crate) fn workers(repo: &dyn Repository, per_core: usize) -> usize {
    (cores() * per_core).max(cores() + repo.in_flight())
}

/// A rayon pool with `per_core` workers per core.
pub(crate) fn pool(per_core: usize) -> Result<rayon::ThreadPool, EngineError> {
    threads(cores() * per_core)
}

/// A rayon pool of `n` workers.
pub(crate) fn threads(n: usize) -> Result<rayon::ThreadPool, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| EngineError::Invalid {
            what: "thread pool",
            why: e.to_string(),
        })
}

/// Why a chunk's stored frame does not give the chunk.
#[derive(Debug)]
pub(crate) enum BadChunk {
    /// A sealed frame does not open (altered, or another key's).
    Sealed(String),
    /// The frame does not decode.
    Decode(String),
    /// It decodes to `holds` bytes where `len` were expected.
    Length { holds: usize, len: u64 },
    /// Its bytes do not hash to its id.
    Content,
}

/// The words `check` reports a bad chunk with.
impl std::fmt::Display for BadChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadChunk::Sealed(why) => f.write_str(why),
            BadChunk::Decode(why) => write!(f, "does not decode ({why})"),
            BadChunk::Length { holds, len } => {
                write!(f, "holds {holds} bytes, its reference entry says {len}")
            }
            BadChunk::Content => f.write_str("content does not match its id"),
        }
    }
}

/// Chunks by id from one repository: stored frames in batches, and each
/// frame turned into the chunk's bytes, proven against its id.
#[derive(Clone, Copy)]
pub(crate) struct ChunkReader<'a> {
    repo: &'a dyn Repository,
}

impl<'a> ChunkReader<'a> {
    pub(crate) fn new(repo: &'a dyn Repository) -> ChunkReader<'a> {
        ChunkReader { repo }
    }

    /// Stored frames of `ids` (one batched call), in order, each with its
    /// own outcome: a chunk missing, unreadable or collected by a gc does
    /// not fail the others.
    pub(crate) fn frames(&self, ids: &[Id]) -> Result<Vec<ChunkRead>, RepoError> {
        self.repo.chunk_frames(ids)
    }

    /// Opens and decodes `frame`, the stored chunk `id`, into `out`
    /// (replacing what it held), and checks that it is `len` bytes that
    /// hash to `id`.
    pub(crate) fn decode(
        &self,
        id: &Id,
        frame: &[u8],
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), BadChunk> {
        let codec = self.repo.codec();
        let frame = codec.open_chunk(id, frame).map_err(BadChunk::Sealed)?;
        FrameCodec::with_thread(|c| c.decode(&frame, out))
            .map_err(|e| BadChunk::Decode(e.to_string()))?;
        if out.len() as u64 != len {
            return Err(BadChunk::Length {
                holds: out.len(),
                len,
            });
        }
        if !codec.chunk_matches(out, id) {
            return Err(BadChunk::Content);
        }
        Ok(())
    }
}
