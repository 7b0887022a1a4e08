use std::path::PathBuf;

use imgstore_format::{FormatError, Id, ObjectKind};

/// Errors of a repository implementation. Each carries the path, object or
/// operation it is about, so the binary can print one line that says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{} is not an imgstore repository ({why}): create one with `imgstore init`", path.display())]
    NotARepository { path: PathBuf, why: String },
    #[error("{} already exists and is not empty: choose a new path for the repository", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
    #[error("repository {} belongs to uid {owner} but imgstore runs as uid {user}: run it as the owner (or `chown -R` the repository){}", path.display(), if *readable { "" } else { "; it is not readable by this user" })]
    Owner {
        path: PathBuf,
        owner: u32,
        user: u32,
        readable: bool,
    },
    #[error("the repository database in {} is damaged and cannot be opened ({detail}): restore the repository directory from a copy; `imgstore check` lists what a readable database holds", path.display())]
    Damaged { path: PathBuf, detail: String },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("repository is busy: {operation} by pid {pid} (lock {}); wait for it to finish", path.display())]
    Busy {
        operation: String,
        pid: String,
        path: PathBuf,
    },
    #[error("no space left on the device holding {}: free space, then run the backup again (earlier snapshots are intact)", path.display())]
    NoSpace { path: PathBuf, detail: String },
    /// The storage engine behind an implementation failed (RocksDB for the
    /// local store).
    #[error("{engine} {op} failed in {}: {detail}", path.display())]
    Backend {
        engine: &'static str,
        path: PathBuf,
        op: &'static str,
        detail: String,
    },
    #[error("{kind:?} {id} cannot be read: {detail}")]
    Unreadable {
        kind: ObjectKind,
        id: Id,
        detail: String,
    },
    #[error("{kind:?} {id} is missing from the store")]
    Missing { kind: ObjectKind, id: Id },
    #[error("{kind:?} {id} is corrupt: {source}")]
    Corrupt {
        kind: ObjectKind,
        id: Id,
        source: FormatError,
    },
    #[error("snapshot {id} is corrupt: {source}")]
    CorruptSnapshot { id: Id, source: FormatError },
    /// A command named a snapshot whose record cannot be read.
    #[error("snapshot {id} cannot be read ({why}): `imgstore check` reports it, `imgstore forget {}` removes it", id.short())]
    UnreadableSnapshot { id: Id, why: String },
    #[error("snapshot {id} is protected: run `imgstore unprotect {}` first", id.short())]
    Protected { id: Id },
    #[error("no snapshot {id} in the repository")]
    NoSnapshot { id: Id },
    #[error("the repository was opened read-only")]
    ReadOnly,
    #[error("invalid store operation: {0}")]
    Invalid(String),
    /// The server could not be reached (after retries), or the TLS
    /// handshake failed.
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The server refused the credentials or the operation.
    #[error("{url} refused the request: {detail}")]
    Denied { url: String, detail: String },
    /// The object store behind a bucket-backed repository answered with an
    /// error or with something imgstore did not write (the message names
    /// the bucket and the object).
    #[error("{0}")]
    Storage(String),
    /// The server answered with an error or an answer that breaks the
    /// protocol.
    #[error("{url}: {detail}")]
    Remote { url: String, detail: String },
    /// A backup started from the client's cache of the server (its hello,
    /// the parent it picked last time) found the server's answers
    /// different: nothing was committed, and the backup starts again from
    /// the server's answers.
    #[error("{url}: the cached view of the repository is out of date ({detail}): back up again")]
    Outdated { url: String, detail: String },
}

impl RepoError {
    /// The same error again, for each further caller a kept failure fails
    /// (a remote session that could not be opened, a bucket upload that
    /// failed on its own thread): the kinds a request or an upload fails
    /// with keep their kind, and so their exit status; others keep their
    /// words.
    pub fn again(&self) -> RepoError {
        match self {
            RepoError::Unreachable { url, detail } => RepoError::Unreachable {
                url: url.clone(),
                detail: detail.clone(),
            },
            RepoError::Denied { url, detail } => RepoError::Denied {
                url: url.clone(),
                detail: detail.clone(),
            },
            RepoError::Remote { url, detail } => RepoError::Remote {
                url: url.clone(),
                detail: detail.clone(),
            },
            RepoError::Invalid(why) => RepoError::Invalid(why.clone()),
            RepoError::Outdated { url, detail } => RepoError::Outdated {
                url: url.clone(),
                detail: detail.clone(),
            },
            RepoError::NoSpace { path, detail } => RepoError::NoSpace {
                path: path.clone(),
                detail: detail.clone(),
            },
            other => RepoError::Storage(other.to_string()),
        }
    }
}
