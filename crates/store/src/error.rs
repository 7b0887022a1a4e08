//! The store's errors are the repository interface's ([`RepoError`]); this
//! module turns RocksDB's into them.

pub use imgstore_repo::RepoError as StoreError;

/// A RocksDB failure as a repository error: running out of space and a
/// database that cannot be opened because it is corrupt get their own
/// variants (they tell the user different things to do).
pub(crate) fn db(path: &std::path::Path, op: &'static str, e: rocksdb::Error) -> StoreError {
    let detail = e.into_string();
    if detail.contains("No space left") || detail.contains("ENOSPC") {
        return StoreError::NoSpace {
            path: path.to_path_buf(),
            detail,
        };
    }
    if op == "open" && detail.contains("Corruption") {
        return StoreError::Damaged {
            path: path.to_path_buf(),
            detail,
        };
    }
    StoreError::Backend {
        engine: "RocksDB",
        path: path.to_path_buf(),
        op,
        detail,
    }
}
