//! Exit codes, documented in the README ("Exit codes") and `imgstore --help`.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (`diff`: the snapshots are equal) |
//! | 1 | failure not listed below (`diff`: the snapshots differ; `restore --live`: stopped before TARGET was complete) |
//! | 2 | bad arguments or usage (`diff`: trouble, as `diff(1)`) |
//! | 3 | no repository at the path, or not an imgstore repository |
//! | 4 | repository busy: another writer holds its lock |
//! | 5 | damaged or wrong data found (`check`, `verify`, a restore that met damage) |
//! | 6 | snapshot not found (or ambiguous, or several images and no `--name`) |
//! | 7 | the server could not be reached, or refused the token or operation |
//! | 8 | the server's repository is not the one expected: plain although a key or passphrase is given, or not what this client recorded for the URL (`known-repos.json`); nothing was sent |
//! | 141 | stdout closed by its reader (`restore - \| head`): ends quietly |

use imgstore_engine::EngineError;
use imgstore_remote::known::TrustError;
use imgstore_repo::RepoError;

pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const NO_REPOSITORY: u8 = 3;
pub const BUSY: u8 = 4;
pub const DAMAGED: u8 = 5;
pub const NOT_FOUND: u8 = 6;
pub const REMOTE: u8 = 7;
pub const UNTRUSTED: u8 = 8;
pub const PIPE_CLOSED: u8 = 141;

/// An error the binary raises itself, with the exit code it means.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Coded {
    pub code: u8,
    pub msg: String,
}

/// An exit without a message (`diff` found differences; the reader of
/// stdout went away).
#[derive(Debug, thiserror::Error)]
#[error("exit {0}")]
pub struct Quiet(pub u8);

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Coded {
        code: USAGE,
        msg: msg.into(),
    }
    .into()
}

pub fn not_found(msg: impl Into<String>) -> anyhow::Error {
    Coded {
        code: NOT_FOUND,
        msg: msg.into(),
    }
    .into()
}

pub fn damaged(msg: impl Into<String>) -> anyhow::Error {
    Coded {
        code: DAMAGED,
        msg: msg.into(),
    }
    .into()
}

fn repo_code(e: &RepoError) -> u8 {
    match e {
        RepoError::NotARepository { .. } => NO_REPOSITORY,
        RepoError::AlreadyExists { .. } => USAGE,
        RepoError::Busy { .. } => BUSY,
        RepoError::Damaged { .. }
        | RepoError::Corrupt { .. }
        | RepoError::CorruptSnapshot { .. }
        | RepoError::UnreadableSnapshot { .. }
        | RepoError::Missing { .. }
        | RepoError::Unreadable { .. } => DAMAGED,
        RepoError::NoSnapshot { .. } => NOT_FOUND,
        RepoError::Unreachable { .. } | RepoError::Denied { .. } | RepoError::Storage(_) => REMOTE,
        _ => FAILURE,
    }
}

/// The exit code an error means: the first cause in its chain that says.
pub fn code_of(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(q) = cause.downcast_ref::<Quiet>() {
            return q.0;
        }
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return match e {
                EngineError::Repo(r) => repo_code(r),
                EngineError::ChunkDamaged { .. }
                | EngineError::RecipeDamaged { .. }
                | EngineError::DigestMismatch { .. } => DAMAGED,
                EngineError::Select(_) | EngineError::Collected { .. } => NOT_FOUND,
                EngineError::Invalid { what, .. } if *what == "image name" || *what == "tag" => {
                    USAGE
                }
                EngineError::OutputClosed { .. } => PIPE_CLOSED,
                _ => FAILURE,
            };
        }
        if let Some(r) = cause.downcast_ref::<RepoError>() {
            return repo_code(r);
        }
        if let Some(t) = cause.downcast_ref::<TrustError>() {
            return match t {
                TrustError::Record { .. } => FAILURE,
                _ => UNTRUSTED,
            };
        }
    }
    FAILURE
}
