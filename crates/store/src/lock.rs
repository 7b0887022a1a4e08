use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use imgstore_format::LOCK_FILE;
use rustix::fs::{flock, FlockOperation};

use crate::StoreError;

/// An exclusive lock on a repository, held while the value lives. The lock
/// file records the operation and pid so a second writer can say who holds it.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire(dir: &Path, operation: &str) -> Result<Lock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                op: "open lock file",
                source,
            })?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let mut parts = holder.split_whitespace();
            return Err(StoreError::Busy {
                operation: parts.next().unwrap_or("another operation").to_string(),
                pid: parts.next().unwrap_or("?").to_string(),
                path,
            });
        }
        let io = |source| StoreError::Io {
            path: path.clone(),
            op: "write lock file",
            source,
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{operation} {}", std::process::id()).map_err(io)?;
        Ok(Lock { _file: file })
    }
}
